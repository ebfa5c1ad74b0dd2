"""`QuantSession` in a plain PyTorch loop: the same losses, weights and metrics as `AltGradTrainer` for the
same batches (bitwise, on CPU), the non-finite verdict, and recipes/plain_loop.py end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

from altgrad.monitoring import MonitoringConfig
from altgrad.monitoring import metrics as M
from altgrad.training import AltGradTrainer, QuantSession
from test_trainer import _Windows, tiny_gpt

REPO = Path(__file__).resolve().parents[1]


class _RecordingTrainer(AltGradTrainer):
    """Keeps every micro-batch and its loss, so a plain loop can replay exactly what the Trainer saw."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = getattr(self, "batches", [])
        self.batches.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses = getattr(self, "losses", []) + [loss.item()]
        return loss


def test_plain_loop_reproduces_the_trainer_bitwise(tmp_path):
    steps, recipe = 6, "fp8_hybrid"
    args = TrainingArguments(
        str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4, logging_steps=2, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = _RecordingTrainer(tiny_gpt(seed=0), args, recipe=recipe, shadow_every=2, train_dataset=_Windows())
    trainer.train()
    trainer_logs = [r for r in M.read_metrics(tmp_path / "trainer" / M.METRICS_FILENAME) if "loss" in r]

    # The plain loop: same initial weights, same batches, the loss the Trainer computes (summed over the
    # batch's tokens / their count), AdamW and clipping as the Trainer configures them.
    model = tiny_gpt(seed=0)
    session = QuantSession(model, recipe, shadow_every=2, log_every=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses, session_logs = [], []
    for batch, num_items in trainer.batches:
        session.begin_step()
        loss = session.forward_backward(batch, lambda m, b, n=num_items: m(**b, num_items_in_batch=n).loss)
        assert session.before_optimizer_step().ok
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs = session.end_step(loss)
        losses.append(loss.item())
        if logs is not None:
            session_logs.append(logs)

    assert losses == trainer.losses  # bitwise
    for p_plain, p_trainer in zip(model.parameters(), trainer.model.parameters()):
        assert torch.equal(p_plain, p_trainer)
    assert len(session_logs) == len(trainer_logs) == steps // 2
    for mine, theirs in zip(session_logs, trainer_logs):
        for key in (M.COS_SIM_MEAN, M.COS_SIM_MIN, M.OVERFLOW_RATE, M.UNDERFLOW_RATE, M.BIT_STALL_RATE,
                    "quantization/transformer.h.0.mlp.c_fc/weight/sqnr_db", "grad_l2/transformer.h.1.attn.c_attn.weight"):
            assert mine[key] == theirs[key], key


def test_bad_steps_are_skipped_alerted_and_stop_the_loop(tmp_path):
    model = tiny_gpt(seed=0)
    session = QuantSession(model, "e5m2", monitoring=MonitoringConfig(nan_patience=2, nonfinite_cooldown_steps=0),
                           output_dir=str(tmp_path))
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 65, (2, 16))
    verdicts = []
    for _ in range(2):
        session.begin_step()
        # A non-finite loss, as a diverged run produces.
        session.forward_backward({"input_ids": ids, "labels": ids}, lambda m, b: m(**b).loss * float("inf"))
        verdicts.append(session.before_optimizer_step())
        session.end_step()
    assert [v.ok for v in verdicts] == [False, False] and [v.stop for v in verdicts] == [False, True]
    assert "nan_patience=2" in verdicts[1].message
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Error level: each asks for an anomaly checkpoint (the gradients of an infinite loss are not finite either).
    assert [a.rule for a in verdicts[0].anomalies] == ["nonfinite_loss", "nonfinite_grad"]
    assert session.bad_steps == 2 and (tmp_path / "alerts.jsonl").read_text().count("nonfinite_loss") == 2


def test_session_state_round_trips():
    model = tiny_gpt(seed=0)
    session = QuantSession(model, "e5m2")
    ids = torch.randint(0, 65, (2, 16))
    for _ in range(3):
        session.begin_step()
        session.forward_backward({"input_ids": ids, "labels": ids})
        session.before_optimizer_step()
        session.end_step()
    other = QuantSession(tiny_gpt(seed=0), "e5m2")
    other.load_state_dict(session.state_dict())
    assert other.step == 3 and other.state_dict()["quantizer"].keys() == session.state_dict()["quantizer"].keys()


def test_plain_loop_recipe_runs(tmp_path, shakespeare_path):
    env = dict(os.environ, ALTGRAD_TINYSHAKESPEARE=str(shakespeare_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "plain_loop.py"), "--max-steps", "20", "--shadow-every", "5",
         "--out", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/20", "20/20"], proc.stdout
    assert "grad cos" in lines[-1] and "eval step 20 | val loss" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / M.METRICS_FILENAME).is_file()
