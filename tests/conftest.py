"""
Shared test helpers. The parity fixture (reference outputs from PyTorch nanochat) lives in
../shared/parity/fixture-a beside the checkout, or wherever MLXCHAT_PARITY_DIR points.
Outside CI a missing fixture skips the parity tests with a reason; in CI (CI=true) it is a failure.
"""
import json
import os
import random
import shutil
import socket

# fp32 parity tolerances assume true fp32 matmuls; MLX's CUDA backend uses TF32 by default
# (training keeps that default, as nanochat keeps torch's "high" matmul precision)
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx is imported)
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_DIR = os.environ.get("MLXCHAT_PARITY_DIR") or os.path.join(ROOT, "..", "shared", "parity")
FIXTURE_A = os.path.join(PARITY_DIR, "fixture-a")
IN_CI = os.environ.get("CI", "").lower() == "true"


def free_port_pair():
    """A base port p with p and p+1 free on 127.0.0.1 (MLX's ring backend listens on one port per rank)."""
    for _ in range(100):
        p = random.randint(20000, 60000)
        socks = []
        try:
            for q in (p, p + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair")


def pytest_sessionstart(session):
    if IN_CI and not os.path.isdir(FIXTURE_A):
        raise pytest.UsageError(f"CI=true but the parity fixture is missing at {FIXTURE_A}: parity tests must not skip in CI")


@pytest.fixture(scope="session")
def fixture_dir():
    if not os.path.isdir(FIXTURE_A):
        if IN_CI:
            pytest.fail(f"parity fixture missing at {FIXTURE_A} (CI must run parity tests)")
        pytest.skip(f"parity fixture not found at {FIXTURE_A} (set MLXCHAT_PARITY_DIR)")
    return FIXTURE_A


@pytest.fixture(scope="session")
def expected(fixture_dir):
    return np.load(os.path.join(fixture_dir, "expected.npz"))


@pytest.fixture(scope="session")
def cases(fixture_dir):
    with open(os.path.join(fixture_dir, "cases.json")) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _isolated_base_dir(tmp_path, monkeypatch):
    # every test gets its own base dir: nothing touches ~/.cache/mlxchat
    monkeypatch.setenv("MLXCHAT_BASE_DIR", str(tmp_path / "base"))


@pytest.fixture
def base(fixture_dir):
    """A base dir with the fixture's tokenizer; returns the fixture's shards folder."""
    from mlxchat.common import get_base_dir
    shutil.copytree(os.path.join(fixture_dir, "tokenizer"), os.path.join(get_base_dir(), "tokenizer"))
    return os.path.join(fixture_dir, "base_data")


def install_base(fixture_dir, base, tag="fx", meta_extra=None, source="base_checkpoints"):
    """The parity fixture's model as checkpoint <base>/<source>/<tag> (step 62, its meta with meta_extra),
    and its tokenizer in <base>/tokenizer unless one is there. Returns the checkpoint folder."""
    ckpt = os.path.join(base, source, tag)
    os.makedirs(ckpt)
    shutil.copy(os.path.join(fixture_dir, "checkpoint", "model_000062.pt"), ckpt)
    with open(os.path.join(fixture_dir, "checkpoint", "meta_000062.json")) as f:
        meta = json.load(f)
    meta.update(meta_extra or {})
    with open(os.path.join(ckpt, "meta_000062.json"), "w") as f:
        json.dump(meta, f)
    if not os.path.exists(os.path.join(base, "tokenizer")):
        shutil.copytree(os.path.join(fixture_dir, "tokenizer"), os.path.join(base, "tokenizer"))
    return ckpt


@pytest.fixture
def anyio_backend():
    return "asyncio"
