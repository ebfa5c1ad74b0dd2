"""The trainability map: which tensor role can live in which format? A grid of ordinary training runs.

Each cell of the grid is one run of ``recipes/train.py`` (the normal training path, checkpoints, alerts,
metrics.jsonl) with one tensor role -- or all of them -- in one format and everything else in float32.
The baseline (nothing quantized) runs with every seed. Cells run in parallel slots (one per GPU, or
``--jobs`` CPU processes sharing the cores), a re-run skips finished cells and resumes a killed cell from
its last checkpoint, and a diverged cell is a result (marked with the step it diverged at), not a crash.

Usage::

    python recipes/sweep.py --config recipes/configs/cpu_shakespeare_char.yaml --out runs/map \\
        [--formats E5M2,E4M3,MX:E2M1,...] [--roles weight,activation,grad_output,weight_grad,stored_weight,all] \\
        [--seeds 1337,1338] [--close 0.10] [--jobs 2] [--shadow-every 10] [section.key=value ...]

``--formats`` takes format names (delayed per-tensor scaling, as the presets use) and ``MX:<format>`` for
an OCP MX element format (1x32 blocks, E8M0 shared scales, current scaling); ``--spec NAME=YAML`` adds a
column of your own (any `TensorQuantSpec`). The first seed runs every cell; the other seeds run only for
the cells whose val loss is within ``--close`` (relative) of the baseline, where one seed could not tell
a cell from the baseline. ``key=value`` overrides go to every run (e.g. ``training.max_steps=1000``).

Output in ``--out``: ``runs/<format>/<role>/seed<S>/`` (each a complete run directory with a
``result.json`` once finished), ``map.csv`` (one row per cell), ``map.md`` (the grid, verdicts as in
``recipes/compare.py``) and the heatmaps ``map_val_loss.png``, ``map_cos_sim.png``, ``map_divergence.png``.
``--report-only`` rebuilds the tables and plots from finished cells without running anything.

``--predict`` asks whether the cheap what-if predicts this expensive map: one more run, the baseline with
every cell's recipe replayed as a what-if gradient recipe on the same steps (``quantization.whatif``, see
altgrad/training/whatif.py), scored by gradient cosine similarity to the FP32 shadow; ``whatif_vs_map.png``
and ``map.md`` set those scores against the cells' outcomes, with Spearman's rank correlation.
``--whatif RUN_DIR`` does the same from a probe run made elsewhere.

Verdicts (compare.py's conventions): PASS when val loss <= (1 + tol) x the baseline's and the mean shadow
cosine similarity > cos_sim_floor; INVESTIGATE otherwise; DIVERGED when training stopped on non-finite
steps (``monitoring.nan_patience``) or its val loss is not finite; ERROR when the run could not start.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "recipes" / "train.py"
RESULT_FILE = "result.json"
BASELINE = "baseline"
ALL_ROLES = "all"
DEFAULT_FORMATS = ("E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E6M1", "E7M0", "MX:E2M3", "MX:E3M2", "MX:E2M1")
# Delayed per-tensor scaling, as the presets in altgrad/training/recipe.py use.
DELAYED = {"scaling": "delayed", "amax_history_len": 16, "amax_algo": "max"}
MX = {"scaling": "current", "granularity": "block", "block_size": 32, "scale_format": "E8M0"}
# Keys a cell sets itself; an override of one of them would silently break the grid.
CELL_KEYS = ("quantization.recipe", "training.output_dir", "training.seed", "training.resume_from_checkpoint")


# --------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Column:
    """One format of the map: a display name and the `TensorQuantSpec` dict every role gets."""

    name: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """One run: a column's format on one role (or all roles), with one seed. ``column`` None: baseline."""

    column: Column | None
    role: str
    seed: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.column.name if self.column else BASELINE, self.role)

    def run_dir(self, out: Path) -> Path:
        if self.column is None:
            return out / "runs" / BASELINE / f"seed{self.seed}"
        return out / "runs" / _safe(self.column.name) / self.role / f"seed{self.seed}"

    def recipe(self, roles: Sequence[str]) -> dict[str, Any]:
        """The recipe dict this cell trains with (roles not named stay in float32)."""
        if self.column is None:
            return {"name": BASELINE}
        chosen = roles if self.role == ALL_ROLES else (self.role,)
        recipe: dict[str, Any] = {"name": f"{self.column.name}-{self.role}"}
        for role in chosen:
            recipe[role] = dict(self.column.spec)
        return recipe


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def parse_column(token: str) -> Column:
    """A ``--formats`` token: ``E4M3`` (delayed per-tensor scaling) or ``MX:E2M1`` (MX block format).

    Example:
        >>> parse_column("e3m4").spec["format"], parse_column("MX:E2M1").spec["scale_format"]
        ('E3M4', 'E8M0')
    """
    from altgrad.training.recipe import TensorQuantSpec

    text = token.strip()
    if not text:
        raise ValueError("empty format in --formats")
    if text.upper().startswith("MX:"):
        spec = {"format": text[3:].strip().upper(), **MX}
        name = "MX-" + spec["format"]
    else:
        spec = {"format": text.upper(), **DELAYED}
        name = spec["format"]
    TensorQuantSpec.from_dict(spec, where=f"format {token!r}")  # unknown names fail here, listed
    return Column(name, spec)


def parse_spec_option(option: str) -> Column:
    """``--spec NAME=YAML``: a column with a spec of your own.

    Example:
        >>> parse_spec_option("E5M2-cur={format: E5M2, scaling: current}").spec
        {'format': 'E5M2', 'scaling': 'current'}
    """
    from altgrad.training.recipe import TensorQuantSpec

    name, sep, text = option.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--spec {option!r} must look like NAME=YAML, e.g. 'E5M2-cur={{format: E5M2, scaling: current}}'")
    spec = yaml.safe_load(text)
    if isinstance(spec, str):
        spec = {"format": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"--spec {name}: expected a mapping or a format name, got {text!r}")
    TensorQuantSpec.from_dict(spec, where=f"--spec {name}")
    return Column(name.strip(), spec)


def parse_roles(text: str) -> list[str]:
    from altgrad.training.recipe import LAYER_ROLES

    roles = [r.strip() for r in text.split(",") if r.strip()]
    valid = list(LAYER_ROLES) + [ALL_ROLES]
    bad = [r for r in roles if r not in valid]
    if bad or not roles:
        raise ValueError(f"--roles {text!r}: unknown role(s) {bad}; accepted: {valid}")
    return roles


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} must list at least one seed, each once")
    return seeds


# --------------------------------------------------------------------------------------- one cell
@dataclass
class CellResult:
    """What a finished cell recorded (``result.json``)."""

    format: str
    role: str
    seed: int
    status: str  # ok | unstable (non-finite steps skipped) | diverged | error
    val_loss: float | None = None
    final_train_loss: float | None = None
    cos_sim_mean: float | None = None
    cos_sim_min: float | None = None
    overflow_max: float | None = None
    underflow_mean: float | None = None
    nonfinite_steps: int = 0
    first_nonfinite_step: int | None = None
    diverged_step: int | None = None
    last_step: int | None = None
    wall_s: float | None = None
    returncode: int | None = None
    message: str = ""

    @classmethod
    def load(cls, path: Path) -> "CellResult":
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def summarize_run(run_dir: Path, cell: Cell, max_steps: int, returncode: int, wall_s: float, log_tail: str) -> CellResult:
    """Read a finished run directory into a `CellResult` (what a diverged or failed run left counts too)."""
    from altgrad.monitoring import metrics as M

    fmt, role = cell.key
    result = CellResult(format=fmt, role=role, seed=cell.seed, status="ok", returncode=returncode, wall_s=round(wall_s, 1))
    rows = M.read_metrics(run_dir / M.METRICS_FILENAME) if (run_dir / M.METRICS_FILENAME).is_file() else []
    if returncode != 0 and not rows:
        result.status = "error"
        result.message = log_tail.strip().splitlines()[-1][:300] if log_tail.strip() else f"exit status {returncode}"
        return result
    series: dict[str, list[float]] = {}
    steps = []
    for row in rows:
        steps.append(int(row.get("step", 0)))
        for key in ("eval_loss", "loss", M.COS_SIM_MEAN, M.COS_SIM_MIN, M.OVERFLOW_RATE, M.UNDERFLOW_RATE):
            if key in row and isinstance(row[key], (int, float)):
                series.setdefault(key, []).append(float(row[key]))
    result.last_step = max(steps) if steps else None
    evals = series.get("eval_loss", [])
    result.val_loss = evals[-1] if evals else None
    train = _finite(series.get("loss", []))
    result.final_train_loss = train[-1] if train else None
    cos = _finite(series.get(M.COS_SIM_MEAN, []))
    result.cos_sim_mean = statistics.fmean(cos) if cos else None
    cos_min = _finite(series.get(M.COS_SIM_MIN, []))
    result.cos_sim_min = min(cos_min) if cos_min else None
    ovf = _finite(series.get(M.OVERFLOW_RATE, []))
    result.overflow_max = max(ovf) if ovf else None
    unf = _finite(series.get(M.UNDERFLOW_RATE, []))
    result.underflow_mean = statistics.fmean(unf) if unf else None

    nonfinite = _nonfinite_alert_steps(run_dir / "alerts.jsonl")
    result.nonfinite_steps = len(nonfinite)
    result.first_nonfinite_step = min(nonfinite) if nonfinite else None
    stopped_early = result.last_step is not None and result.last_step < max_steps
    val_bad = result.val_loss is None or not math.isfinite(result.val_loss)
    if returncode != 0:
        result.status = "diverged" if nonfinite else "error"
        result.message = log_tail.strip().splitlines()[-1][:300] if log_tail.strip() else f"exit status {returncode}"
    elif (stopped_early and nonfinite) or val_bad:
        result.status = "diverged"
    elif nonfinite:
        result.status = "unstable"
    if result.status == "diverged":
        result.diverged_step = _divergence_step(nonfinite, result.last_step)
    return result


def _nonfinite_alert_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    steps = set()
    for line in path.read_text().splitlines():
        try:
            alert = json.loads(line)
        except json.JSONDecodeError:
            continue
        if str(alert.get("rule", "")).startswith("nonfinite") and isinstance(alert.get("step"), int):
            steps.add(alert["step"])
    return sorted(steps)


def _divergence_step(nonfinite: list[int], last_step: int | None) -> int | None:
    """The first step of the final unbroken streak of non-finite steps (where training was lost)."""
    if not nonfinite:
        return last_step
    start = nonfinite[-1]
    for step in reversed(nonfinite[:-1]):
        if step != start - 1:
            break
        start = step
    return start


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def run_cell(cell: Cell, args: argparse.Namespace, slot: int, env_base: dict[str, str],
             run_dir: Path | None = None, extra: Sequence[str] = ()) -> CellResult:
    """Train one cell through recipes/train.py (resuming a killed one) and record its result."""
    run_dir = run_dir or cell.run_dir(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = json.dumps(cell.recipe(args.role_names))  # JSON is YAML: the override parser reads it
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--config", str(args.config), *args.overrides,
           f"quantization.recipe={recipe}", f"training.output_dir={run_dir}", f"training.seed={cell.seed}",
           "training.report_to=none", *extra]
    if args.shadow_every is not None:
        cmd.append(f"quantization.shadow_every={args.shadow_every}")
    if args.threads is not None:
        cmd.append(f"training.cpu_threads={args.threads}")
    if _latest_checkpoint(run_dir) is not None:  # a cell the last sweep was killed in
        cmd.append("training.resume_from_checkpoint=true")
    env = dict(env_base)
    if args.gpus:
        env["CUDA_VISIBLE_DEVICES"] = args.gpus[slot % len(args.gpus)]
    log_path = run_dir / "sweep.log"
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    wall = time.perf_counter() - start
    tail = log_path.read_text()[-2000:]
    result = summarize_run(run_dir, cell, args.max_steps, proc.returncode, wall, tail)
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1))
    os.replace(tmp, run_dir / RESULT_FILE)  # a finished cell is one with result.json: written whole
    return result


def load_result(cell: Cell, out: Path) -> CellResult | None:
    path = cell.run_dir(out) / RESULT_FILE
    return CellResult.load(path) if path.is_file() else None


def run_cells(cells: list[Cell], args: argparse.Namespace) -> None:
    """Run the unfinished ``cells`` in ``args.jobs`` parallel slots, printing one line per finished cell."""
    todo = [c for c in cells if load_result(c, args.out) is None]
    skipped = len(cells) - len(todo)
    if skipped:
        print(f"{skipped} of {len(cells)} runs already finished: skipped", flush=True)
    if not todo:
        return
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    lock = threading.Lock()
    done = [0]
    slots = list(range(args.jobs))
    free = threading.Semaphore(args.jobs)
    slot_lock = threading.Lock()

    def work(cell: Cell) -> CellResult:
        free.acquire()
        with slot_lock:
            slot = slots.pop(0)
        try:
            result = run_cell(cell, args, slot, env)
        finally:
            with slot_lock:
                slots.append(slot)
            free.release()
        with lock:
            done[0] += 1
            print(f"[{done[0]}/{len(todo)}] {_describe(result)}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(work, todo))


def _describe(r: CellResult) -> str:
    name = f"{r.format}/{r.role}/seed{r.seed}"
    val = f"val {r.val_loss:.4f}" if r.val_loss is not None and math.isfinite(r.val_loss) else "val n/a"
    cos = f" cos {r.cos_sim_mean:.4f}" if r.cos_sim_mean is not None else ""
    extra = f" diverged at step {r.diverged_step}" if r.status == "diverged" else ""
    if r.status == "error":
        extra = f" ERROR: {r.message}"
    elif r.status == "unstable":
        extra = f" ({r.nonfinite_steps} non-finite steps skipped)"
    wall = f" [{r.wall_s:.0f} s]" if r.wall_s is not None else ""
    return f"{name}: {r.status} {val}{cos}{extra}{wall}"


# --------------------------------------------------------------------------------------- the map
@dataclass
class MapCell:
    """A (format, role) cell over its seeds, judged against the baseline."""

    format: str
    role: str
    results: list[CellResult] = field(default_factory=list)
    baseline_val: float | None = None
    val_loss_tol: float = 0.10
    cos_sim_floor: float = 0.9

    def _vals(self) -> list[float]:
        return _finite([r.val_loss for r in self.results if r.status in ("ok", "unstable") and r.val_loss is not None])

    @property
    def val_loss(self) -> float | None:
        vals = self._vals()
        return statistics.fmean(vals) if vals else None

    @property
    def val_loss_std(self) -> float | None:
        vals = self._vals()
        return statistics.stdev(vals) if len(vals) > 1 else None

    @property
    def ratio(self) -> float | None:
        v = self.val_loss
        return v / self.baseline_val if v is not None and self.baseline_val else None

    @property
    def cos_sim(self) -> float | None:
        cos = _finite([r.cos_sim_mean for r in self.results if r.cos_sim_mean is not None])
        return statistics.fmean(cos) if cos else None

    @property
    def diverged(self) -> list[CellResult]:
        return [r for r in self.results if r.status == "diverged"]

    @property
    def verdict(self) -> str:
        if any(r.status == "error" for r in self.results):
            return "ERROR"
        if self.diverged:
            return "DIVERGED"
        ratio, cos = self.ratio, self.cos_sim
        if ratio is None:
            return "ERROR"
        if ratio > 1.0 + self.val_loss_tol or (cos is not None and not cos > self.cos_sim_floor):
            return "INVESTIGATE"
        return "PASS"

    def reasons(self) -> list[str]:
        out = []
        if self.diverged:
            out.append("diverged at step " + ", ".join(str(r.diverged_step) for r in self.diverged))
        if self.ratio is not None and self.ratio > 1.0 + self.val_loss_tol:
            out.append(f"val loss {self.ratio:.3f}x baseline")
        if self.cos_sim is not None and not self.cos_sim > self.cos_sim_floor:
            out.append(f"cos sim {self.cos_sim:.3f} <= {self.cos_sim_floor}")
        unstable = sum(r.nonfinite_steps for r in self.results if r.status == "unstable")
        if unstable:
            out.append(f"{unstable} non-finite steps skipped")
        return out


def build_map(columns: list[Column], roles: list[str], seeds: list[int], out: Path, args) -> tuple[list[CellResult], dict]:
    """Load every finished result: (baseline results, {(format, role): MapCell})."""
    baseline = [r for s in seeds if (r := load_result(Cell(None, BASELINE, s), out)) is not None]
    base_vals = _finite([r.val_loss for r in baseline if r.val_loss is not None])
    base_val = statistics.fmean(base_vals) if base_vals else None
    grid = {}
    for col in columns:
        for role in roles:
            mc = MapCell(col.name, role, baseline_val=base_val, val_loss_tol=args.val_loss_tol, cos_sim_floor=args.cos_sim_floor)
            for seed in seeds:
                r = load_result(Cell(col, role, seed), out)
                if r is not None:
                    mc.results.append(r)
            grid[(col.name, role)] = mc
    return baseline, grid


def is_close(mc: MapCell, tol: float) -> bool:
    """Whether a cell is near enough the baseline that one seed cannot tell them apart."""
    return mc.ratio is not None and not mc.diverged and abs(mc.ratio - 1.0) <= tol


def write_tables(columns, roles, baseline: list[CellResult], grid: dict, out: Path, args, extra_md: str = "") -> None:
    fields = ["format", "role", "seeds", "verdict", "val_loss", "val_loss_std", "val_loss_ratio", "cos_sim_mean",
              "diverged_seeds", "diverged_steps", "nonfinite_steps", "overflow_max", "underflow_mean", "reasons"]
    with open(out / "map.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for (fmt, role), mc in grid.items():
            if not mc.results:
                continue
            ovf = _finite([r.overflow_max for r in mc.results if r.overflow_max is not None])
            unf = _finite([r.underflow_mean for r in mc.results if r.underflow_mean is not None])
            w.writerow({
                "format": fmt, "role": role, "seeds": " ".join(str(r.seed) for r in mc.results),
                "verdict": mc.verdict, "val_loss": _num(mc.val_loss), "val_loss_std": _num(mc.val_loss_std),
                "val_loss_ratio": _num(mc.ratio), "cos_sim_mean": _num(mc.cos_sim),
                "diverged_seeds": len(mc.diverged), "diverged_steps": " ".join(str(r.diverged_step) for r in mc.diverged),
                "nonfinite_steps": sum(r.nonfinite_steps for r in mc.results),
                "overflow_max": _num(max(ovf) if ovf else None), "underflow_mean": _num(statistics.fmean(unf) if unf else None),
                "reasons": "; ".join(mc.reasons()),
            })
    base_vals = _finite([r.val_loss for r in baseline if r.val_loss is not None])
    lines = ["# Trainability map", ""]
    if base_vals:
        spread = f" ± {statistics.stdev(base_vals):.4f}" if len(base_vals) > 1 else ""
        lines.append(f"Baseline (float32, nothing quantized): val loss {statistics.fmean(base_vals):.4f}{spread} "
                     f"over seeds {', '.join(str(r.seed) for r in baseline)}.")
    lines += ["", "Val loss / baseline (mean over seeds; `n=` seeds where more than one ran); "
              f"verdicts: PASS ≤ {1 + args.val_loss_tol:.2f}x and cos sim > {args.cos_sim_floor}, "
              "~ INVESTIGATE, ✗ DIVERGED (step).", ""]
    lines.append("| format | " + " | ".join(roles) + " |")
    lines.append("|---|" + "---|" * len(roles))
    for col in columns:
        cells = []
        for role in roles:
            mc = grid[(col.name, role)]
            cells.append(_md_cell(mc))
        lines.append(f"| {col.name} | " + " | ".join(cells) + " |")
    lines += ["", "Mean shadow gradient cosine similarity:", ""]
    lines.append("| format | " + " | ".join(roles) + " |")
    lines.append("|---|" + "---|" * len(roles))
    for col in columns:
        lines.append(f"| {col.name} | " + " | ".join(
            _num(grid[(col.name, r)].cos_sim, ".4f") or "–" for r in roles) + " |")
    if extra_md:
        lines += ["", extra_md]
    (out / "map.md").write_text("\n".join(lines) + "\n")


def _md_cell(mc: MapCell) -> str:
    if not mc.results:
        return "–"
    verdict = mc.verdict
    if verdict == "ERROR":
        return "error"
    if verdict == "DIVERGED":
        return "✗ " + ",".join(str(r.diverged_step) for r in mc.diverged)
    text = f"{mc.ratio:.3f}"
    if len(mc.results) > 1:
        text += f" (n={len(mc.results)})"
    return text + ("" if verdict == "PASS" else " ~")


def _num(value: float | None, spec: str = ".6g") -> str:
    return "" if value is None else format(value, spec)


def plot_heatmaps(columns, roles, grid: dict, out: Path, args) -> list[Path]:
    """val loss / baseline, mean shadow cosine similarity and divergence, one heatmap each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    names = [c.name for c in columns]
    shape = (len(names), len(roles))
    ratio = np.full(shape, np.nan)
    cos = np.full(shape, np.nan)
    div = np.full(shape, np.nan)
    for i, name in enumerate(names):
        for j, role in enumerate(roles):
            mc = grid[(name, role)]
            if not mc.results:
                continue
            if mc.ratio is not None:
                ratio[i, j] = mc.ratio
            if mc.cos_sim is not None:
                cos[i, j] = mc.cos_sim
            if mc.diverged:
                div[i, j] = min(r.diverged_step or 0 for r in mc.diverged)
    paths = []

    def draw(data, title, filename, cmap, norm=None, fmt="{:.3f}", mark_diverged=True, vmin=None, vmax=None, label="",
             colorbar=True):
        fig, ax = plt.subplots(figsize=(1.3 * len(roles) + 2.5, 0.45 * len(names) + 1.8))
        masked = np.ma.masked_invalid(data)
        im = ax.imshow(masked, cmap=cmap, norm=norm, vmin=None if norm else vmin, vmax=None if norm else vmax, aspect="auto")
        ax.set_xticks(range(len(roles)), roles, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(roles)):
                mc = grid[(names[i], roles[j])]
                if not mc.results:
                    text = ""
                elif mark_diverged and mc.diverged:
                    text = "✗" + (f"{int(div[i, j])}" if not np.isnan(div[i, j]) else "")
                elif np.isnan(data[i, j]):
                    text = "–"
                else:
                    text = fmt.format(data[i, j])
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        bar = fig.colorbar(im, ax=ax, label=label) if colorbar else None
        if bar is not None and norm is not None:  # a log scale's own labels read "1.2 x 10^0"; ratios read better plain
            from matplotlib.ticker import FormatStrFormatter, NullFormatter

            bar.set_ticks(np.geomspace(norm.vmin, norm.vmax, 6))
            bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3f"))
            bar.ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    finite_ratio = ratio[np.isfinite(ratio)]
    hi = max(float(finite_ratio.max()) if finite_ratio.size else 2.0, 1.0 + args.val_loss_tol * 2)
    draw(ratio, "val loss / float32 baseline (✗ diverged at step)", "map_val_loss.png", "RdYlGn_r",
         norm=LogNorm(vmin=min(0.98, float(finite_ratio.min()) if finite_ratio.size else 0.98), vmax=hi),
         label="val loss ratio")
    draw(cos, "mean shadow gradient cosine similarity", "map_cos_sim.png", "RdYlGn", vmin=min(0.5, np.nanmin(cos) if np.isfinite(cos).any() else 0.5),
         vmax=1.0, fmt="{:.3f}", label="cos sim")
    any_diverged = bool(np.isfinite(div).any())
    draw(div, "divergence: first step of the final non-finite streak" if any_diverged else
         "divergence: no cell diverged (every run reached its last step)", "map_divergence.png", "magma",
         fmt="{:.0f}", mark_diverged=True, label="step", colorbar=any_diverged)
    return paths


# --------------------------------------------------------------------------------------- what-if vs map
def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN with fewer than 3 pairs.

    Written out here because it is a few lines and scipy is not otherwise a dependency.

    Example:
        >>> round(rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]), 6), round(rank_correlation([1, 2, 3], [9, 5, 1]), 6)
        (1.0, -1.0)
        >>> round(rank_correlation([0.1, 0.2, 0.3], [1.0, 1.1, float("inf")]), 6)   # diverged ranks worst
        1.0
        >>> round(rank_correlation([1, 2, 2, 3], [1, 3, 2, 4]), 4)
        0.9487
    """
    if len(x) != len(y):
        raise ValueError("rank_correlation needs two sequences of the same length")
    if len(x) < 3:
        return float("nan")

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx and vy else float("nan")


# --------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="recipes/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="the experiment every cell runs")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="sweep directory (re-runs resume here)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated: format names (delayed per-tensor scaling) and MX:<format> (1x32 blocks, E8M0 scales)")
    p.add_argument("--spec", action="append", default=[], metavar="NAME=YAML", help="an extra column with a spec of your own")
    p.add_argument("--roles", default="weight,activation,grad_output,weight_grad,stored_weight,all",
                   help="comma-separated roles; 'all' puts every role in the format")
    p.add_argument("--seeds", default="1337,1338", help="first seed: every cell; the others: baseline and close cells")
    p.add_argument("--close", type=float, default=0.10,
                   help="a cell within this relative val-loss distance of the baseline gets the extra seeds")
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (default: one per GPU, else cores // 1 thread each, at most 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores // jobs)")
    p.add_argument("--shadow-every", type=int, default=10, help="FP32 shadow comparison every N steps (0: none)")
    p.add_argument("--val-loss-tol", type=float, default=0.10, help="PASS: val loss <= (1 + tol) x baseline")
    p.add_argument("--cos-sim-floor", type=float, default=None, help="PASS: mean cos sim above this (default: the alert floor)")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and plots from finished cells; run nothing")
    p.add_argument("--whatif", type=Path, default=None, metavar="RUN_DIR",
                   help="a run whose what-if gradients (quantization.whatif) replayed this map's cells, set against the map")
    p.add_argument("--predict", action="store_true",
                   help="run that probe: the baseline replaying every cell as a what-if gradient recipe, then --whatif it")
    p.add_argument("--predict-every", type=int, default=None, help="what-if steps of the probe (default: max_steps // 8)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for every run")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[list[Column], list[str], list[int]]:
    """Validate everything before the first run starts (ValueError: one line)."""
    from altgrad.config import load_config
    from altgrad.monitoring import metrics as M
    from altgrad.training.recipe import LAYER_ROLES

    for item in args.overrides:
        key = item.partition("=")[0].strip()
        if key in CELL_KEYS:
            raise ValueError(f"override {key!r} is set by the sweep for each cell; accepted overrides: any other key")
    cfg = load_config(args.config, args.overrides)  # the experiment itself must be valid
    args.max_steps = cfg.training.max_steps
    args.experiment = _experiment_identity(cfg, args)
    columns = [parse_column(t) for t in args.formats.split(",") if t.strip()] + [parse_spec_option(s) for s in args.spec]
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"column names must be unique, got {names}")
    roles = parse_roles(args.roles)
    args.role_names = list(LAYER_ROLES)  # "all": every role of a layer (optimizer states are not a layer role)
    seeds = parse_seeds(args.seeds)
    if args.cos_sim_floor is None:
        args.cos_sim_floor = M.DEFAULT_THRESHOLDS["cos_sim_floor"]
    gpus = []
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" or _cuda_count():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g for g in visible.split(",") if g] if visible else [str(i) for i in range(_cuda_count())]
    args.gpus = gpus if not cfg.training.use_cpu else []
    cores = os.cpu_count() or 1
    if args.jobs is None:
        args.jobs = len(args.gpus) if args.gpus else max(1, min(2, cores))
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads is None and not args.gpus:
        args.threads = max(1, cores // args.jobs)
    return columns, roles, seeds


def _experiment_identity(cfg, args) -> dict[str, Any]:
    """What every cell of one sweep shares: the resolved experiment minus what a cell sets itself."""
    resolved = json.loads(json.dumps(cfg.to_dict(), default=str))
    resolved.setdefault("quantization", {})["shadow_every"] = args.shadow_every
    return _comparable(resolved)


# Per-cell settings and bookkeeping that do not make two sweeps different experiments.
_CELL_SETTINGS = {"quantization": ("recipe", "whatif"),
                  "training": ("output_dir", "seed", "resume_from_checkpoint", "report_to", "cpu_threads", "run_name",
                               "tags")}


def _comparable(experiment: dict[str, Any]) -> dict[str, Any]:
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in experiment.items()}
    for section, keys in _CELL_SETTINGS.items():
        for key in keys:
            if isinstance(out.get(section), dict):
                out[section].pop(key, None)
    return out


MANIFEST = "sweep.json"


def check_manifest(out: Path, experiment: dict[str, Any]) -> None:
    """A sweep directory holds one experiment: refuse to mix cells of another into it (nothing is overwritten)."""
    path = out / MANIFEST
    if path.is_file():
        saved = _comparable(json.loads(path.read_text()))
        if saved != experiment:
            diff = sorted(_diff_keys(saved, experiment))
            raise ValueError(f"{out} holds a sweep of a different experiment (differs in {', '.join(diff[:6])}); "
                             "use another --out, or the same config and overrides")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(experiment, indent=1, sort_keys=True))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in set(a) | set(b):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA: a CPU sweep
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        columns, roles, seeds = prepare(args)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if not args.report_only:
        try:
            check_manifest(args.out, args.experiment)
        except ValueError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    primary, extra = seeds[0], seeds[1:]
    cells = [Cell(None, BASELINE, s) for s in seeds] + [Cell(c, r, primary) for c in columns for r in roles]
    if not args.report_only:
        print(f"sweep: {len(columns)} formats x {len(roles)} roles + baseline, seed {primary}"
              f"{f' (+{extra} where close)' if extra else ''}, {args.jobs} parallel, {args.max_steps} steps each", flush=True)
        run_cells(cells, args)
        if extra:
            _, grid = build_map(columns, roles, [primary], args.out, args)
            close = [mc for mc in grid.values() if is_close(mc, args.close)]
            col_by_name = {c.name: c for c in columns}
            more = [Cell(col_by_name[mc.format], mc.role, s) for mc in close for s in extra]
            print(f"{len(close)} cells within {args.close:.0%} of the baseline: seeds {extra} for them", flush=True)
            run_cells(more, args)
    if args.predict and not args.report_only:
        args.whatif = run_probe(columns, roles, primary, args)
    elif args.predict:
        args.whatif = args.out / PROBE_DIR / f"seed{primary}"
    baseline, grid = build_map(columns, roles, seeds, args.out, args)
    extra_md = ""
    if args.whatif is not None:
        try:
            extra_md = whatif_report(args.whatif, columns, roles, grid, args.out)
        except ValueError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    write_tables(columns, roles, baseline, grid, args.out, args, extra_md)
    paths = plot_heatmaps(columns, roles, grid, args.out, args)
    counts: dict[str, int] = {}
    for mc in grid.values():
        if mc.results:
            counts[mc.verdict] = counts.get(mc.verdict, 0) + 1
    print(f"map: {', '.join(f'{v} {n}' for v, n in sorted(counts.items()))} -> {args.out / 'map.md'}, "
          f"{', '.join(p.name for p in paths)}", flush=True)
    return 0


PROBE_DIR = "whatif"
UNREPLAYABLE_ROLE = "stored_weight"  # rounded after the optimizer step: a one-step replay cannot see it


def whatif_config(columns: list[Column], roles: list[str], layer_roles: Sequence[str], every: int) -> dict[str, Any]:
    """``quantization.whatif`` for a probe run of the baseline: every cell of the map as a what-if gradient
    recipe (``<role>=<column>``, and ``all=<column>``), replayed on the same steps and scored against the
    FP32 shadow. Delayed columns are replayed with current scaling: a replica's own amax history would
    only be fed on what-if steps, ``every`` steps apart, so its scale would be stale; current scaling is
    what a fresh history gives. ``stored_weight`` is left out (of its own column and of ``all=``): the
    stored weights are rounded after the optimizer step, so no replay of one step can see them; their
    cells get no prediction.

    Example:
        >>> cfg = whatif_config([parse_column("E3M4")], ["weight", "stored_weight", "all"],
        ...                     ["weight", "activation", "stored_weight"], 100)
        >>> cfg["grad_swap_roles"], [r["name"] for r in cfg["grad_recipes"]], cfg["alternatives"][0]["scaling"]
        (['weight'], ['all=E3M4'], 'current')
        >>> sorted(cfg["grad_recipes"][0])
        ['activation', 'name', 'weight']
    """
    alternatives = []
    for col in columns:
        spec = dict(col.spec)
        if spec.get("scaling", "delayed") == "delayed":
            spec = {k: v for k, v in spec.items() if k not in ("amax_history_len", "amax_algo")}
            spec["scaling"] = "current"
        alternatives.append({"name": col.name, **spec})
    replayable = [r for r in layer_roles if r != UNREPLAYABLE_ROLE]
    cfg: dict[str, Any] = {"alternatives": alternatives, "grad_every": every,
                           "grad_swap_roles": [r for r in roles if r not in (ALL_ROLES, UNREPLAYABLE_ROLE)]}
    if ALL_ROLES in roles:
        cfg["grad_recipes"] = [{"name": f"{ALL_ROLES}={a['name']}", **{r: {k: v for k, v in a.items() if k != "name"}
                                                                       for r in replayable}} for a in alternatives]
    return cfg


def run_probe(columns, roles, seed: int, args) -> Path:
    """The baseline with every cell replayed as a what-if gradient recipe (one run; skipped once finished)."""
    run_dir = args.out / PROBE_DIR / f"seed{seed}"
    if (run_dir / RESULT_FILE).is_file():
        return run_dir
    every = args.predict_every or max(1, args.max_steps // 8)
    cfg = whatif_config(columns, roles, args.role_names, every)
    cell = Cell(None, BASELINE, seed)
    print(f"what-if probe: the baseline (seed {seed}) replaying {len(columns) * len(roles)} cell recipes every "
          f"{every} steps -> {run_dir}", flush=True)
    result = run_cell(cell, args, 0, dict(os.environ), run_dir=run_dir,
                      extra=[f"quantization.whatif={json.dumps(cfg)}"])
    print(f"what-if probe: {_describe(result)}", flush=True)
    return run_dir


def _outcome(mc: MapCell) -> float:
    """A cell's outcome as one number to rank: val loss / baseline; a diverged cell ranks worst."""
    if mc.diverged or mc.ratio is None:
        return math.inf
    return mc.ratio


def whatif_report(run_dir: Path, columns, roles, grid, out: Path) -> str:
    """Set the what-if gradient cosine of each cell, measured in one baseline run, against the cell's
    outcome in the map: a scatter plot (``whatif_vs_map.png``) and Spearman's rank correlation (Markdown)."""
    from altgrad.monitoring import metrics as M

    path = run_dir / M.METRICS_FILENAME
    if not path.is_file():
        raise ValueError(f"--whatif {run_dir}: no {M.METRICS_FILENAME} there (is it a run directory?)")
    rows = M.read_metrics(path)
    points = []  # (column, role, predicted cos, outcome)
    for col in columns:
        for role in roles:
            key = M.whatif_grad_key(f"{role}={col.name}", "grad_cos_sim/mean")
            values = _finite([r[key] for r in rows if isinstance(r.get(key), (int, float))])
            mc = grid[(col.name, role)]
            if values and mc.results:
                points.append((col.name, role, statistics.fmean(values), _outcome(mc)))
    if not points:
        raise ValueError(f"--whatif {run_dir}: no whatif_grad/<role>=<format>/grad_cos_sim/mean metrics for this map's cells")
    # Lower cosine similarity should mean a worse outcome: rank 1 - cos against the outcome.
    rho = rank_correlation([1 - p[2] for p in points], [p[3] for p in points])
    single = [p for p in points if p[1] != ALL_ROLES]
    rho_single = rank_correlation([1 - p[2] for p in single], [p[3] for p in single]) if len(single) > 1 else float("nan")
    _plot_prediction(points, rho, out / "whatif_vs_map.png")
    lines = [
        "## Does the cheap what-if predict the map?",
        "",
        f"What-if gradient cosine similarity of each cell's recipe, replayed on the steps of one baseline run "
        f"(`{run_dir}`), against the cell's outcome (val loss / baseline; diverged cells rank worst): "
        f"Spearman rho = {rho:.3f} over {len(points)} cells; {rho_single:.3f} over the {len(single)} single-role cells. "
        f"No prediction for the {UNREPLAYABLE_ROLE} column, and `all` is replayed without it: stored weights are "
        "rounded after the optimizer step, so a one-step replay cannot see them.",
        "",
        "| format | " + " | ".join(roles) + " |",
        "|---|" + "---|" * len(roles),
    ]
    by = {(p[0], p[1]): p[2] for p in points}
    for col in columns:
        lines.append(f"| {col.name} | " + " | ".join(
            f"{by[(col.name, r)]:.4f}" if (col.name, r) in by else "–" for r in roles) + " |")
    return "\n".join(lines)


def _plot_prediction(points, rho: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [p[3] for p in points if math.isfinite(p[3])]
    top = (max(finite) if finite else 1.0) * 1.15
    fig, ax = plt.subplots(figsize=(7, 5))
    roles = sorted({p[1] for p in points})
    for i, role in enumerate(roles):
        mine = [p for p in points if p[1] == role]
        xs = [max(1 - p[2], 1e-6) for p in mine]
        ys = [p[3] if math.isfinite(p[3]) else top for p in mine]
        markers = ["x" if not math.isfinite(p[3]) else "o" for p in mine]
        for x, y, m in zip(xs, ys, markers):
            ax.scatter([x], [y], marker=m, color=f"C{i}", label=role if (x, y) == (xs[0], ys[0]) else None)
    if len(finite) < len(points):  # diverged cells sit on a line above the rest
        ax.axhline(top, color="gray", linestyle=":", linewidth=1)
        ax.annotate("diverged", (0.01, top), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="gray")
    ax.set_xscale("log")  # ratios stay on a linear axis: they sit near 1
    ax.set_xlabel("1 - what-if gradient cosine similarity (one baseline run)")
    ax.set_ylabel("val loss / baseline in the map")
    ax.set_title(f"what-if vs trainability map: Spearman rho = {rho:.3f} (n = {len(points)})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
