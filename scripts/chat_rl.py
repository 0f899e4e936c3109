"""
Reinforcement learning on a task with a computable reward (GSM8K by default), after SFT.
nanochat's chat_rl in MLX: called "GRPO" upstream, it is really plain on-policy REINFORCE:

1) for each question, sample --num-samples answers from the current model (Engine.generate_batch,
   seeded by (step, question, sampling round) so a run is reproducible), tools included
2) score each answer with the task's reward; advantage = reward - mean reward of the question's samples
   (no std normalisation, no KL term, no ratio/clipping: the samples come from the model being trained)
3) loss = -sum(advantage * log p(sampled token)) / number of sampled tokens, summed over the
   questions of one step: the prompt and the calculator's forced outputs are not trained on
4) one optimizer step per --examples-per-step questions; learning rate decays linearly to 0

Tasks (--task):
    gsm8k       GSM8K train (7,473 problems), pass@k on GSM8K test (downloads on first use)
    spellingbee counting letters in words (tasks/spellingbee.py; downloads a word list on first use)
    demo-calc   the calculator problems shipped in mlxchat/data/demo_chat (GSM8K format, offline)
    toy         "say the letter e": reward = share of the answer's non-space characters that are 'e'.
                Learnable in a few steps by any model: for checking the machinery, not for a better chat model

Examples:
    python -m scripts.chat_rl                                   # nanochat's: GSM8K, one epoch (467 steps)
    python -m scripts.chat_rl --task demo-calc --device-batch-size 4 --num-samples 8 --examples-per-step 4 \\
        --max-new-tokens 128 --eval-every 20 --eval-examples 40
    python -m scripts.chat_rl ... --resume-from-step -2         # continue a stopped run from its last checkpoint

Ctrl-C finishes the current step, saves a checkpoint and exits with status 130 (a second Ctrl-C aborts).
The loop itself is mlxchat.rl.RLRun: this script is its shell.
"""
import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)

from mlxchat.rl import RLConfig, RLRun
from scripts._shell import Console, ReportCard, Wandb, config_from_args, drive, launched_argv, make_parser, run_main, show_library_logs


def get_args(argv=None):
    return make_parser(__doc__, RLConfig).parse_args(launched_argv(argv))


def main(argv=None):
    """Run RL as the command line says; returns the run's result (the tests read it)."""
    args = get_args(argv)
    config = config_from_args(RLConfig, args)
    show_library_logs()
    console = Console(args.log_every, show_loss=False)
    run = RLRun(config, freeze_gc=True)
    user_config = dict(vars(args))
    consumers = [console, Wandb("mlxchat-rl", args.run, user_config, console=console),
                 ReportCard("rl", "Chat RL", user_config, loss_key=None)]
    result = drive(run, consumers, console)
    if result.get("checkpoint_dir"):
        console.message(f"checkpoint: {result['checkpoint_dir']}")
    return result


if __name__ == "__main__":
    run_main(main)
