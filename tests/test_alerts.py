"""Stability monitoring: threshold rules, cooldown, sinks (logging, alerts.jsonl, offline W&B), Trainer callback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from altgrad.monitoring.wandb_offline import iter_records
from altgrad.monitoring import (
    Alert,
    AlertCallback,
    AlertLevel,
    AlertManager,
    MonitoringConfig,
    read_alerts,
)

REQUIRED_KEYS = {"step", "level", "title", "text", "metrics", "rule", "time"}

# (rule, metric key, value that fires, values that must not fire) with the default thresholds.
THRESHOLD_CASES = [
    ("bit_stall", "quantization/stored_weight_bit_stall_rate", 0.75, [0.5, 0.2]),
    ("overflow", "quantization/overflow_rate", 0.02, [0.01, 0.0]),
    ("underflow", "quantization/underflow_rate", 0.3, [0.1, 0.05]),
    ("grad_cos_sim", "grad_cos_sim/min", 0.5, [0.9, 0.99]),
]


def manager(tmp_path: Path | None = None, **cfg) -> AlertManager:
    return AlertManager(MonitoringConfig(**cfg), output_dir=tmp_path)


# ---------------------------------------------------------------------------- threshold rules
@pytest.mark.parametrize("rule,key,bad,fine", THRESHOLD_CASES, ids=[c[0] for c in THRESHOLD_CASES])
def test_threshold_rule_fires_above_and_not_at_or_below(rule, key, bad, fine):
    m = manager(cooldown_steps=0)
    for step, value in enumerate(fine):
        assert m.check(step, {key: value}) == [], f"{rule} fired at {value}"
    (alert,) = m.check(10, {key: bad})
    assert alert.rule == rule and alert.level is AlertLevel.WARN and alert.step == 10
    assert alert.metrics[key] == bad and key in alert.text


def test_forward_copy_bit_stall_is_logged_not_alerted():
    # The forward copy of float32 master weights stalls most updates harmlessly (the master keeps them).
    assert manager(cooldown_steps=0).check(1, {"quantization/bit_stall_rate": 0.95}) == []


def test_cos_sim_floor_on_mean_and_worst_layer_named():
    logs = {"grad_cos_sim/mean": 0.95, "grad_cos_sim/min": 0.4, "grad_cos_sim/h.0.attn": 0.99,
            "grad_cos_sim/h.1.mlp": 0.4}
    (alert,) = manager().check(1, logs)
    assert "h.1.mlp" in alert.text and alert.metrics["grad_cos_sim/h.1.mlp"] == 0.4
    # The quieter whole-model view: mean 0.95 is above the floor.
    assert manager(cos_sim_metric="grad_cos_sim/mean").check(1, logs) == []


def test_missing_keys_and_non_finite_values_are_skipped():
    m = manager(spike_min_history=1, loss_spike_window=3)
    assert m.check(1, {}) == []
    assert m.check(2, {"eval_loss": 99.0, "val/perplexity": 1e9}) == []  # no rule reads these
    for key in ("quantization/overflow_rate", "grad_cos_sim/min", "loss", "grad_norm"):
        assert m.check(3, {key: float("nan")}) == []
        assert m.check(4, {key: float("inf")}) == []
    m.check(5, {"loss": 1.0})
    # inf never entered the loss window, so the median is 1.0 and 10.0 is a spike.
    assert [a.rule for a in m.check(6, {"loss": 10.0})] == ["loss_spike"]


def test_cooldown_per_rule():
    m = manager(cooldown_steps=100)
    logs = {"quantization/overflow_rate": 0.5}
    assert [a.step for a in m.check(10, logs)] == [10]
    assert m.check(50, logs) == []
    assert m.check(109, logs) == []
    # Other rules have their own cooldown.
    assert [a.rule for a in m.check(60, {"quantization/underflow_rate": 0.9})] == ["underflow"]
    assert [a.step for a in m.check(111, logs)] == [111]
    counts = m.alert_counts()
    assert counts["by_rule"] == {"overflow": 2, "underflow": 1}
    assert counts["suppressed"] == {"overflow": 2}
    assert counts["by_level"] == {"info": 0, "warn": 3, "error": 0} and counts["total"] == 3
    # Resumed from an earlier checkpoint: a lower step resets the cooldown instead of muting the rule.
    assert [a.step for a in m.check(5, logs)] == [5]


def test_loss_spike_against_running_median():
    m = manager(loss_spike_factor=3.0, loss_spike_window=5, spike_min_history=3, cooldown_steps=0)
    # Too little history: even an absurd value is not judged.
    assert m.check(0, {"loss": 2.0}) == []
    assert m.check(1, {"loss": 100.0}) == []
    assert m.check(2, {"loss": 2.0}) == []
    # History [2, 100, 2] -> median 2: the earlier outlier does not inflate the baseline.
    assert m.check(3, {"loss": 5.9}) == []
    # History [2, 100, 2, 5.9] -> median 3.95; 12 > 3 x 3.95.
    (alert,) = m.check(4, {"loss": 12.0})
    assert alert.rule == "loss_spike" and alert.metrics["median"] == pytest.approx(3.95)
    assert alert.metrics["window_count"] == 4
    # A sustained level shift becomes the new baseline (window of 5) and stops alerting.
    for step in range(5, 10):
        m.check(step, {"loss": 12.0})
    assert m.check(10, {"loss": 13.0}) == []


def test_grad_norm_spike():
    m = manager(grad_norm_spike_factor=10.0, grad_norm_spike_window=10, spike_min_history=3)
    for step, g in enumerate([1.0, 1.2, 0.9, 1.1]):
        assert m.check(step, {"grad_norm": g}) == []
    assert m.check(4, {"grad_norm": 9.0}) == []
    assert [a.rule for a in m.check(5, {"grad_norm": 20.0})] == ["grad_norm_spike"]


@pytest.mark.parametrize("field,rule,key,value", [
    ("bit_stall_threshold", "bit_stall", "quantization/bit_stall_rate", 1.0),
    ("overflow_threshold", "overflow", "quantization/overflow_rate", 1.0),
    ("underflow_threshold", "underflow", "quantization/underflow_rate", 1.0),
    ("cos_sim_floor", "grad_cos_sim", "grad_cos_sim/min", -1.0),
    ("loss_spike_factor", "loss_spike", "loss", 1e6),
    ("grad_norm_spike_factor", "grad_norm_spike", "grad_norm", 1e6),
])
def test_rule_set_to_none_never_fires(field, rule, key, value):
    m = manager(**{field: None}, spike_min_history=1, cooldown_steps=0)
    assert rule not in [r.name for r in m.config.rules()]
    fired = [a.rule for step in range(20) for a in m.check(step, {key: 1.0 if step < 10 else value})]
    assert rule not in fired and fired == []


def test_enabled_false_is_a_noop(tmp_path):
    m = AlertManager(MonitoringConfig(enabled=False), tmp_path / "out")
    assert m.check(1, {"quantization/overflow_rate": 1.0, "grad_cos_sim/min": -1.0}) == []
    assert m.alert(2, "nonfinite_loss", "nan") is None
    assert not (tmp_path / "out").exists() and m.alert_counts()["total"] == 0


# ---------------------------------------------------------------------------- sinks
def test_alerts_jsonl_valid_lines_and_append(tmp_path):
    out = tmp_path / "nested" / "run"  # does not exist yet
    m = AlertManager(MonitoringConfig(), out)
    m.check(3, {"quantization/overflow_rate": 0.5, "grad_cos_sim/min": 0.1})
    m.alert(4, "nonfinite_loss", "loss is nan; update skipped", {"loss": float("nan"), "grad_norm": float("inf")})
    # A second manager (e.g. a resumed run) appends instead of truncating.
    AlertManager(MonitoringConfig(), out).raise_alert(
        Alert(9, "info", "custom", "trainer note", {"lr": 1e-3}, "lr_warmup_done"))

    lines = (out / "alerts.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: bare NaN would still parse, so check below
    assert all(set(r) == REQUIRED_KEYS for r in records)
    assert [(r["step"], r["rule"], r["level"]) for r in records] == [
        (3, "overflow", "warn"), (3, "grad_cos_sim", "warn"), (4, "nonfinite_loss", "error"),
        (9, "lr_warmup_done", "info")]
    assert "NaN" not in lines[2] and records[2]["metrics"] == {"loss": "nan", "grad_norm": "inf"}
    assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in records)

    # Reading back tolerates a line truncated by a crash mid-write.
    with (out / "alerts.jsonl").open("a") as fh:
        fh.write('{"step": 10, "lev')
    assert [a.rule for a in read_alerts(out)] == ["overflow", "grad_cos_sim", "nonfinite_loss", "lr_warmup_done"]


def test_non_main_process_writes_nothing_but_returns_alerts(tmp_path, caplog):
    out = tmp_path / "out"
    m = AlertManager(MonitoringConfig(), out, is_main_process=False)
    with caplog.at_level(logging.INFO, logger="altgrad.alerts"):
        alerts = m.check(1, {"quantization/overflow_rate": 0.5})
        m.alert(2, "nonfinite_grad", "grad is inf")
    assert [a.rule for a in alerts] == ["overflow"] and m.alert_counts()["total"] == 2
    assert not out.exists()
    assert caplog.records == []  # only DEBUG on non-main ranks, so N ranks do not print N copies


def test_logging_sink_levels(caplog):
    m = manager()
    with caplog.at_level(logging.DEBUG, logger="altgrad.alerts"):
        m.check(1, {"quantization/overflow_rate": 0.5})
        m.alert(2, "nonfinite_loss", "loss is nan")
        m.raise_alert(Alert(3, AlertLevel.INFO, "note", "fyi", {}, "custom"))
    got = [(r.levelno, r.name) for r in caplog.records]
    assert got == [(logging.WARNING, "altgrad.alerts"), (logging.ERROR, "altgrad.alerts"),
                   (logging.INFO, "altgrad.alerts")]
    assert "step 2" in caplog.records[1].getMessage()


def test_nonfinite_alerts_use_their_own_cooldown():
    m = manager(cooldown_steps=100, nonfinite_cooldown_steps=10)
    fired = [s for s in range(0, 25) if m.alert(s, "nonfinite_loss", "nan") is not None]
    assert fired == [0, 10, 20]
    a = m.history[0]
    assert a.level is AlertLevel.ERROR and a.title == "Non-finite loss"
    # Levels are configurable per rule; the trainer-facing helper picks them up.
    m2 = manager(levels={"nonfinite_grad": "WARNING"}, nonfinite_cooldown_steps=0)
    assert [m2.alert(s, "nonfinite_grad", "inf").level for s in (1, 2)] == [AlertLevel.WARN] * 2


def test_alert_to_json_and_level_mapping():
    a = Alert(5, "WARN", "t", "x", {"v": 1.5}, "overflow")
    assert a.level is AlertLevel.WARN and json.loads(a.to_json())["level"] == "warn"
    assert Alert.from_dict(json.loads(a.to_json())) == a
    import wandb

    assert [lv.to_wandb() for lv in AlertLevel] == [wandb.AlertLevel.INFO, wandb.AlertLevel.WARN, wandb.AlertLevel.ERROR]


# ---------------------------------------------------------------------------- config validation
def test_config_defaults_and_yaml_round_trip():
    cfg = MonitoringConfig()
    assert (cfg.bit_stall_threshold, cfg.overflow_threshold, cfg.underflow_threshold, cfg.cos_sim_floor) == (
        0.5, 0.01, 0.1, 0.9)
    assert cfg.level_for("loss_spike") is AlertLevel.WARN and cfg.level_for("nonfinite_grad") is AlertLevel.ERROR
    text = """
    overflow_threshold: 0
    loss_spike_factor: null
    levels: {loss_spike: ERROR}
    anomaly_checkpoint_on: [overflow]
    """
    cfg = MonitoringConfig.from_dict(yaml.safe_load(text))
    assert cfg.overflow_threshold == 0.0 and isinstance(cfg.overflow_threshold, float)
    assert cfg.loss_spike_factor is None and cfg.anomaly_checkpoint_on == ("overflow",)
    assert cfg.levels["loss_spike"] == "error" and cfg.levels["overflow"] == "warn"  # partial merge
    assert MonitoringConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert MonitoringConfig.from_dict(None) == MonitoringConfig()


@pytest.mark.parametrize("bad,needles", [
    ({"overflow_threshold": -0.1}, ["overflow_threshold", "[0.0, 1.0]", "-0.1"]),
    ({"bit_stall_threshold": 1.5}, ["bit_stall_threshold", "[0.0, 1.0]"]),
    ({"cos_sim_floor": 2}, ["cos_sim_floor", "[-1.0, 1.0]"]),
    ({"loss_spike_factor": 1.0}, ["loss_spike_factor", "(1.0, inf]"]),
    ({"cooldown_steps": -1}, ["cooldown_steps", ">= 0"]),
    ({"loss_spike_window": 2.5}, ["loss_spike_window", "integer >= 1"]),
    ({"nan_patience": 0}, ["nan_patience", ">= 1"]),
    ({"spike_min_history": 60}, ["spike_min_history", "<= loss_spike_window"]),
    ({"underflow_threshold": "1e-2"}, ["underflow_threshold", "1.0e-2"]),
    ({"cos_sim_metric": "grad_cos_sim/max"}, ["cos_sim_metric", "'grad_cos_sim/min'", "'grad_cos_sim/mean'"]),
    ({"levels": {"loss_spike": "fatal"}}, ["levels['loss_spike']", "'info', 'warn', 'error'"]),
    ({"levels": {"loss_spikes": "warn"}}, ["unknown rule 'loss_spikes'", "loss_spike, grad_norm_spike"]),
    ({"anomaly_checkpoint_on": ["nan"]}, ["anomaly_checkpoint_on", "nonfinite_loss"]),
    ({"anomaly_checkpoint_on": "overflow"}, ["anomaly_checkpoint_on", "list of rule names"]),
    ({"enabled": "yes"}, ["enabled", "true or false"]),
])
def test_bad_config_values_raise_clear_errors(bad, needles):
    with pytest.raises(ValueError) as exc:
        MonitoringConfig.from_dict(bad)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError) as exc:
        MonitoringConfig.from_dict({"overflow_thresh": 0.1})
    msg = str(exc.value)
    assert "'overflow_thresh'" in msg and "did you mean 'overflow_threshold'" in msg
    for key in MonitoringConfig.field_names():
        assert key in msg


def test_unknown_alert_level_lists_valid_levels():
    with pytest.raises(ValueError, match=r"'info', 'warn', 'error'"):
        Alert(1, "critical", "t", "x", {}, "r")


# ---------------------------------------------------------------------------- W&B (real library, offline)
def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_records_alerts(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    main = AlertManager(MonitoringConfig(), tmp_path / "out")
    replica = AlertManager(MonitoringConfig(), tmp_path / "replica", is_main_process=False)
    # No active run yet: the W&B sink is skipped silently.
    assert wandb.run is None and [a.rule for a in main.check(1, {"quantization/underflow_rate": 0.5})] == ["underflow"]

    run = wandb.init(mode="offline", dir=tmp_path, project="altgrad-tests")
    try:
        run.log({"loss": 2.0, "train/global_step": 5})
        assert [a.rule for a in main.check(5, {"quantization/overflow_rate": 0.3})] == ["overflow"]
        main.alert(6, "nonfinite_loss", "loss is nan; update skipped", {"loss": float("nan")},
                   title="x" * 80)  # over W&B's 64-char title limit: truncated, not an error
        replica.alert(6, "nonfinite_grad", "must not reach W&B")
    finally:
        wandb.finish()
    # After finish there is no active run again; alerting keeps working (file + logger only).
    assert wandb.run is None and main.alert(200, "nonfinite_loss", "late") is not None

    (log_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(iter_records(log_file))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # the run finished cleanly

    # 1) run.alert() in offline mode is kept as an AlertRecord in the transaction log (sent on `wandb sync`).
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level) for a in alerts] == [
        ("Quantization overflow rate high", "WARN"), ("x" * 62 + "…", "ERROR")]
    assert "[step 5]" in alerts[0].text and alerts[0].wait_duration == 300_000  # ms

    # 2) History rows alerts/<rule> at the right train/global_step.
    rows = [{_item_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    alert_rows = [(row["train/global_step"], k) for row in rows for k in row if k.startswith("alerts/")]
    assert alert_rows == [(5, "alerts/overflow"), (6, "alerts/nonfinite_loss")]

    # 3) Summary counts (the last summary update wins per key).
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_item_key(i): json.loads(i.value_json) for i in r.summary.update})
    # main counted the pre-run underflow alert too; the replica never wrote.
    assert summary["alerts/total"] == 3 and summary["alerts/by_rule/nonfinite_loss"] == 1
    assert summary["alerts/by_level/error"] == 1
    assert not any("must not reach" in a.text for a in alerts) and "alerts/nonfinite_grad" not in str(rows)


# ---------------------------------------------------------------------------- AlertCallback
def test_callback_queues_anomalies_for_error_level_and_listed_rules():
    cb = AlertCallback(MonitoringConfig(anomaly_checkpoint_on=["overflow"]), is_main_process=False)
    assert cb.raise_alert(Alert(1, AlertLevel.ERROR, "t", "x", {}, "nonfinite_grad"))
    assert cb.alert(2, "nonfinite_loss", "nan") is not None  # error by default -> queued
    cb.manager.check(3, {"quantization/underflow_rate": 0.9})  # bypassing the callback: not queued
    assert [a.rule for a in cb.pop_anomalies()] == ["nonfinite_grad", "nonfinite_loss"]
    assert cb.pending_anomalies == [] and cb.pop_anomalies() == []


def test_callback_in_real_trainer_run(tmp_path):
    import torch
    from torch import nn
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)

    class TinyRegressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, labels=None):
            pred = self.lin(x).squeeze(-1)
            return {"loss": nn.functional.mse_loss(pred, labels), "logits": pred}

    # Identical samples -> a smooth loss curve, so only the injected faults can fire.
    data = [{"x": torch.ones(4), "labels": torch.tensor(1.0)} for _ in range(64)]

    class InjectFaults(TrainerCallback):
        """Stands in for the quantization diagnostics (and a blow-up) by editing the logs dict in place."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" not in logs:
                return
            logs.setdefault("quantization/overflow_rate", 0.0)
            if state.global_step == 3:
                logs["quantization/overflow_rate"] = 0.25
            if state.global_step == 8:
                logs["loss"] = logs["loss"] * 1000 + 1.0

    seen: list[tuple[int, list[str]]] = []

    class Consumer(TrainerCallback):
        """What the trainer will do: drain anomaly requests after each log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            drained = alerts_cb.pop_anomalies()
            if drained:
                seen.append((state.global_step, [a.rule for a in drained]))

    cfg = MonitoringConfig(loss_spike_window=5, spike_min_history=3, grad_norm_spike_factor=None,
                           anomaly_checkpoint_on=["overflow", "loss_spike"])
    alerts_cb = AlertCallback(cfg)  # output_dir / main-process flag come from the Trainer
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=10, logging_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=TinyRegressor(), args=args, train_dataset=data,
                      callbacks=[InjectFaults(), alerts_cb, Consumer()])
    trainer.train()

    assert alerts_cb.manager.is_main_process is True
    assert seen == [(3, ["overflow"]), (8, ["loss_spike"])]
    on_disk = read_alerts(tmp_path / "run")
    assert [(a.step, a.rule) for a in on_disk] == [(3, "overflow"), (8, "loss_spike")]
    assert on_disk[1].metrics["loss"] > 3 * on_disk[1].metrics["median"]
    assert alerts_cb.manager.alert_counts()["by_level"]["warn"] == 2
