"""
Memory-efficient training kernels, written with plain MLX ops so they run on every backend
(Metal, CUDA, CPU) and compile like the rest of the model.

On a Mac memory is the limit, and MLX's autograd keeps two kinds of huge arrays alive for the
backward pass that we do not need to keep:

1. The loss. logits -> fp32 -> softcap -> cross entropy over a 32768 vocabulary keeps several fp32
   (B*T, V) arrays (tanh output, capped logits) for the backward, and makes more inside it: at
   B*T = 32768 rows each one is 4 GiB. linear_cross_entropy fuses the lm_head matmul, the softcap
   and the cross entropy over row chunks in a custom VJP that keeps one float per row (the
   logsumexp) and recomputes each chunk's logits in the backward.

2. Attention. On Metal (and the CPU) MLX's attention VJP is always the unfused fallback: the
   (B, H, T, T) softmax of every layer stays alive until the backward reaches it. attention()
   wraps attention in a custom VJP that keeps only q, k, v and the output and recomputes the
   scores per block of queries in the backward (flash-attention style: each block of queries sees
   all of its keys at once, so the softmax of the block is exact and no logsumexp has to be kept).
   Masked-out key ranges (causal upper triangle, beyond the sliding window) are skipped entirely.

Which attention runs where is attention_impl's documented rule; MLXCHAT_ATTENTION=sdpa|blockwise
and MLXCHAT_CE=reference|chunked override the automatic choices (for A/B measurements, see
scripts/bench_memory.py).
"""
import math
import os
from functools import lru_cache

import mlx.core as mx

from mlxchat.hardware import gpu_kind

# ----------------------------------------------------------------------------------------------
# fused, chunked lm_head + softcap + cross entropy

# one (rows, V) fp32 chunk of logits is at most this big (1024 rows at V = 32768); a few of them are
# alive at a time, so the loss costs ~0.5 GiB of scratch whatever the batch
CE_CHUNK_BYTES = 128 * 2 ** 20


def ce_impl():
    """'chunked' (default) or 'reference' (the plain formula; MLXCHAT_CE=reference)."""
    impl = os.environ.get("MLXCHAT_CE", "auto").strip().lower() or "auto"
    assert impl in ("auto", "chunked", "reference"), f"MLXCHAT_CE={impl!r}: expected auto, chunked or reference"
    return "reference" if impl == "reference" else "chunked"


def softcapped_cross_entropy(logits, targets, softcap):
    """The reference formula (nanochat): fp32 logits -> softcap*tanh(logits/softcap) -> cross
    entropy with ignore index -1. logits (N, V) in any dtype, targets (N,); returns (N,) fp32 with
    0 at ignored rows."""
    logits = logits.astype(mx.float32)
    logits = softcap * mx.tanh(logits / softcap)
    valid = targets >= 0
    safe = mx.where(valid, targets, 0)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    return mx.where(valid, nll, 0.0)


@mx.compile
def _ce_chunk_forward(logits, targets, softcap):
    # exactly the reference formula on a chunk of rows, plus the logsumexp for the backward
    capped = softcap * mx.tanh(logits.astype(mx.float32) / softcap)
    lse = mx.logsumexp(capped, axis=-1)
    valid = targets >= 0
    target_logit = mx.take_along_axis(capped, mx.where(valid, targets, 0)[:, None], axis=-1)[:, 0]
    return mx.where(valid, lse - target_logit, 0.0), lse


@mx.compile
def _ce_chunk_backward(logits, targets, lse, g, softcap):
    # d nll / d capped = softmax(capped) - onehot(target); d capped / d logits = 1 - tanh^2.
    # One elementwise pass over the chunk: no (rows, V) intermediate besides the result.
    t = mx.tanh(logits.astype(mx.float32) / softcap)
    p = mx.exp(softcap * t - lse[:, None])
    g = mx.where(targets >= 0, g, 0.0)[:, None]  # ignored rows output a constant 0: no gradient
    onehot = mx.arange(logits.shape[-1])[None, :] == targets[:, None]  # target -1 matches nothing
    return (g * (p - onehot) * (1.0 - t * t)).astype(logits.dtype)


def _row_chunks(n, rows):
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


@lru_cache(maxsize=None)
def _linear_cross_entropy_fn(rows, softcap, vocab_size):
    def unembedding(w, dtype):
        # lm_head's rows beyond the real vocabulary (padding) never become logits; the matmul runs
        # in the activations' dtype with the fp32 master cast to it, as Linear does
        return (w if w.shape[0] == vocab_size else w[:vocab_size]).astype(dtype)

    @mx.custom_function
    def linear_ce(x, w, targets):
        wc = unembedding(w, x.dtype)
        nll, lse = [], []
        for s, e in _row_chunks(x.shape[0], rows):
            xc = x[s:e]
            if nll:
                # Sequence the chunks. MLX schedules independent branches of a graph level by level
                # (breadth first), so without this every chunk's matmul would run before any chunk's
                # reduction, and all their (rows, V) logits would be alive at once.
                xc = mx.depends(xc, nll[-1])
            a, b = _ce_chunk_forward(xc @ wc.T, targets[s:e], softcap)
            nll.append(a)
            lse.append(b)
        # the per-row logsumexp is an extra output so that the backward can use it (not differentiable)
        return mx.concatenate(nll), mx.concatenate(lse)

    @linear_ce.vjp
    def linear_ce_vjp(primals, cotangents, outputs):
        x, w, targets = primals
        g, lse = cotangents[0], outputs[1]
        wc = unembedding(w, x.dtype)
        dx, dw = [], None
        for s, e in _row_chunks(x.shape[0], rows):
            xc = x[s:e]
            if dx:
                # Sequence the chunks (see above): this chunk's matmul waits until the previous
                # chunk's dx and dw are done, so that chunk's (rows, V) gradient is already freed.
                xc = mx.depends(xc, [dx[-1], dw])
            dlogits = _ce_chunk_backward(xc @ wc.T, targets[s:e], lse[s:e], g[s:e], softcap)
            dx.append(dlogits @ wc)
            # the weight gradient accumulates in fp32 (w's dtype): one rounding per chunk product
            dwc = (dlogits.T @ xc).astype(w.dtype)
            dw = dwc if dw is None else dw + dwc
        if vocab_size < w.shape[0]:
            dw = mx.concatenate([dw, mx.zeros((w.shape[0] - vocab_size, w.shape[1]), w.dtype)])
        # dx is needed right away (the backward continues through the network), dw only at the end:
        # make dx wait for dw, or the last chunk's (rows, V) gradient stays alive until then
        dx = mx.depends(mx.concatenate(dx), dw)
        return dx, dw, mx.zeros_like(targets)

    return linear_ce


def default_ce_chunk_rows(vocab_size):
    return max(128, CE_CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(x, w, targets, softcap, vocab_size=None, chunk_rows=None):
    """Cross entropy of softcap*tanh((x @ w[:vocab_size].T)/softcap) against targets, without
    materialising the logits: x (N, C) final hidden states, w (V_padded, C) the unembedding (fp32
    master: the matmul runs in x's dtype, the rest in fp32, like the reference), targets (N,) ints
    with -1 = ignore. Returns (N,) fp32 losses, 0 at ignored rows; differentiable in x and w."""
    assert x.ndim == 2 and w.ndim == 2 and targets.shape == (x.shape[0],)
    vocab_size = vocab_size or w.shape[0]
    rows = chunk_rows or default_ce_chunk_rows(vocab_size)
    return _linear_cross_entropy_fn(rows, float(softcap), vocab_size)(x, w, targets)[0]


# ----------------------------------------------------------------------------------------------
# rotary embedding + QK norm in one kernel (CUDA)

# One warp per row (one head of one token): the row's two halves are rotated by -theta (nanochat's
# sign: y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin), rounded to the storage dtype as the reference's
# rotary output is, then RMS-normalised in fp32 (eps = float32's epsilon, as F.rms_norm). x is read
# through its strides (a view of the QKV projection's output: no copy), the output is contiguous
# (B, T, heads, D). cos and sin are the model's (1, T, 1, D/2) tables.
_ROTARY_NORM_ROW = """
    constexpr int HALF = HEAD_DIM / 2;
    constexpr int PER = HALF / 32;
    const long rows = (long)x_shape[0] * x_shape[1] * x_shape[2];
    const long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const long h = row % x_shape[2];
    const long t = (row / x_shape[2]) % x_shape[1];
    const long b = row / ((long)x_shape[2] * x_shape[1]);
    const DT* xr = x + b * x_strides[0] + t * x_strides[1] + h * x_strides[2];
    const DT* cr = cs + t * cs_strides[1];
    const DT* sr = sn + t * sn_strides[1];
    float c[PER], s[PER], y1[PER], y2[PER];
    float ss = 0.f;
    for (int j = 0; j < PER; j++) {
        const int i = lane + 32 * j;
        const float a = static_cast<float>(xr[i]), bb = static_cast<float>(xr[i + HALF]);
        c[j] = static_cast<float>(cr[i]);
        s[j] = static_cast<float>(sr[i]);
        y1[j] = static_cast<float>(static_cast<DT>(a * c[j] + bb * s[j]));
        y2[j] = static_cast<float>(static_cast<DT>(bb * c[j] - a * s[j]));
        ss += y1[j] * y1[j] + y2[j] * y2[j];
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    const float rstd = rsqrtf(ss / HEAD_DIM + 1.1920929e-07f);
"""

_ROTARY_NORM_FORWARD = _ROTARY_NORM_ROW + """
    DT* o = out + row * HEAD_DIM;
    for (int j = 0; j < PER; j++) {
        const int i = lane + 32 * j;
        o[i] = static_cast<DT>(y1[j] * rstd);
        o[i + HALF] = static_cast<DT>(y2[j] * rstd);
    }
"""

# The backward recomputes the row's forward from x, then: n = y rstd, dy = rstd (g - n mean(g n)),
# and the transposed rotation dx1 = dy1 cos - dy2 sin, dx2 = dy1 sin + dy2 cos.
_ROTARY_NORM_BACKWARD = _ROTARY_NORM_ROW + """
    const DT* gr = g + b * g_strides[0] + t * g_strides[1] + h * g_strides[2];
    float g1[PER], g2[PER];
    float gn = 0.f;
    for (int j = 0; j < PER; j++) {
        const int i = lane + 32 * j;
        g1[j] = static_cast<float>(gr[i]);
        g2[j] = static_cast<float>(gr[i + HALF]);
        gn += g1[j] * y1[j] + g2[j] * y2[j];
    }
    for (int o = 16; o > 0; o >>= 1) gn += __shfl_xor_sync(0xffffffff, gn, o);
    const float mean_gn = gn * rstd / HEAD_DIM;
    DT* o = dx + row * HEAD_DIM;
    for (int j = 0; j < PER; j++) {
        const int i = lane + 32 * j;
        const float dy1 = rstd * (g1[j] - y1[j] * rstd * mean_gn);
        const float dy2 = rstd * (g2[j] - y2[j] * rstd * mean_gn);
        o[i] = static_cast<DT>(dy1 * c[j] - dy2 * s[j]);
        o[i + HALF] = static_cast<DT>(dy1 * s[j] + dy2 * c[j]);
    }
"""

ROWS_PER_BLOCK = 8


def rotary_norm_impl(qk):
    """'cuda' (one fused kernel forward, one backward) or 'plain' (MLX ops: the rotation, a
    concatenate, rms_norm and their autodiff backwards). The kernel needs CUDA, a head dimension
    that is a multiple of 64 (each of a warp's 32 lanes takes whole pairs) and contiguous heads.
    MLXCHAT_ROTARY_NORM=plain forces the MLX ops (for A/B measurements and the parity test)."""
    choice = os.environ.get("MLXCHAT_ROTARY_NORM", "auto").strip().lower() or "auto"
    assert choice in ("auto", "cuda", "plain"), f"MLXCHAT_ROTARY_NORM={choice!r}: expected auto, cuda or plain"
    D = qk.shape[-1]
    if choice == "plain" or gpu_kind() != "cuda" or qk.ndim != 4 or D % 64 or D > 512:
        return "plain"
    return "cuda"


@lru_cache(maxsize=None)
def _rotary_norm_kernels():
    forward = mx.fast.cuda_kernel(name="mlxchat_rotary_norm_fwd", input_names=["x", "cs", "sn"],
                                  output_names=["out"], source=_ROTARY_NORM_FORWARD, ensure_row_contiguous=False)
    backward = mx.fast.cuda_kernel(name="mlxchat_rotary_norm_bwd", input_names=["x", "g", "cs", "sn"],
                                   output_names=["dx"], source=_ROTARY_NORM_BACKWARD, ensure_row_contiguous=False)
    return forward, backward


def _rotary_norm_launch(kernel, inputs, x):
    B, T, H, D = x.shape
    rows = B * T * H
    return kernel(inputs=inputs, template=[("DT", x.dtype), ("HEAD_DIM", D)],
                  grid=(rows * 32, 1, 1), threadgroup=(32 * ROWS_PER_BLOCK, 1, 1),
                  output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


@mx.custom_function
def _rotary_norm_cuda(x, cos, sin):
    forward, _ = _rotary_norm_kernels()
    return _rotary_norm_launch(forward, [x, cos.astype(x.dtype), sin.astype(x.dtype)], x)


@_rotary_norm_cuda.vjp
def _rotary_norm_cuda_vjp(primals, cotangent, output):
    x, cos, sin = primals
    _, backward = _rotary_norm_kernels()
    dx = _rotary_norm_launch(backward, [x, cotangent, cos.astype(x.dtype), sin.astype(x.dtype)], x)
    return dx, mx.zeros_like(cos), mx.zeros_like(sin)


def rotary_norm(qk, cos, sin, plain):
    """norm(rotary(qk)) for a cache-free forward: qk (B, T, heads, D) (a view is fine), cos and sin
    the (1, T, 1, D/2) tables; plain(qk, cos, sin) is the same in MLX ops (the fallback, and the
    definition the kernel is tested against). On CUDA one kernel forward and one backward replace
    the rotation's elementwise kernels, its concatenate, the norm and their backwards (d12 profile:
    ~5 kernels and ~0.7 ms per layer)."""
    if rotary_norm_impl(qk) == "plain":
        return plain(qk, cos, sin)
    return _rotary_norm_cuda(qk, cos, sin)


# ----------------------------------------------------------------------------------------------
# causal / sliding-window attention with a blockwise, recomputing backward

# Queries per block in the blockwise passes: 256, halved (down to 64) while one fp32
# (B, H, block, T) score block would exceed ATTN_BLOCK_BYTES. A block needs ~4 such arrays at once.
ATTN_BLOCK = 256
ATTN_BLOCK_BYTES = 256 * 2 ** 20


def attention_impl(B, H, T, D, dtype, window, requested=None):
    """Which attention a training forward (no KV cache) uses: 'sdpa' (mx.fast.scaled_dot_product_attention
    with MLX's own VJP; a sliding window goes in as a (T, T) additive mask), 'banded' (banded_attention()
    below: the same kernel on the window's diagonal band only) or 'blockwise' (attention() below).
    MLXCHAT_ATTENTION=sdpa|banded|blockwise forces one.

    The rule, from MLX 0.32's sources (mlx/fast.cpp, backend/{metal,cuda}/scaled_dot_product_attention.cpp)
    and measurements:
    - Metal and CPU: blockwise. MLX's attention VJP there is always the unfused fallback, which keeps
      the (B, H, T, T) probabilities of every layer for the backward.
    - CUDA: the cuDNN flash forward and backward for bf16/fp16 with D <= 128, D % 8 == 0, fed a
      causal mask ("causal") or an additive bias. cuDNN as MLX calls it has no sliding-window option:
      with a (T, T) bias it computes every one of the T x T scores. A window layer whose window
      divides T therefore runs 'banded' (each window of queries against its own and the previous
      window of keys, in one call: 50% of the scores at T = 2048, window 512); a full-context layer
      and any other window run 'sdpa'.
    Measured on an H100 (MLX CUDA, bf16, 16 x 2048 x 6 heads x 128, forward + backward of one layer;
    `python -m scripts.bench_profile --what attn --mask ...`): causal 1.9-2.2 ms; window 512 as a
    boolean mask 4.4 ms and 2.1 GiB (MLX turns it into a (B, H, T, T) additive array), as a (T, T)
    bf16 additive mask 3.0-3.3 ms and 0.6 GiB, banded 2.7 ms (GPU busy 2.3 vs 2.7 ms). In the d12
    training step (`bench_train --depth 12 --device-batch-size 16`): additive mask 220,480 tok/s,
    a first banded version (one call per chunk, sliced keys) 231,847."""
    requested = requested or os.environ.get("MLXCHAT_ATTENTION", "auto").strip().lower() or "auto"
    assert requested in ("auto", "sdpa", "banded", "blockwise"), \
        f"MLXCHAT_ATTENTION={requested!r}: expected auto, sdpa, banded or blockwise"
    if requested == "banded" and not banded_supported(T, window):
        requested = "sdpa"
    if requested != "auto":
        return requested
    if gpu_kind() == "cuda":
        return "banded" if banded_supported(T, window) else "sdpa"
    return "blockwise"


@lru_cache(maxsize=64)
def additive_window_mask(t_q, t_k, offset, window, dtype):
    """(t_q, t_k) additive mask (0 where query offset+q may see key k, -inf elsewhere) in the
    attention's dtype: query i sees keys i-window..i (window+1 keys, flash-attention's (left, 0)).
    Additive and (t_q, t_k), not boolean: MLX turns a boolean mask into an additive array of the full
    (B, H, t_q, t_k) shape inside every call, and keeps it for the backward."""
    qpos = mx.arange(offset, offset + t_q)[:, None]
    kpos = mx.arange(t_k)[None, :]
    mask = mx.where((kpos <= qpos) & (kpos >= qpos - window), 0.0, -mx.inf).astype(dtype)
    mx.eval(mask)
    return mask


def banded_supported(T, window):
    return 0 < window < T and T % window == 0


@lru_cache(maxsize=16)
def _banded_mask(B, n, W, dtype):
    """(B*n, 1, W, 2W) additive mask of banded_attention's chunks: query r of a chunk (absolute
    j*W + r) sees key c of its 2W keys (absolute (j-1)*W + c) iff r <= c <= r + W; the first chunk
    of each row has no previous keys (its first W are padding, masked)."""
    band = additive_window_mask(W, 2 * W, W, W, dtype)
    first = mx.concatenate([mx.full((W, W), -mx.inf, dtype=dtype), band[:, W:]], axis=1)
    per_chunk = mx.concatenate([first[None], mx.broadcast_to(band, (n - 1, W, 2 * W))], axis=0)
    mask = mx.broadcast_to(per_chunk[None], (B, n, W, 2 * W)).reshape(B * n, 1, W, 2 * W)
    mx.eval(mask)
    return mask


def banded_attention(q, k, v, window, scale=None):
    """Sliding-window causal attention (query i sees keys i-W..i) as ONE fused attention call on the
    diagonal band: the sequence is cut into n = T/W chunks of W queries, which become batch entries,
    and each chunk attends to 2W keys (the previous chunk's and its own) under a band mask. 2W/T of
    the T x T scores are computed (50% at T = 2048, W = 512) instead of all of them.
    Chunking is a reshape of the (B, T, heads, D) memory, not a copy, for q and the output; keys and
    values are copied once into their overlapping 2W windows. MLX's own VJP (the fused backward on
    CUDA) differentiates it. q (B, H, T, D), k, v (B, Hkv, T, D) -> (B, H, T, D); T a multiple of W;
    scale defaults to 1/sqrt(D)."""
    B, H, T, D = q.shape
    W = int(window)
    assert banded_supported(T, W), (T, W)
    n = T // W

    def chunked(x):  # (B, h, T, D) -> (B, n, W, h, D)
        return x.transpose(0, 2, 1, 3).reshape(B, n, W, x.shape[1], D)

    def batch_major(x):  # (B, n, t, h, D) -> (B*n, h, t, D)
        return x.transpose(0, 1, 3, 2, 4).reshape(B * n, x.shape[3], x.shape[2], D)

    def with_previous(x):  # keys/values: each chunk preceded by the previous chunk (zeros for the first)
        c = chunked(x)
        before, _ = mx.split(c, [n - 1], axis=1)
        prev = mx.concatenate([mx.zeros((B, 1) + c.shape[2:], dtype=c.dtype), before], axis=1)
        return batch_major(mx.concatenate([prev, c], axis=2))

    y = mx.fast.scaled_dot_product_attention(batch_major(chunked(q)), with_previous(k), with_previous(v),
                                             scale=scale or 1.0 / math.sqrt(D), mask=_banded_mask(B, n, W, q.dtype))
    # (B*n, H, W, D) -> (B, T, H, D) memory, returned as the (B, H, T, D) view the callers expect
    return y.reshape(B, n, H, W, D).transpose(0, 1, 3, 2, 4).reshape(B, T, H, D).transpose(0, 2, 1, 3)


def attention_block_size(B, H, T):
    bq = min(ATTN_BLOCK, T)
    while bq > 64 and B * H * bq * T * 4 > ATTN_BLOCK_BYTES:
        bq //= 2
    return bq


def _block_mask(q0, q1, k0, k1, window):
    # query at absolute position i sees key j iff i - window <= j <= i
    qpos = mx.arange(q0, q1)[:, None]
    kpos = mx.arange(k0, k1)[None, :]
    return (kpos <= qpos) & (kpos >= qpos - window)


def _key_range(q0, q1, window):
    # the keys any query of [q0, q1) can see
    return max(0, q0 - window), q1


def _block_probs(qb, kb, mask, scale):
    # qb (B, Hkv, G, bq, D), kb (B, Hkv, tk, D) -> fp32 softmax (B, Hkv, G, bq, tk). Every query
    # sees itself, so no row is all -inf.
    s = (qb @ kb[:, :, None].swapaxes(-1, -2)).astype(mx.float32) * scale
    s = mx.where(mask, s, -mx.inf)
    return mx.softmax(s, axis=-1)


def blockwise_attention_forward(q, k, v, window, block=None, scale=None):
    """Attention computed per block of queries (each block only looks at its visible key range): peak
    scratch is one (B, H, block, keys) block instead of (B, H, T, T). q (B, H, T, D), k, v
    (B, Hkv, T, D)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    bq = block or attention_block_size(B, H, T)
    scale = scale or 1.0 / math.sqrt(D)
    qg = q.reshape(B, Hkv, G, T, D)
    out = []
    for q0 in range(0, T, bq):
        q1 = min(q0 + bq, T)
        k0, k1 = _key_range(q0, q1, window)
        qb = qg[:, :, :, q0:q1]
        if out:
            # one block at a time (MLX would otherwise run every block's score matmul first)
            qb = mx.depends(qb, out[-1])
        p = _block_probs(qb, k[:, :, k0:k1], _block_mask(q0, q1, k0, k1, window), scale)
        out.append(p.astype(v.dtype) @ v[:, :, None, k0:k1])
    return mx.concatenate(out, axis=3).reshape(B, H, T, D)


def _fused_forward(q, k, v, window, scale):
    """mx.fast's fused attention kernel, or None where there is none (the CPU, shapes the kernels
    do not cover). force_fused matters on Metal: under grad tracing MLX would otherwise pick its
    unfused path there, which materialises (B, H, T, T) scores."""
    T = q.shape[2]
    mask = "causal" if window >= T - 1 else _block_mask(0, T, 0, T, window)
    try:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, force_fused=True)
    except ValueError:
        return None


@lru_cache(maxsize=None)
def _attention_fn(window, block, scale):
    @mx.custom_function
    def attn(q, k, v):
        out = _fused_forward(q, k, v, window, scale)
        if out is None:
            out = blockwise_attention_forward(q, k, v, window, block, scale)
        return out

    @attn.vjp
    def attn_vjp(primals, dout, out):
        q, k, v = primals
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        bq = block or attention_block_size(B, H, T)
        # rowsum(dO * O) = rowsum(P * dP): the softmax backward's correction term, once for all rows
        delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1).reshape(B, Hkv, G, T, 1)
        qg, dog = q.reshape(B, Hkv, G, T, D), dout.reshape(B, Hkv, G, T, D)
        dq = []
        dk = mx.zeros(k.shape, mx.float32)
        dv = mx.zeros(v.shape, mx.float32)
        for q0 in range(0, T, bq):
            q1 = min(q0 + bq, T)
            k0, k1 = _key_range(q0, q1, window)
            qb, dob = qg[:, :, :, q0:q1], dog[:, :, :, q0:q1]
            if dq:
                # sequence the blocks (see linear_ce_vjp): this block starts after the previous one's
                # dq, dk and dv are done, so only one block of scores is ever alive. Both matmul
                # operands that start a block (q for the scores, dO for dP) must wait.
                qb, dob = mx.depends([qb, dob], [dq[-1], dk, dv])
            kb, vb = k[:, :, k0:k1], v[:, :, k0:k1]
            p = _block_probs(qb, kb, _block_mask(q0, q1, k0, k1, window), scale)
            dp = (dob @ vb[:, :, None].swapaxes(-1, -2)).astype(mx.float32)
            ds = (p * (dp - delta[:, :, :, q0:q1]) * scale).astype(q.dtype)
            dq.append(ds @ kb[:, :, None])
            # fold the G query heads of a kv head into the row dimension: the matmul sums over them
            rows = G * (q1 - q0)
            ds2 = ds.reshape(B, Hkv, rows, k1 - k0)
            p2 = p.astype(v.dtype).reshape(B, Hkv, rows, k1 - k0)
            # accumulate into the full-length fp32 dk, dv (overlapping key ranges of neighbouring blocks)
            pad = [(0, 0), (0, 0), (k0, T - k1), (0, 0)]
            dk = dk + mx.pad((ds2.swapaxes(-1, -2) @ qb.reshape(B, Hkv, rows, D)).astype(mx.float32), pad)
            dv = dv + mx.pad((p2.swapaxes(-1, -2) @ dob.reshape(B, Hkv, rows, D)).astype(mx.float32), pad)
        dk, dv = dk.astype(k.dtype), dv.astype(v.dtype)
        # the backward continues through dq at once, while dk and dv may be summed only much later
        # (with other layers' gradients of the same inputs): make dq wait for them, or the last
        # block's probabilities and dS would stay alive until then
        dq = mx.depends(mx.concatenate(dq, axis=3).reshape(B, H, T, D), [dk, dv])
        return dq, dk, dv

    return attn


def attention(q, k, v, window, block=None, scale=None):
    """Causal self-attention with a left window, for training and cache-free forwards: query i sees
    keys i-window..i, scale 1/sqrt(D) unless given, GQA by H // Hkv query heads per kv head. q (B, H, T, D), k, v
    (B, Hkv, T, D) -> (B, H, T, D). The forward is mx.fast's fused kernel where one exists, else the
    blockwise forward; the backward recomputes per block of queries (nothing (B, H, T, T) is kept)."""
    assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape and q.shape[2] == k.shape[2]
    return _attention_fn(int(window), block, float(scale or 1.0 / math.sqrt(q.shape[-1])))(q, k, v)
