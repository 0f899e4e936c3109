"""
mlxchat.runs: RunState built from hand-written event records (the shapes Event.to_dict() writes to
metrics.jsonl), run folders listed and followed, checkpoints found in the runs dir, the base dir and a
nanochat cache. No training here: every file is written by the test.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from mlxchat import runs
from mlxchat.runs import RunState, list_checkpoints, list_runs, new_run_name

T0 = 1_700_000_000.0  # a fixed time for records, in the past


def started(start_step=0, total=10, stage="base", pid=None, time_="now", run_dir="/elsewhere/run"):
    return {"event": "started", "stage": stage, "run_dir": run_dir, "config": {"depth": 4},
            "num_params": 1234, "tokens_per_step": 512, "flops_per_token": 1e4, "total_steps": total,
            "start_step": start_step, "world_size": 1, "device": "cpu", "pid": os.getpid() if pid is None else pid,
            "time": time.time() if time_ == "now" else time_}


def phase(name, step=0, t=T0):
    return {"event": "phase", "name": name, "step": step, "time": t}


def step(n, loss, total=10, mfu=None, t=None):
    return {"event": "step", "step": n, "total": total, "loss": loss, "smooth_loss": loss + 0.5, "lrm": 1.0 - n / 100,
            "dt": 0.1, "tok_per_sec": 5000.0 + n, "mfu": mfu, "active_gib": 0.5, "peak_gib": 0.75 + n / 100,
            "elapsed": n * 0.1, "eta": (total - n) * 0.1, "progress": n / total, "extra": {},
            "time": T0 + n if t is None else t}


def val(n, bpb):
    return {"event": "eval", "step": n, "metrics": {"val_bpb": bpb}, "time": T0 + n}


def finished(status, n, error=None):
    return {"event": "finished", "status": status, "step": n, "summary": {}, "error": error, "time": T0 + 100}


def feed(records, state=None):
    state = state or RunState("/runs/demo-base-1")
    for r in records:
        state.apply(r)
    return state


def write_metrics(run_dir, records, tail=""):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def write_checkpoint(folder, step_, ext="safetensors", meta=True):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"model_{step_:06d}.{ext}"), "wb") as f:
        f.write(b"\0" * 8)
    if meta:
        with open(os.path.join(folder, f"meta_{step_:06d}.json"), "w") as f:
            json.dump({"step": step_, "model_config": {"n_layer": 2}}, f)


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -----------------------------------------------------------------------------
# the reducer

def test_a_normal_run_from_start_to_finish():
    s = RunState("/runs/demo-base-1")
    assert (s.name, s.state, s.stage) == ("demo-base-1", "starting", "unknown")
    feed([phase("loading"), started(), phase("tokenizing"), val(0, 3.0), phase("compiling")], s)
    assert (s.state, s.stage, s.total_steps, s.pid, s.num_params) == ("compiling", "base", 10, os.getpid(), 1234)
    assert s.run_dir == "/runs/demo-base-1"  # where the folder is now, not where the run first wrote it
    feed([phase("running", 1)] + [step(n, 10.0 - n, mfu=None if n < 3 else 40.0) for n in range(1, 6)], s)
    assert s.state == "running" and s.step == 5 and s.progress == 0.5 and s.eta == pytest.approx(0.5)
    feed([{"event": "ack", "command": "pause", "step": 5, "time": T0 + 5}, phase("paused", 5)], s)
    assert s.state == "paused"
    feed([{"event": "ack", "command": "resume", "step": 5, "time": T0 + 5}, phase("running", 5),
          {"event": "log", "text": "data: 3 shards", "time": T0 + 5},
          {"event": "notice", "text": "swapping", "level": "warning", "time": T0 + 6}]
         + [step(n, 10.0 - n, mfu=40.0) for n in range(6, 11)]
         + [phase("evaluating", 10), val(5, 2.5), val(10, 2.0),
            {"event": "samples", "step": 10, "samples": [["The capital of France is", " Paris"]], "time": T0 + 10},
            {"event": "saved", "step": 10, "path": "/runs/demo-base-1", "time": T0 + 11},
            finished("finished", 10)], s)
    assert s.state == "finished" and s.error is None and not s.active and not s.resumable
    assert s.loss_history == [(n, 10.0 - n) for n in range(1, 11)]
    assert s.smooth_loss_history[-1] == (10, 0.5)
    assert s.val_bpb_history == [(0, 3.0), (5, 2.5), (10, 2.0)] and s.last_val_bpb == 2.0
    assert list(s.mfu) == [40.0] * 8  # the two steps without an MFU figure are skipped
    assert len(s.tok_per_sec) == len(s.dt) == len(s.lrm) == 10
    assert s.peak_gib == pytest.approx(0.85) and s.last_step["step"] == 10
    assert s.samples == (10, [["The capital of France is", " Paris"]])
    assert s.last_saved == (10, T0 + 11)
    assert s.progress == 1.0 and s.updated == T0 + 100
    assert s.notices == ["swapping"]
    log = list(s.log)
    assert "ack: pause at step 5" in log and "data: 3 shards" in log and "! swapping" in log


def test_histories_are_bounded():
    s = feed([started(total=1000)] + [step(n, 1.0, total=1000, mfu=1.0) for n in range(1, 301)]
             + [{"event": "log", "text": f"line {i}", "time": T0} for i in range(250)])
    assert len(s.loss_history) == 300  # the plot keeps every step
    assert len(s.tok_per_sec) == len(s.mfu) == 120 and s.tok_per_sec[-1] == 5300.0
    assert len(s.log) == 200 and s.log[-1] == "line 249"


def test_a_resumed_run_keeps_its_history_up_to_the_checkpoint():
    first = [phase("loading"), started(pid=dead_pid()), val(0, 3.0), phase("running", 1)]
    first += [step(n, 10.0 - n) for n in range(1, 9)]
    first += [val(5, 2.5), {"event": "saved", "step": 5, "path": "x", "time": T0 + 5}]  # killed at step 8
    s = feed(first)
    second = [phase("loading", 0, T0 + 50), started(start_step=5, time_=T0 + 50)]
    feed(second, s)
    # steps 6-8 will be trained again: they are gone until replayed; step 5 came before the checkpoint
    assert s.loss_history == [(n, 10.0 - n) for n in range(1, 6)]
    assert s.step == 5 and s.progress == 0.5 and s.state == "loading"
    assert s.val_bpb_history == [(0, 3.0)]  # the eval at the start step runs again
    assert s.last_saved == (5, T0 + 5)
    feed([val(5, 2.4), phase("running", 6)] + [step(n, 20.0 - n) for n in range(6, 11)] + [val(10, 2.1),
                                                                                         finished("finished", 10)], s)
    assert [p[0] for p in s.loss_history] == list(range(1, 11))
    assert s.loss_history[4] == (5, 5.0) and s.loss_history[5] == (6, 14.0)  # the resumed run's losses win
    assert s.val_bpb_history == [(0, 3.0), (5, 2.4), (10, 2.1)]
    assert s.state == "finished" and s.start_step == 5


def test_a_stopped_run_resumed_leaves_the_stopped_state():
    s = feed([started(), phase("running", 1), step(1, 5.0), step(2, 4.0),
              {"event": "ack", "command": "stop", "step": 2, "time": T0 + 2}, finished("stopped", 2)])
    assert s.state == "stopped" and s.resumable and s.error is None
    feed([phase("loading", 0, T0 + 10)], s)
    assert s.state == "loading" and s.active
    feed([started(start_step=2, time_=T0 + 10), phase("running", 3), step(3, 3.0)], s)
    assert s.state == "running" and s.loss_history == [(1, 5.0), (2, 4.0), (3, 3.0)]


def test_a_failed_run_keeps_its_error_until_it_is_resumed():
    s = feed([started(), phase("running", 1), step(1, 5.0), finished("failed", 1, error="TrainingError: out of data")])
    assert s.state == "failed" and s.error == "TrainingError: out of data" and s.resumable
    assert s.log[-1] == "failed at step 1: TrainingError: out of data"
    feed([phase("loading", 0, T0 + 10), started(start_step=0, time_=T0 + 10)], s)
    assert s.error is None and s.state == "loading"


def test_the_same_steps_again_without_a_started_keep_the_last_record():
    s = feed([started(), step(1, 5.0), step(2, 4.0), step(3, 3.0), step(2, 4.5)])
    assert s.loss_history == [(1, 5.0), (2, 4.5)]


def test_unknown_events_are_skipped():
    s = feed([started(), {"event": "heartbeat", "time": T0 + 1}, step(1, 2.0)])
    assert s.step == 1 and s.last_event == "step"


# -----------------------------------------------------------------------------
# from disk

def test_from_file_leaves_a_torn_last_line_out(tmp_path):
    run = str(tmp_path / "r")
    records = [started(), phase("running", 1), step(1, 5.0), step(2, 4.0)]
    torn = json.dumps(step(3, 3.0))
    write_metrics(run, records, tail="not json\n" + torn[:25])
    s = RunState.from_file(run)
    assert s.step == 2 and s.state == "running" and s.name == "r"
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(torn[25:] + "\n")
    assert RunState.from_file(run).step == 3


def test_owner_gone_when_its_process_is_dead(tmp_path):
    run = str(tmp_path / "r")
    now = time.time()
    write_metrics(run, [started(pid=dead_pid(), time_=now), phase("running", 1, now), step(1, 5.0, t=now)])
    s = RunState.from_file(run)
    assert s.state == "owner gone" and s.resumable
    write_metrics(run, [started(pid=os.getpid(), time_=now), phase("running", 1, now), step(1, 5.0, t=now)])
    assert RunState.from_file(run).state == "running"  # this very process wrote it: alive
    write_metrics(run, [started(pid=dead_pid(), time_=now), step(1, 5.0, t=now), finished("finished", 1)])
    assert RunState.from_file(run).state == "finished"  # it ended properly: its process is meant to be gone


def test_owner_gone_when_its_pid_now_belongs_to_a_newer_process(tmp_path):
    run = str(tmp_path / "r")
    # this process exists, but was created long after a run that started in 2001: it cannot be that run's owner
    write_metrics(run, [started(pid=os.getpid(), time_=1e9), phase("running", 1, 1e9)])
    assert RunState.from_file(run).state == "owner gone"


def test_checkpoint_steps(tmp_path):
    run = str(tmp_path / "r")
    write_metrics(run, [started()])
    write_checkpoint(run, 5)
    write_checkpoint(run, 10)
    write_checkpoint(run, 15, meta=False)  # killed mid-save: its meta (the commit point) is missing
    assert RunState.from_file(run).checkpoint_steps() == [5, 10]


def test_list_runs_newest_first_and_follows_growing_files(tmp_path):
    runs_dir = str(tmp_path / "runs")
    write_metrics(os.path.join(runs_dir, "old"), [started(stage="sft"), finished("finished", 0)])
    write_metrics(os.path.join(runs_dir, "new"), [started(), phase("running", 1), step(1, 5.0)])
    os.makedirs(os.path.join(runs_dir, "no-metrics"))
    open(os.path.join(runs_dir, "stray.txt"), "w").close()
    now = time.time()
    os.utime(os.path.join(runs_dir, "old", "metrics.jsonl"), (now - 100, now - 100))
    os.utime(os.path.join(runs_dir, "new", "metrics.jsonl"), (now - 50, now - 50))
    cache = {}
    found = list_runs(runs_dir, cache=cache)
    assert [(s.name, s.stage, s.state) for s in found] == [("new", "base", "running"), ("old", "sft", "finished")]
    live = found[0]
    with open(os.path.join(runs_dir, "new", "metrics.jsonl"), "a") as f:
        f.write(json.dumps(step(2, 4.0)) + "\n")
    again = list_runs(runs_dir, cache=cache)
    assert again[0] is live and live.loss_history == [(1, 5.0), (2, 4.0)]  # applied onto the same state
    assert list_runs(runs_dir)[0].loss_history == live.loss_history  # a full read agrees


def test_list_runs_does_not_read_an_unchanged_file_again(tmp_path):
    runs_dir = str(tmp_path / "runs")
    path = os.path.join(runs_dir, "a", "metrics.jsonl")
    write_metrics(os.path.dirname(path), [started(), step(1, 5.0)])
    cache = {}
    assert list_runs(runs_dir, cache=cache)[0].loss_history == [(1, 5.0)]
    st = os.stat(path)
    with open(path, "r+") as f:  # same size, same mtime: a reader keyed on (size, mtime) cannot tell
        text = f.read()
        f.seek(0)
        f.write(text.replace('"loss": 5.0', '"loss": 7.0'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert list_runs(runs_dir, cache=cache)[0].loss_history == [(1, 5.0)]
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place: read from the start
    assert list_runs(runs_dir, cache=cache)[0].loss_history == [(1, 7.0)]


def test_list_runs_sees_an_owner_die_without_the_file_changing(tmp_path, monkeypatch):
    runs_dir = str(tmp_path / "runs")
    write_metrics(os.path.join(runs_dir, "a"), [started(pid=4242, time_=None), phase("running", 1)])
    alive = {"yes": True}
    monkeypatch.setattr(runs, "_owner_alive", lambda pid, since: alive["yes"])
    cache = {}
    assert list_runs(runs_dir, cache=cache)[0].state == "running"
    alive["yes"] = False
    assert list_runs(runs_dir, cache=cache)[0].state == "owner gone"


def test_list_runs_of_a_missing_dir_is_empty(tmp_path):
    assert list_runs(str(tmp_path / "nowhere")) == []


# -----------------------------------------------------------------------------
# checkpoints

def test_list_checkpoints_finds_runs_base_dir_and_nanochat(tmp_path, monkeypatch):
    runs_dir = str(tmp_path / "runs")
    base = os.environ["MLXCHAT_BASE_DIR"]
    nanochat = str(tmp_path / "nanochat")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", nanochat)

    run = os.path.join(runs_dir, "demo-sft-20261202-0441")
    write_metrics(run, [started(stage="sft"), finished("finished", 20)])
    write_checkpoint(run, 10)
    write_checkpoint(run, 20)
    write_metrics(os.path.join(runs_dir, "not-saved-yet"), [started()])
    copied = os.path.join(runs_dir, "from-nanochat")  # a nanochat checkpoint folder copied in by hand
    write_checkpoint(copied, 650, ext="pt")
    scripts_base = os.path.join(base, "base_checkpoints", "d4")
    write_checkpoint(scripts_base, 100)
    write_checkpoint(scripts_base, 200, meta=False)
    rl = os.path.join(base, "chatrl_checkpoints", "d4")
    write_checkpoint(rl, 30)
    theirs = os.path.join(nanochat, "chatsft_checkpoints", "d20")
    write_checkpoint(theirs, 700, ext="pt")

    ages = {run: 50, copied: 40, scripts_base: 30, rl: 20, theirs: 10}  # seconds ago
    for folder, age in ages.items():
        for name in os.listdir(folder):
            if name.startswith("meta_"):
                os.utime(os.path.join(folder, name), (T0 - age, T0 - age))

    found = list_checkpoints(runs_dir)
    got = [(c.path, c.step, c.stage, c.source) for c in found]
    assert got == [
        (theirs, 700, "sft", "nanochat"),
        (rl, 30, "rl", "base dir"),
        (scripts_base, 100, "base", "base dir"),  # step 200 has no meta: not complete
        (copied, 650, "nanochat", "runs"),
        (run, 20, "sft", "runs"),
    ]
    assert found[-1].label == "demo-sft-20261202-0441 · sft · step 20"
    assert found[0].label == "d20 · sft · step 700 · nanochat"
    assert found[-1].mtime == pytest.approx(T0 - 50)


def test_a_runs_dir_inside_the_base_dir_is_listed_once(tmp_path):
    runs_dir = os.path.join(os.environ["MLXCHAT_BASE_DIR"], "base_checkpoints")
    write_checkpoint(os.path.join(runs_dir, "d4"), 7)
    found = list_checkpoints(runs_dir)
    assert [(c.step, c.stage, c.source) for c in found] == [(7, "base", "runs")]


# -----------------------------------------------------------------------------
# names and places

def test_default_runs_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MLXCHAT_RUNS_DIR", raising=False)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert runs.default_runs_dir() == os.path.join(repo, "checkpoints")
    monkeypatch.setenv("MLXCHAT_RUNS_DIR", str(tmp_path / "mine"))
    assert runs.default_runs_dir() == str(tmp_path / "mine")


def test_new_run_name_is_readable_and_unique(tmp_path):
    now = time.mktime((2026, 12, 2, 4, 41, 0, 0, 0, -1))
    assert new_run_name("base", str(tmp_path), preset="demo", now=now) == "demo-base-20261202-0441"
    assert new_run_name("sft", str(tmp_path), now=now) == "sft-20261202-0441"
    assert new_run_name("base", str(tmp_path), preset="My Preset!", now=now) == "my-preset-base-20261202-0441"
    os.makedirs(tmp_path / "demo-base-20261202-0441")
    os.makedirs(tmp_path / "demo-base-20261202-0441-2")
    assert new_run_name("base", str(tmp_path), preset="demo", now=now) == "demo-base-20261202-0441-3"


def test_a_malformed_record_in_a_file_is_skipped(tmp_path):
    run = str(tmp_path / "r")
    write_metrics(run, [started(), {"event": "step", "step": 1}, step(2, 4.0), {"event": "eval", "metrics": None}])
    s = RunState.from_file(run)
    assert s.loss_history == [(2, 4.0)]
    with pytest.raises(KeyError):  # fed live, a bad event is a bug and says so
        RunState().apply({"event": "step", "step": 1})
