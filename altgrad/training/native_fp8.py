"""Real FP8 GEMMs for the ``native_fp8`` recipe backend (Hopper/Ada GPUs, `torch._scaled_mm`).

The operands are rounded by the same :func:`altgrad.quantization.quantize` as the simulated path (so
rounding, scaling and statistics are identical), then stored as ``torch.float8_e4m3fn`` /
``torch.float8_e5m2`` and multiplied by the tensor cores with float32 accumulation:

    forward:           y  = (x8 @ w8^T) * (1/s_x) * (1/s_w)         x8: (M, K) row-major, w8^T: column-major
    backward (input):  dx = (g8 @ w8)   * (1/s_g) * (1/s_w)
    backward (weight): dW = (g8^T @ x8) * (1/s_g) * (1/s_x)

`torch._scaled_mm` takes the *dequantization* scales (the inverse of altgrad's multipliers), needs every
matrix dim that it contracts or outputs along N to be a multiple of 16, and has no E5M2 x E5M2 kernel.
Scales are per tensor or per row (granularity ``"row"``: one per token for x and dy, one per output
feature for W). A scale can only be applied to the accumulator along an *output* dim, so per-row
scales serve the forward GEMM; a backward GEMM that contracts over a per-row scaled dim (dx over W's
rows, dW over the tokens) runs in float32 on the same FP8 operands, with a logged note.
Whatever it cannot run (another format, per-block scales, odd shapes, no CUDA FP8 support) falls back to
the simulated path for that layer, with one logged note per layer and reason. What depends on the recipe
and the layer's dims is decided once, at conversion (:class:`NativeFP8Plan`); per call only the input's
device (looked up once per device) and its token count remain.

Without a GPU, ``ALTGRAD_NATIVE_FP8_ON_CPU=1`` runs the same code on torch's CPU ``_scaled_mm`` (no FP8
hardware, so slower than float32 GEMMs): a way to check the FP8 layouts, scales and autograd of this
path, and what the test suite uses to validate it against the simulation on CPU-only machines.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from altgrad.training.recipe import TensorQuantSpec

__all__ = ["FP8_DTYPES", "NativeFP8Plan", "native_fp8_unsupported_reason", "NativeFP8LinearFunction"]

FP8_DTYPES = {"E4M3": torch.float8_e4m3fn, "E5M2": torch.float8_e5m2}
_ROLES = ("activation", "weight", "grad_output")
CPU_ENV = "ALTGRAD_NATIVE_FP8_ON_CPU"


@functools.lru_cache(maxsize=None)
def _cuda_supports_fp8(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)  # Ada (sm_89) and Hopper (sm_90)


def _device_supports_fp8(device: torch.device) -> bool:
    if device.type == "cpu":
        return os.environ.get(CPU_ENV, "0") == "1"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _cuda_supports_fp8(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class NativeFP8Plan:
    """What the native backend can do for one layer, decided once, when the layer is converted.

    Everything that depends only on the recipe and the layer's shape is settled here: the static
    ``reason`` it cannot run on FP8 tensor cores (None: it can), whether its scales are per row, the
    extra requirement of CUDA's per-row kernel, and the ``notes`` on GEMMs that will run in float32 on
    the FP8 operands. What remains per call depends on the input: its device (:meth:`device_reason`,
    which callers cache per device), its token count and, for per-row scales on CUDA, its output dtype
    (:meth:`input_reason`, a few integer checks).

    Example:
        >>> from altgrad.training.recipe import get_recipe
        >>> r = get_recipe("fp8_hybrid")
        >>> specs = {"activation": r.activation, "weight": r.weight, "grad_output": r.grad_output}
        >>> NativeFP8Plan.for_layer(specs, 64, 32).reason is None
        True
        >>> NativeFP8Plan.for_layer(specs, 64, 40).reason
        'dims must be multiples of 16 for torch._scaled_mm (out_features=40)'
        >>> NativeFP8Plan.for_layer({**specs, "weight": get_recipe("e5m2").weight}, 64, 32).reason[:16]
        'E5M2 x E5M2 GEMM'
    """

    reason: str | None = None
    rowwise: bool = False
    cuda_reason: str | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def for_layer(
        cls, specs: Mapping[str, "TensorQuantSpec | None"], in_features: int, out_features: int
    ) -> "NativeFP8Plan":
        """The plan for a Linear of these dims whose roles are quantized by ``specs`` (role -> spec or None)."""
        missing = [r for r in _ROLES if specs.get(r) is None]
        if missing:
            return cls(f"roles {missing} are not quantized, but FP8 GEMMs need all three operands in FP8")
        for role in _ROLES:
            spec = specs[role]
            if spec.format not in FP8_DTYPES:
                return cls(f"{role} format {spec.format} has no hardware type (only E4M3/E5M2)")
            if spec.granularity not in ("tensor", "row"):
                return cls(
                    f"{role} uses {spec.granularity} scaling; the native path supports per-tensor and per-row scales"
                )
        fmt = {r: specs[r].format for r in _ROLES}
        if fmt["activation"] == fmt["weight"] == "E5M2" or fmt["grad_output"] == fmt["weight"] == "E5M2" or (
            fmt["grad_output"] == fmt["activation"] == "E5M2"
        ):
            return cls("E5M2 x E5M2 GEMMs have no FP8 kernel (use E4M3 for weights/activations, e.g. fp8_hybrid)")
        odd = [f"{k}={v}" for k, v in (("in_features", in_features), ("out_features", out_features)) if v % 16]
        if odd:
            return cls(f"dims must be multiples of 16 for torch._scaled_mm ({', '.join(odd)})")
        row = {r: specs[r].granularity == "row" for r in _ROLES}
        notes = []
        # A scale can only be applied to the accumulator along an output dim (see the module docstring).
        if row["weight"]:  # W's per-row scales lie along the input-gradient GEMM's contraction dim
            notes.append("per-row weight scales: the input-gradient GEMM runs in float32 on the FP8 operands")
        if row["activation"] or row["grad_output"]:  # per-row scales along tokens, which dW contracts
            notes.append("per-row scales along tokens: the weight-gradient GEMM runs in float32 on the FP8 operands")
        # CUDA's per-row FP8 kernel (CUTLASS; cuBLAS only on sm90 with cuBLAS >= 12.9) wants E4M3 as its
        # second operand, which is W in the forward and input-gradient GEMMs. Conservative: everywhere.
        cuda_reason = "per-row FP8 GEMMs need E4M3 weights" if any(row.values()) and fmt["weight"] != "E4M3" else None
        return cls(None, any(row.values()), cuda_reason, tuple(notes))

    def device_reason(self, device: torch.device) -> str | None:
        """Why inputs on ``device`` cannot run natively (the static reason first). Depends on the device
        only (and on ``ALTGRAD_NATIVE_FP8_ON_CPU`` for the CPU), so a caller may cache it per device."""
        if self.reason is not None:
            return self.reason
        if not _device_supports_fp8(device):
            return (
                f"no CUDA device with FP8 tensor cores on {device} (needs compute capability >= 8.9; "
                f"{CPU_ENV}=1 runs torch._scaled_mm on CPU, slowly, to validate the path)"
            )
        if device.type == "cuda":
            return self.cuda_reason
        return None

    def input_reason(self, x: torch.Tensor) -> str | None:
        """Why this input (on a device :meth:`device_reason` accepted) cannot run natively."""
        if self.rowwise and x.device.type == "cuda" and _output_dtype(x) not in (torch.bfloat16, torch.float16):
            # CUDA's per-row FP8 kernel writes bf16/fp16 only.
            return "per-row FP8 GEMMs write bf16/fp16 only (run under bf16 autocast)"
        tokens = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if tokens % 16:
            return f"dims must be multiples of 16 for torch._scaled_mm (tokens (batch x seq)={tokens})"
        return None


def native_fp8_unsupported_reason(layer, x: torch.Tensor) -> str | None:
    """Why this layer/input cannot run on FP8 tensor cores (None when it can).

    ``layer``: a :class:`NativeFP8Plan`, or a converted ``QuantLinear`` (its public ``native_plan``).
    """
    plan = layer if isinstance(layer, NativeFP8Plan) else layer.native_plan
    return plan.device_reason(x.device) or plan.input_reason(x)


def _to_fp8(t: torch.Tensor, quantizer, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize exactly as the simulated path does (same scale, rounding, saturation and statistics),
    then store in the hardware dtype. Returns the FP8 tensor and the *dequantization* scale (1 /
    altgrad's multiplier), float32, 0-d."""
    q, scale = quantizer.quantize(t, record, dtype=FP8_DTYPES[quantizer.spec.format])  # cast in the pass
    if scale is None:
        inv = torch.ones((), device=t.device)
    else:  # per tensor: 0-d; per row: (rows, 1)
        inv = 1.0 / scale.float()
        inv = inv.reshape(()) if inv.numel() == 1 else inv.reshape(-1, 1)
    return q, inv


def _gemm(a8, inv_a, b8, inv_b_rows, out_dtype):
    """``(a8 * inv_a) @ (b8 * inv_b_rows).T`` for ``a8`` (M, C) and ``b8`` (N, C), contracting over C.

    ``inv_a`` is 0-d or (M, 1) and ``inv_b_rows`` 0-d or (N, 1): scales along the output dims, which
    ``torch._scaled_mm`` applies to its float32 accumulator. ``b8`` is passed transposed (column-major),
    the layout the FP8 tensor cores need.
    """
    if inv_a.dim() or inv_b_rows.dim():  # per-row on either side: both as rowwise scales
        inv_a = inv_a.reshape(-1, 1).expand(a8.shape[0], 1).contiguous()
        inv_b_rows = inv_b_rows.reshape(1, -1).expand(1, b8.shape[0]).contiguous()
    # CUDA needs `a` row-major and `b` column-major; contiguous() is free when they already are (a
    # per-row quantized transposed input keeps its column-major order).
    return torch._scaled_mm(
        a8.contiguous(), b8.contiguous().t(), scale_a=inv_a, scale_b=inv_b_rows, out_dtype=out_dtype
    )


def _dequantized_gemm(a8, inv_a, b8, inv_b, out_dtype):
    """``(a8 * inv_a) @ (b8 * inv_b)`` in float32 from the FP8 operands: for a GEMM whose per-row scales
    lie along its contraction dim, where no FP8 kernel can apply them (the same values the simulated
    path multiplies)."""
    return ((a8.float() * inv_a) @ (b8.float() * inv_b)).to(out_dtype)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast a Linear returns the autocast dtype; the FP8 GEMM writes it directly, as
    # F.linear would on the simulated path.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


class NativeFP8LinearFunction(torch.autograd.Function):
    """The three GEMMs of a Linear layer on FP8 tensor cores (see module docstring).

    ``apply(x, weight, bias, act_q, weight_q, grad_q, training)``: the per-role quantizers (their
    scale state and statistics advance only when ``training``), never the module itself. Which GEMMs
    run in float32 follows from the scales' shapes (see :attr:`NativeFP8Plan.notes`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act_q, weight_q, grad_q, training: bool):
        out_dtype = _output_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        x8, inv_x = _to_fp8(x2, act_q, training)  # inv_x: () or (M, 1)
        w8, inv_w = _to_fp8(weight, weight_q, training)  # (N, K); inv_w: () or (N, 1)
        y = _gemm(x8, inv_x, w8, inv_w, out_dtype)  # (M, N)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x8, w8, inv_x, inv_w)
        ctx.grad_q, ctx.training = grad_q, training
        ctx.has_bias, ctx.x_shape, ctx.w_dtype = bias is not None, x.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x8, w8, inv_x, inv_w = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        g8, inv_g = _to_fp8(g2, ctx.grad_q, ctx.training)  # inv_g: () or (M, 1)
        out_dtype = grad_out.dtype if grad_out.dtype != torch.float64 else torch.float32
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if inv_w.dim():  # W's per-row scales lie along this GEMM's contraction dim (N)
                grad_x = _dequantized_gemm(g8, inv_g, w8, inv_w, out_dtype)
            else:
                grad_x = _gemm(g8, inv_g, w8.t().contiguous(), inv_w, out_dtype)  # (M, K)
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if inv_g.dim() or inv_x.dim():  # per-row scales along the token dim (M), contracted here
                grad_w = _dequantized_gemm(g8.t(), inv_g.t() if inv_g.dim() else inv_g, x8, inv_x, torch.float32)
            else:
                grad_w = _gemm(g8.t().contiguous(), inv_g, x8.t().contiguous(), inv_x, torch.float32)  # (N, K)
            grad_w = grad_w.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None
