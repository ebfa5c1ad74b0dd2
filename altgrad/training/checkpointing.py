"""Checkpoints: what altgrad adds to a checkpoint folder, how a folder is written atomically, how a resume
is checked before any work, and anomaly checkpoints.

A checkpoint folder written by `AltGradTrainer` holds the Trainer's files (``model.safetensors``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``trainer_state.json``) plus:

* ``altgrad_quant_state.pt`` -- the session's quantizer state (amax histories, the step's amax, the Kahan
  buffers of compensated stored weights, optimizer-state scales);
* ``altgrad_run.json``       -- run info: recipe, model config, W&B run id, the non-finite streak.

An anomaly checkpoint (``<output_dir>/anomalies/step-<N>-<rule>/``) holds the same, plus ``batch.pt``
(the micro-batch that triggered it, per rank), ``anomaly.json`` (the alert, its metrics, and whether the
model and optimizer are those the step started from: ``"state": "before_step"``) and ``replay.pt``
(``replay_<rank>.pt`` for ranks > 0: every micro-batch of the step with the RNG state before it, how
the loss was computed, and that rank's scaling state as the step began), what ``recipes/replay.py``
re-runs.

Everything here is framework-free (torch, safetensors, json): a plain loop uses it as the trainer does.

Example:
    >>> import tempfile, os
    >>> root = tempfile.mkdtemp()
    >>> for step in (10, 20, 30):
    ...     os.makedirs(os.path.join(root, f"step-{step}-nonfinite_loss"))
    >>> rotate_anomalies(root, keep=2); sorted(os.listdir(root))
    ['step-20-nonfinite_loss', 'step-30-nonfinite_loss']
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "ANOMALY_DIR",
    "ANOMALY_FILE",
    "BATCH_FILE",
    "QUANT_STATE_FILE",
    "REPLAY_FILE",
    "RUN_INFO_FILE",
    "CheckpointError",
    "check_compatible",
    "load_session_state",
    "read_run_info",
    "rng_state",
    "rotate_anomalies",
    "save_rng_state",
    "save_session_state",
    "verify_checkpoint_files",
]

QUANT_STATE_FILE = "altgrad_quant_state.pt"
RUN_INFO_FILE = "altgrad_run.json"
ANOMALY_DIR = "anomalies"
BATCH_FILE = "batch.pt"
REPLAY_FILE = "replay.pt"
ANOMALY_FILE = "anomaly.json"
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
#: Architecture fields a checkpoint must share with the run that resumes from it.
ARCHITECTURE_KEYS = ("model_type", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line saying why and what to do."""


# --------------------------------------------------------------------------------------- writing
def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def step_start_quant_state(session) -> dict:
    """The session's scaling state as the current step began (taken mid-step, after `begin_step`).

    `begin_step` folds the previous step's amax into the histories and clears ``step_amax``; during
    the step only ``step_amax`` changes. Clearing it again gives the state the step started from, and
    loading it then calling `begin_step` (a no-op on a cleared ``step_amax``) restores the step's scales.
    """
    state = session.quantizer.state_dict()
    for q in state["quantizers"].values():
        q["step_amax"] = None
    return state


def save_session_state(folder: str | os.PathLike, session, model_config: Any = None, wandb_run_id: str | None = None,
                       mid_step: bool = False) -> None:
    """Write ``altgrad_quant_state.pt`` and ``altgrad_run.json`` for `session` into ``folder``
    (``mid_step``: the scaling state the current step started from, see `step_start_quant_state`)."""
    folder = os.fspath(folder)
    quant_state = step_start_quant_state(session) if mid_step else session.quantizer.state_dict()
    _atomic_write(os.path.join(folder, QUANT_STATE_FILE), lambda p: torch.save(quant_state, p))
    info = {
        "wandb_run_id": wandb_run_id,
        "consecutive_bad_steps": session.bad_steps,
        "recipe": session.recipe.to_dict(),
        "model_config": model_config.to_diff_dict() if hasattr(model_config, "to_diff_dict") else None,
    }

    def write_info(p: str) -> None:
        with open(p, "w") as f:
            json.dump(info, f, indent=2)

    _atomic_write(os.path.join(folder, RUN_INFO_FILE), write_info)


def read_run_info(folder: str | os.PathLike) -> dict[str, Any]:
    """``altgrad_run.json`` of a checkpoint ({} when absent)."""
    path = os.path.join(os.fspath(folder), RUN_INFO_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise unreadable(os.fspath(folder), RUN_INFO_FILE, exc) from None
    return info if isinstance(info, dict) else {}


def load_session_state(folder: str | os.PathLike, session, map_location: Any = "cpu") -> dict[str, Any]:
    """Restore `session`'s scaling state and non-finite streak from a checkpoint; returns its run info."""
    folder = os.fspath(folder)
    path = os.path.join(folder, QUANT_STATE_FILE)
    if os.path.isfile(path):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling error means a corrupt file
            raise unreadable(folder, QUANT_STATE_FILE, exc) from None
        session.quantizer.load_state_dict(state)
    elif session.quantizer.has_state:
        raise CheckpointError(
            f"checkpoint {folder} has no {QUANT_STATE_FILE}: it was not written by altgrad with recipe "
            f"{session.recipe.name!r}"
        )
    info = read_run_info(folder)
    session.bad_steps = int(info.get("consecutive_bad_steps", 0))  # the nan_patience streak goes on
    return info


def rng_state() -> dict[str, Any]:
    """This process's RNG states in the Trainer's ``rng_state*.pth`` layout (python, numpy, cpu, cuda)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def save_rng_state(folder: str | os.PathLike, process_index: int = 0, world_size: int = 1) -> None:
    """``rng_state.pth`` (one process) or ``rng_state_<rank>.pth``, as the Trainer names them."""
    name = "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"
    torch.save(rng_state(), os.path.join(os.fspath(folder), name))


def rotate_anomalies(root: str | os.PathLike, keep: int | None) -> None:
    """Delete the oldest anomaly checkpoints beyond ``keep`` (None: keep every one)."""
    root = os.fspath(root)
    if keep is None or not os.path.isdir(root):
        return
    dirs = [d for d in os.listdir(root) if d.startswith("step-")]
    dirs.sort(key=lambda d: (int(d.split("-")[1]), os.path.getmtime(os.path.join(root, d))))
    for old in dirs[: max(0, len(dirs) - int(keep))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def write_anomaly_record(folder: str | os.PathLike, alert, metrics: Mapping[str, Any] | None,
                         batch: Mapping[str, torch.Tensor] | None, process_index: int = 0,
                         replay: Mapping[str, Any] | None = None, state: str = "before_step",
                         world_size: int = 1) -> None:
    """``anomaly.json`` (main process), the triggering micro-batch (``batch.pt``, or ``batch_<rank>.pt``
    for ranks > 0) and, when given, this rank's replay record (``replay.pt`` / ``replay_<rank>.pt``) of
    an anomaly checkpoint. ``state`` says whether the checkpoint's weights and optimizer are those the
    step started from (``"before_step"``) or those after its update (``"after_step"``)."""
    folder = os.fspath(folder)
    if batch is not None:
        name = BATCH_FILE if process_index == 0 else f"batch_{process_index}.pt"
        torch.save({k: v.cpu() for k, v in batch.items()}, os.path.join(folder, name))
    if replay is not None:
        torch.save(_to_cpu(dict(replay)), os.path.join(folder, replay_file(process_index)))
    if process_index == 0:
        record = {"alert": alert.to_dict(), "metrics": dict(metrics or {}), "state": state, "world_size": world_size}
        with open(os.path.join(folder, ANOMALY_FILE), "w") as f:
            json.dump(record, f, indent=2, default=str)


def replay_file(process_index: int) -> str:
    """The replay record's file name for a rank."""
    return REPLAY_FILE if process_index == 0 else f"replay_{process_index}.pt"


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# --------------------------------------------------------------------------------------- checking
def check_compatible(checkpoint: str, model_config: Any, recipe) -> None:
    """CheckpointError unless ``checkpoint`` is a folder trained with this architecture and recipe."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"resume_from_checkpoint={checkpoint!r} is not a directory")
    config_path = os.path.join(checkpoint, "config.json")
    if os.path.isfile(config_path) and model_config is not None:
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: config.json is corrupt ({exc})") from None
        mine = model_config.to_dict()
        diff = {k: (saved.get(k), mine.get(k)) for k in ARCHITECTURE_KEYS if k in mine and saved.get(k) != mine.get(k)}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {checkpoint} was trained with a different architecture ({detail})")
    from altgrad.training.recipe import recipe_mismatch

    saved_recipe = read_run_info(checkpoint).get("recipe")
    problem = recipe_mismatch(saved_recipe, recipe)
    if problem is not None and not (saved_recipe is not None and _promotes(recipe, saved_recipe)):
        raise CheckpointError(
            f"checkpoint {checkpoint}: {problem}; resume with the same quantization recipe (or one that only adds "
            "high-precision overrides, as recipes/replay.py writes)"
        )


def _promotes(recipe, saved: dict) -> bool:
    """Whether ``recipe`` is the checkpoint's recipe with more (layer, role)s kept in high precision, the
    recipe `recipes/replay.py` writes: resuming with it is allowed (the promoted tensors' scaling state is
    dropped, everything else carries over)."""
    from altgrad.training.recipe import QuantRecipe

    try:
        return recipe.promotes(QuantRecipe.from_dict(saved))
    except (ValueError, TypeError):
        return False


def verify_checkpoint_files(checkpoint: str, needs_quant_state: bool, recipe_name: str = "") -> None:
    """CheckpointError unless every file a resume loads opens and is complete.

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
                    raise unreadable(checkpoint, index_name, exc) from None
                for shard in shards:
                    if not os.path.isfile(os.path.join(checkpoint, shard)):
                        raise unreadable(checkpoint, shard, f"missing (listed in {index_name})")
                return shards
        return [name for name in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(checkpoint, name))]

    weights = weights_files()
    if not weights:
        raise unreadable(checkpoint, "model.safetensors", "missing (no model weights in the folder)")
    if needs_quant_state and not os.path.isfile(os.path.join(checkpoint, QUANT_STATE_FILE)):
        raise CheckpointError(
            f"checkpoint {checkpoint} has no {QUANT_STATE_FILE}: it was not written by altgrad with recipe {recipe_name!r}"
        )
    names = sorted(os.listdir(checkpoint))
    pickled = [n for n in names if n.endswith((".pt", ".pth"))] + [w for w in weights if w.endswith(".bin")]
    for name in [w for w in weights if w.endswith(".safetensors")]:
        try:
            with safe_open(os.path.join(checkpoint, name), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be loaded
            raise unreadable(checkpoint, name, exc) from None
    for name in pickled:
        try:
            with safe_globals():
                torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - zip/unpickling errors all mean "cannot load this"
            raise unreadable(checkpoint, name, exc) from None
    for name in [n for n in names if n.endswith(".json")]:
        try:
            with open(os.path.join(checkpoint, name)) as f:
                json.load(f)
        except (OSError, ValueError) as exc:
            raise unreadable(checkpoint, name, exc) from None


def unreadable(checkpoint: str, name: str, problem) -> CheckpointError:
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
            if (entry.startswith(f"{CHECKPOINT_PREFIX}-") and entry.split("-")[-1].isdigit()
                    and os.path.isdir(path) and os.path.realpath(path) != os.path.realpath(checkpoint)):
                others.append((int(entry.split("-")[-1]), path))
    if others:
        instead = f"resume from another checkpoint (e.g. training.resume_from_checkpoint={max(others)[1]})"
    else:
        instead = "resume from another checkpoint-<N> folder"
    return CheckpointError(
        f"checkpoint {checkpoint} is corrupt or incomplete: {name} cannot be loaded ({problem}); "
        f"{instead} or start a new run (training.resume_from_checkpoint=null)"
    )
