"""
The Python-tool sandbox (mlxchat/execution.py): every attack must fail inside the child, come back
as a clear error, and leave this process (the "engine") working. Most tests run the full sandbox;
the `_layers` tests switch the Python layer off to check that the kernel layer holds on its own
(they skip where this OS/kernel lacks it), or the kernel layer off to check the Python layer
alone (reads: all three). Network traffic only ever targets 127.0.0.1.
"""
import os
import socket
import sys
import threading
import time

import pytest

from mlxchat.execution import (MEMORY_ERROR, TIMEOUT_ERROR, ExecutionResult, _read_roots,
                               _seatbelt_profiles, execute_code, python_tool, sandbox_layers,
                               use_calculator)

ALL = ("py", "kernel", "mem")
PY_ONLY = ("py", "mem")        # the Python layer (+ memory rlimits), no seccomp/Landlock/Seatbelt
KERNEL_ONLY = ("kernel", "mem")  # the OS layer alone: no audit hook, no stubs
READ_BLOCKED = ("Blocked: reading outside the sandbox directory and the Python libraries is not "
                "allowed")


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _try_each(snippets, layers=("py", "kernel", "mem"), **kw):
    """Run several attack snippets in one sandboxed child (one process start instead of many),
    each in its own namespace and from the private directory; returns, per snippet, "OK" or
    "<ExceptionType>: <message>"."""
    program = ("import os\nstart = os.getcwd()\n"
               f"for src in {list(snippets)!r}:\n"
               "    try:\n"
               "        exec(src, {})\n"
               "        print('OK', flush=True)\n"
               "    except BaseException as e:\n"
               "        print(type(e).__name__ + ': ' + str(e).replace('\\n', ' '), flush=True)\n"
               "    os.chdir(start)\n")
    r = execute_code(program, _layers=layers, **kw)
    assert r.success, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == len(snippets), r.stdout
    return out


def _layer(name):
    return sandbox_layers().get(name)


def _need(*names):
    """Skip unless one of the named OS layers is enforced here (e.g. seccomp on Linux, Seatbelt
    on macOS)."""
    if not any(_layer(n) for n in names):
        pytest.skip(f"none of {names} is available on this machine")


# ----------------------------------------------------------------------------- basics

def test_happy_path():
    r = execute_code("x = 6 * 7\nprint('answer', x)")
    assert isinstance(r, ExecutionResult)
    assert r.success and r.error is None and not r.timeout and not r.memory_exceeded
    assert r.stdout == "answer 42\n" and r.stderr == ""


def test_exception_is_captured_with_its_error_line():
    r = execute_code("def f():\n    raise ValueError('boom')\nprint('before')\nf()")
    assert not r.success
    assert r.stdout == "before\n"
    assert r.error == "ValueError: boom"
    # the traceback points into the LLM's code, with its source line
    assert 'File "<llm>", line 2, in f' in r.stderr and "raise ValueError('boom')" in r.stderr
    r = execute_code("print(1 +)")
    assert not r.success and r.error.startswith("SyntaxError")


def test_exit_status_and_stdin():
    assert execute_code("import sys; sys.exit(0)").success
    r = execute_code("import sys; sys.exit(3)")
    assert not r.success and "3" in r.error
    # stdin is /dev/null: input() sees EOF instead of hanging
    r = execute_code("import sys\nprint(repr(sys.stdin.read()))\ninput()")
    assert r.stdout == "''\n" and r.error.startswith("EOFError")


def test_private_directory_is_cwd_and_is_deleted():
    r = execute_code("import os\nopen('notes.txt', 'w').write('kept')\n"
                     "print(os.getcwd())\nprint(open('notes.txt').read())")
    assert r.success, r.stderr
    cwd, content = r.stdout.split()
    assert content == "kept"
    assert not os.path.exists(cwd)  # removed with everything in it


def test_env_is_scrubbed(monkeypatch):
    monkeypatch.setenv("MLXCHAT_SECRET_TOKEN", "hunter2")
    r = execute_code("import os, json\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd())")
    assert r.success, r.stderr
    import json
    env_line, cwd = r.stdout.splitlines()
    env = json.loads(env_line)
    assert "MLXCHAT_SECRET_TOKEN" not in env and "hunter2" not in r.stdout
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == env["TMPDIR"] == cwd
    # nothing of ours leaks: only PATH/HOME/TMPDIR, the thread caps the guard sets, and the
    # LC_CTYPE CPython itself adds when it coerces the C locale
    allowed = {"PATH", "HOME", "TMPDIR", "LC_CTYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "__CF_USER_TEXT_ENCODING"}
    assert set(env) <= allowed, set(env) - allowed


# ----------------------------------------------------------------------------- time

def test_infinite_loop_is_killed_promptly():
    t0 = time.monotonic()
    r = execute_code("import os\nprint(os.getpid())\nwhile True:\n    pass", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.timeout and not r.success
    assert r.error == TIMEOUT_ERROR == "Execution timed out (process killed)"
    assert 1.0 <= elapsed < 4.0  # the 1 s limit plus the kill; slack for a loaded 2-core CI machine
    pid = int(r.stdout.split()[0])  # printed before the loop (line-buffered)
    assert _gone(pid)


def test_sleeping_child_with_closed_pipes_is_still_timed_out():
    # closing stdout/stderr must not make the parent think the child is done (or wait forever)
    t0 = time.monotonic()
    r = execute_code("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)", timeout=1.0)
    assert r.timeout and time.monotonic() - t0 < 3.0


def test_fork_bomb_is_stopped_and_the_machine_is_fine():
    def count_pids():
        return sum(1 for d in os.listdir("/proc") if d.isdigit()) if os.path.isdir("/proc") else 0
    before = count_pids()
    bomb = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except Exception:\n"
            "        pass\n")
    t0 = time.monotonic()
    r = execute_code(bomb, timeout=1.0)
    assert not r.success and r.timeout
    assert time.monotonic() - t0 < 3.5
    # other ways in: all refused, with the reason
    r = execute_code("import os; os.fork()")
    assert r.error == "Blocked: creating processes is not allowed (os.fork)"
    for out in _try_each(["import os; os.forkpty()",
                          "import os; os.posix_spawn('/bin/true', ['true'], {})",
                          "import os; os.execv('/bin/sh', ['sh'])"]):
        assert out.startswith("PermissionError: Blocked: creating processes is not allowed"), out
    if before:
        assert count_pids() - before < 50  # no swarm left behind
    r = execute_code("print('still alive')")
    assert r.success and r.stdout == "still alive\n"


# ----------------------------------------------------------------------------- memory

def test_ten_gigabyte_allocation_is_refused():
    t0 = time.monotonic()
    r = execute_code("x = b'x' * (10 * 1024 ** 3)\nprint('allocated')")
    assert not r.success and r.memory_exceeded
    assert r.error == MEMORY_ERROR == "Memory limit exceeded"
    assert "allocated" not in r.stdout
    assert time.monotonic() - t0 < 10.0


def test_gradual_allocation_is_stopped():
    # bounded at 2 GiB so that a broken limit cannot hurt the machine: it would print 'survived'
    code = ("x = []\n"
            "for _ in range(2048):\n"
            "    x.append(b'\\x01' * 2 ** 20)\n"
            "print('survived')\n")
    r = execute_code(code, maximum_memory_bytes=128 * 1024 ** 2)
    assert r.memory_exceeded and "survived" not in r.stdout


def test_rss_watchdog_alone_stops_memory_growth():
    # without the rlimits ("mem" layer off) the parent's watchdog is the limit, as on macOS
    code = ("import time\nx = []\n"
            "for _ in range(2048):\n"
            "    x.append(b'\\x01' * 2 ** 20)\n"
            "print('survived')\n")
    r = execute_code(code, maximum_memory_bytes=128 * 1024 ** 2, _layers=("py", "kernel"))
    assert r.memory_exceeded and r.error == MEMORY_ERROR
    assert "MemoryError" not in r.stderr  # killed from outside, not by an allocation failure
    assert "survived" not in r.stdout


def test_disk_limits():
    # one file: RLIMIT_FSIZE makes the write fail
    r = execute_code("open('big', 'wb').write(b'x' * (16 * 2 ** 20))",
                     maximum_disk_bytes=4 * 2 ** 20)
    assert not r.success and "File too large" in r.error
    # many files: the parent's directory watchdog kills the child
    r = execute_code("import time\n"
                     "for i in range(12):\n"
                     "    open(f'f{i}', 'wb').write(b'x' * 2 ** 20)\n"
                     "time.sleep(10)\n", timeout=5.0, maximum_disk_bytes=4 * 2 ** 20)
    assert not r.success and not r.timeout and r.error.startswith("Disk limit exceeded")


# ----------------------------------------------------------------------------- output

def test_output_flood_is_truncated_without_hanging():
    t0 = time.monotonic()
    r = execute_code("while True:\n    print('x' * 1000)", timeout=1.0)
    assert r.timeout and r.output_truncated
    assert time.monotonic() - t0 < 3.5
    assert len(r.stdout.encode()) < 64 * 1024 + 200 and "output truncated" in r.stdout
    # a finite flood on both streams: the program completes, we keep the first 1 KiB of each
    r = execute_code("import sys\nprint('a' * 300_000)\nsys.stderr.write('b' * 300_000)",
                     max_output_bytes=1024)
    assert r.success and r.output_truncated
    assert r.stdout.startswith("a" * 1024) and len(r.stdout) < 1024 + 100
    assert r.stderr.startswith("b" * 1024) and len(r.stderr) < 1024 + 100


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("layers", [("py", "kernel", "mem"), PY_ONLY], ids=["all", "python-only"])
def test_writes_outside_the_private_directory_fail(tmp_path, layers):
    target = tmp_path / "outside.txt"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    attempts = [
        f"open({str(target)!r}, 'w').write('pwned')",
        f"import pathlib; pathlib.Path({str(target)!r}).write_text('pwned')",
        f"import os; os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os; os.chdir({str(tmp_path)!r}); open('outside.txt', 'w')",
        "open('../../outside.txt', 'w')",  # escaping the private directory lexically
        f"import shutil; shutil.rmtree({str(victim)!r})",
        f"import os; os.remove({str(victim / 'keep.txt')!r})",
        f"import os; os.rename({str(victim / 'keep.txt')!r}, 'stolen.txt')",
    ]
    for code, out in zip(attempts, _try_each(attempts, layers)):
        assert out.startswith("PermissionError: Blocked: writing outside the sandbox directory "
                              "is not allowed"), (code, out)
    # links could later lead a path check astray: none can be made, even inside
    links = [f"import os; os.symlink({str(victim)!r}, 'link')", "import os; os.link('a', 'b')"]
    for out in _try_each(links, layers):
        assert out.startswith("PermissionError: Blocked: creating links is not allowed"), out
    r = execute_code(attempts[0], _layers=layers)  # and as the result's error
    assert r.error == f"Blocked: writing outside the sandbox directory is not allowed ({target})"
    assert not target.exists()
    assert (victim / "keep.txt").read_text() == "precious"
    # inside the private directory everything works, shutil.rmtree included
    r = execute_code("import os, shutil\nos.makedirs('a/b')\nopen('a/b/c.txt', 'w').write('ok')\n"
                     "print(open('a/b/c.txt').read())\nos.rename('a/b/c.txt', 'a/d.txt')\n"
                     "shutil.rmtree('a')\nprint(os.listdir('.'))", _layers=layers)
    assert r.success, r.stderr
    assert r.stdout == "ok\n[]\n"


def test_kernel_alone_refuses_writes_outside(tmp_path):
    _need("landlock", "seatbelt")
    target = tmp_path / "outside.txt"
    r = execute_code("try:\n"
                     f"    open({str(target)!r}, 'w').write('pwned')\n"
                     "except OSError as e:\n"
                     "    print('refused', e.errno)\n"
                     "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())",
                     _layers=KERNEL_ONLY)
    assert r.success, r.stderr
    assert r.stdout.startswith("refused") and r.stdout.endswith("fine\n")
    assert not target.exists()


# ----------------------------------------------------------------------------- reads

READ_LAYERS = pytest.mark.parametrize("layers", [ALL, KERNEL_ONLY, PY_ONLY],
                                      ids=["all", "kernel-only", "python-only"])


def _need_read_layers(layers):
    """Skip the kernel-only variant where no kernel layer confines reads."""
    if "py" not in layers and not (_layer("landlock_reads") or _layer("seatbelt_reads")):
        pytest.skip("this kernel/OS cannot confine reads: no Landlock (Linux >= 5.13) and no "
                    "Seatbelt read rules (macOS); only the Python layer refuses them here")


def _read_attempts(snippets, layers):
    """Run snippets that each set `data` by reading something, in one child; per snippet the
    line "READ <repr(data)>" or "<ExceptionType>: <message>". Returns (lines, the result)."""
    program = ("import os\nstart = os.getcwd()\n"
               f"for src in {list(snippets)!r}:\n"
               "    ns = {}\n"
               "    try:\n"
               "        exec(src, ns)\n"
               "        print('READ', repr(ns.get('data')), flush=True)\n"
               "    except BaseException as e:\n"
               "        print(type(e).__name__ + ': ' + str(e).replace('\\n', ' '), flush=True)\n"
               "    os.chdir(start)\n")
    r = execute_code(program, timeout=20.0, _layers=layers)
    assert r.success, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(snippets), r.stdout
    return lines, r


@READ_LAYERS
def test_reads_outside_the_allowed_roots_fail(tmp_path, monkeypatch, layers):
    _need_read_layers(layers)
    secret = "mlxchat-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("MLXCHAT_TEST_API_KEY", secret)  # in this (the parent's) environment
    real_home = os.path.realpath(os.path.expanduser("~"))
    home = tmp_path / "home"      # stands in for the user's home directory
    home.mkdir()
    (home / ".netrc").write_text(secret)
    monkeypatch.setenv("HOME", str(home))
    project = tmp_path / "project"  # and for the parent's working directory
    project.mkdir()
    (project / "secrets.env").write_text(secret)
    monkeypatch.chdir(project)
    me = os.getpid()  # the sandboxed child's parent
    reads = [
        f"data = open('/proc/{me}/environ', 'rb').read()",
        "import os; data = open(f'/proc/{os.getppid()}/environ', 'rb').read()",
        f"data = open('/proc/{me}/task/{me}/environ', 'rb').read()",
        "data = open('/etc/passwd').read()",
        f"data = open({str(home / '.netrc')!r}).read()",
        f"data = open({str(project / 'secrets.env')!r}).read()",
        f"import pathlib; data = pathlib.Path({str(project / 'secrets.env')!r}).read_bytes()",
        f"import os; fd = os.open({str(home / '.netrc')!r}, os.O_RDONLY); data = os.read(fd, 99)",
        f"import shutil; shutil.copyfile({str(home / '.netrc')!r}, 'copy')\n"
        "data = open('copy').read()",
        # through symlinks that lead out: the parent's cwd, the child's own root
        f"data = open('/proc/{me}/cwd/secrets.env').read()",
        "data = open('/proc/self/root/etc/passwd').read()",
        # os.open's dir_fd, from a directory outside, or through a path that climbs from a cwd
        # deeper than the dir_fd (the "open" audit event does not show dir_fd)
        "import os; fd = os.open('/proc/self', os.O_RDONLY)\n"
        "data = os.read(os.open('root/etc/passwd', os.O_RDONLY, dir_fd=fd), 99)",
        "import os; up = '../' * os.getcwd().count('/'); os.makedirs('a/b/c/d/e/f/g/h/i/j')\n"
        "fd = os.open('.', os.O_RDONLY); os.chdir('a/b/c/d/e/f/g/h/i/j')\n"
        "data = os.read(os.open(up + 'etc/passwd', os.O_RDONLY, dir_fd=fd), 99)",
    ]
    listings = [
        "import os; data = os.listdir('/etc')",
        f"import os; data = os.listdir({str(home)!r})",
        f"import os; data = os.listdir({str(project)!r})",
        f"import os; data = os.listdir({real_home!r})",
        f"import os; data = os.listdir('/proc/{me}')",
        f"import os; data = os.listdir('/proc/{me}/cwd')",
        "import os; data = os.listdir('/proc')",
        "import os; data = [e.name for e in os.scandir('/')]",
        f"import os; os.chdir({str(project)!r}); data = os.listdir('.')",
    ]
    if not sys.platform.startswith("linux"):  # no /proc there: the files and listings remain
        reads = [c for c in reads if "/proc" not in c]
        listings = [c for c in listings if "/proc" not in c]
    lines, r = _read_attempts(reads + listings, layers)
    for code, out in zip(reads + listings, lines):
        assert out.startswith("PermissionError:"), (code, out)
        if "py" in layers:
            assert READ_BLOCKED in out, (code, out)
    everything = r.stdout + r.stderr + (r.error or "")
    assert secret not in everything and "root:" not in everything
    # as the result's error, for a program that just tries
    r = execute_code(f"print(open({str(project / 'secrets.env')!r}).read())", _layers=layers)
    assert not r.success and secret not in r.stdout + r.stderr
    if "py" in layers:
        assert r.error == f"{READ_BLOCKED} ({project / 'secrets.env'})"
    else:
        assert r.error.startswith("PermissionError: [Errno 13]"), r.error
    # the sandbox's own environment is its own business: no secret there either
    r = execute_code("print(open('/proc/self/environ', 'rb').read())", _layers=layers)
    if sys.platform.startswith("linux"):
        assert r.success and "PATH=/usr/bin:/bin" in r.stdout, r.stderr
    assert secret not in r.stdout + r.stderr


@READ_LAYERS
def test_ordinary_programs_still_read_what_they_need(layers):
    _need_read_layers(layers)
    pytest.importorskip("numpy")
    code = (
        "import json, re, math, collections, itertools, functools, heapq, statistics, fractions\n"
        "import decimal, datetime, time, random, hashlib, string, textwrap, unicodedata, typing\n"
        "import dataclasses, csv, io, os, sys, tempfile, pathlib, sqlite3, mimetypes, inspect\n"
        "import traceback, threading, zoneinfo\n"
        "import numpy as np\n"
        "print(np.linalg.solve(np.eye(2) * 2, np.ones(2)).tolist())\n"
        "print(datetime.datetime(2024, 7, 1, tzinfo=zoneinfo.ZoneInfo('UTC')).isoformat())\n"
        "print(mimetypes.guess_type('x.json')[0], 'def dumps' in inspect.getsource(json.dumps))\n"
        # the private directory: write, read, list, walk, remove
        "pathlib.Path('d/e').mkdir(parents=True)\n"
        "pathlib.Path('d/e/f.txt').write_text('hi')\n"
        "print(open('d/e/f.txt').read(), os.listdir('d'),\n"
        "      [str(p) for p in pathlib.Path('.').rglob('*.txt')])\n"
        "with tempfile.TemporaryDirectory() as t:\n"
        "    open(os.path.join(t, 'x'), 'w').write('tmp')\n"
        "    print(open(os.path.join(t, 'x')).read())\n"
        "db = sqlite3.connect('x.db')\n"
        "db.execute('create table t(a)'); db.execute('insert into t values (7)')\n"
        "print(db.execute('select a from t').fetchall(),\n"
        "      sqlite3.connect(':memory:').execute('select 1').fetchone())\n"
        "db.commit(); db.close()\n"
        "print(len(open('/dev/urandom', 'rb').read(4)), repr(open('/dev/null').read()))\n"
        "if sys.platform.startswith('linux'):\n"
        "    assert open('/proc/self/status').read().startswith('Name:')\n"
        "    assert '0' in os.listdir('/proc/self/fd')\n"
        "    th = threading.Thread(target=lambda: open('/proc/thread-self/stat').read())\n"
        "    th.start(); th.join()\n"
        "try:\n"
        "    json.loads('{')\n"
        "except ValueError:\n"
        "    print('scan_once' in traceback.format_exc())  # stdlib source lines in tracebacks\n"
        "import shutil; shutil.rmtree('d'); print(sorted(os.listdir('.')))\n")
    r = execute_code(code, timeout=20.0, _layers=layers)
    assert r.success, r.stderr
    assert r.stdout == ("[0.5, 0.5]\n2024-07-01T00:00:00+00:00\napplication/json True\n"
                        "hi ['e'] ['d/e/f.txt']\ntmp\n[(7,)] (1,)\n4 ''\nTrue\n['x.db']\n")


# a HumanEval-shaped program (prompt's imports + completion + the problem's check + the call),
# as tasks/humaneval.py assembles it
_HUMANEVAL_LIKE = """from typing import List
import hashlib


def rolling_digest(words: List[str]) -> List[str]:
    out, h = [], hashlib.sha256()
    for w in words:
        h.update(w.encode())
        out.append(h.hexdigest()[:8])
    return out


def check(candidate):
    assert candidate([]) == []
    first = candidate(["a"])
    assert len(first) == 1 and first[0] == hashlib.sha256(b"a").hexdigest()[:8]
    assert candidate(["a", "b"])[1] == hashlib.sha256(b"ab").hexdigest()[:8]
    assert candidate(["a", "b"])[0] == BROKEN
check(rolling_digest)"""


@READ_LAYERS
def test_humaneval_style_programs_still_run(layers):
    _need_read_layers(layers)
    good = _HUMANEVAL_LIKE.replace("BROKEN", "first[0]")
    r = execute_code(good, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, _layers=layers)
    assert r.success, r.stderr
    # and a wrong solution still fails (the check really ran)
    bad = _HUMANEVAL_LIKE.replace("BROKEN", "'nope'")
    r = execute_code(bad, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, _layers=layers)
    assert not r.success and r.error == "AssertionError"


def test_read_roots_are_this_interpreters_files_only():
    roots = _read_roots()

    def readable(path):
        path = os.path.realpath(path)
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)
    import json
    assert readable(sys.executable) and readable(json.__file__) and readable(os.__file__)
    numpy = pytest.importorskip("numpy")
    assert readable(numpy.__file__)
    home = os.path.realpath(os.path.expanduser("~"))
    assert all(os.path.isabs(r) and r == os.path.realpath(r) for r in roots)
    assert "/" not in roots and not readable(home + "/.ssh/id_rsa")
    assert not readable("/etc/passwd") and not readable("/etc/shadow")
    # this project (the parent's cwd while testing) is not one, though its venv may hold the Python
    assert not readable(__file__) and not readable(os.path.dirname(os.path.abspath(__file__)))
    if sys.platform.startswith("linux"):
        assert readable("/etc/ld.so.cache") or not os.path.exists("/etc/ld.so.cache")


def test_seatbelt_profiles_confine_reads(tmp_path):
    # the profile text is checked everywhere; the macOS probe decides which one runs there
    profiles = _seatbelt_profiles(str(tmp_path), (str(tmp_path / "guard.py"),))
    assert [(kind, reads) for kind, reads, _ in profiles] == [
        ("signals", True), ("plain", True), ("plain", True),
        ("signals", False), ("plain", False), ("plain", False)]
    strict = profiles[0][2]
    assert "(deny file-read-data (require-not (require-any " in strict
    assert f'(subpath "{os.path.realpath(tmp_path)}")' in strict
    assert f'(subpath "{os.path.realpath(tmp_path / "guard.py")}")' in strict
    for root in _read_roots():
        assert f'(subpath "{root}")' in strict
    assert f'(subpath "{os.path.realpath(os.path.expanduser("~"))}")' not in strict
    assert "(deny file-read-data)\n(allow file-read-data " in profiles[2][2]
    assert all("file-read" not in text for _, reads, text in profiles if not reads)


# ----------------------------------------------------------------------------- network

@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _connections(srv):
    n = 0
    while True:
        try:
            conn, _ = srv.accept()
        except (socket.timeout, OSError):
            return n
        conn.close()
        n += 1


@pytest.mark.parametrize("layers", [("py", "kernel", "mem"), PY_ONLY], ids=["all", "python-only"])
def test_network_is_blocked(listener, layers):
    port = listener.getsockname()[1]
    attempts = [
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
        f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port}))",
        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
        f"import socket; socket.socket().sendto(b'x', ('127.0.0.1', {port}))",
    ]
    for code, out in zip(attempts, _try_each(attempts, layers)):
        assert "Blocked: network access is not allowed" in out, (code, out)
    # local sockets to other processes (the docker socket, syslog): refused by the audit hook at
    # connect/sendto, or by seccomp already at socket() (a plain EPERM then)
    local = ["import socket; socket.socket(socket.AF_UNIX).connect('/var/run/docker.sock')",
             "import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', '/dev/log')"]
    for code, out in zip(local, _try_each(local, layers)):
        assert out.startswith("PermissionError:"), (code, out)
        assert "Blocked: network access is not allowed" in out or "Errno 1" in out, (code, out)
    r = execute_code(attempts[1], _layers=layers)
    assert not r.success and r.error == "Blocked: network access is not allowed (socket.__new__)"
    assert _connections(listener) == 0


def test_kernel_alone_refuses_network(listener):
    _need("seccomp", "seatbelt")
    port = listener.getsockname()[1]
    r = execute_code("import socket\ntry:\n"
                     f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                     "    print('connected')\n"
                     "except OSError as e:\n"
                     "    print('refused', e.errno)\n", _layers=KERNEL_ONLY)
    assert r.success and r.stdout.startswith("refused"), (r.stdout, r.stderr)
    assert _connections(listener) == 0


# ----------------------------------------------------------------------------- processes, signals, escapes

def test_os_system_and_subprocess_are_blocked():
    cases = [
        "import os; os.system('echo pwned > pwned.txt')",
        "import os; os.popen('echo pwned')",
        "import subprocess; subprocess.run(['echo', 'pwned'])",
        "import subprocess; subprocess.Popen('echo pwned', shell=True)",
        "import subprocess; subprocess.check_output(['/bin/ls'])",
        "import _posixsubprocess; _posixsubprocess.fork_exec()",
        "import multiprocessing; multiprocessing.Process(target=print).start()",
        "import pty; pty.spawn('/bin/sh')",
    ]
    for code, out in zip(cases, _try_each(cases)):
        assert out.startswith("PermissionError: Blocked: creating processes is not allowed"), (code, out)
    r = execute_code(cases[0])
    assert r.error == "Blocked: creating processes is not allowed (os.system)"
    r = execute_code(cases[2])
    assert r.error == "Blocked: creating processes is not allowed (subprocess.Popen)"


def test_signals_to_the_parent_are_blocked():
    # signal 0 only probes: harmless to the test process even if a layer failed
    r = execute_code("import os; os.kill(os.getppid(), 0)")
    assert r.error.startswith("Blocked: sending signals to other processes is not allowed")
    r = execute_code("import os; os.killpg(os.getpgid(os.getppid()), 0)")
    assert r.error.startswith("Blocked: sending signals")


def test_ctypes_and_other_escape_hatches_are_blocked():
    r = execute_code("import ctypes")
    assert r.error == "Blocked: import of 'ctypes' is not allowed"
    r = execute_code("import importlib.util\nspec = importlib.util.find_spec('_ctypes')\n"
                     "importlib.util.module_from_spec(spec)")
    assert r.error.startswith("Blocked: import of '_ctypes'")
    r = execute_code("import gc; gc.get_objects()")
    assert r.error.startswith("Blocked:")
    r = execute_code("import _testcapi")
    assert r.error == "Blocked: import of '_testcapi' is not allowed"
    r = execute_code("import resource")
    assert not r.success and "resource" in r.error
    # ordinary libraries still work under all of this (numpy when it is installed)
    r = execute_code("import json, re, math, collections, itertools, threading, asyncio\n"
                     "t = threading.Thread(target=print, args=('thread ok',)); t.start(); t.join()\n"
                     "print(asyncio.run(asyncio.sleep(0, 'asyncio ok')))\n"
                     "print(json.dumps({'pi': round(math.pi, 2)}))")
    assert r.success, r.stderr
    assert r.stdout == 'thread ok\nasyncio ok\n{"pi": 3.14}\n'


def test_kernel_alone_refuses_processes_and_signals():
    _need("seccomp", "seatbelt")
    # a single fork, and a child that exits at once, in case the layer under test were missing
    r = execute_code("import os\n"
                     "try:\n"
                     "    pid = os.fork()\n"
                     "    if pid == 0:\n"
                     "        os._exit(0)\n"
                     "    print('forked')\n"
                     "except OSError as e:\n"
                     "    print('refused', e.errno)\n", _layers=KERNEL_ONLY)
    assert r.stdout.startswith("refused"), (r.stdout, r.stderr)
    if _layer("seccomp"):
        r = execute_code("import os\n"
                         "try:\n"
                         "    os.kill(os.getppid(), 0)\n"
                         "    print('signalled')\n"
                         "except OSError as e:\n"
                         "    print('refused', e.errno)\n"
                         "os.kill(os.getpid(), 0)\nprint('self ok')", _layers=KERNEL_ONLY)
        assert r.stdout == "refused 1\nself ok\n", (r.stdout, r.stderr)


def test_parent_survives_concurrent_attacks():
    # the web server calls the sandbox from worker threads, several at once
    codes = {
        "loop": ("while True: pass", 1.0),
        "mem": ("x = b'x' * (10 * 1024 ** 3)", 5.0),
        "ok": ("print(sum(range(10)))", 5.0),
        "proc": ("import os; os.system('true')", 5.0),
    }
    results = {}

    def run(name, code, timeout):
        results[name] = execute_code(code, timeout=timeout)
    threads = [threading.Thread(target=run, args=(k, c, t)) for k, (c, t) in codes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results["loop"].timeout
    assert results["mem"].memory_exceeded
    assert results["ok"].success and results["ok"].stdout == "45\n"
    assert results["proc"].error.startswith("Blocked")


def test_child_dies_with_its_parent(tmp_path):
    # if the engine itself is killed, its sandboxed child must not live on (PDEATHSIG on Linux,
    # a watcher thread on macOS)
    import shutil
    import signal
    import subprocess
    if shutil.which("pgrep") is None or shutil.which("ps") is None:
        pytest.skip("needs pgrep and ps")
    engine = subprocess.Popen(
        [sys.executable, "-c", "from mlxchat.execution import execute_code\n"
                               "execute_code('import time; time.sleep(60)', timeout=60)"],
        env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        child = None
        for _ in range(200):
            out = subprocess.run(["pgrep", "-P", str(engine.pid)], capture_output=True,
                                 text=True).stdout.split()
            if out:
                child = int(out[0])
                break
            time.sleep(0.05)
        assert child is not None, "the sandboxed child never started"
        time.sleep(0.3)  # let it get into the code
    finally:
        engine.send_signal(signal.SIGKILL)
        engine.wait()

    def dead(pid):  # gone, or a zombie waiting for whoever adopted it
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                               text=True).stdout.strip()
        return state == "" or state.startswith("Z")
    deadline = time.monotonic() + 3.0
    while not dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = not dead(child)
    if alive:
        os.kill(child, signal.SIGKILL)  # do not leave it behind, whatever the verdict
    assert not alive


def test_sandbox_layers_report():
    layers = sandbox_layers()
    assert layers["python"] is True and layers["platform"] == sys.platform
    if sys.platform.startswith("linux"):
        assert layers["rlimit_as"] is True and layers["pdeathsig"] is True
    # reads: the audit hook always, a kernel layer where there is one
    assert layers["python_reads"] is True
    assert layers["landlock_reads"] == bool(layers["landlock"])
    assert layers["read_confinement"] == (layers["landlock_reads"] or layers["seatbelt_reads"])


# ----------------------------------------------------------------------------- python_tool

def test_python_tool_is_a_repl_cell():
    assert python_tool("x = 6\nx * 7") == "42"
    assert python_tool("print('hi')\n'abc'") == "hi\n'abc'"
    assert python_tool("x = 1") == ""
    assert python_tool("print('partial')\n1/0") == "partial\nError: ZeroDivisionError: division by zero"
    assert python_tool("import socket; socket.socket()").startswith(
        "Error: Blocked: network access is not allowed")
    out = python_tool("print('x' * 10000)", max_chars=100)
    assert len(out) <= 100 and out.startswith("xxx") and out.endswith("[truncated]")
    out = python_tool("print('y' * 10000)\nraise KeyError('k')", max_chars=100)
    assert len(out) <= 100 and out.endswith("Error: KeyError: 'k'")
    t0 = time.monotonic()
    assert python_tool("while True: pass", timeout=1.0) == "Error: " + TIMEOUT_ERROR
    assert time.monotonic() - t0 < 3.0


# ----------------------------------------------------------------------------- calculator

def test_calculator_arithmetic():
    assert use_calculator("2+3*4") == 14
    assert use_calculator("1,234 + 1") == 1235  # commas stripped
    assert use_calculator("10/4") == 2.5
    assert use_calculator("(12 - 2) * 3.5") == 35.0
    assert use_calculator(" 7 ") == 7
    assert use_calculator("2**10") is None  # no power operator
    assert use_calculator("2 ** 1000000") is None
    long_sum = "+".join(["1"] * 600)  # over the in-process length cap: evaluated in the sandbox
    assert use_calculator(long_sum) == 600


def test_calculator_strings():
    assert use_calculator('"strawberry".count("r")') == 3
    assert use_calculator("'hello world'.count('o')") == 2
    assert use_calculator("'Mississippi'.lower().count('ss')") == 2
    # forbidden words, even inside a string literal (as nanochat)
    assert use_calculator('"import".count("i")') is None
    assert use_calculator('"direction".count("d")') is None
    assert use_calculator('"x".__class__.count("x")') is None
    assert use_calculator("open('x').count('a')") is None
    # .count( is required
    assert use_calculator('"abc".upper()') is None
    # growth bombs are evaluated in the sandbox: None, promptly, and we are fine
    bomb = '"a"' + '.replace("a", "aaaaaaaaaa")' * 12 + '.count("a")'
    t0 = time.monotonic()
    assert use_calculator(bomb) is None
    assert time.monotonic() - t0 < 5.0


def test_calculator_garbage_is_none():
    for expr in ["", "hello", "1/0", "(1+", "2(3)", "$$$", "1; 2", "[1,2]", "lambda: 1",
                 "__import__('os')", "'a'.count('a') + 1", None, 42]:
        assert use_calculator(expr) is None, expr


def test_calculator_off_the_main_thread():
    out = {}

    def work():
        out["arith"] = use_calculator("6*7")
        out["count"] = use_calculator('"banana".count("a")')
    t = threading.Thread(target=work)
    t.start()
    t.join(20)
    assert out == {"arith": 42, "count": 3}
