"""
Per-kernel profile of one training step, one optimizer step or one decode step, on a CUDA GPU.

MLX has no profiler of its own on CUDA. PyTorch's profiler reads CUPTI's kernel activity records,
which cover every kernel the process launches, MLX's included: so with PyTorch installed beside
MLX (it is on our lent H100) this script times MLX's kernels without replaying them. It prints the
GPU time per kernel category and the top kernels, the GPU-busy time against the wall time (the gap
is host overhead: graph building, launches, syncs), and writes everything as JSON.

    python -m scripts.bench_profile --what train --depth 12 --device-batch-size 16 --max-seq-len 2048
    python -m scripts.bench_profile --what decode --depth 12 --batch-size 1
    python -m scripts.bench_profile --what optim --depth 12
    python -m scripts.bench_profile --what overhead          # MLX's own cost per op on this device (any backend)

Without PyTorch: `ncu --clock-control none --cache-control none --print-summary per-kernel python -m
scripts.bench_profile ... --no-torch` gives the same kernel table (slower: it replays each kernel).
"""
import argparse
import json
import re
import time
from collections import defaultdict

import mlxchat  # noqa: F401
import mlx.core as mx

from mlxchat.common import dtype_name, get_compute_dtype

from mlxchat.console import log_to_console
from mlxchat.hardware import device_name
from scripts._bench import add_model_args, build_trainer, random_batch

# kernel name -> category, first match wins (MLX's CUDA kernel names, cuBLAS/cuDNN's)
CATEGORIES = [
    ("attention (cuDNN)", r"cudnn|sdpa|flash|fmha|attn"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|gemv"),
    ("reduction", r"reduce|all_reduce|row_reduce|col_reduce|softmax|logsumexp|rms_norm|rmsnorm|layer_norm|arg_reduce"),
    ("compiled (fused elementwise)", r"compiled|fused|^G\w*"),
    ("copy / gather / scatter", r"copy|gather|scatter|slice|concat|pad|transpose|memcpy|memset|fill"),
    ("sort / scan", r"sort|scan|cumsum|partition"),
    ("elementwise", r"unary|binary|ternary|elementwise|Add|Multiply|Subtract|Divide|Exp|Sigmoid|Tanh|Maximum|Select|Square|Power"),
]


def categorize(name):
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def busy_time(intervals):
    """Length of the union of (start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def profile_kernels(fn, repeats):
    """Run fn() `repeats` times under PyTorch's CUPTI profiler; kernel events per run averaged."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.zeros(1, device="cuda")  # CUDA/CUPTI initialised before profiling starts
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
    wall = (time.perf_counter() - t0) / repeats
    kernels = []
    for ev in prof.events():
        dev = getattr(ev, "device_type", None)
        if dev is not None and "CUDA" in str(dev) and ev.time_range.end > ev.time_range.start:
            kernels.append((ev.name, ev.time_range.start, ev.time_range.end))
    return kernels, wall


def summarize(kernels, wall, repeats, top=30):
    by_name = defaultdict(lambda: [0.0, 0])
    by_cat = defaultdict(float)
    for name, s, e in kernels:
        by_name[name][0] += (e - s) / repeats
        by_name[name][1] += 1
        by_cat[categorize(name)] += (e - s) / repeats
    gpu_sum = sum(by_cat.values())  # microseconds
    busy = busy_time([(s, e) for _, s, e in kernels]) / repeats
    print(f"wall {wall * 1e3:.2f} ms per run | GPU busy {busy / 1e3:.2f} ms | kernel time summed {gpu_sum / 1e3:.2f} ms | "
          f"{len(kernels) // max(repeats, 1)} kernels per run | host/idle gap {wall * 1e3 - busy / 1e3:.2f} ms")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:32s} {us / 1e3:9.2f} ms  {100 * us / max(gpu_sum, 1e-9):5.1f}%")
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    print(f"top {top} kernels (ms per run, launches per run):")
    for name, (us, n) in rows[:top]:
        print(f"  {us / 1e3:8.3f} ms {n // max(repeats, 1):5d}x  [{categorize(name)}] {name[:150]}")
    return {"wall_ms": wall * 1e3, "gpu_busy_ms": busy / 1e3, "kernel_sum_ms": gpu_sum / 1e3,
            "kernels_per_run": len(kernels) // max(repeats, 1),
            "categories_ms": {k: v / 1e3 for k, v in by_cat.items()},
            "top": [{"name": n, "ms": us / 1e3, "launches": c // max(repeats, 1)} for n, (us, c) in rows[:100]]}


def op_chain(op, n):
    """op applied n times in a row, compiled into one graph: n kernels, each waiting on the last."""
    def chain(v):
        for _ in range(n):
            v = op(v)
        return v
    return mx.compile(chain)


def kernel_overhead(width=768, lengths=(48, 384), repeats=50):
    """MLX's cost per op on this device, apart from the op's own work: compiled chains of n ops that
    each run as one kernel on one row, evaluated synchronously: "linear" is v @ W.T, the layout of
    every nn.Linear and of the decode step's projections (MLX's CUDA backend runs it with its own
    gemv kernel); "matmul" is v @ W, a row times an untransposed matrix (cuBLAS there); "rms_norm"
    is mx.fast.rms_norm. The time difference between the two chain lengths over the difference in kernels
    is the cost per kernel (the fixed cost of an eval cancels). A decode step of a small model is a
    chain like these: its speed is about (kernels per token) x this."""
    dtype = get_compute_dtype()
    x = mx.random.normal((1, width)).astype(dtype)
    w = (mx.random.normal((width, width)) / width ** 0.5).astype(dtype)
    out = {}
    ops = [("linear", lambda v: v @ w.T), ("matmul", lambda v: v @ w),
           ("rms_norm", lambda v: mx.fast.rms_norm(v, None, 1e-5))]
    for name, op in ops:
        secs = {}
        for n in lengths:
            f = op_chain(op, n)
            for _ in range(3):
                mx.eval(f(x))
            t0 = time.perf_counter()
            for _ in range(repeats):
                mx.eval(f(x))
            secs[n] = (time.perf_counter() - t0) / repeats
        lo, hi = lengths
        out[name] = {"us_per_kernel": (secs[hi] - secs[lo]) / (hi - lo) * 1e6,
                     "ms_per_chain": {str(n): t * 1e3 for n, t in secs.items()}}
        print(f"{name:8s}: {out[name]['us_per_kernel']:.2f} us per kernel "
              f"(chains of {lo} / {hi}: {secs[lo] * 1e3:.3f} / {secs[hi] * 1e3:.3f} ms)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="train", choices=["train", "fwdbwd", "optim", "decode", "attn", "overhead"])
    p.add_argument("--mask", default="causal", choices=["causal", "window", "additive", "banded", "blockwise"],
                   help="attn: causal, or a sliding window as a boolean (T, T) mask (window), as a (T, T) additive "
                        "mask (additive), by kernels.banded_attention (banded) or kernels.attention (blockwise)")
    p.add_argument("--window", type=int, default=512, help="attn: window size (nanochat's S layers at T=2048: 512)")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, default=1, help="decode: rows")
    p.add_argument("--prompt-tokens", type=int, default=512, help="decode: context before the profiled steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--no-torch", action="store_true", help="just run the work (for an external profiler such as ncu)")
    args = p.parse_args(argv)
    log_to_console()

    if args.what == "overhead":
        print(f"device {device_name()}, dtype {dtype_name(get_compute_dtype())}: cost per MLX kernel")
        result = {"what": "overhead", "device": device_name(), **kernel_overhead(repeats=max(args.repeats, 10))}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return result
    if args.what in ("train", "fwdbwd", "optim"):
        model, optimizer, trainer = build_trainer(args)
        batch = random_batch(args)
        if args.what == "train":
            def fn():
                trainer.step(lambda: batch)
        elif args.what == "fwdbwd":
            def fn():
                loss, grads = trainer._fwd_bwd(*batch)
                mx.eval(loss, grads)
        else:
            grads = {k: (mx.random.normal(v.shape) * 1e-3).astype(v.dtype) for k, v in model.named_parameters().items()}
            mx.eval(grads)

            def fn():
                optimizer.step(model, grads)
                mx.eval(model.parameters(), optimizer.state)
    elif args.what == "attn":
        import math
        from mlxchat import kernels
        B, T, D = args.device_batch_size, args.max_seq_len, args.head_dim
        H = max(1, args.depth * args.aspect_ratio // D)
        dt = get_compute_dtype()
        q, k, v, g = (mx.random.normal((B, H, T, D)).astype(dt) for _ in range(4))
        mx.eval(q, k, v, g)
        if args.mask == "causal":
            mask = "causal"
        else:
            mask = kernels.additive_window_mask(T, T, 0, args.window, dt)
            if args.mask == "window":
                mask = mask == 0
        if args.mask == "blockwise":
            def attn(q, k, v):
                return kernels.attention(q, k, v, args.window)
        elif args.mask == "banded":
            def attn(q, k, v):
                return kernels.banded_attention(q, k, v, args.window)
        else:
            def attn(q, k, v):
                return mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(D), mask=mask)
        fwd_bwd = mx.compile(mx.value_and_grad(lambda q, k, v: (attn(q, k, v) * g).astype(mx.float32).sum(), argnums=(0, 1, 2)))
        print(f"attention B={B} H={H} T={T} D={D} {dtype_name(dt)} mask={args.mask} window={args.window}")

        def fn():
            mx.eval(fwd_bwd(q, k, v))
    else:
        from mlxchat.engine import Engine, KVCache
        from mlxchat.quantize import cast_linear_weights
        from mlxchat.gpt import GPT, GPTConfig
        model = GPT(GPTConfig.from_depth(args.depth))
        mx.eval(model.parameters())
        cast_linear_weights(model)
        engine = Engine(model, None, compile=True)
        B = args.batch_size
        cache = KVCache.for_model(model, B, args.prompt_tokens + 4096)
        prompt = mx.random.randint(0, model.config.vocab_size, (B, args.prompt_tokens)).astype(mx.int32)
        mx.eval(model(prompt, kv_cache=cache))
        state = {"col": mx.zeros((B,), dtype=mx.int32), "key": mx.random.key(0)}

        def fn():
            col, key = engine._decode_step(cache, state["col"], state["key"], 0.0, None, None)
            mx.eval(col, key)
            state["col"], state["key"] = col, key

    for _ in range(args.warmup):
        fn()
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        fn()
    mx.synchronize()
    plain = (time.perf_counter() - t0) / args.repeats
    peak = mx.get_peak_memory() / 2 ** 30
    print(f"device {device_name()}, dtype {dtype_name(get_compute_dtype())}, {args.what}: {plain * 1e3:.2f} ms per run "
          f"(unprofiled), peak memory {peak:.2f} GiB")
    result = {"what": args.what, "device": device_name(), "args": vars(args), "unprofiled_ms": plain * 1e3, "peak_gib": peak}
    if not args.no_torch:
        kernels, wall = profile_kernels(fn, args.repeats)
        result.update(summarize(kernels, wall, args.repeats, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
