"""Step time of one GPT with no recipe, `fp8_hybrid`, `e5m2`, and with the FP32 shadow, as ratios in one run.

A "logging step" is an `fp8_hybrid` step that also collects every quantizer's statistics (overflow,
underflow, SQNR, amax, dynamic range) and reads them to the host, as the trainer does once per
`logging_steps`.

    python benchmarks/train_step.py [--device cpu|cuda] [--n-layer 4 --n-embd 128 --block 64 --batch 12]
        [--autocast bf16|none]

The shadow's cost is reported against one extra forward/backward of the plain model (its floor). On
CUDA every case runs under bf16 autocast by default, so the ratios answer the GPU goal (simulated
`fp8_hybrid` within 1.25x of the bf16 step); a width-2048 model there: `--n-layer 4 --n-embd 2048
--n-head 16 --block 1024 --batch 8`.
"""

from __future__ import annotations


import numpy as np
import torch

from common import model_parser, step_times

from altgrad.modeling import GPT, GPTConfig
from altgrad.training import FP32ShadowModel, quantize_model


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--autocast", choices=["bf16", "none"], default=None,
        help="run every case under bf16 autocast (default on CUDA, where the goal is a ratio to bf16) or not",
    )
    args = p.parse_args()
    dev = torch.device(args.device)
    use_autocast = (args.autocast or ("bf16" if dev.type == "cuda" else "none")) == "bf16"
    base_name = "no recipe (bf16 autocast)" if use_autocast else "no recipe (float32)"
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block, vocab_size=65)
    ids = torch.randint(0, 65, (args.batch, args.block), device=dev)

    def make(recipe):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        if recipe:
            quantizer = quantize_model(model, recipe)
            model.quantizer = quantizer  # the benchmark's handle; the trainer keeps its own
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, opt

    def timed(step_fn) -> float:
        return float(np.median(step_times(step_fn, args.steps, dev)))

    def train_step(model, opt, shadow=None, logged=False):
        def fn():
            if logged:  # a logging step: statistics reduced in the rounding passes, then read once
                model.quantizer.set_collect_stats(True)
            if shadow is not None:
                shadow.sync_from(model)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if shadow is not None:
                shadow.accumulate({"input_ids": ids, "labels": ids})
                shadow.compare(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if logged:
                stats = model.quantizer.pop_stats()
                torch.stack(list(stats.values())).cpu()  # the one host sync a logging step pays
        return fn

    base_model, base_opt = make(None)
    results = {base_name: timed(train_step(base_model, base_opt))}

    def fwd_bwd():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = base_model(input_ids=ids, labels=ids).loss
        loss.backward()
        base_model.zero_grad(set_to_none=True)

    fb = timed(fwd_bwd)
    for recipe in ("fp8_hybrid", "e5m2"):
        results[f"{recipe} (simulated)"] = timed(train_step(*make(recipe)))
    results["fp8_hybrid, logging step"] = timed(train_step(*make("fp8_hybrid"), logged=True))
    m, o = make(None)
    results["no recipe + FP32 shadow"] = timed(train_step(m, o, FP32ShadowModel(m)))
    m, o = make("fp8_hybrid")
    results["fp8_hybrid + FP32 shadow"] = timed(train_step(m, o, FP32ShadowModel(m)))

    base = results[base_name]
    print(
        f"device={dev} model={args.n_layer}x{args.n_embd} block={args.block} batch={args.batch} "
        f"autocast={'bf16' if use_autocast else 'none'} torch={torch.__version__}"
    )
    for name, t in results.items():
        print(f"{name:28s} {t * 1e3:8.2f} ms/step   {t / base:5.2f}x no-recipe step")
    shadow_cost = results["no recipe + FP32 shadow"] - base
    print(f"shadow overhead {shadow_cost * 1e3:.2f} ms = {shadow_cost / fb:.2f}x one extra forward/backward ({fb * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
