"""
RL (scripts/chat_rl.py): rollouts (seeded sampling, rewards, advantages, what is trained on), the toy
task, and a real REINFORCE run on the parity fixture model that must raise the toy task's reward and
save a checkpoint that loads back to the same model.
"""
import json
import os

import numpy as np
import pytest

from mlxchat.checkpoint_manager import load_model
from mlxchat.engine import Engine
from mlxchat.tokenizer import RustBPETokenizer
from mlxchat.rl import ToyLetter, evaluate_passk, rollout
from scripts import chat_rl
from conftest import install_base


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return RustBPETokenizer.from_directory(os.path.join(fixture_dir, "tokenizer"))


def test_toy_reward():
    task = ToyLetter()
    conv = task[0]
    assert task.reward(conv, "eee") == 1.0
    assert task.reward(conv, " e e\ne ") == 1.0  # whitespace does not count
    assert task.reward(conv, "E a") == 0.5
    assert task.reward(conv, "") == 0.0 and task.reward(conv, "xyz") == 0.0
    assert task.evaluate(conv, "ee a") == 1 and task.evaluate(conv, "e aa") == 0
    # train and test prompts differ (shifted), and every prompt names the letter
    assert task[0]["messages"][0]["content"] != ToyLetter(split="test")[0]["messages"][0]["content"]
    assert all("e" in task[i]["messages"][0]["content"] for i in range(10))


class ScriptedEngine:
    """generate_batch returns fixed continuations: tokens [a, b] where b was forced by a tool (mask 0)."""

    def __init__(self, continuations):
        self.continuations = continuations
        self.seeds = []

    def generate_batch(self, tokens, num_samples, max_tokens, temperature, top_k, seed):
        self.seeds.append(seed)
        results, masks = [], []
        for i in range(num_samples):
            ids, m = self.continuations[(len(self.seeds) - 1) * num_samples + i]
            results.append(list(tokens) + ids)
            masks.append([0] * len(tokens) + m)
        return results, masks


def test_rollout_trains_on_sampled_tokens_only(tokenizer):
    task = ToyLetter()
    e = tokenizer.encode("e")
    x = tokenizer.encode("x")
    out = tokenizer.encode("77")
    # 4 samples in 2 rounds of 2: "e e", "x" + a forced tool output, "e", "x x x"
    continuations = [(e + e, [1] * (2 * len(e))), (x + out, [1] * len(x) + [0] * len(out)),
                     (e, [1] * len(e)), (x * 3, [1] * (3 * len(x)))]
    engine = ScriptedEngine(continuations)
    inputs, targets, rewards, advantages, lengths = rollout(engine, tokenizer, task, 3, step=5, num_samples=4,
                                                            device_batch_size=2, max_new_tokens=8, temperature=1.0, top_k=50)
    prompt = tokenizer.render_for_completion(task[3])
    P = len(prompt)
    # two seeded rounds, seeds distinct and reproducible
    assert len(engine.seeds) == 2 and engine.seeds[0] != engine.seeds[1]
    assert engine.seeds == [hash((5, 3, 0)) & 0x7FFFFFFF, hash((5, 3, 1)) & 0x7FFFFFFF]
    assert rewards == [task.reward(task[3], tokenizer.decode(c[0])) for c in continuations]
    assert rewards[0] == 1.0 and rewards[3] == 0.0
    assert np.allclose(np.array(advantages), np.array(rewards) - np.mean(rewards))
    assert lengths == [len(c[0]) for c in continuations]
    t = np.array(targets)
    width = max(P + len(c[0]) for c in continuations)
    assert t.shape == (4, width - 1) and np.array(inputs).shape == (4, width - 1)
    for i, (ids, m) in enumerate(continuations):
        trained = [int(v) for v in t[i] if v >= 0]
        assert trained == [tok for tok, keep in zip(ids, m) if keep]  # not the prompt, tool output or padding
    assert (t[:, :P - 1] == -1).all()


def install_sft(fixture_dir, base, tag="fx"):
    install_base(fixture_dir, base, tag, source="chatsft_checkpoints")


def test_rl_raises_the_reward_of_a_toy_task(fixture_dir):
    from mlxchat.common import get_base_dir
    base = get_base_dir()
    install_sft(fixture_dir, base)
    args = ["--model-tag", "fx", "--task", "toy", "--device-batch-size", "8", "--num-samples", "8", "--examples-per-step", "2",
            "--max-new-tokens", "8", "--num-steps", "10", "--init-lr-frac", "1.0", "--eval-every", "10", "--eval-examples", "5",
            "--save-every", "-1"]
    result = chat_rl.main(args)
    rewards = result["rewards"]
    (s0, _, before), (s1, passk, after) = result["evals"]
    print(f"eval mean reward {before:.3f} -> {after:.3f}; train reward per step {[round(r, 2) for r in rewards]}")
    assert (s0, s1) == (0, 10) and len(rewards) == 10
    assert after > before + 0.2
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15
    assert 0.0 <= passk["pass@1"] <= passk["pass@8"] <= 1.0
    # the checkpoint (saved at the last step, after its update) is the model that was evaluated last
    model, tokenizer, meta = load_model("rl", model_tag="fx")
    assert meta["step"] == 9 and meta["model_config"]["n_layer"] == 3
    passk2, reward2 = evaluate_passk(Engine(model, tokenizer), tokenizer, ToyLetter(split="test"), 5, 8, 8, 1.0, 50)
    assert reward2 == pytest.approx(after, abs=1e-6) and passk2 == passk
    assert "optim_000009_rank0.safetensors" in os.listdir(os.path.join(base, "chatrl_checkpoints", "fx"))  # for a resume
    # the per-step rewards went to the report's metrics log
    records = [json.loads(line) for line in open(os.path.join(base, "report", "metrics_rl.jsonl"))]
    assert [r["reward"] for r in records if "reward" in r] == pytest.approx(rewards)


def test_a_stopped_rl_run_resumes_exactly(fixture_dir, tmp_path):
    """Stopped midway and resumed, an RL run ends with the weights and per-step rewards of the run that
    went through: the same problems, rollout seeds, optimizer state and schedule."""
    from mlxchat.common import get_base_dir
    from mlxchat.checkpoint_manager import load_checkpoint
    from mlxchat.rl import RLConfig, RLRun
    install_sft(fixture_dir, get_base_dir())
    settings = dict(model_tag="fx", task="toy", device_batch_size=8, num_samples=8, examples_per_step=2, max_new_tokens=8,
                    num_steps=6, init_lr_frac=1.0, eval_every=2, eval_examples=3, save_every=-1)

    def train(folder, stop_after=None, **extra):
        run = RLRun(RLConfig(**settings, checkpoint_dir=str(folder), **extra))
        for event in run:
            if event.kind == "step" and event.step == stop_after:
                run.control.stop()
        return run

    through = train(tmp_path / "through")
    stopped = train(tmp_path / "stopped", stop_after=2)  # taken at a step boundary: after 2 or 3 updates
    done = stopped.result["step"]
    assert stopped.result["status"] == "stopped" and done in (2, 3)
    resumed = train(tmp_path / "stopped", resume_from_step=-2)
    assert resumed.result["status"] == "finished" and resumed.result["step"] == 6
    assert resumed.result["rewards"] == through.result["rewards"]  # the stopped run's steps, then the resumed ones
    # the evaluations: each step's once (the one at the stop is not repeated), the same numbers
    assert resumed.result["evals"] == through.result["evals"]
    a, _, _ = load_checkpoint(str(tmp_path / "through"), 5)
    b, _, _ = load_checkpoint(str(tmp_path / "stopped"), 5)
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
