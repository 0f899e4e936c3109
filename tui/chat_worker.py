"""
The dashboard's chat thread: one long-lived thread owns every MLX array of chat (the model, the KV
caches, the samples) for the app's lifetime, fed by a queue of jobs (load a checkpoint, load a
training run's live weights, reply, start a new conversation), as mlx-lm's server does. A fixed
thread, not a Textual thread worker: MLX arrays belong to the thread that made them, and a thread
that used MLX must call mx.clear_streams() before it ends, which a reused executor thread cannot.

Every method is safe to call from any thread and only enqueues (load_weights is called on the
training thread, between two of its steps). The thread reports to a Textual widget or app with the
messages below, made of plain strings and numbers; reply text is coalesced to at most ~20 messages
a second, however fast the tokens come.
"""
import os
import queue
import threading
import time

import mlx.core as mx
from textual.message import Message

from mlxchat.chat import Conversation, ReplyEnd, stream_chat


class ChatMessage(Message):
    bubble = False  # addressed to the worker's target alone


class ModelLoading(ChatMessage):
    def __init__(self, label):
        super().__init__()
        self.label = label


class ModelLoaded(ChatMessage):
    """kept_conversation: the conversation goes on with this model (same tokenizer as the last one);
    False: it starts afresh."""

    def __init__(self, label, step, num_params, context_len, kept_conversation):
        super().__init__()
        self.label, self.step, self.num_params, self.context_len = label, step, num_params, context_len
        self.kept_conversation = kept_conversation


class ModelFailed(ChatMessage):
    def __init__(self, error):
        super().__init__()
        self.error = error


class ReplyMessage(ChatMessage):
    """About the reply that generate() numbered reply_id."""

    def __init__(self, reply_id):
        super().__init__()
        self.reply_id = reply_id


class ReplyStarted(ReplyMessage):
    """notice: what fitting the conversation into the context dropped, in words (or None)."""

    def __init__(self, reply_id, prompt_tokens, context_len, notice):
        super().__init__(reply_id)
        self.prompt_tokens, self.context_len, self.notice = prompt_tokens, context_len, notice


class ReplyDelta(ReplyMessage):
    """More text of the reply; part: "reply", "tool_call" (the calculator expression) or
    "tool_result" (its value). The <|python_start|>-style markers are left out."""

    def __init__(self, reply_id, text, part):
        super().__init__(reply_id)
        self.text, self.part = text, part


class ReplyDone(ReplyMessage):
    """tokens: how many were generated; reason: "end" (the model ended its turn), "length" (token
    budget), "stopped" (cancel)."""

    def __init__(self, reply_id, tokens, seconds, tok_per_sec, reason, context_used, context_len):
        super().__init__(reply_id)
        self.tokens, self.seconds, self.tok_per_sec, self.reason = tokens, seconds, tok_per_sec, reason
        self.context_used, self.context_len = context_used, context_len


class ReplyFailed(ReplyMessage):
    def __init__(self, reply_id, error):
        super().__init__(reply_id)
        self.error = error


def _error_text(e):
    # the library's own errors (missing files, bad checkpoints, ...) carry a sentence; others need their name
    if isinstance(e, (OSError, ValueError, RuntimeError)) and str(e):
        return str(e)
    return f"{type(e).__name__}: {e}"


class ChatWorker:
    """The chat thread (a daemon: it never keeps the process alive). start() it, then call its methods
    from anywhere; shutdown() ends it."""

    POST_INTERVAL = 0.05  # seconds between two ReplyDelta posts: a streaming Markdown widget keeps up with ~20/s
    FIRST_SEED = 42  # as chat_cli: the first reply's sampling seed, then +1 per reply

    def __init__(self, target, name="mlxchat-chat"):
        self.target = target
        self._jobs = queue.Queue()
        self._lock = threading.Lock()
        # the RunControl of a run training in this process (set by the app): held at a step boundary while
        # a reply streams, so that the reply gets the machine (a reply beside training runs 2.5-70x slower)
        self.training_control = None
        self._next_id = 0  # jobs are numbered as they are queued
        self._cancel_below = 0  # replies with a smaller number stop (or never start)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # owned by the chat thread
        self._model = self._tokenizer = self._engine = self._conversation = None
        self._seed = self.FIRST_SEED

    def start(self):
        self._thread.start()
        return self

    @property
    def alive(self):
        return self._thread.is_alive()

    # ------------------------------------------------------------------ any thread

    def load_checkpoint(self, path, step=None, label=None):
        """Load the checkpoint in folder `path` (its last complete step unless `step`)."""
        self._submit("checkpoint", path, step, label)

    def load_weights(self, snapshot):
        """Chat with a training run's current weights (a mlxchat.training.WeightsSnapshot). Only
        enqueues: RunControl.request_weights calls it on the training thread."""
        self._submit("weights", snapshot)

    def generate(self, message, *, temperature=0.6, top_k=50, max_tokens=512, top_p=None):
        """Answer `message` as the next turn of the conversation: ReplyStarted, ReplyDelta..., then
        ReplyDone (or ReplyFailed, e.g. when no model is loaded). Returns the reply's id, which its
        messages carry."""
        return self._submit("generate", message, dict(temperature=temperature, top_k=top_k, top_p=top_p), max_tokens)

    def new_conversation(self):
        """Forget the turns so far (in order with the other jobs: a reply queued before it still sees them)."""
        self._submit("new_conversation")

    def cancel(self):
        """Stop the reply being generated (within a token) and any reply queued but not started; loads
        and other jobs still run."""
        with self._lock:
            self._cancel_below = self._next_id + 1

    def shutdown(self, timeout=5.0):
        """End the thread: a reply stops at its next token, queued jobs are dropped. Returns True once
        the thread has ended (False if it is still busy after `timeout` seconds, e.g. loading a
        large checkpoint; being a daemon, it does not hold the process)."""
        self._closing.set()
        self._jobs.put(None)  # wakes the thread if it waits for a job
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _submit(self, kind, *args):
        with self._lock:  # numbers in queue order, so that cancel() covers exactly what came before it
            self._next_id += 1
            self._jobs.put((self._next_id, kind, args))
            return self._next_id

    # ------------------------------------------------------------------ the chat thread

    def _post(self, message):
        try:
            self.target.post_message(message)
        except Exception:
            pass  # the target is gone or its event loop closed (app exiting): nobody is listening

    def _run(self):
        try:
            while not self._closing.is_set():
                job = self._jobs.get()
                if job is None or self._closing.is_set():
                    break
                job_id, kind, args = job
                if kind == "generate":
                    self._generate(job_id, *args)
                elif kind == "checkpoint":
                    self._load(self._build_from_checkpoint, *args)
                elif kind == "weights":
                    self._load(self._build_from_snapshot, *args)
                elif kind == "new_conversation" and self._conversation is not None:
                    self._conversation.clear()
        finally:
            self._model = self._tokenizer = self._engine = self._conversation = None
            mx.clear_streams()  # a thread that used MLX and ends without this can abort the process at exit

    def _load(self, build, *args):
        from mlx.utils import tree_flatten
        from mlxchat.engine import Engine
        from mlxchat.tokenizer import tokenizer_fingerprint
        try:
            model, tokenizer, label, step = build(*args)
            if tokenizer.get_vocab_size() != model.config.vocab_size:
                raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {model.config.vocab_size}")
        except Exception as e:
            self._post(ModelFailed(_error_text(e)))
            return
        # the conversation's tokens stay valid with the same tokenizer (a newer step of the same run)
        kept = (self._conversation is not None and self._conversation.turns != []
                and tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(self._tokenizer))
        turns = self._conversation.turns if kept else []
        self._model, self._tokenizer, self._engine = model, tokenizer, Engine(model, tokenizer)
        self._conversation = Conversation(tokenizer, model.config.sequence_len)
        self._conversation.turns = turns
        num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        self._post(ModelLoaded(label, step, num_params, model.config.sequence_len, kept))

    def _build_from_checkpoint(self, path, step, label):
        from mlxchat.checkpoint_manager import build_model, find_last_step
        from mlxchat.quantize import cast_linear_weights
        name = os.path.basename(os.path.normpath(path))
        self._post(ModelLoading(label or name))
        step = step if step is not None else find_last_step(path)
        model, tokenizer, _ = build_model(path, step)
        if tokenizer is None:
            from mlxchat.tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
        cast_linear_weights(model)  # inference form, as chat_cli: same outputs, half the bytes per step on a GPU
        return model, tokenizer, label or f"{name} · step {step}", step

    def _build_from_snapshot(self, snapshot):
        from mlx.utils import tree_map_with_path
        from mlxchat.gpt import GPT, GPTConfig
        from mlxchat.quantize import cast_linear_weights
        from mlxchat.tokenizer import RustBPETokenizer, get_tokenizer
        name = os.path.basename(os.path.normpath(snapshot.run_dir)) if snapshot.run_dir else snapshot.stage
        label = f"live · {name} · step {snapshot.step}"
        self._post(ModelLoading(label))
        # built here, so the model's own arrays (rotary tables) belong to this thread; the snapshot's
        # weights are evaluated already, which makes them safe to read from any thread. They are used as
        # they are (no copy), placed by name into the model's own tree: tree_unflatten would turn
        # value_embeds' "0", "1" keys into a list
        model = GPT(GPTConfig(**snapshot.model_config))
        model.update(tree_map_with_path(lambda path, _: snapshot.weights[path], model.parameters()))
        model.eval()
        tokenizer = RustBPETokenizer.from_directory(snapshot.tokenizer_dir) if snapshot.tokenizer_dir else get_tokenizer()
        cast_linear_weights(model)
        return model, tokenizer, label, snapshot.step

    def _generate(self, job_id, message, sampling, max_tokens):
        def should_stop():
            return job_id < self._cancel_below or self._closing.is_set()

        if should_stop():  # cancelled while it waited
            self._post(ReplyDone(job_id, 0, 0.0, 0.0, "stopped", self._conversation.used if self._conversation else 0,
                                 self._model.config.sequence_len if self._model else 0))
            return
        if self._engine is None:
            self._post(ReplyFailed(job_id, "no model loaded: choose one in the model list first"))
            return
        context_len = self._model.config.sequence_len
        training = self.training_control  # the run training in this process, if any: held while the reply streams
        if training is not None:
            training.hold(True)
        try:
            prompt, budget, notice = self._conversation.prompt(message, max_tokens)
            self._post(ReplyStarted(job_id, len(prompt), context_len, notice))
            segments, last_post, end = [], 0.0, None  # segments: [part, text] not posted yet
            for piece in stream_chat(self._engine, self._tokenizer, prompt, max_tokens=budget, seed=self._seed,
                                     should_stop=should_stop, **sampling):
                if isinstance(piece, ReplyEnd):
                    end = piece
                    continue
                if piece.marker:
                    continue  # the pane shows the parts its own way
                if segments and segments[-1][0] == piece.part:
                    segments[-1][1] += piece.text
                else:
                    segments.append([piece.part, piece.text])
                now = time.monotonic()
                if now - last_post >= self.POST_INTERVAL:
                    self._flush(job_id, segments)
                    last_post = now
            self._flush(job_id, segments)
        except Exception as e:
            self._post(ReplyFailed(job_id, f"generation failed: {_error_text(e)}"))
            return
        finally:
            if training is not None:
                training.hold(False)
        self._seed += 1
        self._conversation.add_reply(end.tokens)
        self._post(ReplyDone(job_id, end.num_tokens, end.seconds, end.tok_per_sec, end.reason, self._conversation.used, context_len))

    def _flush(self, reply_id, segments):
        for part, text in segments:
            self._post(ReplyDelta(reply_id, text, part))
        segments.clear()
