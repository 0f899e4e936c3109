"""
Runs and checkpoints on disk, as the dashboard lists them: no UI code, nothing that touches MLX arrays.

    RunState          what a run's events say about it (its state, step, losses, speed, samples, log),
                      fed the live events or a metrics.jsonl record by record
    list_runs         every run folder in the runs dir, newest first
    list_checkpoints  every checkpoint a model list offers: the runs dir, the base dir's
                      base/chatsft/chatrl_checkpoints, nanochat's own cache
    new_run_name      a fresh, readable folder name for a run

A run folder is an ordinary checkpoint directory (model_*.safetensors, meta_*.json, optim_*) plus the
metrics.jsonl that the run appends every event to (mlxchat.training.MetricsLog).
"""
import json
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass

from mlxchat.checkpoint_manager import SOURCE_DIRS, find_last_step, find_steps
from mlxchat.common import get_base_dir
from mlxchat.training import METRICS_FILE, MetricsFollower

HISTORY = 120  # values kept for the sparklines (tok/s, MFU, step time, lr multiplier)
LOG_LINES = 200
TERMINAL = ("finished", "stopped", "failed", "owner gone")  # a run in one of these is not training
RESUMABLE = ("stopped", "failed", "owner gone")
# an owner that promised heartbeats (mlxchat.training.HEARTBEAT_SECONDS) and wrote nothing for this long is
# presumed dead, as W&B presumes after 10 minutes: the only sign there is when the owner runs on another host
OWNER_SILENT_SECONDS = 600.0

_STAGE_OF_FOLDER = {folder: stage for stage, folder in SOURCE_DIRS.items()}  # base_checkpoints -> base, ...


def default_runs_dir():
    """$MLXCHAT_RUNS_DIR, else the repository's checkpoints/ folder."""
    configured = os.environ.get("MLXCHAT_RUNS_DIR")
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(repo_root, "checkpoints")


def nanochat_base_dir():
    """Where nanochat keeps its data and checkpoints: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")


def new_run_name(stage, runs_dir, preset=None, now=None):
    """A folder name that says what the run is and when it started, e.g. demo-base-20261202-0441;
    -2, -3, ... when two runs start in the same minute."""
    stamp = time.strftime("%Y%m%d-%H%M", time.localtime(now))
    parts = [p for p in (preset, stage) if p]
    # a preset is free text (a user may name their own): keep the name a plain path component
    stem = re.sub(r"[^a-z0-9]+", "-", "-".join(parts + [stamp]).lower()).strip("-")
    name, n = stem, 1
    while os.path.exists(os.path.join(runs_dir, name)):
        n += 1
        name = f"{stem}-{n}"
    return name


# -----------------------------------------------------------------------------
# a run's state, from its events

def _owner_alive(pid, started_at):
    """Whether the process that wrote a run's "started" record still runs (on this host). pid 0 means it
    was not recorded: then nobody can tell, and the run is taken as alive."""
    from mlxchat.control import pid_alive
    if pid <= 0:
        return True
    if not pid_alive(pid):
        return False
    if started_at:
        # the pid may have been reused since (a reboot, a long-dead run): a process created after the run
        # started cannot be its owner
        try:
            import psutil
            return psutil.Process(pid).create_time() <= started_at + 1.0
        except Exception:  # noqa: BLE001  (psutil missing or the process just ended: keep the answer above)
            pass
    return True


class RunState:
    """What a run's events say about it: feed apply() the live events (event.to_dict()) or the records
    of its metrics.jsonl, in order. Only plain numbers and strings, so the UI thread can read it.

    A resumed run appends a second "started" to the same file: the histories keep what came before
    its start step and drop what the resumed run will replay."""

    def __init__(self, run_dir="", name=None):
        self.run_dir = run_dir
        self.name = name or (os.path.basename(os.path.normpath(run_dir)) if run_dir else "")
        self.stage = "unknown"
        self.state = "starting"
        self.error = None
        self.summary = {}
        self.config = {}
        self.num_params = 0
        self.tokens_per_step = 0
        self.flops_per_token = 0.0
        self.total_steps = None
        self.start_step = 0
        self.world_size = 1
        self.device = ""
        self.pid = 0
        self.host = ""  # the owner's host ("" from writers that did not say: taken as this one)
        self.started_at = None  # unix time of the last "started" (tells the owner from a process that reused its pid)
        self.heartbeat = None  # seconds between records that the owner promised (None: an older writer, no promise)
        self.last_heartbeat = None  # unix time of the last heartbeat record
        self._alive_state = None  # the state before check_owner found the owner gone (back if it shows life)
        self.step = 0
        self.progress = 0.0
        self.elapsed = 0.0
        self.eta = None
        self.loss_history = []
        self.smooth_loss_history = []
        self.val_bpb_history = []
        self.last_val_bpb = None
        self.eval_metrics = {}  # every metric an eval reported: name -> (step, value) (CORE, ChatCORE, pass@k, ...)
        self.tok_per_sec = deque(maxlen=HISTORY)
        self.mfu = deque(maxlen=HISTORY)
        self.dt = deque(maxlen=HISTORY)
        self.lrm = deque(maxlen=HISTORY)
        self.last_step = None
        self.active_gib = None
        self.peak_gib = None
        self.last_saved = None
        self.samples = None
        self.log = deque(maxlen=LOG_LINES)
        self.notices = []
        self.updated = 0.0
        self.last_event = None  # the kind of the last record applied
        self.paused = False  # between a pause and its resume, also while it saves or evaluates in between

    def __repr__(self):
        return f"RunState({self.name!r}, stage={self.stage!r}, state={self.state!r}, step={self.step})"

    @property
    def active(self):
        """Whether the run is (as far as its events say) still going."""
        return self.state not in TERMINAL

    @property
    def resumable(self):
        return self.state in RESUMABLE

    def checkpoint_steps(self):
        """The steps saved completely in the run folder."""
        return find_steps(self.run_dir)

    # -- applying events

    def apply(self, record):
        kind = record.get("event")
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            return  # a kind this version does not know (a newer writer): skip it, keep reading
        self.updated = record.get("time") or time.time()
        if self.state == "owner gone" and self._alive_state is not None:
            # presumed dead from silence, yet it wrote again: it was only slow
            self.state, self._alive_state = self._alive_state, None
        handler(record)
        if kind != "heartbeat":  # a sign of life, not of what the run did
            self.last_event = kind

    def _revive(self, state):
        # a run that ended and now shows signs of life again was resumed into the same folder
        if self.state in TERMINAL:
            self.error, self.summary = None, {}
        self.state = state

    def _on_started(self, r):
        self.paused = False
        if self.state in TERMINAL:
            self._revive("starting")
        self.stage = r.get("stage", self.stage)
        self.run_dir = self.run_dir or r.get("run_dir", "")
        self.name = self.name or os.path.basename(os.path.normpath(self.run_dir))
        self.config = r.get("config") or {}
        self.num_params = r.get("num_params", 0)
        self.tokens_per_step = r.get("tokens_per_step", 0)
        self.flops_per_token = r.get("flops_per_token", 0.0)
        self.total_steps = r.get("total_steps")
        self.world_size = r.get("world_size", 1)
        self.device = r.get("device", "")
        self.pid = r.get("pid", 0) or 0
        self.host = r.get("host", "") or ""
        self.heartbeat = r.get("heartbeat")
        self.started_at = r.get("time")
        start = self.start_step = r.get("start_step", 0)
        # step records are numbered after their optimizer step: step `start` was trained before the checkpoint
        # the run resumes from, and is not replayed; an eval at `start` runs again
        self.loss_history = [p for p in self.loss_history if p[0] <= start]
        self.smooth_loss_history = [p for p in self.smooth_loss_history if p[0] <= start]
        self.val_bpb_history = [p for p in self.val_bpb_history if p[0] < start]
        self.last_val_bpb = self.val_bpb_history[-1][1] if self.val_bpb_history else None
        self.eval_metrics = {k: v for k, v in self.eval_metrics.items() if v[0] < start}
        self.step = start
        self.progress = start / self.total_steps if self.total_steps else 0.0
        self.eta = None

    def _on_phase(self, r):
        self._revive(r.get("name", self.state))
        if self.state == "running":
            self.paused = False

    def _on_heartbeat(self, r):
        self.last_heartbeat = self.updated
        pid = r.get("pid") or 0
        if pid and pid != self.pid:
            # a new owner's beat before its "started" (a resume into this folder, still loading): it is the one to
            # watch now, and it existed by this record's time
            self.pid, self.host, self.started_at = pid, r.get("host", "") or "", self.updated

    def _on_log(self, r):
        self.log.append(r.get("text", ""))

    def _on_notice(self, r):
        text = r.get("text", "")
        self.notices.append(text)
        self.log.append(f"! {text}")

    def _on_ack(self, r):
        command = r.get("command")
        if command in ("pause", "resume", "stop"):
            self.paused = command == "pause"
        self.log.append(f"ack: {command} at step {r.get('step')}")

    def _on_step(self, r):
        step = r["step"]
        if self.state not in TERMINAL:
            # a step was trained: whatever phase came before it (an eval, a save, sampling) is over; the stages
            # announce "running" only once, after their first step
            self.state = "running"
        if self.loss_history and self.loss_history[-1][0] >= step:
            # the same steps again without a "started" between (readers keep the last record of a step)
            self.loss_history = [p for p in self.loss_history if p[0] < step]
            self.smooth_loss_history = [p for p in self.smooth_loss_history if p[0] < step]
        self.loss_history.append((step, r["loss"]))
        self.smooth_loss_history.append((step, r["smooth_loss"]))
        self.step = step
        if r.get("total") is not None:
            self.total_steps = r["total"]
        self.progress = r.get("progress", self.progress)
        # wall time since this session of the run started (the step's own "elapsed" is nanochat's training
        # time, which leaves out the first 10 steps and every evaluation)
        if r.get("time") is not None and self.started_at is not None:
            self.elapsed = r["time"] - self.started_at
        else:
            self.elapsed = r.get("elapsed", self.elapsed)
        self.eta = r.get("eta")
        for name in ("tok_per_sec", "mfu", "dt", "lrm"):
            if r.get(name) is not None:  # MFU is None where the device's peak is unknown
                getattr(self, name).append(r[name])
        self.active_gib = r.get("active_gib", self.active_gib)
        self.peak_gib = r.get("peak_gib", self.peak_gib)
        self.last_step = r

    def _on_eval(self, r):
        step, metrics = r["step"], r.get("metrics") or {}
        for name, value in metrics.items():
            self.eval_metrics[name] = (step, value)
        if "val_bpb" in metrics:
            self.val_bpb_history = [p for p in self.val_bpb_history if p[0] < step]
            self.val_bpb_history.append((step, metrics["val_bpb"]))
            self.last_val_bpb = metrics["val_bpb"]

    def _on_samples(self, r):
        self.samples = (r["step"], [list(pair) for pair in r.get("samples", [])])

    def _on_saved(self, r):
        self.last_saved = (r["step"], self.updated)
        self.log.append(f"saved a checkpoint at step {r['step']}")

    def _on_finished(self, r):
        self.paused = False
        self.state = r.get("status", "finished")
        self.error = r.get("error")
        self.summary = r.get("summary") or {}
        self.step = r.get("step", self.step)
        if self.state == "finished":
            self.progress = 1.0
            self.eta = 0.0
        else:
            self.eta = None
        self.log.append(f"{self.state} at step {self.step}" + (f": {self.error}" if self.error else ""))

    # -- from disk

    def check_owner(self, now=None):
        """A run whose file does not end with "finished" but whose process no longer runs was killed
        (kill -9, a crash, a closed terminal): it shows as "owner gone", ready to resume. The process is
        looked up on this host; an owner that promised heartbeats is also presumed gone after
        OWNER_SILENT_SECONDS without a record (the only sign when it runs on another host)."""
        if self.last_event in (None, "finished") or self.state == "owner gone":
            return
        promised = self.heartbeat or self.last_heartbeat is not None
        silent = promised and (time.time() if now is None else now) - self.updated > OWNER_SILENT_SECONDS
        # a pid on another host (a run folder on a shared disk) cannot be looked up from here
        here = not self.host or self.host == socket.gethostname()
        if silent or (here and not _owner_alive(self.pid, self.started_at)):
            self.state, self._alive_state = "owner gone", self.state

    @classmethod
    def from_file(cls, run_dir):
        """The state of the run in run_dir, from its metrics.jsonl (a torn last line is left out)."""
        return _FollowedRun(run_dir).poll()


def _stage_from_path(checkpoint_dir):
    """A checkpoint folder's stage when no metrics say it: from the folder it sits in
    (base_checkpoints/<tag> -> base), else "nanochat" for nanochat's .pt files."""
    parent = os.path.basename(os.path.dirname(os.path.normpath(checkpoint_dir)))
    if parent in _STAGE_OF_FOLDER:
        return _STAGE_OF_FOLDER[parent]
    try:
        if any(re.fullmatch(r"model_\d{6,}\.pt", n) for n in os.listdir(checkpoint_dir)):
            return "nanochat"
    except OSError:
        pass
    return "unknown"


def _started_stage(metrics_path):
    """The stage in a metrics.jsonl's first "started" record (near its top: read no further)."""
    try:
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("event") == "started":
                    return record.get("stage")
    except OSError:
        pass
    return None


class _FollowedRun:
    """A run folder's RunState kept up to date from its metrics.jsonl: each poll applies only the records
    written since the last one (a running run's file grows by a line per step; reading it whole every
    refresh would cost more the longer the run)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.key = None  # (size, mtime) of the file when last read
        self.state = RunState(run_dir)
        self.follower = MetricsFollower(self.path)

    def poll(self):
        try:
            st = os.stat(self.path)
            key = (st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key != self.key:
            if self.key is not None and (key is None or key[0] < self.key[0] or key[0] == self.key[0]):
                # shrank, vanished or rewritten in place: not an append, so start over
                self.state, self.follower = RunState(self.run_dir), MetricsFollower(self.path)
            for record in self.follower.poll():
                try:
                    self.state.apply(record)
                except (KeyError, TypeError, ValueError):
                    pass  # a record missing fields (by hand, another version): one bad line must not hide the run
            self.key = key
            if self.state.stage == "unknown":
                self.state.stage = _stage_from_path(self.run_dir)
        self.state.check_owner()  # the owner can die without the file changing
        return self.state


def list_runs(runs_dir=None, cache=None):
    """Every folder in runs_dir holding a metrics.jsonl, as RunStates, newest activity first.
    cache: a dict the caller keeps between calls (a view refreshing every few seconds): files that did
    not change are not read again, grown ones only from where the last call stopped."""
    runs_dir = runs_dir or default_runs_dir()
    cache = {} if cache is None else cache
    found = []
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        entries = []
    for entry in entries:
        metrics = os.path.join(entry.path, METRICS_FILE)
        if not entry.is_dir() or not os.path.isfile(metrics):
            continue
        followed = cache.get(entry.path)
        if followed is None:
            followed = cache[entry.path] = _FollowedRun(entry.path)
        state = followed.poll()
        found.append((followed.key[1] if followed.key else 0, entry.name, state))
    for gone in set(cache) - {s.run_dir for _, _, s in found}:
        del cache[gone]
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [state for _, _, state in found]


# -----------------------------------------------------------------------------
# checkpoints a model list offers

@dataclass
class CheckpointInfo:
    label: str  # what a model list shows, e.g. "demo-base-20261202-0441 · base · step 150"
    path: str  # the checkpoint directory (build_model(path, step) loads it)
    step: int  # latest complete step
    stage: str  # base | sft | rl | nanochat | unknown
    source: str  # runs | base dir | nanochat
    mtime: float


def _checkpoint_info(path, source):
    try:
        step = find_last_step(path)
    except OSError:
        return None  # a run that has not saved yet, or any other folder (or one we may not read)
    stage = _started_stage(os.path.join(path, METRICS_FILE)) or _stage_from_path(path)
    try:
        mtime = os.path.getmtime(os.path.join(path, f"meta_{step:06d}.json"))
    except OSError:
        mtime = 0.0
    name = os.path.basename(os.path.normpath(path))
    label = f"{name} · {stage} · step {step}" + ("" if source == "runs" else f" · {source}")
    return CheckpointInfo(label=label, path=path, step=step, stage=stage, source=source, mtime=mtime)


def _subdirs(folder):
    try:
        return sorted(e.path for e in os.scandir(folder) if e.is_dir())
    except OSError:
        return []


def list_checkpoints(runs_dir=None):
    """Every folder with a complete checkpoint: the runs in runs_dir, the scripts' checkpoints under the
    base dir (<base>/base_checkpoints/<tag>, chatsft_checkpoints, chatrl_checkpoints) and nanochat's
    ($NANOCHAT_BASE_DIR or ~/.cache/nanochat, same layout; they load without PyTorch). Newest first."""
    places = [(d, "runs") for d in _subdirs(runs_dir or default_runs_dir())]
    for base, source in ((get_base_dir(), "base dir"), (nanochat_base_dir(), "nanochat")):
        for folder in SOURCE_DIRS.values():
            places += [(d, source) for d in _subdirs(os.path.join(base, folder))]
    found, seen = [], set()
    for path, source in places:
        real = os.path.realpath(path)
        if real in seen:  # a runs dir that is also a base-dir folder: list it once, as a run
            continue
        seen.add(real)
        info = _checkpoint_info(path, source)
        if info is not None:
            found.append(info)
    found.sort(key=lambda c: c.mtime, reverse=True)
    return found
