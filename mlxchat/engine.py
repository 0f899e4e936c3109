"""
Inference engine: KV cache, sampling, batched generation and the calculator tool (nanochat's
engine.py, in MLX).

One generation: the prompt is prefilled once at batch 1, the cache is replicated to num_samples
rows, then all rows decode together, each with its own tool state. On GPU backends each decode step
(model forward + sampling) is one mx.compile'd function whose cache position is an mx.array, so a
single traced graph serves every step (one per 256-token span of the cache, see Engine._span).
Steps are pipelined: the next step is queued with mx.async_eval before the host reads this step's
tokens, so the device computes while Python runs the per-row state machine.
"""
import threading
from collections import deque

import mlx.core as mx

from mlxchat.common import get_compute_dtype
from mlxchat.execution import use_calculator


class KVCache:
    """Preallocated per-layer key/value cache in MLX's attention layout (B, Hkv, T, D), written in
    place at the current position (never rebuilt per token); grows in chunks if a generation runs
    past its size. Also carries the previous token's embedding for the model's smear."""

    GROW = 256

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, dtype=None):
        self.batch_size, self.num_heads, self.head_dim, self.num_layers = batch_size, num_heads, head_dim, num_layers
        self.dtype = dtype if dtype is not None else get_compute_dtype()
        self.capacity = seq_len
        shape = (batch_size, num_heads, seq_len, head_dim)
        self.k = [mx.zeros(shape, dtype=self.dtype) for _ in range(num_layers)]
        self.v = [mx.zeros(shape, dtype=self.dtype) for _ in range(num_layers)]
        self.pos = 0
        self.prev_embedding = None
        # per layer, the concatenated q/k/v projection weights for this generation (set by the
        # Engine; None: the attention concatenates them itself)
        self.qkv_weights = None

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer)

    def reset(self):
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self):
        return self.pos

    def ensure_capacity(self, needed):
        """Grow (by whole chunks) so that `needed` positions fit."""
        if needed <= self.capacity:
            return
        new_cap = ((needed + self.GROW - 1) // self.GROW) * self.GROW
        pad = new_cap - self.capacity
        z = mx.zeros((self.batch_size, self.num_heads, pad, self.head_dim), dtype=self.dtype)
        self.k = [mx.concatenate([k, z], axis=2) for k in self.k]
        self.v = [mx.concatenate([v, z], axis=2) for v in self.v]
        self.capacity = new_cap

    def insert_kv(self, layer_idx, k, v):
        """Write k, v (B, Hkv, T, D) at the current position; return the keys/values seen so far."""
        T = k.shape[2]
        end = self.pos + T
        self.ensure_capacity(end)
        # slice assignment rebinds self.k[i] to the updated array, so MLX can reuse the old buffer
        self.k[layer_idx][:, :, self.pos:end] = k.astype(self.dtype)
        self.v[layer_idx][:, :, self.pos:end] = v.astype(self.dtype)
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, num_tokens):
        self.pos += num_tokens

    def prefill(self, other):
        """Copy another cache's contents (batch 1, e.g. after a prompt prefill), replicated to this
        cache's batch size."""
        assert self.pos == 0, "prefill into a used cache"
        assert other.num_layers == self.num_layers and other.head_dim == self.head_dim
        assert other.num_heads == self.num_heads and other.batch_size in (1, self.batch_size)
        n = other.pos
        self.ensure_capacity(n)
        shape = (self.batch_size, self.num_heads, n, self.head_dim)
        for i in range(self.num_layers):
            self.k[i][:, :, :n] = mx.broadcast_to(other.k[i][:, :, :n], shape)
            self.v[i][:, :, :n] = mx.broadcast_to(other.v[i][:, :, :n], shape)
        self.pos = n
        if other.prev_embedding is not None:
            pe = other.prev_embedding
            self.prev_embedding = mx.broadcast_to(pe, (self.batch_size,) + tuple(pe.shape[1:]))


class _TracedKV:
    """What the compiled decode step hands the model: KVCache's interface, but the position is an
    mx.array (data, not a Python int), so the traced graph is position-independent. Writes are
    functional scatters (MLX reuses the donated input buffer, no copy); attention sees the
    first `span` positions and the model masks the ones past the current position by value."""

    def __init__(self, pos, k, v, prev_embedding, span, qkv_weights):
        self.pos, self.k, self.v, self.prev_embedding, self.span = pos, list(k), list(v), prev_embedding, span
        self.qkv_weights = qkv_weights or None

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        # put_along_axis (one scatter kernel over the written row), not slice_update at a traced
        # offset: MLX's CUDA kernel for the latter runs a thread per element of the whole cache,
        # not of the update (measured on the H100 at d12: 40 us per write, 24 writes per token,
        # against 3 us), and needs one more kernel per write to compute the offset
        idx = self.pos.reshape(1, 1, 1, 1)
        self.k[layer_idx] = mx.put_along_axis(self.k[layer_idx], idx, k.astype(self.k[layer_idx].dtype), axis=2)
        self.v[layer_idx] = mx.put_along_axis(self.v[layer_idx], idx, v.astype(self.v[layer_idx].dtype), axis=2)
        return self.k[layer_idx][:, :, :self.span], self.v[layer_idx][:, :, :self.span]

    def advance(self, num_tokens):
        self.pos = self.pos + num_tokens


# -----------------------------------------------------------------------------
# sampling

def _sample(logits, key, greedy, temperature, top_k, top_p):
    """The sampler proper; temperature and top_p may be mx.arrays (so the compiled step need not be
    retraced for each value), greedy and top_k are structural (a branch, a shape)."""
    if greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    V = logits.shape[-1]
    idx = None  # when not None: the vocabulary ids of the columns of `logits`
    if top_k is not None and 0 < top_k < V:
        # exactly k candidates (ties at the k-th value included or not, as torch.topk does)
        idx = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k]
        logits = mx.take_along_axis(logits, idx, axis=-1)
    # temperature scales the LOGITS: categorical wants unnormalised log-probabilities, and feeding it
    # probabilities instead would sample nearly uniformly
    logits = logits / temperature
    if top_p is not None:
        order = mx.argsort(-logits, axis=-1)
        logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(logits, axis=-1)
        # nucleus: keep the smallest prefix (by rank) whose probability reaches top_p, i.e. drop a
        # token once the tokens ranked above it already reach it; the top token always stays
        mass_before = mx.cumsum(probs, axis=-1) - probs
        logits = mx.where(mass_before >= top_p, -mx.inf, logits)
        idx = order if idx is None else mx.take_along_axis(idx, order, axis=-1)
    choice = mx.random.categorical(logits, axis=-1, key=key)
    if idx is None:
        return choice.astype(mx.int32)
    return mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(mx.int32)


def _check_sampling_args(temperature, top_k, top_p):
    assert temperature >= 0.0, f"temperature must be >= 0, got {temperature}"
    assert top_k is None or top_k >= 0, f"top_k must be >= 0 (0 or None = off), got {top_k}"
    assert top_p is None or 0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}"


def sample_next_token(logits, key, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B,) int32 next tokens, one independent draw per row. temperature 0 is
    greedy (argmax); top_k keeps the k largest logits (None or 0: off); top_p keeps the nucleus,
    the smallest set of most likely tokens whose probability reaches top_p (None or 1: off).
    key: an mx.random key, so the draw depends on nothing global."""
    _check_sampling_args(temperature, top_k, top_p)
    top_p = None if top_p is None or top_p >= 1.0 else top_p
    return _sample(logits.astype(mx.float32), key, temperature == 0.0, temperature, top_k or None, top_p)


# -----------------------------------------------------------------------------
# the engine

class RowState:
    """Per-row generation state: the tokens so far, tokens queued to be forced in (tool output),
    and whether we are inside a <|python_start|> ... <|python_end|> block."""

    def __init__(self, current_tokens=None):
        self.current_tokens = current_tokens or []
        self.forced_tokens = deque()
        self.in_python_block = False
        self.python_expr_tokens = []
        self.completed = False


class Engine:
    """Generation with a KV cache for `model` (an mlxchat GPT) and its tokenizer.

    An Engine may be used from any one thread (a server runs one Engine per worker thread). Its
    state is only the cache of compiled step functions; each generate() call has its own KV cache
    and random key. The model's weights are inputs of the compiled steps, not constants baked into
    them, so updating the model (RL training) is seen by the next step.
    compile: True = the compiled decode step, False = the plain (eager) model forward (same
    results). None picks True on GPU backends (a d12 decodes 1.8x faster on an H100) and False on
    the CPU, where MLX turns each fused kernel into C++ and builds it with the system compiler: about
    a minute the first time on a small machine (cached on disk afterwards) for a ~25% faster step."""

    SPAN = 256  # the compiled decode step attends over the cache in spans of this many positions

    def __init__(self, model, tokenizer, compile=None):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile if compile is not None else mx.default_device() == mx.gpu
        self._steps = {}
        self._steps_lock = threading.Lock()

    # ------------------------------------------------------------------ one decode step

    def _span(self, pos, capacity):
        # Attending over the whole preallocated cache would make every step cost the full context;
        # attending over exactly pos+1 keys would retrace every step. Spans of 256 cost at most 255
        # masked keys and one trace per span.
        return min(capacity, (pos // self.SPAN + 1) * self.SPAN)

    def _fused_qkv_weights(self):
        """Per layer, the q, k and v projection weights concatenated (in the compute dtype), for one
        generation: built once per generate() call, not once per token, and so never stale when
        the weights change between calls (RL samples from the model it trains). None when a layer's
        projections are not plain Linear layers (quantized models): the attention handles those."""
        blocks = self.model.transformer["h"] if hasattr(self.model, "transformer") else []  # (or a test's stand-in)
        fused = [block.attn.qkv_weight(get_compute_dtype()) for block in blocks]
        return fused if fused and all(w is not None for w in fused) else None

    def _compiled_step(self, span, greedy, top_k, use_top_p, fused):
        sig = (span, greedy, top_k, use_top_p, fused)
        with self._steps_lock:
            if sig not in self._steps:
                model = self.model

                def step(column, pos, key, temperature, top_p, k, v, prev_embedding, qkv_weights):
                    cache = _TracedKV(pos, k, v, prev_embedding, span, qkv_weights)
                    logits = model(column[:, None], kv_cache=cache)[:, -1]
                    key, sub = mx.random.split(key)
                    sampled = _sample(logits, sub, greedy, temperature, top_k, top_p if use_top_p else None)
                    return sampled, key, cache.k, cache.v, cache.prev_embedding
                self._steps[sig] = mx.compile(step, inputs=model.state)
            return self._steps[sig]

    def _decode_step(self, cache, column, key, temperature, top_k, top_p):
        """Feed one token per row (column, (B,) int32) at the cache's position, return
        (the next sampled tokens (B,), the next key). Lazy: nothing is evaluated here."""
        pos = cache.get_pos()
        assert pos + 1 <= self.model._rotary_len, f"generation ran past the rotary table ({self.model._rotary_len} positions)"
        cache.ensure_capacity(pos + 1)
        greedy = temperature == 0.0
        if not self.compile or cache.prev_embedding is None:
            # (a cache with no previous embedding only arises from an empty prompt; eager handles it)
            logits = self.model(column[:, None], kv_cache=cache)[:, -1]
            key, sub = mx.random.split(key)
            return _sample(logits, sub, greedy, temperature, top_k, top_p), key
        qkv = cache.qkv_weights or []
        step = self._compiled_step(self._span(pos, cache.capacity), greedy, top_k, top_p is not None, bool(qkv))
        sampled, key, cache.k, cache.v, cache.prev_embedding = step(
            column, mx.array(pos, dtype=mx.int32), key, mx.array(temperature, dtype=mx.float32),
            mx.array(top_p if top_p is not None else 1.0, dtype=mx.float32), cache.k, cache.v, cache.prev_embedding, qkv)
        cache.advance(1)
        return sampled, key

    # ------------------------------------------------------------------ generation

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield (token_column, token_masks) per step, lists of num_samples ints: the next token of
        each row, and 1 where it was sampled, 0 where it was forced (tool output). Stops after max_tokens steps or when every row has emitted
        <|assistant_end|> or <|bos|> (a finished row keeps being decoded until then, as nanochat)."""
        assert isinstance(tokens, list) and len(tokens) > 0 and isinstance(tokens[0], int), "tokens: a non-empty list of ints"
        assert num_samples >= 1
        _check_sampling_args(temperature, top_k, top_p)
        top_k = top_k or None
        top_p = None if top_p is None or top_p >= 1.0 else top_p
        tok = self.tokenizer
        python_start, python_end = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
        output_start, output_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
        assistant_end = tok.encode_special("<|assistant_end|>")
        bos = tok.get_bos_token_id()
        key = mx.random.key(seed)

        # 1) prefill the prompt once, at batch 1
        prefill_cache = KVCache.for_model(self.model, 1, len(tokens))
        logits = self.model(mx.array([tokens], dtype=mx.int32), kv_cache=prefill_cache)[:, -1]
        # 2) replicate it into the decode cache, sized for the whole generation
        seq_len = len(tokens) + max_tokens if max_tokens is not None else self.model.config.sequence_len
        cache = KVCache.for_model(self.model, num_samples, seq_len)
        cache.prefill(prefill_cache)
        del prefill_cache
        cache.qkv_weights = self._fused_qkv_weights()
        # the first token: an independent draw per row from the (shared) prompt logits
        key, sub = mx.random.split(key)
        logits = mx.broadcast_to(logits, (num_samples, logits.shape[-1]))
        sampled = _sample(logits, sub, temperature == 0.0, temperature, top_k, top_p)

        rows = [RowState(list(tokens)) for _ in range(num_samples)]
        num_generated = 0
        while True:
            if max_tokens is not None and num_generated >= max_tokens:
                break
            if all(row.completed for row in rows):
                break
            # this step's column: the sampled token, or a forced one where a row has tool output queued
            forced = [row.forced_tokens.popleft() if row.forced_tokens else None for row in rows]
            column = sampled
            if any(f is not None for f in forced):
                is_forced = mx.array([f is not None for f in forced])
                column = mx.where(is_forced, mx.array([f or 0 for f in forced], dtype=mx.int32), sampled)
            mx.async_eval(column)
            num_generated += 1
            if max_tokens is None or num_generated < max_tokens:
                # queue the next step before reading this one: the device works while the host waits
                sampled, key = self._decode_step(cache, column, key, temperature, top_k, top_p)
                mx.async_eval(sampled, key)
            token_column = column.tolist()
            token_masks = [0 if f is not None else 1 for f in forced]
            for row, token in zip(rows, token_column):
                row.current_tokens.append(token)
                if token == assistant_end or token == bos:
                    row.completed = True
                # the calculator tool
                if token == python_start:
                    row.in_python_block = True
                    row.python_expr_tokens = []
                elif token == python_end and row.in_python_block:
                    row.in_python_block = False
                    if row.python_expr_tokens:
                        result = use_calculator(tok.decode(row.python_expr_tokens))
                        if result is not None:
                            row.forced_tokens.append(output_start)
                            row.forced_tokens.extend(tok.encode(str(result)))
                            row.forced_tokens.append(output_end)
                    row.python_expr_tokens = []
                elif row.in_python_block:
                    row.python_expr_tokens.append(token)
            yield token_column, token_masks

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: returns (results, masks), per row the prompt + generated tokens up to the
        first <|assistant_end|> or <|bos|> (not included); masks 0 for prompt and forced tokens."""
        assistant_end = self.tokenizer.encode_special("<|assistant_end|>")
        bos = self.tokenizer.get_bos_token_id()
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if not completed[i]:
                    if token == assistant_end or token == bos:
                        completed[i] = True
                    else:
                        results[i].append(token)
                        masks[i].append(mask)
            if all(completed):
                break
        return results, masks
