"""recipes/studies: the stored-weight and optimizer-state studies end to end on a tiny GPT (20 steps a run),
through recipes/train.py, and their re-run reusing finished runs. ~40 s on 2 cores."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from test_sweep import _config

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "recipes" / "studies"


def _study(script: str, config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(STUDIES / script), "--config", str(config), "--out", str(out),
           "--plot", str(out / "plot.png"), "--jobs", "2", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_stored_weight_study_tabulates_every_method_and_reuses_finished_runs(tmp_path, shakespeare_path):
    config = _config(tmp_path / "tiny.yaml", shakespeare_path, tmp_path / "cache")
    out = tmp_path / "study"
    first = _study("stored_weights.py", config, out, "--formats", "E5M2", "--methods", "nearest,kahan")
    assert "4 runs" in first.stdout and (out / "plot.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "python recipes/studies/stored_weights.py" in summary
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["format"], r["method"]) for r in rows if r["format"] == "E5M2"] == [("E5M2", "nearest"), ("E5M2", "kahan")]
    assert all(math.isfinite(r["val_loss"]) for r in rows)
    again = _study("stored_weights.py", config, out, "--formats", "E5M2", "--methods", "nearest,kahan")
    assert again.stdout.count("reused") == 4


def test_optimizer_state_study_reports_each_moments_statistics(tmp_path, shakespeare_path):
    config = _config(tmp_path / "tiny.yaml", shakespeare_path, tmp_path / "cache")
    out = tmp_path / "study"
    _study("optimizer_states.py", config, out, "--formats", "E4M3", "--moments", "m+v")
    rows = {(r["m"], r["v"]): r for r in json.loads((out / "summary.json").read_text())}
    assert set(rows) == {("fp32", "fp32"), ("E4M3", "E4M3"), ("E4M3", "FP16")}
    e4m3 = rows[("E4M3", "E4M3")]
    assert math.isfinite(e4m3["val_loss"]) and 0 < e4m3["exp_avg/sqnr_db"] < rows[("E4M3", "FP16")]["exp_avg_sq/sqnr_db"]
