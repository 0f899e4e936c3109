"""
Shared helpers: compute dtype, base directory, logging, atomic file writes.
Mirrors nanochat/common.py, with MLX in place of torch.
"""
import logging
import os
import sys
import tempfile

import mlx.core as mx

from mlxchat.distributed import get_rank
from mlxchat.hardware import backend_name

_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


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


def format_duration(seconds):
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
