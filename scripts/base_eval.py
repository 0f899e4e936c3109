"""
Evaluate a base model (nanochat's scripts/base_eval.py, in MLX). Three modes, comma-separated:
    --eval core    CORE metric (22 ICL tasks of the DCLM eval bundle, downloaded once)
    --eval bpb     bits per byte on the train and val shards
    --eval sample  greedy completions of a few prompts, plus unconditioned samples
Default: all three.

    python -m scripts.base_eval                                     # the largest base model, last step
    python -m scripts.base_eval --model-tag d12 --step 5000 --eval core
    python -m scripts.base_eval --max-per-task 100 --split-tokens 524288    # quick and approximate
    python -m scripts.base_eval --checkpoint-dir ~/nanochat/base_checkpoints/d20   # any directory, nanochat's too
    mlx.launch -n 2 scripts/base_eval.py --eval core                 # CORE items and bpb rows split over processes

CORE results go to {base_dir}/base_eval/base_model_{step:06d}.csv. Prompts longer than the model can
forward are cropped from the left (see mlxchat/core_eval.py); --max-seq-len crops harder.
"""
import argparse
import os

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)
from tqdm import tqdm

from mlxchat.checkpoint_manager import SOURCE_DIRS, build_model, find_largest_model, find_last_step, find_tokenizer_dir
from mlxchat.common import atomic_write_text, get_base_dir, print0
from mlxchat.console import log_to_console
from mlxchat.core_eval import EvalBundleError, dist_info, evaluate_core
from mlxchat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from mlxchat.dataset import DataError
from mlxchat.engine import Engine
from mlxchat.loss_eval import evaluate_bpb
from mlxchat.pretrain import SAMPLE_PROMPTS  # the prompts training samples, so the two can be compared


def load(args):
    """(model, tokenizer, meta, token_bytes, step)."""
    from mlxchat.tokenizer import compute_token_bytes, get_tokenizer, load_token_bytes, TokenizerError
    if args.checkpoint_dir:
        checkpoint_dir = os.path.abspath(os.path.expanduser(args.checkpoint_dir))
    else:
        checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS["base"])
        checkpoint_dir = os.path.join(checkpoints_dir, args.model_tag or find_largest_model(checkpoints_dir))
    step = args.step if args.step is not None else find_last_step(checkpoint_dir)
    model, tokenizer, meta = build_model(checkpoint_dir, step)
    tok_dir = find_tokenizer_dir(checkpoint_dir)
    if tokenizer is None:
        tokenizer = get_tokenizer()
    try:
        token_bytes = load_token_bytes(tok_dir if tok_dir is not None else os.path.join(get_base_dir(), "tokenizer"))
    except TokenizerError:
        token_bytes = compute_token_bytes(tokenizer)  # no token_bytes file: measure them
    return model, tokenizer, meta, token_bytes, step


def run_samples(model, tokenizer):
    """The prompts completed greedily, then unconditioned samples from <|bos|>."""
    engine = Engine(model, tokenizer)
    samples, unconditioned = [], []
    print0("\nConditioned samples:")
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer(prompt, prepend="<|bos|>")
        sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        sample_str = tokenizer.decode(sample[0])
        print0("-" * 80)
        print0(sample_str)
        samples.append(sample_str)
    print0("\nUnconditioned samples:")
    tokens = tokenizer("", prepend="<|bos|>")
    uncond, _ = engine.generate_batch(tokens, num_samples=8, max_tokens=128, temperature=1.0)
    for sample in uncond:
        sample_str = tokenizer.decode(sample)
        print0("-" * 80)
        print0(sample_str)
        unconditioned.append(sample_str)
    return samples, unconditioned


def run_bpb(model, tokenizer, token_bytes, sequence_len, device_batch_size, split_tokens, data_dir):
    rank, world_size, _ = dist_info()
    tokens_per_step = device_batch_size * sequence_len * world_size
    if split_tokens % tokens_per_step != 0:
        split_tokens = (split_tokens // tokens_per_step) * tokens_per_step
        print0(f"Adjusted split_tokens to {split_tokens} (must be divisible by {tokens_per_step})")
    steps = split_tokens // tokens_per_step
    if steps < 1:
        steps = 1
        print0(f"--split-tokens is below one batch ({tokens_per_step} tokens): evaluating one batch per split")
    results = {}
    for split_name in ["train", "val"]:
        loader = tokenizing_distributed_data_loader_bos_bestfit(
            tokenizer, device_batch_size, sequence_len, split_name, data_dir=data_dir, rank=rank, world_size=world_size)
        bar = tqdm(loader, total=steps, desc=f"bpb {split_name}", leave=False, disable=rank != 0)
        try:
            bpb = evaluate_bpb(model, bar, steps, token_bytes)
        finally:
            bar.close()
            loader.close()
        results[split_name] = bpb
        print0(f"{split_name} bpb: {bpb:.6f}")
    return results


def write_core_csv(path, core_results):
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n"]
    for label, acc in core_results["results"].items():
        centered = core_results["centered_results"][label]
        lines.append(f"{label:<35}, {acc:<10.6f}, {centered:<10.6f}\n")
    lines.append(f"{'CORE':<35}, {'':<10}, {core_results['core_metric']:<10.6f}\n")
    atomic_write_text(path, "".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated evaluations to run: core,bpb,sample (default: all)")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag of the base checkpoint (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="model step to load (default: the last)")
    parser.add_argument("--checkpoint-dir", type=str, default=None, help="evaluate this checkpoint directory instead (ours or nanochat's)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="max examples per CORE task (-1 = all)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="per-device batch size for the bpb evaluation")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens to evaluate per split for bpb")
    parser.add_argument("--data-dir", type=str, default=None, help="parquet shards for bpb (default <base>/base_data_climbmix; 'demo' = the bundled corpus)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="CORE: crop prompts to their last N tokens (default: only what the model cannot forward)")
    args = parser.parse_args(argv)
    log_to_console()

    eval_modes = set(mode.strip() for mode in args.eval.split(",") if mode.strip())
    valid_modes = {"core", "bpb", "sample"}
    invalid = eval_modes - valid_modes
    if invalid or not eval_modes:
        parser.error(f"Invalid eval modes: {sorted(invalid)}. Valid: {sorted(valid_modes)}")
    if args.device_batch_size < 1 or args.split_tokens < 1:
        parser.error("--device-batch-size and --split-tokens must be >= 1")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        parser.error("--max-seq-len must be >= 2")
    rank, _, _ = dist_info()

    model, tokenizer, meta, token_bytes, step = load(args)
    sequence_len = meta["model_config"]["sequence_len"]
    model_name = f"base_model (step {step})"
    model_slug = f"base_model_{step:06d}"
    print0(f"Evaluating model: {model_name}")
    print0(f"Eval modes: {', '.join(sorted(eval_modes))}")

    out = {"core": None, "bpb": {}, "samples": [], "unconditioned_samples": [], "csv_path": None}

    if "sample" in eval_modes:
        print0("\n" + "=" * 80)
        print0("Model Samples")
        print0("=" * 80)
        if rank == 0:
            out["samples"], out["unconditioned_samples"] = run_samples(model, tokenizer)

    if "bpb" in eval_modes:
        print0("\n" + "=" * 80)
        print0("BPB Evaluation")
        print0("=" * 80)
        try:
            out["bpb"] = run_bpb(model, tokenizer, token_bytes, sequence_len, args.device_batch_size, args.split_tokens, args.data_dir)
        except DataError as e:
            raise SystemExit(f"bpb evaluation failed: {e}")

    if "core" in eval_modes:
        print0("\n" + "=" * 80)
        print0("CORE Evaluation")
        print0("=" * 80)
        try:
            core_results = evaluate_core(model, tokenizer, max_per_task=args.max_per_task, max_seq_len=args.max_seq_len)
        except EvalBundleError as e:
            raise SystemExit(f"CORE evaluation failed: {e}")
        out["core"] = core_results
        if rank == 0:
            output_csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_slug}.csv")
            write_core_csv(output_csv_path, core_results)
            out["csv_path"] = output_csv_path
            print0(f"\nResults written to: {output_csv_path}")
            print0(f"CORE metric: {core_results['core_metric']:.4f}")

    # the run report's "Base model evaluation" section (its summary table reads "CORE")
    from mlxchat.report import get_report
    core_results = out["core"]
    get_report().log(section="Base model evaluation", data=[
        {"Model": model_name, "Checkpoint": args.checkpoint_dir, "Eval modes": ",".join(sorted(eval_modes)),
         "CORE": core_results["core_metric"] if core_results else None,
         "train bpb": out["bpb"].get("train"), "val bpb": out["bpb"].get("val")},
        {f"{label} (centered)": value for label, value in core_results["centered_results"].items()} if core_results else None,
        "\n".join(["Samples:"] + [f"    {s!r}" for s in out["samples"]]) if out["samples"] else None,
    ])

    print0("\n" + "=" * 80)
    print0(f"Summary: {model_name}")
    for split_name, bpb in out["bpb"].items():
        print0(f"{split_name} bpb: {bpb:.6f}")
    if out["core"] is not None:
        print0(f"CORE metric: {out['core']['core_metric']:.4f}")
    return out


if __name__ == "__main__":
    main()
