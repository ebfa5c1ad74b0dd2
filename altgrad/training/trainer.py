"""`AltGradTrainer`: a `transformers.Trainer` that trains with a quantization recipe and measures, every
comparison step, how far its gradients are from an FP32 shadow's.

Everything but the recipe, the shadow and monitoring is ordinary `TrainingArguments`.

Per optimizer step (hooks around the Trainer's own loop):

1. first micro-batch of the step: turn statistics on if this step will be logged; sync the shadow;
2. each micro-batch: the Trainer's forward/backward; the shadow's forward/backward on the same batch;
3. last micro-batch (gradients are final, DDP has averaged them): round weight gradients into the
   recipe's format; check loss and gradients for non-finite values (a bad step's update is skipped);
   average the shadow's gradients across ranks and compare; per-layer gradient norms on log steps;
4. after `optimizer.step()`: round stored weights (if the recipe stores them), measure bit-stall.

Statistics stay on device and are read once per logging step, in one all-reduce across processes.

Example:
    >>> from transformers import TrainingArguments
    >>> trainer = AltGradTrainer(model, TrainingArguments("out", max_steps=10), recipe="fp8_hybrid",
    ...                          train_dataset=train_ds)                       # doctest: +SKIP
    >>> trainer.train()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from altgrad.monitoring import AlertCallback, MonitoringConfig
from altgrad.monitoring import metrics as M
from altgrad.monitoring.console import install_console
from altgrad.training.quantized_linear import SQNR_CAP_DB, ModelQuantizer, quantize_model
from altgrad.training.recipe import QuantRecipe
from altgrad.training.shadow import FP32ShadowModel

logger = logging.getLogger(__name__)

__all__ = ["AltGradTrainer", "QUANT_STATE_FILE", "perplexity"]

QUANT_STATE_FILE = "altgrad_quant_state.pt"
RUN_INFO_FILE = "altgrad_run.json"
ANOMALY_DIR = "anomalies"
_PER_TENSOR_STATS = ("overflow_rate", "underflow_rate", "sqnr_db")


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's post-`optimizer.step()` work (stored-weight rounding, bit-stall)."""

    def __init__(self, trainer: "AltGradTrainer") -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


def perplexity(loss: float | None) -> float:
    """exp(loss), inf for a non-finite or overflowing loss (NaN stays NaN, None gives NaN)."""
    if loss is None or math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _AnomalyCheckpoints(TrainerCallback):
    """After each log (where threshold alerts fire), save the anomaly checkpoints they asked for."""

    def __init__(self, trainer: "AltGradTrainer") -> None:
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        pending = self.trainer.alerts.pop_anomalies()
        if pending:
            self.trainer.save_anomaly_checkpoints(pending, logs)


class AltGradTrainer(Trainer):
    """A `transformers.Trainer` with low-precision quantization, an FP32 shadow and stability metrics.

    Args:
        model: the model to train (altgrad's GPT or any model whose selected layers are `nn.Linear`).
        args: ordinary `TrainingArguments`.
        recipe: a :class:`QuantRecipe`, preset name (``"bf16"``, ``"e5m2"``, ``"fp8_hybrid"``, ...) or dict.
            ``None`` trains unquantized.
        shadow_every: compare against the FP32 shadow every this many optimizer steps; ``None`` or 0
            disables the shadow (saves one forward/backward and one float32 copy of the model).
        monitoring: an :class:`altgrad.monitoring.MonitoringConfig` (alerts, anomaly checkpoints,
            ``nan_patience``); ``None`` uses its defaults.
        **kwargs: everything else `transformers.Trainer` accepts (datasets, callbacks, tokenizer ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        recipe: QuantRecipe | str | dict | None = None,
        shadow_every: int | None = 1,
        monitoring: Any = None,
        **kwargs,
    ) -> None:
        if model is None:
            raise ValueError("AltGradTrainer needs a model instance (model_init is not supported)")
        if shadow_every is not None and (not isinstance(shadow_every, int) or shadow_every < 0):
            raise ValueError(f"shadow_every must be None or a non-negative int, got {shadow_every!r}")
        self.recipe = QuantRecipe.from_dict(recipe)
        self.quantizer: ModelQuantizer = quantize_model(model, self.recipe)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        self._staging_root: str | None = None
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self.add_callback(_AfterOptimizerStep(self))
        # A compact line per logging step instead of the Trainer's echo of the whole metrics dict;
        # every metric still reaches W&B and <output_dir>/metrics.jsonl.
        install_console(self)
        self.shadow_every = shadow_every or 0
        self.shadow = FP32ShadowModel(self.model) if self.shadow_every else None
        if self.shadow is not None:
            self.shadow.model.to(self.args.device)
        self.monitoring = self._init_monitoring(monitoring)
        self._micro_in_window = 0
        self._collecting = False
        self._pending: dict[str, torch.Tensor] = {}  # device metrics waiting for the next log
        self._tokens_since_log = 0
        self._last_log_time: float | None = None
        self._bad_steps = 0
        self._step_losses: list[torch.Tensor] = []
        self._last_batch: dict | None = None

    # ------------------------------------------------------------------ monitoring hook points
    def _init_monitoring(self, monitoring):
        """Alerts (log, W&B, alerts.jsonl) as a callback; anomaly checkpoints are saved by the trainer."""
        config = monitoring if isinstance(monitoring, MonitoringConfig) else MonitoringConfig.from_dict(monitoring or {})
        self.alerts = AlertCallback(config, output_dir=self.args.output_dir, is_main_process=self.is_world_process_zero())
        self.add_callback(self.alerts)
        self.add_callback(_AnomalyCheckpoints(self))
        return config

    @property
    def nan_patience(self) -> int:
        return int(self.monitoring.nan_patience)

    def _raise_nonfinite_alert(self, kind: str, detail: str, metrics: dict) -> None:
        step = self.state.global_step + 1
        self.alerts.alert(step, f"nonfinite_{kind}", f"non-finite {kind} at step {step}: {detail}; update skipped", metrics)

    # ------------------------------------------------------------------ anomaly checkpoints
    def save_anomaly_checkpoints(self, reason_alerts: list, metrics: dict | None = None) -> list[str]:
        """Save a full checkpoint per pending anomaly under ``output_dir/anomalies/step-<N>-<rule>/``.

        Holds the model, optimizer, scheduler, grad scaler, RNG states, quantization state, run info,
        trainer state, the alert's metrics and the micro-batch that triggered it (``batch.pt``). Written to a temporary name and
        renamed, outside the Trainer's checkpoint rotation, keeping the last ``anomaly_keep_last``.
        """
        saved = []
        root = os.path.join(self.args.output_dir, ANOMALY_DIR)
        for alert in reason_alerts:
            name = f"step-{alert.step}-{alert.rule}"
            final = os.path.join(root, name)
            if os.path.exists(final):
                continue
            tmp = os.path.join(root, f".tmp-{name}")
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp, exist_ok=True)
            self.accelerator.wait_for_everyone()  # the folder exists before any rank writes into it
            if self.args.should_save:
                self._save(tmp)
            self._save_optimizer_and_scheduler(tmp)
            self._save_scaler(tmp)
            self._save_rng_state(tmp)
            if self.args.should_save:
                self._save_altgrad_state(tmp)
                self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
                if self._last_batch is not None:
                    torch.save({k: v.cpu() for k, v in self._last_batch.items()}, os.path.join(tmp, "batch.pt"))
                with open(os.path.join(tmp, "anomaly.json"), "w") as f:
                    json.dump({"alert": alert.to_dict(), "metrics": metrics or {}}, f, indent=2, default=str)
            self.accelerator.wait_for_everyone()  # every rank's RNG state is written before the rename
            if self.args.should_save:
                os.replace(tmp, final)
                saved.append(final)
                logger.warning("altgrad: anomaly checkpoint saved to %s", final)
        if self.args.should_save:
            self._rotate_anomalies(root)
        return saved

    def _rotate_anomalies(self, root: str) -> None:
        """Delete the oldest anomaly checkpoints beyond ``anomaly_keep_last`` (None: keep every one)."""
        keep = self.monitoring.anomaly_keep_last
        if keep is None or not os.path.isdir(root):
            return
        keep = int(keep)
        dirs = [d for d in os.listdir(root) if d.startswith("step-")]
        dirs.sort(key=lambda d: (int(d.split("-")[1]), os.path.getmtime(os.path.join(root, d))))
        for old in dirs[: max(0, len(dirs) - keep)]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)

    # ------------------------------------------------------------------ schedule
    def _will_log(self, step: int) -> bool:
        """Whether optimizer step number `step` (1-based) is a logging step."""
        args = self.args
        if args.logging_strategy != "steps" and str(args.logging_strategy) != "IntervalStrategy.STEPS":
            return False
        if step == 1 and args.logging_first_step:
            return True
        every = args.logging_steps
        if 0 < every < 1:
            every = max(1, math.ceil(self.state.max_steps * every))
        return step % int(every) == 0

    # ------------------------------------------------------------------ training loop hooks
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; also remembers it for the non-finite check and counts tokens."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training:
            self._step_losses.append(loss.detach())
            ids = inputs.get("input_ids")
            if ids is not None:
                self._tokens_since_log += ids.numel()
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        next_step = self.state.global_step + 1
        shadow_step = self.shadow is not None and (next_step - 1) % self.shadow_every == 0
        if self._micro_in_window == 0:
            self.quantizer.begin_step()
            self._collecting = self._will_log(next_step)
            self.quantizer.set_collect_stats(self._collecting)
            self._step_losses = []
            if shadow_step:
                self.shadow.sync_from(model)
            if self._last_log_time is None:
                self._last_log_time = time.perf_counter()
        # Kept on device (no copy, no sync); moved to the CPU only if an anomaly checkpoint saves it.
        self._last_batch = {k: v.detach() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        rng = _rng_state(self.args.device) if shadow_step else None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if shadow_step:
            self._shadow_micro_batch(inputs, num_items_in_batch, rng)
        self._micro_in_window += 1
        if self.accelerator.sync_gradients:
            self._micro_in_window = 0
            self._before_optimizer_step(model, shadow_step)
        return loss

    def _shadow_micro_batch(self, inputs: dict, num_items_in_batch, rng_before) -> None:
        """The shadow's forward/backward on the same micro-batch, with the Trainer's own loss.

        `Trainer.compute_loss` (the base class's, so nothing is logged twice) applies label smoothing,
        `compute_loss_func`, `num_items_in_batch` and the cross-device token averaging exactly as for the
        model; the gradient-accumulation division mirrors `Trainer.training_step`. The RNG is rewound to
        where the model's forward started (same dropout masks) and restored afterwards, so the shadow
        changes nothing in the run it watches.
        """

        def loss_fn(shadow_model, batch):
            loss = Trainer.compute_loss(self, shadow_model, dict(batch), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            if self.loss_is_scaled_for_ga is not None:
                scaled = self.loss_is_scaled_for_ga
            else:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None
                )
            return loss if scaled else loss / self.current_gradient_accumulation_steps

        device = self.args.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _set_rng_state(device, rng_before)
            self.shadow.accumulate(inputs, loss_fn=loss_fn)

    def _named_grads(self, model) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.grad) for n, p in self.accelerator.unwrap_model(model).named_parameters() if p.grad is not None]

    @torch.no_grad()
    def _before_optimizer_step(self, model, shadow_step: bool) -> None:
        self.quantizer.quantize_weight_grads()
        named = self._named_grads(model)
        # One host sync per step decides whether the update may run (the Trainer syncs on the loss
        # anyway): a gradient norm is non-finite iff the gradient holds a NaN/inf.
        grad_norms = torch.stack(torch._foreach_norm([g for _, g in named])) if named else None
        losses = torch.stack(self._step_losses).float() if self._step_losses else None
        parts = [t.reshape(-1) for t in (losses, grad_norms) if t is not None]
        if parts and not bool(torch.isfinite(torch.cat(parts)).all()):
            loss_finite = losses is None or bool(torch.isfinite(losses).all())
            grad_flags = torch.isfinite(grad_norms).tolist() if grad_norms is not None else []
            self._handle_bad_step(model, named, loss_finite, grad_flags)
            return
        self._bad_steps = 0
        if shadow_step:
            self.shadow.all_reduce_grads()
            self._pending.update(self.shadow.compare(model))
        if self._collecting:
            for name, g in named:
                if g.dim() < 2:
                    continue
                gf = g.float()
                self._pending[f"grad_l2/{name}"] = gf.norm()
                self._pending[f"grad_linf/{name}"] = gf.abs().amax()
                self._pending[f"grad_dead_frac/{name}"] = (gf == 0).float().mean()
            self.quantizer.snapshot_weights()

    def _handle_bad_step(self, model, named, loss_finite: bool, grad_flags: list) -> None:
        """Skip the update (gradients dropped: AdamW leaves params without grads untouched), alert, and
        stop after `nan_patience` consecutive bad steps."""
        bad_layers = [name for (name, _), ok in zip(named, grad_flags) if not ok]
        step_loss = float(torch.stack(self._step_losses).float().mean()) if self._step_losses else float("nan")
        if not loss_finite:
            self._raise_nonfinite_alert("loss", f"loss={step_loss}", {"loss": step_loss})
        if bad_layers:
            self._raise_nonfinite_alert(
                "grad", f"{len(bad_layers)} tensors: {', '.join(bad_layers[:8])}", {"nonfinite_layers": bad_layers}
            )
        anomalies = self.alerts.pop_anomalies()
        if anomalies:
            # Saved before the update is skipped: reloading this checkpoint and re-running batch.pt
            # reproduces the non-finite loss.
            self.save_anomaly_checkpoints(anomalies, {"loss": step_loss, "nonfinite_layers": bad_layers})
        for p in self.accelerator.unwrap_model(model).parameters():
            p.grad = None
        self._bad_steps += 1
        self.quantizer.set_collect_stats(False)
        if self._bad_steps >= self.nan_patience:
            self.control.should_training_stop = True
            message = (
                f"altgrad: stopping at step {self.state.global_step + 1}: {self._bad_steps} consecutive steps with "
                f"non-finite {'loss' if not loss_finite else 'gradients'} (nan_patience={self.nan_patience}). "
                "Lower the learning rate, widen the format's range (scaling/margin) or keep more tensors in "
                "high precision."
            )
            logger.error(message)
            self.stop_reason = message

    def _after_optimizer_step(self) -> None:
        self.quantizer.after_optimizer_step()

    # ------------------------------------------------------------------ logging
    def _collect_metrics(self) -> dict[str, float]:
        metrics: dict[str, torch.Tensor] = dict(self._pending)
        self._pending = {}
        stats = self.quantizer.pop_stats()
        if stats:
            by_stat: dict[str, list[torch.Tensor]] = {}
            for key, value in stats.items():
                tensor_key, stat = key.rsplit("/", 1)
                by_stat.setdefault(stat, []).append(value)
                if stat in _PER_TENSOR_STATS:
                    metrics[f"quantization/{tensor_key}/{stat}"] = value
            for stat in ("overflow_rate", "underflow_rate", "dynamic_range_used"):
                if stat in by_stat:
                    metrics[f"quantization/{stat}"] = torch.stack(by_stat[stat]).mean()
            if "sqnr_db" in by_stat:
                # Tensors carried exactly (e.g. weights already stored in the format) sit at the cap; they
                # say nothing about noise, so the aggregate averages the others.
                sq = torch.stack(by_stat["sqnr_db"])
                noisy = sq < SQNR_CAP_DB
                metrics["quantization/sqnr_db"] = torch.where(
                    noisy.any(), (sq * noisy).sum() / noisy.sum().clamp_min(1), torch.full_like(sq[0], SQNR_CAP_DB)
                )
        counts = self.quantizer.bit_stall.get_counts()
        if counts:
            stalled = torch.stack([s for s, _ in counts.values()])
            updated = torch.stack([u for _, u in counts.values()])
            # Summed counts reduce exactly across ranks; rates are formed after the reduction.
            metrics["quantization/_stalled"] = stalled.sum().float()
            metrics["quantization/_updated"] = updated.sum().float()
            for name, (s, u) in counts.items():
                metrics[f"quantization/_stalled/{name}"] = s.float()
                metrics[f"quantization/_updated/{name}"] = u.float()
            self.quantizer.bit_stall.reset()
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()).to(self.args.device) for k in keys])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        host = dict(zip(keys, values.cpu().tolist()))  # the one host sync of a logging step
        out: dict[str, float] = {}
        for key, value in host.items():
            if key.startswith("quantization/_"):
                continue
            out[key] = value
        if "quantization/_updated" in host:
            upd = host["quantization/_updated"]
            out[M.BIT_STALL_RATE] = host["quantization/_stalled"] / upd if upd > 0 else 0.0
            if self.recipe.stored_weight is not None:
                # Every converted layer stores its weight in the format: the rate that loses updates.
                out[M.STORED_WEIGHT_BIT_STALL_RATE] = out[M.BIT_STALL_RATE]
            for key in host:
                if key.startswith("quantization/_stalled/"):
                    name = key[len("quantization/_stalled/") :]
                    u = host[f"quantization/_updated/{name}"]
                    out[f"quantization/bit_stall/{name}"] = host[key] / u if u > 0 else 0.0
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        if "loss" in logs and "train_runtime" not in logs:
            loss = logs["loss"]
            logs[M.PERPLEXITY] = perplexity(loss)
            now = time.perf_counter()
            if self._last_log_time is not None and now > self._last_log_time:
                logs[M.TOKENS_PER_SECOND] = self._tokens_since_log * self.accelerator.num_processes / (
                    now - self._last_log_time
                )
            self._tokens_since_log, self._last_log_time = 0, now
            logs.update(self._collect_metrics())
        if "eval_loss" in logs:
            eval_loss = logs["eval_loss"]
            logs[M.VAL_LOSS] = eval_loss
            logs[M.VAL_PERPLEXITY] = perplexity(eval_loss)
        n_history = len(self.state.log_history)
        super().log(logs, start_time)
        # Callbacks (W&B, metrics.jsonl, alerts) got every metric; the history that the Trainer writes
        # into each checkpoint's trainer_state.json keeps the summaries (per-tensor metrics made it
        # ~800 KB per checkpoint for README's 0.8M-parameter model).
        if len(self.state.log_history) == n_history + 1:
            self.state.log_history[-1] = M.summary_metrics(self.state.log_history[-1])

    # ------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the Trainer's own saving code is pointed at a staging
        # folder; `_save_checkpoint` renames the finished checkpoint into place.
        return self._staging_root or super()._get_output_dir(trial=trial)

    def _save_altgrad_state(self, folder: str) -> None:
        """What altgrad adds to a checkpoint folder: quantization state and run info (W&B id, streaks)."""
        self.save_quant_state(folder)
        with open(os.path.join(folder, RUN_INFO_FILE), "w") as f:
            json.dump(self._run_info(), f, indent=2)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint plus altgrad's state, written atomically.

        Everything is written under ``<output_dir>/.staging-checkpoint/checkpoint-<N>`` and renamed to
        ``<output_dir>/checkpoint-<N>`` only once complete, so a crash mid-write never leaves a folder that
        ``resume_from_checkpoint`` would pick up (it only considers ``checkpoint-<N>`` names).
        """
        run_dir = super()._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging-checkpoint")
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
            staged = os.path.join(staging_root, name)
            if self.args.should_save:
                self._save_altgrad_state(staged)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank's RNG state is in the staging folder
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))  # the on-disk copy too
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _resume_wandb_run(self, run_id: str) -> None:
        """Open the checkpoint's W&B run before the Trainer's WandbCallback starts one: the callback
        reuses an active run, so the resumed training logs into the same run (``resume="allow"``)."""
        import wandb

        if wandb.run is not None and wandb.run.id == run_id:
            return
        if wandb.run is not None:
            wandb.finish()
        wandb.init(
            project=os.getenv("WANDB_PROJECT", "huggingface"),
            id=run_id,
            resume="allow",
            name=self.args.run_name,
        )

    def _run_info(self) -> dict:
        run_id = None
        try:
            import wandb

            run_id = wandb.run.id if wandb.run is not None else None
        except ImportError:  # pragma: no cover - wandb is a dependency, but keep checkpoints writable
            pass
        model_config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return {
            "wandb_run_id": run_id,
            "consecutive_bad_steps": self._bad_steps,
            "recipe": self.recipe.to_dict(),
            "model_config": model_config.to_diff_dict() if hasattr(model_config, "to_diff_dict") else None,
        }

    def resolve_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint folder a resume would load (``True``: the latest in ``output_dir``), checked for
        compatibility with this run's architecture and recipe; raises ValueError before any work."""
        checkpoint = resume_from_checkpoint
        if checkpoint in (None, False) or (isinstance(checkpoint, str) and checkpoint.lower() in ("", "false")):
            return None
        if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() == "true"):
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-<N> folder")
        checkpoint = str(checkpoint)
        self._check_compatible(checkpoint)
        # Also readable: the Trainer loads the files inside train(), where a failure is a traceback after
        # the run has started; here it is a setup error. Once per folder (train() resolves again).
        if getattr(self, "_verified_checkpoint", None) != os.path.realpath(checkpoint):
            self._verify_checkpoint_files(checkpoint)
            self._verified_checkpoint = os.path.realpath(checkpoint)
        return checkpoint

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`; on resume, also continue the checkpoint's W&B run (same run id)."""
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        resume_from_checkpoint = checkpoint
        if checkpoint is not None:
            info_path = os.path.join(checkpoint, RUN_INFO_FILE)
            if os.path.isfile(info_path):
                with open(info_path) as f:
                    info = json.load(f)
                run_id = info.get("wandb_run_id")
                self._bad_steps = int(info.get("consecutive_bad_steps", 0))  # the nan_patience streak goes on
                if run_id and "wandb" in (self.args.report_to or []) and self.is_world_process_zero():
                    self._resume_wandb_run(run_id)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_quant_state(self, directory: str) -> str:
        """Write the quantization state (recipe + amax histories) to ``directory``."""
        path = os.path.join(directory, QUANT_STATE_FILE)
        tmp = path + ".tmp"
        torch.save(self.quantizer.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load_quant_state(self, directory: str) -> None:
        path = os.path.join(directory, QUANT_STATE_FILE)
        if not os.path.isfile(path):
            if self.quantizer.layers:
                raise ValueError(
                    f"checkpoint {directory} has no {QUANT_STATE_FILE}: it was not written by altgrad with recipe "
                    f"{self.recipe.name!r}"
                )
            return
        try:
            state = torch.load(path, map_location=self.args.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling error means a corrupt file
            raise ValueError(f"corrupt quantization state {path}: {type(exc).__name__}: {exc}") from None
        self.quantizer.load_state_dict(state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Refuse incompatible or corrupt checkpoints with a clear message before loading anything."""
        self._check_compatible(resume_from_checkpoint)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as exc:  # noqa: BLE001 - safetensors/torch/pickle errors all mean "cannot load this"
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); it is corrupt or incomplete. "
                "Resume from another checkpoint-<N> folder or start a new run"
            ) from None
        self.load_quant_state(resume_from_checkpoint)

    def _check_compatible(self, checkpoint: str) -> None:
        if not os.path.isdir(checkpoint):
            raise ValueError(f"resume_from_checkpoint={checkpoint!r} is not a directory")
        config_path = os.path.join(checkpoint, "config.json")
        model_config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if os.path.isfile(config_path) and model_config is not None:
            try:
                with open(config_path) as f:
                    saved = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"checkpoint {checkpoint}: config.json is corrupt ({exc})") from None
            mine = model_config.to_dict()
            keys = ("model_type", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
            diff = {k: (saved.get(k), mine.get(k)) for k in keys if k in mine and saved.get(k) != mine.get(k)}
            if diff:
                detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"checkpoint {checkpoint} was trained with a different architecture ({detail})")
        info_path = os.path.join(checkpoint, RUN_INFO_FILE)
        if os.path.isfile(info_path):
            try:
                with open(info_path) as f:
                    info = json.load(f)
            except (OSError, ValueError) as exc:
                raise self._unreadable(checkpoint, RUN_INFO_FILE, exc) from None
            saved_recipe = info.get("recipe") if isinstance(info, dict) else None
            if saved_recipe is not None and saved_recipe != self.recipe.to_dict():
                raise ValueError(
                    f"checkpoint {checkpoint} was trained with recipe {saved_recipe.get('name')!r}, this run uses "
                    f"{self.recipe.name!r}; resume with the same quantization recipe"
                )

    def _verify_checkpoint_files(self, checkpoint: str) -> None:
        """Raise ValueError unless every file the Trainer and altgrad load on resume opens and is complete.

        Weights: each safetensors file's header must parse and its tensors must cover the file exactly
        (catches truncation without reading the data); ``.bin``/``.pt``/``.pth`` files are loaded as the
        Trainer loads them (``weights_only``), JSON files parsed. Cheap next to a training step.
        """
        from safetensors import safe_open
        from transformers.trainer_pt_utils import safe_globals  # the numpy globals rng_state.pth holds

        def weights_files() -> list[str]:
            for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
                index = os.path.join(checkpoint, index_name)
                if os.path.isfile(index):
                    try:
                        with open(index) as f:
                            shards = sorted(set(json.load(f)["weight_map"].values()))
                    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise self._unreadable(checkpoint, index_name, exc) from None
                    for shard in shards:
                        if not os.path.isfile(os.path.join(checkpoint, shard)):
                            raise self._unreadable(checkpoint, shard, f"missing (listed in {index_name})")
                    return shards
            return [name for name in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(checkpoint, name))]

        weights = weights_files()
        if not weights:
            raise self._unreadable(checkpoint, "model.safetensors", "missing (no model weights in the folder)")
        if self.quantizer.layers and not os.path.isfile(os.path.join(checkpoint, QUANT_STATE_FILE)):
            raise ValueError(
                f"checkpoint {checkpoint} has no {QUANT_STATE_FILE}: it was not written by altgrad with recipe "
                f"{self.recipe.name!r}"
            )
        names = sorted(os.listdir(checkpoint))
        pickled = [n for n in names if n.endswith((".pt", ".pth"))] + [w for w in weights if w.endswith(".bin")]
        for name in [w for w in weights if w.endswith(".safetensors")]:
            try:
                with safe_open(os.path.join(checkpoint, name), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be loaded
                raise self._unreadable(checkpoint, name, exc) from None
        for name in pickled:
            try:
                with safe_globals():
                    torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - zip/unpickling errors all mean "cannot load this"
                raise self._unreadable(checkpoint, name, exc) from None
        for name in [n for n in names if n.endswith(".json")]:
            try:
                with open(os.path.join(checkpoint, name)) as f:
                    json.load(f)
            except (OSError, ValueError) as exc:
                raise self._unreadable(checkpoint, name, exc) from None

    @staticmethod
    def _unreadable(checkpoint: str, name: str, problem) -> ValueError:
        """The one-line error for a checkpoint file that cannot be loaded, pointing at what to do instead."""
        if isinstance(problem, BaseException):
            text = " ".join(str(problem).split()) or type(problem).__name__
            # torch's zip errors append a paragraph of advice; the first sentence says what is wrong.
            problem = f"{type(problem).__name__}: {text.split('. ')[0][:200]}"
        parent = os.path.dirname(os.path.normpath(checkpoint))
        others = []
        if os.path.isdir(parent):
            for entry in os.listdir(parent):
                path = os.path.join(parent, entry)
                if (entry.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and entry.split("-")[-1].isdigit()
                        and os.path.isdir(path) and os.path.realpath(path) != os.path.realpath(checkpoint)):
                    others.append((int(entry.split("-")[-1]), path))
        if others:
            instead = f"resume from another checkpoint (e.g. training.resume_from_checkpoint={max(others)[1]})"
        else:
            instead = "resume from another checkpoint-<N> folder"
        return ValueError(
            f"checkpoint {checkpoint} is corrupt or incomplete: {name} cannot be loaded ({problem}); "
            f"{instead} or start a new run (training.resume_from_checkpoint=null)"
        )

    def create_model_card(self, model_name: str | None = None, tags=None, **kwargs) -> None:
        """altgrad's model card (architecture, training config, quantization recipe) instead of the
        Trainer's generic one; `push_to_hub` calls this, so the pushed card records the recipe.

        ``self.model_card_training_config`` (a dict, e.g. the resolved experiment config) is recorded when
        set, otherwise the `TrainingArguments`.
        """
        if not self.is_world_process_zero():
            return
        from altgrad.modeling import write_model_card

        training_config = getattr(self, "model_card_training_config", None) or self.args.to_sanitized_dict()
        write_model_card(
            self.args.output_dir,
            self.accelerator.unwrap_model(self.model).config,
            training_config=training_config,
            quant_recipe=self.recipe.to_dict(),
            model_name=model_name,
            tags=[tags] if isinstance(tags, str) else tags,
        )
