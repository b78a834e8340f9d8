"""`EntropyCodedArray`: a `QuantisedArray` with rANS-coded codes; `compress`, `coded_size`.

This is storage, not the hot path: the coding runs on host arrays (`jaxquant.entropy.rans`).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant import packing
from jaxquant.entropy import rans, sizes, symbols
from jaxquant.qarray import QuantisedArray

# The array leaves of a `QuantisedArray` kept as stored; its codes are coded, its other
# fields are static metadata.
STORED_FIELDS = ("scales", "codebook", "scale_scales", "offsets", "offset_scales")


@dataclasses.dataclass(frozen=True, eq=False)
class EntropyCodedArray:
  """A `QuantisedArray` whose codes are rANS-coded: compressed host storage.

  Orr et al. 2025 (§1; the `CompressedLUTFormat`): variable-length codes for the grid indices
  beat fixed-length ones. The codes, unpacked in logical order (C order over `shape`, the
  padding along `axis` excluded), are coded in independent checked chunks with the model of
  their own histogram over the format's K values (`jaxquant.entropy.rans`); scales,
  second-level scales, offsets and codebook are kept as stored. `decompress` rebuilds the
  packed, fixed-length `QuantisedArray` bit for bit, for `qmatmul`: compressed storage and
  fast inference coexist.

  Every chunk's CRC-32 is verified when the array is built and again when it is decoded: a
  flipped bit, a truncated or moved chunk, or a stream paired with another model or length
  raises instead of decoding to other codes. The checks cover what decodes the codes; the
  scales, codebook and other metadata are held as given, as in a `QuantisedArray`.

  Storage: `stream.storage_bits` (words, chunk end offsets, CRCs, frequency table) + the bits
  of the stored scales, second-level scales and offsets. The codebook is not counted, as in
  `QuantisedArray.storage_bits`; K is read off it (`symbols.alphabet_size`).

  Attributes:
    stream: the `jaxquant.entropy.rans.CodedStream` of the codes.
    scales, scale_scales, offsets, offset_scales: as stored in the `QuantisedArray` (numpy,
      their storage dtypes; None when absent).
    codebook: the float32 codebook, padded to 2**bits entries as in the `QuantisedArray`.
    metadata: the `QuantisedArray`'s static fields (shape, dtype, axis, block_size, bits,
      granularity, layout, layout_version, scale_group), read-only.

  Raises:
    ValueError: the stream's length or alphabet disagrees with the shape or codebook, or a
      chunk fails its check.
  """

  stream: rans.CodedStream
  scales: np.ndarray
  codebook: np.ndarray
  metadata: Mapping[str, Any]
  scale_scales: np.ndarray | None = None
  offsets: np.ndarray | None = None
  offset_scales: np.ndarray | None = None

  def __post_init__(self):
    for name in STORED_FIELDS:
      leaf = getattr(self, name)
      if leaf is not None:
        leaf = np.array(leaf)  # a private copy, frozen like the dataclass
        leaf.setflags(write=False)
        object.__setattr__(self, name, leaf)
    object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))
    if not isinstance(self.stream, rans.CodedStream):
      raise TypeError(f"stream must be a CodedStream, got {type(self.stream).__name__}")
    n_symbols = symbols.alphabet_size(self.codebook)
    if self.stream.size != self.size or self.stream.n_symbols != n_symbols:
      raise ValueError(f"the stream holds {self.stream.size} codes over {self.stream.n_symbols} "
                       f"symbols, but the array has shape {self.shape} ({self.size} codes) "
                       f"and its codebook {n_symbols} values")
    corrupt = self.stream.corrupt_chunks()
    if corrupt:
      raise rans.corruption(self.stream, corrupt)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.metadata["shape"])

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def scale_bits(self) -> int:
    """Bits of the stored scales, second-level scales and offsets."""
    return sizes.scale_bits(self.scales, self.scale_scales, self.offsets, self.offset_scales)

  @property
  def storage_bits(self) -> int:
    """The coded stream's bits (checks and table included) + the scale bits; the codebook is
    not counted."""
    return self.stream.storage_bits + self.scale_bits

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
    padded = symbols.padded_length(n, self.metadata["block_size"])
    words = self.size // n * packing.packed_length(padded, self.metadata["bits"])
    return (32 * words + self.scale_bits) / self.size

  @property
  def ideal_bits_per_param(self) -> float:
    """(-Σ log2 p̂(cᵢ) + S)/N: the ideal coder's rate with the same scales (decodes the codes)."""
    return sizes.histogram_rate(symbols.symbol_counts(self.codes(), self.codebook),
                                self.scale_bits)

  def codes(self, threads: int | None = None) -> np.ndarray:
    """The logical codes (shape `shape`), decoded once every chunk checks."""
    return rans.decode(self.stream, threads=threads).reshape(self.shape)

  def decompress(self, threads: int | None = None) -> QuantisedArray:
    """The `QuantisedArray` that was compressed, bit for bit (codes, scales, codebook, metadata).

    Args:
      threads: decoding threads (default: the CPUs this process may use).

    Raises:
      ValueError: a chunk fails its check (see `EntropyCodedArray`).
    """
    meta = self.metadata
    words = symbols.packed_words(self.codes(threads), self.codebook, meta["axis"],
                                 meta["block_size"], meta["bits"])
    stored = {name: None if getattr(self, name) is None else jnp.asarray(getattr(self, name))
              for name in STORED_FIELDS}
    return QuantisedArray(codes=words, **stored, **meta)

  def __repr__(self):
    meta = self.metadata
    blocks = (meta["granularity"] if meta["granularity"] != "block"
              else f"block_size={meta['block_size']}")
    return (f"EntropyCodedArray(shape={self.shape}, bits={meta['bits']}, {blocks}, "
            f"axis={meta['axis']}, bits_per_param={self.bits_per_param:.4f}, "
            f"fixed_bits_per_param={self.fixed_bits_per_param:.4f})")


def compress(q: QuantisedArray, *, chunk_size: int = rans.CHUNK_SIZE,
             precision: int = rans.PRECISION, threads: int | None = None) -> EntropyCodedArray:
  """rANS-codes the codes of a `QuantisedArray` (any granularity, axis and scaling).

  Orr et al. 2025 (§1): an entropy coder with the model p of the codes' histogram spends about
  -Σᵢ log2 p(cᵢ) bits on N codes, their empirical entropy; rANS does so to within the
  rounding of p to multiples of 2^-precision and a few bytes per chunk
  (`jaxquant.entropy.rans`); see `EntropyCodedArray`.

  Args:
    q: the quantised array, with concrete leaves.
    chunk_size: codes per independently decodable chunk.
    precision: bits of the model's probabilities, 1..15.
    threads: coding threads (default: the CPUs this process may use).

  Returns:
    The `EntropyCodedArray`; its `decompress()` is bit-identical to `q`.

  Raises:
    TypeError: `q` is not a `QuantisedArray`.
    ValueError: `q.codes` holds padding codes `quantise` would not write, or a code that
      points at the codebook's padding.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64) ** 3
    >>> q = jq.quantise(w, jq.QuantSpec("int4", block_size=64))
    >>> compressed = jq.entropy.compress(q)
    >>> round(compressed.ideal_bits_per_param, 3), round(compressed.bits_per_param, 3)
    (3.345, 3.445)
    >>> bool(jnp.all(compressed.decompress().codes == q.codes))
    True
  """
  codes = symbols.checked_codes(q)
  symbols.symbol_counts(codes, q.codebook)  # refuses codes that point at the padding
  stream = rans.encode(codes, symbols.alphabet_size(q.codebook), chunk_size=chunk_size,
                       precision=precision, threads=threads)
  metadata = {field.name: getattr(q, field.name) for field in dataclasses.fields(q)
              if field.name not in STORED_FIELDS + ("codes",)}
  stored = {name: None if getattr(q, name) is None else np.asarray(getattr(q, name))
            for name in STORED_FIELDS}
  return EntropyCodedArray(stream=stream, metadata=metadata, **stored)


def coded_size(q: QuantisedArray) -> dict:
  """Bits per element of a quantised array under three codings of its codes.

  With N elements, S the bits of the stored scales, second-level scales and offsets, and c the
  codes: ideal = (-Σ log2 p̂(cᵢ) + S)/N with the +1-smoothed histogram p̂ over the format's
  values (`ideal_bits`; Orr et al. 2025, §1); rANS = `compress(q).bits_per_param`, the coded
  stream with its checks and table; fixed = the packed storage, `q.bits_per_param`. The
  codebook's padding to 2**bits entries is no symbol: it costs neither smoothing mass nor
  table entries.

  Args:
    q: a `QuantisedArray` (any granularity, axis and scaling).

  Returns:
    ``{"ideal_bits_per_param", "rans_bits_per_param", "fixed_bits_per_param"}``.

  Raises:
    TypeError: `q` is not a `QuantisedArray`.
    ValueError: `q.codes` holds padding codes `quantise` would not write, or a code that
      points at the codebook's padding.
  """
  compressed = compress(q)
  counts = symbols.symbol_counts(symbols.checked_codes(q), q.codebook)
  return {
      "ideal_bits_per_param": sizes.histogram_rate(counts, compressed.scale_bits),
      "rans_bits_per_param": compressed.bits_per_param,
      "fixed_bits_per_param": q.bits_per_param,
  }
