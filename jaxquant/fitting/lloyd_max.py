"""Lloyd–Max codebooks fitted to a tensor's block-scaled values, weighted to its own error."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant import scaling as scaling_lib
from jaxquant.formats import Format, lloyd_max
from jaxquant.qarray import GRANULARITIES


def scaled_values(x, *, scaling: str = "absmax", block_size: int | str = 64,
                  axis: int = 0) -> tuple[jax.Array, jax.Array]:
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
                  axis: int = 0, weights=None, init="quantile", **kwargs) -> Format:
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
