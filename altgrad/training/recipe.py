"""Quantization recipes as data: which tensors of which layers live in which format, and how they are scaled.

A :class:`QuantRecipe` names a :class:`TensorQuantSpec` per tensor role:

- ``weight``: weights as the forward GEMM sees them,
- ``activation``: Linear inputs in the forward GEMM (and, saved, in the weight-gradient GEMM),
- ``grad_output``: output gradients entering both backward GEMMs,
- ``weight_grad``: weight gradients as the optimizer receives them,
- ``stored_weight``: the master weights themselves, rounded into the format after every optimizer step
  (where bit-stall bites). ``None`` keeps high-precision master weights, as real FP8 training does.
  ``compensation: kahan`` adds a compensation buffer that carries each rounding error into the next update.
- ``optimizer_m`` / ``optimizer_v``: the optimizer's first and second moments (``exp_avg`` /
  ``exp_avg_sq``, as AdamW names them), rounded into the format after every optimizer step, for every
  parameter the optimizer updates (see :mod:`altgrad.training.optimizer_states`).

Presets: ``fp32`` (alias ``none``) quantizes nothing; ``bf16`` rounds the three GEMM operands (weight,
activation, grad_output) to BF16 with round-to-nearest-even, the operands ``torch.autocast(dtype=
torch.bfloat16)`` feeds its GEMMs; the FP8 and exotic presets follow. Until altgrad 0.1 ``bf16`` named
the no-op recipe: :func:`recipe_mismatch` explains that rename to a checkpoint written with it.

Recipes load from plain dicts / YAML, and the presets below are ordinary recipes.

Example:
    >>> r = get_recipe("fp8_hybrid")
    >>> r.weight.format, r.grad_output.format, r.weight.scaling.value
    ('E4M3', 'E5M2', 'delayed')
    >>> QuantRecipe.from_dict({"name": "mine", "weight": {"format": "e3m4"}}).weight.format
    'E3M4'
    >>> get_recipe("none").name, get_recipe("bf16").roles()
    ('fp32', ['weight', 'activation', 'grad_output'])
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from altgrad.quantization import ROUNDING_MODES, Granularity, get_format

__all__ = [
    "TensorQuantSpec",
    "QuantRecipe",
    "RECIPE_PRESETS",
    "get_recipe",
    "recipe_mismatch",
    "preset_note",
    "TENSOR_ROLES",
    "LAYER_ROLES",
    "OPTIMIZER_ROLES",
    "OPTIMIZER_STATE_KEYS",
    "Rounding",
    "Compensation",
    "Scaling",
    "GranularityKind",
    "AmaxAlgo",
    "Backend",
]

# Roles of a converted Linear layer, and roles of the optimizer's state (one tensor per parameter).
LAYER_ROLES = ("weight", "activation", "grad_output", "weight_grad", "stored_weight")
OPTIMIZER_ROLES = ("optimizer_m", "optimizer_v")
TENSOR_ROLES = LAYER_ROLES + OPTIMIZER_ROLES
# The optimizer-state key each optimizer role rounds: torch's Adam family (Adam, AdamW, NAdam, RAdam) and
# most third-party Adams name their moments this way. Also the role's name in metrics and checkpoints.
OPTIMIZER_STATE_KEYS = {"optimizer_m": "exp_avg", "optimizer_v": "exp_avg_sq"}
# Roles whose tensor is always a (out_features, in_features) matrix: the only ones 2-D tiles can cover.
# Activations and output gradients are (..., features) with an input-dependent number of leading dims.
_MATRIX_ROLES = ("weight", "weight_grad", "stored_weight")


class _Choice(str, Enum):
    """A closed set of YAML strings, parsed once.

    Members are ``str`` subclasses that compare equal to, hash like, and print as their value, so code
    written against the plain strings (``spec.scaling == "delayed"``, ``f"{spec.rounding}"``) keeps
    working; ``to_dict()`` emits ``.value`` so YAML and checkpoints only ever see plain strings.
    """

    def __str__(self) -> str:  # Python 3.10 would print "Rounding.NEAREST"
        return self.value

    def __format__(self, format_spec: str) -> str:  # and 3.12 would do so in f-strings
        return format(self.value, format_spec)

    @classmethod
    def parse(cls, value: Any, name: str):
        """The member for ``value`` (a member or its string, case-insensitive); ValueError naming the
        accepted values otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise ValueError(f"{name}={value!r} is not accepted; accepted: {[m.value for m in cls]}")


class Rounding(_Choice):
    """How values between two grid points are rounded (see ``altgrad.quantization.ROUNDING_MODES``).

    Example:
        >>> Rounding.parse("Stochastic", "rounding") == "stochastic"
        True
    """

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    ZERO = "zero"


class Compensation(_Choice):
    """What a stored weight does with the error its rounding makes.

    ``none``: the error is lost (an update below half a grid step stalls for good, unless rounding is
    stochastic). ``kahan``: Kahan-compensated storage (as in optimi and Zamirai et al., 2020): a buffer
    ``c`` keeps ``(w_stored_before + update + c) - w_stored_after`` and adds it to the next update, so
    small updates accumulate in ``c`` until they move the stored weight.

    Example:
        >>> Compensation.parse("Kahan", "compensation") is Compensation.KAHAN
        True
    """

    NONE = "none"
    KAHAN = "kahan"


class Scaling(_Choice):
    """Where the scale comes from: an amax history (delayed), this tensor (current), or nowhere (none)."""

    DELAYED = "delayed"
    CURRENT = "current"
    NONE = "none"


class GranularityKind(_Choice):
    """Which elements share one scale (the tiling itself is :attr:`TensorQuantSpec.scale_granularity`)."""

    TENSOR = "tensor"
    ROW = "row"
    BLOCK = "block"
    TILE = "tile"


class AmaxAlgo(_Choice):
    """How a delayed-scaling amax history is reduced to one amax."""

    MAX = "max"
    MOST_RECENT = "most_recent"


class Backend(_Choice):
    """Who runs the GEMMs of a recipe's layers."""

    SIMULATED = "simulated"
    NATIVE_FP8 = "native_fp8"


# The kernel's own list is the source of truth; a mode added there must be added here (and vice versa).
assert {m.value for m in Rounding} == set(ROUNDING_MODES), (sorted(ROUNDING_MODES), list(Rounding))


def _reject_unknown(cls, data: dict, where: str) -> None:
    valid = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")


@dataclass(frozen=True)
class TensorQuantSpec:
    """How one tensor role is quantized. Strings are parsed into the enums once, here.

    ``scale_granularity`` (derived, not a field) is the :class:`altgrad.quantization.Granularity` that
    ``granularity`` and ``block_size`` describe.

    Example:
        >>> spec = TensorQuantSpec("E5M2", scaling="current", granularity="ROW")
        >>> spec.granularity is GranularityKind.ROW, spec.granularity == "row", spec.to_dict()["granularity"]
        (True, True, 'row')
        >>> TensorQuantSpec("E4M3", scaling="current", granularity="tile", block_size=128).scale_granularity
        Granularity(kind='block', axis=-1, block_shape=(128, 128))
    """

    # Target format: a registry name (case-insensitive) such as "E4M3", "E5M2", "E3M4", "E2M1".
    format: str = "E4M3"
    # "nearest" is what hardware casts do; "stochastic" is unbiased, so tiny updates survive on
    # average (the usual cure for bit-stall) at the price of extra noise; "zero" truncates.
    rounding: Rounding = Rounding.NEAREST
    # "delayed": scale from an amax history of past steps (Transformer Engine; no extra pass before
    # the GEMM, but an outlier overflows once). "current": from this tensor's own amax (exact range
    # use, one extra reduction). "none": no scaling at all (the raw format range; shows why scaling
    # matters).
    scaling: Scaling = Scaling.DELAYED
    # Which elements share one scale:
    #   "tensor": one scale;
    #   "row":    one per row (amax over the last dim);
    #   "block":  one per 1 x block_size run along the last dim (block 32 + scale_format E8M0 is MX;
    #             128 is DeepSeek-V3's activation blocks);
    #   "tile":   one per block_size x block_size tile of a matrix (128 is DeepSeek-V3's weight tiles).
    #             Only for the matrix roles (weight, weight_grad, stored_weight): activations and output
    #             gradients have input-dependent leading dims.
    granularity: GranularityKind = GranularityKind.TENSOR
    # Block length ("block") or tile side ("tile"); unused otherwise.
    block_size: int = 32
    # Delayed scaling: steps of amax history and how they are reduced ("max" is robust, "most_recent"
    # tracks faster).
    amax_history_len: int = 16
    amax_algo: AmaxAlgo = AmaxAlgo.MAX
    # Headroom: the scale maps amax to max_value / 2**margin. Larger margins overflow less and
    # underflow more.
    margin: int = 0
    # Round scales down to powers of two: x * scale becomes exact, at most one binade of range lost.
    power_of_two: bool = False
    # Scale type. None: float32 scales. "E8M0": MX shared exponents (implies power-of-two scales).
    scale_format: str | None = None
    # Clamp overflow to +-max (True, what FP8 training does) or produce the format's inf/NaN (False,
    # what a plain cast such as x.to(torch.bfloat16) does).
    saturate: bool = True
    # stored_weight only. "none": the rounding error of a stored weight is lost. "kahan": a compensation
    # buffer carries it into the next update (cures bit-stall deterministically; costs a buffer the size
    # of the weights, kept in bf16: 2 bytes per weight, the choice optimi makes for bf16 weights).
    compensation: Compensation = Compensation.NONE

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
        for name, kind in (
            ("rounding", Rounding),
            ("scaling", Scaling),
            ("granularity", GranularityKind),
            ("amax_algo", AmaxAlgo),
            ("compensation", Compensation),
        ):
            object.__setattr__(self, name, kind.parse(getattr(self, name), name))
        for name in ("block_size", "amax_history_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.margin, int) or isinstance(self.margin, bool):
            raise ValueError(f"margin must be an int (a power-of-two exponent), got {self.margin!r}")
        if self.scaling is Scaling.DELAYED and self.granularity is not GranularityKind.TENSOR:
            raise ValueError(
                f"delayed scaling keeps one amax history per tensor; granularity={self.granularity.value!r} needs "
                "scaling='current'"
            )
        if self.scale_format is not None:
            sfmt = get_format(self.scale_format)
            if sfmt.name != "E8M0":
                raise ValueError(f"scale_format must be None (float32) or 'E8M0', got {self.scale_format!r}")
            object.__setattr__(self, "scale_format", sfmt.name)
            if self.scaling is not Scaling.CURRENT:
                raise ValueError("E8M0 (MX) scales are computed per block from the current tensor: use scaling='current'")
        # The scale tiling in altgrad.quantization's terms, built once: every quantizer call needs it.
        # A plain attribute, not a field (it is derived, so equality and to_dict() ignore it), and not a
        # cached_property, whose lock torch.compile would have to trace on Python 3.11.
        object.__setattr__(self, "scale_granularity", self._scale_granularity())

    def _scale_granularity(self) -> Granularity:
        kind = self.granularity
        if kind is GranularityKind.TENSOR:
            return Granularity.per_tensor()
        if kind is GranularityKind.ROW:
            return Granularity.per_row(-1)
        if kind is GranularityKind.BLOCK:
            return Granularity.per_block(self.block_size)  # (1, block_size)
        return Granularity.per_block(self.block_size, self.block_size)

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
        """Plain YAML data: the enums as their strings (the format checkpoints store and compare).
        ``compensation`` appears only when set, so recipes without it keep the dict older checkpoints hold."""
        out = {k: v.value if isinstance(v, Enum) else v for k, v in dataclasses.asdict(self).items()}
        if self.compensation is Compensation.NONE:
            del out["compensation"]
        return out


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
    # Adam's moments, stored in a low-precision format (rounded after every optimizer step, as MS-AMP keeps
    # m in FP8 and v in FP16). Applied to every parameter the optimizer updates (embeddings and LayerNorms
    # included: optimizer memory is per parameter), not only the converted Linear layers. The two moments
    # get separate specs because they need different things: m is signed and tracks the gradient (an FP8
    # format with per-tensor scaling carries it), v is non-negative and spans many binades (its small
    # entries underflow in a narrow format, and m / sqrt(v) then explodes: give it range, a 16-bit format
    # or per-row / block scales).
    optimizer_m: TensorQuantSpec | None = None
    optimizer_v: TensorQuantSpec | None = None
    # Module-name patterns of the Linear layers to convert, and patterns to leave out.
    modules: tuple[str, ...] = ("transformer.h.*",)
    exclude: tuple[str, ...] = ()
    # "simulated": fake-quantized operands, float32/bf16 GEMMs (any format). "native_fp8": real FP8
    # GEMMs (torch._scaled_mm) on Hopper for E4M3/E5M2 roles, simulation elsewhere.
    backend: Backend = Backend.SIMULATED
    # Per-(layer, role) exceptions, as ``("<module pattern>/<role>", spec or None)`` pairs (YAML: a mapping
    # ``{"transformer.h.1.mlp.c_proj/grad_output": null}``); the last matching entry wins. None keeps
    # that tensor in high precision: how `recipes/replay.py` writes a recipe that promotes the culprits.
    overrides: tuple[tuple[str, TensorQuantSpec | None], ...] = ()
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
        object.__setattr__(self, "backend", Backend.parse(self.backend, "recipe.backend"))
        object.__setattr__(self, "overrides", _parse_overrides(self.overrides))
        checked = [(role, getattr(self, role)) for role in TENSOR_ROLES]
        checked += [(key.rpartition("/")[2], spec) for key, spec in self.overrides]
        for role, spec in checked:
            if spec is not None and spec.granularity is GranularityKind.TILE and role not in _MATRIX_ROLES:
                shape = "is 1-D for biases and LayerNorms" if role in OPTIMIZER_ROLES else "has input-dependent leading dims"
                raise ValueError(
                    f"recipe.{role}: granularity 'tile' needs a 2-D tensor, but {role} {shape}; tiles are for "
                    f"{list(_MATRIX_ROLES)}, use 'block' (1 x block_size) or 'row' for {role}"
                )
            if spec is not None and spec.compensation is not Compensation.NONE and role != "stored_weight":
                raise ValueError(
                    f"recipe.{role}: compensation={spec.compensation.value!r} is for stored_weight only (the one "
                    "role whose rounded value is the next step's starting point); use compensation='none' here"
                )

    def spec_for(self, module: str, role: str) -> TensorQuantSpec | None:
        """The spec of ``role`` in the Linear named ``module``: the role's spec, unless an override matches.

        Example:
            >>> r = QuantRecipe.from_dict({"preset": "fp8_hybrid", "overrides": {"*.h.1.mlp.c_fc/grad_output": None}})
            >>> r.spec_for("transformer.h.1.mlp.c_fc", "grad_output"), r.spec_for("transformer.h.0.mlp.c_fc", "grad_output").format
            (None, 'E5M2')
        """
        spec = getattr(self, role)
        for key, override in self.overrides:
            pattern, _, override_role = key.rpartition("/")
            if override_role == role and fnmatch.fnmatchcase(module, pattern):
                spec = override
        return spec

    def roles(self) -> list[str]:
        """The roles this recipe quantizes (in some layer: overrides may quantize a role the base leaves out)."""
        extra = {key.rpartition("/")[2] for key, spec in self.overrides if spec is not None}
        return [r for r in TENSOR_ROLES if getattr(self, r) is not None or r in extra]

    @property
    def is_noop(self) -> bool:
        return not self.roles()

    @property
    def converts_layers(self) -> bool:
        """Whether any Linear-layer role is set (an optimizer-state-only recipe converts no layer)."""
        return any(getattr(self, r) is not None for r in LAYER_ROLES) or any(
            spec is not None for key, spec in self.overrides if key.rpartition("/")[2] in LAYER_ROLES)

    def promotes(self, base: "QuantRecipe") -> bool:
        """Whether this recipe is ``base`` with extra (layer, role)s kept in high precision and nothing else
        changed (name and description aside): resuming ``base``'s checkpoints with it is allowed.

        Example:
            >>> base = get_recipe("e5m2")
            >>> QuantRecipe.from_dict({"preset": "e5m2", "overrides": {"*.h.0.*/weight": None}}).promotes(base)
            True
            >>> QuantRecipe.from_dict({"preset": "e5m2", "overrides": {"*.h.0.*/weight": "e4m3"}}).promotes(base)
            False
        """
        if self == base:
            return False
        # The promotions are a trailing run of None overrides; before them, base's own overrides, less any
        # entry a promotion re-keys (`recipes/replay.py` moves those to the end, where they win).
        rest = list(self.overrides)
        promoted = set()
        while rest and rest[-1][1] is None:
            promoted.add(rest.pop()[0])
        if rest != [o for o in base.overrides if o[0] not in promoted]:
            return False
        return dataclasses.replace(self, name=base.name, overrides=base.overrides) == base

    @classmethod
    def from_dict(cls, data: dict | str | "QuantRecipe" | None) -> "QuantRecipe":
        """Build from a dict (YAML), a preset name, or ``{"preset": name, ...overrides}``."""
        if data is None:
            return get_recipe("fp32")
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
            if spec is None and role in OPTIMIZER_ROLES:
                continue  # absent unless set: recipes without them keep the dict older checkpoints hold
            out[role] = None if spec is None else spec.to_dict()
        out.update(modules=list(self.modules), exclude=list(self.exclude), backend=self.backend.value)
        if self.overrides:  # only when used: recipes without overrides keep the dict checkpoints compare
            out["overrides"] = {key: None if spec is None else spec.to_dict() for key, spec in self.overrides}
        if self.description:
            out["description"] = self.description
        return out


def _parse_overrides(value: Any) -> tuple[tuple[str, TensorQuantSpec | None], ...]:
    """``overrides`` from a mapping (YAML) or pairs, each key checked as ``<module pattern>/<role>``."""
    if isinstance(value, dict):
        value = tuple(value.items())
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        raise ValueError(
            f"recipe.overrides must map '<module pattern>/<role>' to a spec or null, got {value!r}")
    out = []
    for key, spec in value:
        pattern, sep, role = key.rpartition("/") if isinstance(key, str) else ("", "", "")
        if not sep or not pattern or role not in LAYER_ROLES:
            raise ValueError(
                f"recipe.overrides: key {key!r} must be '<module pattern>/<role>' with role one of {list(LAYER_ROLES)}")
        out.append((key, TensorQuantSpec.from_dict(spec, where=f"recipe.overrides[{key!r}]")))
    return tuple(out)


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
# Exactly x.to(torch.bfloat16): no scale, nearest-even, overflow to inf and NaN kept (no saturation).
_BF16_CAST = TensorQuantSpec("BF16", rounding="nearest", scaling="none", saturate=False)

RECIPE_PRESETS: dict[str, QuantRecipe] = {
    "fp32": QuantRecipe(name="fp32", description="No quantization: float32 math (or the autocast dtype, if on)."),
    "bf16": QuantRecipe(
        name="bf16",
        weight=_BF16_CAST,
        activation=_BF16_CAST,
        grad_output=_BF16_CAST,
        # autocast runs every Linear in BF16, the output projection included.
        modules=("transformer.h.*", "lm_head"),
        description="The BF16 baseline: the three GEMM operands of every Linear (lm_head included) rounded to "
        "BF16 (nearest-even, no scaling), the operands torch.autocast(dtype=torch.bfloat16) feeds those GEMMs; "
        "master weights and optimizer in float32.",
    ),
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


_PRESET_ALIASES = {"none": "fp32"}

# What the no-op preset looked like when it was called "bf16" (altgrad 0.1), as checkpoints recorded it.
_LEGACY_NOOP_NAME = "bf16"
RENAME_NOTE = (
    "until altgrad 0.1 the preset 'bf16' quantized nothing (float32 math); that preset is now 'fp32' (alias "
    "'none'), and 'bf16' rounds the GEMM operands to BF16"
)


def get_recipe(name: str) -> QuantRecipe:
    """A preset by name (case-insensitive); ``none`` is an alias of ``fp32``."""
    key = str(name).strip().lower()
    key = _PRESET_ALIASES.get(key, key)
    if key not in RECIPE_PRESETS:
        raise ValueError(f"unknown recipe preset {name!r}; presets: {sorted(RECIPE_PRESETS)}")
    return RECIPE_PRESETS[key]


def preset_note(recipe: Any) -> str | None:
    """The line a run prints when its config names a preset whose meaning changed (``bf16``), else None.

    Example:
        >>> preset_note({"preset": "BF16", "exclude": ["lm_head"]}) is not None, preset_note("e5m2")
        (True, None)
    """
    name = recipe.get("preset") if isinstance(recipe, dict) else recipe
    if isinstance(name, str) and name.strip().lower() == _LEGACY_NOOP_NAME:
        return f"recipe 'bf16' rounds every Linear's GEMM operands to BF16; {RENAME_NOTE.split(';')[0]}: use 'fp32' for that"
    return None


def _is_legacy_noop(saved: dict) -> bool:
    return saved.get("name") == _LEGACY_NOOP_NAME and not any(saved.get(r) for r in TENSOR_ROLES)


def recipe_mismatch(saved: dict | None, recipe: QuantRecipe) -> str | None:
    """Why a recipe recorded in a checkpoint (``to_dict()`` form) cannot be resumed by ``recipe``; None when
    it can.

    Recipes are compared as recipes, not as dicts, so a checkpoint written before a field existed (with
    that field at its default) still matches. A checkpoint of the old no-op ``bf16`` preset matches any
    recipe that quantizes nothing (it is ``fp32`` today), and a mismatch with it explains the rename.

    Example:
        >>> old = {"name": "bf16", "weight": None, "activation": None, "grad_output": None,
        ...        "weight_grad": None, "stored_weight": None, "modules": ["transformer.h.*"], "exclude": [],
        ...        "backend": "simulated"}
        >>> recipe_mismatch(old, get_recipe("fp32")) is None
        True
        >>> print(recipe_mismatch(old, get_recipe("bf16")))  # doctest: +ELLIPSIS
        it was trained with the old no-op preset 'bf16' ...; resume with quantization.recipe=fp32 ...
    """
    if saved is None:
        return None
    if _is_legacy_noop(saved):
        if recipe.is_noop:
            return None
        return (
            f"it was trained with the old no-op preset 'bf16' ({RENAME_NOTE}); resume with "
            f"quantization.recipe=fp32 (this run uses {recipe.name!r}), or start a new run for BF16 operands"
        )
    try:
        same = QuantRecipe.from_dict(saved) == recipe
    except ValueError as exc:
        return f"its recipe {saved.get('name')!r} cannot be read by this altgrad ({exc})"
    if same:
        return None
    return f"it was trained with recipe {saved.get('name')!r}, this run uses {recipe.name!r}"
