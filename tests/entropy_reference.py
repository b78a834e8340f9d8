"""Numpy references for the entropy tests: logical codes, scale bits, the ideal coded rate and
the framed payload."""

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
  leaves = [q.scales] + ([] if q.scale_scales is None else [q.scale_scales])
  return sum(8 * np.asarray(leaf).nbytes for leaf in leaves)


def ideal_rate(q, n_symbols=None):
  """(-Σ log2 p̂(c) + scale bits)/N with p̂ the +1-smoothed histogram, computed directly.

  The alphabet is the format's values (`n_values`) unless `n_symbols` says otherwise.
  """
  codes = logical_codes(q).reshape(-1)
  n_symbols = n_values(q) if n_symbols is None else n_symbols
  p = (np.bincount(codes, minlength=n_symbols) + 1) / (codes.size + n_symbols)
  return (-np.sum(np.log2(p[codes])) + scale_bits(q)) / codes.size


# The payload's chunks of the Huffman stream, one CRC-32 each (`jaxquant.entropy.framing`).
CHUNK_BYTES = 8192


def framed_payload(stream, lengths, shape):
  """stream ‖ CRC-32 per 8192-byte chunk ‖ len(stream) ‖ CRC-32(lengths ‖ shape ‖ len(stream)).

  Built with `struct` and `zlib` from the documented layout (integers big-endian: CRCs 4
  bytes, lengths 8; one byte per code length, 8 per axis of the shape).
  """
  crcs = b"".join(struct.pack(">I", zlib.crc32(stream[start:start + CHUNK_BYTES]))
                  for start in range(0, len(stream), CHUNK_BYTES))
  length = struct.pack(">Q", len(stream))
  context = bytes(int(n) for n in lengths) + struct.pack(f">{len(shape)}Q", *shape) + length
  return stream + crcs + length + struct.pack(">I", zlib.crc32(context))


# A weight [K, N] with K = 200 (not a multiple of the block size 64), blocked along K.
WEIGHT_SHAPE = (200, 48)
