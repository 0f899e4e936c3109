"""
Supervised finetuning (SFT): teach a pretrained base model to chat. nanochat's chat_sft in MLX.

The base model has only seen plain text. SFT trains it on conversations rendered with the chat
special tokens (tokenizer.render_conversation), with the loss only on what the assistant says: its
text, its calculator calls and <|assistant_end|>. The user's turns and the tool's outputs are context.

Conversations are packed into rows of max_seq_len+1 tokens, best fit (the longest conversation of a
buffer of 100 that still fits), and a row that no buffered conversation fits is padded with <|bos|>,
never cropped: every conversation is seen whole, and padding is never a target.

Mixtures (--mixture):
    nanochat   nanochat's: SmolTalk train + 3 epochs of MMLU auxiliary_train + 4 of GSM8K train
               (val: SmolTalk test, MMLU test[:5200], GSM8K test[:420]); downloads on first use
    demo       offline: the chat set shipped with mlxchat (mlxchat/data/demo_chat: identity, greetings,
               spelling, State of the Union facts, calculator arithmetic in GSM8K's format), plus the
               real MMLU dev/validation and ARC validation splits when the task cache holds them
               (val: the demo set's val files, plus MMLU test[:5200] / GSM8K test[:420] when cached)
    FILE.jsonl your own conversations, CustomJSON format (one JSON array of messages per line); the
               last 5% (at most 500) are held out for validation

Examples:
    python -m scripts.chat_sft                                    # after base_train, nanochat's recipe
    python -m scripts.chat_sft --mixture demo --max-seq-len 512 --device-batch-size 8 \\
        --total-batch-size 8192 --eval-every 50 --eval-tokens 100000   # the offline demo
    python -m scripts.chat_sft ... --resume-from-step -2          # continue a stopped run from its last checkpoint

Batch size, sequence length and learning rates default to the base checkpoint's (its meta file).
Ctrl-C finishes the current step, saves a checkpoint and exits with status 130 (a second Ctrl-C aborts).
The loop itself is mlxchat.sft.SFTRun: this script is its shell.

Data parallel across processes / Macs, as base_train (start every rank with mlx.launch):
    mlx.launch --hosts 192.168.1.10,192.168.1.11 --backend ring --cwd "$PWD" --env MLXCHAT_BASE_DIR=$HOME/.cache/mlxchat \\
        -- "$PWD/.venv/bin/python" -m scripts.chat_sft --mixture demo
Rank r packs conversations r, r+W, ... of the mixture; gradients are averaged before every step. Only
rank 0 needs the base checkpoint (base_train writes it on rank 0's machine): it sends the weights and the
optimizer state to the others. Every rank needs the same tokenizer and task data.

Upstream edge case, fixed here: in nanochat a conversation longer than max_seq_len+1 tokens never fits
a row, stays in the buffer forever, and once the buffer holds only such conversations every row is
padding; a batch without any target then gives a NaN mean loss (nanochat PR #803, unmerged). Here such
conversations (and any without a single supervised token) are skipped when fetched, counted, and
reported, so every row holds at least one supervised token. The model's loss also divides by
max(1, number of targets), so even an all-padding batch would give 0, not NaN.
"""
import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)

from mlxchat.sft import SFTConfig, SFTRun
from scripts._shell import Console, ReportCard, Wandb, config_from_args, drive, join_group, launched_argv, make_parser, run_main, show_library_logs


def get_args(argv=None):
    return make_parser(__doc__, SFTConfig).parse_args(launched_argv(argv))


def main(argv=None):
    """Fine-tune as the command line says; returns the run's result (the tests read it)."""
    args = get_args(argv)
    config = config_from_args(SFTConfig, args)
    config.validate()  # before joining the other ranks: a bad flag fails at once on every Mac
    rank, _ = join_group(config)
    show_library_logs()
    console = Console(args.log_every, rank)
    run = SFTRun(config, freeze_gc=True)
    user_config = dict(vars(args))
    consumers = [console, Wandb("mlxchat-sft", args.run, user_config, rank, every=10, console=console),
                 ReportCard("sft", "Chat SFT", user_config)]
    result = drive(run, consumers, console)
    if rank == 0 and result.get("checkpoint_dir"):
        console.message(f"checkpoint: {result['checkpoint_dir']}")
    return result


if __name__ == "__main__":
    run_main(main)
