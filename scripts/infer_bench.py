"""
Inference benchmark for the Engine (nanochat's scripts/infer_bench.py, for MLX): time to first
token, decode throughput at several batch sizes, peak memory, and how close decoding gets to the
memory-bandwidth roofline (MBU).

    python -m scripts.infer_bench --depth 12                       # random-init d12 (timing only)
    python -m scripts.infer_bench -i sft                           # a trained model from the base dir
    python -m scripts.infer_bench --depth 4 --batch-sizes 1,8 --quantize 4
    python -m scripts.infer_bench --depth 4 --compare-compile      # compiled decode step vs eager
    python -m scripts.infer_bench --quantize-eval --checkpoint-dir DIR --data-dir DIR   # bpb cost of 4/8-bit

At small batch the roofline of decoding is memory bandwidth: each step reads every matmul weight
once plus each row's KV cache, so MBU = (weight bytes as stored + batch * kv_read_bytes(context)) /
TPOT / peak bandwidth. (Small models fall far below it: a d12 step is launch/overhead bound.)
Embeddings are not counted (a step reads one row of each). Weights are timed as chat_cli runs them:
stored in the compute dtype (--fp32-weights keeps the fp32 training masters, as nanochat's bench does).
The prompt is random token ids and decoding never stops early (the stop and tool tokens are
disabled), so every batch size decodes exactly --decode-tokens steps. The last line of output is
one JSON document with every number.
"""
import argparse
import json
import math
import os
import statistics
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)
import mlx.core as mx

from mlxchat.common import dtype_name, get_compute_dtype

from mlxchat.hardware import device_name, get_peak_bandwidth, get_peak_flops
from mlxchat.engine import Engine
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.quantize import cast_linear_weights, matmul_weight_bytes, quantize_model


class _NeverStopTokenizer:
    """The Engine asks its tokenizer for the special tokens; ids no model emits make every
    generation run exactly max_tokens steps, with no tool calls."""

    def encode_special(self, text):
        return -1

    def get_bos_token_id(self):
        return -1


def load(args):
    if args.checkpoint_dir or args.source:
        from mlxchat.checkpoint_manager import build_model, find_last_step, load_model
        if args.checkpoint_dir:
            step = args.step if args.step is not None else find_last_step(args.checkpoint_dir)
            model, tokenizer, meta = build_model(args.checkpoint_dir, step)
        else:
            model, tokenizer, meta = load_model(args.source, model_tag=args.model_tag, step=args.step)
        return model, tokenizer
    mx.random.seed(0)
    model = GPT(GPTConfig.from_depth(args.depth))  # nanochat's depth dial: width 64 x depth, heads of 128
    mx.eval(model.parameters())
    return model, None


def prepare(model, args, bits=None):
    """Put the model in the form chat_cli runs: weights in the compute dtype, optionally quantized."""
    if not args.fp32_weights:
        cast_linear_weights(model)
    if bits:
        quantize_model(model, bits, group_size=args.group_size, embeddings=args.quantize_embeddings)
    return model


def timed_generate(engine, prompt, batch_size, decode_tokens):
    """Run one generation; return (ttft, per-step intervals in seconds)."""
    t0 = time.perf_counter()
    stamps = []
    for _ in engine.generate(prompt, num_samples=batch_size, max_tokens=decode_tokens, temperature=0.0):
        stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def bench(model, args, compile=True):
    cfg = model.config
    engine = Engine(model, _NeverStopTokenizer(), compile=compile)
    rng = mx.random.key(1234)
    prompt_len = min(args.prompt_tokens, cfg.sequence_len - args.decode_tokens)
    prompt = mx.random.randint(0, cfg.vocab_size, (prompt_len,), key=rng).tolist()
    context_mid = prompt_len + args.decode_tokens // 2
    peak_bw, peak_flops = get_peak_bandwidth(), get_peak_flops()
    weight_bytes = matmul_weight_bytes(model)
    kv_read = model.kv_read_bytes(context_mid)

    # prefill / TTFT at batch 1: a 2-token generation, after a warmup
    timed_generate(engine, prompt, 1, 2)
    ttft = min(timed_generate(engine, prompt, 1, 2)[0] for _ in range(args.repeats))
    prefill_flops = args.prefill_flops
    out = {"prompt_tokens": prompt_len, "ttft_s": ttft, "prefill_tok_per_s": prompt_len / ttft,
           "prefill_mfu": prefill_flops / ttft / peak_flops if peak_flops else None, "batches": []}
    print(f"prefill {prompt_len} tokens: TTFT {ttft * 1e3:.1f} ms ({prompt_len / ttft:,.0f} tok/s)")

    for B in args.batch_sizes:
        timed_generate(engine, prompt, B, args.decode_tokens)  # warmup: traces every span of this run
        mx.reset_peak_memory()
        ttft_b, steps = timed_generate(engine, prompt, B, args.decode_tokens)
        tpot = statistics.median(steps)
        tok_s = B * len(steps) / sum(steps)
        mbu = (weight_bytes + B * kv_read) / tpot / peak_bw if peak_bw else None
        mfu = B * args.decode_flops / tpot / peak_flops if peak_flops else None
        row = {"batch_size": B, "ttft_s": ttft_b, "tpot_s": tpot, "tok_per_s": tok_s, "mbu": mbu, "mfu": mfu,
               "peak_memory_bytes": mx.get_peak_memory()}
        out["batches"].append(row)
        extra = f", MBU {mbu:.1%}" if mbu is not None else ""
        print(f"batch {B:4d}: TTFT {ttft_b * 1e3:8.1f} ms, TPOT {tpot * 1e3:7.2f} ms, {tok_s:10,.1f} tok/s{extra}, "
              f"peak memory {row['peak_memory_bytes'] / 2**20:,.0f} MiB")
    return out


def quantize_eval(args):
    """bits per byte on the validation split: unquantized vs 8-bit vs 4-bit, same batches."""
    from mlxchat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from mlxchat.loss_eval import evaluate_bpb
    from mlxchat.tokenizer import get_token_bytes, load_token_bytes
    from mlxchat.checkpoint_manager import find_tokenizer_dir
    model, tokenizer = load(args)
    assert tokenizer is not None, "--quantize-eval needs a trained model with its tokenizer (--checkpoint-dir or -i)"
    tok_dir = find_tokenizer_dir(args.checkpoint_dir) if args.checkpoint_dir else None
    token_bytes = load_token_bytes(tok_dir) if tok_dir else get_token_bytes()
    T = min(args.eval_seq_len or model.config.sequence_len, model.config.sequence_len)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, args.eval_batch_size, T, "val", data_dir=args.data_dir)
    batches = [next(loader) for _ in range(args.eval_steps)]  # the very same batches for every model
    results = {}
    for bits in (None, 8, 4):
        if bits is not None:
            model, _ = load(args)  # a fresh copy: quantization is in place
        prepare(model, args, bits)
        bpb = evaluate_bpb(model, batches, args.eval_steps, token_bytes)
        name = dtype_name(get_compute_dtype()) if bits is None else f"{bits}-bit"
        results[bits or 0] = bpb
        delta = f" ({bpb - results[0]:+.5f} vs unquantized)" if bits else ""
        print(f"{name:10s} weights {matmul_weight_bytes(model) / 2**20:8.1f} MiB  val bpb {bpb:.5f}{delta}")
    return {"val_bpb": results[0], "val_bpb_q8": results[8], "val_bpb_q4": results[4],
            "delta_q8": results[8] - results[0], "delta_q4": results[4] - results[0],
            "eval_tokens": args.eval_steps * args.eval_batch_size * T}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12, help="random-init model of nanochat's depth-d shape (when no checkpoint is given)")
    p.add_argument("-i", "--source", default=None, choices=["base", "sft", "rl"], help="benchmark a trained model from the base dir instead")
    p.add_argument("-g", "--model-tag", default=None, help="model tag to load")
    p.add_argument("-s", "--step", type=int, default=None, help="step to load")
    p.add_argument("--checkpoint-dir", default=None, help="load this checkpoint directory (ours or nanochat's)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for TTFT and decoding")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps per batch size")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated decode batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="TTFT: best of this many")
    p.add_argument("--quantize", type=int, default=None, choices=[4, 8], help="quantize the matmul weights to this many bits")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--quantize-embeddings", action="store_true", help="also quantize the embeddings")
    p.add_argument("--fp32-weights", action="store_true", help="keep the fp32 master weights (cast at every matmul, as nanochat)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="decode step compiled with mx.compile (auto: on GPU backends, off on the CPU; see Engine)")
    p.add_argument("--compare-compile", action="store_true", help="run the benchmark both compiled and eager")
    p.add_argument("--quantize-eval", action="store_true", help="instead: val bits per byte unquantized vs 8-bit vs 4-bit")
    p.add_argument("--data-dir", default=None, help="--quantize-eval: folder of parquet shards (the last one is val)")
    p.add_argument("--eval-steps", type=int, default=8, help="--quantize-eval: batches to evaluate")
    p.add_argument("--eval-batch-size", type=int, default=8, help="--quantize-eval: rows per batch")
    p.add_argument("--eval-seq-len", type=int, default=None, help="--quantize-eval: row length (default: the model's context)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.prompt_tokens < 1 or args.decode_tokens < 2:
        p.error("--prompt-tokens must be >= 1 and --decode-tokens >= 2")

    if args.quantize_eval:
        result = quantize_eval(args)
        print(json.dumps(result))
        return result

    model, _ = load(args)
    cfg = model.config
    # FLOP counts before quantization (quantized layers are no longer counted as matmuls)
    prompt_len = min(args.prompt_tokens, cfg.sequence_len - args.decode_tokens)
    context_mid = prompt_len + args.decode_tokens // 2
    args.prefill_flops = model.estimate_prefill_flops(prompt_len)
    args.decode_flops = model.estimate_decode_flops(context_mid)
    counts = model.num_scaling_params()
    prepare(model, args, args.quantize)

    name, peak_bw = device_name(), get_peak_bandwidth()
    weight_bytes, kv_read = matmul_weight_bytes(model), model.kv_read_bytes(context_mid)
    card = {
        "device": name, "backend": str(mx.default_device()), "compute_dtype": dtype_name(get_compute_dtype()),
        "config": cfg.to_dict(), "params": counts["total"], "matmul_weight_bytes": weight_bytes,
        "quantize_bits": args.quantize, "kv_bytes_per_token": model.kv_bytes_per_token(),
        "kv_read_bytes_mid": kv_read, "peak_bandwidth": peak_bw, "peak_flops": get_peak_flops(),
        "decode_ceiling_tok_per_s_b1": peak_bw / (weight_bytes + kv_read) if peak_bw else None,
    }
    print(f"device: {name} ({card['backend']}, {card['compute_dtype']}), peak bandwidth "
          f"{f'{peak_bw / 1e9:,.0f} GB/s' if peak_bw else 'unknown'}")
    print(f"model: depth {cfg.n_layer}, width {cfg.n_embd}, {counts['total']:,} params, matmul weights "
          f"{weight_bytes / 2**20:,.1f} MiB as stored{f' ({args.quantize}-bit)' if args.quantize else ''}")
    print(f"KV cache: {card['kv_bytes_per_token']:,} B/token, {kv_read:,} B read per row per step at context {context_mid}")
    if card["decode_ceiling_tok_per_s_b1"]:
        print(f"batch-1 decode ceiling (bandwidth roofline): {card['decode_ceiling_tok_per_s_b1']:,.0f} tok/s")

    auto = mx.default_device() == mx.gpu
    modes = [True, False] if args.compare_compile else [{"auto": auto, "on": True, "off": False}[args.compile]]
    for compiled in modes:
        print(f"--- decode step {'compiled (mx.compile)' if compiled else 'eager'}")
        card["compiled" if compiled else "eager"] = bench(model, args, compile=compiled)
    print(json.dumps(card))
    return card


if __name__ == "__main__":
    main()
