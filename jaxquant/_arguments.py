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


def fitting_weights(weights, x: np.ndarray) -> np.ndarray:
  """`weights` for a weighted fit to `x`: broadcast to x's shape, in float32, times 2^-e.

  A weighted fit minimises Σᵢ wᵢ (x̂ᵢ - xᵢ)², e.g. with wᵢ = H_kk, the diagonal of the input
  second moment H = Σ x xᵀ at element i's input row k: for a kernel W [K, N] the output error
  of ΔW is about Σ_k H_kk Σ_n ΔW_kn², so pass ``diag_h[:, None]``. The weights must have x's
  rank, each axis of x's length or 1: a (K,) vector would broadcast along N instead. e is the
  binary exponent of max w (as `frexp`, computed in float64): the largest weight lands in
  [½, 1), exactly, so weights of any magnitude (1e-30, 1e30) neither underflow nor overflow
  when multiplied by squared errors, and a fit, which only compares weighted sums, is
  unchanged.

  Raises:
    ValueError: `weights` has another rank or an axis that is neither 1 nor x's length; is
      not finite; is negative somewhere; or is zero wherever x is nonzero (all zero, say),
      which leaves nothing to fit (the weighted error is 0/0).
  """
  w = np.asarray(weights, np.float64)
  if w.ndim != x.ndim or any(a not in (1, b) for a, b in zip(w.shape, x.shape)):
    raise ValueError(f"weights has shape {w.shape} but x has shape {x.shape}; weights must have "
                     "x's rank with each axis 1 or x's length (e.g. diag_h[:, None] for a "
                     "kernel [K, N])")
  if not np.all(np.isfinite(w)):
    raise ValueError("weights must be finite; they contain NaN or Inf")
  if np.any(w < 0):
    raise ValueError(f"weights must be non-negative; their minimum is {np.min(w):g}")
  if np.any(w > 0):
    w = np.ldexp(w, -np.frexp(np.max(w))[1])
  w = np.broadcast_to(w.astype(np.float32), x.shape)
  if not np.any((w > 0) & (np.abs(x) >= FLOAT32_TINY)):
    raise ValueError("weights must be positive at some element where x is nonzero; they are "
                     "zero at all of them, so the weighted error is 0/0")
  return w
