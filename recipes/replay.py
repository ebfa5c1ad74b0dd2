"""Replay the step an anomaly checkpoint recorded, find the quantized tensors that broke it, and write a
recipe (and a resume config) that keeps them in high precision.

Usage::

    python recipes/replay.py RUN_DIR/anomalies/step-N-rule [--out DIR] [--rank-all] [--no-search]
    python recipes/replay.py RUN_DIR/checkpoint-N --batch BATCH.pt      # any checkpoint plus a batch

The checkpoint is only read. ``DIR`` (default ``RUN_DIR/replays/<checkpoint name>``) receives
``replay.json`` (every replay's numbers), ``culprits.yaml`` (the recipe with the culprits in high
precision) and ``resume.yaml`` (the run's experiment config with that recipe, resuming from the last
regular checkpoint before the anomaly into ``DIR/resumed``)::

    python recipes/train.py --config DIR/resume.yaml

Errors (a folder that is not a checkpoint, files of another model or recipe) are one ``error: ...``
line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

EXIT_INPUT_ERROR = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipes/replay.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an anomaly checkpoint (RUN/anomalies/step-N-rule) or a RUN/checkpoint-N folder")
    parser.add_argument("--batch", default=None, metavar="FILE.pt",
                        help="replay this batch (a torch.save'd dict with input_ids, labels) on a regular checkpoint")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the report goes (default RUN/replays/<name>)")
    parser.add_argument("--rank-all", action="store_true",
                        help="also replay every quantized tensor promoted alone (one replay each) for the ranking")
    parser.add_argument("--no-search", action="store_true", help="only replay the step as recorded")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from altgrad.training.replay import ReplayError

    try:
        return run(args)
    except ReplayError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR


def _same(a, b) -> bool:
    """Bitwise equality of two recorded floats (NaN equals NaN)."""
    a, b = float(a), float(b)
    return a == b or (math.isnan(a) and math.isnan(b))


def run(args) -> int:
    import torch

    from altgrad.cpu_threads import configure_cpu_threads
    from altgrad.training.replay import ReplayCheckpoint, find_culprits, promote, replay_step

    configure_cpu_threads(None, 1)
    ckpt = ReplayCheckpoint.load(args.checkpoint, batch=args.batch)
    out = os.path.abspath(args.out or os.path.join(ckpt.run_dir or ".", "replays", ckpt.name))
    if _inside(out, os.path.abspath(ckpt.folder)):
        from altgrad.training.replay import ReplayError

        raise ReplayError(f"--out {out} is inside the checkpoint {ckpt.folder}; replay never writes into a checkpoint")
    world = len(ckpt.ranks)
    what = f"anomaly {ckpt.alert['rule']}" if ckpt.alert else "checkpoint + batch"
    print(f"replaying step {ckpt.step} from {ckpt.folder} ({what}, recipe {ckpt.recipe.name}, "
          f"{world} process{'es' if world > 1 else ''}, {sum(len(r.micro_batches) for r in ckpt.ranks)} micro-batch(es))")
    if ckpt.state == "after_step":
        print("note: this anomaly was saved at a log, after the step's update: the replay re-runs its batch on the "
              "updated weights, so its numbers are not the recorded ones")
    t0 = time.perf_counter()
    first = replay_step(ckpt)
    reproduced = _compare(ckpt, first)
    if args.no_search:
        report = None
    else:
        print(f"searching the culprits among the quantized tensors (ddmin over (layer, role) promotions; "
              f"healthy = finite and {ckpt.monitoring.cos_sim_metric} >= {ckpt.monitoring.cos_sim_floor})")
        report = find_culprits(ckpt, rank_all=args.rank_all, progress=print)
    elapsed = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    record = {"checkpoint": os.path.abspath(ckpt.folder), "step": ckpt.step, "state": ckpt.state,
              "recipe": ckpt.recipe.to_dict(), "recorded": ckpt.recorded, "replayed": first.to_dict(),
              "reproduced": reproduced, "seconds": elapsed}
    if report is None:
        _write_json(out, record)
        return 0
    record.update(verdict=report.verdict, replays=report.replays, candidates=report.candidates,
                  culprits=report.culprits, ranking=[{"tensor": c, **r.to_dict()} for c, r in report.ranking],
                  without={c: r.to_dict() for c, r in report.without.items()})
    if report.verdict == "healthy":
        print(f"healthy: step {ckpt.step} replays finite with {ckpt.monitoring.cos_sim_metric} "
              f"{_fmt(report.baseline.cos_sim)} >= {ckpt.monitoring.cos_sim_floor}; no culprits "
              f"({report.replays} replay, {elapsed:.1f} s)")
        _write_json(out, record)
        return 0
    if report.verdict == "not_fixable":
        print(f"not a precision problem: with every one of the {len(report.candidates)} quantized tensors in high "
              f"precision the step is still unhealthy ({_summary(report.all_promoted)}); look at the learning rate, "
              f"the data or the weights ({report.replays} replays, {elapsed:.1f} s)")
        _write_json(out, record)
        return 0
    print(f"\nculprits: {len(report.culprits)} of {len(report.candidates)} quantized tensors, found in "
          f"{report.replays} replays ({elapsed:.1f} s); promoting them gives: {_summary(report.fixed)}")
    _table(report)
    recipe = promote(ckpt.recipe, report.culprits, name=f"{ckpt.recipe.name}+hp{len(report.culprits)}")
    paths = _write_outputs(out, ckpt, recipe, record)
    for p in paths:
        print(f"wrote {p}")
    if "resume" in record:
        print(f"continue: python recipes/train.py --config {paths[-1]}")
    return 0


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _summary(r) -> str:
    from altgrad.training.replay import _summary as summary

    return summary(r)


def _compare(ckpt, result) -> dict | None:
    """Replayed vs recorded numbers, printed; None when nothing was recorded to compare with."""
    print(f"replayed: {_summary(result)}" + (f" | non-finite gradients in {len(result.nonfinite)} tensors"
                                             if result.nonfinite else ""))
    recorded = ckpt.recorded or {}
    if ckpt.state != "before_step" or "loss" not in recorded:
        return None
    same_loss = _same(recorded["loss"], result.loss)
    same_tensors = list(recorded.get("nonfinite_layers") or []) == list(result.nonfinite)
    print(f"recorded: loss {recorded['loss']:.6g} | non-finite gradients in "
          f"{len(recorded.get('nonfinite_layers') or [])} tensors")
    if same_loss and same_tensors:
        print(f"reproduced bit for bit: loss {float(result.loss).hex()} and the same "
              f"{len(result.nonfinite)} non-finite tensors")
    else:
        print(f"NOT reproduced: loss recorded {float(recorded['loss']).hex()} vs replayed {float(result.loss).hex()}, "
              f"non-finite tensors {'equal' if same_tensors else 'differ'}")
    return {"loss": same_loss, "nonfinite_layers": same_tensors}


def _table(report) -> None:
    rows = [("rank", "tensor promoted alone", "loss", "grad norm", "cos sim", "healthy alone", "healthy without it")]
    for i, (tensor, r) in enumerate(report.ranking, 1):
        without = report.without.get(tensor)
        rows.append((str(i), tensor, f"{r.loss:.5f}", f"{r.grad_norm:.4g}", _fmt(r.cos_sim), "yes" if r.healthy else "no",
                     "-" if tensor not in report.culprits else ("n/a" if without is None else
                                                                ("yes" if without.healthy else "no"))))
    b = report.baseline
    rows.append(("", "(none: as recorded)", f"{b.loss:.5f}", f"{b.grad_norm:.4g}", _fmt(b.cos_sim),
                 "yes" if b.healthy else "no", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _write_json(out: str, record: dict) -> str:
    path = os.path.join(out, "replay.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=_json_default)
    return path


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _write_outputs(out: str, ckpt, recipe, record: dict) -> list[str]:
    import yaml

    recipe_data = recipe.to_dict()
    recipe_data.pop("description", None)
    recipe_path = os.path.join(out, "culprits.yaml")
    with open(recipe_path, "w") as f:
        f.write(f"# {ckpt.recipe.name} with the culprits of step {ckpt.step} ({ckpt.folder}) in high precision,\n"
                "# found by recipes/replay.py; use as quantization.recipe\n")
        yaml.safe_dump(recipe_data, f, sort_keys=False)
    paths = [recipe_path]
    config_path = os.path.join(ckpt.run_dir or "", "experiment_config.yaml")
    if ckpt.run_dir and os.path.isfile(config_path):
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
        resume_from = _checkpoint_before(ckpt.run_dir, ckpt.step)
        config.setdefault("quantization", {})["recipe"] = recipe_data
        training = config.setdefault("training", {})
        training["resume_from_checkpoint"] = resume_from
        training["output_dir"] = os.path.join(out, "resumed")
        record["resume"] = {"from": resume_from, "output_dir": training["output_dir"]}
        resume_path = os.path.join(out, "resume.yaml")
        with open(resume_path, "w") as f:
            f.write(f"# {config_path} with the culprits of step {ckpt.step} in high precision, resuming from "
                    f"{resume_from or 'scratch (no checkpoint before the anomaly)'}\n"
                    f"#   python recipes/train.py --config {resume_path}\n")
            yaml.safe_dump(config, f, sort_keys=False)
        paths.append(resume_path)
    paths.insert(0, _write_json(out, record))
    return paths


def _checkpoint_before(run_dir: str, step: int) -> str | None:
    """The last regular checkpoint-<K> of the run with K < step (its state precedes the anomaly)."""
    found = []
    for entry in os.listdir(run_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", entry)
        if m and int(m.group(1)) < step and os.path.isdir(os.path.join(run_dir, entry)):
            found.append((int(m.group(1)), os.path.join(run_dir, entry)))
    return max(found)[1] if found else None


if __name__ == "__main__":
    sys.exit(main())
