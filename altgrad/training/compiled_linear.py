"""How a :class:`~altgrad.training.quantized_linear.QuantLinear` runs inside ``torch.compile(model)``
on the steps the traced path (:mod:`altgrad.training.traced_linear`) does not cover: logging steps
(statistics on), stochastic rounding, a delayed recipe's first step, ``native_fp8``, and layers driven
without a step driver.

There each quantized Linear is one pair of ``torch.library`` custom ops, ``altgrad::quantized_linear``
(forward) and ``altgrad::quantized_linear_backward``, tied together with ``register_autograd``. The
compiler sees an opaque node with known output shapes (``register_fake``); at run time the node executes
the very code the eager model runs (``_QuantizedLinearFunction`` or ``NativeFP8LinearFunction``),
quantizers and all.

Why an opaque op for these steps. What they need is Python state updated per call or bits from torch's
generator: statistics accumulate in host-side objects per call, what-if probes ride on the same calls,
stochastic rounding draws its seeds from torch's global generator (Inductor's own generator would give
other bits than eager), the first delayed step derives its frozen scale from its first call's amax, and
the native path keeps FP8 operands and their inverse scales for the backward. Traced, each of these
would break the graph, recompile whenever it flips, or change the bits. An opaque op has none of these
problems: zero graph breaks, one cached graph for all such steps, and the same numbers as eager by
construction (same code, same order, same generator). What it gives up is fusion and the per-call
overhead of the eager code, which is why ordinary steps take the traced path.

The op's arguments are tensors and plain values only, so a layer is named by an integer key
(``layer_key``) into a weak registry; the tensors the backward needs stay with the layer under a
ticket the forward returns (a 0-d int64 tensor), so their layout (bf16 operands, FP8 operands and
their inverse scales) is the eager function's business alone. Tickets of a forward whose backward never
ran are dropped when the next optimizer step begins.

Example:
    >>> import torch.nn as nn
    >>> from altgrad.training import quantize_model
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> _ = quantize_model(net, "fp8_hybrid", modules=["*"])
    >>> compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    >>> x = torch.randn(4, 16, requires_grad=True)
    >>> torch.equal(compiled(x), net(x))
    True
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

__all__ = ["register_layer", "compiled_forward", "discard_pending"]

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()
_TICKETS = itertools.count(1)


def register_layer(layer: torch.nn.Module) -> int:
    """Give ``layer`` a fresh key in the registry the ops look layers up in (also after a deepcopy or
    unpickling, which must not share the original's key: the copy has quantizers of its own)."""
    key = next(_KEYS)
    _LAYERS[key] = layer
    layer._pending = {}
    return key


def _layer(key: int):
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"altgrad quantized layer {key} no longer exists (the compiled graph outlived its model)")
    return layer


def discard_pending(layer: torch.nn.Module) -> None:
    """Drop the saved tensors of forwards whose backward never ran (called when a step begins)."""
    pending = getattr(layer, "_pending", None)
    if pending:
        pending.clear()


class _Ctx:
    """The part of an autograd ``ctx`` the eager functions use, kept between the two ops."""

    def __init__(self) -> None:
        self.saved_tensors: tuple = ()
        self.needs_input_grad = (True, True, True, False, False, False, False)

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


def _autocast(device_type: str, gemm_dtype: Optional[torch.dtype]):
    # The autocast state the compiler saw at this call, re-established for the eager code (which reads
    # it to pick its GEMM dtype); at run time the op may be called with autocast on or off.
    return torch.autocast(device_type, dtype=gemm_dtype, enabled=gemm_dtype is not None)


@torch.library.custom_op("altgrad::quantized_linear", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    layer_key: int,
    training: bool,
    save: bool,
    gemm_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor]:
    layer = _layer(layer_key)
    ctx = _Ctx()
    ctx.function = layer.autograd_function(x)
    with torch.no_grad(), _autocast(x.device.type, gemm_dtype):
        y = ctx.function.forward(ctx, x, weight, bias, *layer._operands(), training)
    ticket = next(_TICKETS) if save else 0
    if save:
        layer._pending[ticket] = ctx
    y = y.clone() if y is x else y  # an op's output may not alias its input
    return y, torch.tensor(ticket, dtype=torch.int64)


@_forward_op.register_fake
def _(x, weight, bias, layer_key, training, save, gemm_dtype):
    out_dtype = gemm_dtype or (x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)
    return y, torch.empty((), dtype=torch.int64)


@torch.library.custom_op("altgrad::quantized_linear_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, ticket: torch.Tensor, layer_key: int, needs_x: bool, needs_w: bool, needs_b: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layer = _layer(layer_key)
    ctx = layer._pending.pop(int(ticket))  # read on the host inside the op: no graph break
    ctx.needs_input_grad = (needs_x, needs_w, needs_b, False, False, False, False)
    with torch.no_grad(), torch.autocast(grad_out.device.type, enabled=False):
        grads = ctx.function.backward(ctx, grad_out)[:3]
    # Custom ops return tensors, not None: an empty tensor stands for "no gradient".
    grad_x, grad_w, grad_b = (g if g is not None else grad_out.new_empty(0) for g in grads)
    return grad_x, grad_w, grad_b


@_backward_op.register_fake
def _(grad_out, ticket, layer_key, needs_x, needs_w, needs_b):
    layer = _layer(layer_key)
    out_dtype = grad_out.dtype if grad_out.dtype != torch.float64 else torch.float32
    grad_x = grad_out.new_empty((*grad_out.shape[:-1], layer.in_features), dtype=out_dtype) if needs_x else grad_out.new_empty(0)
    w = layer.weight
    grad_w = grad_out.new_empty(w.shape, dtype=w.dtype) if needs_w else grad_out.new_empty(0)
    grad_b = grad_out.new_empty((layer.out_features,)) if needs_b else grad_out.new_empty(0)
    return grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layer_key, *_ = inputs
    ctx.layer_key = layer_key
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(output[1])  # the ticket


def _backward(ctx, grad_out, _grad_ticket):
    (ticket,) = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _backward_op(grad_out, ticket, ctx.layer_key, *needs)
    # The autograd engine would cast a gradient to its input's dtype (bf16 under autocast -> float32);
    # done here explicitly, as the same cast.
    out = [g.to(dtype) if need else None for g, need, dtype in zip(grads, needs, ctx.dtypes)]
    return (*out, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` as the custom op pair (what :class:`QuantLinear` runs while being compiled)."""
    device_type = x.device.type
    gemm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    params = (x, layer.weight) + (() if layer.bias is None else (layer.bias,))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    y, _ = _forward_op(x, layer.weight, layer.bias, layer._op_key, layer.training, save, gemm_dtype)
    return y
