"""
A pretraining run chooses its tokenizer (--tokenizer-dir) or trains one on its data as its first phase
(--train-tokenizer N): the tokenizer phase comes before the run starts, the tokenizer lands in
<run dir>/tokenizer where chat and eval of the run find it, a resumed run reuses it (never retrains),
a run of several ranks trains it once on rank 0, and a config without a usable tokenizer is refused
in the constructor with the folder named.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mlxchat.checkpoint_manager import build_model, find_tokenizer_dir
from mlxchat.common import get_base_dir
from mlxchat.pretrain import BaseTrainConfig, BaseTrainRun
from mlxchat.tokenizer import RustBPETokenizer, load_token_bytes, save_tokenizer, train_tokenizer
from mlxchat.training import ConfigError, TrainingError, read_metrics
from conftest import free_port_pair
from scripts import base_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, window_pattern="L", device_batch_size=2,
            total_batch_size=256, num_iterations=3, eval_every=-1, sample_every=-1, data_dir="demo")
SAMPLE = "The State of the Union is strong. Ünïcödé 2024!"


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


def small_tokenizer(vocab=300):
    """A tokenizer other than the run's: trained on a little of the demo corpus."""
    from mlxchat.tokenizer import text_iterator
    return RustBPETokenizer.train_from_iterator(text_iterator(200_000, 10_000, "demo", progress=False), vocab)


def install_base_tokenizer(vocab=300):
    tok = small_tokenizer(vocab)
    save_tokenizer(tok, os.path.join(get_base_dir(), "tokenizer"))
    return tok


def run_events(config):
    run = BaseTrainRun(config)
    return run, list(run)


def names(events, kind):
    return [e for e in events if e.kind == kind]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (3 steps) that trains its own 512-token tokenizer first; shared by the tests below."""
    tmp = tmp_path_factory.mktemp("phase")
    run_dir = str(tmp / "run")
    with pytest.MonkeyPatch.context() as mp:  # set up before the function-scoped fixtures are
        mp.setenv("MLXCHAT_DTYPE", "float32")
        mp.setenv("MLXCHAT_BASE_DIR", str(tmp / "base"))
        run, events = run_events(BaseTrainConfig(**TINY, train_tokenizer=512, checkpoint_dir=run_dir))
    return dict(run=run, events=events, run_dir=run_dir, tok_dir=os.path.join(run_dir, "tokenizer"))


def test_the_tokenizer_phase_comes_first_and_the_run_trains_with_it(trained):
    events, run_dir, tok_dir = trained["events"], trained["run_dir"], trained["tok_dir"]
    kinds = [(e.kind, getattr(e, "name", None)) for e in events]
    # loading, then the tokenizer phase, then loading the model again, all before Started
    start = kinds.index(("started", None))
    assert kinds.index(("phase", "loading")) < kinds.index(("phase", "tokenizer")) < start
    after = kinds.index(("phase", "tokenizer"))
    assert ("phase", "loading") in kinds[after + 1:start]
    logs = [e.text for e in events[after:start] if e.kind == "log"]
    done = [t for t in logs if "characters read" in t]
    assert len(done) == 1 and "vocab 512" in done[0] and " s, " in done[0], logs
    assert int(done[0].split("tokenizer: ")[1].split(" characters")[0].replace(",", "")) > 1_000_000
    assert any("vocab size: 512" == t for t in logs)

    # the tokenizer is saved in the run folder, complete
    tok = RustBPETokenizer.from_directory(tok_dir)
    assert tok.get_vocab_size() == 512
    assert load_token_bytes(tok_dir).shape == (512,)
    # trained on the demo corpus's train split, read as tok_train reads it (same iterator, same doc cap)
    again, _, _ = train_tokenizer(512, os.path.join(os.path.dirname(run_dir), "again"), "demo", 100_000_000)
    assert again.to_bytes() == tok.to_bytes()

    # it trained, with that vocabulary
    started = names(events, "started")[0]
    assert started.config["model_config"]["vocab_size"] == 512 and started.config["train_tokenizer"] == 512
    assert [e.step for e in names(events, "step")] == [1, 2, 3]
    assert events[-1].kind == "finished" and events[-1].status == "finished"
    # metrics.jsonl holds the tokenizer phase too (the run folder was known before it)
    recorded = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r.get("name") for r in recorded if r["event"] == "phase"][:3] == ["loading", "tokenizer", "loading"]


def test_chat_and_eval_of_the_run_use_its_own_tokenizer(trained):
    install_base_tokenizer(300)  # the base dir holds another tokenizer: it must not be picked
    assert find_tokenizer_dir(trained["run_dir"]) == trained["tok_dir"]
    model, tok, meta = build_model(trained["run_dir"], 3)
    assert tok.get_vocab_size() == 512 and meta["step"] == 3
    assert tok.encode(SAMPLE) == RustBPETokenizer.from_directory(trained["tok_dir"]).encode(SAMPLE)


def test_a_resumed_run_reuses_the_tokenizer_it_trained(trained, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained["run_dir"], run_dir)
    pkl = os.path.join(run_dir, "tokenizer", "tokenizer.pkl")
    os.utime(pkl, ns=(10 ** 18, 10 ** 18))  # an mtime no rewrite could keep
    before = open(pkl, "rb").read()
    run, events = run_events(BaseTrainConfig(**dict(TINY, num_iterations=5), train_tokenizer=512, checkpoint_dir=run_dir,
                                             resume_from_step=-2))
    assert os.stat(pkl).st_mtime_ns == 10 ** 18 and open(pkl, "rb").read() == before
    assert not [e for e in names(events, "phase") if e.name == "tokenizer"]
    assert any("reusing" in e.text and "vocab 512" in e.text for e in names(events, "log"))
    assert names(events, "started")[0].start_step == 3 and [e.step for e in names(events, "step")] == [4, 5]


def test_a_resumed_run_refuses_another_tokenizer(trained, tmp_path):
    other = str(tmp_path / "other")
    save_tokenizer(small_tokenizer(300), other)
    run = BaseTrainRun(BaseTrainConfig(**TINY, tokenizer_dir=other, checkpoint_dir=trained["run_dir"], resume_from_step=-2))
    with pytest.raises(TrainingError, match="was trained with the tokenizer in .*tokenizer, not the one in .*other"):
        run.run()
    # --train-tokenizer cannot resume a run that never trained one (a new tokenizer's ids would differ)
    bare = tmp_path / "bare"
    bare.mkdir()
    run = BaseTrainRun(BaseTrainConfig(**TINY, train_tokenizer=512, checkpoint_dir=str(bare), resume_from_step=-2))
    with pytest.raises(TrainingError, match="holds no tokenizer.pkl"):
        run.run()
    assert not (bare / "tokenizer").exists()


def test_tokenizer_dir_pointing_to_a_trained_folder(trained, tmp_path):
    install_base_tokenizer(300)
    run_dir = str(tmp_path / "second")
    run, events = run_events(BaseTrainConfig(**dict(TINY, num_iterations=1), tokenizer_dir=trained["tok_dir"],
                                             checkpoint_dir=run_dir))
    assert not [e for e in names(events, "phase") if e.name == "tokenizer"]
    assert names(events, "started")[0].config["model_config"]["vocab_size"] == 512
    # the run keeps a copy, so that its chat and eval do not depend on where the tokenizer came from
    _, tok, _ = build_model(run_dir, 1)
    assert tok.get_vocab_size() == 512 and tok.to_bytes() == RustBPETokenizer.from_directory(trained["tok_dir"]).to_bytes()


@pytest.mark.parametrize("changes, words", [
    (dict(train_tokenizer=512, tokenizer_dir="{tmp}"), "--tokenizer-dir and --train-tokenizer exclude each other"),
    (dict(tokenizer_dir="{tmp}"), r"--tokenizer-dir .*: no tokenizer.pkl in {tmp}; train one with `python -m "
                                  r"scripts.tok_train` .* or let this run train its own with --train-tokenizer N"),
    (dict(), r"no tokenizer in {base}/tokenizer .*`python -m scripts.tok_train` .*--train-tokenizer N"),
    (dict(train_tokenizer=264), r"--train-tokenizer must be 0 \(off\) or a vocab size >= 265"),
    (dict(train_tokenizer=-1), r"--train-tokenizer must be 0 \(off\) or a vocab size >= 265"),
])
def test_a_config_without_a_usable_tokenizer_is_refused(tmp_path, changes, words):
    changes = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in changes.items()}
    with pytest.raises(ConfigError, match=words.format(tmp=tmp_path, base=get_base_dir())):
        BaseTrainRun(BaseTrainConfig(**TINY, **changes))


def test_the_smallest_vocab_and_the_flags(tmp_path):
    BaseTrainRun(BaseTrainConfig(**TINY, train_tokenizer=265))  # bytes + specials, no merge: accepted
    install_base_tokenizer(300)
    BaseTrainRun(BaseTrainConfig(**TINY))  # the base dir's tokenizer, as before
    args = base_train.get_args(["--train-tokenizer", "4096", "--tokenizer-dir", str(tmp_path)])
    assert (args.train_tokenizer, args.tokenizer_dir) == (4096, str(tmp_path))
    defaults = base_train.get_args([])
    assert (defaults.train_tokenizer, defaults.tokenizer_dir) == (0, None)


# -----------------------------------------------------------------------------
# two ranks: rank 0 trains, rank 1 (a base dir of its own, as on a second Mac) receives it

RUNNER = r'''
import json, os, sys
out_dir, rank1_base = sys.argv[1:3]
if os.environ.get("MLX_RANK") == "1":
    os.environ["MLXCHAT_BASE_DIR"] = rank1_base  # before mlxchat is imported
import mlxchat  # noqa: F401
from scripts import base_train
result = base_train.main(sys.argv[3:])
with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
    json.dump({k: result[k] for k in ("losses", "rank", "world_size", "step", "checkpoint_dir")}, f)
'''



def test_two_ranks_train_the_tokenizer_once_on_rank_0(tmp_path):
    base0, base1, out = (str(tmp_path / d) for d in ("rank0", "rank1", "out"))
    os.makedirs(out)
    runner = os.path.join(out, "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    # 2 ranks x 1 micro-batch of 2 x 64 tokens = 256 tokens per step
    args = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--window-pattern", "L",
            "--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "2", "--eval-every", "-1",
            "--sample-every", "-1", "--data-dir", "demo", "--train-tokenizer", "300", "--model-tag", "dp",
            "--dist-timeout", "60"]
    env = dict(os.environ, MLXCHAT_BASE_DIR=base0, MLXCHAT_DTYPE="float32", PYTHONUNBUFFERED="1")
    launch = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    proc = subprocess.run([launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), "--",
                           sys.executable, runner, out, base1] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    # mlx.launch exits 0 even when a rank fails: it only warns "Node with rank r exited with code c"
    assert proc.returncode == 0 and "Node with rank" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2))
    assert (r0["world_size"], r0["step"], r1["step"]) == (2, 2, 2) and r0["losses"] == r1["losses"]
    tok_dir = os.path.join(r0["checkpoint_dir"], "tokenizer")
    assert r0["checkpoint_dir"].startswith(base0) and RustBPETokenizer.from_directory(tok_dir).get_vocab_size() == 300
    # rank 1 trained nothing and read nothing from disk: its base dir has no tokenizer anywhere
    assert not [f for _, _, files in os.walk(base1) for f in files if f == "tokenizer.pkl"]
    assert "characters read" in proc.stdout  # rank 0 trained (rank 1's console is quiet)
