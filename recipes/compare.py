"""Compare finished altgrad runs against a baseline: a Markdown report with a verdict per run, plus plots.

Usage::

    python recipes/compare.py RUN_DIR [RUN_DIR ...] --baseline RUN_DIR --out REPORT_DIR \\
        [--val-loss-tol 0.10] [--cos-sim-min 0.9] [--bit-stall-max 0.5] [--overflow-max 0.01]

Example (the E5M2-vs-BF16 experiment)::

    python recipes/compare.py out/e5m2_fp8 --baseline out/bf16_baseline --out out/report

What is read from each RUN_DIR (a ``training.output_dir`` of recipes/train.py):

* ``metrics.jsonl`` -- every logged dict by step, per-layer metrics included. Without it (runs from
  before it existed), ``trainer_state.json``'s ``log_history``, from the run directory or else from its
  latest ``checkpoint-*`` (a run that was stopped early).
* ``experiment_config.yaml`` -- the resolved experiment; runs whose configs differ only in seeds
  (and output_dir/run_name/tags) form a group, reported as mean +- standard deviation over seeds.
* ``alerts.jsonl`` -- stability alerts (counted by level; the first few are listed).
* W&B offline runs, ``RUN_DIR/wandb/offline-run-*/run-*.wandb`` (or RUN_DIR being such a folder):
  the binary transaction log is decoded with wandb's protobuf records (history rows and the
  config, including the ``experiment`` key train.py uploads). It is used only when
  both of those are missing. ``files/wandb-summary.json`` (online runs, synced copies) is
  used for final values in that case too. Media, artifacts and system metrics are not read.

Verdict: PASS when val loss <= (1 + tol) x the baseline's, mean shadow cosine similarity > cos-sim-min,
mean bit-stall rate < bit-stall-max and max overflow rate < overflow-max (metrics a run did not log
are not judged, e.g. a bf16 run has no overflow); otherwise INVESTIGATE with the failed checks.
Bit-stall is judged only for recipes with ``stored_weight`` (weights rounded into the format after
each step, where a stalled update is lost); with float32 master weights it measures the forward copy,
which lags the master weight harmlessly, and is reported (marked †) but not judged.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from altgrad.monitoring import metrics as M
from altgrad.monitoring.wandb_offline import find_run_dirs, read_offline_run
from altgrad.training.recipe import QuantRecipe
from altgrad.training.session import perplexity

# Keys whose difference does not make two runs different experiments (they are the same
# experiment repeated with another seed, possibly written somewhere else).
SEED_KEYS = {("training", "seed"), ("data", "seed")}
IGNORED_KEYS = {("training", "output_dir"), ("training", "run_name"), ("training", "tags"),
                ("training", "resume_from_checkpoint"), ("training", "logging_dir")}

COS_SIM = M.COS_SIM_MEAN
BIT_STALL = M.BIT_STALL_RATE
OVERFLOW = M.OVERFLOW_RATE
BIT_STALL_LAYER = M.BIT_STALL_LAYER_PREFIX


# --------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """One run directory, loaded."""

    name: str
    path: Path
    log_history: list[dict] = field(default_factory=list)
    config: dict | None = None
    alerts: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a logged metric, finite values only."""
        steps, values = [], []
        for entry in self.log_history:
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(int(entry.get("step", len(steps))))
                values.append(float(value))
        return steps, values

    def last(self, key: str) -> float | None:
        _, values = self.series(key)
        if values:
            return values[-1]
        value = self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def seed(self) -> Any:
        return ((self.config or {}).get("training") or {}).get("seed")


def load_run(path: str | Path) -> Run:
    """Load everything compare.py understands from one run directory (see module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory")
    run = Run(name=path.name, path=path)

    metrics_file = path / M.METRICS_FILENAME
    state_file = _trainer_state_file(path)
    if metrics_file.is_file():
        # Every logged dict, per-layer metrics included (trainer_state.json keeps only summaries).
        run.log_history = M.read_metrics(metrics_file)
        run.sources.append(metrics_file.name)
    elif state_file is not None:
        run.log_history = json.loads(state_file.read_text()).get("log_history", [])
        run.sources.append(str(state_file.relative_to(path)))

    config_file = path / "experiment_config.yaml"
    if config_file.is_file():
        run.config = yaml.safe_load(config_file.read_text())
        run.sources.append(config_file.name)

    alerts_file = path / "alerts.jsonl"
    if alerts_file.is_file():
        for line in alerts_file.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    run.alerts.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
        run.sources.append(alerts_file.name)

    wandb_dir = _latest_wandb_run(path)
    if wandb_dir is not None and (not run.log_history or run.config is None):
        history, config, summary = read_wandb_run(wandb_dir)
        if not run.log_history and history:
            run.log_history = history
            run.summary = summary
            run.sources.append(f"W&B {wandb_dir.name} (history)")
        if run.config is None and isinstance(config.get("experiment"), dict):
            run.config = config["experiment"]
            run.sources.append(f"W&B {wandb_dir.name} (config)")

    if not run.log_history:
        raise ValueError(
            f"{str(path)!r} holds no metrics.jsonl or trainer_state.json (also not in checkpoint-*) and no readable "
            "W&B offline run: is it a training.output_dir of recipes/train.py?"
        )
    return run


def _trainer_state_file(path: Path) -> Path | None:
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    checkpoints = [p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    checkpoints.sort(key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return checkpoints[-1] / "trainer_state.json" if checkpoints else None


def _latest_wandb_run(path: Path) -> Path | None:
    runs = find_run_dirs(path)
    return runs[-1] if runs else None


def read_wandb_run(run_dir: Path) -> tuple[list[dict], dict, dict]:
    """History rows, config and summary of a local W&B run folder, with keys mapped back to Trainer
    names: ``train/loss`` -> ``loss``, ``eval/loss`` -> ``eval_loss``, ``train/global_step`` -> ``step``."""
    run = read_offline_run(run_dir)
    history = []
    for raw in run.history:
        row = {_trainer_key(k): v for k, v in raw.items()}
        if "step" not in row and "_step" in row:
            row["step"] = row["_step"]
        history.append(row)
    return history, dict(run.config), {_trainer_key(k): v for k, v in run.summary.items()}


def _trainer_key(key: str) -> str:
    if key == "train/global_step":
        return "step"
    if key.startswith("train/"):
        return key[len("train/"):]
    if key.startswith("eval/"):
        return "eval_" + key[len("eval/"):]
    return key


# --------------------------------------------------------------------------------------- metrics
@dataclass
class Thresholds:
    val_loss_tol: float = 0.10
    cos_sim_min: float = M.DEFAULT_THRESHOLDS["cos_sim_floor"]
    bit_stall_max: float = M.DEFAULT_THRESHOLDS["bit_stall"]
    overflow_max: float = M.DEFAULT_THRESHOLDS["overflow"]


def stores_quantized_weights(config: dict | None) -> bool | None:
    """Whether the run's recipe rounds the master weights into the format (``stored_weight``); None
    when the config is missing or unreadable."""
    recipe = ((config or {}).get("quantization") or {}).get("recipe")
    if recipe is None:
        return None
    try:
        return QuantRecipe.from_dict(recipe).stored_weight is not None
    except (TypeError, ValueError):
        return None


def summarize(run: Run, baseline: Run | None, th: Thresholds) -> dict[str, Any]:
    """The report row of one run (numbers are None where the run did not log the metric)."""
    _, losses = run.series("loss")
    val_loss = run.last("eval_loss")
    base_val = baseline.last("eval_loss") if baseline is not None else None
    _, cos = run.series(COS_SIM)
    _, stall = run.series(BIT_STALL)
    _, overflow = run.series(OVERFLOW)
    _, tps = run.series("tokens_per_second")
    levels: dict[str, int] = {}
    for alert in run.alerts:
        level = str(alert.get("level", "?")).lower()
        levels[level] = levels.get(level, 0) + 1
    row = {
        "name": run.name,
        "seed": run.seed(),
        "final_loss": losses[-1] if losses else None,
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss) if val_loss is not None else None,
        "ratio": val_loss / base_val if val_loss is not None and base_val else None,
        "cos_sim": statistics.fmean(cos) if cos else None,
        "bit_stall": statistics.fmean(stall) if stall else None,
        # With float32 master weights the stall is of the forward copy: the update is kept in the master
        # weight and shows up once it crosses a grid step, so it is reported but not judged. Stored
        # (rounded) weights lose a stalled update for good: judged. Unknown recipe: judged.
        "stall_judged": stores_quantized_weights(run.config) is not False,
        "overflow": max(overflow) if overflow else None,
        "alerts": levels,
        "runtime": run.last("train_runtime"),
        "tokens_per_s": statistics.fmean(tps) if tps else None,
    }
    failed = []
    if row["ratio"] is None:
        failed.append("no val loss" if val_loss is None else "no baseline val loss")
    elif row["ratio"] > 1.0 + th.val_loss_tol:
        failed.append(f"val loss {row['ratio']:.3f}x baseline > {1 + th.val_loss_tol:.2f}x")
    if row["cos_sim"] is not None and not row["cos_sim"] > th.cos_sim_min:
        failed.append(f"cos sim {row['cos_sim']:.3f} <= {th.cos_sim_min}")
    if row["bit_stall"] is not None and row["stall_judged"] and not row["bit_stall"] < th.bit_stall_max:
        failed.append(f"bit-stall {row['bit_stall']:.1%} >= {th.bit_stall_max:.0%}")
    if row["overflow"] is not None and not row["overflow"] < th.overflow_max:
        failed.append(f"overflow {row['overflow']:.2%} >= {th.overflow_max:.2%}")
    row["verdict"] = "PASS" if not failed else "INVESTIGATE"
    row["reasons"] = failed
    return row


def group_key(config: dict | None) -> str | None:
    """Canonical JSON of the config without seeds and run bookkeeping (None: no config)."""
    if config is None:
        return None
    stripped = {}
    for section, values in config.items():
        if isinstance(values, dict):
            stripped[section] = {k: v for k, v in values.items()
                                 if (section, k) not in SEED_KEYS | IGNORED_KEYS}
        else:
            stripped[section] = values
    return json.dumps(stripped, sort_keys=True, default=str)


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs sharing a config apart from seeds, in first-seen order (runs without config stay alone)."""
    groups: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        key = group_key(run.config) or f"__alone_{i}"
        groups.setdefault(key, []).append(run)
    return list(groups.values())


# --------------------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _mean_spread(values: list[float | None], spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.fmean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def write_report(runs: list[Run], baseline: Run, out: Path, th: Thresholds) -> tuple[Path, list[dict]]:
    """Write ``out/report.md`` and the PNGs; return the report path and the rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(run, baseline, th) for run in runs]
    plots = make_plots(runs, out)

    lines = [
        "# altgrad run comparison",
        "",
        f"Baseline: **{baseline.name}** (`{baseline.path}`). Verdict PASS needs val loss ≤ "
        f"{1 + th.val_loss_tol:.2f}× baseline, mean shadow cos sim > {th.cos_sim_min}, mean bit-stall < "
        f"{th.bit_stall_max:.0%}, max overflow < {th.overflow_max:.2%} (metrics a run did not log are not judged).",
        "Bit-stall is judged only for recipes that store the weights in the format (`stored_weight`); "
        "marked † where it is the forward copy of float32 master weights, which keep every update.",
        "",
        "## Runs",
        "",
        "| run | seed | final loss | val loss | val ppl | val loss / baseline | mean cos sim | mean bit-stall "
        "| max overflow | alerts (error/warn/info) | wall time (s) | tokens/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        alerts = row["alerts"]
        verdict = row["verdict"] + (f" ({'; '.join(row['reasons'])})" if row["reasons"] else "")
        lines.append(
            f"| {row['name']}{' (baseline)' if row['name'] == baseline.name else ''} | {_fmt(row['seed'], '')} "
            f"| {_fmt(row['final_loss'])} | {_fmt(row['val_loss'])} | {_fmt(row['val_ppl'], '.2f')} "
            f"| {_fmt(row['ratio'], '.3f')} | {_fmt(row['cos_sim'])} "
            f"| {_fmt(row['bit_stall'], '.1%')}{'' if row['stall_judged'] or row['bit_stall'] is None else ' †'} "
            f"| {_fmt(row['overflow'], '.3%')} | {alerts.get('error', 0)}/{alerts.get('warn', 0)}/{alerts.get('info', 0)} "
            f"| {_fmt(row['runtime'], '.1f')} | {_fmt(row['tokens_per_s'], '.0f')} | {verdict} |"
        )

    groups = group_runs(runs)
    if any(len(g) > 1 for g in groups):
        by_name = {row["name"]: row for row in rows}
        lines += [
            "",
            "## Groups (same config apart from seed; mean ± standard deviation over seeds)",
            "",
            "| group | runs (seeds) | val loss | val loss / baseline | mean cos sim | mean bit-stall | max overflow | verdicts |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for group in groups:
            g = [by_name[r.name] for r in group]
            verdicts = ", ".join(f"{v}×{sum(r['verdict'] == v for r in g)}" for v in ("PASS", "INVESTIGATE")
                                 if any(r["verdict"] == v for r in g))
            lines.append(
                f"| {group[0].name} | {', '.join(f'{r.name} ({r.seed()})' for r in group)} "
                f"| {_mean_spread([r['val_loss'] for r in g], '.4f')} | {_mean_spread([r['ratio'] for r in g], '.3f')} "
                f"| {_mean_spread([r['cos_sim'] for r in g], '.4f')} | {_mean_spread([r['bit_stall'] for r in g], '.1%')} "
                f"| {_mean_spread([r['overflow'] for r in g], '.3%')} | {verdicts} |"
            )

    if any(run.alerts for run in runs):
        lines += ["", "## Alerts (first 5 per run)", ""]
        for run in runs:
            for alert in run.alerts[:5]:
                lines.append(f"- **{run.name}** step {alert.get('step')} [{alert.get('level')}] "
                             f"{alert.get('title', '')}: {' '.join(str(alert.get('text', '')).split())}")

    if plots:
        lines += ["", "## Plots", ""]
        for title, filename in plots:
            lines += [f"### {title}", "", f"![{title}]({filename})", ""]

    lines += ["", "## Sources", ""]
    lines += [f"- {run.name}: `{run.path}` — {', '.join(run.sources)}" for run in runs]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, rows


# --------------------------------------------------------------------------------------- plots
FIGSIZE, DPI = (6, 3.5), 100


def make_plots(runs: list[Run], out: Path) -> list[tuple[str, str]]:
    """Write the PNGs that have data; return (title, filename) pairs."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    written: list[tuple[str, str]] = []

    def curves(filename: str, title: str, ylabel: str, keys: list[tuple[str, str]], logy: bool = False) -> None:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        drawn = False
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for key, style in keys:
                steps, values = run.series(key)
                if values:
                    label = run.name if len(keys) == 1 else f"{run.name} {key}"
                    ax.plot(steps, values, style, color=color, label=label, markersize=3)
                    drawn = True
        if drawn:
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            if logy:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / filename)
            written.append((title, filename))
        plt.close(fig)

    curves("loss.png", "Training loss (lines) and val loss (markers)", "loss",
           [("loss", "-"), ("eval_loss", "o--")])
    curves("cos_sim.png", "Shadow gradient cosine similarity (mean over layers)", "cos sim", [(COS_SIM, "-")])
    curves("bit_stall.png", "Bit-stall rate", "fraction of updates stalled", [(BIT_STALL, "-")])
    curves("overflow.png", "Overflow rate", "fraction clipped", [(OVERFLOW, "-")])

    for run in runs:
        layers = sorted({k[len(BIT_STALL_LAYER):] for e in run.log_history for k in e if k.startswith(BIT_STALL_LAYER)},
                        key=_natural)
        if not layers:
            continue
        steps = sorted({int(e.get("step", 0)) for e in run.log_history if any(k.startswith(BIT_STALL_LAYER) for k in e)})
        index = {s: j for j, s in enumerate(steps)}
        grid = [[math.nan] * len(steps) for _ in layers]
        for e in run.log_history:
            for i, layer in enumerate(layers):
                value = e.get(BIT_STALL_LAYER + layer)
                if isinstance(value, (int, float)):
                    grid[i][index[int(e.get("step", 0))]] = float(value)
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
        ax.set_yticks(range(len(layers)), [l.replace("transformer.", "") for l in layers], fontsize=6)
        ax.set(title=f"Bit-stall rate per layer: {run.name}", xlabel="step")
        fig.colorbar(image, ax=ax, label="stalled fraction")
        fig.tight_layout()
        filename = f"bit_stall_heatmap_{re.sub(r'[^A-Za-z0-9_.-]', '_', run.name)}.png"
        fig.savefig(out / filename)
        plt.close(fig)
        written.append((f"Bit-stall per layer: {run.name}", filename))
    return written


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recipes/compare.py",
        description="Compare altgrad runs against a baseline: report.md (table + verdicts) and PNG plots.",
        epilog=__doc__.split("What is read")[0].split("Usage::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training.output_dir of each run")
    parser.add_argument("--baseline", required=True, metavar="RUN_DIR", help="the reference run (added if not listed)")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="where report.md and the PNGs go")
    parser.add_argument("--val-loss-tol", type=float, default=0.10, help="allowed relative val-loss excess (default 0.10)")
    parser.add_argument("--cos-sim-min", type=float, default=Thresholds.cos_sim_min, help="mean shadow cosine similarity floor (default %(default)s)")
    parser.add_argument("--bit-stall-max", type=float, default=Thresholds.bit_stall_max, help="mean bit-stall rate ceiling (default %(default)s)")
    parser.add_argument("--overflow-max", type=float, default=Thresholds.overflow_max, help="max overflow rate ceiling (default %(default)s)")
    parser.add_argument("--fail-on-investigate", action="store_true", help="exit 1 if any run is INVESTIGATE")
    args = parser.parse_args(argv)

    try:
        paths = [Path(p) for p in args.runs]
        baseline_path = Path(args.baseline)
        if baseline_path.resolve() not in [p.resolve() for p in paths]:
            paths.insert(0, baseline_path)
        runs = [load_run(p) for p in paths]
    except (ValueError, OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    _unique_names(runs)
    baseline = next(r for r, p in zip(runs, paths) if p.resolve() == baseline_path.resolve())
    th = Thresholds(args.val_loss_tol, args.cos_sim_min, args.bit_stall_max, args.overflow_max)
    report, rows = write_report(runs, baseline, Path(args.out), th)
    for row in rows:
        print(f"{row['name']}: {row['verdict']}" + (f" ({'; '.join(row['reasons'])})" if row["reasons"] else ""))
    print(f"wrote {report}")
    if args.fail_on_investigate and any(row["verdict"] != "PASS" for row in rows):
        return 1
    return 0


def _unique_names(runs: list[Run]) -> None:
    """Disambiguate runs with the same folder name (e.g. a/seed1, b/seed1) by their parent folder."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.path.name}"


if __name__ == "__main__":
    sys.exit(main())
