"""
Checkpoints: mlxchat's own format (safetensors + json, written atomically) and nanochat's PyTorch
`.pt` files, read without torch.

Layout (same as nanochat's, under the base dir):
    base_checkpoints/<tag>/     model_{step:06d}.safetensors, meta_{step:06d}.json, optim_{step:06d}_rank{r}.safetensors
    chatsft_checkpoints/<tag>/  same
    chatrl_checkpoints/<tag>/   model + meta
nanochat's `model_{step:06d}.pt` files in such a directory load too.
"""
import json
import logging
import os
import re
import shutil

import numpy as np
import mlx.core as mx

from mlxchat.common import atomic_write_text, get_base_dir, _fsync_dir
from mlxchat.distributed import barrier, broadcast_tree, get_dist_info, ranks_disagree
from mlxchat.torch_io import CheckpointError, load_torch_file  # noqa: F401  (CheckpointError is part of this module's API)

# -----------------------------------------------------------------------------
# mlxchat's own format: safetensors for arrays, JSON for everything else, every file written atomically


log = logging.getLogger(__name__)

_TREE_KEY = "__mlxchat_tree__"


def _flatten_tree(obj, prefix, arrays):
    """Replace arrays in a nested dict/list by {"__array__": key} and collect them in `arrays`."""
    if isinstance(obj, mx.array):
        arrays[prefix] = obj
        return {"__array__": prefix}
    if isinstance(obj, np.ndarray):
        arrays[prefix] = mx.array(obj)
        return {"__array__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten_tree(v, f"{prefix}/{k}" if prefix else str(k), arrays)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten_tree(v, f"{prefix}/{i}" if prefix else str(i), arrays) for i, v in enumerate(obj)]}
    return obj


def _unflatten_tree(skel, arrays):
    if isinstance(skel, dict):
        if "__array__" in skel:
            return arrays[skel["__array__"]]
        if "__dict__" in skel:
            return {k: _unflatten_tree(v, arrays) for k, v in skel["__dict__"]}
        if "__list__" in skel:
            return [_unflatten_tree(v, arrays) for v in skel["__list__"]]
    return skel


def save_arrays(path, tree):
    """Atomically write a tree (nested dicts/lists of mx.arrays and JSON values) to one safetensors
    file: the arrays as tensors, the structure as JSON in the file's metadata."""
    arrays = {}
    skel = _flatten_tree(tree, "", arrays)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.safetensors"  # mx.save_safetensors insists on the suffix
    try:
        mx.save_safetensors(tmp, arrays, metadata={_TREE_KEY: json.dumps(skel)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def load_arrays(path):
    """Inverse of save_arrays (a plain safetensors file without our metadata loads as a flat dict)."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        arrays, metadata = mx.load(path, return_metadata=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: could not read the safetensors file ({e}). It is truncated or corrupt; "
            "delete it and resume from an earlier step (--resume-from-step), or copy it again.") from e
    if metadata and _TREE_KEY in metadata:
        return _unflatten_tree(json.loads(metadata[_TREE_KEY]), arrays)
    return arrays


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.safetensors")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.safetensors")


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Write model (rank 0), optimizer state (every rank) and meta (rank 0), each atomically.
    The meta file is written last: a step counts as saved only once its meta exists, so a crash
    mid-save leaves the previous checkpoint as the latest."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    _sweep_stale_temp_files(checkpoint_dir)
    if rank == 0:
        save_arrays(_model_path(checkpoint_dir, step), dict(model_data))
        log.info(f"saved model to {_model_path(checkpoint_dir, step)}")
    if optimizer_data is not None:
        save_arrays(_optim_path(checkpoint_dir, step, rank), optimizer_data)
    _fault_injection_pause(checkpoint_dir, step)
    if rank == 0:
        atomic_write_text(_meta_path(checkpoint_dir, step), json.dumps(meta_data, indent=2, default=_json_default))


def save_training_checkpoint(checkpoint_dir, step, model, optimizer, meta_data, **optimizer_extra):
    """A training script's checkpoint (base_train, chat_sft), in one process or on every rank of a
    data-parallel run (call it on all ranks). The model, the optimizer state plus `optimizer_extra`
    (e.g. the data loader's state) and the meta. With several ranks, every rank writes its own
    optimizer file, then rank 0 writes the model and, last, the meta that commits the step, so a
    committed step always has every rank's file."""
    rank, world_size, _ = get_dist_info()
    if world_size > 1 and ranks_disagree({"model": model.parameters(), "optimizer": optimizer.state},
                                         label=f"step {step:05d}: checkpoint (comparing the ranks' weights)"):
        # every rank applies the same update to the same averaged gradient, but Macs with different
        # chips may round some kernels differently: rank 0's copy wins, so the ranks never drift apart
        if rank == 0:
            log.warning(f"step {step:05d}: the ranks' weights had drifted apart (different chips round differently); "
                        f"resynchronized them to rank 0's")
        model.update(broadcast_tree(model.parameters(), label="resynchronizing the weights"))
        optimizer.state.update(broadcast_tree(optimizer.state, label="resynchronizing the optimizer state"))
    opt_tensors, opt_meta = optimizer.state_dict()
    optimizer_data = {"optimizer": {"tensors": opt_tensors, "meta": opt_meta}, **optimizer_extra}
    if rank != 0:
        save_arrays(_optim_path(checkpoint_dir, step, rank), optimizer_data)
    barrier(f"step {step:05d}: checkpoint (every rank's optimizer file)")
    if rank == 0:
        save_checkpoint(checkpoint_dir, step, model.named_parameters(), optimizer_data, meta_data, rank=0)


# save_arrays' temporary name: <final name>.tmp<writer pid>.safetensors
_TEMP_FILE_RE = re.compile(r".+\.tmp(\d+)\.safetensors")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        pass  # PermissionError: it runs, as another user (and on any other error, assume it runs: the safe side)
    return True


def _sweep_stale_temp_files(checkpoint_dir):
    """Delete the temporary files of saves that were killed (kill -9, a crash) before their rename.
    Another process may be saving into the same folder right now (a second run with the same tag,
    another rank on this machine), so a file goes only when its name carries this process's pid or
    a pid that no longer runs. atomic_write's temp files (the meta) carry no pid, so they are never
    swept: their owner cannot be told, and atomic_write removes its own on any error it survives."""
    for name in os.listdir(checkpoint_dir):
        match = _TEMP_FILE_RE.fullmatch(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and (pid <= 0 or _pid_alive(pid)):
            continue  # another live process's save in flight (pid <= 0: not a pid we could have written)
        try:
            os.unlink(os.path.join(checkpoint_dir, name))
        except OSError:
            pass


def _fault_injection_pause(checkpoint_dir, step):
    """For the crash test only: MLXCHAT_TEST_PAUSE_IN_SAVE=<step> stops a save of that step after the
    model and optimizer files are written but before its meta (the commit point), drops a marker
    file and sleeps, so the test can kill -9 the process mid-save deterministically."""
    target = os.environ.get("MLXCHAT_TEST_PAUSE_IN_SAVE")
    if target is not None and int(target) == step:
        import time
        open(os.path.join(checkpoint_dir, f"paused_in_save_{step:06d}"), "w").close()
        time.sleep(600)


def _json_default(o):
    if isinstance(o, mx.array):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def _read_meta(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt") from e


def load_model_state(checkpoint_dir, step):
    """{name: mx.array} from model_{step}.safetensors (ours) or model_{step}.pt (nanochat's)."""
    ours = _model_path(checkpoint_dir, step)
    theirs = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if os.path.exists(ours):
        return load_arrays(ours)
    if os.path.exists(theirs):
        return load_torch_file(theirs)
    raise FileNotFoundError(f"no model_{step:06d}.safetensors or model_{step:06d}.pt in {checkpoint_dir}")


def load_checkpoint(checkpoint_dir, step, load_optimizer=False, rank=0):
    """Returns (model_data, optimizer_data or None, meta_data), like nanochat's."""
    model_data = load_model_state(checkpoint_dir, step)
    optimizer_data = None
    if load_optimizer:
        path = _optim_path(checkpoint_dir, step, rank)
        if os.path.exists(path):
            optimizer_data = load_arrays(path)
        elif os.path.exists(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")):
            log.warning(f"{checkpoint_dir}: nanochat's optimizer state (.pt) is not loaded; the optimizer starts fresh")
    meta_data = _read_meta(_meta_path(checkpoint_dir, step))
    return model_data, optimizer_data, meta_data


def _fix_legacy_state(model_data, model_config):
    """nanochat's fixes for older checkpoints: torch.compile prefixes, missing window pattern and lambdas."""
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    model_config = dict(model_config)
    model_config.setdefault("window_pattern", "L")
    n_layer = model_config["n_layer"]
    if "resid_lambdas" not in model_data:
        model_data["resid_lambdas"] = mx.ones((n_layer,))
    if "x0_lambdas" not in model_data:
        model_data["x0_lambdas"] = mx.zeros((n_layer,))
    return model_data, model_config


def find_tokenizer_dir(checkpoint_dir):
    """A tokenizer next to the checkpoint wins (a copied nanochat directory), then the base dir layout
    (<base>/tokenizer beside <base>/base_checkpoints/<tag>), then $MLXCHAT_BASE_DIR/tokenizer."""
    candidates = [checkpoint_dir, os.path.join(checkpoint_dir, "tokenizer"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir))), "tokenizer"),
                  os.path.join(get_base_dir(), "tokenizer")]
    for c in candidates:
        if os.path.exists(os.path.join(c, "tokenizer.pkl")):
            return c
    return None


def build_model(checkpoint_dir, step, phase="eval", load_tokenizer=True):
    """Rebuild a GPT from a checkpoint directory (ours or nanochat's). Returns (model, tokenizer, meta);
    tokenizer is None when none is found."""
    from mlxchat.gpt import GPT, GPTConfig
    assert phase in ("train", "eval"), phase
    model_data, _, meta = load_checkpoint(checkpoint_dir, step)
    if "model_config" not in meta:
        raise CheckpointError(f"{_meta_path(checkpoint_dir, step)}: no 'model_config' in the meta file")
    model_data, model_config = _fix_legacy_state(model_data, meta["model_config"])
    config = GPTConfig(**model_config)
    model = GPT(config)
    model.load_state_dict(model_data)
    model.train() if phase == "train" else model.eval()
    tokenizer = None
    if load_tokenizer:
        tok_dir = find_tokenizer_dir(checkpoint_dir)
        if tok_dir is not None:
            from mlxchat.tokenizer import RustBPETokenizer
            tokenizer = RustBPETokenizer.from_directory(tok_dir)
            assert tokenizer.get_vocab_size() == config.vocab_size, (
                f"tokenizer in {tok_dir} has vocab {tokenizer.get_vocab_size()}, the model {config.vocab_size}")
    return model, tokenizer, meta


_STEP_RE = re.compile(r"^meta_(\d{6,})\.json$")


def find_steps(checkpoint_dir):
    """Steps that are completely saved (meta written last, model present)."""
    steps = []
    if not os.path.isdir(checkpoint_dir):
        return steps
    for name in os.listdir(checkpoint_dir):
        m = _STEP_RE.match(name)
        if m:
            step = int(m.group(1))
            if os.path.exists(_model_path(checkpoint_dir, step)) or os.path.exists(os.path.join(checkpoint_dir, f"model_{step:06d}.pt")):
                steps.append(step)
    return sorted(steps)


def find_last_step(checkpoint_dir):
    steps = find_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (model + meta) in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """Default model tag: the largest d<N> directory, else the most recently modified one."""
    if not os.path.isdir(checkpoints_dir):
        raise FileNotFoundError(f"no checkpoints directory {checkpoints_dir}: train a model first")
    tags = [f for f in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, f))]
    if not tags:
        raise FileNotFoundError(f"no checkpoints in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.match(r"^d(\d+)$", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


SOURCE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def load_model_from_dir(checkpoints_dir, phase="eval", model_tag=None, step=None):
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log.info(f"no model tag given, using {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    return build_model(checkpoint_dir, step, phase)


def load_model(source, phase="eval", model_tag=None, step=None):
    """source: base | sft | rl, from the base dir's checkpoint folders."""
    if source not in SOURCE_DIRS:
        raise ValueError(f"source must be one of {sorted(SOURCE_DIRS)}, got {source!r}")
    return load_model_from_dir(os.path.join(get_base_dir(), SOURCE_DIRS[source]), phase, model_tag, step)


def load_optimizer_state(source, rank=0, model_tag=None, step=None):
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    path = _optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(path):
        return None
    return load_arrays(path)


def convert_nanochat_checkpoint(checkpoint_dir, step, out_dir, tokenizer_dir=None):
    """Turn a nanochat checkpoint (model_*.pt + meta_*.json [+ tokenizer]) into mlxchat's format.
    Dtypes are kept as stored (bf16 embeddings stay bf16)."""
    model_data = load_torch_file(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    meta = _read_meta(_meta_path(checkpoint_dir, step))
    model_data, model_config = _fix_legacy_state(model_data, meta["model_config"])
    meta = dict(meta, model_config=model_config, converted_from=os.path.abspath(checkpoint_dir))
    save_checkpoint(out_dir, step, model_data, None, meta)
    # the tokenizer goes into the converted directory itself, so it is self-contained
    tok_dir = tokenizer_dir or find_tokenizer_dir(checkpoint_dir)
    copied = []
    if tok_dir is not None:
        for name in ("tokenizer.pkl", "token_bytes.pt", "token_bytes.npy"):
            src = os.path.join(tok_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                copied.append(name)
    return _model_path(out_dir, step), copied
