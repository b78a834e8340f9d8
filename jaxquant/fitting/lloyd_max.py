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
  if not np.any((w > 0) & (np.abs(x) >= _arguments.FLOAT32_TINY)):
    raise ValueError("weights must be positive at some element where x is nonzero; they are "
                     "zero at all of them, so the weighted error is 0/0")
  return w


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
    weights: optional non-negative weights broadcastable to x's shape with x's rank (see
      `fitting_weights`): a diagonal Fisher of x's shape, or ``diag_h[:, None]`` (the
      diagonal of the input second moment H, one weight per input row of a kernel [K, N]) to
      minimise the H-weighted error Σ_k H_kk Σ_n (Ŵ_kn - W_kn)².
    bits, init, **kwargs: passed to `lloyd_max`.
    scaling, block_size, axis: the block scaling the format will be used with.

  Raises:
    ValueError: `x` is empty, not finite, or all zero (or subnormal); `weights` does not
      broadcast to x's shape, or is not finite and non-negative, or is zero wherever x is
      nonzero (see `fitting_weights`); a bad `scaling`, `block_size` or `axis` (see
      `scaled_values`); or as `lloyd_max` (too few elements for 2^bits codes, a codebook
      that collapses to one value as for a constant `x` under rms or signmax scaling).
    TypeError: an argument of the wrong type.
  """
  x = _arguments.fitting_input(x)
  if weights is not None:
    weights = fitting_weights(weights, x)
  # Exact: the scaled values are unchanged, the weights change by one factor 2^(-2e).
  x = np.ldexp(x, -np.frexp(np.max(np.abs(x)))[1])
  samples, sample_weights = scaled_values(x, scaling=scaling, block_size=block_size, axis=axis)
  if weights is not None:
    sample_weights = sample_weights * jnp.asarray(weights.reshape(-1))
  fixed = {"absmax": (-1.0, 1.0), "signmax": (None, 1.0), "rms": None}[scaling]
  recorded_block = block_size if scaling != "rms" and isinstance(block_size, int) else None
  return lloyd_max(samples, bits, weights=sample_weights, init=init, fixed_endpoints=fixed,
                   scaling=scaling, block_size=recorded_block, **kwargs)
