"""
SFT (mlxchat/sft.py, scripts/chat_sft.py): the best-fit packer (rows start with BOS, conversations whole, padding never
a target, masks as render_conversation gives them, too-long conversations skipped instead of NaN), the
optimizer hand-over from the base run, a real SFT run on the parity fixture model that must lower the
loss on held-out conversations (and save a checkpoint that loads back to the same numbers), and the
demo chat set shipped in mlxchat/data/demo_chat.
"""
import json
import os

import numpy as np
import pytest
import mlx.core as mx

from mlxchat.checkpoint_manager import load_checkpoint, load_model, save_arrays
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.loss_eval import evaluate_bpb
from mlxchat.tokenizer import RustBPETokenizer, get_token_bytes
from mlxchat import sft
from mlxchat.sft import build_mixtures, rows_to_batch, setup_sft_optimizer, sft_data_generator_bos_bestfit, sft_rows_bestfit
from mlxchat.training import ConfigError
from scripts import chat_sft
from tasks.demo_chat import DEMO_CHAT_DIR, DemoCalculator
from tasks.common import Task
from tasks.customjson import CustomJSON
from conftest import install_base


class ListTask(Task):
    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.items = items

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return RustBPETokenizer.from_directory(os.path.join(fixture_dir, "tokenizer"))


def make_conversations(n, seed=0):
    """Conversations of varied lengths (1-3 turns), some with calculator parts."""
    rng = np.random.default_rng(seed)
    words = "the union congress nation people government year state peace war law trade".split()
    convs = []
    for i in range(n):
        messages = []
        for _ in range(int(rng.integers(1, 4))):
            user = " ".join(rng.choice(words, int(rng.integers(2, 12))))
            reply = " ".join(rng.choice(words, int(rng.integers(1, 16))))
            messages.append({"role": "user", "content": f"q{i} {user}"})
            if i % 5 == 0:
                messages.append({"role": "assistant", "content": [
                    {"type": "text", "text": reply}, {"type": "python", "text": f"{i}*3"},
                    {"type": "python_output", "text": str(i * 3)}, {"type": "text", "text": f" so {i * 3}"}]})
            else:
                messages.append({"role": "assistant", "content": reply})
        convs.append({"messages": messages})
    return convs


# -----------------------------------------------------------------------------
# packing

def split_at_bos(ids, bos):
    """Split a row's content into the pieces that start with BOS (each must be one whole conversation)."""
    starts = [i for i, t in enumerate(ids) if t == bos]
    assert starts and starts[0] == 0, "row content must start with BOS"
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(ids)])]


def test_packer_rows_are_whole_conversations_with_their_masks(tokenizer):
    convs = make_conversations(30)
    dataset = ListTask(convs)
    rendered = {}
    for c in convs:
        ids, mask = tokenizer.render_conversation(c)
        rendered[tuple(ids)] = mask
    shortest = min(len(k) for k in rendered)
    bos = tokenizer.get_bos_token_id()
    row_capacity = 257  # every conversation fits (the longest renders to ~180 tokens)
    seen = set()
    padded_rows = packed = 0
    gen = sft_rows_bestfit(dataset, tokenizer, num_rows=4, row_capacity=row_capacity, buffer_size=100)
    for _ in range(12):
        rows, masks, lengths, state = next(gen)
        assert len(rows) == 4
        for row, mask, n in zip(rows, masks, lengths):
            assert len(row) == len(mask) == row_capacity
            assert row[0] == bos
            # the content splits at BOS into whole rendered conversations, each with render_conversation's mask
            for s, e in split_at_bos(row[:n], bos):
                packed += 1
                piece = tuple(row[s:e])
                assert piece in rendered, "a conversation was cut or altered"
                assert mask[s:e] == rendered[piece]
                seen.add(piece)
            # the padding: BOS with mask 0, shorter than any conversation (the 30 conversations all sit
            # in the 100-conversation buffer, so best fit would have used one that fit)
            assert row[n:] == [bos] * (row_capacity - n) and not any(mask[n:])
            if n < row_capacity:
                padded_rows += 1
                assert row_capacity - n < shortest
    assert padded_rows > 0
    assert state["consumed"] == packed and state["skipped"] == 0  # progress counts packed conversations
    assert state["epoch"] >= 2  # 48 rows of a few conversations each wrap the 30-conversation dataset


def test_packer_goes_through_the_data(tokenizer):
    # one epoch of a dataset larger than the buffer packs (nearly) every conversation once
    convs = make_conversations(200, seed=3)
    bos = tokenizer.get_bos_token_id()
    index_of = {tuple(tokenizer.render_conversation(c)[0]): i for i, c in enumerate(convs)}
    counts = np.zeros(len(convs), dtype=int)
    gen = sft_rows_bestfit(ListTask(convs), tokenizer, num_rows=2, row_capacity=257, buffer_size=16)
    state = {"consumed": 0}
    while state["consumed"] < len(convs):
        rows, _, lengths, state = next(gen)
        for row, n in zip(rows, lengths):
            for s, e in split_at_bos(row[:n], bos):
                counts[index_of[tuple(row[s:e])]] += 1
    assert counts.sum() == state["consumed"]
    assert (counts >= 1).sum() >= len(convs) - 16  # only what still sits in the buffer is not out yet


def test_targets_are_the_assistant_tokens_only(tokenizer):
    conv = {"messages": [{"role": "user", "content": "what is six times seven"},
                         {"role": "assistant", "content": [{"type": "text", "text": "let me see "},
                                                           {"type": "python", "text": "6*7"},
                                                           {"type": "python_output", "text": "42"},
                                                           {"type": "text", "text": " the answer"}]}]}
    x, y, state = next(sft_data_generator_bos_bestfit(ListTask([conv]), tokenizer, 2, 63))
    assert x.shape == y.shape == (2, 63)
    ids, _ = tokenizer.render_conversation(conv)
    x, y = np.array(x), np.array(y)
    row = x[0].tolist()
    assert row[:len(ids)] == ids  # inputs = the row without its last token
    supervised = [int(t) for t in y[0] if t >= 0]
    expected = (tokenizer.encode("let me see ") + [tokenizer.encode_special("<|python_start|>")] + tokenizer.encode("6*7")
                + [tokenizer.encode_special("<|python_end|>")] + tokenizer.encode(" the answer")
                + [tokenizer.encode_special("<|assistant_end|>")])
    assert supervised == expected  # no user text, no tool output, no BOS, no padding
    # each supervised target is the next token of the row
    for t in np.nonzero(y[0] >= 0)[0]:
        assert y[0, t] == (row + [None])[t + 1] or t + 1 == len(row)


def test_too_long_conversations_are_skipped_not_nan(tokenizer):
    long = {"messages": [{"role": "user", "content": "state of the union " * 60}, {"role": "assistant", "content": "yes " * 40}]}
    convs = make_conversations(12, seed=1) + [long] * 5
    dataset = ListTask(convs)
    gen = sft_data_generator_bos_bestfit(dataset, tokenizer, 4, 128, buffer_size=8)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=64, window_pattern="L"))
    for _ in range(10):
        x, y, state = next(gen)
        # every row keeps at least one target: in nanochat the long ones would fill the buffer and
        # leave rows of pure padding, whose mean loss is NaN
        assert all((np.array(y) >= 0).sum(axis=1) > 0)
        assert np.isfinite(model(x, y).item())
    assert state["skipped"] >= 5
    # an all-masked batch still gives a finite loss (the model's guard)
    assert model(x, mx.full(y.shape, -1)).item() == 0.0
    with pytest.raises(ValueError, match="raise --max-seq-len"):
        next(sft_rows_bestfit(ListTask([long]), tokenizer, 1, 129))


def test_rows_to_batch_masks_padding_and_prompt():
    rows = [[9, 1, 2, 3, 9, 9], [9, 4, 5, 6, 7, 8]]
    masks = [[0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1]]
    x, y = rows_to_batch(rows, masks, [4, 6])
    assert np.array(x).tolist() == [[9, 1, 2, 3, 9], [9, 4, 5, 6, 7]]
    assert np.array(y).tolist() == [[-1, 2, 3, -1, -1], [4, -1, 6, 7, 8]]


# -----------------------------------------------------------------------------
# optimizer hand-over

def test_base_optimizer_state_is_kept_with_sft_learning_rates(fixture_dir):
    from mlxchat.checkpoint_manager import load_torch_file
    cfg = json.load(open(os.path.join(fixture_dir, "checkpoint", "meta_000062.json")))["model_config"]
    model = GPT(GPTConfig(**cfg))
    model.load_state_dict(load_torch_file(os.path.join(fixture_dir, "checkpoint", "model_000062.pt")))
    # a "base run" optimizer with some history and a scheduled Muon weight decay
    base_opt = model.setup_optimizer(weight_decay=0.2)
    x = mx.array(np.random.default_rng(0).integers(0, 512, (2, 32)), dtype=mx.int32)
    import mlx.nn as nn
    grads = nn.value_and_grad(model, lambda a, b: model(a, b))(x, x)[1]
    for g in base_opt.param_groups:
        g["initial_lr"] = g["lr"]
        if g["kind"] == "muon":
            g["weight_decay"] = 0.0123
    base_opt.step(model, grads)
    tensors, meta = base_opt.state_dict()
    lrs = {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}
    fresh, _ = setup_sft_optimizer(model, lrs, 1.0, None)
    opt, loaded = setup_sft_optimizer(model, lrs, 0.8, {"optimizer": {"tensors": tensors, "meta": meta}})
    assert loaded
    new_tensors, new_meta = opt.state_dict()
    for k, v in tensors.items():
        assert np.array_equal(np.array(new_tensors[k]), np.array(v)), k
    assert new_meta["steps"] == meta["steps"] and all(s == 1 for s in meta["steps"].values())
    for g, f in zip(opt.param_groups, fresh.param_groups):
        assert g["lr"] == pytest.approx(0.8 * f["lr"]) and g["initial_lr"] == g["lr"]
        if g["kind"] == "muon":
            assert g["weight_decay"] == 0.0123  # nanochat's quirk: the base run's last weight decay carries over
    _, not_loaded = setup_sft_optimizer(model, lrs, 0.8, None)
    assert not not_loaded


# -----------------------------------------------------------------------------
# a real SFT run

def heldout_loss(model, tokenizer, val_set, B, T):
    """Mean cross entropy (nats) per supervised token over one pass of the held-out conversations."""
    total, count = 0.0, 0
    for x, y, state in sft_data_generator_bos_bestfit(val_set, tokenizer, B, T):
        total += model(x, y, loss_reduction="sum").item()
        count += int((np.array(y) >= 0).sum())
        if state["consumed"] >= len(val_set):
            break
    return total / count


def test_sft_lowers_heldout_loss_and_saves_a_loadable_checkpoint(fixture_dir, capsys):
    from mlxchat.common import get_base_dir
    base = get_base_dir()
    # the base run's meta supplies the batch geometry (SFT inherits it) and its flags the lrs
    ckpt = install_base(fixture_dir, base, meta_extra={
        "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 512,
        "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02}})
    # and an optimizer state, as base_train saves it
    model0, tokenizer, _ = load_model("base", phase="train", model_tag="fx")
    tensors, meta = model0.setup_optimizer().state_dict()
    save_arrays(os.path.join(ckpt, "optim_000062_rank0.safetensors"), {"optimizer": {"tensors": tensors, "meta": meta}})

    _, val_set, _ = build_mixtures("demo")
    before = heldout_loss(model0, tokenizer, val_set, 4, 128)
    result = chat_sft.main(["--mixture", "demo", "--num-iterations", "40", "--eval-every", "-1", "--eval-tokens", "8192"])
    out = capsys.readouterr().out
    assert "loaded the base run's optimizer state" in out
    assert "batch: 512 tokens = 4 x 128 x 1" in out  # inherited from the base meta

    model1, _, meta1 = load_model("sft", model_tag="d3")
    after = heldout_loss(model1, tokenizer, val_set, 4, 128)
    print(f"held-out loss {before:.3f} -> {after:.3f} nats/token; val bpb {result['initial_val_bpb']:.3f} -> {result['val_bpb']:.3f}")
    assert after < 0.75 * before
    assert result["val_bpb"] < result["initial_val_bpb"]
    assert all(np.isfinite(result["losses"]))
    # the checkpoint: nanochat's meta (sequence_len = the SFT length), an optimizer that loads, and weights
    # that reproduce the run's final val bpb exactly
    assert meta1["step"] == 40 and meta1["model_config"]["sequence_len"] == 128
    assert meta1["user_config"]["mixture"] == "demo"
    _, optim, _ = load_checkpoint(os.path.join(base, "chatsft_checkpoints", "d3"), 40, load_optimizer=True)
    fresh = model1.setup_optimizer()
    fresh.load_state_dict(optim["optimizer"]["tensors"], optim["optimizer"]["meta"])
    assert all(s == 40 for s in optim["optimizer"]["meta"]["steps"].values())
    val_batches = []
    for x, y, state in sft_data_generator_bos_bestfit(val_set, tokenizer, 4, 128):
        val_batches.append((x, y))
        if len(val_batches) >= 16 or state["consumed"] >= len(val_set):
            break
    assert evaluate_bpb(model1, iter(val_batches), len(val_batches), get_token_bytes()) == pytest.approx(result["val_bpb"], abs=1e-4)
    # the report section
    report = open(os.path.join(base, "report", "chat-sft.md")).read()
    assert "## Chat SFT" in report and "- Final val bpb: " in report


def test_jsonl_mixture_holds_out_the_tail(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [json.dumps([{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    train, val, _ = build_mixtures(str(path))
    assert len(train) == 38 and len(val) == 2
    train_texts = {train[i]["messages"][0]["content"] for i in range(len(train))}
    val_texts = {val[i]["messages"][0]["content"] for i in range(len(val))}
    assert val_texts == {"hi 38", "hi 39"} and not (train_texts & val_texts)
    with pytest.raises(ConfigError, match="nanochat, demo or a .jsonl"):
        build_mixtures("nonsense")


# -----------------------------------------------------------------------------
# the demo chat set

def test_demo_chat_set_loads_and_is_well_formed(tokenizer):
    from tasks.gsm8k import extract_answer
    sizes = sum(os.path.getsize(os.path.join(DEMO_CHAT_DIR, f)) for f in os.listdir(DEMO_CHAT_DIR))
    assert sizes < 400_000
    assert "CC0" in open(os.path.join(DEMO_CHAT_DIR, "SOURCE.md")).read()
    chats = {s: CustomJSON(os.path.join(DEMO_CHAT_DIR, f"chat_{s}.jsonl")) for s in ("train", "val")}
    calcs = {s: DemoCalculator(os.path.join(DEMO_CHAT_DIR, f"calculator_{s}.jsonl")) for s in ("train", "val")}
    assert len(chats["train"]) >= 300 and len(calcs["train"]) >= 200 and len(chats["val"]) > 0 and len(calcs["val"]) > 0
    texts = {s: [json.dumps(t[i]["messages"]) for i in range(len(t))] for s, t in chats.items()}
    assert not set(texts["train"]) & set(texts["val"])  # held out
    assert len(set(texts["train"])) == len(texts["train"])
    joined = " ".join(texts["train"])
    for topic in ("mlxchat", "State of the Union", "Hello", "president"):
        assert topic in joined
    # every conversation renders, and the assistant has supervised tokens
    for task in list(chats.values()) + list(calcs.values()):
        for i in range(len(task)):
            ids, mask = tokenizer.render_conversation(task[i])
            assert ids[0] == tokenizer.get_bos_token_id() and sum(mask) > 0
    # calculator rows: GSM8K's parts, tool outputs that the calculator tool really prints, a gradable answer
    from mlxchat.execution import use_calculator
    kinds = {"arithmetic": 0, "count": 0}
    for s, task in calcs.items():
        for i in range(len(task)):
            conv = task[i]
            parts = conv["messages"][1]["content"]
            assert [p["type"] for p in parts][-1] == "text"
            for p, q in zip(parts, parts[1:]):
                if p["type"] == "python":
                    assert q["type"] == "python_output"
                    if ".count(" in p["text"]:
                        kinds["count"] += 1
                        if kinds["count"] <= 2:  # string expressions run in the sandbox: slow, check a couple
                            assert str(use_calculator(p["text"])) == q["text"]
                    else:
                        kinds["arithmetic"] += 1
                        assert str(use_calculator(p["text"])) == q["text"], p["text"]
            reference = "".join(p["text"] for p in parts if p["type"] != "python_output")
            assert extract_answer(reference) is not None
            assert task.reward(conv, reference) == 1.0 and task.reward(conv, "#### -1") == 0.0
    assert kinds["arithmetic"] > 100 and kinds["count"] > 20


def test_demo_chat_set_is_what_the_generator_makes():
    from scripts.gen_demo_chat import corpus_words, generate
    files = generate(corpus_words())
    for name, lines in files.items():
        with open(os.path.join(DEMO_CHAT_DIR, name), encoding="utf-8") as f:
            assert f.read() == "\n".join(lines) + "\n", f"{name} is stale: rerun python -m scripts.gen_demo_chat"


def test_ctrl_c_saves_and_exits(fixture_dir, monkeypatch):
    import signal
    from mlxchat.common import get_base_dir
    from mlxchat.checkpoint_manager import find_steps
    install_base(fixture_dir, get_base_dir())
    real = sft.get_sft_muon_momentum

    def momentum_then_interrupt(it):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C was pressed during step 4
        return real(it)
    monkeypatch.setattr(sft, "get_sft_muon_momentum", momentum_then_interrupt)
    result = chat_sft.main(["--mixture", "demo", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "128",
                            "--num-iterations", "100", "--eval-every", "-1", "--eval-tokens", "128"])
    assert result["step"] == 4  # the step in flight finished, then it stopped
    assert result["exit_status"] == 130
    assert find_steps(os.path.join(get_base_dir(), "chatsft_checkpoints", "d3")) == [4]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_demo_mixture_adds_cached_real_task_data():
    import task_data_helper as tdh
    _, _, notes = build_mixtures("demo")
    assert any("MMLU dev: not in the task cache" in n for n in notes)
    tdh.write_task_cache("cais/mmlu", "all", "dev", tdh.mmlu_rows("dev", 10), tdh.MMLU_SCHEMA)
    tdh.write_task_cache("allenai/ai2_arc", "ARC-Easy", "validation", tdh.arc_rows("ARC-Easy", "validation", 7), tdh.ARC_SCHEMA)
    train, val, notes = build_mixtures("demo", mmlu_epochs=3, gsm8k_epochs=4)
    demo_only = len(CustomJSON(os.path.join(DEMO_CHAT_DIR, "chat_train.jsonl"))) \
        + 4 * len(DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_train.jsonl")))
    assert len(train) == demo_only + 3 * 10 + 7
    assert "MMLU dev (10) x3" in notes and "ARC-Easy validation (7)" in notes
    questions = {train[i]["messages"][0]["content"] for i in range(len(train))}
    assert sum(q.startswith("Multiple Choice question:") for q in questions) == 17


def test_chatcore_centers_and_averages(monkeypatch):
    import mlxchat.chat_eval as chat_eval
    accuracies = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.05}
    calls = []

    def fake_run_chat_eval(name, model, tokenizer, engine, batch_size=1, max_problems=None, temperature=0.0, **kw):
        calls.append((name, batch_size, max_problems, temperature))
        return accuracies[name]
    monkeypatch.setattr(chat_eval, "run_chat_eval", fake_run_chat_eval)
    results = sft.make_chatcore(model=None, tokenizer=None, batch_size=4, max_cat=-1, max_sample=24)()
    centered = [(0.5 - 0.25) / 0.75, 0.0, (0.4 - 0.25) / 0.75, 0.1, 0.05]
    assert results["ChatCORE"] == pytest.approx(sum(centered) / 5)
    assert results["ChatCORE_cat"] == pytest.approx(sum(centered[:3]) / 3)
    # categorical tasks: all problems, batched; generative: 24 problems, greedy (nanochat's settings)
    assert sorted(calls) == sorted([("ARC-Easy", 4, None, 0.0), ("ARC-Challenge", 4, None, 0.0), ("MMLU", 4, None, 0.0),
                                    ("GSM8K", 4, 24, 0.0), ("HumanEval", 4, 24, 0.0)])


def test_the_packer_resumes_with_exactly_the_next_batch(tokenizer):
    convs = ListTask(make_conversations(60, seed=5))
    gen = sft_rows_bestfit(convs, tokenizer, num_rows=2, row_capacity=257, buffer_size=16, rank=1, world_size=2)
    batches = [next(gen) for _ in range(12)]  # past the end of the rank's half: into its second epoch
    assert batches[-1][3]["epoch"] >= 2
    for k in (0, 5, 9):
        saved = json.loads(json.dumps(batches[k][3]))  # as it goes through a checkpoint's JSON
        resumed = sft_rows_bestfit(convs, tokenizer, num_rows=2, row_capacity=257, buffer_size=16, rank=1,
                                   world_size=2, resume_state=saved)
        for expected in batches[k + 1:]:
            assert next(resumed) == expected
    with pytest.raises(ValueError, match="same mixture"):
        next(sft_rows_bestfit(ListTask(make_conversations(59, seed=5)), tokenizer, 2, 257, resume_state=batches[3][3]))


def test_a_stopped_sft_run_resumes_exactly(fixture_dir, tmp_path):
    """Stopped midway and resumed, an SFT run ends with the weights and the step losses of the run
    that went through: the same batches (the packer's position), optimizer state and schedule."""
    from mlxchat.common import get_base_dir
    from mlxchat.sft import SFTConfig, SFTRun
    install_base(fixture_dir, get_base_dir())
    settings = dict(mixture="demo", max_seq_len=64, device_batch_size=2, total_batch_size=256, num_iterations=6,
                    eval_every=-1, eval_tokens=128)

    def train(folder, stop_after=None, **extra):
        run = SFTRun(SFTConfig(**settings, checkpoint_dir=str(folder), **extra))
        losses = {}
        for event in run:
            if event.kind == "step":
                losses[event.step] = event.loss
                if event.step == stop_after:
                    run.control.stop()
        return run, losses

    through, through_losses = train(tmp_path / "through")
    stopped, _ = train(tmp_path / "stopped", stop_after=3)  # taken at a step boundary: after step 3 or 4
    at = stopped.result["step"]
    assert stopped.result["status"] == "stopped" and at in (3, 4)
    from mlxchat.training import TrainingError
    with pytest.raises(TrainingError, match="needs the same --mixture"):  # 3 rounds of the calculator set, not 4
        train(tmp_path / "stopped", resume_from_step=-2, gsm8k_epochs=3)
    resumed, resumed_losses = train(tmp_path / "stopped", resume_from_step=-2)
    assert resumed.result["status"] == "finished" and resumed.result["step"] == 6
    assert sorted(resumed_losses) == list(range(at + 1, 7))
    assert resumed_losses == {s: through_losses[s] for s in range(at + 1, 7)}
    a, _, _ = load_checkpoint(str(tmp_path / "through"), 6)
    b, _, _ = load_checkpoint(str(tmp_path / "stopped"), 6)
    assert a.keys() == b.keys() and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
