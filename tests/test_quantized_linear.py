"""QuantLinear against hand-computed GEMMs; TensorQuantizer's scale state and statistics; delayed scaling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from altgrad.modeling import GPT
from altgrad.quantization import fake_quantize
from altgrad.training import QuantLinear, QuantRecipe, TensorQuantizer, TensorQuantSpec, quantize_model
from test_trainer import batch, tiny_gpt


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
    with pytest.raises(ValueError, match="trained with recipe .custom., this run uses .e5m2."):
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
    assert act.stats.count == 2  # the two training forwards, none of the evaluation ones


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
    quantizer = TensorQuantizer(TensorQuantSpec(fmt, scaling="current"))
    x = torch.randn(64, dtype=torch.float16)
    ordinary = quantizer(x)
    quantizer.collect_stats = True
    logged = quantizer(x)
    assert torch.isfinite(ordinary).all() and torch.equal(ordinary, logged)
    assert quantizer.pop_stats()["overflow_rate"].item() == 0.0


# --------------------------------------------------------------------------- 2-D tiles
def test_128x128_weight_tiles_train_a_step_and_match_fake_quantize_per_tile():
    from altgrad.quantization import Granularity, amax, compute_scale

    tile = dict(format="E4M3", scaling="current", granularity="tile", block_size=128)
    recipe = QuantRecipe.from_dict(
        {"weight": tile, "activation": {"format": "E4M3", "scaling": "current"}, "weight_grad": tile}
    )
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    with torch.no_grad():  # tiles of very different magnitude, so one scale per tile matters
        lin.weight.mul_(torch.tensor([[1.0, 1e-5], [30.0, 1.0]]).repeat_interleave(128, 0).repeat_interleave(128, 1))
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    net = nn.Sequential(lin)
    q = quantize_model(net, recipe, modules=["0"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 8, 256)
    y = net(x)
    y.square().mean().backward()
    grad_before = lin.weight.grad.clone()
    q.quantize_weight_grads()
    opt.step()

    w_scale = q.layers[0][1].quantizers["weight"].last_scale
    expected_scale = compute_scale(amax(ref_w, Granularity.per_block(128, 128)), "E4M3")
    assert w_scale.shape == (2, 2) and torch.equal(w_scale, expected_scale)
    wq = fake_quantize(ref_w, "E4M3", expected_scale)
    xq = fake_quantize(x, "E4M3", 448.0 / x.abs().max())
    assert torch.equal(y.detach(), torch.nn.functional.linear(xq, wq, ref_b))
    # Per-tile scales keep the small tile's values; one per-tensor scale would flush most of them.
    assert (wq[:128, 128:] != 0).float().mean() > 0.99
    assert (fake_quantize(ref_w, "E4M3", 448.0 / ref_w.abs().max())[:128, 128:] != 0).float().mean() < 0.01
    g_scale = compute_scale(amax(grad_before, Granularity.per_block(128, 128)), "E4M3")
    expected_grad = fake_quantize(grad_before, "E4M3", g_scale)
    assert torch.equal(lin.weight.grad, expected_grad)  # the optimizer saw the tiled weight gradient
    assert torch.equal(lin.weight.detach(), ref_w.add(expected_grad, alpha=-0.1))  # SGD's own update


def test_tiles_must_divide_both_weight_dims():
    tile = {"format": "E4M3", "scaling": "current", "granularity": "tile", "block_size": 128}
    with pytest.raises(ValueError, match=r"0: weight tiles of 128x128 do not divide its shape \(out, in\) = \(64, 256\)"):
        quantize_model(nn.Sequential(nn.Linear(256, 64)), {"weight": tile}, modules=["0"])
    with pytest.raises(ValueError, match="block size 48 does not divide its last dim"):
        quantize_model(
            nn.Sequential(nn.Linear(64, 64)),
            {"activation": {**tile, "granularity": "block", "block_size": 48}},
            modules=["0"],
        )


# --------------------------------------------------------------------------- spec, scale state, statistics
def test_tensor_quantizer_is_spec_plus_scale_state_plus_statistics():
    from altgrad.training.quantized_linear import ScaleState, StatsAccumulator

    spec = TensorQuantSpec("E4M3", amax_history_len=4)
    q = TensorQuantizer(spec, "l/activation")
    assert q.spec is spec and isinstance(q.state, ScaleState) and isinstance(q.stats, StatsAccumulator)
    q.collect_stats = True
    assert q.stats.enabled
    q.begin_step()
    q(torch.full((8,), 2.0))
    q(torch.full((8,), 3.0))  # same step: the scale stays frozen, the step's amax becomes 3
    assert q.last_scale is q.state.last_scale and q.last_scale.item() == 224.0
    assert q.state.step_amax.item() == 3.0 and q.stats.count == 2
    assert q.pop_stats()["amax"].item() == 3.0 and q.stats.count == 0
    q.begin_step()  # 3 joins the history
    assert q.history is q.state.history and q.history.get_amax().item() == 3.0
    state = q.state_dict()
    assert set(state) == {"history", "step_amax", "stepped"}  # the layout checkpoints already hold
    assert set(state["history"]) == {"window_size", "count", "history"}
    fresh = TensorQuantizer(spec)
    fresh.load_state_dict(state)
    x = torch.randn(8) * 5
    assert torch.equal(fresh(x), q(x)) and torch.equal(fresh.last_scale, q.last_scale)


def test_autograd_function_takes_quantizers_and_a_training_flag_not_the_module():
    from altgrad.training.quantized_linear import _QuantizedLinearFunction

    recipe = QuantRecipe(
        weight=TensorQuantSpec("E4M3", scaling="current"),
        activation=TensorQuantSpec("E4M3", scaling="current"),
        grad_output=TensorQuantSpec("E5M2", scaling="current"),
    )
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    net = nn.Sequential(lin)
    layer = quantize_model(net, recipe, modules=["0"]).layers[0][1]
    x = torch.randn(4, 16, requires_grad=True)
    net(x).sum().backward()
    via_layer = (x.grad.clone(), lin.weight.grad.clone())
    x.grad, lin.weight.grad, lin.bias.grad = None, None, None
    qs = [layer.quantizers[r] for r in ("activation", "weight", "grad_output")]
    _QuantizedLinearFunction.apply(x, lin.weight, lin.bias, *qs, True).sum().backward()
    assert torch.equal(x.grad, via_layer[0]) and torch.equal(lin.weight.grad, via_layer[1])
    # Evaluation (training=False) records nothing, so statistics stay empty even when collecting.
    for q in qs:
        q.collect_stats = True
    with torch.no_grad():
        _QuantizedLinearFunction.apply(x, lin.weight, lin.bias, *qs, False)
    assert all(q.pop_stats() == {} for q in qs)


def test_batched_begin_steps_equal_one_by_one_bit_for_bit():
    # ModelQuantizer rolls all delayed states at once (ScaleState.begin_steps). Against each state's own
    # begin_step, over steps with NaN/inf amaxes, steps without a call, amaxes recorded by traced graphs
    # (on device, flagged) or eagerly, and specs that differ in format, margin, power of two, window and
    # amax algorithm: the same histories, counts and frozen scales, bit for bit.
    import copy

    from altgrad.training.quantized_linear import ScaleState

    specs = [
        TensorQuantSpec("E4M3"), TensorQuantSpec("E4M3"), TensorQuantSpec("E5M2", margin=1),
        TensorQuantSpec("E4M3", power_of_two=True), TensorQuantSpec("E3M4", amax_algo="most_recent"),
        TensorQuantSpec("E5M2", amax_history_len=3), TensorQuantSpec("E5M2", amax_history_len=3),
    ]
    one_by_one = [ScaleState(spec) for spec in specs]
    batched = copy.deepcopy(one_by_one)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        for a, b in zip(one_by_one, batched):
            a.begin_step()
        ScaleState.begin_steps(batched)
        for i, (a, b) in enumerate(zip(one_by_one, batched)):
            assert a.history.count == b.history.count and a.stepped and b.stepped, (step, i)
            if a.history.history is not None:
                assert torch.equal(a.history.history, b.history.history), (step, i)
            assert (a.step_scale is None) == (b.step_scale is None), (step, i)
            if a.step_scale is not None:
                assert torch.equal(a.step_scale, b.step_scale), (step, i)
            assert a.step_amax is None and b.step_amax is None and not b.traced_pending
            # This step's calls: none (every fifth state-step), a NaN or inf now and then, else a value.
            draw = torch.rand((), generator=gen).item()
            if draw < 0.2:
                if b.traced_amax is not None and draw < 0.1:
                    # A traced training forward whose backward never ran: flagged, never written. Eager
                    # recorded nothing, so the batched path must not advance the history either.
                    b.traced_pending = True
                continue
            value = torch.tensor(math.nan if draw < 0.25 else math.inf if draw < 0.3 else 10 * draw + step)
            for state in (a, b):
                if state.traced_amax is not None and draw > 0.6:  # a traced graph recorded it
                    state.traced_amax.fill_(value.item())
                    state.traced_pending = True
                else:
                    state.observe_amax(value.clone())


def test_begin_steps_follows_the_amax_to_its_device_and_load_drops_traced_amax():
    from altgrad.training.quantized_linear import ScaleState

    state = ScaleState(TensorQuantSpec("E4M3"))
    state.observe_amax(torch.tensor(3.0))
    ScaleState.begin_steps([state])
    # The model moved (here to `meta`, the device-agnostic stand-in for a GPU): the step's amax is there.
    state.step_amax = torch.tensor(5.0, device="meta")
    ScaleState.begin_steps([state])  # one-by-one path: the history moves with the amax, as begin_step does
    assert state.history.history.device.type == "meta" and state.traced_amax.device.type == "meta"

    fresh = ScaleState(TensorQuantSpec("E4M3"))
    fresh.observe_amax(torch.tensor(1.0))
    fresh.begin_step()
    saved = fresh.state_dict()
    fresh.traced_amax.fill_(100.0)  # a traced call of the step that the load below discards
    fresh.traced_pending = True
    fresh.load_state_dict(saved)
    fresh.begin_step()
    assert fresh.history.count == 1 and fresh.step_scale.item() == 448.0  # amax 1 still, not 100
