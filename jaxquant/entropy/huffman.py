"""Symbol streams: their ideal code lengths and the canonical Huffman codec.

Nothing here knows about quantised arrays: the symbols are integers 0..n_symbols-1.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

# Code lengths are stored as 5-bit fields, so no codeword may be longer than 31 bits.
LENGTH_FIELD_BITS = 5
MAX_CODE_LENGTH = 2**LENGTH_FIELD_BITS - 1


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


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
  """Huffman code lengths (0 for absent symbols; 1 for a lone symbol).

  Ties are broken by creation order (leaves by symbol, then merged nodes), so the lengths
  are a deterministic function of `counts`.
  """
  lengths = np.zeros(counts.size, np.int64)
  present = np.flatnonzero(counts)
  if present.size == 1:
    lengths[present] = 1
    return lengths
  heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
  heapq.heapify(heap)
  order = counts.size
  while len(heap) > 1:
    count_a, _, symbols_a = heapq.heappop(heap)
    count_b, _, symbols_b = heapq.heappop(heap)
    merged = symbols_a + symbols_b
    lengths[merged] += 1
    heapq.heappush(heap, (count_a + count_b, order, merged))
    order += 1
  return lengths


@dataclasses.dataclass(frozen=True, eq=False)
class HuffmanCode:
  """A canonical Huffman code over the symbols 0..n_symbols-1.

  The code is fully described by one length per symbol (0: the symbol has no codeword), stored
  in `LENGTH_FIELD_BITS` bits each; codewords are assigned canonically, in order of
  (length, symbol), each the previous plus one, shifted left when the length grows. Lengths
  over `MAX_CODE_LENGTH` are avoided by halving the counts (rounding up) and rebuilding.

  Attributes:
    lengths: int64 code length per symbol.
  """

  lengths: np.ndarray

  @classmethod
  def from_counts(cls, counts) -> HuffmanCode:
    """The Huffman code for symbol counts (counts[s] ≥ 0, at least one positive)."""
    counts = np.asarray(counts).reshape(-1)
    if counts.size == 0 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
      raise ValueError("counts must be a non-empty array of non-negative integers")
    if not np.any(counts > 0):
      raise ValueError("counts must have at least one positive entry")
    counts = counts.astype(np.int64)
    lengths = _huffman_lengths(counts)
    while lengths.max() > MAX_CODE_LENGTH:
      counts = (counts + 1) // 2
      lengths = _huffman_lengths(counts)
    return cls(lengths)

  def __post_init__(self):
    lengths = np.asarray(self.lengths, np.int64).reshape(-1)
    if lengths.size == 0 or lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH:
      raise ValueError(f"lengths must be a non-empty array of ints in 0..{MAX_CODE_LENGTH}")
    used = lengths[lengths > 0]
    if used.size == 0 or np.sum(2.0 ** -used) > 1.0:
      raise ValueError("lengths must describe a prefix code: Σ 2^-length ≤ 1 over used symbols")
    lengths.setflags(write=False)
    object.__setattr__(self, "lengths", lengths)

  @property
  def n_symbols(self) -> int:
    return int(self.lengths.size)

  @property
  def table_bits(self) -> int:
    """Bits to store the code: one `LENGTH_FIELD_BITS`-bit length per symbol, 0 if absent.

    An absent symbol costs its length field and nothing more, so the alphabet should hold only
    the symbols that can occur (the decoder must know it to read the table).
    """
    return LENGTH_FIELD_BITS * self.n_symbols

  def _canonical(self):
    """Symbols in canonical order, their codewords, and per length the first codeword and count."""
    order = np.lexsort((np.arange(self.n_symbols), self.lengths))
    order = order[self.lengths[order] > 0]
    ordered_lengths = self.lengths[order]
    codewords = np.zeros(self.n_symbols, np.uint64)
    code, previous = 0, int(ordered_lengths[0])
    for symbol, length in zip(order.tolist(), ordered_lengths.tolist()):
      code <<= length - previous
      codewords[symbol] = code
      code, previous = code + 1, length
    count = np.bincount(ordered_lengths, minlength=MAX_CODE_LENGTH + 1)
    first = np.zeros(MAX_CODE_LENGTH + 1, np.int64)
    for length in range(1, MAX_CODE_LENGTH + 1):
      first[length] = (first[length - 1] + count[length - 1]) << 1
    return order, codewords, first, count

  def encoded_bits(self, codes) -> int:
    """Σᵢ length(codeᵢ): the payload bits of `encode(codes)` before padding to whole bytes."""
    codes = _check_codes(codes, self.n_symbols)
    return int(np.sum(self.lengths[codes]))

  def encode(self, codes) -> bytes:
    """The codewords of `codes` (flattened), concatenated MSB-first and zero-padded to bytes.

    Raises:
      ValueError: a code is out of range or its symbol has no codeword.
    """
    codes = _check_codes(codes, self.n_symbols)
    lengths = self.lengths[codes]
    if np.any(lengths == 0):
      raise ValueError(f"codes contains symbols with no codeword: {np.unique(codes[lengths == 0])}")
    _, codewords, _, _ = self._canonical()
    words = codewords[codes]
    starts = np.cumsum(lengths) - lengths
    bits = np.zeros(int(np.sum(lengths)), np.uint8)
    # Bit j of each codeword (from the most significant), for every codeword at least j+1 long.
    for j in range(int(lengths.max(initial=0))):
      long_enough = lengths > j
      shift = (lengths[long_enough] - 1 - j).astype(np.uint64)
      bits[starts[long_enough] + j] = (words[long_enough] >> shift) & np.uint64(1)
    return np.packbits(bits).tobytes()

  def decode(self, data: bytes, n: int) -> np.ndarray:
    """The first `n` symbols encoded in `data` (int64).

    Canonical decoding, vectorised over bit positions: with W(p) the `L`-bit window starting
    at bit p (L the longest codeword), a codeword of length l starts at p iff l is the
    smallest length with ⌊W(p)/2^(L-l)⌋ < first(l) + count(l); its symbol is the
    (⌊W(p)/2^(L-l)⌋ - first(l))-th of that length. Only the chain p → p + l(p) from p = 0
    is then followed in Python.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"{n=} must be an int >= 0")
    if n == 0:
      return np.zeros(0, np.int64)
    order, _, first, count = self._canonical()
    longest = int(self.lengths.max())
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    positions = bits.size
    padded = np.concatenate([bits, np.zeros(longest, np.uint8)]).astype(np.uint64)
    window = np.zeros(positions, np.uint64)
    for j in range(longest):
      window = (window << np.uint64(1)) | padded[j:j + positions]
    length_at = np.zeros(positions, np.int64)
    rank_at = np.zeros(positions, np.int64)
    offset = np.cumsum(count) - count  # index into `order` of the first codeword of each length
    for length in range(longest, 0, -1):  # descending, so the shortest matching length wins
      if count[length] == 0:
        continue
      prefix = (window >> np.uint64(longest - length)).astype(np.int64)
      match = prefix < first[length] + count[length]
      length_at[match] = length
      rank_at[match] = offset[length] + prefix[match] - first[length]
    steps = length_at.tolist()
    starts = np.zeros(n, np.int64)
    p = 0
    for i in range(n):
      if p >= positions or steps[p] == 0:
        raise ValueError(f"data holds fewer than {n=} codewords")
      starts[i] = p
      p += steps[p]
    if p > positions:
      raise ValueError(f"data holds fewer than {n=} codewords")
    return order[rank_at[starts]].astype(np.int64)
