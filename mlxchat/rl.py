"""
Reinforcement learning as a library object, on a task with a computable reward (GSM8K by default),
after SFT. nanochat's chat_rl in MLX (`python -m scripts.chat_rl` is its shell): called "GRPO" upstream, it is really plain on-policy REINFORCE:

1) for each question, sample --num-samples answers from the current model (Engine.generate_batch,
   seeded by (step, question, sampling round) so a run is reproducible), tools included
2) score each answer with the task's reward; advantage = reward - mean reward of the question's samples
   (no std normalisation, no KL term, no ratio/clipping: the samples come from the model being trained)
3) loss = -sum(advantage * log p(sampled token)) / number of sampled tokens, summed over the
   questions of one step: the prompt and the calculator's forced outputs are not trained on
4) one optimizer step per --examples-per-step questions; learning rate decays linearly to 0

A checkpoint holds the weights, the optimizer state and the number of updates done: --resume-from-step
continues a run exactly (the problems come in order and the rollouts' seeds follow from the step).

Tasks (--task):
    gsm8k       GSM8K train (7,473 problems), pass@k on GSM8K test (downloads on first use)
    spellingbee counting letters in words (tasks/spellingbee.py; downloads a word list on first use)
    demo-calc   the calculator problems shipped in mlxchat/data/demo_chat (GSM8K format, offline)
    toy         "say the letter e": reward = share of the answer's non-space characters that are 'e'.
                Learnable in a few steps by any model: for checking the machinery, not for a better chat model
"""
import itertools
import os
import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlxchat.common import get_base_dir
from mlxchat.hardware import device_name, memory_cap
from mlxchat.schedules import get_rl_lr_multiplier
from mlxchat.training import (Checks, keep_tokenizer, ConfigError, Eval, Finished, Log, Phase, Run, Started, TrainingError, config_dict,
                              option, step_event)
from tasks.common import Task

TASKS = ("gsm8k", "spellingbee", "demo-calc", "toy")


@dataclass
class RLConfig:
    model_tag: Optional[str] = option(None, "SFT checkpoint folder (default: the largest d<N>); also names the RL folder")
    model_step: Optional[int] = option(None, "SFT checkpoint step (default: the last)")
    sft_checkpoint_dir: Optional[str] = option(None, "the SFT checkpoint folder itself (overrides --model-tag)")
    checkpoint_dir: Optional[str] = option(None, "the RL run's folder (default <base dir>/chatrl_checkpoints/<model tag>)")
    task: str = option("gsm8k", "the task to learn: " + " | ".join(TASKS), choices=TASKS)
    # horizon
    num_epochs: int = option(1, "passes over the task's training problems")
    num_steps: int = option(-1, "optimizer steps (-1 = num_epochs x problems / examples_per_step)")
    # rollouts
    device_batch_size: int = option(8, "samples generated / trained on at once")
    memory_limit: Optional[float] = option(None, "GiB of memory training may use: MLX's allocator is capped there, see "
                                                 "base_train --help (default: no cap)")
    examples_per_step: int = option(16, "questions per optimizer step")
    num_samples: int = option(16, "answers sampled per question")
    max_new_tokens: int = option(256, "the longest answer sampled")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(50, "sample from the k most likely tokens")
    # optimizer (a fresh one)
    embedding_lr: float = option(0.2, "AdamW learning rate of the embeddings")
    unembedding_lr: float = option(0.004, "AdamW learning rate of lm_head")
    matrix_lr: float = option(0.02, "Muon learning rate")
    weight_decay: float = option(0.0, "Muon weight decay")
    init_lr_frac: float = option(0.05, "start at this fraction of the learning rates")
    # evaluation and checkpoints
    eval_every: int = option(60, "pass@k on the task's test problems every N steps (-1 = off)")
    eval_examples: int = option(400, "test problems per evaluation")
    save_every: int = option(60, "checkpoint every N steps (and at the last; -1 = only at the last)")
    resume_from_step: int = option(-1, "continue this RL run from its checkpoint at this step (-2 = the latest; -1 = a "
                                       "fresh run): the same problems, optimizer state and schedule")
    seed: int = option(42, "random seed")

    def validate(self):
        c = Checks()
        c.positive(self, "num_epochs", "device_batch_size", "examples_per_step", "num_samples", "max_new_tokens",
                   "eval_examples", "init_lr_frac")
        c.positive(self, "memory_limit", allow_none=True)
        c.require(self.num_steps == -1 or self.num_steps >= 1, f"--num-steps must be >= 1 or -1 (one epoch), got {self.num_steps!r}")
        c.require(self.resume_from_step >= -2, f"--resume-from-step must be a step, -1 (fresh) or -2 (the latest), got {self.resume_from_step}")
        c.require(self.task in TASKS, f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        c.require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature!r}")
        c.require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k!r}")
        c.every(self, "eval_every", "save_every")
        if isinstance(self.num_samples, int) and isinstance(self.device_batch_size, int) and self.device_batch_size > 0:
            c.require(self.num_samples % self.device_batch_size == 0,
                      f"--num-samples ({self.num_samples}) must be a multiple of --device-batch-size ({self.device_batch_size})")
        if self.sft_checkpoint_dir is not None:
            c.require(os.path.isdir(os.path.expanduser(self.sft_checkpoint_dir)),
                      f"--sft-checkpoint-dir {self.sft_checkpoint_dir}: no such folder")
        c.raise_if_any()


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
        from tasks.demo_chat import DEMO_CHAT_DIR, DemoCalculator
        return (DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_train.jsonl")),
                DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_val.jsonl")))
    if name == "toy":
        return ToyLetter(split="train"), ToyLetter(split="test")
    raise ConfigError(f"unknown --task {name!r}: one of {', '.join(TASKS)}")


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
# the run

class RLRun(Run):
    stage = "rl"

    def _run(self):
        from mlxchat.checkpoint_manager import SOURCE_DIRS, build_model, find_largest_model, find_last_step, save_training_checkpoint
        from mlxchat.engine import Engine

        cfg = self.config
        mx.random.seed(cfg.seed)
        yield Phase("loading")
        base_dir = get_base_dir()
        if cfg.sft_checkpoint_dir:
            sft_dir = os.path.abspath(os.path.expanduser(cfg.sft_checkpoint_dir))
            model_tag = os.path.basename(sft_dir)
        else:
            source = os.path.join(base_dir, SOURCE_DIRS["sft"])
            model_tag = cfg.model_tag or find_largest_model(source)
            sft_dir = os.path.join(source, model_tag)
            if not os.path.isdir(sft_dir):
                raise ConfigError(f"no checkpoint folder {sft_dir}: fine-tune a model first (python -m scripts.chat_sft), "
                                  f"or pick another --model-tag")
        model_step = cfg.model_step if cfg.model_step is not None else find_last_step(sft_dir)
        model, tokenizer, meta = build_model(sft_dir, model_step, phase="train")
        if tokenizer is None:
            raise TrainingError(f"no tokenizer found for the SFT checkpoint (looked in {os.path.join(base_dir, 'tokenizer')})")
        engine = Engine(model, tokenizer)  # sees the weights as they are updated
        yield Log(f"SFT model: {model_tag} step {model_step}")

        train_task, val_task = build_tasks(cfg.task, cfg.eval_examples)
        num_steps = cfg.num_steps if cfg.num_steps > 0 else (len(train_task) // cfg.examples_per_step) * cfg.num_epochs
        if num_steps < 1:
            raise ConfigError(f"{len(train_task)} problems make no step of {cfg.examples_per_step} examples: lower --examples-per-step")
        yield Log(f"task {cfg.task}: {len(train_task):,} train problems, {num_steps} steps of {cfg.examples_per_step} problems "
                  f"x {cfg.num_samples} samples")

        optimizer = model.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                          matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * cfg.init_lr_frac
            group["initial_lr"] = group["lr"]

        def pg_loss(inputs, targets, advantages, denom):
            # log p of every sampled token (0 where the target is ignored), weighted by its sample's advantage
            logp = -model(inputs, targets, loss_reduction="none").reshape(inputs.shape)
            return -(logp * advantages[:, None]).sum() / denom
        loss_and_grad = nn.value_and_grad(model, pg_loss)

        self.run_dir = checkpoint_dir = os.path.abspath(os.path.expanduser(
            cfg.checkpoint_dir or os.path.join(base_dir, SOURCE_DIRS["rl"], cfg.model_tag or model_tag)))

        def save(at_step):
            # at_step is nanochat's label (the loop's step index: a save after step i's update is labelled i);
            # completed_steps (updates done) and the optimizer state are what a resume continues from
            save_training_checkpoint(checkpoint_dir, at_step, model, optimizer, {
                "step": at_step, "model_config": model.config.to_dict(), "user_config": config_dict(cfg),
                "sft_checkpoint": {"model_tag": model_tag, "step": model_step}, "completed_steps": self.step,
                "loop_state": {"train_time": train_time, "rewards": history, "evals": evals}})
        self._save_checkpoint = save

        start, history, evals, train_time, evaluated_at = 0, [], [], 0.0, None
        if cfg.resume_from_step != -1:
            label, meta, _ = self._load_resume(checkpoint_dir, cfg.resume_from_step, model, optimizer)
            if "completed_steps" not in meta:
                raise TrainingError(f"{checkpoint_dir} step {label} was saved without its optimizer state (before RL runs "
                                    f"could resume): start a new RL run from the SFT checkpoint")
            start = self.step = meta["completed_steps"]
            loop = meta["loop_state"]
            train_time, history, evals = loop["train_time"], list(loop["rewards"]), [tuple(e) for e in loop["evals"]]
            # a run stopped at a step boundary saved after that step's evaluation; a periodic save came before it
            evaluated_at = start if label == start else None
            yield Log(f"resuming from {checkpoint_dir} step {label} ({start} updates done)")
        self._live_model = (model, keep_tokenizer(tokenizer, checkpoint_dir) if self.rank == 0 else None)
        num_params = sum(v.size for v in model.named_parameters().values())
        flops_per_token = float(model.estimate_flops())
        tokens_per_step = cfg.examples_per_step * cfg.num_samples * cfg.max_new_tokens  # at most
        yield Started(stage=self.stage, run_dir=checkpoint_dir, config=dict(config_dict(cfg), num_steps=num_steps),
                      num_params=num_params, tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
                      total_steps=num_steps, start_step=start, device=device_name(), pid=os.getpid())

        def run_eval(at_step):
            k = cfg.device_batch_size
            passk, mean_reward = evaluate_passk(engine, tokenizer, val_task, cfg.eval_examples, k, cfg.max_new_tokens,
                                                cfg.temperature, cfg.top_k)
            return passk, mean_reward, Eval(at_step, {**passk, "mean_reward": mean_reward,
                                                      "problems": min(cfg.eval_examples, len(val_task))})

        # the problems in order, round and round; a resumed run skips those its updates used
        problems = itertools.islice(itertools.cycle(range(len(train_task))), start * cfg.examples_per_step, None)
        num_passes = cfg.num_samples // cfg.device_batch_size
        status = "finished"
        with memory_cap(cfg.memory_limit):  # MLX's memory limit is put back after the loop
            for step in range(start, num_steps):
                if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != evaluated_at:
                    yield Phase("evaluating", step)
                    passk, mean_reward, event = run_eval(step)
                    evals.append((step, passk, mean_reward))
                    yield event
                if (yield from self._boundary(step)):
                    status = "stopped"
                    yield from self._save(step)
                    break
                if step == start:
                    yield Phase("running", step)
                t0 = time.time()
                lrm = get_rl_lr_multiplier(step, num_steps)
                rewards, lengths, acc = [], [], None
                for _ in range(cfg.examples_per_step):
                    inputs, targets, r, advantages, n = rollout(engine, tokenizer, train_task, next(problems), step, cfg.num_samples,
                                                                cfg.device_batch_size, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
                    rewards += r
                    lengths += n
                    for p in range(num_passes):
                        rows = slice(p * cfg.device_batch_size, (p + 1) * cfg.device_batch_size)
                        x, y, a = inputs[rows], targets[rows], advantages[rows]
                        # token-level normalisation over the step: sampled tokens of this pass x passes x examples
                        num_valid = mx.maximum((y >= 0).sum(), 1).astype(mx.float32)
                        denom = num_valid * (num_passes * cfg.examples_per_step)
                        _, grads = loss_and_grad(x, y, a, denom)
                        acc = grads if acc is None else tree_map(lambda u, v: u + v, acc, grads)
                        mx.eval(acc)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                optimizer.step(model, acc)
                mx.eval(model.parameters(), optimizer.state)
                self._sync(step + 1, 0.0, 0.0)  # the commands sent during the step
                dt = time.time() - t0
                train_time += dt
                self.step = step + 1
                mean_reward = sum(rewards) / len(rewards)
                mean_length = sum(lengths) / len(lengths)
                history.append(mean_reward)
                eta = train_time / (step + 1) * (num_steps - step - 1)
                # an RL step has no loss to show: the mean reward stands in for it (higher is better)
                yield step_event(step + 1, num_steps, mean_reward, mean_reward, lrm, dt, sum(lengths), flops_per_token,
                                 1, train_time, eta, (step + 1) / num_steps, reward=mean_reward, answer_length=mean_length)
                notice = self._after_step(step + 1, start, cfg.memory_limit)
                if notice is not None:
                    yield notice
                last = step == num_steps - 1
                if last or (step > 0 and cfg.save_every > 0 and step % cfg.save_every == 0):
                    yield from self._save(step)

            # (an mlxchat addition) evaluate the final model too, so the run ends with its numbers
            final_passk, final_reward = {}, None
            if cfg.eval_every > 0 and status == "finished":
                yield Phase("evaluating", num_steps)
                final_passk, final_reward, event = run_eval(num_steps)
                evals.append((num_steps, final_passk, final_reward))
                yield event
        initial = evals[0] if evals else None
        self.result = {"rewards": history, "evals": evals, "checkpoint_dir": checkpoint_dir, "num_steps": num_steps,
                       "step": self.step, "status": status}
        yield Finished(status=status, step=self.step, summary={
            "SFT checkpoint": f"{model_tag} step {model_step}", "Task": cfg.task, "Number of steps": self.step,
            "Initial eval mean reward": initial[2] if initial else None,
            "Final eval mean reward": final_reward,
            **{f"Final eval {n}": v for n, v in final_passk.items()},
            "First step mean reward": history[0] if history else None,
            "Last step mean reward": history[-1] if history else None,
            "Training time": train_time})
