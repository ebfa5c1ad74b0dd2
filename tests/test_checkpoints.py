"""Checkpoints and resume: exact resume with quantization state, atomic writes, refusal of incompatible or
corrupt checkpoints, and W&B (offline, the real library) continuing the same run."""

from __future__ import annotations

import os

import pytest
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from altgrad.monitoring import MonitoringConfig, read_alerts
from altgrad.monitoring.wandb_offline import find_run_dirs, read_offline_run
from altgrad.training import AltGradTrainer, QuantRecipe
from test_trainer import _Windows, tiny_gpt

# Delayed scaling (amax histories) and stochastic stored weights: both must survive a resume exactly.
RECIPE = QuantRecipe.from_dict({"preset": "e5m2", "stored_weight": {"format": "E5M2", "rounding": "stochastic"}})


def _trainer(out, recipe=RECIPE, max_steps=8, report_to=(), model_kwargs=None, monitoring=None, trainer_cls=AltGradTrainer,
             save_steps=4):
    args = TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1, learning_rate=3e-3,
        save_strategy="steps", save_steps=save_steps, report_to=list(report_to), use_cpu=True, disable_tqdm=True, seed=11,
        warmup_steps=2,
    )
    return trainer_cls(
        tiny_gpt(seed=3, **(model_kwargs or {})), args, recipe=recipe, train_dataset=_Windows(), monitoring=monitoring
    )


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h}


def test_resume_is_exact(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.train()
    assert {"checkpoint-4", "checkpoint-8"} <= set(os.listdir(tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / "altgrad_quant_state.pt").is_file() and (ckpt / "altgrad_run.json").is_file()

    resumed = _trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = _losses(straight), _losses(resumed)
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    # the amax histories after the run are identical too
    sa, sb = straight.quantizer.state_dict(), resumed.quantizer.state_dict()
    for key, state in sa["quantizers"].items():
        ha, hb = state["history"], sb["quantizers"][key]["history"]
        assert (ha is None and hb is None) or (ha["history"].equal(hb["history"]) and ha["count"] == hb["count"])


def test_resume_takes_the_new_save_interval(tmp_path):
    # transformers alone would keep the checkpoint's save_steps=4 and write only checkpoint-8
    _trainer(tmp_path / "a", max_steps=4).train()
    resumed = _trainer(tmp_path / "b", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert {"checkpoint-6", "checkpoint-8"} <= set(os.listdir(tmp_path / "b"))
    assert resumed.state.save_steps == 2


class _CrashDuringSave(AltGradTrainer):
    """Simulates a process killed half-way through writing a checkpoint (after the model and
    optimizer files, before the quantization state)."""

    def save_quant_state(self, directory):
        if self.state.global_step == 8:
            raise KeyboardInterrupt("killed mid-write")
        return super().save_quant_state(directory)


def test_checkpoint_killed_mid_write_is_not_picked_up(tmp_path):
    out = tmp_path / "crash"
    trainer = _trainer(out, trainer_cls=_CrashDuringSave)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (out / "checkpoint-8").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    # and resuming from "the last checkpoint" works from checkpoint-4
    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8 and (out / "checkpoint-8" / "altgrad_quant_state.pt").is_file()


def test_incompatible_and_corrupt_checkpoints_are_refused(tmp_path):
    _trainer(tmp_path / "src", max_steps=4).train()
    ckpt = str(tmp_path / "src" / "checkpoint-4")
    with pytest.raises(ValueError, match="different architecture.*n_embd"):
        _trainer(tmp_path / "x1", model_kwargs={"n_embd": 64}).train(resume_from_checkpoint=ckpt)
    with pytest.raises(ValueError, match="recipe 'custom'.*fp8_hybrid|trained with recipe"):
        _trainer(tmp_path / "x2", recipe="fp8_hybrid").train(resume_from_checkpoint=ckpt)
    weights = tmp_path / "src" / "checkpoint-4" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 3])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        _trainer(tmp_path / "x3").train(resume_from_checkpoint=ckpt)
    assert weights.stat().st_size == len(original) // 3  # nothing on disk was touched by the refusal
    weights.write_bytes(original)


@pytest.mark.parametrize("damage", ["truncate_weights", "empty_optimizer", "garble_trainer_state", "no_quant_state"])
def test_damaged_checkpoint_is_refused_before_training(tmp_path, damage):
    """resolve_checkpoint (run during setup, before train()) opens every file a resume loads."""
    _trainer(tmp_path / "src", max_steps=8).train()
    ckpt = tmp_path / "src" / "checkpoint-8"
    if damage == "truncate_weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) - 100])
    elif damage == "empty_optimizer":
        (ckpt / "optimizer.pt").write_bytes(b"")
    elif damage == "garble_trainer_state":
        (ckpt / "trainer_state.json").write_text('{"global_step": 8, ')
    else:
        (ckpt / "altgrad_quant_state.pt").unlink()
    trainer = _trainer(tmp_path / "new")
    with pytest.raises(ValueError) as e:
        trainer.resolve_checkpoint(str(ckpt))
    message = str(e.value)
    assert "\n" not in message and str(ckpt) in message
    if damage == "no_quant_state":
        assert "has no altgrad_quant_state.pt" in message
    else:
        file = {"truncate_weights": "model.safetensors", "empty_optimizer": "optimizer.pt",
                "garble_trainer_state": "trainer_state.json"}[damage]
        assert f"corrupt or incomplete: {file} cannot be loaded" in message
        # the intact sibling is suggested instead
        assert f"training.resume_from_checkpoint={tmp_path / 'src' / 'checkpoint-4'}" in message
    assert trainer.state.global_step == 0  # refused before anything was loaded
    # the intact checkpoint still resolves
    assert trainer.resolve_checkpoint(str(tmp_path / "src" / "checkpoint-4")) == str(tmp_path / "src" / "checkpoint-4")


def test_anomaly_keep_last_null_keeps_every_anomaly_checkpoint(tmp_path):
    """anomaly_keep_last=None is documented as "keep all": it must not crash the first rotation."""
    args = TrainingArguments(
        str(tmp_path / "diverge"), max_steps=20, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e38, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    # Every bad step alerts (no cooldown) and so asks for an anomaly checkpoint; 4 of them, then the stop.
    monitoring = MonitoringConfig.from_dict({"nan_patience": 4, "nonfinite_cooldown_steps": 0, "anomaly_keep_last": None})
    trainer = AltGradTrainer(tiny_gpt(seed=0), args, recipe="e5m2", monitoring=monitoring, train_dataset=_Windows())
    trainer.train()
    assert "nan_patience=4" in trainer.stop_reason
    anomalies = sorted(p.name for p in (tmp_path / "diverge" / "anomalies").iterdir())
    assert len(anomalies) >= 3, anomalies  # more than the default-like small limits: nothing was rotated away
    assert not any(name.startswith(".tmp") for name in anomalies)


def _read_finished(run_dir, timeout=30.0):
    """The offline run once its writer has written the exit record: `wandb.finish()` can return before the
    W&B service process has flushed the last records to the .wandb file (seen on a loaded 2-core machine)."""
    import time

    deadline = time.monotonic() + timeout
    run = read_offline_run(run_dir)
    while not run.finished and time.monotonic() < deadline:
        time.sleep(0.2)
        run = read_offline_run(run_dir)
    assert run.finished, f"{run_dir}: W&B never wrote the run's exit record"
    return run


def test_wandb_offline_run_holds_metrics_and_alerts_and_resume_continues_it(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    wandb.teardown()  # wandb caches its settings (WANDB_DIR included) per process: start from this env
    # an overflow threshold of 0 fires on the first logging step: an alert we can look for
    monitoring = MonitoringConfig.from_dict({"overflow_threshold": 0.0, "underflow_threshold": 0.0})
    first = _trainer(tmp_path / "run", max_steps=4, report_to=["wandb"], monitoring=monitoring)
    first.train()
    wandb.finish()
    runs = find_run_dirs(tmp_path)
    assert len(runs) == 1
    run = _read_finished(runs[0])
    logged = [row for row in run.history if "train/loss" in row]
    assert len(logged) == 4
    assert all("train/grad_cos_sim/mean" in row and "train/quantization/bit_stall_rate" in row for row in logged)
    assert run.alerts and any("alerts/underflow" in row or "alerts/overflow" in row for row in run.history)
    assert read_alerts(tmp_path / "run")  # and the alerts.jsonl sink

    resumed = _trainer(tmp_path / "run", max_steps=8, report_to=["wandb"], monitoring=monitoring)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    wandb.finish()
    runs = find_run_dirs(tmp_path)
    assert len(runs) == 2
    ids = {read_offline_run(r).run_id for r in runs}
    assert len(ids) == 1, f"resumed run should continue the same W&B run, got {ids}"
    wandb.teardown()
