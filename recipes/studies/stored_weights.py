"""Bit-stall of weights stored in a low-precision format, and its cures, on README's CPU model.

Every Linear in the blocks keeps its weight *stored* in the format (``stored_weight``: rounded after each
optimizer step; the GEMM operands and AdamW stay float32, so storage is the only difference from the fp32
baseline), with nearest rounding, stochastic rounding, or nearest rounding with Kahan compensation.
Each format gets a per-tensor power-of-two scale from the weights' current amax (a plain cast for the
16-bit formats, apart from range; the 8-bit ones need the scale: E3M4's smallest normal is 0.25).
Baselines: ``fp32`` (nothing quantized) and ``bf16`` (GEMM operands in BF16, as autocast).

    ALTGRAD_TINYSHAKESPEARE=/path/to/input.txt python recipes/studies/stored_weights.py \\
        [--out runs/stored_weights] [--plot docs/results/stored_weights.png] [--jobs 2] [train.py overrides ...]

Writes ``OUT/summary.md`` and ``OUT/summary.json`` (per run: final val loss, its ratio to fp32 and bf16,
mean stored-weight bit-stall over the logged steps) and one plot. Bit-stall: on logging steps, the share
of weights the optimizer moved whose stored value did not change at that step (with Kahan, an update
that only went into the compensation buffer counts as stalled for that step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import mean_of, read_run, run_study, study_parser  # noqa: E402

from altgrad.monitoring import metrics as M  # noqa: E402
from altgrad.training.recipe import QuantRecipe, get_recipe  # noqa: E402

FORMATS = ("BF16", "FP16", "E5M2", "E4M3", "E3M4")
METHODS = {  # name -> (rounding, compensation)
    "nearest": ("nearest", "none"),
    "stochastic": ("stochastic", "none"),
    "kahan": ("nearest", "kahan"),
}


def stored_recipe(fmt: str, method: str) -> QuantRecipe:
    rounding, compensation = METHODS[method]
    return QuantRecipe.from_dict({
        "name": f"stored-{fmt.lower()}-{method}",
        "stored_weight": {"format": fmt, "scaling": "current", "power_of_two": True, "rounding": rounding,
                          "compensation": compensation},
    })


def grid(formats=FORMATS, methods=tuple(METHODS)) -> dict[str, QuantRecipe]:
    runs = {"fp32": get_recipe("fp32"), "bf16": get_recipe("bf16")}
    for fmt in formats:
        for method in methods:
            recipe = stored_recipe(fmt, method)
            runs[recipe.name] = recipe
    return runs


def summarize(out: Path, runs: dict[str, QuantRecipe]) -> list[dict]:
    results = {name: read_run(out / name) for name in runs}
    base = {b: results[b]["val_loss"] for b in ("fp32", "bf16")}
    rows = []
    for name, recipe in runs.items():
        r = results[name]
        sw = recipe.stored_weight
        rows.append({
            "run": name,
            "format": sw.format if sw else name,
            "method": next((m for m, v in METHODS.items() if sw and v == (sw.rounding.value, sw.compensation.value)), "-"),
            "val_loss": r["val_loss"],
            "vs_fp32": r["val_loss"] / base["fp32"],
            "vs_bf16": r["val_loss"] / base["bf16"],
            "bit_stall": mean_of(r["metrics"], M.STORED_WEIGHT_BIT_STALL_RATE),
        })
    return rows


def write_summary(rows: list[dict], out: Path, command: str) -> str:
    lines = [
        "| stored in | method | val loss | / fp32 | / bf16 | mean stored-weight bit-stall |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        stall = "–" if row["bit_stall"] is None else f"{100 * row['bit_stall']:.1f}%"
        lines.append(f"| {row['format']} | {row['method']} | {row['val_loss']:.4f} | {row['vs_fp32']:.3f} | "
                     f"{row['vs_bf16']:.3f} | {stall} |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(f"Produced by `{command}`\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return table


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = [r for r in rows if r["method"] != "-"]
    formats = list(dict.fromkeys(r["format"] for r in stored))
    methods = list(dict.fromkeys(r["method"] for r in stored))
    by = {(r["format"], r["method"]): r for r in stored}
    fig, (ax_stall, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [f + (i - (len(methods) - 1) / 2) * width for f in range(len(formats))]
        stall = [100 * (by[(fmt, method)]["bit_stall"] or 0.0) for fmt in formats]
        loss = [by[(fmt, method)]["val_loss"] for fmt in formats]
        ax_stall.bar(xs, stall, width, label=method)
        ax_loss.bar(xs, loss, width, label=method)
    for name, style in (("fp32", "--"), ("bf16", ":")):
        base = next(r for r in rows if r["run"] == name)["val_loss"]
        ax_loss.axhline(base, color="black", linestyle=style, linewidth=1, label=f"{name} baseline ({base:.3f})")
    losses = [r["val_loss"] for r in rows]
    ax_loss.set_ylim(min(losses) - 0.05, max(losses) + 0.05)
    for ax, title in ((ax_stall, "mean stored-weight bit-stall (%)"), (ax_loss, "final val loss")):
        ax.set_xticks(range(len(formats)), formats)
        ax.set_title(title)
        ax.set_xlabel("weights stored in")
    ax_stall.legend()
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__, "stored_weights", FORMATS)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not set(methods) <= set(METHODS):
        p.error(f"--methods {a.methods!r}: accepted: {','.join(METHODS)}")
    runs = grid([f.strip() for f in a.formats.split(",") if f.strip()], methods)
    return run_study("stored_weights.py", runs, a, argv, summarize, write_summary, plot)


if __name__ == "__main__":
    sys.exit(main())
