"""Entropy-coded storage of quantised codes: ideal code lengths, Huffman coding, and the
entropy-constrained uniform grid (Orr et al. 2025, §1 and the `CompressedLUTFormat`).

At high resolution a uniform grid of step Δ followed by an ideal entropy coder spends
b ≈ h(X) - log2 Δ bits per element for a mean squared error Δ²/12, so for unit-RMS data
R·2^b → 2^h/√12: √(πe/6) ≈ 1.193 for a Normal, e/√6 ≈ 1.110 for a Laplace and ≈ 1.138 for a
Student-t with ν = 5, against 1.649, 2.121 and 2.565 for the best fixed-length codebooks.

`compress` Huffman-codes the codes of any `QuantisedArray` into an `EntropyCodedArray`, whose
`decompress` gives the fixed-length `QuantisedArray` back, bit for bit, for `qmatmul`; `fit_grid`
finds the grid (per tensor or per block) that meets a bits-per-element target.

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
  counts = np.bincount(codes, minlength=n_symbols).astype(np.float64)
  p = (counts + 1.0) / (codes.size + n_symbols)
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


def _ideal_bits_per_param(codes: np.ndarray, n_symbols: int, scale_bits: int) -> float:
  """(-Σ log2 p̂(cᵢ) + S)/N: the ideal coder's rate for N codes stored with S bits of scales."""
  return (ideal_bits(codes, n_symbols) + scale_bits) / codes.size


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


def _grid_format(half_n: int, amax: float, scaling: str) -> Format:
  """The 2·half_n+1-point grid over ±amax in the units `scaling` maps the tensor onto."""
  if scaling == "absmax":
    return uniform_grid(2 * half_n + 1, 1.0)
  grid = uniform_grid(2 * half_n + 1, amax)
  return lut_format(grid.values, grid.bits, scaling="rms")


def _scaled_absmax(x: jax.Array, spec: QuantSpec) -> float:
  """max|x/s| over the tensor, s the scales `quantise(x, spec)` divides by, as stored.

  Unlike `fitting.scaled_values`, s is rounded to `spec.scale_dtype` first, so a grid spanning
  the result clips nothing. For a format whose scale reference is 1 (the rms grid's) and
  scales without double quantisation; an all-zero block (s = 0) gives 0, as `quantise`
  divides it by 1.
  """
  axis = spec.axis % x.ndim
  n = x.shape[axis]
  xb = scaling_lib.to_blocks(x, axis, spec.block_size if isinstance(spec.block_size, int) else n)
  statistic = scaling_lib.block_statistic(xb, spec.scaling, axis, n, spec.block_size == "tensor")
  stored = scaling_lib.encode_scales(statistic, spec.scale_dtype, double_quant=False,
                                     signed=False)
  scales = scaling_lib.decode_scales(*stored)
  return float(jnp.max(jnp.abs(xb) / jnp.where(scales == 0, 1.0, scales)))


def fit_grid(x, bits_per_param: float, *, scaling: str = "rms", block_size="tensor",
             axis: int = -1, scale_dtype=None) -> tuple[Format, QuantSpec]:
  """The odd uniform grid whose entropy-coded size best meets `bits_per_param` from below.

  Orr et al. 2025 (§4 item 8, the `CompressedLUTFormat`). Each block (`block_size` elements
  along `axis`, a channel, or the tensor) is scaled by its max|x| (``"absmax"``: the grid spans
  ±1) or its RMS (``"rms"``: the grid spans ±max|x/s| over the whole tensor, so nothing is
  clipped), and the grid has n = 2·half_n + 1 points (zero exact). The rate
  b(half_n) = (-Σ log2 p̂(cᵢ) + S)/N (ideal coder with the +1-smoothed histogram, S the bits of
  the stored scales: 32 for a float32 tensor scale, 16/B per element for bfloat16 block scales)
  grows with half_n; bisection over half_n in 1..`MAX_HALF_N` picks the largest with
  b(half_n) ≤ bits_per_param. The codes are those of `quantise(x, spec)`, so the achieved rate
  is exactly `coded_size(quantise(x, spec))["ideal_bits_per_param"]`.

  Args:
    x: the tensor (any shape, finite, not all zero).
    bits_per_param: target average bits per element, scales included (fractional allowed).
    scaling: ``"rms"`` or ``"absmax"``.
    block_size: an int (blocks along `axis`), ``"channel"`` or ``"tensor"``.
    axis: the axis blocks run along.
    scale_dtype: how scales are stored; default float32 per tensor, else bfloat16.

  Returns:
    (format, spec) with ``spec = QuantSpec(format, block_size=block_size, scaling=scaling,
    scale_dtype=scale_dtype, axis=axis)``.

  Raises:
    ValueError: `bits_per_param` is below the rate of 3 points or above that of 255 points,
      or `x`, `scaling`, `block_size`, `axis` or `scale_dtype` is invalid.
  """
  if scaling not in _FIT_SCALINGS:
    raise ValueError(f"{scaling=} must be one of {_FIT_SCALINGS}")
  x = jnp.asarray(np.asarray(x, np.float32))
  if x.size == 0 or not bool(jnp.all(jnp.isfinite(x))) or not bool(jnp.any(x)):
    raise ValueError("x must be a non-empty finite array that is not all zero")
  bits_per_param = float(bits_per_param)
  scale_dtype = scale_dtype or ("float32" if block_size == "tensor" else "bfloat16")
  probe = QuantSpec(_grid_format(1, 1.0, scaling), block_size=block_size, scaling=scaling,
                    scale_dtype=scale_dtype, axis=axis)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{axis=} is out of range for x of shape {tuple(x.shape)}")
  amax = _scaled_absmax(x, probe) if scaling == "rms" else 1.0

  def spec(half_n: int) -> QuantSpec:
    return dataclasses.replace(probe, format=_grid_format(half_n, amax, scaling))

  def rate(half_n: int) -> float:
    q = quantise(x, spec(half_n))
    return _ideal_bits_per_param(_logical_codes(q), 2 * half_n + 1,
                                 _scale_bits(q.scales, q.scale_scales))

  low_rate, high_rate = rate(1), rate(MAX_HALF_N)
  if not low_rate <= bits_per_param <= high_rate:
    raise ValueError(
        f"{bits_per_param=} is outside the {low_rate:.4f}..{high_rate:.4f} bits per element "
        f"that 3..{2 * MAX_HALF_N + 1} grid points reach for this tensor")
  low, high = 1, MAX_HALF_N  # invariant: rate(low) ≤ target; rate(high) > target unless high = low
  if high_rate <= bits_per_param:
    low = high
  while high - low > 1:
    middle = (low + high) // 2
    if rate(middle) <= bits_per_param:
      low = middle
    else:
      high = middle
  best = spec(low)
  return best.format, best
