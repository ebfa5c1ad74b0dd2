"""What a person sees while a run trains: a progress bar, one compact line per logging step, evaluation
lines, and alerts as they fire. Everything else goes to W&B and ``metrics.jsonl`` (`MetricsFileCallback`).

`format_log_line` is framework-free (a plain loop prints its result); `ConsoleCallback` puts it under the
Trainer's progress bar in place of transformers' `ProgressCallback`, which echoes the whole metrics dict
(for a quantized run of README's 4-layer model, ~300 KB of per-tensor statistics per 1,000 steps).

Example:
    >>> format_log_line({"loss": 2.4567, "learning_rate": 9.95e-4, "tokens_per_second": 7350.2,
    ...                  "grad_cos_sim/mean": 0.9941, "grad_cos_sim/min": 0.9812,
    ...                  "quantization/overflow_rate": 1e-4, "quantization/underflow_rate": 2e-3,
    ...                  "quantization/bit_stall_rate": 0.852}, step=100, max_steps=2000)
    'step 100/2000 | loss 2.4567 | lr 9.95e-04 | 7,350 tok/s | grad cos 0.9941 (min 0.9812) | ovf 0.010% | unf 0.200% | fwd-copy stall 85.2%'
    >>> format_log_line({"eval_loss": 1.9876, "val/loss": 1.9876, "val/perplexity": 7.30}, step=250)
    'eval step 250 | val loss 1.9876 | ppl 7.30'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from . import metrics as M

__all__ = ["ConsoleCallback", "MetricsFileCallback", "format_log_line", "install_console"]


def _num(logs: Mapping[str, Any], key: str) -> float | None:
    value = logs.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pct(value: float) -> str:
    return f"{value:.3%}" if value < 0.1 else f"{value:.1%}"


def format_log_line(logs: Mapping[str, Any], step: int, max_steps: int | None = None) -> str | None:
    """One line (well under 300 characters) for a logged dict: a training step, an evaluation, or the
    end-of-training summary; None for a dict with nothing a person watches."""
    where = f"{step}/{max_steps}" if max_steps else f"{step}"
    if "train_runtime" in logs:
        runtime = _num(logs, "train_runtime") or 0.0
        parts = [f"trained {where} steps in {runtime:.1f} s"]
        if (train_loss := _num(logs, "train_loss")) is not None:
            parts.append(f"mean train loss {train_loss:.4f}")
        return " | ".join(parts)
    if (val_loss := _num(logs, M.VAL_LOSS) if M.VAL_LOSS in logs else _num(logs, "eval_loss")) is not None:
        parts = [f"eval step {step}", f"val loss {val_loss:.4f}"]
        if (ppl := _num(logs, M.VAL_PERPLEXITY)) is not None and math.isfinite(ppl):
            parts.append(f"ppl {ppl:.2f}")
        return " | ".join(parts)
    if (loss := _num(logs, M.LOSS)) is None:
        return None
    parts = [f"step {where}", f"loss {loss:.4f}"]
    if (lr := _num(logs, M.LEARNING_RATE)) is not None:
        parts.append(f"lr {lr:.2e}")
    if (tps := _num(logs, M.TOKENS_PER_SECOND)) is not None:
        parts.append(f"{tps:,.0f} tok/s")
    if (cos := _num(logs, M.COS_SIM_MEAN)) is not None:
        low = _num(logs, M.COS_SIM_MIN)
        parts.append(f"grad cos {cos:.4f}" + (f" (min {low:.4f})" if low is not None else ""))
    if (ovf := _num(logs, M.OVERFLOW_RATE)) is not None:
        parts.append(f"ovf {_pct(ovf)}")
    if (unf := _num(logs, M.UNDERFLOW_RATE)) is not None:
        parts.append(f"unf {_pct(unf)}")
    if (stall := _num(logs, M.STORED_WEIGHT_BIT_STALL_RATE)) is not None:
        parts.append(f"stored-weight stall {_pct(stall)}")
    elif (stall := _num(logs, M.BIT_STALL_RATE)) is not None:
        parts.append(f"fwd-copy stall {_pct(stall)}")
    return " | ".join(parts)


class ConsoleCallback(ProgressCallback):
    """transformers' progress bars, with `format_log_line` instead of the whole metrics dict per log.

    ``show_bar=False`` (the Trainer's ``disable_tqdm``) prints the same lines without bars.
    """

    def __init__(self, show_bar: bool = True) -> None:
        super().__init__()
        self.show_bar = show_bar

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_train_begin(args, state, control, **kwargs)
        else:
            self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.show_bar:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        line = format_log_line(logs or {}, state.global_step, state.max_steps)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


class MetricsFileCallback(TrainerCallback):
    """Writes every logged dict (per-tensor metrics included) to ``<output_dir>/metrics.jsonl``, on the
    main process; on resume, first drops rows past the checkpoint's step."""

    def __init__(self) -> None:
        self.file: M.MetricsFile | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.file = M.MetricsFile(args.output_dir)
        self.file.truncate_after(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.file is None:  # evaluate() without train()
            self.file = M.MetricsFile(args.output_dir)
        self.file.write(state.global_step, logs)


def install_console(trainer) -> None:
    """Swap the Trainer's `ProgressCallback` / `PrinterCallback` for a `ConsoleCallback`, and add a
    `MetricsFileCallback` (both are public `Trainer.add_callback` / `pop_callback` calls)."""
    show_bar = not trainer.args.disable_tqdm
    for cls in (ProgressCallback, PrinterCallback):
        trainer.pop_callback(cls)
    trainer.add_callback(ConsoleCallback(show_bar=show_bar))
    trainer.add_callback(MetricsFileCallback())
