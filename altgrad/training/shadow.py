"""FP32 shadow: the same model in float32 without quantization, run on the same batch, so every
comparison step says how far the quantized gradients are from full-precision ones.

Example:
    >>> from altgrad.modeling import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    >>> shadow = FP32ShadowModel(model)
    >>> batch = {"input_ids": torch.randint(0, 11, (2, 8))}
    >>> batch["labels"] = batch["input_ids"]
    >>> model(**batch).loss.backward()
    >>> shadow.sync_from(model); _ = shadow.accumulate(batch)
    >>> round(shadow.compare(model)["grad_cos_sim/mean"].item(), 4)
    1.0
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from altgrad.training.quantized_linear import QuantLinear, set_submodule

__all__ = ["FP32ShadowModel", "get_rng_state", "gradient_snr", "set_rng_state", "unwrap_model"]


def gradient_snr(g: torch.Tensor) -> torch.Tensor:
    """|mean| / std of a gradient tensor (inf when std is 0), as a 0-d float32 tensor."""
    g = g.detach().float().reshape(-1)
    if g.numel() < 2:
        return torch.full((), math.inf, device=g.device)
    mean, std = g.mean(), g.std()
    return torch.where(std > 0, mean.abs() / std.clamp_min(1e-45), torch.full_like(std, math.inf))


def get_rng_state(device: torch.device):
    """The generator state a forward on ``device`` draws from (CPU, plus the device's on CUDA): what a twin
    of a step (the shadow, a what-if replica, a replay) rewinds to so its dropout masks and stochastic
    rounding draws are the run's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state) -> None:
    """Rewind to a state from :func:`get_rng_state`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (`.module` / `._orig_mod`)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


class FP32ShadowModel:
    """A float32, unquantized copy of a model that recomputes gradients on the trainer's batches.

    Cost: one float32 parameter copy (:meth:`sync_from`) and one extra forward/backward per micro-batch
    of a comparison step. Its gradients are zeroed at each sync, accumulated over the same micro-batches
    as the model (so gradient accumulation compares the full accumulated gradient), and all-reduced
    (averaged) across ranks like DDP does, so the comparison is like for like.

    Args:
        model: the trained model (QuantLinear layers are turned back into plain Linears in the copy).
        layers: parameter names to compare; default every parameter with 2+ dims (the matrices).
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None) -> None:
        source = unwrap_model(model)
        shadow = copy.deepcopy(source)
        for name, module in list(shadow.named_modules()):
            if isinstance(module, QuantLinear):
                set_submodule(shadow, name, module.to_linear())
        self.model = shadow.float()
        self.model.train(source.training)
        params = dict(self.model.named_parameters())
        self.layers = layers or [n for n, p in params.items() if p.dim() >= 2 and p.requires_grad]
        unknown = sorted(set(self.layers) - set(params))
        if unknown:
            raise ValueError(f"shadow layers not in the model: {unknown[:5]}; parameters: {list(params)[:10]}")

    @torch.no_grad()
    def sync_from(self, model: nn.Module) -> None:
        """Copy the trained model's current weights (as float32) and zero the shadow's gradients."""
        source = dict(unwrap_model(model).named_parameters())
        for name, p in self.model.named_parameters():
            p.copy_(source[name].detach())
            p.grad = None
        self.model.train(unwrap_model(model).training)

    def accumulate(self, inputs: dict, loss_divisor: float = 1.0, loss_fn=None, **forward_kwargs) -> torch.Tensor:
        """Forward/backward one micro-batch in float32 with no autocast; returns the loss.

        By default the loss is ``model(**inputs, **forward_kwargs).loss / loss_divisor``; a trainer passes
        ``loss_fn(shadow_model, batch)`` to reproduce its own loss exactly (label smoothing, token
        counts, gradient-accumulation scaling).
        """
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.autocast(device_type=device.type, enabled=False):
            if loss_fn is not None:
                loss = loss_fn(self.model, batch)
            else:
                loss = self.model(**batch, **forward_kwargs).loss / loss_divisor
            loss.backward()
        return loss.detach()

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """Average the shadow's gradients across ranks (what DDP does for the model)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    @torch.no_grad()
    def compare(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-layer and aggregate comparison of the model's gradients to the shadow's (on device).

        Keys: ``grad_cos_sim/<layer>``, ``grad_rel_error/<layer>`` (||g - g32|| / ||g32||),
        ``grad_snr/<layer>`` (quantized run) and ``grad_snr_fp32/<layer>``, plus ``grad_cos_sim/mean``,
        ``grad_cos_sim/min``, ``grad_rel_error/mean``, ``grad_snr/mean``, ``grad_snr_fp32/mean``.
        """
        trained = dict(unwrap_model(model).named_parameters())
        mine = dict(self.model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        cos_values, rel_values, snr_q, snr_f = [], [], [], []
        for name in self.layers:
            g_q, g_f = trained[name].grad, mine[name].grad
            if g_q is None or g_f is None:
                continue
            a, b = g_q.detach().float().reshape(-1), g_f.detach().float().reshape(-1)
            na, nb = a.norm(), b.norm()
            both_zero = (na == 0) & (nb == 0)
            cos = torch.where(both_zero, torch.ones_like(na), (a @ b) / (na * nb).clamp_min(1e-30))
            rel = torch.where(nb > 0, (a - b).norm() / nb.clamp_min(1e-30), (a - b).norm())
            s_q, s_f = gradient_snr(a), gradient_snr(b)
            out[f"grad_cos_sim/{name}"] = cos
            out[f"grad_rel_error/{name}"] = rel
            out[f"grad_snr/{name}"] = s_q
            out[f"grad_snr_fp32/{name}"] = s_f
            cos_values.append(cos)
            rel_values.append(rel)
            snr_q.append(s_q)
            snr_f.append(s_f)
        if cos_values:
            cos_t = torch.stack(cos_values)
            out["grad_cos_sim/mean"] = cos_t.mean()
            out["grad_cos_sim/min"] = cos_t.min()
            out["grad_rel_error/mean"] = torch.stack(rel_values).mean()
            snr_q_t, snr_f_t = torch.stack(snr_q), torch.stack(snr_f)
            # infinite SNRs (constant gradients) would swamp a mean: average the finite ones
            out["grad_snr/mean"] = _finite_mean(snr_q_t)
            out["grad_snr_fp32/mean"] = _finite_mean(snr_f_t)
        return out


def _finite_mean(t: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(t)
    return torch.where(finite, t, torch.zeros_like(t)).sum() / finite.sum().clamp_min(1)
