"""Entropy coding: ideal bits, the chunked rANS codec, compressed storage and its sizes."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from entropy_reference import WEIGHT_SHAPE as _WEIGHT_SHAPE
from entropy_reference import chunk_crcs as _chunk_crcs
from entropy_reference import ideal_rate as _ideal_rate
from entropy_reference import logical_codes as _logical_codes
from entropy_reference import n_values as _n_values
from entropy_reference import rans_chunk as _rans_chunk
from entropy_reference import rans_unchunk as _rans_unchunk
from entropy_reference import scale_bits as _scale_bits
from entropy_reference import student_t as _student_t

import jaxquant as jq
from jaxquant import entropy
from jaxquant.entropy import rans
from jaxquant.fitting import fit_grid


def _skewed(rng, n_symbols, size):
  p = rng.dirichlet(np.full(n_symbols, 0.3))
  return rng.choice(n_symbols, size=size, p=p)


def _chunks(stream):
  starts = np.concatenate([[0], stream.ends]).astype(np.int64)
  return [stream.words[a:b] for a, b in zip(starts, starts[1:])]


def _check_stream(symbols, n_symbols, **options):
  """encode/decode round trip, and every chunk's words and CRC those of the Python reference."""
  symbols = np.asarray(symbols).reshape(-1)
  stream = rans.encode(symbols, n_symbols, **options)
  decoded = rans.decode(stream)
  assert decoded.dtype == (np.uint8 if n_symbols <= 256 else np.uint16)
  np.testing.assert_array_equal(decoded, symbols)
  chunk = stream.chunk_size
  pieces = [symbols[i:i + chunk] for i in range(0, symbols.size, chunk)]
  chunks = _chunks(stream)
  assert len(chunks) == len(pieces) == stream.n_chunks
  for piece, words in zip(pieces, chunks):
    assert words.tolist() == _rans_chunk(piece, stream.frequencies, stream.precision)
    assert _rans_unchunk(words, piece.size, stream.frequencies, stream.precision) == piece.tolist()
  assert stream.crcs.tolist() == _chunk_crcs(chunks, stream.frequencies, symbols.size, chunk,
                                             stream.precision)
  assert stream.storage_bits == 32 * stream.words.size + 96 * stream.n_chunks + 16 * n_symbols
  return stream


_STREAMS = {
    "random-16": lambda rng: (rng.integers(0, 16, 5000), 16),
    "constant": lambda rng: (np.full(3000, 5), 9),
    "two-symbol": lambda rng: (rng.choice(2, 4000, p=[0.999, 0.001]), 2),
    "skewed-256": lambda rng: (_skewed(rng, 256, 6000), 256),
    "wide-alphabet": lambda rng: (rng.integers(0, 3000, 4000), 5000),
    "lone-rare-symbol": lambda rng: (np.eye(1, 4000, 1234, dtype=np.int64)[0], 2),
}


@pytest.mark.parametrize("name", sorted(_STREAMS))
def test_rans_round_trip_matches_the_reference(name):
  symbols, n_symbols = _STREAMS[name](np.random.default_rng(len(name)))
  _check_stream(symbols, n_symbols, chunk_size=1024)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 129, 3 * 128, 3 * 128 + 1])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_rans_every_chunk_edge(size, threads):
  symbols = np.random.default_rng(size).integers(0, 7, size)
  stream = _check_stream(symbols, 7, chunk_size=128, threads=threads)
  assert stream.n_chunks == math.ceil(size / 128)


def test_rans_chunks_of_one_symbol_and_every_precision():
  symbols = np.random.default_rng(3).integers(0, 3, 40)
  _check_stream(symbols, 3, chunk_size=1)
  for precision in (2, 5, 12, 15):
    _check_stream(symbols, 3, chunk_size=16, precision=precision)


def test_quantised_frequencies_are_optimal():
  # Against every allocation of the 2^n units with f ≥ 1 exactly on the present symbols.
  rng = np.random.default_rng(0)
  for counts in ([5, 0, 1, 30], [1, 1, 1, 1], [100, 1, 0, 1], rng.integers(0, 50, 5)):
    counts = np.asarray(counts)
    present = np.flatnonzero(counts)
    total = 16
    best = min((c for c in itertools.product(range(1, total + 1), repeat=present.size)
                if sum(c) == total),
               key=lambda c: -np.sum(counts[present] * np.log2(np.asarray(c) / total)))
    f = rans.quantised_frequencies(counts, 4)
    assert f.sum() == total and np.all((f > 0) == (counts > 0))
    cost = lambda f: -np.sum(counts[present] * np.log2(np.asarray(f)[present] / total))
    optimum = np.zeros(counts.size)
    optimum[present] = best
    np.testing.assert_allclose(cost(f), cost(optimum), rtol=1e-12)
  with pytest.raises(ValueError, match=r"more than the 2\^2 units"):
    rans.quantised_frequencies([1] * 5, 2)
  with pytest.raises(ValueError, match="at least one of them positive"):
    rans.quantised_frequencies([0, 0], 4)
  with pytest.raises(ValueError, match="precision=16"):
    rans.quantised_frequencies([1], 16)


@pytest.mark.parametrize("n_symbols", [16, 255])
def test_rans_within_half_a_percent_of_the_ideal_rate(n_symbols):
  # The Normal's codes on a uniform grid of n_symbols points spanning ±4 sigma.
  rng = np.random.default_rng(n_symbols)
  x = rng.standard_normal(2**20)
  symbols = np.clip(np.round((x + 4) / 8 * (n_symbols - 1)), 0, n_symbols - 1).astype(np.int64)
  stream = rans.encode(symbols, n_symbols)
  ideal = entropy.ideal_bits(symbols, n_symbols)
  assert ideal <= stream.storage_bits <= 1.005 * ideal


def test_rans_refuses_bad_input():
  with pytest.raises(ValueError, match="symbols must lie in 0..3"):
    rans.encode([0, 4], 4)
  with pytest.raises(TypeError, match="symbols must be integers"):
    rans.encode([0.5], 4)
  with pytest.raises(ValueError, match="n_symbols=0"):
    rans.encode([0], 0)
  with pytest.raises(ValueError, match="chunk_size=0"):
    rans.encode([0], 1, chunk_size=0)
  with pytest.raises(TypeError, match="stream must be a CodedStream"):
    rans.decode(b"")


@pytest.fixture(scope="module")
def five_chunks():
  symbols = _skewed(np.random.default_rng(5), 16, 4 * 1000 + 500)
  return symbols, rans.encode(symbols, 16, chunk_size=1000)


def _tampered(stream, **arrays):
  """`stream` with arrays replaced, its frozen fields bypassed (as a corrupt file would be)."""
  tampered = dataclasses.replace(stream)
  for name, array in arrays.items():
    object.__setattr__(tampered, name, array)
  return tampered


@pytest.mark.parametrize("chunk", [0, 2, 4])
def test_rans_refuses_a_flipped_bit_in_any_chunk(five_chunks, chunk):
  symbols, stream = five_chunks
  words = np.array(stream.words)
  start = 0 if chunk == 0 else int(stream.ends[chunk - 1])
  for word in (start, start + 1, int(stream.ends[chunk]) - 1):  # state, first and last word
    flipped = words.copy()
    flipped[word] ^= np.uint32(1 << 17)
    with pytest.raises(ValueError, match=rf"chunk {chunk} of chunks 0\.\.4 \(1000 symbols "
                       r"each\) fail their CRC-32"):
      rans.decode(_tampered(stream, words=flipped))
  np.testing.assert_array_equal(rans.decode(stream), symbols)


def test_rans_refuses_moved_truncated_and_reframed_chunks(five_chunks):
  symbols, stream = five_chunks
  chunks = _chunks(stream)
  swapped = np.concatenate([chunks[1], chunks[0], *chunks[2:]])
  ends = np.cumsum([chunks[1].size, chunks[0].size] + [c.size for c in chunks[2:]])
  with pytest.raises(ValueError, match="chunks 0, 1 of"):
    rans.decode(_tampered(stream, words=swapped, ends=ends.astype(np.uint64)))
  with pytest.raises(ValueError, match="chunk 4 of"):
    rans.decode(_tampered(stream, words=stream.words[:-1]))
  # Another model or length: every chunk's context differs.
  other = np.array(stream.frequencies)
  other[0], other[1] = other[0] + 1, other[1] - 1
  with pytest.raises(ValueError, match="chunks 0, 1, 2, 3, 4 of"):
    rans.decode(_tampered(stream, frequencies=other))
  with pytest.raises(ValueError, match="1000 symbols in chunks"):
    dataclasses.replace(stream, size=1000)


def test_rans_decoder_checks_its_final_state(five_chunks):
  # A flipped bit whose CRCs were recomputed (corruption before the checks were taken) still
  # fails the decoder's own check: chunk 3 no longer ends in the state it started from.
  symbols, stream = five_chunks
  chunks = _chunks(stream)
  chunks[3] = chunks[3].copy()
  chunks[3][chunks[3].size // 2] ^= np.uint32(1 << 5)
  words = np.concatenate(chunks)
  ends = np.cumsum([c.size for c in chunks]).astype(np.uint64)
  crcs = np.asarray(_chunk_crcs(chunks, stream.frequencies, stream.size, 1000, stream.precision),
                    np.uint32)
  forged = dataclasses.replace(stream, words=words, ends=ends, crcs=crcs)
  with pytest.raises(ValueError, match="chunk 3 of .* does not decode to its initial state"):
    rans.decode(forged)


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
  # The stream codes the logical codes over the format's values (the codebook's padding to
  # 2**bits entries is no symbol); the storage is the stream + the scales as stored.
  codes = _logical_codes(q).reshape(-1)
  stream = compressed.stream
  assert stream.n_symbols == _n_values(q)
  np.testing.assert_array_equal(rans.decode(stream), codes)
  assert compressed.scale_bits == _scale_bits(q)
  assert compressed.storage_bits == stream.storage_bits + _scale_bits(q)
  assert compressed.bits_per_param == compressed.storage_bits / codes.size
  assert compressed.fixed_bits_per_param == q.bits_per_param == decoded.bits_per_param
  np.testing.assert_allclose(compressed.ideal_bits_per_param, _ideal_rate(q), rtol=1e-12)
  size = entropy.coded_size(q)
  assert size["rans_bits_per_param"] == compressed.bits_per_param
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
    "uint4-minmax-block32-axis0": ((70, 30), lambda x: jq.QuantSpec("uint4", block_size=32,
                                                                     axis=0)),
    "uint3-minmax-double-quant": ((64, 40), lambda x: jq.QuantSpec(
        "uint3", block_size=16, axis=0, double_quant=True)),
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
    compressed.stream = None
  with pytest.raises(ValueError, match="read-only"):
    compressed.stream.words[0] = 0


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
  assert compressed.stream.n_symbols == 7 and compressed.stream.frequencies.size == 7
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


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape, axis, block_size", [((70, 5), 0, 16), ((3, 41, 2), 1, 64),
                                                     ((4, 96), -1, 32)])
def test_packed_words_match_the_packing_reference(bits, shape, axis, block_size):
  # The host loop against jaxquant.packing.pack of the codes padded as documented: the last
  # block's padding takes the code nearest 0, then zeros to a whole group of 32.
  rng = np.random.default_rng(bits)
  codebook = np.linspace(-1.0, 1.0, 2**bits, dtype=np.float32) if bits > 1 else np.array(
      [0.0, 1.0], np.float32)
  codes = rng.integers(0, 2**bits, shape)
  n = shape[axis]
  blocks = -(-n // block_size) * block_size
  zero_code = int(np.argmin(np.abs(codebook)))
  pad = [(0, 0)] * len(shape)
  pad[axis] = (0, blocks - n)
  padded = np.pad(codes, pad, constant_values=zero_code)
  pad[axis] = (0, -blocks % 32)
  expected = jq.packing.pack(jnp.asarray(np.pad(padded, pad), jnp.uint32), bits, axis)
  actual = jq.entropy.symbols.packed_words(codes, codebook, axis, block_size, bits)
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), strict=True)
