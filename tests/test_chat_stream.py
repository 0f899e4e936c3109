"""
mlxchat.chat: the streaming reply shared by chat_cli, chat_web and the dashboard. A fake engine
yields chosen token columns and masks (split characters, stop tokens, a tool call and its forced
result, a stop asked from another thread); the real Engine runs a tiny GPT made to call its
calculator; Conversation carries and fits the turns.
"""
import threading
import time

import mlx.core as mx
import pytest

from mlxchat.chat import Conversation, ReplyEnd, TextDelta, render_turn, stream_chat
from mlxchat.engine import Engine
from mlxchat.gpt import GPT, GPTConfig, norm
from mlxchat.tokenizer import RustBPETokenizer


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(["The State of the Union is strong: 3 + 4 = 7!"]), 256 + 9 + 16)


def byte_ids(tok, text):
    """One token per UTF-8 byte: every multi-byte character arrives split over several tokens."""
    return [tok.enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]


class FakeEngine:
    """Engine.generate's interface over a fixed list of (token, mask) steps; records how many steps
    were drawn, when, and whether the generator was closed."""

    def __init__(self, steps, delay=0.0):
        self.steps, self.delay = steps, delay
        self.drawn, self.times, self.closed = 0, [], False

    def generate(self, tokens, num_samples=1, **kwargs):
        try:
            for token, mask in self.steps:
                time.sleep(self.delay)
                self.drawn += 1
                self.times.append(time.monotonic())
                yield [token], [mask]
        finally:
            self.closed = True


def run(engine, tok, **kwargs):
    pieces = list(stream_chat(engine, tok, [tok.get_bos_token_id()], max_tokens=10_000, **kwargs))
    assert isinstance(pieces[-1], ReplyEnd) and all(isinstance(p, TextDelta) for p in pieces[:-1])
    return pieces[:-1], pieces[-1]


def test_split_characters_come_out_whole(tok):
    text = "naïve café 日本語 🙂 ok"
    ids = byte_ids(tok, text)
    deltas, end = run(FakeEngine([(t, 1) for t in ids]), tok)
    assert "".join(d.text for d in deltas) == text
    assert not any("\ufffd" in d.text for d in deltas)
    assert "🙂" in [d.text for d in deltas]  # its 4 byte tokens came out as one piece
    assert len(deltas) > 10  # piece by piece, not all at the end
    assert end.tokens == ids and end.num_tokens == len(ids) and end.reason == "length"
    assert all(d.part == "reply" and not d.marker for d in deltas)


def test_invalid_bytes_are_not_held_back_forever(tok):
    stray = [tok.enc.encode_single_token(b"\x80")] * 20
    ids = byte_ids(tok, "a") + stray + byte_ids(tok, "€")[:2]  # stray continuation bytes, then an unfinished "€"
    deltas, end = run(FakeEngine([(t, 1) for t in ids]), tok)
    assert len(deltas) >= 3 and deltas[0].text == "a"
    assert "".join(d.text for d in deltas) == "a" + "\ufffd" * 21  # nothing lost at the end either


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_stop_tokens_end_the_reply(tok, stop):
    hi, after = byte_ids(tok, "hi"), byte_ids(tok, "never")
    engine = FakeEngine([(t, 1) for t in hi + [tok.encode_special(stop)] + after])
    deltas, end = run(engine, tok)
    assert "".join(d.text for d in deltas) == "hi"
    assert end.reason == "end" and end.tokens == hi and end.num_tokens == 3  # the stop token counts as generated
    assert engine.drawn == 3 and engine.closed  # nothing drawn past the stop, and the generation freed


def test_should_stop_stops_within_a_token_from_another_thread(tok):
    engine = FakeEngine([(t, 1) for t in byte_ids(tok, "x" * 1000)], delay=0.02)
    stop = threading.Event()
    stopped_at = []

    def press_escape():
        stopped_at.append(time.monotonic())
        stop.set()
    threading.Timer(0.3, press_escape).start()
    deltas, end = run(engine, tok, should_stop=stop.is_set)
    assert end.reason == "stopped" and engine.closed
    assert 0 < end.num_tokens == len(end.tokens) == engine.drawn < 1000
    # asked before each token: at most the token being computed when the stop came is drawn after it
    assert sum(t > stopped_at[0] for t in engine.times) <= 1
    assert "".join(d.text for d in deltas) == "x" * end.num_tokens
    assert end.seconds > 0.25 and end.tok_per_sec == pytest.approx(end.num_tokens / end.seconds)


def test_should_stop_before_the_first_token_generates_nothing(tok):
    engine = FakeEngine([(t, 1) for t in byte_ids(tok, "hello")])
    deltas, end = run(engine, tok, should_stop=lambda: True)
    assert deltas == [] and end.reason == "stopped" and end.num_tokens == 0 and engine.drawn == 0


def test_tool_call_and_result_are_tagged(tok):
    sp = tok.encode_special
    steps = ([(t, 1) for t in byte_ids(tok, "Sum: ")] + [(sp("<|python_start|>"), 1)]
             + [(t, 1) for t in byte_ids(tok, "3+4")] + [(sp("<|python_end|>"), 1)]
             + [(t, 0) for t in [sp("<|output_start|>")] + byte_ids(tok, "7") + [sp("<|output_end|>")]]
             + [(t, 1) for t in byte_ids(tok, " é")] + [(sp("<|assistant_end|>"), 1)])
    deltas, end = run(FakeEngine(steps), tok)
    # the whole reply, exactly as its tokens decode: what chat_cli prints and chat_web sends
    assert "".join(d.text for d in deltas) == tok.decode(end.tokens) == \
        "Sum: <|python_start|>3+4<|python_end|><|output_start|>7<|output_end|> é"
    assert [(d.text, d.part) for d in deltas if d.marker] == [
        ("<|python_start|>", "tool_call"), ("<|python_end|>", "tool_call"),
        ("<|output_start|>", "tool_result"), ("<|output_end|>", "tool_result")]
    by_part = {}
    for d in deltas:
        if not d.marker:
            by_part[d.part] = by_part.get(d.part, "") + d.text
    assert by_part == {"reply": "Sum:  é", "tool_call": "3+4", "tool_result": "7"}
    assert end.reason == "end" and end.num_tokens == len(steps)


# -----------------------------------------------------------------------------
# the real Engine

def bigram_gpt(tok, successors):
    """A tiny GPT whose next token depends only on the current one, chosen by `successors`
    {token: next token}. With every block's output projections zero, the residual stream is a
    positive multiple of the token's normalized embedding e_t, so the logits are lm_head @ e_t; a
    row e_t in the successor's unembedding makes that successor win by a wide margin."""
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = GPT(config)
    for block in model.transformer["h"]:
        block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
        block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
    unit = norm(model.transformer["wte"].weight.astype(mx.float32))
    rows = [mx.zeros((config.n_embd,))] * model.padded_vocab_size
    for t, u in successors.items():
        rows[u] = rows[u] + unit[t] * (12.0 / config.n_embd)  # logit 12 for the successor, ~1.5 (std) for the rest
    model.lm_head.weight = mx.stack(rows)
    mx.eval(model.parameters())
    return model


def test_real_engine_calls_the_calculator_and_the_parts_follow(tok):
    sp = tok.encode_special
    three, plus, four, bang = (tok.enc.encode_single_token(b) for b in (b"3", b"+", b"4", b"!"))
    chain = {sp("<|assistant_start|>"): sp("<|python_start|>"), sp("<|python_start|>"): three, three: plus,
             plus: four, four: sp("<|python_end|>"), sp("<|output_end|>"): bang, bang: sp("<|assistant_end|>")}
    engine = Engine(bigram_gpt(tok, chain), tok)
    prompt = [tok.get_bos_token_id()] + render_turn(tok, "3+4?")
    pieces = list(stream_chat(engine, tok, prompt, max_tokens=32, temperature=0.0))
    deltas, end = pieces[:-1], pieces[-1]
    # the engine ran the call and forced its result in (masks 0): stream_chat tagged it as the result
    assert [(d.text, d.part) for d in deltas if not d.marker] == [
        ("3", "tool_call"), ("+", "tool_call"), ("4", "tool_call"), ("7", "tool_result"), ("!", "reply")]
    assert "".join(d.text for d in deltas) == "<|python_start|>3+4<|python_end|><|output_start|>7<|output_end|>!"
    assert end.reason == "end" and end.num_tokens == len(end.tokens) + 1 == 10
    # and the same tokens as the engine's own non-streaming path
    results, _ = engine.generate_batch(prompt, max_tokens=32, temperature=0.0)
    assert results[0][len(prompt):] == end.tokens

    # a budget that ends inside the call: "length", everything generated so far delivered
    pieces = list(stream_chat(engine, tok, prompt, max_tokens=3, temperature=0.0))
    assert pieces[-1].reason == "length" and pieces[-1].tokens == end.tokens[:3]


# -----------------------------------------------------------------------------
# the conversation

def test_conversation_carries_the_turns_and_drops_the_oldest_with_a_notice(tok):
    sp = tok.encode_special
    conv = Conversation(tok, max_context=64)
    prompt, budget, notice = conv.prompt("hi", max_tokens=16)
    assert prompt == [tok.get_bos_token_id(), sp("<|user_start|>")] + tok.encode("hi") + [sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert budget == 16 and notice is None
    conv.add_reply(byte_ids(tok, "yo"))
    assert conv.turns[0][-3:] == byte_ids(tok, "yo") + [sp("<|assistant_end|>")] and conv.used == len(conv.turns[0]) + 1
    prompt, _, notice = conv.prompt("again", max_tokens=16)
    assert prompt[1:len(conv.turns[0]) + 1] == conv.turns[0] and notice is None  # the 2nd turn sees the 1st
    conv.add_reply(byte_ids(tok, "x" * 30))
    second = conv.turns[1]
    # both turns and this one exceed the 64 - 16 - 1 (BOS) tokens left beside the reply: the oldest goes
    assert len(conv.turns[0]) + len(second) + len(render_turn(tok, "ok")) > 64 - 16 - 1
    prompt, budget, notice = conv.prompt("ok", max_tokens=16)
    assert notice == "the conversation exceeds the model's 64 tokens; dropped the 1 oldest turn"
    assert conv.turns == [second] and prompt[1:len(second) + 1] == second and len(prompt) + budget <= 64
    conv.add_reply([])
    conv.clear()
    assert conv.turns == [] and conv.used == 1
