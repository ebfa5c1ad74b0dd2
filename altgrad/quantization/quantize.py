"""Public quantization API: :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`.

Scales tile the tensor: a scale of shape ``s`` applied to ``x`` of shape ``x.shape`` means one scale per
block of shape ``x.shape[i] // s[i]`` (``s`` is left-padded with ones). That single rule covers every
granularity in use:

========================  =========================  ==================
granularity               x                          scale
========================  =========================  ==================
per tensor                ``(M, K)``                 ``()`` or ``(1, 1)``
per row (amax over K)     ``(M, K)``                 ``(M, 1)``
MX, 1x32 blocks           ``(M, K)``                 ``(M, K // 32)``
DeepSeek 1x128            ``(M, K)``                 ``(M, K // 128)``
128x128 tiles             ``(M, K)``                 ``(M // 128, K // 128)``
========================  =========================  ==================
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass

import torch

from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.kernels import (
    ROUNDING_MODES,
    STATS_FIELDS,
    format_params,
    needs_exact_subnormal_exponent,
    round_nearest_split,
    round_to_format,
    run_compiled,
    split_params,
    split_rounding_applies,
)

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_with_amax",
    "quantize_with_stats",
    "quantize_with_sums",
    "stats_from_sums",
    "block_shape_of",
    "scale_views",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Output dtypes: x's float types, and the hardware FP8 types for values already on their grid.
_FP8_FORMAT_OF = {torch.float8_e4m3fn: "E4M3", torch.float8_e5m2: "E5M2"}
_OUT_DTYPES = _FLOAT_DTYPES + tuple(_FP8_FORMAT_OF)


@functools.lru_cache(maxsize=256)
def _cached_params_on(build, dtype: torch.dtype, fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    # Cached per (kernel, format, device): on CUDA this avoids a host-to-device copy per call.
    return torch.tensor(build(fmt), dtype=dtype, device=device)


def _params_on(fmt: FloatFormat, device: torch.device, build=format_params, dtype=torch.int32) -> torch.Tensor:
    """A kernel's parameter vector for ``fmt`` (``build``: ``format_params`` or ``split_params``)."""
    if torch.compiler.is_compiling():
        # Traced inside a compiled model: dynamo would trace through the cache wrapper anyway (and warn
        # about it); the constant tensor becomes part of the graph.
        return torch.tensor(build(fmt), dtype=dtype, device=device)
    return _cached_params_on(build, dtype, fmt, device)


@dataclass(frozen=True)
class KernelPlan:
    """Everything about one quantizer call that depends on its signature (shapes, dtypes, devices,
    format and options) and not on the data: worked out once per signature, so that a training loop
    calling the quantizer with the same shapes every step pays for the checks, the scale tiling and the
    kernel choice once, not at every call.

    ``args(x, scale, seeds)`` gives the kernel's arguments for one call, ``x`` and ``scale`` as
    given by the caller (``scale`` a tensor, or None).
    """

    kernel: types.FunctionType
    x_view_shape: tuple[int, ...]
    s_view_shape: tuple[int, ...] | None
    static_args: tuple  # the kernel's arguments after (x_view, s_view); the seeds' slot is None here
    seeds_slot: int | None  # where in static_args a stochastic call's seeds go
    variant: tuple  # the compiled variant's key (input dtype and the static arguments)
    cast_after: torch.dtype | None  # a non-saturating float8 cast after the pass (see _build_plan)

    def args(self, x: torch.Tensor, scale: torch.Tensor | None, seeds: torch.Tensor | None) -> tuple:
        # detach() last: the kernel never needs autograd history, and a plain tensor (not a view with a
        # `_base`) keeps torch.compile's guards on shapes only.
        x_view = x.reshape(self.x_view_shape).detach()
        s_view = None if scale is None else scale.to(torch.float32).reshape(self.s_view_shape).detach()
        static = self.static_args
        if self.seeds_slot is not None:
            static = static[: self.seeds_slot] + (seeds,) + static[self.seeds_slot + 1 :]
        return (x_view, s_view, *static)


def _build_plan(x_shape, x_dtype, fmt: FloatFormat, scale_sig, device: torch.device, rounding: str,
                saturate: bool, dequant: bool, stats: str, dtype) -> KernelPlan:
    """The :class:`KernelPlan` of one call signature; raises on arguments no call can take."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {list(ROUNDING_MODES)}")
    out_dtype = x_dtype if dtype is None else dtype
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in _OUT_DTYPES)}, got {out_dtype}")
    cast_after = None
    if out_dtype in _FP8_FORMAT_OF:
        if dequant or fmt != get_format(_FP8_FORMAT_OF[out_dtype]):
            raise ValueError(
                f"dtype={out_dtype} holds {_FP8_FORMAT_OF[out_dtype]} values: use it to quantize (not fake-quantize) "
                f"into that format, got {'fake_quantize' if dequant else 'quantize'} into {fmt.name}"
            )
        if not saturate:
            # Compiled (Triton) float8 casts saturate, which would turn E5M2's infinities into +-max:
            # a non-saturating cast runs after the pass instead.
            out_dtype, cast_after = torch.float32, out_dtype
    if scale_sig is None:
        x_view_shape, s_view_shape = (math.prod(x_shape),), None
    else:
        scale_shape, scale_dtype, scale_device = scale_sig
        _check_dtype(scale_dtype, "scale")
        if scale_device != device:
            raise ValueError(f"scale is on {scale_device} but x is on {device}")
        x_view_shape, s_view_shape = _view_shapes(x_shape, scale_shape)
    seeds_slot = None
    if split_rounding_applies(fmt, rounding, device.type):
        kernel = round_nearest_split
        static = (_params_on(fmt, device, split_params, torch.float32), bool(saturate), dequant, stats, out_dtype)
    else:
        kernel = round_to_format
        static = (_params_on(fmt, device), None, rounding, bool(saturate), dequant,
                  needs_exact_subnormal_exponent(fmt), stats, out_dtype)
        seeds_slot = 1 if rounding == "stochastic" else None
    variant = (x_dtype, *(a for a in static if not isinstance(a, torch.Tensor) and a is not None))
    return KernelPlan(kernel, x_view_shape, s_view_shape, static, seeds_slot, variant, cast_after)


_cached_plan = functools.lru_cache(maxsize=1024)(_build_plan)


def kernel_plan(x: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | float | None, rounding: str,
                saturate: bool, dequant: bool, stats: str, dtype: torch.dtype | None) -> KernelPlan:
    """The :class:`KernelPlan` for quantizing ``x`` (a checked float tensor) with these arguments, checked
    in the order the public functions always have (rounding, output dtype, float8 use, then the scale):
    cached per signature for eager calls; built afresh while a graph is traced (dynamo would trace
    through the cache, and the graph keeps what it needs itself)."""
    if scale is None:
        scale_sig = None
    elif isinstance(scale, torch.Tensor):
        scale_sig = (scale.shape, scale.dtype, scale.device)
    else:  # a number: a float32 scalar on x's device once the plan is made (float() raises on the rest)
        scale_sig = (torch.Size(), torch.float32, x.device)
    key = (x.shape, x.dtype, fmt, scale_sig, x.device, rounding, bool(saturate), dequant, stats, dtype)
    if torch.compiler.is_compiling():
        return _build_plan(*key)
    try:
        return _cached_plan(*key)
    except TypeError:  # an unhashable argument (say, a list for `rounding`): the builder says what is wrong
        return _build_plan(*key)


def _check_tensor(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    _check_dtype(x.dtype, what)


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} must be a float tensor ({', '.join(str(d) for d in _FLOAT_DTYPES)}), got {dtype}; "
            "integer tensors have no low-precision float image"
        )


def block_shape_of(x_shape: torch.Size, scale_shape: torch.Size) -> tuple[int, ...]:
    """The block each scale element covers, ``x.shape[i] // scale.shape[i]``; raises if scale does not tile x.

    Example:
        >>> block_shape_of(torch.Size([4, 64]), torch.Size([4, 2]))
        (1, 32)
    """
    if len(scale_shape) > len(x_shape):
        if math.prod(scale_shape) == 1:  # e.g. a (1, 1) per-tensor scale for a 1-D tensor
            scale_shape = torch.Size([1] * len(x_shape))
        else:
            raise ValueError(f"scale of shape {tuple(scale_shape)} has more dims than x of shape {tuple(x_shape)}")
    padded = (1,) * (len(x_shape) - len(scale_shape)) + tuple(scale_shape)
    blocks = []
    for dim, (n, s) in enumerate(zip(x_shape, padded)):
        if (s == 0 and n != 0) or (s != 0 and n % s != 0):
            raise ValueError(
                f"scale of shape {tuple(scale_shape)} does not tile x of shape {tuple(x_shape)}: along dim {dim}, "
                f"{n} is not a multiple of {s}. Accepted scale shapes: one value (per tensor), x's shape with 1 "
                "on the reduced dims (per row), or x's shape divided by a block shape (per block)"
            )
        blocks.append(n // s if s else n)
    return tuple(blocks)


def _view_shapes(x_shape: torch.Size, scale_shape: torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """View x as (s0, b0, s1, b1, ...) and scale as (s0, 1, s1, 1, ...), then merge neighbouring dims.

    Merging keeps the number of distinct ranks the compiled kernel sees small: per tensor becomes 1-D,
    per row and 1xN blocks become 2-D, 2-D tiles 4-D.
    """
    blocks = block_shape_of(x_shape, scale_shape)
    if 0 in x_shape:  # an empty x: nothing to tile, only shapes that broadcast
        scale_numel = math.prod(scale_shape)
        return (scale_numel, 0), (scale_numel, 1)
    counts = [n // b for n, b in zip(x_shape, blocks)]
    dims: list[tuple[int, bool]] = []  # (size, indexed by scale?)
    for c, b in zip(counts, blocks):
        dims.append((c, True))
        dims.append((b, False))
    dims = [d for d in dims if d[0] != 1]
    merged: list[list] = []
    for size, scaled in dims:
        if merged and merged[-1][1] == scaled:
            merged[-1][0] *= size
        else:
            merged.append([size, scaled])
    if not merged:
        merged = [[1, False]]
    return tuple(m[0] for m in merged), tuple(m[0] if m[1] else 1 for m in merged)


def scale_views(x: torch.Tensor, scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``scale`` (a number or a float tensor on x's device that tiles x) and return the views
    ``(x_view, scale_view)`` that broadcast against each other (scale as float32)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    _check_tensor(scale, "scale")
    if scale.device != x.device:
        raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
    x_view_shape, s_view_shape = _view_shapes(x.shape, scale.shape)
    return x.reshape(x_view_shape), scale.to(torch.float32).reshape(s_view_shape)


def _seeds(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # Two 32-bit draws from torch's RNG: reproducible under torch.manual_seed or an explicit generator.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32, device=gen_device, generator=generator)
    return seeds.to(device, non_blocking=True)


def _quantize_impl(x, fmt, scale, rounding, saturate, generator, dequant, stats="none", dtype=None):
    _check_tensor(x)
    plan = kernel_plan(x, get_format(fmt), scale, rounding, saturate, dequant, stats, dtype)
    if scale is not None and not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if stats != "none" and x.numel() == 0:  # nothing to reduce: an empty tensor's statistics are zeros
        zeros = (
            torch.zeros((), device=x.device)
            if stats == "amax"
            else torch.zeros(len(STATS_FIELDS), dtype=torch.float64, device=x.device)
        )
        return x.detach().to(dtype or x.dtype), zeros
    seeds = _seeds(x.device, generator) if plan.seeds_slot is not None else None
    out = run_compiled(plan.kernel, *plan.args(x, scale, seeds), variant=plan.variant)
    q, sums = out if stats != "none" else (out, None)
    q = q.reshape(x.shape) if plan.cast_after is None else q.reshape(x.shape).to(plan.cast_after)
    return q if sums is None else (q, sums)


def quantize_with_amax(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    scale: torch.Tensor | float | None = None,
    rounding: str = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    dequantize: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` (or :func:`fake_quantize` with ``dequantize=True``) that also returns
    ``max |x|`` from the same fused pass: what delayed scaling records after using a known scale.
    No gradient (used inside autograd functions).

    Example:
        >>> q, a = quantize_with_amax(torch.tensor([0.3, -5.0]), "e4m3", scale=torch.tensor(2.0))
        >>> q.tolist(), a.item()
        ([0.625, -10.0], 5.0)
    """
    return _quantize_impl(x, fmt, scale, rounding, saturate, generator, dequantize, stats="amax", dtype=dtype)


def stats_from_sums(sums: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
    """Turn the kernel's float64 sums (laid out as ``STATS_FIELDS``) into 0-d float32 statistics:
    ``amax``, ``overflow_rate``, ``underflow_rate`` and ``sqnr_db`` (inf when the format is exact)."""
    amax_, overflow, underflow, signal, noise = sums.unbind(0)
    n = max(numel, 1)
    sqnr = torch.where(
        noise > 0, 10.0 * torch.log10(signal / noise.clamp_min(1e-300)), torch.full_like(noise, math.inf)
    )
    return {
        "overflow_rate": (overflow / n).to(torch.float32),
        "underflow_rate": (underflow / n).to(torch.float32),
        "sqnr_db": sqnr.to(torch.float32),
        "amax": amax_.to(torch.float32),
    }


def quantize_with_stats(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    scale: torch.Tensor | float | None = None,
    rounding: str = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    dequantize: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`quantize` (or :func:`fake_quantize` with ``dequantize=True``) plus what the rounding did,
    reduced inside the same fused pass: no second read of ``x``, no host synchronisation.

    The statistics (0-d float32 tensors) are measured on the scaled values ``xs = x * scale`` against
    the rounded ``q`` actually returned (stochastic rounding included):

    - ``overflow_rate``: share of elements with ``|xs| > max_value`` (infinities included, NaN not);
    - ``underflow_rate``: share of elements that were nonzero and became zero;
    - ``sqnr_db``: ``10 log10(sum xs^2 / sum (xs - q)^2)`` over finite values (inf when exact);
    - ``amax``: ``max |x|`` before scaling (NaN if x has a NaN).

    No gradient (for use inside autograd functions and monitors).

    Example:
        >>> q, s = quantize_with_stats(torch.tensor([1e-6, 1.0, 1000.0, 0.0]), "e4m3")
        >>> q.tolist(), s["overflow_rate"].item(), s["underflow_rate"].item()
        ([0.0, 1.0, 448.0, 0.0], 0.25, 0.25)
    """
    q, sums = quantize_with_sums(x, fmt, scale, rounding, saturate, generator, dequantize, dtype)
    return q, stats_from_sums(sums, x.numel())


def quantize_with_sums(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    scale: torch.Tensor | float | None = None,
    rounding: str = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    dequantize: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw form of :func:`quantize_with_stats`: ``(q, sums)`` with ``sums`` a float64 vector laid
    out as ``STATS_FIELDS`` (amax, overflow count, underflow count, signal energy, noise energy).
    Sums of several calls add (the amax takes a max); :func:`stats_from_sums` turns them into rates
    and dB once, which is how a monitor aggregates many calls cheaply.

    Example:
        >>> _, sums = quantize_with_sums(torch.tensor([1e-6, 1.0, 1000.0, 0.0]), "e4m3")
        >>> sums[:3].tolist()
        [1000.0, 1.0, 1.0]
    """
    return _quantize_impl(x, fmt, scale, rounding, saturate, generator, dequantize, stats="full", dtype=dtype)


class _QuantizeSTE(torch.autograd.Function):
    """Straight-through estimator: rounding is treated as identity in the backward pass."""

    @staticmethod
    def forward(ctx, x, fmt, scale, rounding, saturate, generator, dequant, dtype):
        ctx.save_for_backward(scale if (scale is not None and not dequant) else None)
        ctx.dequant = dequant
        return _quantize_impl(x, fmt, scale, rounding, saturate, generator, dequant, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        if not ctx.dequant and scale is not None:
            # d(x * scale)/dx = scale, broadcast over the tile each scale covers.
            x_view, s_view = scale_views(grad, scale)
            grad = (x_view * s_view.to(grad.dtype)).reshape(grad.shape)
        return grad, None, None, None, None, None, None, None


def _dispatch(x, fmt, scale, rounding, saturate, generator, dequant, dtype):
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise TypeError("float8 outputs carry no gradient: quantize a detached tensor or under torch.no_grad()")
        if isinstance(scale, torch.Tensor) and scale.requires_grad:
            scale = scale.detach()
        return _QuantizeSTE.apply(x, fmt, scale, rounding, saturate, generator, dequant, dtype)
    return _quantize_impl(x, fmt, scale, rounding, saturate, generator, dequant, dtype=dtype)


def quantize(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    scale: torch.Tensor | float | None = None,
    rounding: str = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Round ``x * scale`` onto ``fmt``'s grid; same shape and device as ``x``, dtype ``x``'s unless given.

    Args:
        x: float32, bfloat16 or float16 tensor, any shape, contiguous or not.
        fmt: a :class:`FloatFormat` or a registry name (case-insensitive), e.g. ``"e4m3"``.
        scale: ``None`` (no scaling), a number, or a tensor tiling ``x`` (see module docstring).
            ``x * scale`` is formed in float32 before rounding; power-of-two scales make it exact.
        rounding: ``"nearest"`` (ties to even), ``"stochastic"`` (unbiased; reproducible with
            ``torch.manual_seed`` or ``generator``) or ``"zero"`` (toward zero).
        saturate: ``True`` clamps finite overflow and ±inf to ±max (NaN stays NaN). ``False`` gives the
            format's own overflow result: inf for IEEE-like formats, NaN for FN/FNUZ formats, max for
            formats with neither.
        generator: torch generator for stochastic rounding.
        dtype: output dtype (default: x's): float32, bfloat16, float16, or ``torch.float8_e4m3fn`` /
            ``torch.float8_e5m2`` when quantizing into E4M3/E5M2 themselves (no gradient). Cast in
            the same fused pass.

    Values are returned on the grid in ``x``'s dtype; values the format holds but ``x``'s dtype does not
    (e.g. 2**32 for E6M1 with a float16 input) follow that dtype's own cast. Subnormals of the format are
    kept. The gradient is straight-through (times ``scale``).

    Example:
        >>> quantize(torch.tensor([0.3, 500.0, -1e-9]), "e4m3").tolist()
        [0.3125, 448.0, -0.0]
        >>> quantize(torch.tensor([500.0]), "e4m3", saturate=False)
        tensor([nan])
    """
    return _dispatch(x, fmt, scale, rounding, saturate, generator, dequant=False, dtype=dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Undo the scaling of :func:`quantize`: ``q / scale`` with the same tiling rule.

    Example:
        >>> s = torch.tensor(4.0)
        >>> dequantize(quantize(torch.tensor([0.3]), "e4m3", scale=s), s)
        tensor([0.3125])
    """
    _check_tensor(q, "q")
    if scale is None:
        return q
    q_view, s_view = scale_views(q, scale)
    return (q_view.to(torch.float32) / s_view).reshape(q.shape).to(q.dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    scale: torch.Tensor | float | None = None,
    rounding: str = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x, fmt, scale, ...), scale)`` in one fused pass: x's values as the format
    would carry them, back in x's units. Gradient is straight-through. ``dtype`` as in :func:`quantize`
    (e.g. ``torch.bfloat16`` to feed a bf16 GEMM straight from the pass).

    Example:
        >>> fake_quantize(torch.tensor([1000.0]), "e5m2", scale=torch.tensor(0.5))
        tensor([1024.])
    """
    return _dispatch(x, fmt, scale, rounding, saturate, generator, dequant=True, dtype=dtype)
