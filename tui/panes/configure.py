"""
Pane 1, Configure: the run's settings as a form built from the library's config dataclasses (their
defaults and help texts are the flags'), checked as you type by the library's own validation, with
everything the depth dial derives shown live, the memory and time it will take on this machine, and
the equivalent command line. Nothing here touches MLX: the derived figures are arithmetic on shapes.
"""
import os
import re
from dataclasses import dataclass, fields
from typing import Optional

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, Select, Static

from mlxchat.runs import list_checkpoints, new_run_name
from mlxchat.training import ConfigError
from tui.format import count, duration
from tui.presets import PRESETS, STAGES, field_info, format_value

# what each stage's form shows, in order; "run_name", "data" and "tokenizer" are the pane's own rows
FORM = {
    "base": ["run_name", "depth", "data", "tokenizer", "max_seq_len", "device_batch_size", "total_batch_size",
             "num_iterations", "memory_limit", "eval_every", "save_every", "sample_every", "eval_tokens",
             "aspect_ratio", "head_dim", "window_pattern", "grad_checkpoint", "matrix_lr", "embedding_lr",
             "unembedding_lr", "warmup_steps", "seed"],
    "sft": ["run_name", "base_checkpoint_dir", "mixture", "num_iterations", "device_batch_size", "max_seq_len",
            "total_batch_size", "memory_limit", "eval_every", "eval_tokens", "init_lr_frac", "seed"],
    "rl": ["run_name", "sft_checkpoint_dir", "task", "num_steps", "device_batch_size", "examples_per_step",
           "num_samples", "max_new_tokens", "eval_every", "save_every", "memory_limit", "seed"],
}
# a problem names its flag; these flags belong to one of the pane's own rows
FLAG_ROW = {"data_dir": "data", "tokenizer_dir": "tokenizer", "train_tokenizer": "tokenizer", "checkpoint_dir": "run_name"}
FLAG_RE = re.compile(r"--([a-z][a-z0-9-]*)")
ROW_HELP = {
    "run_name": "the run's folder name under the runs dir (empty: a new name from the stage, preset and time)",
    "data": "demo: the bundled corpus. ClimbMix: shards downloaded with `python -m mlxchat.dataset -n 8`. "
            "Your own text: a folder of .parquet shards, or of .txt/.md/.jsonl files, imported into the run folder "
            "first (as `python -m mlxchat.dataset import` does)",
    "tokenizer": "train one: a BPE tokenizer of this vocab size trained on the chosen data as the run's first phase "
                 "(kept in the run folder). The base dir's: <base>/tokenizer from `python -m scripts.tok_train`. "
                 "Or any folder holding tokenizer.pkl (nanochat's too)",
}
CHECKPOINT_FIELDS = {"base_checkpoint_dir": ("base", "nanochat", "unknown"), "sft_checkpoint_dir": ("sft", "rl", "nanochat")}


@dataclass
class Plan:
    """What `r` would start: the stage, its config (None while there are problems), the run folder, a
    folder of raw text to import first (or None), and every problem (field -> message)."""
    stage: str
    config: object
    run_dir: str
    import_from: Optional[str]
    problems: dict

    @property
    def ok(self):
        return self.config is not None and not self.problems


class ConfigurePane(Vertical):
    def __init__(self, runs_dir, preset=None, overrides=None, **kwargs):
        super().__init__(**kwargs)
        self._overrides = dict(overrides or {})  # field -> text, applied after the preset (--set)
        self.runs_dir = runs_dir
        self.machine = None  # tui.training_worker.MachineInfo, once the training thread measured it
        self.stage = "base"
        self._preset = preset if preset in PRESETS else None
        self._vocab_cache = {}
        self._help = {}  # widget id -> help text
        self._listed = {}  # checkpoint field -> the options its list shows
        self._validated = None  # the form's values at the last revalidate()
        self.plan = None

    # -- layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="cfg-top"):
            yield Label("Stage", classes="cfg-toplabel")
            yield Select([(STAGES[s][2], s) for s in STAGES], value="base", allow_blank=False, id="cfg-stage", compact=True)
            yield Label("Preset", classes="cfg-toplabel")
            yield Select([(name, name) for name in PRESETS], prompt="(none)", id="cfg-preset", compact=True)
        with Horizontal(id="cfg-body"):
            with VerticalScroll(id="cfg-form"):
                for stage, names in FORM.items():
                    with Grid(id=f"form-{stage}", classes="cfg-stageform"):
                        info = field_info(stage)
                        for name in names:
                            yield from self._row(stage, name, info)
            with VerticalScroll(id="cfg-side"):
                # what the dial derives and whether it fits come first: at 80x24 they are all that shows
                yield Static(id="cfg-derived")
                yield Static(id="cfg-problems")
                yield Static("Tab / Shift-Tab move between settings; each one's meaning shows here. "
                             "Esc leaves a field.", id="cfg-fieldhelp")
                yield Static(id="cfg-command")

    def _row(self, stage, name, info):
        """One line per setting (label, value) in the form's two-column grid; the focused setting's help
        shows in the side panel, and a problem shows under its line. No container per row: a pane switch
        re-renders every visible widget (~0.2 ms each), so the form keeps to two widgets a line."""
        row_id = f"{stage}-{name}"
        self._help[row_id] = info[name][1].replace("%%", "%") if name in info else ROW_HELP.get(name, "")
        yield Label(name.replace("_", " ").replace(" dir", ""), classes="cfg-label")
        if name == "run_name":
            yield Input(placeholder="(a new name)", id=row_id, compact=True)
        elif name == "data":
            yield Select([("demo corpus (bundled)", "demo"), ("ClimbMix shards", "climbmix"),
                          ("a folder of my own text", "folder")], value="demo", allow_blank=False, id=row_id,
                         compact=True)
        elif name == "tokenizer":
            yield Select([("train one on the data", "train"), ("the base dir's", "base"),
                          ("a tokenizer folder", "folder")], value="train", allow_blank=False, id=row_id, compact=True)
        elif name in CHECKPOINT_FIELDS:
            yield Select([], prompt="(choose a checkpoint)", id=row_id, compact=True)
        elif name == "task":
            choices = next(f for f in fields(STAGES[stage][0]) if f.name == name).metadata.get("choices", ())
            yield Select([(c, c) for c in choices], value=info[name][0], allow_blank=False, id=row_id, compact=True)
        else:
            yield Input(value=format_value(info[name][0]), id=row_id, compact=True)
        if name == "data":
            yield from self._sub_row(f"{row_id}-folder", "folder",
                                     Input(placeholder=".parquet shards, or .txt/.md/.jsonl", id=f"{row_id}-folder",
                                           compact=True))
            self._help[f"{row_id}-folder"] = ROW_HELP["data"]
        if name == "tokenizer":
            yield from self._sub_row(f"{row_id}-vocab", "vocab size", Input(value="4096", id=f"{row_id}-vocab", compact=True))
            yield from self._sub_row(f"{row_id}-folder", "folder",
                                     Input(placeholder="folder with tokenizer.pkl", id=f"{row_id}-folder", compact=True))
            self._help[f"{row_id}-vocab"] = self._help[f"{row_id}-folder"] = ROW_HELP["tokenizer"]
        yield Static("", classes="cfg-error", id=f"err-{row_id}")

    @staticmethod
    def _sub_row(widget_id, label, widget):
        """A line that shows only for some choices of the line above (its label is #row-<widget id>)."""
        yield Label("  " + label, classes="cfg-label", id=f"row-{widget_id}")
        yield widget

    def on_mount(self):
        self.refresh_checkpoints()
        self._show_stage("base")
        if self._preset:
            self.apply_preset(self._preset)
        if self._overrides:
            try:
                self.set_values(self._overrides)
            except KeyError as e:
                self.app.notify(f"--set {e.args[0]}", severity="error", timeout=10)
        self.call_after_refresh(self.revalidate)

    # -- public

    def apply_preset(self, name):
        """Fill the form from a preset (fields it does not name go back to their defaults)."""
        preset = dict(PRESETS[name])
        stage = preset.pop("stage")
        self._preset = name
        self._set_stage(stage)
        info = field_info(stage)
        for field_name in FORM[stage]:
            if field_name in info and field_name not in CHECKPOINT_FIELDS and field_name != "task":
                self._input(stage, field_name).value = format_value(preset.get(field_name, info[field_name][0]))
        if stage == "base":
            data = preset.get("data_dir")
            self.query_one("#base-data", Select).value = "demo" if data == "demo" else ("climbmix" if data is None else "folder")
            if data not in (None, "demo"):
                self.query_one("#base-data-folder", Input).value = data
            vocab = preset.get("train_tokenizer", 0)
            self.query_one("#base-tokenizer", Select).value = "train" if vocab else "base"
            if vocab:
                self.query_one("#base-tokenizer-vocab", Input).value = str(vocab)
        self.query_one(f"#{stage}-run_name", Input).value = ""
        preset_select = self.query_one("#cfg-preset", Select)
        if preset_select.value != name:
            preset_select.value = name
        self.revalidate()

    def set_values(self, values):
        """Type values into the current stage's form: {"num_iterations": "600", ...} (the --set option)."""
        for name, text in values.items():
            if name not in FORM[self.stage] or name in CHECKPOINT_FIELDS or name in ("data", "tokenizer", "task"):
                raise KeyError(f"{name}: not a setting of the {STAGES[self.stage][2]} form (one of "
                               f"{', '.join(n for n in FORM[self.stage] if n not in CHECKPOINT_FIELDS)})")
            self._input(self.stage, name).value = str(text)
        self.revalidate()

    def set_machine(self, machine):
        self.machine = machine
        self.revalidate()

    def refresh_checkpoints(self):
        """Refill the checkpoint lists (runs, the base dir's checkpoints, nanochat's)."""
        found = list_checkpoints(self.runs_dir)
        for name, stages in CHECKPOINT_FIELDS.items():
            stage = "sft" if name == "base_checkpoint_dir" else "rl"
            select = self.query_one(f"#{stage}-{name}", Select)
            current = select.value
            options = [(c.label, c.path) for c in found if c.stage in stages]
            if options == self._listed.get(name):
                continue  # unchanged: refilling would re-run the validation and redraw the form for nothing
            self._listed[name] = options
            select.set_options(options)
            if current in {path for _, path in options}:
                select.value = current
            elif options:
                select.value = options[0][1]

    def select_checkpoint(self, stage, path):
        """Preselect a checkpoint (e.g. SFT on the run that just finished)."""
        self._set_stage(stage)
        name = "base_checkpoint_dir" if stage == "sft" else "sft_checkpoint_dir"
        self.refresh_checkpoints()
        select = self.query_one(f"#{stage}-{name}", Select)
        if path in {value for _, value in select._options}:
            select.value = path
        self.revalidate()

    # -- events

    def on_select_changed(self, event: Select.Changed):
        if event.select.id == "cfg-stage" and event.value != self.stage:
            self._show_stage(event.value)
        elif event.select.id == "cfg-preset" and event.value in PRESETS and event.value != self._preset:
            self.apply_preset(event.value)
        self.revalidate()

    def on_input_changed(self, event: Input.Changed):
        self.revalidate()

    def on_descendant_focus(self, event):
        widget_id = getattr(event.widget, "id", None) or getattr(event.widget.parent, "id", None)
        text = self._help.get(widget_id)
        if text is not None:
            label = widget_id.split("-", 1)[1].replace("_", " ").replace("-", " ")
            self.query_one("#cfg-fieldhelp", Static).update(Text.assemble((label, "bold"), ": ", text))

    def _show_sub_rows(self):
        data = self._value("base", "data")
        tok = self._value("base", "tokenizer")
        for widget_id, shown in (("base-data-folder", data == "folder"), ("base-tokenizer-vocab", tok == "train"),
                                 ("base-tokenizer-folder", tok == "folder")):
            self.query_one(f"#row-{widget_id}").display = shown  # the label
            self.query_one(f"#{widget_id}").display = shown

    # -- the form -> a config

    def _set_stage(self, stage):
        select = self.query_one("#cfg-stage", Select)
        if select.value != stage:
            select.value = stage
        self._show_stage(stage)

    def _show_stage(self, stage):
        self.stage = stage
        for s in FORM:
            self.query_one(f"#form-{s}").display = s == stage

    def _input(self, stage, name):
        return self.query_one(f"#{stage}-{name}")

    def _value(self, stage, name):
        widget = self._input(stage, name)
        if isinstance(widget, Select) and widget.is_blank():
            return None
        return widget.value

    def build(self):
        """The form as a Plan (the config the library would get, or the problems that stop it)."""
        stage = self.stage
        info = field_info(stage)
        problems, values = {}, {}
        import_from = None
        for name in FORM[stage]:
            if name in info and name not in CHECKPOINT_FIELDS and name != "task":
                try:
                    values[name] = info[name][2](self._value(stage, name))
                except ValueError as e:
                    problems[name] = str(e)
        if stage == "base":
            data = self._value("base", "data")
            if data == "demo":
                values["data_dir"] = "demo"
            elif data == "folder":
                folder = os.path.expanduser(self.query_one("#base-data-folder", Input).value.strip())
                if not folder:
                    problems["data"] = "choose the folder of your text (or .parquet shards)"
                elif os.path.isdir(folder) and not any(n.endswith(".parquet") for n in os.listdir(folder)):
                    import_from = folder  # raw text: imported into the run folder before training
                else:
                    values["data_dir"] = folder
            tok = self._value("base", "tokenizer")
            if tok == "train":
                try:
                    values["train_tokenizer"] = int(self.query_one("#base-tokenizer-vocab", Input).value)
                except ValueError:
                    problems["tokenizer"] = "the vocab size must be a whole number, e.g. 4096"
            elif tok == "folder":
                folder = self.query_one("#base-tokenizer-folder", Input).value.strip()
                if not folder:
                    problems["tokenizer"] = "choose the folder holding tokenizer.pkl"
                values["tokenizer_dir"] = folder or None
        for name in CHECKPOINT_FIELDS:
            if name in info:
                path = self._value(stage, name)
                if not path:
                    problems[name] = "no checkpoint to start from: train (or copy) one first, then refresh (f5)"
                values[name] = path
        if "task" in info:
            values["task"] = self._value(stage, "task")
        name = self._value(stage, "run_name").strip() or new_run_name(stage, self.runs_dir, self._preset)
        if os.sep in name or name in (".", ".."):
            problems["run_name"] = "a plain folder name, without slashes"
        run_dir = os.path.join(self.runs_dir, name)
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            problems["run_name"] = f"{run_dir} already holds a run: choose another name (resume it from Runs)"
        values["checkpoint_dir"] = run_dir
        config = None
        if not problems:
            cls = STAGES[stage][0]
            if import_from is not None:
                values["data_dir"] = "demo"  # checked as a placeholder; the imported folder replaces it at start
            try:
                config = cls(**values)
                config.validate()
            except ConfigError as e:
                for problem in getattr(e, "problems", [str(e)]):
                    problems[self._row_of(stage, problem)] = problem
                config = None
            except (TypeError, ValueError) as e:
                problems["_"] = str(e)
                config = None
        return Plan(stage, config, run_dir, import_from, problems)

    def _row_of(self, stage, problem):
        m = FLAG_RE.search(problem)
        if m:
            name = m.group(1).replace("-", "_")
            name = FLAG_ROW.get(name, name)
            if name in FORM[stage]:
                return name
        return "_" + problem[:40]

    def revalidate(self):
        if not self.is_mounted:
            return
        values = (self.stage, self.machine, tuple(getattr(w, "value", None) for w in self.query("Input, Select")))
        if values == self._validated:
            return  # nothing changed since the last check (a refilled list, a repeated event)
        self._validated = values
        plan = self.plan = self.build()
        stage = plan.stage
        self._show_sub_rows()
        for name in FORM[stage]:
            error = self.query_one(f"#err-{stage}-{name}", Static)
            error.display = name in plan.problems
            error.update(Text("✗ " + plan.problems[name], style="bold red") if name in plan.problems else "")
        general = [msg for key, msg in plan.problems.items() if key.startswith("_")]
        problems = self.query_one("#cfg-problems", Static)
        if plan.problems:
            text = Text(f"✗ {len(plan.problems)} problem(s): r will not start this run\n", style="bold red")
            for msg in general:
                text.append(f"• {msg}\n", style="red")
            problems.update(text)
        else:
            problems.update(Text("✓ ready: press r to start", style="bold green"))
        self.query_one("#cfg-derived", Static).update(self._derived(plan))
        from tui.presets import command_line
        command = self.query_one("#cfg-command", Static)
        if plan.config is not None:
            text = Text("equivalent command\n", style="bold")
            if plan.import_from:
                text.append(f"python -m mlxchat.dataset import {plan.import_from} --out {plan.run_dir}/data\n", style="dim")
            text.append(command_line(stage, plan.config), style="cyan")
            command.update(text)
        else:
            command.update("")

    # -- what the depth dial derives, memory and time

    def _vocab(self, plan):
        cfg = plan.config
        if cfg is None:
            return None
        if getattr(cfg, "train_tokenizer", 0):
            return cfg.train_tokenizer
        from mlxchat.common import get_base_dir
        folder = getattr(cfg, "tokenizer_dir", None) or os.path.join(get_base_dir(), "tokenizer")
        path = os.path.join(os.path.expanduser(folder), "tokenizer.pkl")
        try:
            key = (path, os.path.getmtime(path))
        except OSError:
            return None
        if key not in self._vocab_cache:
            from mlxchat.tokenizer import load_encoding  # the pickled tiktoken Encoding: no model, no MLX
            try:
                self._vocab_cache[key] = load_encoding(path).n_vocab
            except Exception:  # noqa: BLE001  (a broken file: the run's own check names it)
                self._vocab_cache[key] = None
        return self._vocab_cache[key]

    def _derived(self, plan):
        text = Text()
        cfg = plan.config
        if plan.stage != "base":
            return self._derived_finetune(plan)
        if cfg is None:
            return Text("fix the problems to see what this run derives", style="dim")
        from mlxchat.pretrain import derive_hyperparameters
        from mlxchat.training import estimate_training_memory
        vocab = self._vocab(plan) or 32768
        model = cfg.model_config(vocab)
        hp = derive_hyperparameters(cfg, vocab)
        params = model.param_counts()
        steps, tps = hp["num_iterations"], hp["total_batch_size"]
        s = hp["batch_lr_scale"]
        text.append(f"depth {cfg.depth}", style="bold")
        text.append(f" → width {model.n_embd}, {model.n_head} heads of {cfg.head_dim}, context {cfg.max_seq_len}\n")
        text.append(f"parameters {count(params['total'])}  (scaling {count(hp['num_scaling_params'])}), vocab {vocab:,}\n")
        batch = cfg.device_batch_size
        rows = f"{batch} × {cfg.max_seq_len}" if batch != "auto" else f"auto × {cfg.max_seq_len}"
        text.append(f"tokens/step {tps:,} ({rows} per micro-batch)\n")
        text.append(f"steps {steps:,}  = {count(steps * tps)} tokens, {steps * tps / max(hp['num_scaling_params'], 1):.1f}"
                    " tokens per parameter\n")
        text.append(f"lr matrix {cfg.matrix_lr * s:.4g} · embedding {cfg.embedding_lr * s:.3g} · unembedding "
                    f"{cfg.unembedding_lr * s:.3g}  (batch scale {s:.3f})\n")
        total_flops = hp["flops_per_token"] * tps * steps
        text.append(f"FLOPs {total_flops:.2e}  ({hp['flops_per_token']:.2e} per token)\n")
        machine = self.machine
        dtype_bytes = 4 if machine is None or machine.backend == "cpu" else 2
        need = estimate_training_memory(model, 1 if batch == "auto" else batch, dtype_bytes, bool(cfg.grad_checkpoint))
        if machine is None or not machine.memory_bytes:
            text.append(f"memory ≥ {need / 2**30:.2f} GiB (measuring this machine…)\n")
        else:
            have = machine.memory_bytes
            style = "red bold" if need > have else ("yellow" if need > 0.75 * have else "green")
            verdict = ("will NOT fit: lower depth, context or device batch, or grad checkpoint 1" if need > have else
                       "tight: may swap" if need > 0.75 * have else "fits")
            text.append(f"memory ≥ {need / 2**30:.2f} GiB of {have / 2**30:.0f} GiB: ", style=None)
            text.append(verdict + "\n", style=style)
        if machine is not None:
            # a rough figure: a GPU's training step reaches ~20% of its peak (nanochat-sized models on an H100:
            # 9-24%, docs/performance.md); on a CPU the demo model trained at ~1.1x the 512x512 matmul probe's
            # rate (2-core x86, OpenBLAS), so the probe's rate is the estimate there
            rate = 0.2 * machine.peak_flops if machine.peak_flops else machine.flops_per_sec
            text.append(f"time ≈ {duration(total_flops / rate)} on this {machine.device} (rough estimate)\n")
        return text

    def _derived_finetune(self, plan):
        name = "base_checkpoint_dir" if plan.stage == "sft" else "sft_checkpoint_dir"
        path = self._value(plan.stage, name)
        if not path:
            return Text("choose the checkpoint to start from", style="dim")
        from mlxchat.checkpoint_manager import find_steps
        import json
        steps = find_steps(path)
        if not steps:
            return Text(f"{path}: no complete checkpoint", style="red")
        text = Text()
        try:
            with open(os.path.join(path, f"meta_{steps[-1]:06d}.json")) as f:
                meta = json.load(f)
            mc = meta.get("model_config", {})
            text.append(f"from {os.path.basename(path)} step {steps[-1]}\n", style="bold")
            text.append(f"{mc.get('n_layer')} layers, width {mc.get('n_embd')}, context {mc.get('sequence_len')}, "
                        f"vocab {mc.get('vocab_size'):,}\n")
        except (OSError, ValueError, TypeError):
            text.append(f"from {path} step {steps[-1]}\n")
        text.append("batch, context and learning rates default to the base run's\n", style="dim")
        return text

