"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794), as nanochat computes it:
22 in-context-learning tasks scored zero/few-shot by a base model, each accuracy centered on its
random baseline, CORE = the mean of the centered scores.

Three kinds of task (all from the DCLM / llm-foundry eval bundle):
- multiple_choice {"query", "choices", "gold"}: one prompt per choice, "{query}{delim}{choice}";
  the scored span is the tokens after the prefix common to all choices.
- schema {"context_options", "continuation", "gold"}: one prompt per context option,
  "{context_option}{delim}{continuation}"; the scored span is the common suffix.
- language_modeling {"context", "continuation"}: correct iff greedy (argmax) decoding reproduces
  every token of the continuation after the context.
Few-shot examples of item idx: random.Random(1234 + idx).sample(all other items, k), each rendered
with its gold answer and followed by a blank line. MC/schema pick the option with the lowest MEAN
loss over its span (the first one on ties).

Long prompts. nanochat feeds every prompt whole (it only crops for models with a `max_seq_len`
attribute, i.e. HuggingFace models) and would crash on a prompt longer than its rotary table.
Here a prompt is cropped from the LEFT only when it is longer than the model can forward: the
model's `max_seq_len` if it has one, else its rotary table (10x its training sequence length for
mlxchat's GPT). So every score nanochat can compute comes out the same, and nothing crashes.
`max_seq_len=` (base_eval --max-seq-len) crops harder, e.g. to the training context. Cropping
keeps the answer span; if even the span does not fit, its leading tokens are dropped from scoring.

The eval bundle (~162 MB) is downloaded once to {base_dir}/eval_bundle.zip and unzipped to
{base_dir}/eval_bundle/ (core.yaml, eval_meta_data.csv, eval_data/...). MLXCHAT_EVAL_BUNDLE_URL
points the download elsewhere (a mirror, a test server).
"""
import csv
import http.client
import json
import logging
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import mlx.core as mx
from filelock import FileLock

from mlxchat.common import get_base_dir

logger = logging.getLogger(__name__)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Prompt rendering. nanochat renders these with Jinja templates; the same text is built here with
# plain string joins: every few-shot example is followed by a blank line ("\n\n"), and Jinja's
# `trim` filter is str.strip().


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: the few-shot examples with their gold choice, then query + choice."""
    fewshot_examples = fewshot_examples or []
    shots = "".join(f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_examples)
    return [f"{shots}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option, all ending with the same continuation."""
    fewshot_examples = fewshot_examples or []
    shots = "".join(f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}\n\n"
                    for ex in fewshot_examples)
    return [f"{shots}{context}{continuation_delimiter}{item['continuation']}" for context in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """Two prompts: without and with the continuation. Contexts are trimmed (some datasets have
    trailing whitespace), and the prompt without the continuation is stripped too: a trailing space
    would otherwise be a token of its own there but merge into the continuation's first token in the
    full prompt, and the shorter prompt would not be a token prefix of the longer one."""
    fewshot_examples = fewshot_examples or []
    shots = "".join(f"{str(ex['context']).strip()}{continuation_delimiter}{ex['continuation']}\n\n" for ex in fewshot_examples)
    prompt_without = f"{shots}{str(item['context']).strip()}{continuation_delimiter}"
    prompt_with = prompt_without + f"{item['continuation']}"
    return [prompt_without.strip(), prompt_with]


# -----------------------------------------------------------------------------
# Tokenization and the scored spans


def find_common_length(token_sequences, direction="left"):
    """Length of the prefix (direction='left') or suffix ('right') shared by all sequences."""
    min_len = min(len(seq) for seq in token_sequences)
    indices = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for i, idx in enumerate(indices):
        token = token_sequences[0][idx]
        if not all(seq[idx] == token for seq in token_sequences):
            return i
    return min_len


def stack_sequences(tokens, pad_token_id):
    """(B, T) int32 array of the sequences, right-padded to the longest with pad_token_id."""
    bsz, seq_len = len(tokens), max(len(x) for x in tokens)
    input_ids = np.full((bsz, seq_len), pad_token_id, dtype=np.int32)
    for i, x in enumerate(tokens):
        input_ids[i, :len(x)] = x
    return input_ids


def batch_sequences_mc(tokenizer, prompts):
    # the same context with different continuations: the answers start after the common prefix
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    answer_start_idx = find_common_length(tokens, direction="left")
    start_indices = [answer_start_idx] * len(prompts)
    end_indices = [len(x) for x in tokens]
    return tokens, start_indices, end_indices


def batch_sequences_schema(tokenizer, prompts):
    # different contexts with the same continuation: score the common suffix
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix_length = find_common_length(tokens, direction="right")
    end_indices = [len(x) for x in tokens]
    start_indices = [ei - suffix_length for ei in end_indices]
    return tokens, start_indices, end_indices


def batch_sequences_lm(tokenizer, prompts):
    # the prompt without the continuation must be a token prefix of the one with it
    tokens_without, tokens_with = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start_idx, end_idx = len(tokens_without), len(tokens_with)
    assert start_idx < end_idx, "prompt without is supposed to be a prefix of prompt with"
    assert tokens_without == tokens_with[:start_idx], "prompt without is supposed to be a prefix of prompt with"
    # only the full prompt is forwarded: a batch of one
    return [tokens_with], [start_idx], [end_idx]


def crop_sequences(tokens, start_idxs, end_idxs, max_seq_len):
    """Keep the last max_seq_len tokens of longer sequences and shift their spans to match. A span
    always keeps at least one token before it (the position whose logits predict its first token)."""
    assert max_seq_len >= 2, f"max_seq_len must be at least 2, got {max_seq_len}"
    new_tokens, new_starts, new_ends = [], [], []
    for t, s, e in zip(tokens, start_idxs, end_idxs):
        if len(t) > max_seq_len:
            num_to_crop = len(t) - max_seq_len
            t, s, e = t[num_to_crop:], max(1, s - num_to_crop), e - num_to_crop
        new_tokens.append(t)
        new_starts.append(s)
        new_ends.append(e)
    return new_tokens, new_starts, new_ends


def model_max_len(model):
    """The longest sequence `model` can forward: its max_seq_len attribute if it has one, else the
    length of its rotary table (mlxchat's GPT), else None (no limit known)."""
    limit = getattr(model, "max_seq_len", None)
    if limit is None:
        limit = getattr(model, "_rotary_len", None)
    return limit


# -----------------------------------------------------------------------------
# Scoring


def forward_model(model, input_ids):
    """(B, T) token ids -> ((B, T) per-position losses, (B, T) argmax predictions), numpy.
    Position t's loss is the cross entropy of the logits there against token t+1; the last column
    has no target and is NaN."""
    inputs = mx.array(input_ids)
    logits = model(inputs).astype(mx.float32)  # (B, T, V)
    targets = mx.roll(inputs, -1, axis=1)
    losses = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    predictions = mx.argmax(logits, axis=-1)
    mx.eval(losses, predictions)
    losses = np.array(losses, dtype=np.float32)
    losses[:, -1] = np.nan
    return losses, np.array(predictions)


def fewshot_indices(idx, num_items, num_fewshot):
    """Which items are item idx's few-shot examples (never itself)."""
    rng = random.Random(1234 + idx)
    available_indices = [i for i in range(num_items) if i != idx]
    return rng.sample(available_indices, num_fewshot)


def render_example(idx, data, task_meta):
    """The prompts of item idx with its few-shot examples. A task cut to fewer items than it has
    shots (a small max_per_task) uses all the other items as shots (nanochat would crash)."""
    item = data[idx]
    num_fewshot = min(task_meta["num_fewshot"], len(data) - 1)
    fewshot_examples = [data[i] for i in fewshot_indices(idx, len(data), num_fewshot)] if num_fewshot > 0 else []
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}.get(task_meta["task_type"])
    if render is None:
        raise ValueError(f"Unsupported task type: {task_meta['task_type']}")
    return render(item, task_meta["continuation_delimiter"], fewshot_examples)


def evaluate_example(idx, model, tokenizer, data, task_meta, max_seq_len=None):
    """True if the model gets item idx right. max_seq_len: crop longer prompts from the left
    (None: the model's own limit, see model_max_len)."""
    item = data[idx]
    task_type = task_meta["task_type"]
    prompts = render_example(idx, data, task_meta)
    batch = {"multiple_choice": batch_sequences_mc, "schema": batch_sequences_schema,
             "language_modeling": batch_sequences_lm}[task_type]
    tokens, start_idxs, end_idxs = batch(tokenizer, prompts)

    if max_seq_len is None:
        max_seq_len = model_max_len(model)
    if max_seq_len is not None:
        tokens, start_idxs, end_idxs = crop_sequences(tokens, start_idxs, end_idxs, max_seq_len)

    # BOS pads: the padded positions come after every scored one and cannot influence it (causal)
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id())
    losses, predictions = forward_model(model, input_ids)

    if task_type == "language_modeling":
        si, ei = start_idxs[0], end_idxs[0]
        # predictions[t] is the model's guess for input_ids[t + 1]
        predicted_tokens = predictions[0, si - 1:ei - 1]
        actual_tokens = input_ids[0, si:ei]
        return bool(np.all(predicted_tokens == actual_tokens))
    # MC / schema: the option with the lowest mean loss over its span (the first one on ties)
    with np.errstate(invalid="ignore"):
        mean_losses = [float(np.mean(losses[i, si - 1:ei - 1])) if ei > si else float("nan")
                       for i, (si, ei) in enumerate(zip(start_idxs, end_idxs))]
    pred_idx = mean_losses.index(min(mean_losses))
    return pred_idx == item["gold"]


def dist_info():
    """(rank, world_size, group) of a multi-process mlx.launch run; (0, 1, None) otherwise."""
    if os.environ.get("MLX_RANK") is None:
        return 0, 1, None
    try:
        group = mx.distributed.init()
    except Exception:
        return 0, 1, None
    if group.size() <= 1:
        return 0, 1, None
    return group.rank(), group.size(), group


def evaluate_task(model, tokenizer, data, task_meta, max_seq_len=None, progress=False, desc=None):
    """Accuracy of the model on one task's items. Items are strided over the processes of a
    distributed run and the results summed. task_meta: task_type, num_fewshot, continuation_delimiter."""
    rank, world_size, group = dist_info()
    correct = np.zeros(len(data), dtype=np.float32)
    indices = range(rank, len(data), world_size)
    if progress and rank == 0:
        from tqdm import tqdm
        indices = tqdm(indices, desc=desc, leave=False, dynamic_ncols=True)
    for idx in indices:
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, task_meta, max_seq_len))
    if group is not None:
        total = mx.distributed.all_sum(mx.array(correct), group=group)
        correct = np.array(total)
    return float(correct.mean()) if len(data) else float("nan")


def centered_score(accuracy, random_baseline):
    """Accuracy rescaled so that chance is 0 and perfect is 1 (random_baseline in percent)."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


# -----------------------------------------------------------------------------
# The eval bundle


class EvalBundleError(RuntimeError):
    """The eval bundle could not be fetched or read; the message says what to do."""


def eval_bundle_url():
    return os.environ.get("MLXCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL


def _fetch_resumable(url, tmp_path, timeout_s, on_bytes=None):
    """One HTTP attempt: append to tmp_path from its current size (HTTP Range). Raises on failure,
    keeping the bytes that arrived."""
    have = os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0
    headers = {"User-Agent": "mlxchat-core-eval"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # nothing left past our end: keep the file, the zip check decides if it is whole
            return
        raise
    with response:
        if have and response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(tmp_path, mode) as f:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
    size = os.path.getsize(tmp_path)
    if expected is not None and size != expected:
        raise EOFError(f"got {size} of {expected} bytes")


def _download_zip(url, zip_path, max_attempts, backoff_s, timeout_s):
    """Download url to zip_path through zip_path + '.tmp' (resumed across attempts and runs),
    renamed into place once it is a readable zip archive."""
    from tqdm import tqdm
    tmp_path = zip_path + ".tmp"
    error = None
    logger.info(f"Downloading {url} ...")
    for attempt in range(1, max_attempts + 1):
        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="eval_bundle.zip", leave=False,
                   initial=os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0)
        try:
            _fetch_resumable(url, tmp_path, timeout_s, bar.update)
            bar.close()
            if not zipfile.is_zipfile(tmp_path):
                os.remove(tmp_path)  # an error page, or garbage that resuming would only extend
                raise EOFError("the downloaded file is not a zip archive")
            os.replace(tmp_path, zip_path)
            logger.info(f"Downloaded to {zip_path}")
            return
        except urllib.error.HTTPError as e:
            bar.close()
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise EvalBundleError(f"Could not download the eval bundle: {url} answered HTTP {e.code} {e.reason}. "
                                      f"Check MLXCHAT_EVAL_BUNDLE_URL (default {EVAL_BUNDLE_URL}).") from e
            error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError, EOFError) as e:
            bar.close()
            error = e
        if attempt < max_attempts:
            wait = backoff_s * 2 ** (attempt - 1)
            logger.warning(f"eval bundle download attempt {attempt}/{max_attempts} failed ({error}); retrying in {wait:g}s")
            time.sleep(wait)
    raise EvalBundleError(
        f"Could not download the CORE eval bundle from {url} ({error}).\n"
        f"CORE needs it once (~162 MB); it is kept in {os.path.dirname(zip_path)}. Without network access: "
        f"copy eval_bundle.zip to {zip_path} (or its unzipped eval_bundle/ folder next to it) from a machine that "
        f"has it, or point MLXCHAT_EVAL_BUNDLE_URL at a mirror. Running again resumes a partial download. "
        f"(`--eval bpb,sample` evaluates without the bundle.)") from error


def place_eval_bundle(zip_path, bundle_dir):
    """Unzip the bundle beside bundle_dir, then move it into place with one rename."""
    parent = os.path.dirname(bundle_dir)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".eval_bundle.") as tmpdir:
        unzipped = os.path.join(tmpdir, "unzipped")
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(unzipped)
        except zipfile.BadZipFile as e:
            os.remove(zip_path)
            raise EvalBundleError(f"{zip_path} is not a readable zip archive ({e}); it was removed, run again to "
                                  f"download it anew") from e
        # the archive holds an eval_bundle/ folder (or, repacked by hand, its contents)
        extracted = os.path.join(unzipped, "eval_bundle")
        if not os.path.isdir(extracted):
            extracted = unzipped
        if not os.path.exists(os.path.join(extracted, "core.yaml")):
            raise EvalBundleError(f"{zip_path} holds no eval_bundle/core.yaml: not the CORE eval bundle")
        if os.path.isdir(bundle_dir):
            shutil.rmtree(bundle_dir)  # an incomplete earlier copy (it had no core.yaml)
        os.replace(extracted, bundle_dir)
    logger.info(f"Placed eval_bundle directory at {bundle_dir}")


def download_eval_bundle(base_dir=None, url=None, max_attempts=5, backoff_s=2.0, timeout_s=60):
    """{base_dir}/eval_bundle, downloading and unzipping the bundle the first time. A file lock
    makes concurrent processes fetch it once."""
    base_dir = base_dir or get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    if os.path.exists(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    os.makedirs(base_dir, exist_ok=True)
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    with FileLock(zip_path + ".lock"):
        if os.path.exists(os.path.join(bundle_dir, "core.yaml")):  # another process finished meanwhile
            return bundle_dir
        if not os.path.exists(zip_path):
            _download_zip(url or eval_bundle_url(), zip_path, max_attempts, backoff_s, timeout_s)
        place_eval_bundle(zip_path, bundle_dir)
    return bundle_dir


# core.yaml: PyYAML when installed (as nanochat), else a reader for the small YAML subset the file
# uses: a top-level key holding a list of flat mappings whose values are plain, quoted or [flow] scalars.

def _yaml_scalar(text):
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)  # YAML double-quoted escapes (\n, \", \\, \uXXXX) as JSON reads them
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        inner = text[1:-1].strip()
        return [_yaml_scalar(part) for part in _split_flow(inner)] if inner else []
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _split_flow(text):
    # split "a, 'b, c', 3" at top-level commas
    parts, current, quote = [], "", None
    for ch in text:
        if quote:
            current += ch
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            current += ch
        elif ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _strip_comment(line):
    # drop a "# comment" outside quotes (YAML wants whitespace, or nothing, before the #)
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote == '"' and ch == "\\":
            i += 2  # an escaped character, e.g. \" inside a double-quoted string
            continue
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
        i += 1
    return line


def parse_core_yaml(text):
    """core.yaml's text -> dict. Understands top-level keys holding a scalar or a list of flat
    mappings, whose values are plain/quoted scalars, [flow, lists] or block lists of scalars."""
    result, key = {}, None
    # the mapping being read, the column of its "-", the column of its keys, a key awaiting a block list
    current, item_indent, key_indent, pending = None, None, None, None

    def fail(lineno, raw):
        raise ValueError(f"core.yaml line {lineno}: cannot read {raw!r} (this reader knows a small part of "
                         f"YAML; `pip install pyyaml` reads any core.yaml)")

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and not body.startswith("-"):
            k, sep, v = body.partition(":")
            if not sep:
                fail(lineno, raw)
            key = k.strip()
            result[key] = _yaml_scalar(v) if v.strip() else []
            current, item_indent, key_indent, pending = None, None, None, None
            continue
        if key is None or not isinstance(result[key], list):
            fail(lineno, raw)
        if body.startswith("-") and pending is not None and current is not None and indent > item_indent:
            current[pending].append(_yaml_scalar(body[1:]))  # an element of a block list
            continue
        if body.startswith("-"):
            current, item_indent, key_indent, pending = {}, indent, None, None
            result[key].append(current)
            rest = body[1:]
            body = rest.strip()
            if not body:
                continue
            indent = indent + 1 + len(rest) - len(rest.lstrip())  # the column of "key: value" after "- "
        if current is None:
            fail(lineno, raw)
        if key_indent is None:
            key_indent = indent
        elif indent != key_indent:
            fail(lineno, raw)  # nested mappings are beyond this reader
        k, sep, v = body.partition(":")
        if not sep or not k.strip():
            fail(lineno, raw)
        if v.strip():
            current[k.strip()], pending = _yaml_scalar(v), None
        else:
            current[k.strip()], pending = [], k.strip()  # a block list follows (or the value stays empty)
    return result


def load_core_config(bundle_dir):
    """(list of task metas, {label: random baseline in percent}) from core.yaml and eval_meta_data.csv."""
    with open(os.path.join(bundle_dir, "core.yaml"), "r", encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml
        config = yaml.safe_load(text)
    except ImportError:
        config = parse_core_yaml(text)
    tasks = []
    for task in config["icl_tasks"]:
        tasks.append({
            "label": task["label"],
            "task_type": task["icl_task_type"],
            "dataset_uri": task["dataset_uri"],
            "num_fewshot": task["num_fewshot"][0],
            "continuation_delimiter": task.get("continuation_delimiter", " "),
        })
    random_baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "r", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            random_baselines[row["Eval Task"]] = float(row["Random baseline"])
    return tasks, random_baselines


def load_task_data(bundle_dir, task_meta, max_per_task=-1):
    """The task's items, shuffled with a fixed seed (so that max_per_task picks the same subset
    every time), cut to max_per_task when that is > 0."""
    data_path = os.path.join(bundle_dir, "eval_data", task_meta["dataset_uri"])
    with open(data_path, "r", encoding="utf-8") as f:
        data = [json.loads(line.strip()) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    return data


def evaluate_core(model, tokenizer, max_per_task=-1, bundle_dir=None, max_seq_len=None, progress=True):
    """Evaluate a base model on every task of the bundle's core.yaml.
    Returns {"results": {label: accuracy}, "centered_results": {label: centered}, "core_metric": mean}."""
    if bundle_dir is None:
        bundle_dir = download_eval_bundle()
    tasks, random_baselines = load_core_config(bundle_dir)
    results, centered_results = {}, {}
    for task_meta in tasks:
        start_time = time.time()
        label = task_meta["label"]
        data = load_task_data(bundle_dir, task_meta, max_per_task)
        accuracy = evaluate_task(model, tokenizer, data, task_meta, max_seq_len=max_seq_len, progress=progress, desc=label)
        results[label] = accuracy
        if label not in random_baselines:
            raise EvalBundleError(f"{os.path.join(bundle_dir, 'eval_meta_data.csv')} has no random baseline for {label}")
        centered_results[label] = centered_score(accuracy, random_baselines[label])
        elapsed = time.time() - start_time
        logger.info(f"Evaluating: {label} ({task_meta['num_fewshot']}-shot, type: {task_meta['task_type']})... "
                    f"accuracy: {accuracy:.4f} | centered: {centered_results[label]:.4f} | time: {elapsed:.2f}s")
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}
