"""
Pretraining dataloader: nanochat's BOS-aligned best-fit packing, batch for batch.

Every row of a batch starts with <|bos|> and holds whole documents, chosen to fill the row as
tightly as possible: take the longest document in a buffer that still fits, and when none fits,
crop the shortest one to fill what is left (its tail is dropped; documents never continue into
the next row). No padding, so every token is trained on; ~35% of the tokens of a long-document
corpus are cropped away at T=2048, the price of never starting a row mid-document.

Deterministic given the shards, the tokenizer, B, T, the buffer/batch sizes and the world size,
so the token stream matches nanochat's exactly (tests check it against reference batches).

Resume: the state yielded with each batch, {pq_idx, rg_idx, epoch}, names the last row group read.
Resuming from it continues at the NEXT row group, with an empty document buffer: approximate
(the buffered documents are skipped), as in nanochat. With exact_state=True the state also carries
the position inside the row group ("doc_batch") and the buffered documents ("doc_buffer"), and a
resume from it continues with exactly the batches an uninterrupted run would have produced.
A shard that cannot be read raises mlxchat.dataset.DataError, naming the file.
"""
import numpy as np

import mlx.core as mx

from mlxchat.dataset import open_shard, read_shard_texts, resolve_data_dir, split_parquet_files


def _document_batches(split, resume_state_dict, tokenizer_batch_size, data_dir=None, rank=0, world_size=1):
    """Yield (list of document texts, (pq_idx, rg_idx, epoch)) forever, epoch after epoch.
    Ranks interleave row groups: rank r reads row groups r, r+W, r+2W, ... of every file."""
    assert 0 <= rank < world_size, f"rank {rank} is not in [0, {world_size})"
    paths = split_parquet_files(split, data_dir)
    resume_pq_idx = resume_state_dict["pq_idx"] if resume_state_dict is not None else 0
    resume_rg_idx = resume_state_dict["rg_idx"] if resume_state_dict is not None else None
    epoch = resume_state_dict.get("epoch", 1) if resume_state_dict is not None else 1
    # exact resume: stay in the named row group and skip the document batches already read
    skip_batches = resume_state_dict.get("doc_batch", -1) + 1 if resume_state_dict is not None else 0
    first_pass = True
    while True:
        yielded = False
        pq_idx = resume_pq_idx if first_pass else 0
        while pq_idx < len(paths):
            pf = open_shard(paths[pq_idx])
            if first_pass and resume_rg_idx is not None and pq_idx == resume_pq_idx:
                # continue after the row group the state names, keeping this rank's stride
                rg_idx = (resume_rg_idx // world_size + (0 if skip_batches else 1)) * world_size + rank
                resume_rg_idx = None
            else:
                rg_idx = rank
                skip_batches = 0
            while rg_idx < pf.num_row_groups:
                docs = read_shard_texts(pf, paths[pq_idx], rg_idx)
                for b, i in enumerate(range(0, len(docs), tokenizer_batch_size)):
                    if b < skip_batches:
                        continue
                    yield docs[i:i + tokenizer_batch_size], (pq_idx, rg_idx, epoch, b)
                    yielded = True
                skip_batches = 0
                rg_idx += world_size
            pq_idx += 1
        if not first_pass and not yielded:
            # a whole epoch without a single document would loop here forever
            raise RuntimeError(f"rank {rank} of {world_size} gets no documents from the {split} shards in "
                               f"{resolve_data_dir(data_dir)}: they have fewer row groups than there are ranks. "
                               f"Use fewer processes or shards with more (smaller) row groups.")
        first_pass = False
        epoch += 1


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, resume_state_dict=None,
        buffer_size=1000, data_dir=None, rank=0, world_size=1, exact_state=False):
    """Yield (inputs, targets, state_dict) forever: inputs and targets are (B, T) int32 mx.arrays,
    targets = inputs shifted left by one; state_dict = {pq_idx, rg_idx, epoch} for resuming
    (plus doc_batch and doc_buffer with exact_state=True: see the module docstring)."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    row_capacity = T + 1  # one extra token: the last input's target
    batches = _document_batches(split, resume_state_dict, tokenizer_batch_size, data_dir, rank, world_size)
    bos_token = tokenizer.get_bos_token_id()
    doc_buffer = []  # token lists, each [BOS] + document
    pq_idx, rg_idx, epoch, doc_batch = 0, 0, 1, -1
    if resume_state_dict is not None and "doc_buffer" in resume_state_dict:
        doc_buffer = [list(d) for d in resume_state_dict["doc_buffer"]]
        pq_idx, rg_idx, epoch = resume_state_dict["pq_idx"], resume_state_dict["rg_idx"], resume_state_dict["epoch"]
        doc_batch = resume_state_dict["doc_batch"]

    def refill_buffer():
        nonlocal pq_idx, rg_idx, epoch, doc_batch
        doc_batch_texts, (pq_idx, rg_idx, epoch, doc_batch) = next(batches)
        doc_batch = doc_batch if exact_state else -1
        # tiktoken encodes the batch in parallel threads (it releases the GIL)
        doc_buffer.extend(tokenizer.encode(doc_batch_texts, prepend=bos_token, num_threads=tokenizer_threads))

    while True:
        rows = np.empty((B, row_capacity), dtype=np.int32)
        for row in rows:
            pos = 0
            while pos < row_capacity:
                while len(doc_buffer) < buffer_size:
                    refill_buffer()
                remaining = row_capacity - pos
                # the longest document that fits whole (the first of equal lengths)
                best_idx, best_len = -1, 0
                for i, doc in enumerate(doc_buffer):
                    n = len(doc)
                    if best_len < n <= remaining:
                        best_idx, best_len = i, n
                if best_idx >= 0:
                    row[pos:pos + best_len] = doc_buffer.pop(best_idx)
                    pos += best_len
                else:
                    # nothing fits: crop the shortest document to fill the row (losing the least text)
                    shortest_idx = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                    row[pos:] = doc_buffer.pop(shortest_idx)[:remaining]
                    pos = row_capacity
        inputs = mx.array(rows[:, :-1])
        targets = mx.array(rows[:, 1:])
        state = {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch}
        if exact_state:
            # documents are never mutated once buffered, so a shallow copy is an exact snapshot
            state["doc_batch"] = doc_batch
            state["doc_buffer"] = list(doc_buffer)
        yield inputs, targets, state


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """The same loader, yielding (inputs, targets) only."""
    for inputs, targets, _state in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets


def split_loader_state(state):
    """(JSON-able part, arrays) of a loader state, for checkpoints: the buffered documents of an
    exact state become one flat token array plus lengths (compact, and no giant JSON)."""
    meta = {k: v for k, v in state.items() if k != "doc_buffer"}
    if "doc_buffer" not in state:
        return meta, None
    docs = state["doc_buffer"]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]) if docs else np.zeros((0,), np.int32)
    return meta, {"tokens": mx.array(tokens), "lengths": mx.array(lengths)}


def join_loader_state(meta, arrays):
    """Inverse of split_loader_state."""
    state = dict(meta)
    if arrays is not None:
        tokens = np.array(arrays["tokens"]).tolist()
        offsets = np.concatenate([[0], np.cumsum(np.array(arrays["lengths"]))]).tolist()
        state["doc_buffer"] = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return state
