"""
Peak memory (and time) of one compiled forward+backward of the model at nanochat's d12 shape, on
random tokens, with the loss and attention implementations picked on the command line. Weights and
gradients are counted in the peak (as in a training step); the optimizer is not.

    python -m scripts.bench_memory                                  # the defaults (auto, auto)
    python -m scripts.bench_memory --ce reference --attn sdpa       # the pre-issue-9 paths
    MLXCHAT_DTYPE=bfloat16 python -m scripts.bench_memory --batch 1
    python -m scripts.bench_memory --sweep                          # all four combinations, one process each

--ce:   chunked   = mlxchat.kernels.linear_cross_entropy (lm_head + softcap + CE in row chunks, custom VJP)
        reference = the plain formula (full (B*T, V) fp32 logits, MLX autograd)
--recompute: on/off = gpt.recompute_backward's custom VJPs (keep fewer activations) or MLX's autodiff
--attn: sdpa      = mx.fast.scaled_dot_product_attention with MLX's own VJP
        blockwise = mlxchat.kernels.attention's custom VJP (query-block recompute in the backward)
        banded    = mlxchat.kernels.banded_attention (window layers as one fused call on the diagonal band)
        auto      = the per-backend rule in mlxchat.kernels.attention_impl
Each combination runs in a fresh process under --sweep, so compile caches and the allocator's
peak do not leak between them. The last line printed is JSON.

Predictions, written before measuring (fp32 on the CPU, d12, B=2, T=2048, so B*T = 4096 rows):
- weights 286.3M params = 1.07 GiB, their gradients another 1.07 GiB (value embeddings get dense grads).
- chunked CE: the reference keeps tanh(logits/15) and the capped logits, two fp32 (4096, 32768)
  arrays = 2 x 0.5 GiB, alive for the backward, and its backward makes 2-3 more of that size
  (softmax, the one-hot scatter, the tanh derivative) while every block's activations are alive.
  The chunked one keeps one fp32 per row and works on 1024-row chunks (~0.13 GiB each, 2-3 of
  them). Predicted saving: 1.5-2.0 GiB of peak (the same in bf16: the CE math is fp32 there too).
- blockwise attention: the unfused VJP keeps the softmax output, (B, H, T, T) = 2*6*2048^2 fp32 =
  0.19 GiB per layer, 12 layers = 2.25 GiB, and its backward makes 2-3 more (dP, dS) for the layer
  being differentiated. The blockwise VJP keeps q, k, v, out (already counted elsewhere) and makes
  (B, H, 256-query block, keys) blocks (~25 MB each). Predicted saving: 2.3-2.7 GiB in fp32,
  about half that in bf16 (the probabilities are bf16 there).
- bf16 (MLXCHAT_DTYPE=bfloat16) at B=1 (the CPU's bf16 matmuls are ~10x slower than fp32): chunked
  CE 0.7-1.0 GiB (two fp32 (2048, 32768) arrays kept = 0.5 GiB, plus the backward's transients);
  blockwise attention 0.6-0.7 GiB (12 layers x (1, 6, 2048, 2048) bf16 = 0.56 GiB, plus transients).

Measured (Linux CPU, 2 shared cores, MLX 0.32.4, with the model as of session 1: before relu^2's custom
VJP and the fused QKV projection, which lower these peaks further; peak GiB incl. 1.07 GiB fp32 / 0.74 GiB bf16 weights;
"throttled" = --throttle, the schedule's own peak without MLX's run-ahead):

    fp32 B=2                      default  saving   throttled  saving   time (default)
    reference CE, sdpa             9.415     -        8.724      -       104 s
    chunked CE,   sdpa             8.037   1.378      7.157    1.567     111 s
    reference CE, blockwise        6.799   2.616      6.634    2.090      64 s
    chunked CE,   blockwise        5.884   3.531      4.985    3.739      59 s
    bf16 B=1
    reference CE, sdpa             3.960     -        3.639      -       560 s
    chunked CE,   sdpa             3.463   0.497
    reference CE, blockwise        3.306   0.654
    chunked CE,   blockwise        2.912   1.048      2.426    1.213     487 s

Session 3 (2026-11-24), gpt.recompute_backward's custom VJPs, fp32 on the CPU, d12 B=4 T=2048
(the issue's CPU configuration; `--batch 4 --recompute off|on`): peak 9.932 -> 7.506 GiB (weights
1.066 GiB included), the same loss, 146 -> 141 s. Predicted: ~10 (B, T, C) arrays per layer fewer
(2 norm inputs, the rotated and the normed q/k = 2 x 2, relu^2's output = 4) = 3.0 GiB; measured
2.43 GiB = 8.6 per layer. Then each weight gradient (and the lambdas') ordered before the input
gradient (gpt.ordered_matmul, gpt.mix_residual): 6.919 GiB, 144 s; with --grad-checkpoint 1 (now
gpt.checkpointed_block): 3.333 GiB, 150 s (with nn.utils.checkpoint it had been 7.506 GiB: no saving).

The CE saving came in under the prediction (the reference's backward transients overlap less
with the peak than assumed); the attention saving is as predicted.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx is imported)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxchat.common import dtype_name, get_compute_dtype

from mlxchat.hardware import gpu_kind
from mlxchat.gpt import GPT, GPTConfig, RECOMPUTE_PIECES, compute_window_sizes, recompute_backward
from mlxchat import kernels

GIB = 2 ** 30


def measure(args):
    # the implementations are picked through the environment (read when the graph is traced), so
    # bench_train and base_train can be A/B'd the same way
    os.environ["MLXCHAT_CE"] = args.ce
    os.environ["MLXCHAT_ATTENTION"] = args.attn
    os.environ["MLXCHAT_RECOMPUTE"] = args.recompute
    config = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab_size, n_layer=args.depth,
                       n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                       window_pattern=args.window_pattern)
    mx.random.seed(args.seed)  # the same weights and tokens in every run
    model = GPT(config)
    model.grad_checkpoint = bool(args.grad_checkpoint)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for v in model.named_parameters().values())
    tokens = mx.random.randint(0, args.vocab_size, (args.batch, args.seq + 1)).astype(mx.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    mx.eval(x, y)

    if args.throttle:
        # With the active memory over the limit, MLX's eval waits for the running ops before it
        # schedules (and allocates for) the next one. A 1-byte limit turns off the run-ahead, so the
        # peak is what the schedule itself needs; without it, the peak also counts the outputs of
        # the ops allocated ahead of the ones computing (up to ~100 ops on the CPU).
        mx.set_memory_limit(1)
    loss_and_grad = nn.value_and_grad(model, lambda a, b: model(a, b))
    if not args.no_compile:
        loss_and_grad = mx.compile(loss_and_grad, inputs=model.state, outputs=model.state)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    loss, grads = loss_and_grad(x, y)
    mx.eval(loss, grads)
    dt = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    grad_bytes = sum(g.nbytes for _, g in tree_flatten(grads))
    result = {
        "backend": str(mx.default_device()), "dtype": dtype_name(get_compute_dtype()),
        "ce": args.ce, "attn": args.attn, "recompute": [p for p in RECOMPUTE_PIECES if recompute_backward(p)],
        # what each distinct layer window gets (on CUDA the rule differs between S and L layers)
        "attn_rule": " ".join(f"w{w}:" + kernels.attention_impl(args.batch, config.n_head, args.seq, config.n_embd // config.n_head,
                                                                get_compute_dtype(), w, args.attn)
                              for w in sorted(set(compute_window_sizes(config)))),
        "depth": args.depth, "batch": args.batch, "seq": args.seq, "compiled": not args.no_compile,
        "grad_checkpoint": args.grad_checkpoint, "throttle": args.throttle,
        "loss": round(loss.item(), 5), "seconds": round(dt, 1),
        "weights_gib": round(weights / GIB, 3), "grads_gib": round(grad_bytes / GIB, 3),
        "active_before_gib": round(base / GIB, 3),
        "peak_gib": round(peak / GIB, 3),
        # what the step itself adds on top of the weights: activations, transients, gradients
        "step_peak_gib": round((peak - base) / GIB, 3),
    }
    print(f"{result['dtype']} ce={args.ce} attn={args.attn} ({result['attn_rule']}) recompute={result['recompute']}: peak {result['peak_gib']:.3f} GiB "
          f"(weights {result['weights_gib']:.3f} + step {result['step_peak_gib']:.3f}), loss {result['loss']:.4f}, "
          f"{result['seconds']:.1f} s", flush=True)
    return result


def sweep(args, argv):
    # one fresh process per combination: compile caches and the allocator's peak stay separate
    passthrough = [a for a in argv if a != "--sweep"]
    rows = []
    combos = [("reference", "sdpa"), ("chunked", "sdpa"), ("reference", "blockwise"), ("chunked", "blockwise")]
    if gpu_kind() == "cuda":
        combos.append(("chunked", "auto"))  # the per-shape rule mixes the two attentions there
    for ce, attn in combos:
        cmd = [sys.executable, "-m", "scripts.bench_memory", *passthrough, "--ce", ce, "--attn", attn]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        print(out[-2], flush=True)
        rows.append(json.loads(out[-1]))
    base = rows[0]["peak_gib"]
    for r in rows:
        print(f"  ce={r['ce']:<9} attn={r['attn']:<9} peak {r['peak_gib']:7.3f} GiB  saving {base - r['peak_gib']:6.3f} GiB  {r['seconds']:6.1f} s")
    return {"sweep": rows}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-kv-head", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ce", choices=["auto", "chunked", "reference"], default="auto")
    p.add_argument("--attn", choices=["auto", "sdpa", "banded", "blockwise"], default="auto")
    p.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                   help="the memory-saving custom VJPs of gpt.py (norms, rotary + QK norm, relu^2 + projection): gpt.recompute_backward")
    p.add_argument("--grad-checkpoint", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--throttle", action="store_true", help="1-byte memory limit: no run-ahead, the schedule's own peak")
    p.add_argument("--sweep", action="store_true", help="run all implementation combinations, one process each")
    args = p.parse_args(argv)
    result = sweep(args, argv) if args.sweep else measure(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
