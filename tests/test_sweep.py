"""recipes/sweep.py: the trainability map as a grid of real training runs (tiny GPT, 20 steps each).

One module-scoped sweep runs the baseline and three cells through recipes/train.py (two in parallel): a
healthy E4M3 cell, and a cell whose activations go to NaN (E4M3 scaled 8x past its range, margin -3, without
saturation: E4M3 has no infinity, so its overflow is NaN) and must come out as DIVERGED with its step, not
as a crash.
~40 s on 2 cores.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "recipes" / "sweep.py"
sys.path.insert(0, str(REPO / "recipes"))
import sweep  # noqa: E402

MAX_STEPS = 20
NAN_SPEC = "NaN-E4M3={format: E4M3, scaling: current, margin: -3, saturate: false}"


def _config(path: Path, data: Path, cache: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0},
        "data": {"source": "shakespeare_char", "path": str(data), "cache_dir": str(cache), "max_eval_blocks": 64},
        "quantization": {"recipe": "fp32", "shadow_every": 1},
        "training": {"output_dir": str(path.parent / "unused"), "max_steps": MAX_STEPS, "per_device_train_batch_size": 8,
                     "learning_rate": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 5, "logging_steps": 5,
                     "eval_steps": 10, "use_cpu": True, "report_to": "none", "seed": 1337},
    }))
    return path


def _sweep(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SWEEP), "--config", str(config), "--out", str(out), "--formats", "E4M3",
           "--spec", NAN_SPEC, "--roles", "activation", "--seeds", "1", "--shadow-every", "5", "--jobs", "2",
           "--threads", "1", "monitoring.nan_patience=3", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shakespeare_path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("sweep")
    config = _config(work / "tiny.yaml", shakespeare_path, work / "cache")
    out = work / "map"
    proc = _sweep(config, out, "--predict", "--predict-every", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return config, out, proc


def test_grid_runs_every_cell_and_marks_divergence(finished):
    _, out, proc = finished
    rows = {(r["format"], r["role"]): r for r in csv.DictReader(open(out / "map.csv"))}
    assert set(rows) == {("E4M3", "activation"), ("NaN-E4M3", "activation")}
    ok, bad = rows[("E4M3", "activation")], rows[("NaN-E4M3", "activation")]
    assert ok["verdict"] == "PASS" and 0.95 < float(ok["val_loss_ratio"]) < 1.05, ok
    assert float(ok["cos_sim_mean"]) > 0.99
    assert bad["verdict"] == "DIVERGED" and bad["diverged_seeds"] == "1", bad
    result = json.loads((out / "runs" / "NaN-E4M3" / "activation" / "seed1" / sweep.RESULT_FILE).read_text())
    # nan_patience=3: three non-finite steps in a row from the start, then the run stopped.
    assert result["status"] == "diverged" and result["diverged_step"] == 1 and result["last_step"] < MAX_STEPS
    assert "✗ 1" in (out / "map.md").read_text()
    for name in ("map_val_loss.png", "map_cos_sim.png", "map_divergence.png"):
        assert (out / name).stat().st_size > 5000
    assert "diverged at step 1" in proc.stdout


def test_predict_probe_replays_the_cells_without_changing_the_baseline(finished):
    _, out, proc = finished
    probe = json.loads((out / sweep.PROBE_DIR / "seed1" / sweep.RESULT_FILE).read_text())
    base = json.loads((out / "runs" / sweep.BASELINE / "seed1" / sweep.RESULT_FILE).read_text())
    assert probe["val_loss"] == base["val_loss"]  # what-if replays leave training bit for bit as it was
    report = (out / "map.md").read_text()
    assert "Does the cheap what-if predict the map?" in report and "Spearman rho" in report
    assert (out / "whatif_vs_map.png").stat().st_size > 5000
    from altgrad.monitoring import metrics as M

    rows = M.read_metrics(out / sweep.PROBE_DIR / "seed1" / M.METRICS_FILENAME)
    cos = [r["whatif_grad/activation=E4M3/grad_cos_sim/mean"] for r in rows if "whatif_grad/activation=E4M3/grad_cos_sim/mean" in r]
    assert len(cos) == MAX_STEPS // 5 and all(0.8 < c <= 1.0 for c in cos)


def test_rerun_skips_finished_cells_and_resumes_a_killed_one(finished):
    config, out, _ = finished
    proc = _sweep(config, out)
    assert proc.returncode == 0 and "3 of 3 runs already finished: skipped" in proc.stdout, proc.stdout
    # A cell killed after its checkpoint at step 10: no result.json, a checkpoint, a half-written tail.
    cell = out / "runs" / "E4M3" / "activation" / "seed1"
    before = json.loads((cell / sweep.RESULT_FILE).read_text())
    (cell / sweep.RESULT_FILE).unlink()
    shutil.rmtree(cell / f"checkpoint-{MAX_STEPS}")
    proc = _sweep(config, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 3 runs already finished" in proc.stdout
    assert "resume_from_checkpoint=true" in (cell / "sweep.log").read_text()
    after = json.loads((cell / sweep.RESULT_FILE).read_text())
    assert after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-6)  # resumed exactly


def test_a_sweep_directory_holds_one_experiment(finished):
    config, out, _ = finished
    proc = _sweep(config, out, "training.learning_rate=1e-3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "different experiment" in proc.stderr and "training.learning_rate" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--formats", "E4M9"], "unknown format"),
    (["--roles", "weights"], "accepted: ['weight'"),
    (["--seeds", "1,1"], "each once"),
    (["--spec", "oops"], "NAME=YAML"),
    (["training.seed=3"], "set by the sweep"),
])
def test_bad_grid_is_one_line_error(tmp_path, shakespeare_path, args, message):
    config = _config(tmp_path / "tiny.yaml", shakespeare_path, tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(SWEEP), "--config", str(config), "--out", str(tmp_path / "o"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cell_recipes_put_one_role_or_all_in_the_format():
    col = sweep.parse_column("MX:E2M1")
    roles = ["weight", "activation", "grad_output", "weight_grad", "stored_weight"]
    one = sweep.Cell(col, "grad_output", 1).recipe(roles)
    assert set(one) == {"name", "grad_output"} and one["grad_output"]["block_size"] == 32
    every = sweep.Cell(col, "all", 1).recipe(roles)
    assert set(every) == {"name", *roles}
    assert sweep.Cell(None, sweep.BASELINE, 1).recipe(roles) == {"name": "baseline"}


def test_probe_config_for_the_default_grid_is_accepted_by_whatif():
    # The shipped map's grid (every default role and format): the probe's what-if config must validate,
    # with stored_weight left out of the replays (a one-step replay cannot see stored weights).
    from altgrad.training.recipe import LAYER_ROLES, get_recipe
    from altgrad.training.whatif import WhatIfConfig

    columns = [sweep.parse_column(c) for c in sweep.DEFAULT_FORMATS]
    roles = sweep.parse_roles("weight,activation,grad_output,weight_grad,stored_weight,all")
    cfg = WhatIfConfig.from_dict(sweep.whatif_config(columns, roles, LAYER_ROLES, 100))
    assert cfg.grad_swap_roles == ("weight", "activation", "grad_output", "weight_grad")
    recipes = cfg.grad_recipes_for(get_recipe("fp32"))
    assert len(recipes) == 5 * len(columns) and all(r.stored_weight is None for r in recipes)


def test_docstring_examples():
    import doctest

    assert doctest.testmod(sweep).failed == 0


def test_divergence_step_is_the_start_of_the_final_streak():
    assert sweep._divergence_step([3, 7, 8, 9], 9) == 7
    assert sweep._divergence_step([], 40) == 40
