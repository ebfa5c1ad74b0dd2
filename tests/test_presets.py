"""Presets that say what they do: `fp32` quantizes nothing, `bf16` feeds every GEMM the operands bf16 autocast
would, and a checkpoint of the old no-op `bf16` explains the rename instead of changing meaning silently."""

from __future__ import annotations

import copy
import json

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from altgrad.config import load_config
from altgrad.quantization import quantize
from altgrad.training import QuantRecipe, TensorQuantizer, get_recipe, quantize_model
from altgrad.training.checkpointing import RUN_INFO_FILE, CheckpointError, check_compatible
from altgrad.training.recipe import preset_note, recipe_mismatch
from test_trainer import tiny_gpt

# The recipe dict altgrad 0.1 wrote into checkpoints for its no-op preset, then called "bf16".
LEGACY_BF16 = {
    "name": "bf16", "weight": None, "activation": None, "grad_output": None, "weight_grad": None,
    "stored_weight": None, "modules": ["transformer.h.*"], "exclude": [], "backend": "simulated",
}


def _hard_values() -> torch.Tensor:
    """float32 values across the whole range: normals, bf16/fp16 subnormals, ties, overflow, inf, NaN, -0."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-140, 127, (20000,), generator=g).float())
    bits = torch.randint(0, 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    ties = (torch.arange(1, 2000, dtype=torch.int32) << 15 | 0x8000).view(torch.float32)  # exact bf16 ties
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.39e38, -3.4e38, 65504.0,
                            65520.0, 1e-45, -6e-8, 2.9e-8, 1.17e-38, 9.2e-41])
    return torch.cat([wide, bits, ties, -ties, special])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    both_nan = a.isnan() & b.isnan()
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


def test_fp32_and_none_quantize_nothing_and_bf16_rounds_the_gemm_operands():
    assert get_recipe("fp32").is_noop and get_recipe("none") is get_recipe("fp32") and get_recipe("NONE").name == "fp32"
    assert QuantRecipe.from_dict(None) == get_recipe("fp32")
    bf16 = get_recipe("bf16")
    assert bf16.roles() == ["weight", "activation", "grad_output"] and "lm_head" in bf16.modules
    for spec in (bf16.weight, bf16.activation, bf16.grad_output):
        assert (spec.format, spec.scaling, spec.rounding, spec.saturate) == ("BF16", "none", "nearest", False)
    assert QuantRecipe.from_dict(bf16.to_dict()) == bf16
    model = tiny_gpt()
    names = [n for n, _ in quantize_model(model, "bf16").layers]
    assert names[-1] == "lm_head" and len(names) == 9
    assert load_config(None, []).recipe.name == "fp32"  # the default experiment quantizes nothing


@pytest.mark.parametrize("fmt, dtype, oracle", [("BF16", torch.bfloat16, ml_dtypes.bfloat16),
                                                ("FP16", torch.float16, np.float16)])
def test_16_bit_formats_equal_torch_and_ml_dtypes_casts_bit_for_bit(fmt, dtype, oracle):
    x = _hard_values()
    spec = get_recipe("bf16").weight if fmt == "BF16" else None
    q = TensorQuantizer(spec)(x) if spec is not None else quantize(x, fmt, None, saturate=False)
    assert _same_bits(q, x.to(dtype).float())
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf and NaN are part of the check
        ref = torch.from_numpy(x.numpy().astype(oracle).astype(np.float32))
    assert _same_bits(q, ref)


class _GemmOperands(TorchDispatchMode):
    """Every matrix operand of the matmuls dispatched (after autocast and autograd have had their say)."""

    def __init__(self) -> None:
        super().__init__()
        self.operands: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.operands += [a.detach().float().contiguous() for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
        return func(*args, **(kwargs or {}))


def _sorted_by_shape(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return sorted(ts, key=lambda t: (tuple(t.shape), t.sum().item()))


def test_bf16_recipe_feeds_the_gemms_what_autocast_feeds_them(monkeypatch):
    monkeypatch.setenv("ALTGRAD_DISABLE_COMPILE", "1")  # dispatch modes and torch.compile do not mix
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16) * torch.logspace(-30, 30, 16)  # (4, 6, 16): bf16 rounding in every binade
    g = torch.randn(4, 6, 8) * 1e-3  # the loss gradient w.r.t. the output
    linear = nn.Linear(16, 8, bias=False)
    with _GemmOperands() as auto:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear(x.clone().requires_grad_())
        # autocast's output is bf16, so the gradient entering its backward GEMMs is bf16(g).
        (y.float() * g).sum().backward()
    net = nn.Sequential(copy.deepcopy(linear))
    quantize_model(net, "bf16", modules=["0"])
    with _GemmOperands() as ours:
        (net(x.clone().requires_grad_()) * g).sum().backward()
    assert len(auto.operands) == len(ours.operands) == 6  # forward, grad-input and grad-weight GEMMs
    for a, b in zip(_sorted_by_shape(auto.operands), _sorted_by_shape(ours.operands)):
        assert a.shape == b.shape and torch.equal(a, b)
    assert not torch.equal(ours.operands[0], x.reshape(24, 16))  # the operands really were rounded


def test_a_checkpoint_of_the_old_noop_bf16_explains_the_rename(tmp_path):
    (tmp_path / RUN_INFO_FILE).write_text(json.dumps({"recipe": LEGACY_BF16}))
    check_compatible(str(tmp_path), None, get_recipe("fp32"))  # same meaning under its new name: resumes
    with pytest.raises(CheckpointError, match=r"old no-op preset 'bf16'.*quantization.recipe=fp32"):
        check_compatible(str(tmp_path), None, get_recipe("bf16"))
    model = tiny_gpt()
    q = quantize_model(model, "bf16")
    with pytest.raises(ValueError, match="old no-op preset 'bf16'"):
        q.load_state_dict({"recipe": LEGACY_BF16, "quantizers": {}})
    quantize_model(tiny_gpt(), "fp32").load_state_dict({"recipe": LEGACY_BF16, "quantizers": {}})


def test_recipes_compare_as_recipes_so_older_checkpoints_still_match():
    saved = get_recipe("e5m2").to_dict()
    saved["weight"]["compensation"] = "none"  # a default written out, or left out: the same recipe
    saved["optimizer_m"] = None
    assert recipe_mismatch(saved, get_recipe("e5m2")) is None
    assert "'e5m2', this run uses 'e3m4'" in recipe_mismatch(saved, get_recipe("e3m4"))


def test_a_config_naming_bf16_gets_a_note_about_the_new_meaning():
    assert "fp32" in preset_note("bf16") and "fp32" in preset_note({"preset": "bf16", "exclude": ["lm_head"]})
    assert preset_note("fp32") is None and preset_note({"name": "x", "weight": "e4m3"}) is None
