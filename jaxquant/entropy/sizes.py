"""Sizes in bits of quantised arrays whose codes are coded ideally, by Huffman or fixed-length.

With N elements, S the bits of the stored scales (second-level ones included) and c the codes
over the format's K values: ideal = (-Σ log2 p̂(cᵢ) + S)/N with the +1-smoothed histogram p̂
(`huffman.ideal_bits`), Huffman = (8·P + `LENGTH_FIELD_BITS`·K + S)/N with P the bytes of
the payload (the ⌈Σ length(cᵢ)/8⌉ bytes of codewords and their CRC-32 checks,
`framing.framed_length`), and fixed = the packed storage. The codebook is counted in none of
them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.entropy import framing, huffman, symbols
from jaxquant.qarray import QuantisedArray


def scale_bits(scales, scale_scales) -> int:
  """Bits stored for the scales and any second-level scales (None: there are none)."""
  leaves = (scales, scale_scales)
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize * 8 for leaf in leaves if leaf is not None)


def histogram_rate(counts: np.ndarray, n_scale_bits: int) -> float:
  """(-Σ log2 p̂(cᵢ) + S)/N from the histogram of N codes stored with S bits of scales."""
  return (huffman.histogram_bits(counts) + n_scale_bits) / int(np.sum(counts))


def huffman_bits(payload_bytes: int, code: huffman.HuffmanCode, n_scale_bits: int) -> int:
  """8·payload_bytes + the code table + S: the payload (codewords and checks), table and scales."""
  return 8 * payload_bytes + code.table_bits + n_scale_bits


def coded_size(q: QuantisedArray) -> dict:
  """Bits per element of a quantised array under three codings of its codes.

  With N elements, S the scale bits as stored (second-level ones included) and c the codes:
  ideal = (-Σ log2 p̂(cᵢ) + S)/N with the +1-smoothed histogram p̂ over the format's values
  (`ideal_bits`; Orr et al. 2025, §1); Huffman = `compress(q).bits_per_param` =
  (8·P + table + S)/N, with P = `framing.framed_length`(⌈Σ length(cᵢ)/8⌉) the bytes of the
  codewords and their CRC-32 checks; fixed = the packed storage, `q.bits_per_param`.
  The codebook's padding to 2**bits entries is no symbol: it costs neither smoothing mass
  nor table entries.

  Args:
    q: a `QuantisedArray` (any granularity and axis).

  Returns:
    ``{"ideal_bits_per_param", "huffman_bits_per_param", "fixed_bits_per_param"}``.

  Raises:
    TypeError: `q` is not a `QuantisedArray`.
    ValueError: `q.codes` holds padding codes `quantise` would not write, or a code that
      points at the codebook's padding.
  """
  counts = symbols.symbol_counts(symbols.checked_codes(q), q.codebook)
  code = huffman.HuffmanCode.from_counts(counts)
  stored = scale_bits(q.scales, q.scale_scales)
  return {
      "ideal_bits_per_param": histogram_rate(counts, stored),
      "huffman_bits_per_param": huffman_bits(
          framing.framed_length(-(-int(counts @ code.lengths) // 8)), code, stored) / q.size,
      "fixed_bits_per_param": q.bits_per_param,
  }
