"""Replay of an anomalous step, the culprit search, and resuming with the recipe it writes.

One real AltGradTrainer run (module fixture) goes non-finite every step: one layer's output gradient is
rounded into E4M3 with a scale that maps its amax 8x past the format's range, without saturation. It
saves a regular checkpoint at step 2 and an anomaly checkpoint at every bad step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import replay as replay_cli  # noqa: E402  (recipes/replay.py)
from test_trainer import _Windows, tiny_gpt  # noqa: E402

from altgrad.monitoring import MonitoringConfig  # noqa: E402
from altgrad.training import AltGradTrainer, QuantRecipe  # noqa: E402
from altgrad.training.checkpointing import CheckpointError, check_compatible  # noqa: E402
from altgrad.training.replay import ReplayCheckpoint, ReplayError, find_culprits, promote, replay_step  # noqa: E402

CULPRIT = "transformer.h.1.mlp.c_proj/grad_output"
BROKEN = {
    "name": "broken", "weight": "e4m3", "activation": "e4m3", "grad_output": "e5m2", "weight_grad": "e5m2",
    "overrides": {CULPRIT: {"format": "e4m3", "scaling": "current", "margin": -3, "saturate": False}},
}


def _args(out, **kw):
    settings = dict(max_steps=4, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3, report_to=[],
                    save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True)
    settings.update(kw)
    return TrainingArguments(str(out), **settings)


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "broken"
    monitoring = MonitoringConfig.from_dict({"nan_patience": None, "nonfinite_cooldown_steps": 0})
    trainer = AltGradTrainer(tiny_gpt(seed=0), _args(out), recipe=BROKEN, monitoring=monitoring,
                             train_dataset=_Windows(), shadow_every=1)
    trainer.train()
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_replay_reproduces_the_recorded_step_bit_for_bit(broken_run):
    folder = broken_run / "anomalies" / "step-3-nonfinite_grad"
    recorded = json.loads((folder / "anomaly.json").read_text())
    assert recorded["state"] == "before_step"
    ckpt = ReplayCheckpoint.load(folder)
    assert ckpt.step == 3 and len(ckpt.ranks) == 1
    result = replay_step(ckpt)
    # The loss stays finite (only gradients overflow), so bit equality is a real check.
    assert math.isfinite(recorded["metrics"]["loss"])
    assert result.loss == recorded["metrics"]["loss"]
    assert list(result.nonfinite) == recorded["metrics"]["nonfinite_layers"] and not result.healthy
    # Twice gives the same (every replay rebuilds the model from the checkpoint).
    assert replay_step(ckpt).loss == result.loss


def test_culprit_search_finds_exactly_the_broken_tensor_and_never_writes_into_the_run(broken_run, tmp_path, capsys):
    folder = broken_run / "anomalies" / "step-3-nonfinite_grad"
    before = _digest(broken_run)
    assert replay_cli.main([str(folder), "--out", str(tmp_path / "rep")]) == 0
    assert _digest(broken_run) == before, "replay wrote into the run's folders"
    out = capsys.readouterr().out
    assert "reproduced bit for bit" in out and CULPRIT in out
    report = json.loads((tmp_path / "rep" / "replay.json").read_text())
    assert report["culprits"] == [CULPRIT] and report["verdict"] == "culprits"
    assert report["reproduced"] == {"loss": True, "nonfinite_layers": True}
    # ddmin over 32 candidates: far fewer replays than one per candidate.
    assert len(report["candidates"]) == 32 and report["replays"] < 32
    assert report["ranking"][0]["tensor"] == CULPRIT and report["ranking"][0]["healthy"]
    recipe = QuantRecipe.from_dict(yaml.safe_load((tmp_path / "rep" / "culprits.yaml").read_text()))
    assert recipe.spec_for("transformer.h.1.mlp.c_proj", "grad_output") is None
    assert recipe.spec_for("transformer.h.0.mlp.c_proj", "grad_output").format == "E5M2"
    ckpt = ReplayCheckpoint.load(folder)
    fixed = replay_step(ckpt, recipe)
    assert fixed.healthy and fixed.finite and fixed.cos_sim >= 0.9


def test_resume_from_the_checkpoint_before_the_anomaly_with_the_culprit_recipe(broken_run, tmp_path):
    ckpt = ReplayCheckpoint.load(broken_run / "anomalies" / "step-3-nonfinite_grad")
    report = find_culprits(ckpt)
    recipe = promote(ckpt.recipe, report.culprits, name="broken+hp")
    resume_from = str(broken_run / "checkpoint-2")
    check_compatible(resume_from, ckpt.config, recipe)  # a promotion of the checkpoint's recipe: allowed
    with pytest.raises(CheckpointError, match="resume with the same quantization recipe"):
        check_compatible(resume_from, ckpt.config, QuantRecipe.from_dict("e5m2"))  # anything else is not
    out = tmp_path / "resumed"
    trainer = AltGradTrainer(tiny_gpt(seed=0), _args(out), recipe=recipe, train_dataset=_Windows(), shadow_every=1)
    trainer.train(resume_from_checkpoint=resume_from)
    assert trainer.state.global_step == 4
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert not (out / "anomalies").exists(), "the resumed steps are healthy"
    assert not (out / "alerts.jsonl").exists() or not any(
        "nonfinite" in line for line in (out / "alerts.jsonl").read_text().splitlines())


def test_a_healthy_checkpoint_replays_healthy(tmp_path, capsys):
    out = tmp_path / "healthy"
    trainer = AltGradTrainer(tiny_gpt(seed=0), _args(out, max_steps=2), recipe="fp8_hybrid",
                             train_dataset=_Windows(), shadow_every=1)
    trainer.train()
    batch_path = tmp_path / "batch.pt"
    torch.save(_Windows().data[5], batch_path)
    assert replay_cli.main([str(out / "checkpoint-2"), "--batch", str(batch_path), "--out", str(tmp_path / "r")]) == 0
    assert "healthy: step 3 replays finite" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "replay.json").read_text())
    assert report["verdict"] == "healthy" and report["culprits"] == [] and report["replays"] == 1
    assert not (tmp_path / "r" / "culprits.yaml").exists()


def _one_line_error(capsys, argv) -> str:
    assert replay_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(broken_run, tmp_path, capsys):
    assert "is not a directory" in _one_line_error(capsys, [str(tmp_path / "nope")])
    assert "has no config.json" in _one_line_error(capsys, [str(tmp_path)])
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "'llama' model" in _one_line_error(capsys, [str(other)])
    assert "regular checkpoint" in _one_line_error(capsys, [str(broken_run / "checkpoint-2")])
    # Files of another recipe: altgrad_run.json names a recipe the scaling state was not saved with.
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(broken_run / "anomalies" / "step-3-nonfinite_grad", mixed)
    info = json.loads((mixed / "altgrad_run.json").read_text())
    info["recipe"] = QuantRecipe.from_dict("e5m2").to_dict()
    (mixed / "altgrad_run.json").write_text(json.dumps(info))
    assert "different runs" in _one_line_error(capsys, [str(mixed), "--out", str(tmp_path / "x")])
    # A batch from another tokenizer.
    wide = tmp_path / "wide.pt"
    torch.save({"input_ids": torch.full((2, 16), 500), "labels": torch.full((2, 16), 500)}, wide)
    assert "another tokenizer" in _one_line_error(capsys, [str(broken_run / "checkpoint-2"), "--batch", str(wide)])
    with pytest.raises(ReplayError):
        ReplayCheckpoint.load(tmp_path / "nope")


def test_recipe_overrides_are_data():
    r = QuantRecipe.from_dict(BROKEN)
    assert QuantRecipe.from_dict(r.to_dict()) == r and r.to_dict()["overrides"][CULPRIT]["margin"] == -3
    assert "overrides" not in QuantRecipe.from_dict("e5m2").to_dict()  # old checkpoints compare unchanged
    with pytest.raises(ValueError, match="'<module pattern>/<role>'"):
        QuantRecipe.from_dict({"preset": "e5m2", "overrides": {"transformer.h.0.mlp.c_fc": None}})
    with pytest.raises(ValueError, match="role one of"):
        QuantRecipe.from_dict({"preset": "e5m2", "overrides": {"*/gradient": None}})
    with pytest.raises(ValueError, match="tile"):
        QuantRecipe.from_dict({"preset": "e5m2", "overrides": {
            "*/activation": {"format": "e4m3", "scaling": "current", "granularity": "tile"}}})
    promoted = promote(r, [CULPRIT])
    assert promoted.spec_for("transformer.h.1.mlp.c_proj", "grad_output") is None and promoted.promotes(r)
    assert not r.promotes(promoted)
