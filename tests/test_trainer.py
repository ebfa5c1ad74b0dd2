"""Quantized training: the FP32 shadow, the Trainer subclass's metrics, monitoring in the trainer, and a
real 2-process (gloo) run. Recipes, QuantLinear and the native FP8 backend have their own files
(test_recipe.py, test_quantized_linear.py, test_native_fp8.py); the helpers here (``tiny_gpt``,
``batch``, ``_Windows``) serve them all."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainingArguments

from altgrad.modeling import GPT, GPTConfig
from altgrad.training import (
    AltGradTrainer,
    FP32ShadowModel,
    QuantRecipe,
    quantize_model,
)

VOCAB = 65


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, dropout=0.0)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg))


def batch(seed: int = 0, b: int = 4, t: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


class _Windows(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, t: int = 16):
        self.data = [batch(i, b=1, t=t) for i in range(n)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.data[i].items()}


# --------------------------------------------------------------------------- shadow
def _shadow_cos(recipe, dtype=torch.float32) -> float:
    model = tiny_gpt(seed=1)
    quantize_model(model, recipe)
    shadow = FP32ShadowModel(model)
    b = batch(3)
    model(**b).loss.backward()
    shadow.sync_from(model)
    shadow.accumulate(b)
    return shadow.compare(model)


def test_shadow_of_noop_recipe_is_identical():
    m = _shadow_cos("fp32")
    assert abs(m["grad_cos_sim/mean"].item() - 1.0) < 1e-6
    assert abs(m["grad_cos_sim/min"].item() - 1.0) < 1e-6
    assert m["grad_rel_error/mean"].item() < 1e-5


def test_shadow_sees_e5m2_noise():
    m = _shadow_cos("e5m2")
    cos = m["grad_cos_sim/mean"].item()
    assert 0.9 < cos < 1.0 - 1e-6
    assert "grad_snr/transformer.h.0.attn.c_attn.weight" in m and "grad_snr_fp32/mean" in m


def test_shadow_compares_accumulated_gradient():
    model = tiny_gpt(seed=2)
    shadow = FP32ShadowModel(model)
    b1, b2 = batch(1), batch(2)
    shadow.sync_from(model)
    for b in (b1, b2):
        (model(**b).loss / 2).backward()
        shadow.accumulate(b, 2)
    m = shadow.compare(model)
    assert abs(m["grad_cos_sim/min"].item() - 1.0) < 1e-6
    assert m["grad_rel_error/mean"].item() < 1e-5  # magnitudes too: the divisor is applied like the model's
    # the shadow's own gradients are zeroed at each sync
    shadow.sync_from(model)
    assert all(p.grad is None for p in shadow.model.parameters())


# --------------------------------------------------------------------------- trainer
def _train(tmp_path, recipe, seed=0, max_steps=6, **kw):
    model = tiny_gpt(seed=seed)
    args = TrainingArguments(
        str(tmp_path / f"run-{recipe if isinstance(recipe, str) else 'custom'}-{seed}"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        **kw,
    )
    trainer = AltGradTrainer(model, args, recipe=recipe, train_dataset=_Windows(), eval_dataset=_Windows(8))
    trainer.train()
    return trainer


EXPECTED_KEYS = {
    "loss",
    "perplexity",
    "grad_norm",
    "learning_rate",
    "tokens_per_second",
    "grad_cos_sim/mean",
    "grad_cos_sim/min",
    "grad_cos_sim/transformer.h.0.attn.c_attn.weight",
    "grad_snr/mean",
    "quantization/overflow_rate",
    "quantization/underflow_rate",
    "quantization/bit_stall_rate",
    "quantization/dynamic_range_used",
    "grad_l2/transformer.h.0.mlp.c_fc.weight",
    "grad_linf/transformer.h.0.mlp.c_fc.weight",
    "grad_dead_frac/transformer.h.0.mlp.c_fc.weight",
}


def test_trainer_logs_every_metric_once_per_logging_step(tmp_path):
    from altgrad.monitoring.metrics import METRICS_FILENAME, read_metrics

    trainer = _train(tmp_path, "fp8_hybrid")
    # Every metric, per-tensor ones included, is in metrics.jsonl (and W&B); log_history keeps summaries.
    train_logs = [h for h in read_metrics(os.path.join(trainer.args.output_dir, METRICS_FILENAME)) if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6]
    for h in train_logs:
        missing = EXPECTED_KEYS - set(h)
        assert not missing, missing
        assert 0.9 < h["grad_cos_sim/mean"] <= 1.0
    metrics = trainer.evaluate()
    assert "val/loss" in trainer.state.log_history[-1] and "val/perplexity" in trainer.state.log_history[-1]
    assert metrics["eval_loss"] > 0


def test_trainer_shadow_is_like_for_like_with_accumulation_and_label_smoothing(tmp_path):
    # No quantization in float32: the shadow must reproduce the model's gradient exactly, whatever the
    # Trainer does to the loss (label smoothing, gradient accumulation, dropout masks).
    model = tiny_gpt(seed=0, dropout=0.1)
    args = TrainingArguments(
        str(tmp_path / "ga"), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=3,
        label_smoothing_factor=0.1, logging_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )
    trainer = AltGradTrainer(model, args, recipe="fp32", train_dataset=_Windows())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs
    for h in logs:
        assert abs(h["grad_cos_sim/min"] - 1.0) < 1e-6 and h["grad_rel_error/mean"] < 1e-5, h


def test_stochastic_recipe_reproducible_with_seed(tmp_path):
    recipe = QuantRecipe.from_dict({"preset": "e5m2", "stored_weight": {"format": "E5M2", "rounding": "stochastic"}})
    losses = []
    for run in range(2):
        t = _train(tmp_path / str(run), recipe, seed=5, max_steps=4)
        losses.append([h["loss"] for h in t.state.log_history if "loss" in h])
    assert losses[0] == losses[1]


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_trainer import _Windows, tiny_gpt
    from transformers import TrainingArguments
    from altgrad.training import AltGradTrainer
    args = TrainingArguments({out!r}, max_steps=4, per_device_train_batch_size=2, logging_steps=2,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    recipe = {{"preset": "e5m2", "stored_weight": {{"format": "E5M2", "rounding": "stochastic"}}}}
    trainer = AltGradTrainer(tiny_gpt(), args, recipe=recipe, train_dataset=_Windows())
    trainer.train()
    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    json.dump(checksum, open({out!r} + f"/params-{{trainer.args.process_index}}.json", "w"))
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        json.dump({{"world": trainer.accelerator.num_processes, "logs": logs}}, open({out!r} + "/result.json", "w"))
    """
)


@pytest.mark.slow
def test_two_process_gloo_run_has_finite_reduced_metrics(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out)))
    cfg = tmp_path / "accelerate_cpu2.yaml"
    cfg.write_text("distributed_type: MULTI_GPU\nuse_cpu: true\nnum_processes: 2\nnum_machines: 1\nmachine_rank: 0\n"
                   "mixed_precision: 'no'\nmain_training_function: main\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), str(script)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world"] == 2
    # the replicas stay identical (stochastic rounding included)
    assert json.loads((out / "params-0.json").read_text()) == json.loads((out / "params-1.json").read_text())
    for h in result["logs"]:
        for key in ("loss", "grad_cos_sim/mean", "quantization/overflow_rate", "quantization/bit_stall_rate"):
            assert key in h and h[key] == h[key] and abs(h[key]) != float("inf"), (key, h.get(key))
        assert 0.9 < h["grad_cos_sim/mean"] <= 1.0


# --------------------------------------------------------------------------- monitoring in the trainer
def test_divergent_run_alerts_checkpoints_and_stops(tmp_path):
    from altgrad.monitoring import MonitoringConfig, read_alerts

    model = tiny_gpt(seed=0)
    args = TrainingArguments(
        str(tmp_path / "diverge"), max_steps=40, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e38, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    monitoring = MonitoringConfig.from_dict({"nan_patience": 3, "anomaly_keep_last": 2})
    trainer = AltGradTrainer(model, args, recipe="e5m2", monitoring=monitoring, train_dataset=_Windows())
    trainer.train()
    assert trainer.state.global_step < 40, "training should stop after nan_patience bad steps"
    assert "nan_patience=3" in trainer.stop_reason
    alerts = read_alerts(tmp_path / "diverge")
    rules = {a.rule for a in alerts}
    assert "nonfinite_loss" in rules or "nonfinite_grad" in rules
    for line in (tmp_path / "diverge" / "alerts.jsonl").read_text().splitlines():
        assert {"step", "level", "title", "text", "metrics"} <= set(json.loads(line))
    anomalies = sorted((tmp_path / "diverge" / "anomalies").iterdir())
    assert 1 <= len(anomalies) <= 2 and not any(p.name.startswith(".tmp") for p in anomalies)
    ckpt = anomalies[0]
    # Reload the anomaly checkpoint and re-run its batch: the loss is non-finite again.
    reloaded = GPT.from_pretrained(ckpt)
    b = torch.load(ckpt / "batch.pt")
    with torch.no_grad():
        quantize_model(reloaded, "e5m2")
        loss = reloaded(input_ids=b["input_ids"], labels=b["labels"]).loss
    recorded = json.loads((ckpt / "anomaly.json").read_text())
    assert not math.isfinite(recorded["metrics"]["loss"]) or recorded["metrics"]["nonfinite_layers"]
    assert not torch.isfinite(loss), "re-running the saved batch reproduces the non-finite loss"
    assert (ckpt / "altgrad_quant_state.pt").is_file() and (ckpt / "optimizer.pt").is_file()
    run_info = json.loads((ckpt / "altgrad_run.json").read_text())  # the same run info as a checkpoint's
    assert run_info["recipe"]["weight"]["format"] == "E5M2" and "consecutive_bad_steps" in run_info
