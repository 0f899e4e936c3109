"""
GPT model, identical in architecture and numerics to nanochat's (reference commit 92d63d4).

Notable features (all as nanochat):
- rotary embeddings (base 100000, half-split layout, nanochat's rotation sign), no positional embeddings
- QK norm (after rotary), then q and k scaled by 1.2 (folded into the attention's scale)
- untied wte / lm_head, no biases, RMSNorm without weights (fp32 epsilon)
- ReLU^2 MLP, group-query attention, sliding-window attention from a pattern string ("SSSL")
- value embeddings (ResFormer-style) on alternating layers, with input-dependent gates
- smear: each token mixes in the previous token's embedding through a learned gate
- per-layer residual scalars (resid_lambdas) and x0 skip scalars (x0_lambdas)
- backout: the output of the middle block is subtracted (scaled) before the final norm
- logit softcap 15*tanh(x/15) in float32; vocab padded to a multiple of 64

Storage dtypes: matrices and scalars are float32 masters, cast to the activation dtype inside each
matmul; wte and value embeddings are stored in the compute dtype (bf16 on GPU backends).
"""
import math
import os
from dataclasses import dataclass, asdict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from mlxchat import kernels
from mlxchat.common import get_compute_dtype
from mlxchat.hardware import gpu_kind

# torch.finfo(torch.float32).eps: F.rms_norm(eps=None) uses it, also for bf16 inputs
RMS_EPS = 1.1920929e-07
SOFTCAP = 15.0
ROPE_BASE = 100000.0
QK_GAIN = 1.2  # nanochat multiplies the normed q and k by 1.2 each ("sharper attention")
VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # number of query heads
    n_kv_head: int = 6  # number of key/value heads (GQA)
    n_embd: int = 768
    # "L" = full context, "S" = a quarter of it; tiled across layers, the last layer is always L
    window_pattern: str = "SSSL"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_depth(cls, depth, vocab_size=32768, aspect_ratio=64, head_dim=128, max_seq_len=2048, window_pattern="SSSL"):
        """nanochat's one dial: width = depth x aspect_ratio, nudged up to a multiple of head_dim, in
        heads of head_dim (no GQA), at the given context length and window pattern."""
        base_dim = depth * aspect_ratio
        model_dim = -(-base_dim // head_dim) * head_dim
        num_heads = model_dim // head_dim
        return cls(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                   n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern)

    def padded_vocab_size(self, pad_to=64):
        return -(-self.vocab_size // pad_to) * pad_to

    def param_counts(self):
        """GPT(self).num_scaling_params(), from the shapes alone: no array is made, so it is safe on any
        thread and for configs far too large to build (the memory check before a run)."""
        C, L, V = self.n_embd, self.n_layer, self.padded_vocab_size()
        kv = self.n_kv_head * (C // self.n_head)
        ve_layers = sum(has_ve(i, L) for i in range(L))
        block = C * C + 2 * C * kv + C * C + 8 * C * C  # q, k, v, proj, MLP fc + proj
        matrices = L * block + ve_layers * VE_GATE_CHANNELS * self.n_kv_head
        counts = {"wte": V * C, "value_embeds": ve_layers * V * kv, "lm_head": V * C,
                  "transformer_matrices": matrices, "scalars": 2 * L + SMEAR_CHANNELS + 2}
        counts["total"] = sum(counts.values())
        return counts

    def num_matmul_params(self):
        """Every Linear weight: the block matrices (ve gates included), lm_head and the smear gate."""
        c = self.param_counts()
        return c["transformer_matrices"] + c["lm_head"] + SMEAR_CHANNELS

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward), PaLM-style: 6 x matmul params + attention."""
        H, D = self.n_head, self.n_embd // self.n_head
        attn = sum(H * D * min(w, self.sequence_len) for w in compute_window_sizes(self))
        return 6 * self.num_matmul_params() + 12 * attn


def norm(x):
    # RMSNorm with no learnable weight; MLX accumulates in fp32 and returns x.dtype, like F.rms_norm
    return mx.fast.rms_norm(x, None, RMS_EPS)


RECOMPUTE_PIECES = ("norm", "qk", "mlp", "order")


def recompute_backward(piece):
    """Whether training uses the custom VJP `piece` below, which keeps fewer activations for the
    backward pass, or MLX's autodiff there:
    - "norm": train_norm keeps each norm's output instead of its input;
    - "qk": rotary_qk_norm recomputes the rotation and QK norm (on CUDA the fused kernel of
      kernels.rotary_norm, whose backward recomputes them anyway, is used instead);
    - "mlp": relu_squared_matmul recomputes relu(h)^2 instead of keeping it;
    - "order": each weight's (and lambda's) gradient is computed before the input gradient is
      handed on (ordered_matmul, mix_residual).
    MLXCHAT_RECOMPUTE=on|off|<pieces, comma-separated> forces a choice. The rule, from measurements:
    - CPU (the Metal proxy for memory) and Metal: all of them. d12, micro-batch 4 x 2048, fp32 on the
      CPU (`python -m scripts.bench_memory --batch 4 --recompute off|on`): peak 9.93 -> 6.92 GiB.
    - CUDA: "mlp" alone. H200, d12, micro-batch 16 x 2048 (`bench_train`, 2026-12-02): none 282,978
      tok/s, peak 28.6 GiB; "mlp" 308,858 tok/s, 26.9 GiB (faster: one elementwise pass recomputed,
      one (B, T, 4C) array fewer written and kept); "norm,mlp,order" 290,066, 26.0 GiB; all 282,366,
      26.0 GiB (the fused rotary + QK-norm kernel stands in for "qk" there)."""
    choice = os.environ.get("MLXCHAT_RECOMPUTE", "auto").strip().lower() or "auto"
    if choice == "auto":
        return gpu_kind() != "cuda" or piece == "mlp"
    if choice in ("on", "off"):
        return choice == "on"
    pieces = {p.strip() for p in choice.split(",")}
    assert pieces <= set(RECOMPUTE_PIECES), \
        f"MLXCHAT_RECOMPUTE={choice!r}: expected auto, on, off or some of {', '.join(RECOMPUTE_PIECES)}"
    return piece in pieces


def _rms_norm_backward(y, rstd, g):
    # y = x * rstd, rstd = (mean(x^2) + eps)^-1/2  =>  dx = rstd * (g - y * mean(g * y)), in fp32
    # (grouped like MLX's own rms_norm VJP, which computes g*n - (x*mean(g*x))*n^3 from the input)
    g, y = g.astype(mx.float32), y.astype(mx.float32)
    return g * rstd - (y * mx.mean(g * y, axis=-1, keepdims=True)) * rstd


@mx.custom_function
def _norm_with_rstd(x):
    rstd = mx.rsqrt(mx.mean(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True) + RMS_EPS)
    return norm(x), rstd


@_norm_with_rstd.vjp
def _norm_with_rstd_vjp(x, cotangents, outputs):
    y, rstd = outputs
    return _rms_norm_backward(y, rstd, cotangents[0]).astype(x.dtype)


def train_norm(x):
    """norm(x) whose backward keeps its OUTPUT (and one fp32 scalar per row) instead of its input:
    the output is kept anyway by the matmul that consumes it, so the input (a residual-stream
    array nothing else keeps) can be freed: one (B, T, C) array less per norm in training.
    (The backward then uses the output, as a memory-efficient LayerNorm does.)"""
    if not recompute_backward("norm"):
        return norm(x)
    return _norm_with_rstd(x)[0]


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D). Half-split layout with nanochat's sign convention (rotation by -theta):
    # mx.fast.rope(traditional=False) rotates the other way, which breaks nanochat weights.
    # split, not two slices: the backward of a split is one concatenate, that of each slice a
    # zero-filled full-size array plus an add
    x1, x2 = mx.split(x, 2, axis=-1)
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return mx.concatenate([y1, y2], axis=-1)


def attention_mask(t_q, t_k, offset, window, dtype):
    """What to hand mx.fast.scaled_dot_product_attention for t_q queries starting at absolute
    position `offset` against the first t_k keys of the cache: None, "causal" or an array."""
    if isinstance(offset, mx.array):
        # a traced position (the engine's compiled decode step attends over a fixed-size span of
        # its cache): mask by value, which also hides the not yet written tail of the span
        qpos = offset + mx.arange(t_q)[:, None]
        kpos = mx.arange(t_k)[None, :]
        return (kpos <= qpos) & (kpos >= qpos - window)
    if window >= offset + t_q - 1:
        # the window covers everything: plain causal (MLX's "causal" is aligned lower-right)
        if t_q == 1:
            return None
        return "causal"
    return kernels.additive_window_mask(t_q, t_k, offset, window, dtype)


@mx.custom_function
def rotary_qk_norm(qk, cos, sin):
    """QK norm (per head) of the rotated q and k (nanochat's 1.2 gain is in the attention's scale).
    The backward recomputes the rotation from qk (kept anyway: it is a view of the QKV projection's
    output) instead of keeping the rotated and the normed arrays: two (B, T, H+Hkv, D) arrays less
    per layer, for one more rotation (a cheap elementwise pass) in the backward."""
    return _rotary_qk_norm_plain(qk, cos, sin)


def _rotary_qk_norm_plain(qk, cos, sin):
    return norm(apply_rotary_emb(qk, cos, sin))


@rotary_qk_norm.vjp
def _rotary_qk_norm_vjp(primals, cotangent, output):
    qk, cos, sin = primals
    # recompute once the cotangent exists: MLX schedules a graph breadth first, so a recomputation
    # that depends only on forward arrays could otherwise run early, every layer's at once
    qk = mx.depends(qk, cotangent)
    # then exactly autodiff's backward of the forward (MLX's fused rms_norm VJP, in qk's dtype)
    _, (dqk,) = mx.vjp(lambda a: _rotary_qk_norm_plain(a, cos, sin), [qk], [cotangent])
    return dqk, mx.zeros_like(cos), mx.zeros_like(sin)


# compiled on their own so that each is one fused kernel: a custom function's forward is not fused
# with anything by the compile of the graph around it (measured: a square and a maximum kernel)
_relu_squared_fused = mx.compile(lambda x: mx.square(mx.maximum(x, 0)))
_relu_squared_grad = mx.compile(lambda x, g: g * (2 * mx.maximum(x, 0)))  # d/dx relu(x)^2 = 2 relu(x)


@mx.custom_function
def relu_squared(x):
    """relu(x)^2 whose backward needs x alone: autodiff would also keep relu(x), a (B, T, 4C) array
    per layer, and compute the square and the relu as two kernels forward."""
    return _relu_squared_fused(x)


@relu_squared.vjp
def _relu_squared_vjp(x, cotangent, output):
    # (a custom function of one array gets that array and its cotangent unwrapped)
    return _relu_squared_grad(x, cotangent)


def _weight_grad(cotangent, x):
    # the gradient of w in x @ w.T: cotangent^T x over every leading (batch, time) position
    return cotangent.reshape(-1, cotangent.shape[-1]).T @ x.reshape(-1, x.shape[-1])


@mx.custom_function
def relu_squared_matmul(h, w):
    """relu(h)^2 @ w.T, the MLP's second half, for w already in h's dtype. Its backward recomputes
    relu(h)^2 from h (a cheap elementwise pass) instead of keeping it: autodiff would keep both h
    and relu(h)^2 (for w's gradient), two (B, T, 4C) arrays per layer; this keeps h alone."""
    return relu_squared(h) @ w.T


@relu_squared_matmul.vjp
def _relu_squared_matmul_vjp(primals, cotangent, output):
    h, w = primals
    h = mx.depends(h, cotangent)  # recompute once the cotangent exists (see rotary_qk_norm)
    dw = _weight_grad(cotangent, relu_squared(h))
    dh = _relu_squared_grad(h, cotangent @ w)
    return mx.depends(dh, dw), dw  # w's gradient first (see ordered_matmul)


@mx.custom_function
def ordered_matmul(x, w):
    """x @ w.T (w already in x's dtype) whose backward computes w's gradient BEFORE handing x's
    gradient on. The math is autodiff's; the order is not. MLX evaluates the backward from the
    gradients it was asked for; the input gradient continues the chain down the network while each
    weight gradient is a side branch, and nothing makes that branch run early: so every layer's
    weight-gradient inputs (the cotangent and the saved input, (B, T, C) arrays) stayed alive until
    the end of the backward (and a checkpointed block's recomputed activations with them). Measured
    on the CPU, MLP-only blocks, C = 256: 11.4 -> 5.5 (B, T, C) arrays per layer at the peak."""
    return x @ w.T


@ordered_matmul.vjp
def _ordered_matmul_vjp(primals, cotangent, output):
    x, w = primals
    dw = _weight_grad(cotangent, x)
    return mx.depends(cotangent @ w, dw), dw


@mx.custom_function
def mix_residual(x, x0, a, b):
    """a * x + b * x0, the per-layer residual/x0 mix, with its scalars' gradients (sums over every
    token) computed before x's gradient is handed on (see ordered_matmul): otherwise each layer's
    cotangent waits, alive, for the end of the backward."""
    return a * x + b * x0


@mix_residual.vjp
def _mix_residual_vjp(primals, cotangent, output):
    x, x0, a, b = primals
    da = mx.sum(cotangent * x).reshape(a.shape)
    db = mx.sum(cotangent * x0).reshape(b.shape)
    return mx.depends(a * cotangent, [da, db]), b * cotangent, da, db


# > 0 while checkpointed_block builds a block's backward: its recomputation then always orders the
# weight gradients, without which checkpointing frees nothing
_ordering_forced = [0]


def project(x, w):
    """x @ w.T: ordered_matmul in training graphs when recompute_backward("order") is on or inside a
    checkpointed block's recomputation; a decode step (one token per row) keeps the plain matmul,
    the fewest graph nodes."""
    if x.ndim >= 2 and x.shape[-2] > 1 and (_ordering_forced[0] or recompute_backward("order")):
        return ordered_matmul(x, w)
    return x @ w.T


class Linear(nn.Linear):
    """nn.Linear without bias whose fp32 master weight is cast to the activation dtype for the
    matmul (MLX would otherwise promote bf16 activations to fp32)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def __call__(self, x):
        return project(x, self.weight.astype(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_embd, self.n_embd)
        if has_ve(layer_idx, config.n_layer):
            self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head)

    def qkv_weight(self, dtype):
        """The q, k and v projection weights as one (H + 2 Hkv) * D x C matrix in `dtype`, or None
        when they are not plain Linear layers (quantized projections, inference)."""
        if not all(type(m) is Linear for m in (self.c_q, self.c_k, self.c_v)):
            return None
        return mx.concatenate([self.c_q.weight, self.c_k.weight, self.c_v.weight]).astype(dtype)

    def __call__(self, x, ve, cos, sin, window, kv_cache=None, masks=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # one matmul for q, k and v, and one rotary + one norm for q and k together: the same math
        # as three projections, in a third of the kernels (a decode step is launch-bound) and one
        # backward matmul for dx instead of three plus two adds. The Engine hands its KV cache the
        # concatenated weights once per generation: concatenating them at every decode step would
        # read and write them again per token (+50% weight traffic per layer in a bandwidth-bound
        # decode) and cost 3 copy kernels per layer.
        fused = getattr(kv_cache, "qkv_weights", None)
        w = fused[self.layer_idx] if fused else self.qkv_weight(x.dtype)
        if w is not None:
            qk, v = mx.split(project(x, w).reshape(B, T, H + 2 * Hkv, D), [H + Hkv], axis=2)  # (split: see apply_rotary_emb)
        else:  # quantized projections (inference)
            qk = mx.concatenate([self.c_q(x).reshape(B, T, H, D), self.c_k(x).reshape(B, T, Hkv, D)], axis=2)
            v = self.c_v(x).reshape(B, T, Hkv, D)
        if ve is not None:
            # value residual: mix the token's value embedding into v, gated per kv head, gate in (0, 3)
            ve = ve.reshape(B, T, Hkv, D)
            gate = 3 * mx.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate[..., None] * ve
        if cos is None:
            # a decode step (one token per row at the cache's position): MLX's fused rope kernel.
            # scale=-1 rotates by -theta, nanochat's sign (see apply_rotary_emb); with T = 1,
            # (B, 1, heads, D) and (B, heads, 1, D) are the same memory, so the reshapes are free
            qk = mx.fast.rope(qk.reshape(B, H + Hkv, 1, D), D, traditional=False, base=ROPE_BASE, scale=-1.0,
                              offset=kv_cache.get_pos())
            qk = norm(qk).reshape(B, 1, H + Hkv, D)
        elif kv_cache is not None:
            qk = _rotary_qk_norm_plain(qk, cos, sin)
        elif recompute_backward("qk") and kernels.rotary_norm_impl(qk) == "plain":
            qk = rotary_qk_norm(qk, cos, sin)
        else:
            # one fused kernel forward and one backward on CUDA, the plain ops elsewhere (kernels.py)
            qk = kernels.rotary_norm(qk, cos, sin, _rotary_qk_norm_plain)
        # MLX's attention wants (B, heads, T, D)
        qk, v = qk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q, k = mx.split(qk, [H], axis=1)
        offset = 0
        if kv_cache is not None:
            offset = kv_cache.get_pos()
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        # nanochat's 1.2 gain on the normed q and on k is the factor QK_GAIN^2 of the scores, applied
        # by the attention kernel with its 1/sqrt(D): (1.2 q).(1.2 k) = 1.44 q.k, without an
        # elementwise pass over q and k forward and backward
        scale = QK_GAIN ** 2 / math.sqrt(D)
        impl = kernels.attention_impl(B, H, T, D, q.dtype, window) if kv_cache is None else "sdpa"
        if impl == "blockwise":
            # training (and cache-free) forward: a backward that keeps nothing (B, H, T, T) (kernels.py)
            y = kernels.attention(q, k, v, window, scale=scale)
        elif impl == "banded":
            y = kernels.banded_attention(q, k, v, window, scale=scale)
        else:
            # one mask per window size per forward (masks: shared by the layers of this forward)
            masks = {} if masks is None else masks
            key = (window, k.shape[2])
            if key not in masks:
                masks[key] = attention_mask(T, k.shape[2], offset, window, q.dtype)
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=masks[key])
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        h = self.c_fc(x)
        if type(self.c_proj) is Linear and recompute_backward("mlp"):
            return relu_squared_matmul(h, self.c_proj.weight.astype(h.dtype))
        return self.c_proj(relu_squared(h))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, ve, cos, sin, window, kv_cache=None, masks=None):
        # training keeps each norm's output instead of its input; decoding wants the fewest kernels
        nrm = norm if kv_cache is not None else train_norm
        x = x + self.attn(nrm(x), ve, cos, sin, window, kv_cache, masks)
        x = x + self.mlp(nrm(x))
        return x


def checkpointed_block(block, x, ve, cos, sin, window):
    """block(x, ...) whose backward recomputes the block's forward instead of keeping its activations
    (--grad-checkpoint 1): only the block's inputs stay alive between the forward and the backward.
    Not nn.utils.checkpoint, whose recomputation's weight gradients are side branches of the backward
    that MLX leaves for last (see ordered_matmul): every block's recomputed activations then stay
    alive until the end and checkpointing saves nothing (measured on the CPU, d12 B4 T2048: 7.51 GiB
    with and without it). Here the recomputation orders its weight gradients first, on every backend
    whatever recompute_backward("order") says, and waits for the block's cotangent before it starts."""
    names, params = zip(*tree_flatten(block.trainable_parameters()))
    extra = [] if ve is None else [ve]

    def run(flat_params, x, extra):
        block.update(tree_unflatten(list(zip(names, flat_params))))
        return block(x, extra[0] if extra else None, cos, sin, window, None)

    @mx.custom_function
    def forward(flat_params, x, extra):
        return run(flat_params, x, extra)

    @forward.vjp
    def backward(primals, cotangent, output):
        flat_params, x, extra = primals
        x = mx.depends(x, cotangent)
        current = tree_flatten(block.trainable_parameters())
        n, flat = len(flat_params), list(flat_params) + [x] + list(extra)
        _ordering_forced[0] += 1
        try:
            _, vjps = mx.vjp(lambda *a: [run(a[:n], a[n], a[n + 1:])], flat, [cotangent])
        finally:
            _ordering_forced[0] -= 1
            block.update(tree_unflatten(current))
        return list(vjps[:n]), vjps[n], list(vjps[n + 1:])

    out = forward(list(params), x, extra)
    block.update(tree_unflatten(list(zip(names, params))))  # the real parameters back in the module
    return out


def compute_window_sizes(config):
    """Per-layer left window (keys i-w..i are visible). 'L' = sequence_len, 'S' = a quarter of it
    rounded up to a multiple of 128 (512 for 2048); the last layer is always L."""
    pattern = config.window_pattern.upper()
    assert pattern and all(c in "SL" for c in pattern), f"window_pattern must contain only S and L, got {config.window_pattern!r}"
    long_w = config.sequence_len
    short_w = -(-long_w // 4 // 128) * 128
    sizes = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(config.n_layer)]
    sizes[-1] = long_w
    return sizes


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        super().__init__()
        self.config = config
        C, L = config.n_embd, config.n_layer
        self.padded_vocab_size = ((config.vocab_size + pad_vocab_size_to - 1) // pad_vocab_size_to) * pad_vocab_size_to
        self.window_sizes = compute_window_sizes(config)
        self.transformer = {
            "wte": nn.Embedding(self.padded_vocab_size, C),
            "h": [Block(config, i) for i in range(L)],
        }
        self.lm_head = Linear(C, self.padded_vocab_size)
        self.resid_lambdas = mx.ones((L,))
        self.x0_lambdas = mx.zeros((L,))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = mx.zeros((1,))
        self.backout_lambda = mx.zeros((1,))
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.value_embeds = {str(i): nn.Embedding(self.padded_vocab_size, kv_dim) for i in range(L) if has_ve(i, L)}
        # rotary tables over-allocated to 10x the sequence length (as nanochat); underscore = not a parameter
        self._rotary_len = 10 * config.sequence_len
        self._cos, self._sin = self._precompute_rotary(self._rotary_len, C // config.n_head)
        # evaluate now: private arrays are not in parameters(), and an unevaluated graph built on this
        # thread's stream cannot be evaluated from another thread (the web server's workers)
        mx.eval(self._cos, self._sin)
        self.grad_checkpoint = False  # base_train --grad-checkpoint 1
        self.init_weights()

    # ------------------------------------------------------------------ init and dtypes

    def _precompute_rotary(self, seq_len, head_dim, base=ROPE_BASE):
        inv_freq = 1.0 / (base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
        t = mx.arange(seq_len, dtype=mx.float32)
        freqs = t[:, None] * inv_freq[None, :]
        dtype = get_compute_dtype()
        cos = mx.cos(freqs).astype(dtype)[None, :, None, :]
        sin = mx.sin(freqs).astype(dtype)[None, :, None, :]
        return cos, sin

    def init_weights(self):
        """nanochat's init (its values, not its RNG stream: MLX cannot reproduce torch's)."""
        C, L = self.config.n_embd, self.config.n_layer
        s = 3 ** 0.5 * C ** -0.5  # uniform(-s, s) has std C^-0.5
        uni = lambda shape, lo, hi: mx.random.uniform(lo, hi, shape, dtype=mx.float32)
        self.transformer["wte"].weight = mx.random.normal(self.transformer["wte"].weight.shape) * 0.8
        self.lm_head.weight = mx.random.normal(self.lm_head.weight.shape) * 0.001
        for block in self.transformer["h"]:
            a, m = block.attn, block.mlp
            a.c_q.weight = uni(a.c_q.weight.shape, -s, s)
            a.c_k.weight = uni(a.c_k.weight.shape, -s, s)
            a.c_v.weight = uni(a.c_v.weight.shape, -s, s)
            a.c_proj.weight = mx.zeros(a.c_proj.weight.shape)
            m.c_fc.weight = uni(m.c_fc.weight.shape, -0.4 * s, 0.4 * s)
            m.c_proj.weight = mx.zeros(m.c_proj.weight.shape)
        denom = max(L - 1, 1)
        self.resid_lambdas = mx.array([1.15 - 0.10 * i / denom for i in range(L)], dtype=mx.float32)
        self.x0_lambdas = mx.array([0.20 - 0.15 * i / denom for i in range(L)], dtype=mx.float32)
        self.smear_lambda = mx.zeros((1,))
        self.backout_lambda = mx.full((1,), 0.2)
        self.smear_gate.weight = uni(self.smear_gate.weight.shape, 0.0, 0.02)
        for ve in self.value_embeds.values():
            ve.weight = uni(ve.weight.shape, -s, s)
        for block in self.transformer["h"]:
            if "ve_gate" in block.attn:
                block.attn.ve_gate.weight = uni(block.attn.ve_gate.weight.shape, 0.0, 0.02)
        self.cast_embeddings()

    def embedding_dtype(self):
        # embeddings live in the compute dtype (bf16 on GPU), except fp16 where nanochat keeps fp32
        dtype = get_compute_dtype()
        return mx.float32 if dtype == mx.float16 else dtype

    def cast_embeddings(self):
        dt = self.embedding_dtype()
        self.transformer["wte"].weight = self.transformer["wte"].weight.astype(dt)
        for ve in self.value_embeds.values():
            ve.weight = ve.weight.astype(dt)

    def storage_dtype(self, name):
        """The dtype a parameter is stored in: embeddings in the compute dtype, everything else fp32."""
        if name == "transformer.wte.weight" or name.startswith("value_embeds."):
            return self.embedding_dtype()
        return mx.float32

    # ------------------------------------------------------------------ named parameters

    def named_parameters(self):
        """Flat {state-dict name: array}, names identical to nanochat's state dict keys."""
        return dict(tree_flatten(self.parameters()))

    def load_state_dict(self, state_dict, strict=True):
        """Load a flat {name: array} dict (nanochat names). Arrays are cast to each parameter's
        storage dtype, so a bf16 checkpoint loads into an fp32 run and vice versa."""
        own = self.named_parameters()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
        for k, v in state_dict.items():
            if k in own and tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")

        def pick(path, current):
            if path in state_dict:
                return mx.array(state_dict[path]).astype(self.storage_dtype(path))
            return current
        self.update(tree_map_with_path(pick, self.parameters()))
        mx.eval(self.parameters())
        return self

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """nanochat's MuonAdamW with its parameter groups (see mlxchat/optim.py)."""
        from mlxchat.optim import setup_optimizer
        return setup_optimizer(self, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                               matrix_lr=matrix_lr, weight_decay=weight_decay, scalar_lr=scalar_lr)

    # ------------------------------------------------------------------ accounting

    def num_matmul_params(self):
        # every weight of a Linear: block matrices incl. ve_gates, lm_head (padded vocab), smear_gate
        total = 0
        for _, m in self.named_modules():
            if isinstance(m, Linear):
                total += m.weight.size
        return total

    def num_scaling_params(self):
        p = self.named_parameters()
        wte = p["transformer.wte.weight"].size
        ve = sum(v.size for k, v in p.items() if k.startswith("value_embeds."))
        lm_head = p["lm_head.weight"].size
        matrices = sum(v.size for k, v in p.items() if k.startswith("transformer.h."))
        scalars = sum(p[k].size for k in ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda"))
        total = wte + ve + lm_head + matrices + scalars
        assert total == sum(v.size for v in p.values()), "parameter accounting out of date"
        return {"wte": wte, "value_embeds": ve, "lm_head": lm_head, "transformer_matrices": matrices,
                "scalars": scalars, "total": total}

    def _attn_flops_per_token(self, context):
        H, D = self.config.n_head, self.config.n_embd // self.config.n_head
        return sum(H * D * min(w, context) for w in self.window_sizes)

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward), PaLM-style: 6*matmul params + attention."""
        return 6 * self.num_matmul_params() + 12 * self._attn_flops_per_token(self.config.sequence_len)

    def estimate_decode_flops(self, context):
        """FLOPs to decode one token at a given context length."""
        return 2 * self.num_matmul_params() + 4 * self._attn_flops_per_token(context)

    def estimate_prefill_flops(self, n):
        H, D = self.config.n_head, self.config.n_embd // self.config.n_head
        attn = 0
        for window in self.window_sizes:
            w = min(window, n)
            attn += 4 * H * D * (w * (w + 1) // 2 + (n - w) * w)
        return 2 * self.num_matmul_params() * n + attn

    def kv_bytes_per_token(self):
        itemsize = get_compute_dtype().size
        D = self.config.n_embd // self.config.n_head
        return self.config.n_layer * 2 * self.config.n_kv_head * D * itemsize

    def kv_read_bytes(self, context):
        itemsize = get_compute_dtype().size
        D = self.config.n_embd // self.config.n_head
        return sum(2 * self.config.n_kv_head * D * itemsize * min(context, w) for w in self.window_sizes)

    # ------------------------------------------------------------------ forward

    def __call__(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        L = self.config.n_layer
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if kv_cache is not None and T == 1:
            # a decode step: the attention rotates q and k with mx.fast.rope at the cache position
            # (one kernel, no table slicing)
            assert isinstance(T0, mx.array) or T0 < self._rotary_len, f"sequence too long for the rotary table: {T0 + 1} > {self._rotary_len}"
            cos = sin = None
        else:
            assert T0 + T <= self._rotary_len, f"sequence too long for the rotary table: {T0 + T} > {self._rotary_len}"
            cos, sin = self._cos[:, T0:T0 + T], self._sin[:, T0:T0 + T]
        dtype = get_compute_dtype()

        nrm = norm if kv_cache is not None else train_norm  # (see Block)
        x = self.transformer["wte"](idx).astype(dtype)
        x = nrm(x)
        # smear: mix the previous token's (pre-smear) embedding into each token, gated by the current one
        if kv_cache is None or T > 1:
            if kv_cache is not None:
                kv_cache.prev_embedding = x[:, -1:, :]
            if T > 1:
                gate = self.smear_lambda.astype(x.dtype) * mx.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
                x = mx.concatenate([x[:, :1], x[:, 1:] + gate * x[:, :-1]], axis=1)
        else:
            x_pre = kv_cache.prev_embedding
            kv_cache.prev_embedding = x
            if x_pre is not None:
                gate = self.smear_lambda.astype(x.dtype) * mx.sigmoid(self.smear_gate(x[:, :, :SMEAR_CHANNELS]))
                x = x + gate * x_pre

        x0 = x
        x_backout = None
        masks = {}
        # cast the fp32 scalars: MLX would promote a bf16 stream to fp32 (PyTorch's 0-dim rule doesn't).
        # Slices [i:i+1], not [i]: an integer index is a gather kernel (and a scatter in the backward).
        resid_l, x0_l = self.resid_lambdas.astype(x.dtype), self.x0_lambdas.astype(x.dtype)
        for i, block in enumerate(self.transformer["h"]):
            if kv_cache is None and recompute_backward("order"):
                x = mix_residual(x, x0, resid_l[i:i + 1], x0_l[i:i + 1])
            else:
                x = resid_l[i:i + 1] * x + x0_l[i:i + 1] * x0
            ve = self.value_embeds[str(i)](idx).astype(x.dtype) if str(i) in self.value_embeds else None
            if self.grad_checkpoint and kv_cache is None:
                # recompute the block in the backward pass instead of keeping its activations
                x = checkpointed_block(block, x, ve, cos, sin, self.window_sizes[i])
            else:
                x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache, masks)
            if i == L // 2:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        x = x - self.backout_lambda.astype(x.dtype) * x_backout
        x = nrm(x)

        if targets is None:
            return self.logits(x)
        return self.loss(x, targets, loss_reduction)

    def logits(self, x):
        logits = self.lm_head(x)[..., :self.config.vocab_size].astype(mx.float32)
        return SOFTCAP * mx.tanh(logits / SOFTCAP)

    def loss(self, x, targets, loss_reduction="mean"):
        """Cross entropy of the softcapped logits with ignore index -1; 'mean' over valid targets,
        'sum', or 'none' -> (B*T,) with 0s at ignored positions."""
        targets = targets.reshape(-1)
        V = self.config.vocab_size
        x = x.reshape(-1, x.shape[-1])
        if kernels.ce_impl() == "chunked" and type(self.lm_head) is Linear:
            # lm_head + softcap + CE in row chunks with a recomputing backward: the (B*T, V) fp32
            # logits never exist (kernels.py). A quantized lm_head (inference) takes the plain path.
            nll = kernels.linear_cross_entropy(x, self.lm_head.weight, targets, SOFTCAP, vocab_size=V)
        else:
            nll = kernels.softcapped_cross_entropy(self.lm_head(x)[..., :V], targets, SOFTCAP)
        valid = targets >= 0
        if loss_reduction == "none":
            return nll
        if loss_reduction == "sum":
            return nll.sum()
        assert loss_reduction == "mean", loss_reduction
        return nll.sum() / mx.maximum(valid.sum(), 1).astype(mx.float32)

    # ------------------------------------------------------------------ naive generation (reference)

    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Batch-1 generation without a KV cache (recomputes everything each step). A reference for
        the Engine; yields ints."""
        assert isinstance(tokens, list)
        key = mx.random.key(seed)
        ids = mx.array([tokens], dtype=mx.int32)
        for _ in range(max_tokens):
            logits = self(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                k = min(top_k, logits.shape[-1])
                kth = mx.sort(logits, axis=-1)[:, -k][:, None]
                logits = mx.where(logits < kth, -mx.inf, logits)
            if temperature > 0:
                key, sub = mx.random.split(key)
                nxt = mx.random.categorical(logits / temperature, key=sub)[:, None]
            else:
                nxt = mx.argmax(logits, axis=-1)[:, None]
            ids = mx.concatenate([ids, nxt.astype(mx.int32)], axis=1)
            yield nxt.item()
