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
"""
import argparse
import itertools
import os
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlxchat.common import StopOnCtrlC, format_duration, get_base_dir, init_wandb, memory_cap, print0, warn_if_over_cap
from mlxchat.schedules import get_rl_lr_multiplier
from tasks.common import Task


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--model-tag", default=None, help="SFT checkpoint folder (default: the largest d<N>); also names the RL folder")
    p.add_argument("--model-step", type=int, default=None, help="SFT checkpoint step (default: the last)")
    p.add_argument("--task", default="gsm8k", choices=["gsm8k", "spellingbee", "demo-calc", "toy"])
    # horizon
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the task's training problems")
    p.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1 = num_epochs x problems / examples_per_step)")
    # rollouts
    p.add_argument("--device-batch-size", type=int, default=8, help="samples generated / trained on at once")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GiB of memory training may use: MLX's allocator is capped there, see base_train --help (default: no cap)")
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per optimizer step")
    p.add_argument("--num-samples", type=int, default=16, help="answers sampled per question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    # optimizer (a fresh one)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="start at this fraction of the learning rates")
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=60, help="pass@k on the task's test problems every N steps")
    p.add_argument("--eval-examples", type=int, default=400, help="test problems per evaluation")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (and at the last)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.num_samples % args.device_batch_size != 0:
        p.error(f"--num-samples ({args.num_samples}) must be a multiple of --device-batch-size ({args.device_batch_size})")
    return args


# -----------------------------------------------------------------------------
# tasks

class ToyLetter(Task):
    """"Say the letter e": a toy task whose reward any model can climb in a few RL steps (for tests and
    for checking the RL machinery). reward = share of the answer's non-space characters equal to the
    letter (0 for an empty answer); an answer passes when that share is at least one half."""

    PROMPTS = ["Say the letter {c}.", "Write the letter {c} as many times as you can.", "Please repeat the letter {c}.",
               "Type {c} over and over.", "Only write the letter {c}."]

    def __init__(self, letter="e", size=512, split="train", **kwargs):
        super().__init__(**kwargs)
        self.letter, self.size = letter, size
        self.offset = 0 if split == "train" else 1  # the test prompts are the train prompts shifted by one

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        prompt = self.PROMPTS[(index + self.offset) % len(self.PROMPTS)].format(c=self.letter)
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": " ".join([self.letter] * 8)}]}

    def reward(self, conversation, assistant_response):
        chars = [ch for ch in assistant_response.lower() if not ch.isspace()]
        return sum(ch == self.letter for ch in chars) / len(chars) if chars else 0.0

    def evaluate(self, conversation, assistant_response):
        return int(self.reward(conversation, assistant_response) >= 0.5)


def build_tasks(name, eval_examples):
    """(train task, val task)."""
    if name == "gsm8k":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")
    if name == "spellingbee":
        from tasks.spellingbee import SpellingBee
        return SpellingBee(size=8000, split="train"), SpellingBee(size=max(eval_examples, 1), split="test")
    if name == "demo-calc":
        from scripts.chat_sft import DEMO_CHAT_DIR, DemoCalculator
        return (DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_train.jsonl")),
                DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_val.jsonl")))
    if name == "toy":
        return ToyLetter(split="train"), ToyLetter(split="test")
    raise ValueError(f"unknown task {name}")


# -----------------------------------------------------------------------------
# rollouts

def rollout(engine, tokenizer, task, example_idx, step, num_samples, device_batch_size, max_new_tokens, temperature, top_k):
    """Sample num_samples answers to one problem and score them. Returns (inputs, targets, rewards,
    advantages, generated lengths): inputs/targets (num_samples, L) with targets -1 on the prompt, on
    forced tool outputs and on the padding."""
    conversation = task[example_idx]
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for sampling_step in range(num_samples // device_batch_size):
        # a seed per (step, problem, round): reproducible, and different for every rollout
        seed = hash((step, example_idx, sampling_step)) & 0x7FFFFFFF
        seqs, ms = engine.generate_batch(prompt, num_samples=device_batch_size, max_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, seed=seed)
        sequences += seqs
        masks += ms
    rewards = [task.reward(conversation, tokenizer.decode(seq[len(prompt):])) for seq in sequences]
    # right-pad with <|assistant_end|> (mask 0: never a target)
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    width = max(len(s) for s in sequences)
    ids = mx.array([s + [assistant_end] * (width - len(s)) for s in sequences], dtype=mx.int32)
    mask = mx.array([m + [0] * (width - len(m)) for m in masks], dtype=mx.int32)
    inputs, targets = ids[:, :-1], mx.where(mask[:, 1:] == 0, -1, ids[:, 1:])
    r = mx.array(rewards, dtype=mx.float32)
    advantages = r - r.mean()
    return inputs, targets, rewards, advantages, [len(s) - len(prompt) for s in sequences]


def evaluate_passk(engine, tokenizer, task, num_problems, k, max_new_tokens, temperature, top_k):
    """pass@1..k (share of problems with a correct answer among the first j samples) and the mean
    reward over all samples, on the first num_problems problems of task."""
    num_problems = min(num_problems, len(task))
    passes = [0] * k
    reward_sum = 0.0
    for idx in range(num_problems):
        conversation = task[idx]
        prompt = tokenizer.render_for_completion(conversation)
        seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, seed=42)
        texts = [tokenizer.decode(s[len(prompt):]) for s in seqs]
        correct = [bool(task.evaluate(conversation, t)) for t in texts]
        reward_sum += sum(task.reward(conversation, t) for t in texts)
        for j in range(k):
            passes[j] += any(correct[:j + 1])
    n = max(num_problems, 1)
    return {f"pass@{j + 1}": passes[j] / n for j in range(k)}, reward_sum / (n * k)


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    user_config = dict(vars(args))
    mx.random.seed(args.seed)
    from mlxchat.checkpoint_manager import SOURCE_DIRS, load_model, save_checkpoint
    from mlxchat.engine import Engine
    from mlxchat.report import get_report, log_metrics
    from scripts.chat_sft import resolve_checkpoint

    base_dir = get_base_dir()
    model_tag, model_step = resolve_checkpoint(os.path.join(base_dir, SOURCE_DIRS["sft"]), args.model_tag, args.model_step)
    model, tokenizer, meta = load_model("sft", phase="train", model_tag=model_tag, step=model_step)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer found for the SFT checkpoint (looked in {os.path.join(base_dir, 'tokenizer')})")
    engine = Engine(model, tokenizer)  # sees the weights as they are updated
    print0(f"SFT model: {model_tag} step {model_step}")

    train_task, val_task = build_tasks(args.task, args.eval_examples)
    num_steps = args.num_steps if args.num_steps > 0 else (len(train_task) // args.examples_per_step) * args.num_epochs
    if num_steps < 1:
        raise SystemExit(f"{len(train_task)} problems make no step of {args.examples_per_step} examples: lower --examples-per-step")
    print0(f"task {args.task}: {len(train_task):,} train problems, {num_steps} steps of {args.examples_per_step} problems "
           f"x {args.num_samples} samples")

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    def pg_loss(inputs, targets, advantages, denom):
        # log p of every sampled token (0 where the target is ignored), weighted by its sample's advantage
        logp = -model(inputs, targets, loss_reduction="none").reshape(inputs.shape)
        return -(logp * advantages[:, None]).sum() / denom
    loss_and_grad = nn.value_and_grad(model, pg_loss)

    wandb_run = init_wandb("mlxchat-rl", args.run, user_config)

    output_tag = args.model_tag or f"d{model.config.n_layer}"
    checkpoint_dir = os.path.join(base_dir, SOURCE_DIRS["rl"], output_tag)

    def save(at_step):
        save_checkpoint(checkpoint_dir, at_step, model.named_parameters(), None,
                        {"step": at_step, "model_config": model.config.to_dict(), "user_config": user_config,
                         "sft_checkpoint": {"model_tag": model_tag, "step": model_step}})
        print0(f"saved checkpoint step {at_step} to {checkpoint_dir}")

    def run_eval(at_step):
        k = args.device_batch_size
        passk, mean_reward = evaluate_passk(engine, tokenizer, val_task, args.eval_examples, k, args.max_new_tokens,
                                            args.temperature, args.top_k)
        print0(f"step {at_step:05d} | eval on {min(args.eval_examples, len(val_task))} problems: "
               + ", ".join(f"{name} {v:.4f}" for name, v in passk.items()) + f" | mean reward {mean_reward:.4f}")
        log_metrics("rl", at_step, eval_reward=mean_reward, **{name.replace("@", "_at_"): v for name, v in passk.items()})
        wandb_run.log({"step": at_step, "eval/mean_reward": mean_reward, **{f"eval/{n}": v for n, v in passk.items()}})
        return passk, mean_reward

    problems = itertools.cycle(range(len(train_task)))
    num_passes = args.num_samples // args.device_batch_size
    history, evals = [], []
    train_time = 0.0
    step = 0
    # Ctrl-C: finish the step, save, exit (the caller's handler and MLX's memory limit are put back after)
    with StopOnCtrlC() as stop, memory_cap(args.memory_limit):
        for step in range(num_steps):
            if args.eval_every > 0 and step % args.eval_every == 0:
                evals.append((step, *run_eval(step)))
            t0 = time.time()
            lrm = get_rl_lr_multiplier(step, num_steps)
            rewards, lengths, acc = [], [], None
            for _ in range(args.examples_per_step):
                inputs, targets, r, advantages, n = rollout(engine, tokenizer, train_task, next(problems), step, args.num_samples,
                                                            args.device_batch_size, args.max_new_tokens, args.temperature, args.top_k)
                rewards += r
                lengths += n
                for p in range(num_passes):
                    rows = slice(p * args.device_batch_size, (p + 1) * args.device_batch_size)
                    x, y, a = inputs[rows], targets[rows], advantages[rows]
                    # token-level normalisation over the step: sampled tokens of this pass x passes x examples
                    num_valid = mx.maximum((y >= 0).sum(), 1).astype(mx.float32)
                    denom = num_valid * (num_passes * args.examples_per_step)
                    _, grads = loss_and_grad(x, y, a, denom)
                    acc = grads if acc is None else tree_map(lambda u, v: u + v, acc, grads)
                    mx.eval(acc)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            optimizer.step(model, acc)
            mx.eval(model.parameters(), optimizer.state)
            dt = time.time() - t0
            train_time += dt
            if step == 2:  # three steps in
                warn_if_over_cap(args.memory_limit)
            mean_reward = sum(rewards) / len(rewards)
            mean_length = sum(lengths) / len(lengths)
            history.append(mean_reward)
            eta = train_time / (step + 1) * (num_steps - step - 1)
            print0(f"step {step + 1:05d}/{num_steps:05d} | reward {mean_reward:.4f} | answer length {mean_length:.1f} | "
                   f"lrm {lrm:.3f} | dt {dt:.1f}s | elapsed {format_duration(train_time)} | eta {format_duration(eta)}")
            log_metrics("rl", step + 1, reward=mean_reward, answer_length=mean_length, lrm=lrm)
            wandb_run.log({"step": step, "train/reward": mean_reward, "train/answer_length": mean_length, "lrm": lrm})
            last = step == num_steps - 1 or stop.requested
            if last or (step > 0 and args.save_every > 0 and step % args.save_every == 0):
                save(step)
            if stop.requested:
                break

    # (an mlxchat addition) evaluate the final model too, so the run ends with its numbers
    final_passk, final_reward = {}, None
    if args.eval_every > 0 and not stop.requested:
        final_passk, final_reward = run_eval(num_steps)
        evals.append((num_steps, final_passk, final_reward))
    initial = evals[0] if evals else None
    get_report().log(section="Chat RL", data=[
        user_config,
        {"SFT checkpoint": f"{model_tag} step {model_step}", "Task": args.task, "Number of steps": step + 1,
         "Initial eval mean reward": initial[2] if initial else None,
         "Final eval mean reward": final_reward,
         **{f"Final eval {n}": v for n, v in final_passk.items()},
         "First step mean reward": history[0] if history else None,
         "Last step mean reward": history[-1] if history else None,
         "Training time": format_duration(train_time)},
    ])
    wandb_run.finish()
    return {"rewards": history, "evals": evals, "checkpoint_dir": checkpoint_dir, "num_steps": num_steps}


if __name__ == "__main__":
    main()
