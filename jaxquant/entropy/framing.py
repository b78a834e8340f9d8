"""The payload of an `EntropyCodedArray`: its Huffman stream framed with CRC-32 checks.

A Huffman stream has no redundancy, so a flipped bit decodes to other codes without a word.
The payload therefore carries checksums. Its layout, in bytes (integers big-endian)::

  payload = stream ‖ crc(chunk 0) ‖ … ‖ crc(chunk m-1) ‖ S ‖ crc(context)

- ``stream``: the S bytes of `HuffmanCode.encode` (the codewords, MSB-first, zero-padded).
- ``chunk i`` = stream[i·C, (i+1)·C), C = `CHUNK_BYTES`, m = ⌈S/C⌉; each CRC takes 4 bytes.
- ``S``: the stream's length, 8 bytes (`LENGTH_BYTES`): the payload is S + 4m + 12 bytes long.
- ``context``: the code's lengths (one byte per symbol) ‖ the array's shape (8 bytes per axis)
  ‖ the 8 bytes of S: what the decoder needs besides the stream to read the codes.

The CRC-32 is zlib's `zlib.crc32` (the ISO-HDLC / IEEE 802.3 CRC: polynomial 0x04C11DB7,
reflected, initial value and final XOR 0xFFFFFFFF; RFC 1952 §8). It detects every burst of at
most 32 bits and, in words of at most 91 607 bits, every error of at most 3 bits (Hamming
distance 4; Koopman 2002, "32-Bit Cyclic Redundancy Codes for Internet Applications", DSN,
Table 1); C = 8192 bytes = 65 536 bits keeps every chunk within that bound. Other errors pass
a chunk's check with probability about 2^-32.

Cost: 32·⌈S/C⌉ + 96 bits per array, that is 1/2048 of the stream's bits (0.002 bits per
element at 4 bits per element) plus 96 bits.
"""

from __future__ import annotations

import zlib

import numpy as np

from jaxquant.entropy.huffman import HuffmanCode

CHUNK_BYTES = 8192
CRC_BYTES = 4
LENGTH_BYTES = 8
_FOOTER_BYTES = LENGTH_BYTES + CRC_BYTES


def framed_length(stream_bytes: int) -> int:
  """S + 4·⌈S/C⌉ + 12: the bytes of the payload of an S-byte stream."""
  return stream_bytes + CRC_BYTES * -(-stream_bytes // CHUNK_BYTES) + _FOOTER_BYTES


def _crc(data) -> bytes:
  return zlib.crc32(data).to_bytes(CRC_BYTES, "big")


def _chunk_crcs(stream: memoryview) -> list[bytes]:
  return [_crc(stream[start:start + CHUNK_BYTES]) for start in range(0, len(stream), CHUNK_BYTES)]


def _context(code: HuffmanCode, shape: tuple[int, ...], length: bytes) -> bytes:
  return (np.asarray(code.lengths, np.uint8).tobytes() + np.asarray(shape, ">u8").tobytes()
          + length)


def frame(stream: bytes, code: HuffmanCode, shape: tuple[int, ...]) -> bytes:
  """The payload of `stream`, the Huffman stream of an array of `shape` coded with `code`."""
  stream = memoryview(stream)
  length = len(stream).to_bytes(LENGTH_BYTES, "big")
  return b"".join([stream, *_chunk_crcs(stream), length, _crc(_context(code, shape, length))])


def _listed(numbers: list[int]) -> str:
  shown = ", ".join(map(str, numbers[:8]))
  return shown + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")


def verified_stream(payload: bytes, code: HuffmanCode, shape: tuple[int, ...]) -> memoryview:
  """The Huffman stream of `payload`, once its length and every checksum are verified.

  Raises:
    ValueError: the payload is shorter than its footer, or its length disagrees with the
      stream length it records (truncated, extended, or a corrupt length field); its context
      checksum disagrees with `code` and `shape` (another array's payload, or a corrupt
      footer); or a chunk fails its CRC-32 (the message lists the corrupt chunks and the
      stream bytes they span).
  """
  payload = memoryview(payload)
  if len(payload) < _FOOTER_BYTES:
    raise ValueError(f"the payload is {len(payload)} bytes, shorter than its "
                     f"{_FOOTER_BYTES}-byte footer: it is truncated")
  length = payload[-_FOOTER_BYTES:-CRC_BYTES]
  stream_bytes = int.from_bytes(length, "big")
  if len(payload) != framed_length(stream_bytes):
    raise ValueError(f"the payload is {len(payload)} bytes, but its footer records a "
                     f"{stream_bytes}-byte stream, whose payload is {framed_length(stream_bytes)} "
                     "bytes: the payload is truncated or extended, or its length field is corrupt")
  if _crc(_context(code, shape, length.tobytes())) != payload[-CRC_BYTES:]:
    raise ValueError(f"the payload's context CRC-32 does not match its code lengths and shape "
                     f"{tuple(shape)}: the payload belongs to another code or shape, or its "
                     "footer is corrupt")
  data = payload[:stream_bytes]
  stored = payload[stream_bytes:-_FOOTER_BYTES]
  corrupt = [i for i, crc in enumerate(_chunk_crcs(data))
             if crc != stored[CRC_BYTES * i:CRC_BYTES * (i + 1)]]
  if corrupt:
    start = corrupt[0] * CHUNK_BYTES
    end = min(start + CHUNK_BYTES, stream_bytes) - 1
    chunks, fail = ("chunk", "fails") if len(corrupt) == 1 else ("chunks", "fail")
    raise ValueError(f"the payload is corrupt: {chunks} {_listed(corrupt)} of chunks "
                     f"0..{len(stored) // CRC_BYTES - 1} ({CHUNK_BYTES} stream bytes each) {fail} "
                     f"CRC-32; chunk {corrupt[0]} spans stream bytes {start}..{end}")
  return data
