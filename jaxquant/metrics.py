"""Error metrics: relative RMSE R, efficiency R·2^b, and SQNR.

At high resolution the error of a b-bit quantiser falls as 2^-b, so R·2^b compares formats
across bit widths (lower is better; Orr et al. 2025, §1).
"""

from __future__ import annotations

import jax.numpy as jnp


def relative_rmse(w, w_hat, weights=None):
  """R = ‖ŵ - w‖ / ‖w‖ (optionally with per-element weights, e.g. diagonal Fisher).

  Computed in float32 whatever the input dtypes.
  """
  w, w_hat = jnp.asarray(w, jnp.float32), jnp.asarray(w_hat, jnp.float32)
  if w.shape != w_hat.shape:
    raise ValueError(f"w has shape {w.shape} but w_hat has shape {w_hat.shape}")
  weights = jnp.ones_like(w) if weights is None else jnp.asarray(weights, jnp.float32)
  return jnp.sqrt(jnp.sum(weights * jnp.square(w_hat - w)) / jnp.sum(weights * jnp.square(w)))


def efficiency(w, w_hat, bits_per_param: float):
  """R·2^b with b the bits per parameter, scales included (lower is better)."""
  return relative_rmse(w, w_hat) * 2.0**bits_per_param


def sqnr_db(w, w_hat):
  """Signal-to-quantisation-noise ratio in dB: -20 log10 R."""
  return -20.0 * jnp.log10(relative_rmse(w, w_hat))
