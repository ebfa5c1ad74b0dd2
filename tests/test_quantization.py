"""Behaviour of the quantization API beyond bit-exactness: dtypes, layouts, scales, stochastic rounding,
gradients, delayed scaling, statistics, bit-stall and bad input."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.quantization import (
    AmaxHistory,
    BitStallDetector,
    FloatFormat,
    Granularity,
    amax,
    compute_scale,
    dequantize,
    dynamic_range_used,
    fake_quantize,
    get_format,
    mx_scale,
    quantization_stats,
    quantize,
    scaled_quantize,
)


def _ref_e4m3(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.float().numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_dtype_and_round_like_float32(dtype):
    x = (torch.randn(4096) * 20).to(dtype)
    q = quantize(x, "e4m3")
    assert q.dtype == dtype and q.shape == x.shape
    # E4M3 values are exactly representable in bf16/fp16, so the cast back is exact.
    assert torch.equal(q.float(), _ref_e4m3(x.float().clamp(-448, 448)))


def test_non_contiguous_inputs():
    base = torch.randn(64, 96) * 10
    for x in (base.t(), base[:, ::3], base.unfold(1, 8, 4)):
        assert not x.is_contiguous()
        q = quantize(x, "e4m3")
        assert q.shape == x.shape
        assert torch.equal(q, _ref_e4m3(x.contiguous().clamp(-448, 448)))


def test_output_shape_dtype_device_and_scalar_input():
    x = torch.tensor(3.3)
    assert quantize(x, "e5m2").shape == ()
    assert quantize(torch.empty(0, 5), "e5m2").shape == (0, 5)


def test_per_tensor_scale_is_x_times_scale_rounded():
    x = torch.randn(1000)
    s = torch.tensor(37.0)
    assert torch.equal(quantize(x, "e4m3", s), _ref_e4m3((x * s).clamp(-448, 448)))
    assert torch.equal(quantize(x, "e4m3", 37.0), quantize(x, "e4m3", s))


def test_per_row_scales():
    x = torch.randn(16, 64) * torch.logspace(-3, 3, 16).unsqueeze(1)
    a = amax(x, Granularity.per_row())
    assert a.shape == (16, 1)
    s = compute_scale(a, "e4m3")
    q = quantize(x, "e4m3", s)
    assert torch.equal(q, _ref_e4m3((x * s).clamp(-448, 448)))
    # every row uses the full range: its largest element lands on max
    assert torch.allclose(q.abs().amax(dim=1), torch.full((16,), 448.0))
    # axis=0: one scale per column
    s0 = compute_scale(amax(x, Granularity.per_row(axis=0)), "e4m3")
    assert s0.shape == (1, 64)
    assert torch.equal(quantize(x, "e4m3", s0), _ref_e4m3((x * s0).clamp(-448, 448)))


@pytest.mark.parametrize("block", [(1, 32), (1, 128), (128, 128)])
def test_per_block_scales(block):
    x = torch.randn(256, 256) * torch.logspace(-4, 4, 256)
    g = Granularity.per_block(*block)
    a = amax(x, g)
    assert a.shape == (256 // block[0], 256 // block[1])
    s = compute_scale(a, "e4m3", power_of_two=True)
    q = quantize(x, "e4m3", s)
    s_full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    assert torch.equal(q, _ref_e4m3((x * s_full).clamp(-448, 448)))
    assert torch.equal(dequantize(q, s), q / s_full)
    assert torch.equal(fake_quantize(x, "e4m3", s), q / s_full)


def test_mx_block_32_with_e8m0_scale():
    x = torch.randn(8, 64) * 3
    a = amax(x, Granularity.per_block(32))
    s = mx_scale(a, "e4m3")
    # scales are powers of two on E8M0's grid, and elements land in [2^emax, 2^(emax+1)) at the block max
    assert torch.equal(quantize(1.0 / s, "e8m0"), 1.0 / s)
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))
    q = quantize(x, "e4m3", s)
    top = q.abs().reshape(8, 2, 32).amax(-1)
    assert torch.all((top >= 256) & (top <= 448))


def test_scaled_quantize_roundtrip():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q, s = scaled_quantize(x, "e4m3", Granularity.per_row())
    # half an ulp: 2^-4 relative in normal binades, half the subnormal spacing 2^-9 (in x's units) below
    err = (dequantize(q, s) - x).abs()
    assert torch.all(err <= torch.maximum(x.abs() * 2.0**-4, 2.0**-10 / s))


def test_compute_scale_edge_cases_are_finite():
    fmt = get_format("e4m3")
    amaxes = torch.tensor([0.0, math.inf, -math.inf, math.nan, 1e-45, 1e38, 2.0])
    s = compute_scale(amaxes, fmt)
    assert torch.isfinite(s).all()
    assert s[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert s[-1].item() == 224.0
    assert compute_scale(torch.tensor(2.0), fmt, margin=1).item() == 112.0
    p2 = compute_scale(torch.tensor(3.0), fmt, power_of_two=True).item()
    assert p2 == 128.0 and 3.0 * p2 <= 448


def test_amax_history_delayed_scaling():
    h = AmaxHistory(window_size=3)
    assert h.get_amax().item() == 0.0  # before any update: scale 1
    for v in (1.0, 8.0, 2.0, 3.0):
        h.update(torch.tensor([v, -v / 2]))
    # window of 3 holds 8, 2, 3 -> max 8; most recent 3
    assert h.get_amax("max").item() == 8.0
    assert h.get_amax("most_recent").item() == 3.0
    h.update(torch.tensor([1.0]))  # 8 leaves the window
    assert h.get_amax().item() == 3.0
    state = h.state_dict()
    h2 = AmaxHistory(window_size=3)
    h2.load_state_dict(state)
    assert torch.equal(h2.get_amax(), h.get_amax()) and len(h2) == 3
    with pytest.raises(ValueError, match="window_size mismatch"):
        AmaxHistory(window_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="unknown amax algorithm"):
        h.get_amax("mean")


def test_amax_history_ignores_non_finite_steps():
    h = AmaxHistory(window_size=4)
    h.update(torch.tensor([2.0]))
    h.update(torch.tensor([float("inf")]))  # a diverging (skipped) step
    h.update(torch.tensor([float("nan")]))
    assert h.get_amax().item() == 2.0 and h.get_amax("most_recent").item() == 2.0
    assert compute_scale(h.get_amax(), "e5m2").item() == 57344.0 / 2


def test_stochastic_rounding_is_one_of_two_neighbours_and_unbiased():
    fmt = get_format("e4m3")
    grid = fmt.values().double()
    # values strictly between neighbours, at several positions, incl. subnormal range and below min
    lo = torch.tensor([1.0, 0.001953125, 256.0, 0.0, 3.0], dtype=torch.float64)
    hi = torch.tensor([1.125, 0.00390625, 288.0, 0.001953125, 3.25], dtype=torch.float64)
    frac = torch.tensor([0.3, 0.5, 0.9, 0.01, 0.77], dtype=torch.float64)
    xs = (lo + frac * (hi - lo)).float()
    n = 200_000
    torch.manual_seed(0)
    for x, a, b in zip(xs, lo, hi):
        q = quantize(torch.full((n,), x.item()), fmt, rounding="stochastic").double()
        assert torch.isin(q, torch.stack([a, b])).all()
        p = (x.double() - a) / (b - a)
        # the mean of n Bernoulli draws has std (b-a)*sqrt(p(1-p)/n); 5 sigma: false alarm ~6e-7
        sigma = (b - a) * math.sqrt(p * (1 - p) / n)
        assert abs(q.mean() - x.double()) < 5 * sigma + 1e-12, (x, q.mean())
    assert torch.isin(quantize(torch.randn(1000), fmt, rounding="stochastic").double(), grid).all()


def test_stochastic_rounding_reproducible():
    x = torch.randn(10_000)
    torch.manual_seed(7)
    a = quantize(x, "e5m2", rounding="stochastic")
    torch.manual_seed(7)
    b = quantize(x, "e5m2", rounding="stochastic")
    c = quantize(x, "e5m2", rounding="stochastic")
    assert torch.equal(a, b) and not torch.equal(b, c)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        quantize(x, "e5m2", rounding="stochastic", generator=g1),
        quantize(x, "e5m2", rounding="stochastic", generator=g2),
    )


def test_round_toward_zero_never_grows_magnitude():
    x = torch.randn(10_000) * 50
    q = quantize(x, "e4m3", rounding="zero")
    assert torch.all(q.abs() <= x.abs().clamp(max=448))
    assert torch.all(torch.sign(q) * torch.sign(x) >= 0)


def test_straight_through_gradient():
    x = torch.randn(64, requires_grad=True)
    s = torch.tensor(4.0)
    quantize(x, "e4m3", s).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))
    x.grad = None
    fake_quantize(x, "e4m3", s).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    xb = torch.randn(4, 64, requires_grad=True)
    sb = compute_scale(amax(xb, Granularity.per_block(32)), "e4m3")
    (quantize(xb, "e4m3", sb) * 2).sum().backward()
    assert torch.equal(xb.grad, 2 * sb.repeat_interleave(32, 1))


def test_quantization_stats():
    x = torch.tensor([1e-6, 1.0, 1000.0, 0.0, -500.0, 0.3])
    st = quantization_stats(x, "e4m3")
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in st.values())
    assert st["overflow_rate"].item() == pytest.approx(2 / 6)
    assert st["underflow_rate"].item() == pytest.approx(1 / 6)
    assert st["amax"].item() == 1000.0
    # exact values: SQNR is infinite
    assert math.isinf(quantization_stats(torch.tensor([1.0, 2.0, 0.5]), "e4m3")["sqnr_db"].item())
    # a known noise level: the SQNR of E4M3 on N(0,1) is about 6.02*4 + ~7 dB (3 mantissa bits + implicit)
    sq = quantization_stats(torch.randn(100_000), "e4m3")["sqnr_db"].item()
    assert 25 < sq < 35
    # range use: values in binades 2^0 and 2^1 of E2M1's four binades (2^-1..2^2)
    st = quantization_stats(torch.tensor([1.0, 1.5, 2.0, 3.0]), "e2m1")
    assert st["dynamic_range_used"].item() == pytest.approx(0.5)


def test_bit_stall_matches_hand_count():
    det = BitStallDetector()
    before = torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0, 0.5])
    after = torch.tensor([1.0 + 1e-3, 1.2, 1.0, 1.0 - 1e-2, 16.5, 0.5 + 0.0625])
    # E4M3 spacing at 1 is 0.125, at 16 is 2, at 0.5 is 0.0625:
    # updated: 0,1,3,4,5 (5); stalled: 0 (1.001->1), 3 (0.99->1), 4 (16.5->16) -> 3/5
    det.update("layer.weight", before, after, "e4m3")
    assert det.get_stall_rate() == pytest.approx(3 / 5)
    det.update("other.weight", torch.zeros(3), torch.tensor([1e-9, 0.0, 0.0]), "e4m3")  # 1 updated, stalled
    assert det.get_layer_stall_rates() == pytest.approx({"layer.weight": 0.6, "other.weight": 1.0})
    assert det.get_stall_rate() == pytest.approx(4 / 6)
    assert set(det.get_dynamic_range_usage()) == {"layer.weight", "other.weight"}
    det.reset()
    assert det.get_stall_rate() == 0.0


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: quantize(torch.randn(3), "e9m9"), ValueError, "registered formats: .*E4M3"),
        (lambda: quantize(torch.arange(3), "e4m3"), TypeError, "float tensor"),
        (lambda: quantize([1.0, 2.0], "e4m3"), TypeError, "torch.Tensor"),
        (lambda: quantize(torch.randn(3), 42), TypeError, "FloatFormat or a registry name"),
        (lambda: quantize(torch.randn(4, 6), "e4m3", torch.ones(4, 4)), ValueError, "does not tile"),
        (lambda: quantize(torch.randn(4, 6), "e4m3", torch.ones(3, 1)), ValueError, "does not tile"),
        (lambda: quantize(torch.randn(3), "e4m3", rounding="up"), ValueError, "accepted: .*stochastic"),
        (lambda: amax(torch.randn(4, 48), Granularity.per_block(32)), ValueError, "block size 32 does not divide"),
        (lambda: Granularity("tile"), ValueError, "accepted: 'tensor', 'row', 'block'"),
        (lambda: FloatFormat("bad", exp_bits=-1, man_bits=3), ValueError, "exp_bits must be >= 1"),
        (lambda: FloatFormat("bad", exp_bits=4, man_bits=-2), ValueError, "man_bits must be >= 0"),
        (lambda: FloatFormat("big", exp_bits=8, man_bits=10), ValueError, "more than 16"),
        (lambda: FloatFormat("e1", exp_bits=1, man_bits=3, special="ieee"), ValueError, "no normal numbers"),
        (lambda: FloatFormat("e1m0", exp_bits=1, man_bits=0), ValueError, "no normal numbers"),
        (lambda: FloatFormat("far", exp_bits=8, man_bits=3, bias=-10), ValueError, "outside what float32"),
        (lambda: FloatFormat("x", exp_bits=4, man_bits=3, special="weird"), ValueError, "accepted: .*ieee"),
    ],
)
def test_bad_input_is_rejected_clearly(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_user_defined_format_and_case_insensitive_names():
    fmt = FloatFormat("E3M4B5", exp_bits=3, man_bits=4, bias=5, special="ieee")
    assert fmt.max_value == math.ldexp(1 + 15 / 16, 6 - 5)
    x = torch.randn(1000)
    q = quantize(x, fmt)
    assert torch.isin(q.abs(), fmt.values().abs()).all()
    assert get_format("e4m3") is get_format("E4M3") is get_format("e4m3fn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "zero"])
def test_cuda_matches_cpu(rounding):
    x = torch.randn(1 << 20) * torch.exp2(torch.randint(-20, 20, (1 << 20,)).float())
    for name in ("e4m3", "e5m2", "e3m4", "e2m1", "e8m0"):
        xs = x.abs() if name == "e8m0" else x
        gen_cpu = torch.Generator().manual_seed(0)
        cpu = quantize(xs, name, rounding=rounding, generator=gen_cpu)
        gen_cpu2 = torch.Generator().manual_seed(0)  # seeds come from the CPU generator on both paths
        gpu = quantize(xs.cuda(), name, rounding=rounding, generator=gen_cpu2)
        gpu = gpu.cpu()
        same = (gpu.view(torch.int32) == cpu.view(torch.int32)) | (torch.isnan(gpu) & torch.isnan(cpu))
        assert same.all(), name


def test_fast_path_does_not_recompile_for_new_shapes_or_formats():
    from torch._dynamo.utils import counters

    for fmt in ("e4m3", "bf16"):  # the float-only nearest kernel (e4m3) and the integer one (bf16: emax 127)
        quantize(torch.randn(100), fmt)
        quantize(torch.randn(100), fmt, scale=torch.tensor(2.0))
    graphs = counters["stats"]["unique_graphs"]
    for shape in [(1000,), (1001,), (7, 33), (3, 5, 64), (12345,)]:
        for fmt in ("e5m2", "e3m4", "e2m1", "bf16"):
            quantize(torch.randn(shape), fmt)
            quantize(torch.randn(shape), fmt, scale=torch.tensor(3.0))
    assert counters["stats"]["unique_graphs"] == graphs


def test_quantize_with_amax_is_quantize_plus_the_fused_amax():
    from altgrad.quantization import quantize_with_amax

    x = torch.randn(4096) * 30
    s = torch.tensor(2.0)
    q, a = quantize_with_amax(x, "e4m3", s)
    assert torch.equal(q, quantize(x, "e4m3", s)) and a.item() == x.abs().max().item()
    fq, _ = quantize_with_amax(x, "e4m3", s, dequantize=True)
    assert torch.equal(fq, fake_quantize(x, "e4m3", s))
    x[7] = float("nan")
    assert torch.isnan(quantize_with_amax(x, "e4m3", s)[1])  # a NaN tensor shows up in the amax
    empty_q, empty_a = quantize_with_amax(torch.empty(0), "e4m3")
    assert empty_q.shape == (0,) and empty_a.item() == 0.0


def _hard_tensor(n: int = 8192, seed: int = 0) -> torch.Tensor:
    """Values over ~60 binades plus zeros, signed zeros, float32 subnormals, infinities and a NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 20, (n,), generator=g).float())
    x[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3e-42, 448.0, 465.0])
    return x


def _independent_stats(x: torch.Tensor, q: torch.Tensor, fmt: str, scale) -> dict[str, float]:
    """The statistics recomputed in numpy float64 from x * scale and a q already checked against oracles."""
    xs = (x * (1.0 if scale is None else scale)).numpy().astype(np.float64)  # the float32 product, widened
    qn = q.numpy().astype(np.float64)
    finite = np.isfinite(xs)
    with np.errstate(invalid="ignore", over="ignore"):
        signal = np.square(np.where(finite, xs, 0.0)).sum()
        noise = np.square(np.where(finite & np.isfinite(qn), xs - qn, 0.0)).sum()
    return {
        "overflow_rate": float((np.abs(xs) > get_format(fmt).max_value).sum() / xs.size),
        "underflow_rate": float(((xs != 0) & (qn == 0)).sum() / xs.size),
        "sqnr_db": float(10 * np.log10(signal / noise)) if noise > 0 else math.inf,
        "amax": float(np.abs(x.numpy()).max()),
    }


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1", "e3m4", "e6m1"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scaling", ["none", "tensor", "row"])
def test_fused_statistics_match_an_independent_count(fmt, rounding, scaling):
    from altgrad.quantization import quantize_with_stats

    x = _hard_tensor().view(64, 128)
    scale = {
        "none": None,
        "tensor": torch.tensor(0.125),
        "row": torch.exp2(torch.arange(64, dtype=torch.float32).view(64, 1) % 7 - 3),
    }[scaling]
    q, stats = quantize_with_stats(x, fmt, scale, rounding=rounding, generator=torch.Generator().manual_seed(3))
    plain = quantize(x, fmt, scale, rounding=rounding, generator=torch.Generator().manual_seed(3))
    assert torch.equal(q.view(torch.int32), plain.view(torch.int32))  # the statistics change nothing
    ref = _independent_stats(x, q, fmt, scale)
    assert stats["overflow_rate"].item() == pytest.approx(ref["overflow_rate"], abs=1e-7)
    assert stats["underflow_rate"].item() == pytest.approx(ref["underflow_rate"], abs=1e-7)
    assert stats["underflow_rate"].item() > 0 and stats["overflow_rate"].item() > 0  # both paths exercised
    assert stats["sqnr_db"].item() == pytest.approx(ref["sqnr_db"], rel=1e-5)
    assert stats["amax"].item() == ref["amax"] == math.inf
    fq, fq_stats = quantize_with_stats(x, fmt, scale, rounding=rounding, generator=torch.Generator().manual_seed(3), dequantize=True)
    assert torch.equal(fq, fake_quantize(x, fmt, scale, rounding=rounding, generator=torch.Generator().manual_seed(3)))
    assert fq_stats["sqnr_db"].item() == stats["sqnr_db"].item()  # measured in the format's units either way


def test_fused_statistics_compiled_equal_eager_and_handle_nan_and_empty():
    from altgrad.quantization import quantize_with_stats
    from altgrad.quantization.kernels import round_to_format, run_compiled
    from altgrad.quantization.quantize import _params_on

    x = _hard_tensor(seed=1)[8:]  # finite: the amax is a number
    args = (x, torch.tensor(4.0), _params_on(get_format("e5m2"), x.device), None, "nearest", True, False, False, "full")
    q_eager, sums_eager = round_to_format(*args)
    q_fused, sums_fused = run_compiled(round_to_format, *args, variant=("test", "full"), use_compile=True)
    assert torch.equal(q_eager.view(torch.int32), q_fused.view(torch.int32))
    assert torch.equal(sums_eager[:3], sums_fused[:3])  # amax and the two counts exactly
    torch.testing.assert_close(sums_eager[3:], sums_fused[3:], rtol=1e-12, atol=0)  # float64 sums, any order

    exact_q, exact = quantize_with_stats(torch.tensor([1.0, -2.0, 0.5, 0.0]), "e4m3")
    assert math.isinf(exact["sqnr_db"].item()) and exact["overflow_rate"].item() == 0.0
    with_nan = torch.tensor([1.0, float("nan"), 3.3])
    _, nan_stats = quantize_with_stats(with_nan, "e4m3")
    assert math.isnan(nan_stats["amax"].item())  # a NaN shows in the amax, as delayed scaling expects
    assert nan_stats["overflow_rate"].item() == 0.0 and nan_stats["underflow_rate"].item() == 0.0
    assert math.isfinite(nan_stats["sqnr_db"].item())  # NaN lanes carry no signal and no noise
    empty_q, empty = quantize_with_stats(torch.empty(0, 4), "e4m3")
    assert empty_q.shape == (0, 4) and {k: v.item() for k, v in empty.items()}["overflow_rate"] == 0.0


@pytest.mark.parametrize(
    "fmt",
    ["e4m3", "e5m2", "e2m1", "e8m0", FloatFormat("E8M3_SUB", exp_bits=8, man_bits=3, special="ieee")],
    ids=lambda f: f if isinstance(f, str) else f.name,
)
def test_dynamic_range_used_matches_numpy_binades(fmt):
    # E8M0 and the E8M3 format hold values below 2**-126: float32 subnormals, whose binade is not in
    # the exponent field.
    fmt = get_format(fmt)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20_000, generator=g) * torch.exp2(torch.randint(-150, 120, (20_000,), generator=g).float())
    x = torch.cat([x, torch.tensor([0.0, float("inf"), float("nan")])])
    q = quantize(x, fmt).numpy().astype(np.float64)
    finite_nonzero = np.isfinite(q) & (q != 0)
    lowest = math.floor(math.log2(fmt.min_subnormal))
    binades = np.clip(np.floor(np.log2(np.abs(q[finite_nonzero]))) - lowest, 0, fmt.num_binades - 1)
    expected = len(np.unique(binades)) / fmt.num_binades
    assert dynamic_range_used(quantize(x, fmt), fmt).item() == pytest.approx(expected)
    assert 0 < expected < 1 or fmt.name in ("E4M3", "E5M2", "E2M1")


def test_bad_arguments_are_reported_in_the_documented_order_and_empty_tensors_take_any_scale():
    from altgrad.quantization.quantize import quantize_with_sums

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown rounding"):  # before the scale's dtype
        quantize(x, "e4m3", torch.tensor(2), rounding="bogus")
    with pytest.raises(ValueError, match="unknown rounding"):  # an unhashable value: the same message
        quantize(x, "e4m3", rounding=["nearest"])
    with pytest.raises(TypeError, match="scale must be a float tensor"):
        quantize(x, "e4m3", torch.tensor(2))
    for shape, scale in (((0, 8), 2.0), ((0, 8), torch.ones(0, 1)), ((4, 0), torch.ones(4, 1)),
                         ((0, 64), torch.ones(0, 2)), ((0,), torch.tensor(3.0))):
        empty = torch.empty(shape)
        assert fake_quantize(empty, "e4m3", scale).shape == shape
        q, sums = quantize_with_sums(empty, "e4m3", scale)
        assert q.shape == shape and sums.tolist() == [0.0] * 5


@pytest.mark.parametrize("name", ["E2M1", "E4M3", "E5M2", "FP16", "E6M1"])
def test_binade_occupancy_is_the_histogram_read_as_occupied(name):
    # dynamic_range_used's float-only kernel against the bit-reading histogram it replaces for formats of
    # up to 64 binades: values on and off the grid, outside the range (end bins), zeros, specials.
    from altgrad.quantization.kernels import binade_edges, binade_histogram, binade_occupancy, run_compiled

    fmt = get_format(name)
    lowest = math.floor(math.log2(fmt.min_subnormal))
    edges = torch.tensor(binade_edges(fmt), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    powers = torch.exp2(torch.arange(lowest - 3, lowest + fmt.num_binades + 3, dtype=torch.float32))
    dense = torch.cat([powers, -powers * 1.5, torch.nextafter(powers, torch.zeros(())), torch.tensor(
        [0.0, -0.0, 1e-45, float("inf"), float("-inf"), float("nan"), 3e38])])
    sparse = torch.exp2(torch.tensor([lowest + 1.0, lowest + fmt.num_binades - 2.0])) * torch.rand(2, generator=g).add(1)
    for q in (dense, sparse, quantize(dense, fmt), torch.zeros(5)):
        for compiled in (False, True):
            ours = run_compiled(binade_occupancy, q, edges, variant=("test", fmt.num_binades), use_compile=compiled)
            ref = binade_histogram(q, lowest, fmt.num_binades) > 0
            assert torch.equal(ours, ref), (name, q, compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cuda_fused_statistics_match_cpu(rounding):
    from altgrad.quantization.quantize import quantize_with_sums

    x = _hard_tensor(1 << 20, seed=4).view(1024, 1024)
    scale = torch.exp2(torch.arange(1024, dtype=torch.float32).view(1024, 1) % 5 - 2)
    for name in ("e4m3", "e5m2", "e2m1", "e3m4"):
        cpu_q, cpu_sums = quantize_with_sums(x, name, scale, rounding=rounding, generator=torch.Generator().manual_seed(0))
        gpu_q, gpu_sums = quantize_with_sums(
            x.cuda(), name, scale.cuda(), rounding=rounding, generator=torch.Generator().manual_seed(0)
        )
        assert torch.equal(gpu_q.cpu().view(torch.int32), cpu_q.view(torch.int32)), name
        assert torch.equal(gpu_sums[:3].cpu(), cpu_sums[:3]), name  # amax and counts exactly
        torch.testing.assert_close(gpu_sums[3:].cpu(), cpu_sums[3:], rtol=1e-10, atol=0)
        assert dynamic_range_used(gpu_q, name).item() == dynamic_range_used(cpu_q, name).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_output_dtype_is_cast_in_the_pass_with_the_dtype_own_rounding(dtype):
    from altgrad.quantization import quantize_with_amax

    x = _hard_tensor(seed=5)
    s = torch.tensor(0.37)  # not a power of two: the dequantized values need the final cast's rounding
    assert torch.equal(quantize(x, "e4m3", s, dtype=dtype).float(), quantize(x, "e4m3", s).to(dtype).float())
    if dtype != torch.float8_e4m3fn:  # E4M3 values divided by 0.37 are not on the E4M3 grid
        fq = fake_quantize(x, "e4m3", s, dtype=dtype)
        assert fq.dtype == dtype and torch.equal(fq, fake_quantize(x, "e4m3", s).to(dtype))
    q, a = quantize_with_amax(x[8:], "e4m3", s, dtype=dtype)
    assert q.dtype == dtype and a.item() == x[8:].abs().max().item()
    with pytest.raises(TypeError, match="dtype must be one of"):
        quantize(x, "e4m3", dtype=torch.int8)
    with pytest.raises(TypeError, match="float8 outputs carry no gradient"):
        quantize(x.clone().requires_grad_(), "e4m3", dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="holds E4M3 values"):
        quantize(x, "e5m2", dtype=torch.float8_e4m3fn)  # would round a second time, to the wrong grid
    with pytest.raises(ValueError, match="not fake-quantize"):
        fake_quantize(x, "e4m3", s, dtype=torch.float8_e4m3fn)


def test_float8_output_keeps_e5m2_infinities_when_not_saturating():
    x = torch.tensor([1.0, float("inf"), -1e6, 0.3, float("nan")])
    q = quantize(x, "e5m2", saturate=False, dtype=torch.float8_e5m2).float()
    assert q[:4].tolist() == [1.0, math.inf, -math.inf, 0.3125] and math.isnan(q[4])
    assert quantize(x, "e5m2", dtype=torch.float8_e5m2).float()[1:3].tolist() == [57344.0, -57344.0]
