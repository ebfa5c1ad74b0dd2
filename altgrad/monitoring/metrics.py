"""The metrics altgrad logs: their names (defined once, used by the trainer, the alerts, the console and
``recipes/compare.py``), which of them are per-tensor detail, and the run directory's ``metrics.jsonl``.

A logging step produces one flat ``{name: float}`` dict. Two kinds of names live in it:

* **summary** metrics a person watches and that the Trainer keeps in ``trainer_state.json``: ``loss``,
  ``learning_rate``, ``grad_cos_sim/mean``, ``quantization/overflow_rate``, ``val/loss`` ...
* **per-tensor** metrics, one per layer, parameter or (layer, role): ``grad_l2/<param>``,
  ``grad_cos_sim/<param>``, ``quantization/<layer>/<role>/sqnr_db``, ``quantization/bit_stall/<layer>``.
  For README's 4-layer model they are ~95% of the bytes of a logging step, so they go only to W&B and
  to ``metrics.jsonl`` (every logged dict, one JSON line each), never to the console or the Trainer's
  checkpointed ``log_history``.

Across processes every metric is the mean over ranks (`QuantSession.metrics`, one all-reduce per logging
step): gradients, and so the shadow comparison and gradient norms, are identical on every rank after DDP's
all-reduce, and the quantization rates pool equal-sized micro-batches. Bit-stall is the exception: it
crosses the reduction as summed counts (stalled, updated updates) and the rate is formed afterwards.

Example:
    >>> is_per_tensor("grad_cos_sim/transformer.h.0.attn.c_attn.weight"), is_per_tensor(COS_SIM_MEAN)
    (True, False)
    >>> is_per_tensor("quantization/transformer.h.0.mlp.c_fc/weight/sqnr_db"), is_per_tensor(OVERFLOW_RATE)
    (True, False)
    >>> is_per_tensor("whatif/E3M4/sqnr_db"), is_per_tensor("whatif/E3M4/activation/sqnr_db")
    (False, True)
    >>> is_per_tensor("whatif_grad/e3m4/grad_cos_sim/mean"), is_per_tensor("whatif_grad/e3m4/grad_snr/wte.weight")
    (False, True)
    >>> summary_metrics({"loss": 2.0, "grad_l2/lm_head.weight": 0.3, "val/loss": 2.1})
    {'loss': 2.0, 'val/loss': 2.1}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BIT_STALL_LAYER_PREFIX",
    "BIT_STALL_RATE",
    "COS_SIM_MEAN",
    "COS_SIM_MIN",
    "DEFAULT_THRESHOLDS",
    "GRAD_NORM",
    "LEARNING_RATE",
    "LOSS",
    "METRICS_FILENAME",
    "MetricsFile",
    "OVERFLOW_RATE",
    "PERPLEXITY",
    "SQNR_DB",
    "STORED_WEIGHT_BIT_STALL_RATE",
    "TOKENS_PER_SECOND",
    "UNDERFLOW_RATE",
    "VAL_LOSS",
    "VAL_PERPLEXITY",
    "WHATIF_GRAD_FP32_LOSS",
    "WHATIF_GRAD_PREFIX",
    "WHATIF_PREFIX",
    "is_per_tensor",
    "read_metrics",
    "summary_metrics",
    "whatif_grad_key",
    "whatif_key",
]

#: Every logged dict of a run, one JSON object per line, in the run directory.
METRICS_FILENAME = "metrics.jsonl"

# ---- training
LOSS = "loss"
PERPLEXITY = "perplexity"
GRAD_NORM = "grad_norm"
LEARNING_RATE = "learning_rate"
TOKENS_PER_SECOND = "tokens_per_second"
VAL_LOSS = "val/loss"
VAL_PERPLEXITY = "val/perplexity"
# ---- FP32 shadow (aggregates over parameters; per-parameter values are `grad_cos_sim/<param>`)
COS_SIM_MEAN = "grad_cos_sim/mean"
COS_SIM_MIN = "grad_cos_sim/min"
# ---- quantization (element-pooled over every quantized tensor of the step)
OVERFLOW_RATE = "quantization/overflow_rate"
UNDERFLOW_RATE = "quantization/underflow_rate"
SQNR_DB = "quantization/sqnr_db"
# Share of weight updates that left the weight's copy in the format unchanged. With float32 master
# weights that copy is only the forward operand: the update is kept and shows up later, so the rate is
# harmless by design and only logged.
BIT_STALL_RATE = "quantization/bit_stall_rate"
# The same share for weights *stored* in the format (a recipe's `stored_weight`): there a stalled
# update is lost for good, which is what the bit-stall alert and compare.py judge.
STORED_WEIGHT_BIT_STALL_RATE = "quantization/stored_weight_bit_stall_rate"
BIT_STALL_LAYER_PREFIX = "quantization/bit_stall/"

# ---- what-if (altgrad.training.whatif): other formats scored on the run's own tensors and steps.
# Statistics: whatif/<alt>/<stat> (summary), whatif/<alt>/<role>/<stat> and
# whatif/<alt>/<layer>/<role>/<stat> (detail); stats: sqnr_db, overflow_rate, underflow_rate, rel_err.
WHATIF_PREFIX = "whatif/"
# Gradients: whatif_grad/<recipe>/{loss,loss_diff} and whatif_grad/<recipe>/<shadow metric>/{mean,min}
# (summary), whatif_grad/<recipe>/<shadow metric>/<param> (detail), whatif_grad/fp32_loss (summary).
WHATIF_GRAD_PREFIX = "whatif_grad/"
WHATIF_GRAD_FP32_LOSS = "whatif_grad/fp32_loss"


def whatif_key(alternative: str, stat: str, layer: str | None = None, role: str | None = None) -> str:
    """The name of a what-if statistic: per alternative, per (alternative, role), or per tensor.

    Example:
        >>> whatif_key("E3M4", "sqnr_db"), whatif_key("E3M4", "rel_err", role="activation")
        ('whatif/E3M4/sqnr_db', 'whatif/E3M4/activation/rel_err')
        >>> whatif_key("E3M4", "overflow_rate", layer="transformer.h.0.mlp.c_fc", role="weight")
        'whatif/E3M4/transformer.h.0.mlp.c_fc/weight/overflow_rate'
    """
    parts = [alternative, *(p for p in (layer, role) if p is not None), stat]
    return WHATIF_PREFIX + "/".join(parts)


def whatif_grad_key(recipe: str, metric: str) -> str:
    """The name of a what-if gradient score: ``metric`` is a shadow-comparison key (``grad_cos_sim/mean``,
    ``grad_snr/<param>``...), ``loss`` or ``loss_diff``.

    Example:
        >>> whatif_grad_key("grad_output=E3M4", "grad_cos_sim/mean")
        'whatif_grad/grad_output=E3M4/grad_cos_sim/mean'
    """
    return f"{WHATIF_GRAD_PREFIX}{recipe}/{metric}"


#: The default alert thresholds, shared by `MonitoringConfig` and compare.py's verdicts.
DEFAULT_THRESHOLDS: Mapping[str, float] = {
    "bit_stall": 0.5,
    "overflow": 0.01,
    "underflow": 0.1,
    "cos_sim_floor": 0.9,
}

# Suffixes of the per-parameter families that are aggregates over all parameters.
_AGGREGATE_SUFFIXES = frozenset({"mean", "min", "max"})
# Families whose keys are all summaries even with a slash (`val/loss`).
_SUMMARY_FAMILIES = frozenset({"val", "eval", "train"})


def is_per_tensor(key: str) -> bool:
    """Whether `key` is one layer's / parameter's / (layer, role)'s value rather than a summary."""
    family, sep, rest = key.partition("/")
    if not sep or family in _SUMMARY_FAMILIES:
        return False
    if family == "quantization":
        # quantization/<stat> is pooled; quantization/<layer>/<role>/<stat> and bit_stall/<layer> are not.
        return "/" in rest
    if family == "whatif":
        # whatif/<alt>/<stat> is the summary; per role and per tensor are detail (8 alternatives x 5 roles
        # would flood trainer_state.json at every logging step).
        return rest.count("/") > 1
    if family == "whatif_grad":
        # whatif_grad/<recipe>/loss[_diff] and whatif_grad/<recipe>/<metric>/{mean,min} are summaries.
        parts = rest.split("/")
        return len(parts) > 2 and parts[-1] not in _AGGREGATE_SUFFIXES
    return rest not in _AGGREGATE_SUFFIXES


def summary_metrics(logs: Mapping[str, Any]) -> dict[str, Any]:
    """`logs` without its per-tensor entries (what the console and ``trainer_state.json`` keep)."""
    return {k: v for k, v in logs.items() if not is_per_tensor(k)}


def _json_value(value: Any) -> Any:
    # JSON has no NaN/inf; keep them readable (json.loads reads these back as floats).
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsFile:
    """Appends every logged dict, per-tensor metrics included, to ``<run_dir>/metrics.jsonl``.

    Framework-free: a plain training loop calls ``write(step, logs)``; the Trainer adapter is
    `MetricsFileCallback`. On resume, ``truncate_after(step)`` drops what a crashed or stopped run
    logged past the checkpoint it resumes from, so the file holds one history.

    Example:
        >>> import tempfile
        >>> f = MetricsFile(tempfile.mkdtemp())
        >>> f.write(10, {"loss": 2.5, "grad_l2/wte": 0.1}); f.write(20, {"loss": 2.1})
        >>> f.truncate_after(10); [row["step"] for row in read_metrics(f.path)]
        [10]
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / METRICS_FILENAME

    def write(self, step: int, logs: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": int(step), **{k: _json_value(v) for k, v in logs.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if int(row.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for row in kept:
                f.write(json.dumps(row, default=str) + "\n")
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a half-written last line from a killed run is skipped)."""
    return list(_iter_rows(Path(path)))


def _iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            yield {k: (float(v) if v in ("nan", "inf", "-inf") else v) for k, v in row.items()}
