"""What-if statistics and gradients (altgrad.training.whatif): exact against the run's own numbers when the
alternative is the run's own spec/recipe, exact against a direct kernel call, named as documented, and
without any effect on training (bitwise)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from transformers import TrainingArguments

from altgrad.config import load_config
from altgrad.monitoring import metrics as M
from altgrad.quantization import Granularity, amax, compute_scale, mx_scale
from altgrad.quantization.quantize import quantize_with_sums, stats_from_sums
from altgrad.training import AltGradTrainer, QuantRecipe, QuantSession, TensorQuantizer, TensorQuantSpec
from altgrad.training.whatif import AlternativeProbe, WhatIfAlternative, WhatIfConfig
from test_trainer import _Windows, batch, tiny_gpt

STATS = ("sqnr_db", "overflow_rate", "underflow_rate", "rel_err")
MX4 = {"format": "E2M1", "granularity": "block", "block_size": 16, "scaling": "current", "scale_format": "E8M0"}
# Stochastic rounding on three roles and dropout: anything that drew from the global RNG would show.
STOCHASTIC = QuantRecipe(
    name="sr",
    weight=TensorQuantSpec("E4M3"),
    activation=TensorQuantSpec("E4M3", rounding="stochastic", scaling="current"),
    grad_output=TensorQuantSpec("E5M2", rounding="stochastic"),
    weight_grad=TensorQuantSpec("E5M2", rounding="stochastic", scaling="current", granularity="row"),
)


def _train(model, session, steps, micro=1, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logs, losses = [], []
    for step in range(steps):
        session.begin_step()
        for k in range(micro):
            losses.append(session.forward_backward(batch(seed + 10 * step + k), grad_scale=1.0 / micro))
        assert session.before_optimizer_step().ok
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append(session.end_step())
    return logs, losses


# --------------------------------------------------------------------------- what-if statistics
@pytest.mark.parametrize("spec", [{"format": "E5M2"}, MX4], ids=["delayed", "mx-block"])
def test_alternative_equal_to_the_runs_spec_gives_the_runs_stats_exactly(spec):
    recipe = QuantRecipe(name="r", **{role: spec for role in ("weight", "activation", "grad_output", "weight_grad")})
    model = tiny_gpt(seed=0)
    session = QuantSession(model, recipe, log_every=1, whatif={"alternatives": [dict(spec, name="own"), "E3M4"]})
    logs, _ = _train(model, session, steps=3)  # step 3's delayed scales come from a 2-step history
    last = logs[-1]
    tensors = [k[len("quantization/"):-len("/sqnr_db")] for k in last if k.startswith("quantization/") and k.endswith("/sqnr_db") and k.count("/") == 3]
    assert len(tensors) == 8 * 4
    for tensor in tensors:
        for stat in ("sqnr_db", "overflow_rate", "underflow_rate"):
            assert last[f"whatif/own/{tensor}/{stat}"] == last[f"quantization/{tensor}/{stat}"], (tensor, stat)
        # rel_err is the same pooled sums' sqrt(noise / signal) = 10^(-SQNR/20)
        assert last[f"whatif/own/{tensor}/rel_err"] == pytest.approx(10 ** (-last[f"whatif/own/{tensor}/sqnr_db"] / 20), rel=1e-5)
    assert last["whatif/own/sqnr_db"] == last[M.SQNR_DB] and last["whatif/own/overflow_rate"] == last[M.OVERFLOW_RATE]
    assert last["whatif/E3M4/sqnr_db"] != last["whatif/own/sqnr_db"]


def test_whatif_stats_equal_a_direct_kernel_call():
    torch.manual_seed(0)
    run = TensorQuantizer(TensorQuantSpec("E4M3"), "fc/weight")  # delayed: alternatives may share its history
    alts = [WhatIfAlternative.from_value(v) for v in (MX4, "E3M4", {"format": "E3M4", "amax_history_len": 4},
                                                      {"format": "E5M2", "rounding": "stochastic", "scaling": "current"})]
    run.whatif = [AlternativeProbe(a, run.spec) for a in alts]
    assert [p.shares_history for p in run.whatif] == [False, True, False, False]
    run.collect_stats = True
    xs = [torch.randn(8, 64) * s for s in (1.0, 3.0, 0.5)]
    for x in xs:
        run.begin_step()
        before = run.state.history.get_amax("max") if len(run.state.history) else amax(x)
        run(x)
        got = [p.stats.pop() for p in run.whatif]
        # MX block: E8M0 scales from each 1x16 block's amax
        _, sums = quantize_with_sums(x, "E2M1", mx_scale(amax(x, Granularity.per_block(16)), "E2M1"))
        want = stats_from_sums(sums, x.numel())
        for k in want:
            assert torch.equal(got[0][k], want[k]), k
        # delayed, same history length: the run's own history (or first-step amax), E3M4's scale
        _, sums = quantize_with_sums(x, "E3M4", compute_scale(before, "E3M4"))
        want = stats_from_sums(sums, x.numel())
        assert all(torch.equal(got[1][k], want[k]) for k in want)
        noise = sums[4].sqrt() / sums[3].sqrt()
        assert torch.equal(got[1]["rel_err"], noise.float())
    # The own-history alternative saw only these three (logged) steps: the max of their amaxes.
    assert run.whatif[2].state.history.count == 2
    assert torch.equal(run.whatif[2].state.history.get_amax(), torch.stack([amax(x) for x in xs[:2]]).max())
    # Per-tensor scale: rel_err is ||Q(x) - x|| / ||x||.
    x = torch.randn(32, 32)
    q = TensorQuantizer(TensorQuantSpec("E4M3", scaling="current"))
    q.whatif = [AlternativeProbe(WhatIfAlternative.from_value({"format": "E2M1", "scaling": "current"}), q.spec)]
    q.collect_stats = True
    q(x)
    scale = compute_scale(amax(x), "E2M1")
    from altgrad.quantization import fake_quantize
    direct = (fake_quantize(x, "E2M1", scale) - x).norm() / x.norm()
    assert q.whatif[0].stats.pop()["rel_err"].item() == pytest.approx(direct.item(), rel=1e-5)


def test_two_alternatives_produce_the_named_metrics():
    model = tiny_gpt(seed=0)
    session = QuantSession(model, "fp8_hybrid", log_every=2, whatif={"alternatives": ["E3M4", MX4]})
    logs, _ = _train(model, session, steps=2)
    assert logs[0] is None
    m = logs[1]
    names = ["E3M4", "E2M1-b16-E8M0"]
    layers = [k.split("/")[1] for k in m if k.startswith("quantization/") and k.endswith("/weight/sqnr_db")]
    roles = ["weight", "activation", "grad_output"]
    want = {M.whatif_key(a, s) for a in names for s in STATS}
    want |= {M.whatif_key(a, s, role=r) for a in names for r in roles for s in STATS}
    want |= {M.whatif_key(a, s, layer=l, role=r) for a in names for l in layers for r in roles for s in STATS}
    assert {k for k in m if k.startswith(M.WHATIF_PREFIX)} == want and len(layers) == 8
    # Only the per-alternative summaries reach the console / trainer_state.json.
    assert {k for k in M.summary_metrics(m) if k.startswith(M.WHATIF_PREFIX)} == {M.whatif_key(a, s) for a in names for s in STATS}
    assert all(math.isfinite(m[k]) for k in want)
    assert m["whatif/E2M1-b16-E8M0/sqnr_db"] < m["whatif/E3M4/sqnr_db"]  # 3 bits of mantissa beat 1


def test_alternatives_also_probe_optimizer_states():
    model = tiny_gpt(seed=0)
    recipe = {"name": "moments", "weight": "E4M3", "optimizer_m": {"format": "E4M3", "scaling": "current"}}
    session = QuantSession(model, recipe, log_every=2, whatif={"alternatives": ["E5M2"]})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    session.attach_optimizer(opt)
    for step in range(2):
        session.begin_step()
        session.forward_backward(batch(step))
        assert session.before_optimizer_step().ok
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs = session.end_step()
    own, alt = logs["quantization/transformer.h.0.mlp.c_fc.weight/exp_avg/sqnr_db"], logs["whatif/E5M2/exp_avg/sqnr_db"]
    assert math.isfinite(own) and math.isfinite(alt) and alt < own  # 2 mantissa bits lose to 3


# --------------------------------------------------------------------------- no effect on training
def test_training_is_bitwise_identical_with_and_without_whatif():
    def run(whatif):
        model = tiny_gpt(seed=0, dropout=0.1)
        session = QuantSession(model, STOCHASTIC, shadow_every=2, log_every=1, whatif=whatif)
        _, losses = _train(model, session, steps=4, micro=2)
        return model, losses

    plain, plain_losses = run(None)
    probed, probed_losses = run({
        "alternatives": ["E3M4", MX4, {"format": "E2M3", "rounding": "stochastic", "scaling": "current"}],
        "grad_every": 2, "grad_recipes": ["run", "e3m4"], "grad_swap_roles": ["activation"],
    })
    assert torch.equal(torch.stack(plain_losses), torch.stack(probed_losses))
    for (name, a), b in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- what-if gradients
def test_whatif_gradient_of_the_runs_own_recipe_equals_the_shadow_comparison():
    model = tiny_gpt(seed=0, dropout=0.1)
    session = QuantSession(model, STOCHASTIC, shadow_every=0, log_every=1,
                           whatif={"grad_every": 1, "grad_recipes": ["run"], "grad_swap_roles": ["grad_output"],
                                   "alternatives": ["E3M4"]})
    assert session.shadow is not None  # what-if gradients force a shadow
    logs, _ = _train(model, session, steps=3, micro=2)  # accumulation: both micro-batches replayed
    for m in logs:
        shadow_keys = [k for k in m if k.split("/")[0] in ("grad_cos_sim", "grad_rel_error", "grad_snr")]
        assert len(shadow_keys) > 8 * 3  # every matrix's cos, rel error and SNR, and the aggregates
        for k in shadow_keys:
            assert m[M.whatif_grad_key("sr", k)] == m[k], k
        assert m[M.whatif_grad_key("sr", "loss")] == pytest.approx(m[M.LOSS], rel=1e-6)
        assert m[M.whatif_grad_key("sr", "loss_diff")] == pytest.approx(m[M.LOSS] - m[M.WHATIF_GRAD_FP32_LOSS], abs=1e-6)
        # Another format on one role is a different step, and is scored as one.
        assert m[M.whatif_grad_key("grad_output=E3M4", M.COS_SIM_MEAN)] != m[M.COS_SIM_MEAN]


def test_whatif_through_the_config_and_the_trainer(tmp_path):
    cfg = load_config(None, ["quantization.recipe=fp8_hybrid", "quantization.whatif.alternatives=[E3M4]",
                             "quantization.whatif.grad_every=2", "quantization.whatif.grad_recipes=[e5m2]"])
    dumped = yaml.safe_dump(cfg.to_dict()["quantization"]["whatif"], default_flow_style=True, width=10**6).strip()
    again = load_config(None, ["quantization.recipe=fp8_hybrid", f"quantization.whatif={dumped}"])
    assert again.to_dict()["quantization"] == cfg.to_dict()["quantization"]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=2, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = AltGradTrainer(tiny_gpt(seed=0), args, recipe=cfg.recipe, shadow_every=None,
                             whatif=cfg.quantization.whatif, train_dataset=_Windows())
    trainer.train()
    row = [r for r in M.read_metrics(tmp_path / M.METRICS_FILENAME) if "loss" in r][-1]
    assert "whatif/E3M4/transformer.h.0.mlp.c_fc/weight/sqnr_db" in row and "whatif_grad/e5m2/grad_cos_sim/mean" in row
    kept = [k for e in trainer.state.log_history for k in e]
    assert "whatif/E3M4/sqnr_db" in kept and not any(M.is_per_tensor(k) for k in kept)


@pytest.mark.parametrize("whatif, match", [
    ({"alternative": ["E3M4"]}, r"unknown key\(s\) \['alternative'\]; valid keys"),
    ({"alternatives": ["E9M9"]}, r"alternatives\[0\].*E9M9"),
    ({"alternatives": [{"format": "E3M4", "granularity": "row"}]}, r"delayed scaling keeps one amax history"),
    ({"alternatives": ["E3M4", {"format": "E3M4"}]}, r"names \['E3M4'\] appear twice"),
    ({"alternatives": [{"name": "a/b", "format": "E3M4"}]}, r"name 'a/b' must be"),
    ({"alternatives": [dict(MX4, block_size=24)]}, r"block size 24 does not divide transformer.h.0.attn.c_attn's"),
    ({"alternatives": [{"format": "E3M4", "granularity": "tile", "block_size": 24, "scaling": "current"}]},
     r"24x24 tiles do not divide"),
    ({"grad_every": 5}, r"grad_every=5 needs grad_recipes or grad_swap_roles"),
    ({"grad_every": -1, "grad_recipes": ["run"]}, r"grad_every must be a non-negative int"),
    ({"grad_every": 5, "grad_recipes": ["fp9"]}, r"grad_recipes\[0\]: unknown recipe preset 'fp9'"),
    ({"grad_every": 5, "alternatives": ["E3M4"], "grad_swap_roles": ["stored_weight"]}, r"stored_weight does not change"),
    ({"grad_every": 5, "grad_recipes": ["e3m4", "e3m4"]}, r"names \['e3m4'\] appear twice"),
])
def test_bad_whatif_settings_fail_in_one_line(whatif, match):
    with pytest.raises(ValueError, match=match) as info:
        QuantSession(tiny_gpt(seed=0, n_embd=32), "fp8_hybrid", whatif=whatif)
    assert "\n" not in str(info.value)
    if "block size" not in match and "tiles" not in match:  # the rest is caught when the config is read
        with pytest.raises(ValueError, match=match):
            load_config(None, ["quantization.recipe=fp8_hybrid", f"quantization.whatif={whatif}"])
