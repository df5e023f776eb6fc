"""Argument checks shared by the public configs and functions, so every message reads the same way.

Each check returns the value as a plain Python ``float`` / ``int`` / ``bool`` (numpy scalars, 0-d numpy arrays and
0-d torch tensors of a fitting dtype welcome: ``keep=torch.tensor(0.25)`` and ``keep=np.array(0.25)`` read as
``keep=np.float64(0.25)``), raises ``TypeError`` for a wrong type (a tensor or array of another shape or dtype too)
and ``ValueError`` for a value out of range, and names the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import numpy as np
import torch


def real(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float within ``[lo, hi]`` (``lo_open`` / ``hi_open`` exclude an end)."""
    value = _unwrap(name, value, "a number", lambda d: not d.is_complex and d != torch.bool)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int (or Fraction) too large for a float
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    below = lo is not None and (v < lo or (lo_open and v == lo))
    above = hi is not None and (v > hi or (hi_open and v == hi))
    if below or above:
        raise ValueError(f"{name} must be {_span(lo, hi, lo_open, hi_open)}, got {value!r}")
    return v


def integer(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within ``[lo, hi]`` (floats, even whole ones, and bools are refused)."""
    value = _unwrap(name, value, "an int", lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {_span(lo, hi, False, False)}, got {v}")
    return v


def seed(name: str, value: object) -> int:
    """A random seed: an int in ``[0, 2**63)``, which seeds torch generators and numpy alike (with room for the
    small offsets some callers add)."""
    return integer(name, value, 0, 2**63 - 1)


def flag(name: str, value: object) -> bool:
    """``value`` as a bool (numpy bools too; ``0`` / ``1`` / strings are refused: they are usually a mistake)."""
    value = _unwrap(name, value, "True or False", lambda d: d == torch.bool)
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def choice(name: str, value: object, options: Iterable[str]) -> str:
    """``value`` if it is one of the strings ``options``."""
    options = sorted(options)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {options}; got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {options}")
    return value


def scalar(value: object) -> object:
    """``value`` with a 0-d torch tensor or 0-d numpy array read as its scalar (``torch.tensor(3)`` as ``3``,
    ``np.array(3)`` as ``np.int64(3)``), anything else as it is: for checks of their own that treat those as
    numbers, as the checks here do."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta:
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def _unwrap(name: str, value: object, want: str, dtype_ok: Callable[[torch.dtype], bool]) -> object:
    """A 0-d torch tensor of a dtype ``dtype_ok`` accepts as its Python scalar, a 0-d numpy array as its numpy
    scalar (checked as numpy scalars are); any other tensor or array a ``TypeError`` naming ``name``, its shape and
    dtype; everything else as it is."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return value[()]
        raise TypeError(f"{name} must be {want}, got a numpy array of shape {value.shape} and dtype {value.dtype}")
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and dtype_ok(value.dtype) and not value.is_meta:
            return value.item()
        raise TypeError(f"{name} must be {want}, got a {'meta ' if value.is_meta else ''}tensor of shape "
                        f"{tuple(value.shape)} and dtype {value.dtype}")
    return value


def _span(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
