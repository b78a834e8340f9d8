"""`EntropyCodedArray`: a `QuantisedArray` with Huffman-coded codes, and `compress`/`decompress`.

This is storage, not the hot path: the coding runs in numpy on host arrays.
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
from jaxquant.entropy import framing, sizes, symbols
from jaxquant.entropy.huffman import HuffmanCode
from jaxquant.qarray import QuantisedArray

# The array leaves of a `QuantisedArray`; its other fields are static metadata.
_ARRAY_FIELDS = ("codes", "scales", "codebook", "scale_scales", "offsets", "offset_scales")


@dataclasses.dataclass(frozen=True, eq=False)
class EntropyCodedArray:
  """A `QuantisedArray` whose codes are Huffman-coded: compressed host storage.

  Orr et al. 2025 (§1; the `CompressedLUTFormat`): variable-length codes for the grid indices
  beat fixed-length ones. The codes, unpacked in logical order (C order over `shape`, the
  padding along `axis` excluded), are Huffman-coded with the code of their own histogram
  (`HuffmanCode.from_counts`) over the format's K values; scales, second-level scales and
  codebook are kept as stored. `decompress` rebuilds the packed, fixed-length `QuantisedArray`
  bit for bit, for `qmatmul`: compressed storage and fast inference coexist.

  The payload carries CRC-32 checks (`jaxquant.entropy.framing`: one per 8192-byte chunk of
  the Huffman stream, its length and one over the code lengths and shape), verified when the
  array is built and again before every decode: a flipped bit, a truncated or extended
  payload, or a payload paired with another code or shape raises instead of decoding to other
  codes. The checks cover what decodes the codes; the scales, codebook and other metadata
  are held as given, as in a `QuantisedArray`.

  Storage: 8·len(payload) + `LENGTH_FIELD_BITS`·K (the code table) + scale bits
  (+ second-level scale bits), the checks included: 32·⌈S/8192⌉ + 96 bits for an S-byte
  stream, about 1/2048 of its bits. K is read off the codebook (`symbols.alphabet_size`): its
  padding to 2**bits entries gets no table entry. The codebook is not counted, as in
  `QuantisedArray.storage_bits`.

  Attributes:
    payload: the codewords of the codes, MSB-first, zero-padded to whole bytes, then their
      checks (`jaxquant.entropy.framing`).
    code: the `HuffmanCode` over the format's K symbols.
    scales: the stored scales (numpy, their storage dtype).
    scale_scales: the stored second-level scales, or None.
    codebook: the float32 codebook, padded to 2**bits entries as in the `QuantisedArray`.
    metadata: the `QuantisedArray`'s static fields (shape, dtype, axis, block_size, bits,
      granularity, layout, layout_version), read-only.

  Raises:
    ValueError: the payload fails its checks (`jaxquant.entropy.framing.verified_stream`
      says how: truncated or extended, another code's or shape's, or which chunk is corrupt).
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
    framing.verified_stream(self.payload, self.code, self.shape)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.metadata["shape"]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def scale_bits(self) -> int:
    """Bits of the stored scales and second-level scales, as in `QuantisedArray.storage_bits`."""
    return sizes.scale_bits(self.scales, self.scale_scales)

  @property
  def storage_bits(self) -> int:
    """8·len(payload) (checks included) + code table + scale bits (+ second level); the
    codebook is not counted."""
    return sizes.huffman_bits(len(self.payload), self.code, self.scale_bits)

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
    return sizes.histogram_rate(symbols.symbol_counts(self._codes(), self.codebook),
                                self.scale_bits)

  def _codes(self) -> np.ndarray:
    """The logical codes, decoded once the payload passes its checks."""
    stream = framing.verified_stream(self.payload, self.code, self.shape)
    return self.code.decode(stream, self.size).reshape(self.shape)

  def decompress(self) -> QuantisedArray:
    """The `QuantisedArray` that was compressed, bit for bit (codes, scales, codebook, metadata).

    Raises:
      ValueError: the payload fails its checks (see `EntropyCodedArray`).
    """
    meta = self.metadata
    words = symbols.packed_words(self._codes(), self.codebook, meta["axis"], meta["block_size"],
                                 meta["bits"])
    scale_scales = None if self.scale_scales is None else jnp.asarray(self.scale_scales)
    return QuantisedArray(codes=words, scales=jnp.asarray(self.scales),
                          codebook=jnp.asarray(self.codebook), scale_scales=scale_scales, **meta)

  def __repr__(self):
    meta = self.metadata
    blocks = (meta["granularity"] if meta["granularity"] != "block"
              else f"block_size={meta['block_size']}")
    return (f"EntropyCodedArray(shape={self.shape}, bits={meta['bits']}, {blocks}, "
            f"axis={meta['axis']}, bits_per_param={self.bits_per_param:.4f}, "
            f"fixed_bits_per_param={self.fixed_bits_per_param:.4f})")


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
    ValueError: `q.codes` holds padding codes `quantise` would not write, or a code that
      points at the codebook's padding.
    NotImplementedError: `q` has block offsets (minmax scaling).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64) ** 3
    >>> q = jq.quantise(w, jq.QuantSpec("int4", block_size=64))
    >>> compressed = jq.entropy.compress(q)
    >>> compressed.bits_per_param, compressed.fixed_bits_per_param
    (3.443359375, 4.25)
    >>> bool(jnp.all(compressed.decompress().codes == q.codes))
    True
  """
  codes = symbols.checked_codes(q)
  if q.offsets is not None:
    raise NotImplementedError("compress entropy-codes symmetric arrays; q has block offsets "
                              "(minmax scaling)")
  code = HuffmanCode.from_counts(symbols.symbol_counts(codes, q.codebook))
  metadata = {field.name: getattr(q, field.name) for field in dataclasses.fields(q)
              if field.name not in _ARRAY_FIELDS}
  scale_scales = None if q.scale_scales is None else np.asarray(q.scale_scales)
  return EntropyCodedArray(framing.frame(code.encode(codes), code, q.shape), code,
                           np.asarray(q.scales), scale_scales, np.asarray(q.codebook), metadata)
