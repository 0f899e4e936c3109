"""
The memory-efficient training kernels (mlxchat/kernels.py): the chunked lm_head + softcap + cross
entropy and the blockwise-backward attention must give the same losses, outputs and gradients as
the plain formulas, and must actually not keep the big arrays alive (peak memory checks).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxchat import kernels
from mlxchat.gpt import GPT, GPTConfig, SOFTCAP


def rel(a, b):
    a, b = np.asarray(a.astype(mx.float32) if isinstance(a, mx.array) else a, dtype=np.float64), \
        np.asarray(b.astype(mx.float32) if isinstance(b, mx.array) else b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def throttled_peak(fn, *args):
    """Peak memory (bytes above what is alive before) of evaluating fn(*args), with MLX's run-ahead
    off (a 1-byte memory limit makes eval wait for running ops before scheduling the next one), so
    the number is what the computation's schedule needs rather than what happened to be in flight."""
    mx.eval(args)
    previous = mx.set_memory_limit(1)
    try:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = fn(*args)
        mx.eval(out)
        return mx.get_peak_memory() - base
    finally:
        mx.set_memory_limit(previous)


# ---------------------------------------------------------------------------------------- cross entropy

N, C, V_REAL, V_PAD = 23, 32, 70, 72
IGNORED = [3, 10, 11, 22]


def ce_inputs(dtype, seed=0):
    key = mx.random.key(seed)
    kx, kw, kt, kg = mx.random.split(key, 4)
    x = mx.random.normal((N, C), key=kx).astype(dtype)
    w = mx.random.normal((V_PAD, C), key=kw) * 0.7  # fp32 master, logits of order 4: softcap matters
    t = mx.random.randint(0, V_REAL, (N,), key=kt)
    t[mx.array(IGNORED)] = -1
    cot = mx.random.normal((N,), key=kg)  # arbitrary per-row weights for reduction 'none'
    return x, w, t, cot


def reduce(nll, t, cot, reduction):
    if reduction == "mean":
        return nll.sum() / (t >= 0).sum().astype(mx.float32)
    return (nll * cot).sum()  # 'none': a weighted sum, so every row's gradient is checked


def ce_reference(x, w, t):
    # the formula nanochat's forward uses: lm_head in the activation dtype, [:V], fp32, softcap, CE
    return kernels.softcapped_cross_entropy((x @ w.astype(x.dtype).T)[:, :V_REAL], t, SOFTCAP)


def ce_chunked(chunk_rows):
    return lambda x, w, t: kernels.linear_cross_entropy(x, w, t, SOFTCAP, vocab_size=V_REAL, chunk_rows=chunk_rows)


def test_reference_formula_matches_float64():
    # the reference the chunked loss is compared with is itself right (independent numpy, float64)
    x, w, t, _ = ce_inputs(mx.float32)
    z = np.array(x, dtype=np.float64) @ np.array(w, dtype=np.float64)[:V_REAL].T
    z = SOFTCAP * np.tanh(z / SOFTCAP)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    tt = np.array(t)
    expected = np.where(tt >= 0, lse - z[np.arange(N), np.maximum(tt, 0)], 0.0)
    assert np.abs(np.array(ce_reference(x, w, t)) - expected).max() < 1e-5
    assert np.abs(np.array(ce_chunked(5)(x, w, t)) - expected).max() < 1e-5


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_rows", [5, None], ids=["chunks-of-5", "one-chunk"])
def test_chunked_cross_entropy_matches_reference(dtype, reduction, chunk_rows):
    x, w, t, cot = ce_inputs(dtype)
    results = []
    for fn in (ce_reference, ce_chunked(chunk_rows)):
        loss_fn = lambda x, w: reduce(fn(x, w, t), t, cot, reduction)
        (loss, (gx, gw)) = mx.value_and_grad(loss_fn, argnums=(0, 1))(x, w)
        results.append((fn(x, w, t), loss, gx, gw))
    (nll_r, loss_r, gx_r, gw_r), (nll_c, loss_c, gx_c, gw_c) = results
    assert nll_c.dtype == mx.float32 and nll_c.shape == (N,)
    assert gx_c.dtype == dtype and gw_c.dtype == mx.float32 and gw_c.shape == (V_PAD, C)
    # the loss math is fp32 in both; bf16 only enters through the (identical) logit matmul
    assert rel(nll_c, nll_r) < 1e-5
    assert abs(loss_c.item() - loss_r.item()) <= 1e-5 * abs(loss_r.item())
    tol = 1e-5 if dtype == mx.float32 else 1e-2  # bf16 gradients: the matmuls round to bf16
    assert rel(gx_c, gx_r) < tol, rel(gx_c, gx_r)
    assert rel(gw_c, gw_r) < tol, rel(gw_c, gw_r)
    # ignored targets: zero loss and no gradient; padded vocab rows: no gradient
    assert np.all(np.array(nll_c)[IGNORED] == 0)
    assert np.all(np.array(gx_c.astype(mx.float32))[IGNORED] == 0)
    assert np.all(np.array(gw_c)[V_REAL:] == 0)


def test_chunked_cross_entropy_compiles():
    x, w, t, cot = ce_inputs(mx.float32, seed=1)
    loss_fn = lambda x, w: reduce(ce_chunked(7)(x, w, t), t, cot, "mean")
    eager = mx.value_and_grad(loss_fn, argnums=(0, 1))(x, w)
    compiled = mx.compile(mx.value_and_grad(loss_fn, argnums=(0, 1)))(x, w)
    assert abs(eager[0].item() - compiled[0].item()) < 1e-6
    for a, b in zip(eager[1], compiled[1]):
        assert rel(b, a) < 1e-6


def test_chunked_cross_entropy_does_not_keep_the_logits():
    # 4096 rows x 4096 vocab: one fp32 logits array is 64 MiB; the reference keeps several, the
    # chunked loss works on 256-row chunks (4 MiB)
    n, c, v = 4096, 64, 4096
    x = mx.random.normal((n, c), key=mx.random.key(2))
    w = mx.random.normal((v, c), key=mx.random.key(3)) * 0.2
    t = mx.random.randint(0, v, (n,), key=mx.random.key(4))
    full = n * v * 4

    def step(fn):
        return mx.compile(mx.value_and_grad(lambda x, w: fn(x, w).mean(), argnums=(0, 1)))

    ref = throttled_peak(step(lambda x, w: kernels.softcapped_cross_entropy(x @ w.T, t, SOFTCAP)), x, w)
    chunked = throttled_peak(step(lambda x, w: kernels.linear_cross_entropy(x, w, t, SOFTCAP, chunk_rows=256)), x, w)
    assert ref > 2 * full, ref / full
    assert chunked < 0.25 * full, chunked / full


# ---------------------------------------------------------------------------------------- attention

def attention_reference(q, k, v, window):
    """Explicit mask + softmax (fp32) + GQA by repeating the kv heads."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) / math.sqrt(D)
    i, j = mx.arange(T)[:, None], mx.arange(T)[None, :]
    s = mx.where((j <= i) & (j >= i - window), s, -mx.inf)
    return (mx.softmax(s, axis=-1) @ v.astype(mx.float32)).astype(q.dtype)


ATTENTION_CASES = [
    # (B, H, Hkv, T, D, window, block)
    (2, 4, 4, 37, 16, 10_000, 16),  # causal, T not a multiple of the block
    (2, 4, 2, 37, 16, 7, 16),  # sliding window shorter than a block, GQA 2
    (1, 6, 1, 50, 8, 20, 16),  # multi-query (GQA 6), window longer than a block
    (1, 4, 2, 64, 16, 16, 16),  # T a multiple of the block, window = block
    (2, 2, 2, 5, 8, 2, None),  # tiny T, default block
    (1, 4, 2, 300, 32, 100, None),  # default block (256): two blocks, the second partial
]


def attention_inputs(B, H, Hkv, T, D, dtype, seed=0):
    ks = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((B, H, T, D), key=ks[0]) * 1.2
    k = mx.random.normal((B, Hkv, T, D), key=ks[1]) * 1.2
    v = mx.random.normal((B, Hkv, T, D), key=ks[2])
    do = mx.random.normal((B, H, T, D), key=ks[3])
    return [a.astype(dtype) for a in (q, k, v, do)]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}kv{}T{}D{}w{}blk{}".format(*c))
def test_attention_matches_naive_reference(case, dtype):
    B, H, Hkv, T, D, window, block = case
    q, k, v, do = attention_inputs(B, H, Hkv, T, D, dtype)
    out_r, grads_r = mx.vjp(lambda q, k, v: attention_reference(q, k, v, window), [q, k, v], [do])
    out_b, grads_b = mx.vjp(lambda q, k, v: kernels.attention(q, k, v, window, block=block), [q, k, v], [do])
    # bf16: the reference runs in fp32 from bf16 inputs; ours rounds P and dS to bf16 for the matmuls
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert out_b[0].dtype == dtype and out_b[0].shape == (B, H, T, D)
    assert rel(out_b[0], out_r[0]) < tol
    for name, gb, gr in zip("qkv", grads_b, grads_r):
        assert gb.dtype == dtype and gb.shape == gr.shape, name
        assert rel(gb, gr) < tol, (name, rel(gb, gr))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(2, 4, 2, 64, 16, 16), (1, 6, 1, 96, 8, 32), (1, 2, 2, 40, 8, 20)],
                         ids=lambda c: "B{}H{}kv{}T{}D{}w{}".format(*c))
def test_banded_attention_matches_naive_reference(case, dtype):
    # the window layers on CUDA: fused attention on the diagonal band only (causal first block, then
    # each block of W queries against its 2W keys), differentiated by MLX's own VJP
    B, H, Hkv, T, D, window = case
    assert kernels.banded_supported(T, window) and not kernels.banded_supported(T, T) and not kernels.banded_supported(T, 7)
    q, k, v, do = attention_inputs(B, H, Hkv, T, D, dtype, seed=8)
    out_r, grads_r = mx.vjp(lambda q, k, v: attention_reference(q, k, v, window), [q, k, v], [do])
    out_b, grads_b = mx.vjp(lambda q, k, v: kernels.banded_attention(q, k, v, window), [q, k, v], [do])
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert out_b[0].dtype == dtype and rel(out_b[0], out_r[0]) < tol
    for name, gb, gr in zip("qkv", grads_b, grads_r):
        assert gb.shape == gr.shape and rel(gb, gr) < tol, (name, rel(gb, gr))


def test_attention_blockwise_forward_and_compile():
    q, k, v, do = attention_inputs(2, 4, 2, 45, 16, mx.float32, seed=3)
    ref = attention_reference(q, k, v, 9)
    assert rel(kernels.blockwise_attention_forward(q, k, v, 9, block=8), ref) < 1e-5
    f = lambda q, k, v, do: mx.vjp(lambda q, k, v: kernels.attention(q, k, v, 9, block=8), [q, k, v], [do])
    eager, compiled = f(q, k, v, do), mx.compile(f)(q, k, v, do)
    for a, b in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        assert rel(b, a) < 1e-6


def test_attention_backward_keeps_no_score_matrix():
    # 3 stacked layers at T=1024 (4 heads): one fp32 (B, H, T, T) is 16 MiB. MLX's own VJP of the
    # unfused attention keeps one per layer; the blockwise one only ever holds a 128-query block.
    B, H, T, D = 1, 4, 1024, 32
    q, k, v, _ = attention_inputs(B, H, H, T, D, mx.float32, seed=4)
    scores = B * H * T * T * 4

    def step(attend):
        def loss(q, k, v):
            x = q
            for window in (T, 256, T):
                x = attend(x, k, v, window) * 2.0
            return x.sum()
        return mx.compile(mx.grad(loss, argnums=(0, 1, 2)))

    def sdpa(q, k, v, window):
        mask = "causal" if window >= T - 1 else kernels._block_mask(0, T, 0, T, window)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(D), mask=mask)

    unfused = throttled_peak(step(sdpa), q, k, v)
    blockwise = throttled_peak(step(lambda q, k, v, w: kernels.attention(q, k, v, w, block=128)), q, k, v)
    assert unfused > 2 * scores, unfused / scores
    assert blockwise < 0.75 * scores, blockwise / scores


# ------------------------------------------------------------------------- rotary + QK norm kernel

def _rotary_tables(T, D, dtype):
    inv_freq = 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
    freqs = mx.arange(T, dtype=mx.float32)[:, None] * inv_freq[None, :]
    return mx.cos(freqs).astype(dtype)[None, :, None, :], mx.sin(freqs).astype(dtype)[None, :, None, :]


def _rotary_norm_plain(qk, cos, sin):
    from mlxchat.gpt import _rotary_qk_norm_plain
    return _rotary_qk_norm_plain(qk, cos, sin)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_rotary_norm_is_the_plain_ops_where_there_is_no_kernel(dtype):
    # off CUDA (and for head dims the kernel does not take) rotary_norm is exactly the MLX ops
    B, T, H, D = 2, 16, 3, 32
    qkv = mx.random.normal((B, T, H + 2, D), key=mx.random.key(1)).astype(dtype)
    qk = mx.split(qkv, [H], axis=2)[0]
    cos, sin = _rotary_tables(T, D, dtype)
    assert kernels.rotary_norm_impl(qk) == "plain"
    assert mx.array_equal(kernels.rotary_norm(qk, cos, sin, _rotary_norm_plain), _rotary_norm_plain(qk, cos, sin))


@pytest.mark.skipif(mx.default_device() != mx.gpu or not mx.cuda.is_available(),
                    reason="the fused kernel is CUDA's: CI's CPU runs the plain ops (test above)")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_rotary_norm_kernel_matches_the_plain_ops(dtype, D, monkeypatch):
    """The CUDA kernel (forward and backward) against the MLX ops it replaces, on a strided view of a
    QKV-like array (as the model hands it) and a non-contiguous cotangent."""
    B, T, H, Hkv = 2, 48, 3, 1
    qkv = mx.random.normal((B, T, H + 2 * Hkv, D), key=mx.random.key(2)).astype(dtype)
    qk = mx.split(qkv, [H + Hkv], axis=2)[0]
    cos, sin = _rotary_tables(T + 5, D, dtype)
    cos, sin = cos[:, :T], sin[:, :T]
    g = mx.random.normal((B, H + Hkv, T, D), key=mx.random.key(3)).astype(dtype).transpose(0, 2, 1, 3)

    def run(impl):
        monkeypatch.setenv("MLXCHAT_ROTARY_NORM", impl)
        assert kernels.rotary_norm_impl(qk) == impl
        f = lambda a: kernels.rotary_norm(a, cos, sin, _rotary_norm_plain)
        (out,), (dx,) = mx.vjp(f, [qk], [g])
        compiled_out = mx.compile(f)(qk)
        return out, dx, compiled_out

    out_p, dx_p, _ = run("plain")
    out_k, dx_k, out_c = run("cuda")
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert out_k.shape == out_p.shape and dx_k.shape == qk.shape and dx_k.dtype == dtype
    assert rel(out_k, out_p) < tol and rel(out_c, out_p) < tol
    assert rel(dx_k, dx_p) < tol, rel(dx_k, dx_p)
    # every row of the output is unit-RMS: the norm ran on the rotated row
    rms = mx.sqrt(mx.mean(mx.square(out_k.astype(mx.float32)), axis=-1))
    assert mx.allclose(rms, mx.ones_like(rms), atol=1e-2).item()


# ---------------------------------------------------------------------------------------- in the model

def tiny_model():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")
    model = GPT(config)
    # random everything (at init the output projections are zero, which would hide attention grads)
    params = model.named_parameters()
    keys = mx.random.split(mx.random.key(5), len(params))
    model.load_state_dict({n: mx.random.normal(p.shape, key=kk) * 0.3 for (n, p), kk in zip(params.items(), keys)})
    # windows shorter than the sequence, so the sliding-window path is exercised (S=12 here)
    model.window_sizes = [12, 12, 64]
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_loss_and_grads_match_the_plain_paths(dtype, monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", dtype)
    model = tiny_model()
    idx = mx.random.randint(0, 100, (2, 48), key=mx.random.key(6))
    targets = mx.random.randint(0, 100, (2, 48), key=mx.random.key(7))
    targets[0, :5] = -1
    targets[1, -3:] = -1

    def run(ce, attn, checkpoint=False, recompute="on"):
        monkeypatch.setenv("MLXCHAT_CE", ce)
        monkeypatch.setenv("MLXCHAT_ATTENTION", attn)
        monkeypatch.setenv("MLXCHAT_RECOMPUTE", recompute)
        model.grad_checkpoint = checkpoint
        loss, grads = nn.value_and_grad(model, lambda x, y: model(x, y))(idx, targets)
        none = model(idx, targets, loss_reduction="none")
        return loss, dict(tree_flatten(grads)), none

    assert kernels.attention_impl(2, 4, 48, 16, mx.float32, 12, "auto") in ("sdpa", "blockwise")
    ref_loss, ref_grads, ref_none = run("reference", "sdpa", recompute="off")  # MLX's autodiff throughout
    tol = 1e-4 if dtype == "float32" else 3e-2
    if dtype == "bfloat16":
        # bf16 paths round at different places (the unfused attention scales q before its matmul,
        # the blockwise one the scores after it), so two of them can differ by more than either
        # differs from the exact result: compare every path with the same model in float32, at the
        # bf16 reference path's own distance from it (measured 0.055 here for its worst tensor)
        monkeypatch.setenv("MLXCHAT_DTYPE", "float32")
        weights = model.named_parameters()
        model.load_state_dict(weights)
        ref_loss, ref_grads, ref_none = run("reference", "sdpa", recompute="off")
        ref_grads = {k: g.astype(mx.bfloat16) if weights[k].dtype == mx.bfloat16 else g for k, g in ref_grads.items()}
        monkeypatch.setenv("MLXCHAT_DTYPE", dtype)
        model.load_state_dict(weights)
        tol = 8e-2
    for ce, attn, ckpt, rc in [("reference", "sdpa", False, "on"), ("chunked", "sdpa", False, "off"),
                               ("reference", "blockwise", False, "off"), ("chunked", "blockwise", False, "on"),
                               ("chunked", "blockwise", True, "on"), ("chunked", "banded", False, "on")]:
        loss, grads, none = run(ce, attn, ckpt, rc)
        assert abs(loss.item() - ref_loss.item()) < tol * abs(ref_loss.item()), (ce, attn)
        assert rel(none, ref_none) < tol and np.all(np.array(none).reshape(2, 48)[0, :5] == 0)
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            assert g.dtype == ref_grads[name].dtype, name
            if dtype == "bfloat16" and "lambda" in name:
                # a per-layer scalar's gradient is a sum of bf16 products over every token and channel
                # that mostly cancel (|g| ~ 0.04 here): compare absolutely, at bf16's resolution of the terms
                assert np.abs(np.array(g) - np.array(ref_grads[name])).max() < 0.02, (ce, attn, ckpt, name, g, ref_grads[name])
                continue
            assert rel(g, ref_grads[name]) < tol, (ce, attn, ckpt, name, rel(g, ref_grads[name]))
        assert np.all(np.array(grads["lm_head.weight"])[100:] == 0)  # padded vocab rows


def _per_layer_arrays(recompute, checkpoint):
    """The growth of the throttled peak of one compiled forward+backward from 2 to 4 layers, in
    (B, T, C) fp32 arrays per layer (weight gradients included), blockwise attention, C = 128."""
    os.environ.update(MLXCHAT_DTYPE="float32", MLXCHAT_ATTENTION="blockwise", MLXCHAT_RECOMPUTE=recompute)
    B, T, C = 2, 256, 128
    peaks = []
    for L in (2, 4):
        mx.random.seed(0)
        model = GPT(GPTConfig(sequence_len=T, vocab_size=256, n_layer=L, n_head=2, n_kv_head=2, n_embd=C))
        model.grad_checkpoint = checkpoint
        idx = mx.random.randint(0, 256, (B, T))
        step = mx.compile(nn.value_and_grad(model, lambda x, y: model(x, y)), inputs=model.state, outputs=model.state)
        peaks.append(throttled_peak(step, idx, idx))
    return (peaks[1] - peaks[0]) / 2 / (B * T * C * 4)


def test_recomputing_vjps_keep_fewer_activations():
    """gpt.recompute_backward's custom VJPs (norms that keep their output, rotary + QK norm and
    relu^2 + projection that recompute, weight and lambda gradients ordered before the input
    gradient) must lower what a forward+backward holds, and --grad-checkpoint must then keep about
    one array per block. Each configuration is measured in a process of its own: in one process the
    figures moved with what ran before (autodiff 28.1 first, 26.1 after other tests)."""
    def measure(recompute, checkpoint=False):
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import mlxchat; "
                f"from test_memory_efficient import _per_layer_arrays; print(_per_layer_arrays({recompute!r}, {checkpoint!r}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return float(out.stdout.strip().splitlines()[-1])

    autodiff, recomputing, checkpointed = measure("off"), measure("on"), measure("on", True)
    checkpointed_autodiff = measure("off", True)  # CUDA's default: the checkpoint orders its own backward
    # measured 28.1, 22.0, 9.8 and 8.2, each in its own process (with nn.utils.checkpoint, whose recomputed weight gradients
    # MLX left for the end of the backward, checkpointing saved nothing here). Autodiff was at 31.6
    # before relu_squared's own VJP (it no longer keeps relu(h), 4 arrays of C per layer)
    assert recomputing < autodiff - 4, (recomputing, autodiff)
    assert checkpointed < recomputing - 8, (checkpointed, recomputing)
    assert checkpointed_autodiff < autodiff - 15, (checkpointed_autodiff, autodiff)


def test_recompute_pieces_from_the_environment(monkeypatch):
    from mlxchat.gpt import RECOMPUTE_PIECES, recompute_backward
    on = lambda: {p for p in RECOMPUTE_PIECES if recompute_backward(p)}
    monkeypatch.setenv("MLXCHAT_RECOMPUTE", "auto")
    assert on() == set(RECOMPUTE_PIECES)  # every piece on the CPU (and Metal); CUDA takes "mlp" alone
    monkeypatch.setenv("MLXCHAT_RECOMPUTE", "off")
    assert on() == set()
    monkeypatch.setenv("MLXCHAT_RECOMPUTE", " mlp, norm ")
    assert on() == {"mlp", "norm"}
    monkeypatch.setenv("MLXCHAT_RECOMPUTE", "mlp,attention")
    with pytest.raises(AssertionError, match="some of norm, qk, mlp, order"):
        recompute_backward("mlp")
