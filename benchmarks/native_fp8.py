"""Tokens/s of real FP8 (`native_fp8`), simulated `fp8_hybrid` and torchao's float8 training against bf16, on
one GPT of width 2048+, in one run (needs a CUDA GPU with FP8 tensor cores: H100/H200/Ada).

    python benchmarks/native_fp8.py [--n-embd 2048 --n-layer 4 --n-head 16 --block 1024 --batch 8]

Every line is a ratio to the bf16 step measured in the same run, with the loss of the last timed step
(all models start from the same weights and see the same batch, so the losses should agree to a few
parts in a thousand). torchao is used when it imports. Layers the native backend could not run on FP8
tensor cores are counted (the run logs why).

Without a GPU, `ALTGRAD_NATIVE_FP8_ON_CPU=1 python benchmarks/native_fp8.py --device cpu --n-embd 256
--block 128 --batch 2 --steps 2` runs the same code on torch's CPU `_scaled_mm`: a smoke test of the
path, not a speed figure (CPUs have no FP8 GEMM units).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from altgrad.modeling import GPT, GPTConfig
from altgrad.training import QuantRecipe, quantize_model
from altgrad.training.native_fp8 import native_fp8_unsupported_reason


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-embd", type=int, default=2048)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/native_fp8.py needs a CUDA GPU (FP8 tensor cores); none is visible. For a CPU smoke run "
            "of the code path: ALTGRAD_NATIVE_FP8_ON_CPU=1 python benchmarks/native_fp8.py --device cpu --n-embd 256 "
            "--block 128 --batch 2 --steps 2"
        )
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = GPTConfig(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block, vocab_size=50304
    )
    torch.manual_seed(0)
    base = GPT(cfg).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.block), device=dev)

    def run(model) -> tuple[float, float]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

        def step() -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        return args.steps * ids.numel() / (time.perf_counter() - t0), loss.item()

    results = {"bf16 autocast (baseline)": run(copy.deepcopy(base))}
    native_recipe = QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": "native_fp8"})
    for name, recipe in [("native_fp8 (fp8_hybrid on FP8 GEMMs)", native_recipe), ("simulated fp8_hybrid", "fp8_hybrid")]:
        model = copy.deepcopy(base)
        quantizer = quantize_model(model, recipe)
        if recipe is native_recipe:
            x = torch.empty(args.batch, args.block, args.n_embd, device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):  # as in the timed steps
                fallbacks = [n for n, layer in quantizer.layers if native_fp8_unsupported_reason(layer, x)]
            print(f"native_fp8: {len(quantizer.layers) - len(fallbacks)} of {len(quantizer.layers)} layers on FP8 GEMMs")
        results[name] = run(model)
    try:
        from torchao.float8 import convert_to_float8_training

        model = copy.deepcopy(base)
        convert_to_float8_training(model.transformer.h)
        results["torchao convert_to_float8_training"] = run(model)
    except ImportError as exc:
        print(f"torchao not available ({exc}); skipped")
    b = results["bf16 autocast (baseline)"][0]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke run, not a speed figure)"
    print(f"device={name} model={args.n_layer}x{args.n_embd} block={args.block} batch={args.batch} torch={torch.__version__}")
    for label, (tps, loss) in results.items():
        print(f"{label:44s} {tps:12.0f} tokens/s   {tps / b:5.2f}x bf16   last loss {loss:.4f}")


if __name__ == "__main__":
    main()
