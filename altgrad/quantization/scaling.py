"""Scales: how a tensor is mapped into a format's range before rounding.

``q = quantize(x, fmt, scale)`` rounds ``x * scale``; a good scale puts the tensor's largest magnitude
(amax) just under the format's ``max_value``. This module computes amax at every granularity in use
(per tensor, per row, per block, MX) and turns it into scales, either just in time ("current scaling")
or from an amax history ("delayed scaling", as Transformer Engine does).

Example:
    >>> x = torch.randn(64, 128)
    >>> scale = compute_scale(amax(x, Granularity.per_block(32)), "e4m3", power_of_two=True)
    >>> scale.shape
    torch.Size([64, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.quantize import quantize

__all__ = [
    "Granularity",
    "amax",
    "compute_scale",
    "mx_scale",
    "scaled_quantize",
    "AmaxHistory",
]

# Scales are kept inside float32's normal range so that x * scale and q / scale never hit inf or
# flush to zero because of the scale itself.
_MAX_SCALE = 2.0**126
_MIN_SCALE = 2.0**-126


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale.

    - ``kind="tensor"``: one scale for the whole tensor.
    - ``kind="row"``: one scale per slice, amax reduced over ``axis`` (``axis=-1`` on a ``(M, K)``
      activation gives one scale per row, the "rowwise" scaling of torchao / Transformer Engine).
    - ``kind="block"``: one scale per block of ``block_shape`` over the trailing dims: ``(32,)`` or
      ``(1, 32)`` is MX, ``(1, 128)`` DeepSeek-V3 activations, ``(128, 128)`` DeepSeek-V3 weights.

    Example:
        >>> Granularity.per_block(32).block_shape
        (1, 32)
    """

    kind: str = "tensor"
    axis: int = -1
    block_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "row", "block"):
            raise ValueError(f"unknown granularity {self.kind!r}; accepted: 'tensor', 'row', 'block'")
        if self.kind == "block":
            if not self.block_shape or any((not isinstance(b, int)) or b < 1 for b in self.block_shape):
                raise ValueError(f"block granularity needs a block_shape of positive ints, got {self.block_shape!r}")
            object.__setattr__(self, "block_shape", tuple(self.block_shape))

    @classmethod
    def per_tensor(cls) -> "Granularity":
        return cls("tensor")

    @classmethod
    def per_row(cls, axis: int = -1) -> "Granularity":
        return cls("row", axis=axis)

    @classmethod
    def per_block(cls, *block_shape: int) -> "Granularity":
        if len(block_shape) == 1:
            block_shape = (1, block_shape[0])
        return cls("block", block_shape=tuple(block_shape))


def amax(x: torch.Tensor, granularity: Granularity | None = None) -> torch.Tensor:
    """Largest magnitude per scaling group, shaped to tile ``x`` (see :func:`quantize`). No host sync.

    NaNs propagate (a NaN amax is how a bad tensor shows up); infs give an inf amax.

    Example:
        >>> amax(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), Granularity.per_row()).flatten().tolist()
        [3.0, 2.0]
    """
    granularity = granularity or Granularity()
    ax = x.detach().abs().to(torch.float32)
    if granularity.kind == "tensor":
        return ax.amax() if ax.numel() else torch.zeros((), device=x.device)
    if granularity.kind == "row":
        if x.dim() == 0:
            raise ValueError("per-row scaling needs a tensor with at least one dim")
        return ax.amax(dim=granularity.axis, keepdim=True)
    block = granularity.block_shape
    if len(block) > x.dim():
        # (1, 32) on a 1-D tensor: drop leading unit dims of the block
        while len(block) > x.dim() and block[0] == 1:
            block = block[1:]
        if len(block) > x.dim():
            raise ValueError(f"block shape {granularity.block_shape} has more dims than x of shape {tuple(x.shape)}")
    lead = x.shape[: x.dim() - len(block)]
    tail = x.shape[x.dim() - len(block) :]
    view_shape: list[int] = list(lead)
    for dim, (n, b) in enumerate(zip(tail, block)):
        if n % b:
            raise ValueError(
                f"block size {b} does not divide dim {len(lead) + dim} of x (size {n}); shape {tuple(x.shape)}, "
                f"block {granularity.block_shape}. Pad the tensor or choose a block size that divides it"
            )
        view_shape += [n // b, b]
    reduce_dims = tuple(len(lead) + 2 * i + 1 for i in range(len(block)))
    return ax.reshape(view_shape).amax(dim=reduce_dims)


def compute_scale(
    amax: torch.Tensor | float,
    fmt: FloatFormat | str,
    margin: int = 0,
    power_of_two: bool = False,
) -> torch.Tensor:
    """``max_value / amax / 2**margin``: the scale that maps ``amax`` onto the format's largest value.

    Edge cases are finite by design: an amax of 0 (an all-zero tensor), inf or NaN gives scale 1, so a
    broken tensor is still quantized and shows up in the overflow/NaN statistics instead of hiding
    behind an infinite or zero scale. Scales are clamped to ``[2**-126, 2**126]``. With
    ``power_of_two=True`` the scale is rounded *down* to a power of two (never pushing amax past max),
    which makes ``x * scale`` exact.

    Example:
        >>> compute_scale(torch.tensor(2.0), "e4m3")
        tensor(224.)
        >>> compute_scale(torch.tensor(3.0), "e4m3", power_of_two=True)
        tensor(128.)
        >>> compute_scale(torch.tensor(0.0), "e4m3")
        tensor(1.)
    """
    fmt = get_format(fmt)
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(float(amax), dtype=torch.float32)
    amax = amax.to(torch.float32)
    scale = (fmt.max_value / amax) / (2.0**margin)
    valid = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(valid, scale, torch.ones_like(scale))
    scale = scale.clamp(_MIN_SCALE, _MAX_SCALE)
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def mx_scale(amax: torch.Tensor, elem_fmt: FloatFormat | str) -> torch.Tensor:
    """OCP MX shared scale for a block: ``2**(emax_elem - floor(log2(amax)))`` (as a multiplier), i.e. the
    E8M0 exponent ``floor(log2(amax)) - emax_elem`` of the MX spec, clamped to E8M0's range.

    Elements may exceed the element format's max by up to one binade under this rule; the spec (and
    altgrad's MX recipe) saturates them.

    Example:
        >>> mx_scale(torch.tensor([6.0]), "e2m1")   # emax(E2M1) = 2, floor(log2 6) = 2
        tensor([1.])
    """
    elem = get_format(elem_fmt)
    amax = amax.to(torch.float32)
    valid = torch.isfinite(amax) & (amax > 0)
    shared_exp = torch.floor(torch.log2(torch.where(valid, amax, torch.ones_like(amax)))) - elem.emax
    shared_exp = shared_exp.clamp(-127, 127)
    return torch.exp2(-shared_exp)


def scaled_quantize(
    x: torch.Tensor,
    fmt: FloatFormat | str,
    granularity: Granularity | None = None,
    margin: int = 0,
    power_of_two: bool = False,
    rounding: str = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Current ("just-in-time") scaling: compute amax at ``granularity``, the scale, and quantize.

    Returns ``(q, scale)`` with ``dequantize(q, scale)`` back in x's units.

    Example:
        >>> q, s = scaled_quantize(torch.randn(8, 64), "e4m3", Granularity.per_block(32))
        >>> q.abs().max() <= 448
        tensor(True)
    """
    scale = compute_scale(amax(x, granularity), fmt, margin=margin, power_of_two=power_of_two)
    return quantize(x, fmt, scale, rounding=rounding, saturate=saturate, generator=generator), scale


class AmaxHistory:
    """A rolling window of amax values for delayed scaling (Transformer Engine's recipe).

    ``update(x)`` records ``amax(x)`` on device (no host sync); ``get_amax()`` reduces the window with
    ``"max"`` (robust to a single small step) or ``"most_recent"``. The scale used at step t comes from
    steps before t, so a sudden outlier in step t overflows once and is then absorbed.

    Example:
        >>> h = AmaxHistory(window_size=4)
        >>> _ = h.update(torch.tensor([1.0, -3.0])); _ = h.update(torch.tensor([2.0]))
        >>> h.get_amax().item(), h.get_amax("most_recent").item()
        (3.0, 2.0)
    """

    ALGOS = ("max", "most_recent")

    def __init__(self, window_size: int = 16, granularity: Granularity | None = None) -> None:
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        self.window_size = window_size
        self.granularity = granularity or Granularity()
        self.history: torch.Tensor | None = None  # (window_size, *amax_shape)
        self.count = 0  # updates so far (host-side int: no sync needed to know how full we are)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``amax(x)`` and return it."""
        return self.update_amax(amax(x, self.granularity))

    def update_amax(self, value: torch.Tensor) -> torch.Tensor:
        """Record an amax computed elsewhere (e.g. fused into a quantization kernel)."""
        value = value.detach().to(torch.float32)
        if self.history is not None and self.history.device != value.device:
            self.history = self.history.to(value.device)  # e.g. loaded from a checkpoint on the CPU
        if self.history is None or self.history.shape[1:] != value.shape:
            self.history = torch.zeros((self.window_size, *value.shape), dtype=torch.float32, device=value.device)
            self.count = 0
        # A non-finite amax (a diverging step, usually skipped) must not poison the window for
        # `window_size` steps: keep the previous value, as Transformer Engine keeps the previous scale.
        previous = self.history[(self.count - 1) % self.window_size] if self.count else torch.zeros_like(value)
        value = torch.where(torch.isfinite(value), value, previous)
        self.history[self.count % self.window_size].copy_(value)
        self.count += 1
        return value

    def get_amax(self, algo: str = "max") -> torch.Tensor:
        """The amax to derive the next scale from; 0 (hence scale 1) before the first update."""
        if algo not in self.ALGOS:
            raise ValueError(f"unknown amax algorithm {algo!r}; accepted: {list(self.ALGOS)}")
        if self.history is None or self.count == 0:
            return torch.zeros(())
        if algo == "most_recent":
            return self.history[(self.count - 1) % self.window_size]
        filled = self.history[: min(self.count, self.window_size)]
        return filled.amax(dim=0)

    def __len__(self) -> int:
        return min(self.count, self.window_size)

    def state_dict(self) -> dict:
        return {
            "window_size": self.window_size,
            "count": self.count,
            "history": None if self.history is None else self.history.detach().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"window_size", "count", "history"} - set(state)
        if missing:
            raise ValueError(f"AmaxHistory state is missing {sorted(missing)}")
        if state["window_size"] != self.window_size:
            raise ValueError(
                f"AmaxHistory window_size mismatch: checkpoint has {state['window_size']}, this run uses "
                f"{self.window_size}"
            )
        history = state["history"]
        self.history = None if history is None else history.detach().clone().to(torch.float32)
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"AmaxHistory(window_size={self.window_size}, filled={len(self)})"

