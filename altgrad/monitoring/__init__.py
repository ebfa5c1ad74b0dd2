"""Stability monitoring: threshold rules on training metrics, alerts to logging / W&B / alerts.jsonl.

Example:
    >>> from altgrad.monitoring import AlertCallback, MonitoringConfig
    >>> cb = AlertCallback(MonitoringConfig.from_dict({"overflow_threshold": 0.02}))
    >>> # Trainer(..., callbacks=[cb]); after each log step the trainer drains cb.pop_anomalies()
"""

from .alerts import ALERTS_FILENAME, WANDB_STEP_KEY, Alert, AlertCallback, AlertManager, read_alerts
from .config import (
    NONFINITE_RULE_NAMES,
    RULE_NAMES,
    THRESHOLD_RULE_NAMES,
    AlertLevel,
    MonitoringConfig,
    SpikeRule,
    ThresholdRule,
)

__all__ = [
    "ALERTS_FILENAME",
    "WANDB_STEP_KEY",
    "Alert",
    "AlertCallback",
    "AlertLevel",
    "AlertManager",
    "MonitoringConfig",
    "NONFINITE_RULE_NAMES",
    "RULE_NAMES",
    "SpikeRule",
    "THRESHOLD_RULE_NAMES",
    "ThresholdRule",
    "read_alerts",
]
