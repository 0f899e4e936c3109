"""
The dashboard's one training thread: a long-lived `threading.Thread` that owns every MLX array of every
run the app trains (MLX streams belong to the thread that made them, and each new MLX thread leaves an
OS thread behind, so there is one for the app's lifetime, not one per run).

The UI talks to it with plain calls (start a run, send a command, shut down) and hears from it by
messages carrying the runs' events as dicts of Python numbers and strings, batched: at most about five
messages a second while steps stream in, at once for what changes the screen's state (a phase, a
checkpoint, the end). It also probes the machine once at start, for the Configure pane's time estimate.
"""
import gc
import json
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from textual.message import Message

from mlxchat.training import event_lines

# events that change what the run is doing: shown at once; the rest (steps, logs) ride in batches
URGENT = {"started", "phase", "saved", "ack", "eval", "samples", "notice", "finished"}


class MachineInfo(Message):
    """What the training thread measured about this machine (once, at start)."""

    def __init__(self, backend: str, device: str, memory_bytes: int, flops_per_sec: float, peak_flops: Optional[float]):
        super().__init__()
        self.backend, self.device, self.memory_bytes = backend, device, memory_bytes
        self.flops_per_sec, self.peak_flops = flops_per_sec, peak_flops


class TrainingEvents(Message):
    """A batch of a run's events (event.to_dict() plus "time"), oldest first."""

    def __init__(self, run_id: int, records: list):
        super().__init__()
        self.run_id, self.records = run_id, records


class RunRefused(Message):
    """The run could not be made (its config was refused); nothing started."""

    def __init__(self, run_id: int, error: str):
        super().__init__()
        self.run_id, self.error = run_id, error


@dataclass
class Job:
    run_id: int
    make_run: object  # callable(control) -> mlxchat.training.Run; called on the training thread
    control: object  # the run's RunControl, made by the UI so that keys work before the run starts
    run_dir: Optional[str] = None


def freeze_gc():
    """Move what exists now (the screen's widgets, the imported modules) out of the collector's reach.
    They live as long as the app, yet each full collection scanned them all: ~130k objects, 70-115 ms with
    the GIL held, a stall of whatever key was pressed then (measured: the p90 of a pane switch fell from
    128 to 40 ms). Collected first, so no garbage is kept. The app calls it once its screen is up, and the
    training thread after each run (a run unfreezes everything at its end). Also collect the young generations less often: a redraw allocates thousands of short-lived objects
    (strips, segments), which made a dozen collections per frame and promoted objects that were about to
    die; at (20000, 50, 50) the p99 of a pane switch while training fell by 5-15 ms (bench_tui)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


def lower_priority(nice=10):
    """Let the screen win the cores from this thread. On the CPU backend training keeps every core busy,
    and a key press then waited its turn behind it: median 68 ms, p99 ~150 ms from the key to the screen
    (2-core x86, tmux). With the training thread at nice 10 (and the MLX stream thread it starts, which
    inherits it) the UI's few milliseconds of work run first: median 47 ms. An idle machine still gives
    training all its time. Linux only: there a thread's nice is its own (elsewhere setpriority would
    reach the whole process; on a Mac the GPU does the work anyway)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass


class TrainingWorker:
    """Start with start(); queue runs with submit(); shutdown() stops the active run (it saves a
    checkpoint) and ends the thread."""

    def __init__(self, target, interval=0.2):
        self.target = target  # whom to post messages to (the app): post_message is thread-safe
        self.interval = interval  # seconds between batches of steps
        self._jobs = queue.Queue()
        self._active = None  # the Job being trained
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._main, name="mlxchat-train", daemon=True)
        self._next_id = 0

    def start(self):
        self.thread.start()

    @property
    def active(self):
        with self._lock:
            return self._active

    def submit(self, make_run, control):
        """Queue a run; returns its id (the id of the messages it will post)."""
        with self._lock:
            self._next_id += 1
            run_id = self._next_id
        self._jobs.put(Job(run_id, make_run, control))
        return run_id

    def shutdown(self, timeout=None):
        """Stop the active run (a checkpoint is saved first) and end the thread; waits up to `timeout`
        seconds. Returns True when the thread ended."""
        job = self.active
        if job is not None:
            job.control.stop()
        self._jobs.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- on the training thread

    def _main(self):
        import mlx.core as mx
        try:
            lower_priority()
            self._probe()
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                with self._lock:
                    self._active = job
                try:
                    self._train(job)
                finally:
                    with self._lock:
                        self._active = None
                # a run freezes the GC after its first step and unfreezes at its end (mlxchat.training):
                # put the app's long-lived objects back out of the full collections' reach
                freeze_gc()
        finally:
            mx.clear_streams()  # a thread that leaves its streams behind can abort the process at exit

    def _probe(self):
        """A ~0.2 s matmul probe: what this machine's MLX does per second, for the time estimate."""
        import mlx.core as mx
        from mlxchat.hardware import backend_name, device_memory_bytes, device_name, get_peak_flops
        n = 512
        a = mx.random.normal((n, n))
        b = mx.random.normal((n, n))
        mx.eval(a, b, a @ b)  # warm up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.2:
            mx.eval(a @ b)
            reps += 1
        rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
        del a, b
        self.target.post_message(MachineInfo(backend_name(), device_name(), int(device_memory_bytes() or 0), rate,
                                             get_peak_flops()))

    def _train(self, job):
        from mlxchat.training import TrainingError
        try:
            run = job.make_run(job.control)
        except Exception as e:  # noqa: BLE001  (a refused config: shown, nothing started)
            self.target.post_message(RunRefused(job.run_id, str(e)))
            return
        batch, last_post = [], 0.0
        log = None
        try:
            for event in run:
                record = dict(event.to_dict(), time=round(time.time(), 3))
                if event.kind == "started":
                    job.run_dir = event.run_dir
                    log = _RunLog(event.run_dir, record)
                if log is not None:
                    log.write(event)
                batch.append(record)
                now = time.monotonic()
                if event.kind in URGENT or now - last_post >= self.interval:
                    self.target.post_message(TrainingEvents(job.run_id, batch))
                    batch, last_post = [], now
        except TrainingError:
            pass  # the run already sent its Finished(failed) event, with the message
        except Exception:  # noqa: BLE001  (a bug: Finished(failed) was sent too; the traceback goes to train.log)
            if log is not None:
                log.text(traceback.format_exc())
        finally:
            if batch:
                self.target.post_message(TrainingEvents(job.run_id, batch))
            if log is not None:
                log.close()


class _RunLog:
    """The run folder's human-readable side: config.json (the resolved config) and train.log (what the
    scripts would print). metrics.jsonl, written by the run itself, is the complete record."""

    def __init__(self, run_dir, started):
        from mlxchat.common import atomic_write_text
        os.makedirs(run_dir, exist_ok=True)
        config = {"stage": started["stage"], **started["config"]}
        atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(config, indent=2, default=str) + "\n")
        self._f = open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8")

    def write(self, event):
        for line in event_lines(event) or own_lines(event):
            self.text(line)

    def text(self, text):
        self._f.write(time.strftime("%H:%M:%S ") + text + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


def own_lines(event):
    """train.log's lines for the events the scripts show their own way (event_lines has the others)."""
    if event.kind == "phase":
        return [f"-- {event.name}"]
    if event.kind == "started":
        return [f"started {event.stage} run: {event.num_params:,} parameters, {event.total_steps} steps"]
    if event.kind == "finished":
        return [f"finished: {event.status} at step {event.step}" + (f": {event.error}" if event.error else "")]
    return []
