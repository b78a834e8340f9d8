"""Pallas GPU (Triton lowering) kernels for a matmul with packed codebook weights.

Maths
-----
For activations x[M, Kp] and a weight W[Kp, N] quantised along K (axis 0) in blocks of B rows,

    y[m, n] = Σ_k x[m, k] · W[k, n],    W[k, n] = codebook[code[k, n]] · scales[k // B, n],

accumulated in float32. The codes are packed in layout ``"bitstream-u32"`` v1
(`jaxquant.packing`): every 32 consecutive K rows are ``bits`` uint32 word rows holding a
little-endian bit stream, code i of the group at stream bits [i·bits, i·bits + bits).

Design
------
*Units instead of interleaving.* With g = gcd(bits, 32), each group of 32 rows splits into g
*units* of v = 32/g codes held in exactly u = bits/g whole words (v = 32/bits and u = 1 for
bits 1, 2, 4, 8; v = 16, u = 3 for 6 bits; v = 32, u = bits for 3, 5, 7). Code p of unit q is
K row q·v + p and sits at the static bit offset p·bits of the unit's words, possibly
straddling two of them. So the kernel never interleaves a dequantised tile back into K order:
it splits the sum by position instead,

    y = Σ_{p<v} x[:, p::v] @ W_p,   W_p[q, n] = codebook[code p of unit q] · scales[q·v // B, n],

loading the activations with stride v and extracting every W_p from the same word tiles with
static shifts and masks on uint32 (a straddling code ORs the top of one word with the bottom of
the next). The wrapper reshapes (free) x to [M, Kp/v, v] and codes to [Kp/v, u, N], and
builds the lookup table.

*Lookup.* A gather from a table ref with an integer-array index, ``table_ref[index]``: the
Triton lowering turns an array indexer into a pointer gather, ``tl.load(table + index)``, as
Graphcore's ``mv_lut8`` does, and the small table stays in L1. (``jnp.take`` on a loaded
array does not lower: Triton has no gather op. A select tree would cost 2**bits - 1 selects
per element.) For bits ≤ 4 two consecutive codes, which are one 2·bits-bit field of the
stream, index a pair table of 2**(2·bits) (value, value) entries (≤ 2 KiB, FLUTE's and
Graphcore's trick) and one 8-byte gather plus a free ``tt.split`` decodes both: half the
gathers and half the shift-and-mask work per weight. Wider codes use the codebook itself.

*Two variants*, chosen by M (or `variant`); grid (M tiles, N tiles, split_k), each program
looping over its share of the K tiles with `lax.fori_loop` (a share of one tile is gemlite's
loop-free GEMV: many small programs):

- ``"gemv"`` (M ≤ 8, memory-bound decode): no dot. Per tile, partial[m, q, n] =
  Σ_p x[m, q·v + p] · codebook[code p of unit q] in float32 FMAs, one position p at a time
  (`_decode`), so the sum over p stays in each thread's registers; it is multiplied by the
  scale once per unit (1/v multiplies per weight) into a [block_m, units, block_n]
  accumulator that is reduced over units only once, after the K loop.
- ``"gemm"``: decodes the whole tile at once (`_decode_tile`: every position p of every unit,
  [v, units, block_n], by broadcast shifts), scales it, casts it to the activation dtype and
  reshapes it to [block_k, block_n] in position-major row order; the activation tile
  [block_m, units, v] is transposed to the same order, so each K tile is one
  ``jnp.dot(..., preferred_element_type=float32)`` of depth block_k. bfloat16 activations use
  bf16 tensor-core dots; float32 activations give an IEEE float32 dot (no TF32), exact but
  slow. Triton's dot needs every dimension ≥ 16.

The decoding (`_extract`, `_decode`, `_decode_tile`) is separate from the loads and the
accumulation, so another GPU lowering (Mosaic GPU has no gather) can replace the lookup alone.

*Memory traffic.* The codes and scales are streamed once: they are loaded with
``eviction_policy="evict_first"`` so they do not push the activations and the lookup table
(reused by every program) out of L2 and L1; the activations are loaded ``"evict_last"``.

*Split-K*, two ways (`BlockSizes.split`). With split_k = S > 1 each program sums a contiguous
1/S of the K tiles. ``"slices"``: into its own slice of a float32 [S, M, N] output that the
wrapper adds (deterministic; S·M·N floats written and read again). ``"atomic"``: by float32
atomic adds into one zeroed [M, N] output (gemlite's reduction; the order of the additions,
and so the last bits of the result, vary from run to run). Interpret mode has no masked
atomics, so ``"atomic"`` needs block_m | M and block_n | N.

*Boundaries.* Nothing is padded: M, N and a K tail not covered by whole tiles are handled with
masked loads (other=0) and masked stores, so a call never copies the weight. Triton needs every
loaded tensor's size to be a power of two, so block_m, block_n and the units per K tile
(block_k / v) are powers of two, and B must be a power of two ≥ 32 (a tile then holds whole
scale blocks or lies inside one).

Verification
------------
Written without a GPU. Checked here: correctness against a float32 dequantise-and-dot reference
in interpret mode (the tests; on a GPU they run the compiled kernel), and lowering to a Triton
module with ``jax.export(..., platforms=["cuda"])`` for both variants and bits 1 to 8. That
lowering is Python code in jax and rejects what Triton cannot express (a ``jnp.take`` gather
fails there; interpret mode accepts it). Not checked: Triton's compilation of the module to
PTX (done by XLA on a GPU: register and shared-memory limits, layout conversions), runtime
behaviour and speed. `default_block_sizes` is reasoned; the block sizes the kernel uses for a
shape come from `jaxquant.kernels.gpu_tuning`, which holds what `benchmarks/gpu_sweep.sh`
measured fastest on a GPU.

Speed budget (H200, M = 1, 4-bit): streaming 4.5 bits per weight at 4.8 TB/s needs about 33
weights per clock per SM, against 64 integer-ALU lanes and 32 L1 load lanes per SM. So a
weight may cost under two integer ops and one L1 gather. With pairs it costs half a gather and
one shift-and-mask per pair, plus address arithmetic; whether Triton's code stays within that
budget is unmeasured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from numbers import Integral

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.kernels import gpu_tuning

__all__ = ["SPLITS", "BlockSizes", "GEMV_MAX_M", "VARIANTS", "chosen_block_sizes",
           "default_block_sizes", "qmatmul_pallas_gpu", "validate_block_sizes"]

VARIANTS = ("gemv", "gemm")
SPLITS = ("slices", "atomic")
GEMV_MAX_M = 8
"""Largest M for which `qmatmul_pallas_gpu` picks the GEMV variant by default."""
_ACTIVATION_DTYPES = ("float32", "bfloat16")
# A default grid aims at about this many programs (two per SM of a 132-SM H100/H200) through
# split-K, keeping at least _MIN_TRIPS K tiles per program so that Triton's pipelining has a loop.
_TARGET_PROGRAMS = 256
_MIN_TRIPS = 4
# Up to this many bits, codes are decoded in pairs (a 2**(2·bits)-entry pair table).
_PAIR_MAX_BITS = 4
_GEMM_TILE_BYTES = 65536


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling and launch parameters of one kernel call.

  Attributes:
    block_m: activation rows per program (a power of two; ≥ 16 for the GEMM).
    block_n: output columns per program (a power of two; ≥ 16 for the GEMM).
    block_k: K rows per loop step (a power of two, a multiple of the codes per unit v, and
      ≥ 16 for the GEMM).
    split_k: programs that share one output tile, each summing a contiguous part of K.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages of the K loop.
    split: how the split_k partial sums meet: ``"slices"`` (a second pass) or ``"atomic"``.
  """

  block_m: int
  block_n: int
  block_k: int
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  split: str = "slices"


def _unit(bits: int) -> tuple[int, int]:
  """(v, u): codes per unit and words per unit; a unit is the smallest whole-word run of codes."""
  g = math.gcd(bits, 32)
  return 32 // g, bits // g


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def default_block_sizes(variant: str, m: int, k: int, n: int, bits: int,
                        dtype=jnp.bfloat16) -> BlockSizes:
  """Untuned default `BlockSizes` for `variant` on x[m, k] @ W[k, n] with `bits`-bit codes.

  `dtype` is the activations' (bfloat16 or float32): the GEMM's decoded tile has that dtype.
  """
  v, _ = _unit(bits)
  if variant == "gemv":
    block_m = min(_next_pow2(m), GEMV_MAX_M)
    block_n = max(32, 128 // block_m)
    # About 2048 float32 partial sums (block_m · block_k/v · block_n) per program, i.e.
    # 16 per thread of 4 warps for each of the accumulator, the partial sums and the words.
    units = max(1, 2048 // (block_m * block_n))
    block_k = max(v, min(units * v, 512, _next_pow2(k)))
  elif variant == "gemm":
    block_m = min(64, max(16, _next_pow2(m)))
    block_k = max(16, v, min(256, _next_pow2(k)))
    # The decoded weight tile (block_k × block_n in the activations' dtype) is staged in shared
    # memory for the dot: at most _GEMM_TILE_BYTES keeps a program inside the 227 KiB of an
    # H100/H200 SM (on an H200, a 256 KiB tile asked for 562 KiB, a 128 KiB one for 228 KiB).
    tile_n = _GEMM_TILE_BYTES // (block_k * jnp.dtype(dtype).itemsize)
    block_n = max(16, min(128, _next_pow2(n), tile_n))
  else:
    raise ValueError(f"{variant=} must be one of {VARIANTS}")
  tiles = pl.cdiv(m, block_m) * pl.cdiv(n, block_n)
  trips = pl.cdiv(k, block_k)
  split_k = 1
  while tiles * split_k * 2 <= _TARGET_PROGRAMS and trips // (split_k * 2) >= _MIN_TRIPS:
    split_k *= 2
  return BlockSizes(block_m, block_n, block_k, split_k)


def _and_masks(shape, *masks):
  """The conjunction of the masks that are not None, broadcast to `shape` (None if all are)."""
  present = [mask for mask in masks if mask is not None]
  if not present:
    return None
  return jnp.broadcast_to(functools.reduce(jnp.logical_and, present), shape)


def _load(ref, mask, eviction: str | None = None):
  """`ref[...]`, with the elements outside `mask` read as zero (never touching memory) and
  Triton's cache `eviction` policy (``"evict_first"``, ``"evict_last"``) if given."""
  if mask is None and eviction is None:
    return ref[...]
  return pltriton.load(ref, mask=mask, other=None if mask is None else 0,
                       eviction_policy=eviction)


def _lookup(bits: int) -> int:
  """Codes decoded per table lookup: pairs while the pair table is small (≤ 2 KiB), else 1."""
  return 2 if bits <= _PAIR_MAX_BITS else 1


def _lookup_table(codebook: jax.Array, bits: int) -> jax.Array:
  """The flat float32 table the kernel gathers from.

  For single lookups the codebook itself; for pairs, entry c = c₀ | c₁ << bits holds
  (codebook[c₀], codebook[c₁]) at [2c, 2c + 1], so two consecutive codes of the bit stream,
  read as one 2·bits-bit field, decode with one 8-byte gather, and a single code c (c₁ = 0)
  is at [2c].
  """
  if _lookup(bits) == 1:
    return codebook
  index = jnp.arange(2 ** (2 * bits), dtype=jnp.int32)
  low = codebook[jnp.bitwise_and(index, 2**bits - 1)]
  high = codebook[jnp.right_shift(index, bits)]
  return jnp.stack([low, high], axis=-1).reshape(-1)


def _extract(words: list[jax.Array], start: int, width: int) -> jax.Array:
  """Bits [start, start + width) of each unit's bit stream (uint32): static shifts and masks."""
  word, offset = divmod(start, 32)
  field = words[word]
  if offset:
    field = jnp.right_shift(field, jnp.uint32(offset))
  if offset + width > 32:  # straddles into the next word
    field = jnp.bitwise_or(field, jnp.left_shift(words[word + 1], jnp.uint32(32 - offset)))
  if offset + width != 32:
    field = jnp.bitwise_and(field, jnp.uint32((1 << width) - 1))
  return field


def _decode(table_ref, words: list[jax.Array], first: int, bits: int) -> list[jax.Array]:
  """Codebook values of codes `first`, … (one lookup's worth) of every unit: [units, block_n]."""
  lookup = _lookup(bits)
  field = _extract(words, first * bits, lookup * bits).astype(jnp.int32)
  if lookup == 1:
    return [table_ref[field]]
  pair = table_ref[2 * field[:, :, None] + jnp.arange(2, dtype=jnp.int32)[None, None, :]]
  return list(jnp.unstack(pair, axis=2))  # Triton: one tt.split


def _decode_tile(table_ref, words: list[jax.Array], bits: int) -> jax.Array:
  """Codebook values of every code of every unit, position-major: [v, units, block_n].

  Code p of a unit starts at bit p·bits, in word ⌊p·bits/32⌋ at offset p·bits mod 32; the
  shifts are a [v, 1, 1] vector, so all v positions decode in one broadcast, and a word of
  each position is chosen by selects (none when a unit is one word). Single lookups: a pair
  table (`_lookup_table`) holds code c at entry 2c.
  """
  v, u = _unit(bits)
  start = jnp.arange(v, dtype=jnp.uint32)[:, None, None] * jnp.uint32(bits)
  word, offset = start // jnp.uint32(32), start % jnp.uint32(32)
  shape = (v,) + words[0].shape

  def word_at(index):  # words[index] of every position; zero past the unit's last word
    picked = jnp.zeros(shape, jnp.uint32)
    for w in range(u):
      picked = jnp.where(index == jnp.uint32(w), words[w][None], picked)
    return picked

  field = jnp.right_shift(word_at(word), offset)
  if u > 1:  # a code may straddle into the next word (a shift by 32 would be undefined)
    high = jnp.left_shift(word_at(word + jnp.uint32(1)),
                          jnp.bitwise_and(jnp.uint32(32) - offset, jnp.uint32(31)))
    field = jnp.bitwise_or(field, jnp.where(offset == jnp.uint32(0), jnp.uint32(0), high))
  field = jnp.bitwise_and(field, jnp.uint32((1 << bits) - 1)).astype(jnp.int32)
  return table_ref[field * _lookup(bits)]


def _qmatmul_kernel(x_ref, codes_ref, scales_ref, table_ref, *refs, variant, bits,
                    block_size, sizes, trips, mask_m, mask_n, mask_k):
  """One (M tile, N tile, K split) program: y_tile = Σ over its K tiles of x_tile @ W_tile.

  x_ref: [M, Kp/v, v]; codes_ref: [Kp/v, u, N] uint32; scales_ref: [Kp/B, N] float32 or bfloat16;
  table_ref: `_lookup_table`; refs[-1], the output: [split_k, M, N] float32 (``"slices"``) or a
  zeroed [M, N] float32 it aliases (``"atomic"``).
  """
  o_ref = refs[-1]
  v, u = _unit(bits)
  block_m, block_n, block_k = sizes.block_m, sizes.block_n, sizes.block_k
  units = block_k // v  # units per K tile
  # Scale blocks per K tile and units per scale block, when a tile holds whole blocks;
  # else the tile lies inside one block.
  blocks = block_k // block_size if block_k > block_size else 1
  per_block = block_size // v if block_k > block_size else units
  m, n = o_ref.shape[-2:]
  total_units, total_blocks = x_ref.shape[1], scales_ref.shape[0]
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(i * block_m, block_m)
  cols = pl.ds(j * block_n, block_n)
  m_ok = (i * block_m + jnp.arange(block_m) < m)[:, None] if mask_m else None
  n_ok = (j * block_n + jnp.arange(block_n) < n)[None, :] if mask_n else None

  def step(trip, acc):
    t = s * trips + trip  # K tile index
    q0 = t * units
    unit_slice = pl.ds(q0, units)
    q_ok = q0 + jnp.arange(units) < total_units if mask_k else None
    if block_k > block_size:
      b0 = t * blocks
    else:
      b0 = lax.div(t, jnp.int32(block_size // block_k))
    b_ok = (b0 + jnp.arange(blocks) < total_blocks)[:, None] if mask_k else None
    scale = _load(scales_ref.at[pl.ds(b0, blocks), cols],
                  _and_masks((blocks, block_n), b_ok, n_ok), "evict_first").astype(jnp.float32)
    unit_scale = jnp.broadcast_to(scale[:, None, :], (blocks, per_block, block_n))
    unit_scale = unit_scale.reshape(units, block_n)  # the scale of every unit
    words = [
        _load(codes_ref.at[unit_slice, jnp.int32(w), cols],
              _and_masks((units, block_n), None if q_ok is None else q_ok[:, None], n_ok),
              "evict_first")
        for w in range(u)
    ]
    if variant == "gemm":
      w_tile = (_decode_tile(table_ref, words, bits) * unit_scale[None])
      x_ok = _and_masks((block_m, units, v), None if m_ok is None else m_ok[:, :, None],
                        None if q_ok is None else q_ok[None, :, None])
      x_tile = _load(x_ref.at[rows, unit_slice, :], x_ok, "evict_last")
      # Both in position-major order: K row q·v + p of the tile is row p·units + q.
      x_tile = jnp.transpose(x_tile, (0, 2, 1)).reshape(block_m, block_k)
      w_tile = w_tile.astype(x_tile.dtype).reshape(block_k, block_n)
      # HIGHEST: float32 activations get an IEEE float32 dot, not Triton's default TF32.
      return acc + jnp.dot(x_tile, w_tile, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
    x_ok = _and_masks((block_m, units), m_ok, None if q_ok is None else q_ok[None, :])
    partial = None
    for first in range(0, v, _lookup(bits)):
      for p, values in enumerate(_decode(table_ref, words, first, bits), start=first):
        x_p = _load(x_ref.at[rows, unit_slice, jnp.int32(p)], x_ok, "evict_last")  # x[rows, p::v]
        term = x_p.astype(jnp.float32)[:, :, None] * values[None]
        partial = term if partial is None else partial + term
    return acc + partial * unit_scale[None]  # scale once per unit; reduce over units later

  if variant == "gemv":
    acc = lax.fori_loop(0, trips, step, jnp.zeros((block_m, units, block_n), jnp.float32))
    acc = jnp.sum(acc, axis=1)
  else:
    acc = lax.fori_loop(0, trips, step, jnp.zeros((block_m, block_n), jnp.float32))
  if sizes.split == "atomic":  # validate_block_sizes: no M or N mask
    pltriton.atomic_add(o_ref, (rows, cols), acc)
    return
  o_ok = _and_masks((block_m, block_n), m_ok, n_ok)
  if o_ok is None:
    o_ref[s, rows, cols] = acc
  else:
    pltriton.store(o_ref.at[s, rows, cols], acc, mask=o_ok)


def _validate(x, codes, scales, codebook, bits, block_size):
  """Raises TypeError/ValueError naming the argument when the inputs do not fit together."""
  if isinstance(bits, bool) or not isinstance(bits, Integral) or not 1 <= bits <= 8:
    raise ValueError(f"{bits=} must be an int in 1..8")
  if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 1:
    raise ValueError(f"{block_size=} must be a positive int")
  if block_size < 32 or not _is_pow2(block_size):
    raise NotImplementedError(f"{block_size=}: this kernel takes powers of two >= 32 (32, 64, 128)")
  if jnp.dtype(x.dtype).name not in _ACTIVATION_DTYPES:
    raise TypeError(f"x must be one of {_ACTIVATION_DTYPES}, got x.dtype={x.dtype}")
  if codes.dtype != jnp.uint32:
    raise TypeError(f"codes must be uint32 (packing layout bitstream-u32), got {codes.dtype=}")
  if scales.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"scales must be float32 or bfloat16 (decoded), got {scales.dtype=}")
  if codebook.dtype != jnp.float32:
    raise TypeError(f"codebook must be float32, got {codebook.dtype=}")
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"x must be [M, Kp] with M >= 1, got x.shape={tuple(x.shape)}")
  m, kp = x.shape
  if kp < 1 or kp % 32 or kp % block_size:
    raise ValueError(f"x.shape[1]={kp} (Kp) must be a positive multiple of 32 and of "
                     f"{block_size=}; zero-pad x and the weight along K")
  if codes.ndim != 2 or codes.shape[0] != kp * bits // 32 or codes.shape[1] < 1:
    raise ValueError(f"codes must be [Kp*bits/32, N] = [{kp * bits // 32}, N] for Kp={kp} and "
                     f"{bits=}, got codes.shape={tuple(codes.shape)}")
  n = codes.shape[1]
  if scales.shape != (kp // block_size, n):
    raise ValueError(f"scales must be [Kp/block_size, N] = {(kp // block_size, n)}, got "
                     f"scales.shape={tuple(scales.shape)}")
  if codebook.shape != (2**bits,):
    raise ValueError(f"codebook must have exactly 2**bits = {2**bits} entries (pad it), got "
                     f"codebook.shape={tuple(codebook.shape)}")


def validate_block_sizes(sizes: BlockSizes, variant: str, bits: int, m: int, n: int) -> None:
  """Raises TypeError/ValueError, naming the field, when `sizes` cannot tile x[m, ·] @ W[·, n]."""
  if not isinstance(sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes or None, got {type(sizes).__name__}")
  v, _ = _unit(bits)
  fields = dataclasses.asdict(sizes)
  for name in ("block_m", "block_n", "block_k"):
    if not _is_pow2(fields[name]):
      raise ValueError(f"block_sizes.{name}={fields[name]} must be a power of two")
  for name in ("split_k", "num_warps", "num_stages"):
    if fields[name] < 1:
      raise ValueError(f"block_sizes.{name}={fields[name]} must be >= 1")
  if sizes.split not in SPLITS:
    raise ValueError(f"block_sizes.split={sizes.split!r} must be one of {SPLITS}")
  minimum_k = max(16, v) if variant == "gemm" else v
  if sizes.block_k < minimum_k:
    raise ValueError(f"block_sizes.block_k={sizes.block_k} must be >= {minimum_k} for the "
                     f"{variant} variant at {bits=} ({v} codes per packed unit)")
  if variant == "gemm" and min(sizes.block_m, sizes.block_n) < 16:
    raise ValueError(f"block_sizes.block_m and block_n must be >= 16 for the gemm variant "
                     f"(Triton dot), got {sizes}")
  if sizes.split == "atomic" and (m % sizes.block_m or n % sizes.block_n):
    raise ValueError(f"block_sizes.split='atomic' needs block_m={sizes.block_m} to divide "
                     f"M={m} and block_n={sizes.block_n} to divide N={n} (no masked atomics)")


@functools.partial(
    jax.jit, static_argnames=("bits", "block_size", "block_sizes", "variant", "interpret"))
def qmatmul_pallas_gpu(x: jax.Array, codes: jax.Array, scales: jax.Array, codebook: jax.Array,
                       *, bits: int, block_size: int, block_sizes: BlockSizes | None = None,
                       variant: str | None = None, interpret: bool = False) -> jax.Array:
  """x @ W for a codebook-quantised W, as a Pallas Triton kernel: float32 [M, N].

  Args:
    x: activations [M, Kp], float32 or bfloat16, zero-padded along K by the caller.
    codes: uint32 [Kp·bits/32, N], codes packed along axis 0 (layout bitstream-u32 v1).
    scales: float32 or bfloat16 [Kp/block_size, N], decoded block scales (bfloat16 scales
      are read as stored, saving a decoding pass and half their bandwidth).
    codebook: float32 [2**bits], the format's values padded to 2**bits entries.
    bits: bits per code, 1..8.
    block_size: K rows per scale: a power of two ≥ 32 dividing Kp.
    block_sizes: tiling; default: the measured-fastest for this shape
      (`jaxquant.kernels.gpu_tuning`), else `default_block_sizes(variant, M, Kp, N, bits,
      x.dtype)`.
    variant: ``"gemv"`` or ``"gemm"``; default: the tuning table's for the shape, else GEMV
      for M ≤ `GEMV_MAX_M` and GEMM above.
    interpret: run the kernel in Pallas interpret mode (any backend; slow).

  Returns:
    y[M, N] = x @ W in float32, W[k, n] = codebook[code[k, n]] · scales[k // block_size, n].

  Raises:
    TypeError: an argument has the wrong dtype, or `block_sizes` is not a `BlockSizes`.
    ValueError: shapes that do not fit together, or unsupported `bits`, `block_size`,
      `variant` or `block_sizes`.
  """
  _validate(x, codes, scales, codebook, bits, block_size)
  m, kp = x.shape
  n = codes.shape[1]
  if variant is not None and variant not in VARIANTS:
    raise ValueError(f"{variant=} must be one of {VARIANTS} or None")
  if block_sizes is None:
    variant, sizes = chosen_block_sizes(variant, m, kp, n, bits, x.dtype)
  else:
    variant, sizes = variant or _default_variant(m), block_sizes
  validate_block_sizes(sizes, variant, bits, m, n)
  v, u = _unit(bits)
  trips = pl.cdiv(pl.cdiv(kp, sizes.block_k), sizes.split_k)
  kernel = functools.partial(
      _qmatmul_kernel, variant=variant, bits=bits, block_size=block_size, sizes=sizes,
      trips=trips, mask_m=m % sizes.block_m != 0, mask_n=n % sizes.block_n != 0,
      mask_k=trips * sizes.split_k * sizes.block_k != kp)
  operands = (x.reshape(m, kp // v, v), codes.reshape(kp // v, u, n), scales,
              _lookup_table(codebook, bits))
  atomic = sizes.split == "atomic"
  out_shape = (m, n) if atomic else (sizes.split_k, m, n)
  if atomic:  # the output is a zeroed buffer the programs add into
    operands += (jnp.zeros(out_shape, jnp.float32),)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
      grid=(pl.cdiv(m, sizes.block_m), pl.cdiv(n, sizes.block_n), sizes.split_k),
      input_output_aliases={4: 0} if atomic else {},
      compiler_params=pltriton.CompilerParams(
          num_warps=sizes.num_warps, num_stages=sizes.num_stages),
      interpret=interpret,
      name=f"jaxquant_qmatmul_{variant}",
  )(*operands)
  return out if atomic else jnp.sum(out, axis=0)


def _default_variant(m: int) -> str:
  return "gemv" if m <= GEMV_MAX_M else "gemm"


def chosen_block_sizes(variant, m, k, n, bits, dtype) -> tuple[str, BlockSizes]:
  """The variant and `BlockSizes` measured fastest for the shape if the tuning table has a
  configuration that tiles it, else `variant` (by M if None) with `default_block_sizes`."""
  tuned = gpu_tuning.block_sizes(variant, m, k, n, bits)
  if tuned is not None:
    tuned_variant, fields = tuned
    sizes = BlockSizes(**fields)
    try:
      validate_block_sizes(sizes, tuned_variant, bits, m, n)
      return tuned_variant, sizes
    except ValueError:
      pass  # e.g. an atomic split measured at another N: the default tiles every shape
  variant = variant or _default_variant(m)
  return variant, default_block_sizes(variant, m, k, n, bits, dtype)
