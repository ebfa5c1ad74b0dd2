"""Train a nanoGPT-style GPT in a simulated low-precision format.

Usage::

    accelerate launch [--config_file accelerate_config.yaml] recipes/train.py \\
        [--config recipes/configs/cpu_shakespeare_char.yaml] [section.key=value ...]

With no ``--config`` the default experiment ``recipes/configs/shakespeare_char.yaml`` runs (on the
GPU if there is one, otherwise on the CPU). Overrides are dotted keys with YAML values, e.g.::

    accelerate launch recipes/train.py --config recipes/configs/e5m2_fp8.yaml \\
        training.max_steps=200 training.report_to=[wandb] quantization.shadow_every=10

Also runs without accelerate (``python recipes/train.py ...``) as a single process. The run's output
directory (``training.output_dir``) receives ``experiment_config.yaml`` (the resolved config), the
checkpoints with ``trainer_state.json``, ``alerts.jsonl``, and at the end the model, tokenizer and
model card. Config or data errors exit with status 2 and one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "recipes" / "configs" / "shakespeare_char.yaml"
EXIT_CONFIG_ERROR = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recipes/train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "config sections (see altgrad/config.py and recipes/configs/*.yaml):\n"
            "  model.*         n_layer n_head n_embd block_size dropout bias\n"
            "  data.*          altgrad.data.DataConfig: source path tokenizer bpe_vocab_size cache_dir max_eval_blocks ...\n"
            "  quantization.*  recipe (preset name or dict: fp32 bf16 e5m2 fp8_hybrid mxfp8 e3m4 e2m5 e1m6 e7m0), shadow_every,\n"
            "                  whatif.{alternatives,grad_every,grad_recipes,grad_swap_roles} (altgrad.training.whatif)\n"
            "  training.*      any transformers.TrainingArguments field, plus min_lr, resume_from_checkpoint, project, tags\n"
            "  monitoring.*    altgrad.monitoring.MonitoringConfig: bit_stall_threshold overflow_threshold cos_sim_floor ...\n"
            "\nexamples:\n"
            "  accelerate launch recipes/train.py                         # default: shakespeare_char.yaml\n"
            "  accelerate launch recipes/train.py --config recipes/configs/cpu_shakespeare_char.yaml\n"
            "  accelerate launch --config_file accelerate_config_cpu2.yaml recipes/train.py \\\n"
            "      --config recipes/configs/e5m2_fp8.yaml training.max_steps=100 training.use_cpu=true\n"
        ),
    )
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides applied after the file, values parsed as YAML")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = str(DEFAULT_CONFIG)
    return args


class SetupError(Exception):
    """A config or data problem found before training: reported as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args.config, args.overrides)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    """Tear the process group down before the interpreter does.

    Left to interpreter exit, gloo's worker threads can outlive the objects they use, and a rank that
    trained and saved then dies with SIGABRT ("terminate called without an active exception").
    `destroy_process_group` joins them while everything is still alive.
    """
    if "torch" not in sys.modules:  # --help, or an error before torch was imported
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run(config_path: str, overrides: list[str]) -> int:
    """Validate, prepare data, train, evaluate, save. Errors during training keep their traceback."""
    try:
        cfg, training_args, data = setup(config_path, overrides)
        # Building the model and trainer applies the recipe (block sizes must divide the layer widths,
        # the module patterns must match) and checks the checkpoint to resume from: still setup.
        trainer = build_trainer(cfg, training_args, data)
        checkpoint = trainer.resolve_checkpoint(cfg.training.resume_from_checkpoint)
    except ValueError as e:
        # Only setup errors are the user's to fix in the config: one line, no traceback.
        raise SetupError(_one_line(e)) from None
    # Only now is the run known to start: until here an existing output_dir (an earlier run's config,
    # alerts, W&B files) is left exactly as it was, so a typo cannot overwrite a finished run's record.
    try:
        _start_run_record(cfg, training_args)
    except OSError as e:
        raise SetupError(f"cannot write to training.output_dir={training_args.output_dir}: {e.strerror or e}") from None
    return train(cfg, training_args, data, trainer, checkpoint)


def setup(config_path: str, overrides: list[str]):
    """Config -> TrainingArguments -> seed -> data. Raises ValueError on any config/data problem.

    Writes nothing into the output directory (see :func:`_start_run_record`).
    """
    # Imports after argument parsing so `--help` is instant.
    from transformers import set_seed

    from altgrad.config import load_config
    from altgrad.training.recipe import preset_note

    cfg = load_config(config_path, overrides)
    # TrainingArguments' own checks (and the device/process setup) before any data work.
    training_args = cfg.training_arguments()
    is_main = training_args.process_index == 0
    world_size = training_args.world_size
    threads = ""
    if training_args.device.type == "cpu":
        from altgrad.cpu_threads import configure_cpu_threads

        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        choice = configure_cpu_threads(cfg.training.cpu_threads, local_processes)
        threads = f" threads={choice.threads} ({choice.reason})"
    if is_main:
        print(f"experiment: {config_path} -> {training_args.output_dir}")
        print(f"world_size={world_size} device={training_args.device}{threads} recipe={cfg.recipe.name}", flush=True)
        note = preset_note(cfg.quantization.recipe)
        if note:
            print(f"note: {note}", flush=True)
    _configure_wandb(cfg, training_args)

    set_seed(cfg.training.seed)

    from altgrad.data import prepare_data

    t = cfg.training
    # Every process draws from the same random-window dataset; the Trainer's distributed sampler
    # splits it, so it must hold one sample per (step x micro-batch x accumulation x process).
    num_train_samples = t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    data = prepare_data(cfg.data, block_size=cfg.model.block_size, num_train_samples=num_train_samples)
    if len(data.eval_dataset) == 0:
        raise ValueError(
            f"the validation split holds no block of model.block_size={cfg.model.block_size} tokens; "
            "use more data, a larger data.val_fraction or a smaller block_size"
        )
    return cfg, training_args, data


def build_trainer(cfg, training_args, data):
    """Model -> AltGradTrainer (applies the recipe). Raises ValueError on an impossible recipe."""
    from transformers import default_data_collator

    import altgrad.modeling  # noqa: F401  (registers the model with the Auto classes)
    from altgrad.modeling import GPT, GPTConfig
    from altgrad.training import AltGradTrainer

    model = GPT(GPTConfig(vocab_size=data.vocab_size, **cfg.gpt_config_kwargs()))
    recipe = cfg.recipe
    trainer = AltGradTrainer(
        model,
        training_args,
        recipe=recipe,
        shadow_every=cfg.quantization.shadow_every,
        whatif=cfg.quantization.whatif,
        monitoring=cfg.monitoring,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        processing_class=data.tokenizer,
        # Samples are fixed-length blocks: stack them (the default collator for a tokenizer would
        # try to pad, and char/BPE tokenizers have no pad token).
        data_collator=default_data_collator,
    )
    if "wandb" in (training_args.report_to or []):
        trainer.add_callback(_wandb_full_config_callback(cfg.to_dict()))
    return trainer


def _start_run_record(cfg, training_args) -> None:
    """The run's own files in output_dir, written once setup succeeded: the resolved config, an empty
    alerts.jsonl and the W&B folder."""
    if training_args.process_index == 0:
        cfg.save(training_args.output_dir)
        # An empty alerts.jsonl means "monitored, nothing fired" (the AlertManager appends to it),
        # so report tools can tell that apart from a run without monitoring output.
        (Path(training_args.output_dir) / "alerts.jsonl").touch()
    if "wandb" in (training_args.report_to or []):
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)


def train(cfg, training_args, data, trainer, checkpoint) -> int:
    """Train -> final evaluate -> save model, tokenizer, model card."""
    from altgrad.training.session import perplexity

    t = cfg.training
    is_main = training_args.process_index == 0
    # transformers' own bars ("Writing model shards" at every checkpoint) would interleave with the
    # training bar; downloads, before this point, keep theirs.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()
    trainer.save_state()  # trainer_state.json in output_dir, including the final eval
    if is_main:
        val_loss = metrics.get("eval_loss", float("nan"))
        print(f"final val_loss={val_loss:.4f} perplexity={perplexity(val_loss):.2f}", flush=True)

    # The card records the whole experiment; set before save_model, which pushes (with this card) when
    # training.push_to_hub is on.
    resolved = cfg.to_dict()
    trainer.model_card_training_config = {**resolved["training"], "data": resolved["data"], "final_eval": metrics}
    # save_model writes the weights + config (+ the tokenizer, as processing_class) on the main process.
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        data.tokenizer.save_pretrained(training_args.output_dir)
        trainer.create_model_card(tags=list(t.tags) or None)
        print(f"saved model, tokenizer and model card to {training_args.output_dir}", flush=True)
    # No rank leaves (and tears down the process group) while another is still saving.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group (see _shutdown_distributed)
    return 0


def _configure_wandb(cfg, training_args) -> None:
    """Project and tags for transformers' WandbCallback, which reads them from the environment."""
    if "wandb" not in (training_args.report_to or []):
        return
    os.environ.setdefault("WANDB_PROJECT", cfg.training.project)
    if cfg.training.tags:
        os.environ.setdefault("WANDB_TAGS", ",".join(map(str, cfg.training.tags)))
    # W&B files next to the run, so recipes/compare.py finds <output_dir>/wandb/offline-run-*. The folder
    # itself is made by _start_run_record, once setup succeeded.
    os.environ.setdefault("WANDB_DIR", str(Path(training_args.output_dir).resolve()))


def _wandb_full_config_callback(resolved: dict):
    """A callback that adds the resolved experiment config to the W&B run the WandbCallback opened.

    Added after the WandbCallback, so its on_train_begin runs after wandb.init; only the main process
    has a run. Built in a function so that importing this script (and `--help`) does not import
    transformers.
    """
    from transformers import TrainerCallback

    class WandbFullConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            import wandb

            if wandb.run is not None:
                wandb.config.update({"experiment": resolved}, allow_val_change=True)

    return WandbFullConfig()


if __name__ == "__main__":
    sys.exit(main())
