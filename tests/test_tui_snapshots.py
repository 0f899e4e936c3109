"""
Snapshot tests of the whole dashboard, each pane at 80x24 (the smallest size it supports, a default
SSH terminal) and 120x40, with pytest-textual-snapshot. What changes from run to run is held fixed:
the machine (a fixed MachineInfo instead of the probe), the clock (ages, ETAs), the system figures, the
runs folder's path, and the run shown in the Monitor (hand-written events, no training).
Update the baselines after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them.
"""
import json
import os
import shutil

import pytest

from mlxchat.runs import RunState
from tui.app import MlxchatApp
from tui.panes.chat import ChatPane
from tui.panes.monitor import MonitorPane
from tui.panes.runs import RunsPane
from tui.training_worker import MachineInfo

NOW = 1_790_000_000.0  # a fixed "now" (unix seconds) for ages and file times
RUNS_DIR = "/tmp/mlxchat-snapshots/runs"  # a fixed path: it is shown on screen
SIZES = {"80x24": (80, 24), "120x40": (120, 40)}


def records(name, steps=60, total=150, status=None):
    """The events of a plausible tiny run, with fixed numbers and times."""
    t = NOW - 600
    out = [{"event": "phase", "name": "loading", "step": 0, "time": t},
           {"event": "log", "text": "vocab size: 4,096", "time": t},
           {"event": "started", "stage": "base", "run_dir": f"{RUNS_DIR}/{name}", "num_params": 2883714,
            "tokens_per_step": 4096, "flops_per_token": 9.44e6, "total_steps": total, "start_step": 0,
            "world_size": 1, "device": "Apple M3 Pro", "pid": 0, "time": t,
            "config": {"depth": 4, "max_seq_len": 256, "device_batch_size": 16}},
           {"event": "eval", "step": 0, "metrics": {"val_bpb": 3.31}, "time": t + 1},
           {"event": "phase", "name": "compiling", "step": 0, "time": t + 1}]
    smooth = 0.0
    for step in range(1, steps + 1):
        loss = 8.3 - 3.2 * (1 - (1 - step / total) ** 3) + 0.05 * ((step * 7919) % 13 - 6) / 6
        smooth = 0.9 * smooth + 0.1 * loss
        if step == 1:
            out.append({"event": "phase", "name": "running", "step": 1, "time": t + 2})
        out.append({"event": "step", "step": step, "total": total, "loss": loss, "smooth_loss": smooth / (1 - 0.9 ** step),
                    "lrm": min(1.0, step / 40), "dt": 0.9 + 0.01 * (step % 5), "tok_per_sec": 4500 + 10 * (step % 7),
                    "mfu": 21.5, "active_gib": 0.41, "peak_gib": 0.62, "elapsed": step * 0.9,
                    "eta": (total - step) * 0.9, "progress": step / total, "extra": {}, "time": t + 2 + step})
        if step == 50:
            out.append({"event": "eval", "step": 50, "metrics": {"val_bpb": 2.12}, "time": t + 53})
            out.append({"event": "samples", "step": 50, "samples": [["The capital of France is", " the people of the"],
                                                                     ["My favorite color is", " a great deal of"]],
                        "time": t + 54})
            out.append({"event": "saved", "step": 50, "path": f"{RUNS_DIR}/{name}", "time": t + 55})
    if status:
        out.append({"event": "finished", "status": status, "step": steps, "summary": {}, "error": None, "time": t + 70})
    return out


class SnapApp(MlxchatApp):
    """The dashboard with its clocks, machine and system figures held fixed; no training thread."""

    def __init__(self, pane, **kwargs):
        super().__init__(runs_dir=RUNS_DIR, system_interval=3600, **kwargs)
        self.pane = pane

    def on_mount(self, event):
        event.prevent_default()  # not MlxchatApp.on_mount: no training thread, no probe, no timers
        self.call_after_refresh(self._setup)

    def _setup(self):
        self._chat = self.query_one(ChatPane)
        self.query_one(MonitorPane)._now = lambda: NOW
        self.query_one(RunsPane).clock = lambda: NOW
        self.query_one("#configure-pane").set_machine(MachineInfo("gpu", "Apple M3 Pro", 36 * 2**30, 2.0e12, 6.4e12))
        system = {"rss_gib": 1.21, "ram_used_gib": 17.9, "ram_total_gib": 36.0, "swap_used_gib": 0.0,
                  "swap_total_gib": 2.0, "cpu_percent": 38.0, "swapping": False}
        monitor = self.query_one(MonitorPane)
        monitor.set_system(system)
        state = RunState(f"{RUNS_DIR}/demo-base")
        for r in records("demo-base"):
            state.apply(r)
        self.state = state
        monitor.show(state)
        self._update_status()
        self.action_show_pane(self.pane)
        self.screen.set_focus(None)

    def on_machine_info(self, message):
        message.prevent_default()  # (no probe runs; should one, its figures change from run to run)


@pytest.fixture(scope="module", autouse=True)
def runs_folder():
    shutil.rmtree(RUNS_DIR, ignore_errors=True)
    for name, status, steps in (("demo-base", "stopped", 60), ("d12-base", "finished", 150)):
        os.makedirs(f"{RUNS_DIR}/{name}")
        with open(f"{RUNS_DIR}/{name}/metrics.jsonl", "w") as f:
            for r in records(name, steps=steps, status=status):
                f.write(json.dumps(r) + "\n")
        os.utime(f"{RUNS_DIR}/{name}/metrics.jsonl", (NOW - 300, NOW - 300))
    yield
    shutil.rmtree(os.path.dirname(RUNS_DIR), ignore_errors=True)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pane", ["configure", "monitor", "chat", "runs"])
def test_pane_snapshot(snap_compare, pane, size):
    preset = {"configure": "demo"}.get(pane)
    app = SnapApp(pane, preset=preset, overrides={"run_name": "my-first-run"} if preset else None)
    assert snap_compare(app, terminal_size=SIZES[size])
