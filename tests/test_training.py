"""
Training as a library (mlxchat.training, mlxchat.pretrain, mlxchat.sft, mlxchat.rl): a run iterated on
a background thread and the order and content of its events; pause, resume, save-now and stop sent
from another thread, each taking effect at a step boundary; an exact resume after a stop; the same
losses through the library object and through the script; metrics.jsonl and its follower; bad input
refused before anything is allocated, as one clean line from the scripts; Ctrl-C's exit status.
"""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import mlx.core as mx
import pytest

from mlxchat import pretrain
from mlxchat.pretrain import BaseTrainConfig, BaseTrainRun
from mlxchat.rl import RLConfig, RLRun
from mlxchat.sft import SFTConfig, SFTRun
from mlxchat.training import (ConfigError, MetricsFollower, RunControl, TrainingError, read_metrics, run_in_thread)
from scripts import base_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="SL", device_batch_size=2,
            total_batch_size=256, eval_every=-1, sample_every=-1)
TINY_ARGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "SL",
             "--device-batch-size", "2", "--total-batch-size", "256", "--eval-every", "-1", "--sample-every", "-1"]


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


class Recorder:
    """Collects a run's events (on the run's thread) and lets the test thread wait for one."""

    def __init__(self):
        self.events = []
        self.queue = queue.Queue()
        self.on = None  # optional callback, on the run's thread

    def __call__(self, event):
        # only plain data crosses the thread: it must survive JSON
        json.dumps(event.to_dict())
        self.events.append(event)
        self.queue.put(event)
        if self.on is not None:
            self.on(event)

    def wait_for(self, predicate, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                event = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if predicate(event):
                return event
        raise AssertionError(f"no such event within {timeout}s; last: {[e.to_dict() for e in self.events[-5:]]}")


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


def test_a_run_iterated_on_a_background_thread(base, monkeypatch):
    """The whole tiny run on a thread of its own: the events come in order and say what happened, and
    metrics.jsonl holds the same events for another process to read."""
    monkeypatch.setattr(pretrain, "auto_memory_limit_wanted", lambda: True)  # CUDA's default, here on the CPU
    config = BaseTrainConfig(**dict(TINY, eval_every=4, eval_tokens=512, sample_every=8), num_iterations=8,
                             data_dir=base, model_tag="thread")
    run, rec = BaseTrainRun(config), Recorder()
    thread = run_in_thread(run, rec)
    thread.join(timeout=300)
    assert not thread.is_alive() and thread.error is None, thread.error
    events = rec.events
    assert events[0].kind == "phase" and events[0].name == "loading"
    started = kinds(events, "started")
    assert len(started) == 1 and events.index(started[0]) < events.index(kinds(events, "step")[0])
    s = started[0]
    assert s.stage == "base" and s.total_steps == 8 and s.tokens_per_step == 256 and s.start_step == 0
    assert s.config["grad_accum_steps"] == 2 and s.config["model_config"]["n_embd"] == 64 and s.num_params > 0
    assert s.flops_per_token > 0 and s.run_dir == run.run_dir
    steps = kinds(events, "step")
    assert [e.step for e in steps] == list(range(1, 9))
    assert all(e.total == 8 and e.loss > 0 and e.tok_per_sec > 0 and e.peak_gib > 0 for e in steps)
    assert steps[-1].progress == 1.0 and steps[-1].eta == 0
    phases = [e.name for e in kinds(events, "phase")]
    for name in ("loading", "tokenizing", "compiling", "running", "evaluating", "sampling", "saving"):
        assert name in phases, (name, phases)
    assert [e.step for e in kinds(events, "eval")] == [0, 4, 8]
    assert all(0 < e.metrics["val_bpb"] < 20 for e in kinds(events, "eval"))
    samples = kinds(events, "samples")
    assert [e.step for e in samples] == [8] and len(samples[0].samples) == 7
    assert samples[0].samples[0][0] == "The capital of France is" and isinstance(samples[0].samples[0][1], str)
    assert [e.step for e in kinds(events, "saved")] == [8]
    assert events[-1].kind == "finished" and events[-1].status == "finished" and events[-1].step == 8
    assert run.result["step"] == 8 and [st for st, _ in run.result["losses"]] == list(range(1, 9))
    # no --memory-limit: the first step measured the live memory and the run says where MLX is capped
    memory = [e.text for e in kinds(events, "log") if e.text.startswith("memory: a step holds")]
    assert len(memory) == 1 and "GiB" in memory[0] and "--memory-limit" in memory[0], memory
    # the same events on disk, in order (and a heartbeat wherever 10 s passed without one: a loaded machine)
    records = [r for r in read_metrics(os.path.join(run.run_dir, "metrics.jsonl")) if r["event"] != "heartbeat"]
    assert [r["event"] for r in records] == [e.kind for e in events]
    assert [r["loss"] for r in records if r["event"] == "step"] == [e.loss for e in steps]


def test_a_run_refuses_to_continue_on_another_thread(base):
    run = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=2, data_dir=base, model_tag="moved"))
    events = iter(run)
    first = next(events)
    assert first.kind == "phase"
    box = {}

    def other():
        try:
            while True:
                next(events)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
        finally:
            mx.clear_streams()
    t = threading.Thread(target=other)
    t.start()
    t.join(60)
    assert isinstance(box.get("error"), TrainingError) and "thread" in str(box["error"])


def test_pause_resume_save_and_stop_from_another_thread(base):
    config = BaseTrainConfig(**TINY, num_iterations=200, data_dir=base, model_tag="steered")
    control = RunControl()
    run, rec = BaseTrainRun(config, control=control), Recorder()
    thread = run_in_thread(run, rec)
    rec.wait_for(lambda e: e.kind == "step" and e.step == 2)
    control.pause()
    ack = rec.wait_for(lambda e: e.kind == "ack")
    assert ack.command == "pause"
    rec.wait_for(lambda e: e.kind == "phase" and e.name == "paused")
    last = kinds(rec.events, "step")[-1].step
    assert ack.step == last  # taken at the boundary after the last step, never inside one
    time.sleep(1.0)
    assert kinds(rec.events, "step")[-1].step == last, "steps went on while paused"
    control.save_now()  # works while paused
    assert rec.wait_for(lambda e: e.kind == "ack").command == "save"
    saved = rec.wait_for(lambda e: e.kind == "saved")
    assert saved.step == last and os.path.exists(os.path.join(run.run_dir, f"model_{last:06d}.safetensors"))
    control.resume()
    assert rec.wait_for(lambda e: e.kind == "ack").command == "resume"
    rec.wait_for(lambda e: e.kind == "step" and e.step == last + 2)
    control.save_now()
    save_ack = rec.wait_for(lambda e: e.kind == "ack")
    assert save_ack.command == "save"
    assert rec.wait_for(lambda e: e.kind == "saved").step == save_ack.step
    control.stop()
    stop_ack = rec.wait_for(lambda e: e.kind == "ack")
    assert stop_ack.command == "stop"
    final_save = rec.wait_for(lambda e: e.kind == "saved")
    finished = rec.wait_for(lambda e: e.kind == "finished")
    thread.join(60)
    assert not thread.is_alive() and thread.error is None
    assert finished.status == "stopped" and final_save.step == stop_ack.step == finished.step
    assert kinds(rec.events, "step")[-1].step == finished.step < 200
    assert run.result["status"] == "stopped"


def test_a_stop_while_paused_is_acknowledged_once_and_saves(base):
    control = RunControl()
    run, rec = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=200, data_dir=base, model_tag="paused-stop"),
                            control=control), Recorder()
    thread = run_in_thread(run, rec)
    rec.wait_for(lambda e: e.kind == "step" and e.step == 1)
    control.pause()
    rec.wait_for(lambda e: e.kind == "phase" and e.name == "paused")
    control.stop()
    finished = rec.wait_for(lambda e: e.kind == "finished")
    thread.join(60)
    assert thread.error is None and finished.status == "stopped"
    assert [e.command for e in kinds(rec.events, "ack")] == ["pause", "stop"]
    assert [e.step for e in kinds(rec.events, "saved")] == [finished.step] == [kinds(rec.events, "step")[-1].step]


def test_live_weights_are_handed_over_between_steps(base):
    """request_weights: the callback runs on the training thread at a step boundary with the weights of
    that step, evaluated, which another thread can use while training goes on (the dashboard's chat)."""
    import numpy as np
    from mlx.utils import tree_flatten
    from mlxchat.checkpoint_manager import build_model
    from mlxchat.gpt import GPT, GPTConfig
    control = RunControl()
    run, rec = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=200, data_dir=base, model_tag="live"),
                            control=control), Recorder()
    thread = run_in_thread(run, rec)
    rec.wait_for(lambda e: e.kind == "step" and e.step == 2)
    control.pause()
    rec.wait_for(lambda e: e.kind == "phase" and e.name == "paused")
    got = queue.Queue()
    control.request_weights(lambda snap: got.put((snap, threading.current_thread().name)))
    snapshot, on_thread = got.get(timeout=30)  # served while paused, without a resume
    assert on_thread == thread.name
    control.save_now()
    saved = rec.wait_for(lambda e: e.kind == "saved")
    assert snapshot.step == saved.step and snapshot.stage == "base" and snapshot.run_dir == run.run_dir
    assert os.path.exists(os.path.join(snapshot.tokenizer_dir, "tokenizer.pkl"))
    control.resume()
    rec.wait_for(lambda e: e.kind == "step" and e.step == saved.step + 3)  # training goes on
    # the snapshot kept the weights of its step: a model built from it on this thread equals the checkpoint
    model = GPT(GPTConfig(**snapshot.model_config))
    model.load_state_dict(snapshot.weights)
    reference, _, _ = build_model(run.run_dir, saved.step)
    theirs = dict(tree_flatten(reference.parameters()))
    for name, value in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(theirs[name]), err_msg=name)
    control.stop()
    thread.join(60)
    assert thread.error is None


def test_a_hold_keeps_the_run_at_a_step_boundary_until_released_or_a_command(base):
    """RunControl.hold (the dashboard's chat while a reply streams): no step is taken while held, none is
    acknowledged, training goes on when released, and a command ends the hold at once."""
    control = RunControl()
    run, rec = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=200, data_dir=base, model_tag="held"),
                            control=control), Recorder()
    thread = run_in_thread(run, rec)
    rec.wait_for(lambda e: e.kind == "step" and e.step == 2)
    control.hold(True)
    time.sleep(1.0)
    held_at = kinds(rec.events, "step")[-1].step
    time.sleep(1.0)
    assert kinds(rec.events, "step")[-1].step == held_at and not kinds(rec.events, "ack")
    control.hold(False)
    rec.wait_for(lambda e: e.kind == "step" and e.step == held_at + 2)
    control.hold(True)
    time.sleep(0.5)
    control.stop()  # a command while held: taken at once
    finished = rec.wait_for(lambda e: e.kind == "finished", timeout=60)
    assert finished.status == "stopped"
    thread.join(60)
    assert thread.error is None


def test_a_stopped_run_resumes_exactly(base):
    """Stopped by a command after step 5, resumed from that checkpoint with a new run object: steps 6..12
    give exactly the losses of an uninterrupted run (CPU backend)."""
    straight = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=12, data_dir=base, model_tag="straight")).run()
    control = RunControl()
    first = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=12, data_dir=base, model_tag="stopped"), control=control)
    first.run(lambda e: control.stop() if e.kind == "step" and e.step == 4 else None)
    assert first.result["status"] == "stopped" and first.result["step"] == 5
    resumed = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=12, data_dir=base, model_tag="stopped",
                                           resume_from_step=-2)).run()
    assert [s for s, _ in resumed["losses"]] == list(range(6, 13))
    expected = dict(straight["losses"])
    assert [loss for _, loss in resumed["losses"]] == [expected[s] for s in range(6, 13)]


def test_library_and_script_give_the_same_losses(base):
    via_library = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=6, data_dir=base, model_tag="lib")).run()
    via_script = base_train.main(TINY_ARGS + ["--num-iterations", "6", "--data-dir", base, "--model-tag", "cli"])
    assert via_script["losses"] == via_library["losses"] and len(via_library["losses"]) == 6


def test_sft_and_rl_run_from_the_library_on_a_thread(base):
    """Base -> SFT -> RL, each iterated on a background thread; every stage writes its metrics.jsonl."""
    base_run = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=2, data_dir=base, model_tag="d2"))
    thread = run_in_thread(base_run, Recorder())
    thread.join(300)
    assert thread.error is None
    sft_rec = Recorder()
    sft = SFTRun(SFTConfig(mixture="demo", max_seq_len=64, device_batch_size=2, total_batch_size=128, num_iterations=3,
                           eval_every=-1, eval_tokens=256, model_tag="d2"))
    thread = run_in_thread(sft, sft_rec)
    thread.join(300)
    assert thread.error is None, thread.error
    assert [e.step for e in kinds(sft_rec.events, "step")] == [1, 2, 3]
    assert [e.step for e in kinds(sft_rec.events, "eval")] == [0, 3]
    assert kinds(sft_rec.events, "started")[0].stage == "sft"
    assert sft_rec.events[-1].kind == "finished" and sft_rec.events[-1].status == "finished"
    assert [r["step"] for r in read_metrics(os.path.join(sft.run_dir, "metrics.jsonl")) if r["event"] == "step"] == [1, 2, 3]
    rl_rec = Recorder()
    rl = RLRun(RLConfig(task="toy", device_batch_size=2, num_samples=2, examples_per_step=1, max_new_tokens=4,
                        num_steps=2, eval_every=-1, model_tag="d2"))
    thread = run_in_thread(rl, rl_rec)
    thread.join(300)
    assert thread.error is None, thread.error
    steps = kinds(rl_rec.events, "step")
    assert [e.step for e in steps] == [1, 2] and all("reward" in e.extra for e in steps)
    assert rl_rec.events[-1].kind == "finished" and os.path.exists(os.path.join(rl.run_dir, "metrics.jsonl"))


def test_a_failure_ends_with_a_failed_event_and_a_typed_error(base, tmp_path):
    run, rec = BaseTrainRun(BaseTrainConfig(**TINY, num_iterations=2, data_dir=base, resume_from_step=7,
                                            model_tag="nothing-here")), Recorder()
    with pytest.raises(TrainingError, match="nothing-here"):
        run.run(rec)
    assert rec.events[-1].kind == "finished" and rec.events[-1].status == "failed" and "nothing-here" in rec.events[-1].error


# -----------------------------------------------------------------------------
# metrics.jsonl followed by another reader

def test_follower_keeps_a_torn_last_line_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(str(path))
    assert follower.poll() == []  # no file yet
    path.write_text('{"event": "step", "step": 1}\n{"event": "st')
    assert follower.poll() == [{"event": "step", "step": 1}]
    assert follower.poll() == []  # the torn line is not a record (yet)
    with open(path, "a") as f:
        f.write('ep", "step": 2}\nnot json\n')
    assert follower.poll() == [{"event": "step", "step": 2}]
    assert read_metrics(str(path)) == [{"event": "step", "step": 1}, {"event": "step", "step": 2}]


def test_follower_reads_a_file_while_it_is_appended_to(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    n = 3000

    def writer():
        with open(path, "a") as f:
            for i in range(n):
                line = json.dumps({"event": "step", "step": i, "pad": "x" * (i % 97)}) + "\n"
                cut = i % len(line)  # every record is written in two pieces, so reads see torn lines
                f.write(line[:cut])
                f.flush()
                f.write(line[cut:])
                f.flush()
    open(path, "w").close()
    follower = MetricsFollower(path)
    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while t.is_alive():
        seen += follower.poll()
    t.join()
    seen += follower.poll()
    assert [r["step"] for r in seen] == list(range(n))


# -----------------------------------------------------------------------------
# bad input: refused before anything is allocated, with the same words from the library and the scripts

@pytest.mark.parametrize("changes, words", [
    (dict(max_seq_len=0), "--max-seq-len must be > 0"),
    (dict(window_pattern="X"), "--window-pattern must be letters S"),
    (dict(eval_every=0), "--eval-every must be a positive number of steps or -1"),
    (dict(device_batch_size=3, total_batch_size=1000), "not a multiple of device batch 3"),
    (dict(depth=0), "--depth must be > 0"),
    (dict(data_dir="/no/such/folder"), "no such folder"),
])
def test_bad_configs_are_refused_with_the_reason(changes, words):
    with pytest.raises(ConfigError, match=words):
        BaseTrainRun(BaseTrainConfig(**changes))


def test_bad_sft_and_rl_configs_are_refused():
    with pytest.raises(ConfigError, match="--mixture must be nanochat, demo or an existing"):
        SFTRun(SFTConfig(mixture="missing.jsonl"))
    with pytest.raises(ConfigError, match="multiple of --device-batch-size"):
        RLRun(RLConfig(num_samples=6, device_batch_size=4))


def test_a_model_too_large_for_the_machine_is_refused_before_allocating(base):
    mx.reset_peak_memory()  # (to 0: the peak then counts what earlier tests left alive too)
    before = mx.get_active_memory()
    run = BaseTrainRun(BaseTrainConfig(depth=1000, data_dir=base))
    with pytest.raises(TrainingError, match=r"needs at least [\d.]+ GiB .* more than the [\d.]+ GiB this machine has"):
        run.run()
    assert mx.get_peak_memory() - before < 2 ** 20  # the tokenizer's token bytes, no model


def _script(args, env_extra=None, **kw):
    env = dict(os.environ, MLXCHAT_DTYPE="float32", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("args, words", [
    (["scripts.base_train", "--max-seq-len", "0"], "--max-seq-len must be > 0"),
    (["scripts.base_train", "--window-pattern", "X"], "--window-pattern must be letters S"),
    (["scripts.base_train", "--depth", "1000"], "GiB this machine has"),
    (["scripts.chat_sft", "--mixture", "nope.jsonl"], "--mixture must be"),
    (["scripts.chat_rl", "--num-samples", "6", "--device-batch-size", "4"], "multiple of --device-batch-size"),
])
def test_scripts_print_one_clean_line_and_fail(base, args, words):
    out = _script(args)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and words in out.stderr
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_corrupt_shard_is_named(base, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(base, data)
    first = sorted(p for p in os.listdir(data) if p.endswith(".parquet"))[0]
    (data / first).write_bytes(b"not a parquet file at all")
    out = _script(["scripts.base_train"] + TINY_ARGS + ["--num-iterations", "2", "--data-dir", str(data)])
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert first in out.stderr, out.stderr


def test_ctrl_c_exits_130_after_saving_and_twice_aborts(base):
    from mlxchat.checkpoint_manager import find_steps
    from mlxchat.common import get_base_dir
    args = [sys.executable, "-m", "scripts.base_train"] + TINY_ARGS + ["--num-iterations", "100000", "--data-dir", base,
                                                                       "--model-tag", "int", "--log-every", "1"]
    env = dict(os.environ, MLXCHAT_DTYPE="float32", PYTHONUNBUFFERED="1")

    def start_and_wait_for_step():
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("step 00002/"):
                return proc
        raise AssertionError(proc.stderr.read())

    proc = start_and_wait_for_step()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "saved checkpoint step" in out and "Traceback" not in err
    steps = find_steps(os.path.join(get_base_dir(), "base_checkpoints", "int"))
    assert len(steps) == 1 and steps[0] >= 2
    # two presses: the second aborts at once, without a traceback, still 130
    proc = start_and_wait_for_step()
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
