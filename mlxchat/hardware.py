"""
The hardware: which backend and device MLX runs on, how much memory it may use, its peak FLOP/s and
memory bandwidth (for MFU and MBU), and MLX's memory cap for training.
"""
import os

import mlx.core as mx


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
    no cap of its own) and puts the limit that MLX had on entry back after it.

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
        # MLX's limit on entry is put back on exit, also without a cap of our own: a Trainer with
        # auto_memory_limit sets one inside the block
        self.previous = mx.get_memory_limit()
        if self.limit is not None:
            mx.set_memory_limit(self.limit)
            mx.reset_peak_memory()
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            mx.set_memory_limit(self.previous)
        return False


def over_cap_message(limit_gib, what="--memory-limit"):
    """Once training has run a few steps under memory_cap(limit_gib): if the peak went well past the cap,
    the step's live memory does not fit under it and MLX is running it one op at a time. Returns the
    warning to show, with the fixes (instead of leaving the user with a mysteriously slow run), or None."""
    if limit_gib is None:
        return None
    peak = mx.get_peak_memory() / 2 ** 30
    if peak <= 1.1 * limit_gib:  # the cap is checked between ops: one op's outputs may pass it (H100 d12: 2%)
        return None
    return (f"a step needs {peak:.2f} GiB, more than {what} {limit_gib:g} GiB: MLX now waits for every op "
            f"before queueing the next (slow). Lower --device-batch-size, add --grad-checkpoint 1, or raise {what}.")


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
