"""Recipes as data: presets, YAML round trips, enums parsed once, granularities, clear rejections."""

from __future__ import annotations

import json

import pytest
import yaml

from altgrad.quantization import Granularity
from altgrad.training import QuantLinear, QuantRecipe, TensorQuantSpec, get_recipe, quantize_model
from altgrad.training.recipe import AmaxAlgo, Backend, GranularityKind, Rounding, Scaling
from test_trainer import tiny_gpt


# --------------------------------------------------------------------------- recipes
def test_presets_and_yaml_friendly_round_trip():
    for name in ("fp32", "bf16", "e5m2", "fp8_hybrid", "mxfp8", "e3m4", "e2m5", "e1m6", "e7m0"):
        r = get_recipe(name)
        assert QuantRecipe.from_dict(r.to_dict()) == r
    assert get_recipe("fp32").is_noop
    hybrid = get_recipe("fp8_hybrid")
    assert (hybrid.weight.format, hybrid.activation.format, hybrid.grad_output.format) == ("E4M3", "E4M3", "E5M2")
    custom = QuantRecipe.from_dict({"preset": "e5m2", "stored_weight": {"format": "e5m2", "rounding": "stochastic"}})
    assert custom.stored_weight.rounding == "stochastic" and custom.weight.format == "E5M2"


@pytest.mark.parametrize(
    "data, match",
    [
        ({"wieght": "e4m3"}, "unknown key.*valid keys"),
        ({"weight": {"format": "e4m3", "round": "nearest"}}, "unknown key.*valid keys"),
        ({"weight": {"format": "e9m9"}}, "unknown format"),
        ({"weight": {"format": "e4m3", "scaling": "lazy"}}, "accepted"),
        ({"weight": {"format": "e4m3", "granularity": "row"}}, "needs scaling='current'"),
        ({"preset": "fp9"}, "unknown recipe preset"),
        ({"backend": "tpu"}, "accepted"),
        ({"weight": {"format": "e8m0"}}, "no sign bit"),
        ({"weight": {"format": "e4m3", "power_of_two": "false"}}, "must be true or false"),
        ({"modules": 5}, "list of module-name patterns"),
        ({"weight": {"format": "e4m3", "rounding": "up"}}, r"rounding='up' is not accepted; accepted: \['nearest', "),
        ({"weight": {"format": "e4m3", "amax_algo": 1}}, "amax_algo=1 is not accepted"),
        ({"weight": {"format": "e4m3", "granularity": "tile"}}, "needs scaling='current'"),
        ({"activation": {"format": "e4m3", "scaling": "current", "granularity": "tile"}}, "tile.*needs a 2-D tensor"),
    ],
)
def test_bad_recipes_are_rejected_clearly(data, match):
    with pytest.raises(ValueError, match=match):
        QuantRecipe.from_dict(data)


def test_default_patterns_select_block_linears_only():
    model = tiny_gpt()
    q = quantize_model(model, "e5m2")
    names = [n for n, _ in q.layers]
    assert names == [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert not isinstance(model.lm_head, QuantLinear)
    with pytest.raises(ValueError, match="selects no Linear layer"):
        quantize_model(tiny_gpt(), QuantRecipe(weight=TensorQuantSpec("E4M3"), modules=("nothing.*",)))


# --------------------------------------------------------------------------- enums, parsed once
def test_strings_are_parsed_once_into_enums_case_insensitively():
    spec = TensorQuantSpec("e5m2", rounding="Stochastic", scaling="CURRENT", granularity=" Row", amax_algo="Most_Recent")
    assert spec.rounding is Rounding.STOCHASTIC and spec.scaling is Scaling.CURRENT
    assert spec.granularity is GranularityKind.ROW and spec.amax_algo is AmaxAlgo.MOST_RECENT
    assert spec == TensorQuantSpec("E5M2", rounding=Rounding.STOCHASTIC, scaling="current", granularity="row",
                                   amax_algo="most_recent")
    # Members are their strings: comparisons, dict keys and messages written against strings still work.
    assert spec.rounding == "stochastic" and {"stochastic": 1}[spec.rounding] == 1
    assert f"{spec.scaling}" == str(spec.scaling) == "current"
    recipe = QuantRecipe.from_dict({"preset": "fp8_hybrid", "backend": "NATIVE_FP8"})
    assert recipe.backend is Backend.NATIVE_FP8 and recipe.backend == "native_fp8"


def test_to_dict_is_plain_yaml_data_unchanged_for_existing_recipes():
    # What a checkpoint written before the enums stored for fp8_hybrid (altgrad_run.json / quantizer state):
    delayed = {
        "rounding": "nearest", "scaling": "delayed", "granularity": "tensor", "block_size": 32,
        "amax_history_len": 16, "amax_algo": "max", "margin": 0, "power_of_two": False, "scale_format": None,
        "saturate": True,
    }
    saved = {
        "name": "fp8_hybrid",
        "weight": {"format": "E4M3", **delayed},
        "activation": {"format": "E4M3", **delayed},
        "grad_output": {"format": "E5M2", **delayed},
        "weight_grad": None,
        "stored_weight": None,
        "modules": ["transformer.h.*"],
        "exclude": [],
        "backend": "simulated",
    }
    current = get_recipe("fp8_hybrid").to_dict()
    current.pop("description")
    assert current == saved and json.dumps(current, sort_keys=True) == json.dumps(saved, sort_keys=True)
    for name in ("e5m2", "mxfp8", "e3m4"):
        data = get_recipe(name).to_dict()
        # Only plain types: safe_dump refuses anything else, and torch.load(weights_only=True) would too.
        assert yaml.safe_load(yaml.safe_dump(data)) == data
        for spec in (v for v in data.values() if isinstance(v, dict)):
            assert all(type(v) in (str, int, bool, type(None)) for v in spec.values()), spec
        assert type(data["backend"]) is str


def test_granularity_tensor_row_block_and_tile_map_to_the_quantizers_tilings():
    cases = {
        ("tensor", 32): Granularity.per_tensor(),
        ("row", 32): Granularity.per_row(-1),
        ("block", 32): Granularity.per_block(1, 32),  # MX
        ("block", 128): Granularity.per_block(1, 128),  # DeepSeek-V3 activations
        ("tile", 128): Granularity.per_block(128, 128),  # DeepSeek-V3 weights
    }
    for (kind, n), expected in cases.items():
        spec = TensorQuantSpec("E4M3", scaling="current", granularity=kind, block_size=n)
        assert spec.scale_granularity == expected, kind
        assert TensorQuantSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["granularity"] == kind
    tiled = QuantRecipe.from_dict(
        {"weight": {"format": "e4m3", "scaling": "current", "granularity": "tile", "block_size": 128}}
    )
    assert yaml.safe_load(yaml.safe_dump(tiled.to_dict())) == tiled.to_dict()
    assert QuantRecipe.from_dict(tiled.to_dict()) == tiled
