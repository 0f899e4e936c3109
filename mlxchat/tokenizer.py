"""
BPE tokenizer in the style of GPT-4, as nanochat has it: trained with rustbpe, run with tiktoken.

Byte-level BPE: ids 0..255 are the raw bytes, merge k gets id 256+k, and the 9 special tokens
below follow the merges. The files in `{base_dir}/tokenizer/` are interchangeable with nanochat's:
    tokenizer.pkl     pickle of the tiktoken.Encoding (nanochat's format; loads in plain tiktoken)
    token_bytes.npy   int32 (vocab,): UTF-8 bytes of each token, 0 for special tokens (used by bpb)
nanochat's token_bytes.pt (a torch file) is read too, without torch.
"""
import copy
import io
import os
import pickle
import time
from functools import lru_cache

import numpy as np
import tiktoken

SPECIAL_TOKENS = [
    # every document begins with <|bos|>; the pretraining loader aligns rows on it
    "<|bos|>",
    # chat turns (for finetuning)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output comes back to the assistant
    "<|output_end|>",
]

# GPT-4's split pattern with \p{N}{1,2} instead of \p{N}{1,3}: numbers split into 1-2 digit groups,
# which nanochat measured to give a better val bpb at small vocab sizes.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class TokenizerError(RuntimeError):
    """A tokenizer file that cannot be used; the message names the file and the fix."""


class _EncodingUnpickler(pickle.Unpickler):
    # tokenizer.pkl is a pickle, and a pickle can run any code. Allow only what a pickled
    # tiktoken.Encoding needs, so a tokenizer folder copied from somewhere cannot execute anything.
    def find_class(self, module, name):
        if (module, name) in (("tiktoken.core", "Encoding"), ("tiktoken", "Encoding")):
            return tiktoken.Encoding
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a tokenizer.pkl holds only a tiktoken.Encoding")


def load_encoding(pickle_path):
    """Read a pickled tiktoken.Encoding (nanochat's tokenizer.pkl)."""
    try:
        with open(pickle_path, "rb") as f:
            enc = _EncodingUnpickler(f).load()
    except FileNotFoundError:
        raise TokenizerError(f"{pickle_path}: no tokenizer here. Train one with `python -m scripts.tok_train` "
                             f"(add --data-dir demo to use the bundled demo corpus).") from None
    except Exception as e:
        raise TokenizerError(f"{pickle_path}: not a usable tokenizer pickle ({type(e).__name__}: {e}). "
                             f"Train a new one with `python -m scripts.tok_train`.") from e
    if not isinstance(enc, tiktoken.Encoding):
        raise TokenizerError(f"{pickle_path}: holds a {type(enc).__name__}, not a tiktoken.Encoding")
    return enc


class RustBPETokenizer:
    """Trained with rustbpe, encoded/decoded with tiktoken (fast, and multithreaded for batches)."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        import rustbpe  # only needed for training
        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        assert vocab_size_no_special >= 256, f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size_no_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        # rustbpe stops early when the text has no pairs left to merge, so count what it returned
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        return cls(load_encoding(os.path.join(tokenizer_dir, "tokenizer.pkl")), "<|bos|>")

    @classmethod
    def from_bytes(cls, data):
        """The tokenizer from to_bytes()'s bytes (what one process sends another)."""
        try:
            enc = _EncodingUnpickler(io.BytesIO(data)).load()
        except Exception as e:
            raise TokenizerError(f"not a tokenizer ({type(e).__name__}: {e})") from e
        if not isinstance(enc, tiktoken.Encoding):
            raise TokenizerError(f"holds a {type(enc).__name__}, not a tiktoken.Encoding")
        return cls(enc, "<|bos|>")

    def to_bytes(self):
        """The content of tokenizer.pkl."""
        return pickle.dumps(self.enc)

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        # OpenAI's encodings, for comparison (tok_eval). tiktoken downloads them on first use.
        # Their document delimiter <|endoftext|> plays the role of BOS.
        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, id):
        return self.enc.decode([id])

    @lru_cache(maxsize=32)
    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids; list of str -> list of lists (encoded in parallel threads).
        prepend/append: a token id or a special token's string. Special-token strings inside the
        text itself are encoded as ordinary text, never as specials."""
        prepend_id = None if prepend is None else (prepend if isinstance(prepend, int) else self.encode_special(prepend))
        append_id = None if append is None else (append if isinstance(append, int) else self.encode_special(append))
        if isinstance(text, str):
            rows, single = [self.enc.encode_ordinary(text)], True
        elif isinstance(text, list):
            rows, single = self.enc.encode_ordinary_batch(text, num_threads=num_threads), False
        else:
            raise ValueError(f"encode takes a str or a list of str, got {type(text).__name__}")
        for ids in rows:
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
        return rows[0] if single else rows

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl (nanochat's format: the pickled tiktoken.Encoding)."""
        from mlxchat.common import atomic_write
        atomic_write(os.path.join(tokenizer_dir, "tokenizer.pkl"), lambda f: pickle.dump(self.enc, f))

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize a chat conversation {"messages": [...]} for finetuning.
        Returns (ids, mask): mask is 1 on the tokens the assistant should learn to produce (its
        text, its python calls, <|assistant_end|>) and 0 elsewhere (the user, tool outputs)."""
        ids, mask = [], []

        def add_tokens(token_ids, mask_val):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([mask_val] * len(token_ids))

        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            # there is no system role in the token format: fold it into the first user message
            messages = copy.deepcopy(messages)
            assert len(messages) > 1 and messages[1]["role"] == "user", "a system message must be followed by a user message"
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        assert len(messages) >= 1, f"conversation has no messages: {conversation}"

        user_start, user_end = self.encode_special("<|user_start|>"), self.encode_special("<|user_end|>")
        assistant_start, assistant_end = self.encode_special("<|assistant_start|>"), self.encode_special("<|assistant_end|>")
        python_start, python_end = self.encode_special("<|python_start|>"), self.encode_special("<|python_end|>")
        output_start, output_end = self.encode_special("<|output_start|>"), self.encode_special("<|output_end|>")

        add_tokens(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected_role = "user" if i % 2 == 0 else "assistant"
            assert message["role"] == expected_role, \
                f"message {i} is from {message['role']}, expected {expected_role} (user and assistant must alternate)"
            content = message["content"]
            if message["role"] == "user":
                assert isinstance(content, str), "user messages must be plain strings"
                add_tokens(user_start, 0)
                add_tokens(self.encode(content), 0)
                add_tokens(user_end, 0)
            else:
                add_tokens(assistant_start, 0)
                if isinstance(content, str):
                    add_tokens(self.encode(content), 1)
                elif isinstance(content, list):
                    # each part is encoded on its own, so token boundaries fall at part boundaries
                    for part in content:
                        part_ids = self.encode(part["text"])
                        if part["type"] == "text":
                            add_tokens(part_ids, 1)
                        elif part["type"] == "python":
                            add_tokens(python_start, 1)
                            add_tokens(part_ids, 1)
                            add_tokens(python_end, 1)
                        elif part["type"] == "python_output":
                            # the tool's output comes from the tool at inference time: not supervised
                            add_tokens(output_start, 0)
                            add_tokens(part_ids, 0)
                            add_tokens(output_end, 0)
                        else:
                            raise ValueError(f"unknown assistant content part type {part['type']!r}")
                else:
                    raise ValueError(f"assistant content must be a str or a list of parts, got {type(content).__name__}")
                add_tokens(assistant_end, 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The prompt for sampling the assistant's reply: drop the final assistant message, render,
        and end with <|assistant_start|>. Returns ids only."""
        messages = conversation["messages"]
        assert messages and messages[-1]["role"] == "assistant", "the last message must be the assistant's (it is dropped)"
        ids, _ = self.render_conversation({**conversation, "messages": copy.deepcopy(messages[:-1])})
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids, mask):
        """Debug helper: the rendered conversation with supervised tokens in green, others in red."""
        colored = []
        for token_id, m in zip(ids, mask):
            color = "\033[92m" if m else "\033[91m"
            colored.append(f"{color}{self.id_to_token(token_id)}\033[0m")
        return "|".join(colored)


# -----------------------------------------------------------------------------
# token_bytes: how many UTF-8 bytes each token stands for (0 for special tokens), so that a loss in
# nats per token becomes bits per byte, comparable across vocabularies.

def tokenizer_fingerprint(tokenizer):
    """What two processes compare to know they hold the same tokenizer (each Mac of a data-parallel
    run loads it from its own disk): the vocabulary size and the ids of a sample with non-ASCII text."""
    return [tokenizer.get_vocab_size(), tokenizer.encode("mlxchat: 2 Macs, 1 model. Ünïcödé ok?")]


def compute_token_bytes(tokenizer):
    specials = set(tokenizer.get_special_tokens())
    special_ids = {tokenizer.encode_special(s) for s in specials}
    # measure the raw bytes: a token may be part of a multi-byte character, which a str round trip
    # would turn into a 3-byte U+FFFD (nanochat fixed exactly this in 2ce972a)
    return np.array([0 if i in special_ids else len(tokenizer.enc.decode_single_token_bytes(i))
                     for i in range(tokenizer.get_vocab_size())], dtype=np.int32)


def save_token_bytes(tokenizer, tokenizer_dir):
    from mlxchat.common import atomic_write
    token_bytes = compute_token_bytes(tokenizer)
    atomic_write(os.path.join(tokenizer_dir, "token_bytes.npy"), lambda f: np.save(f, token_bytes))
    return token_bytes


def load_token_bytes(tokenizer_dir):
    """token_bytes as an mx.array int32: our token_bytes.npy, else nanochat's token_bytes.pt."""
    import mlx.core as mx
    npy = os.path.join(tokenizer_dir, "token_bytes.npy")
    pt = os.path.join(tokenizer_dir, "token_bytes.pt")
    if os.path.exists(npy):
        return mx.array(np.load(npy, allow_pickle=False).astype(np.int32))
    if os.path.exists(pt):
        from mlxchat.torch_io import load_torch_file
        return load_torch_file(pt).astype(mx.int32)
    raise TokenizerError(f"{npy}: not found (nor nanochat's token_bytes.pt). Train a tokenizer with "
                         f"`python -m scripts.tok_train`, which writes it.")


def _tokenizer_dir():
    from mlxchat.common import get_base_dir
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return RustBPETokenizer.from_directory(_tokenizer_dir())


def get_token_bytes():
    return load_token_bytes(_tokenizer_dir())


# -----------------------------------------------------------------------------
# training one on the train split of the pretraining shards (scripts/tok_train.py, and a pretraining
# run's first phase with --train-tokenizer)

TRAIN_MAX_CHARS = 2_000_000_000  # nanochat's: 2B characters
TRAIN_DOC_CAP = 10_000  # characters kept of each document, so that a few huge documents do not dominate the counts

# a round trip over awkward text: digits, contractions, symbols, several scripts, an emoji
SANITY_TEXT = """Hello world! Testing, one two three.
Numbers: 7, 42, 1776, 3.14159 and 1,000,000
Contractions: don't, we'll, they're, I'd
Symbols: ~!@#$%^&*()_+{}|:"<>?
Scripts: Ελληνικά, русский, 한국어, 日本語, עברית 🚀"""


def text_iterator(max_chars, doc_cap, data_dir=None, progress=True):
    """The train split's documents in order, each cut to doc_cap characters; stops right after the
    running character count passes max_chars."""
    from tqdm import tqdm

    from mlxchat.dataset import parquets_iter_batched
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


def train_tokenizer(vocab_size, tokenizer_dir, data_dir=None, max_chars=TRAIN_MAX_CHARS, doc_cap=TRAIN_DOC_CAP, progress=False):
    """Train a BPE tokenizer on the train split of data_dir's shards (text_iterator) and save it into
    tokenizer_dir (tokenizer.pkl, token_bytes.npy). Returns (tokenizer, token_bytes, stats): stats
    holds the characters read and the seconds of training. The vocabulary comes out smaller than
    vocab_size when the text runs out of pairs to merge."""
    read = {"chars": 0}

    def counted():
        for doc in text_iterator(max_chars, doc_cap, data_dir, progress):
            read["chars"] += len(doc)
            yield doc

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(counted(), vocab_size)
    seconds = time.time() - t0
    decoded = tokenizer.decode(tokenizer.encode(SANITY_TEXT))
    if decoded != SANITY_TEXT:
        raise TokenizerError(f"the trained tokenizer does not round-trip text:\n{SANITY_TEXT!r}\n{decoded!r}")
    token_bytes = save_tokenizer(tokenizer, tokenizer_dir)
    return tokenizer, token_bytes, {"chars": read["chars"], "seconds": seconds}


def save_tokenizer(tokenizer, tokenizer_dir):
    """Write tokenizer.pkl and token_bytes.npy into tokenizer_dir; returns the token bytes. The pickle
    goes last and a stale one goes first, so a folder with a tokenizer.pkl is complete: an interrupted
    save never pairs a new token_bytes.npy with an old tokenizer."""
    pickle_path = os.path.join(tokenizer_dir, "tokenizer.pkl")
    if os.path.exists(pickle_path):
        os.remove(pickle_path)
    token_bytes = save_token_bytes(tokenizer, tokenizer_dir)
    tokenizer.save(tokenizer_dir)
    return token_bytes
