"""The two round-to-nearest kernels side by side: the integer one (`round_to_format`, every format and
rounding) and the float-only one (`round_nearest_split`, what `quantize` picks for nearest rounding into
the usual formats on CPU), compiled, on the same tensors, in one run.

    python benchmarks/nearest_kernels.py [--sizes 98304 393216 16777216] [--repeats 50]
        [--stats none|amax|full]

Prints, per size and format, the median time of each kernel as a multiple of `x.clone()` and the
split/integer ratio, for a fake-quantize with a per-tensor scale (what a quantized Linear does to each
operand). `--stats amax` adds the fused amax (a delayed-scaling training call), `--stats full` the
fused statistics of a logging step. Both kernels are checked to give the same bits on the benchmark data
before timing (and, with statistics, the same amax and counts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from altgrad.quantization import get_format
from altgrad.quantization.kernels import (
    format_params,
    needs_exact_subnormal_exponent,
    round_nearest_split,
    round_to_format,
    run_compiled,
    split_params,
)


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[98_304, 393_216, 16_777_216])
    p.add_argument("--formats", nargs="+", default=["E4M3", "E5M2", "E2M5"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--stats", choices=["none", "amax", "full"], default="none")
    args = p.parse_args()
    stats = args.stats
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} repeats={args.repeats} stats={stats}")
    print(f"{'size':>10s} {'format':6s} {'clone ms':>9s} {'integer':>9s} {'split':>9s}  split/integer")
    for size in args.sizes:
        x = torch.randn(size) * 3.0
        scale = torch.tensor(37.3)
        clone = median_ms(lambda: x.clone(), args.repeats)
        for name in args.formats:
            fmt = get_format(name)
            int_params = torch.tensor(format_params(fmt), dtype=torch.int32)
            flt_params = torch.tensor(split_params(fmt), dtype=torch.float32)
            exact_sub = needs_exact_subnormal_exponent(fmt)

            def integer():
                return run_compiled(
                    round_to_format, x, scale, int_params, None, "nearest", True, True, exact_sub, stats,
                    variant=("bench", exact_sub, stats))

            def split():
                return run_compiled(
                    round_nearest_split, x, scale, flt_params, True, True, stats, variant=("bench", stats))

            (q_int, s_int), (q_split, s_split) = ((out, None) if stats == "none" else out for out in (integer(), split()))
            assert torch.equal(q_int.view(torch.int32), q_split.view(torch.int32)), name
            assert stats == "none" or torch.equal(s_int.reshape(-1)[:3], s_split.reshape(-1)[:3]), name
            t_int, t_split = median_ms(integer, args.repeats), median_ms(split, args.repeats)
            print(
                f"{size:10d} {name:6s} {clone:9.3f} {t_int / clone:8.2f}x {t_split / clone:8.2f}x  "
                f"{t_split / t_int:5.2f}"
            )


if __name__ == "__main__":
    main()
