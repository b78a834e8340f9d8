"""Entropy-coded storage of quantised codes: ideal code lengths, Huffman coding, and the
entropy-constrained uniform grid (Orr et al. 2025, §1 and the `CompressedLUTFormat`).

At high resolution a uniform grid of step Δ followed by an ideal entropy coder spends
b ≈ h(X) - log2 Δ bits per element for a mean squared error Δ²/12, so for unit-RMS data
R·2^b → 2^h/√12: √(πe/6) ≈ 1.193 for a Normal, e/√6 ≈ 1.110 for a Laplace and ≈ 1.138 for a
Student-t with ν = 5, against 1.649, 2.121 and 2.565 for the best fixed-length codebooks.

`compress` Huffman-codes the codes of any `QuantisedArray` into an `EntropyCodedArray`, whose
`decompress` gives the fixed-length `QuantisedArray` back, bit for bit, for `qmatmul`; `fit_grid`
finds the grid (per tensor or per block) that meets a bits-per-element target, for rms scaling
by a search over the grid step that clips the largest values when that pays.

This is storage, not the hot path: the coding runs in numpy on host arrays.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import packing
from jaxquant import scaling as scaling_lib
from jaxquant.formats import Format, lut_format, uniform_grid
from jaxquant.qarray import QuantisedArray, QuantSpec, nearest_codes, quantise

# Code lengths are stored as 5-bit fields, so no codeword may be longer than 31 bits.
LENGTH_FIELD_BITS = 5
MAX_CODE_LENGTH = 2**LENGTH_FIELD_BITS - 1
# A grid has at most 255 points: odd (zero exact) and within the 256-code limit.
MAX_HALF_N = 127
_FIT_SCALINGS = ("rms", "absmax")


def _check_codes(codes, n_symbols: int, name: str = "codes") -> np.ndarray:
  """`codes` as a flat int64 array, or raises naming the argument if any is out of range."""
  codes = np.asarray(codes).reshape(-1)
  if codes.size and not np.issubdtype(codes.dtype, np.integer):
    raise TypeError(f"{name} must be integers, not {codes.dtype}")
  codes = codes.astype(np.int64)
  if codes.size and (codes.min() < 0 or codes.max() >= n_symbols):
    raise ValueError(f"{name} must lie in 0..{n_symbols - 1}; got {codes.min()}..{codes.max()}")
  return codes


def ideal_bits(codes, n_symbols: int) -> float:
  """Total bits of `codes` under an ideal coder with the +1-smoothed histogram model.

  With N codes and c(s) occurrences of symbol s, p̂(s) = (c(s) + 1) / (N + n_symbols) and the
  cost is -Σᵢ log2 p̂(codeᵢ) = -Σₛ c(s) log2 p̂(s). The model itself is not counted.

  Args:
    codes: integer symbols in 0..n_symbols-1, any shape.
    n_symbols: alphabet size, ≥ 1.

  Returns:
    The total number of bits (a float).
  """
  if isinstance(n_symbols, bool) or not isinstance(n_symbols, (int, np.integer)) or n_symbols < 1:
    raise ValueError(f"{n_symbols=} must be an int >= 1")
  codes = _check_codes(codes, int(n_symbols))
  return _histogram_bits(np.bincount(codes, minlength=n_symbols))


def _histogram_bits(counts: np.ndarray) -> float:
  """-Σₛ c(s) log2 p̂(s), p̂(s) = (c(s) + 1)/(N + K): `ideal_bits` from the K symbol counts c."""
  counts = np.asarray(counts, np.int64).astype(np.float64)
  p = (counts + 1.0) / (np.sum(counts) + counts.size)
  return float(-np.sum(counts * np.log2(p)))


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
  """Huffman code lengths (0 for absent symbols; 1 for a lone symbol).

  Ties are broken by creation order (leaves by symbol, then merged nodes), so the lengths
  are a deterministic function of `counts`.
  """
  lengths = np.zeros(counts.size, np.int64)
  present = np.flatnonzero(counts)
  if present.size == 1:
    lengths[present] = 1
    return lengths
  heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
  heapq.heapify(heap)
  order = counts.size
  while len(heap) > 1:
    count_a, _, symbols_a = heapq.heappop(heap)
    count_b, _, symbols_b = heapq.heappop(heap)
    merged = symbols_a + symbols_b
    lengths[merged] += 1
    heapq.heappush(heap, (count_a + count_b, order, merged))
    order += 1
  return lengths


@dataclasses.dataclass(frozen=True, eq=False)
class HuffmanCode:
  """A canonical Huffman code over the symbols 0..n_symbols-1.

  The code is fully described by one length per symbol (0: the symbol has no codeword), stored
  in `LENGTH_FIELD_BITS` bits each; codewords are assigned canonically, in order of
  (length, symbol), each the previous plus one, shifted left when the length grows. Lengths
  over `MAX_CODE_LENGTH` are avoided by halving the counts (rounding up) and rebuilding.

  Attributes:
    lengths: int64 code length per symbol.
  """

  lengths: np.ndarray

  @classmethod
  def from_counts(cls, counts) -> HuffmanCode:
    """The Huffman code for symbol counts (counts[s] ≥ 0, at least one positive)."""
    counts = np.asarray(counts).reshape(-1)
    if counts.size == 0 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
      raise ValueError("counts must be a non-empty array of non-negative integers")
    if not np.any(counts > 0):
      raise ValueError("counts must have at least one positive entry")
    counts = counts.astype(np.int64)
    lengths = _huffman_lengths(counts)
    while lengths.max() > MAX_CODE_LENGTH:
      counts = (counts + 1) // 2
      lengths = _huffman_lengths(counts)
    return cls(lengths)

  def __post_init__(self):
    lengths = np.asarray(self.lengths, np.int64).reshape(-1)
    if lengths.size == 0 or lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH:
      raise ValueError(f"lengths must be a non-empty array of ints in 0..{MAX_CODE_LENGTH}")
    used = lengths[lengths > 0]
    if used.size == 0 or np.sum(2.0 ** -used) > 1.0:
      raise ValueError("lengths must describe a prefix code: Σ 2^-length ≤ 1 over used symbols")
    lengths.setflags(write=False)
    object.__setattr__(self, "lengths", lengths)

  @property
  def n_symbols(self) -> int:
    return int(self.lengths.size)

  @property
  def table_bits(self) -> int:
    """Bits to store the code: one `LENGTH_FIELD_BITS`-bit length per symbol."""
    return LENGTH_FIELD_BITS * self.n_symbols

  def _canonical(self):
    """Symbols in canonical order, their codewords, and per length the first codeword and count."""
    order = np.lexsort((np.arange(self.n_symbols), self.lengths))
    order = order[self.lengths[order] > 0]
    ordered_lengths = self.lengths[order]
    codewords = np.zeros(self.n_symbols, np.uint64)
    code, previous = 0, int(ordered_lengths[0])
    for symbol, length in zip(order.tolist(), ordered_lengths.tolist()):
      code <<= length - previous
      codewords[symbol] = code
      code, previous = code + 1, length
    count = np.bincount(ordered_lengths, minlength=MAX_CODE_LENGTH + 1)
    first = np.zeros(MAX_CODE_LENGTH + 1, np.int64)
    for length in range(1, MAX_CODE_LENGTH + 1):
      first[length] = (first[length - 1] + count[length - 1]) << 1
    return order, codewords, first, count

  def encoded_bits(self, codes) -> int:
    """Σᵢ length(codeᵢ): the payload bits of `encode(codes)` before padding to whole bytes."""
    codes = _check_codes(codes, self.n_symbols)
    return int(np.sum(self.lengths[codes]))

  def encode(self, codes) -> bytes:
    """The codewords of `codes` (flattened), concatenated MSB-first and zero-padded to bytes.

    Raises:
      ValueError: a code is out of range or its symbol has no codeword.
    """
    codes = _check_codes(codes, self.n_symbols)
    lengths = self.lengths[codes]
    if np.any(lengths == 0):
      raise ValueError(f"codes contains symbols with no codeword: {np.unique(codes[lengths == 0])}")
    _, codewords, _, _ = self._canonical()
    words = codewords[codes]
    starts = np.cumsum(lengths) - lengths
    bits = np.zeros(int(np.sum(lengths)), np.uint8)
    # Bit j of each codeword (from the most significant), for every codeword at least j+1 long.
    for j in range(int(lengths.max(initial=0))):
      long_enough = lengths > j
      shift = (lengths[long_enough] - 1 - j).astype(np.uint64)
      bits[starts[long_enough] + j] = (words[long_enough] >> shift) & np.uint64(1)
    return np.packbits(bits).tobytes()

  def decode(self, data: bytes, n: int) -> np.ndarray:
    """The first `n` symbols encoded in `data` (int64).

    Canonical decoding, vectorised over bit positions: with W(p) the `L`-bit window starting
    at bit p (L the longest codeword), a codeword of length l starts at p iff l is the
    smallest length with ⌊W(p)/2^(L-l)⌋ < first(l) + count(l); its symbol is the
    (⌊W(p)/2^(L-l)⌋ - first(l))-th of that length. Only the chain p → p + l(p) from p = 0
    is then followed in Python.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"{n=} must be an int >= 0")
    if n == 0:
      return np.zeros(0, np.int64)
    order, _, first, count = self._canonical()
    longest = int(self.lengths.max())
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    positions = bits.size
    padded = np.concatenate([bits, np.zeros(longest, np.uint8)]).astype(np.uint64)
    window = np.zeros(positions, np.uint64)
    for j in range(longest):
      window = (window << np.uint64(1)) | padded[j:j + positions]
    length_at = np.zeros(positions, np.int64)
    rank_at = np.zeros(positions, np.int64)
    offset = np.cumsum(count) - count  # index into `order` of the first codeword of each length
    for length in range(longest, 0, -1):  # descending, so the shortest matching length wins
      if count[length] == 0:
        continue
      prefix = (window >> np.uint64(longest - length)).astype(np.int64)
      match = prefix < first[length] + count[length]
      length_at[match] = length
      rank_at[match] = offset[length] + prefix[match] - first[length]
    steps = length_at.tolist()
    starts = np.zeros(n, np.int64)
    p = 0
    for i in range(n):
      if p >= positions or steps[p] == 0:
        raise ValueError(f"data holds fewer than {n=} codewords")
      starts[i] = p
      p += steps[p]
    if p > positions:
      raise ValueError(f"data holds fewer than {n=} codewords")
    return order[rank_at[starts]].astype(np.int64)


def _scale_bits(scales, scale_scales) -> int:
  """Bits stored for the scales and any second-level scales (None: there are none)."""
  leaves = (scales, scale_scales)
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize * 8 for leaf in leaves if leaf is not None)


def _histogram_rate(counts: np.ndarray, scale_bits: int) -> float:
  """(-Σ log2 p̂(cᵢ) + S)/N from the histogram of N codes stored with S bits of scales."""
  return (_histogram_bits(counts) + scale_bits) / int(np.sum(counts))


def _ideal_bits_per_param(codes: np.ndarray, n_symbols: int, scale_bits: int) -> float:
  """(-Σ log2 p̂(cᵢ) + S)/N: the ideal coder's rate for N codes stored with S bits of scales."""
  return _histogram_rate(np.bincount(codes.reshape(-1), minlength=n_symbols), scale_bits)


def _padded_length(n: int, block_size: int) -> int:
  """Codes `quantise` packs along an axis of length n: whole blocks, then whole 32-code groups."""
  blocks = -(-n // block_size) * block_size
  return blocks + -blocks % packing.GROUP


# One compiled unpacking per shape and bit width (op by op, each new shape costs far more).
_unpack = jax.jit(packing.unpack, static_argnums=(1, 2))


def _logical_codes(q: QuantisedArray) -> np.ndarray:
  """The codes of `q` unpacked (int64, shape `q.shape`): the padding along `q.axis` dropped."""
  codes = np.asarray(_unpack(q.codes, q.bits, q.axis))
  return np.take(codes, np.arange(q.shape[q.axis]), axis=q.axis).astype(np.int64)


def _packed_words(codes: np.ndarray, codebook, axis: int, block_size: int, bits: int) -> jax.Array:
  """The uint32 words `quantise` stores for the logical `codes` (the inverse of `_logical_codes`).

  Along `axis`, the zero padding of the last block is rounded like any element, to the code
  nearest 0 (0/s is ±0 for every scale s); the codes are then zero-padded to whole groups of
  32 and packed (`jaxquant.packing`).
  """
  n = codes.shape[axis]
  blocks = -(-n // block_size) * block_size
  zero_code = int(nearest_codes(jnp.zeros((), jnp.float32), jnp.asarray(codebook, jnp.float32)))
  pad = [(0, 0)] * codes.ndim
  pad[axis] = (0, blocks - n)
  codes = np.pad(codes, pad, constant_values=zero_code)
  pad[axis] = (0, _padded_length(n, block_size) - blocks)
  return packing.pack(jnp.asarray(np.pad(codes, pad), jnp.uint32), bits, axis)


# The array leaves of a `QuantisedArray`; its other fields are static metadata.
_ARRAY_FIELDS = ("codes", "scales", "codebook", "scale_scales")


@dataclasses.dataclass(frozen=True, eq=False)
class EntropyCodedArray:
  """A `QuantisedArray` whose codes are Huffman-coded: compressed host storage.

  Orr et al. 2025 (§1; the `CompressedLUTFormat`): variable-length codes for the grid indices
  beat fixed-length ones. The codes, unpacked in logical order (C order over `shape`, the
  padding along `axis` excluded), are Huffman-coded with the code of their own histogram
  (`HuffmanCode.from_counts`); scales, second-level scales and codebook are kept as stored.
  `decompress` rebuilds the packed, fixed-length `QuantisedArray` bit for bit, for `qmatmul`:
  compressed storage and fast inference coexist.

  Storage: 8·len(payload) + `LENGTH_FIELD_BITS`·n_symbols (the code table) + scale bits
  (+ second-level scale bits). The codebook is not counted, as in
  `QuantisedArray.storage_bits`.

  Attributes:
    payload: the codewords of the codes, MSB-first, zero-padded to whole bytes.
    code: the `HuffmanCode` over the codebook's symbols.
    scales: the stored scales (numpy, their storage dtype).
    scale_scales: the stored second-level scales, or None.
    codebook: the float32 codebook.
    metadata: the `QuantisedArray`'s static fields (shape, dtype, axis, block_size, bits,
      scaling, granularity, format_name, layout, layout_version), read-only.
  """

  payload: bytes
  code: HuffmanCode
  scales: np.ndarray
  scale_scales: np.ndarray | None
  codebook: np.ndarray
  metadata: Mapping[str, Any]

  def __post_init__(self):
    for name in ("scales", "scale_scales", "codebook"):
      leaf = getattr(self, name)
      if leaf is not None:
        leaf = np.array(leaf)  # a private copy, frozen like the dataclass
        leaf.setflags(write=False)
        object.__setattr__(self, name, leaf)
    object.__setattr__(self, "payload", bytes(self.payload))
    object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))

  @property
  def shape(self) -> tuple[int, ...]:
    return self.metadata["shape"]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def scale_bits(self) -> int:
    """Bits of the stored scales and second-level scales, as in `QuantisedArray.storage_bits`."""
    return _scale_bits(self.scales, self.scale_scales)

  @property
  def storage_bits(self) -> int:
    """8·len(payload) + code table + scale bits (+ second level); the codebook is not counted."""
    return 8 * len(self.payload) + self.code.table_bits + self.scale_bits

  @property
  def bits_per_param(self) -> float:
    """Stored bits per logical element: `storage_bits` / size."""
    return self.storage_bits / self.size

  @property
  def fixed_bits_per_param(self) -> float:
    """`bits_per_param` of the decompressed `QuantisedArray`: its size in memory for `qmatmul`.

    Packed b-bit codes, ⌈whole blocks / 32⌉·b words per slice along `axis`, plus the scales.
    """
    n = self.shape[self.metadata["axis"]]
    padded = _padded_length(n, self.metadata["block_size"])
    words = self.size // n * packing.packed_length(padded, self.metadata["bits"])
    return (32 * words + self.scale_bits) / self.size

  @property
  def ideal_bits_per_param(self) -> float:
    """(-Σ log2 p̂(cᵢ) + S)/N: the ideal coder's rate with the same scales (decodes the codes)."""
    return _ideal_bits_per_param(self._codes(), self.codebook.size, self.scale_bits)

  def _codes(self) -> np.ndarray:
    return self.code.decode(self.payload, self.size).reshape(self.shape)

  def decompress(self) -> QuantisedArray:
    """The `QuantisedArray` that was compressed, bit for bit (codes, scales, codebook, metadata)."""
    meta = self.metadata
    words = _packed_words(self._codes(), self.codebook, meta["axis"], meta["block_size"],
                          meta["bits"])
    scale_scales = None if self.scale_scales is None else jnp.asarray(self.scale_scales)
    return QuantisedArray(codes=words, scales=jnp.asarray(self.scales),
                          codebook=jnp.asarray(self.codebook), scale_scales=scale_scales, **meta)

  def __repr__(self):
    meta = self.metadata
    blocks = (meta["granularity"] if meta["granularity"] != "block"
              else f"block_size={meta['block_size']}")
    return (f"EntropyCodedArray(shape={self.shape}, format={meta['format_name']!r}, {blocks}, "
            f"axis={meta['axis']}, bits_per_param={self.bits_per_param:.4f}, "
            f"fixed_bits_per_param={self.fixed_bits_per_param:.4f})")


def _compress(q: QuantisedArray) -> tuple[EntropyCodedArray, np.ndarray]:
  """`compress(q)` and the logical codes it encodes."""
  if not isinstance(q, QuantisedArray):
    raise TypeError(f"q must be a QuantisedArray, got {type(q).__name__}")
  codes = _logical_codes(q)
  rebuilt = _packed_words(codes, q.codebook, q.axis, q.block_size, q.bits)
  if not np.array_equal(np.asarray(rebuilt), np.asarray(q.codes)):
    raise ValueError("q.codes holds padding codes other than those quantise writes, so q "
                     "cannot be rebuilt exactly from its logical codes")
  code = HuffmanCode.from_counts(np.bincount(codes.reshape(-1), minlength=q.codebook.shape[0]))
  metadata = {field.name: getattr(q, field.name) for field in dataclasses.fields(q)
              if field.name not in _ARRAY_FIELDS}
  scale_scales = None if q.scale_scales is None else np.asarray(q.scale_scales)
  compressed = EntropyCodedArray(code.encode(codes), code, np.asarray(q.scales), scale_scales,
                                 np.asarray(q.codebook), metadata)
  return compressed, codes


def compress(q: QuantisedArray) -> EntropyCodedArray:
  """Huffman-codes the codes of a `QuantisedArray` (any granularity and axis).

  Orr et al. 2025 (§1): with the Huffman code of their histogram p, the N codes cᵢ cost
  Σᵢ length(cᵢ) < -Σᵢ log2 p(cᵢ) + N bits, their empirical entropy plus at most one bit per
  element; see `EntropyCodedArray`.

  Args:
    q: the quantised array, with concrete leaves.

  Returns:
    The `EntropyCodedArray`; its `decompress()` is bit-identical to `q`.

  Raises:
    TypeError: `q` is not a `QuantisedArray`.
    ValueError: `q.codes` holds padding codes `quantise` would not write.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64) ** 3
    >>> q = jq.quantise(w, jq.QuantSpec("int4", block_size=64))
    >>> compressed = jq.entropy.compress(q)
    >>> compressed.bits_per_param, compressed.fixed_bits_per_param
    (3.23046875, 4.25)
    >>> bool(jnp.all(compressed.decompress().codes == q.codes))
    True
  """
  return _compress(q)[0]


def coded_size(q: QuantisedArray) -> dict:
  """Bits per element of a quantised array under three codings of its codes.

  With N elements, S the scale bits as stored (second-level ones included) and c the codes:
  ideal = (-Σ log2 p̂(cᵢ) + S)/N with the +1-smoothed histogram p̂ (`ideal_bits`; Orr et al.
  2025, §1); Huffman = `compress(q).bits_per_param` = (8·⌈Σ length(cᵢ)/8⌉ + table + S)/N;
  fixed = the packed storage, `q.bits_per_param`.

  Args:
    q: a `QuantisedArray` (any granularity and axis).

  Returns:
    ``{"ideal_bits_per_param", "huffman_bits_per_param", "fixed_bits_per_param"}``.
  """
  compressed, codes = _compress(q)
  return {
      "ideal_bits_per_param": _ideal_bits_per_param(codes, compressed.codebook.size,
                                                    compressed.scale_bits),
      "huffman_bits_per_param": compressed.bits_per_param,
      "fixed_bits_per_param": compressed.fixed_bits_per_param,
  }


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

  y is the very quotient `quantise` rounds (an all-zero block, s = 0, is divided by 1), so the
  codes of y on any grid with the same scale reference as `spec.format` are those `quantise`
  gives x with that grid.
  """
  q = quantise(x, spec)
  scales = scaling_lib.decode_scales(q.scales, q.scale_scales)
  scales = jnp.repeat(jnp.where(scales == 0, 1.0, scales), q.block_size, axis=q.axis)
  scales = jax.lax.slice_in_dim(scales, 0, q.shape[q.axis], axis=q.axis)
  return (x / scales).reshape(-1), _scale_bits(q.scales, q.scale_scales)


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

  Equal to `_ideal_bits_per_param` of the codes `quantise` gives (`_grid_histogram`), without
  quantising, packing or unpacking.
  """
  codebook = np.asarray(values, np.float32)
  bounds = np.full(2 * MAX_HALF_N + 2, np.inf, np.float32)
  bounds[0] = -np.inf
  bounds[1:codebook.size] = (codebook[1:] + codebook[:-1]) / np.float32(2)
  half_n = codebook.size // 2
  counts = _grid_histogram(y, bounds, np.float32(values[-1] / half_n), np.int32(half_n))
  return _histogram_rate(np.asarray(counts)[:codebook.size], scale_bits)


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
             axis: int = -1, scale_dtype=None, clip: bool = False) -> tuple[Format, QuantSpec]:
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
  ``coded_size(quantise(x, spec))["ideal_bits_per_param"]`` ≤ `bits_per_param`.

  Args:
    x: the tensor (any shape, finite, not all zero).
    bits_per_param: target average bits per element, scales included (fractional allowed).
    scaling: ``"rms"`` or ``"absmax"``.
    block_size: an int (blocks along `axis`), ``"channel"`` or ``"tensor"``.
    axis: the axis blocks run along.
    scale_dtype: how scales are stored; default float32 per tensor, else bfloat16.
    clip: rms only: allow steps finer than amax/`MAX_HALF_N`, clipping the largest values.

  Returns:
    (format, spec) with ``spec = QuantSpec(format, block_size=block_size, scaling=scaling,
    scale_dtype=scale_dtype, axis=axis)``; for rms the format is the lookup table of the grid.

  Raises:
    ValueError: `bits_per_param` is outside the rates the grids reach (from 3 points, all
      codes 0 for rms, to 255 points or the rms rate's maximum), or `x`, `scaling`,
      `block_size`, `axis` or `scale_dtype` is invalid.
    RuntimeError: no grid the search accepted keeps its rate once quantised (an internal
      inconsistency between the histogram and `quantise`).
  """
  if scaling not in _FIT_SCALINGS:
    raise ValueError(f"{scaling=} must be one of {_FIT_SCALINGS}")
  x = jnp.asarray(np.asarray(x, np.float32))
  if x.size == 0 or not bool(jnp.all(jnp.isfinite(x))) or not bool(jnp.any(x)):
    raise ValueError("x must be a non-empty finite array that is not all zero")
  bits_per_param = float(bits_per_param)
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
    if _ideal_bits_per_param(_logical_codes(q), q.codebook.shape[0],
                             _scale_bits(q.scales, q.scale_scales)) <= bits_per_param:
      return spec.format, spec
  raise RuntimeError(f"no grid the search accepted keeps a rate ≤ {bits_per_param=} once "
                     "quantised: its histogram disagrees with quantise")
