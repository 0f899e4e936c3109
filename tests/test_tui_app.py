"""
The dashboard as a whole (tui/app.py), driven with Textual's Pilot: pane switching and help, inline
validation and presets in Configure, a real tiny run started from the keyboard and watched in the
Monitor, pause / resume / save / stop from keys, resuming a stopped run from the Runs pane, quitting
during a run (a checkpoint is left), a failing run shown as failed while the app keeps working, and the
training thread's messages being batched (a few per second, not one per step).
"""
import asyncio
import gc
import json
import os
import sys
import time

import pytest

from mlxchat.checkpoint_manager import find_steps
from mlxchat.training import read_metrics
from tui.app import ConfirmScreen, HelpScreen, MlxchatApp
from tui.panes.configure import ConfigurePane
from tui.training_worker import TrainingEvents
from conftest import install_base

# a tiny model on the demo corpus, with the parity fixture's tokenizer in the base dir
TINY = dict(depth="2", aspect_ratio="32", head_dim="32", max_seq_len="64", window_pattern="L", device_batch_size="2",
            total_batch_size="256", eval_every="-1", sample_every="-1", save_every="-1", eval_tokens="2048")
pytestmark = pytest.mark.anyio  # the tests are coroutines, run by anyio's pytest plugin on asyncio (conftest)


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("MLXCHAT_DTYPE", "float32")


@pytest.fixture
def runs_dir(tmp_path, base):
    return str(tmp_path / "runs")  # the base dir has the parity fixture's tokenizer (conftest's `base`)


async def wait_until(pilot, predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fill(app, **values):
    """Set the Configure pane's pretraining fields (and the tokenizer choice) the way typing would."""
    pane = app.query_one(ConfigurePane)
    pane.query_one("#base-tokenizer").value = "base"
    for name, value in values.items():
        pane.query_one(f"#base-{name}").value = value
    return pane


def footer_keys(app):
    """The keys the footer shows now."""
    return {key.key for key in app.query("FooterKey")}


def screen_text(app):
    """What the terminal shows, as plain text lines joined."""
    return "\n".join("".join(segment.text for segment in strip) for strip in app.screen._compositor.render_strips())


@pytest.fixture
def make_app(runs_dir):
    """Apps whose threads are shut down after the test, whatever happened (a thread left in MLX at
    interpreter exit would abort the process)."""
    apps = []

    def make(**kwargs):
        app = MlxchatApp(runs_dir=runs_dir, **kwargs)
        apps.append(app)
        return app
    yield make
    for app in apps:
        assert app.shutdown_workers(120), "the training thread did not end"


async def test_panes_keys_and_help(make_app):
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        tabs = app.query_one("#panes")
        for key, pane in (("2", "monitor"), ("4", "runs"), ("1", "configure")):
            await pilot.press(key)
            assert tabs.active == pane
        await pilot.press("3")
        assert tabs.active == "chat"
        assert app.focused is not None and app.focused.id == "chat-input"  # the message field has the cursor
        await pilot.press("2")  # typed into the message field, not a pane switch
        assert tabs.active == "chat"
        await pilot.press("escape", "escape")  # leave the field: the number keys work again
        await pilot.press("1")
        assert tabs.active == "configure"
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "space" in screen_text(app) and "Ctrl-P" in screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        # l: the Monitor's loss plot on a log axis and back; elsewhere l does nothing
        plot = app.query_one("#mon-loss")
        await pilot.press("l")
        assert not plot.log_y
        await pilot.press("2", "l")
        assert plot.log_y and any("log axis" in str(n.message) for n in app._notifications)
        await pilot.press("l", "1")
        assert not plot.log_y
        # with no run, the footer offers start but not pause / save / stop
        assert app.check_action("start", ()) and not app.check_action("pause_resume", ())
        assert not app.check_action("stop", ())


async def test_the_footer_is_not_rebuilt_when_its_keys_stay_the_same(make_app):
    """A pane switch moves the focus, and Textual's Footer rebuilds its keys at every focus change:
    KeyFooter keeps its key widgets while the keys on offer are the same."""
    gc.unfreeze()
    app = make_app(preset="demo")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        # the screen's long-lived objects were moved out of the collector's full scans once it was up
        assert gc.get_freeze_count() > 1000
        before = list(app.query("FooterKey"))
        assert {key.key for key in before} >= {"r", "q"}
        for pane in "2121":
            await pilot.press(pane)
            await pilot.pause(0.1)
        assert list(app.query("FooterKey")) == before  # the same widgets: nothing was unmounted and remounted
        # a change of keys is still shown: in the Chat pane its keys (Ctrl-L, a new chat) join the footer
        await pilot.press("3")
        await pilot.pause(0.2)
        assert "ctrl+l" in {key.key for key in app.query("FooterKey")}


async def test_configure_refuses_bad_values_inline_and_presets_fill_it(make_app, runs_dir):
    app = make_app(preset="demo")
    async with app.run_test(size=(120, 40)) as pilot:
        pane = app.query_one(ConfigurePane)
        await pilot.pause(0.2)
        assert pane.query_one("#base-depth").value == "4" and pane.query_one("#base-num_iterations").value == "150"
        fill(app, **TINY)
        await pilot.pause(0.1)
        assert pane.build().ok, pane.build().problems
        assert "python -m scripts.base_train --depth 2" in str(pane.query_one("#cfg-command").render())
        pane.query_one("#base-depth").value = "0"
        pane.query_one("#base-device_batch_size").value = "3"  # 3 x 64 does not divide 256
        await pilot.pause(0.1)
        plan = pane.build()
        assert not plan.ok
        assert "--depth must be > 0" in plan.problems["depth"]
        assert "not a multiple" in plan.problems["device_batch_size"]
        assert "--depth must be > 0" in str(pane.query_one("#err-base-depth").render())  # shown beside the field
        await pilot.press("r")
        await pilot.pause(0.2)
        assert app.control is None and not os.path.exists(runs_dir) or not os.listdir(runs_dir)  # nothing started
        pane.apply_preset("d12")
        await pilot.pause(0.1)
        assert pane.query_one("#base-depth").value == "12" and pane.query_one("#base-device_batch_size").value == "auto"
        assert pane.query_one("#base-tokenizer").value == "base"
        derived = str(pane.query_one("#cfg-derived").render())
        assert "width 768" in derived and "6 heads" in derived  # nanochat's d12: 12 x 64, heads of 128
        pane.query_one("#cfg-stage").value = "sft"
        await pilot.pause(0.1)
        plan = pane.build()
        assert plan.stage == "sft" and "base_checkpoint_dir" in plan.problems  # no base checkpoint exists yet


async def test_train_pause_save_stop_resume_and_quit_from_keys(make_app, runs_dir):
    app = make_app()
    batches = []
    async with app.run_test(size=(120, 40), message_hook=lambda m: batches.append(m) if isinstance(m, TrainingEvents) else None) as pilot:
        fill(app, **TINY, num_iterations="100000", run_name="keys")
        await pilot.pause(0.1)
        assert "r" in footer_keys(app) and not {"space", "s", "x"} & footer_keys(app)
        await pilot.press("r")
        tabs = app.query_one("#panes")
        assert tabs.active == "monitor"
        await wait_until(pilot, lambda: app.state.step >= 5, what="the monitor to advance")
        # the footer follows what applies: the steering keys while a run is active, no start
        await wait_until(pilot, lambda: {"space", "s", "x"} <= footer_keys(app) and "r" not in footer_keys(app),
                         what="the footer to offer pause / save / stop")
        if sys.platform.startswith("linux"):  # the training thread yields the cores to the screen
            assert os.getpriority(os.PRIO_PROCESS, app.worker.thread.native_id) == 10
        assert "step" in screen_text(app) and "keys" in screen_text(app)
        # space pauses at a step boundary: the step counter stops
        await pilot.press("space")
        await wait_until(pilot, lambda: app.state.state == "paused", what="paused")
        paused_at = app.state.step
        await pilot.pause(0.6)
        assert app.state.step == paused_at
        # s saves while paused
        await pilot.press("s")
        run_dir = os.path.join(runs_dir, "keys")
        await wait_until(pilot, lambda: paused_at in find_steps(run_dir), what="the checkpoint")
        await pilot.press("space")
        await wait_until(pilot, lambda: app.state.step > paused_at + 2, what="resumed")
        # x asks, n keeps training, x + y stops with a checkpoint
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert app.active
        await pilot.press("x", "y")
        await wait_until(pilot, lambda: not app.active, what="stopped")
        assert app.state.state == "stopped"
        await wait_until(pilot, lambda: "r" in footer_keys(app) and "space" not in footer_keys(app),
                         what="the footer to offer start again")
        stopped_at = app.state.step
        assert stopped_at in find_steps(run_dir)
        # steps arrive in batches: far fewer messages than steps
        steps = sum(1 for b in batches for r in b.records if r["event"] == "step")
        step_batches = sum(1 for b in batches if any(r["event"] == "step" for r in b.records))
        assert steps > 10 and step_batches < steps
        assert os.path.exists(os.path.join(run_dir, "train.log")) and os.path.exists(os.path.join(run_dir, "config.json"))
        # the Runs pane lists it as stopped; r resumes it from its last checkpoint
        await pilot.press("4")
        runs = app.query_one("RunsPane")
        await wait_until(pilot, lambda: runs.selected_run() is not None, what="the run listed")
        assert runs.selected_run().state == "stopped"
        await pilot.press("r")
        await wait_until(pilot, lambda: app.active and app.state.step > stopped_at, what="resumed from Runs")
        started = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["event"] == "started"]
        assert started[-1]["start_step"] == stopped_at
        # q asks while a run is active; yes stops it with a checkpoint, then quits
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: not app.is_running or app._exit_renderables is not None or not app.active,
                         what="the quit")
    assert app.worker.shutdown(30)
    finished = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["event"] == "finished"]
    assert finished[-1]["status"] == "stopped" and finished[-1]["step"] in find_steps(run_dir)
    assert finished[-1]["step"] > stopped_at


async def test_a_stopped_sft_run_resumes_from_the_runs_pane(make_app, runs_dir, fixture_dir):
    from mlxchat.common import get_base_dir
    from mlxchat.sft import SFTConfig, SFTRun
    install_base(fixture_dir, get_base_dir())
    run_dir = os.path.join(runs_dir, "chat-sft")
    run = SFTRun(SFTConfig(mixture="demo", max_seq_len=64, device_batch_size=2, total_batch_size=128, num_iterations=100000,
                           eval_every=-1, eval_tokens=128, checkpoint_dir=run_dir))
    for event in run:  # a run trained by a script, stopped after a few steps
        if event.kind == "step" and event.step == 2:
            run.control.stop()
    stopped_at = run.result["step"]
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4")
        runs = app.query_one("RunsPane")
        await wait_until(pilot, lambda: runs.selected_run() is not None, what="the run listed")
        assert runs.selected_run().stage == "sft" and runs.selected_run().state == "stopped"
        await pilot.press("r")
        await wait_until(pilot, lambda: app.active and app.state.step > stopped_at, what="the SFT run resumed")
        started = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["event"] == "started"]
        assert started[-1]["stage"] == "sft" and started[-1]["start_step"] == stopped_at


async def test_a_failing_run_is_shown_and_the_app_goes_on(make_app, runs_dir, tmp_path):
    bad = tmp_path / "bad_data"
    bad.mkdir()
    (bad / "shard_00000.parquet").write_bytes(b"this is not parquet")
    (bad / "shard_00001.parquet").write_bytes(b"nor this")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        pane = fill(app, **TINY, num_iterations="5", run_name="bad")
        pane.query_one("#base-data").value = "folder"
        pane.query_one("#base-data-folder").value = str(bad)
        await pilot.pause(0.1)
        await pilot.press("r")
        await wait_until(pilot, lambda: app.state is not None and app.state.state == "failed", what="failed")
        assert "parquet" in (app.state.error or "")
        assert not app.active
        assert "failed" in screen_text(app)
        # the app still works: a good run starts after the failed one
        pane.query_one("#base-data").value = "demo"
        pane.query_one("#base-run_name").value = "good"
        await pilot.pause(0.1)
        await pilot.press("1", "r")
        await wait_until(pilot, lambda: app.state.state == "finished", what="the good run")
        assert find_steps(os.path.join(runs_dir, "good")) == [5]


async def test_a_folder_of_text_is_imported_into_the_run_then_trained_on(make_app, runs_dir, tmp_path):
    texts = tmp_path / "my_texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"note_{i:02d}.txt").write_text(f"Note {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + i))
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        pane = fill(app, **TINY, num_iterations="3", run_name="mine")
        pane.query_one("#base-data").value = "folder"
        pane.query_one("#base-data-folder").value = str(texts)
        await pilot.pause(0.1)
        plan = pane.build()
        assert plan.ok and plan.import_from == str(texts)
        assert "mlxchat.dataset import" in str(pane.query_one("#cfg-command").render())
        await pilot.press("r")
        await wait_until(pilot, lambda: app.state.state in ("finished", "failed"), what="the run on imported text")
        assert app.state.state == "finished", app.state.error
    data = os.path.join(runs_dir, "mine", "data")
    assert sorted(n for n in os.listdir(data) if n.endswith(".parquet"))  # the shards the run trained on
    assert find_steps(os.path.join(runs_dir, "mine")) == [3]
