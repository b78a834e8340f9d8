"""Entropy coding: ideal bits, canonical Huffman, compressed storage and its sizes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from entropy_reference import CHUNK_BYTES as _CHUNK_BYTES
from entropy_reference import WEIGHT_SHAPE as _WEIGHT_SHAPE
from entropy_reference import framed_payload as _framed_payload
from entropy_reference import ideal_rate as _ideal_rate
from entropy_reference import logical_codes as _logical_codes
from entropy_reference import n_values as _n_values
from entropy_reference import scale_bits as _scale_bits
from entropy_reference import student_t as _student_t

import jaxquant as jq
from jaxquant import entropy
from jaxquant.fitting import fit_grid


def _skewed(rng, n_symbols, size):
  p = rng.dirichlet(np.full(n_symbols, 0.3))
  return rng.choice(n_symbols, size=size, p=p)


@pytest.mark.parametrize("n_symbols", [1, 2, 7, 64, 256])
def test_huffman_round_trip(n_symbols):
  rng = np.random.default_rng(n_symbols)
  codes = _skewed(rng, n_symbols, 20_000)
  code = entropy.HuffmanCode.from_counts(np.bincount(codes, minlength=n_symbols))
  data = code.encode(codes)
  assert len(data) == -(-code.encoded_bits(codes) // 8)
  np.testing.assert_array_equal(code.decode(data, codes.size), codes)
  assert code.table_bits == entropy.LENGTH_FIELD_BITS * n_symbols


def test_huffman_single_present_symbol_and_deterministic():
  codes = np.full(1000, 3)
  code = entropy.HuffmanCode.from_counts(np.bincount(codes, minlength=10))
  assert code.lengths.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(code.decode(code.encode(codes), codes.size), codes)
  # Ties break by symbol, then merge order: the lengths and canonical codewords are fixed.
  tied = entropy.HuffmanCode.from_counts([5, 5, 5, 5, 1, 1])
  assert tied.lengths.tolist() == [3, 2, 2, 2, 4, 4]
  expected = "00011011011101111"  # codewords 00 01 10 110 1110 1111 of symbols 1, 2, 3, 0, 4, 5
  assert np.unpackbits(np.frombuffer(tied.encode([1, 2, 3, 0, 4, 5]), np.uint8))[:17].tolist() == [
      int(bit) for bit in expected]
  with pytest.raises(ValueError, match="no codeword"):
    code.encode([0])
  with pytest.raises(ValueError, match="fewer than"):
    code.decode(code.encode(codes[:8]), 9)


def test_huffman_length_limit():
  counts = np.array([1, 1] + [int(1.7**k) for k in range(2, 60)])  # Fibonacci-like: deep tree
  code = entropy.HuffmanCode.from_counts(counts)
  assert code.lengths.max() <= entropy.MAX_CODE_LENGTH
  codes = np.arange(counts.size)
  np.testing.assert_array_equal(code.decode(code.encode(codes), codes.size), codes)


def test_huffman_near_entropy_on_smooth_distribution():
  rng = np.random.default_rng(0)
  codes = np.clip(np.round(rng.standard_normal(10**6) * 20 + 128), 0, 255).astype(np.int64)
  counts = np.bincount(codes, minlength=256)
  code = entropy.HuffmanCode.from_counts(counts)
  p = counts[counts > 0] / codes.size
  entropy_bits = -codes.size * np.sum(p * np.log2(p))
  payload = code.encoded_bits(codes)
  assert entropy_bits <= payload <= 1.01 * entropy_bits
  np.testing.assert_array_equal(code.decode(code.encode(codes), codes.size), codes)


def test_ideal_bits_matches_direct_computation():
  rng = np.random.default_rng(1)
  codes = _skewed(rng, 50, (300, 7))
  counts = np.bincount(codes.reshape(-1), minlength=60)
  p = (counts + 1) / (codes.size + 60)
  np.testing.assert_allclose(entropy.ideal_bits(codes, 60), -np.sum(np.log2(p[codes])), rtol=1e-12)
  with pytest.raises(ValueError, match="codes"):
    entropy.ideal_bits([0, 60], 60)
  with pytest.raises(ValueError, match="n_symbols"):
    entropy.ideal_bits([0], 0)


def _assert_identical(a, b):
  """Every leaf equal bit for bit (dtype and shape included), and every static field equal."""
  for field in dataclasses.fields(jq.QuantisedArray):
    left, right = getattr(a, field.name), getattr(b, field.name)
    if isinstance(left, jax.Array) or isinstance(right, jax.Array):
      left, right = np.asarray(left), np.asarray(right)
      assert (left.dtype, left.shape) == (right.dtype, right.shape), field.name
      same_width = np.dtype(f"u{left.dtype.itemsize}")
      np.testing.assert_array_equal(left.view(same_width), right.view(same_width), field.name)
    else:
      assert left == right, field.name


def _check_compressed(q):
  """compress(q) decompresses to q bit for bit, and its sizes match independent counts."""
  compressed = entropy.compress(q)
  decoded = compressed.decompress()
  _assert_identical(decoded, q)
  np.testing.assert_array_equal(np.asarray(decoded.dequantise()), np.asarray(q.dequantise()))
  # The payload is the Huffman stream in whole bytes and its CRC-32 checks; the storage is the
  # payload + 5-bit code lengths, one per value of the format (the codebook's padding to
  # 2**bits entries is no symbol) + the scales as stored.
  codes = _logical_codes(q).reshape(-1)
  n_symbols = _n_values(q)
  code = entropy.HuffmanCode.from_counts(np.bincount(codes, minlength=n_symbols))
  stream = code.encode(codes)
  assert len(stream) == -(-int(np.sum(code.lengths[codes])) // 8)
  payload = _framed_payload(stream, code.lengths, q.shape)
  assert compressed.payload == payload
  expected = 8 * len(payload) + 5 * n_symbols + _scale_bits(q)
  assert compressed.scale_bits == _scale_bits(q)
  assert compressed.storage_bits == expected
  assert compressed.bits_per_param == expected / codes.size
  assert compressed.fixed_bits_per_param == q.bits_per_param == decoded.bits_per_param
  np.testing.assert_allclose(compressed.ideal_bits_per_param, _ideal_rate(q), rtol=1e-12)
  size = entropy.coded_size(q)
  assert size["huffman_bits_per_param"] == compressed.bits_per_param
  assert size["fixed_bits_per_param"] == q.bits_per_param
  np.testing.assert_allclose(size["ideal_bits_per_param"], _ideal_rate(q), rtol=1e-12)
  assert f"bits_per_param={compressed.bits_per_param:.4f}" in repr(compressed)
  assert f"fixed_bits_per_param={q.bits_per_param:.4f}" in repr(compressed)
  return decoded


# (shape, spec factory): every granularity; axes 0, -1 and a middle one; 2-, 3-, 4- and 8-bit
# codes; odd grids and fixed formats; lengths along the axis that are not multiples of 32 or of
# the block size; every scale storage, second-level scales included; codebooks padded to 2**bits
# entries (uniform_grid(7), fit_grid's grids). One more odd grid from fit_grid (per block,
# absmax) is checked with `_check_compressed` further down.
_ROUND_TRIPS = {
    "nf4-block64-axis0": ((100, 45), lambda x: jq.QuantSpec("nf4", block_size=64, axis=0)),
    "int2-channel": ((9, 70), lambda x: jq.QuantSpec("int2", block_size="channel", axis=-1)),
    "grid7-tensor-axis0": ((37, 20), lambda x: jq.QuantSpec(
        jq.formats.uniform_grid(7), block_size="tensor", axis=0)),
    "int8-double-quant-block16-axis0": ((50, 40), lambda x: jq.QuantSpec(
        "int8", block_size=16, axis=0, double_quant=True)),
    "int3-signmax-block48-axis1": ((3, 100, 7), lambda x: jq.QuantSpec(
        "int3", block_size=48, scaling="signmax", axis=1)),
    "nf4-e4m3-channel-axis0": ((70, 6), lambda x: jq.QuantSpec(
        "nf4", block_size="channel", scale_dtype="float8_e4m3fn", axis=0)),
    "nf4-e8m0-block32": ((5, 90), lambda x: jq.QuantSpec(
        "nf4", block_size=32, scale_dtype="e8m0", axis=-1)),
    "fit-grid-tensor-absmax": ((2**16,), lambda x: fit_grid(
        x, 2.5, scaling="absmax")[1]),
    "fit-grid-block32-rms": ((40, 200), lambda x: fit_grid(
        x, 3.5, scaling="rms", block_size=32)[1]),
}


@pytest.mark.parametrize("name", sorted(_ROUND_TRIPS))
def test_compress_round_trip_and_sizes(name):
  shape, make_spec = _ROUND_TRIPS[name]
  x = _student_t(shape)
  _check_compressed(jq.quantise(x, make_spec(x)))


def test_compress_rejects_foreign_padding_and_non_arrays():
  x = _student_t((100, 45))
  q = jq.quantise(x, jq.QuantSpec("nf4", block_size=64, axis=0))
  # Rows 100..127 are padding: the last word row holds only padding codes.
  tampered = dataclasses.replace(q, codes=q.codes.at[-1].set(jnp.uint32(0xFFFFFFFF)))
  np.testing.assert_array_equal(np.asarray(tampered.dequantise()), np.asarray(q.dequantise()))
  with pytest.raises(ValueError, match="padding"):
    entropy.compress(tampered)
  with pytest.raises(TypeError, match="q must be a QuantisedArray"):
    entropy.compress(x)
  with pytest.raises(TypeError, match="q must be a QuantisedArray"):
    entropy.coded_size(x)


def test_compressed_arrays_are_read_only():
  q = jq.quantise(_student_t((4, 64)), jq.QuantSpec("nf4", block_size=32, axis=-1))
  compressed = entropy.compress(q)
  with pytest.raises(ValueError, match="read-only"):
    compressed.scales[0, 0] = 0
  with pytest.raises(TypeError):
    compressed.metadata["axis"] = 0
  with pytest.raises(dataclasses.FrozenInstanceError):
    compressed.payload = b""


def test_decompressed_array_runs_qmatmul():
  w = _student_t(_WEIGHT_SHAPE)
  _, spec = fit_grid(w, 3.5, scaling="absmax", block_size=64, axis=0)
  q = jq.quantise(w, spec)
  decoded = _check_compressed(q)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 200)), jnp.float32)
  y = jq.qmatmul(x, decoded)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jq.qmatmul(x, q)))
  expected = np.asarray(x, np.float64) @ np.asarray(decoded.dequantise(), np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected,
                             atol=1e-5 * np.abs(expected).max())


def test_codebook_padding_costs_nothing():
  # A 7-point grid in 3 bits: the codebook is padded to 8 entries, the last value repeated.
  x = _student_t((64, 50))
  q = jq.quantise(x, jq.QuantSpec(jq.formats.uniform_grid(7), block_size=16, axis=0))
  codebook = np.asarray(q.codebook)
  assert codebook.shape == (8,) and codebook[7] == codebook[6] and _n_values(q) == 7
  compressed = entropy.compress(q)
  assert compressed.code.n_symbols == 7 and compressed.code.table_bits == 5 * 7
  # The ideal rate smooths over the 7 values; an 8th, never-occurring symbol would cost more.
  size = entropy.coded_size(q)
  np.testing.assert_allclose(size["ideal_bits_per_param"], _ideal_rate(q, 7), rtol=1e-12)
  assert size["ideal_bits_per_param"] < _ideal_rate(q, 8)
  # Codes that point at the padding are not codes quantise writes.
  codes = np.array(jq.packing.unpack(q.codes, q.bits, q.axis))
  codes[0, 0] = 7
  tampered = dataclasses.replace(q, codes=jq.packing.pack(jnp.asarray(codes, jnp.uint32), q.bits,
                                                          q.axis))
  with pytest.raises(ValueError, match="codebook's padding"):
    entropy.compress(tampered)
  with pytest.raises(ValueError, match="codebook's padding"):
    entropy.coded_size(tampered)


@pytest.fixture(scope="module")
def multi_chunk():
  """(q, compress(q), its stream length): a payload of 5 chunks, the last one partial."""
  q = jq.quantise(_student_t((300, 256)), jq.QuantSpec("nf4", block_size=64, axis=0))
  compressed = entropy.compress(q)
  stream_bytes = int.from_bytes(compressed.payload[-12:-4], "big")  # The footer's length field.
  assert compressed.payload == _framed_payload(compressed.payload[:stream_bytes],
                                               compressed.code.lengths, q.shape)
  assert -(-stream_bytes // _CHUNK_BYTES) == 5 and stream_bytes % _CHUNK_BYTES
  return q, compressed, stream_bytes


def _refused(compressed, payload, message):
  """A payload is refused when the array is built, and by `decompress` on an array whose
  payload changed after it was built (the frozen dataclass bypassed)."""
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(compressed, payload=payload)
  tampered = dataclasses.replace(compressed)
  object.__setattr__(tampered, "payload", payload)
  with pytest.raises(ValueError, match=message):
    tampered.decompress()


# Flipped bits as (payload byte, bit) pairs, from the stream's and the payload's lengths, and
# the chunks the message must name (or "length"/"context": the footer's field that is hit).
_FLIPS = {
    "stream-start": (lambda stream, total: [(0, 7)], [0]),
    "middle-of-chunk-2": (lambda stream, total: [(2 * _CHUNK_BYTES + 4000, 3)], [2]),
    "last-stream-byte": (lambda stream, total: [(stream - 1, 0)], [4]),
    "two-chunks": (lambda stream, total: [(_CHUNK_BYTES + 17, 1), (3 * _CHUNK_BYTES + 5, 6)],
                   [1, 3]),
    "crc-of-chunk-3": (lambda stream, total: [(stream + 4 * 3 + 2, 4)], [3]),
    "length-field": (lambda stream, total: [(total - 12 + 7, 0)], "length"),
    "context-crc": (lambda stream, total: [(total - 1, 5)], "context"),
}


@pytest.mark.parametrize("name", sorted(_FLIPS))
def test_decompress_refuses_a_payload_with_flipped_bits(multi_chunk, name):
  q, compressed, stream_bytes = multi_chunk
  flips, expected = _FLIPS[name]
  payload = bytearray(compressed.payload)
  for byte, bit in flips(stream_bytes, len(payload)):
    payload[byte] ^= 1 << bit
  payload = bytes(payload)
  if name == "middle-of-chunk-2":  # Unchecked, the flip decodes to other codes without a word.
    decoded = compressed.code.decode(payload[:stream_bytes], q.size)
    assert np.any(decoded != _logical_codes(q).reshape(-1))
  if expected == "length":
    message = "its footer records a .*-byte stream.*truncated or extended, or its length field"
  elif expected == "context":
    message = r"context CRC-32 does not match its code lengths and shape \(300, 256\)"
  else:
    chunks = ", ".join(map(str, expected))
    start = expected[0] * _CHUNK_BYTES
    end = min(start + _CHUNK_BYTES, stream_bytes) - 1
    message = (rf"the payload is corrupt: chunks? {chunks} of chunks 0\.\.4 \(8192 stream bytes "
               rf"each\) fails? CRC-32; chunk {expected[0]} spans stream bytes {start}\.\.{end}$")
  _refused(compressed, payload, message)


@pytest.mark.parametrize("change", ["drop-1", "drop-footer-and-more", "keep-5", "empty", "append-1",
                                    "append-a-copy-of-the-footer"])
def test_decompress_refuses_a_truncated_or_extended_payload(multi_chunk, change):
  _, compressed, _ = multi_chunk
  payload = compressed.payload
  payload = {"drop-1": payload[:-1], "drop-footer-and-more": payload[:-20], "keep-5": payload[:5],
             "empty": b"", "append-1": payload + b"\0",
             "append-a-copy-of-the-footer": payload + payload[-12:]}[change]
  message = (f"the payload is {len(payload)} bytes, shorter than its 12-byte footer"
             if len(payload) < 12 else
             f"the payload is {len(payload)} bytes, but its footer records a .*truncated or "
             "extended")
  _refused(compressed, payload, message)


def test_decompress_refuses_a_reframed_stream_too_short_for_the_shape(multi_chunk):
  """A shorter stream framed with valid checks is refused by the decoder, not read short."""
  q, compressed, stream_bytes = multi_chunk
  short = _framed_payload(compressed.payload[:stream_bytes - 100], compressed.code.lengths,
                          q.shape)
  with pytest.raises(ValueError, match=f"fewer than n={q.size} codewords"):
    dataclasses.replace(compressed, payload=short).decompress()


def test_a_payload_is_refused_with_another_code_or_shape(multi_chunk):
  q, compressed, _ = multi_chunk
  other = entropy.compress(jq.quantise(_student_t((300, 256), seed=3) ** 3,
                                       jq.QuantSpec("nf4", block_size=64, axis=0)))
  assert other.code.n_symbols == compressed.code.n_symbols
  assert not np.array_equal(other.code.lengths, compressed.code.lengths)
  message = "context CRC-32 does not match its code lengths and shape"
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(compressed, code=other.code)
  with pytest.raises(ValueError, match=rf"{message} \(256, 300\)"):
    dataclasses.replace(compressed, metadata={**compressed.metadata, "shape": (256, 300)})
  _assert_identical(dataclasses.replace(compressed).decompress(), q)
