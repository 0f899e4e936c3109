"""
Pretraining data: where the parquet shards live, how to download nanochat's ClimbMix shards, and
how to turn your own text into shards of the same layout.

Layout (the same as nanochat's): a folder of `shard_00000.parquet, shard_00001.parquet, ...`,
each with one string column `text` (one document per row) in row groups of 1024 documents,
zstd-compressed. Sorted by name, the LAST file is the validation split; all others are train.

    python -m mlxchat.dataset -n 8                        # ClimbMix shards 0..7 + the val shard
    python -m mlxchat.dataset import ~/notes --out ~/mytext  # your .txt/.md/.jsonl/.parquet files

Which folder the loaders read (first that is set):
    the data_dir argument / --data-dir flag  >  $MLXCHAT_DATA_DIR  >  {base_dir}/base_data_climbmix
The value "demo" names the small State of the Union corpus shipped in mlxchat/data/demo_corpus,
so `--data-dir demo` (or MLXCHAT_DATA_DIR=demo) trains a tokenizer or a model with no download.
"""
import argparse
import http.client
import json
import os
import random
import re
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from tqdm import tqdm

from mlxchat.common import atomic_write, get_base_dir, logger

# -----------------------------------------------------------------------------
# The pretraining dataset: ClimbMix-400B, shuffled and repackaged by Karpathy into 6543 shards of
# ~250M characters (~100 MB) each. The last one (shard_06542) is the validation shard.

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542
DATA_DIR_NAME = "base_data_climbmix"
LEGACY_DATA_DIR_NAME = "base_data"  # nanochat's FineWeb-EDU era folder, still read with a warning
DEMO_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_corpus")

ROW_GROUP_SIZE = 1024  # documents per row group, as in nanochat's shards
SHARD_CHARS = 250_000_000  # a shard closes once it holds this many characters (and whole row groups)


def index_to_filename(index):
    return f"shard_{index:05d}.parquet"


def resolve_data_dir(data_dir=None):
    """The folder of parquet shards: data_dir, else $MLXCHAT_DATA_DIR, else {base}/base_data_climbmix.
    "demo" means the demo corpus shipped with mlxchat."""
    choice = data_dir or os.environ.get("MLXCHAT_DATA_DIR") or ""
    if choice == "demo":
        return DEMO_DATA_DIR
    if choice:
        return os.path.abspath(os.path.expanduser(choice))
    base = get_base_dir()
    default = os.path.join(base, DATA_DIR_NAME)
    legacy = os.path.join(base, LEGACY_DATA_DIR_NAME)
    if not os.path.isdir(default) and os.path.isdir(legacy):
        logger.warning(f"{default} does not exist; using the legacy folder {legacy} (FineWeb-EDU shards). "
                       f"Run `python -m mlxchat.dataset -n 8` to get the ClimbMix shards nanochat uses now.")
        return legacy
    return default


def list_parquet_files(data_dir=None):
    """Full paths of the shards in the data folder, sorted by name (the last one is val)."""
    data_dir = resolve_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def split_parquet_files(split, data_dir=None):
    """The shard paths of one split: train = all but the last file, val = the last file."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    paths = list_parquet_files(data_dir)
    folder = resolve_data_dir(data_dir)
    if not paths:
        raise FileNotFoundError(
            f"no parquet shards in {folder}. Download some with `python -m mlxchat.dataset -n 8`, "
            f"use the bundled demo corpus with --data-dir demo (or MLXCHAT_DATA_DIR=demo), or import your own "
            f"text with `python -m mlxchat.dataset import PATH --out DIR` and pass --data-dir DIR.")
    if split == "train" and len(paths) < 2:
        raise FileNotFoundError(
            f"{folder} holds a single shard ({os.path.basename(paths[0])}), and the last shard is always the "
            f"val split, so there is nothing to train on. Download more shards (`python -m mlxchat.dataset -n 8`) "
            f"or re-import your text so it makes at least two shards.")
    return paths[:-1] if split == "train" else paths[-1:]


class DataError(ValueError):
    """A shard in the data folder that cannot be read; the message names the file and what to do."""


def _shard_fix(path):
    # a downloaded shard comes back with `-n` past its index (shards already there are skipped);
    # the val shard (the last index) comes with any -n
    m = re.fullmatch(r"shard_(\d+)\.parquet", os.path.basename(path))
    n = int(m.group(1)) + 1 if m and int(m.group(1)) < MAX_SHARD else 1
    return (f"Delete it and download it again with `python -m mlxchat.dataset -n {n} --data-dir "
            f"{shlex.quote(os.path.dirname(os.path.abspath(path)))}`, or, if the folder holds your own text, "
            f"re-import that with `python -m mlxchat.dataset import PATH --out DIR` (into an empty folder).")


def open_shard(path):
    """The pq.ParquetFile of one shard, or a DataError naming the file when it is not a readable
    parquet file with a 'text' column (a truncated download, a file copied in by mistake)."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}). {_shard_fix(path)}") from e
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{path}: parquet file has no 'text' column (columns: {', '.join(names) or 'none'}), so it "
                        f"is not a pretraining shard. {_shard_fix(path)}")
    return pf


def read_shard_texts(pf, path, rg_idx):
    """The `text` list of row group rg_idx of an open shard (pf = open_shard(path)); a DataError
    naming the file if that row group cannot be read."""
    try:
        return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: row group {rg_idx} is unreadable ({e}); the file is corrupt. {_shard_fix(path)}") from e


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the `text` list of each row group of the split's shards, in order. start/step select
    row groups within each file (rank, world_size when several processes share the work).
    A shard that cannot be read raises DataError."""
    for path in split_parquet_files(split, data_dir):
        pf = open_shard(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield read_shard_texts(pf, path, rg_idx)


def write_shard(docs, path, row_group_size=ROW_GROUP_SIZE, compression_level=3):
    """Write documents as one shard in nanochat's layout, atomically (a crash never leaves half a shard)."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    atomic_write(path, lambda f: pq.write_table(
        table, f, row_group_size=row_group_size, use_dictionary=False, compression="zstd",
        compression_level=compression_level, write_statistics=False))


# -----------------------------------------------------------------------------
# Downloading shards
#
# Each shard goes to `shard_XXXXX.parquet.tmp` and is renamed when complete, so a shard under its
# final name is always whole. An interrupted download leaves the .tmp behind; the next attempt (or
# the next run) asks the server only for the missing bytes (HTTP Range). A lock file per shard stops
# two processes (say, two training runs started at once) from fetching the same shard.

class DownloadError(RuntimeError):
    pass


def _content_range_total(value):
    # "bytes 100-199/200" or "bytes */200" -> 200 (None when the total is unknown)
    try:
        total = value.rsplit("/", 1)[1]
        return None if total == "*" else int(total)
    except (AttributeError, IndexError, ValueError):
        return None


def _fetch(url, tmp_path, timeout_s, on_bytes):
    """One HTTP attempt: continue tmp_path from its current size. Raises on any failure, leaving
    whatever arrived in tmp_path for the next attempt."""
    have = os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0
    headers = {"User-Agent": "mlxchat-dataset"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # nothing past our end: either the partial file is already whole, or it is bogus
            if _content_range_total(e.headers.get("Content-Range")) == have:
                return
            os.remove(tmp_path)
            raise DownloadError(f"server refused to resume at byte {have}; starting over") from e
        raise
    with resp:
        if have and resp.status == 206:
            start = resp.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
            if start != str(have):
                os.remove(tmp_path)
                raise DownloadError(f"server resumed at byte {start} instead of {have}; starting over")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # a plain 200: the server sends the whole file, so start over
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(tmp_path, mode) as f:
            while True:
                chunk = resp.read(1 << 20)  # http.client raises IncompleteRead if the connection drops
                if not chunk:
                    break
                f.write(chunk)
                on_bytes(len(chunk))
    size = os.path.getsize(tmp_path)
    if expected is not None and size != expected:
        raise DownloadError(f"got {size} of {expected} bytes")


def _check_parquet(path):
    # a whole parquet file starts and ends with the magic bytes PAR1; a cheap guard against a
    # server that returned an HTML error page or a truncated body without a Content-Length
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 4))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DownloadError("the downloaded bytes are not a parquet file")


def download_single_file(index, data_dir=None, base_url=None, max_attempts=5, backoff_s=2.0,
                         timeout_s=30, on_bytes=None):
    """Download shard `index` into the data folder. True on success (or if it is already there),
    False after max_attempts failures (the partial .tmp stays, and the next call resumes it)."""
    data_dir = resolve_data_dir(data_dir)
    if data_dir == DEMO_DATA_DIR:
        raise ValueError("the demo corpus ships with mlxchat and is not downloaded; drop --data-dir demo / "
                         "MLXCHAT_DATA_DIR=demo to download ClimbMix shards")
    base_url = base_url or os.environ.get("MLXCHAT_DATA_URL") or BASE_URL
    on_bytes = on_bytes or (lambda n: None)
    filename = index_to_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        return True
    os.makedirs(data_dir, exist_ok=True)
    url = f"{base_url.rstrip('/')}/{filename}"
    tmp_path = path + ".tmp"
    with FileLock(path + ".lock"):
        if os.path.exists(path):  # another process finished it while we waited for the lock
            return True
        for attempt in range(1, max_attempts + 1):
            try:
                _fetch(url, tmp_path, timeout_s, on_bytes)
                try:
                    _check_parquet(tmp_path)
                except DownloadError:
                    os.remove(tmp_path)  # resuming garbage would only make more garbage
                    raise
                os.replace(tmp_path, path)
                return True
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    logger.error(f"{url}: HTTP {e.code} {e.reason}; not retrying (does shard {index} exist?)")
                    return False
                err = e
            except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as e:
                err = e
            if attempt < max_attempts:
                wait = backoff_s * 2 ** (attempt - 1)
                logger.warning(f"{filename}: attempt {attempt}/{max_attempts} failed ({err}); retrying in {wait:g}s")
                time.sleep(wait)
        logger.error(f"{filename}: failed after {max_attempts} attempts ({err}); run the command again to resume")
        return False


def download_shards(indices, data_dir=None, base_url=None, num_workers=4, progress=True, **kwargs):
    """Download several shards in parallel threads (the work is network-bound). Returns the number
    of shards that are now on disk."""
    indices = list(indices)
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=f"0/{len(indices)} shards",
               disable=not progress)
    lock = threading.Lock()
    done = [0]

    def on_bytes(n):
        with lock:
            bar.update(n)

    def one(index):
        ok = download_single_file(index, data_dir=data_dir, base_url=base_url, on_bytes=on_bytes, **kwargs)
        with lock:
            done[0] += ok
            bar.set_description(f"{done[0]}/{len(indices)} shards")
        return ok

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = list(pool.map(one, indices))
    bar.close()
    return sum(results)


# -----------------------------------------------------------------------------
# Importing your own text
#
# .txt and .md files are one document each; .jsonl files hold one document per line (the "text"
# field of a JSON object); .parquet files one per row of their "text" column. Documents longer than
# max_doc_chars are split at paragraph breaks (else line breaks, sentence ends, spaces): the
# BOS-aligned loader never splits a document across rows, it crops it, so one 300-page book as a
# single document would train on its first ~2048 tokens only.

IMPORT_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")


class DataImportError(DataError):
    """Bad input for `import`; the message names the file and what to do."""


def _collect_input_files(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and n.lower().endswith(IMPORT_EXTENSIONS)]
            if not found:
                raise DataImportError(f"{p}: folder holds no .txt, .md, .jsonl or .parquet files (searched "
                                      f"sub-folders too). Point the command at the folder with your text files.")
            files += found
        elif os.path.isfile(p):
            if not p.lower().endswith(IMPORT_EXTENSIONS):
                raise DataImportError(f"{p}: unsupported file type. import reads .txt and .md (one document per "
                                      f"file), .jsonl (one JSON object with a \"text\" field per line) and .parquet "
                                      f"(a \"text\" column); convert the file to one of those.")
            files.append(p)
        else:
            raise DataImportError(f"{p}: no such file or folder")
    return files


def _decode_utf8(path, raw):
    try:
        return raw.decode("utf-8-sig")  # -sig: drop the byte-order mark some editors write
    except UnicodeDecodeError as e:
        raise DataImportError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}). Convert it first, e.g. "
            f"`iconv -f latin1 -t utf-8 '{path}' > fixed.txt`, and import the converted file.") from None


def _read_documents(path):
    """Yield the documents of one input file (possibly empty strings; the caller counts those)."""
    lower = path.lower()
    if lower.endswith((".txt", ".md")):
        with open(path, "rb") as f:
            yield _decode_utf8(path, f.read())
    elif lower.endswith(".jsonl"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode_utf8(f"{path}:{lineno}", raw).strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataImportError(f"{path}:{lineno}: not valid JSON ({e.msg}). Each line must be one "
                                          f"JSON object such as {{\"text\": \"...\"}}.") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataImportError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field; "
                                          f"rename the field that holds the document to \"text\".")
                yield obj["text"]
    else:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataImportError(f"{path}: not a readable parquet file ({e}). The file is corrupt or not "
                                  f"parquet; export it again.") from None
        names = pf.schema_arrow.names
        if "text" not in names:
            raise DataImportError(f"{path}: parquet file has no 'text' column (columns: {', '.join(names)}). "
                                  f"Rename the column that holds the documents to 'text'.")
        if not pa.types.is_string(pf.schema_arrow.field("text").type) and \
                not pa.types.is_large_string(pf.schema_arrow.field("text").type):
            raise DataImportError(f"{path}: the 'text' column has type {pf.schema_arrow.field('text').type}, "
                                  f"expected strings.")
        for rg_idx in range(pf.num_row_groups):
            try:
                texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise DataImportError(f"{path}: row group {rg_idx} is unreadable ({e}). The file is corrupt; "
                                      f"export it again.") from None
            for t in texts:
                yield t or ""


def split_document(text, max_chars):
    """Cut a long document into pieces of at most max_chars, preferring paragraph breaks, then line
    breaks, sentence ends and spaces. The whitespace at a cut is dropped."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        cut = max_chars  # no separator at all: a hard cut
        for sep in ("\n\n", "\n", ". ", " "):
            at = window.rfind(sep)
            if at > max_chars // 4:  # a cut near the start would make a uselessly short piece
                cut = at + len(sep)
                break
        pieces.append(text[start:start + cut].strip())
        start += cut
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def import_text(paths, out_dir, val_docs=None, max_doc_chars=8000, shuffle=True, seed=42,
                shard_chars=SHARD_CHARS, progress=True):
    """Turn text files/folders into shards in `out_dir` (see the module docstring). Returns a summary dict."""
    if isinstance(paths, str):
        paths = [paths]
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    existing = [n for n in os.listdir(out_dir) if n.endswith(".parquet")] if os.path.isdir(out_dir) else []
    if existing:
        raise DataImportError(f"{out_dir}: already holds {len(existing)} parquet shard(s); the loader would mix "
                              f"them with the new ones. Choose an empty folder for --out, or delete those files.")
    files = _collect_input_files(paths)
    docs, n_empty, n_split = [], 0, 0
    for path in tqdm(files, desc="reading", unit="file", disable=not progress):
        for doc in _read_documents(path):
            if not doc.strip():
                n_empty += 1
                continue
            pieces = split_document(doc, max_doc_chars)
            n_split += len(pieces) > 1
            docs += pieces
    if len(docs) < 2:
        raise DataImportError(f"{', '.join(paths)}: found {len(docs)} non-empty document(s) ({n_empty} empty skipped); "
                              f"need at least 2, one for train and one for the val shard.")
    if shuffle:
        # nanochat's shards are shuffled too: the val shard should look like the train shards, and
        # training should not walk through one book or one source after another
        random.Random(seed).shuffle(docs)
    n_val = val_docs if val_docs is not None else max(1, len(docs) // 20)
    if not 1 <= n_val < len(docs):
        raise DataImportError(f"--val-docs {n_val} must leave at least one train document and take at least one "
                              f"(there are {len(docs)} documents)")
    train, val = docs[:-n_val], docs[-n_val:]
    # train shards close like nanochat's: enough characters AND a whole number of row groups
    shards, current, chars = [], [], 0
    for doc in train:
        current.append(doc)
        chars += len(doc)
        if chars >= shard_chars and len(current) % ROW_GROUP_SIZE == 0:
            shards.append(current)
            current, chars = [], 0
    if current:
        shards.append(current)
    shards.append(val)
    os.makedirs(out_dir, exist_ok=True)
    for i, shard in enumerate(tqdm(shards, desc="writing", unit="shard", disable=not progress)):
        write_shard(shard, os.path.join(out_dir, index_to_filename(i)))
    return {"files": len(files), "documents": len(docs), "empty_skipped": n_empty, "split_documents": n_split,
            "train_shards": len(shards) - 1, "train_documents": len(train), "val_documents": len(val),
            "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val)), "out_dir": out_dir}


# -----------------------------------------------------------------------------
# command line

def _download_main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m mlxchat.dataset",
        description="Download ClimbMix pretraining shards (as nanochat does): shards 0..N-1 plus the val shard "
                    f"{index_to_filename(MAX_SHARD)}, into {{base_dir}}/{DATA_DIR_NAME} (or --data-dir). "
                    "Interrupted downloads resume. To turn your own text into shards instead, see "
                    "`python -m mlxchat.dataset import --help`.")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help=f"number of train shards to download (-1 = all {MAX_SHARD}); ~100 MB each")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument("--data-dir", default=None, help="target folder (default: $MLXCHAT_DATA_DIR, else "
                        f"{{base_dir}}/{DATA_DIR_NAME})")
    parser.add_argument("--base-url", default=None, help=f"where the shards are served (default: $MLXCHAT_DATA_URL, "
                        f"else {BASE_URL})")
    args = parser.parse_args(argv)
    num = MAX_SHARD if args.num_files == -1 else min(max(args.num_files, 0), MAX_SHARD)
    indices = list(range(num)) + [MAX_SHARD]  # the val shard always comes along
    target = resolve_data_dir(args.data_dir)
    print(f"Downloading {len(indices)} shards ({num} train + val) to {target} with {args.num_workers} workers")
    ok = download_shards(indices, data_dir=args.data_dir, base_url=args.base_url, num_workers=args.num_workers)
    print(f"Done: {ok}/{len(indices)} shards in {target}")
    return 0 if ok == len(indices) else 1


def _import_main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m mlxchat.dataset import",
        description="Turn your own text into pretraining shards (nanochat's layout: one 'text' column, row groups "
                    "of 1024 documents, zstd; the last shard is the val split).",
        epilog="Inputs: .txt and .md files are one document each; .jsonl files hold one JSON object per line with "
               "a \"text\" field; .parquet files need a 'text' column. Folders are searched recursively. Text must "
               "be UTF-8. Empty documents are skipped and counted. All documents are held in memory while "
               "importing. Then train on them with --data-dir DIR (or MLXCHAT_DATA_DIR=DIR), e.g. "
               "`python -m scripts.tok_train --data-dir DIR`.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to import")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards (must hold no "
                        "parquet files yet)")
    parser.add_argument("--val-docs", type=int, default=None, help="documents in the val shard (default: 5%% of "
                        "the documents, at least 1)")
    parser.add_argument("--max-doc-chars", type=int, default=8000, help="split longer documents at paragraph "
                        "breaks (default 8000); 0 keeps them whole. The loader crops a document to one row of "
                        "T+1 tokens, ~8000 chars at T=2048")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order (the val shard is then "
                        "the end of the last file)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    parser.add_argument("--shard-chars", type=int, default=SHARD_CHARS, help="characters per train shard (default "
                        f"{SHARD_CHARS:,}, as nanochat's)")
    args = parser.parse_args(argv)
    try:
        s = import_text(args.paths, args.out, val_docs=args.val_docs, max_doc_chars=args.max_doc_chars,
                        shuffle=not args.no_shuffle, seed=args.seed, shard_chars=args.shard_chars)
    except DataImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Read {s['files']} file(s): {s['documents']:,} documents ({s['empty_skipped']} empty skipped, "
          f"{s['split_documents']} long ones split)")
    print(f"Wrote {s['train_shards']} train shard(s) with {s['train_documents']:,} documents ({s['train_chars']:,} "
          f"chars) and 1 val shard with {s['val_documents']:,} documents ({s['val_chars']:,} chars) to {s['out_dir']}")
    print(f"Use them with --data-dir {s['out_dir']} (or MLXCHAT_DATA_DIR={s['out_dir']})")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "import":
        return _import_main(argv[1:])
    return _download_main(argv)


if __name__ == "__main__":
    sys.exit(main())
