"""Formats fitted to a tensor: the Student-t ν of a CRD format, and Lloyd–Max on scaled data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import metrics
from jaxquant import scaling as scaling_lib
from jaxquant.formats import Format, crd_format, lloyd_max
from jaxquant.qarray import GRANULARITIES, QuantSpec, dequantise, quantise

# Twelve log-spaced degrees of freedom in [3, 100], rounded so format names stay short.
DF_GRID = tuple(float(f"{v:.3g}") for v in np.geomspace(3.0, 100.0, 12))


def fit_crd_t(x, bits: int, *, scaling: str = "absmax", block_size: int | str = 64,
              symmetric: bool | None = None, axis: int = -1, scale_dtype=None,
              grid=DF_GRID) -> Format:
  """The CRD Student-t format whose ν (from `grid`) gives the lowest error R on `x`.

  LLM weights are heavier-tailed than normal; Orr et al. (2025) fit ν per tensor from twelve
  log-spaced values in [3, 100] by minimising R = ‖ŵ - w‖/‖w‖ under the scaling used.

  Args:
    x: the tensor to fit.
    bits, scaling, symmetric: as for `crd_format`.
    block_size: as for `QuantSpec` (an int, ``"channel"`` or ``"tensor"``); the error is
      measured with it, and absmax/signmax formats are designed for it.
    axis, scale_dtype: as for `QuantSpec`; the error is measured with these.
    grid: candidate ν values (each > 2).

  Returns:
    The best `Format` (named with its ν, e.g. ``crd-t5.55-absmax-sym-4b-B64``).
  """
  best, best_error = None, np.inf
  for df in grid:
    fmt = crd_format("t", bits, scaling=scaling, block_size=block_size, symmetric=symmetric, df=df)
    spec = QuantSpec(fmt, block_size=block_size, axis=axis, scale_dtype=scale_dtype)
    error = float(metrics.relative_rmse(x, dequantise(quantise(x, spec), jnp.float32)))
    if error < best_error:
      best, best_error = fmt, error
  return best


def scaled_values(x, *, scaling: str = "absmax", block_size: int | str = 64,
                  axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """The elements of `x` divided by their block's statistic, and that statistic squared.

  absmax gives values in [-1, 1] with both ends reached; signmax gives values in [-1, 1] with
  every block's extreme at +1; rms gives blocks of unit RMS. Both outputs are flattened in
  `x`'s element order, padding excluded. An element's squared error after dequantisation is
  its statistic² times its squared error in the scaled domain, so the second output is the
  weight that makes a fit on scaled values minimise the error on `x` itself.
  """
  x = jnp.asarray(x, jnp.float32)
  axis = axis % x.ndim
  n = x.shape[axis]
  size = n if block_size in GRANULARITIES else block_size
  xb = scaling_lib.to_blocks(x, axis, size)
  statistic = scaling_lib.block_statistic(xb, scaling, axis, n, block_size == "tensor")
  normalised = xb / jnp.where(statistic == 0, 1.0, statistic)
  weight = jnp.broadcast_to(jnp.square(statistic), xb.shape)
  flat = lambda blocked: scaling_lib.from_blocks(blocked, axis, n).reshape(-1)
  return flat(normalised), flat(weight)


def fit_lloyd_max(x, bits: int, *, scaling: str = "absmax", block_size: int = 64,
                  axis: int = -1, weights=None, init="quantile", **kwargs) -> Format:
  """A Lloyd–Max codebook for `x` under the given block scaling.

  The blocks are normalised as `QuantSpec` would (see `scaled_values`), then `lloyd_max` runs
  on the normalised values, each weighted by its block statistic² (times `weights`), so it
  minimises the squared error of the dequantised tensor, not of the scaled one; the exact
  ends stay fixed: ±1 for absmax, +1 for signmax. The format records its scaling and block size.

  Args:
    x: the tensor; `weights` (optional) has its shape (e.g. diagonal Fisher).
    bits, init, **kwargs: passed to `lloyd_max`.
    scaling, block_size, axis: the block scaling the format will be used with.
  """
  samples, sample_weights = scaled_values(x, scaling=scaling, block_size=block_size, axis=axis)
  if weights is not None:
    sample_weights = sample_weights * jnp.asarray(weights, jnp.float32).reshape(-1)
  fixed = {"absmax": (-1.0, 1.0), "signmax": (None, 1.0), "rms": None}[scaling]
  recorded_block = block_size if scaling != "rms" and isinstance(block_size, int) else None
  return lloyd_max(samples, bits, weights=sample_weights, init=init, fixed_endpoints=fixed,
                   scaling=scaling, block_size=recorded_block, **kwargs)
