"""
The run report (mlxchat/report.py): sections, the header (git, system), report.md with its summary
table, the per-step metrics log and the loss-curve PNG.
"""
import logging
import os
import subprocess
import sys

import numpy as np

from mlxchat import report as rep
from mlxchat.report import Report, get_report, log_metrics, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fill_a_run(r):
    """What a whole run leaves behind: sections from every stage and per-step losses."""
    r.reset()
    r.log(section="Tokenizer training", data=[{"vocab_size": 32768, "train_time": 12.5}])
    r.log(section="Base model training", data=[{"depth": 4}, {"Number of parameters": 36700160, "Minimum validation bpb": 1.23456}])
    r.log(section="Base model evaluation", data=[{"CORE": 0.1234}])
    r.log(section="Chat SFT", data=[{"Final val bpb": 0.9, "Skipped": None}, "a free-form line"])
    r.log(section="Chat evaluation sft", data=[{"ARC-Easy": 0.3125, "MMLU": 0.2891, "GSM8K": 0.0152, "ChatCORE": 0.0456}])
    r.log(section="Chat RL", data=[{"Task": "gsm8k"}])
    r.log(section="Chat evaluation rl", data=[{"GSM8K": 0.0406}])
    for step in range(1, 41):
        log_metrics("base", step, loss=6.0 * 0.96 ** step, lrm=1.0)
    log_metrics("base", 40, val_bpb=1.5)
    for step in range(1, 21):
        log_metrics("sft", step, loss=3.0 - 0.05 * step)
    for step in range(1, 11):
        log_metrics("rl", step, reward=0.1 * step, lrm=1 - step / 10)


def test_report_sections_summary_and_header():
    r = get_report()
    fill_a_run(r)
    out = r.generate()
    text = open(out).read()
    # sections in pipeline order, whatever order they were written in
    order = ["## Tokenizer training", "## Base model training", "## Base model evaluation", "## Chat SFT",
             "## Chat evaluation sft", "## Chat RL", "## Chat evaluation rl", "## Summary", "## Loss curves"]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    # values are formatted like nanochat's: floats .4f, big ints with commas, None left out
    assert "- Number of parameters: 36,700,160" in text and "- Minimum validation bpb: 1.2346" in text
    assert "- vocab_size: 32,768" in text and "Skipped" not in text and "a free-form line" in text
    # the summary table puts each number in its stage's column
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert rows["CORE"] == ["0.1234", "-", "-"]
    assert rows["GSM8K"] == ["-", "0.0152", "0.0406"]
    assert rows["ARC-Easy"] == ["-", "0.3125", "-"] and rows["HumanEval"] == ["-", "-", "-"]
    assert "Total wall clock time: 0h0m" in text
    # the header: this checkout's commit (asked from git here), the MLX version, the python version
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import mlx.core as mx
    assert f"- Commit: {commit}" in text
    assert f"- MLX: {mx.__version__}" in text and f"- Python: {sys.version.split()[0]}" in text
    assert "- Files: " in text and "Run started: " in text
    assert "![loss curves](loss_curves.png)" in text


def test_loss_curve_png_is_a_real_plot():
    r = get_report()
    fill_a_run(r)
    r.generate()
    png = os.path.join(r.directory, "loss_curves.png")
    with open(png, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    import matplotlib.image
    img = matplotlib.image.imread(png)[..., :3]  # floats in [0, 1]
    assert img.shape[0] > 200 and img.shape[1] > 1500  # three panels side by side (base, sft, rl)
    assert img.std() > 0.05  # not a blank canvas
    # the loss lines are drawn in matplotlib's tab:blue (#1f77b4), the val bpb point in tab:orange (#ff7f0e)
    blue = np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.06
    orange = np.abs(img - np.array([0xFF, 0x7F, 0x0E]) / 255).max(axis=-1) < 0.06
    assert blue.sum() > 300 and orange.sum() > 10
    # the base loss falls: in the left panel the curve's pixels sit higher on the left than on the right
    left_panel = blue[:, : img.shape[1] // 3]
    ys, xs = np.nonzero(left_panel)
    mid = np.median(xs)
    assert ys[xs < mid].mean() < ys[xs >= mid].mean()  # image rows grow downwards: smaller = higher
    # and the RL reward (right panel) rises
    ys, xs = np.nonzero(blue[:, 2 * img.shape[1] // 3:])
    mid = np.median(xs)
    assert ys[xs < mid].mean() > ys[xs >= mid].mean()


def test_metrics_log_keeps_the_last_value_of_a_step():
    for step in range(1, 6):
        log_metrics("base", step, loss=float(step))
    for step in range(3, 6):  # a resumed run logs steps 3..5 again
        log_metrics("base", step, loss=10.0 * step)
    import mlx.core as mx
    log_metrics("base", 6, loss=mx.array(1.5), note="x", skipped=None)
    records = read_metrics(os.path.join(rep.report_dir(), "metrics_base.jsonl"))
    assert list(records) == [1, 2, 3, 4, 5, 6]
    assert [records[s]["loss"] for s in records] == [1.0, 2.0, 30.0, 40.0, 50.0, 1.5]
    assert records[6]["note"] == "x" and "skipped" not in records[6]
    with open(os.path.join(rep.report_dir(), "metrics_base.jsonl"), "a") as f:
        f.write('{"step": 7, "loss"')  # a line cut short by a crash is ignored
    assert list(read_metrics(os.path.join(rep.report_dir(), "metrics_base.jsonl"))) == [1, 2, 3, 4, 5, 6]


def test_reset_starts_fresh_and_cli_copies(tmp_path, monkeypatch, capsys):
    r = get_report()
    fill_a_run(r)
    r.generate()
    assert capsys.readouterr().out == ""  # the library is quiet; the CLI says what it did
    rep.main(["reset"])
    names = sorted(os.listdir(r.directory))
    assert names == ["header.md"]
    assert f"reset the report in {r.directory}" in capsys.readouterr().out
    out_dir = tmp_path / "cwd"
    out_dir.mkdir()
    rep.main(["generate", "--copy-to", str(out_dir)])
    printed = capsys.readouterr().out
    assert f"wrote {os.path.join(r.directory, 'report.md')}" in printed and f"copied report.md to {out_dir}" in printed
    text = (out_dir / "report.md").read_text()
    assert "(no evaluation results yet)" in text and "(no per-step metrics logged)" in text
    assert not (out_dir / "loss_curves.png").exists()


def test_without_matplotlib_the_report_still_renders(monkeypatch):
    r = get_report()
    fill_a_run(r)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    text = open(r.generate()).read()
    assert "matplotlib is not installed" in text and "## Summary" in text


def test_generate_without_header_writes_one(caplog):
    r = Report(rep.report_dir())
    r.log(section="Chat SFT", data=[{"Final val bpb": 0.5}])
    with caplog.at_level(logging.WARNING, logger="mlxchat"):
        text = open(r.generate()).read()
    assert any(rec.name == "mlxchat.report" and "no header" in rec.getMessage() for rec in caplog.records)
    assert text.startswith("# mlxchat training report") and "## Chat SFT" in text
