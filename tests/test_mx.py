"""OCP MX v1.0 formats against an independent numpy reference built on ml_dtypes' types."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq

ELEMENTS = {  # name: (ml_dtypes element type or None for INT8, largest value, emax)
    "mxfp4": (ml_dtypes.float4_e2m1fn, 6.0, 2),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 7.5, 2),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 28.0, 4),
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 8),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0, 15),
    "mxint8": (None, 127 / 64, 0),
}


def reference(x, name):
  """OCP MX quantisation of the rows of x in blocks of 32, then dequantised (numpy, float32):
  X = 2^(⌊log2 amax⌋ − emax), elements x/X rounded to nearest-even in the element type and
  saturated. Also the E8M0 scale bytes (exponent + 127)."""
  element, largest, emax = ELEMENTS[name]
  blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
  amax = np.max(np.abs(blocks), axis=-1, keepdims=True)
  exponent = np.floor(np.log2(amax)) - emax
  scale = np.exp2(exponent).astype(np.float32)
  low = -2.0 if element is None else -largest
  y = np.clip(blocks / scale, low, largest)
  if element is None:  # two's complement integers times 2^-6, ties to even
    values = (np.round(y * 64) / 64).astype(np.float32)
  else:
    values = y.astype(element).astype(np.float32)
  return (values * scale).reshape(x.shape).astype(np.float32), (exponent + 127).astype(int)


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_matches_the_ocp_reference(name):
  rng = np.random.default_rng(0)
  x = (rng.standard_t(4, (48, 128)) * 0.02).astype(np.float32)
  x[1] *= 1e4  # other exponent ranges
  x[2, :32] = 2.0 ** np.arange(-16, 16)  # amax a power of two exactly
  x[3, :32] = np.linspace(-7, 7, 32)  # amax 7 on E2M1: 7/1 saturates to 6
  q = jq.quantise(jnp.asarray(x), jq.QuantSpec(name, axis=1))
  assert q.block_size == 32 and q.scales.dtype == jnp.float8_e8m0fnu
  expected, exponent_bytes = reference(x, name)
  # Equal values (jaxquant's codebook has one zero, so -0 reads as +0).
  np.testing.assert_array_equal(np.asarray(q.dequantise()), expected)
  stored = np.asarray(q.scales).view(np.uint8).astype(int)
  np.testing.assert_array_equal(stored, exponent_bytes[..., 0])


def test_ties_go_to_the_even_element():
  # Block amax 6 on E2M1: X = 1, so every midpoint of the grid is a tie.
  grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
  midpoints = (grid[1:] + grid[:-1]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5
  row = np.zeros(32, np.float32)
  row[:7], row[7:14], row[14] = midpoints, -midpoints, 6.0
  q = jq.quantise(jnp.asarray(row[None]), jq.QuantSpec("mxfp4", axis=1))
  got = np.asarray(q.dequantise())[0]
  np.testing.assert_array_equal(got[:7], [0, 1, 1, 2, 2, 4, 4])  # even mantissas
  np.testing.assert_array_equal(got[7:14], -got[:7])
  np.testing.assert_array_equal(got, row.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def test_presets_and_refusals():
  fmt = jq.formats.parse("mxfp4")
  assert fmt == jq.formats.parse(fmt.name) and fmt.scaling == "mx" and fmt.block_size == 32
  np.testing.assert_array_equal(fmt.values[7:], [0, 0.5, 1, 1.5, 2, 3, 4, 6])
  assert jq.formats.parse("mxfp8_e4m3").values[-1] == 448  # no 480: the NaN pattern
  x = jnp.ones((4, 64))
  assert jq.quantise(x, jq.QuantSpec("mxfp4", axis=1)).bits_per_param == 4 + 8 / 32
  with pytest.raises(ValueError, match="stores E8M0 scales; scale_dtype='bfloat16'"):
    jq.QuantSpec("mxfp4", scale_dtype="bfloat16")
  with pytest.raises(ValueError, match="built for block_size=32"):
    jq.QuantSpec("mxfp6_e2m3", block_size=64)


def test_gpt_oss_blocks_and_scales_round_trip_and_match_their_decoding():
  rng = np.random.default_rng(3)
  blocks = rng.integers(0, 256, (3, 5, 16), dtype=np.uint8)  # [rows, G, 16]
  scales = rng.integers(110, 140, (3, 5), dtype=np.uint8)
  q = jq.interop.mx.from_blocks(blocks, scales)
  assert q.shape == (3, 160) and q.scales.dtype == jnp.float8_e8m0fnu
  # gpt-oss' decoding: low nibble first, E2M1 patterns, times 2^(e - 127).
  nibbles = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(3, 5, 32)
  values = nibbles.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
  expected = np.ldexp(values, scales.astype(np.int32)[..., None] - 127).reshape(3, 160)
  np.testing.assert_array_equal(np.asarray(q.dequantise()), expected)
  back_blocks, back_scales = jq.interop.mx.to_blocks(q)
  np.testing.assert_array_equal(back_scales, scales)
  low, high = blocks & 15, blocks >> 4
  plus_zero = lambda n: np.where(n == 8, 0, n)  # -0 (pattern 8) comes back as +0
  np.testing.assert_array_equal(back_blocks, plus_zero(low) | (plus_zero(high) << 4))
  # A jaxquant MXFP4 array gives the same blocks as the reference quantiser's codes.
  x = (rng.standard_normal((2, 64)) * 0.1).astype(np.float32)
  q = jq.quantise(jnp.asarray(x), jq.QuantSpec("mxfp4", axis=-1))
  np.testing.assert_array_equal(
      np.asarray(jq.interop.mx.from_blocks(*jq.interop.mx.to_blocks(q)).dequantise()),
      np.asarray(q.dequantise()))
  with pytest.raises(ValueError, match="scale byte is 0"):
    jq.interop.mx.from_blocks(blocks, np.zeros_like(scales))
  with pytest.raises(ValueError, match="is not MXFP4"):
    jq.interop.mx.to_blocks(jq.quantise(jnp.asarray(x), jq.QuantSpec("nf4", axis=-1)))


def nvfp4_reference(x):
  """NVFP4 of the rows of x in blocks of 16 by the recipe `jaxquant.formats.nvfp4` pins
  (numpy float32 on ml_dtypes' types): s_b = amax_b·(1/6), f = max_b(s_b)·(1/448),
  stored block scale e4m3(s_b·(1/f)), decoded d = e4m3·f, elements e2m1(x·(1/d)) rounded to
  nearest-even and saturated at ±6. Returns (dequantised, stored e4m3 scales, f)."""
  f32 = np.float32
  blocks = x.reshape(x.shape[0], -1, 16).astype(f32)
  scales = (np.max(np.abs(blocks), axis=-1) * (f32(1) / f32(6))).astype(f32)
  factor = f32(np.max(scales) * f32(1 / 448))
  stored = (scales * (f32(1) / factor)).astype(f32).astype(ml_dtypes.float8_e4m3fn)
  decoded = (stored.astype(f32) * factor).astype(f32)
  with np.errstate(divide="ignore"):
    reciprocal = np.where(decoded == 0, f32(0), f32(1) / decoded).astype(f32)
  y = np.clip((blocks * reciprocal[..., None]).astype(f32), -6, 6)
  values = y.astype(ml_dtypes.float4_e2m1fn).astype(f32)
  return (values * decoded[..., None]).reshape(x.shape).astype(f32), stored, factor


def test_nvfp4_matches_its_reference():
  rng = np.random.default_rng(3)
  x = (rng.standard_t(4, (32, 256)) * 0.02).astype(np.float32)
  x[1] *= 300  # other exponent ranges: block scales spread over E4M3's range
  x[2, :16] = np.linspace(-7, 7, 16)  # saturation
  x[3, :16] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] * 2  # every E2M1 tie, scale 1 at most
  q = jq.quantise(jnp.asarray(x), jq.QuantSpec("nvfp4", axis=1))
  assert q.block_size == 16 and q.scales.dtype == jnp.float8_e4m3fn
  assert q.bits_per_param == 4 + 8 / 16 + 32 / x.size
  expected, stored, factor = nvfp4_reference(x)
  np.testing.assert_array_equal(np.asarray(q.dequantise()), expected)
  np.testing.assert_array_equal(np.asarray(q.scales).view(np.uint8), stored.view(np.uint8))
  assert float(q.scale_scales) == float(factor)


def test_nvfp4_preset():
  fmt = jq.formats.parse("nvfp4")
  assert fmt == jq.formats.parse(fmt.name) and fmt.block_size == 16 and fmt.ties_to_even
  np.testing.assert_array_equal(fmt.values, jq.formats.parse("mxfp4").values)
  with pytest.raises(ValueError, match="defined with float8_e4m3fn scales"):
    jq.QuantSpec("nvfp4", scale_dtype="bfloat16")
  # The same codebook without the preset rounds ties down, not to even.
  e2m1 = jq.QuantSpec("e2m1", block_size=16, scale_dtype="float8_e4m3fn", axis=1)
  tie = jnp.asarray([[6.0, 2.5] + [0.0] * 14])
  assert float(jq.quantise(tie, e2m1).dequantise()[0, 1]) == 2.0
  assert float(jq.quantise(tie, jq.QuantSpec("nvfp4", axis=1)).dequantise()[0, 1]) == 2.0
  tie = jnp.asarray([[6.0, 3.5] + [0.0] * 14])
  assert float(jq.quantise(tie, e2m1).dequantise()[0, 1]) == 3.0
  assert float(jq.quantise(tie, jq.QuantSpec("nvfp4", axis=1)).dequantise()[0, 1]) == 4.0
