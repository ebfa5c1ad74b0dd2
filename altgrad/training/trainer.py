"""`AltGradTrainer`: a `transformers.Trainer` driving a `QuantSession` from the Trainer's public hooks.

Everything altgrad adds to a step (quantization, the FP32 shadow, statistics, bit-stall, the non-finite
verdict, metrics) lives in `altgrad.training.session`; checkpoint files and checks in
`altgrad.training.checkpointing`; alerts, the console and metrics.jsonl in `altgrad.monitoring`. This
class only maps the Trainer's loop onto the session's lifecycle:

==========================================  ====================================================
Trainer hook                                session call
==========================================  ====================================================
`training_step`, first micro-batch          ``begin_step()``
`training_step` / `compute_loss`            ``before_micro_batch`` / ``after_micro_batch`` (+ shadow)
`training_step`, gradients final            ``before_optimizer_step()`` (a bad step: alert, anomaly
                                            checkpoint, stop after ``nan_patience``)
`create_optimizer`                          ``attach_optimizer()`` (optimizer-state roles)
`on_optimizer_step` callback                ``after_optimizer_step()``
`log`                                       ``metrics()`` (one host sync, one all-reduce)
`train` (resume)                            checkpoint checked, session state restored, W&B run resumed
==========================================  ====================================================

Private Trainer API still used, and why (each is a break the next transformers release may bring):

* ``_save_checkpoint`` and ``_get_output_dir``: checkpoints are written into a staging folder and renamed
  when complete, so a crash mid-write never leaves a ``checkpoint-<N>`` that ``get_last_checkpoint`` (and
  so ``resume_from_checkpoint=True``) would pick; the Trainer has no public hook that chooses the folder.
* The attributes ``loss_is_scaled_for_ga``, ``model_accepts_loss_kwargs``, ``compute_loss_func`` and
  ``current_gradient_accumulation_steps``: the shadow must divide its loss for gradient accumulation
  exactly as `Trainer.training_step` (and then `accelerator.backward`) does, and these are what it
  decides by. A test (shadow of an unquantized model under accumulation and label smoothing equals the
  model's gradient) catches a release that changes the rule; it caught 5.4's.

Example:
    >>> from transformers import TrainingArguments
    >>> trainer = AltGradTrainer(model, TrainingArguments("out", max_steps=10), recipe="fp8_hybrid",
    ...                          train_dataset=train_ds)                       # doctest: +SKIP
    >>> trainer.train()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from altgrad.monitoring import AlertCallback
from altgrad.monitoring import metrics as M
from altgrad.monitoring.console import install_console
from altgrad.training import checkpointing as ckpt
from altgrad.training.checkpointing import QUANT_STATE_FILE, RUN_INFO_FILE
from altgrad.training.recipe import QuantRecipe
from altgrad.training.session import QuantSession, StepVerdict, perplexity

logger = logging.getLogger(__name__)

__all__ = ["AltGradTrainer", "QUANT_STATE_FILE", "RUN_INFO_FILE", "perplexity"]


class _SessionHooks(TrainerCallback):
    """The session's after-step work, and anomaly checkpoints requested by alerts at a log."""

    def __init__(self, trainer: "AltGradTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers keeps a resumed checkpoint's logging/eval/save intervals (it only warns); a resume
        # asked for new ones (`training.save_steps=100` on the command line), so the arguments win.
        if state.max_steps:
            state.compute_steps(args, state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.session.after_optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        pending = self.trainer.alerts.pop_anomalies()
        if pending:
            self.trainer.save_anomaly_checkpoints(pending, logs)


class AltGradTrainer(Trainer):
    """A `transformers.Trainer` with low-precision quantization, an FP32 shadow and stability metrics.

    Args:
        model: the model to train (altgrad's GPT or any model whose selected layers are `nn.Linear`).
        args: ordinary `TrainingArguments`.
        recipe: a :class:`QuantRecipe`, preset name (``"fp32"``, ``"bf16"``, ``"e5m2"``, ``"fp8_hybrid"``,
            ...) or dict. ``None`` trains unquantized. A recipe with optimizer-state roles rounds the moments
            of the optimizer the Trainer creates (``create_optimizer``).
        shadow_every: compare against the FP32 shadow every this many optimizer steps; ``None`` or 0
            disables the shadow (saves one forward/backward and one float32 copy of the model).
        monitoring: an :class:`altgrad.monitoring.MonitoringConfig` (alerts, anomaly checkpoints,
            ``nan_patience``); ``None`` uses its defaults.
        whatif: what-if alternatives and recipes (:class:`altgrad.training.whatif.WhatIfConfig` or its
            dict), passed to the session.
        **kwargs: everything else `transformers.Trainer` accepts (datasets, callbacks, tokenizer ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        recipe: QuantRecipe | str | dict | None = None,
        shadow_every: int | None = 1,
        monitoring: Any = None,
        whatif: Any = None,
        **kwargs,
    ) -> None:
        if model is None:
            raise ValueError("AltGradTrainer needs a model instance (model_init is not supported)")
        # Converted before the Trainer wraps and moves the model (the shadow follows it at its first step).
        self.session = QuantSession(model, recipe, shadow_every=shadow_every, monitoring=monitoring,
                                    is_log_step=self._will_log, whatif=whatif)
        self._staging_root: str | None = None
        super().__init__(model=model, args=args, **kwargs)
        # The session's alert manager, fed the logs dict at every log (it writes the log, W&B and
        # <output_dir>/alerts.jsonl on the main process).
        self.alerts = AlertCallback(manager=self.session.alerts, output_dir=self.args.output_dir,
                                    is_main_process=self.is_world_process_zero())
        self.add_callback(self.alerts)
        self.add_callback(_SessionHooks(self))
        # A compact line per logging step instead of the Trainer's echo of the whole metrics dict;
        # every metric still reaches W&B and <output_dir>/metrics.jsonl.
        install_console(self)
        self._micro_in_window = 0
        self._micro_loss: torch.Tensor | None = None
        self.stop_reason: str | None = None

    # The session's parts, under the names people (and the tests) reach for.
    recipe = property(lambda self: self.session.recipe)
    quantizer = property(lambda self: self.session.quantizer)
    shadow = property(lambda self: self.session.shadow)
    monitoring = property(lambda self: self.session.monitoring)

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
    def create_optimizer(self, model=None):
        """The Trainer's optimizer, handed to the session (a recipe's optimizer-state roles round its moments)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        self.session.attach_optimizer(optimizer)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; the unscaled training loss is what the session's non-finite check reads."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._micro_loss = (out[0] if return_outputs else out).detach()
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        session = self.session
        if self._micro_in_window == 0:
            session.step = self.state.global_step  # also right after a resume
            session.begin_step()
            self._step_loss_specs = []
        self._step_loss_specs.append(self._loss_spec(num_items_in_batch))
        session.before_micro_batch(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        session.after_micro_batch(
            self._micro_loss if self._micro_loss is not None else loss, inputs, self._shadow_loss_fn(num_items_in_batch)
        )
        self._micro_loss = None
        self._micro_in_window += 1
        if self.accelerator.sync_gradients:
            self._micro_in_window = 0
            verdict = session.before_optimizer_step()
            if not verdict.ok:
                self._on_bad_step(verdict)
        return loss

    def _loss_spec(self, num_items_in_batch) -> dict:
        """How `Trainer.compute_loss` / `training_step` turn this micro-batch's model loss into the recorded
        loss (``* multiplier``) and the one backpropagated (``/ divisor``), as data a replay re-applies."""
        multiplier = 1
        if (self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
                and num_items_in_batch is not None):
            multiplier = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        scaled = declared if declared is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        divisor = (1 if scaled else self.current_gradient_accumulation_steps) * self.accelerator.gradient_accumulation_steps
        return {
            "num_items_in_batch": num_items_in_batch if self.model_accepts_loss_kwargs else None,
            "multiplier": multiplier,
            "divisor": divisor,
            # What a replay cannot re-apply: it refuses such a record, naming this.
            "custom_loss": self.label_smoother is not None or self.compute_loss_func is not None,
        }

    def _shadow_loss_fn(self, num_items_in_batch):
        """The shadow's loss, computed as `Trainer.training_step` computes the model's.

        `Trainer.compute_loss` (the base class's, so nothing is recorded twice) applies label smoothing,
        `compute_loss_func`, `num_items_in_batch` and the cross-device token averaging exactly as for the
        model; the gradient-accumulation division mirrors `Trainer.training_step`.
        """

        def loss_fn(shadow_model, batch):
            loss = Trainer.compute_loss(self, shadow_model, dict(batch), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            declared = getattr(self, "loss_is_scaled_for_ga", None)  # newer releases declare it; 5.4 does not
            if declared is not None:
                scaled = declared
            else:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None
                )
            if not scaled:
                loss = loss / self.current_gradient_accumulation_steps
            # `accelerator.backward` divides by accelerate's own accumulation steps too: 1 on recent
            # transformers (the Trainer scales itself), the accumulation steps on older ones (5.4).
            return loss / self.accelerator.gradient_accumulation_steps

        return loss_fn

    def _on_bad_step(self, verdict: StepVerdict) -> None:
        if verdict.anomalies:
            # Saved before the update is skipped: reloading this checkpoint and re-running batch.pt
            # reproduces the non-finite loss.
            self.save_anomaly_checkpoints(verdict.anomalies, {"loss": verdict.loss, "nonfinite_layers": verdict.bad_tensors},
                                          state="before_step")
        if verdict.stop:
            self.control.should_training_stop = True
            self.stop_reason = verdict.message

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        if M.LOSS in logs and "train_runtime" not in logs:
            logs[M.PERPLEXITY] = perplexity(logs[M.LOSS])
            logs.update(self.session.metrics())
        if "eval_loss" in logs:
            logs[M.VAL_LOSS] = logs["eval_loss"]
            logs[M.VAL_PERPLEXITY] = perplexity(logs["eval_loss"])
        n_history = len(self.state.log_history)
        super().log(logs, start_time)
        # Callbacks (W&B, metrics.jsonl, alerts) got every metric; the history that the Trainer writes
        # into each checkpoint's trainer_state.json keeps the summaries (per-tensor metrics made it
        # ~800 KB per checkpoint for README's 0.8M-parameter model).
        if len(self.state.log_history) == n_history + 1:
            self.state.log_history[-1] = M.summary_metrics(self.state.log_history[-1])

    # ------------------------------------------------------------------ anomaly checkpoints
    def save_anomaly_checkpoints(self, alerts: list, metrics: dict | None = None, state: str = "after_step") -> list[str]:
        """Save a full checkpoint per alert under ``output_dir/anomalies/step-<N>-<rule>/``.

        ``state``: ``"before_step"`` when called before the step's update (a non-finite step: the saved
        weights, optimizer, scheduler and scaling state are those the step ran from, and `recipes/replay.py`
        re-runs it bit for bit), ``"after_step"`` when called at a log, after the update.

        Holds the model, optimizer, scheduler, grad scaler, every rank's RNG state and micro-batch, the
        quantization state, run info, trainer state and the alert with its metrics; written to a
        temporary name and renamed, outside the Trainer's checkpoint rotation, keeping the last
        ``anomaly_keep_last``. Only public APIs (the model's ``save_pretrained``, state dicts).
        """
        args = self.args
        saved = []
        root = os.path.join(args.output_dir, ckpt.ANOMALY_DIR)
        for alert in alerts:
            name = f"step-{alert.step}-{alert.rule}"
            final = os.path.join(root, name)
            if os.path.exists(final):
                continue
            tmp = os.path.join(root, f".tmp-{name}")
            if args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp, exist_ok=True)
            self.accelerator.wait_for_everyone()  # the folder exists before any rank writes into it
            ckpt.save_rng_state(tmp, args.process_index, args.world_size)
            replay = {
                "micro_batches": [b for b, _ in self.session.step_batches],
                "rng_states": [r for _, r in self.session.step_batches],
                "loss_specs": list(getattr(self, "_step_loss_specs", [])),
                "quant_state": ckpt.step_start_quant_state(self.session),
                "process_index": args.process_index,
                "world_size": args.world_size,
                "global_step": self.state.global_step,
            }
            ckpt.write_anomaly_record(tmp, alert, metrics, self.session.last_batch, args.process_index,
                                      replay=replay, state=state, world_size=args.world_size)
            if args.should_save:
                model = self.accelerator.unwrap_model(self.model)
                model.save_pretrained(tmp)
                if self.optimizer is not None:
                    torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                if self.lr_scheduler is not None:
                    torch.save(self.lr_scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                if getattr(self.accelerator, "scaler", None) is not None:
                    torch.save(self.accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
                ckpt.save_session_state(tmp, self.session, getattr(model, "config", None), self._wandb_run_id(),
                                        mid_step=state == "before_step")
                self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
            self.accelerator.wait_for_everyone()  # every rank's files are written before the rename
            if args.should_save:
                os.replace(tmp, final)
                saved.append(final)
                logger.warning("altgrad: anomaly checkpoint saved to %s", final)
        if args.should_save:
            ckpt.rotate_anomalies(root, self.monitoring.anomaly_keep_last)
        return saved

    # ------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        # Private (see the module docstring): while a checkpoint is being written, the Trainer's own saving
        # code is pointed at a staging folder; `_save_checkpoint` renames the finished checkpoint into place.
        return self._staging_root or super()._get_output_dir(trial=trial)

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
                self.save_quant_state(staged)
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

    def save_quant_state(self, directory: str) -> str:
        """Write altgrad's checkpoint files (quantization state, run info) into ``directory``."""
        ckpt.save_session_state(directory, self.session, self._model_config(), self._wandb_run_id())
        return os.path.join(directory, QUANT_STATE_FILE)

    def load_quant_state(self, directory: str) -> None:
        """Restore the quantization state and the non-finite streak from a checkpoint folder."""
        ckpt.load_session_state(directory, self.session, map_location=self.args.device)

    def _model_config(self):
        return getattr(self.accelerator.unwrap_model(self.model), "config", None)

    @staticmethod
    def _wandb_run_id() -> str | None:
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency, but keep checkpoints writable
            return None
        return wandb.run.id if wandb.run is not None else None

    def resolve_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint folder a resume would load (``True``: the latest in ``output_dir``), checked for
        compatibility with this run's architecture and recipe and for readable files; raises ValueError
        (a `CheckpointError`) before any work."""
        checkpoint = resume_from_checkpoint
        if checkpoint in (None, False) or (isinstance(checkpoint, str) and checkpoint.lower() in ("", "false")):
            return None
        if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() == "true"):
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if checkpoint is None:
                raise ckpt.CheckpointError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-<N> folder")
        checkpoint = str(checkpoint)
        ckpt.check_compatible(checkpoint, self._model_config(), self.recipe)
        # Also readable: the Trainer loads the files inside train(), where a failure is a traceback after
        # the run has started; here it is a setup error. Once per folder (train() resolves again).
        if getattr(self, "_verified_checkpoint", None) != os.path.realpath(checkpoint):
            ckpt.verify_checkpoint_files(checkpoint, self.quantizer.has_state, self.recipe.name)
            self._verified_checkpoint = os.path.realpath(checkpoint)
        return checkpoint

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`; on resume, also restore the session's state and continue the checkpoint's W&B
        run (same run id)."""
        checkpoint = self.resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            info = ckpt.load_session_state(checkpoint, self.session, map_location=self.args.device)
            run_id = info.get("wandb_run_id")
            if run_id and "wandb" in (self.args.report_to or []) and self.is_world_process_zero():
                self._resume_wandb_run(run_id)
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def _resume_wandb_run(self, run_id: str) -> None:
        """Open the checkpoint's W&B run before the Trainer's WandbCallback starts one: the callback
        reuses an active run, so the resumed training logs into the same run (``resume="allow"``)."""
        import wandb

        if wandb.run is not None and wandb.run.id == run_id:
            return
        if wandb.run is not None:
            wandb.finish()
        wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), id=run_id, resume="allow", name=self.args.run_name)

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
            self._model_config(),
            training_config=training_config,
            quant_recipe=self.recipe.to_dict(),
            model_name=model_name,
            tags=[tags] if isinstance(tags, str) else tags,
        )
