"""
Base class for all Tasks, plus the tiny hub-dataset loader they share.
A Task is a dataset of conversations, together with some metadata and often
also evaluation criteria.
Example tasks: MMLU, ARC-Easy, ARC-Challenge, GSM8K, HumanEval, SmolTalk.

Task data comes from the HuggingFace hub's auto-converted parquet export (the same
files `datasets.load_dataset` would use), downloaded once into
{base_dir}/task_data/<org--name>/<subset>/<split>/ and read with pyarrow, exactly like
nanochat since it dropped the `datasets` dependency.
"""

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from mlxchat.common import get_base_dir

logger = logging.getLogger(__name__)

# The hub that serves the parquet listings. MLXCHAT_HUB_URL (or HF_ENDPOINT, the variable
# huggingface_hub uses for mirrors) points it elsewhere, e.g. a mirror or a test server.
DEFAULT_HUB_URL = "https://huggingface.co"
# Downloads are retried with exponential backoff: waits of 1, 2, 4, 8 s between 5 attempts.
DOWNLOAD_ATTEMPTS = 5
BACKOFF_SECONDS = 1.0


def hub_url():
    return (os.environ.get("MLXCHAT_HUB_URL") or os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_URL).rstrip("/")


def parquet_listing_url(repo_id, subset, split):
    """The hub API endpoint that returns a JSON list of the parquet shard URLs of one split."""
    return f"{hub_url()}/api/datasets/{repo_id}/parquet/{subset}/{split}"


def task_data_dir(repo_id, subset, split, base_dir=None):
    """Where the shards of one split live: {base_dir}/task_data/org--name/subset/split (nanochat's layout);
    base_dir defaults to get_base_dir()."""
    slug = repo_id.replace("/", "--")
    return os.path.join(base_dir or get_base_dir(), "task_data", slug, subset, split)


class HubDataset:
    """
    Minimal stand-in for a HuggingFace datasets.Dataset: wraps a pyarrow Table
    and offers lazy row access (rows come back as plain python dicts) and a seeded shuffle.
    """

    def __init__(self, table, permutation=None):
        self.table = table
        self.permutation = permutation

    @property
    def column_names(self):
        return self.table.column_names

    def __len__(self):
        return self.table.num_rows

    def shuffle(self, seed):
        # datasets.Dataset.shuffle(seed=seed) draws exactly this permutation, so the row
        # order (and hence every "first N problems" eval) matches the HF-datasets era
        permutation = np.random.default_rng(seed).permutation(len(self))
        return HubDataset(self.table, permutation)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a dataset of {len(self)} rows")
        physical_index = index if self.permutation is None else int(self.permutation[index])
        return {column: self.table[column][physical_index].as_py() for column in self.table.column_names}


def _fetch(url, what):
    """GET url and return the body, retrying transient failures (network errors, 429, 5xx) with backoff."""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            # a 4xx other than 429 will not get better by asking again (wrong repo/subset/split)
            if e.code != 429 and e.code < 500:
                raise
            error = e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, DNS, timeouts, truncated reads
            error = e
        if attempt + 1 < DOWNLOAD_ATTEMPTS:
            wait = BACKOFF_SECONDS * 2 ** attempt
            print(f"Downloading {what} failed ({error}); retrying in {wait:g}s ({attempt + 1}/{DOWNLOAD_ATTEMPTS})", flush=True)
            time.sleep(wait)
    raise error


def _download_split(repo_id, subset, split, shards_dir, manifest_path):
    listing_url = parquet_listing_url(repo_id, subset, split)
    shard_urls = json.loads(_fetch(listing_url, f"the parquet listing of {repo_id}"))
    if not isinstance(shard_urls, list) or not shard_urls or not all(isinstance(u, str) for u in shard_urls):
        raise RuntimeError(f"{listing_url} returned {str(shard_urls)[:200]!r}, expected a non-empty JSON list of parquet URLs")
    filenames = []
    for shard_index, shard_url in enumerate(shard_urls):
        filename = f"{shard_index:05d}.parquet"
        path = os.path.join(shards_dir, filename)
        # shards only ever appear under their final name complete (temp file + rename), so one
        # left by an interrupted earlier download can be kept
        if not os.path.exists(path):
            print(f"Downloading {shard_url} ...", flush=True)
            content = _fetch(shard_url, shard_url)
            tmp_path = path + ".tmp"
            with open(tmp_path, "wb") as f:
                f.write(content)
            os.replace(tmp_path, path)
        filenames.append(filename)
    # the manifest goes last: its existence means every shard is on disk
    tmp_path = manifest_path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(filenames, f)
    os.replace(tmp_path, manifest_path)


def load_hub_dataset(repo_id, subset="default", split="train"):
    """
    Minimal stand-in for HuggingFace datasets.load_dataset(repo_id, subset, split=split).
    Every dataset on the hub has an auto-generated parquet export. We list its shards via the
    hub API, download them (once) into the task_data cache and read them with pyarrow.
    Once manifest.json exists the network is never touched again. The file lock makes
    concurrent processes (e.g. distributed ranks) download once while the others wait.
    """
    shards_dir = task_data_dir(repo_id, subset, split)
    manifest_path = os.path.join(shards_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        os.makedirs(shards_dir, exist_ok=True)
        with FileLock(manifest_path + ".lock"):
            # whoever waited on the lock rechecks: the holder may have finished the download
            if not os.path.exists(manifest_path):
                try:
                    _download_split(repo_id, subset, split, shards_dir, manifest_path)
                except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                    if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                        raise RuntimeError(
                            f"The hub has no parquet export for {repo_id} subset {subset!r} split {split!r} "
                            f"({e.url}: HTTP 404). Check the dataset name, subset and split."
                        ) from e
                    raise RuntimeError(
                        f"Could not download the task dataset {repo_id} (subset {subset!r}, split {split!r}) "
                        f"from {parquet_listing_url(repo_id, subset, split)}: {e}\n"
                        f"It is downloaded once into {shards_dir} and read from there afterwards. Fix: rerun "
                        f"with internet access, or copy a filled task_data/ directory from another machine into "
                        f"{get_base_dir()} (set MLXCHAT_BASE_DIR to use another base dir; MLXCHAT_HUB_URL "
                        f"to use a hub mirror)."
                    ) from e
    with open(manifest_path, "r") as f:
        filenames = json.load(f)
    tables = [pq.read_table(os.path.join(shards_dir, filename)) for filename in filenames]
    return HubDataset(pa.concat_tables(tables))


def download_file_with_lock(url, filename):
    """Download url once into {base_dir}/filename (temp file + rename, under a file lock); return its path."""
    path = os.path.join(get_base_dir(), filename)
    if not os.path.exists(path):
        with FileLock(path + ".lock"):
            if not os.path.exists(path):
                print(f"Downloading {url} ...", flush=True)
                content = _fetch(url, url)
                with open(path + ".tmp", "wb") as f:
                    f.write(content)
                os.replace(path + ".tmp", path)
    return path


class Task:
    """
    Base class of a Task. Allows for lightweight slicing of the underlying dataset:
    Task(start, stop, step) is the logical view dataset[start:stop:step].
    """

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"Start must be non-negative, got {start}"
        assert stop is None or stop >= start, f"Stop should be greater than or equal to start, got {stop} and {start}"
        assert step >= 1, f"Step must be strictly positive, got {step}"
        self.start = start
        self.stop = stop  # None = to the end
        self.step = step

    @property
    def eval_type(self):
        # one of 'generative' | 'categorical'
        raise NotImplementedError

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        num_ex = self.num_examples()
        stop = num_ex if self.stop is None else self.stop
        if stop > num_ex:
            # e.g. the SFT val mixture asks for MMLU[:5200]; a smaller dataset (a test cache)
            # just ends early, as nanochat's earlier Task did (warn once, not on every access)
            if not getattr(self, "_warned_stop", False):
                logger.warning(f"stop={stop} exceeds the dataset size ({num_ex}) of {type(self).__name__}; using {num_ex}")
                self._warned_stop = True
            stop = num_ex
        span = stop - self.start
        num = (span + self.step - 1) // self.step  # ceil_div(span, step)
        assert num >= 0, f"start={self.start} lies beyond the end of {type(self).__name__} ({num_ex} examples)"
        return num

    def __getitem__(self, index):
        assert isinstance(index, (int, np.integer)), f"Index must be an integer, got {type(index)}"
        index = int(index)
        # IndexError (not a silent read past the slice) also makes `for conversation in task` work
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        physical_index = self.start + index * self.step
        return self.get_example(physical_index)

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError

    def reward(self, conversation, assistant_response):
        # RL reward: 0/1 correctness by default
        return float(self.evaluate(conversation, assistant_response))


class TaskMixture(Task):
    """
    For SFT training it is useful to train on a mixture of datasets.
    Fun trick: to oversample a task, just pass it in multiple times in the list.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in self.tasks]
        self.num_conversations = sum(self.lengths)
        # all (task_idx, local_idx) pairs, deterministically shuffled so the tasks are mixed
        # throughout training regardless of their sizes (same order as nanochat for the same lengths)
        self.index_map = [(task_idx, local_idx) for task_idx, length in enumerate(self.lengths) for local_idx in range(length)]
        rng = random.Random(42)
        rng.shuffle(self.index_map)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        assert 0 <= index < self.num_conversations, f"Index {index} out of range for mixture with {self.num_conversations} conversations"
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskSequence(Task):
    """
    The tasks one after another (no shuffling): for curricula.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in self.tasks]
        self.num_conversations = sum(self.lengths)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        assert 0 <= index < self.num_conversations, f"Index {index} out of range for sequence with {self.num_conversations} conversations"
        for task_idx, task_length in enumerate(self.lengths):
            if index < task_length:
                return self.tasks[task_idx][index]
            index -= task_length


def render_mc(question, letters, choices):
    """
    The common multiple choice rendering format.

    Two deliberate details (from nanochat):
    1) the letter comes *after* the choice: small models bind the letter to the choice better that way.
    2) no whitespace between '=' and the letter: the tokenizer has different ids for " A" and "A",
       and the assistant answers with the bare letter "A", so the prompt must contain that same token.
    """
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def mc_conversation(question, letters, choices, answer_letter, **extra):
    """
    A multiple choice problem (ARC, MMLU) as a conversation: the user asks it in render_mc's format,
    the assistant answers with the bare letter. `letters` rides along because the categorical eval
    clamps the model's prediction to them; `extra` adds task-specific fields (e.g. MMLU's subject).
    """
    messages = [
        {"role": "user", "content": render_mc(question, letters, choices)},
        {"role": "assistant", "content": answer_letter},
    ]
    return {"messages": messages, **extra, "letters": letters}


def evaluate_mc(conversation, assistant_response):
    """Whether a categorical prediction (always one of the conversation's letters) is the gold letter."""
    # categorical eval only ever picks one of the letters, so anything else is a bug upstream
    letters = conversation["letters"]
    assert assistant_response in letters, f"answer {assistant_response} is expected to be one of {letters}"
    return assistant_response == conversation["messages"][-1]["content"]
