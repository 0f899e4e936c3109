"""
Training throughput and memory benchmark on random tokens: builds a model of a given depth, runs
full training steps (compiled forward + backward + MuonAdamW) and prints tokens/s, MFU, peak memory
and the optimizer's share of the step. The last line is JSON.

    python -m scripts.bench_train --depth 12 --device-batch-size 16 --max-seq-len 2048
    python -m scripts.bench_train --depth 4 --device-batch-size 4 --max-seq-len 512 --steps 5   # CPU-sized
    python -m scripts.bench_train --depth 12 --grad-checkpoint 1 --memory-limit 13   # capped: see base_train --memory-limit
    python -m scripts.bench_train --depth 12 --memory-limit 0   # no cap, not even base_train's automatic one
"""
import argparse
import json
import time

import mlxchat  # noqa: F401
import mlx.core as mx

from mlxchat.common import dtype_name, get_compute_dtype

from mlxchat.console import log_to_console
from mlxchat.hardware import device_name, get_peak_flops, memory_cap
from scripts._bench import add_model_args, build_trainer, random_batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GiB: cap MLX's allocator as base_train --memory-limit does (default: base_train's automatic "
                        "cap on CUDA, 1.1x the live memory the first step measures + 0.5 GiB; 0: no cap at all)")
    args = p.parse_args(argv)
    log_to_console()
    with memory_cap(args.memory_limit or None):
        return run(args)


def run(args):
    B, T = args.device_batch_size, args.max_seq_len
    model, optimizer, trainer = build_trainer(args, args.grad_accum)
    config = model.config
    batches = [random_batch(args) for _ in range(2)]
    counter = [0]

    def next_batch():
        counter[0] += 1
        return batches[counter[0] % 2]

    print(f"device {device_name()} ({mx.default_device()}), dtype {dtype_name(get_compute_dtype())}, "
          f"d{args.depth}: {config.n_embd} wide, {sum(v.size for v in model.named_parameters().values()):,} params, B={B} T={T}")
    for _ in range(args.warmup):
        trainer.step(next_batch)
    mx.reset_peak_memory()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss, _ = trainer.step(next_batch)
        times.append(time.perf_counter() - t0)
        print(f"step {i}: {times[-1] * 1000:.1f} ms, loss {loss:.4f}", flush=True)
    peak = mx.get_peak_memory()
    step_time = sorted(times)[len(times) // 2]
    print(f"peak memory of the timed steps: {peak / 2 ** 30:.3f} GiB", flush=True)

    # forward+backward alone (no optimizer): what the optimizer adds to a step is the difference
    fb_times = []
    for _ in range(max(3, args.steps // 2)):
        t0 = time.perf_counter()
        for _ in range(args.grad_accum):
            mx.eval(trainer._fwd_bwd(*next_batch()))
        fb_times.append(time.perf_counter() - t0)
    fwdbwd_time = sorted(fb_times)[len(fb_times) // 2]

    # the optimizer step alone, on gradients of the right shapes
    grads = {k: mx.random.normal(v.shape).astype(v.dtype) * 1e-3 for k, v in model.named_parameters().items()}
    mx.eval(grads)
    for _ in range(2):
        optimizer.step(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    opt_times = []
    for _ in range(max(3, args.steps // 2)):
        t0 = time.perf_counter()
        optimizer.step(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        opt_times.append(time.perf_counter() - t0)
    opt_time = sorted(opt_times)[len(opt_times) // 2]

    tokens = B * T * args.grad_accum
    tok_per_sec = tokens / step_time
    flops = model.estimate_flops() * tok_per_sec
    peak_flops = get_peak_flops()
    result = {
        "device": device_name(), "backend": str(mx.default_device()), "dtype": dtype_name(get_compute_dtype()),
        "depth": args.depth, "n_embd": config.n_embd, "params": sum(v.size for v in model.named_parameters().values()),
        "batch": B, "seq": T, "grad_accum": args.grad_accum, "grad_checkpoint": args.grad_checkpoint,
        "window_pattern": args.window_pattern,
        "step_ms": round(step_time * 1000, 2), "tokens_per_sec": round(tok_per_sec, 1),
        "tflops": round(flops / 1e12, 3), "mfu": round(100 * flops / peak_flops, 2) if peak_flops else None,
        "peak_memory_gib": round(peak / 2 ** 30, 3), "memory_limit_gib": round(mx.get_memory_limit() / 2 ** 30, 3),
        "live_memory_gib": round(trainer.live_bytes / 2 ** 30, 3) if trainer.live_bytes else None,
        "optimizer_ms": round(opt_time * 1000, 2), "optimizer_share": round(opt_time / step_time, 4),
        # in a step the optimizer is queued behind the backward, so its host work overlaps device work:
        # its cost in a step is the step minus forward+backward alone
        "fwdbwd_ms": round(fwdbwd_time * 1000, 2), "optimizer_in_step_ms": round((step_time - fwdbwd_time) * 1000, 2),
        "optimizer_in_step_share": round((step_time - fwdbwd_time) / step_time, 4),
    }
    print(f"{tok_per_sec:,.0f} tok/s | {result['tflops']} TFLOP/s | MFU {result['mfu']} | peak {result['peak_memory_gib']} GiB | "
          f"optimizer alone {result['optimizer_ms']} ms = {100 * result['optimizer_share']:.1f}% of a step, "
          f"in the step {result['optimizer_in_step_ms']} ms = {100 * result['optimizer_in_step_share']:.1f}%")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
