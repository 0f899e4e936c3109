"""
Pretrain a GPT on your Mac (or any MLX backend): nanochat's base_train in MLX.

One dial, --depth, derives the model (width = depth x 64 rounded up to the head dim, heads of 128),
the training horizon (tokens = 12 x scaling params), the batch size (Power Lines: B ~ D^0.383) and
the learning-rate / weight-decay scaling, exactly as nanochat does.

Examples:
    python -m scripts.base_train --depth 12                       # nanochat's d12, all defaults
    python -m scripts.base_train --depth 4 --max-seq-len 256 --head-dim 64 --window-pattern L \\
        --device-batch-size 8 --total-batch-size 8192 --num-iterations 300 --data-dir demo   # the tiny CPU preset
    python -m scripts.base_train --depth 12 --device-batch-size auto --memory-limit 24      # fit the Mac's memory
    python -m scripts.base_train --depth 12 --resume-from-step 1000                          # continue exactly

Ctrl-C saves a checkpoint at the end of the current step and exits; --resume-from-step continues.
"""
import argparse
import gc
import json
import math
import os
import sys
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlxchat.common import (device_memory_bytes, device_name, dtype_name, format_duration, get_base_dir,
                            get_compute_dtype, get_peak_flops, init_wandb, memory_cap, print0, warn_if_over_cap)
from mlxchat.common import (StopOnCtrlC, add_dist_args, all_reduce_floats, all_reduce_mean, all_reduce_step, barrier,
                            broadcast_object, broadcast_tree, check_same_on_all_ranks, compute_init, dist_beating,
                            dist_waiting, launched_argv)
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.checkpoint_manager import _optim_path, find_last_step, load_arrays, load_checkpoint, save_training_checkpoint
from mlxchat.report import get_report, log_metrics
from mlxchat.schedules import get_lr_multiplier, get_muon_momentum, get_weight_decay

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
B_REF = 2 ** 19  # nanochat's reference batch size (tokens) at d12


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb; also off when wandb is not installed)")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of layers: the dial that derives everything else")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to --head-dim)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    p.add_argument("--window-pattern", default="SSSL", help="sliding windows per layer: L = full context, S = a quarter; last layer is always L")
    # horizon
    p.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (overrides the two below)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs")
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens = ratio x scaling params (nanochat: 12)")
    # batch
    p.add_argument("--device-batch-size", default="32", help="rows per micro-batch, or 'auto' to fit --memory-limit")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step; -1 = derived from depth")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GiB of memory training may use: MLX's allocator is capped there (it waits for the device instead of "
                        "queueing ops ahead of it past the cap, which costs a few %% of speed), and --device-batch-size auto picks "
                        "the largest micro-batch that fits (default: no cap with a fixed batch; 75%% of what MLX reports with auto)")
    p.add_argument("--grad-checkpoint", type=int, default=0, help="1 = recompute each block in the backward pass (less memory, ~30%% slower)")
    # optimizer
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon cautious weight decay at the d12 reference (scaled by batch and horizon)")
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    # evaluation, sampling, checkpoints
    p.add_argument("--resume-from-step", type=int, default=-1, help="resume from this checkpoint step (-2 = the latest)")
    p.add_argument("--eval-every", type=int, default=250, help="val bits-per-byte every N steps (-1 = off)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288, help="tokens per val evaluation")
    p.add_argument("--core-metric-every", type=int, default=-1, help="CORE metric every N steps (-1 = off; needs the eval bundle)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="greedy samples of fixed prompts every N steps (-1 = off)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--data-dir", default=None, help="parquet shards to train on (default <base>/base_data_climbmix; 'demo' = the corpus shipped with mlxchat)")
    p.add_argument("--log-every", type=int, default=1, help="print a log line every N steps")
    p.add_argument("--seed", type=int, default=42)
    # data parallel across processes / Macs
    add_dist_args(p)
    args = p.parse_args(launched_argv(argv))
    if args.device_batch_size != "auto":
        try:
            args.device_batch_size = int(args.device_batch_size)
        except ValueError:
            p.error(f"--device-batch-size must be an integer or 'auto', got {args.device_batch_size!r}")
        if args.device_batch_size < 1:
            p.error("--device-batch-size must be >= 1")
    if args.depth < 1:
        p.error("--depth must be >= 1")
    return args


# -----------------------------------------------------------------------------
# the depth dial

def build_model_meta(depth, aspect_ratio, head_dim, max_seq_len, window_pattern, vocab_size):
    base_dim = depth * aspect_ratio
    model_dim = ((base_dim + head_dim - 1) // head_dim) * head_dim  # nudged up to a multiple of head_dim
    num_heads = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern)


def scaling_params(model):
    # Kaplan-style: transformer matrices + lm_head (nanochat dev/LOG 2026-01-27)
    c = model.num_scaling_params()
    return c["transformer_matrices"] + c["lm_head"]


def derive_hyperparameters(args, model, vocab_size, world_size=1):
    """nanochat's scaling-law logic (spec §3.2), integer rounding included."""
    num_scaling = scaling_params(model)
    target_tokens = int(args.target_param_data_ratio * num_scaling)
    # the d12 reference, built with the same architecture flags (MLX is lazy: nothing is allocated)
    ref = GPT(build_model_meta(12, args.aspect_ratio, args.head_dim, args.max_seq_len, args.window_pattern, vocab_size))
    D_REF = args.target_param_data_ratio * scaling_params(ref)
    del ref
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / D_REF) ** 0.383))
    batch_lr_scale = (total_batch_size / B_REF) ** 0.5
    wd_scaled = args.weight_decay * (total_batch_size / B_REF) ** 0.5 * (D_REF / target_tokens)
    flops_per_token = model.estimate_flops()
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
    else:
        num_iterations = target_tokens // total_batch_size
    return dict(num_scaling_params=num_scaling, target_tokens=target_tokens, D_REF=D_REF,
                total_batch_size=total_batch_size, batch_lr_scale=batch_lr_scale, wd_scaled=wd_scaled,
                flops_per_token=flops_per_token, num_iterations=num_iterations)


# -----------------------------------------------------------------------------
# the training step

class Trainer:
    """Compiled forward+backward per micro-batch, gradient accumulation, compiled optimizer step.
    Each micro-batch is queued with mx.async_eval as soon as it is built: the device starts on it
    while the host fetches the next batch and builds the next graph (the optimizer's ~400 ops
    included), so that host work hides behind device work instead of adding to the step. The device
    runs the queue in order, so memory stays bounded to about one micro-batch of activations."""

    def __init__(self, model, optimizer, grad_accum_steps, grad_checkpoint=False, grad_reduce=None):
        self.model, self.optimizer, self.grad_accum_steps = model, optimizer, grad_accum_steps
        self.grad_reduce = grad_reduce  # e.g. an all-reduce mean across processes (data parallel)
        model.grad_checkpoint = bool(grad_checkpoint)
        loss_and_grad = nn.value_and_grad(model, lambda x, y: model(x, y))
        # value_and_grad writes the traced parameters into the model: they must be compile outputs too
        self._fwd_bwd = mx.compile(loss_and_grad, inputs=model.state, outputs=model.state)
        scale = 1.0 / grad_accum_steps
        self._accumulate = mx.compile(lambda acc, g: tree_map(lambda a, b: a + b * scale, acc, g))
        self._first = mx.compile(lambda g: tree_map(lambda b: b * scale, g))

    def step(self, next_batch):
        """Run grad_accum_steps micro-batches (fetched with next_batch()) and one optimizer step.
        Returns the loss of the last micro-batch (as nanochat logs it) and the mean loss."""
        acc, losses = None, []
        for _ in range(self.grad_accum_steps):
            x, y = next_batch()
            loss, grads = self._fwd_bwd(x, y)
            if acc is None:
                # one micro-batch: the gradients as they are (scaling by 1 would be a full copy of them,
                # alive beside the originals at the optimizer step: +1.1 GiB at d12)
                acc = grads if self.grad_accum_steps == 1 else self._first(grads)
            else:
                acc = self._accumulate(acc, grads)
            losses.append(loss)
            mx.async_eval(acc, loss)
        if self.grad_reduce is not None:
            acc = self.grad_reduce(acc)
        self.optimizer.step(self.model, acc)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return losses[-1].item(), sum(l.item() for l in losses) / len(losses)


def measure_peak_memory(model_factory, optimizer_factory, B, T, vocab_size, grad_checkpoint):
    """Peak memory (bytes) of one full training step at micro-batch B, on random tokens."""
    model = model_factory()
    optimizer = optimizer_factory(model)
    trainer = Trainer(model, optimizer, 1, grad_checkpoint)
    x = mx.random.randint(0, vocab_size, (B, T)).astype(mx.int32)
    mx.eval(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer.step(lambda: (x, x))
    peak = mx.get_peak_memory()
    del trainer, optimizer, model
    gc.collect()
    mx.clear_cache()
    return peak


def auto_device_batch_size(model_factory, optimizer_factory, T, vocab_size, limit_bytes, grad_checkpoint, tokens_per_step):
    """Largest power-of-two micro-batch whose measured peak fits the budget. Peak memory is linear in
    B (weights + optimizer state + B x activations), so two small measurements predict the rest;
    the pick is then verified with a real step."""
    p1 = measure_peak_memory(model_factory, optimizer_factory, 1, T, vocab_size, grad_checkpoint)
    p2 = measure_peak_memory(model_factory, optimizer_factory, 2, T, vocab_size, grad_checkpoint)
    per_row = max(p2 - p1, 1)
    fixed = p1 - per_row
    B = 1
    while B * 2 * T <= tokens_per_step and fixed + per_row * B * 2 <= limit_bytes and B < 1024:
        B *= 2
    if fixed + per_row * B > limit_bytes:
        raise SystemExit(f"even micro-batch 1 needs ~{p1 / 2**30:.1f} GiB, over the {limit_bytes / 2**30:.1f} GiB budget: "
                         f"use a smaller --depth or --max-seq-len, --grad-checkpoint 1, or raise --memory-limit")
    while B > 1:
        peak = measure_peak_memory(model_factory, optimizer_factory, B, T, vocab_size, grad_checkpoint)
        if peak <= limit_bytes:
            break
        B //= 2
    return B, fixed, per_row


# -----------------------------------------------------------------------------

class Progress:
    """One status line per step: a bar with step, loss, tok/s, MFU, elapsed and ETA. On a terminal it
    redraws in place (and prints a permanent line every --log-every steps), elsewhere it prints lines."""

    def __init__(self, total, log_every):
        self.total, self.log_every = total, log_every
        self.tty = sys.stdout.isatty()

    def update(self, step, text):
        frac = step / max(self.total, 1)
        width = 20
        filled = int(width * frac)
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {text}"
        if self.tty:
            end = "\n" if (step % self.log_every == 0 or step == self.total) else ""
            sys.stdout.write("\r\033[K" + line + end)
            sys.stdout.flush()
        elif step % self.log_every == 0 or step == self.total:
            print(line, flush=True)


def main(argv=None):
    args = get_args(argv)
    user_config = dict(vars(args))
    # join the other ranks first (a no-op in a single process): print0 and every collective need the group
    rank, world_size, _ = compute_init(args.dist_backend, args.dist_timeout)
    master_process = rank == 0
    mx.random.seed(args.seed)
    dtype = get_compute_dtype()
    print0(f"device: {device_name()} ({mx.default_device()}), compute dtype {dtype_name(dtype)}")
    if world_size > 1:
        print0(f"data parallel: {world_size} processes (mx.distributed, backend {args.dist_backend}); each reads 1/{world_size} "
               f"of the row groups, gradients are averaged before every step")

    from mlxchat.tokenizer import get_tokenizer, get_token_bytes, tokenizer_fingerprint
    from mlxchat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as make_loader
    from mlxchat.dataloader import join_loader_state, split_loader_state
    from mlxchat.loss_eval import evaluate_bpb

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes()
    vocab_size = tokenizer.get_vocab_size()
    print0(f"vocab size: {vocab_size:,}")
    # every Mac loads the tokenizer from its own disk: a different one would train on different token ids
    check_same_on_all_ranks(tokenizer_fingerprint(tokenizer), "the tokenizer")

    config = build_model_meta(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, args.window_pattern, vocab_size)
    print0(f"model config: {json.dumps(config.to_dict())}")
    model = GPT(config)
    counts = model.num_scaling_params()
    for k, v in counts.items():
        print0(f"  {k:24s}: {v:,}")
    hp = derive_hyperparameters(args, model, vocab_size, world_size)
    T = args.max_seq_len
    total_batch_size = hp["total_batch_size"]
    num_iterations = hp["num_iterations"]
    s = hp["batch_lr_scale"]

    def make_optimizer(m):
        return m.setup_optimizer(unembedding_lr=args.unembedding_lr * s, embedding_lr=args.embedding_lr * s,
                                 scalar_lr=args.scalar_lr * s, matrix_lr=args.matrix_lr * s,
                                 weight_decay=hp["wd_scaled"])

    cap_gib = args.memory_limit  # GiB, or None: MLX's own limit (see mlxchat.common.memory_cap)
    if args.device_batch_size == "auto":
        limit = (args.memory_limit * 2 ** 30) if args.memory_limit else 0.75 * (device_memory_bytes() or 8e9)
        cap_gib = limit / 2 ** 30  # the batch was measured to fit: keep the queued-ahead ops inside the budget too
        B, fixed, per_row = auto_device_batch_size(lambda: GPT(config), make_optimizer, T, vocab_size, limit,
                                                   args.grad_checkpoint, total_batch_size // world_size)
        if world_size > 1:  # every rank measured its own Mac: all use the smallest pick
            B = int(all_reduce_floats([B], op="min", label="agreeing on --device-batch-size auto",
                                      timeout=10 * args.dist_timeout)[0])
        print0(f"--device-batch-size auto: picked {B} (measured: {fixed / 2**30:.2f} GiB fixed + {per_row / 2**30:.3f} GiB per row "
               f"at T={T}; budget {limit / 2**30:.1f} GiB; capped by total batch {total_batch_size:,} tokens)")
        mx.random.seed(args.seed)
        model = GPT(config)
    else:
        B = args.device_batch_size
    tokens_per_fwdbwd = B * T
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size  # one micro-step of every rank
    if total_batch_size % world_tokens_per_fwdbwd != 0:
        if world_size == 1:
            raise SystemExit(f"total batch {total_batch_size:,} tokens is not a multiple of device batch {B} x {T}; "
                             f"pick --device-batch-size dividing {total_batch_size // T} or set --total-batch-size")
        rows = total_batch_size // (T * world_size)  # rows per process per step
        hint = f"pick --device-batch-size dividing {rows} or " if rows else ""
        raise SystemExit(f"total batch {total_batch_size:,} tokens is not a multiple of device batch {B} x {T} x {world_size} "
                         f"processes = {world_tokens_per_fwdbwd:,} tokens; {hint}set --total-batch-size to a multiple of "
                         f"{world_tokens_per_fwdbwd:,}")
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    print0(f"total batch {total_batch_size:,} tokens = {B} x {T} x {grad_accum_steps} accumulation steps"
           + (f" x {world_size} processes" if world_size > 1 else ""))
    print0(f"iterations: {num_iterations:,} ({num_iterations * total_batch_size:,} tokens, "
           f"ratio {num_iterations * total_batch_size / hp['num_scaling_params']:.2f}), "
           f"{hp['flops_per_token'] * num_iterations * total_batch_size:.3e} FLOPs")
    print0(f"lr scale {s:.4f}, Muon weight decay {hp['wd_scaled']:.4f}")

    optimizer = make_optimizer(model)
    data_dir = args.data_dir  # None, a folder, or "demo" (mlxchat.dataset.resolve_data_dir)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)

    # ---- resume
    step = 0
    loop_state = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
    val_bpb = None
    loader_state = None
    resume_step = args.resume_from_step
    if resume_step == -2:
        if world_size == 1:
            resume_step = find_last_step(checkpoint_dir)
        else:  # rank 0 holds the model and meta files: it decides, and a missing checkpoint stops every rank
            try:
                found = find_last_step(checkpoint_dir) if master_process else None
            except FileNotFoundError as e:
                found = str(e)
            found = broadcast_object(found, label="agreeing on the resume step")
            if isinstance(found, str):
                raise SystemExit(found)
            resume_step = found
    if resume_step >= 0:
        print0(f"resuming from {checkpoint_dir} step {resume_step}")
        if master_process:
            model_data, optim_data, meta = load_checkpoint(checkpoint_dir, resume_step, load_optimizer=True, rank=rank)
            model.load_state_dict(model_data)
            del model_data
        else:  # the other Macs need only their own optimizer + loader file; weights and meta come from rank 0
            path = _optim_path(checkpoint_dir, resume_step, rank)
            optim_data, meta = (load_arrays(path) if os.path.exists(path) else None), None
        if world_size > 1:
            meta = broadcast_object(meta, label="sending the checkpoint meta")
            missing = all_reduce_floats([float(optim_data is None and r == rank) for r in range(world_size)],
                                        label="checking every rank's optimizer file")
            missing = [r for r, m in enumerate(missing) if m > 0]
            if missing:
                raise SystemExit(f"step {resume_step}: no optim_{resume_step:06d}_rank<r>.safetensors for rank(s) {missing} "
                                 f"in {checkpoint_dir} on their machines. Every rank resumes from the optimizer and loader "
                                 f"state it saved itself: launch with the same hostfile (same Mac for each rank).")
        if meta.get("world_size", 1) != world_size:
            raise SystemExit(f"checkpoint step {resume_step} was written by {meta.get('world_size', 1)} process(es), this run has "
                             f"{world_size}: an exact resume needs the same number (each rank's data position is its own)")
        if optim_data is None:
            raise SystemExit(f"no optimizer state for step {resume_step} in {checkpoint_dir}: cannot resume exactly")
        optimizer.load_state_dict(optim_data["optimizer"]["tensors"], optim_data["optimizer"]["meta"])
        step = meta["step"]
        loop_state = meta["loop_state"]
        val_bpb = meta.get("val_bpb")
        if optim_data.get("loader") and optim_data["loader"]["meta"]:  # exact: the buffered documents were saved with this rank's state
            loader_state = join_loader_state(optim_data["loader"]["meta"], optim_data["loader"].get("arrays"))
        else:
            loader_state = meta["dataloader_state_dict"]
        del optim_data
    if world_size > 1:  # every rank starts from rank 0's weights (fresh or resumed)
        model.update(broadcast_tree(model.parameters(), label="sending rank 0's weights"))

    train_loader = make_loader(tokenizer, B, T, split="train", resume_state_dict=loader_state, data_dir=data_dir,
                               exact_state=True, rank=rank, world_size=world_size)
    pending = [next(train_loader)]
    consumed = {"state": loader_state}

    def next_batch():
        bx, by, state = pending.pop()
        consumed["state"] = state  # where a resume continues from, once this batch is trained on
        pending.append(next(train_loader))  # prefetch: tokenization overlaps the async compute
        return bx, by

    wandb_run = init_wandb("mlxchat", args.run, user_config, master_process)

    def grad_reduce(grads):  # data parallel: every rank steps with the mean gradient over all ranks
        return all_reduce_mean(grads, label=f"step {step + 1:05d}: gradient all-reduce")

    trainer = Trainer(model, optimizer, grad_accum_steps, args.grad_checkpoint,
                      grad_reduce=grad_reduce if world_size > 1 else None)
    peak_flops = get_peak_flops()
    flops_per_token = hp["flops_per_token"]

    # Ctrl-C: finish the step, save, exit (the caller's handler and MLX's memory limit are put back after)
    with StopOnCtrlC() as stop, memory_cap(cap_gib):

        def save(at_step):
            loader_meta, loader_arrays = split_loader_state(consumed["state"]) if consumed["state"] else (None, None)
            meta = {
                "step": at_step, "val_bpb": val_bpb, "model_config": config.to_dict(), "user_config": user_config,
                "device_batch_size": B, "max_seq_len": T, "total_batch_size": total_batch_size,
                # nanochat's (approximate) resume keys; the exact loader state is in the optim file
                "dataloader_state_dict": {k: loader_meta[k] for k in ("pq_idx", "rg_idx", "epoch")} if loader_meta else None,
                "loop_state": loop_state,
                "tokens_seen": at_step * total_batch_size, "seed": args.seed,
                "compute_dtype": dtype_name(dtype), "world_size": world_size,
            }
            # each rank's exact loader state goes into its own optimizer file
            save_training_checkpoint(checkpoint_dir, at_step, model, optimizer, meta,
                                     loader={"meta": loader_meta, "arrays": loader_arrays})
            print0(f"saved checkpoint step {at_step} to {checkpoint_dir}" + ("" if world_size == 1 else
                   f" (model + meta; optimizer + loader state of each of the {world_size} ranks on its own machine)"))

        progress = Progress(num_iterations, max(args.log_every, 1))
        smooth = loop_state["smooth_train_loss"]
        losses = []  # (step, loss of the last micro-batch, averaged over ranks): returned to callers such as the tests
        mean_losses = []  # (step, mean loss over all micro-batches of all ranks)
        val_history = []  # (step, val bpb)
        mx.reset_peak_memory()
        first_step = step  # (past 0 in a resumed run)
        while True:
            last_step = step == num_iterations
            stopping = stop.now
            if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
                # every rank evaluates its share of the val row groups; evaluate_bpb sums nats and bytes over ranks
                eval_steps = max(1, args.eval_tokens // (B * T * world_size))
                val_loader = make_loader(tokenizer, B, T, split="val", data_dir=data_dir, rank=rank, world_size=world_size)
                with dist_waiting(f"step {step:05d}: val bpb"):
                    val_bpb = evaluate_bpb(model, dist_beating((bx, by) for bx, by, _ in val_loader), eval_steps, token_bytes)
                loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
                val_history.append((step, val_bpb))
                log_metrics("base", step, val_bpb=val_bpb)
                print0(("\n" if progress.tty else "") + f"step {step:05d} | val bpb {val_bpb:.4f}")
                wandb_run.log({"step": step, "val/bpb": val_bpb})
            if master_process and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
                from mlxchat.engine import Engine
                engine = Engine(model, tokenizer)
                for prompt in SAMPLE_PROMPTS:
                    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                    results, _ = engine.generate_batch(ids, num_samples=1, max_tokens=16, temperature=0)
                    print0(tokenizer.decode(results[0]))
            if last_step or stopping or (step > 0 and step != resume_step and args.save_every > 0 and step % args.save_every == 0):
                if not (stopping and step == resume_step):
                    save(step)
            if last_step or stopping:
                break

            # ---- one optimizer step
            lrm = get_lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
            momentum = get_muon_momentum(step, num_iterations, args.warmdown_ratio)
            muon_wd = get_weight_decay(step, num_iterations, hp["wd_scaled"])
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = momentum
                    group["weight_decay"] = muon_wd
            # randomness (none in the step today, dropout-free model) is a function of (seed, step), so a
            # resumed run draws exactly what the uninterrupted one would: the seed is the RNG state
            mx.random.seed(args.seed * 1_000_003 + step)
            t0 = time.time()
            loss, mean_loss = trainer.step(next_batch)
            loss, mean_loss = all_reduce_step(loss, mean_loss, stop, step + 1)  # averaged over ranks; any Ctrl-C
            dt = time.time() - t0
            step += 1
            losses.append((step, loss))
            mean_losses.append((step, mean_loss))

            smooth = 0.9 * smooth + 0.1 * loss
            debiased = smooth / (1 - 0.9 ** step)
            log_metrics("base", step, loss=debiased, lrm=lrm)
            if step > 10:
                loop_state["total_training_time"] += dt
            loop_state["smooth_train_loss"] = smooth
            tok_per_sec = total_batch_size / dt  # all ranks together
            mfu = f"{100 * flops_per_token * tok_per_sec / (peak_flops * world_size):.1f}%" if peak_flops else "unknown"
            timed = max(step - 10, 1)
            avg_dt = loop_state["total_training_time"] / timed if step > 10 else dt
            eta = avg_dt * (num_iterations - step)
            if master_process:
                progress.update(step, f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {debiased:.4f} | "
                                      f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu} | "
                                      f"elapsed {format_duration(loop_state['total_training_time'])} | eta {format_duration(eta)}")
            if step % 100 == 0:
                wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/dt": dt,
                               "train/tok_per_sec": tok_per_sec})
            if step == 1:
                gc.collect()
                gc.freeze()
            if step == first_step + 3:  # compiled and past the first steps' allocations
                warn_if_over_cap(cap_gib)

        # the other ranks wait for rank 0's last checkpoint, so that all exit together once it is complete
        barrier("end of training: waiting for rank 0 to finish writing the checkpoint")
        peak = mx.get_peak_memory() / 2 ** 30
        print0(f"peak memory: {peak:.2f} GiB" + (f" (capped at {cap_gib:.1f} GiB)" if cap_gib else ""))
        print0(f"total training time: {format_duration(loop_state['total_training_time'])}")
        if loop_state["min_val_bpb"] != float("inf"):
            print0(f"min val bpb: {loop_state['min_val_bpb']:.4f}")
        print0(f"checkpoints: {checkpoint_dir}")
        wandb_run.finish()
        get_report().log(section="Base model training", data=[user_config, {
            "Number of parameters": counts["total"], "Number of training tokens": step * total_batch_size,
            "Device batch size": B, "Compute dtype": dtype_name(dtype), "Device": device_name(),
            "Minimum validation bpb": loop_state["min_val_bpb"], "Final validation bpb": val_bpb,
            "Total training time": format_duration(loop_state["total_training_time"]), "Peak memory (GiB)": round(peak, 3)}])
        return {"val_bpb": val_bpb, "min_val_bpb": loop_state["min_val_bpb"], "peak_memory_gib": peak, "step": step,
                "losses": losses, "mean_losses": mean_losses, "val_bpb_history": val_history, "checkpoint_dir": checkpoint_dir,
                "rank": rank, "world_size": world_size}


if __name__ == "__main__":
    main()
