"""Where a format hurts: overflow, underflow, SQNR, dynamic-range use and bit-stall.

Every statistic is returned as a 0-d tensor on the input's device, so calling these every step costs
no host synchronisation; read them (``.item()``/``float()``) once per logging step.
"""

from __future__ import annotations

import math

import torch

from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.kernels import (
    binade_edges,
    binade_histogram,
    binade_occupancy,
    compile_enabled,
    run_compiled,
)
from altgrad.quantization.quantize import _params_on, quantize, quantize_with_stats, scale_views, stats_from_sums

__all__ = ["quantization_stats", "dynamic_range_used", "BitStallDetector"]


def _scaled(x: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
    xf = x.detach().to(torch.float32)
    if scale is None:
        return xf
    x_view, s_view = scale_views(xf, scale)
    return (x_view * s_view).reshape(x.shape)


# Compiled on CPU, formats of up to this many binades (every FP8 and smaller format, FP16, E6M1) take
# binade_occupancy, an unrolled reduction per binade fused into one pass: Inductor's C++ code runs the
# histogram's bit casts and scatter as scalar loops. BF16, E7M0 and E8M0 (126 to 261 binades), CUDA (where
# the histogram is cheap) and uncompiled runs (the unrolled reductions would be one pass each) keep it.
_MAX_UNROLLED_BINADES = 64


def dynamic_range_used(q: torch.Tensor, fmt: FloatFormat | str) -> torch.Tensor:
    """Share of the format's binades (``min_subnormal`` .. ``max_value``) that hold at least one of the
    nonzero finite values of ``q`` (values already on the format's grid, in the format's units).

    Example:
        >>> dynamic_range_used(torch.tensor([1.0, 1.5, 2.0, 0.0]), "e2m1")   # binades 2^0, 2^1 of 4
        tensor(0.5000)
    """
    fmt = get_format(fmt)
    if q.numel() == 0:
        return torch.zeros((), device=q.device)
    device_type = q.device.type
    compiled = torch.compiler.is_compiling() or compile_enabled(device_type)
    if device_type == "cpu" and compiled and fmt.num_binades <= _MAX_UNROLLED_BINADES:
        edges = _params_on(fmt, q.device, binade_edges, torch.float32)
        occupied = run_compiled(binade_occupancy, q.detach(), edges, variant=(q.dtype, fmt.num_binades))
    else:
        lowest = math.floor(math.log2(fmt.min_subnormal))
        occupied = run_compiled(binade_histogram, q.detach(), lowest, fmt.num_binades, variant=(q.dtype,)) > 0
    return occupied.sum().to(torch.float32) / fmt.num_binades


def quantization_stats(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    scale: torch.Tensor | float | None = None,
    q: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """How well ``fmt`` (after ``scale``) carries ``x``. All values are 0-d tensors; no host sync.

    - ``overflow_rate``: fraction of elements with ``|x * scale| > max_value`` (inf included).
    - ``underflow_rate``: fraction of elements that are nonzero but quantize to zero.
    - ``sqnr_db``: ``10 log10(sum(xs^2) / sum((xs - q)^2))`` on the scaled values (inf when exact).
    - ``dynamic_range_used``: see :func:`dynamic_range_used`.
    - ``amax``: ``max |x|`` (unscaled), for scale bookkeeping.

    Without ``q``, ``x`` is quantized (nearest, saturating) by :func:`quantize_with_stats`, which
    reduces everything but the binade occupancy in the rounding pass itself. ``q`` may pass an
    already-quantized ``x * scale`` (any rounding) to measure that instead.

    Example:
        >>> s = quantization_stats(torch.tensor([1e-6, 1.0, 1000.0, 0.0]), "e4m3")
        >>> s["overflow_rate"].item(), s["underflow_rate"].item()
        (0.25, 0.25)
    """
    fmt = get_format(fmt)
    if q is None:  # one fused pass: rounding and every reduction but the binade occupancy
        q, stats = quantize_with_stats(x.detach(), fmt, scale)
        q = q.to(torch.float32)
    else:
        xs = _scaled(x, scale)
        q = q.detach().to(torch.float32)
        finite = torch.isfinite(xs)
        sums = torch.stack(
            [
                x.detach().abs().amax().double() if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device),
                (xs.abs() > fmt.max_value).sum().double(),
                ((xs != 0) & (q == 0)).sum().double(),
                torch.where(finite, xs, 0.0).double().square().sum(),
                torch.where(finite & torch.isfinite(q), xs.double() - q.double(), 0.0).square().sum(),
            ]
        )
        stats = stats_from_sums(sums, xs.numel())
    return {
        "overflow_rate": stats["overflow_rate"],
        "underflow_rate": stats["underflow_rate"],
        "sqnr_db": stats["sqnr_db"],
        "dynamic_range_used": dynamic_range_used(q, fmt),
        "amax": stats["amax"],
    }


class BitStallDetector:
    """Counts updates that the format swallows: the optimizer moved a weight, but its quantized value
    did not change ("bit-stall", the failure mode of low-precision weights and small learning rates).

    For each tracked tensor, call :meth:`update` with the weight before and after an optimizer step and
    the format the weight is stored or used in. An element is *updated* if ``after != before`` and
    *stalled* if, in addition, ``quantize(after * scale) == quantize(before * scale)``. For weights stored
    in the format, pass the stored value as ``before`` and the unrounded optimizer result as ``after``.
    Counts accumulate on device; :meth:`get_stall_rate` reads them (one sync), :meth:`reset` clears.

    Example:
        >>> det = BitStallDetector()
        >>> w0 = torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> det.update("w", w0, w0 + torch.tensor([1e-4, 0.2, 0.0, -1e-3]), "e4m3")
        >>> det.get_stall_rate()      # 2 of the 3 updated elements did not move on the E4M3 grid
        0.6666666666666666
    """

    def __init__(self) -> None:
        self._updated: dict[str, torch.Tensor] = {}
        self._stalled: dict[str, torch.Tensor] = {}
        self._range: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(
        self,
        name: str,
        before: torch.Tensor,
        after: torch.Tensor,
        fmt: FloatFormat | str,
        scale: torch.Tensor | float | None = None,
        rounding: str = "nearest",
    ) -> None:
        if before.shape != after.shape:
            raise ValueError(f"{name}: before {tuple(before.shape)} and after {tuple(after.shape)} differ in shape")
        fmt = get_format(fmt)
        q_before = quantize(before, fmt, scale, rounding=rounding)
        q_after = quantize(after, fmt, scale, rounding=rounding)
        updated = after != before
        self.count(name, updated, updated & (q_after == q_before))
        self._range[name] = dynamic_range_used(q_after, fmt)

    @torch.no_grad()
    def count(self, name: str, updated: torch.Tensor, stalled: torch.Tensor) -> None:
        """Add precomputed masks (e.g. a stored weight whose stochastic rounding gave back its old value)."""
        up = updated.sum().to(torch.float64)
        st = stalled.sum().to(torch.float64)
        self._updated[name] = self._updated[name] + up if name in self._updated else up
        self._stalled[name] = self._stalled[name] + st if name in self._stalled else st

    def get_layer_stall_rates(self) -> dict[str, float]:
        """Per-tensor stall rate (stalled / updated); 0 for tensors with no updates."""
        return {
            name: float(self._stalled[name] / self._updated[name]) if float(self._updated[name]) > 0 else 0.0
            for name in self._updated
        }

    def get_stall_rate(self) -> float:
        """Aggregate stall rate over every tracked element (element-weighted)."""
        if not self._updated:
            return 0.0
        updated = torch.stack([v.to("cpu") for v in self._updated.values()]).sum()
        stalled = torch.stack([v.to("cpu") for v in self._stalled.values()]).sum()
        return float(stalled / updated) if updated > 0 else 0.0

    def get_counts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Raw on-device ``(stalled, updated)`` counts per tensor, e.g. to all-reduce across ranks."""
        return {name: (self._stalled[name], self._updated[name]) for name in self._updated}

    def get_dynamic_range_usage(self) -> dict[str, float]:
        """Per-tensor share of the format's binades used by the latest quantized weights."""
        return {name: float(v) for name, v in self._range.items()}

    def reset(self) -> None:
        self._updated.clear()
        self._stalled.clear()
        self._range.clear()
