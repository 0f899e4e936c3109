"""
Time the compiled MuonAdamW step at nanochat's shapes (default d12: width 768, 6 heads, vocab 32768),
and, unless --no-full, a full training step (forward + backward + optimizer) at a small micro-batch
to see the optimizer's share. Gradients for the optimizer-only timing are random.
For reference: nanochat's optimizer takes about 11 of the 86 ms of a d12 16x2048 step on an H100.

    python -m scripts.bench_optim                              # d12, optimizer + full step at B=1, T=256
    python -m scripts.bench_optim --depth 20 --iters 10 --batch 4 --seq 2048
    python -m scripts.bench_optim --no-full --breakdown        # optimizer only, AdamW vs Muon groups
    MLXCHAT_DTYPE=bfloat16 python -m scripts.bench_optim       # bf16 compute (the default on a GPU)

The last line printed is JSON.
"""
import argparse
import json
import statistics
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx is imported)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlxchat.common import get_compute_dtype, dtype_name
from mlxchat.console import log_to_console
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.optim import MuonAdamW

parser = argparse.ArgumentParser(description="benchmark the MuonAdamW step")
parser.add_argument("--depth", type=int, default=12, help="number of layers; width = 64 * depth (nanochat's aspect ratio)")
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--vocab-size", type=int, default=32768)
parser.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (the first one compiles)")
parser.add_argument("--batch", type=int, default=1, help="micro-batch size of the full step")
parser.add_argument("--seq", type=int, default=256, help="sequence length of the full step")
parser.add_argument("--no-full", action="store_true", help="time the optimizer only")
parser.add_argument("--breakdown", action="store_true", help="also time the AdamW groups and the Muon groups alone")
args = parser.parse_args()
log_to_console()

# nanochat's sizing (spec 1.1): model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim
config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, head_dim=args.head_dim)
model_dim, n_head = config.n_embd, config.n_head
model = GPT(config)
mx.eval(model.parameters())
num_params = sum(v.size for v in model.named_parameters().values())
print(f"d{args.depth}: width {model_dim}, {n_head} heads, {num_params:,} parameters, "
      f"compute dtype {dtype_name(get_compute_dtype())}, device {mx.default_device()}")

# nanochat's base_train settings at d12 (weight decay nonzero so the cautious decay does work)
optimizer = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28, scalar_lr=0.5)
print("Muon groups: " + ", ".join(f"{len(g['names'])}x{s}" for g, s in zip(optimizer.param_groups, optimizer.shapes) if s))


def timed(fn, iters, warmup):
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        else:
            print(f"  warmup {i}: {dt * 1000:.1f} ms")
    return statistics.median(times), times


# 1) the optimizer alone, on fixed random gradients
grads = tree_map(lambda p: (mx.random.normal(p.shape) * 1e-3).astype(p.dtype), model.parameters())
mx.eval(grads)


def optimizer_step():
    optimizer.step(model, grads)
    mx.eval(model.parameters(), optimizer.state)


print("optimizer step:")
opt_s, opt_times = timed(optimizer_step, args.iters, args.warmup)
print(f"  median {opt_s * 1000:.1f} ms over {args.iters} (min {min(opt_times) * 1000:.1f}, max {max(opt_times) * 1000:.1f})")
result = {"depth": args.depth, "params": num_params, "dtype": dtype_name(get_compute_dtype()),
          "device": str(mx.default_device()), "opt_ms": round(opt_s * 1000, 2)}

# 1b) where the time goes: the same update restricted to the AdamW groups, then to the Muon groups
if args.breakdown:
    params = model.named_parameters()
    flat_grads = dict(tree_flatten(grads))
    for kind in ("adamw", "muon"):
        groups = [g for g in optimizer.param_groups if g["kind"] == kind]
        names = [n for g in groups for n in g["names"]]
        sub = MuonAdamW(groups, params)
        sub_params, sub_grads = {n: params[n] for n in names}, {n: flat_grads[n] for n in names}
        hyper = sub.hyperparameters()

        def sub_step():
            mx.eval(sub.apply(sub_params, sub_grads, hyper), sub.state)

        print(f"{kind} groups only ({sum(params[n].size for n in names):,} parameters):")
        s, _ = timed(sub_step, args.iters, args.warmup)
        print(f"  median {s * 1000:.1f} ms")
        result[f"{kind}_ms"] = round(s * 1000, 2)

# 2) a full training step: forward + backward on one micro-batch, then the optimizer
if not args.no_full:
    loss_and_grad = nn.value_and_grad(model, lambda x, y: model(x, y))
    x = mx.random.randint(0, args.vocab_size, (args.batch, args.seq))
    y = mx.random.randint(0, args.vocab_size, (args.batch, args.seq))

    def fwd_bwd():
        loss, g = loss_and_grad(x, y)
        mx.eval(loss, g)
        return g

    def full_step():
        optimizer.step(model, fwd_bwd())
        mx.eval(model.parameters(), optimizer.state)

    print(f"forward + backward, B={args.batch}, T={args.seq}:")
    fb_s, _ = timed(fwd_bwd, args.iters, 1)
    print(f"  median {fb_s * 1000:.1f} ms")
    print("full step (forward + backward + optimizer):")
    full_s, _ = timed(full_step, args.iters, 1)
    # the share from the two separately timed medians (steadier than full_s on a busy machine)
    share = opt_s / (fb_s + opt_s)
    print(f"  median {full_s * 1000:.1f} ms; optimizer share {100 * share:.1f}% (optimizer / (fwd+bwd + optimizer))")
    result.update({"batch": args.batch, "seq": args.seq, "fwd_bwd_ms": round(fb_s * 1000, 2),
                   "full_step_ms": round(full_s * 1000, 2), "opt_share": round(share, 4)})

print(json.dumps(result))
