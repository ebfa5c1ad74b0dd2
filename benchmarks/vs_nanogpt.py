"""README's main job against nanoGPT's own train.py on the same CPU config: wall time and val loss,
alternating runs in one session, as a ratio to nanoGPT.

    python benchmarks/vs_nanogpt.py --nanogpt-dir /path/to/nanoGPT [--runs 2] [--max-iters 2000]
    python benchmarks/vs_nanogpt.py --nanogpt-dir /path/to/nanoGPT --plain-loop   # models only, one process

nanoGPT is not a dependency: point ``--nanogpt-dir`` at a checkout of karpathy/nanoGPT whose
``data/shakespeare_char`` has been prepared (copy Tiny Shakespeare there as ``input.txt`` and run its
``prepare.py``). nanoGPT runs its README's CPU command; altgrad runs README's main command (through
``accelerate launch`` with accelerate_config.yaml), both with the machine's default threads. Wall time
is the whole command, start-up included, as a user waits for it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def nanogpt_cmd(max_iters: int, out_dir: str) -> list[str]:
    # nanoGPT README, "I only have a macbook": the CPU Shakespeare-char run.
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
            "--n_head=4", "--n_embd=128", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
            "--dropout=0.0", f"--out_dir={out_dir}"]


def altgrad_cmd(max_iters: int, out_dir: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
            "recipes/train.py", "--config", "recipes/configs/cpu_shakespeare_char.yaml",
            f"training.max_steps={max_iters}", f"training.output_dir={out_dir}"]


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # each picks its own default
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return wall, text


def plain_loop(nanogpt_dir: Path, runs: int, steps: int = 150) -> None:
    """Both models in one process on the same random batches: AdamW, clipping, 2000-step config shapes."""
    import torch

    sys.path.insert(0, str(nanogpt_dir))
    from model import GPT as NanoGPT, GPTConfig as NanoConfig  # nanoGPT's model.py

    from altgrad.modeling import GPT, GPTConfig

    torch.manual_seed(0)
    data = torch.randint(0, 65, (steps, 12, 65))
    shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=False)
    models = {"nanoGPT": NanoGPT(NanoConfig(**shape)), "altgrad": GPT(GPTConfig(**shape))}

    def step(name, model, opt, d):
        x, y = d[:, :-1].contiguous(), d[:, 1:].contiguous()
        loss = model(x, y)[1] if name == "nanoGPT" else model(input_ids=x, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for run in range(runs):
        for name, model in models.items():
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for d in data[:20]:
                step(name, model, opt, d)
            t0 = time.perf_counter()
            for d in data:
                step(name, model, opt, d)
            print(f"run {run} {name:8s} {(time.perf_counter() - t0) / steps * 1000:6.1f} ms/step "
                  f"({torch.get_num_threads()} threads)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt-dir", required=True, type=Path)
    p.add_argument("--runs", type=int, default=2, help="runs of each, alternating (default 2)")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--work-dir", type=Path, default=Path("runs/vs_nanogpt"))
    p.add_argument("--plain-loop", action="store_true", help="time the two models in one process instead")
    a = p.parse_args()
    if a.plain_loop:
        plain_loop(a.nanogpt_dir, a.runs)
        return
    if not (a.nanogpt_dir / "data" / "shakespeare_char" / "train.bin").is_file():
        raise SystemExit(f"{a.nanogpt_dir}/data/shakespeare_char/train.bin missing: run nanoGPT's prepare.py there first")
    if "ALTGRAD_TINYSHAKESPEARE" not in os.environ:
        raise SystemExit("set ALTGRAD_TINYSHAKESPEARE to a local copy of Tiny Shakespeare")
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    walls: dict[str, list[float]] = {"nanogpt": [], "altgrad": []}
    losses: dict[str, list[float]] = {"nanogpt": [], "altgrad": []}
    for run in range(a.runs):
        for name in ("nanogpt", "altgrad"):
            out = str(work / f"{name}-{run}")
            if name == "nanogpt":
                wall, text = timed(nanogpt_cmd(a.max_iters, out), a.nanogpt_dir, work / f"{name}-{run}.log")
                loss = float(re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", text)[-1])
            else:
                wall, text = timed(altgrad_cmd(a.max_iters, out), REPO, work / f"{name}-{run}.log")
                loss = float(re.findall(r"final val_loss=([\d.]+)", text)[-1])
            walls[name].append(wall)
            losses[name].append(loss)
            print(f"run {run} {name:8s} wall {wall:7.1f} s  val loss {loss:.4f}", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"median wall: nanoGPT {med['nanogpt']:.1f} s, altgrad {med['altgrad']:.1f} s "
          f"-> altgrad / nanoGPT = {med['altgrad'] / med['nanogpt']:.2f}x")
    print(f"val loss: nanoGPT {', '.join(f'{x:.4f}' for x in losses['nanogpt'])}; "
          f"altgrad {', '.join(f'{x:.4f}' for x in losses['altgrad'])}")


if __name__ == "__main__":
    main()
