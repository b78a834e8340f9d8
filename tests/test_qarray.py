"""quantise / dequantise against an independent numpy quantiser, plus storage and bad input."""

import dataclasses
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from quantise_reference import quantise_reference

import jaxquant as jq
from jaxquant import formats

RNG = np.random.default_rng(0)


def numpy_quantise(x, fmt, *, block_size, scaling, axis, scale_dtype="float32"):
  """The obvious numpy reference: move the axis last, cut blocks, scale, argmin distance."""
  x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
  n = x.shape[-1]
  size = {"channel": n, "tensor": n}.get(block_size, block_size)
  n_blocks = -(-n // size)
  padded = np.zeros(x.shape[:-1] + (n_blocks * size,), np.float32)
  padded[..., :n] = x
  blocks = padded.reshape(x.shape[:-1] + (n_blocks, size))
  v = fmt.values.astype(np.float32)
  if block_size == "tensor":
    blocks = blocks.reshape(1, -1)
    real = x.reshape(1, -1)
  else:
    real = None
  if scaling == "absmax":
    scale = np.abs(blocks).max(-1) / min(-v[0], v[-1])
  elif scaling == "signmax":
    hi, lo = blocks.max(-1), blocks.min(-1)
    end = v[0] if -v[0] > v[-1] else v[-1]
    scale = np.where(-lo > hi, lo, hi) / end
  else:
    counts = np.array([min(size, n - i * size) for i in range(n_blocks)], np.float32)
    if real is not None:
      counts = np.float32(real.size)
    reference = 1.0 if fmt.scaling == "rms" else np.abs(v).max() / math.sqrt(3)
    scale = np.sqrt((blocks**2).sum(-1) / counts) / reference
  scale = scale.astype(np.float32)
  if scale_dtype == "bfloat16":
    scale = scale.astype(ml_dtypes.bfloat16).astype(np.float32)
  safe = np.where(scale == 0, 1, scale)[..., None]
  codes = np.abs((blocks / safe)[..., None] - v).argmin(-1)
  w = (v[codes] * scale[..., None]).reshape(padded.shape if block_size != "tensor" else x.shape)
  return np.moveaxis(w[..., :n], -1, axis)


CASES = [
    ("nf4", 64, "absmax"), ("int4", 32, "signmax"), ("int4-sym", 64, "absmax"),
    ("e2m1", 16, "absmax"), ("crd-t5-signmax-3b-B64", 64, "signmax"),
    ("crd-normal-rms-4b", "tensor", "rms"), ("int3", "channel", "rms"), ("nf4", "channel", "absmax"),
    ("int8", 128, "absmax"), ("int2", 64, "signmax"), ("e3m2", 64, "absmax"), ("sf4", 100, "absmax"),
]


@pytest.mark.parametrize("name, block_size, scaling", CASES)
@pytest.mark.parametrize("shape, axis", [((6, 200), -1), ((130, 3), 0), ((2, 3, 70), 1), ((257,), 0)])
def test_matches_numpy_reference(name, block_size, scaling, shape, axis):
  x = RNG.standard_t(5, size=shape).astype(np.float32)
  spec = jq.QuantSpec(name, block_size=block_size, scaling=scaling, axis=axis,
                      scale_dtype=jnp.float32)
  w_hat = jq.dequantise(jq.quantise(x, spec))
  expected = numpy_quantise(x, spec.format, block_size=block_size, scaling=scaling, axis=axis)
  assert w_hat.shape == x.shape and w_hat.dtype == jnp.float32
  # Rounding ties aside, every element agrees to float32 precision.
  np.testing.assert_allclose(np.asarray(w_hat), expected, rtol=2e-6, atol=1e-6)


def test_bf16_scales_match_numpy_reference_under_jit():
  x = RNG.normal(size=(64, 96)).astype(np.float32)
  spec = jq.QuantSpec("nf4", block_size=32, axis=0)
  w_hat = jax.jit(lambda a: jq.dequantise(jq.quantise(a, spec)))(x)
  expected = numpy_quantise(x, spec.format, block_size=32, scaling="absmax", axis=0,
                            scale_dtype="bfloat16")
  np.testing.assert_allclose(np.asarray(w_hat), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_odd_shapes_come_back_exactly(dtype):
  x = jnp.asarray(RNG.normal(size=(3, 5, 77)), dtype)
  for axis in (0, 1, 2):
    q = jq.quantise(x, jq.QuantSpec("nf4", axis=axis))
    w_hat = q.dequantise()
    assert w_hat.shape == x.shape and w_hat.dtype == dtype and q.shape == x.shape
    assert q.dequantise(jnp.float32).dtype == jnp.float32
    rel = jq.metrics.relative_rmse(x, w_hat)
    assert 0 < float(rel) < 0.15


@pytest.mark.parametrize("name, scaling", [("nf4", "absmax"), ("int4", "absmax"),
                                           ("int4", "signmax"), ("crd-t7-signmax-4b", "signmax")])
def test_block_maximum_is_reproduced(name, scaling):
  x = RNG.normal(size=(16, 64)).astype(np.float32)
  q = jq.quantise(x, jq.QuantSpec(name, scaling=scaling, scale_dtype=jnp.float32, axis=-1))
  w_hat = np.asarray(q.dequantise())
  rows = np.arange(16)
  extreme = np.abs(x).argmax(1)
  np.testing.assert_allclose(w_hat[rows, extreme], x[rows, extreme], rtol=3e-7)
  # With bf16 scales the maximum is exact up to the rounding of the scale.
  q16 = jq.quantise(x, jq.QuantSpec(name, scaling=scaling, axis=-1))
  w16 = np.asarray(q16.dequantise())
  np.testing.assert_allclose(w16[rows, extreme], x[rows, extreme], rtol=2**-8)


@pytest.mark.parametrize("spec", [
    jq.QuantSpec("nf4"), jq.QuantSpec("int4", scaling="signmax"),
    jq.QuantSpec("crd-t5-absmax-sym-3b-B64", axis=0), jq.QuantSpec("e2m1", block_size="channel"),
    jq.QuantSpec("int4", block_size="tensor"),
], ids=str)
def test_requantising_is_a_fixed_point(spec):
  x = jnp.asarray(RNG.normal(size=(64, 192)), jnp.float32)
  q = jq.quantise(x, spec)
  again = jq.quantise(q.dequantise(), spec)
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
  np.testing.assert_array_equal(np.asarray(again.scales.astype(jnp.float32)),
                                np.asarray(q.scales.astype(jnp.float32)))


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_bits_per_param_is_exact(block_size):
  x = jnp.ones((256, 512), jnp.float32)
  assert jq.quantise(x, jq.QuantSpec("nf4", block_size=block_size)).bits_per_param == 4 + 16 / block_size
  assert jq.quantise(x, jq.QuantSpec("int3", block_size=block_size)).bits_per_param == 3 + 16 / block_size
  f32 = jq.QuantSpec("nf4", block_size=block_size, scale_dtype=jnp.float32)
  assert jq.quantise(x, f32).bits_per_param == 4 + 32 / block_size
  assert jq.quantise(x, jq.QuantSpec("nf4", block_size=block_size, scale_dtype="e8m0")).bits_per_param == 4 + 8 / block_size
  fp8 = jq.quantise(x, jq.QuantSpec("nf4", block_size=block_size, scale_dtype="float8_e4m3fn"))
  assert fp8.bits_per_param == 4 + 8 / block_size + 32 / x.size
  double = jq.quantise(x, jq.QuantSpec("nf4", block_size=block_size, double_quant=True))
  n_scales = x.size // block_size
  expected = 4 + 8 / block_size + 32 * math.ceil(n_scales / 256) / x.size
  assert double.bits_per_param == pytest.approx(expected, rel=1e-12)


def test_double_quant_nf4_b64_costs_about_4_127_bits():
  q = jq.quantise(jnp.ones((4096, 4096)), jq.QuantSpec("nf4", double_quant=True))
  assert q.bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)  # ≈ 4.127


def test_packed_codes_are_really_packed_on_device():
  x = jnp.asarray(RNG.normal(size=(4096, 4096)), jnp.float32)
  q4 = jq.quantise(x, jq.QuantSpec("nf4", axis=0))
  assert q4.codes.dtype == jnp.uint32 and q4.codes.shape == (512, 4096)
  assert q4.codes.on_device_size_in_bytes() == 8 * 2**20
  assert q4.scales.on_device_size_in_bytes() == 64 * 4096 * 2
  q3 = jq.quantise(x, jq.QuantSpec("int3", axis=0))
  assert q3.codes.on_device_size_in_bytes() == 6 * 2**20


@pytest.mark.parametrize("spec", [
    jq.QuantSpec("nf4"), jq.QuantSpec("int4-sym"), jq.QuantSpec("int4", scaling="signmax"),
    jq.QuantSpec("int4", scaling="rms"), jq.QuantSpec("crd-normal-rms-4b", scale_search=True),
    jq.QuantSpec("nf4", scale_dtype="e8m0"), jq.QuantSpec("nf4", scale_dtype="float8_e4m3fn"),
    jq.QuantSpec("nf4", double_quant=True), jq.QuantSpec("int4-sym", double_quant=True),
    jq.QuantSpec("int4-sym", scaling="signmax", double_quant=True),
], ids=str)
def test_all_zero_blocks_stay_exactly_zero(spec):
  spec = dataclasses.replace(spec, axis=-1)
  x = np.asarray(RNG.normal(size=(4, 256)), np.float32)
  x[1] = 0.0
  x[2, 64:128] = 0.0
  w_hat = np.asarray(jq.quantise(x, spec).dequantise())
  assert np.all(np.isfinite(w_hat))
  assert np.all(w_hat[1] == 0) and np.all(w_hat[2, 64:128] == 0)
  zeros = jq.quantise(np.zeros((3, 64), np.float32), spec).dequantise()
  assert np.all(np.asarray(zeros) == 0)


@pytest.mark.parametrize("block_size", ["tensor", "channel"])
def test_all_zero_tensor_stays_exactly_zero(block_size):
  spec = jq.QuantSpec("int4-sym", block_size=block_size)
  zeros = jq.quantise(np.zeros((3, 64), np.float32), spec).dequantise()
  assert np.all(np.asarray(zeros) == 0)


def test_e8m0_scales_are_powers_of_two_that_never_overflow():
  x = jnp.asarray(RNG.normal(size=(8, 512)) * 10.0**RNG.uniform(-3, 3, size=(8, 1)), jnp.float32)
  q = jq.quantise(x, jq.QuantSpec("nf4", scale_dtype="e8m0", axis=-1))
  scales = np.asarray(q.scales.astype(jnp.float32))
  assert q.scales.dtype == jnp.float8_e8m0fnu
  np.testing.assert_array_equal(np.exp2(np.round(np.log2(scales))), scales)
  block_max = np.abs(np.asarray(x)).reshape(8, 8, 64).max(-1)
  assert np.all(block_max <= scales) and np.all(scales < 2 * block_max)


def test_fp8_and_double_quant_scales_are_close_to_float32_scales():
  x = jnp.asarray(RNG.normal(size=(64, 4096)) * RNG.uniform(0.1, 10, size=(64, 1)), jnp.float32)
  exact = np.asarray(jq.quantise(x, jq.QuantSpec("nf4", scale_dtype=jnp.float32)).scales)
  fp8 = jq.quantise(x, jq.QuantSpec("nf4", scale_dtype="float8_e4m3fn"))
  decoded = np.asarray(jq.scaling.decode_scales(fp8.scales, fp8.scale_scales))
  np.testing.assert_allclose(decoded, exact, rtol=2**-4)  # e4m3 keeps 3 mantissa bits
  double = jq.quantise(x, jq.QuantSpec("nf4", double_quant=True))
  decoded = np.asarray(jq.scaling.decode_scales(double.scales, double.scale_scales))
  assert double.scales.dtype == jnp.uint8
  step = exact.reshape(-1, 256).max(1, keepdims=True) / 255
  assert np.all(np.abs(decoded - exact).reshape(-1, 256) <= step / 2 * (1 + 1e-5))


def test_rms_scale_search_never_loses_to_the_plain_rms_scale():
  x = jnp.asarray(RNG.standard_t(4, size=(128, 256)), jnp.float32)
  for fmt in ("int4", "nf4", "crd-t5-rms-4b"):
    plain = jq.quantise(x, jq.QuantSpec(fmt, block_size="tensor", scaling="rms"))
    searched = jq.quantise(x, jq.QuantSpec(fmt, block_size="tensor", scaling="rms",
                                           scale_search=True))
    assert jq.metrics.relative_rmse(x, searched.dequantise()) <= jq.metrics.relative_rmse(
        x, plain.dequantise()) + 1e-7


# (shape, axis, where the bad element goes, its block, a block without it). XLA's CPU max
# reductions over a middle axis can skip NaN, so the layouts include those.
_LAYOUTS = [((2, 64), -1, (1, 5), (1, slice(None)), (0, slice(None))),
            ((160, 24), 0, (3, 3), (slice(0, 64), 3), (slice(64, None), slice(None))),
            ((3, 64, 24), 1, (0, 3, 3), (0, slice(None), 3), (1, slice(None), slice(None)))]


@pytest.mark.parametrize("storage", [{"scale_dtype": "bfloat16"}, {"scale_dtype": "e8m0"},
                                     {"scale_dtype": "float32"}, {"double_quant": True}],
                         ids=str)
@pytest.mark.parametrize("scaling", ["absmax", "signmax", "rms"])
@pytest.mark.parametrize("layout", _LAYOUTS, ids=lambda layout: str(layout[0]))
def test_nonfinite_input_raises_and_propagates_under_jit(storage, scaling, layout):
  shape, axis, where, block, other = layout
  if scaling == "signmax" and storage.get("scale_dtype") == "e8m0":
    return  # (e8m0 scales have no sign)
  x = np.ones(shape, np.float32)
  spec = jq.QuantSpec("nf4", axis=axis, scaling=scaling, **storage)
  for bad in (np.nan, np.inf, -np.inf):
    x[where] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
      jq.quantise(x, spec)
    w_hat = np.asarray(jax.jit(lambda a: jq.quantise(a, spec).dequantise())(x))
    assert np.all(np.isnan(w_hat[block]))  # the block, never a plausible finite value
    if not storage.get("double_quant"):  # (double quantisation shares a group scale)
      # (ones are a codepoint times an absmax or signmax scale, not under rms scaling)
      finite = w_hat[other]
      assert np.all(finite == 1) if scaling != "rms" else np.all(np.isfinite(finite))


# The edges of float32: a block holding x_max dequantises to finite values, its extreme to
# within the scale storage's rounding of x_max (or the saturated scale's), bit for bit as the
# independent numpy quantiser says. With float8 or double-quantised scales (relative to the
# largest) the other blocks are too small next to this one and are zero, with a warning.
@pytest.mark.parametrize("spec, largest, rtol", [
    (jq.QuantSpec("nf4", block_size=64), 3.4e38, 2**-8),
    (jq.QuantSpec("nf4", block_size=64), 1e38, 2**-8),
    (jq.QuantSpec("nf4", block_size=64, scale_dtype="float32"), 3.4e38, 1e-6),
    (jq.QuantSpec("int4", block_size=32, scaling="signmax", scale_dtype="float8_e4m3fn"),
     -3.4e38, 2**-4),
    (jq.QuantSpec("e2m1", block_size=32, scale_dtype="e8m0"), 3e38, 0.25),
    (jq.QuantSpec("int8", block_size=64, double_quant=True), 3.4e38, 2**-7),
], ids=str)
def test_values_near_float32_max_dequantise_to_finite_values(spec, largest, rtol):
  x = RNG.standard_normal((4, 128)).astype(np.float32)
  x[0, 5] = largest
  spec = dataclasses.replace(spec, axis=-1)
  relative = spec.double_quant or spec.scale_dtype == "float8_e4m3fn"
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w_hat = np.asarray(jq.quantise(x, spec).dequantise())
  assert bool(caught) == relative
  assert np.all(np.isfinite(w_hat))
  np.testing.assert_allclose(w_hat[0, 5], largest, rtol=rtol)
  *_, expected, _ = quantise_reference(
      x, spec.format.values, axis=-1, block_size=spec.block_size, granularity="block",
      scaling=spec.scaling, scale_dtype=spec.scale_dtype, double_quant=spec.double_quant, rho=None)
  np.testing.assert_array_equal(w_hat, expected)


@pytest.mark.parametrize("scaling", ["absmax", "signmax", "rms"])
@pytest.mark.parametrize("power", [-100, 100])
def test_quantising_commutes_with_powers_of_two_far_from_the_edges(scaling, power):
  # x·2^k has the same codes and scales·2^k: the RMS of values near 1e30, whose squares
  # overflow float32, is no exception.
  x = RNG.standard_t(4, size=(6, 96)).astype(np.float32)
  spec = jq.QuantSpec("int4", block_size=32, scaling=scaling, axis=-1, scale_dtype="float32")
  q = jq.quantise(x, spec)
  shifted = jq.quantise((x * np.float32(2.0**power)).astype(np.float32), spec)
  np.testing.assert_array_equal(np.asarray(shifted.codes), np.asarray(q.codes))
  np.testing.assert_allclose(np.asarray(shifted.scales), np.asarray(q.scales) * 2.0**power,
                             rtol=2e-7)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_the_largest_finite_input_of_each_dtype_dequantises_finite(dtype):
  x = RNG.standard_normal((2, 64)).astype(dtype)
  x[0, 3] = jnp.finfo(dtype).max
  for spec in (jq.QuantSpec("nf4", axis=-1), jq.QuantSpec("e2m1", axis=-1, scale_dtype="e8m0")):
    w_hat = np.asarray(jq.quantise(jnp.asarray(x), spec).dequantise(), np.float32)
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_allclose(w_hat[0, 3], float(jnp.finfo(dtype).max), rtol=0.25)


def test_blocks_of_subnormals_are_zero_and_quantise_says_so():
  x = (RNG.standard_normal((4, 128)) * 1e-40).astype(np.float32)
  x[:, 64:] = RNG.standard_normal((4, 64))  # the second block of each row is ordinary
  spec = jq.QuantSpec("nf4", block_size=64, axis=-1)
  with pytest.warns(UserWarning, match="4 block.s. of x with nonzero values have a stored scale of zero"):
    q = jq.quantise(x, spec)
  w_hat = np.asarray(q.dequantise())
  assert np.all(w_hat[:, :64] == 0)
  np.testing.assert_array_equal(w_hat[:, 64:], np.asarray(
      jq.quantise(x[:, 64:], spec).dequantise()))


def test_subnormal_elements_of_an_ordinary_block_leave_its_scale_and_read_as_zero_on_cpu():
  # A block's scale is set by its normal elements alone; its subnormal ones are read as zero
  # on CPU (other platforms may keep them, choosing between the codepoints nearest zero).
  x = RNG.standard_normal((1, 64)).astype(np.float32) * 1e-37
  x[0, ::2] = 1e-39 * np.sign(RNG.standard_normal(32))
  flushed = np.where(np.abs(x) < np.finfo(np.float32).tiny, 0, x).astype(np.float32)
  spec = jq.QuantSpec("e2m1", block_size=64, axis=-1, scale_dtype="float32")
  np.testing.assert_array_equal(np.asarray(jq.quantise(x, spec).codes),
                                np.asarray(jq.quantise(flushed, spec).codes))


@pytest.mark.parametrize("call, error, match", [
    (lambda: jq.quantise(jnp.ones((4, 4), jnp.int32), jq.QuantSpec("nf4")), TypeError, "dtype"),
    (lambda: jq.quantise(jnp.ones((4, 4)), jq.QuantSpec("nf4", axis=2)), ValueError, "axis"),
    (lambda: jq.quantise(jnp.ones(()), jq.QuantSpec("nf4")), ValueError, "axis"),
    (lambda: jq.quantise(jnp.ones((4, 4)), 4), TypeError, "QuantSpec"),
    (lambda: jq.QuantSpec("nf4", block_size=0), ValueError, "block_size"),
    (lambda: jq.QuantSpec("nf4", block_size=-64), ValueError, "block_size"),
    (lambda: jq.QuantSpec("nf4", block_size=2.5), TypeError, "block_size"),
    (lambda: jq.QuantSpec("nf4", block_size="row"), ValueError, "block_size"),
    (lambda: jq.QuantSpec("nf4", scaling="max"), ValueError, "scaling"),
    (lambda: jq.QuantSpec("nf4", scale_dtype=jnp.int8), ValueError, "scale_dtype"),
    (lambda: jq.QuantSpec("nf4", scale_dtype="e8m0", scaling="signmax"), ValueError, "signmax"),
    (lambda: jq.QuantSpec("nf4", double_quant=True, scale_dtype="bf16"), ValueError, "double_quant"),
    (lambda: jq.QuantSpec("nf4", scale_search=True), ValueError, "scale_search"),
    (lambda: jq.QuantSpec("crd-normal-signmax-4b", scaling="absmax"), ValueError, "signmax"),
    (lambda: jq.QuantSpec("crd-normal-absmax-4b-B64", block_size=128), ValueError, "block_size"),
    (lambda: jq.QuantSpec(3), TypeError, "format"),
])
def test_bad_input_names_the_argument(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_spec_takes_the_formats_own_scaling_and_block_size():
  spec = jq.QuantSpec(formats.crd_format("t", 4, scaling="signmax", block_size=128, df=5))
  assert (spec.scaling, spec.block_size) == ("signmax", 128)
  assert jq.QuantSpec("nf4").block_size == 64 and jq.QuantSpec("nf4").scaling == "absmax"


def test_quantised_array_is_a_pytree_that_jits_without_recompiling():
  x = jnp.asarray(RNG.normal(size=(32, 128)), jnp.float32)
  q = jq.quantise(x, jq.QuantSpec("nf4", double_quant=True))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert [leaf.dtype for leaf in leaves] == [jnp.uint32, jnp.uint8, jnp.float32, jnp.float32]
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  chex.assert_trees_all_equal(rebuilt.dequantise(), q.dequantise())

  traces = []

  @jax.jit
  def total(qa):
    traces.append(1)
    return jnp.sum(qa.dequantise())

  total(q)
  total(jq.quantise(x * 2, jq.QuantSpec("nf4", double_quant=True)))
  assert len(traces) == 1


def test_formats_of_one_width_share_a_compilation():
  x = jnp.asarray(RNG.normal(size=(16, 64)), jnp.float32)
  from jaxquant import qarray  # pylint: disable=import-outside-toplevel
  jq.quantise(x, jq.QuantSpec("nf4"))
  before = qarray._quantise._cache_size()  # pylint: disable=protected-access
  jq.quantise(x, jq.QuantSpec("sf4"))
  jq.quantise(x, jq.QuantSpec("int4"))
  assert qarray._quantise._cache_size() == before  # pylint: disable=protected-access


def test_spec_survives_dataclasses_replace():
  for spec in (jq.QuantSpec("nf4", double_quant=True), jq.QuantSpec("int4", scale_dtype="e8m0"),
               jq.QuantSpec("crd-t5-signmax-3b")):
    moved = dataclasses.replace(spec, axis=0)
    assert moved.axis == 0 and moved.format == spec.format
    assert (moved.scale_dtype, moved.double_quant) == (spec.scale_dtype, spec.double_quant)


def test_a_format_name_without_a_block_size_is_built_for_the_specs():
  spec = jq.QuantSpec("crd-t7-signmax-4b", block_size=128)
  assert spec.block_size == 128
  assert spec.format == formats.crd_format("t", 4, scaling="signmax", block_size=128, df=7,
                                           symmetric=False)
  with pytest.raises(ValueError, match="block_size"):  # an explicit -B64 contradicts 128
    jq.QuantSpec("crd-t7-signmax-4b-B64", block_size=128)


def test_quantise_takes_a_format_or_its_name_with_the_spec_defaults():
  w = jnp.asarray(RNG.normal(size=(256, 32)), jnp.float32)
  by_spec = jq.quantise(w, jq.QuantSpec("nf4"))
  for spec in ("nf4", formats.nf4()):
    q = jq.quantise(w, spec)
    assert (q.axis, q.block_size) == (0, 64)
    np.testing.assert_array_equal(q.codes, by_spec.codes)
