"""
Train the BPE tokenizer on the pretraining shards (as nanochat's scripts/tok_train.py does) and
write {base_dir}/tokenizer/tokenizer.pkl and token_bytes.npy.

    python -m scripts.tok_train                              # ClimbMix shards in {base}/base_data_climbmix
    python -m scripts.tok_train --data-dir demo --vocab-size 8192   # the bundled demo corpus
"""
import argparse
import os

import mlxchat  # noqa: F401  (preloads OpenBLAS before mlx)

from mlxchat.common import get_base_dir
from mlxchat.dataset import DataError, resolve_data_dir
from mlxchat.tokenizer import TRAIN_DOC_CAP, TRAIN_MAX_CHARS, train_tokenizer
from mlxchat.tokenizer import text_iterator  # noqa: F401  (where it lived before the library shared it)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer (rustbpe) on the train shards and save it "
                                     "to {base_dir}/tokenizer/ (tokenizer.pkl, token_bytes.npy).")
    parser.add_argument("--max-chars", type=int, default=TRAIN_MAX_CHARS, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=int, default=TRAIN_DOC_CAP, help="cut each document to this many characters")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size, 9 special tokens included")
    parser.add_argument("--data-dir", default=None, help="folder of parquet shards; 'demo' = the bundled demo corpus "
                        "(default: $MLXCHAT_DATA_DIR, else {base_dir}/base_data_climbmix)")
    args = parser.parse_args(argv)
    print(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}")
    print(f"data: {resolve_data_dir(args.data_dir)}")

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    try:
        tokenizer, token_bytes, stats = train_tokenizer(args.vocab_size, tokenizer_dir, args.data_dir, args.max_chars,
                                                        args.doc_cap, progress=True)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"Training time: {stats['seconds']:.2f}s")
    if tokenizer.get_vocab_size() != args.vocab_size:
        print(f"Note: the text ran out of pairs to merge; the vocabulary has {tokenizer.get_vocab_size():,} tokens")

    normal = token_bytes[token_bytes > 0]
    print(f"Saved tokenizer.pkl and token_bytes.npy to {tokenizer_dir}")
    print(f"{len(normal):,} normal tokens, {len(token_bytes) - len(normal)} special; bytes per token: "
          f"min {normal.min()}, max {normal.max()}, mean {normal.mean():.2f}")


if __name__ == "__main__":
    main()
