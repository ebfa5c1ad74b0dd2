"""Quantized training under ``torch.compile(model)``: no graph break inside the quantized layers, no
recompilation from step to step (statistics switched on and off included), and the same numbers as
the eager model. The ``aot_eager`` backend keeps these tests cheap: it traces exactly what inductor
would be given (dynamo + AOT autograd), without generating C++."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from altgrad.modeling import GPT, GPTConfig
from altgrad.quantization import kernels
from altgrad.training import AltGradTrainer, QuantRecipe, quantize_model
from altgrad.training.native_fp8 import CPU_ENV

VOCAB = 65

RECIPES = {
    "fp8_hybrid": "fp8_hybrid",  # delayed scaling, per tensor
    "mxfp8": "mxfp8",  # current scaling, 1x32 blocks with E8M0 scales
    "rows_toward_zero": {
        "weight": {"format": "E3M4", "scaling": "current", "granularity": "row", "rounding": "zero"},
        "activation": {"format": "E4M3", "scaling": "none"},
        "grad_output": {"format": "E5M2", "scaling": "current", "granularity": "row"},
    },
    "row_stochastic": {
        "weight": {"format": "E4M3", "scaling": "current", "granularity": "row"},
        "activation": {"format": "E4M3", "scaling": "current", "granularity": "row"},
        "grad_output": {"format": "E5M2", "scaling": "delayed", "rounding": "stochastic"},
    },
    "stored_stochastic": {"preset": "e5m2", "stored_weight": {"format": "E5M2", "rounding": "stochastic"}},
}


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, dropout=0.0))


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _train(recipe, compiled: bool, steps: int = 6, logged=(1, 4), backend: str = "aot_eager"):
    """Train ``steps`` AdamW steps as the trainer drives them; returns (losses, per-step statistics, the
    number of compiled graphs of the model's forward after each step, and whether each ordinary step ran
    its quantized layers as traced graph code)."""
    model = tiny_gpt()
    quantizer = quantize_model(model, QuantRecipe.from_dict(recipe))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    quantizer.attach_optimizer(opt)
    run = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
    torch.manual_seed(123)  # the stochastic-rounding stream starts at the same point in both runs
    losses, stats, graphs, traced = [], [], [], []
    for step in range(steps):
        quantizer.begin_step()
        quantizer.set_collect_stats(step in logged)
        traced.append(all(layer.traced for _, layer in quantizer.layers))
        loss = run(input_ids=_ids(step), labels=_ids(step)).loss
        loss.backward()
        quantizer.quantize_weight_grads()
        quantizer.snapshot_weights()
        opt.step()
        quantizer.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        popped = quantizer.pop_stats()
        stats.append({k: v.item() for k, v in popped.items()})
        graphs.append(len(_debug_get_cache_entry_list(type(model).forward.__code__)))
    return losses, stats, graphs, traced


@pytest.mark.parametrize("name", list(RECIPES))
def test_compiled_training_has_no_graph_break_no_recompile_and_eager_numbers(name):
    recipe = RECIPES[name]
    eager_losses, eager_stats, _, _ = _train(recipe, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    losses, stats, graphs, traced = _train(recipe, compiled=True)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # At most two graphs of the model for all six steps, whatever switches (logging steps 1 and 4,
    # scales rolling): the opaque-op graph (logging steps, stochastic rounding, a delayed recipe's
    # first step) and the traced one (every other step). (The rounding kernels the opaque ops run are
    # compiled per variant on their own, as in eager.)
    expect_traced = name != "row_stochastic"
    first_traced = 2 if name in ("fp8_hybrid", "stored_stochastic") else 0  # delayed: once a history exists
    assert traced == [expect_traced and step not in (1, 4) and step >= first_traced for step in range(6)], traced
    assert graphs == ([1, 2, 2, 2, 2, 2] if first_traced == 0 else [1, 1, 2, 2, 2, 2]) if expect_traced else [1] * 6, graphs
    assert kernels.compile_enabled("cpu"), "the rounding kernels fell back to eager (a compile failed)"
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=0)
    assert stats[1] and stats[4] and not stats[2], "statistics are collected on the logging steps only"
    assert stats[1].keys() == eager_stats[1].keys()
    for key, value in eager_stats[4].items():
        assert stats[4][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key


def _layer_step(run, net, x, grad):
    y = run(x)
    y.backward(grad)
    return y.detach(), x.grad.detach().clone(), net[0].weight.grad.detach().clone()


def _one_layer_case(recipe, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantizer = quantize_model(net, QuantRecipe.from_dict(recipe), modules=["*"])
    x = torch.randn(3, 8, 64, requires_grad=True)
    grad = torch.randn(3, 8, 32) * 1e-3
    return net, quantizer, x, grad


@pytest.mark.parametrize("name", ["fp8_hybrid", "row_stochastic"])
def test_compiled_quantized_layer_is_bitwise_eager(name):
    results = []
    for compiled in (False, True):
        net, quantizer, x, grad = _one_layer_case(RECIPES[name])
        quantizer.set_collect_stats(True)
        run = torch.compile(net, backend="aot_eager", fullgraph=True) if compiled else net
        torch.manual_seed(7)
        outs = _layer_step(run, net, x, grad)
        results.append((outs, {k: v.item() for k, v in quantizer.pop_stats().items()}))
    (eager, eager_stats), (comp, comp_stats) = results
    for a, b in zip(eager, comp):
        assert torch.equal(a, b)
    assert eager_stats == comp_stats


def test_compiled_layer_under_autocast_matches_eager():
    outs = []
    for compiled in (False, True):
        net, _, x, grad = _one_layer_case("fp8_hybrid")
        run = torch.compile(net, backend="aot_eager", fullgraph=True) if compiled else net
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(x)
        y.backward(grad.to(y.dtype))
        outs.append((y.dtype, y.detach(), x.grad, net[0].weight.grad))
    assert outs[0][0] == outs[1][0] == torch.bfloat16
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_deepcopied_layer_keeps_its_own_quantizers_under_compile():
    net, quantizer, x, grad = _one_layer_case("fp8_hybrid")
    twin = copy.deepcopy(net)
    assert twin[0]._op_key != net[0]._op_key and twin[0].quantizers["weight"] is not net[0].quantizers["weight"]
    quantizer.set_collect_stats(True)
    torch.compile(twin, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert quantizer.pop_stats() == {}  # the copy's calls recorded nothing in the original's quantizers


def test_native_fp8_layer_compiles_on_cpu_validation_path(monkeypatch):
    # The CPU `_scaled_mm` path exists to validate the native backend; under compile it runs the same code.
    monkeypatch.setenv(CPU_ENV, "1")
    recipe = {"preset": "fp8_hybrid", "backend": "native_fp8"}
    outs = []
    for compiled in (False, True):
        net, _, x, grad = _one_layer_case(recipe)
        assert net[0].native
        run = torch.compile(net, backend="aot_eager", fullgraph=True) if compiled else net
        outs.append(_layer_step(run, net, x, grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="native FP8 GEMMs need a CUDA GPU (sm_89+)")
def test_native_fp8_layer_compiles_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no FP8 tensor cores")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 128)).cuda()
    quantize_model(net, {"preset": "fp8_hybrid", "backend": "native_fp8"}, modules=["*"])
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    counters.clear()
    y = torch.compile(net, fullgraph=True)(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and x.grad is not None and net[0].weight.grad is not None
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_trainer_torch_compile_matches_eager(tmp_path, monkeypatch, logging_steps):
    from transformers import TrainingArguments

    from altgrad.training import traced_linear
    from test_trainer import _Windows

    traces = []
    traced_forward = traced_linear.traced_forward
    monkeypatch.setattr(traced_linear, "traced_forward", lambda *a: traces.append(1) or traced_forward(*a))
    # What `training.torch_compile: true` (and `torch_compile_backend`) in an experiment YAML turns on.
    losses = []
    for compiled in (False, True):
        counters.clear()
        args = TrainingArguments(
            str(tmp_path / f"c{compiled}"), max_steps=4, per_device_train_batch_size=4, logging_steps=logging_steps,
            learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=3,
            torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None,
        )
        trainer = AltGradTrainer(tiny_gpt(), args, recipe="fp8_hybrid", train_dataset=_Windows())
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        losses.append([h["loss"] for h in logs])
    # Logging steps with the FP32 shadow on (the Trainer's default shadow_every=1); with logging_steps=2,
    # step 3 is an ordinary step after the first, which runs the quantized layers as traced graph code.
    assert all("grad_cos_sim/mean" in h and "quantization/overflow_rate" in h for h in logs)
    assert hasattr(trainer.model_wrapped, "_orig_mod"), "the Trainer compiled the model"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(losses[1]) == 4 // logging_steps
    assert bool(traces) == (logging_steps == 2), "traced layers where (and only where) an ordinary step ran"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


def test_quantize_api_traces_without_graph_break_and_rounds_bitwise_eager():
    # Called directly inside a user's compiled function (not through QuantLinear), the kernel is traced
    # into the graph: format parameters are built on the host without a tensor read.
    from altgrad.quantization import fake_quantize, quantize
    from altgrad.quantization.quantize import quantize_with_sums

    def f(x):
        a = fake_quantize(x, "e4m3", scale=torch.tensor(2.0))
        b = quantize(x, "e5m2", rounding="stochastic")
        c, sums = quantize_with_sums(x, "e3m4", torch.full((64, 1), 0.5))
        return a, b, c, sums

    x = torch.randn(64, 64) * 10
    counters.clear()
    torch.manual_seed(0)
    eager = f(x)
    torch.manual_seed(0)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert sum(counters["graph_break"].values()) == 0
    for a, b in zip(eager[:3], compiled[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-12, atol=0)  # float64 sums: summation order


def test_experiment_yaml_key_turns_on_trainer_compilation():
    from altgrad.config import load_config

    args = load_config(
        None, ["training.torch_compile=true", "training.torch_compile_backend=aot_eager", "training.use_cpu=true"]
    ).training_arguments()
    assert args.torch_compile and args.torch_compile_backend == "aot_eager"


def _layer_steps(recipe, backend, steps=4, evaluate=False):
    """A QuantLinear over ``steps`` driven steps (inputs growing, so delayed scales move), eager when
    ``backend`` is None; returns per-step (y, dx, dW, traced?), the quantizer's state mid-way through the
    last step, and the evaluation output after it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantizer = quantize_model(net, QuantRecipe.from_dict(recipe), modules=["*"])
    run = torch.compile(net, backend=backend, fullgraph=True) if backend else net
    outs = []
    for step in range(steps):
        quantizer.begin_step()
        gen = torch.Generator().manual_seed(step)
        x = (torch.randn(3, 8, 64, generator=gen) * (step + 1)).requires_grad_()
        y = run(x)
        y.backward(torch.randn(3, 8, 32, generator=gen) * 10.0 ** -step)
        outs.append((y.detach(), x.grad, net[0].weight.grad.clone(), net[0].traced))
        net[0].weight.grad = None
    state = quantizer.state_dict()
    net.eval()
    with torch.no_grad():
        y_eval = run(torch.randn(5, 64, generator=torch.Generator().manual_seed(99)))
    after_eval = quantizer.state_dict()
    for key, saved in state["quantizers"].items():  # evaluation recorded nothing
        for field in ("step_amax", "history"):
            assert str(saved[field]) == str(after_eval["quantizers"][key][field]), (key, field)
    return outs, state, y_eval, quantizer


@pytest.mark.parametrize("name", ["fp8_hybrid", "rows_toward_zero", "mxfp8"])
def test_traced_layer_is_bitwise_eager_under_inductor(name):
    # Inductor (C++) compiles the traced layer's rounding into the model graph; outputs, both gradients,
    # the delayed-scaling state mid-step and an evaluation call after training are bitwise eager's.
    eager, eager_state, eager_eval, _ = _layer_steps(RECIPES[name], None)
    torch._dynamo.reset()
    compiled, state, y_eval, quantizer = _layer_steps(RECIPES[name], "inductor")
    assert [c[3] for c in compiled][1:] == [True] * 3, "the layer ran as traced graph code after step 1"
    for step, (a, b) in enumerate(zip(eager, compiled)):
        for u, v in zip(a[:3], b[:3]):
            assert torch.equal(u, v), step
    assert torch.equal(eager_eval, y_eval)
    for key, saved in eager_state["quantizers"].items():
        ours = state["quantizers"][key]
        assert ours["stepped"] == saved["stepped"]
        if saved["history"] is not None:  # delayed scaling: history and this step's amax, folded from the graph
            assert ours["history"]["count"] == saved["history"]["count"]
            assert torch.equal(ours["history"]["history"], saved["history"]["history"])
            assert torch.equal(ours["step_amax"], saved["step_amax"]), key
    # state_dict() read the traced buffers without folding them: the next step folds them.
    assert any(q.state.traced_pending for q in quantizer.all_quantizers().values()) == (name == "fp8_hybrid")


def test_stochastic_quantize_under_inductor_draws_eagers_bits():
    # Called inside a user's function compiled by Inductor, stochastic rounding takes its two seeds from
    # torch's generator as eagerly does: the same bits under the same torch.manual_seed.
    from altgrad.quantization import quantize

    x = torch.randn(10_000) * 30
    torch.manual_seed(5)
    eager = quantize(x, "e4m3", rounding="stochastic")
    compiled_fn = torch.compile(lambda t: quantize(t, "e4m3", rounding="stochastic"), fullgraph=True)
    torch.manual_seed(5)
    assert torch.equal(compiled_fn(x), eager)


def test_short_training_run_under_inductor_matches_eager():
    # The real backend, C++ code generated for the model graph with the traced quantizers inside: the
    # losses of a short fp8_hybrid run (steps 3-6 traced) equal eager's to float tolerance (Inductor
    # reorders the float32 reductions of the norms and attention, not the quantizers' rounding).
    eager_losses, _, _, _ = _train("fp8_hybrid", compiled=False)
    torch._dynamo.reset()
    counters.clear()
    losses, _, graphs, traced = _train("fp8_hybrid", compiled=True, backend="inductor")
    assert sum(counters["graph_break"].values()) == 0
    assert traced == [False, False, True, True, False, True] and graphs[-1] == 2
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=0)
