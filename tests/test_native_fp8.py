"""The native FP8 backend: fallbacks decided at conversion, and the CPU `_scaled_mm` path against the
simulation (``ALTGRAD_NATIVE_FP8_ON_CPU=1``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from altgrad.training import QuantRecipe, quantize_model
from altgrad.training.native_fp8 import CPU_ENV
from test_trainer import batch, tiny_gpt


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


def test_eligibility_is_decided_at_conversion_and_the_device_looked_up_once(monkeypatch, caplog):
    from altgrad.training.native_fp8 import NativeFP8Plan

    monkeypatch.setenv(CPU_ENV, "1")
    device_lookups = []
    device_reason = NativeFP8Plan.device_reason
    monkeypatch.setattr(
        NativeFP8Plan, "device_reason", lambda self, device: device_lookups.append(device) or device_reason(self, device)
    )
    # Static: E5M2 weights x E5M2 gradients have no kernel; 40 output features are not a multiple of 16.
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 40), nn.Linear(40, 32))
    with caplog.at_level("WARNING", logger="altgrad.training.quantized_linear"):
        q = quantize_model(net, QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": "native_fp8"}), modules=["*"])
    plans = {name: layer.native_plan for name, layer in q.layers}
    assert plans["0"].reason is None and "out_features=40" in plans["1"].reason and "in_features=40" in plans["2"].reason
    at_conversion = [r.getMessage() for r in caplog.records if "native_fp8" in r.getMessage()]
    assert at_conversion == [f"altgrad native_fp8: {n} runs simulated: {plans[n].reason}" for n in ("1", "2")]
    caplog.clear()
    for _ in range(3):
        net(torch.randn(16, 32)).sum().backward()
    assert device_lookups == [torch.device("cpu")]  # only the eligible layer, once for its device
    assert not [r for r in caplog.records if "native_fp8" in r.getMessage()]  # nothing new to say
    assert isinstance(q.layers[0][1].native_plan, NativeFP8Plan)


def test_native_function_takes_quantizers_and_a_training_flag_not_the_module(monkeypatch):
    from altgrad.training.native_fp8 import NativeFP8LinearFunction

    monkeypatch.setenv(CPU_ENV, "1")
    spec = {"format": "E4M3", "scaling": "current"}
    recipe = {"weight": spec, "activation": spec, "grad_output": {**spec, "format": "E5M2"}, "backend": "native_fp8"}
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    net = nn.Sequential(lin)
    layer = quantize_model(net, recipe, modules=["0"]).layers[0][1]
    x = torch.randn(16, 32, requires_grad=True)
    y = net(x)
    assert "NativeFP8" in type(y.grad_fn).__name__
    y.sum().backward()
    via_layer = (y.detach(), x.grad.clone(), lin.weight.grad.clone())
    x.grad = lin.weight.grad = lin.bias.grad = None
    qs = [layer.quantizers[r] for r in ("activation", "weight", "grad_output")]
    y2 = NativeFP8LinearFunction.apply(x, lin.weight, lin.bias, *qs, True)
    y2.sum().backward()
    assert torch.equal(y2.detach(), via_layer[0]) and torch.equal(x.grad, via_layer[1])
    assert torch.equal(lin.weight.grad, via_layer[2])
