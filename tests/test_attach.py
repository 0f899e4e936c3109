"""
Watching and steering a run from another process (mlxchat.control, `mlxchat-tui --attach`): a tiny run
trained by `python -m scripts.base_train` in its own process, a dashboard attached to it from this one
(pause, resume, save and stop sent through the run folder), its owner killed with SIGKILL under an
attached viewer and the run resumed by the viewer, a second owner refused, a stale lock taken over, the
command folder's permissions, heartbeats, and the viewer reading a torn, growing metrics.jsonl.
"""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from mlxchat import control
from mlxchat.checkpoint_manager import find_steps
from mlxchat.control import CommandSpool, Heartbeat, RunLock, read_owner, send_command
from mlxchat.runs import OWNER_SILENT_SECONDS, RunState
from mlxchat.training import MetricsLog, TrainingError, read_metrics
from tui.app import ConfirmScreen, MlxchatApp
from tui.panes.chat import ChatPane

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "SL",
             "--device-batch-size", "2", "--total-batch-size", "256", "--eval-every", "-1", "--sample-every", "-1"]
pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


@pytest.fixture
def owners(tmp_path):
    """Start tiny endless training runs as processes of their own; whatever is left is killed at the end."""
    procs = []

    def start(run_dir, data_dir, *extra):
        args = [sys.executable, "-m", "scripts.base_train"] + TINY_ARGS + [
            "--num-iterations", "100000", "--data-dir", data_dir, "--checkpoint-dir", run_dir, "--save-every", "-1", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        err = str(tmp_path / f"owner-{len(procs)}.err")  # a file, not a pipe: nobody reads it while the owner runs
        with open(err, "w") as f:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f)
        proc.err = err
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def make_app(tmp_path):
    apps = []

    def make(**kwargs):
        app = MlxchatApp(runs_dir=str(tmp_path / "runs"), **kwargs)
        apps.append(app)
        return app
    yield make
    for app in apps:
        assert app.shutdown_workers(120), "the training thread did not end"


def steps_on_disk(run_dir):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["event"] == "step"]


def wait_for(predicate, proc=None, timeout=90.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            with open(proc.err) as f:
                raise AssertionError(f"the owner exited ({proc.returncode}) before {what}: {f.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_until(pilot, predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def status_text(app):
    return str(app.query_one("#status").render())


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -----------------------------------------------------------------------------
# a viewer in another process steers the owner

async def test_attach_follows_the_owner_and_steers_it(base, owners, make_app, tmp_path):
    run_dir = str(tmp_path / "runs" / "shared")
    owner = owners(run_dir, base)
    wait_for(lambda: len(steps_on_disk(run_dir)) >= 3, owner, what="the owner's third step")
    app = make_app(attach=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.state is not None and app.state.step >= 3, what="the viewer to catch up")
        assert app.query_one("#panes").active == "monitor" and "attached to pid" in status_text(app)
        assert app.state.pid == owner.pid and app.check_action("pause_resume", ()) and app.check_action("stop", ())
        # the process figures are the owner's (on this machine), not this viewer's
        assert abs(app._owner_rss() - psutil.Process(owner.pid).memory_info().rss) < 0.2 * app._owner_rss()
        # everything from the first step, as the owner wrote it
        on_disk = {r["step"]: r["loss"] for r in steps_on_disk(run_dir)}
        assert app.state.loss_history[0][0] == 1
        assert app.state.loss_history == [(s, on_disk[s]) for s, _ in app.state.loss_history]

        await pilot.press("space")
        await wait_until(pilot, lambda: app.state.state == "paused", what="the owner to pause")
        paused_at = app.state.step
        await pilot.pause(1.5)  # the owner is another process: its step counter, not this one's, must stop
        assert steps_on_disk(run_dir)[-1]["step"] == paused_at and owner.poll() is None

        await pilot.press("s")
        await wait_until(pilot, lambda: app.state.last_saved and app.state.last_saved[0] == paused_at, what="the checkpoint")
        assert paused_at in find_steps(run_dir) and app.state.paused
        await pilot.press("space")
        await wait_until(pilot, lambda: app.state.state == "running" and app.state.step > paused_at + 1, what="resumed")

        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.state.state == "stopped", what="the owner to stop")
        assert owner.wait(60) == 0
        await pilot.pause(0.3)
        assert not app.check_action("pause_resume", ())  # nothing left to steer
        # c: the Chat pane loads the run's latest checkpoint
        await pilot.press("c")
        chat = app.query_one(ChatPane)
        assert app.query_one("#panes").active == "chat"
        stopped_at = app.state.step
        await wait_until(pilot, lambda: chat.model is not None, what="the checkpoint to load in Chat")
        assert f"step {stopped_at}" in chat.model
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    acks = [r["command"] for r in records if r["event"] == "ack"]
    assert acks == ["pause", "save", "resume", "stop"]
    finished = records[-1]
    assert finished["event"] == "finished" and finished["status"] == "stopped"
    assert finished["step"] == steps_on_disk(run_dir)[-1]["step"] == max(find_steps(run_dir))
    assert read_owner(run_dir) is None and os.listdir(os.path.join(run_dir, "control")) == []
    with RunLock(run_dir):  # released: anyone may train it now
        pass


async def test_quitting_a_viewer_leaves_the_run_alone_and_a_killed_owner_is_resumed_by_the_viewer(
        base, owners, make_app, tmp_path):
    runs_dir = tmp_path / "runs"
    run_dir = str(runs_dir / "victim")
    owner = owners(run_dir, base, "--save-every", "3")
    wait_for(lambda: find_steps(run_dir) and len(steps_on_disk(run_dir)) >= 4, owner, what="a checkpoint")

    viewer = make_app(attach=run_dir)
    async with viewer.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: viewer.state is not None and viewer.state.step >= 4, what="the first viewer")
        await pilot.press("q")  # no question: the run is not this process's
        assert viewer._exit and viewer.return_code == 0
    seen = len(steps_on_disk(run_dir))
    wait_for(lambda: len(steps_on_disk(run_dir)) > seen + 2, owner, what="the owner to go on")
    assert os.listdir(os.path.join(run_dir, "control")) == []  # no command was sent

    app = make_app(attach=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.state is not None and app.state.state == "running" and app.state.step > seen,
                         what="attached")
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        await wait_until(pilot, lambda: app.state.state == "owner gone", timeout=10, what="owner gone")
        last = max(find_steps(run_dir))
        await pilot.pause(0.2)
        assert f"owner gone · r resumes from step {last}" in status_text(app)
        assert not app.check_action("pause_resume", ())

        await pilot.press("4")
        runs = app.query_one("RunsPane")
        await wait_until(pilot, lambda: runs.selected_run() is not None, what="the run listed")
        assert runs.selected_run().run_dir == run_dir and runs.selected_run().state == "owner gone"
        await pilot.press("r")
        await wait_until(pilot, lambda: app.active and app.state.step > last + 1, what="resumed in the viewer")
        assert read_owner(run_dir)["pid"] == os.getpid()
        await pilot.press("x", "y")
        await wait_until(pilot, lambda: not app.active, what="the resumed run to stop")
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r for r in records if r["event"] == "started"][-1]["start_step"] == last
    notices = [r["text"] for r in records if r["event"] == "notice"]
    assert any(f"took over a stale lock of pid {owner.pid}" in text for text in notices), notices
    assert records[-1]["status"] == "stopped" and read_owner(run_dir) is None


def test_a_second_owner_is_refused_naming_the_first(base, owners, tmp_path):
    run_dir = str(tmp_path / "runs" / "taken")
    first = owners(run_dir, base)
    wait_for(lambda: steps_on_disk(run_dir), first, what="the first owner's first step")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    second = subprocess.run([sys.executable, "-m", "scripts.base_train"] + TINY_ARGS + [
        "--num-iterations", "5", "--data-dir", base, "--checkpoint-dir", run_dir],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in second.stderr
    assert f"is being trained by pid {first.pid} on host {socket.gethostname()}" in lines[0]
    assert f"mlxchat-tui --attach {run_dir}" in lines[0]
    # nothing of the refused run reached the owner's files, and the owner trains on
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert len([r for r in records if r["event"] == "started"]) == 1 and not [r for r in records if r["event"] == "finished"]
    assert first.poll() is None and read_owner(run_dir)["pid"] == first.pid


# -----------------------------------------------------------------------------
# the lock, the command folder, the heartbeat: in this process

def test_the_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path):
    run_dir = str(tmp_path / "run")
    with RunLock(run_dir):
        # flock belongs to an open file, not a process: a second open of the file is refused, even from here
        with pytest.raises(TrainingError, match=f"is being trained by pid {os.getpid()} .*--attach {run_dir}"):
            RunLock(run_dir).acquire()
    assert read_owner(run_dir) is None  # a clean release leaves no owner behind
    first = RunLock(run_dir)
    assert first.acquire() is None  # nothing to take over
    first.release()
    gone = dead_pid()
    with open(os.path.join(run_dir, "owner.lock"), "w") as f:  # what a kill -9 leaves: the text, no flock
        json.dump({"pid": gone, "host": socket.gethostname(), "since": time.time() - 60}, f)
    lock = RunLock(run_dir)
    notice = lock.acquire()
    assert notice and f"took over a stale lock of pid {gone}" in notice
    assert read_owner(run_dir)["pid"] == os.getpid()
    lock.release()


def test_the_command_folder_is_private_and_commands_come_in_order(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="nobody is training"):
        send_command(run_dir, "pause")  # no owner: nothing would ever read it
    lock = RunLock(run_dir)
    lock.acquire()
    folder = os.path.join(run_dir, "control")
    os.makedirs(folder, mode=0o777)
    os.chmod(folder, 0o777)
    with pytest.raises(TrainingError, match="mode 0777"):
        send_command(run_dir, "pause")  # anyone could have written there: the sender refuses too
    spool = CommandSpool(run_dir, since=lock.since)
    assert spool.open()
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700  # set back by the owner
    for command in ("pause", "save", "resume", "stop"):
        send_command(run_dir, command)
    with pytest.raises(ValueError, match="unknown command"):
        send_command(run_dir, "explode")
    with open(os.path.join(folder, ".half-written.json.tmp"), "w") as f:
        f.write('{"command": "st')  # a sender mid-write: its temporary name is never read
    assert spool.take() == ["pause", "save", "resume", "stop"]
    assert spool.take() == [] and os.listdir(folder) == [".half-written.json.tmp"]

    def drop(name, body):
        with open(os.path.join(folder, name), "w") as f:
            f.write(body)
        return name
    drop("1-junk.json", "not json")
    drop("2-unknown.json", json.dumps({"command": "explode", "time": time.time()}))
    drop("3-old.json", json.dumps({"command": "stop", "time": lock.since - 5}))  # meant for an earlier owner
    os.symlink("/etc/passwd", os.path.join(folder, "4-link.json"))
    if os.geteuid() == 0:  # only root can make a file of another user's here
        os.chown(os.path.join(folder, drop("5-foreign.json", json.dumps({"command": "stop", "time": time.time()}))), 4242, 4242)
    send_command(run_dir, "save")
    assert spool.take() == ["save"]
    problems = spool.take_problems()
    assert any("1-junk.json" in p for p in problems) and any("'explode' is not one of" in p for p in problems)
    assert any("dropped a stop" in p and "before this run started" in p for p in problems)
    assert any("4-link.json" in p and "not a file of this user's" in p for p in problems)
    assert os.geteuid() != 0 or any("5-foreign.json" in p and "uid 4242" in p for p in problems)
    assert os.listdir(folder) == [".half-written.json.tmp"]  # the refused files are gone too
    # a folder that is not this user's: no command is read from it
    send_command(run_dir, "stop")
    real_uid = os.getuid()
    monkeypatch.setattr(control.os, "getuid", lambda: real_uid + 1)
    assert spool.take() == [] and not spool.enabled
    assert any("commands from other terminals are off" in p for p in spool.take_problems())
    monkeypatch.undo()
    lock.release()
    with pytest.raises(TrainingError, match="nobody is training"):
        send_command(run_dir, "stop")


def test_a_dead_owner_gets_no_commands(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "control"), mode=0o700)
    gone = dead_pid()
    with open(os.path.join(run_dir, "owner.lock"), "w") as f:
        json.dump({"pid": gone, "host": socket.gethostname(), "since": time.time()}, f)
    with pytest.raises(TrainingError, match=f"pid {gone}\\) is gone: resume the run instead"):
        send_command(run_dir, "pause")


def test_a_heartbeat_is_written_only_when_the_log_is_quiet(tmp_path):
    log = MetricsLog(str(tmp_path))
    beat = Heartbeat(log, every=0.2).start()
    time.sleep(0.9)
    quiet = [r for r in read_metrics(log.path) if r["event"] == "heartbeat"]
    assert 2 <= len(quiet) <= 5 and all(r["pid"] == os.getpid() and r["host"] == socket.gethostname() for r in quiet)
    for i in range(10):  # a busy log: steps every 0.05 s leave the heartbeat nothing to say
        log.write({"event": "step", "step": i})
        time.sleep(0.05)
    beat.stop()
    records = read_metrics(log.path)
    log.close()
    assert [r["event"] for r in records[len(quiet):]] == ["step"] * 10


def test_run_state_absorbs_heartbeats_and_tells_slow_from_gone():
    t = time.time()
    here, elsewhere = socket.gethostname(), "another-mac.local"

    def started(pid, host, heartbeat=10.0):
        return {"event": "started", "stage": "base", "run_dir": "/r", "config": {}, "num_params": 1, "tokens_per_step": 8,
                "flops_per_token": 1.0, "total_steps": 100, "start_step": 0, "pid": pid, "host": host,
                "heartbeat": heartbeat, "time": t}
    running = {"event": "phase", "name": "running", "step": 1, "time": t}
    s = RunState("/r")
    for r in (started(os.getpid(), here), running, {"event": "heartbeat", "time": t + 30, "pid": os.getpid(), "host": here}):
        s.apply(r)
    assert s.state == "running" and s.last_heartbeat == t + 30 == s.updated and s.last_event == "phase"
    s.check_owner(now=t + 60)
    assert s.state == "running"  # alive, if slow
    s.check_owner(now=t + 30 + OWNER_SILENT_SECONDS + 1)
    assert s.state == "owner gone"  # alive by pid, but silent for longer than any heartbeat allows
    s.apply({"event": "heartbeat", "time": t + 700, "pid": os.getpid(), "host": here})
    assert s.state == "running"  # it was only stuck: back to what it was
    # another host's pid cannot be looked up: a dead pid number there means nothing, only silence counts
    gone = dead_pid()
    remote = RunState("/r")
    for r in (started(gone, elsewhere), running):
        remote.apply(r)
    remote.check_owner(now=t + 5)
    assert remote.state == "running"
    remote.check_owner(now=t + OWNER_SILENT_SECONDS + 1)
    assert remote.state == "owner gone"
    local = RunState("/r")
    for r in (started(gone, here), running):
        local.apply(r)
    local.check_owner(now=t + 5)
    assert local.state == "owner gone"  # same host: the pid is gone, no need to wait
    # a writer that promised no heartbeat (an older version) is never presumed dead from silence
    old = RunState("/r")
    for r in (started(os.getpid(), "", heartbeat=None), running):
        old.apply(r)
    old.check_owner(now=t + 10 * OWNER_SILENT_SECONDS)
    assert old.state == "running"


def test_a_step_after_a_save_shows_the_run_running_again():
    # the stages say "running" once, after their first step; a periodic save or eval must not stick on screen
    s = RunState("/r")
    for r in ({"event": "phase", "name": "running", "step": 1}, {"event": "phase", "name": "saving", "step": 3},
              {"event": "saved", "step": 3, "path": "/r"}):
        s.apply(r)
    assert s.state == "saving"
    s.apply({"event": "step", "step": 4, "total": 10, "loss": 1.0, "smooth_loss": 1.0})
    assert s.state == "running"
    s.apply({"event": "ack", "command": "pause", "step": 4})
    s.apply({"event": "phase", "name": "saving", "step": 4})
    assert s.paused  # what space decides on: resume, though the run says "saving" just now
    s.apply({"event": "ack", "command": "resume", "step": 4})
    assert not s.paused


# -----------------------------------------------------------------------------
# the viewer reads a file that grows under it

async def test_the_viewer_keeps_a_torn_line_back_and_follows_a_growing_file(make_app, tmp_path):
    run_dir = str(tmp_path / "runs" / "by-hand")
    os.makedirs(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    t = time.time()

    def step(n):
        return {"event": "step", "step": n, "total": 1000, "loss": 10.0 / n, "smooth_loss": 10.0 / n, "lrm": 1.0, "dt": 0.1,
                "tok_per_sec": 100.0, "mfu": None, "active_gib": 0.1, "peak_gib": 0.1, "elapsed": n * 0.1, "eta": 1.0,
                "progress": n / 1000, "extra": {}, "time": t}
    with open(path, "w") as f:
        for r in ({"event": "started", "stage": "base", "run_dir": run_dir, "config": {}, "num_params": 1,
                   "tokens_per_step": 8, "flops_per_token": 1.0, "total_steps": 1000, "start_step": 0, "pid": os.getpid(),
                   "host": socket.gethostname(), "time": t}, {"event": "phase", "name": "running", "step": 1, "time": t},
                  step(1)):
            f.write(json.dumps(r) + "\n")
    app = make_app(attach=run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.state is not None and app.state.step == 1, what="the first step")
        line = json.dumps(step(2)) + "\n"
        with open(path, "a") as f:
            f.write(line[:40])  # the writer is mid-line
        app._follow_viewed()
        assert app.state.step == 1 and app.state.loss_history == [(1, 10.0)]
        with open(path, "a") as f:
            f.write(line[40:])
        app._follow_viewed()
        assert app.state.step == 2 and app.state.loss_history == [(1, 10.0), (2, 5.0)]

        def writer():
            with open(path, "a") as f:
                for n in range(3, 400):
                    record = json.dumps(step(n)) + "\n"
                    cut = n % len(record)  # every record in two pieces: the reader meets torn lines
                    f.write(record[:cut])
                    f.flush()
                    f.write(record[cut:])
                    f.flush()
        thread = threading.Thread(target=writer)
        thread.start()
        while thread.is_alive():
            app._follow_viewed()
            await pilot.pause(0.001)
        thread.join()
        app._follow_viewed()
        assert [s for s, _ in app.state.loss_history] == list(range(1, 400))
        assert app.state.state == "running" and "attached" in status_text(app)
