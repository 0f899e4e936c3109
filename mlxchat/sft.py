"""
Supervised finetuning (SFT) as a library object: teach a pretrained base model to chat. nanochat's
chat_sft in MLX; `python -m scripts.chat_sft` is its shell (examples there).

The base model has only seen plain text. SFT trains it on conversations rendered with the chat
special tokens (tokenizer.render_conversation), with the loss only on what the assistant says: its
text, its calculator calls and <|assistant_end|>. The user's turns and the tool's outputs are context.

Conversations are packed into rows of max_seq_len+1 tokens, best fit (the longest conversation of a
buffer of 100 that still fits), and a row that no buffered conversation fits is padded with <|bos|>,
never cropped: every conversation is seen whole, and padding is never a target.

Mixtures (--mixture):
    nanochat   nanochat's: SmolTalk train + 3 epochs of MMLU auxiliary_train + 4 of GSM8K train
               (val: SmolTalk test, MMLU test[:5200], GSM8K test[:420]); downloads on first use
    demo       offline: the chat set shipped with mlxchat (mlxchat/data/demo_chat: identity, greetings,
               spelling, State of the Union facts, calculator arithmetic in GSM8K's format), plus the
               real MMLU dev/validation and ARC validation splits when the task cache holds them
               (val: the demo set's val files, plus MMLU test[:5200] / GSM8K test[:420] when cached)
    FILE.jsonl your own conversations, CustomJSON format (one JSON array of messages per line); the
               last 5% (at most 500) are held out for validation

Batch size, sequence length and learning rates default to the base checkpoint's (its meta file).
A stop command finishes the current step and saves a checkpoint; --resume-from-step continues the run
from one exactly (the weights, the optimizer state, each rank's packing position and the schedule).

Data parallel across processes / Macs, as pretraining (mlxchat.pretrain).
Rank r packs conversations r, r+W, ... of the mixture; gradients are averaged before every step. Only
rank 0 needs the base checkpoint (base_train writes it on rank 0's machine): it sends the weights and the
optimizer state to the others. Every rank needs the same tokenizer and task data.

Upstream edge case, fixed here: in nanochat a conversation longer than max_seq_len+1 tokens never fits
a row, stays in the buffer forever, and once the buffer holds only such conversations every row is
padding; a batch without any target then gives a NaN mean loss (nanochat PR #803, unmerged). Here such
conversations (and any without a single supervised token) are skipped when fetched, counted, and
reported, so every row holds at least one supervised token. The model's loss also divides by
max(1, number of targets), so even an all-padding batch would give 0, not NaN.
"""
import os
import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlxchat.common import dtype_name, get_base_dir, get_compute_dtype
from mlxchat.distributed import (DIST_TIMEOUT, all_reduce_floats, barrier, broadcast_object, broadcast_tree,
                                 check_same_on_all_ranks, dist_beating, dist_waiting)
from mlxchat.hardware import device_name, memory_cap
from mlxchat.schedules import get_sft_lr_multiplier, get_sft_muon_momentum
from mlxchat.training import (Checks, keep_tokenizer, ConfigError, Eval, Finished, Log, Phase, Run, Started, Trainer, TrainingError,
                              config_dict, option, step_event)
from tasks.common import TaskMixture, task_data_dir
from tasks.demo_chat import DEMO_CHAT_DIR, DemoCalculator
from tasks.gsm8k import GSM8K

# nanochat's fallbacks when the base checkpoint's meta lacks a value (e.g. a converted nanochat checkpoint)
FALLBACKS = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
             "embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}


@dataclass
class SFTConfig:
    # the base model
    model_tag: Optional[str] = option(None, "base checkpoint folder (default: the largest d<N>); also names the SFT folder")
    model_step: Optional[int] = option(None, "base checkpoint step (default: the last)")
    base_checkpoint_dir: Optional[str] = option(None, "the base checkpoint folder itself (overrides --model-tag): a run "
                                                      "folder, or a nanochat checkpoint directory")
    checkpoint_dir: Optional[str] = option(None, "the SFT run's folder (default <base dir>/chatsft_checkpoints/<model tag>)")
    load_optimizer: int = option(1, "1 = start from the base run's optimizer state (momenta) when saved")
    resume_from_step: int = option(-1, "continue this SFT run from its checkpoint at this step (-2 = the latest; "
                                       "-1 = a fresh run): the same data position, optimizer state and schedule")
    # horizon and batch (None = the base checkpoint's)
    num_iterations: int = option(-1, "steps; -1 = one epoch of the mixture")
    max_seq_len: Optional[int] = option(None, "row length in tokens (default: the base run's)")
    device_batch_size: Optional[int] = option(None, "rows per micro-batch (default: the base run's)")
    total_batch_size: Optional[int] = option(None, "tokens per optimizer step (default: the base run's)")
    memory_limit: Optional[float] = option(None, "GiB of memory training may use: MLX's allocator is capped there, see "
                                                 "base_train --help (default: no cap)")
    # optimizer (None = the base run's flags, without its batch-size scaling, as nanochat)
    embedding_lr: Optional[float] = option(None, "AdamW learning rate of the embeddings (default: the base run's)")
    unembedding_lr: Optional[float] = option(None, "AdamW learning rate of lm_head (default: the base run's)")
    matrix_lr: Optional[float] = option(None, "Muon learning rate (default: the base run's)")
    init_lr_frac: float = option(0.8, "start at this fraction of the learning rates")
    warmup_ratio: float = option(0.0, "share of the steps with a linear warmup")
    warmdown_ratio: float = option(0.5, "share of the steps over which the learning rate decays at the end")
    final_lr_frac: float = option(0.0, "the learning rate at the end, as a share of the peak")
    # evaluation
    eval_every: int = option(200, "val bits per byte every N steps (-1 = only at the start and end)")
    eval_tokens: int = option(40 * 524288, "tokens per val evaluation (at most one pass over the val set)")
    chatcore_every: Optional[int] = option(None, "ChatCORE every N steps (-1 = off). Default: 200 (nanochat's) with "
                                                 "--mixture nanochat, else off (the offline mixtures have no full eval sets)")
    chatcore_max_cat: int = option(-1, "problems per categorical task in ChatCORE (-1 = all)")
    chatcore_max_sample: int = option(24, "problems per generative task in ChatCORE")
    # data
    mixture: str = option("nanochat", "nanochat | demo | path to a CustomJSON .jsonl file")
    mmlu_epochs: int = option(3, "times the MMLU training data is repeated in the mixture")
    gsm8k_epochs: int = option(4, "times the GSM8K-format training data is repeated in the mixture")
    seed: int = option(42, "random seed")
    # data parallel across processes / Macs
    dist_backend: str = option("any", "mx.distributed backend under mlx.launch: any (what the launcher set up) | ring | jaccl | mpi | nccl")
    dist_timeout: float = option(DIST_TIMEOUT, "seconds to wait for the other ranks (to join, or in a collective) before exiting with an error")

    def validate(self):
        c = Checks()
        for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
            v = getattr(self, name)
            c.require(v is None or (isinstance(v, int) and v >= 1), f"--{name.replace('_', '-')} must be >= 1, got {v!r}")
        c.require(self.resume_from_step >= -2, f"--resume-from-step must be a step, -1 (fresh) or -2 (the latest), got {self.resume_from_step}")
        c.require(self.num_iterations == -1 or self.num_iterations >= 1,
                  f"--num-iterations must be >= 1 or -1 (one epoch), got {self.num_iterations!r}")
        c.positive(self, "eval_tokens", "init_lr_frac", "dist_timeout")
        c.positive(self, "memory_limit", allow_none=True)
        c.every(self, "eval_every")
        c.require(self.chatcore_every is None or self.chatcore_every == -1 or self.chatcore_every > 0,
                  f"--chatcore-every must be a positive number of steps or -1 (off), got {self.chatcore_every!r}")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            c.require(0 <= getattr(self, name) <= 1, f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(self, name)!r}")
        c.require(self.mixture in ("nanochat", "demo") or os.path.isfile(os.path.expanduser(self.mixture)),
                  f"--mixture must be nanochat, demo or an existing CustomJSON .jsonl file, got {self.mixture!r}")
        if self.base_checkpoint_dir is not None:
            c.require(os.path.isdir(os.path.expanduser(self.base_checkpoint_dir)),
                      f"--base-checkpoint-dir {self.base_checkpoint_dir}: no such folder")
        c.raise_if_any()


# -----------------------------------------------------------------------------
# data

def in_task_cache(repo_id, subset, split):
    """Whether a hub split is already in the task cache (so using it needs no network)."""
    return os.path.exists(os.path.join(task_data_dir(repo_id, subset, split), "manifest.json"))


def build_mixtures(mixture, mmlu_epochs=3, gsm8k_epochs=4):
    """(train task, val task, list of what went in)."""
    from tasks.customjson import CustomJSON
    from tasks.mmlu import MMLU
    notes = []
    if mixture == "nanochat":
        from tasks.smoltalk import SmolTalk
        train = [SmolTalk(split="train")] + [MMLU(subset="all", split="auxiliary_train")] * mmlu_epochs \
            + [GSM8K(subset="main", split="train")] * gsm8k_epochs
        val = [SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200), GSM8K(subset="main", split="test", stop=420)]
        notes = [f"SmolTalk train, MMLU auxiliary_train x{mmlu_epochs}, GSM8K train x{gsm8k_epochs}"]
    elif mixture == "demo":
        from tasks.arc import ARC
        chat = CustomJSON(os.path.join(DEMO_CHAT_DIR, "chat_train.jsonl"))
        calc = DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_train.jsonl"))
        train = [chat] + [calc] * gsm8k_epochs
        notes.append(f"demo chat ({len(chat)}), demo calculator ({len(calc)}) x{gsm8k_epochs}")
        # real data that needs no download: the splits chat_eval does not test on
        for split in ("dev", "validation"):
            if in_task_cache("cais/mmlu", "all", split):
                t = MMLU(subset="all", split=split)
                train += [t] * mmlu_epochs
                notes.append(f"MMLU {split} ({len(t)}) x{mmlu_epochs}")
            else:
                notes.append(f"MMLU {split}: not in the task cache ({task_data_dir('cais/mmlu', 'all', split)}), skipped")
        for subset in ("ARC-Easy", "ARC-Challenge"):
            if in_task_cache("allenai/ai2_arc", subset, "validation"):
                t = ARC(subset=subset, split="validation")
                train.append(t)
                notes.append(f"{subset} validation ({len(t)})")
            else:
                notes.append(f"{subset} validation: not in the task cache, skipped")
        val = [CustomJSON(os.path.join(DEMO_CHAT_DIR, "chat_val.jsonl")),
               DemoCalculator(os.path.join(DEMO_CHAT_DIR, "calculator_val.jsonl"))]
        if in_task_cache("cais/mmlu", "all", "test"):
            val.append(MMLU(subset="all", split="test", stop=5200))
        if in_task_cache("openai/gsm8k", "main", "test"):
            val.append(GSM8K(subset="main", split="test", stop=420))
    elif mixture.endswith(".jsonl") or os.path.exists(mixture):
        n = len(CustomJSON(mixture))
        if n < 2:
            raise ConfigError(f"{mixture}: {n} conversation(s); need at least 2 (one is held out for validation)")
        n_val = max(1, min(500, n // 20))
        train = [CustomJSON(mixture, stop=n - n_val)]
        val = [CustomJSON(mixture, start=n - n_val)]
        notes.append(f"{mixture}: {n - n_val} train, last {n_val} held out for val")
    else:
        raise ConfigError(f"--mixture must be nanochat, demo or a .jsonl file (CustomJSON format), got {mixture!r}")
    return TaskMixture(train), TaskMixture(val), notes


def sft_rows_bestfit(dataset, tokenizer, num_rows, row_capacity, buffer_size=100, rank=0, world_size=1, resume_state=None):
    """Pack conversations into rows of exactly row_capacity tokens, best fit, BOS padding, no cropping.
    Yields (rows, masks, content_lengths, state) per batch of num_rows rows; state has 'consumed'
    (conversations packed, counting all ranks, for the progress), 'epoch' and 'skipped', and where the
    packing stands ('cursor', the next conversation to fetch, and 'buffer', the fetched ones not yet
    packed, by index): given back as resume_state, it continues with exactly the next batch. Rank r
    fetches conversations r, r+W, ... and wraps around into the next epoch."""
    size = len(dataset)
    assert size > 0, "empty dataset"
    bos = tokenizer.get_bos_token_id()
    buffer = []  # (ids, mask, index) of fetched conversations
    state = {"consumed": rank, "epoch": 1, "skipped": 0, "dataset_size": size}
    cursor = rank
    if resume_state is not None:
        if resume_state["dataset_size"] != size:
            raise ValueError(f"the data has {size:,} conversations, the saved position is in a mixture of "
                             f"{resume_state['dataset_size']:,}: an exact resume needs the same mixture")
        state.update({k: resume_state[k] for k in ("consumed", "epoch", "skipped")})
        cursor = resume_state["cursor"]
        # the buffered conversations rendered again (rendering is deterministic), in their order
        buffer = [(*tokenizer.render_conversation(dataset[i]), i) for i in resume_state["buffer"]]
    skips_in_a_row = 0

    def refill():
        nonlocal cursor, skips_in_a_row
        while len(buffer) < buffer_size:
            index = cursor
            ids, mask = tokenizer.render_conversation(dataset[index])
            cursor += world_size
            if cursor >= size:
                cursor %= size
                state["epoch"] += 1
            if len(ids) > row_capacity or not any(mask[1:]):
                # would never fit a row (nanochat's NaN case) or teaches nothing: skip it, counted as consumed
                state["skipped"] += 1
                state["consumed"] += world_size
                skips_in_a_row += 1
                if skips_in_a_row >= size:
                    raise ValueError(f"no conversation of the dataset fits in a row of {row_capacity} tokens "
                                     f"(max_seq_len + 1) with a supervised token: raise --max-seq-len")
                continue
            skips_in_a_row = 0
            buffer.append((ids, mask, index))

    while True:
        rows, masks, lengths = [], [], []
        for _ in range(num_rows):
            row, mrow = [], []
            while len(row) < row_capacity:
                refill()
                remaining = row_capacity - len(row)
                best, best_len = -1, 0
                for i, (ids, _, _) in enumerate(buffer):
                    if best_len < len(ids) <= remaining:
                        best, best_len = i, len(ids)
                if best < 0:
                    break  # nothing fits the rest of the row: pad it
                ids, mask, _ = buffer.pop(best)
                row.extend(ids)
                mrow.extend(mask)
                state["consumed"] += world_size
            lengths.append(len(row))
            pad = row_capacity - len(row)
            rows.append(row + [bos] * pad)
            masks.append(mrow + [0] * pad)
        yield rows, masks, lengths, dict(state, cursor=cursor, buffer=[i for _, _, i in buffer])


def rows_to_batch(rows, masks, lengths):
    """Inputs (B, T) = rows[:, :-1]; targets = rows[:, 1:], -1 where the mask is 0 (user turns, tool
    outputs, BOS) and on the padding."""
    import numpy as np
    r = np.array(rows, dtype=np.int32)
    m = np.array(masks, dtype=np.int8)
    inputs = r[:, :-1]
    targets = r[:, 1:].copy()
    targets[m[:, 1:] == 0] = -1
    for i, n in enumerate(lengths):
        if n < r.shape[1]:
            targets[i, max(n - 1, 0):] = -1  # the padding (and the transition into it) is never a target
    return mx.array(inputs), mx.array(targets)


def sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size, max_seq_len, buffer_size=100, rank=0, world_size=1,
                                   resume_state=None):
    """Batches (inputs, targets, state) for SFT: see sft_rows_bestfit and rows_to_batch."""
    for rows, masks, lengths, state in sft_rows_bestfit(dataset, tokenizer, device_batch_size, max_seq_len + 1,
                                                        buffer_size, rank, world_size, resume_state):
        inputs, targets = rows_to_batch(rows, masks, lengths)
        yield inputs, targets, state


# -----------------------------------------------------------------------------

def inherit_config(args, meta):
    """(max_seq_len, device_batch_size, total_batch_size, lrs): the flags, else the base run's (its meta
    for the batch and length, its user_config for the lrs: the raw flag values, without the batch-size
    scaling base_train applied, as nanochat), else nanochat's fallbacks."""
    base_user = meta.get("user_config") or {}

    def pick(name, *sources):
        for v in sources:
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return FALLBACKS[name]
    T = pick("max_seq_len", args.max_seq_len, meta.get("max_seq_len"))
    B = pick("device_batch_size", args.device_batch_size, meta.get("device_batch_size"))
    total = pick("total_batch_size", args.total_batch_size, meta.get("total_batch_size"))
    lrs = {k: getattr(args, k) if getattr(args, k) is not None else base_user.get(k, FALLBACKS[k])
           for k in ("embedding_lr", "unembedding_lr", "matrix_lr")}
    return T, B, total, lrs


def setup_sft_optimizer(model, lrs, init_lr_frac, saved=None):
    """MuonAdamW with SFT's learning rates x init_lr_frac. saved: the base run's optimizer file
    ({"optimizer": {"tensors", "meta"}}) or None; its state (momenta, Adam moments and step counts) is
    kept, its learning rates are not. As nanochat, everything else of the saved groups carries over,
    including the Muon weight decay (the base run's last scheduled value, ~0 after its cosine).
    Returns (optimizer, whether the saved state was loaded)."""
    optimizer = model.setup_optimizer(unembedding_lr=lrs["unembedding_lr"], embedding_lr=lrs["embedding_lr"],
                                      matrix_lr=lrs["matrix_lr"], weight_decay=0.0)
    loaded = False
    if saved is not None and saved.get("optimizer"):
        fresh_lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(saved["optimizer"]["tensors"], saved["optimizer"]["meta"])
        for group, lr in zip(optimizer.param_groups, fresh_lrs):
            group["lr"] = lr
        loaded = True
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * init_lr_frac
        group["initial_lr"] = group["lr"]
    return optimizer, loaded


def resolve_checkpoint(source_dir, model_tag, step):
    from mlxchat.checkpoint_manager import find_largest_model, find_last_step
    if model_tag is None:
        model_tag = find_largest_model(source_dir)
    checkpoint_dir = os.path.join(source_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise ConfigError(f"no checkpoint folder {checkpoint_dir}: train a base model first (python -m scripts.base_train), "
                          f"or pick another --model-tag")
    if step is None:
        step = find_last_step(checkpoint_dir)
    return model_tag, step


def load_base_model(source_dir, model_tag, step, rank=0, world_size=1):
    """(model, tokenizer, meta, model_tag, step) of the base checkpoint. With several ranks only rank 0
    reads it (base_train writes the model and meta on rank 0's machine alone): the others build the
    model from its config and receive its weights, and load the tokenizer from their own base dir."""
    from mlxchat.checkpoint_manager import load_model_from_dir
    if world_size == 1:
        model_tag, step = resolve_checkpoint(source_dir, model_tag, step)
        model, tokenizer, meta = load_model_from_dir(source_dir, phase="train", model_tag=model_tag, step=step)
        return model, tokenizer, meta, model_tag, step
    from mlxchat.gpt import GPT, GPTConfig
    from mlxchat.tokenizer import RustBPETokenizer
    label = "sending the base checkpoint's meta"
    if rank == 0:
        try:
            model_tag, step = resolve_checkpoint(source_dir, model_tag, step)
            model, tokenizer, meta = load_model_from_dir(source_dir, phase="train", model_tag=model_tag, step=step)
        except Exception as e:
            broadcast_object(f"rank 0 could not load the base checkpoint: {e}", label=label)  # the others stop too
            raise
        broadcast_object({"model_tag": model_tag, "step": step, "meta": meta, "model_config": model.config.to_dict()}, label=label)
    else:
        found = broadcast_object(None, label=label)
        if isinstance(found, str):
            raise TrainingError(f"rank {rank}: {found}")
        model_tag, step, meta = found["model_tag"], found["step"], found["meta"]
        model = GPT(GPTConfig(**found["model_config"]))
        model.train()
        tok_dir = os.path.join(get_base_dir(), "tokenizer")
        tokenizer = RustBPETokenizer.from_directory(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")) else None
    model.update(broadcast_tree(model.parameters(), label="sending rank 0's weights"))
    return model, tokenizer, meta, model_tag, step


def share_optimizer(optimizer, loaded):
    """Rank 0's optimizer (its state and its groups' hyperparameters, as loaded from the base run) on
    every rank, and whether it was loaded. A no-op in a single process."""
    groups = broadcast_object([{k: v for k, v in g.items() if k != "names"} for g in optimizer.param_groups] + [loaded],
                              label="sending rank 0's optimizer settings")
    loaded = groups.pop()
    for group, g in zip(optimizer.param_groups, groups):
        for k, v in g.items():
            group[k] = tuple(v) if k == "betas" else v
    optimizer.state.update(broadcast_tree(optimizer.state, label="sending rank 0's optimizer state"))
    return loaded




# -----------------------------------------------------------------------------
# the run

class SFTRun(Run):
    stage = "sft"

    def _run(self):
        from mlxchat.checkpoint_manager import SOURCE_DIRS, _optim_path, load_arrays, save_training_checkpoint
        from mlxchat.loss_eval import evaluate_bpb
        from mlxchat.tokenizer import compute_token_bytes, tokenizer_fingerprint

        cfg, rank, world_size = self.config, self.rank, self.world_size
        master = rank == 0
        mx.random.seed(cfg.seed)
        yield Phase("loading")
        if world_size > 1:
            yield Log(f"data parallel: {world_size} processes (mx.distributed, backend {cfg.dist_backend}); each packs "
                      f"1/{world_size} of the conversations, gradients are averaged before every step")
            # rank 0's weights are sent as they are stored, and the stored dtypes follow the compute dtype
            check_same_on_all_ranks(dtype_name(get_compute_dtype()), "the compute dtype (MLXCHAT_DTYPE)")
        base_dir = get_base_dir()
        if cfg.base_checkpoint_dir:
            source = os.path.abspath(os.path.expanduser(cfg.base_checkpoint_dir))
            source_dir, tag = os.path.dirname(source), os.path.basename(source)
        else:
            source_dir, tag = os.path.join(base_dir, SOURCE_DIRS["base"]), cfg.model_tag
        model, tokenizer, meta, model_tag, model_step = load_base_model(source_dir, tag, cfg.model_step, rank, world_size)
        if tokenizer is None:
            raise TrainingError(f"no tokenizer found for the base checkpoint (looked beside it and in {os.path.join(base_dir, 'tokenizer')}): "
                                f"train one with `python -m scripts.tok_train` or copy nanochat's tokenizer/ folder there")
        # the base checkpoint's own tokenizer (a run may have trained its own): its byte counts, not the base dir's
        token_bytes = mx.array(compute_token_bytes(tokenizer).astype("int32"))
        num_params = sum(v.size for v in model.named_parameters().values())
        yield Log(f"base model: {model_tag} step {model_step} ({num_params:,} parameters), "
                  f"compute dtype {dtype_name(get_compute_dtype())}")

        T, B, total_batch_size, lrs = inherit_config(cfg, meta)
        tokens_per_fwdbwd = B * T * world_size  # one micro-batch of every rank
        if total_batch_size % tokens_per_fwdbwd != 0:
            processes = f" x {world_size} processes" if world_size > 1 else ""
            raise ConfigError(f"total batch {total_batch_size:,} tokens is not a multiple of {B} rows x {T} tokens{processes}: "
                              f"set --total-batch-size to a multiple of {tokens_per_fwdbwd} (or change --device-batch-size)")
        grad_accum_steps = total_batch_size // tokens_per_fwdbwd
        yield Log(f"batch: {total_batch_size:,} tokens = {B} x {T} x {grad_accum_steps} accumulation steps"
                  + (f" x {world_size} processes" if world_size > 1 else ""))
        yield Log(f"learning rates: embedding {lrs['embedding_lr']}, unembedding {lrs['unembedding_lr']}, matrix "
                  f"{lrs['matrix_lr']}, x init_lr_frac {cfg.init_lr_frac}")
        # rank 0 reads the base run's optimizer file (its state is the same on every rank of a base run) and sends it
        saved = None
        resuming = cfg.resume_from_step != -1  # the run's own optimizer state is loaded below, not the base run's
        if cfg.load_optimizer and master and not resuming:
            path = _optim_path(os.path.join(source_dir, model_tag), model_step, 0)
            saved = load_arrays(path) if os.path.exists(path) else None
        optimizer, loaded = setup_sft_optimizer(model, lrs, cfg.init_lr_frac, saved)
        if world_size > 1:
            loaded = share_optimizer(optimizer, loaded)
        if cfg.load_optimizer and not resuming:
            yield Log("loaded the base run's optimizer state" if loaded else
                      "no optimizer state saved with the base checkpoint: starting with a fresh optimizer")
        del saved

        output_tag = model_tag if (cfg.model_tag or cfg.base_checkpoint_dir) else f"d{model.config.n_layer}"
        self.run_dir = checkpoint_dir = os.path.abspath(os.path.expanduser(
            cfg.checkpoint_dir or os.path.join(base_dir, SOURCE_DIRS["sft"], output_tag)))
        step, smooth, val_bpb, initial_val_bpb, train_time = 0, 0.0, None, None, 0.0
        resume_state = None  # where this rank's packing stood, when resuming
        if resuming:
            step, meta, optim_data = self._load_resume(checkpoint_dir, cfg.resume_from_step, model, optimizer)
            yield Log(f"resuming from {checkpoint_dir} step {step}")
            loop = meta.get("loop_state") or {}
            smooth, initial_val_bpb, train_time = loop.get("smooth", 0.0), loop.get("initial_val_bpb"), loop.get("train_time", 0.0)
            val_bpb = meta.get("val_bpb")
            resume_state = (optim_data.get("data") or {}).get("meta")
            del optim_data
            if resume_state is None and step > 0:
                raise TrainingError(f"{checkpoint_dir} step {step} holds no data position (saved before SFT runs could "
                                    f"resume): start a new SFT run from the base checkpoint")
            if world_size > 1:  # rank 0 loaded the weights
                model.update(broadcast_tree(model.parameters(), label="sending rank 0's weights"))
        resumed_at = step if resuming else None
        first_step = self.step = step

        # data
        yield Phase("tokenizing")
        train_set, val_set, notes = build_mixtures(cfg.mixture, cfg.mmlu_epochs, cfg.gsm8k_epochs)
        yield Log(f"mixture {cfg.mixture}: {len(train_set):,} train / {len(val_set):,} val conversations")
        for note in notes:
            yield Log(f"  {note}")
        if world_size > 1:
            # every rank built the mixture from its own disk (a first run downloads it on each): they must agree,
            # or the ranks' shares would overlap and miss conversations
            barrier("loading the SFT mixture", timeout=10 * cfg.dist_timeout)
            check_same_on_all_ranks(tokenizer_fingerprint(tokenizer) + [len(train_set), len(val_set)],
                                    "the tokenizer or the SFT mixture")
        if resume_state is not None and resume_state["dataset_size"] != len(train_set):
            raise TrainingError(f"cannot resume {checkpoint_dir}: its data position is in a mixture of "
                                f"{resume_state['dataset_size']:,} conversations, this one has {len(train_set):,}: "
                                f"an exact resume needs the same --mixture (and task data)")
        train_loader = sft_data_generator_bos_bestfit(train_set, tokenizer, B, T, rank=rank, world_size=world_size,
                                                      resume_state=resume_state)
        data_state = dict(resume_state) if resume_state else {"consumed": 0, "epoch": 1, "skipped": 0}

        def next_batch():
            x, y, state = next(train_loader)
            data_state.update(state)
            return x, y

        # the val batches: the same every time (the val set is fixed), so build them once; at most one pass
        # (each rank its share; evaluate_bpb sums nats and bytes over the ranks)
        eval_steps = max(1, cfg.eval_tokens // (B * T * world_size))
        val_batches = []
        for x, y, state in sft_data_generator_bos_bestfit(val_set, tokenizer, B, T, rank=rank, world_size=world_size):
            val_batches.append((x, y))
            if len(val_batches) >= eval_steps or state["consumed"] >= len(val_set):
                break
        num_val = int(all_reduce_floats([len(val_batches)], label="counting the val batches")[0])
        yield Log(f"val: {num_val} batches ({num_val * B * T:,} tokens)")

        def evaluate(at_step):
            with dist_waiting(f"step {at_step:05d}: val bpb"):
                return evaluate_bpb(model, dist_beating(val_batches), len(val_batches), token_bytes)

        chatcore = None
        chatcore_every = cfg.chatcore_every
        if chatcore_every is None:
            chatcore_every = 200 if cfg.mixture == "nanochat" else -1
        if chatcore_every > 0:
            chatcore = make_chatcore(model, tokenizer, B, cfg.chatcore_max_cat, cfg.chatcore_max_sample)

        def save(at_step):
            model_config = dict(model.config.to_dict(), sequence_len=T)  # as nanochat: the SFT context length
            # each rank's packing position goes into its own optimizer file (a resume continues from it)
            position = {"meta": dict(data_state)} if "cursor" in data_state else {"meta": None}
            save_training_checkpoint(checkpoint_dir, at_step, model, optimizer,
                                     {"step": at_step, "val_bpb": val_bpb, "model_config": model_config,
                                      "user_config": config_dict(cfg), "base_checkpoint": {"model_tag": model_tag, "step": model_step},
                                      "world_size": world_size,
                                      "loop_state": {"smooth": smooth, "initial_val_bpb": initial_val_bpb, "train_time": train_time}},
                                     data=position)
        self._save_checkpoint = save
        self._live_model = (model, keep_tokenizer(tokenizer, checkpoint_dir) if self.rank == 0 else None)
        total_steps = cfg.num_iterations if cfg.num_iterations > 0 else None
        flops_per_token = float(model.estimate_flops())
        resolved = dict(config_dict(cfg), max_seq_len=T, device_batch_size=B, total_batch_size=total_batch_size,
                        grad_accum_steps=grad_accum_steps, world_size=world_size, **lrs,
                        base_checkpoint={"dir": os.path.join(source_dir, model_tag), "step": model_step},
                        train_conversations=len(train_set), val_conversations=len(val_set))
        yield Started(stage=self.stage, run_dir=checkpoint_dir, config=resolved, num_params=num_params,
                      tokens_per_step=total_batch_size, flops_per_token=flops_per_token, total_steps=total_steps,
                      start_step=step, world_size=world_size, device=device_name(), pid=os.getpid())

        trainer = Trainer(model, optimizer, grad_accum_steps, grad_reduce=self._grad_reduce())
        chatcore_results = {}
        status = "finished"
        losses, mean_losses = [], []  # per step: the last micro-batch's loss, the mean over all micro-batches (over ranks)
        with memory_cap(cfg.memory_limit):  # MLX's memory limit is put back after the loop
            while True:
                if cfg.num_iterations > 0:
                    last_step = step >= cfg.num_iterations
                    progress = step / cfg.num_iterations
                else:
                    # each rank packs its own conversations and reaches the end of the data at its own step: all
                    # follow the one furthest along, so they share the schedule and stop at the same step
                    consumed = all_reduce_floats([data_state["consumed"]], op="max", label=f"step {step:05d}: data position")[0]
                    last_step = consumed >= len(train_set)
                    progress = consumed / len(train_set)
                # (a resumed run evaluated at its step before it stopped)
                if last_step or (step != resumed_at and (step == 0 or (cfg.eval_every > 0 and step % cfg.eval_every == 0))):
                    yield Phase("evaluating", step)
                    val_bpb = evaluate(step)
                    if initial_val_bpb is None:
                        initial_val_bpb = val_bpb
                    yield Eval(step, {"val_bpb": val_bpb})
                if chatcore is not None and (last_step or (step > 0 and step != resumed_at and step % chatcore_every == 0)):
                    yield Phase("evaluating", step)
                    # every rank evaluates its share of the problems; how long that takes is unknown, so no watchdog
                    # deadline here, but a rank that dies still stops the others
                    with dist_waiting(f"step {step:05d}: ChatCORE", timeout=float("inf")):
                        chatcore_results = chatcore()
                    yield Eval(step, dict(chatcore_results))
                if last_step:
                    yield from self._save(step)
                    break
                if (yield from self._boundary(step)):
                    status = "stopped"
                    yield from self._save(step)
                    break

                lrm = get_sft_lr_multiplier(progress, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
                momentum = get_sft_muon_momentum(step)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                    if group["kind"] == "muon":
                        group["momentum"] = momentum
                if step == first_step:
                    yield Phase("compiling", step)
                t0 = time.time()
                loss, mean_loss = trainer.step(next_batch)
                loss, mean_loss = self._sync(step + 1, loss, mean_loss)  # averaged over ranks, with any commands
                dt = time.time() - t0
                step += 1
                self.step = step
                losses.append(loss)
                mean_losses.append(mean_loss)
                if step > first_step + 1:  # this process's first step includes compilation
                    train_time += dt
                smooth = 0.9 * smooth + 0.1 * loss
                debiased = smooth / (1 - 0.9 ** step)
                # progress: by steps with --num-iterations, else by the share of the mixture consumed
                done = step / cfg.num_iterations if cfg.num_iterations > 0 else data_state["consumed"] / len(train_set)
                eta = train_time / max(done, 1e-9) * (1 - done) if train_time > 0 else None
                if step == first_step + 1:
                    yield Phase("running", step)
                yield step_event(step, total_steps, loss, debiased, lrm, dt, total_batch_size, flops_per_token, world_size,
                                 train_time, eta, min(done, 1.0), epoch=data_state["epoch"])
                notice = self._after_step(step, first_step, cfg.memory_limit)
                if notice is not None:
                    yield notice

        # the other ranks wait for rank 0's checkpoint, so that all exit together once it is complete
        barrier("end of training: waiting for rank 0 to finish writing the checkpoint")
        skipped = int(all_reduce_floats([data_state["skipped"]], label="counting the skipped conversations")[0])
        if skipped:
            yield Log(f"skipped {skipped:,} conversations longer than {T + 1} tokens or without an assistant "
                      f"token (raise --max-seq-len to train on them)")
        if initial_val_bpb is not None and val_bpb is not None:
            yield Log(f"val bpb: {initial_val_bpb:.4f} -> {val_bpb:.4f}")
        self.result = {"step": step, "val_bpb": val_bpb, "initial_val_bpb": initial_val_bpb, "losses": losses,
                       "mean_losses": mean_losses, "skipped": skipped, "checkpoint_dir": checkpoint_dir,
                       "chatcore": chatcore_results, "rank": rank, "world_size": world_size, "status": status}
        yield Finished(status=status, step=step, summary={
            "Base checkpoint": f"{model_tag} step {model_step}", "Mixture": "; ".join(notes),
            "Train conversations": len(train_set), "Val conversations": len(val_set),
            "Skipped conversations": skipped, "Epochs": data_state["epoch"],
            "Number of iterations": step, "Tokens per step": total_batch_size,
            "Initial val bpb": initial_val_bpb, "Final val bpb": val_bpb,
            "Final train loss": (smooth / (1 - 0.9 ** step)) if step else None,
            "Training time": train_time, **chatcore_results})


def make_chatcore(model, tokenizer, batch_size, max_cat, max_sample):
    """ChatCORE as nanochat computes it during SFT: categorical ARC-Easy, ARC-Challenge, MMLU (max_cat
    problems each, -1 = all), generative GSM8K, HumanEval (max_sample problems each, greedy); each accuracy
    centered on its chance level, then averaged (ChatCORE_cat: the categorical three only)."""
    from mlxchat.chat_eval import ALL_TASKS, BASELINE_ACCURACIES, chatcore, run_chat_eval
    from mlxchat.engine import Engine
    categorical = ("ARC-Easy", "ARC-Challenge", "MMLU")

    def run():
        engine = Engine(model, tokenizer)
        results = {}
        for name in ALL_TASKS:
            limit = (None if max_cat < 0 else max_cat) if name in categorical else max_sample
            results[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=batch_size, max_problems=limit,
                                          temperature=0.0)
        results["ChatCORE"] = chatcore(results)
        results["ChatCORE_cat"] = sum((results[t] - BASELINE_ACCURACIES[t]) / (1 - BASELINE_ACCURACIES[t])
                                      for t in categorical) / len(categorical)
        return results
    return run
