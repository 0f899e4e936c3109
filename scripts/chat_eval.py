"""
Evaluate a chat model (nanochat's scripts/chat_eval.py, in MLX) on ARC-Easy, ARC-Challenge, MMLU,
GSM8K and HumanEval, and report ChatCORE when all five ran.

    python -m scripts.chat_eval -i sft                       # all tasks
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K"   # some tasks
    python -m scripts.chat_eval -i rl -a GSM8K -n 8 -t 1.0   # pass@8 with sampling
    python -m scripts.chat_eval --checkpoint-dir ~/nanochat/chatsft_checkpoints/d20 -x 100
    mlx.launch -n 2 scripts/chat_eval.py -i sft              # problems split over processes

Categorical tasks (multiple choice) need no sampling: a batch of prompts goes through the model once
and the answer is the allowed letter with the largest logit at the <|assistant_start|> position.
Generative tasks sample num_samples completions per problem; a problem passes if any of them does.
A prompt longer than the model can forward is cropped from the left (nanochat would crash).
The evaluation itself lives in mlxchat/chat_eval.py; this is its command line.
"""
import argparse

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)

from mlxchat.chat_eval import ALL_TASKS, BASELINE_ACCURACIES, chatcore, run_chat_eval
from mlxchat.checkpoint_manager import build_model, find_last_step, load_model
from mlxchat.common import print0
from mlxchat.console import log_to_console
from mlxchat.engine import Engine


def load(args):
    if args.checkpoint_dir:
        step = args.step if args.step is not None else find_last_step(args.checkpoint_dir)
        model, tokenizer, meta = build_model(args.checkpoint_dir, step)
    else:
        model, tokenizer, meta = load_model(args.source, model_tag=args.model_tag, step=args.step)
    if tokenizer is None:
        from mlxchat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    return model, tokenizer, meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", type=str, default=None, choices=["sft", "rl", "base"], help="source of the model: sft|rl|base (required unless --checkpoint-dir)")
    parser.add_argument("-a", "--task-name", type=str, default=None, help="task name; default = all tasks; use | to split several")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512)
    parser.add_argument("-n", "--num-samples", type=int, default=1)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size for categorical evaluation")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag to load")
    parser.add_argument("-s", "--step", type=int, default=None, help="step to load")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="max problems to evaluate")
    parser.add_argument("--checkpoint-dir", type=str, default=None, help="evaluate this checkpoint directory instead (ours or nanochat's)")
    args = parser.parse_args(argv)
    log_to_console()
    if args.source is None and args.checkpoint_dir is None:
        parser.error("give -i/--source (sft|rl|base) or --checkpoint-dir")
    if args.temperature < 0 or args.top_k < 0 or args.max_new_tokens < 1 or args.num_samples < 1 or args.batch_size < 1:
        parser.error("-t and -k must be >= 0; -m, -n and -b >= 1")
    task_names = ALL_TASKS if args.task_name is None else [t.strip() for t in args.task_name.split("|") if t.strip()]
    unknown = [t for t in task_names if t not in BASELINE_ACCURACIES]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {' | '.join(BASELINE_ACCURACIES)}")

    model, tokenizer, _ = load(args)
    engine = Engine(model, tokenizer)

    results = {}
    for task_name in task_names:
        print0(f"\nEvaluating {task_name}")
        acc = run_chat_eval(
            task_name,
            model, tokenizer, engine,
            batch_size=args.batch_size,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            max_problems=args.max_problems,
            progress=True,
        )
        results[task_name] = acc
        print0(f"{task_name} accuracy: {100 * acc:.2f}%")

    print0("\n" + "=" * 50)
    for task_name, acc in results.items():
        print0(f"{task_name:<15} {100 * acc:6.2f}%")
    chatcore_metric = chatcore(results)
    if chatcore_metric is not None:
        print0(f"{'ChatCORE':<15} {chatcore_metric:.4f}")

    # the run report's "Chat evaluation sft|rl" section (its summary table reads these keys)
    from mlxchat.report import get_report
    get_report().log(section=f"Chat evaluation {args.source or 'checkpoint'}", data=[
        {k: v for k, v in vars(args).items()},
        results,
        {"ChatCORE": chatcore_metric},
    ])
    return {"results": results, "chatcore": chatcore_metric}


if __name__ == "__main__":
    main()
