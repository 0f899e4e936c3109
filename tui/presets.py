"""
What the Configure pane starts from: presets (named sets of config values) and the translation of a
form's values into a library config, plus the equivalent command line.

A preset only sets fields; everything else keeps the library's defaults, which are nanochat's.
"""
from dataclasses import MISSING, fields
from typing import get_args

from mlxchat.pretrain import BaseTrainConfig
from mlxchat.rl import RLConfig
from mlxchat.sft import SFTConfig
from mlxchat.training import field_type

STAGES = {  # stage -> (config class, script, what the pane calls it)
    "base": (BaseTrainConfig, "scripts.base_train", "Pretrain"),
    "sft": (SFTConfig, "scripts.chat_sft", "SFT"),
    "rl": (RLConfig, "scripts.chat_rl", "RL"),
}

PRESETS = {
    # the tiny model on the bundled corpus: its own 4096-token tokenizer, minutes on a laptop CPU
    # (runs/demo.sh's pretraining stage)
    "demo": dict(stage="base", depth=4, aspect_ratio=32, head_dim=32, max_seq_len=256, window_pattern="L",
                 device_batch_size=16, total_batch_size=4096, num_iterations=150, eval_every=50, eval_tokens=32768,
                 sample_every=50, save_every=50, data_dir="demo", train_tokenizer=4096),
    # nanochat's d12 and d20 (everything derived from the depth, ClimbMix data, the base dir's tokenizer);
    # the micro-batch is measured to fit this machine
    "d12": dict(stage="base", depth=12, device_batch_size="auto"),
    "d20": dict(stage="base", depth=20, device_batch_size="auto"),
    # fine-tune a chat model on the shipped chat set (choose the base checkpoint in the form)
    "demo-sft": dict(stage="sft", mixture="demo", num_iterations=80, mmlu_epochs=1, eval_every=40, eval_tokens=32768),
}


def field_info(stage):
    """The config class's fields: name -> (default, help, parse)."""
    cls = STAGES[stage][0]
    return {f.name: (f.default if f.default is not MISSING else None, f.metadata.get("help", ""), parser_for(f))
            for f in fields(cls)}


def parser_for(f):
    """str -> value for one config field (the form holds text): the flag's own conversion
    (mlxchat.training.field_type), with an empty field meaning None where the field may be None, and
    the reason in words when the text is not a number."""
    kind = field_type(f)
    optional = type(None) in get_args(f.type)

    def parse(text):
        text = str(text).strip()
        if text == "" or text.lower() == "none":
            if optional:
                return None
            raise ValueError("a value is required")
        try:
            return kind(text)
        except ValueError:
            if kind in (int, float):
                raise ValueError(f"must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
            raise  # a field's own parse function says why
    return parse


def format_value(value):
    """A config value as the form (and a command line) writes it."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def command_line(stage, config):
    """The equivalent `python -m scripts.X ...` for a config: the fields that differ from the defaults."""
    cls, script, _ = STAGES[stage]
    defaults = cls()
    parts = [f"python -m {script}"]
    for f in fields(cls):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name) or value is None:
            continue
        text = format_value(value)
        if any(ch in text for ch in " '\"$\\") or text == "":
            text = "'" + text.replace("'", "'\\''") + "'"
        parts.append(f"--{f.name.replace('_', '-')} {text}")
    return " ".join(parts)
