"""
mlxchat-tui: configure, train, watch and chat with your own GPT in one terminal.

One process. Textual's event loop owns the screen and never touches MLX; training runs on one
long-lived thread (tui/training_worker.py) and chat generation on another (tui/chat_worker.py). They
send plain numbers and strings back as messages, batched to a few per second, and take commands
through the run's RunControl (pause, resume, save now, stop: each acts at the next step boundary).
"""
import argparse
import asyncio
import os
import signal
import socket
import sys
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx is imported anywhere)
import psutil
from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static, TabbedContent, TabPane

from mlxchat.control import read_owner, send_command
from mlxchat.runs import RunState, default_runs_dir
from mlxchat.training import METRICS_FILE, MetricsFollower, RunControl, TrainingError
from tui.format import count, duration
from tui.panes.chat import ChatPane
from tui.panes.configure import ConfigurePane
from tui.panes.monitor import MonitorPane
from tui.panes.runs import RunsPane
from tui.presets import PRESETS, STAGES
from tui.training_worker import MachineInfo, RunRefused, TrainingEvents, TrainingWorker, freeze_gc
from tui.widgets import KeyFooter

PANES = ("configure", "monitor", "chat", "runs")
ACTIVE_STATES = {"starting", "loading", "tokenizer", "tokenizing", "measuring", "compiling", "running", "evaluating",
                 "sampling", "saving", "paused", "importing"}
STATE_STYLE = {"running": "green", "paused": "yellow", "failed": "red", "finished": "bright_blue", "stopped": "magenta",
               "owner gone": "dark_orange"}


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question: y or Enter answers yes, n or Esc no."""
    BINDINGS = [Binding("y,enter", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.question, id="confirm-question")
            yield Label("[b]y[/b]/Enter: yes    [b]n[/b]/Esc: no", id="confirm-keys")

    def action_answer(self, yes):
        self.dismiss(yes)


HELP = [
    ("1 2 3 4", "Configure · Monitor · Chat · Runs (when no text field has focus)"),
    ("Esc", "leave a text field (then the keys below work); in Chat, stop the reply"),
    ("r", "start the configured run; in Runs, resume the selected one"),
    ("space", "pause / resume the run (at the next step boundary)"),
    ("s", "save a checkpoint now"),
    ("x", "stop the run (asks; stopping saves a checkpoint)"),
    ("l", "in Monitor, the loss on a log axis (l again: linear)"),
    ("q", "quit (asks while a run is active: the run stops with a checkpoint first)"),
    ("Ctrl-P", "command palette: every action"),
    ("?", "this help"),
    ("Chat", "Enter sends · Esc stops the reply · Ctrl-L new conversation"),
    ("Runs", "Enter opens in Monitor · c chats with it · r resumes · F5 refreshes"),
    ("attached", "a run another process trains (--attach, Enter in Runs): space s x steer it · c chats · "
                 "q leaves it running"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,enter", "dismiss_help", "close")]

    def compose(self) -> ComposeResult:
        with Grid(id="help"):
            yield Label("[b]Keys[/b]", id="help-title")
            for key, what in HELP:
                yield Label(f"[b]{key}[/b]", classes="help-key")
                yield Label(what, classes="help-what")

    def action_dismiss_help(self):
        self.dismiss(None)


class MlxchatApp(App):
    CSS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.tcss")  # absolute: subclasses elsewhere
    TITLE = "mlxchat"
    BINDINGS = [
        Binding("1", "show_pane('configure')", "Configure", show=False),
        Binding("2", "show_pane('monitor')", "Monitor", show=False),
        Binding("3", "show_pane('chat')", "Chat", show=False),
        Binding("4", "show_pane('runs')", "Runs", show=False),
        Binding("r", "start", "Start"),
        Binding("space", "pause_resume", "Pause/Resume"),
        Binding("s", "save", "Save"),
        Binding("x", "stop", "Stop"),
        Binding("c", "chat_viewed", "Chat"),
        # the Monitor's; not in the footer (its keys stay the same from pane to pane), in ? and Ctrl-P
        Binding("l", "log_loss", "Log loss", show=False),
        Binding("q", "quit_app", "Quit"),
        Binding("question_mark", "help", "Keys"),
        Binding("escape", "leave_field", "Leave field", show=False),
    ]

    def __init__(self, runs_dir=None, preset=None, start=False, checkpoint=None, system_interval=2.0, overrides=None,
                 attach=None, refresh=1.0):
        super().__init__()
        self.attach = attach  # a run folder to open in the Monitor at start, trained by another process
        self.overrides = overrides or {}
        self.runs_dir = os.path.abspath(os.path.expanduser(runs_dir or default_runs_dir()))
        os.makedirs(self.runs_dir, exist_ok=True)
        self.preset = preset
        self.start_at_once = start
        self.checkpoint = checkpoint
        self.system_interval = system_interval
        # a training run's steps reach the screen once per `refresh` seconds: every redraw is Python on the
        # UI thread, which competes with the training thread's own Python for the GIL (bench_tui measures it)
        self.worker = TrainingWorker(self, interval=refresh)
        self.run_id = None  # the active run's id (its TrainingEvents carry it)
        self.control = None  # the active run's RunControl
        self.state = None  # RunState of what the Monitor shows (the active run, or one opened from Runs)
        self.viewing = None  # MetricsFollower of a run opened from Runs (not trained by this process)
        self._steering = None  # whether the footer last offered the keys that steer the viewed run
        self.quitting = False  # a confirmed quit waits for the run to stop with a checkpoint
        self._last_swap = None
        self.machine = None
        self._chat = None  # the ChatPane (kept: it is shut down after the app has left the screen)
        self._signals = []
        self._hangup = False  # SIGHUP came: the terminal is gone

    # -- layout

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with TabbedContent(initial="configure", id="panes"):
            with TabPane("1 Configure", id="configure"):
                yield ConfigurePane(self.runs_dir, preset=self.preset, overrides=self.overrides, id="configure-pane")
            with TabPane("2 Monitor", id="monitor"):
                yield MonitorPane(id="monitor-pane")
            with TabPane("3 Chat", id="chat"):
                yield ChatPane(self.runs_dir, id="chat-pane")
            with TabPane("4 Runs", id="runs"):
                yield RunsPane(self.runs_dir, id="runs-pane")
        yield KeyFooter()

    def on_mount(self):
        self.worker.start()
        self._chat = self.query_one(ChatPane)
        self.query_one(MonitorPane).clear()
        self._update_status()
        self.set_interval(self.system_interval, self._sample_system)
        self.set_interval(1.0, self._follow_viewed)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._signals.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or not supported here
        if self.attach:  # once the panes' own widgets are mounted: the Monitor draws the run at once
            self.call_after_refresh(self.view_run, os.path.abspath(os.path.expanduser(self.attach)))
        elif self.checkpoint:
            self.action_show_pane("chat")
            self.query_one(ChatPane).open_checkpoint(os.path.abspath(os.path.expanduser(self.checkpoint)))
        elif self.start_at_once:
            self.call_after_refresh(self.action_start)
        self.call_after_refresh(freeze_gc)

    def on_unmount(self):
        # the screen is gone: an active run is told to stop (it saves first); main() waits for the thread
        if self.control is not None:
            self.control.stop()
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)

    # -- what the footer shows

    @property
    def active(self):
        return self.control is not None

    @property
    def steering(self):
        """Whether the Monitor shows a live run that another process trains: the keys send it commands."""
        return (not self.active and self.viewing is not None and self.state is not None
                and self.state.state in ACTIVE_STATES)

    def check_action(self, action, parameters):
        if action in ("pause_resume", "save", "stop"):
            return self.active or self.steering
        if action == "start":
            return not self.active
        if action == "chat_viewed":
            return self.viewing is not None and not self.active
        if action == "log_loss":
            return self.query_one("#panes", TabbedContent).active == "monitor"
        return True

    # -- panes

    def action_show_pane(self, pane):
        tabs = self.query_one("#panes", TabbedContent)
        tabs.active = pane
        if pane == "chat":
            self.query_one(ChatPane).focus_input()
        elif pane == "runs":
            runs = self.query_one(RunsPane)
            runs.refresh_runs()
            runs.query_one("DataTable").focus()
        else:
            self.screen.set_focus(None)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event):
        if event.pane.id == "chat":
            self.query_one(ChatPane).focus_input()
        elif event.pane.id == "configure":
            self.query_one(ConfigurePane).refresh_checkpoints()

    def action_log_loss(self):
        log = self.query_one(MonitorPane).toggle_log_y()
        self.notify(f"Loss on a {'log' if log else 'linear'} axis (l: {'linear' if log else 'log'})", timeout=2)

    def action_leave_field(self):
        self.screen.set_focus(None)

    def action_help(self):
        self.push_screen(HelpScreen())

    # -- starting runs

    def action_start(self):
        if self.active:
            self.notify("A run is already active: stop it (x) before starting another.", severity="warning")
            return
        tabs = self.query_one("#panes", TabbedContent)
        if tabs.active == "monitor" and self.viewing is not None and self.state.resumable:
            self.resume_run(self.state.run_dir)  # the viewed run lost its owner (or stopped): this process carries on
            return
        if tabs.active == "runs":
            selected = self.query_one(RunsPane).selected_run()
            if selected is not None:
                self.resume_run(selected.run_dir)
                return
        pane = self.query_one(ConfigurePane)
        plan = pane.build()
        pane.revalidate()
        if not plan.ok:
            tabs.active = "configure"
            first = next(iter(plan.problems.values()), "the form has problems")
            self.notify(f"Not started: {first}", title="Configure", severity="error", timeout=8)
            return
        self._launch(plan.stage, plan.config, plan.import_from, f"Started {os.path.basename(plan.run_dir)}")

    def resume_run(self, run_dir):
        """Continue a stopped (or failed, or orphaned) run exactly where its last checkpoint left it."""
        if self.active:
            self.notify("A run is already active: stop it (x) before resuming another.", severity="warning")
            return
        state = RunState.from_file(run_dir)
        if state.stage not in STAGES:
            self.notify(f"{state.name}: a {state.stage!r} run is not one the dashboard trains.", severity="warning", timeout=8)
            return
        from mlxchat.checkpoint_manager import find_steps
        if not find_steps(run_dir):
            self.notify(f"{state.name}: no checkpoint to resume from.", severity="error")
            return
        cls = STAGES[state.stage][0]
        from dataclasses import fields
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.config.items() if k in names}
        values.update(resume_from_step=-2, checkpoint_dir=run_dir)  # (a base run that trained its tokenizer reuses it)
        try:
            config = cls(**values)
            config.validate()
        except Exception as e:  # noqa: BLE001  (shown, nothing started)
            self.notify(f"{state.name}: cannot resume: {e}", severity="error", timeout=10)
            return
        self._launch(state.stage, config, None, f"Resuming {state.name}")

    def _launch(self, stage, config, import_from, message):
        from mlxchat.pretrain import BaseTrainRun
        from mlxchat.rl import RLRun
        from mlxchat.sft import SFTRun
        run_class = {"base": BaseTrainRun, "sft": SFTRun, "rl": RLRun}[stage]
        run_dir = config.checkpoint_dir

        def make_run(control):  # on the training thread
            if import_from is not None:
                from mlxchat.dataset import import_text
                out = os.path.join(run_dir, "data")
                if not os.path.isdir(out) or not any(n.endswith(".parquet") for n in os.listdir(out)):
                    import_text(import_from, out, progress=False)
                config.data_dir = out
            return run_class(config, control, freeze_gc=True)  # as the scripts: no GC scans of setup garbage-free objects

        self.control = RunControl()
        self.viewing = None
        self.state = RunState(run_dir)
        self.state.stage = stage
        self.state.state = "importing" if import_from else "starting"
        self.run_id = self.worker.submit(make_run, self.control)
        self.query_one(ChatPane).set_live_source(self.control, os.path.basename(run_dir))
        self.query_one(MonitorPane).show(self.state)
        self._update_status()
        self.refresh_bindings()
        self.query_one("#panes", TabbedContent).active = "monitor"
        self.screen.set_focus(None)
        self.notify(message, timeout=3)

    # -- the training thread's messages

    def on_machine_info(self, message: MachineInfo):
        self.machine = message
        self.query_one(ConfigurePane).set_machine(message)

    def on_run_refused(self, message: RunRefused):
        if message.run_id != self.run_id:
            return
        self.state.state, self.state.error = "failed", message.error
        self._run_ended()
        self.query_one("#panes", TabbedContent).active = "configure"
        self.notify(f"Not started: {message.error}", severity="error", timeout=10)

    def on_training_events(self, message: TrainingEvents):
        if message.run_id != self.run_id or self.state is None:
            return
        ended = None
        for record in message.records:
            self.state.apply(record)
            kind = record.get("event")
            if kind == "saved":
                self.notify(f"Checkpoint saved at step {record['step']}", timeout=3)
            elif kind == "ack" and record["command"] in ("pause", "resume"):
                self.notify(f"{'Paused' if record['command'] == 'pause' else 'Resumed'} at step {record['step']}", timeout=3)
            elif kind == "notice":
                self.notify(record["text"], severity="warning", timeout=10)
            elif kind == "finished":
                ended = record
        self.query_one(MonitorPane).show(self.state)
        self._update_status()
        if ended is not None:
            self._run_ended()
            if ended["status"] == "failed":
                self.notify(f"The run failed: {ended.get('error')}", severity="error", timeout=15)
            else:
                self.notify(f"Run {ended['status']} at step {ended['step']}", timeout=5)
            if self.quitting:
                self._leave()

    def _run_ended(self):
        self.control = None
        self.query_one(ChatPane).set_live_source(None, None)
        self.query_one(RunsPane).refresh_runs()
        self.query_one(ConfigurePane).refresh_checkpoints()
        self._update_status()
        self.refresh_bindings()

    # -- keys on the active run

    def action_pause_resume(self):
        if self.steering:
            self._send("resume" if self.state.paused else "pause")  # paused: also while it saves meanwhile
            return
        if not self.active:
            return
        if self.state is not None and self.state.state == "paused":
            self.control.resume()
            self.notify("Resuming…", timeout=2)
        else:
            self.control.pause()
            self.notify("Pausing at the end of this step…", timeout=2)

    def action_save(self):
        if self.steering:
            self._send("save")
        elif self.active:
            self.control.save_now()
            self.notify("Saving a checkpoint at the end of this step…", timeout=2)

    def action_stop(self):
        if self.steering:
            def send_stop(yes):
                if yes and self.steering:
                    self._send("stop")
            self.push_screen(ConfirmScreen(f"Stop {self.state.name}? Its owner saves a checkpoint first."), send_stop)
            return
        if not self.active:
            return

        def answer(yes):
            if yes and self.active:
                self.control.stop()
                self.notify("Stopping: a checkpoint is saved first…", timeout=4)
        self.push_screen(ConfirmScreen("Stop the run? A checkpoint is saved first."), answer)

    async def action_quit(self):
        self.action_quit_app()  # Ctrl-Q too asks while a run is active

    def action_quit_app(self):
        if self.quitting:
            self.exit()  # asked twice: do not wait for the checkpoint (main() ends the process)
            return
        if not self.active:
            self.exit()
            return

        def answer(yes):
            if yes:
                self._stop_and_quit()
        self.push_screen(ConfirmScreen("A run is active. Quit? It stops with a checkpoint first."), answer)

    def _stop_and_quit(self):
        self.quitting = True
        if self.active:
            self.control.stop()
            self.notify("Stopping the run and saving a checkpoint, then quitting (q again: quit without waiting)",
                        timeout=30)
        else:
            self._leave()

    def _on_signal(self, sig):
        """SIGHUP (the SSH connection dropped) or SIGTERM: save, stop, exit."""
        if sig == signal.SIGHUP:
            self._hangup = True
        self._stop_and_quit()

    def _leave(self):
        if self._hangup:
            self._exit_without_terminal()
        else:
            self.exit()

    def _exit_without_terminal(self):
        """After SIGHUP the terminal is gone: Textual's exit would wait forever to restore it (its input
        thread spins on the closed tty). The run has stopped with its checkpoint; end the threads, leave."""
        ok = self.shutdown_workers(timeout=60)
        os._exit(0 if ok else 1)

    # -- Runs pane

    @on(RunsPane.Resume)
    def _resume(self, message):
        self.resume_run(message.run_dir)

    @on(RunsPane.OpenMonitor)
    def _open_monitor(self, message):
        active_dir = self.state.run_dir if (self.active and self.state) else None
        if message.run_dir != active_dir:
            self.view_run(message.run_dir)
        self.query_one("#panes", TabbedContent).active = "monitor"
        self.screen.set_focus(None)

    def view_run(self, run_dir):
        """Open a run this process does not train in the Monitor, following its metrics.jsonl from the first
        record (--attach, Enter in Runs). While its owner lives, space, s and x are sent to it."""
        self.state = RunState(run_dir)
        self.viewing = MetricsFollower(os.path.join(run_dir, METRICS_FILE))
        self._steering = None
        self._follow_viewed()
        self.query_one("#panes", TabbedContent).active = "monitor"
        self.screen.set_focus(None)

    def _send(self, command):
        """A command to the process that trains the viewed run, through its run folder; its Ack appears in
        the followed metrics.jsonl when it takes effect."""
        try:
            send_command(self.state.run_dir, command)
        except (TrainingError, OSError) as e:
            self.notify(f"Not sent: {e}", severity="error", timeout=8)
            return
        owner = read_owner(self.state.run_dir) or {}
        words = {"pause": "Pausing", "resume": "Resuming", "save": "Saving a checkpoint", "stop": "Stopping (a checkpoint first)"}
        self.notify(f"{words[command]}: sent to pid {owner.get('pid', '?')}, at its next step boundary…", timeout=3)

    def action_chat_viewed(self):
        """Chat with the latest checkpoint of the viewed run."""
        from mlxchat.checkpoint_manager import find_steps
        if self.viewing is None or self.state is None:
            return
        if not find_steps(self.state.run_dir):
            self.notify(f"{self.state.name} has no checkpoint yet: press s to save one.", severity="warning")
            return
        self.action_show_pane("chat")
        self.query_one(ChatPane).open_checkpoint(self.state.run_dir)

    @on(RunsPane.OpenChat)
    def _open_chat(self, message):
        self.action_show_pane("chat")
        self.query_one(ChatPane).open_checkpoint(message.run_dir)

    def _follow_viewed(self):
        """A run opened from Runs (not trained here): follow its metrics.jsonl while it grows."""
        if self.viewing is None or self.active or not self.is_running:  # (not while the app's widgets are torn down)
            return
        records = self.viewing.poll()
        if records:
            for record in records:
                try:
                    self.state.apply(record)
                except (KeyError, TypeError, ValueError):
                    pass  # a record missing fields (by hand, another version): one bad line must not stop the view
        self.state.check_owner()  # the owner can die without the file changing
        self.query_one(MonitorPane).show(self.state)
        self._update_status()
        if self.steering != self._steering:  # the footer offers space / s / x only while it lives
            if self._steering and self.state.state == "owner gone":
                saved = self.state.checkpoint_steps()
                self.notify(f"{self.state.name}: its owner is gone (last checkpoint: "
                            f"{f'step {saved[-1]}' if saved else 'none'}). r resumes it here.", severity="warning", timeout=10)
            self._steering = self.steering
            self.refresh_bindings()

    # -- the status line and system figures

    def _update_status(self):
        status = self.query_one("#status", Static)
        s = self.state
        if s is None:
            status.update(f"[b]mlxchat[/b] · no run · runs in {self.runs_dir}")
            return
        style = STATE_STYLE.get(s.state, "cyan")
        total = f"/{s.total_steps}" if s.total_steps else ""
        speed = f" · {count(s.tok_per_sec[-1])} tok/s" if s.tok_per_sec else ""
        eta = f" · ETA {duration(s.eta)}" if s.eta and s.state in ACTIVE_STATES else ""
        owner = ""  # this process's own run (active or ended) says nothing more
        attached = ""
        if self.viewing is not None and not self.active:
            # right after the state: an 80-column line cuts its end, and this says whom the keys reach
            attached, owner = self._viewed_owner(s), ""
            if s.state == "owner gone":
                speed = ""  # nothing runs: the last checkpoint is what matters
        status.update(f"[b]mlxchat[/b] · {s.name} · {s.stage} · [{style}]{s.state}[/{style}]{attached} · step {s.step}{total}"
                      f"{speed}{eta}{owner}")

    def _viewed_owner(self, s):
        """What the status line says after the state of a run another process trains: who, or what is left."""
        if s.state == "owner gone":
            saved = s.checkpoint_steps()
            return f" · r resumes from step {saved[-1]}" if saved else " · no checkpoint to resume from"
        if s.state in ACTIVE_STATES:
            return f" · attached to pid {s.pid}" if s.pid else " · attached"
        return " · viewing"

    def _sample_system(self):
        if not self.is_running:
            return  # a tick while the app shuts down: the panes' widgets are being removed
        rss = self._owner_rss()
        if rss is None:
            rss = psutil.Process().memory_info().rss
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        swapped = swap.sin + swap.sout if hasattr(swap, "sin") else 0
        swapping = self._last_swap is not None and swapped - self._last_swap > 4 * 2**20  # >4 MiB/s moving
        self._last_swap = swapped
        self.query_one(MonitorPane).set_system({
            "rss_gib": rss / 2**30, "ram_used_gib": (vm.total - vm.available) / 2**30,
            "ram_total_gib": vm.total / 2**30, "swap_used_gib": swap.used / 2**30, "swap_total_gib": swap.total / 2**30,
            "cpu_percent": psutil.cpu_percent(None), "swapping": swapping})

    def _owner_rss(self):
        """RSS of the process that trains the viewed run, when it runs on this machine: that one, not this
        viewer, is the process the Monitor describes. None otherwise."""
        s = self.state
        if not self.steering or not s.pid or (s.host and s.host != socket.gethostname()):
            return None
        try:
            return psutil.Process(s.pid).memory_info().rss
        except psutil.Error:  # gone meanwhile, or another user's
            return None

    # -- command palette

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Start the configured run", "r: train with the Configure pane's settings", self.action_start)
        if self.active or self.steering:
            yield SystemCommand("Pause / resume the run", "space", self.action_pause_resume)
            yield SystemCommand("Save a checkpoint now", "s", self.action_save)
            yield SystemCommand("Stop the run", "x: saves a checkpoint first", self.action_stop)
        yield SystemCommand("Loss on a log / linear axis", "l: in the Monitor", self._log_loss_from_palette)
        if self.viewing is not None and not self.active:
            yield SystemCommand("Chat with the viewed run", "c: its latest checkpoint", self.action_chat_viewed)
        for i, pane in enumerate(PANES, 1):
            yield SystemCommand(f"Show {pane.title()}", f"{i}", lambda p=pane: self.action_show_pane(p))
        for name in PRESETS:
            yield SystemCommand(f"Preset: {name}", "fill the Configure pane",
                                lambda n=name: (self.query_one(ConfigurePane).apply_preset(n), self.action_show_pane("configure")))
        yield SystemCommand("New chat", "Ctrl-L in the Chat pane", lambda: self.query_one(ChatPane).new_conversation())
        yield SystemCommand("Keys", "?", self.action_help)
        yield SystemCommand("Quit mlxchat", "q", self.action_quit_app)

    def _log_loss_from_palette(self):
        self.action_show_pane("monitor")
        self.action_log_loss()

    # -- exit

    def shutdown_workers(self, timeout=60.0):
        """Stop the threads (an active run saves a checkpoint first). True when both ended."""
        chat_ok = self._chat.shutdown() if self._chat is not None else True
        return self.worker.shutdown(timeout) and chat_ok is not False


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="mlxchat-tui",
        description="The mlxchat dashboard: configure a training run, start it, watch it learn, pause, save or stop "
                    "it from the keyboard, and chat with the model, in one terminal (also over SSH: run it in tmux).",
        epilog="Keys: 1-4 panes, r start, space pause/resume, s save, x stop, l log loss axis (Monitor), q quit, ? all keys, Ctrl-P commands. "
               "Environment: MLXCHAT_RUNS_DIR (runs folder), MLXCHAT_BASE_DIR (data, tokenizer), TEXTUAL_FPS and "
               "TEXTUAL_COLOR_SYSTEM (slow or 256-color links).")
    parser.add_argument("--runs-dir", default=None, help="where runs live, one folder each (default: $MLXCHAT_RUNS_DIR, "
                        "else the repository's checkpoints/ folder)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="fill the Configure pane: demo (a tiny model on the bundled corpus, minutes on a laptop), "
                             "d12 / d20 (nanochat's models), demo-sft (fine-tune a checkpoint on the shipped chats)")
    parser.add_argument("--start", action="store_true", help="start the configured run at once and open the Monitor")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="open the Chat pane on this checkpoint folder (a run, a base-dir checkpoint or nanochat's)")
    parser.add_argument("--attach", default=None, metavar="RUN_DIR",
                        help="open the Monitor on a run that another process trains (another mlxchat-tui, or "
                             "scripts.base_train): follow it live, and pause / save / stop it with space / s / x; "
                             "quitting leaves it running")
    parser.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between screen updates while a run trains (default 1; lower is livelier and costs "
                             "training speed, higher suits a slow SSH link)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set one of the Configure pane's settings after the preset, e.g. --set num_iterations=600 "
                             "(repeatable; the names are the flags of scripts.base_train with underscores)")
    args = parser.parse_args(argv)
    if args.refresh <= 0:
        parser.error(f"--refresh must be a number of seconds > 0, got {args.refresh}")
    overrides = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            parser.error(f"--set {item!r}: write NAME=VALUE, e.g. --set num_iterations=600")
        overrides[name.strip().replace("-", "_")] = value.strip()
    from tui.panes.configure import FORM
    unknown = [n for n in overrides if n not in FORM["base"] + FORM["sft"] + FORM["rl"]]
    if unknown:
        parser.error(f"--set {', '.join(unknown)}: not a setting of the Configure pane (e.g. depth, num_iterations, "
                     f"device_batch_size, max_seq_len, eval_every, run_name)")
    if args.checkpoint and not os.path.isdir(os.path.expanduser(args.checkpoint)):
        parser.error(f"--checkpoint {args.checkpoint}: no such folder")
    if args.attach and not os.path.isdir(os.path.expanduser(args.attach)):
        parser.error(f"--attach {args.attach}: no such folder")
    app = MlxchatApp(runs_dir=args.runs_dir, preset=args.preset, start=args.start, checkpoint=args.checkpoint,
                     overrides=overrides, refresh=args.refresh, attach=args.attach)
    started = time.time()
    try:
        app.run()
    finally:
        ended = app.shutdown_workers(timeout=120.0)
    if not ended:
        # a thread still in MLX at interpreter exit can abort the process: leave without finalizing
        print(f"mlxchat-tui: the training thread did not stop in time (after {time.time() - started:.0f} s); "
              "its last checkpoint is on disk", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
