"""Bit-stall of weights stored in the format, and its cures: stochastic rounding and Kahan-compensated storage
(the buffer carries each rounding error into the next update and travels in checkpoints)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from altgrad.training import QuantSession, quantize_model
from altgrad.training.checkpointing import load_session_state, save_session_state
from altgrad.training.quantized_linear import KAHAN_BUFFER_DTYPE
from test_trainer import batch, tiny_gpt

STEP = 2.0**-7  # BF16's grid step on [1, 2) (7 stored mantissa bits)


def _stored(rounding="nearest", compensation="none", fmt="BF16"):
    net = nn.Sequential(nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(1.0 + torch.rand(32, 64) * 0.5)  # (32, 64): every weight in [1, 1.5)
    recipe = {"name": "sw", "weight": {"format": "BF16", "scaling": "none"},
              "stored_weight": {"format": fmt, "scaling": "none", "rounding": rounding, "compensation": compensation}}
    q = quantize_model(net, recipe, modules=["0"])
    exact = net[0].weight.detach().clone()
    q.after_optimizer_step()  # the weights start stored in the format (Kahan: the residual in the buffer)
    return net[0].weight, q, exact


def _apply_updates(weight, q, update, steps):
    stalled = updated = 0
    for _ in range(steps):
        q.snapshot_weights()
        with torch.no_grad():
            weight.add_(update)  # what the optimizer does to the stored value
        q.after_optimizer_step()
    for s, u in q.bit_stall.get_counts().values():
        stalled, updated = stalled + int(s), updated + int(u)
    return stalled / updated


@pytest.mark.parametrize("rounding, compensation", [("nearest", "none"), ("stochastic", "none"), ("nearest", "kahan")])
def test_updates_below_half_a_step_stall_unless_cured(rounding, compensation):
    torch.manual_seed(0)
    weight, q, exact = _stored(rounding, compensation)
    start = weight.detach().clone()
    update = STEP / 10  # a fifth of half a grid step: nearest rounding gives every update back
    stall = _apply_updates(weight, q, update, steps=40)
    moved = (weight - start) / STEP  # in grid steps; the updates added up to 4 steps
    if rounding == "nearest" and compensation == "none":
        assert stall == 1.0 and torch.equal(weight, start)
    elif compensation == "kahan":
        # Every 10th update moves the weight by one step; the rest wait in the buffer (and count as stalled).
        # The buffer also kept the initial rounding error, so a weight moved 4 steps +-1.
        assert torch.all((moved - 4).abs() <= 1) and (moved == 4).float().mean() > 0.5 and 0.85 <= stall <= 0.95
        assert q.compensation["0"].dtype == KAHAN_BUFFER_DTYPE
        # Stored value + buffer = what float32 master weights would hold (to the buffer's bf16 precision).
        assert torch.allclose(weight + q.compensation["0"].float(), exact + 40 * update, atol=STEP / 100)
    else:  # stochastic: right on average, noisy per weight
        assert abs(moved.mean().item() - 4) < 0.2 and moved.std().item() > 0.5 and 0.85 < stall < 0.95


def test_kahan_buffer_is_checkpointed_and_resumes_exactly(tmp_path):
    recipe = {"preset": "e5m2", "stored_weight": {"format": "E5M2", "compensation": "kahan"}}

    def run(session, model, opt, steps, first=0):
        for step in range(first, first + steps):
            session.begin_step()
            session.forward_backward(batch(step))
            if session.before_optimizer_step().ok:
                opt.step()
            opt.zero_grad(set_to_none=True)
            session.end_step()

    model = tiny_gpt(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session = QuantSession(model, recipe, log_every=1)
    run(session, model, opt, 3)
    assert set(session.quantizer.compensation) == {n for n, _ in session.quantizer.layers}
    save_session_state(tmp_path, session)
    weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())  # not live references
    run(session, model, opt, 2, first=3)

    model2 = tiny_gpt(seed=2)
    session2 = QuantSession(model2, recipe, log_every=1)
    model2.load_state_dict(weights)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(opt_state)
    load_session_state(tmp_path, session2)
    run(session2, model2, opt2, 2, first=3)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
    c1, c2 = session.quantizer.compensation, session2.quantizer.compensation
    assert all(torch.equal(c1[k], c2[k]) for k in c1)


def test_compensation_is_data_in_the_recipe():
    from altgrad.training import QuantRecipe

    recipe = QuantRecipe.from_dict({"stored_weight": {"format": "e4m3", "compensation": "Kahan"}})
    assert recipe.stored_weight.compensation == "kahan" and recipe.to_dict()["stored_weight"]["compensation"] == "kahan"
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match=r"compensation='kahan2' is not accepted; accepted: \['none', 'kahan'\]"):
        QuantRecipe.from_dict({"stored_weight": {"format": "e4m3", "compensation": "kahan2"}})
