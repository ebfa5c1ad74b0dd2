"""Optimizer states in a low-precision format: Adam's moments rounded into the recipe's formats after every
optimizer step, which is what storing them in that format means (MS-AMP keeps the first moment in FP8
and the second in FP16; torchao ships 8-bit and FP8 Adam).

The recipe's ``optimizer_m`` and ``optimizer_v`` specs (any format, scaling, granularity and rounding)
apply to the optimizer-state tensors ``exp_avg`` and ``exp_avg_sq`` of every parameter the optimizer
updates. Each (parameter, moment) pair gets a :class:`~altgrad.training.quantized_linear.TensorQuantizer`
keyed ``<param>/<state key>``, so its statistics appear as ``quantization/<param>/exp_avg/sqnr_db``
(overflow, underflow, SQNR) and its scaling state travels in the session's checkpoint like every other
role's. The moments themselves are in the optimizer's own ``state_dict`` (already rounded, so a resume
continues exactly).

The optimizer is not known when the model is converted (the Trainer builds it later), so the quantizers
are made for every trainable parameter up front and the optimizer is attached afterwards
(:meth:`OptimizerStateQuantizer.attach`; ``QuantSession(optimizer=...)`` or
``session.attach_optimizer(...)``).

Memory: the simulation keeps the rounded moments in the optimizer's float32 tensors, so it measures what
the formats do to training, not the memory they save. Stored for real, AdamW's 8 bytes of moments per
parameter become 2 (both in FP8), 3 (m FP8, v FP16, MS-AMP's choice) or 4 (both 16-bit).

Example:
    >>> import torch
    >>> from altgrad.training.recipe import QuantRecipe
    >>> net = torch.nn.Linear(4, 2, bias=False)
    >>> recipe = QuantRecipe(optimizer_m={"format": "e4m3", "scaling": "current"}, optimizer_v="fp16")
    >>> states = OptimizerStateQuantizer(net, recipe)
    >>> sorted(states.quantizers)
    ['weight/exp_avg', 'weight/exp_avg_sq']
    >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    >>> states.attach(opt)
    >>> net(torch.randn(3, 4)).sum().backward(); opt.step(); states.after_step()
    >>> m = opt.state[net.weight]["exp_avg"]
    >>> scale = states.quantizers["weight/exp_avg"].last_scale
    >>> from altgrad.quantization import quantize
    >>> torch.equal(m * scale, quantize(m * scale, "e4m3"))   # on E4M3's grid (in scaled units)
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from altgrad.training.recipe import OPTIMIZER_ROLES, OPTIMIZER_STATE_KEYS, GranularityKind, QuantRecipe

__all__ = ["OptimizerStateQuantizer", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``), whose ``state`` holds the moment tensors."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


class OptimizerStateQuantizer:
    """Rounds an optimizer's moments into the recipe's ``optimizer_m`` / ``optimizer_v`` formats.

    Args:
        model: the model whose trainable parameters the optimizer updates (names come from here).
        recipe: the recipe; its optimizer roles that are set are applied.
    """

    def __init__(self, model: nn.Module, recipe: QuantRecipe) -> None:
        # Imported here: quantized_linear imports this module for ModelQuantizer.
        from altgrad.training.quantized_linear import TensorQuantizer
        from altgrad.training.shadow import unwrap_model

        self.model = model
        self.specs = {
            OPTIMIZER_STATE_KEYS[role]: getattr(recipe, role)
            for role in OPTIMIZER_ROLES
            if getattr(recipe, role) is not None
        }
        self.params = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
        for name, p in self.params:
            for key, spec in self.specs.items():
                _check_shape(name, tuple(p.shape), key, spec)
        self.quantizers: dict[str, TensorQuantizer] = {
            f"{name}/{key}": TensorQuantizer(spec, f"{name}/{key}") for name, _ in self.params for key, spec in self.specs.items()
        }
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer) -> None:
        """Use ``optimizer`` (or the torch optimizer inside an accelerate wrapper) from now on.

        Raises ValueError if it updates a parameter that is not one of the model's trainable ones: its
        moments would go unrounded (or, worse, be rounded under another parameter's name)."""
        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"attach_optimizer expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        mine = {id(p) for _, p in self.params}
        foreign = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in mine)
        if foreign:
            raise ValueError(
                f"the optimizer updates {foreign} tensor(s) that are not trainable parameters of the session's model; "
                "optimizer-state roles need the optimizer built over model.parameters()"
            )
        self.optimizer = opt

    @torch.no_grad()
    def after_step(self) -> None:
        """Round every parameter's moments in place (call after ``optimizer.step()``)."""
        if self.optimizer is None:
            raise RuntimeError(
                f"the recipe stores optimizer states {sorted(self.specs)} in low precision but no optimizer is "
                "attached: pass optimizer= to QuantSession or call session.attach_optimizer(optimizer)"
            )
        state = self.optimizer.state
        for name, p in self.params:
            st = state.get(p)
            if not st:  # not stepped yet (no gradient so far, or frozen in this optimizer)
                continue
            for key in self.specs:
                t = st.get(key)
                if not isinstance(t, torch.Tensor):
                    raise ValueError(
                        f"{type(self.optimizer).__name__} keeps no {key!r} state for {name} (its state keys: "
                        f"{sorted(st)}); optimizer_m / optimizer_v apply to optimizers with Adam's moments "
                        "(exp_avg, exp_avg_sq: Adam, AdamW, NAdam, RAdam)"
                    )
                t.copy_(self.quantizers[f"{name}/{key}"](t))


def _check_shape(name: str, shape: tuple[int, ...], key: str, spec) -> None:
    """Fail at conversion, naming the parameter, when a block size does not divide its last dim."""
    if spec.granularity is GranularityKind.BLOCK and shape and shape[-1] % spec.block_size:
        raise ValueError(
            f"{name}: {key} block size {spec.block_size} does not divide its last dim ({shape[-1]}); choose a "
            "block size that divides every trainable parameter's last dim, or 'row' / 'tensor' granularity"
        )
