"""Tokens/s of real FP8 (`native_fp8`), simulated `fp8_hybrid` and torchao's float8 training against bf16, on
one GPT of width 2048+, in one run (needs a CUDA GPU with FP8 tensor cores: H100/H200/Ada).

    python benchmarks/native_fp8.py [--n-embd 2048 --n-layer 4 --n-head 16 --block 1024 --batch 8]

Every line is a ratio to the bf16 step measured in the same run. torchao is used when it imports.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from altgrad.modeling import GPT, GPTConfig
from altgrad.training import QuantRecipe, quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-embd", type=int, default=2048)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/native_fp8.py needs a CUDA GPU (FP8 tensor cores); none is visible")
    dev = torch.device("cuda")
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block,
                    vocab_size=50304)
    torch.manual_seed(0)
    base = GPT(cfg).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.block), device=dev)

    def tokens_per_s(model) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        return args.steps * ids.numel() / (time.perf_counter() - t0)

    results = {"bf16 autocast (baseline)": tokens_per_s(copy.deepcopy(base))}
    for name, recipe in [
        ("native_fp8 (fp8_hybrid on tensor cores)", QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": "native_fp8"})),
        ("simulated fp8_hybrid", "fp8_hybrid"),
    ]:
        model = copy.deepcopy(base)
        quantize_model(model, recipe)
        results[name] = tokens_per_s(model)
    try:
        from torchao.float8 import convert_to_float8_training

        model = copy.deepcopy(base)
        convert_to_float8_training(model.transformer.h)
        results["torchao convert_to_float8_training"] = tokens_per_s(model)
    except ImportError as exc:
        print(f"torchao not available ({exc}); skipped")
    b = results["bf16 autocast (baseline)"]
    print(f"device={torch.cuda.get_device_name()} model={args.n_layer}x{args.n_embd} block={args.block} batch={args.batch}")
    for name, tps in results.items():
        print(f"{name:44s} {tps:12.0f} tokens/s   {tps / b:5.2f}x bf16")


if __name__ == "__main__":
    main()
