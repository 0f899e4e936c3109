"""
Sandboxed execution of LLM-written Python (nanochat's execution.py, hardened), plus the chat
engine's tools: `python_tool` (a REPL-like cell) and `use_calculator` (nanochat's calculator).

    execute_code(code, timeout=5.0, maximum_memory_bytes=256 MiB) -> ExecutionResult
        ExecutionResult(success, stdout, stderr, error, timeout, memory_exceeded, output_truncated)
    sandbox_layers() -> dict   # which of the protections below this machine actually enforces

Every call runs the code in a fresh `sys.executable -I -B` child, in its own session/process group,
with cwd = a private temporary directory that is deleted afterwards, env = {PATH=/usr/bin:/bin,
HOME=TMPDIR=<that directory>} and stdin = /dev/null. The protections come in three layers, so that
a hole in one is caught by another:

1. The parent (this process; the same on Linux and macOS):
   - wall-clock timeout: SIGKILL to the whole process group, then to the pid itself;
   - stdout/stderr read with a select loop, kept up to `max_output_bytes` each, the rest drained
     and discarded, so a child printing forever neither hangs us nor fills our memory;
   - a watchdog polling the child's memory every 25 ms (Linux /proc, macOS proc_pid_rusage),
     which is *the* memory limit on macOS, where the kernel enforces neither RLIMIT_AS nor
     RLIMIT_DATA;
   - a watchdog on the size of the private directory (/tmp can live in RAM).
2. The kernel, set up by the child on itself before any LLM code runs; no root, no namespaces:
   - both: RLIMIT_CPU (a backstop should the parent die), RLIMIT_FSIZE, RLIMIT_CORE=0;
   - Linux: RLIMIT_AS + RLIMIT_DATA (the memory limit: MemoryError in the child),
     PR_SET_PDEATHSIG, a seccomp-BPF filter (no socket(), no fork/vfork/non-thread clone, no
     exec, no signals to other processes, no ptrace/mount/bpf/io_uring/setrlimit...) and Landlock
     (kernel >= 5.13: writes only below the private directory and to /dev/null; reads of files
     and directory listings only below the "read roots", see below). Each is skipped when the
     kernel lacks it. ctypes is needed for these, so this "setup" interpreter then execs a fresh
     "run" interpreter that never loaded ctypes (the filter allows that one execve only).
   - macOS: Seatbelt through /usr/bin/sandbox-exec (deny network, fork, file writes outside the
     private directory, file contents and listings outside the read roots, and signals to other
     processes, each rule if this macOS takes it), probed once: the strictest profile this macOS
     both accepts and enforces is kept, with a warning when that lacks the read rules or when
     no profile works at all; RLIMIT_NPROC (no new process: it counts the user's processes, but
     does not bind root); a thread that exits when the parent goes away (no PDEATHSIG on macOS).
3. Python, inside the child (both platforms): an audit hook (sys.addaudithook; it cannot be
   removed) refusing sockets, process creation, signals, ctypes, writes outside the private
   directory, reads and directory listings outside the read roots, links, subinterpreters and
   gc introspection;
   os.system/fork/kill/... replaced by stubs that raise; blocked imports (ctypes, cffi, resource,
   psutil, ...). A refusal raises PermissionError (ImportError for imports) whose message starts
   with "Blocked: ", and that message becomes ExecutionResult.error. This layer gives the clear
   errors; it is NOT a security boundary on its own (code that finds a memory-corruption bug in
   CPython can switch it off), which is why layers 1 and 2 exist.

Reads: the code may read only what a Python program needs, the "read roots" (_read_roots(),
derived from this interpreter's prefixes, sysconfig paths and sys.path, never a root that holds
the home directory): the interpreter binary, its standard library and shared library, the
site-packages it may import from (numpy & co), the system's shared libraries (/lib, /usr/lib,
/lib64, /etc/ld.so.cache...), time zones and mime tables, plus the private directory,
/dev/null, /dev/urandom and (Linux) the child's own /proc/<pid>, which /proc/self points to.
Everything else is refused by all three layers where they exist: the parent's
/proc/<pid>/environ, /etc/passwd, the user's home and working directory... sandbox_layers()
says which: landlock_reads / seatbelt_reads (the kernel), python_reads (the audit hook), and
read_confinement (True when a kernel layer confines reads, not only the audit hook). Layer 3
checks paths with their symlinks resolved; as it cannot see os.open's dir_fd, it also refuses
relative paths that climb above where they start ("../x": use an absolute path) and
descriptors on directories outside the private directory.

Not enforced: file metadata outside the read roots (stat, os.path.exists, readlink: neither
Landlock nor the Seatbelt rule on file-read-data covers them, so names and sizes can be probed,
not contents); on layer 3 alone, reads that C code makes without an audit event (pyarrow's file
readers, SQL "ATTACH" in sqlite3); chmod/utime of the user's files outside the directory if
layer 3 is defeated (Landlock does not cover them); on macOS without sandbox-exec, network, file
writes and reads rest on layer 3 alone; on macOS memory is measured after the fact (a fast
allocation can overshoot the limit for a poll interval) and memory that is reserved but never
touched (calloc'd) is not counted at all; RLIMIT_NPROC does not bind root (on Linux seccomp
still stops forks).
"""
import ast
import functools
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

IS_LINUX = sys.platform.startswith("linux")
IS_MACOS = sys.platform == "darwin"

DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
DEFAULT_MAX_DISK_BYTES = 64 * 1024 * 1024
TIMEOUT_ERROR = "Execution timed out (process killed)"
MEMORY_ERROR = "Memory limit exceeded"
DISK_ERROR = "Disk limit exceeded (the sandbox directory grew too large)"
_POLL_S = 0.025  # how often the parent checks memory / exit while the child runs
_DISK_POLL_S = 0.1


@dataclass
class ExecutionResult:
    """The outcome of one execute_code call (field names as nanochat's)."""
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False


# ----------------------------------------------------------------------------------------------
# The guard: the program the child runs. It applies the kernel and Python layers to itself, then
# executes the LLM's code. It is written to a file beside the private directory and run as a
# script, so that the child imports nothing of ours. Two stages on Linux: "setup" loads ctypes to
# install seccomp/Landlock, then execs a fresh interpreter for "run" (elsewhere one process does
# both). argv: stage workdir code_path mode mem_bytes cpu_seconds disk_bytes parent_pid layers
# read_roots [status]; mode: exec | repl | probe; layers: comma list of py, kernel, mem (tests drop
# some); read_roots: the parent's _read_roots(), one per line.

_GUARD = r'''
import sys, os, builtins, posix

def _kernel_layers(workdir, code_path, roots, ppid, mem, cpu_s, disk, layers):
    """rlimits, then (Linux) PDEATHSIG, Landlock and seccomp. Returns what was applied."""
    import resource
    st = {"rlimit_as": False, "pdeathsig": False, "landlock": 0, "landlock_reads": False,
          "seccomp": False, "nproc": False}
    linux = sys.platform.startswith("linux")

    def limit(res, value):
        # soft = hard: an unprivileged child cannot raise a hard limit back up
        try:
            _, hard = resource.getrlimit(res)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(res, (value, value))
            return True
        except (ValueError, OSError):
            return False

    if mem > 0 and linux and "mem" in layers:
        # RLIMIT_AS is the one Linux enforces on mmap-backed mallocs; macOS ignores both, so the
        # parent's RSS watchdog is the limit there
        st["rlimit_as"] = limit(resource.RLIMIT_AS, mem)
        limit(resource.RLIMIT_DATA, mem)
    if cpu_s > 0:
        # backstop for when the parent (and its wall-clock timeout) is gone; SIGXCPU kills
        limit(resource.RLIMIT_CPU, cpu_s)
    if disk > 0:
        # one file cannot outgrow the disk budget (CPython ignores SIGXFSZ, so write() fails)
        limit(resource.RLIMIT_FSIZE, disk)
    limit(resource.RLIMIT_CORE, 0)

    if "kernel" not in layers:
        return st
    if linux:
        try:
            _linux_kernel_layers(workdir, code_path, roots, ppid, st)
        except Exception:
            pass
        if not st["seccomp"]:
            # seccomp is stronger (and lets threads live); without it, forbid new tasks for this
            # user (Linux counts threads too; root is exempt from this limit)
            st["nproc"] = limit(resource.RLIMIT_NPROC, 0)
        _exec_run_stage(st)  # returns only if the exec failed
    else:
        st["nproc"] = limit(resource.RLIMIT_NPROC, 0) or limit(resource.RLIMIT_NPROC, 1)
    return st

_EXEC = {}

def _exec_run_stage(st):
    """Linux: replace this interpreter, which had to load ctypes to set up seccomp and Landlock,
    by a fresh one that never had it: once the _ctypes extension is loaded, importlib can hand
    out fresh copies of it without the "import" audit event, and raw ctypes can rewrite memory
    (the audit hooks included). Filters, Landlock, rlimits and PDEATHSIG survive execve."""
    if "libc" not in _EXEC:
        return
    import ctypes
    libc, path = _EXEC["libc"], _EXEC["path"]
    status = ";".join(k + "=" + str(int(v)) for k, v in st.items())
    args = [sys.executable, "-I", "-B", sys.argv[0], "run"] + sys.argv[2:11] + [status]
    raw = [a.encode("utf-8", "surrogateescape") for a in args]
    argv = (ctypes.c_char_p * (len(raw) + 1))(*raw, None)
    env = [(k + "=" + v).encode("utf-8", "surrogateescape") for k, v in os.environ.items()]
    envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    sys.stdout.flush()
    sys.stderr.flush()
    libc.execve(path, argv, envp)  # the seccomp filter lets execve through for this buffer only
    _EXEC.clear()  # still here (exec failed): leave no loaded libc functions lying around

def _linux_kernel_layers(workdir, code_path, roots, ppid, st):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ul = ctypes.c_ulong
    # the one execve the filter will allow: of this buffer, at this address (see _exec_run_stage)
    exe = ctypes.create_string_buffer(sys.executable.encode("utf-8", "surrogateescape"))
    _EXEC.update(libc=libc, path=exe)
    # die with the parent, and make sure it has not died already
    if libc.prctl(1, ul(9), ul(0), ul(0), ul(0)) == 0:  # PR_SET_PDEATHSIG, SIGKILL
        st["pdeathsig"] = True
    if posix.getppid() != ppid:
        posix._exit(137)
    if libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) != 0:  # PR_SET_NO_NEW_PRIVS (needed by both)
        return

    # --- Landlock. Writes: every write right is handled, and granted only below workdir and on
    # /dev/null. Reads (READ_FILE: open for reading, execve and the loader's mmaps included;
    # READ_DIR: listing): granted only below workdir, the read roots, this process's own
    # /proc/<pid>, on the guard and code files (the run stage reads them again), /dev/null and
    # /dev/urandom. Landlock does not cover stat/readlink or walking through a directory, so
    # /root/.pyenv/... stays reachable while /root itself cannot be listed.
    long = ctypes.c_long  # every syscall() argument as a full register
    abi = libc.syscall(long(444), None, long(0), long(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi >= 1:
        EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, TRUNCATE = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 14
        READ = READ_FILE | READ_DIR
        FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE  # all a rule on a file may hold
        rights = WRITE_FILE | READ
        # REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO,
        # MAKE_BLOCK, MAKE_SYM
        for bit in (4, 5, 6, 7, 8, 9, 10, 11, 12):
            rights |= 1 << bit
        if abi >= 2:
            rights |= 1 << 13  # REFER (re-parenting; always denied when not handled)
        if abi >= 3:
            rights |= TRUNCATE
        attr = ctypes.c_uint64(rights)  # struct landlock_ruleset_attr {handled_access_fs}
        rfd = libc.syscall(long(444), ctypes.byref(attr), long(8), long(0))

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        def allow(where, access):  # LANDLOCK_RULE_PATH_BENEATH; False if where is missing
            try:
                fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                if (os.fstat(fd).st_mode & 0o170000) != 0o040000:
                    access &= FILE_RIGHTS  # on a file, a directory right is EINVAL
                pb = PathBeneath(access & rights, fd)
                return libc.syscall(long(445), long(rfd), long(1), ctypes.byref(pb), long(0)) == 0
            finally:
                os.close(fd)

        if rfd >= 0:
            ok = (allow(workdir, rights) and allow(sys.argv[0], READ_FILE)
                  and allow(code_path, READ_FILE)
                  and allow(os.path.realpath(sys.executable), READ_FILE))
            allow("/dev/null", READ_FILE | WRITE_FILE | TRUNCATE)
            allow("/dev/urandom", READ_FILE)
            for root in roots:
                allow(root, READ)  # a root missing here just stays unreadable
            # The rule lands on the inode that "/proc/self" resolves to now: this process's own
            # /proc/<pid> directory, never the parent's. The run stage keeps the pid (execve does
            # not change it) and so the same directory, its task/<tid> threads included. procfs
            # makes a new inode whenever /proc/<pid> is looked up afresh after its dentry was
            # evicted (memory pressure), which this rule would not match: an O_PATH descriptor on
            # a file inside it, inherited by the run stage, keeps the dentry (a file, so that it is
            # no use as a dir_fd).
            if allow("/proc/self", READ):
                try:
                    os.set_inheritable(os.open("/proc/self/stat", os.O_PATH), True)
                except OSError:
                    pass
            if ok and libc.syscall(long(446), long(rfd), long(0)) == 0:
                st["landlock"] = int(abi)
                st["landlock_reads"] = True
            os.close(rfd)

    # --- seccomp-BPF
    machine = os.uname().machine
    if machine == "x86_64":
        arch, nr = 0xC000003E, dict(
            socket=41, clone=56, fork=57, vfork=58, execve=59, kill=62, ptrace=101, tkill=200,
            tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_send_signal=424,
            pidfd_open=434, pidfd_getfd=438, process_vm_readv=310, process_vm_writev=311,
            setrlimit=160, prlimit64=302, mount=165, umount2=166, pivot_root=155, chroot=161,
            reboot=169, kexec_load=246, kexec_file_load=320, init_module=175, finit_module=313,
            delete_module=176, swapon=167, swapoff=168, unshare=272, setns=308, bpf=321,
            perf_event_open=298, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
            io_uring_register=427, open_by_handle_at=304, name_to_handle_at=303, keyctl=250,
            add_key=248, request_key=249, mknod=133, mknodat=259, acct=163, settimeofday=164,
            clock_settime=227, adjtimex=159, clock_adjtime=305, sethostname=170,
            setdomainname=171, iopl=172, ioperm=173, quotactl=179, fsopen=430, fsmount=432,
            move_mount=429, open_tree=428, fspick=433, fsconfig=431, kcmp=312, execveat=322,
            clone3=435, ioctl=16, chown=92, fchown=93, lchown=94, fchownat=260)
    elif machine == "aarch64":
        arch, nr = 0xC00000B7, dict(
            socket=198, clone=220, execve=221, kill=129, ptrace=117, tkill=130, tgkill=131,
            rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, pidfd_send_signal=424, pidfd_open=434,
            pidfd_getfd=438, process_vm_readv=270, process_vm_writev=271, setrlimit=164,
            prlimit64=261, mount=40, umount2=39, pivot_root=41, chroot=51, reboot=142,
            kexec_load=104, kexec_file_load=294, init_module=105, finit_module=273,
            delete_module=106, swapon=224, swapoff=225, unshare=97, setns=268, bpf=280,
            perf_event_open=241, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
            io_uring_register=427, open_by_handle_at=265, name_to_handle_at=264, keyctl=219,
            add_key=217, request_key=218, mknodat=33, acct=89, settimeofday=170,
            clock_settime=112, adjtimex=171, clock_adjtime=266, sethostname=161,
            setdomainname=162, quotactl=60, fsopen=430, fsmount=432, move_mount=429,
            open_tree=428, fspick=433, fsconfig=431, kcmp=272, execveat=281, clone3=435,
            ioctl=29, fchown=55, fchownat=54)
    else:
        return
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    EPERM, ENOSYS = ERRNO | 1, ERRNO | 38
    def arg(i):  # offset of the low 32 bits of args[i] in struct seccomp_data (little endian)
        return 16 + 8 * i
    pid = os.getpid()
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, EPERM), (LD, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]  # no x32-ABI aliases
    def deny(name, ret=EPERM):
        if name in nr:
            prog.extend([(JEQ, 0, 1, nr[name]), (RET, 0, 0, ret)])
    def allow_if_arg(name, i, values):  # allowed only when low32(args[i]) is one of values
        body = [(LD, 0, 0, arg(i))]
        body += [(JEQ, len(values) - j, 0, v & 0xFFFFFFFF) for j, v in enumerate(values)]
        body += [(RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
        prog.append((JEQ, 0, len(body), nr[name]))
        prog.extend(body)
    # threads are clone(CLONE_THREAD); anything else (fork, vfork, posix_spawn) is a new process
    prog += [(JEQ, 0, 4, nr["clone"]), (LD, 0, 0, arg(0)), (JSET, 1, 0, 0x10000),
             (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    deny("clone3", ENOSYS)  # its flags live in memory BPF cannot read; ENOSYS makes glibc use clone
    # signals only to ourselves: our pid, our process group (0, -pid); never -1 (everybody)
    allow_if_arg("kill", 0, [pid, 0, -pid])
    allow_if_arg("tgkill", 0, [pid])
    # getrlimit is prlimit64(0, res, NULL, old): allowed; setting a limit is not
    prog += [(JEQ, 0, 6, nr["prlimit64"]), (LD, 0, 0, arg(2)), (JEQ, 0, 2, 0),
             (LD, 0, 0, arg(2) + 4), (JEQ, 1, 0, 0), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    # ioctl: no TIOCSTI (typing into a terminal), no FS_IOC_SETFLAGS (chattr), no FS_IOC_FSSETXATTR
    bad_ioctls = [0x5412, 0x40086602, 0x401C5820]
    prog.append((JEQ, 0, len(bad_ioctls) + 3, nr["ioctl"]))
    prog.append((LD, 0, 0, arg(1)))
    prog += [(JEQ, len(bad_ioctls) - j, 0, v) for j, v in enumerate(bad_ioctls)]
    prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    # execve: only of the exact path buffer the guard itself passes to it, once, right below
    addr = ctypes.addressof(exe)
    prog += [(JEQ, 0, 6, nr["execve"]), (LD, 0, 0, arg(0)), (JEQ, 0, 2, addr & 0xFFFFFFFF),
             (LD, 0, 0, arg(0) + 4), (JEQ, 1, 0, addr >> 32), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    for name in ("socket", "fork", "vfork", "execveat", "ptrace", "tkill",
                 "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_send_signal", "pidfd_open",
                 "pidfd_getfd", "process_vm_readv", "process_vm_writev", "setrlimit", "mount",
                 "umount2", "pivot_root", "chroot", "reboot", "kexec_load", "kexec_file_load",
                 "init_module", "finit_module", "delete_module", "swapon", "swapoff", "unshare",
                 "setns", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
                 "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at",
                 "keyctl", "add_key", "request_key", "mknod", "mknodat", "acct", "settimeofday",
                 "clock_settime", "adjtimex", "clock_adjtime", "sethostname", "setdomainname",
                 "iopl", "ioperm", "quotactl", "fsopen", "fsmount", "move_mount", "open_tree",
                 "fspick", "fsconfig", "kcmp", "chown", "fchown", "lchown", "fchownat"):
        deny(name)
    prog.append((RET, 0, 0, ALLOW))

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(c, t, f, k) for c, t, f, k in prog])
    fprog = SockFprog(len(prog), filters)
    # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    if libc.prctl(22, ul(2), ctypes.byref(fprog), ul(0), ul(0)) == 0:
        st["seccomp"] = True

def _watch_parent(ppid, sleep, getppid, exit_now):
    # macOS has no PDEATHSIG: poll, so that an orphaned child does not outlive its server. The
    # functions come in as arguments, bound before the LLM's code could monkeypatch them.
    while True:
        sleep(0.5)
        if getppid() != ppid:
            exit_now(137)

def _make_blocker(what, message):
    def blocked(*args, **kwargs):
        raise PermissionError("Blocked: " + message + " (" + what + ")")
    blocked.__name__ = what.rsplit(".", 1)[-1]
    return blocked

_BLOCKED_IMPORTS = frozenset((
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_testcapi", "_testinternalcapi",
    "_testmultiphase", "_testsinglephase", "_xxsubinterpreters", "_xxinterpchannels",
    "_interpreters", "_interpchannels", "_interpqueues", "_posixsubprocess", "resource",
    "psutil", "ipdb", "joblib", "tkinter", "_tkinter"))

def _python_layer(workdir, read_roots):
    # process creation, signals and privilege changes: stubs that raise, in os and in posix (the
    # C module os re-exports from)
    proc = ("system", "popen", "fork", "forkpty", "spawnl", "spawnle", "spawnlp", "spawnlpe",
            "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "execl",
            "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "startfile")
    for name in proc:
        stub = _make_blocker("os." + name, "creating processes is not allowed")
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, stub)
    for name in ("kill", "killpg", "pidfd_open"):
        stub = _make_blocker("os." + name, "sending signals to other processes is not allowed")
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, stub)
    for name in ("setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid", "setresuid",
                 "setresgid", "setgroups", "initgroups", "chroot", "mkfifo", "mknod", "lchmod",
                 "lchflags", "plock"):
        stub = _make_blocker("os." + name, "this function is not allowed")
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, stub)
    # subprocess calls _posixsubprocess.fork_exec, which raises no audit event of its own
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = _make_blocker("subprocess", "creating processes is not allowed")
    except ImportError:
        pass
    builtins.help = None  # pydoc may start a pager process
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None  # "import resource" -> ImportError, as nanochat does
    fdpath = None
    if sys.platform == "darwin":
        import fcntl
        fdpath = fcntl
    _install_audit_hook(workdir, fdpath, read_roots)

def _install_audit_hook(workdir, fcntl_mod, read_roots):
    real = os.path.realpath(workdir)
    roots = (workdir, real) if real != workdir else (workdir,)
    allowed_files = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    # Reads are checked on the path with its symlinks resolved (the system's directories hold
    # links that lead anywhere, e.g. /proc/self/root -> /), against resolved roots: the parent's
    # read roots, the private directory, this process's own /proc entry (what /proc/self resolves
    # to), its own descriptors on macOS (/dev/fd), and two devices.
    readable = tuple(read_roots) + (real, "/dev/null", "/dev/urandom", "/dev/fd")
    if sys.platform.startswith("linux"):
        readable += ("/proc/" + str(posix.getpid()),)
    # (path argument index, dir_fd argument index) per event that writes through a path
    path_events = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)), "os.truncate": ((0, None),), "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.chflags": ((0, None),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
        "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),),
        "shutil.copytree": ((1, None),), "shutil.chown": ((0, None),),
        "shutil.move": ((0, None), (1, None)), "shutil.make_archive": ((0, None),),
        "shutil.unpack_archive": ((1, None),),
    }
    messages = {
        "net": "network access is not allowed",
        "proc": "creating processes is not allowed",
        "signal": "sending signals to other processes is not allowed",
        "ctypes": "ctypes is not allowed",
        "write": "writing outside the sandbox directory is not allowed",
        "read": "reading outside the sandbox directory and the Python libraries is not allowed",
        # links are the one way a lexical path check could be walked around
        "link": "creating links is not allowed",
        "other": "this operation is not allowed",
    }
    fixed = {
        "os.system": "proc", "os.fork": "proc", "os.forkpty": "proc", "os.exec": "proc",
        "os.posix_spawn": "proc", "os.spawn": "proc", "subprocess.Popen": "proc",
        "os.startfile": "proc", "pty.spawn": "proc",
        "os.kill": "signal", "os.killpg": "signal", "signal.pthread_kill": "signal",
        "os.link": "link", "os.symlink": "link",
        "cpython.PyInterpreterState_New": "other", "gc.get_referrers": "other",
        "gc.get_referents": "other", "gc.get_objects": "other",
        "resource.setrlimit": "other", "resource.prlimit": "other", "fcntl.ioctl": "other",
        "sys._current_frames": "other", "sys._current_exceptions": "other",
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    # Everything the hook uses is bound as a default argument when it is defined: module globals,
    # builtins and os.path helpers can be monkeypatched by the code under test, while the hook
    # itself is referenced from nowhere Python code can reach (gc introspection is refused), and
    # its tables are read-only views.
    from types import MappingProxyType
    path_events = MappingProxyType(path_events)
    messages = MappingProxyType(messages)
    fixed = MappingProxyType(fixed)
    def hook(event, args, _roots=roots, _real=real, _allowed=allowed_files, _readable=readable,
             _path_events=path_events, _fixed=fixed, _msg=messages, _imports=_BLOCKED_IMPORTS,
             _getcwd=posix.getcwd, _fspath=posix.fspath, _readlink=posix.readlink,
             _lstat=posix.lstat, _fcntl=fcntl_mod, _str=str, _bytes=bytes, _int=int,
             _isinstance=isinstance, _len=len, _PermissionError=PermissionError,
             _ImportError=ImportError, _Exception=Exception, _write_flags=write_flags,
             _AF_UNIX=1, _S_IFMT=0o170000, _S_IFLNK=0o120000, _S_IFDIR=0o040000):

        def refuse(kind, detail):
            raise _PermissionError("Blocked: " + _msg[kind] + " (" + detail + ")")

        def fd_path(fd):
            try:
                if _fcntl is not None:  # macOS: F_GETPATH
                    raw = _fcntl.fcntl(fd, _fcntl.F_GETPATH, b"\0" * 1024)
                    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                p = _readlink("/proc/self/fd/" + _str(fd))
                return p if p.startswith("/") else None
            except _Exception:
                return None

        def absolute(p, dir_fd):
            # lexical normalisation only (no symlink resolution): symlinks and hard links cannot
            # be created, so none can lead out of the sandbox directory
            if _isinstance(p, _int):
                return fd_path(p)
            p = _fspath(p)
            if _isinstance(p, _bytes):
                p = p.decode("utf-8", "surrogateescape")
            if not p.startswith("/"):
                base = _getcwd() if dir_fd is None or dir_fd < 0 else fd_path(dir_fd)
                if base is None:
                    return None
                p = base + "/" + p
            parts = []
            for c in p.split("/"):
                if c == "" or c == ".":
                    continue
                if c == "..":
                    if parts:
                        parts.pop()
                    continue
                parts.append(c)
            return "/" + "/".join(parts)

        def check_write(p, dir_fd=None):
            a = absolute(p, dir_fd)
            if a is not None:
                if a in _allowed:
                    return
                for r in _roots:
                    if a == r or a.startswith(r + "/"):
                        return
            refuse("write", _str(a if a is not None else p))

        def text(p):
            if _isinstance(p, _int):
                return p
            p = _fspath(p)
            return p.decode("utf-8", "surrogateescape") if _isinstance(p, _bytes) else p

        def climbs(p):
            # a relative path that goes above the directory it starts from. The "open" event does
            # not carry os.open's dir_fd, so such a path is checked against the cwd while the
            # kernel may resolve it from another directory (a dir_fd higher up in the private
            # directory, with the cwd deep below it): refused rather than misjudged
            depth = 0
            for c in p.split("/"):
                if c == "..":
                    depth -= 1
                    if depth < 0:
                        return True
                elif c and c != ".":
                    depth += 1
            return False

        def resolve(p):
            # (path with every symlink resolved as the kernel would, component by component,
            # mode of what it names or None if missing), or None. From the first missing
            # component on, the rest is taken lexically (the kernel would fail there anyway).
            if not p.startswith("/"):
                p = _getcwd() + "/" + p
            todo = p.split("/")
            todo.reverse()
            done = []
            mode = None
            links = 0
            while todo:
                c = todo.pop()
                if c == "" or c == ".":
                    continue
                if c == "..":
                    if done:
                        done.pop()
                    mode = None
                    continue
                done.append(c)
                try:
                    mode = _lstat("/" + "/".join(done)).st_mode
                except _Exception:
                    mode = None
                    continue
                if mode & _S_IFMT == _S_IFLNK:
                    links += 1
                    if links > 40:
                        return None
                    target = _readlink("/" + "/".join(done))
                    done.pop()
                    if target.startswith("/"):
                        done = []
                    rest = target.split("/")
                    rest.reverse()
                    todo.extend(rest)
                    mode = None
            if mode is None and done:  # ended on ".." or on a link's target
                try:
                    mode = _lstat("/" + "/".join(done)).st_mode
                except _Exception:
                    mode = None
            return "/" + "/".join(done), mode

        def check_read(p, listing):
            # reading (or, listing=True, listing a directory): allowed below the readable roots.
            # Opening a directory is allowed only inside the private directory: the descriptor
            # could serve as a dir_fd, which the "open" event does not show.
            try:
                a = fd_path(p) if _isinstance(p, _int) else p
                r = resolve(a) if a is not None else None
            except _Exception:
                r = None
            if r is not None:
                path, mode = r
                for root in _readable:
                    if path == root or path.startswith(root + "/"):
                        if (listing or mode is None or mode & _S_IFMT != _S_IFDIR
                                or path == _real or path.startswith(_real + "/")):
                            return
                        break
                refuse("read", path)
            refuse("read", _str(p))

        kind = _fixed.get(event)
        if kind is not None:
            refuse(kind, event)
        if event.startswith("socket."):
            # a local AF_UNIX socket object may exist (socketpair(), which asyncio's event loop
            # needs); connect/bind/sendto/sendmsg/name lookups are refused whatever the family
            if event == "socket.__new__" and _len(args) >= 2 and args[1] == _AF_UNIX:
                return
            refuse("net", event)
        if event.startswith("ctypes."):
            refuse("ctypes", event)
        if event == "import":
            name = args[0]
            if _isinstance(name, _str) and name.split(".")[0] in _imports:
                raise _ImportError("Blocked: import of '" + name + "' is not allowed")
            return
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _isinstance(path, _int):
                return  # wrapping an fd the process already has
            if mode is not None:
                writing = "w" in mode or "a" in mode or "x" in mode or "+" in mode
            else:
                writing = _isinstance(flags, _int) and (flags & _write_flags) != 0
            p = text(path)
            if not p.startswith("/") and climbs(p):
                refuse("write" if writing else "read", p)
            if writing:
                check_write(path)
            else:
                check_read(p, False)
            return
        if event == "os.listdir" or event == "os.scandir":
            p = args[0] if _len(args) else None
            check_read("." if p is None else text(p), True)
            return
        if event == "sqlite3.connect":
            # sqlite opens its file in C, without an "open" event
            db = text(args[0]) if _len(args) else ""
            if _isinstance(db, _str) and db.startswith("file:"):  # a URI (connect(uri=True))
                db = db[5:].split("?")[0].split("#")[0]
                if db.startswith("//"):
                    db = "/" + db[2:].partition("/")[2]
            if db not in ("", ":memory:"):
                check_read(db, False)
            return
        spec = _path_events.get(event)
        if spec is not None:
            for pi, fi in spec:
                if pi >= _len(args) or args[pi] is None:
                    continue
                dir_fd = args[fi] if fi is not None and fi < _len(args) else None
                check_write(args[pi], dir_fd if _isinstance(dir_fd, _int) else None)

    sys.addaudithook(hook)

def _report(exc):
    # the traceback of the LLM's code, without the guard's own frames
    try:
        import traceback
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<llm>":
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
    except BaseException:
        posix.write(2, (type(exc).__name__ + ": " + str(exc) + "\n").encode("utf-8", "replace"))

def _main():
    # argv: stage workdir code_path mode mem cpu disk ppid layers read_roots [status]
    stage, workdir, code_path, mode = sys.argv[1:5]
    mem, cpu_s, disk, ppid = (int(v) for v in sys.argv[5:9])
    layers = sys.argv[9].split(",")
    roots = [r for r in sys.argv[10].split("\n") if r]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        os.environ[var] = "1"  # one CPU's worth of work, and less address space per library

    if stage == "setup":
        # on Linux with the kernel layer this does not return: it execs the "run" stage
        status = _kernel_layers(workdir, code_path, roots, ppid, mem, cpu_s, disk, layers)
    else:
        status = {}
        for item in sys.argv[11].split(";"):
            k, v = item.split("=")
            status[k] = int(v) if k == "landlock" else v == "1"
    for name in ("ctypes", "ctypes._endian", "_ctypes", "ctypes.util"):
        sys.modules.pop(name, None)  # (only if the exec failed) no ctypes left for the LLM's code
    if sys.platform == "darwin" and "kernel" in layers:
        import _thread, time
        _thread.start_new_thread(_watch_parent, (ppid, time.sleep, posix.getppid, posix._exit))
    with open(code_path, encoding="utf-8") as f:
        src = f.read()
    if "py" in layers:
        _python_layer(workdir, roots)
        status["python"] = True

    main = type(sys)("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    g = main.__dict__
    try:
        if mode == "probe":
            print(repr(status))
        elif mode == "repl":
            import ast
            tree = ast.parse(src, "<llm>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<llm>", "exec"), g)
            if last is not None:
                value = eval(compile(last, "<llm>", "eval"), g)
                if value is not None:
                    print(repr(value))
        else:
            exec(compile(src, "<llm>", "exec"), g)
    except SystemExit:
        raise
    except BaseException as exc:
        g.clear()  # frees whatever the code held (e.g. after a MemoryError) before reporting
        import linecache
        linecache.cache["<llm>"] = (len(src), None, src.splitlines(True), "<llm>")
        _report(exc)
        sys.stdout.flush()
        sys.exit(1)

_main()
'''


# ----------------------------------------------------------------------------------------------
# the parent side

def _kill_group(proc):
    """SIGKILL the child's process group (it leads its own session) and the child itself."""
    for fn, target in ((os.killpg, proc.pid), (os.kill, proc.pid)):
        try:
            fn(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _child_exited(proc):
    """True once the child has exited, without reaping it: a zombie keeps its pid and process
    group id reserved, so a later killpg cannot hit an unrelated group that reused the number."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
    except (AttributeError, OSError):
        return proc.poll() is not None


def _rss_linux(pid):
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=1)
def _macos_rusage():
    # proc_pid_rusage(pid, RUSAGE_INFO_V0, &info): ri_phys_footprint (the memory Activity Monitor
    # shows, compressed pages included) is the 9th 64-bit field after a 16-byte uuid
    import ctypes
    try:
        libsystem = ctypes.CDLL(None)  # proc_pid_rusage lives in libSystem, already loaded
        fn = libsystem.proc_pid_rusage
    except (OSError, AttributeError):
        fn = ctypes.CDLL("/usr/lib/libSystem.B.dylib").proc_pid_rusage
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int

    def footprint(pid):
        buf = (ctypes.c_uint64 * 32)()  # per call: several threads may be sampling at once
        if fn(pid, 0, ctypes.byref(buf)) != 0:
            raise OSError("proc_pid_rusage failed")
        return int(buf[9])
    return footprint


def _rss_ps(pid):
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True,
                         timeout=2).stdout.strip()
    return int(out) * 1024 if out else 0


def _memory_sampler(pid):
    """A function returning pid's resident memory in bytes, or None when it cannot tell. Linux
    reads /proc, macOS asks libproc; the `ps` fallback costs a process, so it runs at most 4x/s."""
    next_ps = [0.0]

    def sample():
        try:
            if IS_LINUX:
                return _rss_linux(pid)
            if IS_MACOS:
                return _macos_rusage()(pid)
        except Exception:
            pass
        now = time.monotonic()
        if now < next_ps[0]:
            return None
        next_ps[0] = now + 0.25
        try:
            return _rss_ps(pid)
        except Exception:
            return None
    return sample


def _dir_size(path, max_entries=100_000):
    """Bytes of regular files below path; inf past max_entries (a directory bomb counts as full)."""
    total, seen, stack = 0, 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    seen += 1
                    if seen > max_entries:
                        return math.inf
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        pass
        except OSError:
            pass
    return total


def _remove_tree(path):
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        # the code may have removed permissions from its own directories: give them back
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


# Where a Python program reads from, besides the interpreter's own installation: the dynamic
# loader and its cache, shared libraries, time zones. Missing ones are dropped.
_LINUX_SYSTEM_ROOTS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64",
                       "/usr/lib32", "/usr/libx32", "/usr/local/lib", "/usr/local/lib64",
                       "/nix/store", "/gnu/store", "/etc/ld.so.cache", "/etc/localtime")
# macOS: the system (dyld's shared cache, frameworks, /usr/share/zoneinfo & co) and the usual
# homes of the libraries that Homebrew / MacPorts Pythons link against
_MACOS_SYSTEM_ROOTS = ("/System", "/usr/lib", "/usr/share", "/Library/Apple",
                       "/private/var/db/dyld", "/private/var/db/timezone",
                       "/private/etc/localtime", "/usr/local/lib", "/usr/local/opt",
                       "/usr/local/Cellar", "/opt/homebrew/lib", "/opt/homebrew/opt",
                       "/opt/homebrew/Cellar", "/opt/local/lib")
# prefixes shared with the rest of the system: never a read root as a whole, even when Python
# is installed there (its stdlib and site-packages below them are)
_SHARED_PREFIXES = frozenset(("/", "/usr", "/usr/local", "/opt", "/opt/homebrew", "/opt/local",
                              "/System", "/Library", "/private", "/home", "/Users"))


def _below(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=1)
def _read_roots():
    """The resolved paths below which sandboxed code may read (files and directory listings),
    besides its private directory: derived from this interpreter (its binary, prefixes,
    sysconfig paths, the sys.path entries that lie inside its prefixes) plus the fixed system
    directories above. Not the project, the cwd or PYTHONPATH entries of sys.path, and never a
    root that holds the user's home directory."""
    import mimetypes
    import site
    import sysconfig
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix,
                                              sys.base_exec_prefix) if p}
    cands = [sys.executable, os.path.realpath(sys.executable),
             # read by the interpreter at startup to find its venv's site-packages
             os.path.join(sys.prefix, "pyvenv.cfg"),
             os.path.join(os.path.dirname(sys.executable), "pyvenv.cfg")]
    libdir = sysconfig.get_config_var("LIBDIR")
    for name in ("INSTSONAME", "LDLIBRARY"):  # libpython, when the interpreter links to it
        lib = sysconfig.get_config_var(name)
        if libdir and lib:
            cands.append(os.path.join(libdir, lib))
    cands += [sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        cands += site.getsitepackages()
    except AttributeError:  # some embedded site modules lack it
        pass
    # sys.path entries inside the installation (lib-dynload, dist-packages, python3X.zip...)
    cands += [p for p in sys.path if p and os.path.isabs(p)
              and any(_below(os.path.realpath(p), pre) for pre in prefixes)]
    # a prefix that holds only this Python (pyenv, python.org's framework, conda) as a whole:
    # libpython, a framework's Python.app... wherever its build put them
    cands += [p for p in (sys.base_prefix, sys.base_exec_prefix)
              if p and os.path.realpath(p) not in _SHARED_PREFIXES]
    # time zones (time, datetime, zoneinfo) and the tables mimetypes reads on first use
    cands += (sysconfig.get_config_var("TZPATH") or "").split(os.pathsep)
    cands += list(mimetypes.knownfiles)
    cands += _MACOS_SYSTEM_ROOTS if IS_MACOS else _LINUX_SYSTEM_ROOTS
    home = os.path.realpath(os.path.expanduser("~"))
    roots = set()
    for c in cands:
        if not c:
            continue
        r = os.path.realpath(c)
        if "\n" in r or r in _SHARED_PREFIXES or not os.path.exists(r):
            continue
        if home != "/" and _below(home, r):  # e.g. a Python installed with --prefix=$HOME
            continue
        roots.add(r)
    # a root below another one adds nothing (fewer Landlock rules, a shorter profile)
    return tuple(sorted(r for r in roots if not any(o != r and _below(r, o) for o in roots)))


def _sbpl_quote(path):
    if any(c in path for c in '"\\\n'):
        raise ValueError(f"cannot put {path!r} in a Seatbelt profile")
    return '"' + path + '"'


def _seatbelt_profiles(workdir, extra_readable=()):
    """Candidate SBPL profiles as (kind, confines_reads, text), strictest first; the probe keeps
    the first that this macOS both accepts and enforces. Seatbelt matches resolved paths, hence
    realpath (/var -> /private/var). Reads: file-read-data (contents, directory listings) is
    denied outside the read roots, metadata is not (path lookups stat every parent directory,
    which Landlock does not restrict either)."""
    w = _sbpl_quote(os.path.realpath(workdir))
    writable = (f"(subpath {w}) (literal \"/dev/null\") (literal \"/dev/stdout\") "
                "(literal \"/dev/stderr\") (subpath \"/dev/fd\")")
    allowed = []
    for path in (*_read_roots(), *extra_readable):
        try:
            allowed.append(f"(subpath {_sbpl_quote(os.path.realpath(path))})")
        except ValueError:
            pass  # a name SBPL cannot quote stays unreadable
    readable = (f"(subpath {w}) (literal \"/dev/null\") (literal \"/dev/urandom\") "
                "(literal \"/dev/random\") (subpath \"/dev/fd\") " + " ".join(allowed))
    head = "(version 1)\n(allow default)\n(deny network*)\n(deny process-fork)\n"
    one_rule = f"(deny file-write* (require-not (require-any {writable})))\n"
    read_one = f"(deny file-read-data (require-not (require-any {readable})))\n"
    # the other spelling, in case require-any is refused: a later rule overrides an earlier one
    two_rules = f"(deny file-write*)\n(allow file-write* {writable})\n"
    read_two = f"(deny file-read-data)\n(allow file-read-data {readable})\n"
    signals = "(deny signal (target others))\n"
    return [
        ("signals", True, head + one_rule + read_one + signals),
        ("plain", True, head + one_rule + read_one),
        ("plain", True, head + two_rules + read_two),
        ("signals", False, head + one_rule + signals),
        ("plain", False, head + one_rule),
        ("plain", False, head + two_rules),
    ]


_seatbelt_lock = threading.Lock()
_seatbelt_choice = {"checked": False, "index": None, "reads": False}


def _seatbelt_index():
    """Index of the Seatbelt profile to use (None: no Seatbelt). Checked once per process, by
    running children with the Python layer off, so that the profile alone must refuse a write
    outside the private directory, a read and a listing there (candidates with read rules; the
    child must also import from the standard library) and, for "signals", a signal to the
    parent."""
    if not IS_MACOS or not os.path.exists("/usr/bin/sandbox-exec"):
        return None
    with _seatbelt_lock:
        if _seatbelt_choice["checked"]:
            return _seatbelt_choice["index"]
        _seatbelt_choice["checked"] = True
        outside = tempfile.mkdtemp(prefix="mlxchat-sbprobe-")
        target = os.path.join(outside, "x")
        secret = os.path.join(outside, "secret")
        with open(secret, "w") as f:
            f.write("s3cret")
        try:
            for i, (kind, reads, _) in enumerate(_seatbelt_profiles(outside)):
                code = ("import os\nopen('inside.txt', 'w').write('ok')\n"
                        "try:\n"
                        f"    open({target!r}, 'w').write('no')\n"
                        "    print('WRITABLE')\n"
                        "except OSError:\n"
                        "    print('DENIED')\n")
                if kind == "signals":
                    code += ("try:\n    os.kill(os.getppid(), 0)\n    print('SIGNALS')\n"
                             "except OSError:\n    print('DENIED')\n")
                if reads:
                    code += ("import json, decimal\n"
                             "assert open('inside.txt').read() == 'ok'\n"
                             f"for f in (lambda: open({secret!r}).read(), "
                             f"lambda: os.listdir({outside!r})):\n"
                             "    try:\n"
                             "        f()\n"
                             "        print('READABLE')\n"
                             "    except OSError:\n"
                             "        print('DENIED')\n")
                try:
                    r = _run(code, 10.0, 256 * 1024 * 1024, DEFAULT_MAX_OUTPUT_BYTES,
                             DEFAULT_MAX_DISK_BYTES, "exec", ("kernel", "mem"), seatbelt=i)
                    ok = (r.success and set(r.stdout.split()) == {"DENIED"}
                          and not os.path.exists(target))
                except Exception:
                    ok = False
                if ok:
                    _seatbelt_choice["index"] = i
                    _seatbelt_choice["reads"] = reads
                    break
        finally:
            shutil.rmtree(outside, ignore_errors=True)
        if _seatbelt_choice["index"] is None:
            logger.warning("sandbox-exec is unusable here: the Python sandbox runs without "
                           "Seatbelt (network, file writes and reads rest on the Python layer)")
        elif not _seatbelt_choice["reads"]:
            logger.warning("this macOS refuses Seatbelt's read rules: file reads outside the "
                           "sandbox are refused by the Python layer only")
        return _seatbelt_choice["index"]


def _run(code, timeout, maximum_memory_bytes, max_output_bytes, maximum_disk_bytes, mode,
         layers, seatbelt):
    if not sys.executable:
        raise RuntimeError("sys.executable is unknown: cannot start a sandboxed interpreter")
    base = tempfile.mkdtemp(prefix="mlxchat-sandbox-")
    proc = None
    try:
        workdir = os.path.join(base, "work")
        os.mkdir(workdir, 0o700)
        code_path = os.path.join(base, "code.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        guard_path = os.path.join(base, "guard.py")  # outside workdir: the code cannot change it
        with open(guard_path, "w", encoding="utf-8") as f:
            f.write(_GUARD)
        mem = int(maximum_memory_bytes or 0)
        cpu_s = int(math.ceil(timeout)) + 1 if timeout else 0
        disk = int(maximum_disk_bytes or 0)
        # -S: the setup stage needs no site-packages, and skipping site saves a good part of the
        # startup on Linux, where the run stage is a second interpreter (which does import site,
        # so that the code can use numpy & co)
        setup_flags = ["-S"] if IS_LINUX and "kernel" in layers else []
        argv = [sys.executable, "-I", "-B", *setup_flags, guard_path, "setup", workdir, code_path, mode,
                str(mem), str(cpu_s), str(disk), str(os.getpid()), ",".join(layers),
                "\n".join(_read_roots())]
        if seatbelt is not None:
            profile = _seatbelt_profiles(workdir, (guard_path, code_path))[seatbelt][2]
            argv = ["/usr/bin/sandbox-exec", "-p", profile] + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir}

        start = time.monotonic()
        deadline = start + timeout if timeout else math.inf
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as e:  # e.g. EAGAIN under a process limit: report it, do not crash the caller
            return ExecutionResult(success=False, stdout="", stderr=str(e),
                                   error=f"Could not start the sandbox: {e}")
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        dropped = {fd: 0 for fd in bufs}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        open_fds = set(bufs)
        timed_out = mem_killed = disk_killed = False
        exited_at = None
        memory = _memory_sampler(proc.pid)
        next_disk = start + _DISK_POLL_S

        def drain(wait):
            for key, _ in sel.select(wait):
                fd = key.fd
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                room = max_output_bytes - len(bufs[fd])
                if room > 0:
                    bufs[fd] += data[:room]
                dropped[fd] += max(0, len(data) - max(room, 0))

        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            wait = min(_POLL_S, deadline - now)
            if open_fds:
                drain(wait)
            else:
                time.sleep(wait)
            if _child_exited(proc):
                if not open_fds:
                    break
                # exited, but something (a stray grandchild) still holds a pipe: kill the group
                # and give the pipes a moment to reach EOF
                if exited_at is None:
                    exited_at = time.monotonic()
                    _kill_group(proc)
                elif time.monotonic() - exited_at > 0.5:
                    break
                continue
            if mem:
                rss = memory()
                if rss is not None and rss > mem:
                    mem_killed = True
                    break
            if disk and time.monotonic() >= next_disk:
                next_disk = time.monotonic() + _DISK_POLL_S
                if _dir_size(workdir) > disk:
                    disk_killed = True
                    break
        _kill_group(proc)  # whatever is left of the group (normally nothing) dies now
        # the writers are dead: read what is still in the pipes, until EOF (bounded, in case a
        # process that left the group holds a pipe)
        end = time.monotonic() + 1.0
        while open_fds and time.monotonic() < end:
            drain(0.05)
        proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()

        stdout_b, stderr_b = bufs.values()
        out_drop, err_drop = dropped.values()
        stdout = stdout_b.decode("utf-8", "replace")
        stderr = stderr_b.decode("utf-8", "replace")
        truncated = bool(out_drop or err_drop)
        if out_drop:
            stdout += f"\n[output truncated: {out_drop} more bytes not shown]"
        if err_drop:
            stderr += f"\n[output truncated: {err_drop} more bytes not shown]"
        return _interpret(proc.returncode, stdout, stderr, stderr_b, timed_out, mem_killed,
                          disk_killed, truncated)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
            try:
                proc.wait(timeout=5)
            except Exception:
                pass
        _remove_tree(base)


def _interpret(returncode, stdout, stderr, stderr_bytes, timed_out, mem_killed, disk_killed,
               truncated):
    lines = [ln for ln in stderr_bytes.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else None
    memory_error = any(ln.startswith(("MemoryError", "numpy.core._exceptions._ArrayMemoryError",
                                      "numpy._core._exceptions._ArrayMemoryError"))
                       for ln in lines[-3:])
    res = ExecutionResult(success=False, stdout=stdout, stderr=stderr, output_truncated=truncated)
    if timed_out:
        res.timeout, res.error = True, TIMEOUT_ERROR
    elif mem_killed:
        res.memory_exceeded, res.error = True, MEMORY_ERROR
    elif disk_killed:
        res.error = DISK_ERROR
    elif returncode == 0:
        res.success = True
    elif memory_error:
        res.memory_exceeded, res.error = True, MEMORY_ERROR
    elif last is not None and "Blocked: " in last:
        # e.g. "urllib.error.URLError: <urlopen error Blocked: ... (socket.getaddrinfo)>"
        m = re.search(r"Blocked: [^()<>]*(\([^()]*\))?", last)
        res.error = m.group(0).strip()
    elif returncode is not None and returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == getattr(signal, "SIGXCPU", None):
            res.error = "CPU time limit exceeded"
        else:
            res.error = f"Process killed by {name}" + (f" ({last})" if last else "")
    else:
        res.error = last or f"Process exited with status {returncode}"
    return res


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024, *,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 maximum_disk_bytes: Optional[int] = DEFAULT_MAX_DISK_BYTES,
                 _layers=("py", "kernel", "mem"), _mode: str = "exec") -> ExecutionResult:
    """Run `code` in a fresh sandboxed Python process and report what happened.

    timeout: wall-clock seconds, then the whole process group is killed (error
      "Execution timed out (process killed)"). maximum_memory_bytes: None for no limit;
      exceeding it gives memory_exceeded=True. max_output_bytes: kept per stream, the rest is
      dropped (output_truncated=True). maximum_disk_bytes: per file (RLIMIT_FSIZE) and for the
      whole private directory. Never raises for anything the code does; safe to call from any
      thread. _layers/_mode are for tests and for this module's tools.
    """
    seatbelt = _seatbelt_index() if "kernel" in _layers else None
    return _run(code, float(timeout) if timeout else 0.0, maximum_memory_bytes, max_output_bytes,
                maximum_disk_bytes, _mode, tuple(_layers), seatbelt)


@functools.lru_cache(maxsize=1)
def sandbox_layers() -> dict:
    """Which protections this machine actually enforces (probed once by running a child):
    python, rlimit_as, pdeathsig, landlock (ABI version, 0 = none), seccomp, nproc, seatbelt;
    for reads: landlock_reads, seatbelt_reads, python_reads (per layer) and read_confinement
    (True when a kernel layer confines reads, not only the Python audit hook)."""
    r = execute_code("", timeout=10.0, _mode="probe")
    try:
        status = ast.literal_eval(r.stdout.strip())
    except (ValueError, SyntaxError):
        status = {}
    status["seatbelt"] = _seatbelt_index() is not None
    status["seatbelt_reads"] = status["seatbelt"] and _seatbelt_choice["reads"]
    status["landlock_reads"] = bool(status.get("landlock_reads"))
    status["python_reads"] = bool(status.get("python"))
    status["read_confinement"] = status["landlock_reads"] or status["seatbelt_reads"]
    status["rss_watchdog"] = _memory_sampler(os.getpid())() is not None
    status["platform"] = sys.platform
    if IS_LINUX and not (status.get("seccomp") and status.get("landlock")):
        logger.warning("sandbox: seccomp=%s landlock=%s on this kernel; the missing layers fall back "
                       "on the Python audit hooks", status.get("seccomp"), status.get("landlock"))
    return status


# ----------------------------------------------------------------------------------------------
# tools for the chat engine

def python_tool(code: str, timeout: float = 3.0, max_chars: int = 2000,
                maximum_memory_bytes: int = 256 * 1024 * 1024) -> str:
    """Run a cell of Python in the sandbox, REPL style: what it printed, then the repr of its last
    expression's value (when that is not None). Errors end the text as "Error: <message>". The
    text is capped at max_chars, keeping the start of the output and the error line."""
    r = execute_code(code, timeout=timeout, maximum_memory_bytes=maximum_memory_bytes,
                     max_output_bytes=max(4 * max_chars, 1024), _mode="repl")
    out = r.stdout
    err = "" if r.success else f"Error: {r.error}"
    if out.endswith("\n"):
        out = out[:-1]
    budget = max_chars - (len(err) + 1 if err else 0)
    if len(out) > budget:
        marker = "...[truncated]"
        out = out[:max(0, budget - len(marker))] + marker
    text = out + ("\n" if out and err else "") + err
    return text[:max_chars]


_ARITHMETIC_CHARS = set("0123456789*+-/.() ")
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_FORBIDDEN = ['__', 'import', 'exec', 'eval', 'compile', 'open', 'file', 'input', 'raw_input',
              'globals', 'locals', 'vars', 'dir', 'getattr', 'setattr', 'delattr', 'hasattr']
_INPROCESS_MAX_CHARS = 1000


def _eval_arithmetic_inprocess(expr):
    # Only digits, + - * / . ( ) and spaces, no "**", at most 1000 characters: the value has at
    # most ~1000 digits and the work is tiny, so no timeout is needed and none is used (SIGALRM
    # works only on the main thread; the web server calls this from worker threads).
    tree = ast.parse(expr.strip(), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            # "2(3)": the compiler would print a SyntaxWarning, and the call fails anyway
            return None
    return eval(compile(tree, "<calculator>", "eval"), {"__builtins__": {}}, {})


def _eval_in_sandbox(expr):
    code = ("import warnings\nwarnings.simplefilter('ignore')\n"
            f"print(repr(eval({expr!r}, {{'__builtins__': {{}}}}, {{}})))\n")
    r = execute_code(code, timeout=3.0, maximum_memory_bytes=256 * 1024 * 1024,
                     max_output_bytes=16 * 1024)
    if not r.success or r.output_truncated:
        return None
    return ast.literal_eval(r.stdout.strip())


def use_calculator(expr):
    """nanochat's calculator tool: the value of expr, or None.

    Commas are removed. Pure arithmetic (only 0-9 * + - / . ( ) and spaces, "**" refused) is
    evaluated with empty builtins. Otherwise only letters, digits, quotes, ( ) . _ and spaces are
    allowed, none of nanochat's forbidden words, and ".count(" must appear; such string
    expressions are evaluated in the sandbox (3 s, 256 MiB), since e.g. chained .replace() calls
    can grow a string exponentially. Any failure gives None. Thread-safe (no SIGALRM).
    """
    try:
        expr = expr.replace(",", "")
        if all(ch in _ARITHMETIC_CHARS for ch in expr):
            if "**" in expr:
                return None
            if len(expr) <= _INPROCESS_MAX_CHARS:
                value = _eval_arithmetic_inprocess(expr)
            else:
                value = _eval_in_sandbox(expr)
        else:
            if not all(ch in _STRING_CHARS for ch in expr):
                return None
            lowered = expr.lower()
            if any(word in lowered for word in _FORBIDDEN):
                return None
            if ".count(" not in expr:
                return None
            value = _eval_in_sandbox(expr)
        str(value)  # the engine prints it: refuse values that cannot be (e.g. ints over 4300 digits)
        return value
    except Exception:
        return None
