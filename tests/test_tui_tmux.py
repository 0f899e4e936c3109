"""
The dashboard end to end in a real terminal: `mlxchat-tui --preset demo --start` under tmux (80x24,
the smallest size it supports), driven with send-keys and read with capture-pane, the way a user over
SSH sees it. The demo preset trains its own tokenizer on the bundled corpus, then the tiny model; the
test pauses, resumes and saves from the keyboard, quits (which asks, stops the run with a checkpoint,
then exits 0), and checks the run folder afterwards.
"""
import os
import shutil
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from mlxchat.checkpoint_manager import find_steps
from mlxchat.training import read_metrics

IN_CI = os.environ.get("CI", "").lower() == "true"
TUI = os.path.join(os.path.dirname(sys.executable), "mlxchat-tui")


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is missing: runs/test.sh installs it (Debian's tmux package); CI must run this test")
        pytest.skip("tmux is not installed (runs/test.sh installs it)")
    if not os.path.exists(TUI):
        pytest.fail(f"{TUI} is missing: `pip install -e .` (runs/setup.sh) installs the mlxchat-tui console script")
    session = f"mlxchat-test-{uuid.uuid4().hex[:8]}"
    yield session
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def screen(session):
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def wait_for(session, predicate, timeout, what):
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = screen(session)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; the screen:\n{text}")


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def keys(session, *names):
    subprocess.run(["tmux", "send-keys", "-t", session, *names], check=True)


def test_demo_preset_under_tmux(tmux, tmp_path):
    runs_dir, exit_file = tmp_path / "runs", tmp_path / "exit_status"
    command = (f"env MLXCHAT_BASE_DIR={tmp_path / 'base'} MLXCHAT_DTYPE=float32 TERM=xterm-256color "
               f"{TUI} --runs-dir {runs_dir} --preset demo --start; echo $? > {exit_file}; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", tmux, "-x", "80", "-y", "24", command], check=True)
    # the tokenizer phase, then training: the status line counts the steps
    text = wait_for(tmux, lambda t: "running" in t and "step" in t and "/150" in t, 180, "the run to be training")
    assert "demo-base" in text
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "Pause" in lines[-1] and "Quit" in lines[-1]  # the footer shows the keys that apply now
    keys(tmux, "space")
    wait_for(tmux, lambda t: "paused" in t.splitlines()[0], 60, "paused in the status line")
    keys(tmux, "s")
    # the notice itself: the log pane already says "saved to ..." of the tokenizer the run trained
    wait_for(tmux, lambda t: "Checkpoint saved at step" in " ".join(t.split()), 60, "the checkpoint notice")
    run_dir = next(p for p in runs_dir.iterdir() if p.is_dir())
    saved = find_steps(str(run_dir))
    assert saved, "no checkpoint after s"  # the notice comes after the files are written
    keys(tmux, "space")
    wait_for(tmux, lambda t: "running" in t.splitlines()[0], 60, "running again")
    keys(tmux, "q")
    wait_for(tmux, lambda t: "Quit?" in t, 20, "the quit question")
    keys(tmux, "y")
    deadline = time.time() + 120
    while time.time() < deadline and not exit_file.exists():
        time.sleep(0.2)
    assert exit_file.exists(), f"mlxchat-tui did not exit; the screen:\n{screen(tmux)}"
    assert exit_file.read_text().strip() == "0"
    records = read_metrics(str(run_dir / "metrics.jsonl"))
    finished = [r for r in records if r["event"] == "finished"]
    assert finished and finished[-1]["status"] == "stopped"
    assert finished[-1]["step"] in find_steps(str(run_dir))  # the stop left a checkpoint
    assert os.path.exists(run_dir / "tokenizer" / "tokenizer.pkl")  # the run trained its own tokenizer
    assert (run_dir / "train.log").read_text().count("step ") > 1


def test_a_dropped_terminal_saves_and_exits(tmux, tmp_path):
    """SIGHUP (an SSH connection dropped; here tmux closing the terminal) saves a checkpoint and exits."""
    runs_dir = tmp_path / "runs"
    command = (f"env MLXCHAT_BASE_DIR={tmp_path / 'base'} MLXCHAT_DTYPE=float32 {TUI} --runs-dir {runs_dir} "
               f"--preset demo --set run_name=hup --set num_iterations=100000 --start")
    subprocess.run(["tmux", "new-session", "-d", "-s", tmux, "-x", "100", "-y", "30", command], check=True)
    wait_for(tmux, lambda t: "running" in t and "/100000" in t, 180, "the run to be training")
    pid = subprocess.run(["tmux", "list-panes", "-t", tmux, "-F", "#{pane_pid}"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["tmux", "kill-session", "-t", tmux], check=True)  # the terminal goes away: SIGHUP
    deadline = time.time() + 120
    while time.time() < deadline and _running(int(pid)):
        time.sleep(0.2)
    if _running(int(pid)):
        os.kill(int(pid), 9)  # never leave it spinning behind the test
        raise AssertionError("mlxchat-tui still ran 120 s after its terminal closed")
    run_dir = runs_dir / "hup"
    finished = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["event"] == "finished"]
    assert finished and finished[-1]["status"] == "stopped"
    assert finished[-1]["step"] in find_steps(str(run_dir))
