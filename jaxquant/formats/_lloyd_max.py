"""Lloyd–Max: the codebook that minimises (weighted) squared error on given samples."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import _arguments
from jaxquant.formats._format import Format, check_bits, check_scaling, format_number

_CHUNK = 256  # samples per chunk of the two-level prefix sums (see `_segment_sums`)


def _chunked_prefix(values: jax.Array):
  """Per-chunk totals and exclusive within-chunk prefix sums of a 1-D array.

  A sum over any contiguous range [a, b) is then Σ of whole-chunk totals plus two
  within-chunk prefixes, each a sum of at most `_CHUNK` terms: accurate in float32 even for
  10^8 samples, where a single running prefix sum would lose most of its digits.
  """
  chunks = values.reshape(-1, _CHUNK)
  return chunks.sum(axis=1), jnp.cumsum(chunks, axis=1) - chunks


def _segment_sums(prefix, bounds: jax.Array) -> jax.Array:
  """Sums of the ranges [bounds[k], bounds[k+1]) given `_chunked_prefix` of the data."""
  totals, within = prefix
  chunk, offset = bounds // _CHUNK, bounds % _CHUNK
  index = jnp.arange(totals.shape[0])
  inside = (index[None, :] >= chunk[:-1, None]) & (index[None, :] < chunk[1:, None])
  whole = jnp.sum(jnp.where(inside, totals[None, :], jnp.zeros((), totals.dtype)), axis=1)
  partial = within[chunk, offset]
  return whole + partial[1:] - partial[:-1]


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _lloyd_iterate(xs, ws, init, fixed_low, fixed_high, tol, *, max_iters):
  """Lloyd's alternation on sorted samples: nearest-centroid ranges, then weighted means."""
  n = xs.shape[0]
  padded = -n % _CHUNK + _CHUNK  # at least one extra chunk, so a bound of n is addressable
  pad = lambda v, fill: jnp.concatenate([v, jnp.full((padded,), fill, v.dtype)])
  xs_p, ws_p = pad(xs, xs[-1]), pad(ws, 0.0)
  weight_prefix, moment_prefix = _chunked_prefix(ws_p), _chunked_prefix(ws_p * xs_p)

  def bounds_of(centroids):
    mids = (centroids[1:] + centroids[:-1]) / 2
    inner = jnp.searchsorted(xs, mids, side="right").astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), inner, jnp.full((1,), n, jnp.int32)])

  def update(centroids):
    bounds = bounds_of(centroids)
    mass = _segment_sums(weight_prefix, bounds)
    moment = _segment_sums(moment_prefix, bounds)
    means = jnp.where(mass > 0, moment / jnp.where(mass > 0, mass, 1.0), centroids)
    means = means.at[0].set(jnp.where(jnp.isnan(fixed_low), means[0], fixed_low))
    means = means.at[-1].set(jnp.where(jnp.isnan(fixed_high), means[-1], fixed_high))
    return jax.lax.cummax(means), bounds

  spread = xs[-1] - xs[0]

  def cond(state):
    _, _, moved, shift, step = state
    return ((moved > tol * n) | (shift > tol * spread)) & (step < max_iters)

  def body(state):
    centroids, bounds, _, _, step = state
    new_centroids, new_bounds = update(centroids)
    moved = jnp.sum(jnp.abs(new_bounds - bounds)).astype(jnp.float32)
    shift = jnp.max(jnp.abs(new_centroids - centroids))
    return new_centroids, new_bounds, moved, shift, step + 1

  inf = jnp.asarray(jnp.inf, jnp.float32)
  start = (init, bounds_of(init), inf, inf, jnp.asarray(0, jnp.int32))
  centroids, _, _, _, steps = jax.lax.while_loop(cond, body, start)
  return centroids, steps


def _initial_codebook(init, xs, ws, n_codes):
  if isinstance(init, Format):
    init = init.values
  if isinstance(init, str):
    if init == "uniform":
      return jnp.linspace(xs[0], xs[-1], n_codes)
    if init == "quantile":
      cumulative = jnp.cumsum(ws) / jnp.sum(ws)
      targets = (jnp.arange(n_codes, dtype=jnp.float32) + 0.5) / n_codes
      index = jnp.minimum(jnp.searchsorted(cumulative, targets), xs.shape[0] - 1)
      return xs[index]
    raise ValueError(f"{init=} is not one of ('uniform', 'quantile'), a Format or an array")
  init = jnp.asarray(init, jnp.float32).reshape(-1)
  if init.shape[0] != n_codes:
    raise ValueError(f"init has {init.shape[0]} values; {n_codes} are needed")
  if not bool(jnp.all(jnp.isfinite(init))):
    raise ValueError("init must be finite (as float32)")
  return jnp.sort(init)


def _fixed_ends(fixed_endpoints) -> tuple[float | None, float | None]:
  """(low, high) of `fixed_endpoints` (None, True or a pair of finite numbers or None)."""
  if fixed_endpoints is None:
    return None, None
  if fixed_endpoints is True:
    return -1.0, 1.0
  if not isinstance(fixed_endpoints, (tuple, list)) or len(fixed_endpoints) != 2:
    raise TypeError(f"{fixed_endpoints=} must be None, True or a pair (low, high) of numbers "
                    "or None")
  low, high = (None if end is None else _arguments.real(f"fixed_endpoints[{i}]", end)
               for i, end in enumerate(fixed_endpoints))
  if low is not None and high is not None and not low < high:
    raise ValueError(f"{fixed_endpoints=} must have low < high")
  return low, high


def lloyd_max(samples, bits: int, *, weights=None, init="quantile", fixed_endpoints=None,
              max_iters: int = 500, tol: float = 1e-4, scaling: str | None = None,
              block_size: int | None = None) -> Format:
  """A 1-D (optionally weighted) k-means codebook: Lloyd (1982) / Max (1960).

  Minimises Σ wᵢ (xᵢ - q(xᵢ))² over codebooks of 2^bits values by alternating the two
  optimality conditions: each sample goes to its nearest codepoint (ranges split at the
  midpoints), and each codepoint moves to the weighted mean of its range. Neither step can
  increase the error, so the result is never worse than `init`. The samples are sorted once;
  each iteration then costs O(2^b · n/256) with two-level prefix sums, so 10^7 samples
  converge in seconds. Iteration stops when at most `tol`·n samples change range and no
  codepoint moves by more than `tol`·(max - min), or after `max_iters`. Centroids are kept
  monotone (a running maximum), and empty ranges keep their codepoint.

  Args:
    samples: data, any shape (flattened), float.
    bits: code width, 2..8.
    weights: optional non-negative per-sample weights (e.g. diagonal Fisher), same size.
    init: ``"quantile"`` (equal weight per code), ``"uniform"`` (min..max), a `Format` or
      an array of 2^bits values (e.g. a CRD format, so the result can only improve on it).
    fixed_endpoints: hold the lowest/highest codepoint at given values: True means (-1, 1),
      the exact ends for absmax-scaled data; a pair such as (None, 1.0) fixes one end.
    max_iters: iteration cap, an int ≥ 0 (0 returns `init`).
    tol: stop when at most `tol`·n samples change range in an iteration (a number ≥ 0).
    scaling, block_size: what the samples were scaled with, recorded in the Format.

  Returns:
    A `Format` whose name lists its values, e.g. ``lut4-absmax-B64:-1,-0.62…``.

  Raises:
    ValueError: fewer than 2^bits samples; samples, weights, init or fixed ends not finite;
      negative weights or a zero total; fixed ends not low < high; `max_iters` < 0 or `tol`
      < 0 (or NaN); or the codebook collapses to one value (the samples with positive weight,
      and the fixed ends, are all that value).
    TypeError: `bits`, `max_iters`, `tol` or `fixed_endpoints` is of the wrong type.
  """
  bits = check_bits(bits)
  if scaling is not None:
    check_scaling(scaling)
  max_iters = _arguments.integer("max_iters", max_iters, low=0)
  tol = _arguments.real("tol", tol, low=0.0)
  low, high = _fixed_ends(fixed_endpoints)
  xs = np.asarray(samples, np.float32).reshape(-1)
  n_codes = 2**bits
  if xs.shape[0] < n_codes:
    raise ValueError(f"samples has {xs.shape[0]} values; at least 2**bits = {n_codes} needed")
  if not np.all(np.isfinite(xs)):
    raise ValueError("samples must be finite")
  if weights is None:
    xs, ws = np.sort(xs), np.ones_like(xs)
  else:
    ws = np.asarray(weights, np.float32).reshape(-1)
    if ws.shape != xs.shape:
      raise ValueError(f"weights has {ws.shape[0]} values; samples has {xs.shape[0]}")
    if not np.all(np.isfinite(ws)) or np.any(ws < 0) or not np.any(ws > 0):
      raise ValueError("weights must be finite and non-negative with a positive total")
    order = np.argsort(xs, kind="stable")
    xs, ws = xs[order], ws[order]
  xs, ws = jnp.asarray(xs), jnp.asarray(ws)  # sorted once on the host: XLA's CPU sort is ~6× slower
  start = _initial_codebook(init, xs, ws, n_codes)
  nan = float("nan")
  centroids, _ = _lloyd_iterate(
      xs, ws, start.astype(jnp.float32),
      jnp.float32(nan if low is None else low), jnp.float32(nan if high is None else high),
      jnp.float32(tol), max_iters=max_iters)
  values = np.unique(np.asarray(centroids, np.float64))
  if values.size < 2:
    raise ValueError(f"the codebook collapsed to the single value {values[0]:g}: the samples "
                     "with positive weight (and the fixed ends) take only that value, and a "
                     "format needs at least two")
  return lut_format(values, bits, scaling=scaling, block_size=block_size)


def lut_format(values, bits: int, *, scaling: str | None = None,
               block_size: int | None = None) -> Format:
  """An arbitrary codebook (a lookup table), named by its values so the name parses back.

  Example:
    >>> lut_format([-1, -0.25, 0, 1], 2, scaling="absmax", block_size=32).name
    'lut2-absmax-B32:-1,-0.25,0,1'
  """
  bits = check_bits(bits, low=1)
  values = np.asarray(values, np.float64)
  tags = "".join([f"-{scaling}" if scaling else "", f"-B{block_size}" if block_size else ""])
  name = f"lut{bits}{tags}:" + ",".join(format_number(v) for v in values)
  return Format(values, bits, name, scaling=scaling, block_size=block_size)
