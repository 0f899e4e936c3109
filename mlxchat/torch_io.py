"""
Reading torch.save() files without torch: nanochat's checkpoints (`model_XXXXXX.pt`, `optim_*.pt`)
and its tokenizer's `token_bytes.pt`. Its own module so that the tokenizer and the checkpoint
manager can both use it without importing each other.
"""
import pickle
import zipfile

import numpy as np
import mlx.core as mx


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names the file and what to do."""


# -----------------------------------------------------------------------------
# reading torch.save() files without torch
#
# A `.pt` file written by torch.save (format >= 1.6) is a zip archive:
#   <name>/data.pkl      a pickle of the object; tensors appear as
#                        torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
#                        where `storage` is a persistent id ('storage', StorageType, key, location, numel)
#   <name>/data/<key>    the raw little-endian bytes of each storage
# We unpickle with a restricted Unpickler that knows only those few globals, so no arbitrary code runs.

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": (np.float32, None),
    "DoubleStorage": (np.float64, None),
    "HalfStorage": (np.float16, None),
    "BFloat16Storage": (np.uint16, "bfloat16"),  # numpy has no bf16: keep the raw bits, view in MLX
    "LongStorage": (np.int64, None),
    "IntStorage": (np.int32, None),
    "ShortStorage": (np.int16, None),
    "CharStorage": (np.int8, None),
    "ByteStorage": (np.uint8, None),
    "BoolStorage": (np.bool_, None),
}


class _StorageType:
    def __init__(self, name):
        if name not in _TORCH_STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported torch storage type {name}")
        self.name = name
        self.np_dtype, self.special = _TORCH_STORAGE_DTYPES[name]


class _Tensor:
    """What a torch tensor unpickles to here: a numpy array plus a marker for bfloat16."""
    def __init__(self, array, special):
        self.array = array
        self.special = special


def _rebuild_tensor(storage, offset, size, stride, *args):
    flat, special = storage
    size = tuple(size)
    if len(size) == 0:
        arr = flat[offset:offset + 1].reshape(())
    else:
        itemsize = flat.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
        arr = np.ascontiguousarray(arr)
    return _Tensor(arr, special)


def _rebuild_parameter(data, requires_grad, backward_hooks, *args):
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, f, zf, prefix, path):
        super().__init__(f)
        self.zf, self.prefix, self.path = zf, prefix, path
        self.cache = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module == "torch" and name in ("bfloat16", "float32", "float16"):
            return name
        raise pickle.UnpicklingError(f"{self.path}: refusing to load global {module}.{name} (not a plain state dict)")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind}")
        if key not in self.cache:
            raw = self.zf.read(f"{self.prefix}data/{key}")
            flat = np.frombuffer(raw, dtype=storage_type.np_dtype)
            if flat.size < numel:
                raise CheckpointError(f"{self.path}: storage {key} holds {flat.size} values, expected {numel}")
            self.cache[key] = (flat, storage_type.special)
        return self.cache[key]


def _to_mx(value):
    if isinstance(value, _Tensor):
        if value.special == "bfloat16":
            return mx.array(value.array).view(mx.bfloat16)
        return mx.array(value.array)
    if isinstance(value, dict):
        return {k: _to_mx(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_mx(v) for v in value)
    return value


def load_torch_file(path):
    """Load a torch.save()d object (a state dict, an optimizer state) without torch.
    Tensors become mx.arrays with their dtype kept (bf16 stays bf16)."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({e}). The file is truncated or corrupt; "
            "copy it again from the machine that trained it, or pick another step with --step.") from e
    try:
        with zf:
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not pkl:
                raise CheckpointError(f"{path}: zip archive without data.pkl: not a torch.save() file")
            prefix = pkl[0][: -len("data.pkl")]
            with zf.open(pkl[0]) as f:
                obj = _TorchUnpickler(f, zf, prefix, path).load()
            return _to_mx(obj)
    except CheckpointError:
        raise
    except Exception as e:  # zlib/CRC errors, truncated members, bad pickles
        raise CheckpointError(
            f"{path}: could not read the torch checkpoint ({type(e).__name__}: {e}). The file is truncated "
            "or corrupt; copy it again, or pick another step with --step.") from e
