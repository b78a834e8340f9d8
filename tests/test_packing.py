"""Tests for jaxquant.packing against an independent numpy bit-stream reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant import packing
from jaxquant.packing import GROUP, LAYOUT, LAYOUT_VERSION, pack, packed_length, unpack

ALL_BITS = range(1, 9)
# (shape, axis): 1-d, 2-d and 3-d codes, packed along every position, with
# odd and unit lengths on the other axes.
CASES = [
    ((64,), 0),
    ((96,), -1),
    ((32, 3), 0),
    ((7, 64), 1),
    ((7, 64), -1),
    ((3, 96, 1), 1),
    ((1, 7, 32), -1),
    ((64, 5, 3), 0),
    ((0, 4), 0),
]


def reference_pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """The layout, written the obvious way: an explicit little-endian bit stream."""
  c = np.moveaxis(codes.astype(np.uint64), axis, -1)
  lead, n = c.shape[:-1], c.shape[-1]
  # stream[..., g, t] is stream bit t of group g: bit t % bits of code t // bits.
  code_bits = (c[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
  stream = code_bits.reshape(lead + (n // 32, 32 * bits))
  # Stream bit t is bit t % 32 of word t // 32 of the group.
  word_bits = stream.reshape(lead + (n // 32, bits, 32))
  words = (word_bits << np.arange(32, dtype=np.uint64)).sum(axis=-1).astype(np.uint32)
  return np.moveaxis(words.reshape(lead + (n * bits // 32,)), -1, axis)


def random_codes(shape, bits: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 2**bits, size=shape).astype(dtype)


def test_constants():
  assert (LAYOUT, LAYOUT_VERSION, GROUP) == ("bitstream-u32", 1, 32)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_pack_matches_reference(bits, shape, axis):
  codes = random_codes(shape, bits, seed=bits)
  words = pack(jnp.asarray(codes), bits, axis)
  expected = reference_pack(codes, bits, axis)
  out_shape = list(shape)
  out_shape[axis] = shape[axis] * bits // 32
  assert words.dtype == jnp.uint32
  assert words.shape == tuple(out_shape) == expected.shape
  np.testing.assert_array_equal(np.asarray(words), expected)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_round_trip(bits, shape, axis, jit):
  codes = random_codes(shape, bits, seed=100 + bits)
  pack_fn, unpack_fn = pack, unpack
  if jit:
    pack_fn = jax.jit(pack, static_argnums=(1, 2))
    unpack_fn = jax.jit(unpack, static_argnums=(1, 2))
  words = pack_fn(jnp.asarray(codes), bits, axis)
  out = unpack_fn(words, bits, axis)
  assert out.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(out), codes)


def test_known_words():
  # 4-bit: eight codes per word, code 0 in the low nibble.
  words = pack(jnp.arange(32, dtype=jnp.int32) % jnp.int32(16), 4)
  assert words.tolist() == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]
  # 3-bit: code 10 occupies stream bits 30..32, straddling words 0 and 1;
  # code 21 occupies bits 63..65, straddling words 1 and 2.
  codes = np.zeros(32, np.uint8)
  codes[10] = 0b101
  assert pack(jnp.asarray(codes), 3).tolist() == [0x40000000, 0x1, 0x0]
  codes[10], codes[21] = 0, 0b011
  assert pack(jnp.asarray(codes), 3).tolist() == [0x0, 0x80000000, 0x1]


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_straddling_codes(bits):
  # Every code that crosses a word boundary, set alone to all ones.
  for i in range(32):
    if (i * bits) // 32 == (i * bits + bits - 1) // 32:
      continue
    codes = np.zeros(32, np.uint8)
    codes[i] = 2**bits - 1
    words = pack(jnp.asarray(codes), bits)
    np.testing.assert_array_equal(np.asarray(words), reference_pack(codes, bits, 0))
    np.testing.assert_array_equal(np.asarray(unpack(words, bits)), codes)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32])
def test_integer_dtypes(dtype):
  codes = random_codes((4, 64), 5, dtype=dtype)
  words = pack(jnp.asarray(codes), 5, 1)
  np.testing.assert_array_equal(np.asarray(words), reference_pack(codes, 5, 1))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_high_bits_are_masked(bits):
  codes = random_codes((3, 64), bits, seed=7, dtype=np.int32)
  noise = np.random.default_rng(8).integers(-3, 4, size=codes.shape).astype(np.int32) << bits
  expected = np.asarray(pack(jnp.asarray(codes), bits))
  np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(codes + noise), bits)), expected)


@pytest.mark.parametrize(("bits", "mib"), [(4, 8), (3, 6)])
def test_storage_is_dense(bits, mib):
  codes = jnp.asarray(random_codes((4096, 4096), bits))
  words = pack(codes, bits, axis=0)
  assert words.shape == (4096 * bits // 32, 4096)
  assert words.on_device_size_in_bytes() == mib * 2**20
  assert bool(jnp.array_equal(unpack(words, bits, axis=0), codes.astype(jnp.uint32)))


def test_packed_length():
  assert [packed_length(64, b) for b in ALL_BITS] == [2 * b for b in ALL_BITS]
  assert packed_length(0, 3) == 0
  for n in (33, -32, 32.0):
    with pytest.raises(ValueError, match="n="):
      packed_length(n, 4)
  with pytest.raises(ValueError, match="bits"):
    packed_length(32, 9)


@pytest.mark.parametrize("fn", [pack, unpack])
@pytest.mark.parametrize(
    ("bits", "error"),
    [(0, ValueError), (9, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError),
     ("4", TypeError)],
)
def test_bad_bits(fn, bits, error):
  with pytest.raises(error, match=r"bits=.*1\.\.8"):
    fn(jnp.zeros((64,), jnp.uint32), bits)


@pytest.mark.parametrize("fn", [pack, unpack])
@pytest.mark.parametrize(("axis", "error"), [(2, ValueError), (-3, ValueError), (1.0, TypeError),
                                             (None, TypeError)])
def test_bad_axis(fn, axis, error):
  with pytest.raises(error, match=r"axis=.*-2\.\.1"):
    fn(jnp.zeros((64, 64), jnp.uint32), 4, axis)


def test_bad_codes():
  with pytest.raises(ValueError, match="codes length 48 along axis=0 must be a multiple of 32"):
    pack(jnp.zeros((48, 2), jnp.int32), 4, 0)
  with pytest.raises(TypeError, match="codes must be an integer array"):
    pack(jnp.zeros((64,), jnp.float32), 4)
  with pytest.raises(TypeError, match="codes must be an integer array"):
    pack(jnp.zeros((64,), jnp.bool_), 1)
  with pytest.raises(ValueError, match="codes must have at least one axis"):
    pack(jnp.int32(3), 4)


def test_bad_words():
  with pytest.raises(TypeError, match="words must be a uint32 array"):
    unpack(jnp.zeros((6,), jnp.int32), 3)
  with pytest.raises(ValueError, match=r"words length 4 along axis=0 must be a multiple of bits=3"):
    unpack(jnp.zeros((4,), jnp.uint32), 3)
  with pytest.raises(ValueError, match="words must have at least one axis"):
    unpack(jnp.uint32(3), 4)


def test_module_doctest():
  import doctest

  assert doctest.testmod(packing).failed == 0


@st.composite
def packing_problems(draw):
  bits = draw(st.integers(1, 8))
  ndim = draw(st.integers(1, 3))
  axis = draw(st.integers(-ndim, ndim - 1))
  shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
  shape[axis] = 32 * draw(st.integers(1, 3))
  dtype = draw(st.sampled_from([np.uint8, np.int16, np.int32, np.uint32]))
  return bits, axis, random_codes(tuple(shape),
                                  bits,
                                  seed=draw(st.integers(0, 2**32 - 1)),
                                  dtype=dtype)


@settings(max_examples=50, deadline=None)
@given(packing_problems())
def test_property_matches_reference_and_round_trips(problem):
  bits, axis, codes = problem
  words = jax.jit(pack, static_argnums=(1, 2))(jnp.asarray(codes), bits, axis)
  np.testing.assert_array_equal(np.asarray(words), reference_pack(codes, bits, axis))
  np.testing.assert_array_equal(np.asarray(unpack(words, bits, axis)), codes)
