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

Ctrl-C saves a checkpoint at the end of the current step and exits with status 130 (a second Ctrl-C aborts);
--resume-from-step continues. The loop itself is mlxchat.pretrain.BaseTrainRun: this script is its shell.
"""
import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)

from mlxchat.pretrain import BaseTrainConfig, BaseTrainRun
from scripts._shell import Console, ReportCard, Wandb, config_from_args, drive, join_group, launched_argv, make_parser, run_main, show_library_logs


def get_args(argv=None):
    return make_parser(__doc__, BaseTrainConfig).parse_args(launched_argv(argv))


def main(argv=None):
    """Train as the command line says; returns the run's result (the tests read it)."""
    args = get_args(argv)
    config = config_from_args(BaseTrainConfig, args)
    config.validate()  # before joining the other ranks: a bad flag fails at once on every Mac
    rank, _ = join_group(config)
    show_library_logs()
    console = Console(args.log_every, rank)
    run = BaseTrainRun(config, freeze_gc=True)
    user_config = dict(vars(args))
    consumers = [console, Wandb("mlxchat", args.run, user_config, rank, every=100, console=console),
                 ReportCard("base", "Base model training", user_config)]
    result = drive(run, consumers, console)
    if rank == 0 and result.get("step") is not None:
        console.message(f"peak memory: {result['peak_memory_gib']:.2f} GiB"
                        + (f" (capped at {config.memory_limit:g} GiB)" if config.memory_limit else ""))
        if result["min_val_bpb"] != float("inf"):
            console.message(f"min val bpb: {result['min_val_bpb']:.4f}")
        console.message(f"checkpoints: {result['checkpoint_dir']}")
    return result


if __name__ == "__main__":
    run_main(main)
