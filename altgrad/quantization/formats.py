"""Low-precision float formats as data.

A :class:`FloatFormat` is a frozen description of a binary floating-point format: exponent and mantissa
widths, bias, and the convention for special values. Everything else — largest finite value, smallest
normal and subnormal, how many finite values there are, the sorted table of every representable value —
is derived from those fields, so a user-built ``E3M4`` with a custom bias is a first-class citizen next to
the OCP FP8 formats.

Example:
    >>> from altgrad.quantization import FloatFormat, get_format
    >>> get_format("e4m3").max_value
    448.0
    >>> FloatFormat("E3M3", exp_bits=3, man_bits=3).max_value   # FN convention by default
    28.0
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Special", "FloatFormat", "FORMAT_REGISTRY", "get_format", "register_format"]

# altgrad simulates every format inside float32, so a format must fit inside it.
_F32_MIN_EXP = -149  # log2 of float32's smallest subnormal
_F32_MAX_EXP = 127  # largest float32 binade


class Special(str, enum.Enum):
    """How a format spends its codes on inf and NaN.

    - ``IEEE``: the top exponent code holds ±inf (mantissa 0) and NaNs (E5M2, E3M4, FP16, BF16).
    - ``FN``: finite + NaN — no inf; only the all-ones magnitude code is NaN, the rest of the top
      binade is finite (OCP E4M3FN, E2M5, E1M6, E6M1, E7M0, E8M0).
    - ``FNUZ``: no inf and no negative zero; the negative-zero code is the single NaN (E4M3FNUZ).
    - ``FINITE``: every code is a finite number; no inf, no NaN (MX element types E2M1, E2M3, E3M2).
    """

    IEEE = "ieee"
    FN = "fn"
    FNUZ = "fnuz"
    FINITE = "finite"


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format ``[sign] | exponent | mantissa``.

    Args:
        name: display name (the registry key for built-in formats).
        exp_bits: exponent width E (>= 1).
        man_bits: stored mantissa width M (>= 0).
        bias: exponent bias; ``None`` picks the convention's default: ``2**(E-1) - 1``, or ``2**(E-1)``
            for FNUZ.
        special: the special-value convention, a :class:`Special` or its string value.
        signed: whether there is a sign bit (E8M0 has none).
        subnormals: ``True``: exponent code 0 holds zero and subnormals. ``False``: code 0 is an ordinary
            binade, so the format has no zero at all (E8M0, the MX scale type).

    Example:
        >>> fmt = FloatFormat("E5M2", exp_bits=5, man_bits=2, special="ieee")
        >>> fmt.max_value, fmt.min_normal, fmt.min_subnormal
        (57344.0, 6.103515625e-05, 1.52587890625e-05)
        >>> len(fmt.values())   # every distinct finite value, sorted: 2 * 123 nonzero magnitudes + 0
        247
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int | None = None
    special: Special = Special.FN
    signed: bool = True
    subnormals: bool = True
    # Derived fields are filled in __post_init__ (frozen, so through object.__setattr__).
    emin: int = field(init=False, repr=False, compare=False)
    emax: int = field(init=False, repr=False, compare=False)
    max_value: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        special = _parse_special(self.special)
        object.__setattr__(self, "special", special)
        for attr in ("exp_bits", "man_bits"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{self.name}: {attr} must be an int, got {value!r}")
        if self.exp_bits < 1:
            raise ValueError(f"{self.name}: exp_bits must be >= 1 (got {self.exp_bits}); integer formats are not floats")
        if self.man_bits < 0:
            raise ValueError(f"{self.name}: man_bits must be >= 0 (got {self.man_bits})")
        total = self.bits
        if total > 16:
            raise ValueError(
                f"{self.name}: {total} bits (sign {int(self.signed)} + E{self.exp_bits} + M{self.man_bits}) "
                "is more than 16; altgrad simulates formats of at most 16 bits inside float32"
            )
        if self.bias is None:
            default = 2 ** (self.exp_bits - 1) - (0 if special is Special.FNUZ else 1)
            object.__setattr__(self, "bias", default)
        elif not isinstance(self.bias, int) or isinstance(self.bias, bool):
            raise ValueError(f"{self.name}: bias must be an int, got {self.bias!r}")
        if not self.signed and special is Special.FNUZ:
            raise ValueError(f"{self.name}: FNUZ puts NaN at the negative-zero code, which an unsigned format lacks")
        if not self.subnormals and self.signed:
            raise ValueError(
                f"{self.name}: subnormals=False (no zero code) is only supported for unsigned scale formats like E8M0"
            )

        top_code = 2**self.exp_bits - 1
        # The highest exponent code that still holds finite numbers, and its largest mantissa.
        if special is Special.IEEE:
            top_finite_code, top_man = top_code - 1, 2**self.man_bits - 1
        elif special is Special.FN:
            # All-ones magnitude is NaN: with M == 0 that is the whole top binade.
            if self.man_bits == 0:
                top_finite_code, top_man = top_code - 1, 0
            else:
                top_finite_code, top_man = top_code, 2**self.man_bits - 2
        else:  # FNUZ / FINITE: every top-binade code is finite
            top_finite_code, top_man = top_code, 2**self.man_bits - 1
        lowest_normal_code = 1 if self.subnormals else 0
        if top_finite_code < lowest_normal_code:
            raise ValueError(
                f"{self.name}: E{self.exp_bits} with the {special.value!r} convention leaves no normal numbers "
                "(every exponent code is zero/subnormal or reserved for inf/NaN)"
            )
        emin = lowest_normal_code - self.bias
        emax = top_finite_code - self.bias
        object.__setattr__(self, "emin", emin)
        object.__setattr__(self, "emax", emax)
        min_sub_exp = emin - self.man_bits if self.subnormals else emin
        if min_sub_exp < _F32_MIN_EXP + 1 or emax > _F32_MAX_EXP:
            raise ValueError(
                f"{self.name}: bias {self.bias} puts the format's range at 2^{min_sub_exp}..2^{emax + 1}, "
                f"outside what float32 simulation can hold (2^{_F32_MIN_EXP + 1}..2^{_F32_MAX_EXP + 1})"
            )
        max_value = math.ldexp(1.0 + top_man / 2**self.man_bits, emax)
        object.__setattr__(self, "max_value", max_value)

    # ----------------------------------------------------------------- derived properties
    @property
    def bits(self) -> int:
        """Total width in bits."""
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2**emin``."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals ``min_normal`` when ``man_bits == 0`` or there are no subnormals)."""
        return math.ldexp(1.0, self.emin - self.man_bits) if self.subnormals else self.min_normal

    @property
    def has_inf(self) -> bool:
        return self.special is Special.IEEE

    @property
    def has_nan(self) -> bool:
        return self.special is not Special.FINITE

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.subnormals and self.special is not Special.FNUZ

    @property
    def num_binades(self) -> int:
        """Binades holding at least one nonzero value, from ``min_subnormal`` to ``max_value``."""
        return self.emax - int(math.log2(self.min_subnormal)) + 1

    @property
    def num_finite(self) -> int:
        """Number of codes that decode to a finite value (both zeros counted when the format has -0)."""
        return int(np.isfinite(self._decoded_codes()).sum())

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sorted tensor of every distinct finite value (one zero), e.g. for tests, plots and diagnostics."""
        codes = self._decoded_codes()
        finite = np.unique(codes[np.isfinite(codes)])  # unique also merges +0 and -0
        return torch.from_numpy(finite).to(dtype)

    def decode(self, codes: np.ndarray | int) -> np.ndarray:
        """Decode integer bit patterns of this format to float64 (NaN/inf per the convention)."""
        return _decode(self, np.asarray(codes, dtype=np.int64))

    @functools.cached_property
    def _decoded_cache(self) -> np.ndarray:
        return _decode(self, np.arange(2**self.bits, dtype=np.int64))

    def _decoded_codes(self) -> np.ndarray:
        return self._decoded_cache

    def __str__(self) -> str:
        return self.name


def _parse_special(special: Special | str) -> Special:
    try:
        return Special(special.lower() if isinstance(special, str) else special)
    except ValueError:
        raise ValueError(
            f"unknown special-value convention {special!r}; accepted: {[s.value for s in Special]}"
        ) from None


def _decode(fmt: FloatFormat, codes: np.ndarray) -> np.ndarray:
    """Reference decoder, written from the definitions (independent of the rounding kernel)."""
    E, M = fmt.exp_bits, fmt.man_bits
    sign = (codes >> (E + M)) & 1 if fmt.signed else np.zeros_like(codes)
    exp_code = (codes >> M) & (2**E - 1)
    man = codes & (2**M - 1)
    if fmt.subnormals:
        subnormal = exp_code == 0
        magnitude = np.where(
            subnormal,
            np.ldexp(man.astype(np.float64), fmt.emin - M),
            np.ldexp(1.0 + man / 2.0**M, (exp_code - fmt.bias).astype(np.int64)),
        )
    else:
        magnitude = np.ldexp(1.0 + man / 2.0**M, (exp_code - fmt.bias).astype(np.int64))
    value = np.where(sign == 1, -magnitude, magnitude)
    top = exp_code == 2**E - 1
    if fmt.special is Special.IEEE:
        value = np.where(top & (man == 0), np.where(sign == 1, -np.inf, np.inf), value)
        value = np.where(top & (man != 0), np.nan, value)
    elif fmt.special is Special.FN:
        value = np.where(top & (man == 2**M - 1), np.nan, value)
    elif fmt.special is Special.FNUZ:
        value = np.where((sign == 1) & (exp_code == 0) & (man == 0), np.nan, value)
    return value


def _ieee(name: str, e: int, m: int) -> FloatFormat:
    return FloatFormat(name, exp_bits=e, man_bits=m, special=Special.IEEE)


def _fn(name: str, e: int, m: int) -> FloatFormat:
    return FloatFormat(name, exp_bits=e, man_bits=m, special=Special.FN)


def _finite(name: str, e: int, m: int) -> FloatFormat:
    return FloatFormat(name, exp_bits=e, man_bits=m, special=Special.FINITE)


FORMAT_REGISTRY: dict[str, FloatFormat] = {
    f.name: f
    for f in [
        # OCP FP8
        _ieee("E5M2", 5, 2),
        _fn("E4M3", 4, 3),
        # exotic 8-bit formats
        _ieee("E3M4", 3, 4),
        _fn("E2M5", 2, 5),
        _fn("E1M6", 1, 6),
        _fn("E6M1", 6, 1),
        _fn("E7M0", 7, 0),
        # AMD/Graphcore "fnuz" FP8 and the IEEE-like E4M3
        FloatFormat("E4M3FNUZ", exp_bits=4, man_bits=3, special=Special.FNUZ),
        FloatFormat("E5M2FNUZ", exp_bits=5, man_bits=2, special=Special.FNUZ),
        _ieee("E4M3_IEEE", 4, 3),
        # OCP MX element types and the MX shared-scale type
        _finite("E2M3", 2, 3),
        _finite("E3M2", 3, 2),
        _finite("E2M1", 2, 1),
        FloatFormat("E8M0", exp_bits=8, man_bits=0, special=Special.FN, signed=False, subnormals=False),
        # 16-bit baselines through the same machinery
        _ieee("BF16", 8, 7),
        _ieee("FP16", 5, 10),
    ]
}
# Common aliases, so names users already know work.
_ALIASES = {
    "E4M3FN": "E4M3",
    "FP8_E4M3": "E4M3",
    "FP8_E5M2": "E5M2",
    "FLOAT8_E4M3FN": "E4M3",
    "FLOAT8_E5M2": "E5M2",
    "BFLOAT16": "BF16",
    "FLOAT16": "FP16",
    "HALF": "FP16",
    "MXFP4": "E2M1",
    "E8M0FNU": "E8M0",
}


def register_format(fmt: FloatFormat, *, overwrite: bool = False) -> FloatFormat:
    """Add a user-defined format to the registry so recipes can name it.

    Example:
        >>> register_format(FloatFormat("E3M4B5", exp_bits=3, man_bits=4, bias=5))
        ... # doctest: +SKIP
    """
    key = fmt.name.upper()
    if key in FORMAT_REGISTRY and not overwrite and FORMAT_REGISTRY[key] != fmt:
        raise ValueError(f"format {key!r} is already registered; pass overwrite=True to replace it")
    FORMAT_REGISTRY[key] = fmt
    return fmt


def get_format(fmt: FloatFormat | str) -> FloatFormat:
    """Resolve a registry name (case-insensitive) or pass a :class:`FloatFormat` through.

    Example:
        >>> get_format("e5m2") is get_format("E5M2")
        True
    """
    if isinstance(fmt, FloatFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a FloatFormat or a registry name, got {type(fmt).__name__}")
    key = fmt.strip().upper()
    key = _ALIASES.get(key, key)
    if key not in FORMAT_REGISTRY:
        raise ValueError(f"unknown format {fmt!r}; registered formats: {sorted(FORMAT_REGISTRY)}")
    return FORMAT_REGISTRY[key]
