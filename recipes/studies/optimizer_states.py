"""Adam's moments in low precision, on README's CPU model: val loss and statistics against float32 moments.

For each format (E4M3, E5M2, FP16, BF16) three runs: the first moment alone in the format (``m``), the
second alone (``v``), and both (``m+v``); plus MS-AMP's choice (m in E4M3, v in FP16) and the ``fp32``
baseline. Everything else (GEMMs, master weights) stays float32, so the moments are the only difference.
Every moment gets a per-tensor power-of-two scale from its current amax (``--granularity row`` for one
per row); rounding is nearest.

    ALTGRAD_TINYSHAKESPEARE=/path/to/input.txt python recipes/studies/optimizer_states.py \\
        [--out runs/optimizer_states] [--plot docs/results/optimizer_states.png] [--jobs 2] [train.py overrides ...]

Writes ``OUT/summary.md`` / ``OUT/summary.json`` (final val loss and its ratio to fp32; mean SQNR,
underflow and overflow of each moment over the logged steps and parameters) and one plot.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import mean_matching, read_run, run_study, study_parser  # noqa: E402

from altgrad.training.recipe import QuantRecipe, get_recipe  # noqa: E402

FORMATS = ("E4M3", "E5M2", "FP16", "BF16")
MOMENTS = {"m": ("optimizer_m",), "v": ("optimizer_v",), "m+v": ("optimizer_m", "optimizer_v")}


def _spec(fmt: str, granularity: str) -> dict:
    return {"format": fmt, "scaling": "current", "granularity": granularity, "power_of_two": True}


def grid(formats=FORMATS, granularity: str = "tensor", moments=tuple(MOMENTS)) -> dict[str, QuantRecipe]:
    runs = {"fp32": get_recipe("fp32")}
    for fmt in formats:
        for label in moments:
            roles = MOMENTS[label]
            name = f"{label.replace('+', '')}-{fmt.lower()}"
            runs[name] = QuantRecipe.from_dict({"name": name, **{r: _spec(fmt, granularity) for r in roles}})
    runs["msamp"] = QuantRecipe.from_dict({
        "name": "msamp", "optimizer_m": _spec("E4M3", granularity), "optimizer_v": _spec("FP16", granularity)})
    return runs


def summarize(out: Path, runs: dict[str, QuantRecipe]) -> list[dict]:
    results = {name: read_run(out / name) for name in runs}
    base = results["fp32"]["val_loss"]
    rows = []
    for name, recipe in runs.items():
        r = results[name]
        row = {
            "run": name,
            "m": recipe.optimizer_m.format if recipe.optimizer_m else "fp32",
            "v": recipe.optimizer_v.format if recipe.optimizer_v else "fp32",
            "val_loss": r["val_loss"],
            "vs_fp32": r["val_loss"] / base,
        }
        for key in ("exp_avg", "exp_avg_sq"):
            for stat in ("sqnr_db", "underflow_rate", "overflow_rate"):
                row[f"{key}/{stat}"] = mean_matching(r["metrics"], f"/{key}/{stat}")
        rows.append(row)
    return rows


def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def write_summary(rows: list[dict], out: Path, command: str) -> str:
    lines = [
        "| m in | v in | val loss | / fp32 | m SQNR dB | m underflow | v SQNR dB | v underflow | max(m, v) overflow |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ovf = [row[k] for k in ("exp_avg/overflow_rate", "exp_avg_sq/overflow_rate") if row[k] is not None]
        lines.append(
            f"| {row['m']} | {row['v']} | {row['val_loss']:.4f} | {row['vs_fp32']:.3f} | "
            f"{_f(row['exp_avg/sqnr_db'], '.1f')} | {_f(row['exp_avg/underflow_rate'] and 100 * row['exp_avg/underflow_rate'], '.2f')}% | "
            f"{_f(row['exp_avg_sq/sqnr_db'], '.1f')} | {_f(row['exp_avg_sq/underflow_rate'] and 100 * row['exp_avg_sq/underflow_rate'], '.2f')}% | "
            f"{_f(max(ovf) * 100 if ovf else None, '.3f')}% |"
        )
    table = "\n".join(lines)
    while "| –% |" in table:  # overlapping cells: replace until none is left
        table = table.replace("| –% |", "| – |")
    (out / "summary.md").write_text(f"Produced by `{command}`\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return table


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    fig, (ax_loss, ax_sqnr) = plt.subplots(1, 2, figsize=(12, 4))
    xs = range(len(rows))
    ax_loss.bar(xs, [r["val_loss"] for r in rows], color=["gray"] + ["C0"] * (len(rows) - 1))
    losses = [r["val_loss"] for r in rows]
    ax_loss.set_ylim(min(losses) - 0.05, max(losses) + 0.05)
    ax_loss.axhline(rows[0]["val_loss"], color="black", linestyle="--", linewidth=1, label="fp32 moments")
    ax_loss.set_title("final val loss")
    ax_loss.legend(fontsize=8)
    for offset, key, label in ((-0.2, "exp_avg", "m (exp_avg)"), (0.2, "exp_avg_sq", "v (exp_avg_sq)")):
        ax_sqnr.bar([x + offset for x in xs], [r[f"{key}/sqnr_db"] or 0.0 for r in rows], 0.4, label=label)
    ax_sqnr.set_title("mean SQNR of the stored moments (dB)")
    ax_sqnr.legend(fontsize=8)
    for ax in (ax_loss, ax_sqnr):
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "optimizer_states", FORMATS)
    p.add_argument("--granularity", default="tensor", choices=["tensor", "row"], help="one scale per tensor or per row")
    p.add_argument("--moments", default=",".join(MOMENTS),
                   help=f"comma-separated, from {','.join(MOMENTS)}: which moments each format's runs store in it")
    a = p.parse_args(argv)
    moments = [m.strip() for m in a.moments.split(",") if m.strip()]
    if not moments or any(m not in MOMENTS for m in moments):
        p.error(f"--moments {a.moments!r}: accepted values {list(MOMENTS)}")
    runs = grid([f.strip() for f in a.formats.split(",") if f.strip()], a.granularity, moments)
    return run_study("optimizer_states.py", runs, a, argv, summarize, write_summary, plot)


if __name__ == "__main__":
    sys.exit(main())
