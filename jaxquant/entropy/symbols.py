"""The codes of a `QuantisedArray` as a stream of symbols, and back to its packed words.

The symbols are the codes unpacked in logical order (C order over `shape`, the padding along
`axis` dropped); they take `alphabet_size(codebook)` values, one per value of the format.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import packing
from jaxquant.entropy import native
from jaxquant.qarray import QuantisedArray, nearest_codes


def alphabet_size(codebook) -> int:
  """K, the number of symbols the codes can take: the format's values, without the padding.

  `quantise` pads the codebook with its last value to 2**bits entries and never writes a
  code that points at the padding; format values are strictly increasing, so
  K = min{i : codebook[i] = codebook[-1]} + 1. A decoder holding the codebook derives the same
  K, so a code table needs only K entries. (A format whose two largest values round to one
  float32 loses its last symbol here: its codes then fail the range check of `symbol_counts`.)
  """
  codebook = np.asarray(codebook)
  return int(np.argmax(codebook == codebook[-1])) + 1


def symbol_counts(codes: np.ndarray, codebook) -> np.ndarray:
  """c(s), the occurrences of each symbol s in 0..K-1 among `codes` (K = `alphabet_size`).

  Raises:
    ValueError: a code points at the codebook's padding (s ≥ K).
  """
  n_symbols = alphabet_size(codebook)
  codes = np.asarray(codes).reshape(-1)
  if codes.size and codes.max() >= n_symbols:
    raise ValueError(f"codes must lie in 0..{n_symbols - 1}, the format's values; got "
                     f"{codes.max()}, which points at the codebook's padding")
  return np.bincount(codes, minlength=n_symbols)


def padded_length(n: int, block_size: int) -> int:
  """Codes `quantise` packs along an axis of length n: whole blocks, then whole 32-code groups."""
  blocks = -(-n // block_size) * block_size
  return blocks + -blocks % packing.GROUP


# One compiled unpacking per shape and bit width (op by op, each new shape costs far more).
_unpack = jax.jit(packing.unpack, static_argnums=(1, 2))


def logical_codes(q: QuantisedArray) -> np.ndarray:
  """The codes of `q` unpacked (int64, shape `q.shape`): the padding along `q.axis` dropped."""
  codes = np.asarray(_unpack(q.codes, q.bits, q.axis))
  return np.take(codes, np.arange(q.shape[q.axis]), axis=q.axis).astype(np.int64)


def checked_codes(q: QuantisedArray) -> np.ndarray:
  """`logical_codes(q)`, once `q.codes` is known to be exactly `packed_words` of them.

  Raises:
    TypeError: `q` is not a `QuantisedArray`.
    ValueError: `q.codes` holds padding codes `quantise` would not write.
  """
  if not isinstance(q, QuantisedArray):
    raise TypeError(f"q must be a QuantisedArray, got {type(q).__name__}")
  codes = logical_codes(q)
  rebuilt = packed_words(codes, q.codebook, q.axis, q.block_size, q.bits)
  if not np.array_equal(np.asarray(rebuilt), np.asarray(q.codes)):
    raise ValueError("q.codes holds padding codes other than those quantise writes, so q "
                     "cannot be rebuilt exactly from its logical codes")
  return codes


def packed_words(codes: np.ndarray, codebook, axis: int, block_size: int, bits: int) -> jax.Array:
  """The uint32 words `quantise` stores for the logical `codes` (the inverse of `logical_codes`).

  Along `axis`, the zero padding of the last block is rounded like any element, to the code
  nearest 0 among the format's values (0/s is ±0 for every scale s; minmax scaling pads with
  0 after the shift); the codes are then zero-padded to whole groups of 32 and packed in the
  layout of `jaxquant.packing`, on the host (the C loop of `jaxquant.entropy.native`).
  """
  codes = np.asarray(codes)
  axis = axis % codes.ndim
  n = codes.shape[axis]
  blocks = -(-n // block_size) * block_size
  values = jnp.asarray(np.asarray(codebook)[:alphabet_size(codebook)], jnp.float32)
  zero_code = int(nearest_codes(jnp.zeros((), jnp.float32), values))
  outer, inner = math.prod(codes.shape[:axis]), math.prod(codes.shape[axis + 1:])
  shape = list(codes.shape)
  shape[axis] = packing.packed_length(padded_length(n, block_size), bits)
  words = np.empty(shape, np.uint32)
  small = np.ascontiguousarray(codes, np.uint8 if bits <= 8 else np.uint16)
  native.loops().pack(small, outer, n, inner, bits, zero_code, blocks, words)
  return jnp.asarray(words)
