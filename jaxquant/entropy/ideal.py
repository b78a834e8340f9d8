"""Ideal code lengths of symbol streams: the rate every coder is measured against.

Nothing here knows about quantised arrays: the symbols are integers 0..n_symbols-1.
"""

from __future__ import annotations

import numpy as np


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

  Every symbol of the alphabet takes a share of the smoothing, present or not: each absent one
  adds 1 to the denominator and so raises the cost by about N·log2(1 + 1/(N + n_symbols)) bits.
  `n_symbols` should therefore be the number of symbols that can occur (for the codes of a
  `QuantisedArray`, the format's values, not its codebook padded to 2**bits entries).

  Args:
    codes: integer symbols in 0..n_symbols-1, any shape.
    n_symbols: alphabet size, ≥ 1.

  Returns:
    The total number of bits (a float).
  """
  if isinstance(n_symbols, bool) or not isinstance(n_symbols, (int, np.integer)) or n_symbols < 1:
    raise ValueError(f"{n_symbols=} must be an int >= 1")
  codes = _check_codes(codes, int(n_symbols))
  return histogram_bits(np.bincount(codes, minlength=n_symbols))


def histogram_bits(counts: np.ndarray) -> float:
  """-Σₛ c(s) log2 p̂(s), p̂(s) = (c(s) + 1)/(N + K): `ideal_bits` from the K symbol counts c."""
  counts = np.asarray(counts, np.int64).astype(np.float64)
  p = (counts + 1.0) / (np.sum(counts) + counts.size)
  return float(-np.sum(counts * np.log2(p)))
