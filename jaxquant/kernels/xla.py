"""Any `lax.dot_general` with a packed weight, in plain XLA, one dequantised slab at a time.

The weight W is never materialised. A loop runs over slabs of W along one chosen axis: each step
slices the packed words and scales of `rows` positions along that axis (no code is moved or
transposed), unpacks them (`jaxquant.packing.unpack`), looks the codes up (a select tree up to 4
bits, which vectorises; a gather above), scales them (and adds the block offsets of an
asymmetric weight), and contracts the float slab with the
activations by the caller's own dimension numbers. What the loop does with the slab's product
follows from the role of the chosen axis in the contraction:

- contracted: x is sliced along the axis it contracts with, and the products are summed in
  float32 (W[K, N] at M = 1: slabs of 256 rows of K, as a GEMV streams its weight);
- free or batch: each product is one slice of the output along that axis (x sliced along its
  batch axis too), and the slices are concatenated.

The axis is the outermost one whose smallest slab (32 and block-aligned along the packed axis,
one position elsewhere) fits `SLAB_ELEMENTS` float32 values; slices along the outer axes of a
row-major array are contiguous. The slab holds `rows`, the largest aligned divisor of that
axis's length that fits, and at most `PACKED_ROWS` along the packed axis (the K chunk of a GEMV
that stays in cache). A weight of at most `ONE_SLAB_ELEMENTS` values is one slab. Along the packed axis the loop works at the quantised length, the
number of blocks times the block size: x is padded with zeros to it there, and outputs along it
are cut back to the logical length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant import packing, scaling
from jaxquant.kernels.dimensions import Contraction
from jaxquant.kernels.lookup import select_lookup
from jaxquant.qarray import QuantisedArray, codebook_lookup

SLAB_ELEMENTS = 2**20
ONE_SLAB_ELEMENTS = 2**18
PACKED_ROWS = 256
_SELECT_TREE_MAX_BITS = 4


def quantised_length(q: QuantisedArray) -> int:
  """The length along the packed axis that whole blocks cover (≥ the logical length)."""
  return q.n_blocks * q.block_size


def padded_length(q: QuantisedArray) -> int:
  """The codes stored along the packed axis: `quantised_length` rounded up to 32."""
  return q.codes.shape[q.axis] * packing.GROUP // q.bits


def slab_plan(q: QuantisedArray) -> tuple[int, int]:
  """(axis, rows): slabs of `rows` positions along `axis` (module docstring)."""
  shape = list(q.shape)
  shape[q.axis] = quantised_length(q)
  size = math.prod(shape)
  if size <= ONE_SLAB_ELEMENTS:
    return q.axis, shape[q.axis]
  for axis, extent in enumerate(shape):
    unit, most = 1, SLAB_ELEMENTS // (size // extent)
    if axis == q.axis:
      unit = math.lcm(packing.GROUP, q.block_size) if q.granularity == "block" else packing.GROUP
      most = min(most, max(PACKED_ROWS, unit))
      if extent % unit:
        continue
    if unit > most:
      continue
    units = extent // unit
    return axis, unit * max(d for d in range(1, units + 1) if units % d == 0 and d * unit <= most)
  return q.axis, shape[q.axis]


def slab(q: QuantisedArray, scales: jax.Array, axis: int, start, rows: int,
         offsets: jax.Array | None = None) -> jax.Array:
  """float32 W restricted to positions [start, start + rows) along `axis`.

  Along the packed axis the slab has `rows` positions when it is `axis`, else the quantised
  length. `scales` (and for an asymmetric weight `offsets`) are decoded float32, shaped as
  `q.scales`; `start` may be traced.
  """
  p, bits = q.axis, q.bits
  if axis == p and rows % packing.GROUP:  # the whole axis, not a multiple of 32: one slab
    codes = lax.slice_in_dim(packing.unpack(q.codes, bits, axis=p), 0, rows, axis=p)
    cut = lambda per_block: per_block
  elif axis == p:
    words = lax.dynamic_slice_in_dim(q.codes, start * bits // packing.GROUP,
                                     rows * bits // packing.GROUP, axis=p)
    codes = packing.unpack(words, bits, axis=p)
    cut = lambda per_block: (lax.dynamic_slice_in_dim(
        per_block, start // q.block_size, rows // q.block_size, p)
        if q.granularity == "block" else per_block)
  else:
    words = lax.dynamic_slice_in_dim(q.codes, start, rows, axis=axis)
    codes = lax.slice_in_dim(packing.unpack(words, bits, axis=p), 0, quantised_length(q), axis=p)
    cut = lambda per_block: (lax.dynamic_slice_in_dim(per_block, start, rows, axis=axis)
                             if per_block.shape[axis] > 1 else per_block)
  if bits <= _SELECT_TREE_MAX_BITS:
    values = select_lookup(codes, q.codebook, bits)
  else:
    values = codebook_lookup(q.codebook, codes)
  if q.granularity != "block":
    values = values * cut(scales)
    return values if offsets is None else values + cut(offsets)
  blocks = scaling.to_blocks(values, p, q.block_size) * jnp.expand_dims(cut(scales), p + 1)
  if offsets is not None:
    blocks = blocks + jnp.expand_dims(cut(offsets), p + 1)
  return scaling.from_blocks(blocks, p, values.shape[p])


def dot_general_xla(x: jax.Array, q: QuantisedArray, contraction: Contraction) -> jax.Array:
  """`lax.dot_general(x, W, ...)` in float32 for the packed W, slab by slab."""
  p, length = q.axis, quantised_length(q)
  x_axis_of_p = contraction.x_axis_for(p)
  if x_axis_of_p is not None:
    x = _pad_to(x, x_axis_of_p, length)
  scales, offsets = q.decoded_scales(), q.decoded_offsets()
  axis, rows = slab_plan(q)
  extent = length if axis == p else q.shape[axis]
  count = extent // rows
  x_axis = contraction.x_axis_for(axis)

  def product(index):
    tile = slab(q, scales, axis, index * rows, rows, offsets).astype(q.dtype).astype(x.dtype)
    part = x if x_axis is None else lax.dynamic_slice_in_dim(x, index * rows, rows, x_axis)
    return lax.dot_general(part, tile, contraction.dimension_numbers,
                           preferred_element_type=jnp.float32)

  if count == 1:
    y = product(0)
  elif axis in contraction.w_contracting:
    shape = jax.eval_shape(product, 0).shape
    y = lax.fori_loop(0, count, lambda i, total: total + product(i),
                      jnp.zeros(shape, jnp.float32))
  else:
    out = contraction.output_axis_for(axis)
    parts = lax.map(product, jnp.arange(count))  # [count, ..., rows at out, ...]
    y = jnp.moveaxis(parts, 0, out)
    y = y.reshape(y.shape[:out] + (count * rows,) + y.shape[out + 2:])
  out_of_p = contraction.output_axis_for(p)
  if out_of_p is not None:
    y = lax.slice_in_dim(y, 0, q.shape[p], axis=out_of_p)
  return y


def _pad_to(x: jax.Array, axis: int, length: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad) if length != x.shape[axis] else x
