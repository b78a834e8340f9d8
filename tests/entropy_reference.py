"""Numpy references for the entropy tests: logical codes, scale bits and the ideal coded rate."""

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


# A weight [K, N] with K = 200 (not a multiple of the block size 64), blocked along K.
WEIGHT_SHAPE = (200, 48)
