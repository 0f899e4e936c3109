"""
Train the BPE tokenizer on the pretraining shards (as nanochat's scripts/tok_train.py does) and
write {base_dir}/tokenizer/tokenizer.pkl and token_bytes.npy.

    python -m scripts.tok_train                              # ClimbMix shards in {base}/base_data_climbmix
    python -m scripts.tok_train --data-dir demo --vocab-size 8192   # the bundled demo corpus
"""
import argparse
import os
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS before mlx)
from tqdm import tqdm

from mlxchat.common import get_base_dir
from mlxchat.dataset import DataError, parquets_iter_batched, resolve_data_dir
from mlxchat.tokenizer import RustBPETokenizer, save_token_bytes

# a round trip over awkward text: digits, contractions, symbols, several scripts, an emoji
SANITY_TEXT = """Hello world! Testing, one two three.
Numbers: 7, 42, 1776, 3.14159 and 1,000,000
Contractions: don't, we'll, they're, I'd
Symbols: ~!@#$%^&*()_+{}|:"<>?
Scripts: Ελληνικά, русский, 한국어, 日本語, עברית 🚀"""


def text_iterator(max_chars, doc_cap, data_dir=None, progress=True):
    """The train split's documents in order, each cut to doc_cap characters; stops right after the
    running character count passes max_chars."""
    bar = tqdm(unit="char", unit_scale=True, desc="reading train shards", disable=not progress)
    nchars = 0
    try:
        for batch in parquets_iter_batched("train", data_dir=data_dir):
            for doc in batch:
                doc = doc[:doc_cap]
                nchars += len(doc)
                bar.update(len(doc))
                yield doc
                if nchars > max_chars:
                    return
    finally:
        bar.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer (rustbpe) on the train shards and save it "
                                     "to {base_dir}/tokenizer/ (tokenizer.pkl, token_bytes.npy).")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="cut each document to this many characters")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size, 9 special tokens included")
    parser.add_argument("--data-dir", default=None, help="folder of parquet shards; 'demo' = the bundled demo corpus "
                        "(default: $MLXCHAT_DATA_DIR, else {base_dir}/base_data_climbmix)")
    args = parser.parse_args(argv)
    print(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}")
    print(f"data: {resolve_data_dir(args.data_dir)}")

    t0 = time.time()
    try:
        tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(args.max_chars, args.doc_cap, args.data_dir),
                                                         args.vocab_size)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"Training time: {time.time() - t0:.2f}s")
    if tokenizer.get_vocab_size() != args.vocab_size:
        print(f"Note: the text ran out of pairs to merge; the vocabulary has {tokenizer.get_vocab_size():,} tokens")

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(tokenizer_dir)
    decoded = tokenizer.decode(tokenizer.encode(SANITY_TEXT))
    assert decoded == SANITY_TEXT, f"round trip failed:\n{SANITY_TEXT!r}\n{decoded!r}"

    token_bytes = save_token_bytes(tokenizer, tokenizer_dir)
    normal = token_bytes[token_bytes > 0]
    print(f"Saved tokenizer.pkl and token_bytes.npy to {tokenizer_dir}")
    print(f"{len(normal):,} normal tokens, {len(token_bytes) - len(normal)} special; bytes per token: "
          f"min {normal.min()}, max {normal.max()}, mean {normal.mean():.2f}")


if __name__ == "__main__":
    main()
