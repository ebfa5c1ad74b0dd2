"""A :class:`~altgrad.training.quantized_linear.QuantLinear` traced into the compiled graph.

On the steps that need nothing but rounding, a compiled model runs its quantized Linears as ordinary
graph code: the quantizers' rounding passes (the kernel functions of :mod:`altgrad.quantization.kernels`
that the eager path compiles on their own) sit in the model's graph next to the GEMMs, norms and GELUs,
so Inductor fuses them with their neighbours and nothing runs per call in Python. The opaque
op pair of :mod:`altgrad.training.compiled_linear` stays for everything else. Which of the two a
layer takes is decided while the model is traced (``can_trace``), so each becomes a cached graph of
its own, chosen by dynamo's guards at every call -- two graphs per mode (training, evaluation), never
one per step:

=========================================  ==============================================
traced (this module)                       opaque op (``compiled_linear``)
=========================================  ==============================================
ordinary training steps and evaluation     logging steps (statistics on), what-if probes
nearest and toward-zero rounding           stochastic rounding (bits from torch's generator)
delayed scaling once a step scale exists   the very first step (its scale is its own amax)
simulated GEMMs                            ``native_fp8`` (FP8 operands and their scales)
=========================================  ==============================================

Why not trace everything. The rows on the right need what a graph cannot give cheaply or bitwise:
statistics are host-side Python objects updated per call; stochastic rounding draws two seeds from
torch's generator per call, and a fused graph of forward and backward need not draw them in eager's
order (a lone ``quantize`` compiled on its own does keep eager's bits, ``tests/test_compile.py``, but a
whole model was not shown to); the first delayed step derives its frozen scale from its first call's
amax, a data-dependent branch. They are rare steps (a logging step every N) or
recipes that are slow anyway, and the opaque op runs them with the eager code.

Delayed scaling as graph inputs. A step's scale is frozen for the whole step, so it is derived eagerly
when the step begins (:meth:`ScaleState.begin_step`) and the graph reads it as an input. The step's
amax is accumulated in place into a device buffer (``ScaleState.traced_amax``, forward roles in the
forward, ``grad_output`` in the backward) and folded into the history when the next step begins, the
same max the eager path takes. A buffer no call wrote (a training forward whose backward never ran)
changes nothing, as in eager. One difference is left: a current-scaled ``grad_output`` does not update
its ``last_scale`` (computed inside the backward graph; nothing in altgrad reads it, bit-stall reads
the weight's).

Example:
    >>> import torch.nn as nn
    >>> from altgrad.training import quantize_model
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> quantizer = quantize_model(net, "fp8_hybrid", modules=["*"])
    >>> compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    >>> x = torch.randn(4, 16)
    >>> for step in range(2):   # step 1 runs the opaque op (no scale yet), step 2 the traced layer
    ...     quantizer.begin_step()
    ...     compiled(x).sum().backward()
    >>> net[0].traced, torch.equal(compiled(x), net(x))
    (True, True)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from altgrad.quantization.formats import get_format
from altgrad.quantization.quantize import kernel_plan
from altgrad.quantization.scaling import amax
from altgrad.training.recipe import Rounding, Scaling, TensorQuantSpec

__all__ = ["can_trace", "traced_forward"]

_TRACED_ROUNDINGS = (Rounding.NEAREST, Rounding.ZERO)


def can_trace(layer) -> bool:
    """Whether ``layer``'s next call can run as traced graph code (see the module docstring).

    Read while dynamo traces the model, so every attribute read here becomes a guard: flipping one
    (statistics on for a logging step) selects the other cached graph instead of recompiling.
    """
    if layer.native:
        return False
    for q in layer.quantizers.values():
        if q.stats.enabled or q.whatif or q.spec.rounding not in _TRACED_ROUNDINGS:
            return False
        state = q.state
        if state.delayed and (not state.stepped or state.step_scale is None or state.traced_amax is None):
            return False
    return True


def _round(
    x: torch.Tensor,
    spec: TensorQuantSpec,
    scale: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
    amax_buffer: Optional[torch.Tensor],
) -> torch.Tensor:
    """``fake_quantize(x, spec.format, scale, dtype=out_dtype)`` as graph code: the kernel function the
    eager path compiles, on the same views, so both give the same bits. With ``amax_buffer`` the same
    pass also folds ``max |x|`` into it (delayed scaling's record of the step)."""
    if x.numel() == 0:  # nothing to record (and no amax of nothing), as in eager
        amax_buffer = None
    stats = "amax" if amax_buffer is not None else "none"
    plan = kernel_plan(x, get_format(spec.format), scale, spec.rounding.value, spec.saturate, True, stats, out_dtype)
    out = plan.kernel(*plan.args(x, scale, None))  # format parameters become graph constants
    if amax_buffer is not None:
        out, current = out
        amax_buffer.copy_(torch.maximum(amax_buffer, current))
    return out.reshape(x.shape)


def _current_scale(spec: TensorQuantSpec, x: torch.Tensor) -> torch.Tensor:
    from altgrad.training.quantized_linear import _scale_from_amax

    return _scale_from_amax(spec, amax(x, spec.scale_granularity))


class _TracedQuantizedLinearFunction(torch.autograd.Function):
    """The graph-code twin of ``_QuantizedLinearFunction``: same operands, same GEMMs, same casts.

    ``specs`` is ``(activation, weight, grad_output)`` (None: kept in high precision); scales and amax
    buffers are tensors the caller resolved from the quantizers' state (None where a role has none).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, x_scale, w_scale, g_scale, x_amax, w_amax, g_amax, specs, gemm_dtype):
        act_spec, weight_spec, grad_spec = specs
        xq = _round(x, act_spec, x_scale, gemm_dtype, x_amax) if act_spec is not None else x
        wq = _round(weight, weight_spec, w_scale, gemm_dtype, w_amax) if weight_spec is not None else weight
        ctx.save_for_backward(xq, wq)
        # Not saved tensors: the backward writes g_amax in place, which a saved tensor's version check
        # would reject when micro-batches' backwards interleave.
        ctx.g_scale, ctx.g_amax, ctx.grad_spec = g_scale, g_amax, grad_spec
        ctx.has_bias = bias is not None
        return F.linear(xq, wq, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        spec, g_scale = ctx.grad_spec, ctx.g_scale
        if spec is None:
            gq = grad_out
        else:
            if spec.scaling is Scaling.CURRENT:
                g_scale = _current_scale(spec, grad_out)
            gq = _round(grad_out, spec, g_scale, None, ctx.g_amax)
        grads = linear_grads(ctx.needs_input_grad[:3], ctx.has_bias, grad_out, gq, xq, wq)
        return (*grads, None, None, None, None, None, None, None, None)


def linear_grads(needs: tuple, has_bias: bool, grad_out: torch.Tensor, gq: torch.Tensor, xq: torch.Tensor,
                 wq: torch.Tensor) -> tuple:
    """The backward GEMMs of a quantized Linear, on the quantized output gradient ``gq`` and the saved
    quantized operands (shared by the eager function and its traced twin): ``(dx, dW, db)``, None where
    ``needs`` says no gradient."""
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = gq @ wq.to(gq.dtype)  # (..., in)
    if needs[1]:
        out_features, in_features = wq.shape
        grad_w = gq.reshape(-1, out_features).t() @ xq.reshape(-1, in_features).to(gq.dtype)  # (out, in)
        grad_w = grad_w.to(wq.dtype)
    if has_bias and needs[2]:
        # The bias gradient is a reduction, not a GEMM: kept in high precision, as FP8 kernels do.
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


def _scale_of(q, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The scale ``q`` would use for ``x`` now (delayed: the step's frozen scale, an input)."""
    scaling = q.spec.scaling
    if scaling is Scaling.NONE:
        return None
    if scaling is Scaling.DELAYED:
        return q.state.step_scale
    return _current_scale(q.spec, x)


def traced_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` as graph code (what a :class:`QuantLinear` runs while traced, when :func:`can_trace`)."""
    device_type = x.device.type
    gemm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    act_q, weight_q, grad_q = layer._operands()
    record = layer.training  # training calls advance the scale state; evaluation calls read it only
    backward_runs = torch.is_grad_enabled() and (
        x.requires_grad or layer.weight.requires_grad or (layer.bias is not None and layer.bias.requires_grad))
    scales, buffers = [], []
    for q, operand in ((act_q, x), (weight_q, layer.weight), (grad_q, None)):
        # grad_output (no operand here): a delayed scale is the step's, read in the backward; a current
        # one is computed there from the gradient.
        scale = None if q is None or (operand is None and not q.state.delayed) else _scale_of(q, operand)
        buffer = None
        runs = operand is not None or backward_runs
        if q is not None and record and runs:
            if q.state.delayed:
                buffer = q.state.traced_amax
                q.state.traced_pending = True  # replayed by dynamo after every run of the graph
            if operand is not None and not q.state.delayed:
                # bit-stall reads the weight's; a delayed scale is the step's, set when the step began
                q.state.last_scale = scale
        scales.append(scale)
        buffers.append(buffer)
    specs = tuple(None if q is None else q.spec for q in (act_q, weight_q, grad_q))
    return _TracedQuantizedLinearFunction.apply(
        x, layer.weight, layer.bias, *scales, *buffers, specs, gemm_dtype)
