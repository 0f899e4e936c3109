"""
The Chat pane: talk to a checkpoint, or to a training run's current weights while it trains.

Its ChatWorker thread does all the MLX work; the pane only sends it jobs and shows what it reports
(tui/chat_worker.py). Keys: Enter sends; Esc stops the reply being streamed, otherwise leaves the
text field (so that the app's number keys work again); Ctrl-L starts a new conversation; Ctrl-R
reloads the chosen model (a checkpoint's newest step, or the run's current weights).
"""
import os

from rich.text import Text
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.validation import Integer, Number
from textual.widgets import Input, Label, Markdown, Select, Static

from mlxchat.runs import list_checkpoints
from tui.chat_worker import (ChatWorker, ModelFailed, ModelLoaded, ModelLoading, ReplyDelta, ReplyDone, ReplyFailed,
                             ReplyStarted)

LIVE = object()  # the model list's value for the live weights (no checkpoint path equals it)

ENDINGS = {"stopped": "stopped", "length": "reached the token limit"}
# a small model emits any byte, escape sequences included: show control characters as their symbols
# (U+2400...) rather than send them to the terminal
PRINTABLE = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


def printable(text):
    return text.translate(PRINTABLE)


class UserMessage(Static):
    def __init__(self, text):
        super().__init__(Text(printable(text)), classes="chat-user")


class ChatNotice(Static):
    def __init__(self, text, error=False):
        super().__init__(Text(text), classes="chat-notice -error" if error else "chat-notice")


class AssistantReply(Vertical):
    """One reply as it streams in: the model's text as Markdown, each calculator call and its result
    on lines of their own."""

    LABELS = {"tool_call": "calculator ", "tool_result": "= "}

    def __init__(self):
        super().__init__(classes="chat-assistant")
        self.text = ""  # the reply so far as the model wrote it, all parts
        self._part = self._widget = self._stream = None
        self._segment = ""

    async def append(self, text, part):
        self.text += text
        if part != self._part:
            await self._close_segment()
            self._part, self._segment = part, ""
            if part == "reply":
                self._widget = Markdown(classes="chat-reply")
                await self.mount(self._widget)
                # coalesces writes that come faster than the widget renders them
                self._stream = Markdown.get_stream(self._widget)
            else:
                self._widget = Static(classes=f"chat-{part.replace('_', '-')}")
                await self.mount(self._widget)
        text = printable(text)
        self._segment += text
        if self._stream is not None:
            await self._stream.write(text)
        else:
            self._widget.update(Text.assemble((self.LABELS.get(self._part, ""), "bold"), self._segment))

    async def finish(self, ending=None):
        await self._close_segment()
        if not self.text:
            ending = ending or "no reply"
        if ending:
            await self.mount(Static(Text(f"[{ending}]"), classes="chat-ending"))

    async def stop_stream(self):
        """End the Markdown stream's background task (also when the reply is thrown away)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.stop()
        return stream is not None

    async def _close_segment(self):
        if await self.stop_stream():
            # appends can leave the document wrong after an unclosed code fence; the whole text repairs it
            await self._widget.update(self._segment)


class ChatPane(Vertical):
    BINDINGS = [
        Binding("escape", "escape", "Stop / leave", show=False),
        Binding("ctrl+l", "new_conversation", "New chat"),
        Binding("ctrl+r", "reload", "Reload model"),
    ]

    def __init__(self, runs_dir=None, *, temperature=0.6, top_k=50, max_tokens=512, **kwargs):
        super().__init__(**kwargs)
        self.runs_dir = runs_dir
        self.max_tokens = max_tokens
        self._temperature, self._top_k = temperature, top_k
        self.worker = None  # the ChatWorker, from mount to shutdown
        self._live = None  # (RunControl, run label) while a run is active
        self._checkpoints = {}  # model list value (a path) -> CheckpointInfo, or None for a folder opened by hand
        self._opened = []  # folders opened with open_checkpoint that the listing does not show
        self._options = None  # what the model list shows: [(label, value)]
        self._pending_open = None
        self._chosen = None  # what was last asked for (a path or LIVE)
        self.model = None  # the loaded model's label
        self._loading = None  # the label of what is loading
        self._awaiting_live = False  # weights asked of a run, not handed over yet
        self._usage = (0, 0)  # (tokens used, context length)
        self._speed = None  # tok/s of the last reply
        self._reply_id = self._reply = None  # the reply being streamed and its widget

    def compose(self):
        with Horizontal(id="chat-controls"):
            yield Select([], prompt="choose a model", id="chat-model")
            yield Label("temperature", classes="chat-setting")
            yield Input(f"{self._temperature:g}", id="chat-temperature", type="number",
                        validators=[Number(minimum=0, failure_description="temperature: a number >= 0")])
            yield Label("top-k", classes="chat-setting")
            yield Input(str(self._top_k), id="chat-top-k", type="integer",
                        validators=[Integer(minimum=0, failure_description="top-k: a whole number >= 0 (0 = off)")])
        yield Static("", id="chat-settings-error")
        yield VerticalScroll(id="chat-transcript")
        yield Static("", id="chat-status")
        yield Input(placeholder="Message (Enter sends)", id="chat-input")

    def on_mount(self):
        self.worker = ChatWorker(self).start()
        self.query_one("#chat-settings-error").display = False
        # follow new text only while the view is at the bottom: scrolling up releases the anchor
        self.query_one("#chat-transcript").anchor()
        self.refresh_models()
        self._update_status()
        if self._pending_open is not None:
            self.open_checkpoint(self._pending_open)

    def on_unmount(self):
        self.shutdown()

    # ------------------------------------------------------------------ what the app calls

    def shutdown(self, timeout=5.0):
        """Stop the chat thread (a reply stops within a token). True once it has ended."""
        return self.worker.shutdown(timeout) if self.worker is not None else True

    def focus_input(self):
        """Focus the message field (the app calls it whenever the pane is shown, so the model list is
        refreshed then too: checkpoints saved meanwhile appear)."""
        self.refresh_models()
        self.query_one("#chat-input").focus()

    def set_live_source(self, control, label):
        """A training run's RunControl (or None when no run is active): the model list offers its
        current weights first."""
        self._live = (control, label) if control is not None else None
        if self.worker is not None:
            self.worker.training_control = control
        if control is None and self._awaiting_live:
            # the run ended before its next step boundary: its weights never come
            self._awaiting_live, self._loading = False, None
            self.notify("the run ended before handing over its weights: choose its checkpoint instead")
            self._update_status()
        if self.is_mounted:
            self.refresh_models()

    def open_checkpoint(self, path):
        """Choose and load the checkpoint folder `path` (a run, a base-dir or a nanochat checkpoint)."""
        path = os.path.abspath(os.path.expanduser(path))
        if self.worker is None:  # not mounted yet
            self._pending_open = path
            return
        self._pending_open = None
        self.refresh_models()
        value = next((p for p in self._checkpoints if os.path.realpath(p) == os.path.realpath(path)), None)
        if value is None:
            self._opened.append(path)
            self.refresh_models()
            value = path
        self._choose(value)
        self.query_one("#chat-model", Select).value = value

    def stop_reply(self):
        """Stop the reply being streamed; False if there is none."""
        if self._reply_id is None:
            return False
        self.worker.cancel()
        self._update_status("stopping…")
        return True

    def new_conversation(self):
        if self.worker is None:
            return
        self.worker.cancel()
        self.worker.new_conversation()
        reply, self._reply_id, self._reply = self._reply, None, None  # what that reply still sends is ignored
        self._usage = (1 if self._usage[1] else 0, self._usage[1])
        self._update_status()
        # queued like the messages: a message sent right after this lands in the emptied transcript
        self.call_later(self._clear_transcript, reply)

    async def _clear_transcript(self, reply):
        if reply is not None:
            await reply.stop_stream()
        await self.query_one("#chat-transcript").remove_children()

    def refresh_models(self):
        """Fill the model list: the live weights first (while a run is active), then every checkpoint,
        newest first. The current choice stays chosen."""
        try:
            infos = list_checkpoints(self.runs_dir)
        except Exception as e:  # an unreadable folder must not take the pane down
            infos = []
            self.notify(f"could not list the checkpoints: {e}", severity="error")
        options = [(f"live: current weights of {self._live[1]}", LIVE)] if self._live else []
        self._checkpoints = {}
        for info in infos:
            self._checkpoints[info.path] = info
            options.append((info.label, info.path))
        for path in self._opened:
            if path not in self._checkpoints:
                self._checkpoints[path] = None
                options.append((os.path.basename(os.path.normpath(path)), path))
        select = self.query_one("#chat-model", Select)
        if options == self._options:
            return
        self._options = options
        current = select.value
        select.set_options(options)
        if any(value == current for _, value in options):
            select.value = current
        if not any(value == self._chosen for _, value in options):
            self._chosen = None  # gone from the list: choosing it again (when it is back) loads it

    # ------------------------------------------------------------------ keys

    def action_escape(self):
        if not self.stop_reply():
            self.screen.set_focus(None)  # leave the field: the app's keys work again

    def action_new_conversation(self):
        self.new_conversation()

    def action_reload(self):
        if self._chosen is None:
            self.notify("no model chosen yet")
            return
        self.refresh_models()  # a checkpoint's newest step
        self._choose(self._chosen)

    # ------------------------------------------------------------------ choosing a model

    def on_select_changed(self, event: Select.Changed):
        if event.select.id != "chat-model" or event.value is Select.NULL or event.value == self._chosen:
            return  # cleared, or what the pane chose itself
        self._choose(event.value)

    def _choose(self, value):
        self._chosen = value
        self.worker.cancel()  # a reply of the model being replaced is not worth finishing
        if value is LIVE:
            if self._live is None:
                self.notify("no run is training: its last weights stay loaded")
                return
            control, label = self._live
            self._loading = f"the weights of {label}"
            self._awaiting_live = True
            # answered on the training thread at its next step boundary: load_weights only enqueues there
            control.request_weights(self.worker.load_weights)
        else:
            info = self._checkpoints.get(value)
            self._loading = info.label if info else os.path.basename(value)
            self.worker.load_checkpoint(value, step=info.step if info else None, label=info.label if info else None)
        self._update_status()

    def on_model_loading(self, message: ModelLoading):
        self._awaiting_live = False
        self._loading = message.label
        self._update_status()

    async def on_model_loaded(self, message: ModelLoaded):
        self._loading = None
        self.model = message.label
        self._usage = (1 if not message.kept_conversation else self._usage[0], message.context_len)
        self._update_status()
        transcript = self.query_one("#chat-transcript")
        if not message.kept_conversation:
            await transcript.remove_children()
        params = f"{message.num_params / 1e6:.1f}M" if message.num_params >= 1e5 else f"{message.num_params:,}"
        what = "continuing with" if message.kept_conversation else "chatting with"
        await transcript.mount(ChatNotice(f"{what} {message.label} ({params} parameters, context {message.context_len} tokens)"))

    async def on_model_failed(self, message: ModelFailed):
        self._loading = None
        self._update_status()
        await self.query_one("#chat-transcript").mount(ChatNotice(f"could not load the model: {message.error}", error=True))

    # ------------------------------------------------------------------ the conversation

    def _sampling(self):
        """(temperature, top_k) from the fields, or None while one is invalid."""
        t, k = self.query_one("#chat-temperature", Input), self.query_one("#chat-top-k", Input)
        if not (t.validate(t.value).is_valid and k.validate(k.value).is_valid):
            return None
        return float(t.value), int(k.value)

    def on_input_changed(self, event: Input.Changed):
        if event.input.id not in ("chat-temperature", "chat-top-k"):
            return
        problems = []
        for field in (self.query_one("#chat-temperature", Input), self.query_one("#chat-top-k", Input)):
            problems += field.validate(field.value).failure_descriptions
        error = self.query_one("#chat-settings-error", Static)
        error.update(Text(" · ".join(problems)))
        error.display = bool(problems)

    async def on_input_submitted(self, event: Input.Submitted):
        event.stop()
        if event.input.id != "chat-input":
            self.focus_input()  # Enter in a setting: back to the message
            return
        text = event.value.strip()
        if not text:
            return
        transcript = self.query_one("#chat-transcript")
        if self._reply_id is not None:
            self.notify("a reply is still streaming: Esc stops it")
            return
        if self.model is None and self._loading is None:
            await transcript.mount(ChatNotice("No model loaded: choose one in the list above.", error=True))
            return
        sampling = self._sampling()
        if sampling is None:
            self.notify("fix the temperature / top-k first", severity="error")
            return
        event.input.value = ""
        self._reply = AssistantReply()
        await transcript.mount(UserMessage(text))
        await transcript.mount(self._reply)
        transcript.scroll_end(animate=False)  # a new turn: follow it again
        self._reply_id = self.worker.generate(text, temperature=sampling[0], top_k=sampling[1], max_tokens=self.max_tokens)
        self._update_status()

    async def on_reply_started(self, message: ReplyStarted):
        if message.reply_id != self._reply_id:
            return
        self._usage = (message.prompt_tokens, message.context_len)
        self._update_status()
        if message.notice:
            await self.query_one("#chat-transcript").mount(ChatNotice(f"context: {message.notice}"), before=self._reply)

    async def on_reply_delta(self, message: ReplyDelta):
        if message.reply_id == self._reply_id:
            await self._reply.append(message.text, message.part)

    async def on_reply_done(self, message: ReplyDone):
        if message.reply_id != self._reply_id:
            return
        reply, self._reply_id, self._reply = self._reply, None, None
        self._speed = message.tok_per_sec if message.tokens else self._speed
        self._usage = (message.context_used, message.context_len)
        self._update_status()
        await reply.finish(ENDINGS.get(message.reason))

    async def on_reply_failed(self, message: ReplyFailed):
        if message.reply_id != self._reply_id:
            return
        reply, self._reply_id, self._reply = self._reply, None, None
        self._update_status()
        await reply.finish()
        await self.query_one("#chat-transcript").mount(ChatNotice(message.error, error=True))

    def _update_status(self, doing=None):
        parts = []
        if self._loading:
            parts.append(f"loading {self._loading}…")
        parts.append(self.model or "no model: choose one above")
        used, context = self._usage
        if context:
            parts.append(f"context {used}/{context}")
        if doing or self._reply_id is not None:
            parts.append(doing or "replying…")
        elif self._speed is not None:
            parts.append(f"{self._speed:.1f} tok/s")
        parts.append("Esc stops · Ctrl-L new chat")
        self.query_one("#chat-status", Static).update(Text(" · ".join(parts)))
