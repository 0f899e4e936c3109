"""
Quantized inference: 8-bit close to fp32, 4-bit usable, the layers really quantized.
"""
import os

import numpy as np
import pytest
import mlx.core as mx
import mlx.nn as nn

from mlxchat.checkpoint_manager import load_torch_file
from mlxchat.engine import Engine
from mlxchat.gpt import GPT, GPTConfig, Linear
from mlxchat.quantize import cast_linear_weights, matmul_weight_bytes, quantize_model


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


def load(fixture_dir, cases):
    model = GPT(GPTConfig(**cases["config"]))
    model.load_state_dict(load_torch_file(os.path.join(fixture_dir, "checkpoint/model_000062.pt")))
    return model


def compare(logits, ref):
    """(relative max error, mean KL(ref || quantized), top-1 agreement)."""
    logits, ref = np.asarray(logits, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    logp = lambda x: x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lr, lq = logp(ref), logp(logits)
    kl = float((np.exp(lr) * (lr - lq)).sum(-1).mean())
    return float(np.abs(logits - ref).max() / np.abs(ref).max()), kl, float((logits.argmax(-1) == ref.argmax(-1)).mean())


def test_8bit_close_and_4bit_usable(fixture_dir, cases, expected):
    idx = mx.array(expected["idx"])
    ref_model = load(fixture_dir, cases)
    ref = np.array(ref_model(idx))
    fp32_bytes = matmul_weight_bytes(ref_model)

    q8 = quantize_model(load(fixture_dir, cases), 8)
    err, kl, agree = compare(q8(idx), ref)
    # measured: rel max 2.6e-3, KL 9e-6 nats, top-1 agreement 99.4% (fixture model, 1024 positions)
    assert err < 1e-2 and kl < 1e-4 and agree > 0.98, (err, kl, agree)

    q4 = quantize_model(load(fixture_dir, cases), 4)
    logits4 = np.array(q4(idx))
    assert np.isfinite(logits4).all()
    err, kl, agree = compare(logits4, ref)
    # measured: rel max 4.9e-2, KL 2.8e-3 nats, top-1 agreement 94.3%
    assert err < 0.1 and kl < 1e-2 and agree > 0.85, (err, kl, agree)

    # the matrices really are packed: 8-bit ~ 1/4 of fp32 plus scales, 4-bit ~ 1/8
    assert matmul_weight_bytes(q8) < 0.3 * fp32_bytes
    assert matmul_weight_bytes(q4) < 0.17 * fp32_bytes


def test_which_layers_are_quantized(fixture_dir, cases):
    model = quantize_model(load(fixture_dir, cases), 4, group_size=64)
    a, mlp = model.transformer["h"][0].attn, model.transformer["h"][0].mlp
    for layer in (a.c_q, a.c_k, a.c_v, a.c_proj, mlp.c_fc, mlp.c_proj, model.lm_head):
        assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 4 and layer.group_size == 64
        assert layer.weight.dtype == mx.uint32  # 8 four-bit values per word
        assert layer.weight.shape[1] * 8 == layer.scales.shape[1] * 64
    # input dims 24 and 12 do not split into groups of 64: left as they are
    assert type(model.smear_gate) is Linear
    assert type(model.transformer["h"][-1].attn.ve_gate) is Linear
    # embeddings only on request
    assert type(model.transformer["wte"]) is nn.Embedding
    model = quantize_model(load(fixture_dir, cases), 8, embeddings=True)
    assert isinstance(model.transformer["wte"], nn.QuantizedEmbedding)
    assert all(isinstance(ve, nn.QuantizedEmbedding) for ve in model.value_embeds.values())


def test_quantized_model_generates_compiled_and_eager(fixture_dir, cases, expected):
    class Tok:  # the stop/tool specials: ids the model never emits
        def encode_special(self, text):
            return -1

        def get_bos_token_id(self):
            return -1
    model = quantize_model(load(fixture_dir, cases), 4)
    prompt = expected["gen_prompt"].tolist()
    a, _ = Engine(model, Tok(), compile=True).generate_batch(prompt, num_samples=2, max_tokens=16, temperature=0.0)
    b, _ = Engine(model, Tok(), compile=False).generate_batch(prompt, num_samples=2, max_tokens=16, temperature=0.0)
    assert a == b and len(a[0]) == len(prompt) + 16


def test_bf16_scales_and_cast_weights_keep_outputs(fixture_dir, cases, expected, monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "bfloat16")
    idx = mx.array(expected["idx"][:1, :32])
    model = load(fixture_dir, cases)
    ref = np.array(model(idx))
    # storing the weights in bf16 once gives exactly what casting them at every call gives
    cast_linear_weights(model)
    assert model.lm_head.weight.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(model(idx)), ref)
    quantize_model(model, 8)
    # scales in the activation dtype, so the quantized matmuls keep the stream in bf16
    assert model.lm_head.scales.dtype == mx.bfloat16 and model.lm_head.biases.dtype == mx.bfloat16
    logits = model(idx)
    assert logits.dtype == mx.float32 and np.isfinite(np.array(logits)).all()


def test_quantize_eval_reports_bits_per_byte(fixture_dir, tmp_path, capsys):
    import shutil
    from scripts import infer_bench
    for name in ("checkpoint/model_000062.pt", "checkpoint/meta_000062.json", "tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt"):
        shutil.copy(os.path.join(fixture_dir, name), tmp_path)
    result = infer_bench.main(["--quantize-eval", "--checkpoint-dir", str(tmp_path), "--data-dir", os.path.join(fixture_dir, "base_data"),
                               "--eval-steps", "2", "--eval-batch-size", "4", "--eval-seq-len", "128"])
    assert 1.0 < result["val_bpb"] < 4.0  # the fixture model's val bpb is ~2.5
    assert abs(result["delta_q8"]) < 0.005 and abs(result["delta_q4"]) < 0.05
    assert result["val_bpb_q4"] != result["val_bpb"]  # really evaluated a different model
    assert "8-bit" in capsys.readouterr().out


def test_infer_bench_smoke(capsys):
    import json
    from scripts import infer_bench
    card = infer_bench.main(["--depth", "1", "--prompt-tokens", "24", "--decode-tokens", "4", "--batch-sizes", "1,3",
                             "--repeats", "1", "--quantize", "8"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(card))  # the last line is the whole card
    runs = card["eager"]["batches"]  # the CPU default
    assert [r["batch_size"] for r in runs] == [1, 3]
    assert all(r["tok_per_s"] > 0 and r["tpot_s"] > 0 and r["peak_memory_bytes"] > 0 for r in runs)
    assert card["quantize_bits"] == 8 and card["matmul_weight_bytes"] < 0.3 * 4 * GPTConfig.from_depth(1).num_matmul_params()
