"""Run a grid of recipes through the normal training path and read back what each run measured.

Each run is ``recipes/train.py --config CONFIG quantization.recipe=<recipe as YAML> training.output_dir=...``
in a subprocess on one CPU thread (``OMP_NUM_THREADS=1``, ``training.cpu_threads=1``), ``jobs`` at a
time. A run folder that already holds a finished run of the same recipe is reused, so an interrupted
study picks up where it stopped; a folder holding another recipe's run stops the study (nothing on disk
is overwritten). Results come from the run's own files: the final ``eval_loss`` from
``trainer_state.json``, everything else from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from altgrad.training.recipe import QuantRecipe, recipe_mismatch  # noqa: E402

CPU_CONFIG = REPO / "recipes" / "configs" / "cpu_shakespeare_char.yaml"


def _finished(run_dir: Path, recipe: QuantRecipe) -> bool:
    """True if ``run_dir`` holds a finished run of ``recipe``; raises if it holds another recipe's run."""
    if not (run_dir / "trainer_state.json").is_file():
        return False
    import yaml

    saved = yaml.safe_load((run_dir / "experiment_config.yaml").read_text())["quantization"]["recipe"]
    problem = recipe_mismatch(saved, recipe)
    if problem is not None or saved.get("name") != recipe.name:
        raise SystemExit(f"error: {run_dir} holds a run of another recipe ({saved.get('name')!r}); move it away")
    return True


def _train(name: str, recipe: QuantRecipe, out: Path, config: Path, overrides: list[str]) -> tuple[str, float]:
    run_dir = out / name
    if _finished(run_dir, recipe):
        return name, 0.0
    data = recipe.to_dict()
    data.pop("description", None)
    cmd = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(config),
           f"quantization.recipe={json.dumps(data)}", f"training.output_dir={run_dir}",
           "training.cpu_threads=1", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"error: run {name} failed (exit {proc.returncode}), see {out / f'{name}.log'}")
    return name, time.perf_counter() - start


def run_grid(runs: dict[str, QuantRecipe], out: Path, config: Path = CPU_CONFIG, overrides: list[str] = (),
             jobs: int = 2) -> None:
    """Train every ``name -> recipe`` into ``out/name`` (``jobs`` at a time), printing each as it finishes."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_train, n, r, out, config, list(overrides)) for n, r in runs.items()]
        for f in futures:
            name, seconds = f.result()
            print(f"  {name}: {'reused' if not seconds else f'{seconds:.0f} s'}", flush=True)


def run_study(script: str, runs: dict[str, QuantRecipe], args, argv: list[str] | None, summarize, write_summary, plot) -> int:
    """Train a study's ``runs`` (finished ones reused), then write its summary (naming the command) and plot."""
    print(f"{len(runs)} runs into {args.out}", flush=True)
    run_grid(runs, args.out, args.config, args.overrides, args.jobs)
    rows = summarize(args.out, runs)
    command = f"python recipes/studies/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(write_summary(rows, args.out, command.strip()))
    plot(rows, args.plot)
    print(f"summary: {args.out / 'summary.md'}  plot: {args.plot}")
    return 0


def study_parser(description: str, name: str, formats: tuple[str, ...]):
    """The command line every study shares: --out, --plot, --config, --formats, --jobs and train.py overrides."""
    import argparse

    p = argparse.ArgumentParser(description=description.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs") / name)
    p.add_argument("--plot", type=Path, default=Path("docs/results") / f"{name}.png")
    p.add_argument("--config", type=Path, default=CPU_CONFIG)
    p.add_argument("--formats", default=",".join(formats), help="comma-separated format names")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one CPU thread each")
    p.add_argument("overrides", nargs="*", help="train.py overrides for every run, e.g. training.max_steps=20")
    return p


def read_run(run_dir: Path) -> dict:
    """``val_loss`` (the final evaluation) and ``metrics`` (every logged row of metrics.jsonl)."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"val_loss": evals[-1] if evals else float("nan"), "metrics": rows}


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean over the logged rows holding ``key`` (None if none does)."""
    values = [r[key] for r in rows if key in r and r[key] is not None]
    return sum(values) / len(values) if values else None


def mean_matching(rows: list[dict], suffix: str) -> float | None:
    """Mean over rows and tensors of every metric ending in ``suffix`` (e.g. ``/exp_avg_sq/underflow_rate``)."""
    values = [v for r in rows for k, v in r.items() if k.endswith(suffix) and v is not None]
    return sum(values) / len(values) if values else None
