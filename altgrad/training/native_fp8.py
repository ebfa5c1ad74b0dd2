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
the simulated path for that layer, with one logged note per layer and reason.

Without a GPU, ``ALTGRAD_NATIVE_FP8_ON_CPU=1`` runs the same code on torch's CPU ``_scaled_mm`` (no FP8
hardware, so slower than float32 GEMMs): a way to check the FP8 layouts, scales and autograd of this
path, and what the test suite uses to validate it against the simulation on CPU-only machines.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

__all__ = ["FP8_DTYPES", "native_fp8_unsupported_reason", "NativeFP8LinearFunction"]

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


def native_fp8_unsupported_reason(layer, x: torch.Tensor) -> str | None:
    """Why this layer/input cannot run on FP8 tensor cores (None when it can)."""
    if not _device_supports_fp8(x.device):
        return (
            f"no CUDA device with FP8 tensor cores on {x.device} (needs compute capability >= 8.9; "
            f"{CPU_ENV}=1 runs torch._scaled_mm on CPU, slowly, to validate the path)"
        )
    missing = [r for r in _ROLES if r not in layer.quantizers]
    if missing:
        return f"roles {missing} are not quantized, but FP8 GEMMs need all three operands in FP8"
    for role in _ROLES:
        spec = layer.quantizers[role].spec
        if spec.format not in FP8_DTYPES:
            return f"{role} format {spec.format} has no hardware type (only E4M3/E5M2)"
        if spec.granularity not in ("tensor", "row"):
            return f"{role} uses {spec.granularity} scaling; the native path supports per-tensor and per-row scales"
    fmt = {r: layer.quantizers[r].spec.format for r in _ROLES}
    if fmt["activation"] == fmt["weight"] == "E5M2" or fmt["grad_output"] == fmt["weight"] == "E5M2" or (
        fmt["grad_output"] == fmt["activation"] == "E5M2"
    ):
        return "E5M2 x E5M2 GEMMs have no FP8 kernel (use E4M3 for weights/activations, e.g. fp8_hybrid)"
    rowwise = any(layer.quantizers[r].spec.granularity == "row" for r in _ROLES)
    if rowwise and x.device.type == "cuda":
        # CUDA's per-row FP8 kernel (CUTLASS; cuBLAS only on sm90 with cuBLAS >= 12.9) writes bf16/fp16
        # and wants E4M3 as its second operand, which is W in the forward and input-gradient GEMMs.
        # Conservative: those requirements everywhere.
        if _output_dtype(x) not in (torch.bfloat16, torch.float16):
            return "per-row FP8 GEMMs write bf16/fp16 only (run under bf16 autocast)"
        if fmt["weight"] != "E4M3":
            return "per-row FP8 GEMMs need E4M3 weights"
    tokens = x.numel() // x.shape[-1] if x.dim() else 0
    dims = {"in_features": layer.in_features, "out_features": layer.out_features, "tokens (batch x seq)": tokens}
    odd = [f"{k}={v}" for k, v in dims.items() if v % 16]
    if odd:
        return f"dims must be multiples of 16 for torch._scaled_mm ({', '.join(odd)})"
    return None


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


def _note_once(layer, note: str) -> None:
    if note not in layer._fallback_notes:
        layer._fallback_notes.add(note)
        logger.warning("altgrad native_fp8: %s: %s", layer.layer_name, note)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast a Linear returns the autocast dtype; the FP8 GEMM writes it directly, as
    # F.linear would on the simulated path.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


class NativeFP8LinearFunction(torch.autograd.Function):
    """The three GEMMs of a Linear layer on FP8 tensor cores (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        out_dtype = _output_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        x8, inv_x = _to_fp8(x2, layer.quantizers["activation"], layer.training)  # inv_x: () or (M, 1)
        w8, inv_w = _to_fp8(weight, layer.quantizers["weight"], layer.training)  # (N, K); inv_w: () or (N, 1)
        y = _gemm(x8, inv_x, w8, inv_w, out_dtype)  # (M, N)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x8, w8, inv_x, inv_w)
        ctx.layer, ctx.has_bias, ctx.x_shape, ctx.w_dtype = layer, bias is not None, x.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x8, w8, inv_x, inv_w = ctx.saved_tensors
        layer = ctx.layer
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        g8, inv_g = _to_fp8(g2, layer.quantizers["grad_output"], layer.training)  # inv_g: () or (M, 1)
        out_dtype = grad_out.dtype if grad_out.dtype != torch.float64 else torch.float32
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if inv_w.dim():  # W's per-row scales lie along this GEMM's contraction dim (N)
                _note_once(layer, "per-row weight scales: the input-gradient GEMM runs in float32 on the FP8 operands")
                grad_x = _dequantized_gemm(g8, inv_g, w8, inv_w, out_dtype)
            else:
                grad_x = _gemm(g8, inv_g, w8.t().contiguous(), inv_w, out_dtype)  # (M, K)
            grad_x = grad_x.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if inv_g.dim() or inv_x.dim():  # per-row scales along the token dim (M), contracted here
                _note_once(layer, "per-row scales along tokens: the weight-gradient GEMM runs in float32 on the FP8 operands")
                grad_w = _dequantized_gemm(g8.t(), inv_g.t() if inv_g.dim() else inv_g, x8, inv_x, torch.float32)
            else:
                grad_w = _gemm(g8.t().contiguous(), inv_g, x8.t().contiguous(), inv_x, torch.float32)  # (N, K)
            grad_w = grad_w.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None
