"""
Data-parallel pretraining across processes (mx.distributed, ring backend over 127.0.0.1), on the
parity fixture's shards and a tiny model:
  - 2 processes x (2 micro-batches each) == 1 process x 4 micro-batches over the same data: same
    losses, same weights; both ranks hold identical weights; every rank writes its optimizer file
  - a 2-process run resumed from its checkpoint continues exactly like the uninterrupted one
  - a rank that dies, hangs or never joins ends the other with a clear message, never a hang
Each scenario starts real processes (mlx.launch, or MLX_RANK + MLX_HOSTFILE by hand), so the
collectives, the launcher and the failure paths are the real ones.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mlxchat.checkpoint_manager import find_steps, load_checkpoint
from conftest import free_port_pair
from scripts import base_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLX_LAUNCH = os.path.join(os.path.dirname(sys.executable), "mlx.launch")

# depth 2, T=64, B=2: 2 ranks x 1 micro-batch x 128 tokens = 1 process x 2 micro-batches = 256 tokens per step
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "SL",
        "--device-batch-size", "2", "--total-batch-size", "256", "--eval-every", "-1", "--sample-every", "-1",
        "--log-every", "1", "--dist-timeout", "60"]

# Runs scripts.<script>.main in one rank and dumps what the tests compare: the per-step losses (and
# val bpb) and the final weights of THIS rank (rank 0 alone writes the model file).
# argv: out_dir, script, a base dir of rank 1's own ("-": rank 0's, as on one machine), the script's args.
RUNNER = r'''
import importlib, json, os, sys
out_dir, script, rank1_base = sys.argv[1:4]
if rank1_base != "-" and os.environ.get("MLX_RANK") == "1":
    os.environ["MLXCHAT_BASE_DIR"] = rank1_base  # before mlxchat is imported
import mlxchat  # noqa: F401
import numpy as np
from mlxchat import pretrain, sft, training

trainers = []

class RecordingTrainer(training.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trainers.append(self)

pretrain.Trainer = sft.Trainer = RecordingTrainer

stop_at = int(os.environ.get("MLXCHAT_TEST_STOP_AT", "0"))
if stop_at:  # a stop sent to rank 0 alone (as the dashboard or a Ctrl-C on one Mac would), after step stop_at
    class StoppedOnRank0(pretrain.BaseTrainRun):
        def _run(self):
            for event in super()._run():
                if event.kind == "step" and event.step == stop_at and self.rank == 0:
                    self.control.stop()
                yield event
    pretrain.BaseTrainRun = StoppedOnRank0
result = importlib.import_module(f"scripts.{script}").main(sys.argv[4:])
r = result["rank"]
with open(f"{out_dir}/result_rank{r}.json", "w") as f:
    json.dump({k: result[k] for k in ("losses", "mean_losses", "rank", "world_size", "step", "val_bpb") if k in result}, f)
np.savez(f"{out_dir}/weights_rank{r}.npz", **{k: np.array(v) for k, v in trainers[-1].model.named_parameters().items()})
'''



def _env(base):
    env = dict(os.environ, MLXCHAT_BASE_DIR=base, MLXCHAT_DTYPE="float32", PYTHONUNBUFFERED="1")
    for k in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        env.pop(k, None)
    return env


def _prepare_base_dir(fixture_dir, base):
    tok_dir = os.path.join(base, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    for f in ("tokenizer.pkl", "token_bytes.pt"):
        shutil.copy(os.path.join(fixture_dir, "tokenizer", f), tok_dir)


def _launch_2(base, out_dir, args, timeout=240, script="base_train", rank1_base="-"):
    """2 ranks of the runner through mlx.launch (ring backend, 127.0.0.1): what a user runs."""
    os.makedirs(out_dir, exist_ok=True)
    runner = os.path.join(out_dir, "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    cmd = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), "--",
           sys.executable, runner, out_dir, script, rank1_base] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(base), capture_output=True, text=True, timeout=timeout)
    # mlx.launch exits 0 even when a rank fails: it only warns "Node with rank r exited with code c"
    assert proc.returncode == 0 and "Node with rank" not in proc.stderr, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = []
    for r in range(2):
        with open(os.path.join(out_dir, f"result_rank{r}.json")) as f:
            res = json.load(f)
        res["weights"] = dict(np.load(os.path.join(out_dir, f"weights_rank{r}.npz")))
        results.append(res)
    return results, proc.stdout


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, fixture_dir):
    """10 steps on 2 ranks, checkpoints at steps 5 and 10 (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("dist")
    base = str(tmp / "base")
    _prepare_base_dir(fixture_dir, base)
    data = os.path.join(fixture_dir, "base_data")
    args = TINY + ["--num-iterations", "10", "--save-every", "5", "--model-tag", "dp", "--data-dir", data]
    t0 = time.time()
    results, stdout = _launch_2(base, str(tmp / "out_straight"), args)
    return dict(base=base, data=data, args=args, results=results, stdout=stdout, tmp=tmp,
                seconds=time.time() - t0, ckpt=os.path.join(base, "base_checkpoints", "dp"))


def test_two_ranks_match_one_process_with_twice_the_accumulation(two_rank_run, monkeypatch):
    """Equivalence. With 2 ranks, rank r reads row groups r, r+2, ... and takes one micro-batch per
    step (256 tokens / (2 x 64 x 2 ranks)); the gradient is the mean of the two ranks' gradients. One
    process with 2 accumulation steps whose micro-batches alternate rank 0's and rank 1's loader
    (r0, r1 per step) averages the same two gradients: g0/2 + g1/2 there, (g0 + g1)/2 here, which
    are the same floats (halving is exact), so schedules, updates, losses and weights agree exactly.
    The logged mean loss is the mean over the same micro-batches (the average of the ranks' means).
    (With more micro-batches per rank the sums associate differently and only agree to rounding;
    a scalar with a near-zero gradient, e.g. backout_lambda, then shows Adam amplifying that rounding.)"""
    r0, r1 = two_rank_run["results"]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert "total batch 256 tokens = 2 x 64 x 1 accumulation steps x 2 processes" in two_rank_run["stdout"]
    # both ranks log the same (rank-averaged) losses and hold bit-identical weights
    assert r0["losses"] == r1["losses"] and r0["mean_losses"] == r1["mean_losses"]
    for k in r0["weights"]:
        assert np.array_equal(r0["weights"][k], r1["weights"][k]), k
    # every rank wrote its own optimizer + loader file; rank 0 the model and meta
    names = set(os.listdir(two_rank_run["ckpt"]))
    for step in (5, 10):
        assert {f"model_{step:06d}.safetensors", f"meta_{step:06d}.json",
                f"optim_{step:06d}_rank0.safetensors", f"optim_{step:06d}_rank1.safetensors"} <= names
    _, optim1, meta = load_checkpoint(two_rank_run["ckpt"], 10, load_optimizer=True, rank=1)
    _, optim0, _ = load_checkpoint(two_rank_run["ckpt"], 10, load_optimizer=True, rank=0)
    assert meta["world_size"] == 2
    assert optim0["loader"]["meta"]["rg_idx"] % 2 == 0 and optim1["loader"]["meta"]["rg_idx"] % 2 == 1  # each rank's own row groups

    # the 1-process reference, in this process: same flags, but 4 accumulation steps over interleaved batches
    from mlxchat import dataloader
    real_loader = dataloader.tokenizing_distributed_data_loader_with_state_bos_bestfit

    def interleaved(tokenizer, B, T, split, rank=0, world_size=1, **kwargs):
        assert (rank, world_size) == (0, 1) and split == "train"
        kwargs.pop("resume_state_dict", None)
        loaders = [real_loader(tokenizer, B, T, split, rank=r, world_size=2, **kwargs) for r in range(2)]
        while True:
            for loader in loaders:
                yield next(loader)

    monkeypatch.setattr(dataloader, "tokenizing_distributed_data_loader_with_state_bos_bestfit", interleaved)
    monkeypatch.setenv("MLXCHAT_BASE_DIR", two_rank_run["base"])
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")
    args = [a for a in two_rank_run["args"]]
    args[args.index("--model-tag") + 1] = "single"
    args[args.index("--save-every") + 1] = "-1"
    single = base_train.main(args)
    assert single["world_size"] == 1
    ref_mean = dict(single["mean_losses"])
    assert [s for s, _ in r0["mean_losses"]] == list(range(1, 11))
    for s, loss in r0["mean_losses"]:
        assert abs(loss - ref_mean[s]) < 1e-5, (s, loss, ref_mean[s])
    # the same weights, and training did move them (the last 5 steps alone)
    w_single = load_checkpoint(single["checkpoint_dir"], 10)[0]
    w_step5 = load_checkpoint(two_rank_run["ckpt"], 5)[0]
    for k, v in r0["weights"].items():
        assert np.array_equal(v, np.array(w_single[k])), (k, np.abs(v - np.array(w_single[k])).max())
    moved = max(np.abs(v - np.array(w_step5[k])).max() for k, v in r0["weights"].items())
    assert moved > 1e-3, moved


def test_two_rank_resume_continues_exactly(two_rank_run):
    """Restart both ranks from the step-5 checkpoint (model + meta from rank 0, each rank its own
    optimizer + loader file): steps 6..10 repeat the uninterrupted run's losses and weights."""
    src, dst = two_rank_run["ckpt"], os.path.join(two_rank_run["base"], "base_checkpoints", "dp_resumed")
    os.makedirs(dst)
    for name in os.listdir(src):
        if "000005" in name:
            shutil.copy(os.path.join(src, name), dst)
    args = [a for a in two_rank_run["args"]]
    args[args.index("--model-tag") + 1] = "dp_resumed"
    results, stdout = _launch_2(two_rank_run["base"], str(two_rank_run["tmp"] / "out_resumed"), args + ["--resume-from-step", "-2"])
    assert "resuming from" in stdout and "step 5" in stdout
    straight = two_rank_run["results"][0]
    for res in results:
        assert [s for s, _ in res["losses"]] == list(range(6, 11))
        a, m = dict(straight["losses"]), dict(straight["mean_losses"])
        for (s, loss), (_, mean) in zip(res["losses"], res["mean_losses"]):
            assert abs(loss - a[s]) < 1e-6 and abs(mean - m[s]) < 1e-6, (s, loss, a[s], mean, m[s])
        for k, v in res["weights"].items():
            assert np.array_equal(v, straight["weights"][k]), k


HELPERS = r'''
import mlxchat  # noqa: F401
import mlx.core as mx
from mlxchat.distributed import (all_reduce_mean, broadcast_object, broadcast_tree, check_same_on_all_ranks, compute_init,
                                 get_rank, ranks_disagree)
rank, world, group = compute_init("ring", 30)
assert world == 2 and get_rank() == rank
# a nested tree of two dtypes, 1-byte buckets: every array its own all_sum, structure and dtype kept
tree = {"a": [mx.full((3, 4), rank + 1.0), (mx.arange(5) * (rank + 1)).astype(mx.bfloat16)], "b": {"c": mx.full((2,), rank * 4.0)}}
for bucket in (1, 1 << 20):
    out = all_reduce_mean(tree, bucket_bytes=bucket)
    assert out["a"][0].tolist() == [[1.5] * 4] * 3 and out["a"][1].dtype == mx.bfloat16, out
    assert out["a"][1].tolist() == [0.0, 1.5, 3.0, 4.5, 6.0] and out["b"]["c"].tolist() == [2.0, 2.0], out
got = broadcast_tree({"w": mx.array([rank + 5.0, -0.25]), "i": mx.array([rank, 7])})
assert got["w"].tolist() == [5.0, -0.25] and got["i"].tolist() == [0, 7], got
assert broadcast_object({"step": 5, "s": "héllo"} if rank == 0 else None) == {"step": 5, "s": "héllo"}
assert not ranks_disagree({"p": mx.ones((3,))}) and ranks_disagree({"p": mx.ones((3,)) * rank})
print(f"rank {rank}: helpers ok", flush=True)
check_same_on_all_ranks(["tokenizer", rank], "the test value")
print("not reached", flush=True)
'''


def test_a_stop_sent_to_rank_0_stops_both_ranks_at_the_same_step(two_rank_run, monkeypatch):
    """The stop rides on the per-step loss all-reduce: rank 0 takes it after step 4 (sent while step 4's
    event was handled, so it arrives during step 5), and both ranks stop after step 5 with a checkpoint."""
    tmp = two_rank_run["tmp"]
    base = str(tmp / "base_stop")
    shutil.copytree(two_rank_run["base"], base, ignore=shutil.ignore_patterns("base_checkpoints"))
    monkeypatch.setenv("MLXCHAT_TEST_STOP_AT", "4")
    (r0, r1), _ = _launch_2(base, str(tmp / "out_stop"), two_rank_run["args"])
    assert r0["step"] == r1["step"] == 5
    assert [s for s, _ in r0["losses"]] == [s for s, _ in r1["losses"]] == [1, 2, 3, 4, 5]
    ckpt = os.path.join(base, "base_checkpoints", "dp")
    assert find_steps(ckpt) == [5]
    assert all(os.path.exists(os.path.join(ckpt, f"optim_000005_rank{r}.safetensors")) for r in range(2))
    # and the first steps are those of the uninterrupted run
    straight = dict((s, l) for s, l in two_rank_run["results"][0]["losses"])
    assert all(abs(l - straight[s]) < 1e-6 for s, l in r0["losses"])


def test_collective_helpers(tmp_path):
    """The helpers base_train and chat_sft share, on 2 ranks: mean all-reduce (buckets, nested trees,
    dtypes), broadcasts, the drift check, and check_same_on_all_ranks stopping every rank."""
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    cmd = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), "--", sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(str(tmp_path / "base")), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "rank 0: helpers ok" in out and "rank 1: helpers ok" in out, out[-3000:]
    # (mlx.launch itself exits 0 even when its ranks fail: it only prints a warning per failed rank.
    # Whichever rank exits first with code 1, mlx.launch then terminates the other (code -15), so
    # which rank shows "code 1" is a race; what matters is that no rank went on.)
    assert "not reached" not in out and re.search(r"Node with rank [01] exited with code 1", out), out[-3000:]
    assert "the test value differs between rank 0 and rank(s) [1]" in out, out[-3000:]


# -----------------------------------------------------------------------------
# failures: never hang

def _start_rank(rank, hostfile, base, args):
    env = _env(base)
    env.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.lines = []
    threading.Thread(target=lambda: [proc.lines.append(l) for l in proc.stdout], daemon=True).start()
    return proc


def _wait_for(proc, text, timeout):
    deadline = time.time() + timeout
    while not any(text in l for l in proc.lines):
        assert proc.poll() is None, "".join(proc.lines)[-4000:]
        assert time.time() < deadline, f"never saw {text!r}:\n" + "".join(proc.lines)[-4000:]
        time.sleep(0.1)


def _hostfile(tmp_path):
    port = free_port_pair()
    path = str(tmp_path / "hosts.json")
    with open(path, "w") as f:
        json.dump([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]], f)
    return path


@pytest.mark.parametrize("failure", ["kill", "hang"])
def test_a_failed_rank_ends_the_other_with_a_message(fixture_dir, tmp_path, failure):
    """kill: rank 1 is SIGKILLed mid-run; its sockets close, rank 0's next collective fails and it
    exits at once. hang: rank 1 is SIGSTOPped (a hung peer: sockets stay open); rank 0's watchdog
    ends it after --dist-timeout, naming the step and the collective it was stuck in."""
    base = str(tmp_path / "base")
    _prepare_base_dir(fixture_dir, base)
    hostfile = _hostfile(tmp_path)
    args = TINY + ["--num-iterations", "1000", "--model-tag", "f", "--data-dir", os.path.join(fixture_dir, "base_data")]
    args[args.index("--dist-timeout") + 1] = "60" if failure == "kill" else "10"
    ranks = [_start_rank(r, hostfile, base, args) for r in range(2)]
    try:
        _wait_for(ranks[0], "step 00003/01000", timeout=150)
        os.kill(ranks[1].pid, signal.SIGKILL if failure == "kill" else signal.SIGSTOP)
        t0 = time.time()
        rc = ranks[0].wait(timeout=60)
        waited = time.time() - t0
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
    out = "".join(ranks[0].lines)
    assert rc != 0, out[-3000:]
    if failure == "kill":
        assert "failed" in out and "Another rank died" in out and "--resume-from-step" in out, out[-3000:]
        assert waited < 30, waited
    else:
        assert "mlxchat watchdog: rank 0 of 2: no progress for 10 s in 'step " in out, out[-3000:]
        assert "all-reduce" in out.split("mlxchat watchdog")[-1].split("\n")[0]
        assert 9 < waited < 40, waited
    # the progress stopped where the failure happened: no step after it was logged
    assert "step 01000/01000" not in out


def test_a_rank_that_never_joins_ends_the_other(tmp_path):
    """Rank 1 is never started: rank 0 gives up after --dist-timeout with a message, never hangs."""
    hostfile = _hostfile(tmp_path)
    env = _env(str(tmp_path / "base"))
    env.update(MLX_RANK="0", MLX_HOSTFILE=hostfile)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--depth", "2", "--dist-timeout", "3",
                           "--train-tokenizer", "300"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    waited = time.time() - t0
    assert proc.returncode != 0
    assert "rank 0: the other ranks did not all join within 3 s" in proc.stderr, proc.stderr[-3000:]
    assert "127.0.0.1" in proc.stderr and "--dist-timeout" in proc.stderr
    assert waited < 30, waited


# -----------------------------------------------------------------------------
# chat_sft: the same data parallel, from a base checkpoint that only rank 0 has


def _install_sft_base(fixture_dir, base, with_checkpoint=True):
    """The parity fixture model as base checkpoint 'fx' (with an optimizer state that has taken one step and
    carries a Muon weight decay, as a base run leaves it), and the fixture's tokenizer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlxchat.checkpoint_manager import load_torch_file, save_arrays
    from mlxchat.gpt import GPT, GPTConfig
    shutil.copytree(os.path.join(fixture_dir, "tokenizer"), os.path.join(base, "tokenizer"))
    if not with_checkpoint:
        return
    ckpt = os.path.join(base, "base_checkpoints", "fx")
    os.makedirs(ckpt)
    for f in ("model_000062.pt", "meta_000062.json"):
        shutil.copy(os.path.join(fixture_dir, "checkpoint", f), ckpt)
    with open(os.path.join(ckpt, "meta_000062.json")) as f:
        model = GPT(GPTConfig(**json.load(f)["model_config"]))
    model.load_state_dict(load_torch_file(os.path.join(ckpt, "model_000062.pt")))
    optimizer = model.setup_optimizer(weight_decay=0.2)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
        if g["kind"] == "muon":
            g["weight_decay"] = 0.0123
    x = mx.array(np.random.default_rng(0).integers(0, 512, (2, 32)), dtype=mx.int32)
    optimizer.step(model, nn.value_and_grad(model, lambda a, b: model(a, b))(x, x)[1])
    tensors, meta = optimizer.state_dict()
    save_arrays(os.path.join(ckpt, "optim_000062_rank0.safetensors"), {"optimizer": {"tensors": tensors, "meta": meta}})


def test_two_rank_sft_matches_one_process_and_saves_a_loadable_checkpoint(fixture_dir, tmp_path, monkeypatch):
    """chat_sft on 2 ranks, one epoch of a small CustomJSON mixture (the first 128 demo conversations):
    rank 1 has no base checkpoint, so weights and optimizer state must come from rank 0; the ranks reach
    the end of their shares at their own pace and must agree on the schedule and the last step (else one
    would wait alone in a collective and the watchdog would end the run). Compared with 1 process whose 2
    micro-batches per step alternate rank 0's and rank 1's loader and whose data position is the larger
    of the two: same steps, same losses, bit-identical weights (as the base_train test above explains)."""
    import mlx.core as mx
    from mlxchat.checkpoint_manager import load_arrays, load_checkpoint, load_model
    from scripts import chat_sft
    from tasks.demo_chat import DEMO_CHAT_DIR
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")
    base0, base1, base_single = (str(tmp_path / d) for d in ("rank0", "rank1", "single"))
    _install_sft_base(fixture_dir, base0)
    _install_sft_base(fixture_dir, base1, with_checkpoint=False)
    _install_sft_base(fixture_dir, base_single)
    mixture = str(tmp_path / "chats.jsonl")
    with open(os.path.join(DEMO_CHAT_DIR, "chat_train.jsonl")) as f, open(mixture, "w") as g:
        g.writelines(f.readlines()[:128])
    # 2 ranks x 1 micro-batch of 2 x 128 tokens = 512 tokens per step; -1 iterations = one epoch
    args = ["--model-tag", "fx", "--mixture", mixture, "--max-seq-len", "128", "--device-batch-size", "2",
            "--total-batch-size", "512", "--eval-every", "-1", "--eval-tokens", "512", "--dist-timeout", "60"]

    # rank 1 on a base dir of its own, as on a second Mac: the tokenizer only, no base checkpoint; the
    # leading "--" is what `mlx.launch ... -- python -m scripts.chat_sft -- ...` passes on
    t0 = time.time()
    (r0, r1), stdout = _launch_2(base0, str(tmp_path / "out"), ["--"] + args, script="chat_sft", rank1_base=base1)
    launched = time.time() - t0
    assert "batch: 512 tokens = 2 x 128 x 1 accumulation steps x 2 processes" in stdout
    assert "loaded the base run's optimizer state" in stdout
    w0, w1 = r0.pop("weights"), r1.pop("weights")
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    # same step count, the same (rank-averaged) losses and val bpb, bit-identical weights
    assert r0["step"] == r1["step"] >= 5
    assert r0["losses"] == r1["losses"] and r0["mean_losses"] == r1["mean_losses"] and r0["val_bpb"] == r1["val_bpb"]
    assert all(np.isfinite(r0["losses"]))
    for k in w0:
        assert np.array_equal(w0[k], w1[k]), k

    # the checkpoint: model + meta + optimizer on rank 0's machine, rank 1's optimizer file on its own
    step = r0["step"]
    sft0, sft1 = os.path.join(base0, "chatsft_checkpoints", "fx"), os.path.join(base1, "chatsft_checkpoints", "fx")
    assert {f"model_{step:06d}.safetensors", f"meta_{step:06d}.json", f"optim_{step:06d}_rank0.safetensors"} <= set(os.listdir(sft0))
    assert os.listdir(sft1) == [f"optim_{step:06d}_rank1.safetensors"]
    monkeypatch.setenv("MLXCHAT_BASE_DIR", base0)
    model, _, meta = load_model("sft", model_tag="fx")
    assert meta["step"] == step and meta["world_size"] == 2 and meta["model_config"]["sequence_len"] == 128
    for k, v in model.named_parameters().items():
        assert np.array_equal(np.array(v), w0[k]), k
    _, optim0, _ = load_checkpoint(sft0, step, load_optimizer=True, rank=0)
    optim1 = load_arrays(os.path.join(sft1, f"optim_{step:06d}_rank1.safetensors"))
    model.setup_optimizer().load_state_dict(optim1["optimizer"]["tensors"], optim1["optimizer"]["meta"])
    # both ranks went on from the base run's optimizer (1 step) with its Muon weight decay
    for optim in (optim0, optim1):
        assert all(s == 1 + step for s in optim["optimizer"]["meta"]["steps"].values())
        assert {g["weight_decay"] for g in optim["optimizer"]["meta"]["param_groups"] if g["kind"] == "muon"} == {0.0123}
    for k, v in optim0["optimizer"]["tensors"].items():
        assert np.array_equal(np.array(v), np.array(optim1["optimizer"]["tensors"][k])), k

    # the 1-process reference, in this process
    from mlxchat import sft
    real_loader = sft.sft_data_generator_bos_bestfit

    def interleaved(dataset, tokenizer, B, T, buffer_size=100, rank=0, world_size=1, resume_state=None):
        assert (rank, world_size, resume_state) == (0, 1, None)
        loaders = [real_loader(dataset, tokenizer, B, T, buffer_size, rank=r, world_size=2) for r in range(2)]
        consumed = [0, 0]
        while True:
            for r, loader in enumerate(loaders):
                x, y, state = next(loader)
                consumed[r] = state["consumed"]
                yield x, y, dict(state, consumed=max(consumed))

    monkeypatch.setattr(sft, "sft_data_generator_bos_bestfit", interleaved)
    monkeypatch.setenv("MLXCHAT_BASE_DIR", base_single)
    single = chat_sft.main(args)
    assert single["world_size"] == 1 and single["step"] == step
    assert np.allclose(single["mean_losses"], r0["mean_losses"], rtol=0, atol=1e-5), (single["mean_losses"], r0["mean_losses"])
    w_single = load_checkpoint(os.path.join(base_single, "chatsft_checkpoints", "fx"), step)[0]
    base_weights = load_model("base", model_tag="fx")[0].named_parameters()
    for k, v in w0.items():
        assert np.array_equal(v, np.array(w_single[k])), (k, np.abs(v - np.array(w_single[k])).max())
    moved = max(np.abs(v - np.array(base_weights[k].astype(mx.float32))).max() for k, v in w0.items())
    assert moved > 1e-3, moved
    print(f"2-rank SFT: {step} steps in {launched:.1f} s (launch included)")
