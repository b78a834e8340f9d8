"""Chunked rANS: symbol streams coded within a fraction of a percent of their entropy.

Range asymmetric numeral systems (Duda 2013, arXiv:1311.2540) with a 64-bit state and 32-bit
words (word-wise renormalisation as in Giesen 2014, arXiv:1402.3392, §2), the loops in C
(`jaxquant/entropy/_loops.c`, which states the recurrences). The symbols are cut into chunks
of `chunk_size` (the last may be shorter), each coded on its own from the state L = 2^32, so
chunks decode independently and in parallel threads, and a damaged chunk is found without
reading the others.

A `CodedStream` stores, for N symbols over an alphabet of K:

- ``frequencies`` (uint16 [K]): f(s), summing to 2^n (n = ``precision``), f(s) ≥ 1 exactly
  for the symbols present (`quantised_frequencies`); the model's probabilities are f(s)/2^n.
- ``words`` (little-endian uint32): the chunks' streams one after another. Chunk j's stream
  is its final encoder state (high word first), then the words the decoder reads in order.
- ``ends`` (uint64 [m], m = ⌈N/chunk_size⌉): the word offset where each chunk's stream ends.
- ``crcs`` (uint32 [m]): chunk j's CRC-32 (zlib's, RFC 1952 §8) of its stream's bytes, seeded
  with the CRC-32 of the context ``frequencies ‖ N, chunk_size, n, j`` (big-endian uint64s),
  so a chunk moved, or paired with another model or length, fails its check as a flipped bit
  does. A chunk's stream is 4·(2 + the words its symbols emitted) bytes, about 32 KiB =
  262 144 bits at 4 bits per code. On words that long CRC-32 detects every error of at most 2
  bits (Hamming distance 3 up to about 2^32 bits; distance 4 holds only up to 91 607 bits:
  Koopman 2002, DSN, Table 1), every burst of at most 32 bits, and any other error but with
  probability 2^-32.

The decoder also checks that each chunk ends in the state L with all its words read, which a
corrupt chunk almost never does. Cost beyond the ideal code length Σ -log2 f(cᵢ)/2^n: under
64 bits of final state, 64 of end offset and 32 of CRC per chunk (0.06% of a chunk of 2^16
four-bit codes), 16 per symbol of the alphabet, and the loss from rounding probabilities to
multiples of 2^-n (`quantised_frequencies`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import math
import os
import struct
import zlib

import numpy as np

from jaxquant.entropy import native

CHUNK_SIZE = 2**16
PRECISION = 15
MAX_PRECISION = 15  # f(s) ≤ 2^15 fits the uint16 table and the decoder's 16-bit fields
MAX_SYMBOLS = 2**16


def _integer(name: str, value, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}={value!r} must be an int")
  if not low <= value <= high:
    raise ValueError(f"{name}={value} must lie in {low}..{high}")
  return int(value)


def quantised_frequencies(counts, precision: int = PRECISION) -> np.ndarray:
  """Frequencies f(s) summing to 2^n, f(s) ≥ 1 exactly where c(s) > 0, that nearly minimise
  the code length Σₛ c(s)·log2(2^n/f(s)).

  Starting from f = max(1, ⌊c·2^n/N⌋) over the present symbols, units are handed out (or
  taken back, f staying ≥ 1) one at a time where they shorten the code most (lengthen it
  least): adding one to f(s) saves c(s)·log2((f(s)+1)/f(s)) bits. Ties go to the lower
  symbol, so the result is a function of `counts` alone.

  Args:
    counts: the K ≥ 1 symbol counts, non-negative integers, at least one positive.
    precision: n, in 1..`MAX_PRECISION`.

  Returns:
    uint16 [K] (f(s) ≤ 2^n ≤ 2^15).

  Raises:
    ValueError: `counts` is empty, negative, all zero, or has more than 2^n present symbols.
    TypeError: `counts` are not integers or `precision` is not an int.
  """
  precision = _integer("precision", precision, 1, MAX_PRECISION)
  counts = np.asarray(counts).reshape(-1)
  if counts.size and not np.issubdtype(counts.dtype, np.integer):
    raise TypeError(f"counts must be integers, not {counts.dtype}")
  counts = counts.astype(np.int64)
  if counts.size == 0 or np.any(counts < 0) or not np.any(counts > 0):
    raise ValueError("counts must be non-negative integers, at least one of them positive")
  total, present = 1 << precision, counts > 0
  if np.count_nonzero(present) > total:
    raise ValueError(f"{np.count_nonzero(present)} symbols are present, more than the "
                     f"2^{precision} units of precision={precision} can give one each")
  frequencies = np.where(present, np.maximum(1, counts * total // counts.sum()), 0)
  surplus = int(frequencies.sum()) - total

  def change(s: int) -> float:  # bits saved by one more unit for s, or cost of one less
    f = int(frequencies[s])
    return counts[s] * math.log2((f + 1) / f) if surplus < 0 else (
        counts[s] * math.log2(f / (f - 1)) if f > 1 else math.inf)

  sign = -1 if surplus < 0 else 1  # heapq pops the smallest: the largest saving, least cost
  heap = [(sign * change(s), s) for s in np.flatnonzero(present).tolist()]
  heapq.heapify(heap)
  for _ in range(abs(surplus)):
    _, s = heapq.heappop(heap)
    frequencies[s] -= sign
    heapq.heappush(heap, (sign * change(s), s))
  return frequencies.astype(np.uint16)


def default_threads() -> int:
  """The CPUs this process may run on: the default number of coding threads."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
      os.cpu_count() or 1)


def _threads(threads: int | None, n_chunks: int) -> int:
  threads = default_threads() if threads is None else threads
  return max(1, min(_integer("threads", threads, 1, 1024), n_chunks))


def _groups(n_chunks: int, threads: int) -> list[tuple[int, int]]:
  """Contiguous runs of chunks, one per thread: [(first, stop), ...]."""
  bounds = [n_chunks * g // threads for g in range(threads + 1)]
  return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _symbol_dtype(n_symbols: int):
  return np.uint8 if n_symbols <= 256 else np.uint16


def _cumulative(frequencies: np.ndarray) -> np.ndarray:
  return (np.cumsum(frequencies, dtype=np.uint32) - frequencies).astype(np.uint32)


@dataclasses.dataclass(frozen=True, eq=False)
class CodedStream:
  """N symbols over an alphabet of K, rANS-coded in independent checked chunks (module
  docstring: the layout and its checks). Build one with `encode`; `decode` reads it back.

  Attributes:
    words: the chunks' streams, little-endian uint32.
    ends: uint64 [m], the word offset where each chunk's stream ends.
    crcs: uint32 [m], each chunk's CRC-32 (module docstring).
    frequencies: uint16 [K], f(s) summing to 2**precision.
    size: N, the number of symbols.
    chunk_size: symbols per chunk (the last chunk holds the rest).
    precision: n, the probabilities' bits.
  """

  words: np.ndarray
  ends: np.ndarray
  crcs: np.ndarray
  frequencies: np.ndarray
  size: int
  chunk_size: int
  precision: int

  def __post_init__(self):
    for name, dtype in (("words", "<u4"), ("ends", "<u8"), ("crcs", "<u4"),
                        ("frequencies", "<u2")):
      array = np.array(getattr(self, name), dtype=dtype).reshape(-1)  # a private, frozen copy
      array.setflags(write=False)
      object.__setattr__(self, name, array)
    for name, low, high in (("size", 0, 2**63 - 1), ("chunk_size", 1, 2**31 - 1),
                            ("precision", 1, MAX_PRECISION)):
      object.__setattr__(self, name, _integer(name, getattr(self, name), low, high))
    if not 1 <= self.frequencies.size <= MAX_SYMBOLS or int(
        self.frequencies.astype(np.int64).sum()) != 1 << self.precision:
      raise ValueError(f"frequencies must be 1..{MAX_SYMBOLS} entries summing to "
                       f"2**precision = {1 << self.precision}")
    if self.ends.size != self.n_chunks or self.crcs.size != self.n_chunks:
      raise ValueError(f"{self.size} symbols in chunks of {self.chunk_size} make "
                       f"{self.n_chunks} chunks, but ends has {self.ends.size} entries and "
                       f"crcs {self.crcs.size}")

  @property
  def n_symbols(self) -> int:
    """K, the alphabet's size."""
    return self.frequencies.size

  @property
  def n_chunks(self) -> int:
    return -(-self.size // self.chunk_size)

  @property
  def storage_bits(self) -> int:
    """The bits of the stored arrays: words, end offsets, CRCs and frequencies."""
    return 8 * sum(array.nbytes for array in (self.words, self.ends, self.crcs,
                                               self.frequencies))

  def serialised(self) -> np.ndarray:
    """The stream as one little-endian uint32 array: words ‖ ends (each as its low then its
    high half) ‖ crcs ‖ frequencies (two per word, the first in the low half; an odd count
    padded with 0). `deserialised` reads it back given N, chunk_size, n and K."""
    frequencies = np.concatenate([self.frequencies, np.zeros(self.n_symbols % 2, "<u2")])
    return np.concatenate([self.words, self.ends.view("<u4"), self.crcs,
                           frequencies.view("<u4")])

  @classmethod
  def deserialised(cls, array, size: int, chunk_size: int, precision: int,
                   n_symbols: int) -> CodedStream:
    """The `CodedStream` of N = `size` symbols over K = `n_symbols` that `serialised` wrote.

    Raises:
      ValueError: `array` is too short for the chunks and alphabet it is said to hold, or
        the stream it holds is inconsistent (see `CodedStream`).
    """
    array = np.ascontiguousarray(np.asarray(array), "<u4").reshape(-1)
    n_chunks = -(-_integer("size", size, 0, 2**63 - 1) // _integer("chunk_size", chunk_size, 1,
                                                                   2**31 - 1))
    n_symbols = _integer("n_symbols", n_symbols, 1, MAX_SYMBOLS)
    tail = 3 * n_chunks + -(-n_symbols // 2)
    if array.size < tail:
      raise ValueError(f"the serialised stream has {array.size} words, fewer than the {tail} "
                       f"its {n_chunks} chunks and {n_symbols} frequencies take")
    n_words = array.size - tail
    ends = array[n_words:n_words + 2 * n_chunks].view("<u8")
    crcs = array[n_words + 2 * n_chunks:n_words + 3 * n_chunks]
    frequencies = array[n_words + 3 * n_chunks:].view("<u2")[:n_symbols]
    return cls(array[:n_words], ends, crcs, frequencies, size, chunk_size, precision)

  def _seeds(self) -> list[int]:
    """The CRC seed of each chunk: CRC-32 of frequencies ‖ N, chunk_size, n, j."""
    context = zlib.crc32(self.frequencies.tobytes() + struct.pack(
        ">QQQ", self.size, self.chunk_size, self.precision))
    return [zlib.crc32(struct.pack(">Q", j), context) for j in range(self.n_chunks)]

  def _starts(self) -> np.ndarray:
    return np.concatenate([np.zeros(1, np.uint64), self.ends])

  def corrupt_chunks(self, first: int = 0, stop: int | None = None) -> list[int]:
    """The chunks of first..stop-1 (default all) whose offsets or CRC-32 do not check."""
    starts, seeds = self._starts(), self._seeds()
    stop = self.n_chunks if stop is None else stop
    return [j for j in range(first, stop)
            if not int(starts[j]) <= int(starts[j + 1]) <= self.words.size
            or zlib.crc32(self.words[int(starts[j]):int(starts[j + 1])], seeds[j])
            != int(self.crcs[j])]


def encode(symbols, n_symbols: int, *, chunk_size: int = CHUNK_SIZE,
           precision: int = PRECISION, threads: int | None = None) -> CodedStream:
  """The `CodedStream` of `symbols` (flattened, C order) under their own histogram's model.

  Args:
    symbols: integers in 0..n_symbols-1, any shape.
    n_symbols: K, the alphabet's size, in 1..`MAX_SYMBOLS` (symbols absent from `symbols`
      cost their frequency entry, 16 bits, and nothing else).
    chunk_size: symbols per independently coded chunk.
    precision: n, the bits of the model's probabilities f(s)/2^n (1..`MAX_PRECISION`).
    threads: chunk groups coded in parallel (default: the CPUs this process may use).

  Raises:
    TypeError: `symbols` are not integers, or an option is not an int.
    ValueError: a symbol lies outside 0..n_symbols-1, or an option is out of range.
  """
  n_symbols = _integer("n_symbols", n_symbols, 1, MAX_SYMBOLS)
  chunk_size = _integer("chunk_size", chunk_size, 1, 2**31 - 1)
  symbols = np.asarray(symbols).reshape(-1)
  if symbols.size and not np.issubdtype(symbols.dtype, np.integer):
    raise TypeError(f"symbols must be integers, not {symbols.dtype}")
  if symbols.size and (symbols.min() < 0 or symbols.max() >= n_symbols):
    raise ValueError(f"symbols must lie in 0..{n_symbols - 1}; got "
                     f"{symbols.min()}..{symbols.max()}")
  counts = np.bincount(symbols, minlength=n_symbols) if symbols.size else np.eye(
      1, n_symbols, dtype=np.int64)[0]
  frequencies = quantised_frequencies(counts, precision)
  symbols = np.ascontiguousarray(symbols, _symbol_dtype(n_symbols))
  n_chunks = -(-symbols.size // chunk_size)
  freq, cum = frequencies.astype(np.uint32), _cumulative(frequencies)

  def encode_group(group):
    first, stop = group
    part = symbols[first * chunk_size:stop * chunk_size]
    out = np.empty(part.size + 2 * (stop - first), np.uint32)
    ends = np.empty(stop - first, np.uint64)
    written = native.loops().encode(part, chunk_size, freq, cum, precision, out, ends)
    return out[:written], ends

  groups = _groups(n_chunks, _threads(threads, n_chunks))
  with concurrent.futures.ThreadPoolExecutor(len(groups) or 1) as pool:
    parts = list(pool.map(encode_group, groups))
  shifts = np.cumsum([0] + [words.size for words, _ in parts], dtype=np.uint64)
  words = np.concatenate([words for words, _ in parts] or [np.zeros(0, np.uint32)])
  ends = np.concatenate([ends + shift for (_, ends), shift in zip(parts, shifts)]
                        or [np.zeros(0, np.uint64)])
  stream = CodedStream(words, ends, np.zeros(n_chunks, np.uint32), frequencies, symbols.size,
                       chunk_size, precision)
  starts, seeds = stream._starts(), stream._seeds()
  crcs = [zlib.crc32(words[int(starts[j]):int(starts[j + 1])], seeds[j])
          for j in range(n_chunks)]
  return dataclasses.replace(stream, crcs=np.asarray(crcs, np.uint32))


def corruption(stream: CodedStream, bad: list[int],
               how: str = "fail their CRC-32 or offsets") -> ValueError:
  """The error for the corrupt chunks `bad` of `stream`, saying `how` they fail."""
  shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
  return ValueError(f"the coded stream is corrupt: chunk{'s' if len(bad) > 1 else ''} {shown} "
                    f"of chunks 0..{stream.n_chunks - 1} ({stream.chunk_size} symbols each) "
                    f"{how}")


def decode(stream: CodedStream, *, threads: int | None = None) -> np.ndarray:
  """The symbols of `stream` (uint8 for K ≤ 256, else uint16), once every chunk checks.

  Raises:
    TypeError: `stream` is not a `CodedStream`.
    ValueError: a chunk fails its CRC-32 or offsets (the message lists them), or, which the
      CRCs make unlikely, does not decode to the state the encoder started from.
  """
  if not isinstance(stream, CodedStream):
    raise TypeError(f"stream must be a CodedStream, got {type(stream).__name__}")
  starts = stream._starts()
  table = _decode_table(stream.frequencies)
  out = np.empty(stream.size, _symbol_dtype(stream.n_symbols))
  c = stream.chunk_size

  def decode_group(group):
    first, stop = group
    bad = stream.corrupt_chunks(first, stop)
    if bad:
      return bad, "fail their CRC-32 or offsets"
    failed = native.loops().decode(stream.words, starts[first:stop + 1], c, table, stream.precision,
                             out[first * c:stop * c])
    return ([first + failed], "does not decode to its initial state") if failed >= 0 else ([], "")

  groups = _groups(stream.n_chunks, _threads(threads, stream.n_chunks))
  with concurrent.futures.ThreadPoolExecutor(len(groups) or 1) as pool:
    results = list(pool.map(decode_group, groups))
  bad = [j for chunks, _ in results for j in chunks]
  if bad:
    raise corruption(stream, bad, next(how for chunks, how in results if chunks))
  return out


def _decode_table(frequencies: np.ndarray) -> np.ndarray:
  """table[slot] = s << 32 | f(s) << 16 | (slot - c(s)) for each slot of 0..2^n - 1."""
  symbol = np.repeat(np.arange(frequencies.size), frequencies.astype(np.int64))
  slot = np.arange(symbol.size, dtype=np.uint64)
  f, c = frequencies.astype(np.uint64), _cumulative(frequencies).astype(np.uint64)
  return (symbol.astype(np.uint64) << np.uint64(32)) | (f[symbol] << np.uint64(16)) | (
      slot - c[symbol])
