"""What the step benchmarks share: README's CPU model as command-line options, and a step timer."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def model_parser(description: str) -> argparse.ArgumentParser:
    """A parser with ``--device`` and the model's size, defaulting to README's CPU model (GPT 4 x 128,
    block 64, batch 12)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    return p


def step_times(step: Callable[[], None], steps: int, device: torch.device, warmup: int = 3) -> list[float]:
    """Seconds per call of ``step`` over ``steps`` calls after ``warmup`` untimed ones (compilation, caches);
    on CUDA each call is bracketed by a synchronize so the time is the device's."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times
