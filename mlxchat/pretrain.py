"""
Pretraining as a library object: nanochat's base_train, driven by whoever iterates it.

    from mlxchat.pretrain import BaseTrainConfig, BaseTrainRun
    run = BaseTrainRun(BaseTrainConfig(depth=4, max_seq_len=256, data_dir="demo", num_iterations=100))
    for event in run:          # trains; events are plain numbers and strings (mlxchat.training)
        print(event)
    run.result["val_bpb"]

One dial, depth, derives the model (width = depth x 64 rounded up to the head dim, heads of 128), the
training horizon (tokens = 12 x scaling params), the batch size (Power Lines: B ~ D^0.383) and the
learning-rate / weight-decay scaling, exactly as nanochat does. A checkpoint holds the model, the
optimizer state and the data loader's exact position, so a resumed run sees the same batches as an
uninterrupted one.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx

from mlxchat.common import dtype_name, get_base_dir, get_compute_dtype
from mlxchat.distributed import (DIST_TIMEOUT, all_reduce_floats, barrier, broadcast_object, broadcast_tree,
                                 check_same_on_all_ranks, dist_beating, dist_waiting)
from mlxchat.gpt import GPT, GPTConfig
from mlxchat.hardware import device_memory_bytes, device_name, memory_cap
from mlxchat.schedules import get_lr_multiplier, get_muon_momentum, get_weight_decay
from mlxchat.training import (Checks, ConfigError, Eval, Finished, Log, Phase, Run, Samples, Started, Trainer,
                              TrainingError, auto_device_batch_size, check_memory, config_dict, estimate_training_memory,
                              auto_memory_limit_wanted, option, parse_batch_size, step_event)

# the prompts training samples greedily (base_eval samples the same ones, so the two can be compared)
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
B_REF = 2 ** 19  # nanochat's reference batch size (tokens) at d12


@dataclass
class BaseTrainConfig:
    # model
    depth: int = option(20, "number of layers: the dial that derives everything else")
    aspect_ratio: int = option(64, "model_dim = depth * aspect_ratio (rounded up to --head-dim)")
    head_dim: int = option(128, "attention head dimension")
    max_seq_len: int = option(2048, "context length")
    window_pattern: str = option("SSSL", "sliding windows per layer: L = full context, S = a quarter; last layer is always L")
    # horizon
    num_iterations: int = option(-1, "explicit number of steps (overrides the two below)")
    target_flops: float = option(-1.0, "train for this many FLOPs")
    target_param_data_ratio: float = option(12, "tokens = ratio x scaling params (nanochat: 12)")
    # batch
    device_batch_size: Union[int, str] = option(32, "rows per micro-batch, or 'auto' to fit --memory-limit", parse=parse_batch_size)
    total_batch_size: int = option(-1, "tokens per optimizer step; -1 = derived from depth")
    memory_limit: Optional[float] = option(
        None, "GiB of memory training may use: MLX's allocator is capped there (it waits for the device instead of "
              "queueing ops ahead of it past the cap, which costs a few %% of speed), and --device-batch-size auto picks "
              "the largest micro-batch that fits (default: with a fixed batch on CUDA, 1.1x the live memory that the first "
              "step measures, + 0.5 GiB, elsewhere none; with auto, 75%% of what MLX reports)")
    grad_checkpoint: int = option(0, "1 = recompute each block in the backward pass (less memory, ~30%% slower)")
    # optimizer
    embedding_lr: float = option(0.3, "AdamW learning rate of the token embeddings (at the d12 reference batch)")
    unembedding_lr: float = option(0.008, "AdamW learning rate of lm_head")
    weight_decay: float = option(0.28, "Muon cautious weight decay at the d12 reference (scaled by batch and horizon)")
    matrix_lr: float = option(0.02, "Muon learning rate of the transformer matrices")
    scalar_lr: float = option(0.5, "AdamW learning rate of the per-layer scalars")
    warmup_steps: int = option(40, "linear learning-rate warmup steps")
    warmdown_ratio: float = option(0.65, "share of the steps over which the learning rate decays at the end")
    final_lr_frac: float = option(0.05, "the learning rate at the end, as a share of the peak")
    # evaluation, sampling, checkpoints
    resume_from_step: int = option(-1, "resume from this checkpoint step (-2 = the latest)")
    eval_every: int = option(250, "val bits-per-byte every N steps (-1 = off)")
    eval_tokens: int = option(80 * 524288, "tokens per val evaluation")
    core_metric_every: int = option(-1, "CORE metric every N steps (-1 = off; needs the eval bundle)")
    core_metric_max_per_task: int = option(500, "examples per CORE task (-1 = all)")
    sample_every: int = option(2000, "greedy samples of fixed prompts every N steps (-1 = off)")
    save_every: int = option(-1, "checkpoint every N steps (-1 = only at the end)")
    model_tag: Optional[str] = option(None, "checkpoint folder name (default d<depth>)")
    checkpoint_dir: Optional[str] = option(None, "the run's folder (default <base dir>/base_checkpoints/<model tag>)")
    data_dir: Optional[str] = option(None, "parquet shards to train on (default <base>/base_data_climbmix; 'demo' = the corpus shipped with mlxchat)")
    tokenizer_dir: Optional[str] = option(None, "folder with tokenizer.pkl and token_bytes.npy; default <base dir>/tokenizer")
    train_tokenizer: int = option(0, "train a BPE tokenizer with this vocab size on --data-dir as the run's first phase and "
                                     "keep it in <run folder>/tokenizer (0 = use --tokenizer-dir)")
    seed: int = option(42, "random seed (weights; the data order is fixed)")
    # data parallel across processes / Macs (start every rank with mlx.launch)
    dist_backend: str = option("any", "mx.distributed backend under mlx.launch: any (what the launcher set up) | ring | jaccl | mpi | nccl")
    dist_timeout: float = option(DIST_TIMEOUT, "seconds to wait for the other ranks (to join, or in a collective) before exiting with an error")

    def validate(self):
        """Every problem of this config in one ConfigError, before anything is allocated."""
        c = Checks()
        c.positive(self, "depth", "aspect_ratio", "max_seq_len", "eval_tokens", "dist_timeout")
        c.positive(self, "memory_limit", allow_none=True)
        c.require(isinstance(self.head_dim, int) and self.head_dim >= 2 and self.head_dim % 2 == 0,
                  f"--head-dim must be an even number >= 2 (rotary embeddings rotate pairs), got {self.head_dim!r}")
        pattern = str(self.window_pattern).upper()
        c.require(pattern != "" and set(pattern) <= {"S", "L"},
                  f"--window-pattern must be letters S (a quarter of the context) and L (full context), e.g. SSSL; got {self.window_pattern!r}")
        c.require(self.device_batch_size == "auto" or (isinstance(self.device_batch_size, int) and self.device_batch_size >= 1),
                  f"--device-batch-size must be >= 1 or 'auto', got {self.device_batch_size!r}")
        c.require(self.total_batch_size == -1 or self.total_batch_size >= 1,
                  f"--total-batch-size must be a number of tokens or -1 (derived), got {self.total_batch_size!r}")
        c.require(self.num_iterations == -1 or self.num_iterations >= 1,
                  f"--num-iterations must be >= 1 or -1 (derived), got {self.num_iterations!r}")
        c.require(self.target_param_data_ratio > 0, f"--target-param-data-ratio must be > 0, got {self.target_param_data_ratio!r}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "warmup_steps"):
            c.require(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        for name in ("warmdown_ratio", "final_lr_frac"):
            c.require(0 <= getattr(self, name) <= 1, f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(self, name)!r}")
        c.require(self.grad_checkpoint in (0, 1), f"--grad-checkpoint must be 0 or 1, got {self.grad_checkpoint!r}")
        c.require(self.resume_from_step >= -2, f"--resume-from-step must be a step, -1 (fresh) or -2 (the latest), got {self.resume_from_step}")
        c.every(self, "eval_every", "core_metric_every", "sample_every", "save_every")
        if isinstance(self.device_batch_size, int) and self.total_batch_size > 0 and isinstance(self.max_seq_len, int) \
                and self.max_seq_len > 0 and self.device_batch_size > 0:
            rows = self.device_batch_size * self.max_seq_len
            c.require(self.total_batch_size % rows == 0,
                      f"total batch {self.total_batch_size:,} tokens is not a multiple of device batch {self.device_batch_size} x "
                      f"{self.max_seq_len}; pick --device-batch-size dividing {self.total_batch_size // self.max_seq_len} or set "
                      f"--total-batch-size to a multiple of {rows:,}")
        if self.data_dir not in (None, "demo"):
            c.require(os.path.isdir(os.path.expanduser(self.data_dir)),
                      f"--data-dir {self.data_dir}: no such folder (download shards with `python -m mlxchat.dataset -n 8`, "
                      f"import your text with `python -m mlxchat.dataset import`, or use --data-dir demo)")
        self._check_tokenizer(c)
        c.raise_if_any()

    def _check_tokenizer(self, c):
        # a missing tokenizer would otherwise fail the run only once it starts loading
        from mlxchat.tokenizer import SPECIAL_TOKENS
        smallest = 256 + len(SPECIAL_TOKENS)  # the 256 bytes and the special tokens, no merge yet
        c.require(isinstance(self.train_tokenizer, int) and (self.train_tokenizer == 0 or self.train_tokenizer >= smallest),
                  f"--train-tokenizer must be 0 (off) or a vocab size >= {smallest} (256 bytes + {len(SPECIAL_TOKENS)} "
                  f"special tokens), got {self.train_tokenizer!r}")
        fixes = ("train one with `python -m scripts.tok_train` (add --data-dir demo for the demo corpus), or let this run "
                 "train its own with --train-tokenizer N")
        c.require(not (self.tokenizer_dir and self.train_tokenizer),
                  "--tokenizer-dir and --train-tokenizer exclude each other: use a trained tokenizer or train one for this "
                  "run, not both")
        if self.tokenizer_dir and not self.train_tokenizer:
            folder = os.path.abspath(os.path.expanduser(self.tokenizer_dir))
            c.require(os.path.exists(os.path.join(folder, "tokenizer.pkl")),
                      f"--tokenizer-dir {self.tokenizer_dir}: no tokenizer.pkl in {folder}; {fixes}")
        elif not self.tokenizer_dir and not self.train_tokenizer:
            folder = os.path.join(get_base_dir(), "tokenizer")
            c.require(os.path.exists(os.path.join(folder, "tokenizer.pkl")),
                      f"no tokenizer in {folder} (the default; --tokenizer-dir picks another folder): {fixes}")

    def model_config(self, vocab_size):
        return GPTConfig.from_depth(self.depth, vocab_size, self.aspect_ratio, self.head_dim, self.max_seq_len,
                                    self.window_pattern.upper())


def scaling_params(config):
    # Kaplan-style: transformer matrices + lm_head (nanochat dev/LOG 2026-01-27)
    c = config.param_counts()
    return c["transformer_matrices"] + c["lm_head"]


def derive_hyperparameters(config, vocab_size):
    """nanochat's scaling-law logic (spec §3.2), integer rounding included, from the shapes alone."""
    model_config = config.model_config(vocab_size)
    num_scaling = scaling_params(model_config)
    target_tokens = int(config.target_param_data_ratio * num_scaling)
    # the d12 reference, with the same architecture flags
    ref = GPTConfig.from_depth(12, vocab_size, config.aspect_ratio, config.head_dim, config.max_seq_len,
                               config.window_pattern.upper())
    D_REF = config.target_param_data_ratio * scaling_params(ref)
    total_batch_size = config.total_batch_size
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / D_REF) ** 0.383))
    batch_lr_scale = (total_batch_size / B_REF) ** 0.5
    wd_scaled = config.weight_decay * (total_batch_size / B_REF) ** 0.5 * (D_REF / target_tokens)
    flops_per_token = model_config.estimate_flops()
    if config.num_iterations > 0:
        num_iterations = config.num_iterations
    elif config.target_flops > 0:
        num_iterations = round(config.target_flops / (flops_per_token * total_batch_size))
    else:
        num_iterations = target_tokens // total_batch_size
    return dict(num_scaling_params=num_scaling, target_tokens=target_tokens, D_REF=D_REF,
                total_batch_size=total_batch_size, batch_lr_scale=batch_lr_scale, wd_scaled=wd_scaled,
                flops_per_token=flops_per_token, num_iterations=num_iterations)


class BaseTrainRun(Run):
    stage = "base"

    # A run folder's tokenizer/ is the tokenizer its checkpoints were trained with, so that chat, eval and
    # SFT of the run find it (checkpoint_manager.find_tokenizer_dir looks there first). --train-tokenizer
    # trains it there; otherwise the tokenizer used is copied there. A resumed run never retrains it (new
    # ids would not match the checkpoint) and refuses a tokenizer other than the one there.

    def _load_tokenizer(self, run_dir):
        """(tokenizer, token_bytes) of this run, with its events (a generator: `yield from` it)."""
        from mlxchat.tokenizer import RustBPETokenizer, tokenizer_fingerprint
        cfg = self.config
        if cfg.train_tokenizer:
            return (yield from self._trained_tokenizer(run_dir))
        folder = (os.path.abspath(os.path.expanduser(cfg.tokenizer_dir)) if cfg.tokenizer_dir
                  else os.path.join(get_base_dir(), "tokenizer"))
        tokenizer = RustBPETokenizer.from_directory(folder)
        yield Log(f"tokenizer: {folder}")
        own = os.path.join(run_dir, "tokenizer")
        if self.rank == 0 and cfg.resume_from_step != -1 and own != folder and os.path.exists(os.path.join(own, "tokenizer.pkl")):
            if tokenizer_fingerprint(RustBPETokenizer.from_directory(own)) != tokenizer_fingerprint(tokenizer):
                raise TrainingError(f"{run_dir} was trained with the tokenizer in {own}, not the one in {folder}: resume "
                                    f"with --tokenizer-dir {own}")
        return tokenizer, _token_bytes(tokenizer, folder)

    def _trained_tokenizer(self, run_dir):
        """--train-tokenizer: rank 0 trains it into <run dir>/tokenizer, or reads it back when resuming, and
        sends it to the other ranks (their Macs' disks do not have it)."""
        import base64
        from mlxchat.dataset import resolve_data_dir
        from mlxchat.tokenizer import RustBPETokenizer, TRAIN_DOC_CAP, TRAIN_MAX_CHARS, train_tokenizer
        cfg, master = self.config, self.rank == 0
        own = os.path.join(run_dir, "tokenizer")
        resuming = cfg.resume_from_step != -1
        vocab = cfg.train_tokenizer
        if not resuming:
            # about the text the run will train on (~5 characters a token) is plenty, but at least 100M
            # characters (a whole small corpus), at most what tok_train reads
            hp = derive_hyperparameters(cfg, vocab)
            max_chars = int(min(TRAIN_MAX_CHARS, max(100_000_000, 5 * hp["num_iterations"] * hp["total_batch_size"])))
            yield Phase("tokenizer")
            yield Log(f"tokenizer: training a BPE tokenizer with vocab {vocab:,} on the train split of "
                      f"{resolve_data_dir(cfg.data_dir)} (at most {max_chars:,} characters, documents cut to {TRAIN_DOC_CAP:,})")
        tokenizer = token_bytes = stats = failure = None
        if master:
            try:
                if not resuming:
                    tokenizer, token_bytes, stats = train_tokenizer(vocab, own, cfg.data_dir, max_chars)
                    token_bytes = mx.array(token_bytes)
                elif os.path.exists(os.path.join(own, "tokenizer.pkl")):
                    tokenizer = RustBPETokenizer.from_directory(own)
                    token_bytes = _token_bytes(tokenizer, own)
                else:
                    raise TrainingError(f"--train-tokenizer with --resume-from-step: {own} holds no tokenizer.pkl, so this "
                                        f"run did not train one and its checkpoints use another tokenizer: resume without "
                                        f"--train-tokenizer (--tokenizer-dir DIR of the tokenizer it was trained with)")
            except Exception as e:  # noqa: BLE001  (raised below, once the other ranks know)
                failure = e
        if self.world_size > 1:
            # training may take minutes: the others wait for it without the watchdog's timeout (a rank 0 that
            # dies still ends them: its sockets close)
            barrier("waiting for rank 0's tokenizer", timeout=float("inf"))
            sent = None
            if failure is not None:
                sent = {"error": str(failure)}
            elif master:
                sent = {"tokenizer": base64.b64encode(tokenizer.to_bytes()).decode("ascii")}
            sent = broadcast_object(sent, label="sending rank 0's tokenizer")
            if not master:
                if "error" in sent:
                    raise TrainingError(f"rank {self.rank}: rank 0 has no tokenizer for this run: {sent['error']}")
                tokenizer = RustBPETokenizer.from_bytes(base64.b64decode(sent["tokenizer"]))
                token_bytes = _token_bytes(tokenizer, None)
        if failure is not None:
            raise failure
        got = tokenizer.get_vocab_size()
        if not master:
            yield Log(f"tokenizer: rank 0's, from its {own} (vocab {got:,})")
        elif resuming:
            yield Log(f"tokenizer: reusing {own} (vocab {got:,}), trained by this run: a resumed run never retrains it "
                      f"(new ids would not match the checkpoint)")
        else:
            yield Log(f"tokenizer: {stats['chars']:,} characters read, trained in {stats['seconds']:.1f} s, vocab {got:,}"
                      + (f" (the text ran out of pairs to merge before {vocab:,})" if got != vocab else "")
                      + f"; saved to {own}")
        if not resuming:
            yield Phase("loading")  # the model comes next
        return tokenizer, token_bytes

    def _keep_tokenizer(self, tokenizer, run_dir):
        """Write the tokenizer into <run dir>/tokenizer unless it is already the one there (trained by this
        run, or checked by _load_tokenizer when resuming)."""
        from mlxchat.tokenizer import save_tokenizer
        own = os.path.join(run_dir, "tokenizer")
        there = os.path.exists(os.path.join(own, "tokenizer.pkl"))
        if not there or not (self.config.train_tokenizer or self.config.resume_from_step != -1):
            save_tokenizer(tokenizer, own)

    def _run(self):
        from mlxchat.checkpoint_manager import find_tokenizer_dir, save_training_checkpoint
        from mlxchat.dataloader import join_loader_state, split_loader_state
        from mlxchat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as make_loader
        from mlxchat.loss_eval import evaluate_bpb
        from mlxchat.tokenizer import tokenizer_fingerprint

        cfg, rank, world_size = self.config, self.rank, self.world_size
        master = rank == 0
        mx.random.seed(cfg.seed)
        dtype = get_compute_dtype()
        yield Phase("loading")
        yield Log(f"device: {device_name()} ({mx.default_device()}), compute dtype {dtype_name(dtype)}")
        if world_size > 1:
            yield Log(f"data parallel: {world_size} processes (mx.distributed, backend {cfg.dist_backend}); each reads "
                      f"1/{world_size} of the row groups, gradients are averaged before every step")
        model_tag = cfg.model_tag or f"d{cfg.depth}"
        checkpoint_dir = os.path.abspath(os.path.expanduser(
            cfg.checkpoint_dir or os.path.join(get_base_dir(), "base_checkpoints", model_tag)))
        if cfg.train_tokenizer:
            self.run_dir = checkpoint_dir  # the tokenizer is written there: its phase shows in metrics.jsonl as it happens
        tokenizer, token_bytes = yield from self._load_tokenizer(checkpoint_dir)
        vocab_size = tokenizer.get_vocab_size()
        yield Log(f"vocab size: {vocab_size:,}")
        # every Mac loads the tokenizer from its own disk (unless this run trained it): a different one would train on
        # different token ids
        check_same_on_all_ranks(tokenizer_fingerprint(tokenizer), "the tokenizer")

        config = cfg.model_config(vocab_size)
        hp = derive_hyperparameters(cfg, vocab_size)
        T = cfg.max_seq_len
        total_batch_size, num_iterations, s = hp["total_batch_size"], hp["num_iterations"], hp["batch_lr_scale"]
        dtype_bytes = 2 if dtype in (mx.bfloat16, mx.float16) else 4
        # refuse what cannot fit before anything is allocated (auto measures, from one row up)
        check_memory(estimate_training_memory(config, 1 if cfg.device_batch_size == "auto" else cfg.device_batch_size,
                                              dtype_bytes, cfg.grad_checkpoint),
                     f"depth {cfg.depth} (width {config.n_embd}, {config.param_counts()['total']:,} parameters)")
        yield Log(f"model config: {config.to_dict()}")
        model = GPT(config)
        counts = model.num_scaling_params()
        for k, v in counts.items():
            yield Log(f"  {k:24s}: {v:,}")

        def make_optimizer(m):
            return m.setup_optimizer(unembedding_lr=cfg.unembedding_lr * s, embedding_lr=cfg.embedding_lr * s,
                                     scalar_lr=cfg.scalar_lr * s, matrix_lr=cfg.matrix_lr * s, weight_decay=hp["wd_scaled"])

        cap_gib = cfg.memory_limit  # GiB, or None: MLX's own limit (see mlxchat.hardware.memory_cap)
        if cfg.device_batch_size == "auto":
            yield Phase("measuring")
            limit = (cfg.memory_limit * 2 ** 30) if cfg.memory_limit else 0.75 * (device_memory_bytes() or 8e9)
            cap_gib = limit / 2 ** 30  # the batch was measured to fit: keep the queued-ahead ops inside the budget too
            B, fixed, per_row = auto_device_batch_size(lambda: GPT(config), make_optimizer, T, vocab_size, limit,
                                                       cfg.grad_checkpoint, total_batch_size // world_size)
            if world_size > 1:  # every rank measured its own Mac: all use the smallest pick
                B = int(all_reduce_floats([B], op="min", label="agreeing on --device-batch-size auto",
                                          timeout=10 * cfg.dist_timeout)[0])
            yield Log(f"--device-batch-size auto: picked {B} (measured: {fixed / 2**30:.2f} GiB fixed + {per_row / 2**30:.3f} "
                      f"GiB per row at T={T}; budget {limit / 2**30:.1f} GiB; capped by total batch {total_batch_size:,} tokens)")
            mx.random.seed(cfg.seed)
            model = GPT(config)
        else:
            B = cfg.device_batch_size
        world_tokens_per_fwdbwd = B * T * world_size  # one micro-step of every rank
        if total_batch_size % world_tokens_per_fwdbwd != 0:
            if world_size == 1:
                raise ConfigError(f"total batch {total_batch_size:,} tokens is not a multiple of device batch {B} x {T}; "
                                  f"pick --device-batch-size dividing {total_batch_size // T} or set --total-batch-size")
            rows = total_batch_size // (T * world_size)  # rows per process per step
            hint = f"pick --device-batch-size dividing {rows} or " if rows else ""
            raise ConfigError(f"total batch {total_batch_size:,} tokens is not a multiple of device batch {B} x {T} x {world_size} "
                              f"processes = {world_tokens_per_fwdbwd:,} tokens; {hint}set --total-batch-size to a multiple "
                              f"of {world_tokens_per_fwdbwd:,}")
        grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
        yield Log(f"total batch {total_batch_size:,} tokens = {B} x {T} x {grad_accum_steps} accumulation steps"
                  + (f" x {world_size} processes" if world_size > 1 else ""))
        yield Log(f"iterations: {num_iterations:,} ({num_iterations * total_batch_size:,} tokens, "
                  f"ratio {num_iterations * total_batch_size / hp['num_scaling_params']:.2f}), "
                  f"{hp['flops_per_token'] * num_iterations * total_batch_size:.3e} FLOPs")
        yield Log(f"lr scale {s:.4f}, Muon weight decay {hp['wd_scaled']:.4f}")

        optimizer = make_optimizer(model)
        # only now that the model fits: a refused config leaves no run folder behind
        self.run_dir = checkpoint_dir
        if master:
            self._keep_tokenizer(tokenizer, checkpoint_dir)

        # ---- resume
        step = 0
        loop_state = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
        val_bpb = None
        loader_state = None
        if cfg.resume_from_step != -1:
            resume_step, meta, optim_data = self._load_resume(checkpoint_dir, cfg.resume_from_step, model, optimizer)
            yield Log(f"resuming from {checkpoint_dir} step {resume_step}")
            step = meta["step"]
            loop_state = meta["loop_state"]
            val_bpb = meta.get("val_bpb")
            if optim_data.get("loader") and optim_data["loader"]["meta"]:  # exact: the buffered documents were saved with this rank's state
                loader_state = join_loader_state(optim_data["loader"]["meta"], optim_data["loader"].get("arrays"))
            else:
                loader_state = meta["dataloader_state_dict"]
            del optim_data
        if world_size > 1:  # every rank starts from rank 0's weights (fresh or resumed)
            model.update(broadcast_tree(model.parameters(), label="sending rank 0's weights"))
        self.step = step

        resolved = dict(config_dict(cfg), device_batch_size=B, total_batch_size=total_batch_size, num_iterations=num_iterations,
                        grad_accum_steps=grad_accum_steps, model_config=config.to_dict(), world_size=world_size,
                        compute_dtype=dtype_name(dtype), **{k: v for k, v in hp.items() if k not in ("total_batch_size", "num_iterations")})
        yield Started(stage=self.stage, run_dir=checkpoint_dir, config=resolved, num_params=counts["total"],
                      tokens_per_step=total_batch_size, flops_per_token=hp["flops_per_token"], total_steps=num_iterations,
                      start_step=step, world_size=world_size, device=device_name(), pid=os.getpid())

        yield Phase("tokenizing", step)
        train_loader = make_loader(tokenizer, B, T, split="train", resume_state_dict=loader_state, data_dir=cfg.data_dir,
                                   exact_state=True, rank=rank, world_size=world_size)
        pending = [next(train_loader)]
        consumed = {"state": loader_state}

        def next_batch():
            bx, by, state = pending.pop()
            consumed["state"] = state  # where a resume continues from, once this batch is trained on
            pending.append(next(train_loader))  # prefetch: tokenization overlaps the async compute
            return bx, by

        # no cap given (by --memory-limit or the auto batch size's budget): on CUDA the Trainer measures the
        # first step's live memory and caps MLX just above it, which keeps the peak near it (see Trainer)
        trainer = Trainer(model, optimizer, grad_accum_steps, cfg.grad_checkpoint, grad_reduce=self._grad_reduce(),
                          auto_memory_limit=cap_gib is None and auto_memory_limit_wanted())

        def save(at_step):
            loader_meta, loader_arrays = split_loader_state(consumed["state"]) if consumed["state"] else (None, None)
            meta = {
                "step": at_step, "val_bpb": val_bpb, "model_config": config.to_dict(), "user_config": config_dict(cfg),
                "device_batch_size": B, "max_seq_len": T, "total_batch_size": total_batch_size,
                # nanochat's (approximate) resume keys; the exact loader state is in the optim file
                "dataloader_state_dict": {k: loader_meta[k] for k in ("pq_idx", "rg_idx", "epoch")} if loader_meta else None,
                "loop_state": loop_state,
                "tokens_seen": at_step * total_batch_size, "seed": cfg.seed,
                "compute_dtype": dtype_name(dtype), "world_size": world_size,
            }
            # each rank's exact loader state goes into its own optimizer file
            save_training_checkpoint(checkpoint_dir, at_step, model, optimizer, meta,
                                     loader={"meta": loader_meta, "arrays": loader_arrays})
        self._save_checkpoint = save
        self._live_model = (model, find_tokenizer_dir(checkpoint_dir))

        losses, mean_losses, val_history, core_history = [], [], [], []
        first_step = step
        smooth = loop_state["smooth_train_loss"]
        status = "finished"
        # MLX's memory limit is put back after the loop (it is process-wide)
        with memory_cap(cap_gib):
            mx.reset_peak_memory()
            while True:
                last_step = step == num_iterations
                if cfg.eval_every > 0 and (last_step or step % cfg.eval_every == 0):
                    yield Phase("evaluating", step)
                    # every rank evaluates its share of the val row groups; evaluate_bpb sums nats and bytes over ranks
                    eval_steps = max(1, cfg.eval_tokens // (B * T * world_size))
                    val_loader = make_loader(tokenizer, B, T, split="val", data_dir=cfg.data_dir, rank=rank, world_size=world_size)
                    with dist_waiting(f"step {step:05d}: val bpb"):
                        val_bpb = evaluate_bpb(model, dist_beating((bx, by) for bx, by, _ in val_loader), eval_steps, token_bytes)
                    loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
                    val_history.append((step, val_bpb))
                    yield Eval(step, {"val_bpb": val_bpb})
                if cfg.core_metric_every > 0 and (last_step or (step > 0 and step % cfg.core_metric_every == 0)):
                    yield Phase("evaluating", step)
                    from mlxchat.core_eval import evaluate_core
                    with dist_waiting(f"step {step:05d}: CORE", timeout=float("inf")):
                        core = evaluate_core(model, tokenizer, max_per_task=cfg.core_metric_max_per_task, progress=False)
                    core_history.append((step, core["core_metric"]))
                    yield Eval(step, {"core_metric": core["core_metric"], **core["centered_results"]})
                if master and cfg.sample_every > 0 and (last_step or (step > 0 and step % cfg.sample_every == 0)):
                    yield Phase("sampling", step)
                    yield Samples(step, sample_completions(model, tokenizer, SAMPLE_PROMPTS))
                if last_step:
                    yield from self._save(step)
                    break
                if step > 0 and step != first_step and cfg.save_every > 0 and step % cfg.save_every == 0:
                    yield from self._save(step)
                if (yield from self._boundary(step)):
                    status = "stopped"
                    yield from self._save(step)
                    break

                # ---- one optimizer step
                lrm = get_lr_multiplier(step, num_iterations, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
                momentum = get_muon_momentum(step, num_iterations, cfg.warmdown_ratio)
                muon_wd = get_weight_decay(step, num_iterations, hp["wd_scaled"])
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                    if group["kind"] == "muon":
                        group["momentum"] = momentum
                        group["weight_decay"] = muon_wd
                # randomness (none in the step today, dropout-free model) is a function of (seed, step), so a
                # resumed run draws exactly what the uninterrupted one would: the seed is the RNG state
                mx.random.seed(cfg.seed * 1_000_003 + step)
                if step == first_step:
                    yield Phase("compiling", step)
                t0 = time.time()
                loss, mean_loss = trainer.step(next_batch)
                loss, mean_loss = self._sync(step + 1, loss, mean_loss)  # averaged over ranks, with any commands
                dt = time.time() - t0
                step += 1
                self.step = step
                losses.append((step, loss))
                mean_losses.append((step, mean_loss))
                smooth = 0.9 * smooth + 0.1 * loss
                debiased = smooth / (1 - 0.9 ** step)
                if step > 10:
                    loop_state["total_training_time"] += dt
                loop_state["smooth_train_loss"] = smooth
                avg_dt = loop_state["total_training_time"] / (step - 10) if step > 10 else dt
                if step == first_step + 1:
                    yield Phase("running", step)
                    if trainer.live_bytes is not None:
                        yield Log(f"memory: a step holds {trainer.live_bytes / 2 ** 30:.2f} GiB; MLX is capped at "
                                  f"{mx.get_memory_limit() / 2 ** 30:.2f} GiB so that it does not queue "
                                  f"far ahead of the device (--memory-limit GiB sets a cap of your own)")
                yield step_event(step, num_iterations, loss, debiased, lrm, dt, total_batch_size, hp["flops_per_token"],
                                 world_size, loop_state["total_training_time"], avg_dt * (num_iterations - step),
                                 step / max(num_iterations, 1))
                notice = self._after_step(step, first_step, cap_gib)
                if notice is not None:
                    yield notice

        # the other ranks wait for rank 0's last checkpoint, so that all exit together once it is complete
        barrier("end of training: waiting for rank 0 to finish writing the checkpoint")
        peak = mx.get_peak_memory() / 2 ** 30
        min_bpb = loop_state["min_val_bpb"] if loop_state["min_val_bpb"] != float("inf") else None
        self.result = {"val_bpb": val_bpb, "min_val_bpb": loop_state["min_val_bpb"], "peak_memory_gib": peak, "step": step,
                       "losses": losses, "mean_losses": mean_losses, "val_bpb_history": val_history,
                       "core_history": core_history, "checkpoint_dir": checkpoint_dir, "rank": rank,
                       "world_size": world_size, "status": status}
        yield Finished(status=status, step=step, summary={
            "Number of parameters": counts["total"], "Number of training tokens": step * total_batch_size,
            "Device batch size": B, "Compute dtype": dtype_name(dtype), "Device": device_name(),
            "Minimum validation bpb": min_bpb, "Final validation bpb": val_bpb,
            "Total training time": loop_state["total_training_time"], "Peak memory (GiB)": round(peak, 3),
            "Peak memory cap (GiB)": cap_gib, "Checkpoint dir": checkpoint_dir})


def _token_bytes(tokenizer, folder):
    """The folder's token_bytes, or measured from the tokenizer when it has none (or there is no folder)."""
    from mlxchat.tokenizer import TokenizerError, compute_token_bytes, load_token_bytes
    if folder is not None:
        try:
            return load_token_bytes(folder)
        except TokenizerError:
            pass
    return mx.array(compute_token_bytes(tokenizer))


def sample_completions(model, tokenizer, prompts, max_tokens=16):
    """Greedy completions of `prompts`: [[prompt, completion], ...]."""
    from mlxchat.engine import Engine
    engine = Engine(model, tokenizer)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        results, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0)
        out.append([prompt, tokenizer.decode(results[0][len(ids):])])
    return out
