"""The rounding kernel: float32 -> any :class:`FloatFormat` grid, by integer arithmetic on the float32 bits.

One function, :func:`round_to_format`, does the whole job in a single elementwise expression so that
``torch.compile`` can fuse it into one pass over memory (read x, write q). The same Python function runs
eagerly as the reference path, so the fast and the slow path are one piece of code and agree bit for bit.

Why integers and not ``torch.round(x / ulp) * ulp``: the integer form needs no division, no
``log2`` and no per-element power-of-two construction, vectorises as plain SIMD integer ops, and makes
stochastic rounding exact (add uniform random low bits, truncate).

How it works, for a target with ``M`` mantissa bits and smallest normal exponent ``emin``:
the float32 magnitude ``a`` (its bits as an int) is an ordered integer whose low 23 bits are the mantissa.
Rounding to ``M`` bits in a normal binade means clearing the low ``23 - M`` bits with a rounding
increment; a carry into the exponent field is exactly the move to the next binade. Below ``2**emin``
the target's spacing stays ``2**(emin - M)``, so more bits are dropped. Float32 subnormals have a fixed
spacing of ``2**-149`` and are rounded the same way with their own drop count. Magnitudes below the
target's smallest subnormal round to 0 or to that subnormal. Finally overflow, NaN and the sign are
applied per the format's convention.

Format parameters travel as a small int32 tensor, not as Python constants, so a compiled kernel serves
every format without recompiling.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
import threading
import types

import torch
import torch._inductor.config

from altgrad.quantization.formats import FloatFormat, Special

logger = logging.getLogger(__name__)

ROUNDING_MODES = ("nearest", "stochastic", "zero")
# Layout of the float64 vector that ``stats="full"`` returns.
STATS_FIELDS = ("amax", "overflow_count", "underflow_count", "signal_energy", "noise_energy")

_F32_INF_BITS = 0x7F800000
_F32_QNAN_BITS = 0x7FC00000
_ABS_MASK = 0x7FFFFFFF

# Layout of the int32 parameter vector (one per format and device, cached).
(
    P_MAN_BITS,  # M
    P_EMIN_BIASED,  # smallest normal exponent, float32-biased (emin + 127)
    P_MAX_BITS,  # float32 bits of max_value
    P_MIN_SUB_BITS,  # float32 bits of the smallest positive value
    P_HALF_MIN_SUB_BITS,  # float32 bits of half of it (0 when that is below float32's range)
    P_OVERFLOW_BITS,  # what non-saturating overflow gives: inf, NaN, or max for formats with neither
    P_UNDERFLOW_BITS,  # what magnitudes below min/2 give: 0, or min for formats without zero (E8M0)
    P_SIGN_MASK,  # 0x80000000 for signed formats, 0 for unsigned ones
    P_ZERO_SIGN_MASK,  # sign kept on a zero result: 0x80000000 with -0, 0 without (FNUZ)
    P_NAN_BELOW,  # inputs whose int32 bits are below this become NaN: 1 for unsigned (x <= 0), INT_MIN otherwise
    P_LSB_OR,  # with P_LSB_XOR: turns `a` into a word whose bit `drop` is the parity of the kept code
    P_LSB_XOR,
) = range(12)
_NUM_PARAMS = 12
_INT32_MIN = -(2**31)


def _f32_bits(value: float) -> int:
    # Host arithmetic (struct rounds to nearest float32 like a tensor cast would), not a tensor's
    # `.item()`: format parameters are built while torch.compile traces a model, where a host read is a
    # graph break.
    try:
        return struct.unpack("<i", struct.pack("<f", value))[0]
    except OverflowError:  # beyond float32's range: the cast gives inf
        return _F32_INF_BITS if value > 0 else _F32_INF_BITS | _INT32_MIN


def format_params(fmt: FloatFormat) -> list[int]:
    """The integer description of ``fmt`` that :func:`round_to_format` consumes."""
    min_sub = fmt.min_subnormal
    overflow_bits = {
        Special.IEEE: _F32_INF_BITS,  # IEEE-like formats overflow to inf
        Special.FN: _F32_QNAN_BITS,  # finite+NaN formats overflow to NaN
        Special.FNUZ: _F32_QNAN_BITS,
        Special.FINITE: _f32_bits(fmt.max_value),  # no inf/NaN code: the format itself saturates
    }[fmt.special]
    params = [0] * _NUM_PARAMS
    params[P_MAN_BITS] = fmt.man_bits
    params[P_EMIN_BIASED] = fmt.emin + 127
    params[P_MAX_BITS] = _f32_bits(fmt.max_value)
    params[P_MIN_SUB_BITS] = _f32_bits(min_sub)
    params[P_HALF_MIN_SUB_BITS] = _f32_bits(min_sub / 2)
    params[P_OVERFLOW_BITS] = overflow_bits
    params[P_UNDERFLOW_BITS] = 0 if fmt.subnormals else _f32_bits(min_sub)
    params[P_SIGN_MASK] = _INT32_MIN if fmt.signed else 0
    params[P_ZERO_SIGN_MASK] = _INT32_MIN if fmt.has_negative_zero else 0
    # E8M0 has neither sign nor zero: negative inputs and zero become NaN, as in ml_dtypes.
    params[P_NAN_BELOW] = 1 if not fmt.signed else _INT32_MIN
    # Ties go to the neighbour whose *code* is even. With M >= 1 the code's lsb is bit `drop` of the
    # significand, whose implicit bit (bit 23) is 1 -- not the float32 exponent lsb `a` holds there.
    # With M == 0 every kept significand is 1 and the code's lsb is the target exponent code's lsb:
    # (e + bias) & 1, i.e. float32's exponent lsb flipped when the two biases differ in parity.
    if fmt.man_bits > 0:
        params[P_LSB_OR], params[P_LSB_XOR] = 1 << 23, 0
    else:
        params[P_LSB_OR], params[P_LSB_XOR] = 0, ((fmt.bias - 127) & 1) << 23
    return params


def needs_exact_subnormal_exponent(fmt: FloatFormat) -> bool:
    """Formats with binades below float32's smallest normal (E8M0) need the true exponent of float32
    subnormal inputs; every other format sees them through one uniform spacing (a cheaper kernel)."""
    return fmt.emin < -126


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int32 lanes (multiplies wrap, shifts are made logical)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * -2048144789  # 0x85ebca6b as int32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * -1028477387  # 0xc2b2ae35 as int32
    return h ^ ((h >> 16) & 0xFFFF)


def random_bits(shape: torch.Size, seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    """32 random bits per element (int32) from a counter-based hash of (element index, seeds).

    Counter-based, so nothing is materialised ahead of the kernel: under ``torch.compile`` the index is
    an iota and the hash is fused into the rounding pass. ``seeds`` holds two int32 draws from torch's
    generator, which makes the stream reproducible under ``torch.manual_seed``.
    """
    numel = 1
    for s in shape:
        numel = numel * s
    idx = torch.arange(numel, device=device, dtype=torch.int32).view(shape)
    return _fmix32((idx ^ seeds[1]) * -1640531527 + seeds[0])  # Weyl step 0x9e3779b9, then mix


def round_to_format(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    params: torch.Tensor,
    seeds: torch.Tensor | None,
    rounding: str,
    saturate: bool,
    dequantize: bool,
    exact_subnormal_exponent: bool = False,
    stats: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Round ``x * scale`` onto the grid described by ``params``; return it as ``out_dtype`` (divided
    back by ``scale`` when ``dequantize``). ``scale`` must broadcast against ``x``. The final cast is
    part of the fused pass, so a bf16 GEMM operand or an FP8 tensor is written once, at its own width.

    This is the whole quantizer; the public API in :mod:`altgrad.quantization.quantize` only validates,
    reshapes and dispatches here (eagerly or compiled). Statistics come out of the same compiled
    kernel (reductions fused with the rounding pass, no second read of ``x``), returned as ``(q, s)``:

    - ``stats="amax"``: ``s`` is ``max |x|`` (before scaling, NaN-propagating), for delayed scaling.
    - ``stats="full"``: ``s`` is a float64 vector laid out as :data:`STATS_FIELDS`: the amax; how many
      scaled values have a magnitude above ``max_value`` (infinities included, NaN not); how many
      nonzero values became zero; and the signal and noise energies ``sum(xs^2)``, ``sum((xs - q)^2)`` over finite lanes
      (float64 sums, as in :func:`~altgrad.quantization.diagnostics.quantization_stats`).
    """
    xf = x.to(torch.float32)
    amax_out = xf.abs().amax() if stats != "none" else None
    if scale is not None:
        xf = xf * scale
    man_bits = params[P_MAN_BITS]
    emin_b = params[P_EMIN_BIASED]

    bits = xf.view(torch.int32)
    a_in = bits & _ABS_MASK  # |xs| as ordered bits; NaNs above inf's
    # NaN magnitudes are pinned to inf's bits so the additions below cannot overflow int32; NaN is
    # restored from `bits` at the end.
    a = torch.minimum(a_in, torch.tensor(_F32_INF_BITS, dtype=torch.int32, device=bits.device))
    exp_b = a >> 23  # float32 biased exponent field
    # Low bits of `a` that fall below the target's spacing 2**(max(e, emin) - M). Float32 subnormals
    # (field 0) share binade 1's spacing, which is exact whenever the format's emin >= -126.
    drop = (23 - man_bits) + torch.clamp(emin_b - torch.clamp(exp_b, min=1), min=0)
    if exact_subnormal_exponent:
        # True biased exponent of a float32 subnormal, from the exact int->float conversion of `a`.
        sub_exp_b = (a.to(torch.float32).view(torch.int32) >> 23) - 149
        drop = torch.where(exp_b == 0, torch.maximum(sub_exp_b, emin_b) - man_bits + 22, drop)
    drop = torch.clamp(drop, max=24)  # larger drops only occur on the `tiny` lanes, handled below
    low_mask = (torch.ones_like(drop) << drop) - 1

    if rounding == "nearest":
        # Ties to even: add half an ulp, minus one unless the kept lsb is odd.
        lsb = ((((a | params[P_LSB_OR]) ^ params[P_LSB_XOR]) >> drop) & 1)
        r = (a + (low_mask >> 1) + lsb) & ~low_mask
    elif rounding == "zero":
        r = a & ~low_mask
    elif rounding == "stochastic":
        rand = random_bits(a.shape, seeds, a.device)
        r = (a + (rand & low_mask)) & ~low_mask
    else:  # validated by the caller; kept for direct users of the kernel
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {ROUNDING_MODES}")

    # Magnitudes below the smallest subnormal: 0 (or, without a zero, the smallest value) vs
    # min_subnormal, decided on the value itself.
    min_sub_bits = params[P_MIN_SUB_BITS]
    if rounding == "nearest":
        up = a > params[P_HALF_MIN_SUB_BITS]  # exactly half goes to the even neighbour, zero
    elif rounding == "zero":
        up = torch.zeros_like(a, dtype=torch.bool)
    else:
        # P(up) = |x| / min_subnormal: an exact power-of-two rescaling compared against 24 random
        # bits, i.e. a probability error below 2**-24.
        ratio = a.view(torch.float32) / min_sub_bits.view(torch.float32)
        up = ((rand >> 8) & 0xFFFFFF).to(torch.float32) < ratio * 16777216.0
    r = torch.where(a < min_sub_bits, torch.where(up, min_sub_bits, params[P_UNDERFLOW_BITS]), r)

    # Overflow: the rounded magnitude left the finite range (inf inputs included).
    max_bits = params[P_MAX_BITS]
    r = torch.where(r > max_bits, max_bits if saturate else params[P_OVERFLOW_BITS], r)

    # Sign (dropped from zeros in formats without -0), then NaN.
    sign = bits & torch.where(r == 0, params[P_ZERO_SIGN_MASK], params[P_SIGN_MASK])
    r = r | sign
    is_nan = (a_in > _F32_INF_BITS) | (bits < params[P_NAN_BELOW])
    r = torch.where(is_nan, _F32_QNAN_BITS, r)
    q = r.view(torch.float32)
    if stats == "full":
        finite = a_in < _F32_INF_BITS
        overflow = ((a_in > max_bits) & (a_in <= _F32_INF_BITS)).sum()
        underflow = ((a_in != 0) & ((r & _ABS_MASK) == 0)).sum()
        amax_out = _stats_sums(amax_out, xf, q, finite, (r & _ABS_MASK) < _F32_INF_BITS, overflow, underflow)
    return _output(q, scale, dequantize, out_dtype, amax_out)


def _stats_sums(amax_x, xs, q, finite, q_finite, overflow, underflow) -> torch.Tensor:
    """The ``stats="full"`` vector (:data:`STATS_FIELDS`), float64: both kernels' statistics end here."""
    xs64 = torch.where(finite, xs, 0.0).to(torch.float64)
    err = torch.where(finite & q_finite, xs64 - q.to(torch.float64), 0.0)
    return torch.stack(
        [
            amax_x.to(torch.float64),
            overflow.to(torch.float64),
            underflow.to(torch.float64),
            xs64.square().sum(),
            err.square().sum(),
        ]
    )


def _output(q, scale, dequantize: bool, out_dtype: torch.dtype, stats_out: torch.Tensor | None):
    """Both kernels' last step: divide the scale back out, cast, and attach the statistics if any."""
    if dequantize and scale is not None:
        q = q / scale
    if out_dtype != torch.float32:
        q = q.to(out_dtype)
    return q if stats_out is None else (q, stats_out)


# ---------------------------------------------------------------------------- nearest, by splitting
# Layout of the float32 parameter vector of :func:`round_nearest_split` (one per format and device, cached).
(
    S_CLAMP,  # 2**(emax + 1): larger magnitudes (inf too) are pinned here, past max, so nothing overflows
    S_SPLITTER,  # 2**(23 - M) + 1: Veltkamp's splitting constant for M + 1 significant bits
    S_SUBNORMAL_MAGIC,  # 1.5 * 2**(emin - M + 23): adding it rounds to the subnormal spacing 2**(emin - M)
    S_MIN_NORMAL,  # 2**emin
    S_MAX,  # max_value
    S_OVERFLOW,  # what non-saturating overflow gives: inf, NaN, or max for formats with neither
) = range(6)


def split_params(fmt: FloatFormat) -> list[float]:
    """The float description of ``fmt`` that :func:`round_nearest_split` consumes."""
    overflow = {Special.IEEE: math.inf, Special.FN: math.nan, Special.FNUZ: math.nan}.get(fmt.special, fmt.max_value)
    return [
        2.0 ** (fmt.emax + 1),
        2.0 ** (23 - fmt.man_bits) + 1.0,
        1.5 * 2.0 ** (fmt.emin - fmt.man_bits + 23),
        2.0**fmt.emin,
        fmt.max_value,
        overflow,
    ]


def split_rounding_applies(fmt: FloatFormat, rounding: str, device_type: str) -> bool:
    """Whether :func:`round_nearest_split` gives ``fmt``'s round-to-nearest-even bits here.

    The format must be signed (with a negative zero), with subnormals and 1 to 20 mantissa bits, its
    normal binades within float32's (``emin >= -126``), and ``emax + 24 - M <= 127``, so that the
    splitting product ``a * (2**(23 - M) + 1)`` stays finite up to the clamp ``2**(emax + 1)``. The
    compiler must keep float32 arithmetic as written. altgrad's own kernel compiles ask C++ Inductor for
    that (``-ffp-contract=off``, no unsafe math: also its defaults). Inside a model graph the global
    ``torch._inductor.config`` is read when the graph is traced; flags given as
    ``torch.compile(options=...)`` are not visible there, so set FMA contraction or unsafe math in
    ``torch._inductor.config`` instead if you want them. Triton may contract ``a * b - c`` into an FMA, so
    CUDA keeps the integer kernel (bit casts are free there).
    """
    if rounding != "nearest" or device_type != "cpu":
        return False
    # t = a * (2**(23 - M) + 1) for a up to the clamp 2**(emax + 1) must stay finite: emax + 24 - M <= 127.
    if not (fmt.signed and fmt.has_negative_zero and fmt.subnormals and 1 <= fmt.man_bits <= 20
            and -126 <= fmt.emin and fmt.emax + 24 - fmt.man_bits <= 127):
        return False
    # Eager calls run altgrad's own compiled kernels, built with _INDUCTOR_OPTIONS (which pin the flags).
    return _cpp_keeps_float_ops() if torch.compiler.is_compiling() else True


@torch.compiler.assume_constant_result  # read when a graph is traced, not traced itself (dynamo skips configs)
def _cpp_keeps_float_ops() -> bool:
    cpp = torch._inductor.config.cpp
    return cpp.enable_floating_point_contract_flag == "off" and not cpp.enable_unsafe_math_opt_flag


def round_nearest_split(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    params: torch.Tensor,
    saturate: bool,
    dequantize: bool,
    stats: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`round_to_format` with ``rounding="nearest"``, by float arithmetic alone (no bit casts),
    for the formats :func:`split_rounding_applies` admits; the same bits (the tests check both kernels
    against each other on every tie, and both against ``ml_dtypes``).

    Why a second kernel: on CPUs Inductor vectorises a float<->int bit cast as a store, a scalar loop
    and a load, which made the integer kernel's two casts most of its time; this one runs in 35-60% of
    it (``benchmarks/RESULTS.md``). It relies on two exact float32 facts:

    - Normal range, Veltkamp's splitting: with ``t = a * (2**(23 - M) + 1)``, ``t - (t - a)`` is ``a``
      rounded to nearest (ties to even) on M + 1 significant bits.
    - Subnormal range (``a < 2**emin``): the spacing is the constant ``2**(emin - M)``, and
      ``(a + C) - C`` with ``C = 1.5 * 2**(emin - M + 23)`` rounds to it, ties to even, through the
      float32 addition's own rounding (so magnitudes below half the smallest subnormal become 0).
    """
    xf = x.to(torch.float32)
    amax_out = xf.abs().amax() if stats != "none" else None
    if scale is not None:
        xf = xf * scale
    a = torch.clamp(xf.abs(), max=params[S_CLAMP])  # NaN stays NaN
    t = a * params[S_SPLITTER]
    normal = t - (t - a)
    magic = params[S_SUBNORMAL_MAGIC]
    subnormal = (a + magic) - magic
    q = torch.where(a < params[S_MIN_NORMAL], subnormal, normal)
    max_value = params[S_MAX]
    q = torch.where(q > max_value, max_value if saturate else params[S_OVERFLOW], q)
    q = torch.copysign(q, xf)  # -0 for negative values that round to zero, as the formats here have -0
    # A NaN input gives the canonical (positive) quiet NaN. `xf != xf`, not isnan: Inductor's C++ backend
    # vectorises the comparison but runs isnan as a scalar loop (half this kernel's time).
    q = torch.where(xf != xf, math.nan, q)
    if stats == "full":  # round_to_format's statistics, by float comparisons (NaN compares false)
        mag = xf.abs()
        amax_out = _stats_sums(amax_out, xf, q, mag < math.inf, q.abs() < math.inf, (mag > max_value).sum(),
                               ((xf != 0) & (q == 0)).sum())
    return _output(q, scale, dequantize, out_dtype, amax_out)


# ---------------------------------------------------------------------------- dispatch
_COMPILE_DISABLED_ENV = "ALTGRAD_DISABLE_COMPILE"
_compile_lock = threading.Lock()
_compile_failed: set[str] = set()
# Inductor's C++ backend decides at compile time whether a loop runs on all cores, from the size of the
# tensor it was first compiled for; with dynamic shapes (and its on-disk cache) that decision then holds
# for every later size, so a first call on a small tensor would leave 16M-element ones single-threaded.
# Dynamic threads leave the choice to OpenMP at run time. (Triton kernels on CUDA are unaffected.)
_INDUCTOR_OPTIONS = {
    "cpp.dynamic_threads": True,
    # round_nearest_split needs float32 arithmetic as written: no FMA contraction, no unsafe math (the
    # defaults, pinned here against a global config that changes them).
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
}


@functools.lru_cache(maxsize=None)
def _compiled(fn: types.FunctionType, device_type: str, variant: tuple = ()):
    """``fn`` compiled for one static variant (rounding, flags, input dtype).

    dynamic=True: one graph serves every tensor size, and format parameters are tensors, so one graph
    serves every format. Each variant gets a code object of its own (`code.replace`), because dynamo
    keeps its compiled graphs -- and its limit of 8 recompilations -- per code object: sharing one
    across all variants would hit the limit in any process that uses many of them.
    """
    name = fn.__name__ + "".join("_" + str(v).replace(".", "_") for v in variant)
    code = fn.__code__.replace(co_name=name)
    variant_fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__)
    return torch.compile(variant_fn, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)


def compile_enabled(device_type: str) -> bool:
    """Whether the fused (``torch.compile``) path is used for tensors on ``device_type``."""
    if os.environ.get(_COMPILE_DISABLED_ENV, "0") not in ("", "0", "false", "False"):
        return False
    if device_type in _compile_failed:
        return False
    return device_type in ("cpu", "cuda")


def run_compiled(fn: types.FunctionType, *args, variant: tuple = (), use_compile: bool | None = None):
    """Run ``fn(*args)`` through its compiled (fused) form when available, else eagerly.

    The fused path is the default. If compilation fails on this machine (no C++ compiler, an
    unsupported backend) altgrad logs one warning and keeps working eagerly — same results, slower.
    """
    device_type = args[0].device.type
    if use_compile is None:
        use_compile = compile_enabled(device_type) and not torch.compiler.is_compiling()
    if not use_compile:
        return fn(*args)
    try:
        return _compiled(fn, device_type, variant)(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        # An unusual mix of shapes for one variant: this call runs eagerly, compilation stays on.
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any backend failure falls back to the identical eager code
        with _compile_lock:
            if device_type not in _compile_failed:
                _compile_failed.add(device_type)
                logger.warning(
                    "altgrad: torch.compile of the quantization kernels failed on %s (%s: %s); "
                    "using the eager path (same results, slower). Set %s=1 to silence this.",
                    device_type,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    _COMPILE_DISABLED_ENV,
                )
        return fn(*args)


def binade_histogram(q: torch.Tensor, lowest_exponent: int, num_binades: int) -> torch.Tensor:
    """How many nonzero finite values of ``q`` fall in each binade ``2**(lowest_exponent + i)``,
    ``i < num_binades`` (int32 counts; values outside are clamped to the end bins).

    The binade is read from the float32 exponent field; float32 subnormals (only formats reaching
    below 2**-126 have such values) get theirs from the exact int->float conversion of their bits.
    """
    bits = q.to(torch.float32).view(torch.int32) & _ABS_MASK
    counted = (bits > 0) & (bits < _F32_INF_BITS)
    exp_field = bits >> 23
    sub_exp = (bits.to(torch.float32).view(torch.int32) >> 23) - 149  # biased exponent of bits * 2**-149
    exponent = torch.where(exp_field == 0, sub_exp, exp_field) - 127
    index = (exponent - lowest_exponent).clamp(0, num_binades - 1).to(torch.int64)
    hist = torch.zeros(num_binades, dtype=torch.int32, device=q.device)
    return hist.scatter_add(0, index.reshape(-1), counted.reshape(-1).to(torch.int32))


def binade_edges(fmt: FloatFormat) -> list[float]:
    """The powers of two between ``fmt``'s binades, ``2**(lowest + 1) .. 2**(lowest + num_binades - 1)``
    with ``2**lowest`` the smallest subnormal's binade: :func:`binade_occupancy`'s ``inner_edges``."""
    lowest = math.floor(math.log2(fmt.min_subnormal))
    return [2.0 ** (lowest + i) for i in range(1, fmt.num_binades)]


def binade_occupancy(q: torch.Tensor, inner_edges: torch.Tensor) -> torch.Tensor:
    """Whether any nonzero finite value of ``q`` falls in each binade (bool, one per binade): binade
    ``i`` is ``[inner_edges[i - 1], inner_edges[i])``, the first one reaching down to 0 and the last
    one up to infinity, so values outside the range count in the end bins, as in
    :func:`binade_histogram`.

    What :func:`binade_histogram` answers (``hist > 0``), by float comparisons alone: one boolean
    ``any`` per binade, which Inductor fuses into a single vectorised pass, where the histogram's bit
    casts and ``scatter_add`` run as scalar loops on CPUs (1.5-2x slower for an FP8 format's 18-32
    binades). The reductions are unrolled: uncompiled, each is a pass of its own, and formats with
    hundreds of binades would make hundreds of them, so those keep the histogram.
    """
    m = q.abs().to(torch.float32)  # (N,)
    n = inner_edges.shape[0] + 1
    occupied = []
    for i in range(n):
        above = m > 0 if i == 0 else m >= inner_edges[i - 1]
        below = m < math.inf if i == n - 1 else m < inner_edges[i]
        occupied.append((above & below).any())
    return torch.stack(occupied)  # (num_binades,)
