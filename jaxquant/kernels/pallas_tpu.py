"""Pallas TPU (Mosaic) kernel: activations times a packed codebook-quantised weight.

Maths
-----
The weight W[K, N] is stored as b-bit codes (layout "bitstream-u32" v1 along K, see
`jaxquant.packing`), float32 block scales s[K / B, N] and a codebook v[2^b]:

    W[k, n] = v[code[k, n]] · s[k // B, n],        y[M, N] = x[M, K] @ W   (float32 sums).

Design
------
* **Grid** (M tiles, N tiles, K tiles) with K last: dimension semantics ("parallel",
  "parallel", "arbitrary"). A float32 accumulator (bm, bn) lives in VMEM scratch; it is zeroed
  at the first K step and written to the output block at the last. Blocks are K-major with N
  on lanes: x (bm, bk), code words (bk·b/32, bn) uint32, the codebook whole in SMEM (read as
  scalars). The scales of all of K for an N tile stay resident in VMEM (block (K/B, bn), whose
  index does not change along K, so it is fetched once per output tile); a K tile therefore
  need not hold a multiple of 8 scale rows.
* **Planes, not interleaving.** Codes are never put back in K order. A K tile is split into Q
  planes of L = bk/Q rows: for b dividing 32, plane j is the j-th code of every word (Q =
  32/b, row r of the plane is word row r, i.e. k = Q·r + j); for b = 3, 5, 6, 7, plane i is
  the i-th code of every 32-row group (Q = 32, row g is group g, k = 32·g + i). In both cases
  tile row k = Q·l + q goes to row q·L + l of the dequantised tile, and the wrapper permutes
  the columns of x the same way once per call (a reshape and transpose of x), so one dot of
  the whole tile, x_tile @ W_tile, is x @ W = Σ_q x[:, q::Q] @ W_q.
* **Unpacking: bit tests on uint32 words only.** Bit t of the code at stream position p sits
  in word p // 32 at bit p % 32 (static), so each code bit is one `(word & 1 << bit) != 0`:
  no shifts at all, no int8 vectors, and straddling codes (b = 3, 5, 6, 7) cost nothing
  extra: their low bits are tested in one word and their high bits in the next. For those
  widths the words of phase w (word w of every group) are read with a sublane-strided load
  (stride b). Mosaic's strided load needs a memref whose last dimension is exactly 128
  lanes, so each step first copies the code tile into a VMEM scratch of 128-lane column
  blocks stacked along sublanes, (bn/128 · rows, 128).
* **Lookup: a select tree, no gather** (Mosaic has none beyond take_along_axis-like forms).
  The tree splits on the code's top bit first and recurses, 2^b − 1 `where`s per element
  with the 2^b SMEM scalars as leaves; depth-first order keeps only about b partial results
  live, so it does not spill even at 8 bits.
* **Scales** multiply the looked-up values before the dot. In plane coordinates row l uses
  scale row l // (B/Q) for every plane, so the (8 or 16, 128) scale vreg of a loop step is
  built once (single-row loads broadcast along sublanes, merged with a sublane-iota select
  when B/Q is smaller than the step) and reused by all Q planes.
* **Loop**: a `fori_loop` over steps of 8 plane rows (16 for bfloat16, one packed vreg) ×
  every 128-lane block, writing each plane's rows into a (bk, bn) VMEM scratch in the dot
  dtype; then one `jnp.dot` of x_tile with the scratch. The unrolled body grows with Q and
  bn/128 but not with bk.
* **Precision**: bfloat16 activations meet bfloat16 weights (values rounded after scaling)
  with a float32 MXU accumulator; float32 activations use float32 weights and
  `precision=HIGHEST`.
* **Two configurations, one kernel body.** `GEMV` (M ≤ `GEMV_MAX_M`: one M tile, so every
  weight is read and decoded once; bn = 512, bk = 2048) and `GEMM` (bm = 256, bn = 256,
  bk = 512). They differ only in block sizes; pass `block_sizes` to override. The wrapper
  fits the sizes to the problem: bm ≤ M rounded up to 8 (16 for bfloat16); bn the largest
  multiple of 128 dividing N rounded up to 128; bk the largest multiple of
  lcm(Q·step, 128, B) dividing K rounded up to that alignment. Padding x is cheap; padding
  codes or scales copies them on every call, which the wrapper avoids when N % 128 == 0 and
  K is a multiple of the alignment: 128 for 2-, 4- and 8-bit codes (256 for 2-bit with
  bfloat16), 256 for 1, 3, 5, 6 and 7 bits (512 with bfloat16), and in every case of B.

Cost
----
Per (8, 128) float32 vreg of weights the decode is about 2b VPU ops of bit tests,
2^b − 1 selects and one scale multiply (24 at 4 bits, 14 at 3, 8 at 2, 272 at 8), plus
the store and, for bfloat16, a convert; the dot adds MXU work. Streaming 4-bit weights at
HBM speed leaves a budget of only a few vector ops per weight vreg (about 2–4 on v5e, by
public figures), so for M near 1 the kernel is expected to be VPU-bound, not HBM-bound, and
8-bit codes to be far slower than 4-bit ones. At small M the dot also makes the weight tile
the MXU's stationary operand, whose loading may cost more than the few rows of x use.

Verification without a TPU
--------------------------
Verified on CPU: numerics under ``interpret=True`` and ``pltpu.InterpretParams()``
(tests/test_pallas_tpu.py, 1- to 8-bit codes), and that `jax.export(...,
platforms=["tpu"])` lowers the kernel to a Mosaic ``tpu_custom_call`` for 1- to 8-bit codes
with float32 and bfloat16 activations in both configurations. The emitted Mosaic IR was
read once: sublane-strided `tpu.strided_load`s (strides [b, 1]) from the (…, 128) scratch,
`scf.for` loops and an fp32-precision `tpu.matmul`. Not verified: Mosaic's later passes
(layout inference, apply-vector-layout, LLO), which run only in the TPU compiler, in
particular the strided loads, the single-row dynamic scale loads, the bfloat16 stores of
16-row slices; VMEM limits; and speed. Interpret mode accepts things Mosaic rejects, so a
first TPU run may still fail to compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["GEMM", "GEMV", "GEMV_MAX_M", "BlockSizes", "default_block_sizes", "qmatmul_pallas_tpu"]

LANES = 128
ACTIVATION_DTYPES = ("float32", "bfloat16")
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Requested tile sizes; the wrapper shrinks or rounds them to fit the problem.

  Attributes:
    block_m: rows of x per tile (a multiple of 8).
    block_n: output columns per tile (a multiple of 128).
    block_k: rows of K per tile (a multiple of 128; rounded up to the kernel's alignment).
  """

  block_m: int
  block_n: int
  block_k: int

  def __post_init__(self):
    for name, multiple in (("block_m", 8), ("block_n", LANES), ("block_k", LANES)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
        raise ValueError(f"{name}={value!r} must be a positive multiple of {multiple}")


# Batch-1 / small-M configuration: one M tile, long K tiles, so each weight is decoded once.
GEMV = BlockSizes(block_m=64, block_n=512, block_k=2048)
# Tiled configuration for larger M.
GEMM = BlockSizes(block_m=256, block_n=256, block_k=512)
GEMV_MAX_M = 64


def default_block_sizes(m: int) -> BlockSizes:
  """`GEMV` for M ≤ `GEMV_MAX_M`, else `GEMM`."""
  return GEMV if m <= GEMV_MAX_M else GEMM


class _Layout(NamedTuple):
  """How a K tile splits into planes (see the module docstring)."""
  planes: int  # Q: planes per K tile
  phases: int  # word rows read per plane row: 1 when bits divides 32, else bits
  step: int  # plane rows per loop step: one vreg of the dot dtype (8 float32, 16 bfloat16)


def _layout(bits: int, dtype) -> _Layout:
  step = 8 if jnp.dtype(dtype) == jnp.float32 else 16
  if 32 % bits == 0:
    return _Layout(planes=32 // bits, phases=1, step=step)
  return _Layout(planes=32, phases=bits, step=step)


def _select_tree(table, code_bits):
  """table[code] from the code's bits (``code_bits[t]`` is bit t): 2^b − 1 selects."""

  def pick(first: int, level: int):
    if level < 0:
      return table[first]
    half = 1 << level
    return jnp.where(code_bits[level], pick(first + half, level - 1), pick(first, level - 1))

  return pick(0, len(code_bits) - 1)


def _step_scales(scales_ref, first_row, index, step: int, rows_per_scale: int, lanes):
  """The (step, 128) scales of plane rows [index·step, (index + 1)·step) of a K tile."""
  shape = (step, LANES)
  if rows_per_scale >= step:
    # `index` ≥ 0, so truncating division is floor division (and needs no sign logic).
    row = first_row + jax.lax.div(index, rows_per_scale // step)
    return jnp.broadcast_to(scales_ref[pl.ds(row, 1), lanes], shape)
  row = first_row + index * (step // rows_per_scale)
  sublane = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  scale = jnp.broadcast_to(scales_ref[pl.ds(row, 1), lanes], shape)
  for t in range(1, step // rows_per_scale):
    later = jnp.broadcast_to(scales_ref[pl.ds(row + t, 1), lanes], shape)
    scale = jnp.where(sublane >= t * rows_per_scale, later, scale)
  return scale


def _kernel(codebook_ref, x_ref, codes_ref, scales_ref, out_ref, acc_ref, w_ref, *words_ref,
            bits: int, block_size: int, layout: _Layout, precision):
  planes, phases, step = layout
  tile_k, tile_n = w_ref.shape
  rows = tile_k // planes
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  if phases > 1:
    (words_ref,) = words_ref
    tile_words = codes_ref.shape[0]
    for j in range(tile_n // LANES):
      words_ref[j * tile_words:(j + 1) * tile_words, :] = codes_ref[:, j * LANES:(j + 1) * LANES]

    def words(index, j, phase):
      first = j * tile_words + index * step * phases + phase
      return words_ref[pl.ds(first, step, stride=phases), :]
  else:

    def words(index, j, phase):
      del phase
      return codes_ref[pl.ds(pl.multiple_of(index * step, step), step), pl.ds(j * LANES, LANES)]

  table = [codebook_ref[v] for v in range(2**bits)]

  def body(index, carry):
    for j in range(tile_n // LANES):
      lanes = pl.ds(j * LANES, LANES)
      phase_words = [words(index, j, phase) for phase in range(phases)]
      scale = _step_scales(scales_ref, k * (tile_k // block_size), index, step,
                           block_size // planes, lanes)
      for plane in range(planes):
        code_bits = []
        for t in range(bits):
          position = plane * bits + t
          mask = jnp.uint32(1 << position % 32)
          code_bits.append(jnp.bitwise_and(phase_words[position // 32], mask) != jnp.uint32(0))
        values = _select_tree(table, code_bits) * scale
        row = pl.multiple_of(plane * rows + index * step, step)
        w_ref[pl.ds(row, step), lanes] = values.astype(w_ref.dtype)
    return carry

  jax.lax.fori_loop(0, rows // step, body, 0)
  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32,
                          precision=precision)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = acc_ref[...]


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _tile(total: int, unit: int, target: int) -> int:
  """The largest multiple of `unit` that divides `total` and is at most max(target, unit)."""
  units, most = total // unit, max(target // unit, 1)
  return unit * max(d for d in range(1, min(units, most) + 1) if units % d == 0)


def _pad_to(a: jax.Array, rows: int, cols: int) -> jax.Array:
  if a.shape == (rows, cols):
    return a
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _check(x, codes, scales, codebook, bits, block_size) -> None:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
    raise ValueError(f"bits={bits!r} must be an int in 1..8")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be a positive int")
  planes = _layout(bits, jnp.float32).planes
  if block_size & (block_size - 1) or block_size % planes:
    raise NotImplementedError(
        f"block_size={block_size} is not supported at {bits=}: it must be a power of two and a "
        f"multiple of {planes}")
  if jnp.dtype(x.dtype).name not in ACTIVATION_DTYPES:
    raise TypeError(f"x has dtype {jnp.dtype(x.dtype).name}; the kernel takes {ACTIVATION_DTYPES}")
  if codes.dtype != jnp.uint32:
    raise TypeError(f"codes must be uint32 words, got codes.dtype={codes.dtype}")
  if scales.dtype != jnp.float32:
    raise TypeError(f"scales must be float32 (decoded), got scales.dtype={scales.dtype}")
  if codebook.dtype != jnp.float32:
    raise TypeError(f"codebook must be float32, got codebook.dtype={codebook.dtype}")
  if codes.ndim != 2 or codes.shape[0] % bits or codes.shape[0] == 0 or codes.shape[1] == 0:
    raise ValueError(f"codes has shape {codes.shape}; expected [K·{bits}/32, N] with whole "
                     f"32-row groups ({bits} word rows each) and N ≥ 1")
  k_stored, n = codes.shape[0] * 32 // bits, codes.shape[1]
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != k_stored:
    raise ValueError(f"x has shape {x.shape}; expected [M ≥ 1, K = {k_stored}] to match codes "
                     f"of shape {codes.shape} at {bits=} (zero-pad x along K)")
  if k_stored % block_size:
    raise ValueError(f"K = {k_stored} (from codes) must be a multiple of {block_size=}")
  if scales.shape != (k_stored // block_size, n):
    raise ValueError(f"scales has shape {scales.shape}; expected {(k_stored // block_size, n)}")
  if codebook.shape != (2**bits,):
    raise ValueError(f"codebook has shape {codebook.shape}; expected ({2**bits},): pad it")


@functools.partial(jax.jit, static_argnames=("bits", "block_size", "block_sizes", "interpret"))
def qmatmul_pallas_tpu(x: jax.Array, codes: jax.Array, scales: jax.Array, codebook: jax.Array, *,
                       bits: int, block_size: int, block_sizes: BlockSizes | None = None,
                       interpret=False) -> jax.Array:
  """x @ W in float32 for W[k, n] = codebook[code[k, n]] · scales[k // block_size, n].

  Args:
    x: activations [M, K], float32 or bfloat16 (K as stored: zero-padded to the codes).
    codes: uint32 [K·bits/32, N], layout "bitstream-u32" v1 along axis 0.
    scales: float32 [K / block_size, N] (decoded).
    codebook: float32 [2**bits].
    bits: code width, 1..8.
    block_size: rows of K per scale: a power of two and a multiple of 32/bits (of 32 for
      3, 5, 6 and 7 bits).
    block_sizes: tile sizes; default `default_block_sizes(M)`.
    interpret: False on TPU; True or a `pltpu.InterpretParams()` to run on CPU.

  Returns:
    float32 [M, N].

  Raises:
    TypeError: an argument has the wrong dtype.
    ValueError: shapes disagree, or `bits` or `block_size` is invalid.
    NotImplementedError: a valid block size the kernel does not handle.
  """
  _check(x, codes, scales, codebook, bits, block_size)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes or None, got {block_sizes!r}")
  (m, k_stored), n = x.shape, codes.shape[1]
  layout = _layout(bits, x.dtype)
  sizes = block_sizes or default_block_sizes(m)
  align_k = math.lcm(layout.planes * layout.step, LANES, block_size)
  k_padded = _round_up(k_stored, align_k)
  tile_k = _tile(k_padded, align_k, sizes.block_k)
  n_padded = _round_up(n, LANES)
  tile_n = _tile(n_padded, LANES, sizes.block_n)
  tile_m = min(_round_up(sizes.block_m, layout.step), _round_up(m, layout.step))
  m_padded = _round_up(m, tile_m)

  x = _pad_to(x, m_padded, k_padded)
  # Within each K tile, column Q·l + q moves to q·L + l: the row order of the decoded tile.
  x = x.reshape(m_padded, k_padded // tile_k, tile_k // layout.planes, layout.planes)
  x = x.swapaxes(2, 3).reshape(m_padded, k_padded)
  word_rows = k_padded * bits // 32
  codes = _pad_to(codes, word_rows, n_padded)
  scales = _pad_to(scales, k_padded // block_size, n_padded)

  tile_words = tile_k * bits // 32
  grid = (m_padded // tile_m, n_padded // tile_n, k_padded // tile_k)
  dot_dtype = jnp.dtype(x.dtype)
  scratch = [pltpu.VMEM((tile_m, tile_n), jnp.float32), pltpu.VMEM((tile_k, tile_n), dot_dtype)]
  if layout.phases > 1:
    scratch.append(pltpu.VMEM((tile_n // LANES * tile_words, LANES), jnp.uint32))
  # Double-buffered x, codes, scales and output blocks plus the scratch buffers.
  vmem = (2 * (tile_m * tile_k * dot_dtype.itemsize + 4 * tile_words * tile_n
               + 4 * scales.shape[0] * tile_n + 4 * tile_m * tile_n)
          + 4 * tile_m * tile_n + tile_k * tile_n * dot_dtype.itemsize
          + (4 * tile_words * tile_n if layout.phases > 1 else 0))
  kernel = functools.partial(
      _kernel, bits=bits, block_size=block_size, layout=layout,
      precision=jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m_padded, n_padded), jnp.float32),
      grid=grid,
      in_specs=[
          pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((tile_m, tile_k), lambda i, j, k: (i, k)),
          pl.BlockSpec((tile_words, tile_n), lambda i, j, k: (k, j)),
          pl.BlockSpec((scales.shape[0], tile_n), lambda i, j, k: (0, j)),
      ],
      out_specs=pl.BlockSpec((tile_m, tile_n), lambda i, j, k: (i, j)),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=min(max(2 * vmem, 32 * _MIB), 64 * _MIB)),
      cost_estimate=pl.CostEstimate(
          flops=2 * m_padded * n_padded * k_padded,
          transcendentals=0,
          bytes_accessed=(x.size * dot_dtype.itemsize + 4 * codes.size + 4 * scales.size
                          + 4 * m_padded * n_padded)),
      interpret=interpret,
  )(codebook, x, codes, scales)
  return out[:m, :n]
