"""Optimizer states in low precision: Adam's moments rounded into their own formats after every step, with
statistics under the usual names, in the plain loop and the Trainer, and exact through checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from altgrad.quantization import quantize
from altgrad.training import QuantLinear, QuantRecipe, QuantSession, quantize_model
from test_checkpoints import _losses, _trainer
from test_trainer import batch, tiny_gpt

MOMENTS = {
    "name": "moments",
    "optimizer_m": {"format": "E4M3", "scaling": "delayed", "power_of_two": True},  # exact x * scale
    "optimizer_v": {"format": "FP16", "scaling": "current", "granularity": "row", "power_of_two": True},
}


def _loop(recipe, steps=4, seed=0, **session_kw):
    model = tiny_gpt(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    session = QuantSession(model, recipe, log_every=2, optimizer=opt, **session_kw)
    logs = []
    for step in range(steps):
        session.begin_step()
        session.forward_backward(batch(step))
        if session.before_optimizer_step().ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append(session.end_step())
    return model, opt, session, logs


def test_moments_land_on_their_grids_and_report_statistics():
    model, opt, session, logs = _loop(MOMENTS)
    # An optimizer-state-only recipe converts no layer: the GEMMs stay as they were.
    assert not session.quantizer.layers and not any(isinstance(m, QuantLinear) for m in model.modules())
    states = session.quantizer.optimizer_states
    for name, p in model.named_parameters():
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        sm = states.quantizers[f"{name}/exp_avg"].last_scale
        sv = states.quantizers[f"{name}/exp_avg_sq"].last_scale  # per row: (rows, 1) or () for 1-D
        assert torch.equal(m * sm, quantize(m * sm, "E4M3")), name
        assert torch.equal(v * sv, quantize(v * sv, "FP16")), name
        assert (v >= 0).all()
    metrics = logs[-1]
    for stat in ("overflow_rate", "underflow_rate", "sqnr_db"):
        assert f"quantization/transformer.h.0.attn.c_attn.weight/exp_avg/{stat}" in metrics
        assert f"quantization/transformer.wte.weight/exp_avg_sq/{stat}" in metrics
    # FP16 with a per-row scale carries v to ~70 dB; E4M3 per tensor is much coarser.
    assert metrics["quantization/transformer.h.0.mlp.c_fc.weight/exp_avg_sq/sqnr_db"] > 55
    assert 15 < metrics["quantization/transformer.h.0.mlp.c_fc.weight/exp_avg/sqnr_db"] < 45


def test_moment_rounding_changes_training_and_float32_moments_do_not():
    base, *_ = _loop("fp32")
    same, *_ = _loop({"optimizer_m": {"format": "BF16", "scaling": "none"}, "optimizer_v": "fp16",
                      "name": "x"}, steps=1)
    coarse, *_ = _loop({"name": "coarse", "optimizer_m": {"format": "E5M2", "scaling": "current"}})
    w = "transformer.h.1.mlp.c_fc.weight"
    # Adam's first step divides m by sqrt(v): the rounding already shows after one step ...
    assert not torch.equal(dict(same.named_parameters())[w], dict(tiny_gpt(seed=0).named_parameters())[w])
    # ... and four steps of E5M2 moments end somewhere else than float32 moments, but close.
    a, b = dict(base.named_parameters())[w], dict(coarse.named_parameters())[w]
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=5e-3)


def test_missing_or_unsuitable_optimizer_is_a_clear_error():
    model = tiny_gpt()
    session = QuantSession(model, MOMENTS)
    session.begin_step()
    session.forward_backward(batch(0))
    session.before_optimizer_step()
    with pytest.raises(RuntimeError, match="no optimizer is attached.*attach_optimizer"):
        session.end_step()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    session.attach_optimizer(sgd)
    sgd.step()
    with pytest.raises(ValueError, match="keeps no 'exp_avg' state.*momentum_buffer"):
        session.end_step()
    with pytest.raises(ValueError, match="not trainable parameters"):
        session.attach_optimizer(torch.optim.AdamW([nn.Parameter(torch.zeros(3))]))


@pytest.mark.parametrize(
    "data, match",
    [
        ({"optimizer_v": {"format": "e4m3", "scaling": "current", "granularity": "tile"}}, "1-D for biases"),
        ({"optimizer_m": {"format": "e4m3", "compensation": "kahan"}}, "stored_weight only"),
        ({"optimizer_m": {"format": "e4m3", "rounding": "up"}}, "rounding='up' is not accepted"),
    ],
)
def test_bad_optimizer_specs_are_rejected(data, match):
    with pytest.raises(ValueError, match=match):
        QuantRecipe.from_dict(data)


def test_block_size_must_divide_every_parameter():
    recipe = {"optimizer_m": {"format": "e4m3", "scaling": "current", "granularity": "block", "block_size": 64}}
    with pytest.raises(ValueError, match=r"transformer.wte.weight: exp_avg block size 64 does not divide .*\(32\)"):
        quantize_model(tiny_gpt(), recipe)


def test_session_state_carries_moment_scales_and_resumes_exactly():
    _, _, straight, _ = _loop(MOMENTS, steps=3)
    state = straight.state_dict()
    key = "transformer.h.0.attn.c_attn.weight/exp_avg"
    assert state["quantizer"]["quantizers"][key]["history"]["count"] > 0
    fresh = QuantSession(tiny_gpt(), MOMENTS)
    fresh.load_state_dict(state)
    loaded = fresh.quantizer.optimizer_states.quantizers[key].history
    assert torch.equal(loaded.get_amax(), straight.quantizer.optimizer_states.quantizers[key].history.get_amax())


def test_trainer_rounds_its_own_optimizer_and_resumes_exactly(tmp_path):
    recipe = QuantRecipe.from_dict({
        **MOMENTS,
        "stored_weight": {"format": "BF16", "scaling": "none", "compensation": "kahan"},
    })
    straight = _trainer(tmp_path / "a", recipe=recipe)
    straight.train()
    opt = straight.session.quantizer.optimizer_states.optimizer
    assert opt is not None and len(opt.state) == len(list(straight.model.parameters()))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any("quantization/transformer.wte.weight/exp_avg_sq/underflow_rate" in r for r in rows)
    resumed = _trainer(tmp_path / "b", recipe=recipe)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    a, b = _losses(straight), _losses(resumed)
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    for (name, pa), pb in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(pa, pb), name
    ca, cb = straight.quantizer.compensation, resumed.quantizer.compensation
    assert ca and all(torch.equal(ca[k], cb[k]) for k in ca)
