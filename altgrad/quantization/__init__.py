"""Low-precision float formats and bit-exact quantization.

Example:
    >>> import torch
    >>> from altgrad.quantization import quantize, compute_scale, amax
    >>> x = torch.randn(4, 64)
    >>> q = quantize(x, "e4m3", scale=compute_scale(amax(x), "e4m3"))
"""

from altgrad.quantization.diagnostics import BitStallDetector, dynamic_range_used, quantization_stats
from altgrad.quantization.formats import FORMAT_REGISTRY, FloatFormat, Special, get_format, register_format
from altgrad.quantization.kernels import ROUNDING_MODES
from altgrad.quantization.quantize import (
    block_shape_of,
    dequantize,
    fake_quantize,
    quantize,
    quantize_with_amax,
    quantize_with_stats,
)
from altgrad.quantization.scaling import AmaxHistory, Granularity, amax, compute_scale, mx_scale, scaled_quantize

__all__ = [
    "FORMAT_REGISTRY",
    "FloatFormat",
    "Special",
    "get_format",
    "register_format",
    "ROUNDING_MODES",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_with_amax",
    "quantize_with_stats",
    "block_shape_of",
    "Granularity",
    "amax",
    "compute_scale",
    "mx_scale",
    "scaled_quantize",
    "AmaxHistory",
    "quantization_stats",
    "dynamic_range_used",
    "BitStallDetector",
]
