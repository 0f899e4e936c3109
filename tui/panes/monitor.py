"""
Pane 2, Monitor: one run as it trains. It shows a RunState (mlxchat.runs: what the run's events
say, plain numbers and strings) and the machine's figures the app gathers with psutil; it never
reads files, threads or MLX itself, so the same view serves a run of this process and one followed
through its metrics.jsonl.

    header     name · stage · state (coloured), size and device
    progress   a bar, step N/TOTAL, percent, elapsed, ETA
    warnings   swapping (reverse red), the last notice, a failed run's error in full (red box)
    plots      training loss (raw faint, smoothed bright) and val bpb, over the same steps
    stats      tok/s, MFU, step time, lr multiplier with sparklines; memory; CPU; last checkpoint
    samples    the latest greedy samples, prompt → completion
    log        the last lines of the run's log

Cheap by construction: show() does nothing unless the state's `updated` changed; each block draws
its text at render time for the size it was given, and keeps it until its data or size change.
Where the terminal is small the least important blocks go (log, then samples), by size classes.
"""
import textwrap
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from rich.text import Text
from textual.containers import Horizontal, Vertical
from textual.css.scalar import Scalar
from textual.widget import Widget
from textual.widgets import Static

from tui.format import age, count, duration, gib, number, percent, seconds
from tui.widgets.plot import LinePlot, sparkline

if TYPE_CHECKING:
    from mlxchat.runs import RunState

EMPTY_TEXT = "No run yet. Configure one in pane 1 (r starts it), or open one in Runs (4)."
SWAP_TEXT = "SWAPPING: training will be slow — lower --device-batch-size or --memory-limit"
STATE_STYLES = {
    "running": "bold green",
    "paused": "bold yellow",
    "failed": "bold red",
    "finished": "dim",
    "stopped": "dim",
    "owner gone": "bold dark_orange",
}
BUSY_STYLE = "bold cyan"  # loading, tokenizing, compiling, evaluating, saving, ...: working, not yet/not now stepping
ENDED = ("finished", "stopped", "failed", "owner gone")
RAW_STYLE = "grey42"
SMOOTH_STYLE = "bold deep_sky_blue1"
BPB_STYLE = "bold orchid"
SPARK_STYLE = "deep_sky_blue4"
LABEL_WIDTH = 8
# how the rows are shared when the pane is short (an 80x24 terminal leaves the pane about 20 rows
# under the app's status line, tabs and footer): the plots come first, then the samples, then the log
STATS_ROWS = 4
PLOT_ROWS = 8  # title, 6 rows of dots (24 dot rows), x axis
LOG_ROWS = 5  # its title and 4 lines
SHORT_SAMPLES = 3  # samples shown when the log does not fit
BPB_MIN_WIDTH = 60  # below this the val bpb plot goes; the loss plot keeps the width


class Block(Widget):
    """Text drawn for the size the layout gives this block (a bar or a sparkline fills the width, a
    tail shows the lines that fit), by `build(width, height)`; rebuilt only after changed() or a
    resize."""

    def __init__(self, build: Callable[[int, int], Text], **kwargs):
        super().__init__(**kwargs)
        self._build = build
        self._version = 0
        self._key, self._text = None, Text()

    def changed(self):
        self._version += 1
        self.refresh()

    def render(self):
        key = (self.size, self._version)
        if key != self._key:
            self._key = key
            self._text = self._build(self.size.width, self.size.height) if self.size.area else Text()
        return self._text


def _line(*parts, width):
    """One line of (text, style) parts, cut at `width` with an ellipsis, never wrapped."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for part, style in parts:
        text.append(part, style=style)
    text.truncate(width, overflow="ellipsis")
    return text


def _lines(lines):
    return Text("\n").join(lines) if lines else Text()


def _last(values):
    for v in reversed(values):
        if v is not None:
            return v
    return None


class MonitorPane(Vertical):
    """The Monitor pane. `now` is the clock used for ages ("3 min ago"); everything else shown comes
    from the state, so a fixed state and a fixed clock draw the same screen every time."""

    def __init__(self, *, now: Callable[[], float] = time.time, **kwargs):
        super().__init__(**kwargs)
        self._now = now
        self._state = None
        self._updated = None
        self._system = {}
        self._cpu = deque(maxlen=120)
        self._stats_drawn_at = 0.0

    def compose(self):
        yield Static(EMPTY_TEXT, id="mon-empty")
        yield Block(self._header, id="mon-header", classes="mon-part")
        yield Block(self._progress, id="mon-progress", classes="mon-part")
        yield Static(SWAP_TEXT, id="mon-swap", classes="mon-part")
        yield Block(self._notice, id="mon-notice", classes="mon-part")
        yield Static(id="mon-error", classes="mon-part")
        with Horizontal(id="mon-plots", classes="mon-part"):
            yield LinePlot("loss", id="mon-loss", empty_text="waiting for the first step")
            yield LinePlot("val bpb", id="mon-bpb", empty_text="no eval yet")
        yield Block(self._stats, id="mon-stats", classes="mon-part")
        yield Block(self._samples, id="mon-samples", classes="mon-part")
        yield Block(self._log, id="mon-log", classes="mon-part")

    def on_mount(self):
        self.query_one("#mon-samples").border_title = "samples"
        self.query_one("#mon-log").border_title = "log"
        if self._state is None:
            self.clear()

    def on_resize(self, event):
        self._fit()

    def _fit(self):
        """Drop what the pane's height cannot hold, least important first (log, then samples), so
        that no block shows cut in half. Called when the size or the set of warning lines changes."""
        width, height = self.size
        if not height:
            return
        fixed = 2 + STATS_ROWS + self.has_class("-swapping") + self.has_class("-notice")
        if self.has_class("-failed"):
            error = self._error_text()
            fixed += 2 + sum(max(1, len(textwrap.wrap(line, max(width - 4, 1))))
                             for line in error.splitlines() or [""])
        spare = height - fixed - PLOT_ROWS
        s = self._state
        wanted = 1 + max(1, len(s.samples[1]) if s is not None and s.samples else 1)
        roomy = spare >= wanted + LOG_ROWS + 2  # 2: a blank row above the plots and above the stats
        samples = min(wanted, spare if roomy else 1 + SHORT_SAMPLES, spare)
        self.set_class(not roomy, "-no-log")
        self.set_class(samples < 2, "-no-samples")
        block = self.query_one("#mon-samples")
        if samples >= 2 and block.styles.height != Scalar.parse(str(samples)):
            block.styles.height = samples
        self.set_class(width < BPB_MIN_WIDTH, "-narrow")

    # -- what the app calls

    def show(self, state: "RunState"):
        """Show `state`; cheap when nothing changed since the last call (the app may call it a few
        times a second)."""
        if state is None:
            self.clear()
            return
        # `updated` moves with every record applied; the state and error can also change without a
        # record (the app marks a run refused as failed, a follower finds its owner gone)
        key = (state.updated, state.state, state.error)
        if state is self._state and key == self._updated:
            if self._now() - self._stats_drawn_at >= 5:  # ages move on while the run is quiet
                self._redraw_stats()
            return
        self._state, self._updated = state, key
        self.remove_class("-empty")
        failed = state.state == "failed"
        self.set_class(failed, "-failed")
        if failed:
            self.query_one("#mon-error", Static).update(Text(self._error_text()))
        self.set_class(bool(state.notices), "-notice")
        self._show_plots(state)
        for block in ("#mon-header", "#mon-progress", "#mon-notice", "#mon-log"):
            self.query_one(block, Block).changed()
        samples = self.query_one("#mon-samples", Block)
        samples.border_title = f"samples at step {state.samples[0]:,}" if state.samples else "samples"
        samples.changed()
        self._fit()
        self._redraw_stats()

    def set_system(self, stats: dict):
        """psutil figures: rss_gib, ram_used_gib, ram_total_gib, swap_used_gib, swap_total_gib,
        cpu_percent, swapping."""
        self._system = dict(stats)
        if stats.get("cpu_percent") is not None:
            self._cpu.append(stats["cpu_percent"])
        if bool(stats.get("swapping")) != self.has_class("-swapping"):
            self.set_class(bool(stats.get("swapping")), "-swapping")
            self._fit()
        self._redraw_stats()

    def clear(self):
        """No run to show."""
        self._state, self._updated = None, None
        self.remove_class("-failed", "-notice")
        self.add_class("-empty")
        for plot in self.query(LinePlot):
            plot.clear()

    def toggle_log_y(self):
        """Loss on a log axis (or back): the first steps' high loss no longer flattens the rest.
        Returns whether it is now logarithmic."""
        loss = self.query_one("#mon-loss", LinePlot)
        loss.log_y = not loss.log_y
        if self._state is not None:
            self._show_plots(self._state)  # the title says which axis
        return loss.log_y

    def _error_text(self):
        s = self._state
        return f"failed: {s.error or 'no message'}" if s is not None else ""

    # -- plots

    def _show_plots(self, state):
        loss = self.query_one("#mon-loss", LinePlot)
        bpb = self.query_one("#mon-bpb", LinePlot)
        loss.set_series("raw", state.loss_history, RAW_STYLE)
        loss.set_series("smooth", state.smooth_loss_history, SMOOTH_STYLE)
        bpb.set_series("val bpb", state.val_bpb_history, BPB_STYLE)
        # both plots over the same steps, so that a bend in one lines up with the other
        first = state.loss_history[0][0] if state.loss_history else state.start_step
        last = max(state.step, state.val_bpb_history[-1][0] if state.val_bpb_history else 0)
        x_range = (first, last) if last > first else None
        loss.set_x_range(x_range)
        bpb.set_x_range(x_range)
        title = Text("loss", style="bold")
        if state.smooth_loss_history:
            title.append(f" {number(state.smooth_loss_history[-1][1])}", style=SMOOTH_STYLE)
        if loss.log_y:
            title.append(" log axis", style="dim")
        loss.title = title
        title = Text("val bpb", style="bold")
        if state.last_val_bpb is not None:
            title.append(f" {state.last_val_bpb:.4f}", style=BPB_STYLE)
            title.append(f" at step {state.val_bpb_history[-1][0]:,}" if state.val_bpb_history else "", style="dim")
        bpb.title = title

    # -- blocks (each builds its text for its size)

    def _header(self, width, height):
        s = self._state
        if s is None:
            return Text()
        state = s.state or "starting"
        state_part = [("  ·  ", "dim"), (state, STATE_STYLES.get(state, BUSY_STYLE))]
        stage_part = [("  ·  ", "dim"), (s.stage or "?", "")]
        name = s.name or "(unnamed run)"
        # the state matters most: on a narrow screen the stage goes first, then the name is shortened
        if len(name) + 5 + len(s.stage or "?") + 5 + len(state) > width:
            stage_part = []
        name_room = max(width - 5 - len(state), 1)
        line = _line(*([(name if len(name) <= name_room else name[:name_room - 1] + "…", "bold")]
                       + stage_part + state_part), width=width)
        right = []
        depth = (s.config or {}).get("depth")
        if depth:
            right.append(f"d{depth}")
        if s.num_params:
            right.append(count(s.num_params, "params"))
        if s.device:
            right.append(s.device)
        right_text = "  " + " · ".join(right)
        if right and len(line) + len(right_text) <= width:
            line.append(" " * (width - len(line) - len(right_text)) + right_text, style="dim")
        return line

    def _progress(self, width, height):
        s = self._state
        if s is None:
            return Text()
        fraction = min(max(s.progress or 0.0, 0.0), 1.0)
        step = f"step {s.step:,}/{s.total_steps:,}" if s.total_steps else f"step {s.step:,}"
        parts = [step, percent(fraction), f"elapsed {duration(s.elapsed)}"]
        if s.state not in ENDED:
            parts.append(f"ETA {duration(s.eta)}")
        while len(parts) > 1 and len(" · ".join(parts)) > width:
            parts.pop()  # whole figures go, from the least needed, rather than one cut in half
        words = " · ".join(parts)
        bar_width = width - len(words) - 1
        line = Text(no_wrap=True)
        if bar_width >= 10:
            done = round(fraction * bar_width)
            colour = "red" if s.state == "failed" else "yellow" if s.state == "paused" else "green"
            line.append("━" * done, style=colour)
            line.append("━" * (bar_width - done), style="grey23")
            line.append(" ")
        line.append(words)
        line.truncate(width, overflow="ellipsis")
        return line

    def _notice(self, width, height):
        s = self._state
        if s is None or not s.notices:
            return Text()
        return _line((f"! {s.notices[-1]}", "yellow"), width=width)

    def _redraw_stats(self):
        self._stats_drawn_at = self._now()
        self.query_one("#mon-stats", Block).changed()

    def _stats(self, width, height):
        """Four lines of two columns: speed and schedule with sparklines, memory, the process and the last
        checkpoint."""
        s = self._state
        if s is None:
            return Text()
        column = max((width - 2) // 2, 1)
        machine = self._system

        def cell(label, value, history=(), style="", top=None):
            text = Text(no_wrap=True)
            text.append(label.ljust(LABEL_WIDTH), style="dim")
            text.append(value, style=style)
            room = column - len(text) - 1
            if history and room >= 4:
                # from zero, as a gauge: a 3% wobble in tok/s should look like one, not fill the height
                text.append(" " + sparkline(history, room, lo=0, hi=top), style=SPARK_STYLE)
            text.truncate(column, overflow="ellipsis")
            text.pad_right(column - len(text))
            return text

        mfu_values = [v for v in s.mfu if v is not None]
        mfu = percent(mfu_values[-1] / 100, 1) if mfu_values else "n/a on CPU" if self._on_cpu(s) else "n/a"
        peak = f", peak {number(s.peak_gib)}" if s.peak_gib is not None else ""
        ram = f"{machine.get('ram_used_gib') or 0:.1f}/{gib(machine['ram_total_gib'], 1)}" if machine.get("ram_total_gib") else "—"
        swap = f" · swap {machine.get('swap_used_gib') or 0:.1f}/{machine['swap_total_gib']:.1f}" if machine.get("swap_total_gib") else ""
        cpu = f" · CPU {machine['cpu_percent']:.0f}%" if machine.get("cpu_percent") is not None else ""
        saved = f"step {s.last_saved[0]:,} · {age(s.last_saved[1], self._now())}" if s.last_saved else "none yet"
        rows = [
            (cell("tok/s", number(_last(s.tok_per_sec)), s.tok_per_sec), cell("MFU", mfu, mfu_values)),
            (cell("step", seconds(_last(s.dt)), s.dt), cell("lr ×", number(_last(s.lrm)), s.lrm)),
            (cell("MLX", gib(s.active_gib) + peak), cell("RAM", ram + swap, style="bold red" if machine.get("swapping") else "")),
            (cell("process", f"RSS {gib(machine.get('rss_gib'))}{cpu}", self._cpu, top=100), cell("saved", saved)),
        ]
        return _lines([Text.assemble(a, "  ", b) for a, b in rows][:max(height, 1)])

    @staticmethod
    def _on_cpu(s):
        device = (s.device or "").lower()
        return not any(word in device for word in ("apple", "nvidia", "gpu", "radeon"))

    def _samples(self, width, height):
        s = self._state
        if s is None or not s.samples:
            return Text("no samples yet", style="dim")
        lines = []
        for prompt, completion in s.samples[1][:height]:
            completion = " ".join(str(completion).split())  # newlines and runs of spaces as one space
            lines.append(_line((str(prompt), "dim"), (" → ", "dim"), (completion, ""), width=width))
        return _lines(lines)

    def _log(self, width, height):
        s = self._state
        if s is None:
            return Text()
        lines = []
        for entry in list(s.log)[-height:]:
            entry = str(entry)
            style = "yellow" if entry.startswith("! ") else "cyan" if entry.startswith("ack:") else ""
            lines.append(_line((entry, style), width=width))
        return _lines(lines)
