"""
Tests for mlxchat/core_eval.py: CORE scoring on hand-made items with a scripted model whose logits
the test sets (so the right prediction is known by construction), the few-shot prompt text against
nanochat's templates written out here by hand, the span boundaries, cropping of long prompts, the
centering math, core.yaml reading, and the eval bundle download from a server on 127.0.0.1
(resume after a dropped connection, offline and bad-payload errors).
"""
import http.server
import json
import logging
import os
import random
import threading

import numpy as np
import pytest

import mlxchat  # noqa: F401
import mlx.core as mx

from mlxchat import core_eval
from mlxchat.core_eval import (EvalBundleError, batch_sequences_lm, batch_sequences_mc, batch_sequences_schema,
                               crop_sequences, download_eval_bundle, evaluate_core, evaluate_example, evaluate_task,
                               find_common_length, load_core_config, parse_core_yaml)

# -----------------------------------------------------------------------------
# a character-level tokenizer (token = byte, BOS = 256) and a bigram model with a settable table


class CharTokenizer:
    """Token ids are the bytes of the text; records every prompt it encodes."""
    BOS = 256
    VOCAB = 257

    def __init__(self):
        self.prompts = []

    def get_bos_token_id(self):
        return self.BOS

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        self.prompts.append(text)
        return ([prepend] if prepend is not None else []) + list(text.encode("ascii"))

    __call__ = encode


class BigramModel:
    """logits[b, t] = table[ids[b, t]]: the next-token scores depend on the current token only.
    max_seq_len (optional) makes it refuse longer inputs, like a model with a fixed context."""

    def __init__(self, max_seq_len=None):
        self.table = np.zeros((CharTokenizer.VOCAB, CharTokenizer.VOCAB), dtype=np.float32)
        self.widths = []
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len

    def prefer(self, text, logit=8.0):
        """Make each character of text the favourite successor of the one before it."""
        for a, b in zip(text, text[1:]):
            self.table[ord(a), ord(b)] = logit

    def __call__(self, ids):
        self.widths.append(ids.shape[1])
        self.last_ids = np.array(ids)
        limit = getattr(self, "max_seq_len", None)
        assert limit is None or ids.shape[1] <= limit, f"input of {ids.shape[1]} tokens > {limit}"
        return mx.array(self.table)[ids]

    def log_probs(self, prev, nxt):
        row = self.table[ord(prev)].astype(np.float64)
        return row[ord(nxt)] - np.log(np.exp(row).sum())


MC = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
SCHEMA = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
LM = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}

# -----------------------------------------------------------------------------
# prompts: nanochat's three templates, written out by hand


def test_mc_prompts_literal():
    data = [{"query": "2+2=", "choices": ["4", "5"], "gold": 0},
            {"query": "3+3=", "choices": ["6", "7"], "gold": 1}]
    tok = CharTokenizer()
    evaluate_example(1, BigramModel(), tok, data, dict(MC, num_fewshot=1))
    # the one other item is the shot, shown with its gold choice and a blank line after it
    assert tok.prompts == ["2+2= 4\n\n3+3= 6", "2+2= 4\n\n3+3= 7"]


def test_schema_and_lm_prompts_literal():
    data = [{"context_options": ["A dog", "A cat"], "continuation": "barks.", "gold": 0},
            {"context_options": ["The sun", "The moon"], "continuation": "shines.", "gold": 1}]
    tok = CharTokenizer()
    evaluate_example(0, BigramModel(), tok, data, dict(SCHEMA, num_fewshot=1, continuation_delimiter=" -> "))
    assert tok.prompts == ["The moon -> shines.\n\nA dog -> barks.", "The moon -> shines.\n\nA cat -> barks."]

    data = [{"context": "  The capital of France is  ", "continuation": "Paris"},
            {"context": "One plus one is\n", "continuation": "two"}]
    tok = CharTokenizer()
    evaluate_example(1, BigramModel(), tok, data, dict(LM, num_fewshot=1))
    # contexts trimmed; the prompt without the continuation is stripped (no trailing delimiter space)
    assert tok.prompts == ["The capital of France is Paris\n\nOne plus one is",
                           "The capital of France is Paris\n\nOne plus one is two"]


@pytest.mark.parametrize("task_type", ["multiple_choice", "schema", "language_modeling"])
def test_fewshot_sampling_and_text(task_type):
    n, k = 9, 3
    if task_type == "multiple_choice":
        data = [{"query": f"Q{i}?", "choices": [f"a{i}", f"b{i}", f"c{i}"], "gold": i % 3} for i in range(n)]
    elif task_type == "schema":
        data = [{"context_options": [f"x{i}", f"y{i}"], "continuation": f"end{i}", "gold": i % 2} for i in range(n)]
    else:
        data = [{"context": f" ctx{i} ", "continuation": f"cont{i}"} for i in range(n)]
    delim = "\nAnswer: "
    meta = {"task_type": task_type, "num_fewshot": k, "continuation_delimiter": delim}
    for idx in range(n):
        tok = CharTokenizer()
        evaluate_example(idx, BigramModel(), tok, data, meta)
        # nanochat: random.Random(1234 + idx).sample(all indices but idx, k)
        shots = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        assert idx not in shots
        item = data[idx]
        if task_type == "multiple_choice":
            prefix = "".join(data[s]["query"] + delim + data[s]["choices"][data[s]["gold"]] + "\n\n" for s in shots)
            expected = [prefix + item["query"] + delim + c for c in item["choices"]]
        elif task_type == "schema":
            prefix = "".join(data[s]["context_options"][data[s]["gold"]] + delim + data[s]["continuation"] + "\n\n" for s in shots)
            expected = [prefix + c + delim + item["continuation"] for c in item["context_options"]]
        else:
            prefix = "".join(data[s]["context"].strip() + delim + data[s]["continuation"] + "\n\n" for s in shots)
            expected = [(prefix + item["context"].strip() + delim).strip(), prefix + item["context"].strip() + delim + item["continuation"]]
        assert tok.prompts == expected


def test_fewer_items_than_shots_uses_all_others():
    data = [{"query": f"Q{i}", "choices": ["x", "y"], "gold": 0} for i in range(4)]
    tok = CharTokenizer()
    evaluate_example(2, BigramModel(), tok, data, dict(MC, num_fewshot=10))
    shots = tok.prompts[0].split("\n\n")[:-1]
    assert sorted(shots) == ["Q0 x", "Q1 x", "Q3 x"]

# -----------------------------------------------------------------------------
# spans


def test_common_length():
    assert find_common_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], "left") == 2
    assert find_common_length([[9, 3, 4], [8, 7, 3, 4], [3, 4]], "right") == 2
    assert find_common_length([[1, 2], [1, 2]], "left") == 2


def test_spans_mc_schema_lm():
    tok = CharTokenizer()
    prompts = ["Capital of France: Paris", "Capital of France: Lyon", "Capital of France: Pau"]
    tokens, starts, ends = batch_sequences_mc(tok, prompts)
    assert all(t[0] == tok.BOS for t in tokens)
    # span = after the common prefix of all choices (+1 for BOS) to the end
    assert starts == [1 + len("Capital of France: ")] * 3
    assert ends == [1 + len(p) for p in prompts]

    prompts = ["Tom fed the dog because it was hungry", "Tom fed the cat because it was hungry"]
    tokens, starts, ends = batch_sequences_schema(tok, prompts)
    assert [bytes(t[s:e]).decode() for t, s, e in zip(tokens, starts, ends)] == [" because it was hungry"] * 2
    prompts = ["A rat ran", "A cat ran"]  # the common suffix reaches into the options
    tokens, starts, ends = batch_sequences_schema(tok, prompts)
    assert [bytes(t[s:e]).decode() for t, s, e in zip(tokens, starts, ends)] == ["at ran"] * 2

    tokens, starts, ends = batch_sequences_lm(tok, ["The capital is", "The capital is Paris"])
    assert len(tokens) == 1 and bytes(tokens[0][starts[0]:ends[0]]).decode() == " Paris"


def test_lm_prefix_violation_is_an_error():
    class Merging(CharTokenizer):
        # "ab" becomes one token 999: "xa" ends in "a", but "xabc" has no "a" token
        def encode(self, text, prepend=None):
            ids = super().encode(text, prepend)
            if isinstance(text, list):
                return ids
            out = []
            for i in ids:
                if out and out[-1] == ord("a") and i == ord("b"):
                    out[-1] = 999
                else:
                    out.append(i)
            return out
    with pytest.raises(AssertionError, match="prefix"):
        batch_sequences_lm(Merging(), ["xa", "xabc"])

# -----------------------------------------------------------------------------
# scoring


def test_mc_picks_the_preferred_choice():
    model = BigramModel()
    model.prefer(" Lyon")
    item = {"query": "Capital:", "choices": ["Paris", "Lyon", "Nice"], "gold": 1}
    assert evaluate_example(0, model, CharTokenizer(), [item], MC)
    assert not evaluate_example(0, model, CharTokenizer(), [dict(item, gold=0)], MC)
    assert not evaluate_example(0, model, CharTokenizer(), [dict(item, gold=2)], MC)


def test_mc_uses_mean_not_sum_loss():
    model = BigramModel()
    # " q": one token, moderately likely; " xyz": unlikely first token, then near-certain ones
    model.table[ord(" "), ord("q")] = 4.0
    model.table[ord(" "), ord("x")] = 3.0
    model.table[ord("x"), ord("y")] = 12.0
    model.table[ord("y"), ord("z")] = 12.0
    losses_q = [-model.log_probs(" ", "q")]
    losses_xyz = [-model.log_probs(" ", "x"), -model.log_probs("x", "y"), -model.log_probs("y", "z")]
    assert sum(losses_q) < sum(losses_xyz) and np.mean(losses_xyz) < np.mean(losses_q)  # the construction
    item = {"query": "Pick:", "choices": ["q", "xyz"], "gold": 1}
    assert evaluate_example(0, model, CharTokenizer(), [item], MC)


def test_mc_ties_pick_the_first():
    item = {"query": "Pick:", "choices": ["a", "b", "c"], "gold": 0}
    assert evaluate_example(0, BigramModel(), CharTokenizer(), [item], MC)  # uniform logits: all tie
    assert not evaluate_example(0, BigramModel(), CharTokenizer(), [dict(item, gold=1)], MC)


def test_mc_padding_does_not_leak():
    # choices of very different lengths: the short rows are padded with BOS; a model that would love
    # BOS -> anything must not change the answer, only real positions count
    # choices of very different lengths: the short row is padded with BOS. Every token hates BOS as
    # its successor, so counting any padded position would sink the short (right) answer.
    model = BigramModel()
    model.prefer(" no")
    model.table[:, CharTokenizer.BOS] = -50.0
    item = {"query": "Answer:", "choices": ["no", "yes, definitely not the right one"], "gold": 0}
    assert evaluate_example(0, model, CharTokenizer(), [item], MC)
    assert model.widths == [1 + len("Answer: yes, definitely not the right one")]
    assert model.last_ids[0, :1 + len("Answer: no")].tolist() == [CharTokenizer.BOS] + list(b"Answer: no")
    assert (model.last_ids[0, 1 + len("Answer: no"):] == CharTokenizer.BOS).all()  # right-padded with BOS


def test_schema_scores_the_common_suffix():
    model = BigramModel()
    model.table[ord("t"), ord(" ")] = 6.0  # " because..." after "cat" is likely, after "dog" not
    item = {"context_options": ["Tom fed the dog", "Tom fed the cat"], "continuation": "because it was hungry", "gold": 1}
    assert evaluate_example(0, model, CharTokenizer(), [item], SCHEMA)
    assert not evaluate_example(0, model, CharTokenizer(), [dict(item, gold=0)], SCHEMA)


def test_lm_needs_every_token_greedy():
    model = BigramModel()
    model.prefer("s Paris")  # "...is" -> " " -> "P" -> "a" -> "r" -> "i" -> "s"
    item = {"context": "The capital of France is", "continuation": "Paris"}
    assert evaluate_example(0, model, CharTokenizer(), [item], LM)
    assert not evaluate_example(0, model, CharTokenizer(), [dict(item, continuation="Parks")], LM)  # r -> i, not k
    assert evaluate_example(0, model, CharTokenizer(), [dict(item, continuation="Pari")], LM)  # a prefix of the chain
    # the last span token counts too: "Parix" differs only there
    assert not evaluate_example(0, model, CharTokenizer(), [dict(item, continuation="Parix")], LM)


# -----------------------------------------------------------------------------
# long prompts


def test_crop_sequences():
    t = list(range(30))
    tokens, starts, ends = crop_sequences([t, t[:8]], [25, 3], [30, 8], 10)
    assert tokens == [t[20:], t[:8]] and starts == [5, 3] and ends == [10, 8]
    # a span longer than the limit keeps the one token in front of it that predicts its first kept token
    tokens, starts, ends = crop_sequences([t], [5], [30], 10)
    assert tokens == [t[20:]] and starts == [1] and ends == [10]


def test_long_prompts_are_cropped_to_the_model_limit():
    model = BigramModel(max_seq_len=24)
    model.prefer("s Paris")
    item = {"context": "word " * 40 + "Paris is", "continuation": "Paris"}
    assert evaluate_example(0, model, CharTokenizer(), [item], LM)  # a model that refuses > 24 tokens
    assert max(model.widths) == 24
    model = BigramModel(max_seq_len=24)
    model.prefer(" Lyon")
    mc = {"query": "filler " * 50 + "Capital:", "choices": ["Paris", "Lyon"], "gold": 1}
    assert evaluate_example(0, model, CharTokenizer(), [mc], dict(MC, num_fewshot=0))
    assert max(model.widths) == 24
    # an explicit max_seq_len crops harder
    model.widths.clear()
    assert evaluate_example(0, model, CharTokenizer(), [mc], MC, max_seq_len=12)
    assert max(model.widths) == 12


def test_default_limit_is_the_rotary_table():
    class RotaryModel(BigramModel):
        _rotary_len = 16
    model = RotaryModel()
    evaluate_example(0, model, CharTokenizer(), [{"query": "x" * 50, "choices": ["a", "b"], "gold": 0}], MC)
    assert model.widths == [16]
    assert core_eval.model_max_len(BigramModel()) is None  # no known limit: no cropping


# -----------------------------------------------------------------------------
# core.yaml, the task loop, centering


CORE_YAML = '''# CORE tasks
icl_tasks:
-
  label: jeopardy
  dataset_uri: world_knowledge/jeopardy_all.jsonl
  num_fewshot: [10]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: " # this separates questions from answers
  has_categories: true
- label: winograd
  dataset_uri: 'language_understanding/winograd_wsc.jsonl'
  num_fewshot: [0]
  icl_task_type: schema
'''


def test_parse_core_yaml():
    assert parse_core_yaml(CORE_YAML) == {"icl_tasks": [
        {"label": "jeopardy", "dataset_uri": "world_knowledge/jeopardy_all.jsonl", "num_fewshot": [10],
         "icl_task_type": "language_modeling", "continuation_delimiter": "\nAnswer: ", "has_categories": True},
        {"label": "winograd", "dataset_uri": "language_understanding/winograd_wsc.jsonl", "num_fewshot": [0],
         "icl_task_type": "schema"},
    ]}
    # block lists, "- key: value" items, single quotes with '' escapes, # inside quotes
    text = "icl_tasks:\n- label: a\n  num_fewshot:\n  - 3\n  continuation_delimiter: 'it''s # here'\n" \
           "-\n  label: b\n  num_fewshot:\n    - 0\n"
    assert parse_core_yaml(text) == {"icl_tasks": [
        {"label": "a", "num_fewshot": [3], "continuation_delimiter": "it's # here"}, {"label": "b", "num_fewshot": [0]}]}
    with pytest.raises(ValueError, match="pyyaml"):
        parse_core_yaml("icl_tasks:\n- label: a\n  nested:\n    deeper: 1\n")


def _write_bundle(bundle_dir, tasks):
    """tasks: list of (label, task_type, shots, items, baseline)."""
    os.makedirs(os.path.join(bundle_dir, "eval_data", "synthetic"), exist_ok=True)
    lines = ["icl_tasks:"]
    for label, task_type, shots, items, _ in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: synthetic/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {task_type}"]
        with open(os.path.join(bundle_dir, "eval_data", "synthetic", f"{label}.jsonl"), "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    with open(os.path.join(bundle_dir, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n")
        for label, task_type, shots, items, baseline in tasks:
            f.write(f"{label},synthetic,{task_type},{shots},{len(items)},{baseline},,\"{label}, made up\"\n")


def _synthetic_tasks():
    mc_gold = [0, 0, 1, 0, 1, 0, 0, 0]  # the model always picks choice 0 ("Lyon")
    mc = [{"query": f"Item {i}:", "choices": ["Lyon", "Nice"], "gold": g} for i, g in enumerate(mc_gold)]
    lm_conts = ["Paris", "Parks", "Paris", "Paris", "Pa", "Paros"]  # greedy spells " Paris" (and its prefixes)
    lm = [{"context": f"City {i} is", "continuation": c} for i, c in enumerate(lm_conts)]
    schema_gold = [1, 1, 0, 1, 1]  # the model prefers the "...cat" option (index 1)
    schema = [{"context_options": [f"Pet {i} is a dog", f"Pet {i} is a cat"], "continuation": "that purrs", "gold": g}
              for i, g in enumerate(schema_gold)]
    return [("mc_task", "multiple_choice", 0, mc, 25), ("lm_task", "language_modeling", 1, lm, 0),
            ("schema_task", "schema", 0, schema, 50)]


def _synthetic_model():
    model = BigramModel()
    model.prefer(" Lyon", logit=3.0)  # " " -> "L" below " " -> "P", so greedy still spells " Paris"
    model.prefer("s Paris")
    model.table[ord("t"), ord(" ")] = 6.0
    return model


def test_evaluate_core_accuracy_centering_and_core(tmp_path):
    tasks = _synthetic_tasks()
    _write_bundle(str(tmp_path / "eval_bundle"), tasks)
    out = evaluate_core(_synthetic_model(), CharTokenizer(), bundle_dir=str(tmp_path / "eval_bundle"), progress=False)
    expected_acc = {"mc_task": 6 / 8, "lm_task": 4 / 6, "schema_task": 4 / 5}
    assert out["results"] == pytest.approx(expected_acc)
    baselines = {"mc_task": 25, "lm_task": 0, "schema_task": 50}
    centered = {k: (a - baselines[k] / 100) / (1 - baselines[k] / 100) for k, a in expected_acc.items()}
    assert out["centered_results"] == pytest.approx(centered)
    assert centered["mc_task"] == pytest.approx(2 / 3) and centered["schema_task"] == pytest.approx(0.6)
    assert out["core_metric"] == pytest.approx(sum(centered.values()) / 3)


def test_max_per_task_takes_the_first_items_after_the_seeded_shuffle(tmp_path):
    tasks = _synthetic_tasks()[:1]
    _write_bundle(str(tmp_path / "eval_bundle"), tasks)
    tok = CharTokenizer()
    out = evaluate_core(_synthetic_model(), tok, max_per_task=3, bundle_dir=str(tmp_path / "eval_bundle"), progress=False)
    items = list(tasks[0][3])
    random.Random(1337).shuffle(items)
    kept = items[:3]
    assert sorted({p.split(" ")[1] for p in tok.prompts}) == sorted(f"{i['query'].split(' ')[1]}" for i in kept)
    assert out["results"]["mc_task"] == pytest.approx(sum(i["gold"] == 0 for i in kept) / 3)


def test_load_core_config_defaults(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "core.yaml").write_text(CORE_YAML)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\njeopardy,0\nwinograd,50\n")
    tasks, baselines = load_core_config(str(bundle))
    assert [t["continuation_delimiter"] for t in tasks] == ["\nAnswer: ", " "]  # " " unless given
    assert [t["num_fewshot"] for t in tasks] == [10, 0]
    assert baselines == {"jeopardy": 0.0, "winograd": 50.0}


def test_evaluate_task_matches_example_by_example():
    model = _synthetic_model()
    _, task_type, shots, items, _ = _synthetic_tasks()[1]
    meta = {"task_type": task_type, "num_fewshot": shots, "continuation_delimiter": " "}
    each = [evaluate_example(i, model, CharTokenizer(), items, meta) for i in range(len(items))]
    assert evaluate_task(model, CharTokenizer(), items, meta) == pytest.approx(np.mean(each))

# -----------------------------------------------------------------------------
# the bundle download, from a server on 127.0.0.1


class _BundleServer:
    """Serves `payload` at /eval_bundle.zip. drop_first: the first response promises the whole body
    but sends only half of it and hangs up. honor_range: answer Range requests with 206."""

    def __init__(self, payload, drop_first=False, honor_range=True, status=200):
        self.payload, self.drop_first, self.honor_range, self.status = payload, drop_first, honor_range, status
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path != "/eval_bundle.zip" or server.status != 200:
                    self.send_error(server.status if server.status != 200 else 404)
                    return
                body, start = server.payload, 0
                rng = self.headers.get("Range")
                if rng and server.honor_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.drop_first and len(server.requests) == 1:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _bundle_zip(tmp_path):
    import zipfile
    bundle = tmp_path / "src" / "eval_bundle"
    _write_bundle(str(bundle), _synthetic_tasks())
    zip_path = tmp_path / "src.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for root, _, files in os.walk(bundle):
            for name in files:
                p = os.path.join(root, name)
                zf.write(p, os.path.join("eval_bundle", os.path.relpath(p, bundle)))
    # pad with an incompressible member so the download is several chunks long
    with zipfile.ZipFile(zip_path, "a", zipfile.ZIP_STORED) as zf:
        zf.writestr("eval_bundle/padding.bin", np.random.default_rng(0).bytes(3 << 20))
    return zip_path.read_bytes()


def test_evaluate_core_downloads_the_bundle_once(tmp_path, monkeypatch):
    server = _BundleServer(_bundle_zip(tmp_path))
    try:
        monkeypatch.setenv("MLXCHAT_EVAL_BUNDLE_URL", server.url)
        out = evaluate_core(_synthetic_model(), CharTokenizer(), progress=False)
        out2 = evaluate_core(_synthetic_model(), CharTokenizer(), progress=False)
    finally:
        server.close()
    assert server.requests == [("/eval_bundle.zip", None)]  # the second run reads the unzipped copy
    base = os.environ["MLXCHAT_BASE_DIR"]
    assert os.path.exists(os.path.join(base, "eval_bundle", "core.yaml"))
    assert os.path.exists(os.path.join(base, "eval_bundle", "eval_data", "synthetic", "lm_task.jsonl"))
    assert not os.path.exists(os.path.join(base, "eval_bundle.zip.tmp"))
    assert out["results"] == pytest.approx({"mc_task": 6 / 8, "lm_task": 4 / 6, "schema_task": 4 / 5})
    assert out2 == out


@pytest.mark.parametrize("honor_range", [True, False])
def test_download_resumes_after_a_dropped_connection(tmp_path, honor_range, caplog):
    caplog.set_level(logging.INFO, logger="mlxchat")
    payload = _bundle_zip(tmp_path)
    server = _BundleServer(payload, drop_first=True, honor_range=honor_range)
    base = tmp_path / "base2"
    try:
        bundle_dir = download_eval_bundle(base_dir=str(base), url=server.url, backoff_s=0)
    finally:
        server.close()
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    # the second request asks for the missing bytes only (a server that ignores it resends everything)
    have = int(server.requests[1][1].split("=")[1].rstrip("-"))
    assert 0 < have < len(payload)
    assert (base / "eval_bundle.zip").read_bytes() == payload
    # the library logs instead of printing: the retry is a warning, the rest is info
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mlxchat.core_eval"]
    assert [m for lvl, m in records if lvl == "WARNING"] == [m for lvl, m in records if "retrying" in m]
    assert len([m for lvl, m in records if lvl == "WARNING"]) == 1 and "attempt 1/5 failed" in records[1][1]
    assert records[0] == ("INFO", f"Downloading {server.url} ...")
    assert os.path.getsize(os.path.join(bundle_dir, "padding.bin")) == 3 << 20
    tasks, baselines = load_core_config(bundle_dir)
    assert [t["label"] for t in tasks] == ["mc_task", "lm_task", "schema_task"]


def test_offline_gives_a_clear_message(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/eval_bundle.zip"
    with pytest.raises(EvalBundleError) as e:
        download_eval_bundle(base_dir=str(tmp_path / "b"), url=url, max_attempts=2, backoff_s=0)
    msg = str(e.value)
    assert url in msg and "eval_bundle.zip" in msg and "MLXCHAT_EVAL_BUNDLE_URL" in msg
    assert not os.path.exists(tmp_path / "b" / "eval_bundle")


def test_http_404_and_non_zip_payloads(tmp_path):
    server = _BundleServer(b"<html>not a zip</html>")
    try:
        with pytest.raises(EvalBundleError, match="HTTP 404"):
            download_eval_bundle(base_dir=str(tmp_path / "a"), url=server.url.replace("eval_bundle", "nope"), backoff_s=0)
        with pytest.raises(EvalBundleError, match="not a zip"):
            download_eval_bundle(base_dir=str(tmp_path / "b"), url=server.url, max_attempts=2, backoff_s=0)
    finally:
        server.close()
    assert not os.path.exists(tmp_path / "b" / "eval_bundle.zip")
    assert not os.path.exists(tmp_path / "b" / "eval_bundle.zip.tmp")
