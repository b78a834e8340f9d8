"""Numpy references for the entropy tests: logical codes, scale bits, the ideal coded rate and
rANS in Python integers."""

import struct
import zlib

import numpy as np

import jaxquant as jq


def student_t(shape, seed=7):
  return np.random.default_rng(seed).standard_t(5, size=shape).astype(np.float32)


def logical_codes(q):
  """The codes of `q` in its logical shape (reference: unpack, then drop the padding)."""
  codes = np.asarray(jq.packing.unpack(q.codes, q.bits, q.axis))
  return np.take(codes, np.arange(q.shape[q.axis]), axis=q.axis).astype(np.int64)


def n_values(q):
  """The format's number of values: the distinct entries of the padded codebook."""
  return np.unique(np.asarray(q.codebook)).size


def scale_bits(q):
  leaves = [leaf for leaf in (q.scales, q.scale_scales, q.offsets, q.offset_scales)
            if leaf is not None]
  return sum(8 * np.asarray(leaf).nbytes for leaf in leaves)


def ideal_rate(q, n_symbols=None):
  """(-Σ log2 p̂(c) + scale bits)/N with p̂ the +1-smoothed histogram, computed directly.

  The alphabet is the format's values (`n_values`) unless `n_symbols` says otherwise.
  """
  codes = logical_codes(q).reshape(-1)
  n_symbols = n_values(q) if n_symbols is None else n_symbols
  p = (np.bincount(codes, minlength=n_symbols) + 1) / (codes.size + n_symbols)
  return (-np.sum(np.log2(p[codes])) + scale_bits(q)) / codes.size


# rANS as `jaxquant.entropy.rans` documents it: a 64-bit state in [L, 2^64), L = 2^32, 32-bit
# words, probabilities f(s)/2^n; each chunk coded from x = L, its stream the final state (high
# word first) and then the words in the order the decoder reads them.
STATE_LOW = 2**32


def rans_chunk(symbols, frequencies, precision):
  """The words of one chunk, by the recurrences in Python integers."""
  frequencies = [int(f) for f in frequencies]
  cumulative = np.concatenate([[0], np.cumsum(frequencies)]).tolist()
  x, emitted = STATE_LOW, []
  for s in reversed([int(s) for s in symbols]):
    f = frequencies[s]
    if x >= f << (64 - precision):
      emitted.append(x & 0xFFFFFFFF)
      x >>= 32
    x = ((x // f) << precision) + x % f + cumulative[s]
  return [x >> 32, x & 0xFFFFFFFF] + emitted[::-1]


def rans_unchunk(words, count, frequencies, precision):
  """`count` symbols decoded from one chunk's words; asserts it ends at L with all words read."""
  frequencies = [int(f) for f in frequencies]
  cumulative = np.concatenate([[0], np.cumsum(frequencies)]).tolist()
  symbol_of = np.repeat(np.arange(len(frequencies)), frequencies).tolist()
  words = [int(w) for w in words]
  x, position, out = (words[0] << 32) | words[1], 2, []
  for _ in range(count):
    slot = x & ((1 << precision) - 1)
    s = symbol_of[slot]
    out.append(s)
    x = frequencies[s] * (x >> precision) + slot - cumulative[s]
    if x < STATE_LOW:
      x = (x << 32) | words[position]
      position += 1
  assert x == STATE_LOW and position == len(words)
  return out


def chunk_crcs(chunks, frequencies, size, chunk_size, precision):
  """CRC-32 of each chunk's little-endian words, seeded with CRC-32(frequencies ‖ N, C, n)
  and then the chunk's index (big-endian uint64s)."""
  context = zlib.crc32(np.asarray(frequencies, "<u2").tobytes()
                       + struct.pack(">QQQ", size, chunk_size, precision))
  return [zlib.crc32(np.asarray(words, "<u4").tobytes(), zlib.crc32(struct.pack(">Q", j), context))
          for j, words in enumerate(chunks)]


# A weight [K, N] with K = 200 (not a multiple of the block size 64), blocked along K.
WEIGHT_SHAPE = (200, 48)
