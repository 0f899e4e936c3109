"""
The dashboard's chat: ChatWorker (the one chat thread) and ChatPane in a tiny host app driven with
Textual's Pilot. A random tiny GPT saved as a checkpoint streams long replies (its unembedding never
favours the special tokens, so a reply runs to its budget unless stopped); the bigram GPT of
test_chat_stream.py, handed over as a training run's live weights, calls its calculator.
"""
import asyncio
import os
import threading
import time

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from textual.app import App
from textual.widgets import Input, Select, Static

from mlxchat.checkpoint_manager import save_checkpoint
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.runs import CheckpointInfo
from mlxchat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer
from mlxchat.training import WeightsSnapshot
from test_chat_stream import bigram_gpt
from tui import chat_worker
from tui.chat_worker import ChatWorker, ModelLoaded, ReplyDelta, ReplyDone, ReplyStarted
from tui.panes import chat as chat_pane
from tui.panes.chat import LIVE, AssistantReply, ChatNotice, ChatPane, UserMessage

pytestmark = pytest.mark.timeout(120)
STEP = 3
CONTEXT = 4096


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, tokenizer): a random depth-2 GPT with a 4096-token context (a reply that runs
    to its budget takes seconds here), saved at step 3 with its tokenizer beside it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLXCHAT_DTYPE", "float32")
        tok = RustBPETokenizer.train_from_iterator(iter(["The State of the Union is strong: 3 + 4 = 7!"]), 256 + 9 + 16)
        ckpt = str(tmp_path_factory.mktemp("tiny-run"))
        config = GPTConfig(sequence_len=CONTEXT, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                           n_embd=64, window_pattern="L")
        model = GPT(config)
        # large random logits, but none for the special tokens: replies never end by themselves
        keep = mx.array([0.0 if i in {tok.encode_special(s) for s in SPECIAL_TOKENS} else 1.0
                         for i in range(model.padded_vocab_size)])[:, None]
        model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape, key=mx.random.key(0)) * keep
        mx.eval(model.parameters())
        save_checkpoint(ckpt, STEP, dict(tree_flatten(model.parameters())), None, {"model_config": config.to_dict()})
        tok.save(ckpt)
    return ckpt, tok


class Recorder:
    """A ChatWorker target outside any app: keeps every message with its arrival time."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()

    def post_message(self, message):
        with self.lock:
            self.messages.append((time.monotonic(), message))
        return True

    def of(self, kind):
        with self.lock:
            return [(t, m) for t, m in self.messages if isinstance(m, kind)]

    def wait_for(self, kind, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.of(kind):
            assert time.monotonic() < deadline, f"no {kind.__name__} within {timeout}s: {[m for _, m in self.messages]}"
            time.sleep(0.01)
        return self.of(kind)[-1][1]


def test_worker_streams_coalesced_deltas_cancels_and_shuts_down_fast(tiny):
    ckpt, tok = tiny
    rec = Recorder()
    worker = ChatWorker(rec).start()
    try:
        worker.generate("hi")
        failed = rec.wait_for(chat_worker.ReplyFailed)
        assert "no model loaded" in failed.error
        worker.load_checkpoint(ckpt)
        loaded = rec.wait_for(ModelLoaded)
        assert loaded.step == STEP and loaded.context_len == CONTEXT and loaded.num_params > 0
        assert loaded.label == f"{os.path.basename(ckpt)} · step {STEP}"

        # a reply that runs to its budget: deltas are coalesced, never one per token
        rid = worker.generate("hello", temperature=1.0, top_k=0, max_tokens=400)
        done = rec.wait_for(ReplyDone)
        assert done.reply_id == rid and done.reason == "length" and done.tokens == 400 and done.tok_per_sec > 0
        deltas = [(t, m) for t, m in rec.of(ReplyDelta) if m.reply_id == rid]
        assert all(isinstance(m.text, str) and m.part == "reply" for _, m in deltas)
        span = deltas[-1][0] - deltas[0][0]
        assert 1 < len(deltas) <= 25 * span + 2, (len(deltas), span)  # ~20 a second at most
        assert len(deltas) < done.tokens / 3
        started = rec.of(ReplyStarted)[-1][1]
        assert done.context_used == started.prompt_tokens + 400 + 1  # the turn is kept, closed by <|assistant_end|>

        # cancel() stops a long reply within a token
        rid = worker.generate("again", temperature=1.0, top_k=0, max_tokens=5000)
        while not [m for _, m in rec.of(ReplyDelta) if m.reply_id == rid]:
            time.sleep(0.005)
        t0 = time.monotonic()
        worker.cancel()
        done = rec.wait_for(ReplyDone)
        while done.reply_id != rid:
            time.sleep(0.005)
            done = rec.wait_for(ReplyDone)
        budget = CONTEXT - [m for _, m in rec.of(ReplyStarted) if m.reply_id == rid][0].prompt_tokens
        assert done.reason == "stopped" and rec.of(ReplyDone)[-1][0] - t0 < 0.5 and done.tokens < budget

        # shutdown mid-reply returns within a second and the thread is gone
        rid = worker.generate("once more", temperature=1.0, top_k=0, max_tokens=5000)
        while not [m for _, m in rec.of(ReplyDelta) if m.reply_id == rid]:
            time.sleep(0.005)
        t0 = time.monotonic()
        assert worker.shutdown(timeout=5) is True
        assert time.monotonic() - t0 < 1.0 and not worker.alive
    finally:
        worker.shutdown()


# -----------------------------------------------------------------------------
# the pane in a host app

class RecordingPane(ChatPane):
    """ChatPane that also notes when each ReplyDelta arrives (Textual calls the base class's handler
    after this one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deltas, self.done = [], []

    def on_reply_delta(self, message):
        self.deltas.append((time.monotonic(), message.reply_id, message.text, message.part))

    def on_reply_done(self, message):
        self.done.append((time.monotonic(), message))


class Host(App):
    def __init__(self, **pane_kwargs):
        super().__init__()
        self.pane_kwargs = pane_kwargs

    def compose(self):
        yield RecordingPane(**self.pane_kwargs)


async def wait_until(pilot, predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.02)


def status(pane):
    return str(pane.query_one("#chat-status", Static).content)


def transcript(pane):
    return pane.query_one("#chat-transcript")


async def send(pilot, pane, text):
    """Type `text` and press Enter. Not pilot.press("enter"): Pilot waits until the app is idle, which
    a streaming reply never is."""
    pane.focus_input()
    await pilot.press(*text)
    await pane.query_one("#chat-input", Input).action_submit()
    await pilot.pause()


@pytest.fixture
def listed(tiny, monkeypatch):
    """The model list shows the tiny checkpoint (mlxchat.runs.list_checkpoints reads real run folders)."""
    ckpt, _ = tiny
    info = CheckpointInfo(label=f"tiny · base · step {STEP}", path=ckpt, step=STEP, stage="base", source="runs", mtime=0.0)
    calls = []
    monkeypatch.setattr(chat_pane, "list_checkpoints", lambda runs_dir=None: calls.append(runs_dir) or [info])
    return info, calls


def test_choose_a_checkpoint_chat_stop_and_start_over(listed, tmp_path):
    async def main():
        info, calls = listed
        app = Host(runs_dir=str(tmp_path), max_tokens=5000)
        async with app.run_test(size=(100, 40)) as pilot:
            pane = app.query_one(RecordingPane)
            select = pane.query_one("#chat-model", Select)
            assert calls == [str(tmp_path)] and [v for _, v in select._options if v is not Select.NULL] == [info.path]

            # sending before any model is chosen says so
            await send(pilot, pane, "anyone?")
            await wait_until(pilot, lambda: any("No model loaded" in str(n.content) for n in pane.query(ChatNotice)))
            assert not pane.query(UserMessage) and pane.query_one("#chat-input", Input).value == "anyone?"  # kept
            pane.query_one("#chat-input", Input).value = ""

            select.value = info.path  # what picking it in the list does
            await wait_until(pilot, lambda: pane.model == info.label, what="the model to load")
            assert f"context 1/{CONTEXT}" in status(pane)

            # a long reply streams: several deltas, the text grows; Esc stops it quickly
            await send(pilot, pane, "hello")
            await wait_until(pilot, lambda: len(pane.deltas) >= 3, what="streamed deltas")
            reply = pane.query_one(AssistantReply)
            assert len(reply.text) > 0 and pane.query_one(UserMessage).content.plain == "hello"
            assert "replying" in status(pane)
            shown = len(reply.text)
            await wait_until(pilot, lambda: len(reply.text) > shown, what="the reply to grow")
            t0 = time.monotonic()
            await pilot.press("escape")
            await wait_until(pilot, lambda: pane.done, what="the reply to stop")
            when, done = pane.done[0]
            assert done.reason == "stopped" and when - t0 < 1.0 and done.tokens < CONTEXT - 10
            await wait_until(pilot, lambda: reply.query(".chat-ending"), what="the reply's last line")
            assert reply.text == "".join(text for _, _, text, _ in pane.deltas)  # every delta shown, in order
            assert "[stopped]" in [str(s.content) for s in reply.query(".chat-ending")]
            assert f"{done.tok_per_sec:.1f} tok/s" in status(pane)
            # at most ~20 deltas a second, never one per token
            span = pane.deltas[-1][0] - pane.deltas[0][0]
            assert len(pane.deltas) <= 25 * span + 2 and len(pane.deltas) < done.tokens / 3
            assert app.focused is pane.query_one("#chat-input")
            await pilot.press("escape")  # nothing streams: Esc leaves the field, so the app's keys work
            assert app.focused is None

            # Ctrl-L: a new conversation, on screen and in the worker
            pane.max_tokens = 30
            pane.focus_input()
            await pilot.press("ctrl+l")
            await pilot.pause(0.05)
            assert len(transcript(pane).children) == 0
            await send(pilot, pane, "hi")
            await wait_until(pilot, lambda: len(pane.done) == 2 and "tok/s" in status(pane), what="the second reply")
            assert pane.done[1][1].reason == "length" and pane.done[1][1].tokens == 30
            assert len(transcript(pane).children) == 2  # just this exchange
            # BOS, <|user_start|> hi <|user_end|> <|assistant_start|>, the reply, <|assistant_end|>: nothing older
            used = 1 + 3 + len(pane.worker._tokenizer.encode("hi")) + 30 + 1
            assert f"context {used}/{CONTEXT}" in status(pane)

            # Ctrl-L while a reply streams: it stops, and nothing of it reaches the next conversation
            pane.max_tokens = 5000
            await send(pilot, pane, "long")
            await wait_until(pilot, lambda: len(pane.done) == 2 and pane.deltas[-1][1] == pane._reply_id, what="deltas")
            await pilot.press("ctrl+l")
            await wait_until(pilot, lambda: len(pane.done) == 3, what="the stop")
            assert pane.done[2][1].reason == "stopped"
            pane.max_tokens = 20
            await send(pilot, pane, "short")
            await wait_until(pilot, lambda: len(pane.done) == 4 and "tok/s" in status(pane), what="the next reply")
            last = pane.done[3][1].reply_id
            assert [type(w) for w in transcript(pane).children] == [UserMessage, AssistantReply]
            assert pane.query_one(AssistantReply).text == "".join(t for _, rid, t, _ in pane.deltas if rid == last)
            used = 1 + 3 + len(pane.worker._tokenizer.encode("short")) + 20 + 1
            assert f"context {used}/{CONTEXT}" in status(pane)
        assert not pane.worker.alive  # unmounting the pane ended its thread
    asyncio.run(main())


def test_settings_are_validated_inline(listed, tmp_path):
    async def main():
        info, _ = listed
        app = Host(runs_dir=str(tmp_path))
        async with app.run_test(size=(100, 40)) as pilot:
            pane = app.query_one(RecordingPane)
            error = pane.query_one("#chat-settings-error", Static)
            assert not error.display
            temperature, top_k = pane.query_one("#chat-temperature", Input), pane.query_one("#chat-top-k", Input)
            temperature.focus()
            await pilot.press("ctrl+a", "ctrl+k", "-", "1")
            await pilot.pause(0.05)
            assert error.display and "temperature" in str(error.content)
            pane.query_one("#chat-model", Select).value = info.path
            await wait_until(pilot, lambda: pane.model is not None, what="the model to load")
            await send(pilot, pane, "hi")
            await pilot.pause(0.2)
            assert not pane.query(UserMessage) and pane.worker is not None and not pane.deltas  # refused
            temperature.value = "0.5"
            top_k.value = ""
            await pilot.pause(0.05)
            assert error.display and "top-k" in str(error.content) and "temperature" not in str(error.content)
            top_k.value = "7"
            await pilot.pause(0.05)
            assert not error.display
    asyncio.run(main())


class FakeControl:
    """RunControl.request_weights as a training run answers it: on its own thread, a little later."""

    def __init__(self, snapshot):
        self.snapshot, self.threads, self.holds = snapshot, [], []

    def hold(self, on):  # the run is held at a step boundary while a reply streams
        self.holds.append(on)

    def request_weights(self, callback):
        thread = threading.Timer(0.05, callback, args=(self.snapshot,))
        self.threads.append(thread)
        thread.start()


def test_live_weights_load_and_answer_with_the_calculator(listed, tiny, tmp_path):
    async def main():
        _, tok = tiny
        tok_dir = str(tmp_path / "tokenizer")
        tok.save(tok_dir)
        sp = tok.encode_special
        three, plus, four, bang = (tok.enc.encode_single_token(b) for b in (b"3", b"+", b"4", b"!"))
        model = bigram_gpt(tok, {sp("<|assistant_start|>"): sp("<|python_start|>"), sp("<|python_start|>"): three,
                                 three: plus, plus: four, four: sp("<|python_end|>"), sp("<|output_end|>"): bang,
                                 bang: sp("<|assistant_end|>")})
        snapshot = WeightsSnapshot(step=7, stage="base", run_dir=str(tmp_path / "run-x"), model_config=model.config.to_dict(),
                                   weights=dict(tree_flatten(model.parameters())), tokenizer_dir=tok_dir)
        control = FakeControl(snapshot)
        app = Host(runs_dir=str(tmp_path))
        async with app.run_test(size=(100, 40)) as pilot:
            pane = app.query_one(RecordingPane)
            select = pane.query_one("#chat-model", Select)
            # a run that ends before its next step never hands its weights over: the pane stops waiting
            silent = FakeControl(None)
            silent.request_weights = lambda callback: None
            pane.set_live_source(silent, "run-old")
            select.value = LIVE
            await wait_until(pilot, lambda: "loading the weights of run-old" in status(pane), what="the request")
            pane.set_live_source(None, None)
            await pilot.pause(0.05)
            assert "loading" not in status(pane) and pane.model is None

            pane.set_live_source(control, "run-x")
            assert select._options[1] == ("live: current weights of run-x", LIVE)  # first, after the blank entry
            select.value = LIVE
            await wait_until(pilot, lambda: pane.model is not None, what="the live weights")
            assert pane.model == "live · run-x · step 7" and control.threads[0] is not threading.current_thread()
            pane.query_one("#chat-temperature", Input).value = "0"
            pane.focus_input()
            await pilot.press(*"3+4?", "enter")  # a reply this short lets Pilot's press wait for it
            await wait_until(pilot, lambda: pane.done and "tok/s" in status(pane), what="the reply")
            assert pane.done[0][1].reason == "end"
            reply = pane.query_one(AssistantReply)
            # the call and its result as they happened, each shown on its own
            assert [str(s.content) for s in reply.query(".chat-tool-call")] == ["calculator 3+4"]
            assert [str(s.content) for s in reply.query(".chat-tool-result")] == ["= 7"]
            assert reply.text == "3+47!" and "tok/s" in status(pane)
            assert control.holds == [True, False]  # the training run was held for the reply, then let go

            # the run ends: its entry goes, the loaded weights stay
            pane.set_live_source(None, None)
            await pilot.pause(0.05)
            assert all(v is not LIVE for _, v in select._options) and pane.model == "live · run-x · step 7"
    asyncio.run(main())
