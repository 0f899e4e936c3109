"""
The Monitor pane (tui.panes.monitor) in a host app that holds only it, with the app's stylesheet:
a hand-made run (a real mlxchat.runs.RunState fed fixed records, a fixed clock) shown at 80x24 and
120x40, what it shows for running, failed, paused, owner-gone and not-yet-started runs, the swap
warning, what small terminals drop, that show() does no work when nothing changed, and snapshots.
"""
import asyncio
import math
import os
import re

import pytest
from textual.app import App

from mlxchat.runs import RunState
from tui.format import age, count, duration, gib, number, percent, seconds
from tui.panes.monitor import EMPTY_TEXT, SWAP_TEXT, Block, MonitorPane
from tui.widgets.plot import LinePlot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_790_000_000.0  # the run's start, as unix time: every record's time and the clock derive from it
NOW = T0 + 400.0
ERROR = ("RuntimeError: [metal::malloc] Attempting to allocate 12884901888 bytes which is greater than the "
         "maximum allowed buffer size of 9663676416 bytes.")
SAMPLES = [["The capital of France is", "the city of the United States, and the people of the world of the country"],
           ["The chemical symbol of gold is", "the same\nas the"],
           ["If yesterday was Friday, then tomorrow will be", "a great deal of the"],
           ["The opposite of hot is", "the most important"],
           ["My favorite color is", "the same"]]
SYSTEM = {"rss_gib": 1.62, "ram_used_gib": 11.3, "ram_total_gib": 16.0, "swap_used_gib": 0.5, "swap_total_gib": 2.0,
          "cpu_percent": 87.0, "swapping": True}


def records(steps=150, total=600, end=None):
    """A tiny base run's metrics: started, a few log lines, `steps` steps (a loss spike at step 97),
    evals every 50 steps, a checkpoint and samples at step 100, a notice at 120; `end` a finished record."""
    yield {"event": "started", "stage": "base", "run_dir": "/runs/demo-base-20261202-0441", "config": {"depth": 4},
           "num_params": 3_412_000, "tokens_per_step": 8192, "flops_per_token": 2.1e7, "total_steps": total,
           "start_step": 0, "device": "AMD EPYC", "pid": 0, "time": T0}
    yield {"event": "log", "text": "Vocab size: 4,096", "time": T0}
    yield {"event": "log", "text": "Model config: depth 4, width 256, 2 heads", "time": T0}
    yield {"event": "phase", "name": "compiling", "time": T0}
    yield {"event": "phase", "name": "running", "time": T0 + 1}
    ema = 0.0
    for s in range(1, steps + 1):
        t = T0 + 1 + s * 0.21
        loss = 3 + 5.3 * math.exp(-s / 40) + 0.05 * math.sin(s * 1.7) + (1.5 if s == 97 else 0)
        ema = 0.9 * ema + 0.1 * loss
        dt = 0.2 + 0.01 * math.sin(s / 5)
        yield {"event": "step", "step": s, "total": total, "loss": loss, "smooth_loss": ema / (1 - 0.9 ** s),
               "lrm": 1.0 if s < 120 else 1 - (s - 120) / 480, "dt": dt, "tok_per_sec": 8192 / dt, "mfu": None,
               "active_gib": 0.41, "peak_gib": 0.93, "elapsed": s * 0.21, "eta": (total - s) * 0.21,
               "progress": s / total, "time": t}
        if s % 50 == 0:
            yield {"event": "eval", "step": s, "metrics": {"val_bpb": 2.4 - s / 200}, "time": t}
        if s == 100:
            yield {"event": "saved", "step": 100, "path": "/runs/demo-base-20261202-0441", "time": t}
            yield {"event": "samples", "step": 100, "samples": SAMPLES, "time": t}
        if s == 120:
            yield {"event": "notice", "text": "the step does not fit the memory cap", "time": t}
    if end:
        yield {"event": "finished", "step": steps, "time": T0 + 60, **end}


def run_state(**kwargs):
    state = RunState("/runs/demo-base-20261202-0441")
    for record in records(**kwargs):
        state.apply(record)
    return state


class MonitorApp(App):
    """The Monitor pane alone, styled by the app's stylesheet, its clock fixed."""
    CSS_PATH = os.path.join(ROOT, "tui", "app.tcss")

    def __init__(self, state=None, system=None):
        super().__init__()
        self.state, self.system = state, system

    def compose(self):
        yield MonitorPane(now=lambda: NOW, id="monitor")

    def on_mount(self):
        pane = self.query_one(MonitorPane)
        if self.system is not None:
            pane.set_system(self.system)
        pane.show(self.state)


def screen_lines(app):
    # what the terminal shows, one string per row (the compositor holds the screen as drawn)
    return ["".join(segment.text for segment in strip) for strip in app.screen._compositor.render_strips()]


def flat(app):
    """The screen's words in reading order, box drawing and wrapping gone (a wrapped error reads whole)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", "\n".join(screen_lines(app))).split())


def shown(app, size, check):
    async def main():
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await check(app, pilot)
    asyncio.run(main())


def span_style(text, word):
    """The style of the span of a rich Text that covers `word`."""
    start = text.plain.index(word)
    return " ".join(str(span.style) for span in text.spans if span.start <= start < span.end)


# -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_running_run(size):
    async def check(app, pilot):
        text = flat(app)
        for expected in ["demo-base-20261202-0441", "base", "running", "step 150/600", "25%", "elapsed 32s",
                         "ETA 1m34s", "3.4M params", "loss", "val bpb 1.6500 at step 150", "n/a on CPU",
                         "0.41 GiB, peak 0.93", "RSS 1.62 GiB", "11.3/16.0 GiB", "CPU 87%",
                         "step 100 · 6 min ago",  # the checkpoint's age from the injected clock, not time.time()
                         "samples at step 100", "The capital of France is", "! the step does not fit the memory cap",
                         SWAP_TEXT]:
            assert expected in text, expected
        lines = screen_lines(app)
        assert all(len(line) == size[0] for line in lines)
        assert sum(any(0x2800 < ord(ch) <= 0x28FF for ch in line) for line in lines) >= 4  # the plots drew
        header = app.query_one("#mon-header", Block).render()
        assert "green" in span_style(header, "running")
        if size == (80, 24):
            # the log does not fit: it goes whole, no title or half a block left over
            assert "Model config" not in text and "─log" not in "".join(lines)
            assert any(line.rstrip().endswith("…") for line in lines)  # a long sample is cut with an ellipsis
        else:
            assert "Model config: depth 4, width 256, 2 heads" in text and "My favorite color is → the same" in text

    shown(MonitorApp(run_state(), SYSTEM), size, check)


def test_failed_run_shows_the_whole_error_in_red():
    async def check(app, pilot):
        text = flat(app)
        assert f"failed: {ERROR}" in text  # the whole message, wrapped inside the box
        assert "ETA" not in text
        error = app.query_one("#mon-error")
        assert error.display and error.styles.border_top[0] == "round"
        assert "red" in span_style(app.query_one("#mon-header", Block).render(), "failed")
        # what is left below the box still fits: the stats are whole
        assert "saved step 100 · 6 min ago" in text

    shown(MonitorApp(run_state(end={"status": "failed", "error": ERROR}), SYSTEM), (80, 24), check)


@pytest.mark.parametrize("status,style", [("paused", "yellow"), ("stopped", "dim"), ("finished", "dim"),
                                          ("owner gone", "dark_orange"), ("compiling", "cyan")])
def test_state_colours(status, style):
    async def check(app, pilot):
        state = app.state
        pane = app.query_one(MonitorPane)
        state.state = status  # as a follower marks a run "owner gone": no new record, `updated` unchanged
        pane.show(state)
        await pilot.pause()
        assert style in span_style(app.query_one("#mon-header", Block).render(), status)
        assert status in flat(app)

    shown(MonitorApp(run_state()), (80, 24), check)


def test_swap_warning_comes_and_goes_with_the_system_figures():
    async def check(app, pilot):
        pane = app.query_one(MonitorPane)
        assert SWAP_TEXT not in flat(app)
        pane.set_system(SYSTEM)
        await pilot.pause()
        assert SWAP_TEXT in flat(app)
        pane.set_system({**SYSTEM, "swapping": False})
        await pilot.pause()
        assert SWAP_TEXT not in flat(app)

    shown(MonitorApp(run_state(), {**SYSTEM, "swapping": False}), (80, 24), check)


def test_show_does_nothing_until_the_state_changes():
    async def check(app, pilot):
        pane = app.query_one(MonitorPane)
        state = app.state
        parts = list(pane.query(Block)) + list(pane.query(LinePlot))
        versions = [p._version for p in parts]
        for _ in range(5):
            pane.show(state)  # the app calls this a few times a second whether or not anything happened
        assert [p._version for p in parts] == versions
        state.apply(list(records(steps=151))[-1])  # one more step
        pane.show(state)
        await pilot.pause()
        assert [p._version for p in parts] != versions
        assert "step 151/600" in flat(app)
        loss = pane.query_one("#mon-loss", LinePlot)
        assert loss.series_points("raw")[-1][0] == 151
        # the two plots share their x axis, so an eval lines up with the loss at its step
        assert loss._x_range == pane.query_one("#mon-bpb", LinePlot)._x_range == (1, 151)
        linear = loss.render().plain
        assert pane.toggle_log_y() is True
        assert loss.render().plain != linear and "log axis" in loss.render().plain  # the title says so
        assert pane.toggle_log_y() is False and "log axis" not in loss.render().plain

    shown(MonitorApp(run_state(), SYSTEM), (80, 24), check)


def test_no_run_and_a_run_not_started_yet():
    async def check(app, pilot):
        pane = app.query_one(MonitorPane)
        assert EMPTY_TEXT in flat(app) and "step" not in flat(app)
        state = RunState("/runs/demo-base-20261202-0441")
        for record in list(records())[:4]:  # started, two log lines, compiling
            state.apply(record)
        pane.show(state)
        await pilot.pause()
        text = flat(app)
        assert EMPTY_TEXT not in text
        assert "compiling" in text and "step 0/600" in text and "waiting for the first step" in text
        assert "no eval yet" in text and "none yet" in text  # no checkpoint
        pane.clear()
        await pilot.pause()
        assert EMPTY_TEXT in flat(app)

    shown(MonitorApp(None, SYSTEM), (80, 24), check)


@pytest.mark.parametrize("size", [(40, 12), (20, 6), (10, 3), (80, 14), (200, 60)])
def test_any_size_draws_without_error(size):
    async def check(app, pilot):
        lines = screen_lines(app)
        assert len(lines) == size[1] and all(len(line) == size[0] for line in lines)
        if size[0] >= 20:
            assert "failed" in lines[0]  # a narrow header shortens the name, never drops the state
        await pilot.resize_terminal(size[0] + 7, size[1] + 3)
        await pilot.pause()
        assert len(screen_lines(app)) == size[1] + 3

    shown(MonitorApp(run_state(end={"status": "failed", "error": ERROR}), SYSTEM), size, check)


def test_formatters():
    assert duration(None) == "—" and duration(42) == "42s" and duration(192) == "3m12s"
    assert duration(3725) == "1h02m" and duration(2 * 86400 + 3 * 3600) == "2d03h"
    assert count(1_234_567, "params") == "1.2M params" and count(12_345) == "12.3k" and count(123_456) == "123k"
    assert count(None, "params") == "—" and count(950) == "950"
    assert number(3.2149) == "3.21" and number(1234.0) == "1.2k" and number(999.97) == "1.0k" and number(0.0123) == "0.0123"
    assert seconds(0.2149) == "215 ms" and seconds(1.234) == "1.23 s"
    assert gib(3.2) == "3.20 GiB" and gib(123.4) == "123 GiB" and gib(None) == "—"
    assert age(NOW - 180, NOW) == "3 min ago" and age(NOW - 2, NOW) == "just now" and age(NOW - 3 * 86400, NOW) == "3 days ago"
    assert percent(0.423) == "42%" and percent(0.0123, 1) == "1.2%"


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_monitor_snapshot(snap_compare, size):
    """A running base run at step 150 of 600 with evals, a checkpoint, samples, a notice and the
    machine swapping; fixed numbers and a fixed clock."""
    assert snap_compare(MonitorApp(run_state(), SYSTEM), terminal_size=size)


def test_monitor_snapshot_failed(snap_compare):
    assert snap_compare(MonitorApp(run_state(end={"status": "failed", "error": ERROR}), SYSTEM), terminal_size=(80, 24))
