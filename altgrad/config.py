"""Experiment configuration: one YAML file (plus ``key=value`` overrides) describes a whole run.

An experiment has five sections::

    model:         # GPTConfig fields except vocab_size (taken from the tokenizer)
      n_layer: 4
      n_head: 4
      n_embd: 128
      block_size: 64
      dropout: 0.0
      bias: false
    data:          # altgrad.data.DataConfig fields
      source: shakespeare_char
      tokenizer: char
    quantization:  # a QuantRecipe (preset name or dict) and how often to run the FP32 shadow
      recipe: e5m2             # or {preset: e5m2, exclude: ["*.c_proj"]} or a full recipe dict
      shadow_every: 1          # null: no shadow (no grad_cos_sim metrics)
      whatif:                  # optional: other formats scored on this run's tensors/steps (training unchanged)
        alternatives: [E3M4, {format: E2M1, granularity: block, block_size: 32, scaling: current, scale_format: E8M0}]
        grad_every: 50         # replay every 50th step under other recipes, scored against the FP32 shadow
        grad_swap_roles: [grad_output]   # ... the run's recipe with grad_output in each alternative
    training:      # transformers.TrainingArguments fields, plus altgrad keys (see TrainingSection)
      output_dir: out/cpu_shakespeare_char
      max_steps: 2000
      learning_rate: 1.0e-3    # write 1.0e-3, not 1e-3: PyYAML reads the latter as a string
      min_lr: 1.0e-4
    monitoring:    # altgrad.monitoring.MonitoringConfig fields
      overflow_threshold: 0.01

Everything is validated before any work starts: unknown keys (at any level) fail naming the closest
valid keys (and all of them, for the small sections), values are converted to the dataclass field
types by ``transformers.HfArgumentParser`` (see "typed values" below), and impossible combinations
(``n_embd % n_head != 0``, an unknown recipe preset, ...) fail with a one-line ``ValueError``.

Example:
    >>> cfg = load_config(None, ["model.n_layer=2", "training.max_steps=200"])
    >>> cfg.model.n_layer, cfg.training.max_steps
    (2, 200)
    >>> load_config(None, ["model.n_layers=2"])
    Traceback (most recent call last):
    ...
    ValueError: unknown key 'model.n_layers' (did you mean 'n_layer'?); valid keys in 'model' are: n_layer, n_head, n_embd, block_size, dropout, bias
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from transformers import HfArgumentParser

from altgrad.data import DataConfig
from altgrad.monitoring.config import MonitoringConfig
from altgrad.training.recipe import QuantRecipe
from altgrad.training.whatif import WhatIfConfig

__all__ = [
    "ExperimentConfig",
    "ModelSection",
    "QuantizationSection",
    "TrainingSection",
    "load_config",
    "parse_overrides",
    "CONFIG_FILENAME",
]

#: Name of the resolved config written into every run's output_dir (read back by recipes/compare.py).
CONFIG_FILENAME = "experiment_config.yaml"


# --------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """The GPT's shape. ``vocab_size`` is not here: it comes from the tokenizer the data step builds."""

    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    # Context length; also the length of every training/eval sample.
    block_size: int = 256
    dropout: float = 0.0
    # nanoGPT's train.py default (False): fewer tiny tensors for the low-precision formats to handle.
    bias: bool = False

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head} "
                "(each head gets n_embd / n_head channels)"
            )
        if self.block_size < 2:
            raise ValueError(f"model.block_size={self.block_size} must be >= 2 (a block of T tokens gives T-1 targets)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class QuantizationSection:
    """Which low-precision recipe to simulate, and how often to compare against the FP32 shadow."""

    # A preset name (fp32 or none, bf16, e5m2, fp8_hybrid, mxfp8, e3m4, e2m5, e1m6, e7m0), a full recipe
    # dict, or {preset: NAME, ...overrides}; anything QuantRecipe.from_dict accepts. "fp32" quantizes
    # nothing; "bf16" rounds the GEMM operands to BF16 (it meant "nothing" until altgrad 0.1).
    recipe: Union[str, dict] = "fp32"
    # Run the FP32 shadow backward every N optimizer steps (grad_cos_sim/* metrics); null = never.
    # Every step is the most faithful and costs roughly one extra forward/backward.
    shadow_every: Union[int, None] = 1
    # What-if (altgrad.training.whatif.WhatIfConfig): {alternatives: [...], grad_every: N, grad_recipes: [...],
    # grad_swap_roles: [...]}; null = none. Scores other formats on this run without changing it.
    whatif: Union[dict, None] = None

    def validate(self) -> QuantRecipe:
        try:
            recipe = QuantRecipe.from_dict(self.recipe)
        except (ValueError, TypeError) as e:
            raise ValueError(f"quantization.recipe: {e}") from None
        if self.shadow_every is not None and self.shadow_every < 1:
            raise ValueError(f"quantization.shadow_every={self.shadow_every} must be >= 1 or null (no shadow)")
        if self.whatif is not None:
            whatif = WhatIfConfig.from_dict(self.whatif)
            whatif.grad_recipes_for(recipe)  # recipe errors now, not at the first what-if step
        return recipe


@dataclass
class TrainingSection:
    """The most used ``TrainingArguments``, with altgrad's defaults (nanoGPT-like), plus altgrad keys.

    Any other ``TrainingArguments`` field may also appear in the YAML ``training`` section; it is
    type-checked against ``TrainingArguments`` and kept in ``extra``.
    """

    output_dir: str = "out/run"
    max_steps: int = 5000
    per_device_train_batch_size: int = 12
    # null: same as the train batch size.
    per_device_eval_batch_size: Union[int, None] = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 6.0e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 100
    # nanoGPT's schedule: linear warmup, cosine decay to min_lr at max_steps.
    lr_scheduler_type: str = "cosine_with_min_lr"
    # altgrad key: floor of the cosine schedule (lr_scheduler_kwargs.min_lr); only for cosine_with_min_lr.
    min_lr: Union[float, None] = 6.0e-5
    max_grad_norm: float = 1.0
    # Evaluate (and checkpoint, see save_steps) every eval_steps optimizer steps; a final evaluation
    # always runs after training.
    eval_steps: int = 250
    # null: same as eval_steps, so every checkpoint has a matching val loss.
    save_steps: Union[int, None] = None
    save_total_limit: Union[int, None] = 2
    logging_steps: int = 10
    seed: int = 1337
    # "none", "wandb", "tensorboard", ... or a list; with wandb the full resolved config is uploaded.
    # (list[str], not list: HfArgumentParser reads the item type of a list field.)
    report_to: Union[str, list[str]] = "none"
    # null: the output_dir's name.
    run_name: Union[str, None] = None
    dataloader_num_workers: int = 0
    # Train on the CPU even when a GPU is present.
    use_cpu: bool = False
    # Autocast to bf16. Off by default: the quantization recipe decides the simulated precision, and
    # autocast would silently add a second rounding that the FP32 shadow does not see.
    bf16: bool = False
    # altgrad key: a checkpoint folder, or true for the latest checkpoint in output_dir.
    resume_from_checkpoint: Union[str, bool, None] = None
    # altgrad keys for W&B: project (WANDB_PROJECT) and run tags.
    project: str = "altgrad"
    tags: list[str] = field(default_factory=list)
    # altgrad key: torch threads per process when training on the CPU. null: what the user gave the
    # launcher (--num_cpu_threads_per_process, OMP_NUM_THREADS), else the cores divided among the local
    # processes (accelerate's own default, one thread, leaves cores idle). See altgrad/cpu_threads.py.
    cpu_threads: Union[int, None] = None
    # Other TrainingArguments fields given in the YAML (validated against TrainingArguments).
    extra: dict = field(default_factory=dict)

    #: Keys that are not TrainingArguments fields (consumed by altgrad itself).
    ALTGRAD_KEYS: typing.ClassVar[tuple[str, ...]] = ("min_lr", "resume_from_checkpoint", "project", "tags", "cpu_threads")
    #: TrainingArguments fields altgrad sets itself; a user value would be silently overridden or break the run.
    RESERVED: typing.ClassVar[tuple[str, ...]] = ("eval_strategy", "save_strategy", "logging_strategy", "do_train", "do_eval")

    def validate(self) -> None:
        positive = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "eval_steps", "logging_steps")
        for name in positive + ("per_device_eval_batch_size", "save_steps", "save_total_limit", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"training.{name}={value} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"training.warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})"
            )
        if self.min_lr is not None:
            if self.lr_scheduler_type != "cosine_with_min_lr":
                raise ValueError(
                    f"training.min_lr only applies to lr_scheduler_type 'cosine_with_min_lr', not "
                    f"{self.lr_scheduler_type!r}; set training.min_lr=null"
                )
            if not 0.0 <= self.min_lr <= self.learning_rate:
                raise ValueError(f"training.min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if self.extra.get("load_best_model_at_end") and self.eval_steps > self.max_steps:
            raise ValueError("training.load_best_model_at_end needs an evaluation during training (eval_steps <= max_steps)")

    def to_dict(self) -> dict[str, Any]:
        """Flat dict as in the YAML: the fields above, then the extra TrainingArguments fields."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass
class ExperimentConfig:
    """A whole experiment. Build it with :func:`load_config`; all sections are validated there."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)

    @property
    def recipe(self) -> QuantRecipe:
        return QuantRecipe.from_dict(self.quantization.recipe)

    def gpt_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``GPTConfig`` (add ``vocab_size``)."""
        return dataclasses.asdict(self.model)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (every default filled in, the recipe expanded) as plain YAML data.

        ``load_config`` of a YAML dump of this dict gives the same experiment back.
        """
        recipe = self.recipe.to_dict()
        recipe.pop("description", None)  # documentation of the preset, not a setting
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "quantization": {"recipe": recipe, "shadow_every": self.quantization.shadow_every,
                             **({} if self.quantization.whatif is None
                                else {"whatif": WhatIfConfig.from_dict(self.quantization.whatif).to_dict()})},
            "training": self.training.to_dict(),
            "monitoring": self.monitoring.to_dict(),
        }

    def save(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the resolved config to ``<output_dir>/experiment_config.yaml`` and return the path."""
        out = Path(output_dir or self.training.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / CONFIG_FILENAME
        path.write_text(
            "# Resolved altgrad experiment config (all defaults filled in). Re-run with:\n"
            f"#   accelerate launch recipes/train.py --config {path}\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        return path

    def training_arguments(self, **overrides: Any):
        """``transformers.TrainingArguments`` for this experiment.

        Evaluation, checkpointing and logging all run on optimizer-step schedules ("steps");
        ``min_lr`` becomes ``lr_scheduler_kwargs={"min_lr": ...}``. TrainingArguments' own
        validation errors are re-raised as ``ValueError`` naming the training section.

        Example:
            >>> args = load_config(None, ["training.use_cpu=true"]).training_arguments()
            >>> args.eval_strategy.value, args.lr_scheduler_kwargs
            ('steps', {'min_lr': 6e-05})
        """
        from transformers import TrainingArguments

        t = self.training
        kwargs: dict[str, Any] = {
            name: value for name, value in t.to_dict().items() if name not in TrainingSection.ALTGRAD_KEYS
        }
        kwargs["per_device_eval_batch_size"] = t.per_device_eval_batch_size or t.per_device_train_batch_size
        kwargs["save_steps"] = t.save_steps or t.eval_steps
        kwargs["run_name"] = t.run_name or Path(t.output_dir).name
        kwargs.update(eval_strategy="steps", save_strategy="steps", logging_strategy="steps")
        if t.min_lr is not None:
            kwargs["lr_scheduler_kwargs"] = {**(kwargs.get("lr_scheduler_kwargs") or {}), "min_lr": t.min_lr}
        kwargs.update(overrides)
        try:
            return TrainingArguments(**kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"training: {e}") from None


# --------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read ``path`` (YAML; None = all defaults), apply dotted ``key=value`` overrides, validate.

    Override values are parsed as YAML (``training.report_to=[wandb]`` is a list, ``null`` is None);
    an override may add a key the file lacks, but only if it is a valid key.

    Raises:
        ValueError: unreadable file, unknown key, wrong type or impossible combination. The message
            is one line naming the offending key (plus the valid keys for unknown ones).

    Example:
        >>> cfg = load_config("recipes/configs/cpu_shakespeare_char.yaml",
        ...                   ["training.max_steps=100", "quantization.recipe=e5m2"])  # doctest: +SKIP
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read config {str(path)!r}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    return from_dict(raw)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["training.max_steps=10"]`` -> ``[("training.max_steps", 10)]`` (values parsed as YAML).

    Example:
        >>> parse_overrides(["training.report_to=[wandb]", "model.bias=false", "training.learning_rate=1e-3"])
        [('training.report_to', ['wandb']), ('model.bias', False), ('training.learning_rate', '1e-3')]
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. training.max_steps=100)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value  # not YAML (e.g. an unbalanced bracket): keep the literal string
        out.append((key, parsed))
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts == ["quantization"] and isinstance(value, str):
        # `quantization=e5m2` picks the recipe and keeps the section's other keys (shadow_every, ...)
        section = raw.get("quantization")
        section = dict(section) if isinstance(section, Mapping) else {}
        section["recipe"] = value
        raw["quantization"] = section
        return
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and parts[: i + 1] == ["quantization"]:
            child = {"recipe": child}  # the `quantization: e5m2` shorthand, now getting more keys
        elif isinstance(child, str) and parts[: i + 1] == ["quantization", "recipe"]:
            # `quantization.recipe.exclude=[...]` on top of a preset name: edit the preset.
            child = {"preset": child}
        elif child is None:
            child = {"preset": "fp32"} if parts[: i + 1] == ["quantization", "recipe"] else {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is {child!r}, not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


SECTIONS = ("model", "data", "quantization", "training", "monitoring")


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (a loaded YAML file) into an :class:`ExperimentConfig`."""
    _reject_unknown(raw, SECTIONS, "the top level")
    sections = {}
    for name in SECTIONS:
        value = raw.get(name)
        if value is None:
            value = {}
        if name == "quantization" and isinstance(value, str):
            value = {"recipe": value}  # shorthand: `quantization: e5m2`
        if not isinstance(value, Mapping):
            raise ValueError(f"section {name!r} must be a mapping of keys to values, got {value!r}")
        sections[name] = dict(value)

    model = ModelSection(**_typed(ModelSection, sections["model"], "model"))
    model.validate()

    data_kwargs = _typed(DataConfig, sections["data"], "data")
    data = DataConfig(**data_kwargs)  # DataConfig validates its own combinations

    quant = QuantizationSection(**_typed(QuantizationSection, sections["quantization"], "quantization"))
    quant.validate()

    training = _training_section(sections["training"])
    training.validate()

    monitoring_raw = sections["monitoring"]
    _reject_unknown(monitoring_raw, MonitoringConfig.field_names(), "monitoring")
    try:
        monitoring = MonitoringConfig.from_dict(monitoring_raw)
    except ValueError as e:
        raise ValueError("monitoring: " + "; ".join(line.strip(" -") for line in str(e).splitlines()[1:] or [str(e)])) from None

    cfg = ExperimentConfig(model=model, data=data, quantization=quant, training=training, monitoring=monitoring)
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: ExperimentConfig) -> None:
    """Checks across sections."""
    if cfg.training.use_cpu and cfg.recipe.backend == "native_fp8":
        raise ValueError("quantization.recipe.backend='native_fp8' needs a Hopper GPU; it cannot run with training.use_cpu=true")


def _training_section(values: dict[str, Any]) -> TrainingSection:
    from transformers import TrainingArguments

    own = [f.name for f in dataclasses.fields(TrainingSection) if f.name != "extra"]
    ta = _parser(TrainingArguments)
    if any(k not in own and k not in ta.fields for k in values):
        _reject_unknown(values, sorted({*own, *ta.fields}), "training")
    reserved = [k for k in values if k in TrainingSection.RESERVED]
    if reserved:
        raise ValueError(
            f"training.{reserved[0]} is set by altgrad (evaluation, checkpoints and logs run every "
            "eval_steps/save_steps/logging_steps optimizer steps); remove it"
        )
    ours = _typed(TrainingSection, {k: v for k, v in values.items() if k in own}, "training")
    # The other keys are TrainingArguments fields, converted by HfArgumentParser(TrainingArguments).
    extra = {k: _convert(ta, k, v, f"training.{k}") for k, v in values.items() if k not in own}
    return TrainingSection(**ours, extra=extra)


#: What a section accepts, for unknown-key messages whose full list of valid keys would be too long to
#: read (TrainingArguments alone has over a hundred fields).
_SECTION_SUMMARY = {
    "training": "training accepts any transformers.TrainingArguments field plus "
    + ", ".join(TrainingSection.ALTGRAD_KEYS),
    "monitoring": "monitoring accepts the altgrad.monitoring.MonitoringConfig fields (see altgrad/monitoring/config.py)",
    "data": "data accepts the altgrad.data.DataConfig fields (see altgrad/data/config.py)",
}
#: Longest unknown-key message that still lists every valid key; longer ones name the closest keys instead.
_MAX_KEY_MESSAGE = 300


def _reject_unknown(values: Mapping[str, Any], valid: typing.Iterable[str], where: str) -> None:
    """ValueError naming the first key of ``values`` not in ``valid``, the closest valid keys, and the
    full list of valid keys when that keeps the message short (one readable line)."""
    valid = list(valid)
    for key in values:
        if key not in valid:
            dotted = key if where == "the top level" else f"{where}.{key}"
            scope = "at the top level" if where == "the top level" else f"in {where!r}"
            close = [repr(c) for c in difflib.get_close_matches(str(key), valid, n=3)]
            hint = ""
            if close:
                hint = f" (did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?)"
            message = f"unknown key {dotted!r}{hint}; valid keys {scope} are: {', '.join(valid)}"
            if len(message) > _MAX_KEY_MESSAGE:
                summary = _SECTION_SUMMARY.get(where, f"see the {where!r} section in altgrad/config.py for its keys")
                message = f"unknown key {dotted!r}{hint}; {summary}"
            raise ValueError(message)


# ---------------------------------------------------------------------------------- typed values
# Values are converted by transformers.HfArgumentParser: it maps each dataclass field's annotation to an
# argparse converter (int, float, string_to_bool, the choices of a Literal/Enum, nargs="+" for list[X]), and
# argparse converts the value's text and rejects what does not fit ("many" for an int, 2.5 for an int,
# "maybe" for a bool, an unknown choice). HfArgumentParser.parse_dict would not do: it only calls
# cls(**values), converting and checking nothing. A YAML value is already typed, so what is hand-written
# below is only what argparse cannot take: null and mappings (no command-line text), a list for a field that
# takes one value or the reverse, and Union[str, X] fields, which HfArgumentParser parses as X only (its rule
# for command-line flags). Those values are kept as they are when the annotation names their type.
# MonitoringConfig is not parsed here: its from_dict checks its own Mapping/tuple fields, which argparse
# cannot express.


class _FieldParser(HfArgumentParser):
    """``HfArgumentParser`` over one dataclass, converting one YAML value at a time (see :func:`_convert`).

    Unlike a command-line parser it never prints usage or calls ``sys.exit`` (errors raise
    ``argparse.ArgumentError``) and takes no abbreviations. Its defaults are None: the dataclass has the
    real ones, and argparse would otherwise convert every string default on every parse.
    """

    def __init__(self, cls: type) -> None:
        self.fields: dict[str, argparse.Action] = {}  # field name -> its argparse action
        annotations = [(f, f.type) for f in dataclasses.fields(cls)]
        super().__init__(cls, add_help=False, allow_abbrev=False, exit_on_error=False)
        for f, annotation in annotations:  # HfArgumentParser rewrites Field.type in place; leave cls as it was
            f.type = annotation
        self.set_defaults(**dict.fromkeys(self.fields))
        self.hints = typing.get_type_hints(cls)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.fields.setdefault(action.dest, action)  # not the --no_<field> twin of a bool field
        return action

    def error(self, message: str) -> typing.NoReturn:
        raise argparse.ArgumentError(None, message)

    def exit(self, status: int = 0, message: str | None = None) -> typing.NoReturn:
        raise argparse.ArgumentError(None, message or f"exit status {status}")


@functools.lru_cache(maxsize=None)
def _parser(cls: type) -> _FieldParser:
    return _FieldParser(cls)


def _typed(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown keys and convert each value to its field's type (see :func:`_convert`)."""
    parser = _parser(cls)
    _reject_unknown(values, [name for name in parser.fields if name != "extra"], where)
    return {k: _convert(parser, k, v, f"{where}.{k}") for k, v in values.items()}


def _convert(parser: _FieldParser, key: str, value: Any, where: str) -> Any:
    """``value`` converted by ``parser`` to the type of field ``key``; else a one-line ValueError naming ``where``.

    Example:
        >>> _convert(_parser(ModelSection), "dropout", "1e-1", "model.dropout")
        0.1
        >>> _convert(_parser(ModelSection), "n_layer", "1e3", "model.n_layer")
        Traceback (most recent call last):
        ...
        ValueError: model.n_layer='1e3' has the wrong type: expected an integer (PyYAML reads 1e-3 as a string; write 1.0e-3)
    """
    action, tp = parser.fields[key], parser.hints[key]
    many = action.nargs in ("+", "*")
    # argparse parses text: one token for a one-value field, one per item for a list field. null and
    # mappings have none, and a YAML boolean is no text for a string field (`hf_config: no` reads as false).
    if (value is not None and not isinstance(value, Mapping) and isinstance(value, (list, tuple)) == many
            and (value or not many) and not (isinstance(value, bool) and action.type is str)):
        argv = [f"--{key}", *map(_text, value)] if many else [f"--{key}={_text(value)}"]
        try:
            parsed, rest = parser.parse_known_args(argv)
            if not rest:
                got = getattr(parsed, key)
                # list[Enum] items come back as members; keep the plain values (YAML-dumpable).
                return [item.value if isinstance(item, enum.Enum) else item for item in got] if many else got
        except argparse.ArgumentError:
            pass
        # Rejected. A Union[str, X] field was parsed as X; a scalar may still be the str (or bool) it names.
        if not many and typing.get_origin(tp) in (Union, types.UnionType) and _fits(value, tp):
            return value
    elif _fits(value, tp):
        return value
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (PyYAML reads 1e-3 as a string; write 1.0e-3)"
        except ValueError:
            pass
    if action.choices:
        raise ValueError(f"{where}={value!r} is not valid: expected one of {', '.join(map(repr, action.choices))}")
    raise ValueError(f"{where}={value!r} has the wrong type: expected {_describe(tp)}{hint}")


def _text(value: Any) -> str:
    """A YAML scalar as the command-line text argparse converts. A whole float is written as an integer, so
    ``max_steps: 2.0e+3`` (PyYAML's float 2000.0; it reads ``2e3`` as a string) is accepted as 2000."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` already has a type the annotation names: null, a mapping or a list (no command-line
    form), or a str/bool in a Union that HfArgumentParser parses as another type. Items are not checked; the
    consumer (QuantRecipe.from_dict, TrainingArguments) validates what is inside."""
    for member in typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,):
        origin = typing.get_origin(member) or member
        if member is Any or type(value) is origin or (
            origin is Literal and any(type(value) is type(a) and value == a for a in typing.get_args(member))
        ):
            return True
        if origin in (list, tuple, Sequence) and isinstance(value, (list, tuple)):
            return True
        if origin in (dict, Mapping) and isinstance(value, Mapping):
            return True
    return False


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
                "list": "a list", "dict": "a mapping", "tuple": "a list"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return _describe(origin) if isinstance(origin, type) else str(tp)
