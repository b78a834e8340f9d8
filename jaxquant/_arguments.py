"""Checks of the arguments that enter the public API; each error names the argument and its value."""

from __future__ import annotations

import math
import numbers

import numpy as np

# The smallest normal float32, 2^-126: quantisation reads smaller magnitudes (subnormals) as 0.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
  """' > 0', ' <= 8', ' in [0, 1)' or '' for the bounds of an interval (±inf: unbounded)."""
  if low > -math.inf and high < math.inf:
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if low > -math.inf:
    return f" {'>' if low_open else '>='} {low:g}"
  if high < math.inf:
    return f" {'<' if high_open else '<='} {high:g}"
  return ""


def real(name: str, value, *, low: float = -math.inf, high: float = math.inf,
         low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
  """`value` as a float, checked to be a real number, not NaN, and within [low, high].

  Args:
    name: the argument's name, for the messages.
    value: an int, a float or a NumPy scalar (a bool is not a number here).
    low, high: the bounds; `low_open` and `high_open` exclude them.
    finite: refuse ±inf too.

  Raises:
    TypeError: `value` is not a real number.
    ValueError: `value` is NaN, infinite (with `finite`) or outside the bounds.
  """
  interval = _interval(low, high, low_open, high_open)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name}={value!r} must be a real number{interval}, got "
                    f"{type(value).__name__}")
  number = float(value)
  inside = ((number > low if low_open else number >= low)
            and (number < high if high_open else number <= high))
  if math.isnan(number) or (finite and math.isinf(number)) or not inside:
    kind = "a finite number" if finite else "a number (not NaN)"
    raise ValueError(f"{name}={value!r} must be {kind}{interval}")
  return number


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
  """`value` as an int, checked to be an integer (a Python or NumPy int, not a bool) in low..high.

  Raises:
    TypeError: `value` is not an integer.
    ValueError: `value` is outside low..high (either bound may be None: unbounded).
  """
  interval = (f" in {low}..{high}" if low is not None and high is not None
              else _interval(-math.inf if low is None else low,
                             math.inf if high is None else high, False, False))
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name}={value!r} must be an int{interval}, got {type(value).__name__}")
  if (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"{name}={value!r} must be an int{interval}")
  return int(value)


def fitting_input(x) -> np.ndarray:
  """`x` (a fitter's tensor argument) as a float32 NumPy array that a format can be fitted to.

  It must have an axis and an element, be finite, and have an element of magnitude at least
  2^-126 (`FLOAT32_TINY`): quantisation reads the smaller (subnormal) magnitudes as zero, so an
  all-zero or all-subnormal tensor has nothing to fit (any format quantises it to zero).

  Raises:
    ValueError: `x` is a scalar, empty, not finite, or zero as quantisation reads it.
  """
  array = np.asarray(x, np.float32)
  if array.ndim == 0 or array.size == 0:
    raise ValueError(f"x must have at least one axis and element; its shape is {array.shape}")
  if not np.all(np.isfinite(array)):
    raise ValueError("x must be finite; it contains NaN or Inf (as float32)")
  if not np.max(np.abs(array)) >= FLOAT32_TINY:
    raise ValueError(
        f"x must be nonzero somewhere: every |x| < {FLOAT32_TINY:.4g} (zero, or subnormal, "
        "which quantisation reads as zero), so there is nothing to fit a format to")
  return array
