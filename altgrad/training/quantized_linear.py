"""Quantized training applied from outside the model: `quantize_model` swaps selected `nn.Linear`s for
:class:`QuantLinear`, whose autograd function quantizes both operands of all three GEMMs the way real
FP8 training does:

    forward:           y  = Q_a(x) @ Q_w(W)^T + b
    backward (input):  dx = Q_g(dy) @ Q_w(W)
    backward (weight): dW = Q_g(dy)^T @ Q_a(x)

Master weights stay in high precision (unless the recipe stores them quantized); nothing is copied
into ``param.data`` around the forward pass. A `QuantLinear` keeps the `nn.Linear`'s own parameters
(same objects, same state-dict keys), so a saved model is a plain model that loads without altgrad.

Each role of each layer has a :class:`TensorQuantizer`, the composition of three parts that change at
different rates: its frozen :class:`~altgrad.training.recipe.TensorQuantSpec` (never), its
:class:`ScaleState` (per optimizer step; what checkpoints carry) and its :class:`StatsAccumulator`
(per logged step). The autograd functions get those quantizers and a ``training`` flag, never the
module.

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
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from altgrad.quantization import (
    AmaxHistory,
    BitStallDetector,
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
from altgrad.training import compiled_linear, traced_linear
from altgrad.training.native_fp8 import NativeFP8LinearFunction, NativeFP8Plan
from altgrad.training.recipe import (
    LAYER_ROLES,
    Backend,
    Compensation,
    GranularityKind,
    QuantRecipe,
    Scaling,
    TensorQuantSpec,
    recipe_mismatch,
)

logger = logging.getLogger(__name__)

__all__ = ["TensorQuantizer", "ScaleState", "StatsAccumulator", "QuantLinear", "ModelQuantizer", "quantize_model"]

SQNR_CAP_DB = 200.0  # reported for tensors the format carries exactly


def _scale_from_amax(spec: TensorQuantSpec, amax_value: torch.Tensor) -> torch.Tensor:
    """The scale policy: the multiplier that maps ``amax_value`` into ``spec.format``."""
    if spec.scale_format == "E8M0":
        return mx_scale(amax_value, spec.format)
    return compute_scale(amax_value, spec.format, margin=spec.margin, power_of_two=spec.power_of_two)


class ScaleState:
    """One role's scaling state: what a checkpoint must carry to resume its scales exactly.

    Delayed scaling follows Transformer Engine: the scale used during an optimizer step comes from the
    amax history of *previous* steps and is frozen for the whole step, while the step's own amax (the
    max over its micro-batches) joins the history when the next step begins. Freezing makes every
    recomputation of the step (gradient checkpointing) see the same scale, and makes the history count
    optimizer steps. A driver announces steps with :meth:`begin_step`; without one, each training call
    counts as a step. Evaluation calls (``record=False``) use the current scale and change nothing.
    Current scaling and no scaling keep no state (``state_dict()`` then holds no history).

    Example:
        >>> from altgrad.training.recipe import TensorQuantSpec
        >>> state = ScaleState(TensorQuantSpec("E4M3", scaling="delayed"))
        >>> state.scale_for(torch.full((4,), 2.0)).item()   # first step: its own amax, 448 / 2
        224.0
        >>> state.observe_amax(torch.tensor(4.0)); state.begin_step()
        >>> state.scale_for(torch.full((4,), 100.0)).item()  # from the history (amax 4), not from x
        112.0
        >>> sorted(state.state_dict())
        ['history', 'step_amax', 'stepped']
    """

    def __init__(self, spec: TensorQuantSpec) -> None:
        self.spec = spec
        self.history = AmaxHistory(spec.amax_history_len) if spec.scaling is Scaling.DELAYED else None
        self.stepped = False  # a driver calls begin_step()
        self.step_amax: torch.Tensor | None = None  # this step's amax, not yet in the history
        self.step_scale: torch.Tensor | None = None  # the scale frozen for this step
        self.last_scale: torch.Tensor | None = None  # the last training call's scale (bit-stall reads it)
        # Compiled graphs that trace the quantizer (`altgrad.training.traced_linear`) fold their calls'
        # amax into this device buffer in place (-inf: none yet) and flag it; begin_step folds it here.
        self.traced_amax: torch.Tensor | None = None
        self.traced_pending = False

    @property
    def delayed(self) -> bool:
        return self.history is not None

    def begin_step(self) -> None:
        """Start an optimizer step: last step's amax joins the history, and the step's scale is frozen
        from it (derived at the first training call instead when there is no history yet)."""
        self.stepped = True
        self._fold_traced()
        if self.history is not None and self.step_amax is not None:
            self.history.update_amax(self.step_amax)
        self.step_amax = None
        self.step_scale = None
        if self.history is not None and len(self.history):
            # Derived now rather than at the first call (same value: the history does not change during
            # the step), so that a compiled graph can take it as an input.
            self._freeze(_scale_from_amax(self.spec, self.history.get_amax(self.spec.amax_algo.value)))

    def _freeze(self, scale: torch.Tensor) -> None:
        """This step's scale (also ``last_scale``: traced graphs do not set it), and a traced-amax buffer on
        the history's device for the graphs to accumulate into."""
        self.step_scale = self.last_scale = scale
        device = self.history.history.device
        if self.traced_amax is None or self.traced_amax.device != device:
            self.traced_amax = torch.full((), -math.inf, device=device)

    @staticmethod
    def begin_steps(states) -> None:
        """:meth:`begin_step` on many states at once, the delayed ones batched: a model's 36 delayed
        quantizers cost about 20 small tensor ops per group of like specs instead of about 15 each.

        Same arithmetic, element for element, as each state's own :meth:`begin_step` (a test compares the
        two bit for bit): the history write keeps the previous amax for a non-finite one, the window is
        reduced the same way, the scale formula runs on a vector instead of a scalar. States whose step is
        irregular (no amax this step, an empty history, a step that mixed traced and eager calls) take the
        one-by-one path.
        """
        states = list(states)
        ScaleState._drop_unwritten(states)
        groups: dict[tuple, list] = {}
        for state in states:
            history = state.history
            amax_now = state.traced_amax if state.traced_pending else state.step_amax
            regular = (
                history is not None and history.count > 0 and history.history is not None
                and amax_now is not None and (state.traced_pending != (state.step_amax is not None))
                and amax_now.device == history.history.device  # else begin_step moves the history first
            )
            if not regular:
                state.begin_step()
                continue
            h = history.history
            key = (history.window_size, history.count, h.shape, h.device, ScaleState._scale_key(state.spec))
            groups.setdefault(key, []).append(state)
        for (window, count, _, device, _), group in groups.items():
            spec = group[0].spec
            amaxes = torch.stack([s.traced_amax if s.traced_pending else s.step_amax for s in group]).to(torch.float32)
            traced = [s.traced_amax for s in group if s.traced_pending]
            if traced:  # reset for the next step's graph calls
                torch._foreach_copy_(traced, [torch.full((), -math.inf, device=device)] * len(traced))
            rows = torch.stack([s.history.history for s in group])  # (n, window, *amax shape)
            previous = rows[:, (count - 1) % window]
            rows[:, count % window] = torch.where(torch.isfinite(amaxes), amaxes, previous)
            torch._foreach_copy_([s.history.history for s in group], list(rows.unbind(0)))
            if spec.amax_algo.value == "most_recent":
                source = rows[:, count % window]
            else:
                source = rows[:, : min(count + 1, window)].amax(dim=1)
            scales = _scale_from_amax(spec, source)
            for state, scale in zip(group, scales.unbind(0)):
                state.history.count += 1
                state.stepped = True
                state.traced_pending = False
                state.step_amax = None
                state._freeze(scale)

    @staticmethod
    def _scale_key(spec: TensorQuantSpec) -> tuple:
        # What `_scale_from_amax` and the history reduction read from a spec: states equal here share a batch.
        return (spec.format, spec.margin, spec.power_of_two, spec.scale_format, spec.amax_algo)

    @staticmethod
    def _drop_unwritten(states) -> None:
        """Clear the pending flag of traced buffers no call wrote (still -inf): a training forward whose
        backward never ran flags grad_output's buffer, and eager records nothing then. One host read per
        device for all the states: a step boundary, where the session reads the loss anyway."""
        by_device: dict[torch.device, list] = {}
        for state in states:
            if state.traced_pending:
                by_device.setdefault(state.traced_amax.device, []).append(state)
        for group in by_device.values():
            written = (torch.stack([s.traced_amax for s in group]) != -math.inf).tolist()
            for state, was_written in zip(group, written):
                state.traced_pending = was_written

    def _traced_step_amax(self) -> torch.Tensor | None:
        """``step_amax`` with the traced calls' amax folded in (nothing changed)."""
        if not self.traced_pending or self.traced_amax.item() == -math.inf:
            return self.step_amax
        traced = self.traced_amax.clone()
        return traced if self.step_amax is None else torch.maximum(self.step_amax, traced)

    def _fold_traced(self) -> None:
        """Fold the amax that traced graph calls accumulated on device into ``step_amax``."""
        if self.traced_pending:
            self.step_amax = self._traced_step_amax()
            self.traced_amax.fill_(-math.inf)
            self.traced_pending = False

    def observe_amax(self, current: torch.Tensor) -> None:
        """Fold a training call's amax into this step's (delayed scaling; a no-op otherwise)."""
        if self.history is not None:
            self.step_amax = current if self.step_amax is None else torch.maximum(self.step_amax, current)

    def _delayed_scale(self, x: torch.Tensor, record: bool) -> torch.Tensor:
        if record:
            self._fold_traced()  # a traced call earlier in this step (normally none: graphs do not mix)
        if record and not self.stepped:
            # No step boundaries announced: every training call is a step of its own.
            self.begin_step()
            self.stepped = False
        if self.step_scale is not None:
            return self.step_scale
        if len(self.history):
            source = self.history.get_amax(self.spec.amax_algo.value)
        elif self.step_amax is not None:
            source = self.step_amax
        else:  # the very first step has no history: its own (first micro-batch's) amax
            source = amax(x, self.spec.scale_granularity)
            if record:
                self.step_amax = source
        scale = _scale_from_amax(self.spec, source)
        if record:  # frozen for the rest of the step; evaluation before any step freezes nothing
            self.step_scale = scale
        return scale

    def scale_for(self, x: torch.Tensor, record: bool = True) -> torch.Tensor | None:
        """The multiplier for ``x``; ``record=False`` (evaluation) leaves the state untouched."""
        scaling = self.spec.scaling
        if scaling is Scaling.NONE:
            scale = None
        elif scaling is Scaling.DELAYED:
            scale = self._delayed_scale(x, record)
        else:
            scale = _scale_from_amax(self.spec, amax(x, self.spec.scale_granularity))
        if record:
            self.last_scale = scale
        return scale

    def state_dict(self) -> dict:
        # Read-only, also mid-step: a traced backward still to run keeps writing the buffer it folds from.
        step_amax = self._traced_step_amax()
        # The layout of checkpoints written before the split (keys and values): keep it.
        return {
            "history": None if self.history is None else self.history.state_dict(),
            "step_amax": None if step_amax is None else step_amax.detach().clone(),
            "stepped": self.stepped,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.history is not None and state.get("history") is not None:
            self.history.load_state_dict(state["history"])
        self.step_amax = state.get("step_amax")
        self.stepped = bool(state.get("stepped", False))
        # Re-derived from the loaded history at the next begin_step (or the next training call); until
        # then a compiled model runs this layer through the opaque op.
        self.step_scale = None
        self.traced_pending = False  # what traced calls recorded before the load belongs to the old state
        if self.traced_amax is not None:
            self.traced_amax.fill_(-math.inf)


class StatsAccumulator:
    """One role's logged-step statistics, summed on device across calls until :meth:`pop`.

    It holds the kernel's float64 sums (amax kept apart, as a max), the element count, and the per-call
    dynamic-range share and mean scale; nothing is read to the host here. ``enabled`` is the switch the
    trainer flips for the steps it logs, so ordinary steps pay for quantization alone.

    Example:
        >>> from altgrad.quantization.quantize import quantize_with_sums
        >>> acc = StatsAccumulator("E4M3")
        >>> q, sums = quantize_with_sums(torch.tensor([1000.0, 1.0]), "E4M3", None)
        >>> acc.add(sums, q, None)
        >>> stats = acc.pop()
        >>> stats["overflow_rate"].item(), stats["amax"].item(), acc.pop()
        (0.5, 1000.0, {})
    """

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.enabled = False
        self.count = 0  # calls accumulated since the last pop
        self._sums: torch.Tensor | None = None
        self._amax_seen: torch.Tensor | None = None
        self._per_call: torch.Tensor | None = None
        self._numel = 0

    def add_sums(self, sums: torch.Tensor, numel: int) -> None:
        """Fold in one call's kernel sums alone (no dynamic-range pass over ``q``, no scale): what a
        what-if alternative records, where the rounded tensor itself is thrown away."""
        if self._sums is None:
            self._sums, self._amax_seen = sums, sums[0]
        else:
            self._sums = self._sums + sums
            self._amax_seen = torch.maximum(self._amax_seen, sums[0])
        self._numel += numel
        self.count += 1

    def add(self, sums: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Fold in one call: ``sums`` from the rounding pass over ``q`` (format units), with ``scale``."""
        scale_mean = torch.ones((), device=q.device) if scale is None else scale.detach().float().mean()
        per_call = torch.stack([dynamic_range_used(q, self.format), scale_mean])
        self._per_call = per_call if self._per_call is None else self._per_call + per_call
        self.add_sums(sums, q.numel())

    def pop(self) -> dict[str, torch.Tensor]:
        """Statistics since the last call (on-device 0-d tensors), then reset.

        Rates pool every collected call (overflowing elements / elements seen), SQNR pools their
        energies in the format's units, ``x * scale`` (so with current scaling a call weighs by its
        scale squared; capped at ``SQNR_CAP_DB`` for exactly carried tensors), amax is a max, and
        ``dynamic_range_used`` and ``scale`` are means over the calls (absent when only
        :meth:`add_sums` fed it).

        ``rel_err`` is ``sqrt(noise_energy / signal_energy)`` of the same pooled sums, i.e. exactly
        ``10 ** (-sqnr_db / 20)`` before the cap (0 for an exact tensor): ``||Q(xs) - xs|| / ||xs||`` with
        ``xs = x * scale``. With one scale per tensor that is ``||Q(x) - x|| / ||x||``; with row, block or
        tile scales each scale group weighs by its scale squared, like the SQNR.
        """
        if not self.count:
            return {}
        sums = torch.cat([self._amax_seen.view(1), self._sums[1:]])
        out = stats_from_sums(sums, self._numel)
        out["sqnr_db"] = out["sqnr_db"].clamp(max=SQNR_CAP_DB)
        signal, noise = sums[3], sums[4]
        out["rel_err"] = torch.where(
            noise > 0, (noise / signal.clamp_min(1e-300)).sqrt(), torch.zeros_like(noise)).to(torch.float32)
        if self._per_call is not None:
            per_call = self._per_call / self.count
            out["dynamic_range_used"], out["scale"] = per_call[0], per_call[1]
        self._sums = self._amax_seen = self._per_call = None
        self._numel = self.count = 0
        return out


class TensorQuantizer:
    """Quantizes one tensor role of one layer: a frozen :class:`TensorQuantSpec` (``spec``), its
    checkpointable :class:`ScaleState` (``state``) and its :class:`StatsAccumulator` (``stats``).

    Calls with ``record=True`` (training) advance the scale state and, while ``collect_stats`` is on,
    the statistics; ``record=False`` (evaluation) changes neither.

    Example:
        >>> from altgrad.training.recipe import TensorQuantSpec
        >>> q = TensorQuantizer(TensorQuantSpec("E4M3", scaling="current"))
        >>> q(torch.tensor([448.0, 1.0, 0.3])).tolist()   # amax 448 -> scale 1: E4M3's own grid
        [448.0, 1.0, 0.3125]
        >>> q.last_scale.item(), q.pop_stats()              # not collecting: nothing to pop
        (1.0, {})
    """

    def __init__(self, spec: TensorQuantSpec, name: str = "") -> None:
        self.spec = spec
        self.name = name
        self.granularity = spec.scale_granularity
        self.state = ScaleState(spec)
        self.stats = StatsAccumulator(spec.format)
        # What-if probes (`altgrad.training.whatif`): on logged calls each also rounds x into another
        # format, recording its own statistics and touching nothing of this quantizer's state.
        self.whatif: list = []
        # The rounding pass's options, as the plain values the kernels key their compiled variants on.
        self._round_kwargs = dict(rounding=spec.rounding.value, saturate=spec.saturate)

    # Views on the parts, under the names the rest of altgrad (and user code) has always used.
    @property
    def collect_stats(self) -> bool:
        return self.stats.enabled

    @collect_stats.setter
    def collect_stats(self, enabled: bool) -> None:
        self.stats.enabled = bool(enabled)

    @property
    def last_scale(self) -> torch.Tensor | None:
        return self.state.last_scale

    @property
    def history(self) -> AmaxHistory | None:
        return self.state.history

    def begin_step(self) -> None:
        """Start an optimizer step (see :class:`ScaleState`)."""
        self.state.begin_step()
        for probe in self.whatif:
            probe.begin_step()

    def scale_for(self, x: torch.Tensor, record: bool = True) -> torch.Tensor | None:
        """The multiplier for ``x``; ``record=False`` (evaluation) leaves the scaling state untouched."""
        return self.state.scale_for(x, record)

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Statistics since the last call, then reset (see :meth:`StatsAccumulator.pop`)."""
        return self.stats.pop()

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)

    # ------------------------------------------------------------------ quantize
    def _round(
        self, x: torch.Tensor, record: bool, dequant: bool, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        spec, state, stats = self.spec, self.state, self.stats
        scale = state.scale_for(x, record)
        kwargs = self._round_kwargs
        current = None  # this call's amax, when the rounding pass produced it
        if record and stats.enabled and x.numel():
            # A logged step: the rounding pass also reduces overflow, underflow, SQNR and amax.
            # Fake-quantizing: q stays float32 (format units) until the scale is divided back out, as in
            # the fused path; a narrow x dtype could not hold x * scale.
            q, sums = quantize_with_sums(x, spec.format, scale, dtype=torch.float32 if dequant else dtype, **kwargs)
            current = sums[0].to(torch.float32)
            stats.add(sums, q, scale)
            for probe in self.whatif:  # before observe_amax: a probe sharing the history sees what `scale` saw
                probe.observe(x, state)
            if dequant:
                q = dequantize(q, scale).to(dtype or x.dtype)
        elif record and state.delayed and x.numel():
            # Delayed scaling knows its scale before the pass, so this step's amax comes out of the
            # same fused kernel that rounds x (no extra reduction over x).
            q, current = quantize_with_amax(x, spec.format, scale, dequantize=dequant, dtype=dtype, **kwargs)
        else:
            q = (fake_quantize if dequant else quantize)(x, spec.format, scale, dtype=dtype, **kwargs)
        if current is not None:
            state.observe_amax(current)
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

    def __repr__(self) -> str:
        return f"TensorQuantizer({self.name!r}, {self.spec.format}, {self.spec.scaling}, {self.spec.granularity})"


class _QuantizedLinearFunction(torch.autograd.Function):
    """y = Q_a(x) Q_w(W)^T + b; backward GEMMs on Q_g(dy) and the saved quantized operands.

    ``apply(x, weight, bias, act_q, weight_q, grad_q, training)``: one :class:`TensorQuantizer` (or
    None: that operand stays in high precision) per role, and whether this is a training call (scale
    state and statistics advance) or an evaluation one (current scales, nothing recorded). It never
    sees the module, so it could become a custom op of its own.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act_q, weight_q, grad_q, training: bool):
        # Under autocast the GEMM runs in the autocast dtype: the fused pass writes its operands in that
        # dtype directly (the values autocast's own cast would give, one pass and half the bytes fewer).
        device_type = x.device.type
        gemm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        xq = act_q(x, training, gemm_dtype) if act_q is not None else x
        wq = weight_q(weight, training, gemm_dtype) if weight_q is not None else weight
        ctx.save_for_backward(xq, wq)
        ctx.grad_q, ctx.training = grad_q, training
        ctx.has_bias = bias is not None
        return F.linear(xq, wq, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        xq, wq = ctx.saved_tensors
        gq = ctx.grad_q(grad_out, ctx.training) if ctx.grad_q is not None else grad_out
        grads = traced_linear.linear_grads(ctx.needs_input_grad[:3], ctx.has_bias, grad_out, gq, xq, wq)
        return (*grads, None, None, None, None)


_UNCHECKED = object()  # a device whose native-FP8 support has not been looked up yet


class QuantLinear(nn.Linear):
    """An `nn.Linear` whose GEMMs see quantized operands. Same parameters and state-dict keys.

    Build one with :meth:`from_linear`; it shares the original layer's parameters. With the
    ``native_fp8`` backend, ``native_plan`` holds what conversion decided (see
    :class:`~altgrad.training.native_fp8.NativeFP8Plan`); only the input's device (looked up once per
    device) and shape are checked per call.
    """

    quantizers: dict[str, TensorQuantizer]
    native_plan: NativeFP8Plan

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: QuantRecipe, name: str = "") -> "QuantLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.layer_name = name
        new.quantizers = {}
        for role in ("weight", "activation", "grad_output"):
            spec = recipe.spec_for(name, role)
            if spec is not None:
                new.quantizers[role] = TensorQuantizer(spec, f"{name}/{role}")
        new.native_plan = NativeFP8Plan.for_layer(
            {r: recipe.spec_for(name, r) for r in ("activation", "weight", "grad_output")},
            linear.in_features,
            linear.out_features,
        )
        new._device_reasons = {}  # device -> why it cannot run natively (None: it can)
        new._notes = set()  # notes logged so far: one per layer and note
        # Whether forward tries the FP8 GEMMs at all: a layer the plan rules out says so once, here,
        # and from then on runs the simulated path without a check.
        new.native = recipe.backend is Backend.NATIVE_FP8 and new.native_plan.reason is None
        if recipe.backend is Backend.NATIVE_FP8 and not new.native:
            new._note(f"{name} runs simulated: {new.native_plan.reason}")
        new._op_key = compiled_linear.register_layer(new)  # how the compiled graph's op finds this layer
        new.traced = False  # whether compiled graphs run it as graph code (kept by ModelQuantizer.refresh_traced)
        return new

    def __setstate__(self, state: dict) -> None:
        # A deepcopy or an unpickled layer has quantizers of its own: it must not answer to the
        # original's key in the compiled ops' registry.
        super().__setstate__(state)
        self._op_key = compiled_linear.register_layer(self)
        self.__dict__.setdefault("traced", False)  # pickled before traced layers existed

    def _operands(self) -> tuple[TensorQuantizer | None, TensorQuantizer | None, TensorQuantizer | None]:
        # The autograd functions' quantizer arguments, in their order (None: that operand stays as is).
        q = self.quantizers
        return q.get("activation"), q.get("weight"), q.get("grad_output")

    def _note(self, message: str) -> None:
        if message not in self._notes:
            self._notes.add(message)
            logger.warning("altgrad native_fp8: %s", message)

    def _native_reason(self, x: torch.Tensor) -> str | None:
        device = x.device
        reason = self._device_reasons.get(device, _UNCHECKED)
        if reason is _UNCHECKED:
            reason = self._device_reasons[device] = self.native_plan.device_reason(device)
            if reason is None:  # the first time this layer runs natively: what runs in float32
                for note in self.native_plan.notes:
                    self._note(f"{self.layer_name}: {note}")
        return reason if reason is not None else self.native_plan.input_reason(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Inside torch.compile: graph code where the step needs rounding only (traced_linear), else
            # one opaque op pair running the code below (compiled_linear).
            # `traced` (one guard) first: steps it rules out share one cached graph, whatever ruled them out.
            if self.traced and traced_linear.can_trace(self):
                return traced_linear.traced_forward(self, x)
            return compiled_linear.compiled_forward(self, x)
        return self.autograd_function(x).apply(x, self.weight, self.bias, *self._operands(), self.training)

    def autograd_function(self, x: torch.Tensor) -> type[torch.autograd.Function]:
        """The function this call runs: native FP8 where the layer and ``x`` allow it, else the simulation."""
        if self.native:
            reason = self._native_reason(x)
            if reason is None:
                return NativeFP8LinearFunction
            self._note(f"{self.layer_name} runs simulated: {reason}")  # one note per layer and reason
        return _QuantizedLinearFunction

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


# Kahan compensation buffers are kept in bf16: the residual of a rounding is at most half a grid step of
# the stored format, and 8 significant bits of it carry the lost update to well within a percent (optimi
# keeps bf16 buffers for bf16 weights). Memory: 2 bytes per stored weight.
KAHAN_BUFFER_DTYPE = torch.bfloat16


class ModelQuantizer:
    """Handle returned by :func:`quantize_model`: the converted layers and every per-step hook the
    trainer needs (statistics, weight-gradient and stored-weight rounding, bit-stall, optimizer-state
    rounding, state).

    Stored weights with ``compensation: kahan`` keep a buffer ``c`` per layer (``compensation``). After
    the optimizer moved a stored weight ``w`` to ``w + u`` (float32), the stored value becomes
    ``Q(w + u + c)`` and ``c`` the part of ``w + u + c`` that rounding left out, so an update smaller than
    half a grid step waits in ``c`` instead of being lost. Bit-stall counts an update as stalled when the
    stored weight did not move at that step, even if the update went into ``c``.
    """

    def __init__(self, model: nn.Module, recipe: QuantRecipe, layers: list[tuple[str, QuantLinear]]) -> None:
        self.model = model
        self.recipe = recipe
        self.layers = layers
        self.weight_grad_quantizers = {
            name: TensorQuantizer(spec, f"{name}/weight_grad")
            for name, _ in layers if (spec := recipe.spec_for(name, "weight_grad")) is not None
        }
        self.stored_weight_quantizers = {
            name: TensorQuantizer(spec, f"{name}/stored_weight")
            for name, _ in layers if (spec := recipe.spec_for(name, "stored_weight")) is not None
        }
        self.bit_stall = BitStallDetector()
        self._snapshots: dict[str, torch.Tensor] = {}
        # Kahan buffers, made at the first optimizer step (zeros: the stored weights start exact).
        self.kahan_layers = {
            name for name, q in self.stored_weight_quantizers.items() if q.spec.compensation is Compensation.KAHAN}
        self.kahan = bool(self.kahan_layers)
        self.compensation: dict[str, torch.Tensor] = {}
        self.optimizer_states = None
        if recipe.optimizer_m is not None or recipe.optimizer_v is not None:
            from altgrad.training.optimizer_states import OptimizerStateQuantizer

            self.optimizer_states = OptimizerStateQuantizer(model, recipe)

    @property
    def has_state(self) -> bool:
        """Whether a checkpoint must carry this quantizer's state (any quantizer at all)."""
        return bool(self.all_quantizers())

    def attach_optimizer(self, optimizer) -> None:
        """The optimizer whose moments the recipe's ``optimizer_m`` / ``optimizer_v`` round (a no-op for
        recipes without them)."""
        if self.optimizer_states is not None:
            self.optimizer_states.attach(optimizer)

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
        if self.optimizer_states is not None:
            out.update(self.optimizer_states.quantizers)
        return out

    def set_collect_stats(self, enabled: bool) -> None:
        for q in self.all_quantizers().values():
            q.collect_stats = enabled
        self.refresh_traced()

    def refresh_traced(self) -> None:
        """Decide, for the calls until the next step or statistics switch, which layers a compiled model
        runs as graph code (see `altgrad.training.traced_linear`); eager runs ignore it."""
        for _, layer in self.layers:
            layer.traced = traced_linear.can_trace(layer)

    def pop_stats(self) -> dict[str, torch.Tensor]:
        """Per-tensor statistics since the last call, keyed ``<layer>/<role>/<stat>`` (on device)."""
        out = {}
        for key, q in self.all_quantizers().items():
            for stat, value in q.pop_stats().items():
                out[f"{key}/{stat}"] = value
        return out

    def pop_whatif_stats(self) -> dict[tuple[str, str, str], dict[str, torch.Tensor]]:
        """What-if statistics since the last call: ``{(alternative, layer, role): {stat: 0-d tensor}}``
        (see `altgrad.training.whatif`); empty without alternatives."""
        out = {}
        for key, q in self.all_quantizers().items():
            layer, role = key.rsplit("/", 1)
            for probe in q.whatif:
                stats = probe.stats.pop()
                if stats:
                    out[(probe.name, layer, role)] = stats
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
        quantizers = list(self.all_quantizers().values())
        ScaleState.begin_steps([q.state for q in quantizers])
        for q in quantizers:
            for probe in q.whatif:
                probe.begin_step()
        for _, layer in self.layers:
            compiled_linear.discard_pending(layer)
        self.refresh_traced()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Round stored weights (if the recipe stores them quantized, Kahan-compensated if it says so),
        measure bit-stall, and round the optimizer's moments (if the recipe has optimizer roles)."""
        for name, layer in self.layers:
            before = self._snapshots.get(name)
            stored = self.stored_weight_quantizers.get(name)
            after = layer.weight.detach()
            if stored is not None:
                if name in self.kahan_layers:
                    # after = w_stored_before + u (the optimizer's float32 update u): adding c gives
                    # w_stored_before + u + c, the compensated sum; what rounding drops goes back to c.
                    c = self.compensation.get(name)
                    target = after if c is None else after + c.float()  # (out, in)
                    rounded = stored(target)
                    self.compensation[name] = (target - rounded).to(KAHAN_BUFFER_DTYPE)
                else:
                    rounded = stored(after)  # nearest or stochastic, as the recipe says
                if before is not None:
                    # `before` is the stored value: the update stalled where rounding gave it back.
                    updated = after != before
                    self.bit_stall.count(name, updated, updated & (rounded == before))
                layer.weight.copy_(rounded)
            elif before is not None and "weight" in layer.quantizers:
                wq = layer.quantizers["weight"]
                self.bit_stall.update(name, before, after, wq.spec.format, wq.last_scale)
        if self.optimizer_states is not None:
            self.optimizer_states.after_step()
        self._snapshots = {}
        self.set_collect_stats(False)  # whatever runs before the next step (evaluation) is not a log step

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Delayed-scaling state (amax histories) of every quantizer, for checkpoints."""
        out = {
            "recipe": self.recipe.to_dict(),
            "quantizers": {key: q.state_dict() for key, q in self.all_quantizers().items()},
        }
        if self.kahan:
            out["compensation"] = {name: c.detach().clone() for name, c in self.compensation.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore the scaling state saved with this recipe, or with one this recipe only adds high-precision
        overrides to (`QuantRecipe.promotes`): the promoted tensors' state is then left behind."""
        saved = state.get("recipe")
        problem = recipe_mismatch(saved, self.recipe)
        promoted = problem is not None and _promotes(self.recipe, saved)
        if problem is not None and not promoted:
            raise ValueError(f"quantization state does not fit this run: {problem}")
        mine = self.all_quantizers()
        missing = sorted(set(mine) - set(state["quantizers"]))
        unexpected = [] if promoted else sorted(set(state["quantizers"]) - set(mine))
        if missing or unexpected:
            raise ValueError(
                f"quantization state does not match this model's layers: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for key, q in mine.items():
            q.load_state_dict(state["quantizers"][key])
        self.refresh_traced()
        if self.kahan:
            buffers = state.get("compensation") or {}
            unknown = sorted(set(buffers) - {name for name, _ in self.layers})
            if unknown:
                raise ValueError(f"quantization state holds Kahan buffers for layers this model lacks: {unknown[:5]}")
            # Absent before the first optimizer step (zeros then); on the weights' device.
            self.compensation = {
                name: buffers[name].to(layer.weight.device, KAHAN_BUFFER_DTYPE) for name, layer in self.layers if name in buffers
            }

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
    promoted = 0  # selected layers whose every tensor an override keeps in high precision
    if not recipe.converts_layers:  # nothing at all, or optimizer states only
        return ModelQuantizer(model, recipe, layers)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in recipe.exclude):
            continue
        if all(recipe.spec_for(name, role) is None for role in LAYER_ROLES):
            promoted += 1
            continue
        _check_blocks(name, module, recipe)
        qlayer = QuantLinear.from_linear(module, recipe, name)
        set_submodule(model, name, qlayer)
        layers.append((name, qlayer))
    if not layers and not promoted:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"recipe {recipe.name!r} selects no Linear layer (patterns {list(patterns)}, exclude "
            f"{list(recipe.exclude)}); Linear layers in this model: {linear_names[:10]}"
        )
    return ModelQuantizer(model, recipe, layers)


def _promotes(recipe: QuantRecipe, saved: dict | None) -> bool:
    """Whether ``recipe`` is the saved recipe with extra (layer, role)s kept in high precision."""
    if saved is None:
        return False
    try:
        return recipe.promotes(QuantRecipe.from_dict(saved))
    except (TypeError, ValueError):
        return False


def _check_blocks(name: str, module: nn.Linear, recipe: QuantRecipe) -> None:
    """Fail at conversion, naming the layer, when a block or tile size does not divide what it tiles."""
    for role in LAYER_ROLES:
        spec = recipe.spec_for(name, role)
        if spec is None:
            continue
        n = spec.block_size
        if spec.granularity is GranularityKind.BLOCK:
            # activation / grad_output blocks run along in_features / out_features; weights along in_features
            dims = {"activation": module.in_features, "grad_output": module.out_features}.get(role, module.in_features)
            if dims % n:
                raise ValueError(
                    f"{name}: {role} block size {n} does not divide its last dim ({dims}); "
                    "choose a block size that divides every selected layer's width"
                )
        elif spec.granularity is GranularityKind.TILE:
            # The recipe admits tiles on the weight-shaped roles only; each is (out_features, in_features).
            shape = (module.out_features, module.in_features)
            if role not in ("weight", "weight_grad", "stored_weight"):
                raise ValueError(f"{name}: {role} tiles need a 2-D tensor of fixed shape")
            if any(d % n for d in shape):
                raise ValueError(
                    f"{name}: {role} tiles of {n}x{n} do not divide its shape (out, in) = {shape}; choose a tile "
                    "size that divides both dims of every selected layer"
                )
