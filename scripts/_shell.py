"""
What the training scripts (base_train, chat_sft, chat_rl) share around a library run: the command
line built from the run's config dataclass, a console display of its events (a rich progress bar with
ETA on a terminal, plain lines elsewhere), Ctrl-C mapped to the run's stop, wandb and the report card
as consumers of the events, and errors as one clean line with a non-zero exit status.
Not a script itself: `python -m scripts.base_train` etc. import it.
"""
import argparse
import dataclasses
import os
import signal
import sys

from mlxchat.common import format_duration
from mlxchat.training import event_lines, field_type, metric_text, step_line

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell expects of a job stopped by Ctrl-C
EXIT_HANG = 3  # the distributed watchdog: another rank stopped answering


# -----------------------------------------------------------------------------
# the command line from a config dataclass

def add_config_args(parser, config_cls):
    """One --flag per field of config_cls, with its default and help text."""
    for f in dataclasses.fields(config_cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, type=field_type(f),
                            choices=f.metadata.get("choices"), help=f.metadata.get("help", ""))


def config_from_args(config_cls, args):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)})


def launched_argv(argv=None):
    """The script's arguments (default sys.argv[1:]) without the "--" that mlx.launch needs in front of
    them: `mlx.launch ... --python python -m scripts.base_train -- --depth 12`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def make_parser(doc, config_cls):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb; also off when wandb is not installed)")
    p.add_argument("--log-every", type=int, default=1, help="a permanent progress line every N steps (on a terminal the "
                                                             "bar redraws in place in between)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MLXCHAT_DEBUG=1)")
    add_config_args(p, config_cls)
    return p


# -----------------------------------------------------------------------------
# process-wide things a script opts in to

def exit_on_hang(message):
    """The distributed watchdog's action: a collective blocked in C++ cannot be interrupted, so end the process."""
    sys.stdout.flush()
    sys.stderr.write("\n" + message + "\n")
    sys.stderr.flush()
    os._exit(EXIT_HANG)


def join_group(config):
    """Join the other ranks when started by mlx.launch (a no-op alone). Returns (rank, world_size)."""
    from mlxchat.distributed import compute_init
    rank, world_size, _ = compute_init(config.dist_backend, config.dist_timeout, on_hang=exit_on_hang)
    return rank, world_size


class CtrlC:
    """While in the `with` block, the first Ctrl-C asks the run to stop (it finishes its step, saves
    a checkpoint and ends as "stopped"); a second one aborts at once (KeyboardInterrupt, exit 130
    without a traceback). The previous handler is put back on exit."""

    def __init__(self, control, console):
        self.control, self.console, self.pressed = control, console, False

    def _on_sigint(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        self.control.stop()
        self.console.message("Ctrl-C: finishing this step, saving a checkpoint, then exiting (press again to abort without saving)")

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def run_main(main, argv=None):
    """Run a script's main(argv) as a command: the library's errors become one line on stderr and exit
    status 1 (the traceback only with --debug or MLXCHAT_DEBUG=1; bugs keep theirs), a Ctrl-C abort
    exits 130, and so does a run that Ctrl-C stopped (after its checkpoint), so that a `set -e`
    pipeline does not go on with a half-trained model."""
    from mlxchat.training import _known_errors
    argv = launched_argv(argv)
    debug = "--debug" in argv or os.environ.get("MLXCHAT_DEBUG", "") not in ("", "0")
    try:
        result = main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("\naborted (second Ctrl-C): no checkpoint written for the current step\n")
        sys.exit(EXIT_INTERRUPTED)
    except _known_errors() as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_ERROR)
    status = result.get("exit_status", 0) if isinstance(result, dict) else 0
    if status:
        sys.exit(status)


# -----------------------------------------------------------------------------
# the console: what the scripts print of a run's events

class Console:
    """Prints a run's events. On a terminal (rank 0): a rich progress bar (step N/TOTAL, loss, tok/s,
    MFU, elapsed, ETA) redrawn in place, with a permanent line every log_every steps; elsewhere: plain
    lines every log_every steps. Other ranks print nothing."""

    def __init__(self, log_every=1, rank=0, stream=None, show_loss=True):
        from rich.console import Console as RichConsole
        self.log_every = max(int(log_every), 1)
        self.show_loss = show_loss  # RL has no loss: its mean reward is in the step's extra figures
        self.quiet = rank != 0
        self.rich = RichConsole(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self.tty = self.rich.is_terminal
        self.progress = None
        self.task = None
        self.total = None

    def message(self, text):
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False)
        else:
            print(text, flush=True)

    def _start_bar(self, total):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                                 console=self.rich, transient=False, refresh_per_second=4)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, status="", eta="?")

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, event):
        if self.quiet:
            return
        kind = event.kind
        if kind == "started":
            self.total = event.total_steps
            if self.tty:
                self._start_bar(event.total_steps)
                self.progress.update(self.task, completed=event.start_step)
        elif kind == "step":
            self._step(event)
        elif kind == "finished":
            self.close()
        else:
            for line in event_lines(event):
                self.message(line)

    def _step(self, e):
        line = step_line(e, self.show_loss)
        if self.progress is not None:
            mfu = f"{e.mfu:.1f}%" if e.mfu is not None else "unknown"
            extra = "".join(f" | {k.replace('_', ' ')} {metric_text(v)}" for k, v in e.extra.items())
            loss = f" | loss {e.smooth_loss:.4f}" if self.show_loss else ""
            status = f"{loss[3:]}{extra} | tok/s {e.tok_per_sec:,.0f} | mfu {mfu}".lstrip(" |")
            self.progress.update(self.task, completed=e.step if e.total else e.progress * 100,
                                 total=e.total or 100, status=status, eta=format_duration(e.eta))
            if e.step % self.log_every == 0 and self.log_every > 1:
                self.message(line)
        elif e.step % self.log_every == 0 or e.step == e.total:
            self.message(line)


# -----------------------------------------------------------------------------
# consumers: wandb and the report card

class Wandb:
    """Logs Step and Eval events to a wandb run (rank 0, when --run names one and wandb is installed)."""

    def __init__(self, project, run_name, config, rank=0, every=1, console=None):
        self.run, self.every = None, every
        if run_name == "dummy" or rank != 0:
            return
        try:
            import wandb
        except ImportError:
            if console is not None:
                console.message("wandb is not installed: logging to the console only")
            return
        self.run = wandb.init(project=project, name=run_name, config=config)

    def __call__(self, event):
        if self.run is None:
            return
        if event.kind == "step" and event.step % self.every == 0:
            self.run.log({"step": event.step, "train/loss": event.smooth_loss, "train/lrm": event.lrm, "train/dt": event.dt,
                          "train/tok_per_sec": event.tok_per_sec, **{f"train/{k}": v for k, v in event.extra.items()}})
        elif event.kind == "eval":
            self.run.log({"step": event.step, **{f"eval/{k}": v for k, v in event.metrics.items()}})
        elif event.kind == "finished":
            self.run.finish()


class ReportCard:
    """The report card's per-step metrics (report/metrics_<stage>.jsonl, its loss plot) and, at the end,
    the run's section with its summary (mlxchat.report)."""

    def __init__(self, stage, section, user_config, loss_key="loss"):
        self.stage, self.section, self.user_config, self.loss_key = stage, section, user_config, loss_key

    def __call__(self, event):
        from mlxchat.report import get_report, log_metrics
        if event.kind == "step":
            values = {self.loss_key: event.smooth_loss, "lrm": event.lrm} if self.loss_key else {"lrm": event.lrm}
            log_metrics(self.stage, event.step, **values, **event.extra)
        elif event.kind == "eval":
            log_metrics(self.stage, event.step, **{k.replace("@", "_at_"): v for k, v in event.metrics.items()
                                                   if isinstance(v, (int, float))})
        elif event.kind == "finished" and event.status != "failed":
            summary = dict(event.summary)
            for k, v in summary.items():
                if "time" in k.lower() and isinstance(v, (int, float)):
                    summary[k] = format_duration(v)
            get_report().log(section=self.section, data=[self.user_config, summary])


def show_library_logs():
    """The library logs through `logging` (the "mlxchat" logger): show its INFO lines plainly."""
    from mlxchat.console import log_to_console
    log_to_console()


def drive(run, consumers, console):
    """Iterate the run on this (the main) thread, Ctrl-C mapped to its stop; every event goes to each
    consumer. Returns run.result with "exit_status": 0, or EXIT_INTERRUPTED after a Ctrl-C stop."""
    try:
        with CtrlC(run.control, console) as ctrl_c:
            for event in run:
                for consume in consumers:
                    consume(event)
    finally:
        console.close()
    result = dict(run.result or {})
    result["exit_status"] = EXIT_INTERRUPTED if ctrl_c.pressed and result.get("status") == "stopped" else 0
    return result
