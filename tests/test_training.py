"""Quantized training: recipes, QuantLinear against hand-computed GEMMs, delayed scaling, the FP32 shadow,
the Trainer subclass's metrics, and a real 2-process (gloo) run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from transformers import TrainingArguments

from altgrad.modeling import GPT, GPTConfig
from altgrad.quantization import fake_quantize
from altgrad.training.native_fp8 import CPU_ENV
from altgrad.training import (
    AltGradTrainer,
    FP32ShadowModel,
    QuantLinear,
    QuantRecipe,
    TensorQuantSpec,
    get_recipe,
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


# --------------------------------------------------------------------------- recipes
def test_presets_and_yaml_friendly_round_trip():
    for name in ("bf16", "e5m2", "fp8_hybrid", "mxfp8", "e3m4", "e2m5", "e1m6", "e7m0"):
        r = get_recipe(name)
        assert QuantRecipe.from_dict(r.to_dict()) == r
    assert get_recipe("bf16").is_noop
    hybrid = get_recipe("fp8_hybrid")
    assert (hybrid.weight.format, hybrid.activation.format, hybrid.grad_output.format) == ("E4M3", "E4M3", "E5M2")
    custom = QuantRecipe.from_dict({"preset": "e5m2", "stored_weight": {"format": "e5m2", "rounding": "stochastic"}})
    assert custom.stored_weight.rounding == "stochastic" and custom.weight.format == "E5M2"


@pytest.mark.parametrize(
    "data, match",
    [
        ({"wieght": "e4m3"}, "unknown key.*valid keys"),
        ({"weight": {"format": "e4m3", "round": "nearest"}}, "unknown key.*valid keys"),
        ({"weight": {"format": "e9m9"}}, "unknown format"),
        ({"weight": {"format": "e4m3", "scaling": "lazy"}}, "accepted"),
        ({"weight": {"format": "e4m3", "granularity": "row"}}, "needs scaling='current'"),
        ({"preset": "fp9"}, "unknown recipe preset"),
        ({"backend": "tpu"}, "accepted"),
        ({"weight": {"format": "e8m0"}}, "no sign bit"),
        ({"weight": {"format": "e4m3", "power_of_two": "false"}}, "must be true or false"),
        ({"modules": 5}, "list of module-name patterns"),
    ],
)
def test_bad_recipes_are_rejected_clearly(data, match):
    with pytest.raises(ValueError, match=match):
        QuantRecipe.from_dict(data)


def test_default_patterns_select_block_linears_only():
    model = tiny_gpt()
    q = quantize_model(model, "e5m2")
    names = [n for n, _ in q.layers]
    assert names == [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert not isinstance(model.lm_head, QuantLinear)
    with pytest.raises(ValueError, match="selects no Linear layer"):
        quantize_model(tiny_gpt(), QuantRecipe(weight=TensorQuantSpec("E4M3"), modules=("nothing.*",)))


# --------------------------------------------------------------------------- QuantLinear
def test_quant_linear_equals_matmuls_of_fake_quantized_operands():
    torch.manual_seed(0)
    spec = dict(scaling="current")
    recipe = QuantRecipe(
        weight=TensorQuantSpec("E4M3", **spec),
        activation=TensorQuantSpec("E4M3", **spec),
        grad_output=TensorQuantSpec("E5M2", **spec),
    )
    lin = nn.Linear(32, 48)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    net = nn.Sequential(lin)
    quantize_model(net, recipe, modules=["0"])
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = net(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    def fq(t, fmt):  # current per-tensor scaling, computed independently
        s = 448.0 / t.abs().max() if fmt == "E4M3" else 57344.0 / t.abs().max()
        return fake_quantize(t, fmt, s)

    xq, wq, gq = fq(x.detach(), "E4M3"), fq(ref_w, "E4M3"), fq(dy, "E5M2")
    assert torch.equal(y.detach(), torch.nn.functional.linear(xq, wq, ref_b))
    assert torch.allclose(x.grad, gq @ wq, atol=1e-6)
    assert torch.allclose(lin.weight.grad, gq.reshape(-1, 48).t() @ xq.reshape(-1, 32), atol=1e-5)
    assert torch.allclose(lin.bias.grad, dy.reshape(-1, 48).sum(0), atol=1e-6)
    assert not torch.equal(lin.weight.grad, dy.reshape(-1, 48).t() @ x.detach().reshape(-1, 32))


def test_delayed_scaling_uses_history_not_current_amax():
    recipe = QuantRecipe(activation=TensorQuantSpec("E4M3", scaling="delayed", amax_history_len=4))
    net = nn.Sequential(nn.Linear(8, 8))
    q = quantize_model(net, recipe, modules=["0"])
    act = q.layers[0][1].quantizers["activation"]
    net(torch.full((2, 8), 2.0))  # first call: no history, its own amax 2 -> scale 224
    assert act.last_scale.item() == 224.0
    net(torch.full((2, 8), 100.0))  # history max is 2: scale stays 224, so 100*224 overflows (saturates)
    assert act.last_scale.item() == 224.0
    net(torch.full((2, 8), 1.0))  # history now holds 100: scale 4.48
    assert act.last_scale.item() == pytest.approx(4.48)
    state = q.state_dict()
    q2 = quantize_model(nn.Sequential(nn.Linear(8, 8)), recipe, modules=["0"])
    q2.load_state_dict(state)
    assert torch.equal(q2.layers[0][1].quantizers["activation"].history.get_amax(), torch.tensor(100.0))
    with pytest.raises(ValueError, match="different recipe"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), "e5m2", modules=["0"]).load_state_dict(state)


def test_evaluation_leaves_delayed_scaling_and_stats_untouched():
    model = tiny_gpt()
    q = quantize_model(model, "fp8_hybrid")
    b = batch()
    for _ in range(2):  # two training steps announced like the trainer does
        q.begin_step()
        q.set_collect_stats(True)
        model(**b).loss.backward()
    before = q.state_dict()
    model.eval()
    with torch.no_grad():
        for i in range(5):
            model(**batch(10 + i))
    model.train()
    after = q.state_dict()
    for key, state in before["quantizers"].items():
        h0, h1 = state["history"], after["quantizers"][key]["history"]
        assert h0["count"] == h1["count"] and torch.equal(h0["history"], h1["history"]), key
        assert torch.equal(state["step_amax"], after["quantizers"][key]["step_amax"]), key
    act = q.layers[0][1].quantizers["activation"]
    assert act._stat_count == 2  # the two training forwards, none of the evaluation ones


def test_amax_statistic_is_a_max_over_calls():
    net = nn.Sequential(nn.Linear(4, 4))
    q = quantize_model(net, QuantRecipe(activation=TensorQuantSpec("E4M3", scaling="current")), modules=["0"])
    q.set_collect_stats(True)
    net(torch.full((2, 4), 1.0))
    net(torch.full((2, 4), 100.0))
    assert q.pop_stats()["0/activation/amax"].item() == 100.0


def test_logged_step_statistics_come_from_the_rounding_pass_and_match_a_recount():
    from altgrad.quantization import quantization_stats, quantize

    spec = TensorQuantSpec("E4M3", scaling="current", rounding="stochastic")
    net = nn.Sequential(nn.Linear(64, 8))
    q = quantize_model(net, QuantRecipe(activation=spec), modules=["0"])
    act = q.layers[0][1].quantizers["activation"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * torch.exp2(torch.randint(-18, 12, (16, 64), generator=g).float())
    torch.manual_seed(5)
    plain = net(x)  # not collecting: no statistics
    assert q.pop_stats() == {}
    q.set_collect_stats(True)
    torch.manual_seed(5)
    logged = net(x)
    assert torch.equal(plain, logged)  # collecting changes no value (same stochastic bits)
    stats = q.pop_stats()
    torch.manual_seed(5)
    recount = quantization_stats(x, "E4M3", act.last_scale, q=quantize(x, "E4M3", act.last_scale, rounding="stochastic"))
    for key, value in recount.items():
        assert stats[f"0/activation/{key}"].item() == pytest.approx(value.item(), rel=1e-6), key
    assert stats["0/activation/underflow_rate"].item() > 0.1  # 30 binades of data in E4M3's 17


def test_statistics_pool_the_calls_of_a_logged_step():
    net = nn.Sequential(nn.Linear(4, 4))
    q = quantize_model(net, QuantRecipe(activation=TensorQuantSpec("E4M3", scaling="none")), modules=["0"])
    q.set_collect_stats(True)
    x1, x2 = torch.tensor([[1000.0, 1.0, 1e-9, 0.3]]), torch.tensor([[1.0, 2.0, 0.5, 0.25]])
    net(x1)
    net(x2)
    stats = {k.split("/")[-1]: v.item() for k, v in q.pop_stats().items()}
    assert stats["overflow_rate"] == 1 / 8 and stats["underflow_rate"] == 1 / 8 and stats["amax"] == 1000.0
    noise = (1000.0 - 448.0) ** 2 + 1e-18 + (0.3 - 0.3125) ** 2  # x2 is exact in E4M3
    signal = float((x1.double() ** 2).sum() + (x2.double() ** 2).sum())
    assert stats["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert stats["scale"] == 1.0 and q.pop_stats() == {}  # popping resets


def test_gradient_checkpointing_sees_the_same_frozen_scales():
    grads = []
    for checkpointing in (False, True):
        model = tiny_gpt(seed=6, dropout=0.0)
        if checkpointing:
            model.activation_checkpointing_enable()
        q = quantize_model(model, "fp8_hybrid")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            q.begin_step()
            model(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        q.begin_step()
        model(**batch(9)).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        counts = {k: s["history"]["count"] for k, s in q.state_dict()["quantizers"].items() if s["history"]}
        assert set(counts.values()) == {3}, counts  # one history entry per optimizer step
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_stored_weights_and_bit_stall_hand_count():
    recipe = QuantRecipe(stored_weight=TensorQuantSpec("E4M3", scaling="none"))
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 2.0, 0.5]]))
    net = nn.Sequential(lin)
    q = quantize_model(net, recipe, modules=["0"])
    q.snapshot_weights()
    with torch.no_grad():  # an "optimizer step": E4M3 spacing is 0.125 at 1, 0.25 at 2, 0.0625 at 0.5
        lin.weight += torch.tensor([[0.01, 0.2, 0.0, 0.05]])
    q.after_optimizer_step()
    # updated: 0, 1, 3; stalled: 0 (1.01 -> 1.0); 3 moves 0.5 -> 0.5625
    assert q.bit_stall.get_stall_rate() == pytest.approx(1 / 3)
    assert torch.equal(lin.weight.detach(), torch.tensor([[1.0, 1.25, 2.0, 0.5625]]))


def test_saved_quantized_model_is_a_plain_model(tmp_path):
    model = tiny_gpt()
    keys_before = set(model.state_dict())
    quantize_model(model, "fp8_hybrid")
    assert set(model.state_dict()) == keys_before
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    ids = batch()["input_ids"]
    plain = tiny_gpt()
    assert torch.equal(loaded(ids).logits, plain(ids).logits)


def test_remove_restores_plain_linears_with_the_same_parameters():
    model = tiny_gpt()
    weight = model.transformer.h[0].mlp.c_fc.weight
    q = quantize_model(model, "fp8_hybrid")
    q.remove()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert model.transformer.h[0].mlp.c_fc.weight is weight
    assert torch.equal(model(**batch()).logits, tiny_gpt()(**batch()).logits)


def test_quantized_model_runs_under_torch_compile():
    model = tiny_gpt()
    quantize_model(model, "fp8_hybrid")
    compiled = torch.compile(model, backend="aot_eager")
    b = batch()
    loss = compiled(**b).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


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
    m = _shadow_cos("bf16")
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
    trainer = AltGradTrainer(model, args, recipe="bf16", train_dataset=_Windows())
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
    from test_training import _Windows, tiny_gpt
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


# --------------------------------------------------------------------------- native FP8 backend
def test_native_fp8_falls_back_to_identical_simulation_with_a_note(caplog):
    recipe = QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": "native_fp8"})
    b = batch()
    results = []
    for r in (recipe, "fp8_hybrid"):
        model = tiny_gpt(seed=4)
        quantize_model(model, r)
        with caplog.at_level("WARNING", logger="altgrad.training.quantized_linear"):
            loss = model(**b).loss
        loss.backward()
        results.append((loss.detach(), model.transformer.h[0].attn.c_attn.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    notes = [r.getMessage() for r in caplog.records if "native_fp8" in r.getMessage()]
    assert notes and "runs simulated" in notes[0]
    assert len(notes) == 8  # one note per converted layer, not one per call


_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _FP8_GPU, reason="needs FP8 tensor cores")])],
)
@pytest.mark.parametrize(
    "scaling, granularity", [("delayed", "tensor"), ("current", "tensor"), ("current", "row"), ("current", "mixed")]
)
def test_native_fp8_matches_simulation_to_accumulation_error(device, scaling, granularity, monkeypatch, caplog):
    # On CPU, torch's own _scaled_mm runs the native path: same layouts, scales and autograd as on GPU.
    monkeypatch.setenv(CPU_ENV, "1")

    def spec(fmt):
        gran = {"tensor": "tensor", "row": "row", "mixed": "row" if fmt == "E4M3" else "tensor"}[granularity]
        return {"format": fmt, "scaling": scaling, "granularity": gran}

    recipes = {
        backend: QuantRecipe.from_dict(
            {"weight": spec("E4M3"), "activation": spec("E4M3"), "grad_output": spec("E5M2"), "backend": backend}
        )
        for backend in ("native_fp8", "simulated")
    }
    outs = {}
    for backend, recipe in recipes.items():
        torch.manual_seed(1)
        lin = nn.Linear(256, 512).to(device)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
        net = nn.Sequential(lin)
        quantize_model(net, recipe, modules=["0"])
        g = torch.Generator().manual_seed(2)
        x = torch.randn(4, 16, 256, generator=g).to(device).requires_grad_()
        dy = torch.randn(4, 16, 512, generator=g).to(device)
        for _ in range(2):  # the second call uses the delayed scale the first one recorded
            x.grad = None
            lin.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and granularity != "tensor"):
                y = net(x)  # per-row FP8 GEMMs on GPUs other than sm90 write bf16 only
            y.float().backward(dy)
        outs[backend] = (y.detach(), x.grad, lin.weight.grad, lin.bias.grad)
        assert ("NativeFP8" in type(y.grad_fn).__name__) == (backend == "native_fp8")
    for name, a, b in zip(("y", "dx", "dW", "db"), outs["native_fp8"], outs["simulated"]):
        # Identical FP8 operands; only where the scales are applied and the summation order differ.
        tol = 1e-5 if a.dtype == torch.float32 else 1e-2  # bf16 outputs round to 8 bits
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    notes = [r.getMessage() for r in caplog.records if "float32 on the FP8 operands" in r.getMessage()]
    assert len(notes) == {"tensor": 0, "row": 2, "mixed": 2}[granularity]  # GEMMs no FP8 kernel can scale


def test_native_fp8_training_follows_the_simulated_loss_curve(monkeypatch):
    monkeypatch.setenv(CPU_ENV, "1")
    curves = {}
    for backend in ("native_fp8", "simulated"):
        model = tiny_gpt(seed=3)
        quantizer = quantize_model(model, QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": backend}))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(25):
            quantizer.begin_step()
            loss = model(**batch(step % 5)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[backend] = losses
    native, simulated = torch.tensor(curves["native_fp8"]), torch.tensor(curves["simulated"])
    assert native[-1] < native[0] - 0.3  # it trains
    assert (native - simulated).abs().max() < 2e-3, (native - simulated).abs().max()


def test_native_fp8_writes_the_autocast_dtype_like_a_linear(monkeypatch):
    monkeypatch.setenv(CPU_ENV, "1")
    net = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    quantize_model(net, QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": "native_fp8"}), modules=["*"])
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16 and "NativeFP8" in type(y.grad_fn).__name__
    y.float().sum().backward()
    assert x.grad.dtype == net[0].weight.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_autocast_gemm_operands_come_out_of_the_rounding_pass_in_the_autocast_dtype():
    import torch.nn.functional as F

    spec = TensorQuantSpec("E4M3", scaling="current")
    recipe = QuantRecipe(weight=spec, activation=spec, grad_output=TensorQuantSpec("E5M2", scaling="current"))
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    net = nn.Sequential(lin)
    q = quantize_model(net, recipe, modules=["0"])
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        quantizers = q.layers[0][1].quantizers
        xs, ws = quantizers["activation"].last_scale, quantizers["weight"].last_scale
        # What autocast makes of float32 fake-quantized operands: its own cast to bf16, then the GEMM.
        ref = F.linear(fake_quantize(x, "E4M3", xs), fake_quantize(lin.weight.detach(), "E4M3", ws), lin.bias)
    assert y.dtype == ref.dtype == torch.bfloat16 and torch.equal(y, ref)
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.bfloat16] * 2  # written once, at 2 bytes


@pytest.mark.parametrize("fmt", ["E6M1", "BF16"])
def test_logged_steps_fake_quantize_half_precision_inputs_like_ordinary_steps(fmt):
    # x * scale can exceed float16's range for wide formats; only the final result is cast to x's dtype.
    from altgrad.training.quantized_linear import TensorQuantizer

    quantizer = TensorQuantizer(TensorQuantSpec(fmt, scaling="current"))
    x = torch.randn(64, dtype=torch.float16)
    ordinary = quantizer(x)
    quantizer.collect_stats = True
    logged = quantizer(x)
    assert torch.isfinite(ordinary).all() and torch.equal(ordinary, logged)
    assert quantizer.pop_stats()["overflow_rate"].item() == 0.0
