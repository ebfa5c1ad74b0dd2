"""Quantization recipes as data: which tensors of which layers live in which format, and how they are scaled.

A :class:`QuantRecipe` names a :class:`TensorQuantSpec` per tensor role:

- ``weight``: weights as the forward GEMM sees them,
- ``activation``: Linear inputs in the forward GEMM (and, saved, in the weight-gradient GEMM),
- ``grad_output``: output gradients entering both backward GEMMs,
- ``weight_grad``: weight gradients as the optimizer receives them,
- ``stored_weight``: the master weights themselves, rounded into the format after every optimizer step
  (where bit-stall bites). ``None`` keeps high-precision master weights, as real FP8 training does.

Recipes load from plain dicts / YAML, and the presets below are ordinary recipes.

Example:
    >>> r = get_recipe("fp8_hybrid")
    >>> r.weight.format, r.grad_output.format, r.weight.scaling
    ('E4M3', 'E5M2', 'delayed')
    >>> QuantRecipe.from_dict({"name": "mine", "weight": {"format": "e3m4"}}).weight.format
    'E3M4'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from altgrad.quantization import ROUNDING_MODES, get_format

__all__ = ["TensorQuantSpec", "QuantRecipe", "RECIPE_PRESETS", "get_recipe", "TENSOR_ROLES"]

TENSOR_ROLES = ("weight", "activation", "grad_output", "weight_grad", "stored_weight")
_SCALINGS = ("delayed", "current", "none")
_GRANULARITIES = ("tensor", "row", "block")
_AMAX_ALGOS = ("max", "most_recent")
_BACKENDS = ("simulated", "native_fp8")


def _reject_unknown(cls, data: dict, where: str) -> None:
    valid = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")


@dataclass(frozen=True)
class TensorQuantSpec:
    """How one tensor role is quantized.

    Example:
        >>> TensorQuantSpec("E5M2", scaling="current", granularity="row").granularity
        'row'
    """

    # Target format: a registry name (case-insensitive) such as "E4M3", "E5M2", "E3M4", "E2M1".
    format: str = "E4M3"
    # "nearest" is what hardware casts do; "stochastic" is unbiased, so tiny updates survive on
    # average (the usual cure for bit-stall) at the price of extra noise; "zero" truncates.
    rounding: str = "nearest"
    # "delayed": scale from an amax history of past steps (Transformer Engine; no extra pass before
    # the GEMM, but an outlier overflows once). "current": from this tensor's own amax (exact range
    # use, one extra reduction). "none": no scaling at all (the raw format range; shows why scaling
    # matters).
    scaling: str = "delayed"
    # "tensor": one scale; "row": one per row (amax over the last dim); "block": one per block of
    # `block_size` elements along the last dim (block 32 + scale_format E8M0 is MX).
    granularity: str = "tensor"
    # Elements per block for granularity "block" (32 for MX, 128 for DeepSeek-V3-style 1x128).
    block_size: int = 32
    # Delayed scaling: steps of amax history and how they are reduced ("max" is robust, "most_recent"
    # tracks faster).
    amax_history_len: int = 16
    amax_algo: str = "max"
    # Headroom: the scale maps amax to max_value / 2**margin. Larger margins overflow less and
    # underflow more.
    margin: int = 0
    # Round scales down to powers of two: x * scale becomes exact, at most one binade of range lost.
    power_of_two: bool = False
    # Scale type. None: float32 scales. "E8M0": MX shared exponents (implies power-of-two scales).
    scale_format: str | None = None
    # Clamp overflow to +-max (True, what FP8 training does) or produce the format's inf/NaN (False).
    saturate: bool = True

    def __post_init__(self) -> None:
        fmt = get_format(self.format)  # raises with the registry listed
        if not fmt.signed:
            raise ValueError(
                f"format {fmt.name} has no sign bit (a scale type): weights, activations and gradients need a "
                "signed format; use it as scale_format instead"
            )
        object.__setattr__(self, "format", fmt.name)
        for name in ("power_of_two", "saturate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        checks = [
            ("rounding", self.rounding, ROUNDING_MODES),
            ("scaling", self.scaling, _SCALINGS),
            ("granularity", self.granularity, _GRANULARITIES),
            ("amax_algo", self.amax_algo, _AMAX_ALGOS),
        ]
        for name, value, accepted in checks:
            if value not in accepted:
                raise ValueError(f"{name}={value!r} is not accepted; accepted: {list(accepted)}")
        for name in ("block_size", "amax_history_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.margin, int) or isinstance(self.margin, bool):
            raise ValueError(f"margin must be an int (a power-of-two exponent), got {self.margin!r}")
        if self.scaling == "delayed" and self.granularity != "tensor":
            raise ValueError(
                f"delayed scaling keeps one amax history per tensor; granularity={self.granularity!r} needs "
                "scaling='current'"
            )
        if self.scale_format is not None:
            sfmt = get_format(self.scale_format)
            if sfmt.name != "E8M0":
                raise ValueError(f"scale_format must be None (float32) or 'E8M0', got {self.scale_format!r}")
            object.__setattr__(self, "scale_format", sfmt.name)
            if self.scaling != "current":
                raise ValueError("E8M0 (MX) scales are computed per block from the current tensor: use scaling='current'")

    @classmethod
    def from_dict(cls, data: dict | "TensorQuantSpec" | None, where: str = "spec") -> "TensorQuantSpec | None":
        if data is None or isinstance(data, TensorQuantSpec):
            return data
        if isinstance(data, str):  # shorthand: just a format name
            return cls(format=data)
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping or a format name, got {type(data).__name__}")
        _reject_unknown(cls, data, where)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class QuantRecipe:
    """Which tensors of which Linear layers are quantized, and how.

    ``modules``/``exclude`` are ``fnmatch`` patterns on module names (nanoGPT layout): the default
    selects every Linear inside the transformer blocks; embeddings, ``lm_head`` and LayerNorms stay in
    high precision unless a pattern names them (``lm_head`` is a Linear and can be selected).

    Example:
        >>> QuantRecipe(name="w-only", weight=TensorQuantSpec("E4M3")).roles()
        ['weight']
    """

    name: str = "custom"
    weight: TensorQuantSpec | None = None
    activation: TensorQuantSpec | None = None
    grad_output: TensorQuantSpec | None = None
    weight_grad: TensorQuantSpec | None = None
    stored_weight: TensorQuantSpec | None = None
    # Module-name patterns of the Linear layers to convert, and patterns to leave out.
    modules: tuple[str, ...] = ("transformer.h.*",)
    exclude: tuple[str, ...] = ()
    # "simulated": fake-quantized operands, float32/bf16 GEMMs (any format). "native_fp8": real FP8
    # GEMMs (torch._scaled_mm) on Hopper for E4M3/E5M2 roles, simulation elsewhere.
    backend: str = "simulated"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for role in TENSOR_ROLES:
            object.__setattr__(self, role, TensorQuantSpec.from_dict(getattr(self, role), where=f"recipe.{role}"))
        for attr in ("modules", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"recipe.{attr} must be a list of module-name patterns, got {value!r}")
            object.__setattr__(self, attr, tuple(value))
        if self.backend not in _BACKENDS:
            raise ValueError(f"recipe.backend={self.backend!r} is not accepted; accepted: {list(_BACKENDS)}")

    def roles(self) -> list[str]:
        """The roles this recipe quantizes."""
        return [r for r in TENSOR_ROLES if getattr(self, r) is not None]

    @property
    def is_noop(self) -> bool:
        return not self.roles()

    @classmethod
    def from_dict(cls, data: dict | str | "QuantRecipe" | None) -> "QuantRecipe":
        """Build from a dict (YAML), a preset name, or ``{"preset": name, ...overrides}``."""
        if data is None:
            return get_recipe("bf16")
        if isinstance(data, QuantRecipe):
            return data
        if isinstance(data, str):
            return get_recipe(data)
        if not isinstance(data, dict):
            raise ValueError(f"quantization recipe must be a mapping or a preset name, got {type(data).__name__}")
        data = dict(data)
        preset = data.pop("preset", None)
        _reject_unknown(cls, data, "quantization recipe")
        if preset is not None:
            base = get_recipe(preset).to_dict()
            base.update(data)
            data = base
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for role in TENSOR_ROLES:
            spec = getattr(self, role)
            out[role] = None if spec is None else spec.to_dict()
        out.update(modules=list(self.modules), exclude=list(self.exclude), backend=self.backend)
        if self.description:
            out["description"] = self.description
        return out


def _all_roles(spec: TensorQuantSpec, name: str, description: str, **extra) -> QuantRecipe:
    return QuantRecipe(
        name=name,
        weight=spec,
        activation=spec,
        grad_output=spec,
        weight_grad=spec,
        description=description,
        **extra,
    )


_DELAYED = dict(scaling="delayed", amax_history_len=16, amax_algo="max")

RECIPE_PRESETS: dict[str, QuantRecipe] = {
    "bf16": QuantRecipe(name="bf16", description="No quantization: the high-precision baseline."),
    "e5m2": _all_roles(
        TensorQuantSpec("E5M2", **_DELAYED),
        "e5m2",
        "Every role in E5M2 with delayed per-tensor scaling (the E5M2-vs-BF16 experiment).",
    ),
    "fp8_hybrid": QuantRecipe(
        name="fp8_hybrid",
        weight=TensorQuantSpec("E4M3", **_DELAYED),
        activation=TensorQuantSpec("E4M3", **_DELAYED),
        grad_output=TensorQuantSpec("E5M2", **_DELAYED),
        description="Transformer Engine's HYBRID: E4M3 forward, E5M2 backward, delayed per-tensor scaling.",
    ),
    "mxfp8": QuantRecipe(
        name="mxfp8",
        weight=TensorQuantSpec("E4M3", scaling="current", granularity="block", block_size=32, scale_format="E8M0"),
        activation=TensorQuantSpec("E4M3", scaling="current", granularity="block", block_size=32, scale_format="E8M0"),
        grad_output=TensorQuantSpec("E5M2", scaling="current", granularity="block", block_size=32, scale_format="E8M0"),
        description="OCP MXFP8: 1x32 blocks with E8M0 shared scales; E4M3 forward, E5M2 backward.",
    ),
}
for _fmt in ("e3m4", "e2m5", "e1m6", "e7m0"):
    RECIPE_PRESETS[_fmt] = _all_roles(
        TensorQuantSpec(_fmt.upper(), **_DELAYED),
        _fmt,
        f"Exotic format: every role in {_fmt.upper()} with delayed per-tensor scaling.",
    )


def get_recipe(name: str) -> QuantRecipe:
    """A preset by name (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in RECIPE_PRESETS:
        raise ValueError(f"unknown recipe preset {name!r}; presets: {sorted(RECIPE_PRESETS)}")
    return RECIPE_PRESETS[key]
