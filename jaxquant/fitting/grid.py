"""The entropy-coded uniform grid fitted to a tensor for a bits-per-element target.

Orr et al. 2025 (§1 and the `CompressedLUTFormat`). At high resolution a uniform grid of step
Δ followed by an ideal entropy coder spends b ≈ h(X) - log2 Δ bits per element for a mean
squared error Δ²/12, so for unit-RMS data R·2^b → 2^h/√12: √(πe/6) ≈ 1.193 for a Normal,
e/√6 ≈ 1.110 for a Laplace and ≈ 1.138 for a Student-t with ν = 5, against 1.649, 2.121 and
2.565 for the best fixed-length codebooks. `fit_grid` finds the grid (per tensor or per block)
that meets a bits-per-element target, for rms scaling by a search over the grid step that
clips the largest values when that pays; its rates are those of `jaxquant.entropy`.
`fit_grid_with_outliers` spends the bits a grid of at most 255 points cannot, by keeping the
values beyond it as sparse outliers (§4 item 9).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import _arguments, outliers
from jaxquant import scaling as scaling_lib
from jaxquant.entropy import sizes, symbols
from jaxquant.formats import Format, lut_format, uniform_grid
from jaxquant.qarray import QuantSpec, quantise

# A grid has at most 255 points: odd (zero exact) and within the 256-code limit.
MAX_HALF_N = 127
_FIT_SCALINGS = ("rms", "absmax")

# The rms step search: a coarse scan down from max|y|/MAX_HALF_N by this ratio, stopped once the
# rate is this many bits below the highest seen, then bisection on log Δ to this relative width.
_COARSE_RATIO = 2**0.25
_PAST_PEAK_BITS = 1.0
_STEP_TOLERANCE = 1e-4


def _rms_format(values: np.ndarray) -> Format:
  """The lookup table of an odd grid for rms scaling (scale reference 1: blocks get unit RMS)."""
  return lut_format(values, math.ceil(math.log2(values.size)), scaling="rms")


def _scaled_values(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, int]:
  """y = x/s (flattened), s the scales `quantise(x, spec)` stores, decoded; and their bits.

  Unlike `jaxquant.fitting.scaled_values`, s is the scale as stored (rounded to its storage
  dtype): y is the very quotient `quantise` rounds (`jaxquant.scaling.divide`; 0 in a block
  whose scale is 0), so the codes of y on any grid with the same scale reference as
  `spec.format` are those `quantise` gives x with that grid.
  """
  q = quantise(x, spec)
  scales = q.decoded_scales()
  scales = jnp.repeat(scales, q.block_size, axis=q.axis)
  scales = jax.lax.slice_in_dim(scales, 0, q.shape[q.axis], axis=q.axis)
  return scaling_lib.divide(x, scales).reshape(-1), sizes.scale_bits(q.scales, q.scale_scales)


@jax.jit
def _grid_histogram(y: jax.Array, bounds: jax.Array, step: jax.Array,
                    half_n: jax.Array) -> jax.Array:
  """Counts of the codes `nearest_codes` gives y on an odd uniform grid (length 2·MAX_HALF_N+1).

  The code of y is the number of the grid's float32 midpoints m₀ < … < m_{2h-1} below it, and
  bounds = (-∞, m₀, …, m_{2h-1}, +∞, …). The guess c = round(y/step) + h, clipped to 0..2h, is
  within one of it (float rounding only moves values next to a midpoint), so comparing y with
  the bounds on either side makes it exact: c + [y > bounds[c+1]] - [y ≤ bounds[c]]. The
  shapes do not depend on the grid, so one compilation serves every grid for a size of y.
  """
  limit = half_n.astype(jnp.float32)
  guess = jnp.clip(jnp.round(y / step), -limit, limit).astype(jnp.int32) + half_n
  codes = (guess + (y > bounds[guess + 1]).astype(jnp.int32)
           - (y <= bounds[guess]).astype(jnp.int32))
  return jnp.bincount(codes, length=2 * MAX_HALF_N + 1)


def _grid_rate(y: jax.Array, values: np.ndarray, scale_bits: int) -> float:
  """The ideal rate of the codes of y on the odd uniform grid `values`, with the scale bits.

  Equal to the ideal rate `jaxquant.entropy.coded_size` gives the codes `quantise` writes
  (`_grid_histogram`), without quantising, packing or unpacking: the histogram has one count per
  grid value, the format's values being the symbols.
  """
  codebook = np.asarray(values, np.float32)
  bounds = np.full(2 * MAX_HALF_N + 2, np.inf, np.float32)
  bounds[0] = -np.inf
  bounds[1:codebook.size] = (codebook[1:] + codebook[:-1]) / np.float32(2)
  half_n = codebook.size // 2
  counts = _grid_histogram(y, bounds, np.float32(values[-1] / half_n), np.int32(half_n))
  return sizes.histogram_rate(np.asarray(counts)[:codebook.size], scale_bits)


def _unreachable(bits_per_param: float, low: float, high: float) -> ValueError:
  """The error for a target outside the rates low..high that the grids reach."""
  return ValueError(
      f"{bits_per_param=} is outside the {low:.4f}..{high:.4f} bits per element that odd uniform "
      f"grids of 3..{2 * MAX_HALF_N + 1} points reach for this tensor")


def _bisect(rate, target: float, ok, over, middle) -> list:
  """Bisection between `ok` (rate ≤ target) and `over` (rate > target).

  `middle(ok, over)` is the next point to try, or None once the two are close enough. Returns
  the `ok` ends in the order reached: the last is the closest to the crossing.
  """
  accepted = [ok]
  while (point := middle(ok, over)) is not None:
    if rate(point) <= target:
      ok = point
      accepted.append(point)
    else:
      over = point
  return accepted


def _rms_log_steps(rate, target: float, amax: float, smallest: float, clip: bool
                   ) -> list[float]:
  """log Δ of the rms grids meeting `target`, as `_bisect` returns them (best last).

  Without `clip` the finest step is amax/MAX_HALF_N: a target above its rate gets that grid.

  A coarse scan walks down from Δ = amax/MAX_HALF_N (the finest grid that clips nothing) by
  `_COARSE_RATIO` to the first step whose rate exceeds the target, then bisects on log Δ
  between it and the step before it (for the first, Δ = 4·amax, where every code is 0). Below
  amax/MAX_HALF_N the rate is not monotone: clipping sends ever more values to ±MAX_HALF_N·Δ,
  so past its maximum it falls. The scan stops there (the rate `_PAST_PEAK_BITS` below the
  highest seen) or where it can no longer change ((MAX_HALF_N + ½)·Δ below the smallest
  nonzero |y|); a target between the highest rate seen and the 3-point rate at Δ = 4·amax is
  met, any other raises.
  """
  top = math.log(4.0 * amax)
  floor = rate(top)
  ok, best_step, best_rate = top, top, floor
  step = math.log(amax / MAX_HALF_N)
  while True:
    current = rate(step)
    if current > target >= floor:
      return _bisect(rate, target, ok, step, lambda ok, over: (
          (ok + over) / 2 if ok - over > math.log1p(_STEP_TOLERANCE) else None))
    if current > best_rate:
      best_step, best_rate = step, current
    if not clip:
      if target < floor:
        raise _unreachable(target, floor, current)
      return [step]
    if current < best_rate - _PAST_PEAK_BITS or (MAX_HALF_N + 0.5) * math.exp(step) < smallest:
      break
    ok = step
    step -= math.log(_COARSE_RATIO)
  if not floor <= target <= best_rate:
    raise _unreachable(target, floor, best_rate)
  return [best_step]


def fit_grid(x, bits_per_param: float, *, scaling: str = "rms", block_size="tensor",
             axis: int = 0, scale_dtype=None, clip: bool = False) -> tuple[Format, QuantSpec]:
  """The odd uniform grid whose entropy-coded size best meets `bits_per_param` from below.

  Orr et al. 2025 (§1; §4 item 8, the `CompressedLUTFormat`). Each block (`block_size` elements
  along `axis`, a channel, or the tensor) is divided by its stored scale s, giving y = x/s, and
  y is rounded to a grid of 2h+1 points, zero exact (h ≤ `MAX_HALF_N`: a format has at most
  256 codes). The rate is b = (-Σ log2 p̂(cᵢ) + S)/N: the ideal coder with the +1-smoothed
  histogram p̂ of the N codes c, S the bits of the stored scales (32 for a float32 tensor
  scale, 16/B per element for bfloat16 block scales).

  ``"absmax"``: s = max|x| of the block and the grid spans ±1 exactly, step 1/h; b grows with
  h, and bisection over h in 1..`MAX_HALF_N` picks the largest with b ≤ `bits_per_param`.

  ``"rms"``: s = RMS of the block and the grid is Δ·(-h, …, h) with
  h = min(`MAX_HALF_N`, ⌈amax/Δ⌉), amax = max|y| over the tensor: nothing is clipped while
  amax/Δ ≤ `MAX_HALF_N`. On weights with outliers (max|x| up to 175× the RMS in
  all-MiniLM-L6-v2) a grid spanning ±amax can stay under 2 bits per element (1.64 for one of
  its tensors) even with 255 points. By default (`clip` False) the grid still spans ±amax: a
  target above the rate of that finest unclipped grid gets it, at a rate below the target.
  With `clip`, finer steps clip the largest values to ±`MAX_HALF_N`·Δ, which lowers the mean
  squared error but not the damage to a model: on SmolLM2-135M, Fisher-allocated clipped grids
  at 4 bits per element gave a top-128 KL of 5.5 nats where ½ Σ f̄ ‖δθ‖² predicted 0.13
  (outliers matter more than their share of the error; the paper keeps them as sparse
  outliers instead, §4 item 9). The step itself is searched: a coarse log scan finds the first step
  whose rate exceeds the target (the rate falls again once clipping dominates, so only steps
  above the rate's maximum are used) and bisection on log Δ narrows the bracket to a relative
  width of 1e-4, so fractional targets are met closely.

  The rates come from one compiled histogram of fixed shape for every grid (`_grid_rate`); the
  chosen grid is then checked with one `quantise`, stepping back to the previous bracket end
  should its rate exceed the target. The achieved rate is therefore
  ``jaxquant.entropy.coded_size(quantise(x, spec))["ideal_bits_per_param"]`` ≤ `bits_per_param`.

  Args:
    x: the tensor (any shape, finite, not all zero or subnormal).
    bits_per_param: target average bits per element, scales included (a finite number > 0,
      fractional allowed).
    scaling: ``"rms"`` or ``"absmax"``.
    block_size: an int (blocks along `axis`), ``"channel"`` or ``"tensor"``.
    axis: the axis blocks run along.
    scale_dtype: how scales are stored; default float32 per tensor, else bfloat16.
    clip: rms only: allow steps finer than amax/`MAX_HALF_N`, clipping the largest values.

  Returns:
    (format, spec) with ``spec = QuantSpec(format, block_size=block_size, scaling=scaling,
    scale_dtype=scale_dtype, axis=axis)``; for rms the format is the lookup table of the grid.

  Raises:
    ValueError: `bits_per_param` is not a finite number > 0 or is outside the rates the grids
      reach (from 3 points, all codes 0 for rms, to 255 points or the rms rate's maximum), or
      `x`, `scaling`, `block_size`, `axis` or `scale_dtype` is invalid.
    TypeError: `bits_per_param` is not a real number or `clip` is not a bool.
    RuntimeError: no grid the search accepted keeps its rate once quantised (an internal
      inconsistency between the histogram and `quantise`).
  """
  if scaling not in _FIT_SCALINGS:
    raise ValueError(f"{scaling=} must be one of {_FIT_SCALINGS}")
  bits_per_param = _arguments.real("bits_per_param", bits_per_param, low=0.0, low_open=True)
  if not isinstance(clip, bool):
    raise TypeError(f"{clip=} must be a bool")
  x = jnp.asarray(_arguments.fitting_input(x))
  scale_dtype = scale_dtype or ("float32" if block_size == "tensor" else "bfloat16")
  probe_format = uniform_grid(3) if scaling == "absmax" else _rms_format(np.array([-1.0, 0, 1]))
  probe = QuantSpec(probe_format, block_size=block_size, scaling=scaling,
                    scale_dtype=scale_dtype, axis=axis)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{axis=} is out of range for x of shape {tuple(x.shape)}")
  y, scale_bits = _scaled_values(x, probe)

  if scaling == "absmax":
    def make_format(half_n: int) -> Format:
      return uniform_grid(2 * half_n + 1)

    def rate(half_n: int) -> float:
      return _grid_rate(y, make_format(half_n).values, scale_bits)

    low_rate, high_rate = rate(1), rate(MAX_HALF_N)
    if not low_rate <= bits_per_param <= high_rate:
      raise _unreachable(bits_per_param, low_rate, high_rate)
    accepted = [MAX_HALF_N] if high_rate <= bits_per_param else _bisect(
        rate, bits_per_param, 1, MAX_HALF_N,
        lambda ok, over: (ok + over) // 2 if over - ok > 1 else None)
  else:
    amax = float(jnp.max(jnp.abs(y)))
    smallest = float(jnp.min(jnp.where(y == 0, jnp.inf, jnp.abs(y))))

    def grid(log_step: float) -> np.ndarray:
      step = math.exp(log_step)
      half_n = min(MAX_HALF_N, math.ceil(amax / step))
      return step * np.arange(-half_n, half_n + 1)

    def make_format(log_step: float) -> Format:
      return _rms_format(grid(log_step))

    def rate(log_step: float) -> float:
      return _grid_rate(y, grid(log_step), scale_bits)

    accepted = _rms_log_steps(rate, bits_per_param, amax, smallest, clip)

  for point in reversed(accepted):
    spec = dataclasses.replace(probe, format=make_format(point))
    q = quantise(x, spec)
    counts = symbols.symbol_counts(symbols.logical_codes(q), q.codebook)
    if sizes.histogram_rate(counts, sizes.scale_bits(q.scales, q.scale_scales)) <= bits_per_param:
      return spec.format, spec
  raise RuntimeError(f"no grid the search accepted keeps a rate ≤ {bits_per_param=} once "
                     "quantised: its histogram disagrees with quantise")


# Bits of one sparse outlier: its bfloat16 correction and its int32 flat index.
OUTLIER_BITS = 8 * (jnp.dtype(outliers.VALUE_DTYPE).itemsize
                    + jnp.dtype(outliers.INDEX_DTYPE).itemsize)
# The largest share of outliers the search considers.
MAX_OUTLIER_FRACTION = 2**-4


def fit_grid_with_outliers(x, bits_per_param: float, *, block_size="tensor", axis: int = 0,
                           scale_dtype=None) -> tuple[Format, outliers.OutlierSpec]:
  """The rms grid plus sparse outliers whose size meets `bits_per_param`, outliers only where
  a grid of at most 2·`MAX_HALF_N` + 1 points cannot spend the bits.

  Orr et al. 2025 (§1 and §4 item 9). An odd uniform grid that spans ±max|y| (y = x/s, s the
  block RMS; `fit_grid`) has at most 255 points, so on a tensor with outliers its finest
  unclipped rate r(0) can fall short of the target b. Taking the n largest |xᵢ| out
  (`jaxquant.outliers.split_outliers`, 48 bits each: `OUTLIER_BITS`) shrinks the span, so the
  finest unclipped grid of the remainder reaches r(n) + 48·n/N, which grows with n. The n
  chosen is the smallest with r(n) + 48·n/N ≥ b (bisection over n ≤ `MAX_OUTLIER_FRACTION`·N;
  n = 0 when r(0) ≥ b), and the remainder gets `fit_grid`'s grid for b − 48·n/N. Unlike
  clipping (`fit_grid(..., clip=True)`), no value is moved: an outlier is kept to bfloat16
  precision.

  Args:
    x: the tensor (any shape, finite, not all zero or subnormal).
    bits_per_param: the target average bits per element, scales and outliers included.
    block_size: an int (blocks along `axis`), ``"channel"`` or ``"tensor"``.
    axis: the axis blocks run along.
    scale_dtype: how scales are stored; default float32 per tensor, else bfloat16.

  Returns:
    (format, spec): the remainder's grid, and the `jaxquant.outliers.OutlierSpec` of its
    `QuantSpec` (rms scaling) with the share of outliers n/N, for
    `jaxquant.outliers.quantise_with_outliers` or a `jaxquant.Rule`. Its ideal-coded size,
    the dense codes' plus 48 bits per outlier, is at most `bits_per_param` per element.

  Raises:
    ValueError: as `fit_grid`; or even `MAX_OUTLIER_FRACTION`·N outliers leave the target out
      of reach.
  """
  bits_per_param = _arguments.real("bits_per_param", bits_per_param, low=0.0, low_open=True)
  x = jnp.asarray(_arguments.fitting_input(x))
  scale_dtype = scale_dtype or ("float32" if block_size == "tensor" else "bfloat16")
  probe = QuantSpec(_rms_format(np.array([-1.0, 0, 1])), block_size=block_size, scaling="rms",
                    scale_dtype=scale_dtype, axis=axis)
  flat = np.asarray(x).reshape(-1)
  order = np.argsort(-np.abs(flat), kind="stable")  # split_outliers' order: ties by index

  def remainder(n: int) -> jax.Array:
    kept = flat.copy()
    kept[order[:n]] = 0
    return jnp.asarray(kept.reshape(x.shape))

  def reach(n: int) -> float:  # the finest unclipped grid's rate, plus the outliers
    y, scale_bits = _scaled_values(remainder(n), probe)
    half_n = MAX_HALF_N
    step = float(jnp.max(jnp.abs(y))) / half_n
    return _grid_rate(y, step * np.arange(-half_n, half_n + 1), scale_bits) + (
        OUTLIER_BITS * n / flat.size)

  low, high = 0, int(MAX_OUTLIER_FRACTION * flat.size)
  if reach(low) < bits_per_param:
    if reach(high) < bits_per_param:
      raise ValueError(f"{bits_per_param=} is out of reach even with {high} outliers "
                       f"({MAX_OUTLIER_FRACTION:g} of the tensor)")
    while high - low > 1:  # reach(low) < target <= reach(high)
      middle = (low + high) // 2
      low, high = (middle, high) if reach(middle) < bits_per_param else (low, middle)
    low = high
  n = low
  fmt, spec = fit_grid(remainder(n), bits_per_param - OUTLIER_BITS * n / flat.size,
                       scaling="rms", block_size=block_size, axis=axis, scale_dtype=scale_dtype)
  return fmt, outliers.OutlierSpec(spec, n / flat.size)
