"""
Helpers shared by the training benchmarks (scripts/bench_train.py, scripts/bench_profile.py): the
model-shape flags, a random-init model with its optimizer and compiled training step, and a batch of
random tokens. Not a command of its own.
"""
import mlx.core as mx

from mlxchat.gpt import GPT, GPTConfig
from mlxchat.training import Trainer, auto_memory_limit_wanted


def add_model_args(p):
    """The model shape and micro-batch flags shared by the training benchmarks (nanochat's defaults)."""
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--grad-checkpoint", type=int, default=0)


def model_config(args):
    """The GPTConfig of the flags' shape."""
    return GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, aspect_ratio=args.aspect_ratio,
                                head_dim=args.head_dim, max_seq_len=args.max_seq_len, window_pattern=args.window_pattern)


def build_trainer(args, grad_accum=1):
    """A random-init model of the flags' shape, nanochat's optimizer and the compiled training step."""
    model = GPT(model_config(args))
    mx.eval(model.parameters())
    optimizer = model.setup_optimizer(weight_decay=0.1)
    # without --memory-limit, the automatic limit that base_train sets (Trainer(auto_memory_limit))
    auto = getattr(args, "memory_limit", None) is None and auto_memory_limit_wanted()
    return model, optimizer, Trainer(model, optimizer, grad_accum, args.grad_checkpoint, auto_memory_limit=auto)


def random_batch(args):
    """(inputs, targets) of random tokens, one micro-batch of the flags' shape."""
    x = mx.random.randint(0, args.vocab_size, (args.device_batch_size, args.max_seq_len + 1)).astype(mx.int32)
    mx.eval(x)
    return x[:, :-1], x[:, 1:]
