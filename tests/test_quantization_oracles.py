"""Bit-exactness of `quantize` against independent oracles: ml_dtypes where it has the type, gfloat where
it does not. Oracles are fed float32 (they double-round float64)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat import RoundMode, round_ndarray
from gfloat.formats import FormatInfo, format_info_ocp_e8m0
from gfloat.types import Domain

from altgrad.quantization import FORMAT_REGISTRY, Special, get_format, quantize
from altgrad.quantization import kernels
from altgrad.quantization.kernels import format_params, needs_exact_subnormal_exponent, round_to_format

ML_DTYPES = {
    "E5M2": ml_dtypes.float8_e5m2,
    "E4M3": ml_dtypes.float8_e4m3fn,
    "E3M4": ml_dtypes.float8_e3m4,
    "E4M3_IEEE": ml_dtypes.float8_e4m3,
    "E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "E2M3": ml_dtypes.float6_e2m3fn,
    "E3M2": ml_dtypes.float6_e3m2fn,
    "E2M1": ml_dtypes.float4_e2m1fn,
    "BF16": ml_dtypes.bfloat16,
    "FP16": np.float16,
}
# Formats ml_dtypes lacks, described to gfloat independently of altgrad's FloatFormat: FN convention
# (finite domain, one NaN at the all-ones magnitude), bias 2^(E-1)-1, subnormals, signed zero.
GFLOAT_FN = {"E2M5": (2, 5), "E1M6": (1, 6), "E6M1": (6, 1), "E7M0": (7, 0)}


def _gfloat_fn(e: int, m: int) -> FormatInfo:
    return FormatInfo(
        f"e{e}m{m}",
        k=1 + e + m,
        precision=m + 1,
        bias=2 ** (e - 1) - 1,
        is_signed=True,
        domain=Domain.Finite,
        has_nz=True,
        num_high_nans=1,
        has_subnormals=True,
        is_twos_complement=False,
    )


def _f32(values) -> np.ndarray:
    with np.errstate(over="ignore"):  # probes past float32's max become inf on purpose
        return np.asarray(values, dtype=np.float64).astype(np.float32)


def probe_values(name: str, n_random: int = 1_000_000, seed: int = 0) -> np.ndarray:
    """Every representable value, every midpoint, midpoints ±1 float32 ulp, values past max, float32
    subnormals, ±0, ±inf, NaN, and `n_random` float32 spanning the whole range (and a bit beyond)."""
    fmt = get_format(name)
    grid = fmt.values(torch.float64).numpy()
    mags = grid[grid > 0]
    mids = (mags[1:] + mags[:-1]) / 2
    mids = np.concatenate([[mags[0] / 2], mids])  # the midpoint between 0 and min_subnormal too
    mids32 = _f32(mids)
    nudged = np.concatenate([np.nextafter(mids32, np.float32(np.inf)), np.nextafter(mids32, np.float32(0))])
    top = fmt.max_value
    ulp_top = math.ldexp(1.0, fmt.emax - fmt.man_bits)
    past_max = _f32(
        [top + ulp_top / 2, top + ulp_top / 4, top + ulp_top, 2 * top, 1.5 * top, float(np.finfo(np.float32).max)]
    )
    past_max = past_max[np.isfinite(past_max)]
    f32_sub = np.array([1, 2, 3, 2**10, 2**22, 2**23 - 1, 2**22 + 2**21], dtype=np.int32).view(np.float32)
    specials = np.array([0.0, np.inf, np.nan, 1.0], dtype=np.float32)
    rng = np.random.default_rng(seed)
    # Random float32 with exponents uniform across [log2(min_subnormal) - 3, log2(max) + 2].
    lo = max(int(math.floor(math.log2(fmt.min_subnormal))) - 3, -149)
    hi = min(fmt.emax + 2, 127)
    exps = rng.integers(lo, hi + 1, n_random)
    mant = rng.integers(0, 2**23, n_random)
    rand = np.ldexp(1.0 + mant / 2.0**23, exps)
    rand = _f32(rand)
    positive = np.concatenate([_f32(mags), mids32, nudged, past_max, f32_sub, specials, rand])
    return np.concatenate([positive, -positive]).astype(np.float32)


def _same(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    ours = np.asarray(ours, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    return (ours.view(np.int32) == ref.view(np.int32)) | (np.isnan(ours) & np.isnan(ref))


def _assert_bit_exact(x: np.ndarray, ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    ok = _same(ours, ref)
    if not ok.all():
        bad = np.flatnonzero(~ok)[:8]
        rows = [f"x={x[i]!r} ({x[i].view(np.int32):#010x}) ours={ours[i]!r} ref={ref[i]!r}" for i in bad]
        pytest.fail(f"{what}: {int((~ok).sum())} of {len(x)} differ:\n  " + "\n  ".join(rows))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_bit_exact_against_ml_dtypes(name):
    x = probe_values(name)
    ours = quantize(torch.from_numpy(x), name, saturate=False).numpy()
    with np.errstate(over="ignore"):  # values past the format's range overflow to inf, as they should
        ref = x.astype(ML_DTYPES[name]).astype(np.float32)
    if get_format(name).special is Special.FINITE:
        # No NaN code: ml_dtypes turns NaN into -0, altgrad keeps NaN visible for monitoring.
        keep = ~np.isnan(x)
        x, ours, ref = x[keep], ours[keep], ref[keep]
    _assert_bit_exact(x, ours, ref, f"{name} vs ml_dtypes")


@pytest.mark.parametrize("name", sorted(GFLOAT_FN))
def test_bit_exact_against_gfloat(name):
    e, m = GFLOAT_FN[name]
    x = probe_values(name)
    ours = quantize(torch.from_numpy(x), name, saturate=False).numpy()
    ref = np.asarray(round_ndarray(_gfloat_fn(e, m), x.astype(np.float64), RoundMode.TiesToEven, False), np.float32)
    _assert_bit_exact(x, ours, ref, f"{name} vs gfloat")


def test_e8m0_against_both_oracles_where_semantics_agree():
    # E8M0 has no sign and no zero. ml_dtypes and altgrad send 0 and negatives to NaN (gfloat keeps 0).
    # On exact ties between powers of two ml_dtypes rounds up where altgrad (and gfloat) round to the
    # even code; on float32-subnormal inputs in [2^-127, 2^-126) ml_dtypes always rounds up, gfloat and
    # altgrad round to nearest. Everywhere else all three agree.
    x = np.abs(probe_values("E8M0", n_random=200_000))
    x = x[(x > 0) & ~np.isnan(x)]
    x = x[np.frexp(x.astype(np.float64))[0] != 0.75]  # drop exact ties 1.5 * 2^k
    ours = quantize(torch.from_numpy(x), "E8M0", saturate=False).numpy()
    # gfloat's E8M0 returns values below E8M0's smallest, 2^-127, for inputs under it: compare above it.
    inside = x >= 2.0**-127
    ref = np.asarray(round_ndarray(format_info_ocp_e8m0, x[inside].astype(np.float64)), np.float32)
    _assert_bit_exact(x[inside], ours[inside], ref, "E8M0 vs gfloat")
    assert np.all(ours[~inside] == np.float32(2.0**-127))  # no zero: everything below saturates to min
    normal = x >= np.finfo(np.float32).tiny
    ml = x[normal].astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    _assert_bit_exact(x[normal], ours[normal], ml, "E8M0 vs ml_dtypes")
    zero_neg = quantize(torch.tensor([0.0, -0.0, -2.0]), "E8M0", saturate=False)
    assert torch.isnan(zero_neg).all()


@pytest.mark.parametrize("name", sorted(FORMAT_REGISTRY))
def test_saturate_equals_clamped_result(name):
    fmt = get_format(name)
    x = probe_values(name, n_random=20_000)
    xt = torch.from_numpy(x)
    sat = quantize(xt, fmt, saturate=True).numpy()
    nonsat = quantize(torch.from_numpy(np.clip(x, -fmt.max_value, fmt.max_value)), fmt, saturate=False).numpy()
    # clip keeps NaN as NaN, maps ±inf to ±max: exactly what saturation promises
    _assert_bit_exact(x, sat, nonsat, f"{name} saturate")
    finite = np.isfinite(sat)
    assert np.all(np.abs(sat[finite]) <= fmt.max_value)
    assert np.array_equal(np.isnan(sat), np.isnan(x) | (~np.isnan(x) & np.isnan(nonsat)))


@pytest.mark.parametrize("name", sorted(FORMAT_REGISTRY))
def test_grid_is_fixed_point_and_every_value_is_on_grid(name):
    fmt = get_format(name)
    grid = fmt.values()
    assert torch.equal(quantize(grid, fmt, saturate=False), grid)
    assert len(grid) == fmt.num_finite - int(fmt.has_negative_zero)
    assert grid.max().item() == fmt.max_value and grid[grid > 0].min().item() == fmt.min_subnormal
    rnd = torch.randn(10_000) * fmt.max_value / 4
    rnd = rnd if fmt.signed else rnd.abs()  # E8M0: negatives are NaN
    q = quantize(rnd, fmt)
    assert torch.isin(q.abs(), grid.abs()).all()


@pytest.mark.parametrize("rounding", ["nearest", "zero", "stochastic"])
@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E8M0", "E2M1", "E4M3FNUZ", "BF16"])
def test_compiled_path_matches_eager_bit_for_bit(name, rounding):
    fmt = get_format(name)
    x = torch.from_numpy(probe_values(name, n_random=50_000))
    params = torch.tensor(format_params(fmt), dtype=torch.int32)
    torch.manual_seed(3)
    fast = quantize(x, fmt, rounding=rounding, saturate=False)
    torch.manual_seed(3)
    seeds = torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32) if rounding == "stochastic" else None
    eager = round_to_format(x, None, params, seeds, rounding, False, False, needs_exact_subnormal_exponent(fmt))
    _assert_bit_exact(x.numpy(), fast.numpy(), eager.numpy(), f"{name}/{rounding} compiled vs eager")
    # ...and the fast path really was the compiled one (a failed compile falls back to eager silently)
    assert kernels.compile_enabled("cpu"), "torch.compile of the quantization kernel failed on this machine"


SPLIT_FORMATS = sorted(n for n in FORMAT_REGISTRY if kernels.split_rounding_applies(get_format(n), "nearest", "cpu"))


def test_split_kernel_serves_the_usual_formats_and_not_the_others():
    assert {"E4M3", "E5M2", "E3M4", "E2M5", "E1M6", "E6M1", "E2M1", "E3M2", "FP16"} <= set(SPLIT_FORMATS)
    # no -0 (FNUZ), no mantissa bit (E7M0, E8M0), a splitting product past float32's range (BF16: emax 127)
    assert not {"E4M3FNUZ", "E5M2FNUZ", "E7M0", "E8M0", "BF16"} & set(SPLIT_FORMATS)
    assert not kernels.split_rounding_applies(get_format("E4M3"), "nearest", "cuda")  # Triton may fuse FMAs
    assert not kernels.split_rounding_applies(get_format("E4M3"), "stochastic", "cpu")


def _edge_format(man_bits: int, room: int):
    # A user FN format whose splitting product a * (2**(23 - M) + 1) needs emax + 24 - M == 127 + room.
    from altgrad.quantization import FloatFormat

    emax_fn = 2**7 - 1  # FN: the all-ones exponent still holds finite values (all but one NaN code)
    bias = emax_fn - (127 + room - 24 + man_bits)
    fmt = FloatFormat(f"E7M{man_bits}B{bias}", exp_bits=7, man_bits=man_bits, bias=bias, special="fn")
    assert fmt.emax + 24 - man_bits == 127 + room, fmt
    return fmt


def test_user_formats_at_the_edge_of_float32_take_the_right_kernel():
    # One binade more and the splitting product overflows: that format must take the integer kernel and
    # round its largest values correctly; the last format inside the condition must split exactly.
    inside, outside = _edge_format(2, 0), _edge_format(2, 1)
    assert kernels.split_rounding_applies(inside, "nearest", "cpu")
    assert not kernels.split_rounding_applies(outside, "nearest", "cpu")
    for fmt in (inside, outside):
        x = torch.from_numpy(probe_values(fmt, n_random=20_000))
        params = torch.tensor(format_params(fmt), dtype=torch.int32)
        ref = round_to_format(x, None, params, None, "nearest", False, False)
        _assert_bit_exact(x.numpy(), quantize(x, fmt, saturate=False).numpy(), ref.numpy(), fmt.name)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", SPLIT_FORMATS)
def test_split_kernel_equals_integer_kernel_on_every_tie(name, compiled):
    # The float-only nearest kernel against the integer one (itself checked against ml_dtypes and gfloat
    # above): every midpoint and its float32 neighbours, overflow both ways, a scale that is not a power of
    # two, float32 subnormals, specials; eagerly and as the compiled (C++ Inductor) kernel.
    fmt = get_format(name)
    x = torch.from_numpy(probe_values(name, n_random=20_000))
    int_params = torch.tensor(format_params(fmt), dtype=torch.int32)
    split = torch.tensor(kernels.split_params(fmt), dtype=torch.float32)
    scale = torch.tensor(0.7)
    for saturate in (False, True):
        for s in (None, scale):
            ours = kernels.run_compiled(
                kernels.round_nearest_split, x, s, split, saturate, s is not None,
                variant=("test", saturate, s is not None), use_compile=compiled)
            ref = round_to_format(x, s, int_params, None, "nearest", saturate, s is not None)
            _assert_bit_exact(x.numpy(), ours.numpy(), ref.numpy(), f"{name} split vs integer (saturate={saturate})")
    # A logged step's statistics, by float comparisons here and by bit patterns there: the same counts and
    # amax, the same energies up to the float64 summation order; with and without the NaN (which makes
    # the amax NaN), both overflow modes, per-tensor and per-row scales.
    rows = x[: x.numel() // 64 * 64].reshape(-1, 64)
    row_scale = torch.exp2(torch.arange(rows.shape[0], dtype=torch.float32) % 7 - 3).reshape(-1, 1) * 0.7
    for values, s in ((x, scale), (x[torch.isfinite(x)], scale), (rows, row_scale)):
        for saturate in (False, True):
            q, ours = kernels.run_compiled(kernels.round_nearest_split, values, s, split, saturate, False, "full",
                                           variant=("test", saturate, "full"), use_compile=compiled)
            q_ref, ref = round_to_format(values, s, int_params, None, "nearest", saturate, False, stats="full")
            _assert_bit_exact(values.numpy().ravel(), q.numpy().ravel(), q_ref.numpy().ravel(), f"{name} with stats")
            torch.testing.assert_close(ours[:3], ref[:3], rtol=0, atol=0, equal_nan=True)  # amax, the two counts
            torch.testing.assert_close(ours[3:], ref[3:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E3M4", "E2M1", "BF16"])
def test_round_toward_zero_matches_gfloat(name):
    fmt = get_format(name)
    fi = FormatInfo(
        name,
        k=fmt.bits,
        precision=fmt.man_bits + 1,
        bias=fmt.bias,
        is_signed=True,
        domain=Domain.Extended if fmt.special is Special.IEEE else Domain.Finite,
        has_nz=True,
        num_high_nans={Special.IEEE: 2**fmt.man_bits - 1, Special.FN: 1, Special.FINITE: 0}[fmt.special],
        has_subnormals=True,
        is_twos_complement=False,
    )
    x = probe_values(name, n_random=100_000)
    x = x[np.isfinite(x) & (np.abs(x) <= fmt.max_value)]
    ours = quantize(torch.from_numpy(x), fmt, rounding="zero").numpy()
    ref = np.asarray(round_ndarray(fi, x.astype(np.float64), RoundMode.TowardZero, True), np.float32)
    _assert_bit_exact(x, ours, ref, f"{name} toward zero vs gfloat")
