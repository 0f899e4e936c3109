"""
Supervised finetuning (SFT): teach a pretrained base model to chat. nanochat's chat_sft in MLX.

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

Examples:
    python -m scripts.chat_sft                                    # after base_train, nanochat's recipe
    python -m scripts.chat_sft --mixture demo --max-seq-len 512 --device-batch-size 8 \\
        --total-batch-size 8192 --eval-every 50 --eval-tokens 100000   # the offline demo

Batch size, sequence length and learning rates default to the base checkpoint's (its meta file).
Ctrl-C finishes the current step, saves a checkpoint and exits.

Data parallel across processes / Macs, as base_train (start every rank with mlx.launch):
    mlx.launch --hosts 192.168.1.10,192.168.1.11 --backend ring --cwd "$PWD" --env MLXCHAT_BASE_DIR=$HOME/.cache/mlxchat \\
        -- "$PWD/.venv/bin/python" -m scripts.chat_sft --mixture demo
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
import argparse
import json
import os
import sys
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)
import mlx.core as mx

from mlxchat.common import (dtype_name, format_duration, get_base_dir, get_compute_dtype, init_wandb, memory_cap, print0,
                            warn_if_over_cap)
from mlxchat.common import (StopOnCtrlC, add_dist_args, all_reduce_floats, all_reduce_mean, all_reduce_step, barrier,
                            broadcast_object, broadcast_tree, check_same_on_all_ranks, compute_init, dist_beating,
                            dist_waiting, launched_argv)
from mlxchat.schedules import get_sft_lr_multiplier, get_sft_muon_momentum
from tasks.common import Task, TaskMixture, HubDataset, task_data_dir
from tasks.gsm8k import GSM8K

DEMO_CHAT_DIR = os.path.join(os.path.dirname(os.path.abspath(mlxchat.__file__)), "data", "demo_chat")

# nanochat's fallbacks when the base checkpoint's meta lacks a value (e.g. a converted nanochat checkpoint)
FALLBACKS = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
             "embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    # the base model
    p.add_argument("--model-tag", default=None, help="base checkpoint folder (default: the largest d<N>); also names the SFT folder")
    p.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: the last)")
    p.add_argument("--load-optimizer", type=int, default=1, help="1 = start from the base run's optimizer state (momenta) when saved")
    # horizon and batch (None = the base checkpoint's)
    p.add_argument("--num-iterations", type=int, default=-1, help="steps; -1 = one epoch of the mixture")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: the base run's)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per micro-batch (default: the base run's)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step (default: the base run's)")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GiB of memory training may use: MLX's allocator is capped there, see base_train --help (default: no cap)")
    # optimizer (None = the base run's flags, without its batch-size scaling, as nanochat)
    p.add_argument("--embedding-lr", type=float, default=None)
    p.add_argument("--unembedding-lr", type=float, default=None)
    p.add_argument("--matrix-lr", type=float, default=None)
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="start at this fraction of the learning rates")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.5)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    # evaluation
    p.add_argument("--eval-every", type=int, default=200, help="val bits per byte every N steps (-1 = only at the start and end)")
    p.add_argument("--eval-tokens", type=int, default=40 * 524288, help="tokens per val evaluation (at most one pass over the val set)")
    p.add_argument("--chatcore-every", type=int, default=None,
                   help="ChatCORE every N steps (-1 = off). Default: 200 (nanochat's) with --mixture nanochat when "
                        "scripts/chat_eval.py is there, else off (the offline mixtures have no full eval sets)")
    p.add_argument("--chatcore-max-cat", type=int, default=-1, help="problems per categorical task in ChatCORE (-1 = all)")
    p.add_argument("--chatcore-max-sample", type=int, default=24, help="problems per generative task in ChatCORE")
    # data
    p.add_argument("--mixture", default="nanochat", help="nanochat | demo | path to a CustomJSON .jsonl file")
    p.add_argument("--mmlu-epochs", type=int, default=3, help="times the MMLU training data is repeated in the mixture")
    p.add_argument("--gsm8k-epochs", type=int, default=4, help="times the GSM8K-format training data is repeated in the mixture")
    p.add_argument("--log-every", type=int, default=1, help="a progress line every N steps (on a terminal one line redraws in place, kept every N steps when N > 1)")
    p.add_argument("--seed", type=int, default=42)
    # data parallel across processes / Macs
    add_dist_args(p)
    args = p.parse_args(launched_argv(argv))
    for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -----------------------------------------------------------------------------
# data

class DemoCalculator(GSM8K):
    """Rows in GSM8K's format ({"question", "answer"} with <<expr=result>> calculator marks and a final
    "#### N") read from a JSONL file: GSM8K's conversion into tool-call parts and its reward apply as is."""

    def __init__(self, filepath, **kwargs):
        Task.__init__(self, **kwargs)
        import pyarrow as pa
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"{filepath} does not exist: regenerate the demo chat set with `python -m scripts.gen_demo_chat`")
        with open(filepath, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for i, row in enumerate(rows, 1):
            if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
                raise ValueError(f"{filepath}:{i}: expected {{\"question\": str, \"answer\": str}} (GSM8K's row format)")
        self.ds = HubDataset(pa.Table.from_pylist(rows, schema=pa.schema([("question", pa.string()), ("answer", pa.string())])))


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
            raise SystemExit(f"{mixture}: {n} conversation(s); need at least 2 (one is held out for validation)")
        n_val = max(1, min(500, n // 20))
        train = [CustomJSON(mixture, stop=n - n_val)]
        val = [CustomJSON(mixture, start=n - n_val)]
        notes.append(f"{mixture}: {n - n_val} train, last {n_val} held out for val")
    else:
        raise SystemExit(f"--mixture must be nanochat, demo or a .jsonl file (CustomJSON format), got {mixture!r}")
    return TaskMixture(train), TaskMixture(val), notes


def sft_rows_bestfit(dataset, tokenizer, num_rows, row_capacity, buffer_size=100, rank=0, world_size=1):
    """Pack conversations into rows of exactly row_capacity tokens, best fit, BOS padding, no cropping.
    Yields (rows, masks, content_lengths, state) per batch of num_rows rows; state has 'consumed'
    (conversations packed, counting all ranks, for the progress), 'epoch' and 'skipped'. Rank r
    fetches conversations r, r+W, ... and wraps around into the next epoch."""
    size = len(dataset)
    assert size > 0, "empty dataset"
    bos = tokenizer.get_bos_token_id()
    buffer = []  # (ids, mask) of fetched conversations
    state = {"consumed": rank, "epoch": 1, "skipped": 0, "dataset_size": size}
    cursor = rank
    skips_in_a_row = 0

    def refill():
        nonlocal cursor, skips_in_a_row
        while len(buffer) < buffer_size:
            ids, mask = tokenizer.render_conversation(dataset[cursor])
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
            buffer.append((ids, mask))

    while True:
        rows, masks, lengths = [], [], []
        for _ in range(num_rows):
            row, mrow = [], []
            while len(row) < row_capacity:
                refill()
                remaining = row_capacity - len(row)
                best, best_len = -1, 0
                for i, (ids, _) in enumerate(buffer):
                    if best_len < len(ids) <= remaining:
                        best, best_len = i, len(ids)
                if best < 0:
                    break  # nothing fits the rest of the row: pad it
                ids, mask = buffer.pop(best)
                row.extend(ids)
                mrow.extend(mask)
                state["consumed"] += world_size
            lengths.append(len(row))
            pad = row_capacity - len(row)
            rows.append(row + [bos] * pad)
            masks.append(mrow + [0] * pad)
        yield rows, masks, lengths, dict(state)


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


def sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size, max_seq_len, buffer_size=100, rank=0, world_size=1):
    """Batches (inputs, targets, state) for SFT: see sft_rows_bestfit and rows_to_batch."""
    for rows, masks, lengths, state in sft_rows_bestfit(dataset, tokenizer, device_batch_size, max_seq_len + 1,
                                                        buffer_size, rank, world_size):
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


def progress_line(frac, text):
    width = 20
    filled = int(width * min(max(frac, 0.0), 1.0))
    return f"[{'#' * filled}{'-' * (width - filled)}] {text}"


def resolve_checkpoint(source_dir, model_tag, step):
    from mlxchat.checkpoint_manager import find_largest_model, find_last_step
    if model_tag is None:
        model_tag = find_largest_model(source_dir)
    checkpoint_dir = os.path.join(source_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise SystemExit(f"no checkpoint folder {checkpoint_dir}: train a base model first (python -m scripts.base_train), "
                         f"or pick another --model-tag")
    if step is None:
        step = find_last_step(checkpoint_dir)
    return model_tag, step


def load_base_model(source_dir, model_tag, step, rank=0, world_size=1):
    """(model, tokenizer, meta, model_tag, step) of the base checkpoint. With several ranks only rank 0
    reads it (base_train writes the model and meta on rank 0's machine alone): the others build the
    model from its config and receive its weights, and load the tokenizer from their own base dir."""
    from mlxchat.checkpoint_manager import load_model
    if world_size == 1:
        model_tag, step = resolve_checkpoint(source_dir, model_tag, step)
        model, tokenizer, meta = load_model("base", phase="train", model_tag=model_tag, step=step)
        return model, tokenizer, meta, model_tag, step
    from mlxchat.gpt import GPT, GPTConfig
    from mlxchat.tokenizer import RustBPETokenizer
    label = "sending the base checkpoint's meta"
    if rank == 0:
        try:
            model_tag, step = resolve_checkpoint(source_dir, model_tag, step)
            model, tokenizer, meta = load_model("base", phase="train", model_tag=model_tag, step=step)
        except (Exception, SystemExit) as e:
            broadcast_object(f"rank 0 could not load the base checkpoint: {e}", label=label)  # the others stop too
            raise
        broadcast_object({"model_tag": model_tag, "step": step, "meta": meta, "model_config": model.config.to_dict()}, label=label)
    else:
        found = broadcast_object(None, label=label)
        if isinstance(found, str):
            raise SystemExit(f"mlxchat: rank {rank}: {found}")
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


def main(argv=None):
    args = get_args(argv)
    user_config = dict(vars(args))
    # join the other ranks first (a no-op in a single process): print0 and every collective need the group
    rank, world_size, _ = compute_init(args.dist_backend, args.dist_timeout)
    master_process = rank == 0
    mx.random.seed(args.seed)
    from mlxchat.checkpoint_manager import SOURCE_DIRS, load_optimizer_state, save_training_checkpoint
    from mlxchat.loss_eval import evaluate_bpb
    from mlxchat.report import get_report, log_metrics
    from mlxchat.tokenizer import get_token_bytes, tokenizer_fingerprint
    from scripts.base_train import Trainer

    if world_size > 1:
        print0(f"data parallel: {world_size} processes (mx.distributed, backend {args.dist_backend}); each packs 1/{world_size} "
               f"of the conversations, gradients are averaged before every step")
        # rank 0's weights are sent as they are stored, and the stored dtypes follow the compute dtype
        check_same_on_all_ranks(dtype_name(get_compute_dtype()), "the compute dtype (MLXCHAT_DTYPE)")
    base_dir = get_base_dir()
    model, tokenizer, meta, model_tag, model_step = load_base_model(os.path.join(base_dir, SOURCE_DIRS["base"]), args.model_tag,
                                                                    args.model_step, rank, world_size)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer found for the base checkpoint (looked in {os.path.join(base_dir, 'tokenizer')}): "
                         f"train one with `python -m scripts.tok_train` or copy nanochat's tokenizer/ folder there")
    token_bytes = get_token_bytes()
    print0(f"base model: {model_tag} step {model_step} ({sum(v.size for v in model.named_parameters().values()):,} parameters), "
           f"compute dtype {dtype_name(get_compute_dtype())}")

    T, B, total_batch_size, lrs = inherit_config(args, meta)
    tokens_per_fwdbwd = B * T * world_size  # one micro-batch of every rank
    if total_batch_size % tokens_per_fwdbwd != 0:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise SystemExit(f"total batch {total_batch_size:,} tokens is not a multiple of {B} rows x {T} tokens{processes}: "
                         f"set --total-batch-size to a multiple of {tokens_per_fwdbwd} (or change --device-batch-size)")
    grad_accum_steps = total_batch_size // tokens_per_fwdbwd
    print0(f"batch: {total_batch_size:,} tokens = {B} x {T} x {grad_accum_steps} accumulation steps"
           + (f" x {world_size} processes" if world_size > 1 else ""))
    print0(f"learning rates: embedding {lrs['embedding_lr']}, unembedding {lrs['unembedding_lr']}, matrix {lrs['matrix_lr']}, "
           f"x init_lr_frac {args.init_lr_frac}")
    # rank 0 reads the base run's optimizer file (its state is the same on every rank of a base run) and sends it
    saved = None
    if args.load_optimizer and master_process:
        saved = load_optimizer_state("base", rank=0, model_tag=model_tag, step=model_step)
    optimizer, loaded = setup_sft_optimizer(model, lrs, args.init_lr_frac, saved)
    if world_size > 1:
        loaded = share_optimizer(optimizer, loaded)
    if args.load_optimizer:
        print0("loaded the base run's optimizer state" if loaded else
               "no optimizer state saved with the base checkpoint: starting with a fresh optimizer")
    del saved

    # data
    train_set, val_set, notes = build_mixtures(args.mixture, args.mmlu_epochs, args.gsm8k_epochs)
    print0(f"mixture {args.mixture}: {len(train_set):,} train / {len(val_set):,} val conversations")
    for note in notes:
        print0(f"  {note}")
    if world_size > 1:
        # every rank built the mixture from its own disk (a first run downloads it on each): they must agree,
        # or the ranks' shares would overlap and miss conversations
        barrier("loading the SFT mixture", timeout=10 * args.dist_timeout)
        check_same_on_all_ranks(tokenizer_fingerprint(tokenizer) + [len(train_set), len(val_set)],
                                "the tokenizer or the SFT mixture")
    train_loader = sft_data_generator_bos_bestfit(train_set, tokenizer, B, T, rank=rank, world_size=world_size)
    data_state = {"consumed": 0, "epoch": 1, "skipped": 0}

    def next_batch():
        x, y, state = next(train_loader)
        data_state.update(state)
        return x, y

    # the val batches: the same every time (the val set is fixed), so build them once; at most one pass
    # (each rank its share; evaluate_bpb sums nats and bytes over the ranks)
    eval_steps = max(1, args.eval_tokens // (B * T * world_size))
    val_batches = []
    for x, y, state in sft_data_generator_bos_bestfit(val_set, tokenizer, B, T, rank=rank, world_size=world_size):
        val_batches.append((x, y))
        if len(val_batches) >= eval_steps or state["consumed"] >= len(val_set):
            break
    num_val = int(all_reduce_floats([len(val_batches)], label="counting the val batches")[0])
    print0(f"val: {num_val} batches ({num_val * B * T:,} tokens)")

    def evaluate(at_step):
        with dist_waiting(f"step {at_step:05d}: val bpb"):
            return evaluate_bpb(model, dist_beating(val_batches), len(val_batches), token_bytes)

    chatcore = None
    chatcore_every = args.chatcore_every
    if chatcore_every is None:
        chatcore_every = 200 if args.mixture == "nanochat" and chat_eval_available() else -1
    if chatcore_every > 0:
        chatcore = make_chatcore(model, tokenizer, B, args.chatcore_max_cat, args.chatcore_max_sample)

    wandb_run = init_wandb("mlxchat-sft", args.run, user_config, master_process)

    output_tag = args.model_tag or f"d{model.config.n_layer}"
    checkpoint_dir = os.path.join(base_dir, SOURCE_DIRS["sft"], output_tag)

    def save(at_step):
        model_config = dict(model.config.to_dict(), sequence_len=T)  # as nanochat: the SFT context length
        save_training_checkpoint(checkpoint_dir, at_step, model, optimizer,
                                 {"step": at_step, "val_bpb": val_bpb, "model_config": model_config, "user_config": user_config,
                                  "base_checkpoint": {"model_tag": model_tag, "step": model_step}, "world_size": world_size})
        print0(f"saved checkpoint step {at_step} to {checkpoint_dir}")

    def grad_reduce(grads):  # data parallel: every rank steps with the mean gradient over all ranks
        return all_reduce_mean(grads, label=f"step {step + 1:05d}: gradient all-reduce")

    trainer = Trainer(model, optimizer, grad_accum_steps, grad_reduce=grad_reduce if world_size > 1 else None)
    tty = master_process and sys.stdout.isatty()
    step, smooth, val_bpb, initial_val_bpb, train_time = 0, 0.0, None, None, 0.0
    chatcore_results = {}
    losses, mean_losses = [], []  # per step: the last micro-batch's loss, the mean over all micro-batches (over ranks)
    # Ctrl-C: finish the step, save, exit (the caller's handler and MLX's memory limit are put back after)
    with StopOnCtrlC() as stop, memory_cap(args.memory_limit):
        while True:
            if args.num_iterations > 0:
                last_step = step >= args.num_iterations
                progress = step / args.num_iterations
            else:
                # each rank packs its own conversations and reaches the end of the data at its own step: all
                # follow the one furthest along, so they share the schedule and stop at the same step
                consumed = all_reduce_floats([data_state["consumed"]], op="max", label=f"step {step:05d}: data position")[0]
                last_step = consumed >= len(train_set)
                progress = consumed / len(train_set)
            if last_step or step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
                val_bpb = evaluate(step)
                if initial_val_bpb is None:
                    initial_val_bpb = val_bpb
                print0(("\n" if tty and step > 0 else "") + f"step {step:05d} | val bpb {val_bpb:.4f}")
                log_metrics("sft", step, val_bpb=val_bpb)
                wandb_run.log({"step": step, "val/bpb": val_bpb})
            if chatcore is not None and (last_step or (step > 0 and step % chatcore_every == 0)):
                # every rank evaluates its share of the problems (scripts/chat_eval sums them); how long that
                # takes is unknown, so no watchdog deadline here, but a rank that dies still stops the others
                with dist_waiting(f"step {step:05d}: ChatCORE", timeout=float("inf")):
                    chatcore_results = chatcore()
                print0(f"step {step:05d} | " + ", ".join(f"{k}: {v:.4f}" for k, v in chatcore_results.items()))
                wandb_run.log({"step": step, **{f"chatcore/{k}": v for k, v in chatcore_results.items()}})
            if last_step or stop.now:
                save(step)
                break

            lrm = get_sft_lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            momentum = get_sft_muon_momentum(step)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = momentum
            t0 = time.time()
            loss, mean_loss = trainer.step(next_batch)
            loss, mean_loss = all_reduce_step(loss, mean_loss, stop, step + 1)  # averaged over ranks; any Ctrl-C
            dt = time.time() - t0
            step += 1
            losses.append(loss)
            mean_losses.append(mean_loss)
            if step > 1:  # the first step includes compilation
                train_time += dt
            if step == 3:
                warn_if_over_cap(args.memory_limit)
            smooth = 0.9 * smooth + 0.1 * loss
            debiased = smooth / (1 - 0.9 ** step)
            log_metrics("sft", step, loss=debiased, lrm=lrm)
            # progress: by steps with --num-iterations, else by the share of the mixture consumed
            done = step / args.num_iterations if args.num_iterations > 0 else data_state["consumed"] / len(train_set)
            elapsed = train_time if step > 1 else dt
            eta = elapsed / max(done, 1e-9) * (1 - done) if step > 1 else float("nan")
            total = f"{args.num_iterations:05d}" if args.num_iterations > 0 else "?"
            line = progress_line(done, f"step {step:05d}/{total} ({100 * done:.1f}%) | loss {debiased:.4f} | lrm {lrm:.2f} | "
                                       f"epoch {data_state['epoch']} | dt {dt * 1000:.0f}ms | tok/s {total_batch_size / dt:,.0f} | "
                                       f"elapsed {format_duration(train_time)} | eta {format_duration(eta) if eta == eta else '?'}")
            if tty:
                sys.stdout.write("\r\033[K" + line + ("\n" if step % max(args.log_every, 1) == 0 and args.log_every > 1 else ""))
                sys.stdout.flush()
            elif step % max(args.log_every, 1) == 0:
                print0(line)
            if step % 10 == 0:
                wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm})

    # the other ranks wait for rank 0's checkpoint, so that all exit together once it is complete
    barrier("end of training: waiting for rank 0 to finish writing the checkpoint")
    skipped = int(all_reduce_floats([data_state["skipped"]], label="counting the skipped conversations")[0])
    if tty:
        print0()
    if skipped:
        print0(f"skipped {skipped:,} conversations longer than {T + 1} tokens or without an assistant "
               f"token (raise --max-seq-len to train on them)")
    print0(f"val bpb: {initial_val_bpb:.4f} -> {val_bpb:.4f}")
    print0(f"training time: {format_duration(train_time)}")
    print0(f"checkpoint: {checkpoint_dir}")
    get_report().log(section="Chat SFT", data=[
        user_config,
        {"Base checkpoint": f"{model_tag} step {model_step}", "Mixture": "; ".join(notes),
         "Train conversations": len(train_set), "Val conversations": len(val_set),
         "Skipped conversations": skipped, "Epochs": data_state["epoch"],
         "Number of iterations": step, "Tokens per step": total_batch_size,
         "Initial val bpb": initial_val_bpb, "Final val bpb": val_bpb,
         "Final train loss": (smooth / (1 - 0.9 ** step)) if step else None,
         "Training time": format_duration(train_time), **chatcore_results},
    ])
    wandb_run.finish()
    return {"step": step, "val_bpb": val_bpb, "initial_val_bpb": initial_val_bpb, "losses": losses, "mean_losses": mean_losses,
            "skipped": skipped, "checkpoint_dir": checkpoint_dir, "chatcore": chatcore_results,
            "rank": rank, "world_size": world_size}


def chat_eval_available():
    try:
        from scripts.chat_eval import chatcore, run_chat_eval  # noqa: F401
        return True
    except ImportError:
        return False


def make_chatcore(model, tokenizer, batch_size, max_cat, max_sample):
    """ChatCORE as nanochat computes it during SFT: categorical ARC-Easy, ARC-Challenge, MMLU (max_cat
    problems each, -1 = all), generative GSM8K, HumanEval (max_sample problems each, greedy); each accuracy
    centered on its chance level, then averaged (ChatCORE_cat: the categorical three only)."""
    try:
        from scripts.chat_eval import ALL_TASKS, BASELINE_ACCURACIES, chatcore, run_chat_eval
    except ImportError as e:
        raise SystemExit(f"--chatcore-every needs scripts/chat_eval.py ({e}); use --chatcore-every -1")
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

if __name__ == "__main__":
    main()
