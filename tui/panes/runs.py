"""
Pane 4, Runs: every run in the runs dir with its stage, state, last step, last val bpb and age. Enter
opens one in the Monitor, c in the Chat, r resumes a run that stopped, failed or lost its owner.

The pane only reads run folders (mlxchat.runs) and posts messages; the app decides what opening or
resuming means. It never touches MLX. While on screen it re-reads the folder every 2 s: a stat per
run, and only the new lines of a metrics.jsonl that grew.
"""
import time
from typing import Optional

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from mlxchat.runs import RESUMABLE, RunState, list_runs
from tui.format import NONE, age

REFRESH_SECONDS = 2.0
HELP = "enter: monitor · c: chat · r: resume · f5: refresh"
COLUMNS = (("run", "name"), ("stage", "stage"), ("state", "state"), ("step", "step"), ("val bpb", "bpb"),
           ("updated", "age"))
# plain ANSI colors: over SSH truecolor is often lost, and these read on dark and light themes alike
STATE_STYLES = {"running": "bold green", "paused": "yellow", "finished": "green", "stopped": "yellow",
                "failed": "bold red", "owner gone": "magenta"}


def run_row(run, now):
    """The table cells of one run."""
    step = f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step)
    bpb = f"{run.last_val_bpb:.4f}" if run.last_val_bpb is not None else NONE  # 4 decimals, as nanochat prints it
    state = Text(run.state, style=STATE_STYLES.get(run.state, "cyan"))  # the rest: busy (loading, evaluating, ...)
    return (run.name, run.stage, state, step, bpb, age(run.updated, now) if run.updated else NONE)


class RunsPane(Vertical):
    """The runs in `runs_dir`, newest first, in a table with a row cursor."""

    clock = staticmethod(time.time)  # what "now" is for the ages (a snapshot test holds it fixed)

    BINDINGS = [
        Binding("c", "open_chat", "Chat"),
        Binding("r", "resume", "Resume"),
        Binding("f5", "refresh_runs", "Refresh"),
    ]

    class _RunMessage(Message):
        def __init__(self, run_dir: str) -> None:
            super().__init__()
            self.run_dir = run_dir

    class OpenMonitor(_RunMessage):
        """Open this run in the Monitor (enter)."""

    class OpenChat(_RunMessage):
        """Open the Chat on this run's model (c)."""

    class Resume(_RunMessage):
        """Resume this run from its last checkpoint (r, only for a stopped, failed or orphaned run)."""

    def __init__(self, runs_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.runs_dir = runs_dir
        self._cache = {}  # list_runs' followers: unchanged files are not read again
        self._runs = {}  # run_dir -> RunState, as in the table
        self._cells = {}  # run_dir -> the row's cells, to update only what changed

    def compose(self):
        yield Static(f"Runs in {self.runs_dir}", id="runs-title")
        table = DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(f"No runs yet in {self.runs_dir}. Configure one in pane 1 and press r.", id="runs-empty")
        yield Static(HELP, id="runs-help")

    def on_mount(self) -> None:
        self.refresh_runs()
        self.set_interval(REFRESH_SECONDS, self._tick)

    def on_show(self) -> None:
        self.refresh_runs()  # coming back to the pane: up to date at once, not at the next tick

    def _tick(self) -> None:
        if self.is_on_screen:  # another pane is showing: nobody would see the update
            self.refresh_runs()

    # -- the table

    def refresh_runs(self) -> None:
        """Read the runs dir again and update the table; the cursor stays on the same run."""
        table = self.query_one("#runs-table", DataTable)
        runs = list_runs(self.runs_dir, cache=self._cache)
        now = self.clock()
        rows = {run.run_dir: run_row(run, now) for run in runs}
        keys = [run.run_dir for run in runs]
        if keys == list(self._runs):
            # same runs in the same order: change only the cells that changed (no flicker, cursor untouched)
            for key, cells in rows.items():
                for (_, column), old, new in zip(COLUMNS, self._cells[key], cells):
                    if old != new:
                        table.update_cell(key, column, new, update_width=True)
        else:
            selected = self._selected_key()
            table.clear()
            for key in keys:
                table.add_row(*rows[key], key=key)
            if selected in rows:
                table.move_cursor(row=keys.index(selected), animate=False)
        self._runs = {run.run_dir: run for run in runs}
        self._cells = rows
        self.query_one("#runs-empty").display = not runs
        self.set_class(not runs, "-empty")  # the table shrinks to its header, the line below it says why

    def _selected_key(self) -> Optional[str]:
        table = self.query_one("#runs-table", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def selected_run(self) -> Optional[RunState]:
        """The run under the cursor (None when there are none)."""
        return self._runs.get(self._selected_key())

    # -- keys

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(self.OpenMonitor(event.row_key.value))

    def action_refresh_runs(self) -> None:
        self.refresh_runs()

    def action_open_chat(self) -> None:
        run = self.selected_run()
        if run is None:
            self.notify("No run selected.", severity="warning")
            return
        self.post_message(self.OpenChat(run.run_dir))

    def action_resume(self) -> None:
        self.refresh_runs()  # its owner may have gone since the last tick: judge on what the files say now
        run = self.selected_run()
        if run is None:
            self.notify("No run selected.", severity="warning")
        elif run.state in RESUMABLE:
            self.post_message(self.Resume(run.run_dir))
        elif run.state == "finished":
            self.notify(f"{run.name} finished its {run.step} steps: nothing to resume. Press c to chat with it.",
                        title="Cannot resume")
        else:
            self.notify(f"{run.name} is still {run.state}: only a stopped, failed or orphaned run resumes. "
                        f"Press enter to watch it.", title="Cannot resume", severity="warning")
