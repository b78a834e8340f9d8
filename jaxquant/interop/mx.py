"""MXFP4 tensors stored as ``*_blocks`` and ``*_scales``, as openai's gpt-oss checkpoints ship
them, to and from packed `QuantisedArray`s of the ``mxfp4`` format.

The layout: ``blocks`` uint8 [..., G, 16] holds the 32 E2M1 codes of each of G blocks, two per
byte, the even element in the low nibble (E2M1 bit pattern: sign in bit 3, then exponent
and mantissa); ``scales`` uint8 [..., G] holds each block's E8M0 exponent byte e, the scale
being 2^(e − 127). The tensor is [..., G·32], w = 2^(e − 127)·E2M1(code).

The array is blocked along its last axis with B = 32 and E8M0 scales (`QuantSpec("mxfp4")`),
so `dequantise` gives the same values (±0 are one codepoint). jaxquant keeps the E8M0 byte 0
to mean a zero scale, so a scale byte 0 (2^-127) is refused rather than read as zero.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import packing
from jaxquant.formats import mx_format
from jaxquant.qarray import QuantisedArray, padded_codebook

__all__ = ["from_blocks", "to_blocks"]

_BLOCK = 32


def _e2m1_ranks() -> np.ndarray:
  """The index in the sorted mxfp4 codebook of each 4-bit E2M1 pattern (±0 both at zero)."""
  magnitude = np.arange(16) & 7
  zero = int(np.flatnonzero(mx_format("mxfp4").values == 0)[0])
  return np.where(np.arange(16) < 8, zero + magnitude, zero - magnitude).astype(np.uint32)


def from_blocks(blocks, scales) -> QuantisedArray:
  """The `QuantisedArray` [..., G·32] of MXFP4 ``blocks`` [..., G, 16] and ``scales`` [..., G].

  Raises:
    TypeError: `blocks` or `scales` is not uint8.
    ValueError: their shapes do not fit, or a scale byte is 0 (2^-127, which jaxquant reads
      as a zero scale).
  """
  blocks, scales = np.asarray(blocks), np.asarray(scales)
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise TypeError(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
  if blocks.ndim < 2 or blocks.shape[-1] != _BLOCK // 2 or scales.shape != blocks.shape[:-1]:
    raise ValueError(f"blocks must be [..., G, 16] and scales [..., G]; got blocks "
                     f"{blocks.shape} and scales {scales.shape}")
  if np.any(scales == 0):
    raise ValueError("a scale byte is 0 (2^-127); jaxquant reads E8M0 byte 0 as a zero scale")
  codes = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(scales.shape[:-1] + (-1,))
  codes = _e2m1_ranks()[codes]
  fmt = mx_format("mxfp4")
  return QuantisedArray(
      codes=packing.pack(jnp.asarray(codes), 4, axis=codes.ndim - 1),
      scales=jnp.asarray(scales.view(ml_dtypes.float8_e8m0fnu)),
      codebook=padded_codebook(jnp.asarray(fmt.values, jnp.float32), 4), scale_scales=None,
      shape=codes.shape, dtype=np.dtype(np.float32), axis=codes.ndim - 1, block_size=_BLOCK,
      bits=4, granularity="block")


def to_blocks(q: QuantisedArray) -> tuple[np.ndarray, np.ndarray]:
  """(blocks [..., G, 16], scales [..., G]) of an ``mxfp4`` array blocked along its last axis.

  Raises:
    ValueError: `q` is not 4-bit E2M1 codes in blocks of 32 along its last axis with E8M0
      scales.
  """
  fmt = mx_format("mxfp4")
  codebook = np.asarray(padded_codebook(jnp.asarray(fmt.values, jnp.float32), 4))
  if (q.bits != 4 or q.axis != q.ndim - 1 or q.block_size != _BLOCK
      or q.granularity != "block" or q.scales.dtype != jnp.float8_e8m0fnu
      or q.shape[-1] % _BLOCK or not np.array_equal(np.asarray(q.codebook), codebook)):
    raise ValueError(f"{q!r} is not MXFP4 blocked along its last axis; quantise with "
                     "QuantSpec('mxfp4', axis=-1)")
  ranks = _e2m1_ranks()
  pattern = np.zeros(16, np.uint8)
  pattern[ranks[::-1]] = np.arange(16, dtype=np.uint8)[::-1]  # zero gets +0's pattern, 0
  codes = pattern[np.asarray(packing.unpack(q.codes, 4, axis=q.axis))[..., :q.shape[-1]]]
  pairs = codes.reshape(q.shape[:-1] + (-1, _BLOCK // 2, 2))
  blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
  return blocks, np.asarray(q.scales).view(np.uint8)
