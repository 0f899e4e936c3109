"""mlxchat: nanochat, ported to Apple's MLX."""
import os
import sys


def _preload_openblas():
    # MLX's Linux CPU wheel links the reference BLAS, whose matrix products are ~50x slower than
    # OpenBLAS (2.6 vs 130 GFLOP/s for a 1024^2 sgemm on a 2-core x86 box). Loading Debian's
    # OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes MLX's cblas_* symbols resolve to it,
    # without LD_PRELOAD. Metal and CUDA do not use the CPU BLAS for model math, so this is Linux
    # only; MLXCHAT_OPENBLAS=0 turns it off, MLXCHAT_OPENBLAS=/path/libopenblas.so.0 picks a library.
    choice = os.environ.get("MLXCHAT_OPENBLAS", "1")
    if not sys.platform.startswith("linux") or choice == "0":
        return None
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        # too late: MLX's BLAS symbols are already bound. Say so when the CPU does the model's math (a
        # tiny training step measured 3 s instead of 0.3 s this way), not on a GPU, which does not use it
        if mx.default_device() == mx.cpu:
            import warnings
            warnings.warn("mlx was imported before mlxchat, so MLX's CPU matrix products use the slow reference BLAS: "
                          "import mlxchat first (or set MLXCHAT_OPENBLAS=0 to silence this)", stacklevel=3)
        return None
    candidates = [choice] if choice not in ("", "1") else [
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]
    import ctypes
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


OPENBLAS = _preload_openblas()
