"""
mlxchat.dataset: where shards are found, downloading them (against a local HTTP server on
127.0.0.1 only: drops, resume, locking), importing the user's own text, and the demo corpus.
"""
import json
import os
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxchat import dataset
from mlxchat.dataset import (DEMO_DATA_DIR, MAX_SHARD, DataError, DataImportError, download_shards,
                             download_single_file, import_text, index_to_filename, list_parquet_files,
                             parquets_iter_batched, resolve_data_dir, split_document, split_parquet_files, write_shard)


def read_docs(path):
    return pq.read_table(path).column("text").to_pylist()


# -----------------------------------------------------------------------------
# locating shards

def test_data_dir_precedence(tmp_path, monkeypatch):
    base = os.environ["MLXCHAT_BASE_DIR"]
    monkeypatch.delenv("MLXCHAT_DATA_DIR", raising=False)
    assert resolve_data_dir() == os.path.join(base, "base_data_climbmix")
    monkeypatch.setenv("MLXCHAT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == str(tmp_path / "env")
    assert resolve_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")  # the argument wins
    monkeypatch.setenv("MLXCHAT_DATA_DIR", "demo")
    assert resolve_data_dir() == DEMO_DATA_DIR


def test_legacy_base_data_folder_is_used_when_climbmix_is_absent(monkeypatch):
    monkeypatch.delenv("MLXCHAT_DATA_DIR", raising=False)
    legacy = os.path.join(os.environ["MLXCHAT_BASE_DIR"], "base_data")
    os.makedirs(legacy)
    assert resolve_data_dir() == legacy
    os.makedirs(os.path.join(os.environ["MLXCHAT_BASE_DIR"], "base_data_climbmix"))
    assert resolve_data_dir().endswith("base_data_climbmix")


def test_splits_and_errors(tmp_path):
    d = tmp_path / "shards"
    with pytest.raises(FileNotFoundError, match="no parquet shards in .*shards.*--data-dir demo"):
        split_parquet_files("train", str(d))
    d.mkdir()
    write_shard(["only"], str(d / "shard_00000.parquet"))
    assert split_parquet_files("val", str(d)) == [str(d / "shard_00000.parquet")]
    with pytest.raises(FileNotFoundError, match="single shard"):
        split_parquet_files("train", str(d))
    write_shard(["a", "b"], str(d / "shard_00002.parquet"))
    write_shard(["c"], str(d / "shard_00001.parquet"))
    (d / "shard_00003.parquet.tmp").write_bytes(b"partial download")  # never listed
    assert [os.path.basename(p) for p in list_parquet_files(str(d))] == \
        ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert split_parquet_files("val", str(d)) == [str(d / "shard_00002.parquet")]  # the last one is val
    assert list(parquets_iter_batched("train", data_dir=str(d))) == [["only"], ["c"]]
    assert list(parquets_iter_batched("val", data_dir=str(d))) == [["a", "b"]]


def test_parquets_iter_batched_start_step(tmp_path):
    docs = [f"doc {i}" for i in range(10)]
    write_shard(docs, str(tmp_path / "shard_00000.parquet"), row_group_size=2)
    write_shard(["val"], str(tmp_path / "shard_00001.parquet"))
    got = list(parquets_iter_batched("train", start=1, step=2, data_dir=str(tmp_path)))
    assert got == [docs[2:4], docs[6:8]]


class _CharTokenizer:
    """Just enough of a tokenizer for the loader: one token per character."""

    def get_bos_token_id(self):
        return 0

    def encode(self, texts, prepend=None, num_threads=None):
        return [[prepend] + [1 + ord(c) % 200 for c in t] for t in texts]


def test_corrupt_shard_error_names_the_file(tmp_path):
    from mlxchat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from scripts.tok_train import text_iterator
    d = tmp_path / "data"
    d.mkdir()
    write_shard(["first train shard"], str(d / "shard_00000.parquet"))
    bad = d / "shard_00001.parquet"
    bad.write_bytes(b"<html>503 Service Unavailable</html>")  # say, an error page saved under a shard's name
    write_shard(["the val shard"], str(d / "shard_00002.parquet"))

    def check(exc):
        msg = str(exc.value)
        assert str(bad) in msg and "not a readable parquet file" in msg
        # what to do: fetch it again (-n past its index) or re-import
        assert "python -m mlxchat.dataset -n 2 --data-dir" in msg and "python -m mlxchat.dataset import" in msg

    it = parquets_iter_batched("train", data_dir=str(d))
    assert next(it) == ["first train shard"]  # the good shard before it still reads
    with pytest.raises(DataError) as e:
        next(it)
    check(e)
    assert isinstance(e.value, ValueError)
    # the training loader
    loader = tokenizing_distributed_data_loader_bos_bestfit(_CharTokenizer(), 1, 8, "train", data_dir=str(d),
                                                            buffer_size=4)
    with pytest.raises(DataError) as e:
        next(loader)
    check(e)
    # tokenizer training's text iterator
    with pytest.raises(DataError) as e:
        list(text_iterator(10 ** 9, 1000, data_dir=str(d), progress=False))
    check(e)

    # a shard cut short (the footer lost) and a parquet file that is not a shard (no 'text' column)
    good = tmp_path / "good.parquet"
    write_shard([f"document {i}" for i in range(50)], str(good))
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"shard_00001\.parquet: not a readable parquet file"):
        list(parquets_iter_batched("train", data_dir=str(d)))
    pq.write_table(pa.table({"body": ["a"]}), str(bad))
    with pytest.raises(DataError, match=r"shard_00001\.parquet: parquet file has no 'text' column \(columns: body\)"):
        list(parquets_iter_batched("train", data_dir=str(d)))


def test_demo_corpus_layout():
    paths = list_parquet_files("demo")
    assert len(paths) >= 3, "the demo corpus should have several train shards and a val shard"
    total_bytes = sum(os.path.getsize(p) for p in paths)
    assert total_bytes < 3_000_000, f"demo corpus is {total_bytes:,} bytes on disk; keep it under 3 MB"
    n_chars = 0
    for p in paths:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows <= 1024 for i in range(pf.num_row_groups))
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        docs = pf.read().column("text").to_pylist()
        assert all(d.strip() for d in docs)
        n_chars += sum(map(len, docs))
    assert n_chars > 3_000_000
    assert os.path.exists(os.path.join(DEMO_DATA_DIR, "SOURCE.md"))


# -----------------------------------------------------------------------------
# downloading, against a local server

class ShardServer:
    """A threaded HTTP server on 127.0.0.1 serving {name: bytes}, with HTTP Range support and
    scripted failures: `drops` = how many upcoming GETs are cut off after `drop_at` bytes."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []  # (path, Range header or None)
        self.drops, self.drop_at = 0, 0
        self.ignore_range = False
        self.delay_s = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                with server.lock:
                    server.requests.append((self.path, rng))
                    drop = server.drops > 0
                    server.drops -= drop
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if drop:
                    # promise the whole body, send part of it, hang up: a connection dropped midway
                    self.wfile.write(body[:server.drop_at])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                for i in range(0, len(body), 16384):
                    self.wfile.write(body[i:i + 16384])
                    if server.delay_s:
                        time.sleep(server.delay_s)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/shards"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def gets(self, name):
        return [r for r in self.requests if r[0].endswith("/" + name)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def make_shard_bytes(tmp_path, n_docs, seed):
    # random words, so that the shard does not compress to nothing: ~40-250 KB
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    path = tmp_path / f"src_{seed}.parquet"
    write_shard([" ".join(rng.choices(words, k=rng.randint(10, 40))) for _ in range(n_docs)], str(path))
    data = path.read_bytes()
    assert len(data) > 30_000
    return data


@pytest.fixture
def server(tmp_path):
    files = {index_to_filename(0): make_shard_bytes(tmp_path, 3000, 0),
             index_to_filename(1): make_shard_bytes(tmp_path, 2000, 1),
             index_to_filename(MAX_SHARD): make_shard_bytes(tmp_path, 500, 2)}
    srv = ShardServer(files)
    yield srv
    srv.close()


FAST = dict(backoff_s=0.01, timeout_s=10)


def test_download_shards_in_parallel(server, tmp_path):
    out = tmp_path / "data"
    ok = download_shards([0, 1, MAX_SHARD], data_dir=str(out), base_url=server.url, num_workers=3, progress=False, **FAST)
    assert ok == 3
    for name, data in server.files.items():
        assert (out / name).read_bytes() == data
    assert not list(out.glob("*.tmp"))
    # already there: nothing is fetched again
    n = len(server.requests)
    assert download_single_file(0, data_dir=str(out), base_url=server.url, **FAST)
    assert len(server.requests) == n


def test_dropped_connection_is_retried_and_resumed(server, tmp_path):
    out = tmp_path / "data"
    name = index_to_filename(0)
    server.drops, server.drop_at = 1, len(server.files[name]) // 2
    assert download_single_file(0, data_dir=str(out), base_url=server.url, **FAST)
    assert (out / name).read_bytes() == server.files[name]
    gets = server.gets(name)
    assert len(gets) == 2
    assert gets[0][1] is None and gets[1][1] == f"bytes={server.drop_at}-"  # the retry asked only for the rest


def test_interrupted_download_resumes_on_next_run(server, tmp_path):
    out = tmp_path / "data"
    name = index_to_filename(1)
    server.drops, server.drop_at = 1, 20_000
    assert server.drop_at < len(server.files[name])
    # the first run gives up after one failed attempt: the partial file stays, the final name doesn't exist
    assert not download_single_file(1, data_dir=str(out), base_url=server.url, max_attempts=1, **FAST)
    assert not (out / name).exists()
    assert (out / (name + ".tmp")).stat().st_size == 20_000
    # the next run (a restart) asks for the remaining bytes only
    assert download_single_file(1, data_dir=str(out), base_url=server.url, **FAST)
    assert (out / name).read_bytes() == server.files[name]
    assert server.gets(name)[-1][1] == "bytes=20000-"
    assert not (out / (name + ".tmp")).exists()


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    out = tmp_path / "data"
    name = index_to_filename(0)
    server.ignore_range = True
    server.drops, server.drop_at = 2, 10_000
    assert download_single_file(0, data_dir=str(out), base_url=server.url, **FAST)
    assert (out / name).read_bytes() == server.files[name]  # a 200 reply overwrote, never appended


def test_missing_shard_fails_fast_and_garbage_is_rejected(server, tmp_path):
    out = tmp_path / "data"
    assert not download_single_file(7, data_dir=str(out), base_url=server.url, **FAST)
    assert len(server.gets(index_to_filename(7))) == 1  # a 404 is not retried
    server.files[index_to_filename(8)] = b"<html>not a parquet file</html>"
    assert not download_single_file(8, data_dir=str(out), base_url=server.url, max_attempts=2, **FAST)
    assert not (out / index_to_filename(8)).exists()
    assert not (out / (index_to_filename(8) + ".tmp")).exists()


def test_lock_stops_two_downloads_of_the_same_shard(server, tmp_path):
    out = tmp_path / "data"
    name = index_to_filename(0)
    server.delay_s = 0.002  # slow enough that the two downloads overlap
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        download_single_file(0, data_dir=str(out), base_url=server.url, **FAST))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True, True]
    assert len(server.gets(name)) == 1  # the second waited for the lock, then found the file
    assert (out / name).read_bytes() == server.files[name]


def test_download_cli_always_fetches_the_val_shard(server, tmp_path, capsys):
    out = tmp_path / "data"
    assert dataset.main(["-n", "1", "-w", "2", "--data-dir", str(out), "--base-url", server.url]) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [index_to_filename(0), index_to_filename(MAX_SHARD)]
    assert "2/2 shards" in capsys.readouterr().out


def test_base_url_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXCHAT_DATA_URL", server.url)
    assert download_single_file(MAX_SHARD, data_dir=str(tmp_path / "d"), **FAST)
    assert len(server.gets(index_to_filename(MAX_SHARD))) == 1
    assert dataset.BASE_URL.startswith("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/")


# -----------------------------------------------------------------------------
# importing the user's text

def write_inputs(root):
    root.mkdir()
    (root / "a.txt").write_text("First file, one document.\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.md").write_text("# Notes\n\nA markdown document.")
    (root / "sub" / "ignored.csv").write_text("x,y\n1,2\n")
    lines = [json.dumps({"text": "jsonl doc one"}), "", json.dumps({"text": "   "}),
             json.dumps({"text": "jsonl doc two", "id": 2})]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["parquet doc A", "", None]}), str(root / "d.parquet"))
    return {"First file, one document.\n", "# Notes\n\nA markdown document.", "jsonl doc one", "jsonl doc two",
            "parquet doc A"}


def test_import_folder(tmp_path):
    want = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    summary = import_text([str(tmp_path / "in")], str(out), val_docs=2, progress=False)
    assert summary["files"] == 4 and summary["documents"] == 5
    assert summary["empty_skipped"] == 3  # "   " in the jsonl, "" and None in the parquet
    shards = list_parquet_files(str(out))
    assert [os.path.basename(p) for p in shards] == ["shard_00000.parquet", "shard_00001.parquet"]
    train, val = read_docs(shards[0]), read_docs(shards[1])
    assert len(val) == 2 and set(train) | set(val) == want
    pf = pq.ParquetFile(shards[0])
    assert pf.schema_arrow.names == ["text"]
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"


def test_import_shards_close_on_whole_row_groups(tmp_path):
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(2600)))
    out = tmp_path / "out"
    import_text([str(src)], str(out), val_docs=100, shard_chars=1000, shuffle=False, progress=False)
    shards = list_parquet_files(str(out))
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in shards]
    assert sizes == [1024, 1024, 452, 100]
    assert all(pq.ParquetFile(p).metadata.row_group(0).num_rows <= 1024 for p in shards)
    assert read_docs(shards[0])[0] == "document number 0" and read_docs(shards[-1])[-1] == "document number 2599"


def test_long_documents_are_split_at_paragraphs():
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(40)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    pieces = split_document(text, 1000)
    assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces)
    assert all(p.startswith("Paragraph") for p in pieces)  # cuts fell on paragraph breaks
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")
    assert split_document("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # no separator: hard cuts
    assert split_document("short", 0) == ["short"]


def test_import_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(DataImportError, match="empty_folder"):
        import_text([str(empty)], str(tmp_path / "o1"), progress=False)

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(DataImportError, match="corrupt.parquet"):
        import_text([str(corrupt)], str(tmp_path / "o2"), progress=False)

    no_text = tmp_path / "no_text_column.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), str(no_text))
    with pytest.raises(DataImportError, match=r"no_text_column.parquet.*no 'text' column.*body"):
        import_text([str(no_text)], str(tmp_path / "o3"), progress=False)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(DataImportError, match=r"latin1.txt.*not UTF-8.*iconv"):
        import_text([str(latin1)], str(tmp_path / "o4"), progress=False)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataImportError, match=r"bad.jsonl:2"):
        import_text([str(bad_json)], str(tmp_path / "o5"), progress=False)

    wrong_type = tmp_path / "table.csv"
    wrong_type.write_text("a,b\n")
    with pytest.raises(DataImportError, match="table.csv"):
        import_text([str(wrong_type)], str(tmp_path / "o6"), progress=False)

    # an output folder that already has shards would silently mix corpora
    taken = tmp_path / "taken"
    taken.mkdir()
    write_shard(["old"], str(taken / "shard_00000.parquet"))
    (tmp_path / "ok.txt").write_text("one")
    (tmp_path / "ok2.txt").write_text("two")
    with pytest.raises(DataImportError, match="taken"):
        import_text([str(tmp_path / "ok.txt"), str(tmp_path / "ok2.txt")], str(taken), progress=False)


def test_import_cli(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert dataset.main(["import", str(tmp_path / "in"), "--out", str(out), "--val-docs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 empty skipped" in printed and f"--data-dir {out}" in printed
    assert len(list_parquet_files(str(out))) == 2
    # bad input: exit status 2 and a message naming the file, no traceback
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    assert dataset.main(["import", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        dataset.main(["import", "--help"])
    assert e.value.code == 0
    assert ".jsonl" in capsys.readouterr().out
