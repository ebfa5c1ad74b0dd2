"""Recipes end to end: config loading/validation, `accelerate launch recipes/train.py` (1 and 2 CPU
processes), the one-line errors for bad configs and data, and `recipes/compare.py`.

The two training subprocesses run once each (module-scoped fixtures) on a tiny GPT (2 layers,
32 wide, block 32, 30 steps) over the shared Tiny Shakespeare; together they take ~40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from altgrad.config import CONFIG_FILENAME, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "recipes" / "train.py"
COMPARE = REPO / "recipes" / "compare.py"
CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
MAX_STEPS = 30


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Keep whatever the launcher would pick up from a user config out of the test.
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _tiny_config(path: Path, data_path: Path, cache_dir: Path, output_dir: Path, recipe: str) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0},
        "data": {"source": "shakespeare_char", "path": str(data_path), "cache_dir": str(cache_dir),
                 "max_eval_blocks": 64},
        "quantization": {"recipe": recipe, "shadow_every": 1},
        "training": {"output_dir": str(output_dir), "max_steps": MAX_STEPS, "per_device_train_batch_size": 8,
                     "learning_rate": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 5, "logging_steps": 5,
                     "eval_steps": MAX_STEPS,  # evaluate at the end only
                     "use_cpu": True, "report_to": "none", "seed": 1337},
    }))
    return path


def _launch(accelerate_config: str, config: Path, log: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / accelerate_config),
           str(TRAIN), "--config", str(config), *overrides]
    with log.open("w") as fh:  # the Trainer's per-step logs are long; keep them out of pytest's memory
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def single_run(workdir, shakespeare_path) -> Path:
    """One process (accelerate_config.yaml), E5M2 recipe with the FP32 shadow."""
    out = workdir / "e5m2_run"
    cfg = _tiny_config(workdir / "tiny_e5m2.yaml", shakespeare_path, workdir / "cache", out, "e5m2")
    log = workdir / "single.log"
    proc = _launch("accelerate_config.yaml", cfg, log)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(workdir, shakespeare_path) -> tuple[Path, str]:
    """Two gloo CPU processes (accelerate_config_cpu2.yaml), fp32 recipe: the comparison baseline."""
    out = workdir / "fp32_ddp_run"
    cfg = _tiny_config(workdir / "tiny_fp32.yaml", shakespeare_path, workdir / "cache", out, "fp32")
    log = workdir / "ddp.log"
    proc = _launch("accelerate_config_cpu2.yaml", cfg, log)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return out, text


def _log_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


# --------------------------------------------------------------------------------------- config
def test_every_shipped_config_loads_and_builds_training_arguments():
    assert {p.stem for p in CONFIGS} >= {
        "shakespeare_char", "cpu_shakespeare_char", "bf16_baseline", "e5m2_fp8", "fp8_hybrid", "mxfp8",
        "e3m4", "e2m5", "e1m6", "e7m0"}
    for path in CONFIGS:
        cfg = load_config(path, ["training.use_cpu=true"])
        args = cfg.training_arguments()
        assert args.eval_strategy.value == "steps" and args.save_strategy.value == "steps", path


def test_baby_gpt_config_matches_nanogpt():
    cfg = load_config(REPO / "recipes/configs/shakespeare_char.yaml", [])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (6, 6, 384, 256)
    assert cfg.model.dropout == 0.2 and cfg.training.learning_rate == 1e-3 and cfg.training.min_lr == 1e-4
    assert cfg.training.max_steps == 5000 and cfg.training.per_device_train_batch_size == 64
    assert cfg.training.adam_beta2 == 0.99 and cfg.training.eval_steps == 250 and cfg.recipe.name == "fp32"
    args = cfg.training_arguments(use_cpu=True)
    assert args.lr_scheduler_type.value == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 1e-4}
    assert args.warmup_steps == 100 and args.max_grad_norm == 1.0 and args.weight_decay == 0.1


def test_overrides_are_yaml_and_dotted(tmp_path):
    cfg = load_config(REPO / "recipes/configs/cpu_shakespeare_char.yaml", [
        "training.max_steps=300", "training.learning_rate=2e-3", "training.report_to=[wandb]",
        "quantization.recipe=e5m2", "quantization.shadow_every=null", "model.bias=true",
        "training.optim=adamw_torch", "monitoring.overflow_threshold=0.05",
    ])
    assert cfg.training.max_steps == 300 and cfg.training.learning_rate == 2e-3  # "2e-3" string coerced
    assert cfg.training.report_to == ["wandb"] and cfg.quantization.shadow_every is None
    assert cfg.recipe.name == "e5m2" and cfg.model.bias is True and cfg.monitoring.overflow_threshold == 0.05
    assert cfg.training_arguments().optim.value == "adamw_torch"  # any TrainingArguments field is accepted
    # A dotted override into a preset edits it.
    cfg = load_config(None, ["quantization.recipe=e5m2", "quantization.recipe.exclude=[transformer.h.0.*]"])
    assert cfg.recipe.exclude == ("transformer.h.0.*",) and cfg.recipe.weight.format == "E5M2"
    assert parse_overrides(["a.b=1"]) == [("a.b", 1)]
    # The `quantization=<preset>` shorthand combines with other quantization keys, in either order.
    for order in (["quantization=fp8_hybrid", "quantization.shadow_every=10"],
                  ["quantization.shadow_every=10", "quantization=fp8_hybrid"]):
        cfg = load_config(REPO / "recipes/configs/cpu_shakespeare_char.yaml", order)
        assert cfg.recipe.name == "fp8_hybrid" and cfg.quantization.shadow_every == 10


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "recipes/configs/e5m2_fp8.yaml", [f"training.output_dir={tmp_path}"])
    path = cfg.save()
    assert path == tmp_path / CONFIG_FILENAME
    again = load_config(path, [])
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, message", [
    (["model.n_layers=2"], "valid keys in 'model' are: n_layer, n_head"),
    (["training.learnig_rate=1.0"], "did you mean 'learning_rate'"),
    (["data.tokeniser=bpe"], "valid keys in 'data' are: source, path"),
    (["monitoring.overflow=0.1"], "did you mean 'overflow_threshold'"),
    (["quantization.recipe.weigth=E4M3"], "weigth"),
    (["experiment.name=x"], "valid keys at the top level are: model, data, quantization, training, monitoring"),
])
def test_unknown_keys_are_rejected_with_the_valid_keys(overrides, message):
    with pytest.raises(ValueError, match="unknown|weigth") as e:
        load_config(None, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("key, expected", [
    ("training.learnig_rate", ["did you mean 'learning_rate'"]),
    ("training.per_device_batch_size", ["'per_device_train_batch_size'", "'per_device_eval_batch_size'"]),
    ("training.bogus", []),
    ("monitoring.overflow", ["did you mean 'overflow_threshold'", "altgrad.monitoring.MonitoringConfig"]),
])
def test_unknown_key_message_is_one_short_line(key, expected):
    """Large sections (training has every TrainingArguments field) name the closest keys, not all of them."""
    with pytest.raises(ValueError) as e:
        load_config(None, [f"{key}=1"])
    message = str(e.value)
    assert message.startswith(f"unknown key {key!r}") and "\n" not in message and len(message) < 300, message
    for fragment in expected:
        assert fragment in message, message
    if key.startswith("training."):
        assert ("training accepts any transformers.TrainingArguments field plus min_lr, resume_from_checkpoint, "
                "project, tags") in message
        assert "ddp_backend" not in message  # not the list of every field


@pytest.mark.parametrize("overrides, message", [
    (["training.max_steps=many"], "training.max_steps='many' has the wrong type: expected an integer"),
    (["model.bias=maybe"], "model.bias='maybe' has the wrong type: expected true/false"),
    (["model.n_layer=2.5"], "expected an integer"),
    (["training.tags=oops"], "expected a list"),
    (["training.adam_epsilon=[1]"], "training.adam_epsilon=[1] has the wrong type"),
    (["data.seed=x"], "data.seed='x' has the wrong type"),
])
def test_wrong_types_are_rejected(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("override, section, key, expected", [
    ("training.learning_rate=1e-3", "training", "learning_rate", 1e-3),  # PyYAML's string "1e-3"
    ("training.max_steps=2.0e+3", "training", "max_steps", 2000),  # a whole float where an int is expected
    ("model.dropout=0", "model", "dropout", 0.0),
    ("data.max_eval_blocks=null", "data", "max_eval_blocks", None),
    ("quantization.shadow_every=null", "quantization", "shadow_every", None),
    ("quantization.recipe={preset: e5m2}", "quantization", "recipe", {"preset": "e5m2"}),  # Union[str, dict]
    ("training.report_to=wandb", "training", "report_to", "wandb"),  # Union[str, list[str]]: str kept as is
    ("training.report_to=[wandb, tensorboard]", "training", "report_to", ["wandb", "tensorboard"]),
    ("training.tags=[]", "training", "tags", []),
    ("training.resume_from_checkpoint=true", "training", "resume_from_checkpoint", True),
    ("training.resume_from_checkpoint=out/run/checkpoint-10", "training", "resume_from_checkpoint",
     "out/run/checkpoint-10"),
    # TrainingArguments fields (kept in training.extra), converted by HfArgumentParser(TrainingArguments).
    ("training.num_train_epochs=3", "extra", "num_train_epochs", 3.0),
    ("training.log_level=info", "extra", "log_level", "info"),
    ("training.lr_scheduler_kwargs={num_cycles: 0.5}", "extra", "lr_scheduler_kwargs", {"num_cycles": 0.5}),
    ("training.debug=[underflow_overflow]", "extra", "debug", ["underflow_overflow"]),  # plain str, not the Enum
    ("training.label_names=[labels]", "extra", "label_names", ["labels"]),
])
def test_values_are_converted_to_the_field_types(override, section, key, expected):
    cfg = load_config(None, [override])
    value = cfg.training.extra[key] if section == "extra" else getattr(getattr(cfg, section), key)
    assert value == expected and type(value) is type(expected), (override, value)


@pytest.mark.parametrize("override, message", [
    ("training.log_level=verbose", "training.log_level='verbose' is not valid: expected one of 'detail', 'debug'"),
    ("training.debug=[bogus]", "training.debug=['bogus'] has the wrong type"),
    ("training.label_names=labels", "expected a list or null"),
    ("training.fp16=null", "training.fp16=None has the wrong type: expected true/false"),
    ("training.ddp_timeout=1.5", "training.ddp_timeout=1.5 has the wrong type: expected an integer"),
    ("training.logging_steps=1e1", "expected an integer (PyYAML reads 1e-3 as a string; write 1.0e-3)"),
    ("data.hf_config=no", "data.hf_config=False has the wrong type: expected a string or null"),  # YAML's `no`
    ("training.resume_from_checkpoint=5", "expected a string or true/false or null"),
    ("quantization.recipe=5", "quantization.recipe=5 has the wrong type: expected a string or a mapping"),
    ("training.seed=[1, 2]", "training.seed=[1, 2] has the wrong type: expected an integer"),
    ("training.adam_beta1={a: 1}", "expected a number"),
])
def test_conversion_errors_are_one_line_value_errors(override, message):
    """HfArgumentParser is an argparse parser: its errors must raise, never print usage or sys.exit."""
    try:
        load_config(None, [override])
    except ValueError as e:
        assert message in str(e) and "\n" not in str(e), str(e)
    except SystemExit:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"{override}: the parser exited the process")
    else:
        pytest.fail(f"{override} was accepted")


def test_parsing_leaves_the_dataclasses_untouched():
    """HfArgumentParser rewrites dataclass Field.type in place; the config's parsers undo that."""
    import dataclasses

    from transformers import TrainingArguments

    import altgrad.config
    from altgrad.config import TrainingSection
    from altgrad.data import DataConfig

    altgrad.config._parser.cache_clear()  # build the parsers again, inside this test
    before = {cls: [f.type for f in dataclasses.fields(cls)] for cls in (TrainingSection, DataConfig, TrainingArguments)}
    assert all(isinstance(t, str) for t in before[TrainingSection] + before[DataConfig])  # unevaluated annotations
    load_config(None, ["training.optim=adamw_torch", "data.hf_config=en", "data.source=hf", "data.hf_name=x",
                       "training.report_to=[wandb]"])
    assert {cls: [f.type for f in dataclasses.fields(cls)] for cls in before} == before


@pytest.mark.parametrize("overrides, message", [
    (["model.n_embd=100", "model.n_head=3"], "must be divisible by model.n_head=3"),
    (["model.block_size=1"], "model.block_size=1 must be >= 2"),
    (["training.per_device_train_batch_size=0"], "per_device_train_batch_size=0 must be >= 1"),
    (["training.max_steps=0"], "training.max_steps=0 must be >= 1"),
    (["quantization.recipe=e9m9"], "unknown recipe preset 'e9m9'"),
    (["training.warmup_steps=6000"], "warmup_steps=6000 must be in [0, max_steps=5000)"),
    (["training.lr_scheduler_type=linear"], "min_lr only applies to lr_scheduler_type 'cosine_with_min_lr'"),
    (["training.eval_strategy=no"], "training.eval_strategy is set by altgrad"),
    (["data.source=text"], "data.path=None is required for data.source='text'"),
    (["training.load_best_model_at_end=true", "training.max_steps=200", "training.warmup_steps=10"],
     "load_best_model_at_end needs an evaluation"),
])
def test_impossible_combinations_are_rejected(overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad, [])
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml", [])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config(None, ["training.max_steps"])


# --------------------------------------------------------------------------------------- train.py
def test_single_process_run_trains_and_saves(single_run):
    history = _log_history(single_run)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3, losses
    evals = [e for e in history if "eval_loss" in e]
    assert evals and evals[-1]["step"] == MAX_STEPS and "val/perplexity" in evals[-1]
    assert any("grad_cos_sim/mean" in e for e in history)  # the shadow ran
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "alerts.jsonl",
                 CONFIG_FILENAME, "trainer_state.json"):
        assert (single_run / name).is_file(), name
    resolved = yaml.safe_load((single_run / CONFIG_FILENAME).read_text())
    assert resolved["quantization"]["recipe"]["name"] == "e5m2" and resolved["model"]["n_layer"] == 2
    card = (single_run / "README.md").read_text()  # the card push_to_hub would push
    assert "E5M2" in card and "n_layer" in card and "learning_rate" in card

    import altgrad.modeling  # noqa: F401  (registers altgrad_gpt with the Auto classes)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(single_run)
    tok = AutoTokenizer.from_pretrained(single_run)
    ids = torch.tensor([tok.encode("ROMEO:")])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == model.config.vocab_size


def test_two_process_cpu_run_has_world_size_2(ddp_run):
    out, log = ddp_run
    assert "world_size=2" in log
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    # Each optimizer step consumed 2 processes x 8 samples.
    runtime = next(e for e in state["log_history"] if "train_runtime" in e)
    assert runtime["train_samples_per_second"] == pytest.approx(
        2 * 8 * MAX_STEPS / runtime["train_runtime"], rel=0.05)
    assert (out / "model.safetensors").is_file()


def _train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_config_exits_2_with_one_line(workdir, shakespeare_path):
    cfg = _tiny_config(workdir / "bad_cfg.yaml", shakespeare_path, workdir / "cache", workdir / "bad_out", "e5m2")
    _assert_one_line_error(_train_py("--config", str(cfg), "model.n_head=3"), "must be divisible by model.n_head=3")
    _assert_one_line_error(_train_py("--config", str(cfg), "training.bogus=1"), "unknown key 'training.bogus'")
    # Problems only the recipe application or the checkpoint check can see are still setup errors.
    _assert_one_line_error(
        _train_py("--config", str(cfg), "quantization.recipe=mxfp8", "model.n_embd=48", "model.n_head=2"),
        "block size 32 does not divide",
    )
    _assert_one_line_error(
        _train_py("--config", str(cfg), "quantization.recipe.exclude=['*']"), "selects no Linear layer"
    )
    _assert_one_line_error(
        _train_py("--config", str(cfg), f"training.resume_from_checkpoint={workdir / 'nowhere'}"), "is not a directory"
    )


def test_bad_data_exits_2_with_one_line(workdir, shakespeare_path, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.\n" * 3)
    cfg = _tiny_config(workdir / "bad_data.yaml", shakespeare_path, tmp_path / "cache", tmp_path / "out", "fp32")
    _assert_one_line_error(_train_py("--config", str(cfg), f"data.path={empty}"), "is empty")
    _assert_one_line_error(_train_py("--config", str(cfg), f"data.path={small}"), "block")


def _main_in_process(capsys, *args: str) -> tuple[int, str]:
    """recipes/train.py's main() in this process (no interpreter start-up): exit status and stderr."""
    import runpy

    main = runpy.run_path(str(TRAIN))["main"]
    capsys.readouterr()
    status = main(list(args))
    return status, capsys.readouterr().err


def _one_line_error_in_process(capsys, fragments: list[str], *args: str) -> str:
    status, err = _main_in_process(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_failed_setup_leaves_an_existing_run_directory_untouched(single_run, shakespeare_path, tmp_path, capsys,
                                                                  monkeypatch):
    """Data too short, or a resume from a corrupt checkpoint: exit 2 with one line, and the earlier run's
    experiment_config.yaml and alerts.jsonl (and the absence of a W&B folder) stay exactly as they were."""
    import shutil

    existing = tmp_path / "existing"
    shutil.copytree(single_run, existing, ignore=shutil.ignore_patterns("wandb"))
    (existing / "alerts.jsonl").write_text('{"step": 3, "rule": "overflow"}\n')  # an earlier run's alert
    record = _snapshot([existing / CONFIG_FILENAME, existing / "alerts.jsonl"])
    monkeypatch.setenv("WANDB_DIR", str(existing / "wandb"))  # train.py only sets these when unset
    monkeypatch.setenv("WANDB_PROJECT", "altgrad-test")
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.\n" * 3)
    cfg = _tiny_config(tmp_path / "cfg.yaml", shakespeare_path, tmp_path / "cache", existing, "e5m2")

    _one_line_error_in_process(capsys, ["block"], "--config", str(cfg), f"data.path={small}",
                               "training.report_to=[wandb]")
    assert _snapshot(list(record)) == record and not (existing / "wandb").exists()

    # A truncated model.safetensors is found during setup, not as a traceback from inside trainer.train().
    ckpt = existing / f"checkpoint-{MAX_STEPS}"
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = _one_line_error_in_process(
        capsys, [f"checkpoint {ckpt} is corrupt or incomplete", "model.safetensors", "resume from another checkpoint"],
        "--config", str(cfg), f"training.resume_from_checkpoint={ckpt}", "training.report_to=[wandb]")
    assert len(line) < 600, line
    assert _snapshot(list(record)) == record and not (existing / "wandb").exists()
    assert weights.read_bytes() == data[: len(data) // 2]  # the refusal changed nothing on disk


def test_help_explains_usage():
    proc = _train_py("--help")
    assert proc.returncode == 0 and "--config" in proc.stdout and "section.key=value" in proc.stdout


# --------------------------------------------------------------------------------------- compare.py
def test_compare_writes_report_and_plots(single_run, ddp_run, tmp_path):
    baseline, _ = ddp_run
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(COMPARE), str(single_run), "--baseline", str(baseline), "--out", str(out),
         "--bit-stall-max", "0.99"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    for column in ("final loss", "val loss", "val ppl", "val loss / baseline", "mean cos sim", "mean bit-stall",
                   "max overflow", "alerts", "wall time", "tokens/s", "verdict"):
        assert column in header, column
    rows = [line for line in report.splitlines() if line.startswith(("| e5m2_run", "| fp32_ddp_run"))]
    assert len(rows) == 2 and all("PASS" in r or "INVESTIGATE" in r for r in rows)
    assert "| fp32_ddp_run (baseline) |" in report and "| 1.000 |" in report
    for png in ("loss.png", "cos_sim.png", "bit_stall.png", "overflow.png", "bit_stall_heatmap_e5m2_run.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000, png
        assert f"]({png})" in report


def test_compare_judges_bit_stall_only_where_weights_are_stored_in_the_format(single_run, tmp_path):
    import shutil

    stored = tmp_path / "stored_run"  # the same history, under a recipe that rounds the master weights
    shutil.copytree(single_run, stored, ignore=shutil.ignore_patterns("checkpoint-*", "wandb"))
    config = yaml.safe_load((stored / CONFIG_FILENAME).read_text())
    config["quantization"]["recipe"]["stored_weight"] = "E5M2"
    (stored / CONFIG_FILENAME).write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(COMPARE), str(single_run), str(stored), "--baseline", str(single_run),
         "--out", str(out), "--bit-stall-max", "0.01"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    verdicts = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith(("e5m2_run", "stored_run")))
    assert "bit-stall" not in verdicts["e5m2_run"]  # forward copy of float32 master weights: reported only
    assert verdicts["stored_run"].startswith("INVESTIGATE") and "bit-stall" in verdicts["stored_run"]
    rows = {line.split(" |")[0]: line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")}
    assert "% † |" in rows["| e5m2_run (baseline)"] and "% † |" not in rows["| stored_run"]


def test_compare_groups_seeds_and_reads_checkpoints(single_run, tmp_path):
    """Runs that differ only in seed form a group; a run dir without trainer_state.json falls back
    to its latest checkpoint; a tight threshold flips the verdict."""
    import shutil

    seed_b = tmp_path / "seed_b"
    shutil.copytree(single_run / f"checkpoint-{MAX_STEPS}", seed_b / f"checkpoint-{MAX_STEPS}")
    config = yaml.safe_load((single_run / CONFIG_FILENAME).read_text())
    config["training"]["seed"] = 7
    config["training"]["output_dir"] = str(seed_b)
    (seed_b / CONFIG_FILENAME).write_text(yaml.safe_dump(config))
    (seed_b / "alerts.jsonl").write_text(json.dumps(
        {"step": 10, "level": "warn", "title": "Bit-stall rate high", "text": "t", "metrics": {}, "rule": "bit_stall"}) + "\n")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(COMPARE), str(seed_b), "--baseline", str(single_run), "--out", str(out),
         "--val-loss-tol", "0.10", "--cos-sim-min", "1.0", "--fail-on-investigate"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a cosine similarity is never above 1: INVESTIGATE
    report = (out / "report.md").read_text()
    assert "## Groups" in report and "e5m2_run (1337), seed_b (7)" in report and " ± " in report
    assert "0/1/0" in report and "Bit-stall rate high" in report
    assert f"checkpoint-{MAX_STEPS}/trainer_state.json" in report
