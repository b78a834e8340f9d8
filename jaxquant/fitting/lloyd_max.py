"""Lloyd–Max codebooks fitted to a tensor's block-scaled values, weighted to its own error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import _arguments
from jaxquant import scaling as scaling_lib
from jaxquant.formats import Format, lloyd_max
from jaxquant.formats._format import check_scaling
from jaxquant.qarray import GRANULARITIES


def scaled_values(x, *, scaling: str = "absmax", block_size: int | str = 64,
                  axis: int = 0) -> tuple[jax.Array, jax.Array]:
  """The elements of `x` divided by their block's statistic, and that statistic squared.

  absmax gives values in [-1, 1] with both ends reached; signmax gives values in [-1, 1] with
  every block's extreme at +1; rms gives blocks of unit RMS. Both outputs are flattened in
  `x`'s element order, padding excluded. An element's squared error after dequantisation is
  its statistic² times its squared error in the scaled domain, so the second output is the
  weight that makes a fit on scaled values minimise the error on `x` itself.

  Raises:
    ValueError: `scaling` is not one of ``SCALINGS``, `block_size` is not an int ≥ 1,
      ``"channel"`` or ``"tensor"``, `x` has no axis or `axis` is out of range.
    TypeError: `block_size` or `axis` is of the wrong type.
  """
  check_scaling(scaling)
  if block_size not in GRANULARITIES:
    _arguments.integer("block_size", block_size, low=1)
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0:
    raise ValueError("x must have at least one axis")
  axis = _arguments.integer("axis", axis, low=-x.ndim, high=x.ndim - 1) % x.ndim
  n = x.shape[axis]
  size = n if block_size in GRANULARITIES else block_size
  xb = scaling_lib.to_blocks(x, axis, size)
  statistic = scaling_lib.block_statistic(xb, scaling, axis, n, block_size == "tensor")
  normalised = scaling_lib.divide(xb, statistic)
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

  The fit is invariant to scaling `x` by a power of two, which it uses to bring max|x| near 1
  first: the weights then neither underflow for tiny `x` (1e-30) nor overflow for huge `x`.

  Args:
    x: the tensor, finite and not all zero.
    weights: optional non-negative weights of x's rank, each axis 1 or x's length
      (`jaxquant._arguments.fitting_weights`): a diagonal Fisher of x's shape, or
      ``diag_h[:, None]`` (the diagonal of the input second moment H, one weight per input
      row of a kernel [K, N]) to minimise the H-weighted error Σ_k H_kk Σ_n (Ŵ_kn - W_kn)².
    bits, init, **kwargs: passed to `lloyd_max`.
    scaling, block_size, axis: the block scaling the format will be used with.

  Raises:
    ValueError: `x` is empty, not finite, or all zero (or subnormal); `weights` does not
      broadcast to x's shape, or is not finite and non-negative, or is zero wherever x is
      nonzero; a bad `scaling`, `block_size` or `axis` (see
      `scaled_values`); or as `lloyd_max` (too few elements for 2^bits codes, a codebook
      that collapses to one value as for a constant `x` under rms or signmax scaling).
    TypeError: an argument of the wrong type.
  """
  x = _arguments.fitting_input(x)
  if weights is not None:
    weights = _arguments.fitting_weights(weights, x)
  # Exact: the scaled values are unchanged, the weights change by one factor 2^(-2e).
  x = np.ldexp(x, -np.frexp(np.max(np.abs(x)))[1])
  samples, sample_weights = scaled_values(x, scaling=scaling, block_size=block_size, axis=axis)
  if weights is not None:
    sample_weights = sample_weights * jnp.asarray(weights.reshape(-1))
  fixed = {"absmax": (-1.0, 1.0), "signmax": (None, 1.0), "rms": None}[scaling]
  recorded_block = block_size if scaling != "rms" and isinstance(block_size, int) else None
  return lloyd_max(samples, bits, weights=sample_weights, init=init, fixed_endpoints=fixed,
                   scaling=scaling, block_size=recorded_block, **kwargs)
