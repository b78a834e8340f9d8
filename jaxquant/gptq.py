"""GPTQ: rounding that compensates its own error, for every codebook format and block scaling.

Round-to-nearest (`jaxquant.quantise`) gives each weight its nearest codepoint on its own. GPTQ
(Frantar et al. 2022, after Optimal Brain Quantization, Frantar & Alistarh 2022) quantises a
layer's weight W [K, N] one input row at a time and moves the rows not yet quantised so that
the layer's output on calibration inputs X [tokens, K] loses as little as possible. With
H = XᵀX (`jaxquant.calibration`), damped to H + λI with λ = `damping`·mean(diag H), and U the
upper Cholesky factor of its inverse (H⁻¹ = UᵀU), quantising row k to ŵ_k sets

  e_k = (w_k − ŵ_k) / U_kk,   w_j ← w_j − U_kj · e_k   for every row j after k,

the update that minimises ‖X(W − Ŵ)‖² over the rows not yet quantised. Rows are taken in lazy
batches (Frantar et al. §3): inside a batch the updates are applied row by row; their effect
on later rows is applied once per batch, as one matrix product.

The result is an ordinary `QuantisedArray` in `quantise`'s layout, so every kernel and
checkpoint serves it:

- each row is rounded to the nearest codepoint of the format, relative to its block's stored
  scale;
- a block's scale is computed when its first row is reached, from the error-compensated
  weights at that moment, with the statistic (absmax, signmax, rms) and the storage (float32,
  bfloat16, e8m0, float8, double quantisation) that `quantise` uses. What depends on every
  block is fixed beforehand from round-to-nearest on W: the float8 per-tensor factor, the
  double-quantisation group scales and the rms scale search's multiplier; each block's scale
  is stored relative to them, saturating at their range. One per-tensor scale
  (``block_size="tensor"``) is round-to-nearest's;
- `act_order` takes blocks in decreasing Σ diag H and, inside each block, rows in decreasing
  diag H: GPTQ's activation order, restricted so that every block stays contiguous (the
  layout, and the scale each row reads, are unchanged).

A weight contracted over several axes (an attention output [heads, head_dim, features]) has
one H over all of them; with batch axes (per-head weights) one H per batch index. With H
diagonal (H = I among them) no row moves another and GPTQ is round-to-nearest.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import _arguments, scaling
from jaxquant.calibration import SecondMoment
from jaxquant.qarray import (
  QuantisedArray,
  QuantSpec,
  as_spec,
  nearest_codes,
  pack_codes,
  plan_for,
  round_to_nearest,
  stored_scales,
)

LAZY_BATCH = 128  # rows per lazy batch (Frantar et al. use 128)


class _Layout(NamedTuple):
  """Where a weight's axes go in the canonical form [batch, rows, N] that GPTQ runs on:
  rows are the contracted axes with the quantised one innermost (padded to whole blocks)."""
  order: tuple[int, ...]  # batch axes, other contracted axes, the quantised axis, free axes
  batch_shape: tuple[int, ...]
  outer_shape: tuple[int, ...]  # the other contracted axes
  length: int  # the quantised axis
  padded: int  # ... padded to whole blocks
  free_shape: tuple[int, ...]
  h_order: tuple[int, ...]  # H's contracted axes (in `contracting` order) to canonical order
  block: int
  lazy: int  # rows per lazy batch: a multiple of the block that divides the rows

  @property
  def outer(self) -> int:
    return math.prod(self.outer_shape)

  @property
  def blocks(self) -> int:  # blocks along the quantised axis
    return self.padded // self.block

  @property
  def rows(self) -> int:
    return self.outer * self.padded

  @property
  def columns(self) -> int:
    return math.prod(self.free_shape)


def _layout(shape, moment: SecondMoment, axis: int, block: int) -> _Layout:
  contracting, batch = moment.contracting, moment.batch
  others = tuple(a for a in contracting if a != axis)
  free = tuple(a for a in range(len(shape)) if a not in contracting + batch)
  length = shape[axis]
  padded = -(-length // block) * block
  outer = math.prod(shape[a] for a in others)
  groups = outer * (padded // block)  # blocks along the rows
  fits = [g for g in range(1, max(1, LAZY_BATCH // block) + 1) if groups % g == 0]
  return _Layout(
      order=batch + others + (axis,) + free, batch_shape=tuple(shape[a] for a in batch),
      outer_shape=tuple(shape[a] for a in others), length=length, padded=padded,
      free_shape=tuple(shape[a] for a in free),
      h_order=tuple(contracting.index(a) for a in others + (axis,)), block=block,
      lazy=block * max(fits))


def _as_moment(hessian, shape, axis: int) -> SecondMoment:
  if not isinstance(hessian, SecondMoment):
    hessian = SecondMoment(jnp.asarray(hessian, jnp.float32), (axis,))
  contracting, batch = tuple(hessian.contracting), tuple(hessian.batch)
  ndim = len(shape)
  if not contracting or any(not 0 <= a < ndim for a in contracting + batch) or len(
      set(contracting + batch)) != len(contracting + batch):
    raise ValueError(f"hessian: contracting axes {contracting} and batch axes {batch} must be "
                     f"distinct axes of the weight of shape {tuple(shape)}")
  if axis not in contracting:
    raise ValueError(f"spec.axis={axis} must be one of the contracted axes {contracting}: "
                     "GPTQ corrects along the axis the inputs contract")
  k = math.prod(shape[a] for a in contracting)
  expected = tuple(shape[a] for a in batch) + (k, k)
  if tuple(hessian.matrix.shape) != expected:
    raise ValueError(f"hessian has shape {tuple(hessian.matrix.shape)}; a weight of shape "
                     f"{tuple(shape)} contracted over axes {contracting} (batch {batch}) needs "
                     f"{expected}")
  return dataclasses.replace(hessian, matrix=jnp.asarray(hessian.matrix, jnp.float32),
                             contracting=contracting, batch=batch)


def quantise(w, hessian, spec: QuantSpec | str, *, damping: float = 0.01,
         act_order: bool = False) -> QuantisedArray:
  """Quantises `w` with `spec` by GPTQ against the inputs' second moment `hessian`.

  Args:
    w: the float weight, quantised along `spec.axis` (one of the axes its inputs contract).
    hessian: a `jaxquant.calibration.SecondMoment`, or a K × K array for a weight
      contracted over `spec.axis` alone (a kernel [K, N] with ``axis=0``).
    spec: the `QuantSpec` (or a format name): any format, scaling and scale storage.
    damping: λ = damping · mean(diag H) is added to diag H (a number ≥ 0; GPTQ uses 0.01).
    act_order: quantise blocks, and rows inside them, in decreasing diag H (module docstring).

  Returns:
    A `QuantisedArray` laid out as ``quantise(w, spec)``.

  Raises:
    ValueError: `w` or `hessian` is not finite, the shapes disagree, `spec.axis` is not
      contracted, diag H is all zero (no calibration input reached the weight) or the damped
      H is not positive definite.
    NotImplementedError: the spec's scaling is minmax (GPTQ does not choose offsets).

  Example:
    >>> import jax, jaxquant as jq
    >>> x = jax.random.normal(jax.random.key(0), (512, 128))     # calibration inputs
    >>> w = jax.random.normal(jax.random.key(1), (128, 64))      # kernel [in, out]
    >>> q = jq.gptq.quantise(w, x.T @ x, jq.QuantSpec("nf4", block_size=64))
    >>> rtn = jq.quantise(w, jq.QuantSpec("nf4", block_size=64))
    >>> error = lambda q: float(jnp.linalg.norm(x @ (q.dequantise() - w)))
    >>> bool(error(q) < error(rtn)), q.shape == rtn.shape
    (True, True)
  """
  spec = as_spec(spec)
  if spec.scaling == "minmax":
    raise NotImplementedError("GPTQ chooses block scales but not block offsets; "
                              "spec.scaling='minmax' is not supported (use round to nearest)")
  w = jnp.asarray(w) if not hasattr(w, "dtype") else w
  if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim == 0:
    raise TypeError(f"w must be a float array with at least one axis, got {w.dtype} "
                    f"of shape {tuple(w.shape)}")
  damping = _arguments.real("damping", damping, low=0.0)
  axis = _arguments.integer("spec.axis", spec.axis, low=-w.ndim, high=w.ndim - 1) % w.ndim
  spec = dataclasses.replace(spec, axis=axis)
  moment = _as_moment(hessian, w.shape, axis)
  plan = plan_for(w, spec)
  words, rtn_scales, scale_scales, _, finite, _, multiplier, _ = round_to_nearest(w, plan)
  layout = _layout(w.shape, moment, axis, plan.static.block_size)
  codes, scales, ok = _gptq(w, moment.matrix, rtn_scales, scale_scales, multiplier,
                            plan.codebook, plan.inverse_reference, plan.ceiling,
                            jnp.float32(damping), plan.static, layout, bool(act_order))
  if not isinstance(ok, jax.core.Tracer):
    if not bool(finite):
      raise ValueError("w contains NaN or Inf; GPTQ quantises only finite weights")
    if not bool(jnp.all(jnp.isfinite(moment.matrix))):
      raise ValueError("hessian contains NaN or Inf")
    if not bool(jnp.any(moment.diagonal > 0)):
      raise ValueError("hessian has an all-zero diagonal: no calibration input reached the "
                       "weight, so GPTQ has nothing to compensate against")
    if not bool(ok):
      raise ValueError(f"hessian + λI (λ = {damping:g}·mean(diag H)) is not positive definite; "
                       "pass a second moment Σ x xᵀ, or raise damping")
  del words
  return plan.assemble(codes, scales, scale_scales, w)


def _to_canonical(a: jax.Array, layout: _Layout, length: int) -> jax.Array:
  """A weight-shaped array (quantised axis of `length`) as [batch, outer, length, N]."""
  batch = math.prod(layout.batch_shape)
  return jnp.transpose(a, layout.order).reshape(batch, layout.outer, length, layout.columns)


def _from_canonical(a: jax.Array, layout: _Layout, length: int) -> jax.Array:
  shape = layout.batch_shape + layout.outer_shape + (length,) + layout.free_shape
  return jnp.transpose(a.reshape(shape), np.argsort(layout.order))


def _canonical_hessian(h: jax.Array, layout: _Layout) -> jax.Array:
  """H [*batch, K, K] as [batch, rows, rows], rows ordered as the canonical weight's and
  padded along the quantised axis with zero rows and columns."""
  batch = math.prod(layout.batch_shape)
  sizes = [layout.outer_shape[i] if i < len(layout.outer_shape) else layout.length
           for i in range(len(layout.h_order))]
  contracted = [None] * len(layout.h_order)
  for position, index in enumerate(layout.h_order):
    contracted[index] = sizes[position]
  h = h.reshape((batch,) + tuple(contracted) * 2)
  n = len(contracted)
  h = jnp.transpose(h, (0,) + tuple(1 + i for i in layout.h_order)
                    + tuple(1 + n + i for i in layout.h_order))
  h = h.reshape(batch, layout.outer, layout.length, layout.outer, layout.length)
  pad = layout.padded - layout.length
  h = jnp.pad(h, ((0, 0), (0, 0), (0, pad), (0, 0), (0, pad)))
  return h.reshape(batch, layout.rows, layout.rows)


@functools.partial(jax.jit, static_argnums=(9, 10, 11))
def _gptq(w, h, rtn_scales, scale_scales, multiplier, codebook, inverse_reference, ceiling,
          damping, static, layout: _Layout, act_order: bool):
  a = static.axis
  pad = [(0, 0)] * w.ndim
  pad[a] = (0, layout.padded - layout.length)
  weights = _to_canonical(jnp.pad(w.astype(jnp.float32), pad), layout, layout.padded)
  weights = weights.reshape(weights.shape[0], layout.rows, layout.columns)
  hessians = _canonical_hessian(h, layout)
  canonical_scales = lambda s: _to_canonical(s, layout, layout.blocks).reshape(
      -1, layout.outer * layout.blocks, layout.columns)
  decoded = scaling.decode_scales(rtn_scales, scale_scales)
  if static.granularity == "tensor":  # round-to-nearest's one scale
    fixed = jnp.broadcast_to(decoded.reshape(()), (weights.shape[0], 1, layout.columns))
    stored, factors = jnp.broadcast_to(rtn_scales.reshape(()), fixed.shape), None
  else:
    fixed, stored = canonical_scales(decoded), canonical_scales(rtn_scales)
    factors = scaling.second_level_factors(scale_scales, rtn_scales.shape, static.double_quant)
    factors = None if factors is None else canonical_scales(factors)
  run = functools.partial(_gptq_matrix, rounding=_Rounding(
      codebook, inverse_reference, ceiling, multiplier, static), layout=layout,
                          damping=damping, act_order=act_order)
  codes, stored, ok = jax.vmap(run)(weights, hessians, stored, fixed, factors)
  codes = _from_canonical(codes.reshape(-1, layout.outer, layout.padded, layout.columns),
                          layout, layout.padded)
  if static.granularity == "tensor":
    stored = rtn_scales
  else:
    stored = _from_canonical(stored.reshape(-1, layout.outer, layout.blocks, layout.columns),
                             layout, layout.blocks)
  return pack_codes(codes, static.bits, a), stored, jnp.all(ok)


class _Rounding(NamedTuple):
  """What rounding a row to the format needs (`jaxquant.qarray.Plan`'s arrays, the rms
  search's multiplier and the static configuration)."""
  codebook: jax.Array
  inverse_reference: jax.Array
  ceiling: jax.Array
  multiplier: jax.Array
  static: object


def _gptq_matrix(weights, hessian, stored, fixed, factors, *, rounding: _Rounding,
                 layout: _Layout, damping, act_order: bool):
  """GPTQ on one canonical matrix W [rows, N] with H [rows, rows] (module docstring).

  Returns the codes [rows, N] (uint32), the stored block scales [blocks, N] and whether the
  Cholesky factors are finite.
  """
  static, codebook = rounding.static, rounding.codebook
  rows, size, lazy = layout.rows, layout.block, layout.lazy
  position = np.arange(rows) % layout.padded
  real = jnp.asarray(position < layout.length)
  block_of = jnp.asarray((np.arange(rows) // layout.padded) * layout.blocks + position // size)
  counts = np.minimum(size, layout.length - size * (np.arange(layout.outer * layout.blocks)
                                                    % layout.blocks))
  counts = jnp.asarray(counts.astype(np.float32))
  diagonal = jnp.where(real, jnp.diagonal(hessian), 0.0)
  mean = jnp.sum(diagonal) / np.float32(layout.outer * layout.length)
  # Padding rows are zero and uncoupled; they get the mean so that H stays well scaled.
  hessian = hessian + jnp.diag(jnp.where(real, damping * mean, mean + damping * mean))
  if act_order:
    mass = jax.ops.segment_sum(diagonal, block_of, num_segments=layout.outer * layout.blocks)
    block_rank = jnp.argsort(jnp.argsort(-mass, stable=True), stable=True)
    order = jnp.lexsort((-diagonal, block_rank[block_of]))
  else:
    order = jnp.arange(rows)
  weights, hessian = weights[order], hessian[order][:, order]
  block_of = block_of[order]
  lower = jnp.linalg.cholesky(hessian)
  inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(rows, dtype=jnp.float32))
  upper = jnp.linalg.cholesky(inverse).T  # H⁻¹ = UᵀU
  dynamic = static.granularity != "tensor"
  later = jnp.arange(lazy)

  def batch_step(b, carry):
    weights, codes, stored = carry
    start = b * lazy
    chunk = jax.lax.dynamic_slice_in_dim(weights, start, lazy)
    factor_rows = jax.lax.dynamic_slice_in_dim(upper, start, lazy)  # U[batch rows, :]
    within = jax.lax.dynamic_slice_in_dim(factor_rows, start, lazy, axis=1)

    def row_step(t, carry):
      chunk, errors, batch_codes, stored, decoded = carry
      i = start + t
      if dynamic:
        def new_block(stored):
          rows_of_block = jax.lax.dynamic_slice_in_dim(chunk, t, size)[None]
          block = block_of[i]
          statistic = scaling.block_statistic(rows_of_block, static.scaling, 0, size,
                                              count=counts[block])
          relative = None if factors is None else factors[block]
          _, (codes, _), decoded = stored_scales(
              statistic[0, 0] * rounding.inverse_reference, rounding.multiplier,
              rounding.ceiling, static, relative)
          return stored.at[block].set(codes), decoded
        stored, decoded = jax.lax.cond(t % size == 0, new_block,
                                       lambda stored: (stored, decoded), stored)
      else:
        decoded = fixed[block_of[i]]
      row = chunk[t]
      code = nearest_codes(scaling.divide(row, decoded), codebook, static.ties_to_even)
      error = (row - codebook[code] * decoded) / within[t, t]
      chunk = chunk - jnp.where(later > t, within[t], 0.0)[:, None] * error[None, :]
      return (chunk, errors.at[t].set(error), batch_codes.at[t].set(code), stored, decoded)

    carry = (chunk, jnp.zeros_like(chunk), jnp.zeros(chunk.shape, jnp.uint32), stored,
             jnp.zeros(chunk.shape[1:], jnp.float32))
    _, errors, batch_codes, stored, _ = jax.lax.fori_loop(0, lazy, row_step, carry)
    pending = jnp.where(jnp.arange(rows) >= start + lazy, factor_rows, 0.0)
    weights = weights - jnp.matmul(pending.T, errors, precision=jax.lax.Precision.HIGHEST)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, batch_codes, start, 0)
    return weights, codes, stored

  carry = (weights, jnp.zeros(weights.shape, jnp.uint32), stored)
  _, codes, stored = jax.lax.fori_loop(0, rows // lazy, batch_step, carry)
  codes = codes[jnp.argsort(order)]
  return codes, stored, jnp.all(jnp.isfinite(upper))
