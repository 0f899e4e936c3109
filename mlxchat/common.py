"""
Shared helpers: compute dtype, base directory, logging, atomic file writes.
Mirrors nanochat/common.py, with MLX in place of torch.
"""
import logging
import os
import sys
import tempfile

import mlx.core as mx

_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def backend_name():
    """'gpu' (Metal or CUDA) or 'cpu': what mx.default_device() runs on."""
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def gpu_kind():
    """'metal', 'cuda' or None."""
    if backend_name() != "gpu":
        return None
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    return "cuda"


def get_compute_dtype():
    """The activation dtype. MLXCHAT_DTYPE (bfloat16 | float16 | float32) wins; otherwise bf16 on a
    GPU backend (Metal, CUDA) and fp32 on the CPU, as nanochat picks bf16 on CUDA and fp32 on CPU."""
    name = os.environ.get("MLXCHAT_DTYPE", "").strip().lower()
    if name:
        if name not in _DTYPES:
            raise ValueError(f"MLXCHAT_DTYPE={name!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return mx.bfloat16 if backend_name() == "gpu" else mx.float32


def dtype_name(dtype):
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    return str(dtype)


def get_base_dir():
    """Where data, tokenizer, checkpoints and reports live (same sub-layout as nanochat's base dir):
    $MLXCHAT_BASE_DIR, else ~/.cache/mlxchat."""
    base = os.environ.get("MLXCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlxchat")
    os.makedirs(base, exist_ok=True)
    return base


# -----------------------------------------------------------------------------
# logging

class _ColorFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[35m"}

    def format(self, record):
        msg = super().format(record)
        if sys.stderr.isatty():
            color = self.COLORS.get(record.levelname, "")
            return f"{color}{msg}\033[0m"
        return msg


def setup_default_logging(level=logging.INFO):
    handler = logging.StreamHandler()
    handler.setFormatter(_ColorFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


logger = logging.getLogger("mlxchat")


def get_rank():
    """This process's rank in the mx.distributed group (0 when not distributed)."""
    if _dist["group"] is not None:  # joined by compute_init (any backend, MPI included)
        return _dist["rank"]
    try:
        return mx.distributed.init().rank() if os.environ.get("MLX_RANK") is not None else 0
    except Exception:
        return 0


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def print_banner():
    banner = r"""
                 _            _           _
       _ __ ___ | |_  __  ___| |__   __ _| |_
      | '_ ` _ \| \ \/ / / __| '_ \ / _` | __|
      | | | | | | |>  < | (__| | | | (_| | |_
      |_| |_| |_|_/_/\_\ \___|_| |_|\__,_|\__|
    """
    print0(banner)


# -----------------------------------------------------------------------------
# atomic writes: a crash (or kill -9) never leaves a half-written file under the final name

def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(f) on a temporary file in the same directory, fsync, then rename onto `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; give the final file the usual umask-based permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# hardware: what the device is, its peak FLOP/s and memory bandwidth (for MFU / MBU)

def device_name():
    try:
        return mx.device_info().get("device_name", "unknown")
    except Exception:
        return "unknown"


def device_memory_bytes():
    """Memory MLX can use: Metal's recommended working set (or RAM), the CUDA card's memory, else
    the machine's RAM."""
    try:
        info = mx.device_info()
    except Exception:
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class memory_cap:
    """`with memory_cap(limit_gib):` caps MLX's active memory at limit_gib GiB inside the block (None:
    MLX's own default) and puts the previous limit back after it.

    Why a training loop wants it: MLX allocates an op's outputs when the op is queued and frees a
    buffer only once the last op reading it has run, and the host queues ops far ahead of the device.
    Uncapped, a step's peak also holds the outputs of ops that have not run yet (H100, d12 B16 T2048
    with --grad-checkpoint 1: a 17.8 GiB peak for ~5.7 GiB of live memory). Past the cap, mx.eval waits
    for the device to catch up before it queues more, so the peak stays at about the cap as long as the
    step's live memory fits under it (same run, 8 GiB cap: 8.2 GiB peak, 6.5% slower). Below the live
    memory every op waits for the one before it: slow, but it still runs (see warn_if_over_cap).
    Entering a cap also resets MLX's peak-memory counter, so that warn_if_over_cap sees the capped
    work only (not, say, the loading of a checkpoint before it)."""

    def __init__(self, limit_gib):
        self.limit = None if limit_gib is None else int(limit_gib * 2 ** 30)
        self.previous = None

    def __enter__(self):
        if self.limit is not None:
            self.previous = mx.set_memory_limit(self.limit)
            mx.reset_peak_memory()
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            mx.set_memory_limit(self.previous)
        return False


def warn_if_over_cap(limit_gib, what="--memory-limit"):
    """Once training has run a few steps under memory_cap(limit_gib): if the peak went well past the cap,
    the step's live memory does not fit under it and MLX is running it one op at a time. Say so, with
    the fixes, instead of leaving the user with a mysteriously slow run. Returns True if it warned."""
    if limit_gib is None:
        return False
    peak = mx.get_peak_memory() / 2 ** 30
    if peak <= 1.1 * limit_gib:  # the cap is checked between ops: one op's outputs may pass it (H100 d12: 2%)
        return False
    print0(f"WARNING: a step needs {peak:.2f} GiB, more than {what} {limit_gib:g} GiB: MLX now waits for every op "
           f"before queueing the next (slow). Lower --device-batch-size, add --grad-checkpoint 1, or raise {what}.")
    return True


# Dense bf16/fp16 peak FLOP/s; first substring match wins (order matters: "H100 NVL" before "H100").
# CUDA numbers are nanochat's table. Apple GPUs before M5 have no faster half-precision path:
# peak = ALUs x 2 x clock (other-ports-and-mlx.md §8.1), for the largest GPU of each chip (the
# name MLX reports does not say how many GPU cores a chip has, so smaller bins read optimistic peaks
# and report lower MFU). M5 figures exclude the neural accelerators. All Apple rows are estimates.
_PEAK_FLOPS = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.8e15),
    ("H200 NVL", 836e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("A40", 149.7e12), ("A30", 165e12),
    ("L40S", 362e12), ("L4", 121e12), ("RTX 5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
    ("M1 Ultra", 21.2e12), ("M1 Max", 10.6e12), ("M1 Pro", 5.3e12), ("M1", 2.6e12),
    ("M2 Ultra", 27.2e12), ("M2 Max", 13.6e12), ("M2 Pro", 6.8e12), ("M2", 3.6e12),
    ("M3 Ultra", 28.6e12), ("M3 Max", 14.3e12), ("M3 Pro", 6.4e12), ("M3", 4.1e12),
    ("M4 Max", 17.2e12), ("M4 Pro", 9.2e12), ("M4", 4.3e12),
    ("M5 Max", 18.0e12), ("M5 Pro", 9.0e12), ("M5", 4.5e12),
]

# Peak memory bandwidth in bytes/s (infer_bench's MBU); Apple: the largest bin of each chip.
_PEAK_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12),
    ("L40S", 0.864e12), ("4090", 1.008e12), ("RTX 5090", 1.792e12),
    ("M1 Ultra", 800e9), ("M1 Max", 400e9), ("M1 Pro", 200e9), ("M1", 68e9),
    ("M2 Ultra", 800e9), ("M2 Max", 400e9), ("M2 Pro", 200e9), ("M2", 100e9),
    ("M3 Ultra", 819e9), ("M3 Max", 400e9), ("M3 Pro", 150e9), ("M3", 100e9),
    ("M4 Max", 546e9), ("M4 Pro", 273e9), ("M4", 120e9),
    ("M5", 153e9),
]


def _lookup(table, name):
    name = name or ""
    for key, value in table:
        if key.lower() in name.lower():
            return value
    return None


def get_peak_flops(name=None):
    """Peak dense half-precision FLOP/s of the device, or None when unknown (CPUs: None)."""
    return _lookup(_PEAK_FLOPS, name if name is not None else device_name())


def get_peak_bandwidth(name=None):
    return _lookup(_PEAK_BANDWIDTH, name if name is not None else device_name())


def format_duration(seconds):
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class DummyWandb:
    """Stands in for wandb when it is off (--run dummy) or not installed."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(project, run, config, master_process=True):
    """The wandb run that a training script logs to: a real one on rank 0 when `run` is a name, else
    (--run dummy, another rank, wandb not installed) a DummyWandb, so the script logs unconditionally."""
    if run == "dummy" or not master_process:
        return DummyWandb()
    try:
        import wandb
        return wandb.init(project=project, name=run, config=config)
    except ImportError:
        print0("wandb is not installed: logging to the console only")
        return DummyWandb()


# -----------------------------------------------------------------------------
# distributed: data parallel across processes (several Macs, or several processes on one machine)
#
# MLX does the communication (mx.distributed: ring over TCP, JACCL over Thunderbolt 5 RDMA, MPI,
# NCCL on CUDA; processes started by `mlx.launch`). What lives here is the glue a training script
# needs around it, the same for base_train and chat_sft:
#   compute_init()     join the group (with a timeout) -> (rank, world_size, group)
#   all_reduce_mean()  average a gradient tree across ranks in a few large collectives
#   broadcast_tree()   rank 0's arrays to every rank (initial weights, resync)
#   broadcast_object() rank 0's JSON-able value to every rank (resume step, checkpoint meta)
#   barrier()
#   dist_waiting()     the watchdog: a collective that makes no progress for `timeout` seconds
#                      (a peer hung, a Mac went to sleep, a cable was pulled) ends the process with
#                      a message naming what it waited for, instead of hanging forever. A peer that
#                      dies outright closes its sockets and the next collective fails at once; that
#                      error is turned into the same kind of message.
# All of them are no-ops in a single process, so a script calls them unconditionally.

import contextlib
import json
import signal
import subprocess
import threading
import time

DIST_TIMEOUT = 120.0  # seconds without progress in a collective (and to join) before giving up
_dist = {"rank": 0, "world_size": 1, "group": None, "watchdog": None, "backend": None}

_LAUNCHER_RANK_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _launcher_rank():
    """The rank a launcher (mlx.launch, mpirun) gave this process, or None when started alone."""
    for key in _LAUNCHER_RANK_VARS:
        value = os.environ.get(key, "")
        if value.strip():
            return int(value)
    return None


def _launcher_peers():
    """What the launcher says about the group, for messages: (world size or None, peer addresses)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:
        try:
            with open(hostfile) as f:
                text = f.read().strip()
            ring = json.loads(text) if text else []
            return len(ring), [addr for node in ring for addr in node]
        except (OSError, ValueError, TypeError):
            return None, []
    for key in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key, "").strip():
            return int(os.environ[key]), []
    if os.environ.get("MLX_IBV_DEVICES"):
        try:
            with open(os.environ["MLX_IBV_DEVICES"]) as f:
                return len(json.load(f)), [os.environ.get("MLX_JACCL_COORDINATOR", "")]
        except (OSError, ValueError):
            pass
    return None, []


# A helper process, not a thread, times the join: mx.distributed.init blocks inside C++ while
# holding the GIL until every peer has connected, so no Python thread of ours would run.
_KILL_TIMER = r"""
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if select.select([sys.stdin], [], [], seconds)[0]:
    sys.exit(0)  # cancelled (or the parent is gone: its end of the pipe closed)
sys.stderr.write(message + "\n")
sys.stderr.flush()
os.kill(pid, signal.SIGTERM)
if not select.select([sys.stdin], [], [], 5.0)[0]:
    os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def _kill_after(seconds, message):
    """Terminate this process with `message` on stderr unless the block finishes within `seconds`."""
    timer = subprocess.Popen([sys.executable, "-c", _KILL_TIMER, str(os.getpid()), str(seconds), message],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        timer.stdin.close()
        timer.wait()


def compute_init(backend="any", timeout=DIST_TIMEOUT):
    """Join the distributed group when a launcher started this process as one of several ranks.
    Returns (rank, world_size, group); (0, 1, None) for a plain single process. backend: "any"
    (whatever the launcher set up), "ring", "jaccl", "mpi" or "nccl". Gives up with a message when
    the other ranks have not all joined within `timeout` seconds. Call it first thing in main()."""
    if _dist["group"] is not None:
        return _dist["rank"], _dist["world_size"], _dist["group"]
    launched_rank = _launcher_rank()
    expected, peers = _launcher_peers()
    if launched_rank is None or expected == 1 or (os.environ.get("MLX_HOSTFILE") and expected == 0):
        return 0, 1, None  # started alone (or `mlx.launch -n 1`): nothing to join
    where = f"; peers {', '.join(peers)}" if peers else ""
    message = (f"mlxchat: rank {launched_rank}: the other ranks did not all join within {timeout:.0f} s "
               f"(backend {backend}{where}). Check that every rank was started (mlx.launch starts them all), "
               f"that the hostfile lists IP addresses (not hostnames) each Mac can reach, that the ports are "
               f"not blocked by a firewall, and that all Macs run the same mlxchat and MLX versions. "
               f"Wait longer with --dist-timeout.")
    try:
        with _kill_after(timeout, message):
            group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise SystemExit(f"mlxchat: rank {launched_rank}: could not start the {backend!r} distributed backend: {e}") from e
    if group.size() < 2:
        raise SystemExit(f"mlxchat: this process was launched as rank {launched_rank} of a multi-process run, but the "
                         f"{backend!r} backend formed a group of one: pass the backend mlx.launch used (--dist-backend)")
    _dist.update(rank=group.rank(), world_size=group.size(), group=group, backend=backend,
                 watchdog=Watchdog(timeout, group.rank(), group.size()))
    return group.rank(), group.size(), group


def get_dist_info():
    """(rank, world_size, group) of this process: (0, 1, None) until compute_init joined a group."""
    return _dist["rank"], _dist["world_size"], _dist["group"]


class Watchdog:
    """Ends the process (os._exit) when an armed wait makes no progress for `timeout` seconds.
    A daemon thread checks a deadline; the main thread arms it around every wait for the other
    ranks (collectives release the GIL while they block, so the thread keeps running)."""

    EXIT_CODE = 3

    def __init__(self, timeout, rank, world_size):
        self.timeout, self.rank, self.world_size = float(timeout), rank, world_size
        self._armed = None  # (label, deadline, timeout): one attribute, so reads and writes are atomic
        self._thread = threading.Thread(target=self._run, name="mlxchat-watchdog", daemon=True)
        self._thread.start()

    def arm(self, label, timeout=None):
        previous = self._armed
        timeout = self.timeout if timeout is None else float(timeout)
        self._armed = (label, time.monotonic() + timeout, timeout)
        return previous

    def beat(self):
        """Progress was made: push the deadline of the current wait back."""
        armed = self._armed
        if armed is not None:
            self._armed = (armed[0], time.monotonic() + armed[2], armed[2])

    def restore(self, previous):
        self._armed = previous

    def _run(self):
        while True:
            time.sleep(min(1.0, self.timeout / 20))
            armed = self._armed
            if armed is not None and time.monotonic() > armed[1]:
                label, _, timeout = armed
                sys.stdout.flush()
                sys.stderr.write(f"\nmlxchat watchdog: rank {self.rank} of {self.world_size}: no progress for {timeout:.0f} s "
                                 f"in '{label}': another rank is stuck (hung, asleep, or its network is down). "
                                 f"Exiting so that the whole run stops; resume every rank with --resume-from-step -2.\n")
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)


@contextlib.contextmanager
def dist_waiting(label, timeout=None):
    """Wrap every wait for the other ranks: the watchdog ends the process if the block makes no
    progress (see dist_beat) for `timeout` seconds (default: compute_init's), and a failed
    collective (a peer died: MLX raises RuntimeError) ends it with a message naming `label`.
    A no-op in a single process."""
    watchdog = _dist["watchdog"]
    if watchdog is None:
        yield
        return
    previous = watchdog.arm(label, timeout)
    try:
        yield
    except RuntimeError as e:
        sys.stdout.flush()
        raise SystemExit(f"\nmlxchat: rank {_dist['rank']} of {_dist['world_size']}: '{label}' failed: {e}. Another rank "
                         f"died or the network between the Macs went down, so this rank stops too; resume every "
                         f"rank with --resume-from-step -2.") from e
    finally:
        watchdog.restore(previous)


def dist_beat():
    """Tell the watchdog that the current wait is making progress (e.g. one eval batch done)."""
    if _dist["watchdog"] is not None:
        _dist["watchdog"].beat()


def _resolve_group(group):
    group = group if group is not None else _dist["group"]
    return group if group is not None and group.size() > 1 else None


def _bucketed_all_sum(leaves, group, scale, bucket_bytes):
    """all_sum a list of arrays in few collectives: the arrays of each dtype are flattened and
    concatenated into buckets of about bucket_bytes, one all_sum each, then cut back into shape.
    Buckets are evaluated one by one: at most one extra bucket of memory beyond the result."""
    out = [None] * len(leaves)
    by_dtype = {}
    for i, a in enumerate(leaves):
        by_dtype.setdefault(a.dtype, []).append(i)
    for indices in by_dtype.values():
        buckets, current, size = [], [], 0
        for i in indices:
            if current and size + leaves[i].nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += leaves[i].nbytes
        buckets.append(current)
        for bucket in buckets:
            flat = mx.concatenate([leaves[i].reshape(-1) for i in bucket]) if len(bucket) > 1 else leaves[bucket[0]].reshape(-1)
            summed = mx.distributed.all_sum(flat, group=group)
            if scale != 1.0:
                summed = summed * scale
            mx.eval(summed)
            dist_beat()
            offsets, total = [], 0
            for i in bucket[:-1]:
                total += leaves[i].size
                offsets.append(total)
            for i, part in zip(bucket, mx.split(summed, offsets) if offsets else [summed]):
                out[i] = part.reshape(leaves[i].shape)
    return out


def _rebuild(tree, leaves):
    from mlx.utils import tree_map
    it = iter(leaves)
    return tree_map(lambda _: next(it), tree)


def all_reduce_mean(tree, group=None, label="gradient all-reduce", bucket_bytes=64 << 20):
    """The mean over ranks of a tree of arrays (nested as from nn.value_and_grad, or a flat dict),
    as the same structure, evaluated. Sums keep each array's dtype, as nanochat's all-reduce does.
    Usable directly as Trainer(..., grad_reduce=all_reduce_mean). Single process: returns `tree`."""
    group = _resolve_group(group)
    if group is None:
        return tree
    from mlx.utils import tree_flatten
    leaves = [v for _, v in tree_flatten(tree)]
    with dist_waiting(label):
        return _rebuild(tree, _bucketed_all_sum(leaves, group, 1.0 / group.size(), bucket_bytes))


def all_reduce_floats(values, group=None, label="all-reduce", op="sum", timeout=None):
    """Sum (op="sum"), max or min of a few Python numbers over ranks, as fp32 (e.g. losses, flags)."""
    group = _resolve_group(group)
    if group is None:
        return [float(v) for v in values]
    fn = {"sum": mx.distributed.all_sum, "max": mx.distributed.all_max, "min": mx.distributed.all_min}[op]
    with dist_waiting(label, timeout):
        out = fn(mx.array([float(v) for v in values], dtype=mx.float32), group=group)
        mx.eval(out)
    return out.tolist()


def broadcast_tree(tree, group=None, label="broadcast from rank 0", bucket_bytes=64 << 20):
    """Every rank gets rank 0's arrays (same structure, evaluated): the other ranks add zeros,
    and x + 0 is exact. Single process: returns `tree`."""
    group = _resolve_group(group)
    if group is None:
        return tree
    from mlx.utils import tree_flatten
    leaves = [v for _, v in tree_flatten(tree)]
    if group.rank() != 0:
        leaves = [mx.zeros(v.shape, dtype=v.dtype) for v in leaves]
    with dist_waiting(label):
        return _rebuild(tree, _bucketed_all_sum(leaves, group, 1.0, bucket_bytes))


def broadcast_object(obj, group=None, label="broadcast from rank 0"):
    """Rank 0's JSON-able `obj` on every rank (other ranks pass anything, e.g. None)."""
    group = _resolve_group(group)
    if group is None:
        return obj
    import numpy as np
    data = json.dumps(obj).encode("utf-8") if group.rank() == 0 else b""
    with dist_waiting(label):
        n = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group).item()
        buf = np.frombuffer(data, dtype=np.uint8) if group.rank() == 0 else np.zeros((n,), dtype=np.uint8)
        out = mx.distributed.all_sum(mx.array(buf), group=group)
        mx.eval(out)
    return json.loads(bytes(np.array(out)).decode("utf-8"))


def barrier(label="barrier", group=None, timeout=None):
    """Wait until every rank got here."""
    group = _resolve_group(group)
    if group is None:
        return
    with dist_waiting(label, timeout):
        mx.eval(mx.distributed.all_sum(mx.zeros((1,), dtype=mx.float32), group=group))


def params_fingerprint(tree):
    """A few fp32 numbers that differ when two ranks' copies of a tree of arrays differ."""
    from mlx.utils import tree_flatten
    sums, squares = mx.array(0.0, dtype=mx.float32), mx.array(0.0, dtype=mx.float32)
    for i, (_, v) in enumerate(tree_flatten(tree)):
        v = v.astype(mx.float32)
        sums = sums + (i + 1) * v.sum()
        squares = squares + (v * v).sum()
    fp = mx.stack([sums, squares])
    mx.eval(fp)
    return fp


def ranks_disagree(tree, group=None, label="consistency check"):
    """True when the ranks' copies of `tree` differ (compares fingerprints: one small all_gather)."""
    group = _resolve_group(group)
    if group is None:
        return False
    fp = params_fingerprint(tree)
    with dist_waiting(label):
        everyone = mx.distributed.all_gather(fp[None], group=group)
        mx.eval(everyone)
    return bool(mx.any(everyone != everyone[0:1]).item())


def check_same_on_all_ranks(value, what, group=None):
    """Exit on every rank, naming the odd ones out, unless `value` (JSON-able) is the same on all
    ranks: e.g. the tokenizer, which every Mac loads from its own disk."""
    group = _resolve_group(group)
    if group is None:
        return
    reference = broadcast_object(value, group, label=f"comparing {what}")
    same = json.loads(json.dumps(value)) == reference
    flags = all_reduce_floats([float(not same and r == group.rank()) for r in range(group.size())], group,
                              label=f"comparing {what}")
    odd = [r for r, f in enumerate(flags) if f > 0]
    if odd:
        raise SystemExit(f"mlxchat: {what} differs between rank 0 and rank(s) {odd}: every Mac must use the same "
                         f"files (copy them from rank 0's machine)")


# -----------------------------------------------------------------------------
# what base_train and chat_sft do alike around their training loops, distributed or not

def add_dist_args(parser):
    """The data-parallel flags (start every rank with mlx.launch; see runs/multi_mac.sh)."""
    parser.add_argument("--dist-backend", default="any", help="mx.distributed backend under mlx.launch: any (what the launcher set up) | ring | jaccl | mpi | nccl")
    parser.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT,
                        help="seconds to wait for the other ranks (to join, or in a collective) before exiting with an error")


def launched_argv(argv=None):
    """The script's arguments (default sys.argv[1:]) without the "--" that mlx.launch needs in front of
    them: `mlx.launch ... --python python -m scripts.base_train -- --depth 12`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def dist_beating(batches):
    """The batches as they come, each one reported to the watchdog as progress (a long val eval is
    one wait for the other ranks, which must not time out while every rank is busy)."""
    for batch in batches:
        dist_beat()
        yield batch


class StopOnCtrlC:
    """While in the `with` block, Ctrl-C asks for a clean stop instead of killing the run: the first
    press sets `requested` (the loop finishes its step, saves a checkpoint and exits), a second one
    raises KeyboardInterrupt (exit without saving). The caller's handler is put back on exit.
    A Ctrl-C may reach only some of the ranks: `agreed` is whether any rank saw one, as of the last
    step (see all_reduce_step), so `now`, what a loop checks, makes every rank stop after the same step."""

    def __init__(self):
        self.requested = False
        self.agreed = False

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print0("\nCtrl-C: finishing this step, saving a checkpoint, then exiting (press again to abort without saving)")

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    @property
    def now(self):
        return self.requested if _dist["world_size"] == 1 else self.agreed


def all_reduce_step(loss, mean_loss, stop, step):
    """After each optimizer step (number `step`) of a data-parallel run, one tiny all-reduce: the losses
    averaged over ranks (what every rank logs), and whether any rank saw a Ctrl-C (into stop.agreed),
    so that all of them stop after the same step. Single process: (loss, mean_loss) as they are."""
    world_size = _dist["world_size"]
    if world_size == 1:
        return loss, mean_loss
    loss, mean_loss, stops = all_reduce_floats([loss, mean_loss, float(stop.requested)], label=f"step {step:05d}: loss all-reduce")
    stop.agreed = stops > 0
    return loss / world_size, mean_loss / world_size
