"""Stability-monitoring configuration: alert levels, thresholds, and the rules derived from them.

Everything here is plain data so a run's YAML config can carry it verbatim::

    monitoring:
      overflow_threshold: 0.02
      loss_spike_factor: null        # null/None disables a rule
      levels: {loss_spike: error}    # partial; unspecified rules keep their defaults
      anomaly_checkpoint_on: [loss_spike]

``MonitoringConfig.from_dict(yaml.safe_load(...)["monitoring"])`` validates it and fails with a
ValueError that names the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Mapping

from .metrics import (
    COS_SIM_MEAN,
    COS_SIM_MIN,
    DEFAULT_THRESHOLDS,
    OVERFLOW_RATE,
    STORED_WEIGHT_BIT_STALL_RATE,
    UNDERFLOW_RATE,
)

__all__ = [
    "AlertLevel",
    "MonitoringConfig",
    "SpikeRule",
    "ThresholdRule",
    "RULE_NAMES",
    "THRESHOLD_RULE_NAMES",
    "NONFINITE_RULE_NAMES",
]


class AlertLevel(str, Enum):
    """Severity of an alert; member names match ``wandb.AlertLevel`` (INFO/WARN/ERROR).

    Values are lower-case so they read naturally in YAML and in ``alerts.jsonl``.

    Example:
        >>> AlertLevel.parse("WARN") is AlertLevel.WARN
        True
        >>> AlertLevel.ERROR.value
        'error'
    """

    INFO = "info"
    WARN = "warn"
    ERROR = "error"

    @classmethod
    def parse(cls, value: "str | AlertLevel", *, what: str = "level") -> "AlertLevel":
        """Case-insensitive lookup; also accepts ``"warning"`` because Python's logging spells it so."""
        if isinstance(value, AlertLevel):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            if key == "warning":
                key = "warn"
            for member in cls:
                if member.value == key:
                    return member
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{what}: unknown alert level {value!r}; valid levels are {valid} (case-insensitive)")

    @property
    def logging_level(self) -> int:
        """The matching ``logging`` level (WARN -> logging.WARNING)."""
        import logging

        return {AlertLevel.INFO: logging.INFO, AlertLevel.WARN: logging.WARNING, AlertLevel.ERROR: logging.ERROR}[self]

    def to_wandb(self) -> Any:
        """The matching ``wandb.AlertLevel`` member (imports wandb lazily)."""
        import wandb

        return wandb.AlertLevel[self.name]


# Rules evaluated by AlertManager.check() on the logs dict the trainer emits.
THRESHOLD_RULE_NAMES = ("bit_stall", "overflow", "underflow", "grad_cos_sim")
SPIKE_RULE_NAMES = ("loss_spike", "grad_norm_spike")
# Rules raised by the trainer itself through AlertManager.raise_alert()/alert(); check() never fires them.
NONFINITE_RULE_NAMES = ("nonfinite_loss", "nonfinite_grad")
RULE_NAMES = THRESHOLD_RULE_NAMES + SPIKE_RULE_NAMES + NONFINITE_RULE_NAMES

DEFAULT_LEVELS: dict[str, str] = {
    "bit_stall": "warn",
    "overflow": "warn",
    "underflow": "warn",
    "grad_cos_sim": "warn",
    "loss_spike": "warn",
    "grad_norm_spike": "warn",
    "nonfinite_loss": "error",
    "nonfinite_grad": "error",
}

COS_SIM_KEYS = (COS_SIM_MIN, COS_SIM_MEAN)


@dataclass(frozen=True)
class ThresholdRule:
    """Fires when ``logs[metric]`` is strictly above (or below) ``threshold``.

    Example:
        >>> r = ThresholdRule("overflow", "quantization/overflow_rate", 0.01, "above", AlertLevel.WARN, "Overflow")
        >>> r.breached(0.02), r.breached(0.01)
        (True, False)
    """

    name: str
    metric: str
    threshold: float
    direction: Literal["above", "below"]
    level: AlertLevel
    title: str

    def breached(self, value: float) -> bool:
        """Strict comparison, so a value exactly at the threshold is fine. NaN never breaches."""
        return value > self.threshold if self.direction == "above" else value < self.threshold


@dataclass(frozen=True)
class SpikeRule:
    """Fires when ``logs[metric]`` exceeds ``factor`` x the median of the previous ``window`` finite values.

    The median (not the mean) is the baseline so one earlier spike does not inflate it and mask the
    next one. The rule stays silent until ``min_history`` values have been seen.

    Example:
        >>> r = SpikeRule("loss_spike", "loss", 3.0, 50, 10, AlertLevel.WARN, "Loss spike")
        >>> r.breached(value=7.0, median=2.0), r.breached(value=5.0, median=2.0)
        (True, False)
    """

    name: str
    metric: str
    factor: float
    window: int
    min_history: int
    level: AlertLevel
    title: str

    def breached(self, value: float, median: float) -> bool:
        # A non-positive median has no meaningful "k times" (loss and grad norm are >= 0), so skip.
        return median > 0 and value > self.factor * median


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _yaml_hint(v: Any) -> str:
    # PyYAML (YAML 1.1) reads `1e-2` as the *string* "1e-2"; say so instead of a bare type error.
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return ""
        return " (a string: PyYAML reads exponents without a dot, e.g. 1e-2, as strings; write 1.0e-2)"
    return ""


@dataclass(frozen=True)
class MonitoringConfig:
    """Thresholds and policy for stability alerts. Set any rule's threshold to ``None`` to disable it.

    Example:
        >>> cfg = MonitoringConfig.from_dict({"overflow_threshold": 0.02, "loss_spike_factor": None})
        >>> [r.name for r in cfg.rules()]
        ['bit_stall', 'overflow', 'underflow', 'grad_cos_sim', 'grad_norm_spike']
        >>> cfg.level_for("nonfinite_loss")
        <AlertLevel.ERROR: 'error'>
    """

    # Master switch: False turns AlertManager into a no-op (no checks, no sinks, no anomaly requests).
    enabled: bool = True

    # --- quantization health (rates in [0, 1], one value per logging step) ---
    # Fraction of weight updates lost to rounding, for weights *stored* in the format (a recipe's
    # `stored_weight`): ~0.5 means half the optimizer's work is rounded away for good. The forward copy of
    # float32 master weights stalls 70-90% of updates harmlessly (the master keeps them), so that rate is
    # logged (quantization/bit_stall_rate) and never alerted on.
    bit_stall_threshold: float | None = DEFAULT_THRESHOLDS["bit_stall"]
    # Fraction of values clipped at the format's max. Overflow silently destroys the largest (often most
    # important) values, so the bar is low; 0.01 still tolerates the occasional outlier token.
    overflow_threshold: float | None = DEFAULT_THRESHOLDS["overflow"]
    # Fraction of non-zero values flushed to zero. Underflow of tiny gradients is common and often
    # harmless, hence the looser 0.1; tighten it when studying formats with little dynamic range.
    underflow_threshold: float | None = DEFAULT_THRESHOLDS["underflow"]

    # --- gradient fidelity vs the FP32 shadow ---
    # Floor on cosine similarity between quantized and FP32-shadow gradients (in [-1, 1]). 0.9 is
    # "still pointing the same way"; below that the optimizer follows a materially different direction.
    cos_sim_floor: float | None = DEFAULT_THRESHOLDS["cos_sim_floor"]
    # Which aggregate the floor applies to. "grad_cos_sim/min" (default) catches a single layer going
    # bad, which the mean hides behind dozens of healthy layers, at the cost of more alerts from one
    # noisy small layer (e.g. biases); "grad_cos_sim/mean" is the quieter whole-model view.
    cos_sim_metric: str = "grad_cos_sim/min"

    # --- spikes relative to recent history ---
    # Alert when loss > factor x running median of the last `loss_spike_window` logged losses. 3x is
    # a clear break from trend; 1.5-2x catches milder instabilities but also ordinary early-training noise.
    loss_spike_factor: float | None = 3.0
    # Longer windows give a steadier baseline but adapt slower while loss is still falling fast.
    loss_spike_window: int = 50
    # Same idea for grad_norm; gradient norms are burstier than loss, hence the larger default factor.
    grad_norm_spike_factor: float | None = 10.0
    grad_norm_spike_window: int = 50
    # Spike rules stay silent until this many finite values are in the window: a median of 2-3 values
    # is mostly warm-up noise. Must not exceed either window.
    spike_min_history: int = 10

    # --- rate limiting ---
    # A rule that fired at step s stays quiet until step s + cooldown_steps (in optimizer steps). Larger
    # values mean fewer repeated alerts for one persistent condition, but a relapse is noticed later.
    cooldown_steps: int = 100
    # Cooldown for the trainer-raised nonfinite_loss / nonfinite_grad alerts. These are rare and each one
    # matters, so it is shorter; it still collapses a NaN streak (several consecutive skipped steps) into
    # one alert and one anomaly checkpoint instead of one per step. 0 reports every non-finite step.
    nonfinite_cooldown_steps: int = 10
    # W&B throttles server-side notifications (Slack/email) with the same title for this many seconds;
    # every alert is still recorded locally and in the run history. 0 is not allowed because wandb
    # silently replaces it by 60 s.
    wandb_wait_seconds: float = 300.0

    # Severity per rule; a partial mapping is merged over the defaults (stall/overflow/underflow/cos/spikes:
    # warn, non-finite: error). Error-level alerts always request an anomaly checkpoint.
    levels: Mapping[str, str] = field(default_factory=dict)

    # --- consumed by the trainer ---
    # Consecutive non-finite steps the trainer tolerates (skipping the update) before stopping the run.
    # Higher rides out transient FP8 blow-ups; lower stops a diverged run sooner. None: never stop.
    nan_patience: int | None = 10
    # Rules (besides error-level ones) whose alerts request an anomaly checkpoint. Checkpoints are large,
    # so only the rule most worth post-mortem inspection is on by default.
    anomaly_checkpoint_on: tuple[str, ...] = ("loss_spike",)
    # How many anomaly checkpoints to keep (oldest deleted first). None keeps all.
    anomaly_keep_last: int | None = 5

    def __post_init__(self) -> None:
        errors: list[str] = []

        def check_number(name: str, lo: float, hi: float, *, lo_open: bool = False, optional: bool = True) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            ok = _is_number(v) and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                none = " or null to disable" if optional else ""
                errors.append(f"{name} must be a number in {rng}{none}, got {v!r}{_yaml_hint(v)}")
            else:
                object.__setattr__(self, name, float(v))

        def check_int(name: str, lo: int, *, optional: bool = False, what: str = "") -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not (_is_int(v) and v >= lo):
                none = " or null" if optional else ""
                errors.append(f"{name} must be an integer >= {lo}{none}{what}, got {v!r}{_yaml_hint(v)}")

        if not isinstance(self.enabled, bool):
            errors.append(f"enabled must be true or false, got {self.enabled!r}")
        for name in ("bit_stall_threshold", "overflow_threshold", "underflow_threshold"):
            check_number(name, 0.0, 1.0)
        check_number("cos_sim_floor", -1.0, 1.0)
        if self.cos_sim_metric not in COS_SIM_KEYS:
            errors.append(f"cos_sim_metric must be one of {', '.join(map(repr, COS_SIM_KEYS))}, got {self.cos_sim_metric!r}")
        inf = math.inf
        check_number("loss_spike_factor", 1.0, inf, lo_open=True)
        check_number("grad_norm_spike_factor", 1.0, inf, lo_open=True)
        check_int("loss_spike_window", 1)
        check_int("grad_norm_spike_window", 1)
        check_int("spike_min_history", 1)
        spike_ints = ("spike_min_history", "loss_spike_window", "grad_norm_spike_window")
        if all(_is_int(getattr(self, n)) and getattr(self, n) >= 1 for n in spike_ints):
            smallest = min(self.loss_spike_window, self.grad_norm_spike_window)
            if self.spike_min_history > smallest:
                errors.append(
                    f"spike_min_history ({self.spike_min_history}) must be <= loss_spike_window and "
                    f"grad_norm_spike_window (smallest is {smallest}), otherwise the spike rules never fire"
                )
        check_int("cooldown_steps", 0)
        check_int("nonfinite_cooldown_steps", 0)
        check_number("wandb_wait_seconds", 0.0, inf, lo_open=True, optional=False)
        check_int("nan_patience", 1, optional=True, what=" (null: never stop)")
        check_int("anomaly_keep_last", 1, optional=True, what=" (null: keep all)")

        valid_rules = ", ".join(RULE_NAMES)
        # levels: merge the partial user mapping over the defaults and normalise to AlertLevel values.
        if not isinstance(self.levels, Mapping):
            errors.append(f"levels must be a mapping of rule name to level, got {self.levels!r}")
        else:
            merged = dict(DEFAULT_LEVELS)
            for rule, lvl in self.levels.items():
                if rule not in RULE_NAMES:
                    errors.append(f"levels: unknown rule {rule!r}; valid rules are {valid_rules}")
                    continue
                try:
                    merged[rule] = AlertLevel.parse(lvl, what=f"levels[{rule!r}]").value
                except ValueError as e:
                    errors.append(str(e))
            object.__setattr__(self, "levels", merged)

        # anomaly_checkpoint_on: YAML gives a list; store a tuple so the frozen config stays immutable.
        aco = self.anomaly_checkpoint_on
        if isinstance(aco, str) or not isinstance(aco, (list, tuple)):
            errors.append(f"anomaly_checkpoint_on must be a list of rule names, got {aco!r}")
        else:
            bad = [r for r in aco if r not in RULE_NAMES]
            if bad:
                errors.append(f"anomaly_checkpoint_on: unknown rule(s) {bad!r}; valid rules are {valid_rules}")
            object.__setattr__(self, "anomaly_checkpoint_on", tuple(aco))

        if errors:
            raise ValueError("Invalid MonitoringConfig:\n  - " + "\n  - ".join(errors))

    # ------------------------------------------------------------------ construction / export
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MonitoringConfig":
        """Build from a (YAML-loaded) mapping; unknown keys are an error that lists the valid ones.

        Example:
            >>> MonitoringConfig.from_dict({"cooldown_steps": 20}).cooldown_steps
            20
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"monitoring config must be a mapping, got {type(d).__name__}")
        valid = cls.field_names()
        unknown = sorted(k for k in d if k not in valid)
        if unknown:
            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), valid, n=1)) else repr(k)
                for k in unknown
            ]
            raise ValueError(f"Unknown MonitoringConfig key(s) {', '.join(hints)}; valid keys are: {', '.join(valid)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-serialisable dict; ``from_dict(to_dict())`` round-trips."""
        out = dataclasses.asdict(self)
        out["levels"] = dict(self.levels)
        out["anomaly_checkpoint_on"] = list(self.anomaly_checkpoint_on)
        return out

    # ------------------------------------------------------------------ derived rules
    def level_for(self, rule: str) -> AlertLevel:
        """Configured level of ``rule``; rules outside RULE_NAMES (ad-hoc trainer alerts) default to WARN."""
        return AlertLevel.parse(self.levels.get(rule, "warn"))

    def cooldown_for(self, rule: str) -> int:
        return self.nonfinite_cooldown_steps if rule in NONFINITE_RULE_NAMES else self.cooldown_steps

    def requests_anomaly_checkpoint(self, rule: str, level: AlertLevel) -> bool:
        return level is AlertLevel.ERROR or rule in self.anomaly_checkpoint_on

    def rules(self) -> list[ThresholdRule | SpikeRule]:
        """The enabled rules evaluated by ``AlertManager.check``, in a fixed order."""
        if not self.enabled:
            return []
        lv = self.level_for
        candidates: list[ThresholdRule | SpikeRule | None] = [
            None if self.bit_stall_threshold is None else ThresholdRule(
                "bit_stall", STORED_WEIGHT_BIT_STALL_RATE, self.bit_stall_threshold, "above", lv("bit_stall"),
                "Stored-weight bit-stall rate high"),
            None if self.overflow_threshold is None else ThresholdRule(
                "overflow", OVERFLOW_RATE, self.overflow_threshold, "above", lv("overflow"),
                "Quantization overflow rate high"),
            None if self.underflow_threshold is None else ThresholdRule(
                "underflow", UNDERFLOW_RATE, self.underflow_threshold, "above", lv("underflow"),
                "Quantization underflow rate high"),
            None if self.cos_sim_floor is None else ThresholdRule(
                "grad_cos_sim", self.cos_sim_metric, self.cos_sim_floor, "below", lv("grad_cos_sim"),
                "Gradient cosine similarity low"),
            None if self.loss_spike_factor is None else SpikeRule(
                "loss_spike", "loss", self.loss_spike_factor, self.loss_spike_window, self.spike_min_history,
                lv("loss_spike"), "Loss spike"),
            None if self.grad_norm_spike_factor is None else SpikeRule(
                "grad_norm_spike", "grad_norm", self.grad_norm_spike_factor, self.grad_norm_spike_window,
                self.spike_min_history, lv("grad_norm_spike"), "Gradient norm spike"),
        ]
        return [r for r in candidates if r is not None]
