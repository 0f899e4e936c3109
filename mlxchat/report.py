"""
The run report: each stage of a run (tokenizer, base training, SFT, RL, evaluations) writes its
numbers to a markdown section in {base_dir}/report/, and `generate` puts them together into one
report.md with a summary table and a plot of the loss curves. (nanochat had the same report.py from
its first commit until 2026-07-02; this is its layout, with Mac/MLX system info in the header.)

    python -m mlxchat.report reset      # start a new run: header.md with git/system info; old sections and logs go
    python -m mlxchat.report generate   # report/report.md + report/loss_curves.png, both copied to the current folder

From a training script:

    from mlxchat.report import get_report, log_metrics
    log_metrics("base", step, loss=loss, lrm=lrm)     # per step: one JSON line in report/metrics_base.jsonl
    get_report().log(section="Base model training", data=[user_config, {"Minimum validation bpb": 0.81}])

Section files are named by the section title (lower case, spaces -> dashes) and generate() knows their
order. The summary table reads these keys: "CORE" from the base model sections, and "ARC-Easy",
"ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE" from "Chat evaluation sft" / "Chat evaluation rl".
The loss plot needs matplotlib (the `dev` extra); without it the report says so and has no plot.
"""
import argparse
import datetime
import glob
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys

from mlxchat.common import get_base_dir

from mlxchat.console import log_to_console
from mlxchat.distributed import get_rank

logger = logging.getLogger("mlxchat.report")  # not __name__: that is "__main__" under python -m mlxchat.report

# the order sections appear in report.md (file name = slug of the section title)
SECTION_ORDER = [
    "tokenizer-training", "tokenizer-evaluation",
    "base-model-training", "base-model-loss", "base-model-evaluation",
    "chat-sft", "chat-evaluation-sft",
    "chat-rl", "chat-evaluation-rl",
]
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slugify(text):
    return text.lower().replace(" ", "-")


def report_dir():
    d = os.path.join(get_base_dir(), "report")
    os.makedirs(d, exist_ok=True)
    return d


# -----------------------------------------------------------------------------
# per-step metrics (the loss curves)

def log_metrics(stage, step, **values):
    """Append {"step", "time", **values} as one JSON line to report/metrics_{stage}.jsonl (rank 0 only).
    Values may be Python numbers or 0-d mx.arrays. A resumed run may log a step again: the plot
    keeps the last value logged for each step."""
    if get_rank() != 0:
        return
    record = {"step": int(step), "time": round(datetime.datetime.now().timestamp(), 3)}
    for k, v in values.items():
        if v is None:
            continue
        v = v.item() if hasattr(v, "item") else v
        record[k] = float(v) if isinstance(v, (int, float)) else v
    with open(os.path.join(report_dir(), f"metrics_{stage}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path):
    """{step: record} from a metrics file, the last record of each step winning (resumes)."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            by_step.setdefault(record["step"], {}).update(record)
    return dict(sorted(by_step.items()))


def plot_loss_curves(out_path, directory=None):
    """Draw the train loss (RL: the mean reward) and the val bpb, where logged, of every stage with a
    metrics log into a PNG, one panel per stage.
    Returns the path, or None when there is nothing to plot. Raises ImportError without matplotlib."""
    directory = directory or report_dir()
    series = {}
    for path in sorted(glob.glob(os.path.join(directory, "metrics_*.jsonl"))):
        stage = os.path.basename(path)[len("metrics_"):-len(".jsonl")]
        records = read_metrics(path)
        # the training curve: the loss, or for RL (no loss to speak of) the mean reward
        key = "loss" if any(isinstance(r.get("loss"), float) for r in records.values()) else "reward"
        loss = [(s, r[key]) for s, r in records.items() if isinstance(r.get(key), float)]
        val = [(s, r["val_bpb"]) for s, r in records.items() if isinstance(r.get("val_bpb"), float)]
        if loss or val:
            series[stage] = (key, loss, val)
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    order = {"base": 0, "sft": 1, "rl": 2}
    stages = sorted(series, key=lambda s: (order.get(s, 9), s))
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        key, loss, val = series[stage]
        if loss:
            ax.plot([s for s, _ in loss], [v for _, v in loss], color="tab:blue", linewidth=1.5, label=f"train {key}")
            ax.set_ylabel("train loss (nats/token)" if key == "loss" else "mean reward", color="tab:blue")
        if val:
            ax2 = ax.twinx() if loss else ax
            ax2.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:orange", label="val bpb")
            ax2.set_ylabel("val bits per byte", color="tab:orange")
        ax.set_xlabel("step")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# -----------------------------------------------------------------------------
# the header: git, hardware, software, code size

def _git(*args):
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_info():
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"Branch": "unknown", "Commit": "unknown (not a git checkout)", "Dirty": "unknown", "Message": ""}
    status = _git("status", "--porcelain") or ""
    message = (_git("log", "-1", "--pretty=%s") or "").strip()
    return {"Branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown", "Commit": commit,
            "Dirty": "yes" if status else "no", "Message": message[:80]}


def system_info():
    import mlx.core as mx
    from mlxchat.common import dtype_name, get_compute_dtype
    from mlxchat.hardware import backend_name, device_memory_bytes, device_name
    info = {"Platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
            "CPU": platform.processor() or platform.machine(), "CPU cores": os.cpu_count()}
    try:
        info["Memory"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    info["MLX device"] = f"{device_name()} ({backend_name()})"
    mem = device_memory_bytes()
    if mem:
        info["Device memory"] = f"{mem / 2**30:.1f} GiB"
    info["Compute dtype"] = dtype_name(get_compute_dtype())
    info["Python"] = sys.version.split()[0]
    info["MLX"] = getattr(mx, "__version__", "unknown")
    return info


def code_size():
    """nanochat's "bloat" numbers: characters, lines and files of the tracked source, ~tokens = chars/4."""
    files = (_git("ls-files") or "").splitlines()
    exts = (".py", ".md", ".html", ".toml", ".sh", ".yml", ".yaml")
    chars = lines = count = 0
    for name in files:
        if not name.endswith(exts):
            continue
        try:
            with open(os.path.join(REPO_ROOT, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        chars += len(text)
        lines += text.count("\n")
        count += 1
    return {"Characters": chars, "Lines": lines, "Files": count, "Tokens (approx)": chars // 4}


def format_value(value):
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def header_markdown():
    now = datetime.datetime.now().strftime(TIMESTAMP_FORMAT)
    out = ["# mlxchat training report", "", f"Generated: {now}", "", "## Environment", ""]
    for title, data in (("Git", git_info()), ("System", system_info()), ("Code size", code_size())):
        out.append(f"### {title}")
        out += [f"- {k}: {format_value(v)}" for k, v in data.items()]
        out.append("")
    out.append(f"Run started: {now}")
    out.append("")
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------

class Report:
    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def log(self, section, data):
        """Write one section: data is a list of strings (written as lines) and dicts (written as
        "- key: value" lines; None values left out). Returns the file's path."""
        path = os.path.join(self.directory, f"{slugify(section)}.md")
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now().strftime(TIMESTAMP_FORMAT)}", ""]
        for item in data:
            if not item:
                continue
            if isinstance(item, str):
                lines.append(item)
            else:
                lines += [f"- {k}: {format_value(v)}" for k, v in item.items() if v is not None]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")
        return path

    def reset(self):
        """Start a new report: remove the sections, metrics logs and outputs, write a fresh header."""
        for pattern in ("*.md", "metrics_*.jsonl", "*.png"):
            for path in glob.glob(os.path.join(self.directory, pattern)):
                os.remove(path)
        with open(os.path.join(self.directory, "header.md"), "w", encoding="utf-8") as f:
            f.write(header_markdown())

    def generate(self, copy_to=None):
        """Concatenate header + sections (in SECTION_ORDER) + summary table + loss plot into
        report.md; copy it (and the plot) to copy_to if given. Returns the report's path."""
        header_path = os.path.join(self.directory, "header.md")
        if not os.path.exists(header_path):
            logger.warning(f"no header in {self.directory} (run `python -m mlxchat.report reset` at the start of a run): "
                           f"writing one now")
            with open(header_path, "w", encoding="utf-8") as f:
                f.write(header_markdown().replace("Run started:", "Run started (header written late):"))
        with open(header_path, encoding="utf-8") as f:
            header = f.read()
        start = _parse_time(re.search(r"^Run started[^:]*: (.+)$", header, re.M))
        parts, last_time, metrics = [header], None, {}
        known = set(SECTION_ORDER) | {"header", "report"}
        extra = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(self.directory, "*.md")))
        for slug in SECTION_ORDER + [s for s in extra if s not in known]:
            path = os.path.join(self.directory, f"{slug}.md")
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            parts.append(text)
            t = _parse_time(re.search(r"^timestamp: (.+)$", text, re.M))
            if t is not None:
                last_time = t if last_time is None else max(last_time, t)
            metrics[slug] = dict(re.findall(r"^- ([^:\n]+): (.+)$", text, re.M))

        parts.append(summary_markdown(metrics, start, last_time))
        png = os.path.join(self.directory, "loss_curves.png")
        try:
            if plot_loss_curves(png, self.directory):
                parts.append("## Loss curves\n\n![loss curves](loss_curves.png)\n")
            else:
                parts.append("## Loss curves\n\n(no per-step metrics logged)\n")
        except ImportError:
            png = None
            parts.append("## Loss curves\n\n(matplotlib is not installed: `pip install -e '.[dev]'` for the plot)\n")
        out = os.path.join(self.directory, "report.md")
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(p.rstrip("\n") + "\n" for p in parts))
        if copy_to:
            shutil.copy(out, os.path.join(copy_to, "report.md"))
            if png and os.path.exists(png):
                shutil.copy(png, os.path.join(copy_to, "loss_curves.png"))
        return out


def _parse_time(match):
    if not match:
        return None
    try:
        return datetime.datetime.strptime(match.group(1).strip(), TIMESTAMP_FORMAT)
    except ValueError:
        return None


def summary_markdown(metrics, start, last_time):
    """The table of headline metrics per stage (BASE / SFT / RL), then the total wall clock time."""
    def base_value(key):
        for slug in ("base-model-evaluation", "base-model-training"):
            if key in metrics.get(slug, {}):
                return metrics[slug][key]
        return None
    columns = {"BASE": {"CORE": base_value("CORE")},
               "SFT": metrics.get("chat-evaluation-sft", {}), "RL": metrics.get("chat-evaluation-rl", {})}
    rows = ["CORE"] + CHAT_METRICS
    lines = ["## Summary", ""]
    if not any(columns[c].get(r) for c in columns for r in rows):
        lines.append("(no evaluation results yet)")
    else:
        lines += ["| Metric | BASE | SFT | RL |", "|--------|------|-----|----|"]
        for r in rows:
            lines.append(f"| {r} | " + " | ".join(columns[c].get(r) or "-" for c in columns) + " |")
    lines.append("")
    if start is not None and last_time is not None:
        seconds = max((last_time - start).total_seconds(), 0)
        lines.append(f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m")
    else:
        lines.append("Total wall clock time: unknown")
    return "\n".join(lines) + "\n"


class DummyReport:
    def log(self, *args, **kwargs):
        return None

    def reset(self, *args, **kwargs):
        return None

    def generate(self, *args, **kwargs):
        return None


def get_report():
    """The Report of this run's base dir on rank 0, a no-op elsewhere."""
    return Report(report_dir()) if get_rank() == 0 else DummyReport()


def main(argv=None):
    parser = argparse.ArgumentParser(description="mlxchat's run report (in $MLXCHAT_BASE_DIR/report)")
    parser.add_argument("command", choices=["generate", "reset"])
    parser.add_argument("--copy-to", default=".", help="generate: also copy report.md (and the plot) here ('' = don't)")
    args = parser.parse_args(argv)
    log_to_console()
    report = get_report()
    if isinstance(report, DummyReport):
        return  # not rank 0
    if args.command == "reset":
        report.reset()
        print(f"reset the report in {report.directory}")
    else:
        out = report.generate(copy_to=args.copy_to or None)
        print(f"wrote {out}")
        if args.copy_to:
            print(f"copied report.md to {os.path.abspath(args.copy_to)}")


if __name__ == "__main__":
    main()
