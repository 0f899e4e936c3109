"""
A run folder seen from several processes: one owner trains it, any number of others watch it (through
its metrics.jsonl) and steer it (through its control/ folder). No UI code, nothing that touches MLX.

    RunLock        <run>/owner.lock, flock'd by the owner for the run's life: a second process trying to
                   train the same folder is refused with the owner's pid, host and start time; the kernel
                   frees the lock when the owner dies (kill -9 included), and the next owner takes over
                   what it left behind with a notice
    send_command   from another process: pause, resume, save or stop, one small JSON file dropped
                   atomically into <run>/control/
    CommandSpool   the owner's side of that folder: takes the files in the order they were sent (the run
                   polls it at every step boundary), refusing any it cannot trust
    Heartbeat      a line in metrics.jsonl whenever nothing else was written for HEARTBEAT_SECONDS, so a
                   viewer tells a slow step or a long eval from a dead owner, even from another host

The control folder is 0700 and every file in it must belong to the owner's user: only that user (the
one who could kill the process anyway) can pause or stop the run. The owner acknowledges each command
with an Ack event in metrics.jsonl, where every viewer sees it.
"""
import itertools
import json
import os
import socket
import stat
import threading
import time

from mlxchat.training import COMMANDS, HEARTBEAT_SECONDS, TrainingError

LOCK_FILE = "owner.lock"
CONTROL_DIR = "control"
_sent = itertools.count()  # tells apart two commands sent by one process in the same nanosecond


def pid_alive(pid):
    """Whether a process with this pid exists on this machine (as any user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # PermissionError: it runs, as another user
    return True


def _when(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "an unknown time"


# -----------------------------------------------------------------------------
# one owner per run folder

def read_owner(run_dir):
    """What <run_dir>/owner.lock says: {"pid", "host", "since"} of the process that owns the run (or
    owned it and died without letting go), or None when nobody does (no file, or a clean release)."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE), encoding="utf-8") as f:
            owner = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and owner.get("pid") else None


class RunLock:
    """The one-owner lock of a run folder: an exclusive flock on <run_dir>/owner.lock, held on an open
    file for as long as the run trains. The kernel lets go of a flock when its process dies, however
    it dies, so a lock is never left held by a dead process; the file's text (pid, host, start time)
    only says who holds it. The file is never deleted: a process that unlinked it could let two
    others lock two different files under the same name. A clean release empties it instead, so a
    non-empty file whose flock is free is the trace of an owner that crashed."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.since = None  # when this process took it
        self._fd = None

    def acquire(self):
        """Take the lock or raise TrainingError naming its owner. Returns a notice (a sentence) when it
        took over what a crashed owner left, else None."""
        import fcntl
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = read_owner(self.run_dir) or {}
            who = f"pid {owner['pid']} on host {owner.get('host', '?')} since {_when(owner.get('since'))}" if owner \
                else "another process"
            raise TrainingError(f"{self.run_dir} is being trained by {who}; attach to it with "
                                f"`mlxchat-tui --attach {self.run_dir}`") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        previous = read_owner(self.run_dir)
        self.since = time.time()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(self.since, 3)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        if previous and (previous.get("pid"), previous.get("host")) != (me["pid"], me["host"]):
            return (f"took over a stale lock of pid {previous['pid']} on host {previous.get('host', '?')} (owner since "
                    f"{_when(previous.get('since'))}): that process no longer holds it, so it ended without letting go")
        return None

    def release(self):
        """Let go (empty the file first: nobody owns the run now). Safe to call twice."""
        import fcntl
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# -----------------------------------------------------------------------------
# commands from other processes

def _check_private_dir(path, fix):
    """Problems with a control folder that must be ours alone, in words (empty: fine). A folder of
    ours with a looser mode is set back to 0700 when `fix` (the owner's side), else refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [f"{path} does not exist"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"{path} is not a folder"]  # a symlink included: it could point anywhere
    if st.st_uid != os.getuid():
        return [f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"]
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        if not fix:
            return [f"{path} has mode {mode:04o}: other users could write in it (it must be 0700)"]
        os.chmod(path, 0o700)
    return []


def send_command(run_dir, command):
    """Ask the process that trains run_dir to pause, resume, save or stop (at its next step boundary).
    Returns the command file's path. TrainingError when nobody trains the folder, its owner is gone,
    or its control folder is not this user's alone. The owner's Ack event in metrics.jsonl says when
    the command took effect."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}")
    owner = read_owner(run_dir)
    if owner is None:
        raise TrainingError(f"nobody is training {run_dir}: there is no process to {command}")
    if owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"]):
        raise TrainingError(f"the owner of {run_dir} (pid {owner['pid']}) is gone: resume the run instead")
    folder = os.path.join(run_dir, CONTROL_DIR)
    problems = _check_private_dir(folder, fix=False)
    if problems:
        raise TrainingError(f"cannot send {command}: {problems[0]}")
    body = json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    # written under a hidden temporary name, then renamed: the owner never reads half a command
    name = f"{time.time_ns():020d}-{os.getpid()}-{next(_sent):06d}.json"
    tmp = os.path.join(folder, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body.encode("utf-8"))
    finally:
        os.close(fd)
    path = os.path.join(folder, name)
    os.rename(tmp, path)
    return path


class CommandSpool:
    """The owner's end of <run_dir>/control/: take() returns the commands other processes sent since the
    last call, oldest first, and deletes their files. What it refuses (a file or folder that is not
    this user's alone, a file that is not a command, a command sent before this owner started) is
    deleted where possible and described in `problems`, for the run to show as notices."""

    def __init__(self, run_dir, since=None):
        self.folder = os.path.join(run_dir, CONTROL_DIR)
        self.since = since  # commands sent before this (unix time) were meant for an earlier owner
        self.problems = []
        self.enabled = True

    def open(self):
        """Create the folder 0700 (or set an existing one of ours back to 0700). A folder that is not
        ours turns the spool off, with a problem saying why: the run goes on without remote commands."""
        try:
            os.mkdir(self.folder, 0o700)
            os.chmod(self.folder, 0o700)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass
        return self._check()

    def _check(self):
        problems = _check_private_dir(self.folder, fix=True)
        if problems:
            self.enabled = False
            self.problems.append(f"commands from other terminals are off: {problems[0]}")
        return self.enabled

    def take(self):
        if not self.enabled or not self._check():
            return []
        try:
            entries = sorted((e for e in os.scandir(self.folder) if e.name.endswith(".json") and not e.name.startswith(".")),
                             key=lambda e: e.name)
        except OSError as e:
            self.problems.append(f"cannot read {self.folder}: {e}")
            return []
        commands = []
        for entry in entries:
            command = self._read(entry)
            try:
                os.unlink(entry.path)
            except OSError:
                pass
            if command is not None:
                commands.append(command)
        return commands

    def _read(self, entry):
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                self.problems.append(f"refused {entry.name} in {self.folder}: not a file of this user's (uid {st.st_uid})")
                return None
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, encoding="utf-8") as f:
                record = json.loads(f.read(4096))
        except (OSError, ValueError) as e:
            self.problems.append(f"refused {entry.name} in {self.folder}: {e}")
            return None
        command = record.get("command") if isinstance(record, dict) else None
        if command not in COMMANDS:
            self.problems.append(f"refused {entry.name}: {command!r} is not one of {', '.join(COMMANDS)}")
            return None
        sent = record.get("time")
        if self.since is not None and isinstance(sent, (int, float)) and sent < self.since:
            self.problems.append(f"dropped a {command} sent at {_when(sent)}, before this run started")
            return None
        return command

    def take_problems(self):
        problems, self.problems = self.problems, []
        return problems


# -----------------------------------------------------------------------------
# heartbeat

class Heartbeat:
    """A thread that writes {"event": "heartbeat", "time", "pid", "host"} to a MetricsLog whenever
    nothing was written for `every` seconds: while paused, compiling, evaluating for minutes, saving.
    A thread rather than calls at step boundaries because those are exactly what a long eval lacks;
    it touches no MLX. A running run that logs steps faster than that writes no heartbeat at all."""

    def __init__(self, log, every=HEARTBEAT_SECONDS):
        self.log, self.every = log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="mlxchat-heartbeat", daemon=True)
        self._record = {"event": "heartbeat", "pid": os.getpid(), "host": socket.gethostname()}

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _main(self):
        while True:
            quiet = time.monotonic() - self.log.last_write
            if self._stop.wait(max(self.every - quiet, 0.05)):
                return
            if time.monotonic() - self.log.last_write >= self.every:
                try:
                    self.log.write(dict(self._record, time=round(time.time(), 3)))
                except (OSError, ValueError):
                    return  # the log was closed under us: the run is ending
