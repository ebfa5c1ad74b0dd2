"""What a run shows a person and what it keeps: one compact console line per logging step, per-tensor
metrics in metrics.jsonl (not in trainer_state.json), alerts only for what a user would act on, and the
CPU thread count a run picks."""

from __future__ import annotations

import json

import pytest
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from altgrad.cpu_threads import LauncherInfo, choose_cpu_threads
from altgrad.monitoring import MonitoringConfig, read_alerts
from altgrad.monitoring import metrics as M
from altgrad.monitoring.console import ConsoleCallback, MetricsFileCallback, format_log_line
from altgrad.training import AltGradTrainer, QuantRecipe
from test_trainer import _Windows, tiny_gpt


def _trainer(out, recipe, max_steps=6, monitoring=None, shadow_every=1, **kw) -> AltGradTrainer:
    settings = dict(max_steps=max_steps, per_device_train_batch_size=4, logging_steps=2, learning_rate=1e-3,
                    report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    args = TrainingArguments(str(out), **{**settings, **kw})
    return AltGradTrainer(tiny_gpt(seed=0), args, recipe=recipe, shadow_every=shadow_every,
                          monitoring=monitoring, train_dataset=_Windows(), eval_dataset=_Windows(8))


# --------------------------------------------------------------------------- console
def test_console_prints_one_short_line_per_logging_step(tmp_path, capsys):
    trainer = _trainer(tmp_path / "run", "fp8_hybrid")
    trainer.train()
    trainer.evaluate()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["2/6", "4/6", "6/6"], out
    for line in step_lines:
        assert len(line) <= 300, line
        for field in ("loss ", "lr ", "tok/s", "grad cos", "ovf", "unf", "fwd-copy stall"):
            assert field in line, (field, line)
    assert any(line.startswith("eval step 6 | val loss") for line in lines), out
    assert any(line.startswith("trained 6/6 steps in") for line in lines), out
    assert "grad_l2/" not in out and "quantization/transformer" not in out and "{" not in out


def test_console_replaces_the_trainers_dict_echo_in_both_modes(tmp_path):
    for disable_tqdm in (False, True):
        trainer = _trainer(tmp_path / f"t{disable_tqdm}", None, disable_tqdm=disable_tqdm)
        kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
        assert ConsoleCallback in kinds and MetricsFileCallback in kinds
        assert ProgressCallback not in kinds and PrinterCallback not in kinds
        console = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ConsoleCallback))
        assert console.show_bar is (not disable_tqdm)


def test_format_log_line_reports_stored_weight_stall_and_ignores_unknown_dicts():
    line = format_log_line({"loss": 3.0, M.BIT_STALL_RATE: 0.2, M.STORED_WEIGHT_BIT_STALL_RATE: 0.2}, step=5)
    assert line == "step 5 | loss 3.0000 | stored-weight stall 20.0%"
    assert format_log_line({"custom": 1.0}, step=5) is None


# --------------------------------------------------------------------------- metrics.jsonl and trainer_state.json
def test_per_tensor_metrics_go_to_metrics_jsonl_not_the_checkpointed_history(tmp_path):
    trainer = _trainer(tmp_path / "run", "fp8_hybrid")
    trainer.train()
    rows = M.read_metrics(tmp_path / "run" / M.METRICS_FILENAME)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for key in ("grad_l2/transformer.h.0.mlp.c_fc.weight", "grad_cos_sim/transformer.h.0.attn.c_attn.weight",
                "quantization/transformer.h.0.mlp.c_fc/weight/sqnr_db", "quantization/bit_stall/transformer.h.0.mlp.c_fc",
                M.COS_SIM_MEAN, M.OVERFLOW_RATE, M.BIT_STALL_RATE):
        assert all(key in r for r in train_rows), key
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [2, 4, 6]
    for h in history:
        assert not [k for k in h if M.is_per_tensor(k)], h
        assert {M.COS_SIM_MEAN, M.COS_SIM_MIN, M.OVERFLOW_RATE, M.BIT_STALL_RATE} <= set(h)
        assert M.STORED_WEIGHT_BIT_STALL_RATE not in h  # float32 master weights store nothing in the format
    # Each history entry is the summary of the matching metrics.jsonl row.
    assert history[0] == {k: v for k, v in train_rows[0].items() if not M.is_per_tensor(k)}


def test_metrics_jsonl_drops_rows_past_the_checkpoint_a_run_resumes_from(tmp_path):
    out = tmp_path / "run"
    first = _trainer(out, "e5m2", max_steps=6, save_strategy="steps", save_steps=4)
    first.train()
    assert [r["step"] for r in M.read_metrics(out / M.METRICS_FILENAME) if "loss" in r] == [2, 4, 6]
    resumed = _trainer(out, "e5m2", max_steps=8, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert [r["step"] for r in M.read_metrics(out / M.METRICS_FILENAME) if "loss" in r] == [2, 4, 6, 8]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert not [k for h in state["log_history"] for k in h if M.is_per_tensor(k)]


# --------------------------------------------------------------------------- alerts a user acts on
def test_healthy_fp8_hybrid_run_raises_no_alert_though_its_forward_copy_stalls(tmp_path):
    trainer = _trainer(tmp_path / "run", "fp8_hybrid", max_steps=30)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    # The forward copy of the float32 master weights stalls most updates: logged, harmless, not alerted.
    assert max(h[M.BIT_STALL_RATE] for h in history) > MonitoringConfig().bit_stall_threshold
    assert read_alerts(tmp_path / "run") == []


def test_stored_weight_bit_stall_is_alerted(tmp_path):
    recipe = QuantRecipe.from_dict({"preset": "e5m2", "stored_weight": {"format": "E5M2"}})
    trainer = _trainer(tmp_path / "run", recipe, max_steps=6, learning_rate=1e-5)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h[M.STORED_WEIGHT_BIT_STALL_RATE] > 0.5 for h in history)
    alerts = read_alerts(tmp_path / "run")
    assert [a.rule for a in alerts] == ["bit_stall"]
    assert M.STORED_WEIGHT_BIT_STALL_RATE in alerts[0].text


# --------------------------------------------------------------------------- CPU threads
@pytest.mark.parametrize(
    "requested, launcher, local, cores, expected",
    [
        (None, LauncherInfo(is_accelerate=True), 1, 2, 2),  # accelerate's default OMP_NUM_THREADS=1 is not a choice
        (None, LauncherInfo(is_accelerate=True), 2, 2, 1),
        (None, LauncherInfo(is_accelerate=True), 3, 2, 1),
        (None, LauncherInfo(num_cpu_threads_per_process=3, omp_num_threads=1, is_accelerate=True), 1, 8, 3),
        (None, LauncherInfo(omp_num_threads=1, is_accelerate=True), 1, 8, 1),  # the user's own OMP_NUM_THREADS
        (4, LauncherInfo(omp_num_threads=1), 1, 8, 4),  # training.cpu_threads wins
    ],
)
def test_cpu_threads_divide_the_cores_unless_the_user_chose(requested, launcher, local, cores, expected):
    choice = choose_cpu_threads(requested, local, available_cores=cores, launcher=launcher)
    assert choice.threads == expected, choice
