"""Quantize throughput against the memory floor, measured in one run.

    python benchmarks/quantize.py [--numel 16777216] [--device cpu|cuda] [--repeats 20]

Every figure is a ratio to `x.clone()` on the same tensor in the same run (one read + one write: the
floor for any out-of-place elementwise op). On CUDA it also prints achieved bandwidth as a share of the
clone's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from altgrad.quantization import (
    Granularity,
    amax,
    compute_scale,
    dynamic_range_used,
    fake_quantize,
    quantization_stats,
    quantize,
    quantize_with_amax,
    quantize_with_stats,
)
from altgrad.quantization.kernels import format_params, round_to_format


def timeit(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-eager", action="store_true", help="skip the slow eager reference timing")
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    x = torch.randn(args.numel, device=dev)
    x2d = x.view(-1, 1024)
    row_scale = compute_scale(amax(x2d, Granularity.per_row()), "e4m3")
    params = torch.tensor(format_params(__import__("altgrad").quantization.get_format("e4m3")), dtype=torch.int32, device=dev)

    scale1 = torch.tensor(2.0, device=dev)
    q_e4m3, q_e5m2 = quantize(x, "e4m3", scale1), quantize(x, "e5m2", scale1)

    def _separate_stats(t, s):  # what a monitor without the fused pass does: round, then reduce again
        q = quantize(t, "e4m3", s)
        stats = quantization_stats(t, "e4m3", s, q=q)
        return q, {k: v for k, v in stats.items() if k != "dynamic_range_used"}

    cases = {
        "x.clone()  [baseline]": lambda: x.clone(),
        "quantize e4m3 nearest": lambda: quantize(x, "e4m3"),
        "quantize e4m3 stochastic": lambda: quantize(x, "e4m3", rounding="stochastic"),
        "quantize e5m2 nearest": lambda: quantize(x, "e5m2"),
        "quantize e3m4 nearest (exotic)": lambda: quantize(x, "e3m4"),
        "fake_quantize e4m3 per-row scale": lambda: fake_quantize(x2d, "e4m3", row_scale),
        "fake_quantize e2m1 MX 1x32 blocks": lambda: fake_quantize(
            x2d, "e2m1", compute_scale(amax(x2d, Granularity.per_block(32)), "e2m1", power_of_two=True)
        ),
        "fake_quantize e4m3 -> bf16 in the pass": lambda: fake_quantize(x, "e4m3", scale1, dtype=torch.bfloat16),
        "fake_quantize e4m3, then .to(bf16)": lambda: fake_quantize(x, "e4m3", scale1).to(torch.bfloat16),
        "quantize e4m3 -> float8_e4m3fn in the pass": lambda: quantize(x, "e4m3", scale1, dtype=torch.float8_e4m3fn),
        "fused amax: quantize_with_amax e4m3": lambda: quantize_with_amax(x, "e4m3", scale1),
        "fused stats: quantize_with_stats e4m3": lambda: quantize_with_stats(x, "e4m3", scale1),
        "separate: quantize + stats recount": lambda: _separate_stats(x, scale1),
        "dynamic_range_used e4m3 (logging step)": lambda: dynamic_range_used(q_e4m3, "e4m3"),
        "dynamic_range_used e5m2 (logging step)": lambda: dynamic_range_used(q_e5m2, "e5m2"),
        "torch x.to(float8_e4m3fn).float()": lambda: x.to(torch.float8_e4m3fn).float(),
    }
    if dev == "cpu":
        import ml_dtypes

        xn = x.numpy()
        cases["ml_dtypes astype(e4m3fn).astype(f32)"] = lambda: xn.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if not args.skip_eager:
        cases["eager kernel (no compile) e4m3"] = lambda: round_to_format(x, None, params, None, "nearest", True, False)

    print(f"device={dev} numel={args.numel} torch={torch.__version__} threads={torch.get_num_threads()}")
    base = None
    for name, fn in cases.items():
        t = timeit(fn, dev, args.repeats if "eager" not in name else 3)
        base = base or t
        line = f"{name:40s} {t * 1e3:9.3f} ms   {t / base:6.2f}x clone"
        if dev == "cuda":
            line += f"   {base / t * 100:5.1f}% of copy bandwidth"
        print(line)


if __name__ == "__main__":
    main()
