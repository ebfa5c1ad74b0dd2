"""What-if: score other formats on the very tensors and steps of a running training, without changing it.

Two instruments, both configured by one :class:`WhatIfConfig` (``QuantSession(..., whatif=...)``, or the
``quantization.whatif`` section of an experiment YAML):

**What-if statistics** (``alternatives``). On logging steps every tensor the run quantizes (per layer and
role) is also rounded into each alternative :class:`~altgrad.training.recipe.TensorQuantSpec`, through
the same fused statistics pass as the run's own rounding (:func:`~altgrad.quantization.quantize.quantize_with_sums`);
the rounded copy is thrown away. Logged as ``whatif/<alt>/<layer>/<role>/{sqnr_db,overflow_rate,
underflow_rate,rel_err}``, pooled per role (``whatif/<alt>/<role>/<stat>``) and per alternative
(``whatif/<alt>/<stat>``), means over tensors as for ``quantization/*``; ``rel_err`` is
``10 ** (-sqnr_db / 20)`` of the same sums (see :meth:`StatsAccumulator.pop`). Nothing of the run changes:

- scales: ``current``/``none`` alternatives are stateless. A ``delayed`` alternative shares the run
  quantizer's amax history when that quantizer is delayed with the same ``amax_history_len`` (the raw
  amax of a tensor does not depend on the format it is rounded into), reducing it with its own
  ``amax_algo``, so an alternative equal to the run's spec gets the run's scale bit for bit. Otherwise it
  keeps a history of its own, fed from its own pass on logging steps only: its delayed scale then lags by
  the logging interval (documented approximation; its first logged step uses the tensor's own amax).
- randomness: a stochastic alternative draws its seeds from a private ``torch.Generator`` (seeded from
  its name), never from the global RNG the run's dropout and stochastic rounding use.
- granularity: block and tile alternatives must divide every layer width they tile (checked when
  attached, one-line error); a tile alternative applies to the matrix roles (weight, weight_grad,
  stored_weight) only, and is skipped on activations and output gradients.

**What-if gradients** (``grad_every`` with ``grad_recipes`` and/or ``grad_swap_roles``). Every
``grad_every`` optimizer steps (``step % grad_every == 0``: on logging steps when it is a multiple of the
logging interval) each alternative :class:`~altgrad.training.recipe.QuantRecipe` re-runs all of the step's
micro-batches on a replica of the model (a deep copy, weights synced from the run at the step's start, in
the run's parameter dtype, under the caller's autocast state) with the RNG state the run's forward had,
then rounds its weight gradients with the RNG state the run's weight-gradient rounding had. Its gradients
are scored against the FP32 shadow's with the shadow's own comparison (``whatif_grad/<recipe>/grad_cos_sim/
<param>``, ``.../grad_snr/<param>``, ``.../grad_rel_error/<param>`` and their ``/mean``, ``/min``), plus
``whatif_grad/<recipe>/loss`` and ``.../loss_diff`` (its loss minus the shadow's, both summed over the
micro-batches as the backward saw them) and ``whatif_grad/fp32_loss``. A what-if step forces a shadow step
(a shadow is built even with ``shadow_every=0``). Replica quantizers take the run quantizers' scale state
(amax history, and the frozen step scale where the spec is the same) at the step's first micro-batch, so
a replica of the run's own recipe reproduces the run's gradients, and its scores equal the run's shadow
comparison exactly; a delayed role the run does not have keeps its own history, fed on what-if steps
only. Replays never touch the run: own parameters and gradients, RNG forked and restored. Cost per
what-if step: one extra forward/backward per recipe and micro-batch, one model copy per recipe in memory.

Example:
    >>> cfg = WhatIfConfig.from_dict({"alternatives": ["E3M4", {"format": "E2M1", "granularity": "block",
    ...     "block_size": 32, "scaling": "current", "scale_format": "E8M0"}], "grad_every": 50,
    ...     "grad_swap_roles": ["grad_output"]})
    >>> [a.name for a in cfg.alternatives]
    ['E3M4', 'E2M1-b32-E8M0']
    >>> [r.name for r in cfg.grad_recipes_for(get_recipe("fp8_hybrid"))]
    ['grad_output=E3M4', 'grad_output=E2M1-b32-E8M0']
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from altgrad.quantization import amax
from altgrad.quantization.quantize import quantize_with_sums
from altgrad.training.quantized_linear import (
    SQNR_CAP_DB,
    ModelQuantizer,
    QuantLinear,
    ScaleState,
    StatsAccumulator,
    _scale_from_amax,
    quantize_model,
    set_submodule,
)
from altgrad.training.recipe import (
    _MATRIX_ROLES,
    TENSOR_ROLES,
    GranularityKind,
    QuantRecipe,
    Rounding,
    Scaling,
    TensorQuantSpec,
    get_recipe,
)
from altgrad.training.shadow import FP32ShadowModel, get_rng_state, set_rng_state, unwrap_model

__all__ = [
    "WhatIfAlternative",
    "WhatIfConfig",
    "AlternativeProbe",
    "GradientWhatIf",
    "alternative_name",
    "attach_alternatives",
    "role_swap_recipes",
    "whatif_metrics",
    "WHATIF_STATS",
]

#: The statistics logged per alternative, (layer, role), role and alternative.
WHATIF_STATS = ("sqnr_db", "overflow_rate", "underflow_rate", "rel_err")

_DEFAULT_SPEC = TensorQuantSpec()


def alternative_name(spec: TensorQuantSpec) -> str:
    """A short, stable, metric-safe name for a spec: the format, then each setting that differs from
    the defaults (scaling implied by block/row/tile/E8M0 is not repeated).

    Example:
        >>> alternative_name(TensorQuantSpec("E3M4"))
        'E3M4'
        >>> alternative_name(TensorQuantSpec("E2M1", scaling="current", granularity="block", scale_format="E8M0"))
        'E2M1-b32-E8M0'
        >>> alternative_name(TensorQuantSpec("E4M3", rounding="stochastic", scaling="current", margin=1))
        'E4M3-sr-cur-m1'
    """
    parts = [spec.format]
    if spec.rounding is Rounding.STOCHASTIC:
        parts.append("sr")
    elif spec.rounding is Rounding.ZERO:
        parts.append("rz")
    kind = spec.granularity
    if spec.scaling is Scaling.NONE:
        parts.append("noscale")
    elif spec.scaling is Scaling.CURRENT and kind is GranularityKind.TENSOR and spec.scale_format is None:
        parts.append("cur")
    if kind is GranularityKind.ROW:
        parts.append("row")
    elif kind is GranularityKind.BLOCK:
        parts.append(f"b{spec.block_size}")
    elif kind is GranularityKind.TILE:
        parts.append(f"t{spec.block_size}")
    if spec.scaling is Scaling.DELAYED:
        if spec.amax_history_len != _DEFAULT_SPEC.amax_history_len:
            parts.append(f"h{spec.amax_history_len}")
        if spec.amax_algo != _DEFAULT_SPEC.amax_algo:
            parts.append("recent")
    if spec.margin:
        parts.append(f"m{spec.margin}")
    if spec.power_of_two and spec.scale_format is None:
        parts.append("p2")
    if spec.scale_format is not None:
        parts.append(spec.scale_format)
    if not spec.saturate:
        parts.append("nosat")
    return "-".join(parts)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"{where}: name {name!r} must be a non-empty string without '/' or spaces (it is a metric-name part)")
    return name


@dataclass(frozen=True)
class WhatIfAlternative:
    """One alternative tensor spec and the name its metrics are logged under.

    Example:
        >>> WhatIfAlternative.from_value({"name": "mx4", "format": "E2M1", "granularity": "block",
        ...                               "scaling": "current", "scale_format": "E8M0"}).name
        'mx4'
        >>> WhatIfAlternative.from_value("e5m2").spec.format
        'E5M2'
    """

    name: str
    spec: TensorQuantSpec

    @classmethod
    def from_value(cls, value: Any, where: str = "whatif.alternatives") -> "WhatIfAlternative":
        """From a format name, a spec dict (plus an optional ``name``), a spec, or an alternative."""
        try:
            return cls._from_value(value, where)
        except (ValueError, TypeError) as e:
            message = str(e)
            raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None

    @classmethod
    def _from_value(cls, value: Any, where: str) -> "WhatIfAlternative":
        if isinstance(value, WhatIfAlternative):
            return value
        if isinstance(value, Mapping) and "name" in value:
            value = dict(value)
            name = _check_name(value.pop("name"), where)
            return cls(name, TensorQuantSpec.from_dict(value, where))
        if not isinstance(value, (str, Mapping, TensorQuantSpec)):
            raise ValueError(f"{where}: expected a format name or a spec mapping, got {type(value).__name__}")
        spec = TensorQuantSpec.from_dict(value if not isinstance(value, Mapping) else dict(value), where)
        return cls(alternative_name(spec), spec)


def role_swap_recipes(
    recipe: QuantRecipe, alternatives: Sequence[WhatIfAlternative], roles: Sequence[str]
) -> list[QuantRecipe]:
    """The run's recipe with one role replaced by one alternative, for each (role, alternative), named
    ``<role>=<alternative>`` (the trainability map's cells). Tile alternatives are skipped on the
    roles tiles cannot cover (activation, grad_output).

    Example:
        >>> alts = [WhatIfAlternative.from_value("E3M4")]
        >>> [(r.name, r.activation.format, r.weight.format) for r in
        ...  role_swap_recipes(get_recipe("fp8_hybrid"), alts, ["activation"])]
        [('activation=E3M4', 'E3M4', 'E4M3')]
    """
    out = []
    for role in roles:
        if role not in TENSOR_ROLES or role == "stored_weight":
            raise ValueError(
                f"whatif.grad_swap_roles: {role!r} is not accepted; accepted: "
                f"{[r for r in TENSOR_ROLES if r != 'stored_weight']} (stored_weight does not change a step's gradients)"
            )
        for alt in alternatives:
            if alt.spec.granularity is GranularityKind.TILE and role not in _MATRIX_ROLES:
                continue
            data = recipe.to_dict()
            data.pop("description", None)
            data.update(name=f"{role}={alt.name}", **{role: alt.spec})
            out.append(QuantRecipe(**data))
    return out


def _grad_recipe(entry: Any, run: QuantRecipe, where: str) -> QuantRecipe:
    """A preset name, ``"run"`` (the run's own recipe), a recipe dict, or ``{preset: run, ...}`` (the
    run's recipe with some keys replaced)."""
    if isinstance(entry, QuantRecipe):
        return entry
    try:
        if isinstance(entry, str) and entry.strip().lower() == "run":
            return run
        if isinstance(entry, Mapping) and str(entry.get("preset", "")).strip().lower() == "run":
            data = dict(entry)
            data.pop("preset")
            base = run.to_dict()
            base.pop("description", None)
            changed = {k: v for k, v in data.items() if k != "name"}
            if "name" not in data:
                parts = []
                for key, value in changed.items():
                    spec = TensorQuantSpec.from_dict(value, f"{where}.{key}") if key in TENSOR_ROLES else None
                    parts.append(f"{key}={alternative_name(spec) if spec is not None else value}")
                data["name"] = ",".join(parts) or run.name
            return QuantRecipe.from_dict({**base, **data})
        return QuantRecipe.from_dict(entry if not isinstance(entry, Mapping) else dict(entry))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class WhatIfConfig:
    """What-if settings (see the module docstring).

    - ``alternatives``: tensor specs every quantized tensor is also rounded into on logging steps
      (format names, spec dicts with an optional ``name``);
    - ``grad_every``: what-if gradients every this many optimizer steps (0: never);
    - ``grad_recipes``: whole recipes replayed on those steps: preset names, ``run`` (the run's own,
      a check: its scores equal the shadow comparison), recipe dicts, or ``{preset: run, <role>: spec}``;
    - ``grad_swap_roles``: also replay the run's recipe with each listed role replaced by each
      alternative (recipes named ``<role>=<alt>``).

    Example:
        >>> WhatIfConfig.from_dict({"alternative": ["E3M4"]})
        Traceback (most recent call last):
        ...
        ValueError: quantization.whatif: unknown key(s) ['alternative']; valid keys: ['alternatives', 'grad_every', 'grad_recipes', 'grad_swap_roles']
    """

    alternatives: tuple[WhatIfAlternative, ...] = ()
    grad_every: int = 0
    grad_recipes: tuple[Any, ...] = ()
    grad_swap_roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = "quantization.whatif"
        alts = self.alternatives
        if isinstance(alts, (str, Mapping, TensorQuantSpec, WhatIfAlternative)):
            alts = (alts,)
        if not isinstance(alts, (list, tuple)):
            raise ValueError(f"{where}.alternatives must be a list of format names or spec mappings, got {alts!r}")
        alts = tuple(WhatIfAlternative.from_value(a, f"{where}.alternatives[{i}]") for i, a in enumerate(alts))
        names = [a.name for a in alts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{where}.alternatives: names {dupes} appear twice; give one of them a 'name'")
        object.__setattr__(self, "alternatives", alts)
        every = self.grad_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"{where}.grad_every must be a non-negative int (0: no what-if gradients), got {every!r}")
        for attr in ("grad_recipes", "grad_swap_roles"):
            value = getattr(self, attr)
            if isinstance(value, (str, Mapping, QuantRecipe)):
                value = (value,)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}.{attr} must be a list, got {value!r}")
            object.__setattr__(self, attr, tuple(value))
        if every and not (self.grad_recipes or self.grad_swap_roles):
            raise ValueError(f"{where}.grad_every={every} needs grad_recipes or grad_swap_roles to replay")
        if self.grad_swap_roles and not alts:
            raise ValueError(f"{where}.grad_swap_roles needs alternatives to swap in")

    @classmethod
    def from_dict(cls, data: "Mapping[str, Any] | WhatIfConfig | None") -> "WhatIfConfig":
        if data is None:
            return cls()
        if isinstance(data, WhatIfConfig):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"quantization.whatif must be a mapping, got {type(data).__name__}")
        valid = ["alternatives", "grad_every", "grad_recipes", "grad_swap_roles"]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"quantization.whatif: unknown key(s) {unknown}; valid keys: {valid}")
        return cls(**dict(data))

    @property
    def enabled(self) -> bool:
        return bool(self.alternatives) or bool(self.grad_every)

    def grad_recipes_for(self, run: QuantRecipe) -> list[QuantRecipe]:
        """The recipes what-if gradients replay for a run of recipe ``run`` (names checked unique)."""
        recipes = [_grad_recipe(e, run, f"quantization.whatif.grad_recipes[{i}]") for i, e in enumerate(self.grad_recipes)]
        recipes += role_swap_recipes(run, self.alternatives, self.grad_swap_roles)
        names = [r.name for r in recipes]
        for r in recipes:
            _check_name(r.name, "quantization.whatif.grad_recipes")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"quantization.whatif.grad_recipes: names {dupes} appear twice; give them distinct 'name's")
        return recipes

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML data (alternatives as named spec dicts)."""
        return {
            "alternatives": [{"name": a.name, **a.spec.to_dict()} for a in self.alternatives],
            "grad_every": self.grad_every,
            "grad_recipes": [r.to_dict() if isinstance(r, QuantRecipe) else r for r in self.grad_recipes],
            "grad_swap_roles": list(self.grad_swap_roles),
        }


# ====================================================================== what-if statistics
class AlternativeProbe:
    """Rounds one role's tensors into one alternative on logged calls (a `TensorQuantizer` calls
    :meth:`observe` from its statistics pass) and keeps the statistics; never changes the run.

    Example:
        >>> from altgrad.training import TensorQuantizer
        >>> run = TensorQuantizer(TensorQuantSpec("E4M3", scaling="current"))
        >>> run.whatif.append(AlternativeProbe(WhatIfAlternative.from_value("E2M1"), run.spec))
        >>> run.collect_stats = True
        >>> _ = run(torch.tensor([448.0, 1.0, 0.3]))
        >>> sorted(run.whatif[0].stats.pop())
        ['amax', 'overflow_rate', 'rel_err', 'sqnr_db', 'underflow_rate']
    """

    def __init__(self, alternative: WhatIfAlternative, run_spec: TensorQuantSpec) -> None:
        self.name = alternative.name
        self.spec = spec = alternative.spec
        self.stats = StatsAccumulator(spec.format)
        self.stats.enabled = True
        self.shares_history = (
            spec.scaling is Scaling.DELAYED
            and run_spec.scaling is Scaling.DELAYED
            and spec.amax_history_len == run_spec.amax_history_len
        )
        self.state = None if self.shares_history else ScaleState(spec)
        self._step_scale: torch.Tensor | None = None
        self._kwargs = dict(rounding=spec.rounding.value, saturate=spec.saturate)
        if spec.rounding is Rounding.STOCHASTIC:
            # Private seeds: the global RNG (dropout, the run's stochastic rounding) is never advanced.
            self.generator: torch.Generator | None = torch.Generator()
            self.generator.manual_seed(zlib.crc32(self.name.encode()))
        else:
            self.generator = None

    def begin_step(self) -> None:
        self._step_scale = None
        if self.state is not None:
            self.state.begin_step()

    def _scale(self, x: torch.Tensor, run_state: ScaleState) -> torch.Tensor | None:
        if not self.shares_history:
            return self.state.scale_for(x, record=True)
        if self._step_scale is None:  # frozen for the step, as the run's delayed scale is
            history = run_state.history
            if len(history):
                source = history.get_amax(self.spec.amax_algo.value)
            elif run_state.step_amax is not None:
                source = run_state.step_amax
            else:
                source = amax(x, self.spec.scale_granularity)
            self._step_scale = _scale_from_amax(self.spec, source)
        return self._step_scale

    @torch.no_grad()
    def observe(self, x: torch.Tensor, run_state: ScaleState) -> None:
        """Round ``x`` into the alternative (result discarded) and add the pass's sums."""
        scale = self._scale(x, run_state)
        _, sums = quantize_with_sums(x, self.spec.format, scale, generator=self.generator, dtype=torch.float32,
                                     **self._kwargs)
        self.stats.add_sums(sums, x.numel())
        if self.state is not None:
            self.state.observe_amax(sums[0].to(torch.float32))


def _role_dims(role: str, layer: nn.Linear) -> tuple[int, ...]:
    # What a block runs along (the last dim) or a tile covers, per role.
    if role == "activation":
        return (layer.in_features,)
    if role == "grad_output":
        return (layer.out_features,)
    return (layer.out_features, layer.in_features)


def attach_alternatives(quantizer: ModelQuantizer, alternatives: Sequence[WhatIfAlternative]) -> int:
    """Give every quantizer of ``quantizer`` a probe per alternative (replacing any before); returns the
    number of probes. Raises a one-line ValueError when a block or tile does not divide a layer.

    Example:
        >>> from altgrad.modeling import GPT, GPTConfig
        >>> mq = quantize_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=11)), "fp8_hybrid")
        >>> attach_alternatives(mq, [WhatIfAlternative.from_value("E3M4")])   # 4 layers x 3 roles
        12
        >>> attach_alternatives(mq, [WhatIfAlternative.from_value({"format": "E2M1", "scaling": "current",
        ...     "granularity": "block", "block_size": 48})])
        Traceback (most recent call last):
        ...
        ValueError: whatif alternative 'E2M1-b48': block size 48 does not divide transformer.h.0.attn.c_attn's weight width 32; choose one that divides every quantized layer's width
    """
    layers = dict(quantizer.layers)
    # Optimizer-state quantizers are keyed `<param>/exp_avg`: their tensor has the parameter's shape.
    states = quantizer.optimizer_states
    param_shapes = {name: tuple(p.shape) for name, p in states.params} if states is not None else {}
    probes = {}
    for key, q in quantizer.all_quantizers().items():
        layer_name, role = key.rsplit("/", 1)
        layer = layers.get(layer_name)
        shape = _role_dims(role, layer) if layer is not None else param_shapes[layer_name]
        mine = []
        for alt in alternatives:
            kind, n = alt.spec.granularity, alt.spec.block_size
            if kind is GranularityKind.TILE and (role not in _MATRIX_ROLES if layer is not None else len(shape) != 2):
                continue
            if kind is GranularityKind.BLOCK:
                width = shape[-1]
                if width % n:
                    raise ValueError(
                        f"whatif alternative {alt.name!r}: block size {n} does not divide {layer_name}'s {role} width "
                        f"{width}; choose one that divides every quantized layer's width")
            elif kind is GranularityKind.TILE:
                if any(d % n for d in shape):
                    raise ValueError(
                        f"whatif alternative {alt.name!r}: {n}x{n} tiles do not divide {layer_name}'s {role} shape "
                        f"{shape}; choose a tile size that divides both dims of every quantized layer")
            mine.append(AlternativeProbe(alt, q.spec))
        probes[key] = mine
    for key, q in quantizer.all_quantizers().items():  # only once every check passed
        q.whatif = probes[key]
    return sum(len(p) for p in probes.values())


def _pool(values: list[torch.Tensor], stat: str) -> torch.Tensor:
    t = torch.stack(values)
    if stat != "sqnr_db":
        return t.mean()
    # as for quantization/sqnr_db: exactly carried tensors sit at the cap and say nothing about noise
    noisy = t < SQNR_CAP_DB
    return torch.where(noisy.any(), (t * noisy).sum() / noisy.sum().clamp_min(1), torch.full_like(t[0], SQNR_CAP_DB))


def whatif_metrics(stats: Mapping[tuple[str, str, str], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`ModelQuantizer.pop_whatif_stats` output as named metrics (on device): per (alternative, layer,
    role), pooled per (alternative, role) and per alternative (means over tensors; SQNR over the tensors
    below the cap).

    Example:
        >>> one = {s: torch.tensor(v) for s, v in zip(WHATIF_STATS, (30.0, 0.0, 0.1, 0.03))}
        >>> m = whatif_metrics({("E3M4", "h.0.fc", "weight"): one, ("E3M4", "h.1.fc", "weight"): one})
        >>> sorted(k for k in m if k.count("/") < 3), round(m["whatif/E3M4/weight/sqnr_db"].item(), 1)
        (['whatif/E3M4/overflow_rate', 'whatif/E3M4/rel_err', 'whatif/E3M4/sqnr_db', 'whatif/E3M4/underflow_rate'], 30.0)
    """
    from altgrad.monitoring import metrics as M

    out: dict[str, torch.Tensor] = {}
    by_role: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    by_alt: dict[tuple[str, str], list[torch.Tensor]] = {}
    for (alt, layer, role), values in stats.items():
        for stat in WHATIF_STATS:
            if stat not in values:
                continue
            out[M.whatif_key(alt, stat, layer=layer, role=role)] = values[stat]
            by_role.setdefault((alt, role, stat), []).append(values[stat])
            by_alt.setdefault((alt, stat), []).append(values[stat])
    for (alt, role, stat), values in by_role.items():
        out[M.whatif_key(alt, stat, role=role)] = _pool(values, stat)
    for (alt, stat), values in by_alt.items():
        out[M.whatif_key(alt, stat)] = _pool(values, stat)
    return out


# ====================================================================== what-if gradients
@dataclass
class _Replica:
    recipe: QuantRecipe
    model: nn.Module
    quantizer: ModelQuantizer
    losses: list[torch.Tensor] = field(default_factory=list)
    states_copied: bool = False


class GradientWhatIf:
    """Replicas of a model, one per alternative recipe, that replay a step's micro-batches from the run's
    weights and RNG state and are scored against the FP32 shadow (see the module docstring).

    A session drives it: :meth:`sync_from` at the step's start, :meth:`replay` after each micro-batch,
    :meth:`finish` once the run's gradients are final.

    Example:
        >>> from altgrad.modeling import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
        >>> mq = quantize_model(model, "e5m2")
        >>> whatif = GradientWhatIf(model, [get_recipe("e3m4")])
        >>> shadow = FP32ShadowModel(model)
        >>> ids = torch.randint(0, 11, (2, 8)); batch = {"input_ids": ids, "labels": ids}
        >>> shadow.sync_from(model); whatif.sync_from(model)
        >>> fp32_loss = shadow.accumulate(batch)
        >>> rng = (torch.get_rng_state(), None)
        >>> whatif.replay(batch, None, rng, mq); whatif.finish(rng)
        >>> m = whatif.metrics(shadow, [fp32_loss]); 0.9 < m["whatif_grad/e3m4/grad_cos_sim/mean"].item() <= 1
        True
    """

    def __init__(self, model: nn.Module, recipes: Sequence[QuantRecipe]) -> None:
        source = unwrap_model(model)
        self.replicas: list[_Replica] = []
        for recipe in recipes:
            replica = copy.deepcopy(source)
            for name, module in list(replica.named_modules()):
                if isinstance(module, QuantLinear):
                    set_submodule(replica, name, module.to_linear())
            for p in replica.parameters():
                p.grad = None
            self.replicas.append(_Replica(recipe, replica, quantize_model(replica, recipe)))

    @torch.no_grad()
    def sync_from(self, model: nn.Module) -> None:
        """Take the run's current weights, clear gradients and losses, start a step on every replica."""
        source_model = unwrap_model(model)
        source = dict(source_model.named_parameters())
        device = next(source_model.parameters()).device
        for r in self.replicas:
            if next(r.model.parameters()).device != device:
                r.model.to(device)
            for name, p in r.model.named_parameters():
                p.copy_(source[name].detach())
                p.grad = None
            r.model.train(source_model.training)
            r.quantizer.begin_step()
            r.quantizer.set_collect_stats(False)
            r.losses = []
            r.states_copied = False

    @staticmethod
    @torch.no_grad()
    def _copy_states(replica: ModelQuantizer, run: ModelQuantizer) -> None:
        # The run's scale state for every (layer, role) both have: the amax history is the tensor's,
        # whatever format rounds it; the frozen step scale only where the spec is the same.
        run_qs = run.all_quantizers()
        for key, q in replica.all_quantizers().items():
            theirs = run_qs.get(key)
            if theirs is None or not (q.state.delayed and theirs.state.delayed):
                continue
            if q.spec.amax_history_len != theirs.spec.amax_history_len:
                continue
            state = theirs.state.state_dict()  # history cloned
            q.state.load_state_dict({**state, "step_amax": None if state["step_amax"] is None else state["step_amax"].clone()})
            q.state.stepped = True
            if q.spec == theirs.spec and theirs.state.step_scale is not None:
                q.state.step_scale = theirs.state.step_scale.clone()

    def replay(
        self,
        batch: Mapping[str, Any],
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None,
        rng_state: Any,
        run_quantizer: ModelQuantizer,
    ) -> None:
        """Forward/backward one micro-batch on every replica with the RNG state ``rng_state`` (the one
        the run's forward started from; restored afterwards). ``loss_fn`` as for the shadow."""
        compute = loss_fn or (lambda m, b: m(**b).loss)
        for r in self.replicas:
            if not r.states_copied:
                self._copy_states(r.quantizer, run_quantizer)
                r.states_copied = True
            device = next(r.model.parameters()).device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                set_rng_state(device, rng_state)
                loss = compute(r.model, inputs)
                loss.backward()
            r.losses.append(loss.detach())

    @torch.no_grad()
    def finish(self, weight_grad_rng: Any) -> None:
        """Average replica gradients across ranks (as DDP does for the run) and round them into each
        recipe's ``weight_grad`` with the RNG state the run's own weight-gradient rounding had."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for r in self.replicas:
            if world > 1:
                for p in r.model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            device = next(r.model.parameters()).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                set_rng_state(device, weight_grad_rng)
                r.quantizer.quantize_weight_grads()

    @torch.no_grad()
    def metrics(self, shadow: FP32ShadowModel, fp32_losses: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each replica's shadow comparison and loss difference (on device), then its gradients freed."""
        from altgrad.monitoring import metrics as M

        out: dict[str, torch.Tensor] = {}
        fp32 = torch.stack(list(fp32_losses)).float().sum() if fp32_losses else None
        if fp32 is not None:
            out[M.WHATIF_GRAD_FP32_LOSS] = fp32
        for r in self.replicas:
            for key, value in shadow.compare(r.model).items():
                if not key.startswith("grad_snr_fp32/"):  # the shadow's own, logged once by the run's comparison
                    out[M.whatif_grad_key(r.recipe.name, key)] = value
            if r.losses:
                loss = torch.stack(r.losses).float().sum()
                out[M.whatif_grad_key(r.recipe.name, "loss")] = loss
                if fp32 is not None:
                    out[M.whatif_grad_key(r.recipe.name, "loss_diff")] = loss - fp32.to(loss.device)
            for p in r.model.parameters():
                p.grad = None
            r.losses = []
        return out
