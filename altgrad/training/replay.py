"""Replay one training step from a checkpoint and find the quantized tensors that broke it.

An anomaly checkpoint written before its step's update (a non-finite step: ``"state": "before_step"``
in ``anomaly.json``) holds the weights, optimizer, scheduler and scaling state the step started from,
and ``replay.pt`` per rank: the step's micro-batches, the RNG state before each and how the Trainer
computed the loss. :func:`replay_step` rebuilds the GPT from the checkpoint, drives a
:class:`~altgrad.training.session.QuantSession` (the checkpoint's recipe, the FP32 shadow on) through
that one step and reports loss, gradient norm, non-finite tensors and the shadow cosine similarity:
on the CPU, bit for bit what the run computed. A 2-process step is replayed in one process: each
rank's micro-batches with that rank's scaling state, then the gradients averaged as DDP does
(each divided by the world size, then summed, rank 0 last; for two ranks that is exactly gloo's sum).

:func:`find_culprits` then promotes (layer, role) tensors to high precision (a recipe ``overrides``
entry set to None) and narrows down, by delta debugging (ddmin), the smallest set whose promotion makes
the step healthy: finite loss and gradients and shadow cosine similarity at or above the alert floor.

Nothing here writes: the checkpoint is only read (`recipes/replay.py` writes its report elsewhere).

Example:
    >>> import torch
    >>> from altgrad.modeling import GPTConfig
    >>> ckpt = ReplayCheckpoint.from_parts(
    ...     GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11), "e4m3_demo",
    ...     batch={"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)},
    ...     recipe={"name": "e4m3_demo", "weight": "e4m3", "activation": "e4m3", "grad_output": "e5m2"})
    >>> result = replay_step(ckpt)
    >>> result.finite, len(candidates(ckpt.recipe, ckpt))
    (True, 12)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from altgrad.monitoring import MonitoringConfig
from altgrad.training import checkpointing as ckpt_files
from altgrad.training.recipe import LAYER_ROLES, QuantRecipe
from altgrad.training.session import QuantSession

__all__ = [
    "ReplayError",
    "RankRecord",
    "ReplayCheckpoint",
    "ReplayResult",
    "CulpritReport",
    "replay_step",
    "find_culprits",
    "candidates",
    "promote",
]


class ReplayError(ValueError):
    """A folder or batch that cannot be replayed; the message is one line naming the problem."""


@dataclass(frozen=True)
class RankRecord:
    """One rank's share of the step: micro-batches, the RNG state before each, how each loss was formed
    (``num_items_in_batch``, ``multiplier``, ``divisor``: see `AltGradTrainer._loss_spec`) and the
    rank's scaling state as the step began."""

    micro_batches: tuple[dict, ...]
    rng_states: tuple[Any, ...]
    loss_specs: tuple[dict, ...]
    quant_state: dict | None
    process_index: int = 0


@dataclass(frozen=True)
class ReplayCheckpoint:
    """Everything needed to re-run one step, read from a checkpoint folder (never written to)."""

    folder: str
    config: Any  # GPTConfig
    recipe: QuantRecipe
    state_dict: dict
    ranks: tuple[RankRecord, ...]
    step: int  # the optimizer step the replay re-runs (1-based)
    state: str  # "before_step" (anomaly, non-finite), "after_step" (anomaly raised at a log), "checkpoint"
    alert: dict | None = None
    recorded: dict = field(default_factory=dict)  # the anomaly's recorded metrics
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    run_dir: str | None = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))

    @classmethod
    def load(cls, folder: str | os.PathLike, batch: str | os.PathLike | None = None) -> "ReplayCheckpoint":
        """Read an anomaly checkpoint (its ``replay.pt`` files), or any altgrad checkpoint plus ``batch``
        (a ``torch.save``'d dict with ``input_ids`` and ``labels``). ReplayError on anything else."""
        from altgrad.modeling import GPTConfig

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ReplayError(f"{folder} is not a directory; pass an anomaly checkpoint (RUN/anomalies/step-N-rule) "
                              "or a checkpoint-N folder with --batch")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise ReplayError(f"{folder} is not a checkpoint: it has no config.json (expected an anomaly checkpoint "
                              "RUN/anomalies/step-N-rule or a RUN/checkpoint-N folder)")
        try:
            with open(config_path) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as exc:
            raise ReplayError(f"{folder}: config.json cannot be read ({exc})") from None
        if model_type != GPTConfig.model_type:
            raise ReplayError(f"{folder} holds a {model_type!r} model; replay needs altgrad's {GPTConfig.model_type!r} GPT")
        info = ckpt_files.read_run_info(folder)
        if "recipe" not in info:
            raise ReplayError(f"{folder} has no {ckpt_files.RUN_INFO_FILE}: it was not written by altgrad, so its "
                              "recipe and scaling state are unknown")
        try:
            recipe = QuantRecipe.from_dict(info["recipe"])
        except ValueError as exc:
            raise ReplayError(f"{folder}: its recipe cannot be read ({' '.join(str(exc).split())})") from None
        config = GPTConfig.from_pretrained(folder)
        state_dict = _load_weights(folder)
        run_dir = _run_dir(folder)
        anomaly = _read_json(os.path.join(folder, ckpt_files.ANOMALY_FILE))
        quant_path = os.path.join(folder, ckpt_files.QUANT_STATE_FILE)
        saved_quant = _torch_load(folder, quant_path) if os.path.isfile(quant_path) else None
        if saved_quant is not None and saved_quant.get("recipe") != recipe.to_dict():
            raise ReplayError(f"{folder}: {ckpt_files.QUANT_STATE_FILE} was saved with recipe "
                              f"{(saved_quant.get('recipe') or {}).get('name')!r}, {ckpt_files.RUN_INFO_FILE} names "
                              f"{recipe.name!r}: files from different runs")
        step = _trainer_step(folder)
        if batch is not None:
            ranks = (_record_from_batch(folder, batch, config, saved_quant),)
            state, step = "checkpoint", step + 1
        else:
            if anomaly is None:
                raise ReplayError(f"{folder} is a regular checkpoint (no {ckpt_files.ANOMALY_FILE}): pass the batch "
                                  "to replay with --batch FILE.pt (a dict with input_ids and labels)")
            world = int(anomaly.get("world_size", 1))
            files = [os.path.join(folder, ckpt_files.replay_file(r)) for r in range(world)]
            missing = [os.path.basename(p) for p in files if not os.path.isfile(p)]
            if missing:
                raise ReplayError(f"{folder} has no {', '.join(missing)} (written by altgrad since replay was added); "
                                  f"replay it with --batch {os.path.join(folder, ckpt_files.BATCH_FILE)}")
            ranks = tuple(_record_from_file(folder, p) for p in files)
            state = anomaly.get("state", "after_step")
            step = int(anomaly["alert"]["step"])
        record = cls(
            folder=folder, config=config, recipe=recipe, state_dict=state_dict, ranks=ranks, step=step, state=state,
            alert=(anomaly or {}).get("alert"), recorded=(anomaly or {}).get("metrics", {}),
            monitoring=_monitoring(run_dir), run_dir=run_dir,
        )
        _check_model(record)
        return record

    @classmethod
    def from_parts(cls, config, name: str, batch: Mapping[str, torch.Tensor], recipe: Any, seed: int = 0,
                   monitoring: MonitoringConfig | None = None) -> "ReplayCheckpoint":
        """A fresh model (``seed``) and one batch: a step to replay without a checkpoint (tests, examples)."""
        from altgrad.modeling import GPT

        torch.manual_seed(seed)
        model = GPT(config)
        spec = {"num_items_in_batch": None, "multiplier": 1, "divisor": 1, "custom_loss": False}
        rank = RankRecord((dict(batch),), ((torch.get_rng_state(), None),), (spec,), None)
        return cls(folder=name, config=config, recipe=QuantRecipe.from_dict(recipe),
                   state_dict={k: v.clone() for k, v in model.state_dict().items()}, ranks=(rank,), step=1,
                   state="checkpoint", monitoring=monitoring or MonitoringConfig())


@dataclass(frozen=True)
class ReplayResult:
    """What one replay of the step measured (on rank 0's view, after DDP's averaging)."""

    loss: float  # mean of rank 0's micro-batch losses, as the run recorded it
    grad_norm: float  # total L2 norm of the gradients the optimizer would get (inf/nan: non-finite)
    nonfinite: tuple[str, ...]  # parameters with a non-finite gradient
    cos_sim: float | None  # the monitoring's cosine metric (grad_cos_sim/min by default); None: not measured
    cos_sim_layers: dict
    healthy: bool
    promoted: tuple[str, ...] = ()

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and not self.nonfinite and math.isfinite(self.grad_norm)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "nonfinite": list(self.nonfinite), "cos_sim": self.cos_sim,
                "healthy": self.healthy, "promoted": list(self.promoted), "cos_sim_layers": self.cos_sim_layers}


def candidates(recipe: QuantRecipe, ckpt: ReplayCheckpoint) -> list[str]:
    """Every quantized ``<layer>/<role>`` of the checkpoint's model under ``recipe``, layer by layer."""
    from altgrad.modeling import GPT
    from altgrad.training.quantized_linear import quantize_model

    with torch.device("meta"):
        model = GPT(ckpt.config)
    quantizer = quantize_model(model, recipe) if not recipe.is_noop else None
    if quantizer is None:
        return []
    order = {name: i for i, (name, _) in enumerate(quantizer.layers)}
    # Optimizer-state quantizers (`<param>/exp_avg`) are not candidates: they round the moments after the
    # update, so they cannot change the replayed step.
    keys = [k for k in quantizer.all_quantizers() if k.rpartition("/")[0] in order]
    return sorted(keys, key=lambda k: (order[k.rpartition("/")[0]], LAYER_ROLES.index(k.rpartition("/")[2])))


def promote(recipe: QuantRecipe, tensors: Sequence[str], name: str | None = None) -> QuantRecipe:
    """``recipe`` with each ``<layer>/<role>`` in ``tensors`` kept in high precision (an override to None).

    Example:
        >>> promote(QuantRecipe.from_dict("e5m2"), ["transformer.h.0.mlp.c_fc/weight"]).overrides
        (('transformer.h.0.mlp.c_fc/weight', None),)
    """
    # Last match wins: a promoted key already overridden moves to the end (a mapping keeps one entry per key).
    keys = set(tensors)
    overrides = tuple(o for o in recipe.overrides if o[0] not in keys) + tuple((key, None) for key in tensors)
    data = recipe.to_dict()
    data["overrides"] = {k: None if s is None else s.to_dict() for k, s in overrides}
    data["name"] = name or recipe.name
    data.pop("description", None)
    return QuantRecipe.from_dict(data)


@contextlib.contextmanager
def _quiet_alerts():
    # Every unhealthy replay would log the run's non-finite alerts again; the report says it once.
    log = logging.getLogger("altgrad.alerts")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def replay_step(ckpt: ReplayCheckpoint, recipe: QuantRecipe | None = None) -> ReplayResult:
    """Re-run the checkpoint's step under ``recipe`` (default: the checkpoint's own) on the CPU.

    The model is rebuilt from the checkpoint's weights for every call, so calls are independent.
    """
    from altgrad.modeling import GPT

    recipe = ckpt.recipe if recipe is None else recipe
    model = GPT(ckpt.config)
    # save_pretrained leaves out lm_head.weight, tied to the token embedding.
    missing, _ = model.load_state_dict(ckpt.state_dict, strict=False)
    if set(missing) - {"lm_head.weight"}:
        raise ReplayError(f"{ckpt.folder}: the weights miss {sorted(missing)[:3]}")
    model.train()
    monitoring = MonitoringConfig.from_dict({**ckpt.monitoring.to_dict(), "nan_patience": None})
    session = QuantSession(model, recipe, shadow_every=1, monitoring=monitoring, is_log_step=lambda step: False)
    world = len(ckpt.ranks)
    model_sums: dict[str, torch.Tensor] = {}
    shadow_sums: dict[str, torch.Tensor] = {}
    rank0_losses: list[torch.Tensor] = []
    # Rank 0 last: its scaling state is the one the weight-gradient rounding of the step then uses.
    for rank in sorted(ckpt.ranks, key=lambda r: (r.process_index == 0, r.process_index)):
        if rank.quant_state is not None:
            session.quantizer.load_state_dict(rank.quant_state)
        session.step = ckpt.step - 1
        session.begin_step(log=False)
        for batch, rng, spec in zip(rank.micro_batches, rank.rng_states, rank.loss_specs):
            loss = _micro_batch(session, batch, rng, spec)
            if rank.process_index == 0:
                rank0_losses.append(loss)
        if world > 1:
            # DDP divides each rank's gradient by the world size, then all-reduces (sums) them.
            _fold(model_sums, session.model, world)
            _fold(shadow_sums, session.shadow.model, world)
    if world > 1:
        for sums, module in ((model_sums, session.model), (shadow_sums, session.shadow.model)):
            for n, p in module.named_parameters():
                p.grad = sums.get(n)
    with _quiet_alerts():
        verdict = session.before_optimizer_step()
    loss = float(torch.stack(rank0_losses).float().mean())
    if verdict.ok:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        metrics = session.metrics()
        metric = monitoring.cos_sim_metric
        cos = metrics.get(metric)
        layers = {k.removeprefix("grad_cos_sim/"): v for k, v in metrics.items()
                  if k.startswith("grad_cos_sim/") and k not in ("grad_cos_sim/min", "grad_cos_sim/mean")}
        floor = monitoring.cos_sim_floor
        healthy = floor is None or cos is None or cos >= floor
        return ReplayResult(loss, grad_norm, (), cos, layers, healthy)
    return ReplayResult(loss, float("nan"), tuple(verdict.bad_tensors), None, {}, False)


def _micro_batch(session: QuantSession, batch: dict, rng, spec: Mapping[str, Any]) -> torch.Tensor:
    if spec.get("custom_loss"):
        raise ReplayError("the run used label smoothing or a compute_loss_func, which replay does not re-apply")
    cpu, _cuda = rng
    torch.set_rng_state(cpu)
    n, multiplier, divisor = spec.get("num_items_in_batch"), spec.get("multiplier", 1), spec.get("divisor", 1)

    def compute(model, b):
        # Exactly Trainer.compute_loss: the model divides the summed loss by the step's token count,
        # then the loss is multiplied by the number of processes (token averaging across devices).
        loss = model(**b, num_items_in_batch=n).loss if n is not None else model(**b).loss
        return loss * multiplier if n is not None and multiplier != 1 else loss

    session.before_micro_batch(batch)
    loss = compute(session.model, dict(batch))
    (loss / divisor if divisor != 1 else loss).backward()
    session.after_micro_batch(loss, batch, lambda m, b: compute(m, b) / divisor if divisor != 1 else compute(m, b))
    return loss.detach()


def _fold(sums: dict[str, torch.Tensor], module: torch.nn.Module, world: int) -> None:
    for n, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad / world
            sums[n] = g if n not in sums else sums[n] + g
        p.grad = None


# ------------------------------------------------------------------------------------------- culprits
@dataclass
class CulpritReport:
    """The outcome of :func:`find_culprits`."""

    baseline: ReplayResult
    all_promoted: ReplayResult | None
    culprits: list[str]
    ranking: list[tuple[str, ReplayResult]]  # each culprit promoted alone, best first
    without: dict[str, ReplayResult]  # every culprit but this one promoted
    replays: int
    fixed: ReplayResult | None
    candidates: list[str]

    @property
    def verdict(self) -> str:
        if self.baseline.healthy:
            return "healthy"
        if not self.culprits:
            return "not_fixable"
        return "culprits"


def find_culprits(ckpt: ReplayCheckpoint, rank_all: bool = False,
                  progress: Callable[[str], None] | None = None) -> CulpritReport:
    """Replay the step; if unhealthy, ddmin over (layer, role) promotions to a 1-minimal set that heals it.

    ``rank_all`` also replays every candidate promoted alone (one replay each) for the ranking table;
    by default only the culprits are ranked.
    """
    cache: dict[frozenset, ReplayResult] = {}

    def run(tensors) -> ReplayResult:
        key = frozenset(tensors)
        if key not in cache:
            result = replay_step(ckpt, promote(ckpt.recipe, sorted(key, key=order.get)) if key else ckpt.recipe)
            cache[key] = ReplayResult(**{**result.__dict__, "promoted": tuple(sorted(key, key=order.get))})
            if progress:
                progress(_progress_line(len(cache), cache[key]))
        return cache[key]

    cands = candidates(ckpt.recipe, ckpt)
    order = {c: i for i, c in enumerate(cands)}
    baseline = run(())
    if baseline.healthy or not cands:
        return CulpritReport(baseline, None, [], [], {}, len(cache), None, cands)
    everything = run(cands)
    if not everything.healthy:
        return CulpritReport(baseline, everything, [], [], {}, len(cache), None, cands)
    culprits = _ddmin(cands, lambda subset: run(subset).healthy)
    pool = cands if rank_all else culprits
    ranking = [(c, run([c])) for c in pool]
    ranking.sort(key=lambda item: _badness(item[1]))
    without = {c: run([o for o in culprits if o != c]) for c in culprits} if len(culprits) > 1 else {}
    return CulpritReport(baseline, everything, culprits, ranking, without, len(cache), run(culprits), cands)


def _badness(r: ReplayResult) -> tuple:
    # Healthy first, then finite, then the higher cosine similarity, then the lower loss.
    return (not r.healthy, not r.finite, -(r.cos_sim if r.cos_sim is not None else -2.0),
            r.loss if math.isfinite(r.loss) else math.inf)


def _ddmin(items: list[str], heals: Callable[[list[str]], bool]) -> list[str]:
    """Zeller's ddmin: a 1-minimal subset of ``items`` (which heals) that still heals."""
    n = 2
    while len(items) >= 2:
        size = math.ceil(len(items) / n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        for chunk in chunks:
            if heals(chunk):
                items, n = chunk, 2
                break
        else:
            for i in range(len(chunks)) if len(chunks) > 2 else ():
                complement = [x for j, c in enumerate(chunks) if j != i for x in c]
                if heals(complement):
                    items, n = complement, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(2 * n, len(items))
    return items


def _progress_line(i: int, r: ReplayResult) -> str:
    what = f"promote {len(r.promoted)}" if r.promoted else "as recorded"
    return f"  replay {i:3d} ({what}): {_summary(r)}"


def _summary(r: ReplayResult) -> str:
    cos = "n/a" if r.cos_sim is None else f"{r.cos_sim:.4f}"
    state = "healthy" if r.healthy else ("non-finite" if not r.finite else "cos below floor")
    return f"loss {r.loss:.6g} | grad norm {r.grad_norm:.4g} | cos sim {cos} | {state}"


# ------------------------------------------------------------------------------------------- reading
def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{path} cannot be read ({exc})") from None


def _torch_load(folder: str, path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means the file cannot be used
        raise ReplayError(f"{folder}: {os.path.basename(path)} cannot be loaded ({type(exc).__name__})") from None


def _load_weights(folder: str) -> dict:
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise ReplayError(f"{folder} is not a checkpoint: it has no model.safetensors")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise ReplayError(f"{folder}: model.safetensors cannot be loaded ({type(exc).__name__})") from None


def _run_dir(folder: str) -> str:
    parent = os.path.dirname(os.path.normpath(folder))
    if os.path.basename(parent) == ckpt_files.ANOMALY_DIR:
        return os.path.dirname(parent)
    return parent


def _monitoring(run_dir: str | None) -> MonitoringConfig:
    """The run's alert thresholds (its experiment_config.yaml), or the defaults."""
    path = os.path.join(run_dir or "", "experiment_config.yaml")
    if not run_dir or not os.path.isfile(path):
        return MonitoringConfig()
    import yaml

    with open(path) as f:
        section = (yaml.safe_load(f) or {}).get("monitoring") or {}
    return MonitoringConfig.from_dict(section)


def _trainer_step(folder: str) -> int:
    state = _read_json(os.path.join(folder, "trainer_state.json")) or {}
    return int(state.get("global_step", 0))


def _record_from_file(folder: str, path: str) -> RankRecord:
    data = _torch_load(folder, path)
    try:
        return RankRecord(tuple(data["micro_batches"]), tuple(tuple(r) for r in data["rng_states"]),
                          tuple(data["loss_specs"]), data["quant_state"], int(data.get("process_index", 0)))
    except (KeyError, TypeError) as exc:
        raise ReplayError(f"{path} is not a replay record (missing {exc})") from None


def _record_from_batch(folder: str, batch_path, config, quant_state) -> RankRecord:
    batch_path = os.fspath(batch_path)
    if not os.path.isfile(batch_path):
        raise ReplayError(f"--batch {batch_path} does not exist")
    batch = _torch_load(os.path.dirname(batch_path) or ".", batch_path)
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise ReplayError(f"--batch {batch_path} must be a dict of tensors with input_ids (and labels)")
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    batch.setdefault("labels", batch["input_ids"])
    rng_path = os.path.join(folder, "rng_state.pth")
    rng = torch.get_rng_state()
    if os.path.isfile(rng_path):
        from transformers.trainer_pt_utils import safe_globals

        with safe_globals():
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)["cpu"]
    # What the Trainer passes for one micro-batch without accumulation: the step's target count.
    n = batch["labels"].ne(-100).sum()
    spec = {"num_items_in_batch": n, "multiplier": 1, "divisor": 1, "custom_loss": False}
    return RankRecord((batch,), ((rng, None),), (spec,), quant_state)


def _check_model(record: ReplayCheckpoint) -> None:
    """ReplayError unless the weights, batches and scaling state fit the checkpoint's model and recipe."""
    from altgrad.modeling import GPT

    with torch.device("meta"):
        model = GPT(record.config)
    expected, got = set(model.state_dict()), set(record.state_dict)
    if not got >= expected - {"lm_head.weight"}:
        missing = sorted(expected - got)
        raise ReplayError(f"{record.folder}: model.safetensors does not fit config.json (missing {missing[:3]}): "
                          "weights of another model")
    cfg = record.config
    for rank in record.ranks:
        for batch in rank.micro_batches:
            ids = batch.get("input_ids")
            if ids is None or ids.dim() != 2 or ids.shape[1] > cfg.block_size:
                raise ReplayError(f"{record.folder}: a batch of shape {None if ids is None else tuple(ids.shape)} does "
                                  f"not fit this model (input_ids must be (batch, <= {cfg.block_size}))")
            if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
                raise ReplayError(f"{record.folder}: the batch holds token ids up to {int(ids.max())}, the model's "
                                  f"vocabulary has {cfg.vocab_size}: a batch from another tokenizer")
        if rank.quant_state is not None:
            keys = set(candidates(record.recipe, record))
            saved = set(rank.quant_state.get("quantizers", {}))
            if rank.quant_state.get("recipe") != record.recipe.to_dict() or keys != saved:
                raise ReplayError(f"{record.folder}: the scaling state (rank {rank.process_index}) was saved with "
                                  f"recipe {(rank.quant_state.get('recipe') or {}).get('name')!r} for other layers, "
                                  f"not the checkpoint's {record.recipe.name!r}")
