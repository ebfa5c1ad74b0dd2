"""Step time of `fp8_hybrid` against float32, both eager and under `torch.compile(model)`, in one run.

    python benchmarks/compile_step.py [--device cpu|cuda] [--n-layer 4 --n-embd 128 --n-head 4 --block 64
        --batch 12] [--steps 30] [--backend inductor] [--autocast bf16|none]

Prints AdamW steps (forward, backward, optimizer; the optimizer stays eager in every case) and the
two ratios the issue sets goals for: compiled `fp8_hybrid` / compiled float32 (goal <= 1.25x) and eager
`fp8_hybrid` / eager float32 (goal <= 1.5x). Also torchao's `convert_to_float8_training` (emulated,
tensorwise E4M3/E5M2 dynamic scaling) on the same model, compiled, when torchao imports; otherwise it
prints why not. After 3 warm-up steps per case (compilation; their wall time is printed too), --steps
rounds each time one step of every case in turn, so that a shared machine's slow and fast spells hit all
cases alike; min and median per case, and for the goals also the median of the per-round ratios. The timed fp8_hybrid steps are ordinary steps, which run
the quantized layers as traced graph code; "logging step" times steps with statistics on, which run
them as opaque ops (see altgrad.training.traced_linear). On a GPU, width >= 2048: `--device cuda --n-layer 4 --n-embd 2048 --n-head 16 --block 1024
--batch 8` (bf16 autocast by default there, so the float baseline is the bf16 step).
"""

from __future__ import annotations

import statistics
import time

import torch

from common import model_parser, step_times

from altgrad.modeling import GPT, GPTConfig
from altgrad.training import quantize_model


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--autocast", choices=["bf16", "none"], default=None)
    p.add_argument("--skip-torchao", action="store_true")
    args = p.parse_args()
    dev = torch.device(args.device)
    use_autocast = (args.autocast or ("bf16" if dev.type == "cuda" else "none")) == "bf16"
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block, vocab_size=65)
    ids = torch.randint(0, 65, (args.batch, args.block), device=dev)

    def make(recipe=None, compiled=False, torchao=False, logging=False):
        torch.manual_seed(0)
        model = GPT(cfg).to(dev)
        quantizer = quantize_model(model, recipe) if recipe else None
        if torchao:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            # The same layers altgrad quantizes (the blocks' Linears; not the tied lm_head).
            convert_to_float8_training(
                model, config=Float8LinearConfig(emulate=True), module_filter_fn=lambda m, name: ".h." in f".{name}"
            )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        run = torch.compile(model, backend=args.backend) if compiled else model

        def step():
            if quantizer is not None:
                quantizer.begin_step()
                quantizer.set_collect_stats(logging)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if logging:
                quantizer.pop_stats()

        return step

    base = "bf16 autocast" if use_autocast else "float32"
    steps = {
        f"eager {base}": make(),
        "eager fp8_hybrid": make("fp8_hybrid"),
        f"compiled {base}": make(compiled=True),
        "compiled fp8_hybrid": make("fp8_hybrid", compiled=True),
        "compiled fp8_hybrid, logging step": make("fp8_hybrid", compiled=True, logging=True),
    }
    torchao_note = "skipped (--skip-torchao)"
    if not args.skip_torchao:
        try:
            import torchao

            steps[f"compiled torchao float8 (emulate, {torchao.__version__})"] = make(compiled=True, torchao=True)
            torchao_note = ""
        except Exception as exc:  # not installed, or not working on this device/torch: say which
            torchao_note = f"torchao unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    warmups = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(3):  # compilation happens here (a delayed recipe's traced graph at the second step)
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        warmups[name] = time.perf_counter() - t0
    # Rounds, each timing one step of every case in turn: a shared machine's slow and fast spells then
    # hit every case alike, and the ratios compare steps measured seconds apart, not minutes.
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name] += step_times(step, 1, dev, warmup=0)
    results = {name: (min(t), statistics.median(t)) for name, t in times.items()}

    print(
        f"device={dev} model={args.n_layer}x{args.n_embd} block={args.block} batch={args.batch} "
        f"autocast={'bf16' if use_autocast else 'none'} backend={args.backend} steps={args.steps} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    compiled_base = results[f"compiled {base}"]
    for name, (tmin, tmed) in results.items():
        print(
            f"{name:48s} min {tmin * 1e3:8.2f} ms  median {tmed * 1e3:8.2f} ms  "
            f"{tmed / compiled_base[1]:5.2f}x compiled {base} (median)  first 3 steps {warmups[name]:6.1f} s"
        )
    for label, num, den, goal in (
        ("compiled fp8_hybrid / compiled " + base, "compiled fp8_hybrid", f"compiled {base}", 1.25),
        ("eager fp8_hybrid / eager " + base, "eager fp8_hybrid", f"eager {base}", 1.5),
    ):
        r_min = results[num][0] / results[den][0]
        r_med = results[num][1] / results[den][1]
        paired = statistics.median(a / b for a, b in zip(times[num], times[den]))  # same round, seconds apart
        print(
            f"{label:48s} {r_min:5.2f}x (min)  {r_med:5.2f}x (median)  {paired:5.2f}x (median of per-round "
            f"ratios)   goal <= {goal}x"
        )
    if torchao_note:
        print(torchao_note)


if __name__ == "__main__":
    main()
