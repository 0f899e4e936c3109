"""
Training as a library: what every training run shares, whoever drives it (a script, the dashboard,
a notebook, a test).

    Trainer          one optimizer step: compiled forward+backward per micro-batch, accumulation,
                     the all-reduce across ranks, the optimizer
    events           what a run yields while it trains (Started, Phase, Step, Eval, Samples, Saved,
                     Notice, Ack, Finished): plain Python numbers and strings, never MLX arrays
    RunControl       commands in (pause, resume, save now, stop), from any thread, taken at the next
                     step boundary
    MetricsLog       every event appended to <checkpoint dir>/metrics.jsonl; MetricsFollower reads it
                     from another process while it grows

A run owns its folder while it trains (mlxchat.control): a lock keeps out a second trainer, other
processes send commands through the folder, and a heartbeat tells them the owner is alive.
"""
import gc
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Optional, get_args

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlxchat.distributed import DistributedError, all_reduce_floats, all_reduce_mean, get_dist_info
from mlxchat.hardware import device_memory_bytes, get_peak_flops, gpu_kind, memory_cap, over_cap_message


class TrainingError(RuntimeError):
    """A run that cannot go on: the message says what happened and what to do."""


class ConfigError(TrainingError, ValueError):
    """A config that cannot run, found before anything is allocated."""


# -----------------------------------------------------------------------------
# the training step

# the automatic memory limit: AUTO_MEMORY_MARGIN x the first step's live memory + AUTO_MEMORY_HEADROOM
# bytes (see Trainer). The headroom leaves small models (whose steps are short ops, where queueing
# ahead is most of the speed and memory is no concern) practically uncapped.
AUTO_MEMORY_MARGIN = 1.1
AUTO_MEMORY_HEADROOM = 2 ** 29


def auto_memory_limit(live_bytes):
    return int(AUTO_MEMORY_MARGIN * live_bytes + AUTO_MEMORY_HEADROOM)


def auto_memory_limit_wanted():
    """Whether a run without a cap of its own gets the automatic one: on CUDA, where it was measured
    (H200, d12, micro-batch 16: peak 26.9 -> 15.9 GiB for 2-4% of the speed). Not on the CPU (tests and
    the demo, where memory is no concern and the capped d12 step at micro-batch 4 took 361 s against
    336 s uncapped on a 2-core machine), nor on Metal until it is measured there."""
    return gpu_kind() == "cuda"


class Trainer:
    """Compiled forward+backward per micro-batch, gradient accumulation, compiled optimizer step.
    Each micro-batch is queued with mx.async_eval as soon as it is built: the device starts on it
    while the host fetches the next batch and builds the next graph (the optimizer's ~400 ops
    included), so that host work hides behind device work instead of adding to the step. The device
    runs the queue in order, so memory stays bounded to about one micro-batch of activations."""

    def __init__(self, model, optimizer, grad_accum_steps, grad_checkpoint=False, grad_reduce=None,
                 auto_memory_limit=False):
        self.model, self.optimizer, self.grad_accum_steps = model, optimizer, grad_accum_steps
        # measure the first step's live memory and cap MLX there (see _first_step_sets_the_limit)
        self.auto_memory_limit = auto_memory_limit
        self.live_bytes = None  # the first step's live memory, once measured
        self.grad_reduce = grad_reduce  # e.g. an all-reduce mean across processes (data parallel)
        model.grad_checkpoint = bool(grad_checkpoint)
        loss_and_grad = nn.value_and_grad(model, lambda x, y: model(x, y))
        # value_and_grad writes the traced parameters into the model: they must be compile outputs too
        self._fwd_bwd = mx.compile(loss_and_grad, inputs=model.state, outputs=model.state)
        scale = 1.0 / grad_accum_steps
        self._accumulate = mx.compile(lambda acc, g: tree_map(lambda a, b: a + b * scale, acc, g))
        self._first = mx.compile(lambda g: tree_map(lambda b: b * scale, g))

    def step(self, next_batch):
        """Run grad_accum_steps micro-batches (fetched with next_batch()) and one optimizer step.
        Returns the loss of the last micro-batch (as nanochat logs it) and the mean loss."""
        if self.auto_memory_limit and self.live_bytes is None:
            return self._first_step_sets_the_limit(next_batch)
        return self._step(next_batch)

    def _first_step_sets_the_limit(self, next_batch):
        """The automatic memory limit. MLX allocates an op's outputs when the host queues it and frees
        its inputs once it has run, and the host queues a step far ahead of the device: uncapped, the
        peak also holds the buffers of everything queued (H200, d12, micro-batch 16: 28.6 GiB for 17.1
        GiB of live memory). So the first step runs throttled (a 1-byte limit: every op waits for the
        ones before it), which makes its peak the step's live memory, and MLX is then capped at
        auto_memory_limit() of that (never above the limit it had): past the cap mx.eval waits for the
        device before queueing more. Measured there with a cap of 1.1x: 18.8 GiB cap, 19.1 GiB peak,
        2% slower than uncapped. Runs use it where auto_memory_limit_wanted() (CUDA). For steps of one
        shape (pretraining): a later step that needed more would run under the cap one op at a time.
        The caller's memory_cap block puts MLX's limit back afterwards."""
        with memory_cap(2 ** -30):  # 1 byte; resets the peak on entry, puts MLX's limit back on exit
            result = self._step(next_batch)
            self.live_bytes = mx.get_peak_memory()
        mx.set_memory_limit(min(mx.get_memory_limit(), auto_memory_limit(self.live_bytes)))
        return result

    def _step(self, next_batch):
        acc, losses = None, []
        for _ in range(self.grad_accum_steps):
            x, y = next_batch()
            loss, grads = self._fwd_bwd(x, y)
            if acc is None:
                # one micro-batch: the gradients as they are (scaling by 1 would be a full copy of them,
                # alive beside the originals at the optimizer step: +1.1 GiB at d12)
                acc = grads if self.grad_accum_steps == 1 else self._first(grads)
            else:
                acc = self._accumulate(acc, grads)
            losses.append(loss)
            mx.async_eval(acc, loss)
        if self.grad_reduce is not None:
            acc = self.grad_reduce(acc)
        self.optimizer.step(self.model, acc)
        # no reference to the gradients from here: each is freed once the update has read it, rather
        # than all of them at the end of the step
        del acc, grads
        mx.eval(self.model.parameters(), self.optimizer.state)
        return losses[-1].item(), sum(l.item() for l in losses) / len(losses)


def measure_peak_memory(model_factory, optimizer_factory, B, T, vocab_size, grad_checkpoint):
    """Peak memory (bytes) of one full training step at micro-batch B, on random tokens."""
    model = model_factory()
    optimizer = optimizer_factory(model)
    trainer = Trainer(model, optimizer, 1, grad_checkpoint)
    x = mx.random.randint(0, vocab_size, (B, T)).astype(mx.int32)
    mx.eval(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer.step(lambda: (x, x))
    peak = mx.get_peak_memory()
    del trainer, optimizer, model
    gc.collect()
    mx.clear_cache()
    return peak


def auto_device_batch_size(model_factory, optimizer_factory, T, vocab_size, limit_bytes, grad_checkpoint, tokens_per_step):
    """Largest power-of-two micro-batch whose measured peak fits the budget. Peak memory is linear in
    B (weights + optimizer state + B x activations), so two small measurements predict the rest;
    the pick is then verified with a real step."""
    p1 = measure_peak_memory(model_factory, optimizer_factory, 1, T, vocab_size, grad_checkpoint)
    p2 = measure_peak_memory(model_factory, optimizer_factory, 2, T, vocab_size, grad_checkpoint)
    per_row = max(p2 - p1, 1)
    fixed = p1 - per_row
    B = 1
    while B * 2 * T <= tokens_per_step and fixed + per_row * B * 2 <= limit_bytes and B < 1024:
        B *= 2
    if fixed + per_row * B > limit_bytes:
        raise ConfigError(f"even micro-batch 1 needs ~{p1 / 2**30:.1f} GiB, over the {limit_bytes / 2**30:.1f} GiB budget: "
                         f"use a smaller --depth or --max-seq-len, --grad-checkpoint 1, or raise --memory-limit")
    while B > 1:
        peak = measure_peak_memory(model_factory, optimizer_factory, B, T, vocab_size, grad_checkpoint)
        if peak <= limit_bytes:
            break
        B //= 2
    return B, fixed, per_row


def estimate_training_memory(config, device_batch_size, dtype_bytes=4, grad_checkpoint=False):
    """A lower bound on the bytes one training step of GPT(config) needs at this micro-batch, from the
    shapes alone (nothing is allocated): fp32 master weights, their gradients, the optimizer state
    (Muon's momentum for the matrices, AdamW's two moments for the rest), and the activations kept for
    the backward pass (at least ~4 (B, T, C) arrays per layer, one per layer with checkpointing, plus
    the fp32 logits of one chunk of the loss). Used to refuse a config that cannot possibly fit before
    anything is allocated; --device-batch-size auto measures the real figure."""
    c = config.param_counts()
    params = c["total"]
    matrices = c["transformer_matrices"]
    state = 4 * (params + params + matrices + 2 * (params - matrices))
    B, T, C = device_batch_size, config.sequence_len, config.n_embd
    per_layer = (1 if grad_checkpoint else 4) * B * T * C * dtype_bytes
    logits = B * min(T, 1024) * config.padded_vocab_size() * 4
    return state + config.n_layer * per_layer + logits


# -----------------------------------------------------------------------------
# events: what a run yields. Only Python numbers, strings, lists and dicts: they cross threads and
# processes (the dashboard's UI thread, metrics.jsonl) without touching MLX.

HEARTBEAT_SECONDS = 10.0  # a run's owner writes a heartbeat to metrics.jsonl when nothing else was written for this long

@dataclass
class Event:
    kind: ClassVar[str] = "event"

    def to_dict(self):
        return {"event": self.kind, **asdict(self)}


@dataclass
class Started(Event):
    """The run is set up: its resolved config (every derived value), size and horizon."""
    kind: ClassVar[str] = "started"
    stage: str
    run_dir: str
    config: dict
    num_params: int
    tokens_per_step: int
    flops_per_token: float
    total_steps: Optional[int]  # None: until the data runs out (SFT without --num-iterations)
    start_step: int
    world_size: int = 1
    device: str = ""
    pid: int = 0
    host: str = field(default_factory=socket.gethostname)  # where `pid` lives: another host's pid cannot be checked
    heartbeat: float = HEARTBEAT_SECONDS  # metrics.jsonl gets a record at least this often while the owner lives


@dataclass
class Phase(Event):
    """What the run is doing now: loading, tokenizing, measuring, compiling, running, evaluating,
    sampling, saving, paused."""
    kind: ClassVar[str] = "phase"
    name: str
    step: int = 0


@dataclass
class Log(Event):
    """A line of information (what the scripts print): the config, data, resume details."""
    kind: ClassVar[str] = "log"
    text: str


@dataclass
class Notice(Event):
    """Something the user should know and may fix (e.g. the step does not fit the memory cap)."""
    kind: ClassVar[str] = "notice"
    text: str
    level: str = "warning"


@dataclass
class Step(Event):
    kind: ClassVar[str] = "step"
    step: int
    total: Optional[int]
    loss: float  # the last micro-batch's (as nanochat logs it), averaged over ranks
    smooth_loss: float  # EMA (0.9), debiased
    lrm: float
    dt: float  # seconds of this step
    tok_per_sec: float
    mfu: Optional[float]  # percent; None where the device's peak is unknown (CPUs)
    active_gib: float
    peak_gib: float
    elapsed: float  # training seconds so far (compilation excluded)
    eta: Optional[float]  # seconds
    progress: float  # 0..1
    extra: dict = field(default_factory=dict)  # stage-specific: epoch, reward, answer length, ...


@dataclass
class Eval(Event):
    kind: ClassVar[str] = "eval"
    step: int
    metrics: dict  # val_bpb; core_metric; ChatCORE and its tasks; pass@k and mean reward


@dataclass
class Samples(Event):
    kind: ClassVar[str] = "samples"
    step: int
    samples: list  # [prompt, completion] pairs


@dataclass
class Saved(Event):
    kind: ClassVar[str] = "saved"
    step: int
    path: str  # the checkpoint directory


@dataclass
class Ack(Event):
    """A command from RunControl took effect (at this step boundary)."""
    kind: ClassVar[str] = "ack"
    command: str  # pause | resume | save | stop
    step: int


@dataclass
class Finished(Event):
    """The last event of every run: status finished (its horizon reached), stopped (a stop command)
    or failed (error holds the message)."""
    kind: ClassVar[str] = "finished"
    status: str
    step: int
    summary: dict = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class WeightsSnapshot:
    """A training run's current weights, handed over between two steps (RunControl.request_weights): the
    dashboard chats with a model while it trains. The arrays are the run's own, already evaluated, so
    reading them from another thread is safe and costs no copy; the optimizer makes new arrays at
    the next step, so a held snapshot stays as it was (it costs one copy of the weights while held)."""
    step: int
    stage: str
    run_dir: Optional[str]
    model_config: dict  # GPTConfig(**model_config) rebuilds the model
    weights: dict  # {"transformer.h.0.attn.c_q.weight": mx.array, ...}, tree_flatten's names; read-only
    tokenizer_dir: Optional[str]  # the run's tokenizer; None: the base dir's


# -----------------------------------------------------------------------------
# commands in

COMMANDS = ("pause", "resume", "save", "stop")


class RunControl:
    """Pause, resume, save now and stop a run, from any thread (a key press in the dashboard, a
    signal handler in a script, another process through the run folder). Commands queue up; the run
    takes them at its next step boundary, never inside an optimizer step, and acknowledges each with
    an Ack event. With several ranks, each command rides on the per-step all-reduce, so all ranks act
    at the same step. Stop saves a checkpoint first."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = []
        self._weight_requests = []
        self._holds = 0
        self._wake = threading.Event()

    def pause(self):
        self.send("pause")

    def resume(self):
        self.send("resume")

    def save_now(self):
        self.send("save")

    def stop(self):
        self.send("stop")

    def send(self, command):
        """One of COMMANDS by name (what a command channel receives)."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}: one of {', '.join(COMMANDS)}")
        with self._lock:
            self._pending.append(command)
        self._wake.set()

    def hold(self, on):
        """Hold the run at its next step boundary while `on` (e.g. while the dashboard streams a chat reply:
        both would share the same cores or GPU, and a reply beside training runs several times slower).
        Not a pause: nothing is acknowledged or saved, and any command ends the hold at once. A run of
        several processes does not hold."""
        with self._lock:
            self._holds += 1 if on else -1

    def held(self):
        with self._lock:
            return self._holds > 0 and not self._pending

    def request_weights(self, callback):
        """Ask for the run's current weights: at its next step boundary (or at once while paused) the run
        calls callback(WeightsSnapshot) on its own thread, so the callback must only hand the snapshot
        on (e.g. put it in a queue). Not acknowledged in the events: it changes nothing in the run."""
        with self._lock:
            self._weight_requests.append(callback)
        self._wake.set()

    def take_weight_requests(self):
        with self._lock:
            requests, self._weight_requests = self._weight_requests, []
        return requests

    def take(self):
        """The commands sent since the last take(), oldest first."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._wake.clear()
        return pending

    def wait(self, timeout):
        """Block until a command arrives or `timeout` seconds pass (a paused run waits here)."""
        self._wake.wait(timeout)


def _flags(commands):
    return [float(c in commands) for c in COMMANDS]


def _commands(flags):
    return [c for c, f in zip(COMMANDS, flags) if f > 0]


# -----------------------------------------------------------------------------
# metrics on disk

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends each event as one JSON line to <run dir>/metrics.jsonl, flushed at once, so that
    another process (the dashboard's attach mode, the report) can follow the run. A resumed run
    appends to the same file: readers keep the last record of a step."""

    def __init__(self, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()  # the run's thread and its heartbeat write whole lines, one at a time
        self.last_write = time.monotonic()

    def write(self, record):
        line = json.dumps(record, default=_json_number) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            self.last_write = time.monotonic()

    def close(self):
        with self._lock:
            self._f.close()


def _json_number(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class MetricsFollower:
    """Reads a metrics.jsonl that another process is appending to. poll() returns the complete
    records written since the last call: a last line without its newline (the writer is mid-write, or
    was killed mid-write) is kept back until it is complete, a line that is not JSON is skipped, and a
    file that shrank (replaced) is read again from its start."""

    def __init__(self, path):
        self.path = path
        self._offset = 0
        self._partial = b""

    def poll(self):
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self._offset:
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # b"" when the data ended with a newline
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def read_metrics(path):
    """Every complete record of a metrics.jsonl (a torn last line is left out)."""
    return MetricsFollower(path).poll()


# -----------------------------------------------------------------------------
# configs: dataclasses whose fields carry their defaults and help text (the scripts' argparse and the
# dashboard's forms are built from them)

def option(default, help, **metadata):
    """A config field with its help text; metadata may add `choices` and `parse` (str -> value, for the
    command line)."""
    return field(default=default, metadata={"help": help, **metadata})


def field_type(f):
    """What turns a config field's text (a flag, a form) into its value: its `parse` function, else its
    type (Optional[X]: X)."""
    if "parse" in f.metadata:
        return f.metadata["parse"]
    args = [a for a in get_args(f.type) if a is not type(None)]
    return args[0] if len(args) == 1 else f.type


def parse_batch_size(text):
    """--device-batch-size: a positive integer or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be an integer or 'auto', got {text!r}") from None


def config_dict(config):
    return {f.name: getattr(config, f.name) for f in fields(config)}


class Checks:
    """Collects what is wrong with a config, so that one ConfigError names every problem (in the
    words of the command-line flags, which the dashboard shows too)."""

    def __init__(self):
        self.problems = []

    def require(self, ok, message):
        if not ok:
            self.problems.append(message)

    def every(self, config, *names):
        """Interval flags: -1 (off) or a positive number of steps (0 would divide by zero)."""
        for name in names:
            v = getattr(config, name)
            self.require(isinstance(v, int) and (v == -1 or v > 0),
                         f"--{name.replace('_', '-')} must be a positive number of steps or -1 (off), got {v!r}")

    def positive(self, config, *names, allow_none=False):
        for name in names:
            v = getattr(config, name)
            if v is None and allow_none:
                continue
            self.require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                         f"--{name.replace('_', '-')} must be > 0, got {v!r}")

    def raise_if_any(self):
        if self.problems:
            error = ConfigError("; ".join(self.problems))
            error.problems = list(self.problems)  # one by one, for a form that shows each beside its field
            raise error


def check_memory(need_bytes, what):
    """Refuse a run that cannot fit this machine, before anything is allocated."""
    limit = device_memory_bytes()
    if limit and need_bytes > limit:
        raise ConfigError(f"{what} needs at least {need_bytes / 2 ** 30:.1f} GiB (weights, gradients, optimizer state and "
                          f"activations), more than the {limit / 2 ** 30:.1f} GiB this machine has: use a smaller --depth, "
                          f"--max-seq-len or --device-batch-size, or --grad-checkpoint 1")


# -----------------------------------------------------------------------------
# a run: iterate it to train

def _known_errors():
    """Failures with a clear message of their own: they end a run as TrainingError (no traceback)."""
    from mlxchat.dataset import DataError, DownloadError
    from mlxchat.tokenizer import TokenizerError
    from mlxchat.torch_io import CheckpointError
    return (TrainingError, DistributedError, CheckpointError, TokenizerError, DataError, DownloadError, FileNotFoundError)


class Run:
    """A training run: `for event in run: ...` trains and yields events; `run.control` takes commands
    from any thread; `run.result` holds the numbers once it finished. Nothing happens before the first
    event is asked for, and all of a run's MLX work happens on the thread that iterates it (MLX's
    streams belong to the thread that made them): iterate a run on one thread, and hand only its
    events (Python numbers and strings) to others.

    The config is validated in the constructor (ConfigError, before anything is allocated). Every
    event is appended to <run dir>/metrics.jsonl on rank 0. A failure ends the iteration with a
    Finished(status="failed") event, then raises TrainingError (or the original exception, for bugs).

    On rank 0 the run owns its folder from the moment it knows it (see `run_dir`) to its end: when
    another process already trains that folder the run fails, naming that process; commands sent from
    other processes (mlxchat.control.send_command) join the RunControl's at every step boundary; a
    heartbeat keeps metrics.jsonl from going quiet for long while the run lives."""

    stage = "run"

    def __init__(self, config, control=None, freeze_gc=False):
        config.validate()
        self.config = config
        self.control = control if control is not None else RunControl()
        self.freeze_gc = freeze_gc  # gc.freeze() after the first step (the scripts opt in; undone at the end)
        self.result = None
        self._run_dir = None
        self.step = 0
        self.rank, self.world_size, _ = get_dist_info()
        self._metrics = None
        self._early = []  # events before the run dir is known
        self._lock = None  # the folder's RunLock, held from the moment the run dir is known (rank 0)
        self._spool = None  # its CommandSpool: commands from other processes
        self._heartbeat = None
        self._notices = []  # Notices raised outside the event stream (taking the lock, the spool), yielded next
        self._agreed = []  # commands all ranks agreed on at the last step
        self._last_saved = None
        self._save_checkpoint = None  # save(step), set by each stage's _run once there is something to save
        self._live_model = None  # (model, tokenizer_dir), set by each stage's _run: what request_weights hands over
        self._frozen = False

    def __iter__(self):
        return self._events()

    def run(self, on_event=None):
        """Train to the end (or a stop); call on_event(event) for each event. Returns self.result."""
        for event in self:
            if on_event is not None:
                on_event(event)
        return self.result

    # -- the run folder: owned from the moment it is known

    @property
    def run_dir(self):
        return self._run_dir

    @run_dir.setter
    def run_dir(self, path):
        """Each stage sets its folder as soon as it knows it, before writing anything there: that is when
        rank 0 takes the folder's lock (TrainingError, naming the owner, when another process trains
        it) and opens its command spool. Nothing reaches metrics.jsonl without the lock."""
        if path is not None and self.rank == 0 and (self._lock is None or self._lock.run_dir != path):
            self._own(path)
        self._run_dir = path

    def _own(self, path):
        from mlxchat.control import CommandSpool, RunLock
        self._disown()
        lock = RunLock(path)
        took_over = lock.acquire()
        self._lock = lock
        if took_over:
            self._notices.append(Notice(took_over))
        self._spool = CommandSpool(path, since=lock.since)
        self._spool.open()
        self._spool_notices()

    def _disown(self):
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._lock is not None:
            self._lock.release()
            self._lock = self._spool = None

    def _poll_spool(self):
        """Rank 0, at a step boundary or while paused: commands other processes sent, into RunControl
        (where the all-reduce of the step shares them with every rank)."""
        if self._spool is None:
            return
        for command in self._spool.take():
            self.control.send(command)
        self._spool_notices()

    def _spool_notices(self):
        self._notices += [Notice(text) for text in self._spool.take_problems()]

    # -- the event stream

    def _record(self, event):
        if self.rank != 0:
            return
        if self._metrics is None and self._lock is not None:
            from mlxchat.control import Heartbeat
            self._metrics = MetricsLog(self.run_dir)
            for e in self._early:
                self._metrics.write(e)
            self._early = []
            self._heartbeat = Heartbeat(self._metrics).start()
        record = dict(event.to_dict(), time=round(time.time(), 3))
        if self._metrics is not None:
            if event.kind == "finished" and self._heartbeat is not None:
                self._heartbeat.stop()  # nothing may follow the last record
                self._heartbeat = None
            self._metrics.write(record)
        else:
            self._early.append(record)

    def _events(self):
        owner = threading.get_ident()
        known = _known_errors()
        try:
            for produced in self._run():
                notices, self._notices = self._notices, []
                for event in notices + [produced]:
                    self._record(event)
                    yield event
                if threading.get_ident() != owner:
                    raise TrainingError("a run must be iterated on the thread that started it: MLX's streams belong "
                                        "to the thread that made them")
        except Exception as e:
            # a known failure carries its own clear message: it ends the run as a TrainingError; a bug keeps
            # its type and traceback
            error = TrainingError(str(e)) if isinstance(e, known) and not isinstance(e, TrainingError) else e
            text = str(error) if isinstance(error, TrainingError) else f"{type(e).__name__}: {e}"
            failed = Finished(status="failed", step=self.step, error=text)
            self._record(failed)
            yield failed
            if error is e:
                raise
            raise error from e
        finally:
            if self._frozen:
                gc.unfreeze()
                self._frozen = False
            if self._heartbeat is not None:
                self._heartbeat.stop()
                self._heartbeat = None
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            self._disown()  # last: the folder is free once its files are complete

    def _run(self):
        raise NotImplementedError

    # -- step boundaries

    def _sync(self, step, loss, mean_loss):
        """After each optimizer step (number `step`): the losses averaged over ranks, and the commands
        any rank received, in one small all-reduce, so that every rank acts on them at the same step."""
        self._poll_spool()
        flags = _flags(self.control.take())
        if self.world_size > 1:
            out = all_reduce_floats([loss, mean_loss, *flags], label=f"step {step:05d}: loss all-reduce")
            loss, mean_loss, flags = out[0] / self.world_size, out[1] / self.world_size, out[2:]
        self._agreed = _commands(flags)
        return loss, mean_loss

    def _boundary(self, step):
        """Act on the commands agreed at the last step (generator of events). Returns True to stop."""
        self._serve_weights(step)
        if self.world_size == 1 and not self._agreed and self.control.held():
            while self.control.held():
                time.sleep(0.01)  # a chat reply streams: it gets the machine until it ends (or a command comes)
                self._serve_weights(step)
                self._poll_spool()  # commands from other processes end it too
            self._agreed = _commands(_flags(self.control.take()))  # the command that ended the hold, at once
        commands, self._agreed = self._agreed, []
        stop = "stop" in commands
        if "save" in commands and not stop:
            yield Ack("save", step)
            yield from self._save(step)
        if "pause" in commands and not stop:
            yield Ack("pause", step)
            yield Phase("paused", step)
            stop = yield from self._paused(step)
            if not stop:
                yield Phase("running", step)
        elif "resume" in commands:
            yield Ack("resume", step)  # nothing was paused: acknowledged all the same
        if stop:
            yield Ack("stop", step)
        return stop

    def _paused(self, step):
        """Wait for resume or stop (save works while paused). With several ranks, all of them poll
        together a few times a second: each poll is a fresh collective, so no watchdog fires."""
        while True:
            self.control.wait(0.25)
            self._serve_weights(step)
            self._poll_spool()
            notices, self._notices = self._notices, []
            yield from notices  # a refused command shows now, not when the run resumes
            flags = _flags(self.control.take())
            if self.world_size > 1:
                flags = all_reduce_floats(flags, label=f"step {step:05d}: paused")
            commands = _commands(flags)
            if "stop" in commands:
                return True  # acknowledged by _boundary
            if "save" in commands:
                yield Ack("save", step)
                yield from self._save(step)
                yield Phase("paused", step)
            if "resume" in commands:
                yield Ack("resume", step)
                return False

    def _serve_weights(self, step):
        """Answer RunControl.request_weights on this (the training) thread, between steps."""
        if self._live_model is None:
            return  # nothing built yet: the requests wait for the first boundary with a model
        requests = self.control.take_weight_requests()
        if not requests:
            return
        model, tokenizer_dir = self._live_model
        weights = dict(tree_flatten(model.parameters()))
        mx.eval(weights)  # arrays still lazy here could not be evaluated on another thread
        snapshot = WeightsSnapshot(step=step, stage=self.stage, run_dir=self.run_dir, model_config=model.config.to_dict(),
                                   weights=weights, tokenizer_dir=tokenizer_dir)
        for callback in requests:
            callback(snapshot)

    def _save(self, step):
        if step == self._last_saved:
            return
        yield Phase("saving", step)
        self._save_checkpoint(step)
        self._last_saved = step
        yield Saved(step, self.run_dir)

    def _load_resume(self, checkpoint_dir, resume_step, model, optimizer):
        """Load a checkpoint of this run to continue it exactly: the weights (rank 0's, which the caller
        then sends to the others), this rank's optimizer file (the optimizer's state and whatever the
        run saved beside it: its data position) and the meta. resume_step -2 means the latest. Returns
        (step, meta, optimizer file's tree)."""
        from mlxchat.checkpoint_manager import _optim_path, find_last_step, load_arrays, load_checkpoint
        from mlxchat.distributed import broadcast_object
        master, rank, world_size = self.rank == 0, self.rank, self.world_size
        if resume_step == -2:
            if world_size == 1:
                resume_step = find_last_step(checkpoint_dir)
            else:  # rank 0 holds the model and meta files: it decides, and a missing checkpoint stops every rank
                try:
                    found = find_last_step(checkpoint_dir) if master else None
                except FileNotFoundError as e:
                    found = str(e)
                found = broadcast_object(found, label="agreeing on the resume step")
                if isinstance(found, str):
                    raise TrainingError(found)
                resume_step = found
        if master:
            model_data, optim_data, meta = load_checkpoint(checkpoint_dir, resume_step, load_optimizer=True, rank=rank)
            model.load_state_dict(model_data)
            del model_data
        else:  # the other Macs need only their own optimizer + data file; weights and meta come from rank 0
            path = _optim_path(checkpoint_dir, resume_step, rank)
            optim_data, meta = (load_arrays(path) if os.path.exists(path) else None), None
        if world_size > 1:
            meta = broadcast_object(meta, label="sending the checkpoint meta")
            missing = all_reduce_floats([float(optim_data is None and r == rank) for r in range(world_size)],
                                        label="checking every rank's optimizer file")
            missing = [r for r, m in enumerate(missing) if m > 0]
            if missing:
                raise TrainingError(f"step {resume_step}: no optim_{resume_step:06d}_rank<r>.safetensors for rank(s) "
                                    f"{missing} in {checkpoint_dir} on their machines. Every rank resumes from the optimizer "
                                    f"and data state it saved itself: launch with the same hostfile (same Mac for each rank).")
        if meta.get("world_size", 1) != world_size:
            raise TrainingError(f"checkpoint step {resume_step} was written by {meta.get('world_size', 1)} process(es), this "
                                f"run has {world_size}: an exact resume needs the same number (each rank's data position is its own)")
        if optim_data is None:
            raise TrainingError(f"no optimizer state for step {resume_step} in {checkpoint_dir}: cannot resume exactly")
        optimizer.load_state_dict(optim_data["optimizer"]["tensors"], optim_data["optimizer"]["meta"])
        self._last_saved = resume_step
        return resume_step, meta, optim_data

    def _grad_reduce(self):
        """For Trainer: with several ranks, every rank steps with the mean gradient over all ranks."""
        if self.world_size == 1:
            return None

        def reduce(grads):
            return all_reduce_mean(grads, label=f"step {self.step + 1:05d}: gradient all-reduce")
        return reduce

    def _after_step(self, step, first_step, limit_gib):
        """Process-wide odds and ends after an optimizer step; returns a Notice or None."""
        if self.freeze_gc and not self._frozen:
            # nothing allocated by setup is garbage: stop the collector from scanning it every step
            gc.collect()
            gc.freeze()
            self._frozen = True
        if step == first_step + 3:  # compiled and past the first steps' allocations
            text = over_cap_message(limit_gib)
            if text:
                return Notice(text)
        return None


def metric_text(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def step_line(e, show_loss=True):
    """A Step event as the scripts print it."""
    from mlxchat.common import format_duration
    total = f"{e.total:05d}" if e.total else "?"
    mfu = f"{e.mfu:.1f}%" if e.mfu is not None else "unknown"
    extra = "".join(f" | {k.replace('_', ' ')} {metric_text(v)}" for k, v in e.extra.items())
    loss = f" | loss {e.smooth_loss:.4f}" if show_loss else ""
    return (f"step {e.step:05d}/{total} ({100 * e.progress:.1f}%){loss}{extra} | lrm {e.lrm:.2f} | "
            f"dt {e.dt * 1000:.0f}ms | tok/s {e.tok_per_sec:,.0f} | mfu {mfu} | "
            f"elapsed {format_duration(e.elapsed)} | eta {format_duration(e.eta)}")


def event_lines(event, show_loss=True):
    """The plain-text lines an event reads as: what the scripts print, what the dashboard keeps in a run's
    train.log. Started, Phase and Finished have none here (the scripts show them their own way)."""
    kind = event.kind
    if kind == "log":
        return [event.text]
    if kind == "notice":
        return [f"WARNING: {event.text}"]
    if kind == "step":
        return [step_line(event, show_loss)]
    if kind == "eval":
        return [f"step {event.step:05d} | " + " | ".join(f"{k.replace('_', ' ')} {metric_text(v)}" for k, v in event.metrics.items())]
    if kind == "samples":
        return [prompt + completion for prompt, completion in event.samples]
    if kind == "saved":
        return [f"saved checkpoint step {event.step} to {event.path}"]
    if kind == "ack":
        return [f"step {event.step:05d} | {event.command}"]
    return []


def keep_tokenizer(tokenizer, run_dir):
    """Save the tokenizer a fine-tuning run uses into <run dir>/tokenizer (once), so that its folder is
    self-contained: chat and eval find the tokenizer beside the checkpoint wherever the base model came
    from (a run folder with its own tokenizer, nanochat's base dir, ...). Returns that folder."""
    from mlxchat.tokenizer import save_token_bytes
    if tokenizer is None:
        return None
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")):
        tokenizer.save(tokenizer_dir)
        save_token_bytes(tokenizer, tokenizer_dir)
    return tokenizer_dir


def step_event(step, total, loss, smooth_loss, lrm, dt, tokens_per_step, flops_per_token, world_size, elapsed, eta,
               progress, **extra):
    """A Step event with the speed, MFU and memory figures filled in."""
    tok_per_sec = tokens_per_step / dt if dt > 0 else 0.0
    peak = get_peak_flops()
    mfu = 100 * flops_per_token * tok_per_sec / (peak * world_size) if peak and flops_per_token else None
    return Step(step=step, total=total, loss=float(loss), smooth_loss=float(smooth_loss), lrm=float(lrm), dt=dt,
                tok_per_sec=tok_per_sec, mfu=mfu, active_gib=mx.get_active_memory() / 2 ** 30,
                peak_gib=mx.get_peak_memory() / 2 ** 30, elapsed=elapsed, eta=eta, progress=progress, extra=extra)


def run_in_thread(run, on_event, name="mlxchat-train"):
    """Iterate `run` on a new thread, calling on_event(event) there for each event (post it to your UI
    from there; never touch MLX arrays in it). The thread releases its MLX streams when it ends (a
    thread that does not can make the process abort at exit). Returns the started thread; the run's
    exception, if any, is kept in thread.error."""

    def target():
        try:
            run.run(on_event)
        except BaseException as e:  # noqa: BLE001  (kept for the caller, who joins the thread)
            thread.error = e
        finally:
            mx.clear_streams()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.error = None
    thread.start()
    return thread
