"""Stability alerts: evaluate threshold rules on the trainer's logs and fan alerts out to sinks.

Sinks (main process only, except the logger):

* the ``altgrad.alerts`` Python logger (WARN -> ``logger.warning``, ...);
* the active W&B run: ``run.alert(...)`` plus an ``alerts/<rule>`` history point and ``alerts/*``
  summary counts, so that offline runs (where ``run.alert`` is only written to the run's ``.wandb``
  transaction log, not delivered) still show alerts in charts after ``wandb sync``;
* ``<output_dir>/alerts.jsonl``: one JSON object per line, appended and flushed per alert so the
  file stays valid JSON lines if the process dies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transformers.trainer_callback import TrainerCallback

from .config import (
    AlertLevel,
    MonitoringConfig,
    SpikeRule,
    ThresholdRule,
)

__all__ = ["Alert", "AlertManager", "AlertCallback", "read_alerts", "ALERTS_FILENAME", "WANDB_STEP_KEY"]

logger = logging.getLogger("altgrad.alerts")

ALERTS_FILENAME = "alerts.jsonl"
# transformers' WandbCallback plots every metric against this key (define_metric step_metric); logging
# it with each alert puts the alert marker at the right optimizer step in the W&B charts.
WANDB_STEP_KEY = "train/global_step"
# W&B rejects alert titles of 64 characters or more.
_WANDB_TITLE_MAX = 63


def _json_safe(value: Any) -> Any:
    """Make a metric value strict-JSON serialisable: NaN/inf become the strings "nan"/"inf"/"-inf"
    (json.dumps would otherwise write bare NaN, which is not JSON), tensors/numpy scalars become floats."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    try:
        f = float(value)  # float, numpy scalar, 0-d tensor
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else str(f)


def _as_float(value: Any) -> float | None:
    """Best-effort float conversion of a logged value; None when it is not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Alert:
    """One stability alert.

    ``rule`` names the rule that fired (see ``config.RULE_NAMES``; the trainer may use its own names),
    ``metrics`` holds the values that triggered it, ``time`` is Unix time when it was created.

    Example:
        >>> a = Alert(12, AlertLevel.ERROR, "Non-finite loss", "loss is nan", {"loss": float("nan")}, "nonfinite_loss")
        >>> json.loads(a.to_json())["metrics"]
        {'loss': 'nan'}
    """

    step: int
    level: AlertLevel
    title: str
    text: str
    metrics: dict = field(default_factory=dict)
    rule: str = ""
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", AlertLevel.parse(self.level, what="Alert.level"))
        object.__setattr__(self, "step", int(self.step))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with keys step, level, title, text, metrics, rule, time."""
        return {
            "step": self.step,
            "level": self.level.value,
            "title": self.title,
            "text": self.text,
            "metrics": _json_safe(dict(self.metrics)),
            "rule": self.rule,
            "time": self.time,
        }

    def to_json(self) -> str:
        """One line of strict JSON (no NaN literals, no newlines)."""
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Alert":
        return cls(
            step=d["step"], level=d["level"], title=d["title"], text=d["text"],
            metrics=dict(d.get("metrics") or {}), rule=d.get("rule", ""), time=d.get("time", 0.0),
        )


def read_alerts(path: str | os.PathLike) -> list[Alert]:
    """Read ``alerts.jsonl`` (a file or the directory holding it) back into Alerts.

    A truncated last line (the process died mid-write) is skipped rather than failing the report.

    Example:
        >>> read_alerts("/nonexistent")
        []
    """
    p = Path(path)
    if p.is_dir():
        p = p / ALERTS_FILENAME
    if not p.is_file():
        return []
    alerts = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                alerts.append(Alert.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, ValueError):
                logger.warning("skipping unreadable line %d of %s", lineno, p)
    return alerts


class AlertManager:
    """Evaluates the configured rules on each logs dict, applies per-rule cooldown, and emits alerts.

    Args:
        config: thresholds and policy; ``None`` means defaults.
        output_dir: where ``alerts.jsonl`` is appended (created if needed); ``None`` disables the file sink.
        is_main_process: only the main process writes the file and talks to W&B. Other ranks still
            evaluate rules and return alerts, so anomaly decisions agree across ranks, and log
            them at DEBUG so a multi-GPU run does not print every alert N times.

    Rule semantics: a missing key skips its rule; a non-finite value never fires a threshold/spike
    rule and never enters a spike window (non-finite loss/grads are the trainer's ``nonfinite_*``
    alerts, raised via :meth:`raise_alert` / :meth:`alert`). Cooldown: a rule that fired at step ``s``
    is suppressed until ``s + cooldown_steps`` (``nonfinite_cooldown_steps`` for ``nonfinite_*``);
    a step lower than the last firing (resumed from an earlier checkpoint) resets that rule's cooldown.

    Example:
        >>> m = AlertManager(MonitoringConfig(cooldown_steps=100), output_dir=None)
        >>> [a.rule for a in m.check(10, {"quantization/overflow_rate": 0.2})]
        ['overflow']
        >>> m.check(50, {"quantization/overflow_rate": 0.2})  # within cooldown
        []
        >>> m.alert_counts()["by_rule"]
        {'overflow': 1}
    """

    def __init__(
        self,
        config: MonitoringConfig | None = None,
        output_dir: str | os.PathLike | None = None,
        is_main_process: bool = True,
    ) -> None:
        self.config = config if config is not None else MonitoringConfig()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.is_main_process = is_main_process
        self._rules = self.config.rules()
        # Running windows for spike rules; values enter after the comparison so a spike is judged
        # against the history before it, and a lasting level shift becomes the new baseline.
        self._history: dict[str, deque[float]] = {
            r.name: deque(maxlen=r.window) for r in self._rules if isinstance(r, SpikeRule)
        }
        self._last_fired: dict[str, int] = {}
        self.history: list[Alert] = []  # every emitted (not suppressed) alert, oldest first
        self._by_level: Counter[str] = Counter()
        self._by_rule: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    # ------------------------------------------------------------------ public API
    @property
    def alerts_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / ALERTS_FILENAME

    def check(self, step: int, logs: Mapping[str, Any]) -> list[Alert]:
        """Evaluate every enabled rule on ``logs`` at ``step``; returns the alerts emitted (post-cooldown)."""
        if not self.config.enabled or not logs:
            return []
        candidates: list[Alert] = []
        for rule in self._rules:
            value = _as_float(logs.get(rule.metric))
            if value is None:
                continue  # metric not logged this step (e.g. eval logs, quantization off)
            if isinstance(rule, ThresholdRule):
                alert = self._eval_threshold(rule, step, value, logs)
            else:
                alert = self._eval_spike(rule, step, value)
            if alert is not None:
                candidates.append(alert)
        return [a for a in candidates if self.raise_alert(a)]

    def raise_alert(self, alert: Alert) -> bool:
        """Emit an alert built elsewhere (e.g. the trainer's ``nonfinite_loss``/``nonfinite_grad``).

        Returns False when the rule is still in cooldown (or monitoring is disabled) and nothing was emitted.
        """
        if not self.config.enabled:
            return False
        last = self._last_fired.get(alert.rule)
        cooldown = self.config.cooldown_for(alert.rule)
        if last is not None and last <= alert.step < last + cooldown:
            self._suppressed[alert.rule] += 1
            logger.debug("suppressed %s alert at step %d (cooldown since step %d)", alert.rule, alert.step, last)
            return False
        self._last_fired[alert.rule] = alert.step
        self.history.append(alert)
        self._by_level[alert.level.value] += 1
        self._by_rule[alert.rule] += 1
        self._emit(alert)
        return True

    def alert(
        self,
        step: int,
        rule: str,
        text: str,
        metrics: Mapping[str, Any] | None = None,
        title: str | None = None,
    ) -> Alert | None:
        """Build an alert with the configured level for ``rule`` and raise it; returns it, or None if suppressed.

        Example (inside the trainer):
            >>> m = AlertManager(output_dir=None)
            >>> m.alert(7, "nonfinite_loss", "loss is inf; update skipped", {"loss": float("inf")}).level
            <AlertLevel.ERROR: 'error'>
        """
        default_titles = {"nonfinite_loss": "Non-finite loss", "nonfinite_grad": "Non-finite gradients"}
        a = Alert(
            step=step, level=self.config.level_for(rule), title=title or default_titles.get(rule, rule),
            text=text, metrics=dict(metrics or {}), rule=rule,
        )
        return a if self.raise_alert(a) else None

    def alert_counts(self) -> dict[str, Any]:
        """Counts of emitted alerts for the run report.

        Returns ``{"total": int, "by_level": {"info": n, "warn": n, "error": n}, "by_rule": {rule: n},
        "suppressed": {rule: n}}`` (by_rule/suppressed only list rules that occurred).
        """
        return {
            "total": sum(self._by_rule.values()),
            "by_level": {lvl.value: self._by_level.get(lvl.value, 0) for lvl in AlertLevel},
            "by_rule": dict(self._by_rule),
            "suppressed": dict(self._suppressed),
        }

    def requests_anomaly_checkpoint(self, alert: Alert) -> bool:
        """True for error-level alerts and for rules listed in ``config.anomaly_checkpoint_on``."""
        return self.config.requests_anomaly_checkpoint(alert.rule, alert.level)

    # ------------------------------------------------------------------ rule evaluation
    def _eval_threshold(self, rule: ThresholdRule, step: int, value: float, logs: Mapping[str, Any]) -> Alert | None:
        if not math.isfinite(value) or not rule.breached(value):
            return None
        cmp = ">" if rule.direction == "above" else "<"
        metrics: dict[str, Any] = {rule.metric: value, "threshold": rule.threshold}
        text = f"{rule.metric} = {value:.4g} {cmp} {rule.threshold:.4g} at step {step}."
        if rule.name == "grad_cos_sim":
            # Name the worst layer so the alert is actionable without opening the dashboard.
            layers = {
                k: v for k, v in ((k, _as_float(v)) for k, v in logs.items()
                                  if k.startswith("grad_cos_sim/") and k not in ("grad_cos_sim/min", "grad_cos_sim/mean"))
                if v is not None and math.isfinite(v)
            }
            if layers:
                worst = min(layers, key=layers.__getitem__)
                metrics[worst] = layers[worst]
                text += f" Worst layer: {worst.removeprefix('grad_cos_sim/')} ({layers[worst]:.4g})."
            mean = _as_float(logs.get("grad_cos_sim/mean"))
            if rule.metric != "grad_cos_sim/mean" and mean is not None:
                metrics["grad_cos_sim/mean"] = mean
        return Alert(step=step, level=rule.level, title=rule.title, text=text, metrics=metrics, rule=rule.name)

    def _eval_spike(self, rule: SpikeRule, step: int, value: float) -> Alert | None:
        if not math.isfinite(value):
            return None  # keeps inf/NaN out of the baseline; the trainer reports them as nonfinite_*
        window = self._history[rule.name]
        alert = None
        if len(window) >= rule.min_history:
            median = statistics.median(window)
            if rule.breached(value, median):
                alert = Alert(
                    step=step, level=rule.level, title=rule.title,
                    text=(f"{rule.metric} = {value:.4g} is {value / median:.1f}x the median {median:.4g} "
                          f"of the last {len(window)} values (factor {rule.factor:g}) at step {step}."),
                    metrics={rule.metric: value, "median": median, "factor": rule.factor, "window_count": len(window)},
                    rule=rule.name,
                )
        window.append(value)
        return alert

    # ------------------------------------------------------------------ sinks
    def _emit(self, alert: Alert) -> None:
        msg = "[step %d] %s: %s (rule=%s)"
        args = (alert.step, alert.title, alert.text, alert.rule)
        if not self.is_main_process:
            logger.debug(msg, *args)
            return
        logger.log(alert.level.logging_level, msg, *args)
        # A failing sink must never take training down with it: report and carry on.
        try:
            self._write_jsonl(alert)
        except OSError:
            logger.exception("could not append alert to %s", self.alerts_path)
        try:
            self._send_wandb(alert)
        except Exception:  # noqa: BLE001 - wandb can raise many things (finished run, service gone)
            logger.exception("could not send alert to W&B")

    def _write_jsonl(self, alert: Alert) -> None:
        path = self.alerts_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        line = alert.to_json() + "\n"
        # Open/append/close per alert (alerts are rare): one write() per line + flush + fsync means a
        # crash leaves at most a truncated final line, and nothing depends on an open handle.
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def _send_wandb(self, alert: Alert) -> None:
        # If nothing imported wandb there can be no active run; don't pay for the import.
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is None:
            return
        title = alert.title if len(alert.title) <= _WANDB_TITLE_MAX else alert.title[: _WANDB_TITLE_MAX - 1] + "…"
        # Online: a W&B notification (Slack/email). Offline: wandb 0.31 only writes an AlertRecord to the
        # run's .wandb transaction log (no error, not shown anywhere until synced), hence the
        # history/summary entries below, which show up in the run's charts either way.
        run.alert(
            title=title,
            text=f"[step {alert.step}] {alert.text}",
            level=alert.level.to_wandb(),
            wait_duration=self.config.wandb_wait_seconds,
        )
        run.log({f"alerts/{alert.rule}": 1, WANDB_STEP_KEY: alert.step})
        counts = self.alert_counts()
        run.summary.update(
            {
                "alerts/total": counts["total"],
                **{f"alerts/by_level/{k}": v for k, v in counts["by_level"].items()},
                **{f"alerts/by_rule/{k}": v for k, v in counts["by_rule"].items()},
                "alerts/last": alert.to_dict(),
            }
        )


class AlertCallback(TrainerCallback):
    """``TrainerCallback`` that runs :class:`AlertManager` on every ``on_log`` and queues anomaly requests.

    Alerts that are error-level or whose rule is in ``config.anomaly_checkpoint_on`` are appended to
    ``pending_anomalies``; the trainer drains them with :meth:`pop_anomalies` and saves an anomaly
    checkpoint. Requests are queued on every rank (not just the main one) because saving can be a
    collective operation; this relies on the checked metrics being identical on all ranks, which holds
    for the Trainer's reduced ``loss``/``grad_norm`` and must hold for reduced quantization stats.

    Args:
        config: monitoring config (defaults if None).
        output_dir: where ``alerts.jsonl`` goes; None means ``args.output_dir`` (set at init/train begin).
        is_main_process: None means follow ``state.is_world_process_zero`` (before the first event, the
            ``RANK`` environment variable decides).
        manager: an existing :class:`AlertManager` to drive (e.g. a `QuantSession`'s, which also raises
            the non-finite alerts); its config is used and ``config`` must be None.

    Example:
        >>> cb = AlertCallback(MonitoringConfig(anomaly_checkpoint_on=["overflow"]))
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.train()                                                             # doctest: +SKIP
        >>> for alert in cb.pop_anomalies(): ...  # save an anomaly checkpoint per request  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MonitoringConfig | None = None,
        output_dir: str | os.PathLike | None = None,
        is_main_process: bool | None = None,
        manager: AlertManager | None = None,
    ) -> None:
        if manager is not None and config is not None:
            raise ValueError("AlertCallback takes a config or an existing manager, not both")
        self._follow_state = is_main_process is None
        self._follow_args_dir = output_dir is None
        main = is_main_process if is_main_process is not None else int(os.environ.get("RANK", "0")) == 0
        if manager is None:
            manager = AlertManager(config, output_dir, is_main_process=main)
        else:
            manager.is_main_process = main
            if output_dir is not None:
                manager.output_dir = Path(output_dir)
        self.manager = manager
        self.pending_anomalies: list[Alert] = []

    @property
    def config(self) -> MonitoringConfig:
        return self.manager.config

    def pop_anomalies(self) -> list[Alert]:
        """Return and clear the queued anomaly-checkpoint requests (oldest first)."""
        out, self.pending_anomalies = self.pending_anomalies, []
        return out

    def raise_alert(self, alert: Alert) -> bool:
        """Like :meth:`AlertManager.raise_alert`, but also queues an anomaly request when warranted."""
        emitted = self.manager.raise_alert(alert)
        if emitted:
            self._maybe_queue(alert)
        return emitted

    def alert(self, step: int, rule: str, text: str, metrics: Mapping[str, Any] | None = None,
              title: str | None = None) -> Alert | None:
        """Like :meth:`AlertManager.alert` (configured level), plus anomaly queueing."""
        a = self.manager.alert(step, rule, text, metrics, title)
        if a is not None:
            self._maybe_queue(a)
        return a

    # ------------------------------------------------------------------ TrainerCallback hooks
    def _sync(self, args: Any, state: Any) -> None:
        if self._follow_state and state is not None:
            self.manager.is_main_process = bool(state.is_world_process_zero)
        if self._follow_args_dir and getattr(args, "output_dir", None):
            self.manager.output_dir = Path(args.output_dir)

    def on_init_end(self, args, state, control, **kwargs):
        self._sync(args, state)

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._sync(args, state)
        for alert in self.manager.check(state.global_step, logs or {}):
            self._maybe_queue(alert)

    def _maybe_queue(self, alert: Alert) -> None:
        if self.manager.requests_anomaly_checkpoint(alert):
            self.pending_anomalies.append(alert)

