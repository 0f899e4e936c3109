"""
Streaming chat: one reply of a chat model as text pieces, as it is generated. chat_cli prints the
pieces, chat_web sends them as server-sent events, the dashboard's chat pane shows them.

    stream_chat      Engine.generate turned into TextDelta pieces (UTF-8 safe, tagged with the part
                     of the reply they belong to) and a final ReplyEnd (tokens, speed, why it ended)
    Conversation     the turns of one chat in nanochat's format, fitted into the model's context
    fit_context      the fitting rule: drop the oldest turns, then cut the new message's start

nanochat's chat format: [BOS] then per turn <|user_start|> ... <|user_end|> <|assistant_start|> ...
<|assistant_end|>. Inside a reply the model may call its calculator, <|python_start|> expr
<|python_end|>, and the engine forces the result in, <|output_start|> result <|output_end|>.
"""
import time
from dataclasses import dataclass
from typing import Callable, Optional

TOOL_MARKERS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


@dataclass
class TextDelta:
    """A piece of reply text. part: "reply", "tool_call" (<|python_start|> ... <|python_end|>) or
    "tool_result" (what the engine forced in, <|output_start|> ... <|output_end|>). marker: this piece
    is one of those special tokens alone; concatenating every piece gives the reply exactly as its
    tokens decode, and a viewer that shows the parts its own way can drop the markers."""
    text: str
    part: str = "reply"
    marker: bool = False


@dataclass
class ReplyEnd:
    """The last item of a stream."""
    tokens: list  # the reply's tokens, tool call and result included, the closing stop token not
    num_tokens: int  # tokens generated, the closing stop token included (an API's completion tokens)
    seconds: float  # from the call to the end, the prompt's prefill included
    tok_per_sec: float
    reason: str  # "end" (the model closed its turn), "length" (max_tokens reached), "stopped" (should_stop)


def stream_chat(engine, tokenizer, tokens, *, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=42,
                should_stop: Optional[Callable[[], bool]] = None):
    """Generate a reply to `tokens` (a prompt ending with <|assistant_start|>) and yield it as TextDelta
    pieces while it is generated, then one ReplyEnd. The reply ends at <|assistant_end|> or <|bos|>
    (not shown), after max_tokens tokens, or when should_stop() (asked before every token, so from any
    thread, e.g. a key press) returns True.

    UTF-8 safety: a character split across tokens decodes to U+FFFD until its last byte arrives, so
    text is held back while it ends in U+FFFD. Held tokens start on a character boundary, so decoding
    just them is enough; a character has at most 4 bytes, so 8 held tokens mean invalid bytes, which
    go out as they are (also at the end, unless the reply was stopped)."""
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    python_start, python_end, output_start, output_end = (tokenizer.encode_special(m) for m in TOOL_MARKERS)
    markers = {python_start, python_end, output_start, output_end}
    t0 = time.perf_counter()
    reply, pending, pending_part = [], [], "reply"
    in_call, num_tokens, reason = False, 0, "length"
    generator = engine.generate(tokens, num_samples=1, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed)
    try:
        while True:
            # asked before each token rather than after it: a stop never waits for one more decode step
            if should_stop is not None and should_stop():
                reason = "stopped"
                break
            try:
                token_column, token_masks = next(generator)
            except StopIteration:
                break
            token, forced = token_column[0], token_masks[0] == 0
            num_tokens += 1
            if token in stops:
                reason = "end"
                break
            reply.append(token)
            # the engine's state machine, seen from outside: it forces only tool output in
            if forced:
                part = "tool_result"
            elif token == python_start or in_call:
                part = "tool_call"
                in_call = token != python_end
            else:
                part = "reply"
            is_marker = token in markers
            if pending and (is_marker or part != pending_part):
                yield TextDelta(tokenizer.decode(pending), pending_part)
                pending = []
            if is_marker:
                yield TextDelta(tokenizer.decode([token]), part, marker=True)
                continue
            pending.append(token)
            pending_part = part
            text = tokenizer.decode(pending)
            if not text.endswith("\ufffd") or len(pending) >= 8:
                yield TextDelta(text, part)
                pending = []
    finally:
        generator.close()  # frees the KV cache now, also when the consumer stops early
    if pending and reason != "stopped":
        yield TextDelta(tokenizer.decode(pending), pending_part)
    seconds = time.perf_counter() - t0
    yield ReplyEnd(reply, num_tokens, seconds, num_tokens / seconds if seconds > 0 else 0.0, reason)


# -----------------------------------------------------------------------------
# the conversation

def render_turn(tokenizer, message):
    """A user message as a turn's prompt: <|user_start|> message <|user_end|> <|assistant_start|>."""
    sp = tokenizer.encode_special
    return [sp("<|user_start|>")] + tokenizer.encode(message) + [sp("<|user_end|>"), sp("<|assistant_start|>")]


def fit_context(turns, new_turn, max_context, max_tokens):
    """Make [BOS] + turns + new_turn leave room for a reply within the model's context.
    turns: the earlier turns (token lists); new_turn: this turn's prompt tokens (ending with
    <|assistant_start|>). Drops the oldest turns first; if this turn alone is too long, keeps the end
    of it. The reply gets up to max_tokens, but at least half the context when history is dropped.
    Returns (kept turns, new_turn (maybe cut), number of turns dropped, reply token budget)."""
    room = min(max_tokens, max_context // 2)
    budget = max_context - room - 1  # minus BOS
    dropped = 0
    while turns and sum(len(t) for t in turns) + len(new_turn) > budget:
        turns = turns[1:]
        dropped += 1
    if len(new_turn) > budget:
        # keep the first token (<|user_start|>) and the end of the message
        new_turn = new_turn[:1] + new_turn[len(new_turn) - budget + 1:]
    used = 1 + sum(len(t) for t in turns) + len(new_turn)
    return turns, new_turn, dropped, min(max_tokens, max_context - used)


def context_notice(max_context, dropped, cut):
    """What fitting did, in words (None if nothing): `dropped` turns, and whether the message was cut."""
    if not dropped and not cut:
        return None
    what = [f"dropped the {dropped} oldest turn{'s' if dropped != 1 else ''}"] if dropped else []
    what += ["kept only the end of your message"] if cut else []
    return f"the conversation exceeds the model's {max_context} tokens; {' and '.join(what)}"


class Conversation:
    """One chat's turns in tokens (one list per user + assistant exchange), for a model whose context
    is max_context tokens. prompt() fits the next turn in (dropping the oldest turns as needed) and
    add_reply() closes it with the reply that was generated."""

    def __init__(self, tokenizer, max_context):
        self.tokenizer, self.max_context = tokenizer, max_context
        self.turns = []
        self._open_turn = None

    def prompt(self, message, max_tokens):
        """(prompt tokens, reply token budget, notice or None) for the user's next message."""
        new_turn = render_turn(self.tokenizer, message)
        self.turns, fitted, dropped, budget = fit_context(self.turns, new_turn, self.max_context, max_tokens)
        self._open_turn = fitted
        notice = context_notice(self.max_context, dropped, len(fitted) < len(new_turn))
        return [self.tokenizer.get_bos_token_id()] + [t for turn in self.turns for t in turn] + fitted, budget, notice

    def add_reply(self, reply_tokens):
        """Close the turn opened by the last prompt() with its reply (without <|assistant_end|>)."""
        assert self._open_turn is not None, "add_reply without a prompt"
        self.turns.append(self._open_turn + list(reply_tokens) + [self.tokenizer.encode_special("<|assistant_end|>")])
        self._open_turn = None

    def clear(self):
        self.turns, self._open_turn = [], None

    @property
    def used(self):
        """Tokens the conversation takes in the context (BOS included)."""
        return 1 + sum(len(t) for t in self.turns)
