"""
The Runs pane in a tiny host app over a runs dir of hand-written metrics.jsonl files: which rows and
states it shows, and which messages its keys post (the host records them; it decides nothing).
"""
import asyncio
import json
import os
import subprocess
import sys
import time

from textual.app import App
from textual.widgets import DataTable

from tui.panes.runs import RunsPane

STYLESHEET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tui", "app.tcss")


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_run(runs_dir, name, end=None, pid=None, steps=5, total=10, bpb=2.5, age=0.0):
    """A run folder whose metrics.jsonl says: started, `steps` steps, an eval, then `end` (a finished status)
    or nothing (still running, or killed when pid is dead). Its last record is `age` seconds old."""
    now = time.time() - age
    records = [{"event": "phase", "name": "loading", "step": 0, "time": now},
               {"event": "started", "stage": "base", "run_dir": "", "config": {}, "num_params": 1, "tokens_per_step": 8,
                "flops_per_token": 1.0, "total_steps": total, "start_step": 0, "device": "cpu",
                "pid": os.getpid() if pid is None else pid, "time": now},
               {"event": "phase", "name": "running", "step": 1, "time": now}]
    records += [{"event": "step", "step": n, "total": total, "loss": 5.0 / n, "smooth_loss": 5.0 / n, "lrm": 1.0,
                 "dt": 0.1, "tok_per_sec": 80.0, "mfu": None, "active_gib": 0.1, "peak_gib": 0.1, "elapsed": n * 0.1,
                 "eta": 1.0, "progress": n / total, "extra": {}, "time": now} for n in range(1, steps + 1)]
    records.append({"event": "eval", "step": steps, "metrics": {"val_bpb": bpb}, "time": now})
    if end is not None:
        records.append({"event": "finished", "status": end, "step": steps, "summary": {},
                        "error": "boom" if end == "failed" else None, "time": now})
    folder = os.path.join(runs_dir, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.utime(path, (now, now))  # list order is by the file's last change
    return folder


class Host(App):
    CSS_PATH = STYLESHEET

    def __init__(self, runs_dir):
        super().__init__()
        self.runs_dir = runs_dir
        self.posted = []
        self.notified = []

    def compose(self):
        yield RunsPane(self.runs_dir)

    def on_runs_pane_open_monitor(self, message):
        self.posted.append(("monitor", message.run_dir))

    def on_runs_pane_open_chat(self, message):
        self.posted.append(("chat", message.run_dir))

    def on_runs_pane_resume(self, message):
        self.posted.append(("resume", message.run_dir))

    def notify(self, message, **kwargs):
        self.notified.append(message)
        super().notify(message, **kwargs)


async def wait_until(pilot, predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


def rows(app):
    table = app.query_one(DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def make_runs(tmp_path):
    runs_dir = str(tmp_path / "runs")
    folders = {
        "finished": write_run(runs_dir, "done", end="finished", steps=10, bpb=1.9, age=7200),
        "stopped": write_run(runs_dir, "halted", end="stopped", steps=4, age=600),
        "owner gone": write_run(runs_dir, "orphan", pid=dead_pid(), steps=3, age=300),
        "failed": write_run(runs_dir, "broken", end="failed", steps=2, age=120),
        "running": write_run(runs_dir, "live", steps=5, bpb=2.25),
    }
    return runs_dir, folders


def test_rows_show_each_run_newest_first(tmp_path):
    runs_dir, _ = make_runs(tmp_path)

    async def main():
        app = Host(runs_dir)
        async with app.run_test(size=(100, 30)):
            assert rows(app) == [
                ["live", "base", "running", "5/10", "2.2500", "just now"],
                ["broken", "base", "failed", "2/10", "2.5000", "2 min ago"],
                ["orphan", "base", "owner gone", "3/10", "2.5000", "5 min ago"],
                ["halted", "base", "stopped", "4/10", "2.5000", "10 min ago"],
                ["done", "base", "finished", "10/10", "1.9000", "2 h ago"],
            ]
            assert not app.query_one("#runs-empty").display
            pane = app.query_one(RunsPane)
            assert pane.selected_run().name == "live"
    asyncio.run(main())


def test_enter_and_c_post_the_selected_run(tmp_path):
    runs_dir, folders = make_runs(tmp_path)

    async def main():
        app = Host(runs_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("down", "down", "enter")
            await wait_until(pilot, lambda: app.posted)
            assert app.posted == [("monitor", folders["owner gone"])]
            await pilot.press("up", "c")
            await wait_until(pilot, lambda: len(app.posted) == 2)
            assert app.posted[1] == ("chat", folders["failed"])
    asyncio.run(main())


def test_r_resumes_only_a_run_that_ended_early(tmp_path):
    runs_dir, folders = make_runs(tmp_path)

    async def main():
        app = Host(runs_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one(RunsPane)
            await pilot.press("r")  # live: still running
            await pilot.press("down", "r")  # broken: failed
            await pilot.press("down", "r")  # orphan: owner gone
            await pilot.press("down", "r")  # halted: stopped
            await pilot.press("down")
            assert pane.selected_run().state == "finished"
            await pilot.press("r")
            await wait_until(pilot, lambda: len(app.notified) == 2)
            await pilot.pause()
            assert app.posted == [("resume", folders[s]) for s in ("failed", "owner gone", "stopped")]
            assert "still running" in app.notified[0] and "nothing to resume" in app.notified[1]
    asyncio.run(main())


def test_refresh_finds_a_new_run_and_keeps_the_cursor_on_its_run(tmp_path):
    runs_dir, folders = make_runs(tmp_path)

    async def main():
        app = Host(runs_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one(RunsPane)
            await pilot.press("down", "down")
            assert pane.selected_run().name == "orphan"
            newest = write_run(runs_dir, "newest", steps=1)
            await pilot.press("f5")
            await wait_until(pilot, lambda: len(rows(app)) == 6)
            assert rows(app)[0][0] == "newest"
            assert pane.selected_run().name == "orphan"  # the rows moved down; the cursor followed its run
            # no key: the 2 s refresh sees the newest run step on (same order: its cells change in place)
            step2 = {"event": "step", "step": 2, "total": 10, "loss": 0.8, "smooth_loss": 0.8, "lrm": 1.0, "dt": 0.1,
                     "tok_per_sec": 80.0, "mfu": None, "active_gib": 0.1, "peak_gib": 0.1, "elapsed": 0.2, "eta": 0.8,
                     "progress": 0.2, "extra": {}, "time": time.time()}
            with open(os.path.join(newest, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(step2) + "\n")
            await wait_until(pilot, lambda: rows(app)[0][3] == "2/10", timeout=6)
            assert pane.selected_run().name == "orphan"
            # ... and another run stop (it moves to the top: its file changed last)
            with open(os.path.join(folders["running"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"event": "finished", "status": "stopped", "step": 5, "summary": {},
                                    "error": None, "time": time.time()}) + "\n")
            await wait_until(pilot, lambda: any(r[0] == "live" and r[2] == "stopped" for r in rows(app)), timeout=6)
            assert pane.selected_run().name == "orphan"
    asyncio.run(main())


def test_an_empty_runs_dir_says_how_to_start_one(tmp_path):
    runs_dir = str(tmp_path / "runs")

    async def main():
        app = Host(runs_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            empty = app.query_one("#runs-empty")
            assert empty.display and rows(app) == []
            assert f"No runs yet in {runs_dir}" in str(empty.render())
            await pilot.press("r")
            await pilot.pause()
            assert app.posted == []
            write_run(runs_dir, "first", steps=1)
            await pilot.press("f5")
            await wait_until(pilot, lambda: rows(app) and not empty.display)
    asyncio.run(main())


def test_a_hidden_pane_does_not_refresh_until_shown_again(tmp_path):
    runs_dir = str(tmp_path / "runs")
    write_run(runs_dir, "first", steps=1)

    async def main():
        app = Host(runs_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one(RunsPane)
            pane.display = False  # what another pane being shown does to this one
            await pilot.pause()
            write_run(runs_dir, "second", steps=1)
            await asyncio.sleep(2.5)  # past one tick of the 2 s refresh
            assert len(rows(app)) == 1
            pane.display = True
            await wait_until(pilot, lambda: len(rows(app)) == 2)
    asyncio.run(main())
