"""Dense bit packing of b-bit integer codes into ``uint32`` words.

This module defines storage layout ``"bitstream-u32"``, version 1.  It is a
public storage contract: checkpoints and kernels rely on it, so any change to
where a bit is stored needs a new :data:`LAYOUT_VERSION`.

Layout
------
Codes are non-negative integers below ``2**bits``, for ``bits`` in 1..8, and
are packed along one axis of an N-d array:

* Along ``axis`` the codes are taken in groups of :data:`GROUP` (32)
  consecutive codes; the axis length ``n`` must be a multiple of 32 (callers
  pad).
* Each group becomes exactly ``bits`` ``uint32`` words (``32 * bits`` bits,
  no padding): a little-endian bit stream in which code ``i`` of the group
  occupies stream bits ``[i * bits, i * bits + bits)``, least significant bit
  first, and stream bit ``t`` is bit ``t % 32`` of word ``t // 32`` of the
  group.
* When ``bits`` divides 32 (1, 2, 4, 8) no code crosses a word boundary: word
  ``j`` holds codes ``j * (32 // bits)`` to ``(j + 1) * (32 // bits) - 1``,
  code ``i`` at bit offset ``(i % (32 // bits)) * bits``.  For 3, 5, 6 and 7
  bits some codes straddle two consecutive words: their low bits sit at the
  top of word ``w``, their high bits at the bottom of word ``w + 1``.
* The packed array has the shape of the codes except along ``axis``, whose
  length becomes ``n * bits // 32``; the packed axis stays in place.  Codes
  of shape ``(K, N)`` packed along axis 0 at 4 bits give ``(K // 8, N)``
  words (row ``r`` holds code rows ``8r`` to ``8r + 7``), along axis -1
  ``(K, N // 8)``.

For example, 4-bit codes 0..15 twice over fill four words, code 0 in the
lowest nibble:

>>> import jax.numpy as jnp
>>> words = pack(jnp.arange(32) % 16, bits=4)
>>> [hex(w) for w in words.tolist()]
['0x76543210', '0xfedcba98', '0x76543210', '0xfedcba98']
>>> unpack(words, bits=4).tolist() == [i % 16 for i in range(32)]
True

Both functions work in two vectorised stages through *chunks*: runs of
``c`` codes, ``c`` the largest power of two with ``c * bits <= 32``, so that
a chunk fits in one ``uint32``.  When ``bits`` divides 32 a chunk is a word.
"""

from numbers import Integral

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["GROUP", "LAYOUT", "LAYOUT_VERSION", "pack", "packed_length", "unpack"]

LAYOUT = "bitstream-u32"
LAYOUT_VERSION = 1
GROUP = 32


def _check_bits(bits: int) -> None:
  if isinstance(bits, bool) or not isinstance(bits, Integral):
    raise TypeError(f"{bits=} must be an int in 1..8")
  if not 1 <= bits <= 8:
    raise ValueError(f"{bits=} must be an int in 1..8")


def _check_axis(axis: int, x: jax.Array, name: str) -> int:
  """Returns ``axis`` as a non-negative index into the axes of ``x``."""
  if x.ndim == 0:
    raise ValueError(f"{name} must have at least one axis, got a scalar and {axis=}")
  allowed = f"allowed values are -{x.ndim}..{x.ndim - 1} for {x.ndim}-d {name}"
  if isinstance(axis, bool) or not isinstance(axis, Integral):
    raise TypeError(f"{axis=} must be an int; {allowed}")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"{axis=} is out of range; {allowed}")
  return int(axis) % x.ndim


def packed_length(n: int, bits: int) -> int:
  """Number of ``uint32`` words that ``n`` codes of ``bits`` bits pack into.

  ``n`` must be a non-negative multiple of :data:`GROUP` (32).
  """
  _check_bits(bits)
  if isinstance(n, bool) or not isinstance(n, Integral) or n < 0 or n % GROUP:
    raise ValueError(f"{n=} must be a non-negative int multiple of {GROUP}")
  return int(n) * int(bits) // GROUP


def _chunk(bits: int) -> int:
  """Codes per chunk: the largest power of two ``c`` with ``c * bits <= 32``."""
  return 1 << (32 // bits).bit_length() - 1


def _split(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Splits ``axis`` of ``x`` into ``(-1, size)``, the new minor axis at ``axis + 1``."""
  return x.reshape(x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:])


def _merge(x: jax.Array, axis: int) -> jax.Array:
  """Merges axes ``axis`` and ``axis + 1`` of ``x``: undoes :func:`_split`."""
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _along(values: np.ndarray, x: jax.Array, axis: int) -> np.ndarray:
  """A ``uint32`` constant varying along ``axis`` that broadcasts against ``x``."""
  shape = [1] * x.ndim
  shape[axis] = values.size
  return values.astype(np.uint32).reshape(shape)


def _chunks_to_words(chunks: jax.Array, bits: int, axis: int) -> jax.Array:
  """Re-cuts ``c * bits``-bit chunks (``32 // c`` per group) into ``bits`` words per group.

  Word ``w`` ORs in every chunk that overlaps it, shifted by the chunk's
  offset within the word; bits shifted out on the left belong to word
  ``w + 1``, which picks them up with a right shift.
  """
  c = _chunk(bits)
  width = c * bits
  x = _split(chunks, axis, 32 // c)
  chunk = [lax.index_in_dim(x, j, axis + 1, keepdims=False) for j in range(32 // c)]
  words = []
  for w in range(bits):
    fields = []
    for j in range(32 // c):
      offset = j * width - 32 * w
      if -width < offset < 32:
        shift = jnp.uint32(abs(offset))
        fields.append(
            jnp.left_shift(chunk[j], shift) if offset >= 0 else jnp.right_shift(chunk[j], shift))
    word = fields[0]
    for field in fields[1:]:
      word = jnp.bitwise_or(word, field)
    words.append(word)
  return _merge(jnp.stack(words, axis=axis + 1), axis)


def _words_to_chunks(words: jax.Array, bits: int, axis: int) -> jax.Array:
  """Re-cuts ``bits`` words per group into ``32 // c`` chunks of ``c * bits`` bits.

  Chunk ``j`` ORs in every word that overlaps it, shifted by the word's
  offset within the chunk.  The loop runs over the words, each broadcast
  against per-chunk shift tables rather than concatenated: on CPU that is
  markedly faster when unpacking along the minor axis.  Shifts are clipped
  to 0..31 and words that do not overlap a chunk are masked out.
  """
  c = _chunk(bits)
  width = c * bits
  x = _split(words, axis, bits)
  offset = 32 * np.arange(bits)[:, None] - width * np.arange(32 // c)[None, :]
  chunks = None
  for w in range(bits):
    field = lax.slice_in_dim(x, w, w + 1, axis=axis + 1)
    left, right = np.clip(offset[w], 0, 31), np.clip(-offset[w], 0, 31)
    if left.any():
      field = jnp.left_shift(field, _along(left, x, axis + 1))
    if right.any():
      field = jnp.right_shift(field, _along(right, x, axis + 1))
    overlaps = (offset[w] > -32) & (offset[w] < width)
    if not overlaps.all():
      field = jnp.bitwise_and(field, _along(np.where(overlaps, 0xFFFFFFFF, 0), x, axis + 1))
    chunks = field if chunks is None else jnp.bitwise_or(chunks, field)
  return _merge(jnp.bitwise_and(chunks, jnp.uint32((1 << width) - 1)), axis)


def pack(codes: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Packs ``bits``-bit ``codes`` along ``axis`` into ``uint32`` words.

  ``codes`` may have any integer dtype; its values must lie in
  ``0 .. 2**bits - 1``.  For safety they are reduced modulo ``2**bits``
  (negative values included), so no value can disturb its neighbours.  The
  length of ``axis`` must be a multiple of 32.  Returns a ``uint32`` array
  of the codes' shape with that axis shortened to ``n * bits // 32``, laid
  out as described in the module docstring.
  """
  codes = jnp.asarray(codes)
  _check_bits(bits)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f"codes must be an integer array, got codes.dtype={codes.dtype}")
  axis = _check_axis(axis, codes, "codes")
  n = codes.shape[axis]
  if n % GROUP:
    raise ValueError(f"codes length {n} along {axis=} must be a multiple of {GROUP}; pad the codes")
  c = _chunk(bits)
  # Chunks: each code shifted to its offset, then summed; the fields are
  # disjoint and fill at most 32 bits, so the uint32 sum is their exact OR.
  x = _split(jnp.bitwise_and(codes.astype(jnp.uint32), jnp.uint32((1 << bits) - 1)), axis, c)
  chunks = jnp.sum(jnp.left_shift(x, _along(np.arange(c) * bits, x, axis + 1)),
                   axis=axis + 1,
                   dtype=jnp.uint32)
  return chunks if c * bits == 32 else _chunks_to_words(chunks, bits, axis)


def unpack(words: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Unpacks ``uint32`` ``words`` made by :func:`pack` back into ``bits``-bit codes.

  The length ``m`` of ``axis`` must be a multiple of ``bits`` (whole
  groups).  Returns ``uint32`` codes, each below ``2**bits``, with that axis
  lengthened to ``m * 32 // bits``.
  """
  words = jnp.asarray(words)
  _check_bits(bits)
  if words.dtype != jnp.uint32:
    raise TypeError(f"words must be a uint32 array, got words.dtype={words.dtype}")
  axis = _check_axis(axis, words, "words")
  m = words.shape[axis]
  if m % bits:
    raise ValueError(f"words length {m} along {axis=} must be a multiple of {bits=} (whole groups)")
  c = _chunk(bits)
  chunks = words if c * bits == 32 else _words_to_chunks(words, bits, axis)
  # Codes: code i of a chunk sits at bit offset i * bits.
  y = _split(chunks, axis, 1)
  codes = jnp.bitwise_and(jnp.right_shift(y, _along(np.arange(c) * bits, y, axis + 1)),
                          jnp.uint32((1 << bits) - 1))
  return _merge(codes, axis)
