"""Checkpoints: nanochat .pt files without torch, mlxchat's own format, conversion, bad files."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import mlx.core as mx

from mlxchat.checkpoint_manager import (CheckpointError, build_model, convert_nanochat_checkpoint, find_last_step,
                                        find_steps, load_arrays, load_checkpoint, load_model, load_torch_file,
                                        save_arrays, save_checkpoint)
from mlxchat.gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


def tiny_model():
    return GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))


def test_torch_file_dtypes_and_values(fixture_dir):
    fp32 = load_torch_file(os.path.join(fixture_dir, "checkpoint", "model_000062.pt"))
    bf16 = load_torch_file(os.path.join(fixture_dir, "checkpoint_bf16", "model_000062.pt"))
    assert fp32["transformer.wte.weight"].dtype == mx.float32
    assert bf16["transformer.wte.weight"].dtype == mx.bfloat16
    assert bf16["value_embeds.0.weight"].dtype == mx.bfloat16
    assert bf16["lm_head.weight"].dtype == mx.float32
    # the bf16 file holds the fp32 weights rounded to bf16: rounding again is the identity
    a = fp32["transformer.wte.weight"].astype(mx.bfloat16)
    assert mx.array_equal(a, bf16["transformer.wte.weight"]).item()
    assert mx.array_equal(fp32["lm_head.weight"], bf16["lm_head.weight"]).item()


def test_loading_nanochat_checkpoint_needs_no_torch(fixture_dir, tmp_path):
    # a fresh interpreter where `import torch` is impossible
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import mlxchat\n"
        "from mlxchat.checkpoint_manager import build_model\n"
        f"m, tok, meta = build_model({os.path.join(fixture_dir, 'checkpoint')!r}, 62, load_tokenizer=False)\n"
        "print(meta['step'], m.config.n_layer)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, MLXCHAT_DTYPE="float32"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["62", "3"]


def test_native_round_trip_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "bfloat16")
    model = tiny_model()
    state = model.named_parameters()
    assert state["transformer.wte.weight"].dtype == mx.bfloat16
    ckpt = tmp_path / "base_checkpoints" / "d2"
    opt_state = {"adam": {"lm_head.weight": {"exp_avg": mx.ones((3, 4)), "step": 7}}, "groups": [{"lr": 0.1}]}
    save_checkpoint(str(ckpt), 5, state, opt_state, {"step": 5, "model_config": model.config.to_dict()})
    model_data, optim_data, meta = load_checkpoint(str(ckpt), 5, load_optimizer=True)
    assert set(model_data) == set(state)
    for k, v in state.items():
        assert model_data[k].dtype == v.dtype, k
        assert mx.array_equal(model_data[k], v).item(), k
    assert optim_data["adam"]["lm_head.weight"]["step"] == 7
    assert mx.array_equal(optim_data["adam"]["lm_head.weight"]["exp_avg"], mx.ones((3, 4))).item()
    assert optim_data["groups"] == [{"lr": 0.1}]
    assert meta["step"] == 5
    rebuilt, tok, _ = build_model(str(ckpt), 5, load_tokenizer=False)
    x = mx.array([[1, 2, 3, 4, 5]])
    assert mx.array_equal(rebuilt(x), model(x)).item()


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_incomplete_save_is_not_a_step(tmp_path):
    ckpt = str(tmp_path / "ck")
    model = tiny_model()
    save_checkpoint(ckpt, 10, model.named_parameters(), None, {"step": 10, "model_config": model.config.to_dict()})
    # a save killed after the model file but before its meta: step 20 must not count
    save_arrays(os.path.join(ckpt, "model_000020.safetensors"), model.named_parameters())
    open(os.path.join(ckpt, f"model_000030.safetensors.tmp{dead_pid()}.safetensors"), "wb").write(b"partial")
    assert find_steps(ckpt) == [10]
    assert find_last_step(ckpt) == 10
    # the next save sweeps the temporary leftovers
    save_checkpoint(ckpt, 40, model.named_parameters(), None, {"step": 40, "model_config": model.config.to_dict()})
    assert not [f for f in os.listdir(ckpt) if ".tmp" in f]
    assert find_last_step(ckpt) == 40


def test_sweep_spares_temp_files_of_live_processes(tmp_path):
    # another process saving into the same folder right now (a second run with the same tag, another
    # rank on this machine) must keep its half-written file; only ours and the dead's are swept
    ckpt = str(tmp_path / "ck")
    os.makedirs(ckpt)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"live": f"model_000010.safetensors.tmp{other.pid}.safetensors",
                 "dead": f"optim_000010_rank0.safetensors.tmp{dead_pid()}.safetensors",
                 "ours": f"model_000010.safetensors.tmp{os.getpid()}.safetensors",
                 "meta": ".meta_000010.json.k2j4x9_q.tmp"}  # atomic_write's (mkstemp) name: no pid, never swept
        for name in names.values():
            open(os.path.join(ckpt, name), "wb").write(b"partial")
        model = tiny_model()
        save_checkpoint(ckpt, 20, model.named_parameters(), None, {"step": 20, "model_config": model.config.to_dict()})
        left = set(os.listdir(ckpt))
        assert names["live"] in left and names["meta"] in left
        assert names["dead"] not in left and names["ours"] not in left
        assert find_last_step(ckpt) == 20
    finally:
        other.kill()
        other.wait()


def test_truncated_and_corrupt_files_name_the_file(fixture_dir, tmp_path):
    src = os.path.join(fixture_dir, "checkpoint", "model_000062.pt")
    data = open(src, "rb").read()
    trunc = tmp_path / "model_000062.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model_000062.pt"):
        load_torch_file(str(trunc))
    # a zip whose tensor payload is corrupted (CRC mismatch)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
    raw = bytearray(bad.read_bytes())
    pos = raw.find(b"data.pkl") + 200
    raw[pos:pos + 64] = b"\x00" * 64
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_torch_file(str(bad))
    # our own format
    model = tiny_model()
    st = tmp_path / "m.safetensors"
    save_arrays(str(st), model.named_parameters())
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_arrays(str(st))


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_torch_file(str(path))


def test_legacy_checkpoint_fixes(fixture_dir, tmp_path, expected):
    # an old-style nanochat dir: torch.compile prefixes, no window_pattern, no lambdas in the state
    import pickle
    sd = load_torch_file(os.path.join(fixture_dir, "checkpoint", "model_000062.pt"))
    d = tmp_path / "old"
    d.mkdir()
    state = {("_orig_mod." + k): v for k, v in sd.items() if k not in ("resid_lambdas", "x0_lambdas")}
    save_arrays(str(d / "model_000001.safetensors"), state)
    meta = json.load(open(os.path.join(fixture_dir, "checkpoint", "meta_000062.json")))
    del meta["model_config"]["window_pattern"]
    (d / "meta_000001.json").write_text(json.dumps(meta))
    model, _, _ = build_model(str(d), 1, load_tokenizer=False)
    assert model.config.window_pattern == "L"
    assert np.all(np.array(model.resid_lambdas) == 1) and np.all(np.array(model.x0_lambdas) == 0)


def test_convert_nanochat_directory(fixture_dir, tmp_path, expected, monkeypatch):
    src = tmp_path / "nano" / "d3"
    src.mkdir(parents=True)
    for f in ("model_000062.pt", "meta_000062.json"):
        shutil.copy(os.path.join(fixture_dir, "checkpoint_bf16", f), src / f)
    tok = os.path.join(fixture_dir, "tokenizer")
    base = tmp_path / "base"
    out = subprocess.run([sys.executable, "-m", "scripts.convert_nanochat", "--checkpoint-dir", str(src),
                          "--tokenizer-dir", tok, "--source", "base"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, MLXCHAT_BASE_DIR=str(base), MLXCHAT_DTYPE="float32"))
    assert out.returncode == 0, out.stderr
    conv = base / "base_checkpoints" / "d3"
    state = load_arrays(str(conv / "model_000062.safetensors"))
    assert state["transformer.wte.weight"].dtype == mx.bfloat16  # dtypes kept as stored
    assert (conv / "tokenizer.pkl").exists()
    # and it loads through the normal path (largest tag, last step), tokenizer included
    monkeypatch.setenv("MLXCHAT_BASE_DIR", str(base))
    model, tokenizer, meta = load_model("base")
    assert meta["step"] == 62
    assert tokenizer is not None and tokenizer.get_vocab_size() == 512
    logits = model(mx.array(expected["idx"]))
    err = np.abs(np.array(logits) - expected["trained_bf16_logits"]).max() / np.abs(expected["trained_bf16_logits"]).max()
    assert err < 1e-4


def test_resynchronizing_drifted_ranks_is_a_warning(tmp_path, monkeypatch, caplog):
    # rank 0 of a two-rank run whose ranks disagree: the weights are resynchronized and the library
    # says so as a warning of mlxchat.checkpoint_manager (not a print)
    import logging
    from mlxchat import checkpoint_manager as cm
    monkeypatch.setattr(cm, "get_dist_info", lambda: (0, 2, None))
    monkeypatch.setattr(cm, "ranks_disagree", lambda tree, label=None: True)
    broadcasts = []
    monkeypatch.setattr(cm, "broadcast_tree", lambda tree, label=None: broadcasts.append(label) or tree)
    monkeypatch.setattr(cm, "barrier", lambda label=None: None)
    model = tiny_model()
    optimizer = model.setup_optimizer()
    with caplog.at_level(logging.WARNING, logger="mlxchat"):
        cm.save_training_checkpoint(str(tmp_path), 3, model, optimizer, {"step": 3})
    warnings = [r for r in caplog.records if r.name == "mlxchat.checkpoint_manager" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("step 00003: the ranks' weights had drifted apart")
    assert len(broadcasts) == 2 and find_last_step(str(tmp_path)) == 3
