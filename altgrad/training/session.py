"""`QuantSession`: everything altgrad adds to a training loop, behind an explicit per-step lifecycle.

A session converts the model (`quantize_model`), keeps the scaling state, runs the FP32 shadow, collects
statistics and bit-stall, decides whether a step's gradients may be applied (the non-finite verdict),
raises alerts and hands back the metrics of each logging step. It knows nothing about
`transformers.Trainer`: a plain PyTorch loop drives it (``recipes/plain_loop.py``), and `AltGradTrainer`
is a thin adapter that calls the same methods from the Trainer's public hooks.

One optimizer step::

    session.begin_step()                         # scales roll forward, statistics on for logging steps,
                                                 # the shadow copies the weights on comparison steps
    loss = session.forward_backward(batch)       # model forward/backward (+ the shadow's, same batch);
                                                 # or before_micro_batch / your backward / after_micro_batch
    if session.before_optimizer_step().ok:       # weight gradients rounded, non-finite check, shadow compared
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = session.end_step()                 # stored weights rounded, bit-stall; on logging steps the
                                                 # reduced metrics dict (alerts checked), else None

Data flow of that step: the batch goes through the QuantLinear layers (each GEMM operand rounded by its
role's quantizer with the scale frozen for the step) and, on comparison steps, through the float32
shadow with the same RNG state; after backward (and DDP's all-reduce) the weight gradients are rounded
into `weight_grad`, checked for NaN/inf and compared with the shadow's; the optimizer updates the
float32 master weights; stored weights are rounded into `stored_weight` and the updates that rounding
swallowed are counted as bit-stall. Statistics stay on the device until a logging step reads them
once, in one all-reduce.

Example:
    >>> import torch
    >>> from altgrad.modeling import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    >>> session = QuantSession(model, "fp8_hybrid", shadow_every=1, log_every=2)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> for step in range(4):
    ...     ids = torch.randint(0, 65, (4, 16))
    ...     session.begin_step()
    ...     loss = session.forward_backward({"input_ids": ids, "labels": ids})
    ...     if session.before_optimizer_step().ok:
    ...         opt.step()
    ...     opt.zero_grad(set_to_none=True)
    ...     metrics = session.end_step()
    >>> session.step, sorted(k for k in metrics if k.startswith("quantization/") and k.count("/") == 1)
    (4, ['quantization/bit_stall_rate', 'quantization/dynamic_range_used', 'quantization/overflow_rate', 'quantization/sqnr_db', 'quantization/underflow_rate'])
    >>> 0.9 < metrics["grad_cos_sim/mean"] <= 1.0
    True
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from altgrad.monitoring import Alert, AlertManager, MonitoringConfig
from altgrad.monitoring import metrics as M
from altgrad.training.quantized_linear import SQNR_CAP_DB, ModelQuantizer, quantize_model
from altgrad.training.recipe import QuantRecipe
from altgrad.training.shadow import FP32ShadowModel, get_rng_state, set_rng_state, unwrap_model
from altgrad.training.whatif import GradientWhatIf, WhatIfConfig, attach_alternatives, whatif_metrics

logger = logging.getLogger(__name__)

__all__ = ["QuantSession", "StepVerdict", "perplexity"]

# Per-tensor statistics that are logged per (layer, role); the rest only feed the pooled summaries.
_PER_TENSOR_STATS = ("overflow_rate", "underflow_rate", "sqnr_db")
_POOLED_STATS = {"overflow_rate": M.OVERFLOW_RATE, "underflow_rate": M.UNDERFLOW_RATE,
                 "dynamic_range_used": "quantization/dynamic_range_used"}


def perplexity(loss: float | None) -> float:
    """exp(loss), inf for a non-finite or overflowing loss (NaN stays NaN, None gives NaN).

    Example:
        >>> round(perplexity(1.0), 4), perplexity(float("inf")), perplexity(None)
        (2.7183, inf, nan)
    """
    if loss is None or math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


@dataclass
class StepVerdict:
    """What `QuantSession.before_optimizer_step` decided about this step's gradients.

    ``ok``: apply the update. Otherwise the gradients were dropped (``p.grad = None``; AdamW leaves such
    parameters untouched), ``loss`` and ``bad_tensors`` say what was non-finite, ``stop`` says that
    ``nan_patience`` bad steps in a row have passed, and ``anomalies`` are the alerts that asked for an
    anomaly checkpoint (the caller saves it: only it knows the optimizer and data state).
    """

    ok: bool = True
    stop: bool = False
    message: str = ""
    loss: float | None = None
    bad_tensors: list[str] = field(default_factory=list)
    anomalies: list[Alert] = field(default_factory=list)


def _mean_all_reduce(values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average `values` and sum `counts` over the processes, in one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, counts
    world = dist.get_world_size()
    both = torch.cat([values, counts])
    dist.all_reduce(both)
    return both[: values.numel()] / world, both[values.numel():]


class QuantSession:
    """Quantized training, the FP32 shadow, statistics, bit-stall, the non-finite verdict, alerts and
    metrics for one model, driven one optimizer step at a time (see the module docstring).

    Args:
        model: the model to train (converted in place: its selected `nn.Linear`s become `QuantLinear`).
        recipe: a `QuantRecipe`, a preset name or a dict; ``None`` quantizes nothing.
        shadow_every: compare gradients with the float32 shadow every this many optimizer steps (0 or
            None: no shadow, which saves a float32 copy of the model and a forward/backward).
        monitoring: a `MonitoringConfig` (or dict) for alerts and ``nan_patience``; None: defaults.
        log_every: logging steps for `end_step`, every this many optimizer steps (a caller with its own
            schedule passes ``is_log_step`` instead).
        is_log_step: ``step -> bool`` (1-based optimizer step), overriding ``log_every``.
        output_dir: where ``alerts.jsonl`` goes (None: no file).
        is_main_process: only the main process writes alert files and talks to W&B.
        optimizer: the optimizer whose moments a recipe with ``optimizer_m`` / ``optimizer_v`` rounds; or
            attach it later with :meth:`attach_optimizer` (before the first ``end_step``).
        whatif: a `WhatIfConfig` (or its dict): other formats scored on this run's tensors on logging
            steps, and other recipes replayed on this run's steps (see `altgrad.training.whatif`);
            training itself is unchanged, bit for bit.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: QuantRecipe | str | dict | None = None,
        *,
        shadow_every: int | None = 0,
        monitoring: MonitoringConfig | Mapping[str, Any] | None = None,
        log_every: int = 10,
        is_log_step: Callable[[int], bool] | None = None,
        output_dir: str | None = None,
        is_main_process: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        whatif: WhatIfConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if shadow_every is not None and (not isinstance(shadow_every, int) or shadow_every < 0):
            raise ValueError(f"shadow_every must be None or a non-negative int, got {shadow_every!r}")
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {log_every!r}")
        self.model = model
        self.recipe = QuantRecipe.from_dict(recipe)
        self.quantizer: ModelQuantizer = quantize_model(model, self.recipe)
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self.shadow_every = shadow_every or 0
        self.whatif = WhatIfConfig.from_dict(whatif)
        attach_alternatives(self.quantizer, self.whatif.alternatives)
        grad_recipes = self.whatif.grad_recipes_for(self.recipe) if self.whatif.grad_every else []
        self.whatif_grads = GradientWhatIf(model, grad_recipes) if grad_recipes else None
        # What-if gradients are scored against the shadow: a what-if step is a shadow step, with or
        # without shadow_every.
        self.shadow = FP32ShadowModel(model) if self.shadow_every or self.whatif_grads else None
        self.monitoring = (
            monitoring if isinstance(monitoring, MonitoringConfig) else MonitoringConfig.from_dict(monitoring or {})
        )
        self.alerts = AlertManager(self.monitoring, output_dir, is_main_process=is_main_process)
        self._is_log_step = is_log_step or (lambda step: step % log_every == 0)
        self.step = 0  # optimizer steps finished
        self.bad_steps = 0  # consecutive steps whose update was skipped
        self.last_batch: dict[str, torch.Tensor] | None = None  # what an anomaly checkpoint saves
        # This step's micro-batches and the RNG state before each: what a replay re-runs.
        self.step_batches: list[tuple[dict[str, torch.Tensor], Any]] = []
        self._collecting = False
        self._shadow_step = False
        self._whatif_step = False
        self._rng_before: Any = None
        self._shadow_losses: list[torch.Tensor] = []
        self._step_losses: list[torch.Tensor] = []
        self._pending: dict[str, torch.Tensor] = {}  # device metrics waiting for the next `metrics()`
        self._tokens = 0
        self._window_start: float | None = None
        self.pending_anomalies: list[Alert] = []  # threshold alerts from `end_step` asking for a checkpoint

    def attach_optimizer(self, optimizer) -> None:
        """The optimizer whose moments the recipe's optimizer-state roles round after each step (a no-op
        for recipes without them). Accepts accelerate's wrapped optimizer too."""
        self.quantizer.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ step lifecycle
    @property
    def collecting(self) -> bool:
        """Whether the current step is a logging step (statistics are being collected)."""
        return self._collecting

    @property
    def shadow_step(self) -> bool:
        """Whether the current step runs the FP32 shadow."""
        return self._shadow_step

    def begin_step(self, log: bool | None = None) -> None:
        """Start optimizer step ``self.step + 1``: last step's amax joins the scaling history, statistics
        are collected if it is a logging step (``log`` overrides), and on comparison steps the shadow
        takes the current weights."""
        step = self.step + 1
        self._collecting = self._is_log_step(step) if log is None else bool(log)
        self._whatif_step = self.whatif_grads is not None and step % self.whatif.grad_every == 0
        self._shadow_step = self.shadow is not None and (
            bool(self.shadow_every) and (step - 1) % self.shadow_every == 0 or self._whatif_step)
        self.quantizer.begin_step()
        self.quantizer.set_collect_stats(self._collecting)
        self._step_losses = []
        self.step_batches = []
        self._shadow_losses = []
        if self._shadow_step:
            device = next(unwrap_model(self.model).parameters()).device
            if next(self.shadow.model.parameters()).device != device:
                self.shadow.model.to(device)
            self.shadow.sync_from(self.model)
        if self._whatif_step:
            self.whatif_grads.sync_from(self.model)
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def before_micro_batch(self, batch: Mapping[str, Any]) -> None:
        """Call before the model's forward on a micro-batch (the shadow replays its RNG state)."""
        # Kept on device (no copy, no sync); moved to the CPU only if an anomaly checkpoint saves it.
        self.last_batch = {k: v.detach() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        # Always taken (a host-side copy of the generator state, no device sync): the shadow replays it on
        # comparison steps, and an anomaly checkpoint keeps it so the step can be replayed bit for bit.
        self._rng_before = get_rng_state(self._device)
        self.step_batches.append((self.last_batch, self._rng_before))

    def after_micro_batch(
        self,
        loss: torch.Tensor,
        batch: Mapping[str, Any],
        shadow_loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    ) -> None:
        """Call after the model's backward on a micro-batch: remembers the loss for the non-finite check
        and, on comparison steps, runs the shadow's forward/backward on the same batch.

        ``shadow_loss_fn(shadow_model, batch)`` must compute the loss exactly as the caller did for the
        model, gradient-accumulation scaling included (default: ``shadow_model(**batch).loss``). The RNG is
        rewound to where the model's forward started (same dropout masks) and restored afterwards. On
        what-if gradient steps every alternative recipe's replica replays the micro-batch the same way
        (under the autocast state of this call; the shadow runs without autocast).
        """
        self._step_losses.append(loss.detach())
        ids = batch.get("input_ids")
        if ids is not None:
            self._tokens += ids.numel()
        if not self._shadow_step:
            return
        device = self._device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if self._rng_before is not None:
                set_rng_state(device, self._rng_before)
            self._shadow_losses.append(self.shadow.accumulate(dict(batch), loss_fn=shadow_loss_fn))
        if self._whatif_step:
            self.whatif_grads.replay(dict(batch), shadow_loss_fn, self._rng_before, self.quantizer)

    def forward_backward(
        self,
        batch: Mapping[str, Any],
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
        grad_scale: float = 1.0,
    ) -> torch.Tensor:
        """One micro-batch for a plain loop: ``loss_fn(model, batch)`` (default ``model(**batch).loss``),
        backward of ``loss * grad_scale`` (``1 / accumulation_steps`` when accumulating), and the shadow's
        twin of both. Returns the detached, unscaled loss."""
        compute = loss_fn or (lambda m, b: m(**b).loss)
        self.before_micro_batch(batch)
        loss = compute(self.model, dict(batch))
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        self.after_micro_batch(loss, batch, lambda m, b: compute(m, b) * grad_scale if grad_scale != 1.0 else compute(m, b))
        return loss.detach()

    @torch.no_grad()
    def before_optimizer_step(self) -> StepVerdict:
        """Call once the step's gradients are final (after DDP's all-reduce), before the optimizer.

        Rounds weight gradients into the recipe's ``weight_grad`` format, checks loss and gradients for
        NaN/inf with one host sync (a bad step's gradients are dropped, alerted, and counted against
        ``nan_patience``), compares with the shadow on comparison steps, and on logging steps records
        per-parameter gradient norms and snapshots the weights for bit-stall.
        """
        # What-if replicas round their weight gradients with the RNG state the run's rounding has here.
        weight_grad_rng = get_rng_state(self._device) if self._whatif_step else None
        self.quantizer.quantize_weight_grads()
        named = [(n, p.grad) for n, p in unwrap_model(self.model).named_parameters() if p.grad is not None]
        # A gradient norm is non-finite iff the gradient holds a NaN/inf.
        grad_norms = torch.stack(torch._foreach_norm([g for _, g in named])) if named else None
        losses = torch.stack(self._step_losses).float() if self._step_losses else None
        parts = [t.reshape(-1) for t in (losses, grad_norms) if t is not None]
        if parts and not bool(torch.isfinite(torch.cat(parts)).all()):
            loss_finite = losses is None or bool(torch.isfinite(losses).all())
            grad_flags = torch.isfinite(grad_norms).tolist() if grad_norms is not None else []
            return self._bad_step(named, loss_finite, grad_flags)
        self.bad_steps = 0
        if self._shadow_step:
            self.shadow.all_reduce_grads()
            self._pending.update(self.shadow.compare(self.model))
        if self._whatif_step:
            self.whatif_grads.finish(weight_grad_rng)
            self._pending.update(self.whatif_grads.metrics(self.shadow, self._shadow_losses))
        if self._collecting:
            for name, g in named:
                if g.dim() < 2:
                    continue
                gf = g.float()
                self._pending[f"grad_l2/{name}"] = gf.norm()
                self._pending[f"grad_linf/{name}"] = gf.abs().amax()
                self._pending[f"grad_dead_frac/{name}"] = (gf == 0).float().mean()
            self.quantizer.snapshot_weights()
        return StepVerdict(ok=True)

    def _bad_step(self, named, loss_finite: bool, grad_flags: list[bool]) -> StepVerdict:
        step = self.step + 1
        bad = [name for (name, _), ok in zip(named, grad_flags) if not ok]
        loss = float(torch.stack(self._step_losses).float().mean()) if self._step_losses else float("nan")
        raised = []
        if not loss_finite:
            raised.append(self.alerts.alert(
                step, "nonfinite_loss", f"non-finite loss at step {step}: loss={loss}; update skipped", {"loss": loss}))
        if bad:
            raised.append(self.alerts.alert(
                step, "nonfinite_grad",
                f"non-finite grad at step {step}: {len(bad)} tensors: {', '.join(bad[:8])}; update skipped",
                {"nonfinite_layers": bad}))
        for p in unwrap_model(self.model).parameters():
            p.grad = None
        self.bad_steps += 1
        self.quantizer.set_collect_stats(False)
        self._collecting = False
        verdict = StepVerdict(
            ok=False, loss=loss, bad_tensors=bad,
            anomalies=[a for a in raised if a is not None and self.alerts.requests_anomaly_checkpoint(a)],
        )
        patience = self.monitoring.nan_patience
        if patience is not None and self.bad_steps >= patience:
            verdict.stop = True
            verdict.message = (
                f"altgrad: stopping at step {step}: {self.bad_steps} consecutive steps with non-finite "
                f"{'loss' if not loss_finite else 'gradients'} (nan_patience={patience}). Lower the learning "
                "rate, widen the format's range (scaling/margin) or keep more tensors in high precision."
            )
            logger.error(verdict.message)
        return verdict

    def after_optimizer_step(self) -> None:
        """Call right after ``optimizer.step()`` (also on skipped steps): stored weights are rounded into
        the recipe's ``stored_weight`` format, bit-stall is counted and the optimizer's moments are rounded
        into ``optimizer_m`` / ``optimizer_v``; the step is finished."""
        self.quantizer.after_optimizer_step()
        self.step += 1

    def end_step(self, loss: float | torch.Tensor | None = None, **extra: float) -> dict[str, float] | None:
        """For plain loops: `after_optimizer_step`, then, on logging steps, `metrics` (with ``loss``,
        its perplexity and ``extra``) checked against the alert rules. None on other steps."""
        collecting = self._collecting
        self.after_optimizer_step()
        if not collecting:
            return None
        logs = {}
        if loss is None and self._step_losses:
            loss = torch.stack(self._step_losses).float().mean()
        if loss is not None:
            logs[M.LOSS] = float(loss)
            logs[M.PERPLEXITY] = perplexity(logs[M.LOSS])
        logs.update(extra)
        logs.update(self.metrics())
        for alert in self.alerts.check(self.step, logs):
            if self.alerts.requests_anomaly_checkpoint(alert):
                self.pending_anomalies.append(alert)
        return logs

    def pop_anomalies(self) -> list[Alert]:
        """Alerts since the last call that asked for an anomaly checkpoint (the caller saves it)."""
        out, self.pending_anomalies = self.pending_anomalies, []
        return out

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """Everything measured since the last call, reduced across processes (means; bit-stall from
        summed counts) and read to the host in one sync: shadow comparison, per-parameter gradient
        norms, quantization statistics per tensor and pooled, bit-stall, tokens per second."""
        pending: dict[str, torch.Tensor] = dict(self._pending)
        self._pending = {}
        stats = self.quantizer.pop_stats()
        by_stat: dict[str, list[torch.Tensor]] = {}
        for key, value in stats.items():
            tensor_key, stat = key.rsplit("/", 1)
            by_stat.setdefault(stat, []).append(value)
            if stat in _PER_TENSOR_STATS:
                pending[f"quantization/{tensor_key}/{stat}"] = value
        for stat, name in _POOLED_STATS.items():
            if stat in by_stat:
                pending[name] = torch.stack(by_stat[stat]).mean()
        # Alternatives' statistics are device tensors like the rest: reduced in the same collective.
        pending.update(whatif_metrics(self.quantizer.pop_whatif_stats()))
        if "sqnr_db" in by_stat:
            # Tensors carried exactly (e.g. weights already stored in the format) sit at the cap; they say
            # nothing about noise, so the aggregate averages the others.
            sq = torch.stack(by_stat["sqnr_db"])
            noisy = sq < SQNR_CAP_DB
            pending[M.SQNR_DB] = torch.where(
                noisy.any(), (sq * noisy).sum() / noisy.sum().clamp_min(1), torch.full_like(sq[0], SQNR_CAP_DB))
        # Bit-stall crosses the reduction as counts (summed exactly over ranks); rates are formed after it.
        stall_counts = self.quantizer.bit_stall.get_counts()
        self.quantizer.bit_stall.reset()
        layers = list(stall_counts)
        device = self._device
        keys = sorted(pending)
        values = (torch.stack([pending[k].detach().float().reshape(()).to(device) for k in keys])
                  if keys else torch.zeros(0, device=device))
        counts = (torch.stack([torch.stack(stall_counts[n]).float().to(device) for n in layers]).reshape(-1)
                  if layers else torch.zeros(0, device=device))  # (stalled, updated) per layer
        values, counts = _mean_all_reduce(values, counts)
        host_values, host_counts = torch.cat([values, counts]).cpu().split([values.numel(), counts.numel()])
        out = dict(zip(keys, host_values.tolist()))  # the one host sync of a logging step
        if layers:
            pairs = host_counts.view(-1, 2).tolist()
            stalled, updated = sum(s for s, _ in pairs), sum(u for _, u in pairs)
            out[M.BIT_STALL_RATE] = stalled / updated if updated > 0 else 0.0
            if self.recipe.stored_weight is not None:
                # Every converted layer stores its weight in the format: the rate that loses updates.
                out[M.STORED_WEIGHT_BIT_STALL_RATE] = out[M.BIT_STALL_RATE]
            for name, (s, u) in zip(layers, pairs):
                out[M.BIT_STALL_LAYER_PREFIX + name] = s / u if u > 0 else 0.0
        now = time.perf_counter()
        if self._window_start is not None and now > self._window_start and self._tokens:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            out[M.TOKENS_PER_SECOND] = self._tokens * world / (now - self._window_start)
        self._tokens, self._window_start = 0, now
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The session's checkpointable state: quantizer scaling state, the bad-step streak, the step."""
        return {"quantizer": self.quantizer.state_dict(), "bad_steps": self.bad_steps, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.quantizer.load_state_dict(state["quantizer"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.step = int(state.get("step", self.step))

    @property
    def _device(self) -> torch.device:
        return next(unwrap_model(self.model).parameters()).device
