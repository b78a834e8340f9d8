"""Error metrics: relative RMSE R, efficiency R·2^b, and SQNR.

At high resolution the error of a b-bit quantiser falls as 2^-b, so R·2^b compares formats
across bit widths (lower is better; Orr et al. 2025, §1).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxquant import _arguments


def _unit_factor(a):
  """2^-e, e the binary exponent of max|a| (as `frexp`, clipped to ±126 so that 2^-e is a
  normal float32): a·2^-e has its largest magnitude in [½, 1), exactly; 1 for a zero a."""
  exponent = jnp.frexp(jnp.max(jnp.abs(a)))[1]
  return jnp.ldexp(jnp.float32(1), jnp.clip(-exponent, -126, 126))


def relative_rmse(w, w_hat, weights=None):
  """R = ‖ŵ - w‖ / ‖w‖ (optionally with per-element weights, e.g. diagonal Fisher).

  Computed in float32 whatever the input dtypes, after scaling w and ŵ (and the weights) by
  powers of two that bring their largest magnitudes near 1: exact, so R is the same for any
  power-of-two multiple of the data, and the squares neither underflow for tiny w (1e-30)
  nor overflow for huge w (1e30). R is undefined for an all-zero w (or weights): NaN.
  """
  w, w_hat = jnp.asarray(w, jnp.float32), jnp.asarray(w_hat, jnp.float32)
  if w.shape != w_hat.shape:
    raise ValueError(f"w has shape {w.shape} but w_hat has shape {w_hat.shape}")
  factor = _unit_factor(w)
  error, signal = jnp.square(w_hat * factor - w * factor), jnp.square(w * factor)
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    weights = weights * _unit_factor(weights)
    error, signal = weights * error, weights * signal
  return jnp.sqrt(jnp.sum(error) / jnp.sum(signal))


def efficiency(w, w_hat, bits_per_param: float):
  """R·2^b with b the bits per parameter, scales included (lower is better).

  Raises:
    ValueError: `bits_per_param` is not a finite number > 0.
    TypeError: `bits_per_param` is not a real number.
  """
  bits_per_param = _arguments.real("bits_per_param", bits_per_param, low=0.0, low_open=True)
  return relative_rmse(w, w_hat) * 2.0**bits_per_param


def sqnr_db(w, w_hat):
  """Signal-to-quantisation-noise ratio in dB: -20 log10 R."""
  return -20.0 * jnp.log10(relative_rmse(w, w_hat))
