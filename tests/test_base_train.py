"""
Pretraining: the reference training run reproduced, the depth dial's derived hyperparameters,
exact resume, crash safety of checkpoints, and the tiny preset learning on the demo corpus.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxchat.checkpoint_manager import find_last_step, find_steps, load_torch_file
from mlxchat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.tokenizer import RustBPETokenizer
from mlxchat import pretrain, training
from mlxchat.hardware import memory_cap, over_cap_message
from mlxchat.pretrain import BaseTrainConfig, derive_hyperparameters
from mlxchat.training import ConfigError, Trainer
from scripts import base_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


@pytest.mark.parametrize("recompute", ["off", "on"])
def test_reproduces_reference_training_run(fixture_dir, cases, expected, recompute, monkeypatch):
    """From model_000000: the two fixture steps, then 60 steps on the fixture loader (B=4, T=256,
    no schedule), through the real Trainer (compiled forward/backward + MuonAdamW), with MLX's
    autodiff and with the memory-saving custom VJPs (gpt.recompute_backward; on by default here)."""
    monkeypatch.setenv("MLXCHAT_RECOMPUTE", recompute)
    # After 62 steps float rounding differences have grown, and how far depends on how closely our
    # backward's rounding follows torch's, not on accuracy: the custom norm backward (gpt.train_norm,
    # which works from the norm's output) is as accurate against a float64 gradient as autodiff's
    # (8e-7 median relative error per tensor, both), yet ends 3x further from the reference run.
    weight_tol, logit_tol = (2e-2, 5e-2) if recompute == "off" else (3e-2, 8e-2)
    model = GPT(GPTConfig(**cases["config"]))
    model.load_state_dict(load_torch_file(os.path.join(fixture_dir, "checkpoint", "model_000000.pt")))
    optimizer = model.setup_optimizer()
    optimizer.step(model, {k[len("grad/"):]: mx.array(expected[k]) for k in expected.files if k.startswith("grad/")})
    _, g2 = nn.value_and_grad(model, lambda x, y: model(x, y))(mx.array(expected["idx2"]), mx.array(expected["targets2"]))
    g2 = dict(tree_flatten(g2))
    optimizer.step(model, g2)
    # The reference harness did not zero the step-2 gradient before its 60-step loop, so its first
    # loop step used grad(idx2) + grad(batch 0); every later step zeroes as usual. (Found by
    # elimination: our optimizer matches an independent float64 implementation of the spec over
    # many steps, and the loader matches the fixture batches; with this quirk reproduced the losses
    # agree to 4e-5 relative, without it they drift by up to 60%.)
    leftover = {"g": g2}

    def add_leftover(grads):
        g = leftover.pop("g", None)
        grads = dict(tree_flatten(grads))
        return grads if g is None else {k: v + g[k] for k, v in grads.items()}

    trainer = Trainer(model, optimizer, 1, grad_reduce=add_leftover)
    tok = RustBPETokenizer.from_directory(os.path.join(fixture_dir, "tokenizer"))
    loader = tokenizing_distributed_data_loader_bos_bestfit(tok, 4, 256, "train", tokenizer_batch_size=8, buffer_size=32,
                                                            data_dir=os.path.join(fixture_dir, "base_data"))
    losses = [trainer.step(lambda: next(loader))[0] for _ in range(60)]
    ref = expected["train_losses"]
    rel = np.abs(np.array(losses) - ref) / ref
    assert rel.max() < 1e-2, f"step {rel.argmax()}: {losses[rel.argmax()]} vs {ref[rel.argmax()]}"
    # and the weights end close to the reference's model_000062
    ref62 = load_torch_file(os.path.join(fixture_dir, "checkpoint", "model_000062.pt"))
    for k, v in model.named_parameters().items():
        err = np.linalg.norm(np.array(v) - np.array(ref62[k])) / np.linalg.norm(np.array(ref62[k]))
        assert err < weight_tol, f"{k}: {err:.2e}"
    logits = np.array(model(mx.array(expected["idx"])))
    ref_logits = expected["trained_logits"]
    # the worst logit is off by 1% (autodiff) to 6% (custom VJPs) of the largest, the typical one far less
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < logit_tol
    mean_err = np.abs(logits - ref_logits).mean() / np.abs(ref_logits).mean()
    assert mean_err < 5e-3, mean_err


def derived(depth, **kw):
    config = BaseTrainConfig(depth=depth, **kw)
    return GPT(config.model_config(32768)), derive_hyperparameters(config, 32768)


def test_depth_dial_matches_nanochat_worked_examples():
    # nanochat-spec §3.2 worked examples (derived from the reference code)
    model, hp = derived(12)
    assert model.config.n_embd == 768 and model.config.n_head == 6
    assert hp["total_batch_size"] == 524288 and hp["num_iterations"] == 2520
    assert hp["batch_lr_scale"] == 1.0 and hp["wd_scaled"] == pytest.approx(0.28)
    model, hp = derived(24, target_param_data_ratio=8)
    assert hp["target_tokens"] == 5838484992
    assert hp["total_batch_size"] == 1048576 and hp["num_iterations"] == 5568
    assert hp["batch_lr_scale"] == pytest.approx(2 ** 0.5)
    assert hp["wd_scaled"] == pytest.approx(0.05974, abs=1e-5)
    model, hp = derived(20)
    assert hp["total_batch_size"] == 1048576 and hp["num_iterations"] == 4980
    assert hp["wd_scaled"] == pytest.approx(0.1002, abs=1e-4)
    # d25 nudges the width up to a multiple of the head dim
    assert GPTConfig.from_depth(25, 32768).n_embd == 1664


def _prepare_base_dir(fixture_dir, base):
    tok_dir = os.path.join(base, "tokenizer")
    os.makedirs(tok_dir)
    for f in ("tokenizer.pkl", "token_bytes.pt"):
        shutil.copy(os.path.join(fixture_dir, "tokenizer", f), tok_dir)


TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "SL",
        "--device-batch-size", "2", "--total-batch-size", "256", "--eval-every", "-1", "--sample-every", "-1",
        "--log-every", "100"]


def test_resume_continues_exactly(fixture_dir, tmp_path, monkeypatch, capsys):
    base = str(tmp_path / "base")
    _prepare_base_dir(fixture_dir, base)
    monkeypatch.setenv("MLXCHAT_BASE_DIR", base)
    common = TINY + ["--num-iterations", "20", "--data-dir", os.path.join(fixture_dir, "base_data")]
    straight = base_train.main(common + ["--save-every", "10", "--model-tag", "straight"])
    assert [s for s, _ in straight["losses"]] == list(range(1, 21))
    first = base_train.main(common + ["--save-every", "10", "--model-tag", "resumed", "--num-iterations", "20"])
    # throw away everything after step 10 and continue from its checkpoint
    ckpt = first["checkpoint_dir"]
    for f in os.listdir(ckpt):
        if "000020" in f:
            os.unlink(os.path.join(ckpt, f))
    assert find_last_step(ckpt) == 10
    capsys.readouterr()
    # resumed under a 1-byte memory limit: the same numbers (the cap only changes when ops are queued),
    # and the over-cap warning comes three steps into this run, not at absolute step 3
    resumed = base_train.main(common + ["--model-tag", "resumed", "--resume-from-step", "10", "--memory-limit", "1e-9"])
    assert "WARNING: a step needs" in capsys.readouterr().out
    assert [s for s, _ in resumed["losses"]] == list(range(11, 21))
    a = dict(straight["losses"])
    for s, loss in resumed["losses"]:
        assert abs(loss - a[s]) < 1e-5, (s, loss, a[s])
    from mlxchat.checkpoint_manager import load_checkpoint
    wa = load_checkpoint(straight["checkpoint_dir"], 20)[0]
    wb = load_checkpoint(ckpt, 20)[0]
    for k in wa:
        assert np.array_equal(np.array(wa[k]), np.array(wb[k])), k


def test_kill_during_checkpoint_save_keeps_previous(fixture_dir, tmp_path):
    base = str(tmp_path / "base")
    _prepare_base_dir(fixture_dir, base)
    env = dict(os.environ, MLXCHAT_BASE_DIR=base, MLXCHAT_DTYPE="float32", MLXCHAT_TEST_PAUSE_IN_SAVE="10",
               PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "scripts.base_train"] + TINY + [
        "--num-iterations", "15", "--save-every", "5", "--model-tag", "crash",
        "--data-dir", os.path.join(fixture_dir, "base_data")]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt = os.path.join(base, "base_checkpoints", "crash")
    marker = os.path.join(ckpt, "paused_in_save_000010")
    try:
        deadline = time.time() + 240
        while not os.path.exists(marker):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "training never reached the step-10 save"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # mid-save: model and optimizer written, meta not yet
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.exists(os.path.join(ckpt, "model_000010.safetensors"))
    assert find_steps(ckpt) == [5], "a step without its meta must not count as saved"
    # the next start resumes from the previous checkpoint and finishes the run
    env.pop("MLXCHAT_TEST_PAUSE_IN_SAVE")
    out = subprocess.run(args + ["--resume-from-step", "-2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming from" in out.stdout and "step 5" in out.stdout
    assert find_last_step(ckpt) == 15


def test_tiny_preset_learns_on_demo_corpus(tmp_path, monkeypatch):
    """The shipped demo corpus, a tokenizer trained on it, a tiny model: val bpb falls at every eval."""
    base = str(tmp_path / "base")
    monkeypatch.setenv("MLXCHAT_BASE_DIR", base)
    from scripts import tok_train
    tok_train.main(["--vocab-size", "512", "--data-dir", "demo", "--max-chars", "2000000"])
    result = base_train.main(TINY[:-6] + ["--device-batch-size", "8", "--total-batch-size", "512",
                                          "--num-iterations", "60", "--eval-every", "15", "--eval-tokens", "4096",
                                          "--sample-every", "-1", "--data-dir", "demo", "--log-every", "100",
                                          "--model-tag", "tiny"])
    bpbs = result["val_bpb_history"]
    assert [s for s, _ in bpbs] == [0, 15, 30, 45, 60]
    values = [v for _, v in bpbs]
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.95 * values[0]


def test_device_batch_size_auto_fits_the_budget(fixture_dir, tmp_path, monkeypatch):
    """--device-batch-size auto measures two tiny steps, predicts the rest and verifies its pick."""
    base = str(tmp_path / "base")
    _prepare_base_dir(fixture_dir, base)
    monkeypatch.setenv("MLXCHAT_BASE_DIR", base)
    cfg = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    make_opt = lambda m: m.setup_optimizer()
    p1 = training.measure_peak_memory(lambda: GPT(cfg), make_opt, 1, 64, 512, False)
    p8 = training.measure_peak_memory(lambda: GPT(cfg), make_opt, 8, 64, 512, False)
    assert p8 > p1  # activations grow with the micro-batch
    budget = p1 + (p8 - p1) * 3 // 7 * 1.5  # room for ~4 rows, not 8
    B, fixed, per_row = training.auto_device_batch_size(lambda: GPT(cfg), make_opt, 64, 512, budget, False, 64 * 64)
    assert 1 <= B < 8 and B & (B - 1) == 0
    assert training.measure_peak_memory(lambda: GPT(cfg), make_opt, B, 64, 512, False) <= budget
    # a budget below one row is refused with advice, not a crash later
    with pytest.raises(ConfigError, match="--grad-checkpoint"):
        training.auto_device_batch_size(lambda: GPT(cfg), make_opt, 64, 512, p1 // 4, False, 64 * 64)
    # the whole script picks and reports it, trains under the budget as MLX's memory limit, and puts the
    # previous limit back
    before = mx.get_memory_limit()
    result = base_train.main(TINY + ["--num-iterations", "2", "--device-batch-size", "auto", "--memory-limit",
                                     str(budget / 2 ** 30), "--total-batch-size", "512",
                                     "--data-dir", os.path.join(fixture_dir, "base_data")])
    assert result["step"] == 2
    assert mx.get_memory_limit() == before


def test_memory_limit_caps_the_ops_queued_ahead(capsys):
    """MLX allocates an op's outputs when the op is queued and frees a buffer once its last reader has run,
    and the host queues ops ahead of the device: back-to-back steps peak above the memory the step itself
    keeps live. Under memory_cap (base_train --memory-limit) the peak stays near the cap, and a cap below
    the live memory is reported with its fixes."""
    cfg = GPTConfig(sequence_len=128, vocab_size=512, n_layer=4, n_head=2, n_kv_head=1, n_embd=128, window_pattern="SL")
    mx.random.seed(0)
    model = GPT(cfg)
    trainer = Trainer(model, model.setup_optimizer(), 1)
    x = mx.random.randint(0, 512, (8, 129))
    batch = (x[:, :-1], x[:, 1:])

    def peak_of_steps(cap_gib, steps=3):
        with memory_cap(cap_gib):
            trainer.step(lambda: batch)
            mx.synchronize()
            mx.reset_peak_memory()
            for _ in range(steps):
                trainer.step(lambda: batch)
            mx.synchronize()
            return mx.get_peak_memory() / 2 ** 30, over_cap_message(cap_gib)

    before = mx.get_memory_limit()
    free, warned = peak_of_steps(None)
    assert warned is None and mx.get_memory_limit() == before
    # a 1-byte cap: every op waits for the one before it, nothing is queued ahead: the live memory
    live, warned = peak_of_steps(2 ** -30, steps=2)
    assert warned.startswith("a step needs") and "--grad-checkpoint 1" in warned
    assert mx.get_memory_limit() == before
    assert free > 1.15 * live, (free, live)  # measured 60.8 vs 44.9 MiB (CPU, 2 cores)
    cap = (free + live) / 2
    capped, warned = peak_of_steps(cap)
    assert warned is None
    assert capped < free and capped <= 1.05 * cap, (capped, cap, free)  # measured 54.4 MiB under a 52.8 MiB cap
    assert mx.get_memory_limit() == before


def test_the_automatic_memory_limit_is_measured_on_the_first_step(monkeypatch):
    """Without a cap of its own, a Trainer(auto_memory_limit=True) runs its first step throttled (its peak
    is then the step's live memory) and caps MLX at auto_memory_limit() of that: later steps peak near
    the live memory instead of holding everything queued ahead. The numbers are the same as unthrottled;
    memory_cap's block puts MLX's limit back at its end."""
    monkeypatch.setattr(training, "AUTO_MEMORY_HEADROOM", 0)  # the headroom would dwarf this tiny model's step
    cfg = GPTConfig(sequence_len=128, vocab_size=512, n_layer=4, n_head=2, n_kv_head=1, n_embd=128, window_pattern="SL")
    x = mx.random.randint(0, 512, (8, 129), key=mx.random.key(3))
    batch = (x[:, :-1], x[:, 1:])

    def run(auto, steps=4):
        mx.random.seed(0)
        model = GPT(cfg)
        trainer = Trainer(model, model.setup_optimizer(), 1, auto_memory_limit=auto)
        with memory_cap(None):
            losses = [trainer.step(lambda: batch)[0]]
            mx.synchronize()
            limit = mx.get_memory_limit()
            mx.reset_peak_memory()
            losses += [trainer.step(lambda: batch)[0] for _ in range(steps - 1)]
            mx.synchronize()
            return losses, mx.get_peak_memory(), limit, trainer.live_bytes

    before = mx.get_memory_limit()
    free_losses, free_peak, free_limit, no_live = run(False)
    assert no_live is None and free_limit == before
    losses, peak, limit, live = run(True)
    assert mx.get_memory_limit() == before  # put back at the end of the block
    assert losses == free_losses  # throttling changes the schedule, not the numbers
    assert limit == training.auto_memory_limit(live) < before
    assert live < free_peak and peak < free_peak, (live, peak, free_peak)  # measured 42 / 46 vs 58 MiB (CPU)
    assert peak <= 1.1 * limit, (peak, limit)  # checked between ops: one op may pass it (measured 1.05x)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = GPTConfig(sequence_len=64, vocab_size=128, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")
    mx.random.seed(0)
    model = GPT(cfg)
    x = mx.random.randint(0, 128, (2, 64))
    loss_and_grad = nn.value_and_grad(model, lambda a, b: model(a, b))
    loss_a, g_a = loss_and_grad(x, x)
    model.grad_checkpoint = True
    loss_b, g_b = loss_and_grad(x, x)
    assert loss_a.item() == loss_b.item()
    for (k, a), (_, b) in zip(tree_flatten(g_a), tree_flatten(g_b)):
        assert np.allclose(np.array(a), np.array(b), atol=1e-6), k


def test_ctrl_c_saves_a_checkpoint_and_exits(fixture_dir, tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    _prepare_base_dir(fixture_dir, base)
    monkeypatch.setenv("MLXCHAT_BASE_DIR", base)
    real = pretrain.get_muon_momentum

    def momentum_then_interrupt(it, *a, **kw):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C was pressed during step 4
        return real(it, *a, **kw)
    monkeypatch.setattr(pretrain, "get_muon_momentum", momentum_then_interrupt)
    result = base_train.main(TINY + ["--num-iterations", "50", "--model-tag", "ctrlc",
                                     "--data-dir", os.path.join(fixture_dir, "base_data")])
    assert result["step"] == 4 and result["status"] == "stopped"
    assert result["exit_status"] == 130  # a `set -e` pipeline must not go on with a half-trained model
    assert find_steps(result["checkpoint_dir"]) == [4]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
