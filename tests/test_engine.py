"""
Engine: greedy parity with nanochat's Engine on the fixture model, sampling statistics, the tool
state machine (with a scripted model), KV cache growth and replication.
"""
import os

import numpy as np
import pytest
import mlx.core as mx

from mlxchat.checkpoint_manager import load_torch_file
from mlxchat.engine import Engine, KVCache, sample_next_token
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.tokenizer import RustBPETokenizer


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


@pytest.fixture(scope="module")
def trained(fixture_dir, cases):
    model = GPT(GPTConfig(**cases["config"]))
    model.load_state_dict(load_torch_file(os.path.join(fixture_dir, "checkpoint/model_000062.pt")))
    tokenizer = RustBPETokenizer.from_directory(os.path.join(fixture_dir, "tokenizer"))
    return model, tokenizer


class NeverStopTokenizer:
    """Special-token ids no model emits: generation runs to max_tokens, no tool calls."""

    def encode_special(self, text):
        return -1

    def get_bos_token_id(self):
        return -1


# -----------------------------------------------------------------------------
# greedy parity with the reference

@pytest.mark.parametrize("compile", [True, False])
def test_greedy_matches_reference_engine_and_naive(trained, expected, compile):
    model, tokenizer = trained
    engine = Engine(model, tokenizer, compile=compile)
    prompt = expected["gen_prompt"].tolist()
    columns = list(engine.generate(prompt, max_tokens=24, temperature=0.0))
    generated = [col[0] for col, _ in columns]
    assert all(masks == [1] for _, masks in columns)
    assert prompt + generated == expected["gen_greedy"].tolist()  # nanochat's Engine (KV cache)
    assert generated == expected["gen_naive_greedy"].tolist()  # nanochat's GPT.generate (no cache)
    # several rows at temperature 0: identical rows, whatever the seed
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=24, temperature=0.0, seed=7)
    assert results == [expected["gen_greedy"].tolist()] * 3
    assert masks == [[0] * len(prompt) + [1] * 24] * 3


def test_long_greedy_generation_grows_the_cache(trained, expected):
    # max_tokens=None sizes the decode cache to the model's context (256): decoding 300 tokens must
    # grow it, and small spans make the compiled step retrace several times on the way. Every token
    # must be the argmax of one plain full-sequence forward over the result (teacher forcing).
    model, _ = trained
    engine = Engine(model, NeverStopTokenizer(), compile=True)
    engine.SPAN = 64
    prompt = expected["gen_prompt"].tolist()
    gen = engine.generate(prompt, num_samples=2, temperature=0.0)
    columns = [col for col, _ in (next(gen) for _ in range(300))]
    gen.close()
    assert all(a == b for a, b in columns)
    seq = prompt + [a for a, _ in columns]
    logits = np.array(model(mx.array([seq[:-1]]))[0, len(prompt) - 1:])
    top2 = np.sort(logits, axis=-1)[:, -2:]
    agree = logits.argmax(-1) == np.array(seq[len(prompt):])
    # a disagreement is only acceptable at a numerical tie
    assert np.all(agree | (top2[:, 1] - top2[:, 0] < 1e-4)), np.nonzero(~agree)


def test_compiled_and_eager_sampling_agree(trained, expected):
    model, tokenizer = trained
    prompt = expected["gen_prompt"].tolist()
    kw = dict(num_samples=4, max_tokens=30, temperature=0.9, top_k=40, top_p=0.95, seed=3)
    a = Engine(model, tokenizer, compile=True).generate_batch(prompt, **kw)
    b = Engine(model, tokenizer, compile=False).generate_batch(prompt, **kw)
    assert a == b


# -----------------------------------------------------------------------------
# sampling from logits

def draw(logits, n, key, **kw):
    """n independent draws from one (V,) logits vector, as one (n, V) batch."""
    batch = mx.broadcast_to(mx.array(logits, dtype=mx.float32)[None], (n, len(logits)))
    return np.array(sample_next_token(batch, key, **kw))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square(samples, probs):
    """Pearson's statistic over the categories with nonzero expected probability."""
    counts = np.bincount(samples, minlength=len(probs))
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token of probability zero"
    expected = probs[keep] * len(samples)
    return float(((counts[keep] - expected) ** 2 / expected).sum())


LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
CHI2_7DF_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_follows_softmax_of_scaled_logits(temperature):
    n = 20000
    samples = draw(LOGITS, n, mx.random.key(0), temperature=temperature)
    assert chi_square(samples, softmax(LOGITS / temperature)) < CHI2_7DF_P001
    # the test has power: the wrong temperature, or probabilities fed to categorical as if they were
    # logits (a bug of other ports), are rejected by a wide margin
    wrong_t = 1.0 if temperature != 1.0 else 0.5
    assert chi_square(samples, softmax(LOGITS / wrong_t)) > 10 * CHI2_7DF_P001
    assert chi_square(samples, softmax(softmax(LOGITS / temperature))) > 10 * CHI2_7DF_P001


def test_top_k_only_emits_the_k_largest():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=100) * 2
    top3 = np.argsort(-logits)[:3]
    samples = draw(logits, 20000, mx.random.key(1), temperature=1.5, top_k=3)
    assert set(samples.tolist()) == set(top3.tolist())
    probs = np.zeros_like(logits)
    probs[top3] = softmax(logits[top3] / 1.5)
    assert chi_square(samples, probs) < 13.82  # 2 degrees of freedom, p = 0.001


def test_top_p_only_emits_the_nucleus():
    probs = np.array([0.05, 0.5, 0.03, 0.3, 0.1, 0.02])
    logits = np.log(probs)
    # sorted: 0.5, 0.3, 0.1, 0.05, ... -> the smallest set reaching 0.85 is {0.5, 0.3, 0.1}
    nucleus = [1, 3, 4]
    samples = draw(logits, 20000, mx.random.key(2), temperature=1.0, top_p=0.85)
    assert set(samples.tolist()) == set(nucleus)
    renorm = np.zeros_like(probs)
    renorm[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert chi_square(samples, renorm) < 13.82
    # the top token always stays, however small top_p
    assert set(draw(logits, 1000, mx.random.key(3), temperature=1.0, top_p=0.01).tolist()) == {1}
    # with top-k: the nucleus is taken within the k (here {0.5, 0.3} renormalised: 0.625 < 0.7)
    samples = draw(logits, 5000, mx.random.key(4), temperature=1.0, top_k=2, top_p=0.7)
    assert set(samples.tolist()) == {1, 3}


def test_sampling_seeds_and_greedy():
    logits = np.zeros(1000)  # uniform: two seeds agreeing on 64 draws is ~impossible
    a = draw(logits, 64, mx.random.key(5))
    assert np.array_equal(a, draw(logits, 64, mx.random.key(5)))
    assert not np.array_equal(a, draw(logits, 64, mx.random.key(6)))
    for seed in range(3):
        assert set(draw(LOGITS, 32, mx.random.key(seed), temperature=0.0).tolist()) == {0}


# -----------------------------------------------------------------------------
# the engine's generation loop, with a scripted model

class ScriptedModel:
    """A stand-in for GPT: row r's i-th generated token is scripts[r][i] (by a logit margin of 10),
    whatever it is fed. Usable by both the eager and the compiled decode paths (the position may
    be an mx.array)."""

    def __init__(self, scripts, prompt_len, vocab_size):
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self._rotary_len = 640
        self.state = {}
        self.prompt_len = prompt_len
        table = np.zeros((len(scripts), max(len(s) for s in scripts) + 1, vocab_size), dtype=np.float32)
        for r, script in enumerate(scripts):
            for i, token in enumerate(script):
                table[r, i, token] = 10.0
        self.table = mx.array(table)

    def __call__(self, idx, kv_cache):
        B, T = idx.shape
        pos = kv_cache.get_pos()
        z = mx.zeros((B, 1, T, 8))
        kv_cache.insert_kv(0, z, z)
        kv_cache.prev_embedding = mx.zeros((B, 1, 8))
        kv_cache.advance(T)
        i = pos + T - self.prompt_len  # index of the token the last position predicts
        logits = mx.take(self.table[:B], mx.array(i).reshape(1), axis=1)
        return mx.broadcast_to(logits, (B, T, logits.shape[-1]))


@pytest.mark.parametrize("compile", [True, False])
def test_calculator_tool_forced_output_and_rows_finish_independently(trained, compile):
    _, tok = trained
    sp = tok.encode_special
    py_start, py_end = sp("<|python_start|>"), sp("<|python_end|>")
    out_start, out_end, end = sp("<|output_start|>"), sp("<|output_end|>"), sp("<|assistant_end|>")
    expr, bad_expr = tok.encode("12*34"), tok.encode("import os")
    forced = [out_start] + tok.encode(str(12 * 34)) + [out_end]
    filler = tok.encode("z")  # what the model "wants" at the positions the tool output takes over
    after = tok.encode(" so it is")
    scripts = [
        [py_start] + expr + [py_end] + filler * len(forced) + after + [end],  # uses the calculator
        [py_start] + tok.encode(" ok") + [end],  # finishes early, inside an unterminated python block
        [py_start] + bad_expr + [py_end] + after + [end],  # calculator refuses: nothing forced
    ]
    prompt = [tok.get_bos_token_id()] + tok.encode("what is 12 times 34?")
    model = ScriptedModel(scripts, len(prompt), tok.get_vocab_size())
    engine = Engine(model, tok, compile=compile)
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)

    gen0 = [py_start] + expr + [py_end] + forced + after
    assert results[0] == prompt + gen0
    assert masks[0] == [0] * len(prompt) + [1] * (len(expr) + 2) + [0] * len(forced) + [1] * len(after)
    assert results[1] == prompt + scripts[1][:-1]
    assert masks[1] == [0] * len(prompt) + [1] * (len(scripts[1]) - 1)
    assert results[2] == prompt + scripts[2][:-1]
    assert masks[2] == [0] * len(prompt) + [1] * (len(scripts[2]) - 1)

    # the streaming interface: one column per step, forced tokens masked 0, stops once all rows ended
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=40, temperature=0.0))
    assert len(columns) == len(gen0) + 1  # the longest row, then its <|assistant_end|>
    assert [col[0] for col, _ in columns] == gen0 + [end]
    assert [m[0] for _, m in columns] == [1] * (len(expr) + 2) + [0] * len(forced) + [1] * (len(after) + 1)
    assert all(m[1] == 1 and m[2] == 1 for _, m in columns)


def test_max_tokens_and_independent_first_tokens(trained):
    _, tok = trained
    V = tok.get_vocab_size()
    prompt = [tok.get_bos_token_id()] + tok.encode("hello")
    model = ScriptedModel([[0] * 20], len(prompt), V)
    model.table = mx.zeros((16, 21, V))  # uniform logits for every row and step
    engine = Engine(model, NeverStopTokenizer())
    columns = list(engine.generate(prompt, num_samples=16, max_tokens=7, temperature=1.0, seed=1))
    assert len(columns) == 7 and all(len(col) == 16 for col, _ in columns)
    # the first token is drawn independently per row (not one draw copied to every row)
    assert len(set(columns[0][0])) > 8
    again = list(engine.generate(prompt, num_samples=16, max_tokens=7, temperature=1.0, seed=1))
    other = list(engine.generate(prompt, num_samples=16, max_tokens=7, temperature=1.0, seed=2))
    assert again == columns and other != columns


# -----------------------------------------------------------------------------
# KV cache

def test_kv_cache_grows_and_keeps_contents():
    cache = KVCache(2, 3, 4, 8, num_layers=2)
    ks, vs = [], []
    for step in range(3):  # 3 + 3 + 3 tokens into a cache of 4: grows to one chunk of 256
        k, v = mx.random.normal((2, 3, 3, 8)), mx.random.normal((2, 3, 3, 8))
        for layer in range(2):
            k_all, v_all = cache.insert_kv(layer, k + layer, v - layer)
            assert k_all.shape == (2, 3, 3 * (step + 1), 8)
        cache.advance(3)
        ks.append(k)
        vs.append(v)
    assert cache.capacity == KVCache.GROW and cache.get_pos() == 9
    for layer in range(2):
        np.testing.assert_array_equal(np.array(cache.k[layer][:, :, :9]), np.array(mx.concatenate(ks, axis=2) + layer))
        np.testing.assert_array_equal(np.array(cache.v[layer][:, :, :9]), np.array(mx.concatenate(vs, axis=2) - layer))


def test_kv_cache_prefill_replicates_rows():
    src = KVCache(1, 2, 16, 4, num_layers=3)
    k, v = mx.random.normal((1, 2, 10, 4)), mx.random.normal((1, 2, 10, 4))
    for layer in range(3):
        src.insert_kv(layer, k * layer, v * layer)
    src.advance(10)
    src.prev_embedding = mx.random.normal((1, 1, 5))
    dst = KVCache(4, 2, 6, 4, num_layers=3)  # smaller than the prompt: has to grow
    dst.prefill(src)
    assert dst.get_pos() == 10 and dst.capacity >= 10
    for layer in range(3):
        for row in range(4):
            np.testing.assert_array_equal(np.array(dst.k[layer][row, :, :10]), np.array(k[0] * layer))
            np.testing.assert_array_equal(np.array(dst.v[layer][row, :, :10]), np.array(v[0] * layer))
    assert dst.prev_embedding.shape == (4, 1, 5)
    np.testing.assert_array_equal(np.array(dst.prev_embedding), np.broadcast_to(np.array(src.prev_embedding), (4, 1, 5)))
    with pytest.raises(AssertionError):
        dst.prefill(src)  # only into a fresh cache


def test_compiled_steps_see_updated_weights(fixture_dir, cases, expected):
    # the weights are inputs of the compiled step, not constants captured when it was traced: an
    # Engine used during RL training must decode with the current weights
    model = GPT(GPTConfig(**cases["config"]))
    model.load_state_dict(load_torch_file(os.path.join(fixture_dir, "checkpoint/model_000062.pt")))
    engine = Engine(model, NeverStopTokenizer(), compile=True)
    prompt = expected["gen_prompt"].tolist()
    before, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0)
    model.lm_head.weight = -model.lm_head.weight  # greedy now picks what was least likely
    after, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0)
    eager, _ = Engine(model, NeverStopTokenizer(), compile=False).generate_batch(prompt, max_tokens=8, temperature=0.0)
    assert after == eager and after != before
    # the same for the attention weights, which the Engine concatenates once per generation: a
    # second generation must see new q/k/v weights (against the cache-free naive generation)
    for block in model.transformer["h"]:
        block.attn.c_v.weight = -block.attn.c_v.weight
        block.attn.c_k.weight = 2.0 * block.attn.c_k.weight
    changed, _ = engine.generate_batch(prompt, max_tokens=8, temperature=0.0)
    naive = [int(t) for t in model.generate(prompt, max_tokens=8, temperature=0.0)]
    assert changed[0][len(prompt):] == naive and changed != after


def test_one_engine_per_thread(trained, expected):
    # a server runs one Engine per worker thread, all on one model: concurrent generations must
    # give exactly what they give one at a time
    import threading
    model, tokenizer = trained
    prompt = expected["gen_prompt"].tolist()
    run = lambda seed: Engine(model, tokenizer, compile=True).generate_batch(
        prompt, num_samples=2, max_tokens=20, temperature=1.0, top_k=50, seed=seed)
    alone = {seed: run(seed) for seed in range(4)}
    together = {}
    threads = [threading.Thread(target=lambda s=seed: together.__setitem__(s, run(s))) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert len({str(r) for r in alone.values()}) > 1  # the seeds do matter
