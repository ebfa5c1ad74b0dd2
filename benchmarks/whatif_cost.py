"""Cost of what-if (altgrad.training.whatif) on an `fp8_hybrid` run, as ratios measured in one run.

Cases, each a full `QuantSession` optimizer step (forward/backward, verdict, AdamW, `end_step`):

- logging step without alternatives (the reference), and with 8 alternatives (every quantized tensor
  also rounded into each, statistics reduced and read in the same host sync);
- an ordinary (non-logging) step without and with the 8 alternatives (they must cost nothing there);
- a logging step with the FP32 shadow, and the same with one what-if gradient recipe replayed
  (`grad_every=1`; a what-if step is a shadow step, so the shadow step is its reference).

The cases are interleaved round by round so that machine noise hits them alike; medians are reported.

    python benchmarks/whatif_cost.py [--device cpu|cuda] [--n-layer 4 --n-embd 128 --block 64 --batch 12]
        [--rounds 15]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import model_parser

from altgrad.modeling import GPT, GPTConfig
from altgrad.training import QuantSession

EIGHT = [
    "E3M4", "E5M2", "E2M5", "E2M3", "E3M2",
    {"format": "E2M1", "granularity": "block", "block_size": 32, "scaling": "current", "scale_format": "E8M0"},
    {"format": "E4M3", "granularity": "block", "block_size": 32, "scaling": "current", "scale_format": "E8M0"},
    {"format": "E4M3", "rounding": "stochastic", "scaling": "current"},
]


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    dev = torch.device(args.device)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block, vocab_size=65)
    ids = torch.randint(0, 65, (args.batch, args.block), device=dev)

    def make(shadow_every=0, whatif=None):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        session = QuantSession(model, "fp8_hybrid", shadow_every=shadow_every, log_every=10**9, whatif=whatif)
        return session, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(session, opt, log):
        session.begin_step(log=log)
        session.forward_backward({"input_ids": ids, "labels": ids})
        if session.before_optimizer_step().ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        session.end_step()  # on a logging step: every metric reduced and read to the host

    plain, with8 = make(), make(whatif={"alternatives": EIGHT})
    shadowed = make(shadow_every=1)
    replayed = make(shadow_every=1, whatif={"grad_every": 1, "grad_recipes": ["e3m4"]})
    cases = {
        "logging step, no alternatives": (plain, True),
        "logging step, 8 alternatives": (with8, True),
        "ordinary step, no alternatives": (plain, False),
        "ordinary step, 8 alternatives": (with8, False),
        "logging step + FP32 shadow": (shadowed, True),
        "logging step + FP32 shadow + 1 what-if gradient recipe": (replayed, True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds + 2):  # two warm-up rounds (compilation of every format's kernel variant)
        for name, ((session, opt), log) in cases.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(session, opt, log)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    # The minimum as well as the median: on a shared machine the minimum is the least disturbed step.
    med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    low = {name: float(np.min(t)) * 1e3 for name, t in times.items()}
    print(f"device {dev}, GPT {args.n_layer}x{args.n_embd}, block {args.block}, batch {args.batch}, "
          f"{args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(f"{'case':58s} {'median ms':>10s} {'min ms':>9s}")
    for name in med:
        print(f"{name:58s} {med[name]:10.1f} {low[name]:9.1f}")
    print(f"by minimum: 8 alternatives {low['logging step, 8 alternatives'] / low['logging step, no alternatives']:.2f}x "
          f"(logging), {low['ordinary step, 8 alternatives'] / low['ordinary step, no alternatives']:.2f}x (ordinary); "
          f"1 what-if gradient recipe {low['logging step + FP32 shadow + 1 what-if gradient recipe'] / low['logging step + FP32 shadow']:.2f}x")
    print("by median:")
    print(f"8 alternatives, logging step: {med['logging step, 8 alternatives'] / med['logging step, no alternatives']:.2f}x "
          "the logging step without")
    print(f"8 alternatives, ordinary step: {med['ordinary step, 8 alternatives'] / med['ordinary step, no alternatives']:.2f}x "
          "the ordinary step without")
    print(f"1 what-if gradient recipe: {med['logging step + FP32 shadow + 1 what-if gradient recipe'] / med['logging step + FP32 shadow']:.2f}x "
          "the shadow logging step")


if __name__ == "__main__":
    main()
