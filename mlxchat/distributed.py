"""
Data parallel across processes (several Macs, or several processes on one machine).

MLX does the communication (mx.distributed: ring over TCP, JACCL over Thunderbolt 5 RDMA, MPI,
NCCL on CUDA; processes started by `mlx.launch`). What lives here is the glue a training run
needs around it, the same for pretraining and SFT:
    compute_init()     join the group (with a timeout) -> (rank, world_size, group)
    all_reduce_mean()  average a gradient tree across ranks in a few large collectives
    all_reduce_floats() a few Python numbers summed (max, min) over ranks: losses, control flags
    broadcast_tree()   rank 0's arrays to every rank (initial weights, resync)
    broadcast_object() rank 0's JSON-able value to every rank (resume step, checkpoint meta)
    barrier()
    dist_waiting()     every wait for the other ranks: a collective that fails (a peer died and its
                       sockets closed) raises DistributedError naming what it waited for; one that
                       makes no progress for `timeout` seconds (a peer hung, a Mac went to sleep, a
                       cable was pulled) calls the watchdog's on_hang, which the script that called
                       compute_init chose (the scripts end the process: a collective blocked inside
                       C++ cannot be interrupted from Python).
All of them are no-ops in a single process, so a run calls them unconditionally.
"""
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import mlx.core as mx


class DistributedError(RuntimeError):
    """The group could not be joined, a collective failed, or the ranks disagree: the message says
    which wait, on which rank, and how to resume."""


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


def compute_init(backend="any", timeout=DIST_TIMEOUT, on_hang=None):
    """Join the distributed group when a launcher started this process as one of several ranks.
    Returns (rank, world_size, group); (0, 1, None) for a plain single process. backend: "any"
    (whatever the launcher set up), "ring", "jaccl", "mpi" or "nccl". When the other ranks have not
    all joined within `timeout` seconds, a helper process ends this one with a message (the join
    blocks inside C++ holding the GIL: nothing in this process could act). Raises DistributedError
    when the backend cannot start.

    on_hang(message): called by a watchdog thread when a wait for the other ranks (dist_waiting)
    makes no progress for `timeout` seconds. A collective blocked in C++ cannot be interrupted, so
    the caller decides what to do, usually end the process (the scripts print the message and exit
    with status 3). None: no watchdog (a hung peer then hangs this rank too)."""
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
        raise DistributedError(f"rank {launched_rank}: could not start the {backend!r} distributed backend: {e}") from e
    if group.size() < 2:
        raise DistributedError(f"this process was launched as rank {launched_rank} of a multi-process run, but the "
                               f"{backend!r} backend formed a group of one: pass the backend mlx.launch used (--dist-backend)")
    watchdog = Watchdog(timeout, group.rank(), group.size(), on_hang) if on_hang is not None else None
    _dist.update(rank=group.rank(), world_size=group.size(), group=group, backend=backend, watchdog=watchdog)
    return group.rank(), group.size(), group


def get_rank():
    """This process's rank in the mx.distributed group (0 when not distributed)."""
    if _dist["group"] is not None:  # joined by compute_init (any backend, MPI included)
        return _dist["rank"]
    try:
        return mx.distributed.init().rank() if os.environ.get("MLX_RANK") is not None else 0
    except Exception:
        return 0


def get_dist_info():
    """(rank, world_size, group) of this process: (0, 1, None) until compute_init joined a group."""
    return _dist["rank"], _dist["world_size"], _dist["group"]


class Watchdog:
    """Calls on_hang(message) once when an armed wait makes no progress for `timeout` seconds.
    A daemon thread checks a deadline; the thread that runs the collectives arms it around every
    wait for the other ranks (collectives release the GIL while they block, so this thread runs)."""

    def __init__(self, timeout, rank, world_size, on_hang):
        self.timeout, self.rank, self.world_size, self.on_hang = float(timeout), rank, world_size, on_hang
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
                self._armed = None
                self.on_hang(f"mlxchat watchdog: rank {self.rank} of {self.world_size}: no progress for {timeout:.0f} s "
                             f"in '{label}': another rank is stuck (hung, asleep, or its network is down). "
                             f"Exiting so that the whole run stops; resume every rank with --resume-from-step -2.")


@contextlib.contextmanager
def dist_waiting(label, timeout=None):
    """Wrap every wait for the other ranks: the watchdog (if compute_init set one up) calls its
    on_hang if the block makes no progress (see dist_beat) for `timeout` seconds (default:
    compute_init's), and a failed collective (a peer died: MLX raises RuntimeError) raises
    DistributedError naming `label`. A no-op in a single process."""
    if _dist["group"] is None:
        yield
        return
    watchdog = _dist["watchdog"]
    previous = watchdog.arm(label, timeout) if watchdog is not None else None
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, DistributedError):
            raise
        raise DistributedError(f"rank {_dist['rank']} of {_dist['world_size']}: '{label}' failed: {e}. Another rank "
                               f"died or the network between the Macs went down, so this rank stops too; resume every "
                               f"rank with --resume-from-step -2.") from e
    finally:
        if watchdog is not None:
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
        raise DistributedError(f"{what} differs between rank 0 and rank(s) {odd}: every Mac must use the same "
                               f"files (copy them from rank 0's machine)")


def dist_beating(batches):
    """The batches as they come, each one reported to the watchdog as progress (a long val eval is
    one wait for the other ranks, which must not time out while every rank is busy)."""
    for batch in batches:
        dist_beat()
        yield batch

