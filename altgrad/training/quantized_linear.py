"""Quantized training applied from outside the model: `quantize_model` swaps selected `nn.Linear`s for
:class:`QuantLinear`, whose autograd function quantizes both operands of all three GEMMs the way real
FP8 training does:

    forward:           y  = Q_a(x) @ Q_w(W)^T + b
    backward (input):  dx = Q_g(dy) @ Q_w(W)
    backward (weight): dW = Q_g(dy)^T @ Q_a(x)

Master weights stay in high precision (unless the recipe stores them quantized); nothing is copied
into ``param.data`` around the forward pass. A `QuantLinear` keeps the `nn.Linear`'s own parameters
(same objects, same state-dict keys), so a saved model is a plain model that loads without altgrad.

Example:
    >>> import torch.nn as nn
    >>> from altgrad.training import quantize_model, get_recipe
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> quantizer = quantize_model(net, get_recipe("fp8_hybrid"), modules=["*"])
    >>> [name for name, _ in quantizer.layers]
    ['0']
"""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from altgrad.quantization import (
    AmaxHistory,
    BitStallDetector,
    Granularity,
    amax,
    compute_scale,
    dequantize,
    dynamic_range_used,
    fake_quantize,
    mx_scale,
    quantize,
    quantize_with_amax,
)
from altgrad.quantization.quantize import quantize_with_sums, stats_from_sums
from altgrad.training.native_fp8 import NativeFP8LinearFunction, native_fp8_unsupported_reason
from altgrad.training.recipe import TENSOR_ROLES, QuantRecipe, TensorQuantSpec

logger = logging.getLogger(__name__)

__all__ = ["TensorQuantizer", "QuantLinear", "ModelQuantizer", "quantize_model"]

SQNR_CAP_DB = 200.0  # reported for tensors the format carries exactly


class TensorQuantizer:
    """Quantizes one tensor role of one layer: keeps its scaling state and (on request) its statistics.

    Delayed scaling follows Transformer Engine: the scale used during an optimizer step comes from the
    amax history of *previous* steps and is frozen for the whole step, while the step's own amax (the
    max over its micro-batches) joins the history when the next step begins. Freezing makes every
    recomputation of the step (gradient checkpointing) see the same scale, and makes the history count
    optimizer steps. A driver announces steps with :meth:`begin_step` (the trainer does); without one,
    each training call counts as a step. Evaluation calls (``record=False``) use the current scale and
    change no state.

    Statistics accumulate as on-device tensors only while ``collect_stats`` is on (the trainer turns
    it on for the steps it logs), so ordinary steps pay for quantization alone.
    """

    def __init__(self, spec: TensorQuantSpec, name: str = "") -> None:
        self.spec = spec
        self.name = name
        if spec.granularity == "tensor":
            self.granularity = Granularity.per_tensor()
        elif spec.granularity == "row":
            self.granularity = Granularity.per_row(-1)
        else:
            self.granularity = Granularity.per_block(spec.block_size)
        self.history = AmaxHistory(spec.amax_history_len) if spec.scaling == "delayed" else None
        self.collect_stats = False
        # Logged-step statistics, summed on device across calls: the kernel's float64 sums (amax kept
        # apart, as a max), the element count, and the per-call dynamic-range share and mean scale.
        self._sums: torch.Tensor | None = None
        self._amax_seen: torch.Tensor | None = None
        self._per_call: torch.Tensor | None = None
        self._numel = 0
        self._stat_count = 0
        self.last_scale: torch.Tensor | None = None
        self._stepped = False  # a driver calls begin_step()
        self._step_amax: torch.Tensor | None = None  # this step's amax, not yet in the history
        self._step_scale: torch.Tensor | None = None  # the scale frozen for this step

    # ------------------------------------------------------------------ scaling
    def begin_step(self) -> None:
        """Start an optimizer step: last step's amax joins the history; the next scale is derived lazily."""
        self._stepped = True
        if self.history is not None and self._step_amax is not None:
            self.history.update_amax(self._step_amax)
        self._step_amax = None
        self._step_scale = None

    def _scale_from_amax(self, amax_value: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.scale_format == "E8M0":
            return mx_scale(amax_value, spec.format)
        return compute_scale(amax_value, spec.format, margin=spec.margin, power_of_two=spec.power_of_two)

    def _delayed_scale(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        if record and not self._stepped:
            # No step boundaries announced: every training call is a step of its own.
            self.begin_step()
            self._stepped = False
        if self._step_scale is not None:
            return self._step_scale
        if len(self.history):
            source = self.history.get_amax(self.spec.amax_algo)
        elif self._step_amax is not None:
            source = self._step_amax
        else:  # the very first step has no history: its own (first micro-batch's) amax
            source = amax(x, self.granularity)
            if record:
                self._step_amax = source
        scale = self._scale_from_amax(source)
        if record:  # frozen for the rest of the step; evaluation before any step freezes nothing
            self._step_scale = scale
        return scale

    def scale_for(self, x: torch.Tensor, record: bool = True) -> torch.Tensor | None:
        """The multiplier for ``x``; ``record=False`` (evaluation) leaves the scaling state untouched."""
        spec = self.spec
        if spec.scaling == "none":
            scale = None
        elif spec.scaling == "delayed":
            scale = self._delayed_scale(x, record)
        else:
            scale = self._scale_from_amax(amax(x, self.granularity))
        if record:
            self.last_scale = scale
        return scale

    # ------------------------------------------------------------------ quantize
    def _round(
        self, x: torch.Tensor, record: bool, dequant: bool, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        spec = self.spec
        scale = self.scale_for(x, record)
        kwargs = dict(rounding=spec.rounding, saturate=spec.saturate)
        current = None  # this call's amax, when the rounding pass produced it
        if record and self.collect_stats and x.numel():
            # A logged step: the rounding pass also reduces overflow, underflow, SQNR and amax.
            # Fake-quantizing: q stays float32 (format units) until the scale is divided back out, as in
            # the fused path; a narrow x dtype could not hold x * scale.
            q, sums = quantize_with_sums(x, spec.format, scale, dtype=torch.float32 if dequant else dtype, **kwargs)
            current = sums[0].to(torch.float32)
            self._accumulate(sums, q, scale)
            if dequant:
                q = dequantize(q, scale).to(dtype or x.dtype)
        elif record and self.history is not None and x.numel():
            # Delayed scaling knows its scale before the pass, so this step's amax comes out of the
            # same fused kernel that rounds x (no extra reduction over x).
            q, current = quantize_with_amax(x, spec.format, scale, dequantize=dequant, dtype=dtype, **kwargs)
        else:
            q = (fake_quantize if dequant else quantize)(x, spec.format, scale, dtype=dtype, **kwargs)
        if self.history is not None and current is not None:
            self._step_amax = current if self._step_amax is None else torch.maximum(self._step_amax, current)
        return q, scale

    def quantize(
        self, x: torch.Tensor, record: bool = True, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q, scale)``: ``x * scale`` on the format's grid (as ``dtype``, default x's); statistics
        recorded when collecting."""
        return self._round(x, record, dequant=False, dtype=dtype)

    def __call__(self, x: torch.Tensor, record: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` (quantize, then divide the scale back out) in one fused pass, written as
        ``dtype`` (default x's)."""
        return self._round(x, record, dequant=True, dtype=dtype)[0]

    def _accumulate(self, sums: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> None:
        scale_mean = torch.ones((), device=q.device) if scale is None else scale.detach().float().mean()
        per_call = torch.stack([dynamic_range_used(q, self.spec.format), scale_mean])
        if self._sums is None:
            self._sums, self._amax_seen, self._per_call = sums, sums[0], per_call
        else:
            self._sums = self._sums + sums
            self._amax_seen = torch.maximum(self._amax_seen, sums[0])
            self._per_call = self._per_call + per_call
        self._numel += q.numel()
        self._stat_count += 1

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Statistics since the last call (on-device 0-d tensors), then reset.

        Rates pool every collected call (overflowing elements / elements seen), SQNR pools their
        energies in the format's units, ``x * scale`` (so with current scaling a call weighs by its
        scale squared; capped at ``SQNR_CAP_DB`` for exactly carried tensors), amax is a max, and
        ``dynamic_range_used`` and ``scale`` are means over the calls.
        """
        if not self._stat_count:
            return {}
        sums = torch.cat([self._amax_seen.view(1), self._sums[1:]])
        out = stats_from_sums(sums, self._numel)
        out["sqnr_db"] = out["sqnr_db"].clamp(max=SQNR_CAP_DB)
        per_call = self._per_call / self._stat_count
        out["dynamic_range_used"], out["scale"] = per_call[0], per_call[1]
        self._sums = self._amax_seen = self._per_call = None
        self._numel = self._stat_count = 0
        return out

    def state_dict(self) -> dict:
        return {
            "history": None if self.history is None else self.history.state_dict(),
            "step_amax": None if self._step_amax is None else self._step_amax.detach().clone(),
            "stepped": self._stepped,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.history is not None and state.get("history") is not None:
            self.history.load_state_dict(state["history"])
        self._step_amax = state.get("step_amax")
        self._stepped = bool(state.get("stepped", False))
        self._step_scale = None


class _QuantizedLinearFunction(torch.autograd.Function):
    """y = Q_a(x) Q_w(W)^T + b; backward GEMMs on Q_g(dy) and the saved quantized operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: "QuantLinear"):
        record = layer.training  # evaluation quantizes with the current scales and records nothing
        # Under autocast the GEMM runs in the autocast dtype: the fused pass writes its operands in that
        # dtype directly (the values autocast's own cast would give, one pass and half the bytes fewer).
        device_type = x.device.type
        gemm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        xq = layer.quantizers["activation"](x, record, gemm_dtype) if "activation" in layer.quantizers else x
        wq = layer.quantizers["weight"](weight, record, gemm_dtype) if "weight" in layer.quantizers else weight
        ctx.save_for_backward(xq, wq)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(xq, wq, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        layer = ctx.layer
        gq = layer.quantizers["grad_output"](grad_out, layer.training) if "grad_output" in layer.quantizers else grad_out
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gq @ wq.to(gq.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            out_features, in_features = wq.shape
            grad_w = gq.reshape(-1, out_features).t() @ xq.reshape(-1, in_features).to(gq.dtype)  # (out, in)
            grad_w = grad_w.to(wq.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # The bias gradient is a reduction, not a GEMM: kept in high precision, as FP8 kernels do.
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class QuantLinear(nn.Linear):
    """An `nn.Linear` whose GEMMs see quantized operands. Same parameters and state-dict keys.

    Build one with :meth:`from_linear`; it shares the original layer's parameters.
    """

    quantizers: dict[str, TensorQuantizer]

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: QuantRecipe, name: str = "") -> "QuantLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.layer_name = name
        new.native = recipe.backend == "native_fp8"
        new._fallback_notes = set()
        new.quantizers = {}
        for role in ("weight", "activation", "grad_output"):
            spec = getattr(recipe, role)
            if spec is not None:
                new.quantizers[role] = TensorQuantizer(spec, f"{name}/{role}")
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            reason = native_fp8_unsupported_reason(self, x)
            if reason is None:
                return NativeFP8LinearFunction.apply(x, self.weight, self.bias, self)
            if reason not in self._fallback_notes:  # one note per layer and reason
                self._fallback_notes.add(reason)
                logger.warning("altgrad native_fp8: %s runs simulated: %s", self.layer_name, reason)
        return _QuantizedLinearFunction.apply(x, self.weight, self.bias, self)

    def to_linear(self) -> nn.Linear:
        plain = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = self.in_features, self.out_features
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        roles = ", ".join(f"{r}={q.spec.format}" for r, q in self.quantizers.items())
        return f"{super().extra_repr()}, {roles}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class ModelQuantizer:
    """Handle returned by :func:`quantize_model`: the converted layers and every per-step hook the
    trainer needs (statistics, weight-gradient and stored-weight rounding, bit-stall, state)."""

    def __init__(self, model: nn.Module, recipe: QuantRecipe, layers: list[tuple[str, QuantLinear]]) -> None:
        self.model = model
        self.recipe = recipe
        self.layers = layers
        self.weight_grad_quantizers = {
            name: TensorQuantizer(recipe.weight_grad, f"{name}/weight_grad") for name, _ in layers
        } if recipe.weight_grad is not None else {}
        self.stored_weight_quantizers = {
            name: TensorQuantizer(recipe.stored_weight, f"{name}/stored_weight") for name, _ in layers
        } if recipe.stored_weight is not None else {}
        self.bit_stall = BitStallDetector()
        self._snapshots: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ statistics
    def all_quantizers(self) -> dict[str, TensorQuantizer]:
        out = {}
        for name, layer in self.layers:
            for role, q in layer.quantizers.items():
                out[f"{name}/{role}"] = q
        for name, q in self.weight_grad_quantizers.items():
            out[f"{name}/weight_grad"] = q
        for name, q in self.stored_weight_quantizers.items():
            out[f"{name}/stored_weight"] = q
        return out

    def set_collect_stats(self, enabled: bool) -> None:
        for q in self.all_quantizers().values():
            q.collect_stats = enabled

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Per-tensor statistics since the last call, keyed ``<layer>/<role>/<stat>`` (on device)."""
        out = {}
        for key, q in self.all_quantizers().items():
            for stat, value in q.pop_stats().items():
                out[f"{key}/{stat}"] = value
        return out

    # ------------------------------------------------------------------ optimizer-step hooks
    @torch.no_grad()
    def quantize_weight_grads(self) -> None:
        """Round each converted layer's weight gradient into the recipe's ``weight_grad`` format."""
        for name, layer in self.layers:
            q = self.weight_grad_quantizers.get(name)
            if q is not None and layer.weight.grad is not None:
                layer.weight.grad.copy_(q(layer.weight.grad))

    @torch.no_grad()
    def snapshot_weights(self) -> None:
        """Remember the weights before an optimizer step, for bit-stall."""
        self._snapshots = {name: layer.weight.detach().clone() for name, layer in self.layers}

    def begin_step(self) -> None:
        """Announce a new optimizer step to every quantizer (delayed scales roll forward once per step)."""
        for q in self.all_quantizers().values():
            q.begin_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Round stored weights (if the recipe stores them quantized) and measure bit-stall."""
        for name, layer in self.layers:
            before = self._snapshots.get(name)
            stored = self.stored_weight_quantizers.get(name)
            after = layer.weight.detach()
            if stored is not None:
                rounded = stored(after)  # nearest or stochastic, as the recipe says
                if before is not None:
                    # `before` is the stored value: the update stalled where rounding gave it back.
                    updated = after != before
                    self.bit_stall.count(name, updated, updated & (rounded == before))
                layer.weight.copy_(rounded)
            elif before is not None and "weight" in layer.quantizers:
                wq = layer.quantizers["weight"]
                self.bit_stall.update(name, before, after, wq.spec.format, wq.last_scale)
        self._snapshots = {}
        self.set_collect_stats(False)  # whatever runs before the next step (evaluation) is not a log step

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Delayed-scaling state (amax histories) of every quantizer, for checkpoints."""
        return {
            "recipe": self.recipe.to_dict(),
            "quantizers": {key: q.state_dict() for key, q in self.all_quantizers().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("recipe") != self.recipe.to_dict():
            raise ValueError(
                "quantization state was saved with a different recipe: "
                f"{state.get('recipe', {}).get('name')!r} vs this run's {self.recipe.name!r}"
            )
        mine = self.all_quantizers()
        missing = sorted(set(mine) - set(state["quantizers"]))
        unexpected = sorted(set(state["quantizers"]) - set(mine))
        if missing or unexpected:
            raise ValueError(
                f"quantization state does not match this model's layers: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for key, q in mine.items():
            q.load_state_dict(state["quantizers"][key])

    def remove(self) -> nn.Module:
        """Swap every QuantLinear back to a plain nn.Linear (same parameters)."""
        for name, layer in self.layers:
            set_submodule(self.model, name, layer.to_linear())
        self.layers = []
        return self.model


def quantize_model(
    model: nn.Module,
    recipe: QuantRecipe | str | dict | None,
    modules: list[str] | tuple[str, ...] | None = None,
) -> ModelQuantizer:
    """Convert the recipe's Linear layers of ``model`` (in place) to :class:`QuantLinear`.

    Args:
        model: any module; for altgrad's GPT the default patterns pick every Linear in the blocks.
        recipe: a :class:`QuantRecipe`, a preset name or a recipe dict.
        modules: override the recipe's module patterns.

    Returns:
        a :class:`ModelQuantizer` (the converted layers plus the hooks the trainer calls).

    Example:
        >>> from altgrad.modeling import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
        >>> len(quantize_model(model, "e5m2").layers)   # c_attn, c_proj, c_fc, c_proj per block
        8
    """
    recipe = QuantRecipe.from_dict(recipe) if not isinstance(recipe, QuantRecipe) else recipe
    patterns = tuple(modules) if modules is not None else recipe.modules
    layers: list[tuple[str, QuantLinear]] = []
    if recipe.is_noop:
        return ModelQuantizer(model, recipe, layers)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in recipe.exclude):
            continue
        _check_blocks(name, module, recipe)
        qlayer = QuantLinear.from_linear(module, recipe, name)
        set_submodule(model, name, qlayer)
        layers.append((name, qlayer))
    if not layers:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"recipe {recipe.name!r} selects no Linear layer (patterns {list(patterns)}, exclude "
            f"{list(recipe.exclude)}); Linear layers in this model: {linear_names[:10]}"
        )
    return ModelQuantizer(model, recipe, layers)


def _check_blocks(name: str, module: nn.Linear, recipe: QuantRecipe) -> None:
    for role in TENSOR_ROLES:
        spec = getattr(recipe, role)
        if spec is None or spec.granularity != "block":
            continue
        # activation / grad_output blocks run along in_features / out_features; weights along in_features
        dims = {"activation": module.in_features, "grad_output": module.out_features}.get(role, module.in_features)
        if dims % spec.block_size:
            raise ValueError(
                f"{name}: {role} block size {spec.block_size} does not divide its last dim ({dims}); "
                "choose a block size that divides every selected layer's width"
            )

