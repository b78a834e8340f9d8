"""Asymmetric (minmax) block scaling, w ≈ s·v + o, against an independent float32 numpy
re-implementation of `jaxquant.scaling`'s documented steps; and the offsets through every
contraction backend, the gradient, gathers, transposes, checkpoints and safetensors files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quantise_reference import F32, blocks_of, ceiling, divide, flush, nearest, store
from test_contraction import PATTERNS, assert_close, reference

import jaxquant as jq
from jaxquant.nn import weights

RNG = np.random.default_rng(5)


def minmax_reference(x, values, *, axis, block_size, granularity, scale_dtype, double_quant):
  """(codes, decoded scales, decoded offsets) as `jaxquant.scaling` documents minmax: per
  block over its real elements, s = (max/2 − min/2)·(1/((v_max − v_min)/2)) saturated and
  stored, o = min − s·v_min saturated and stored (signed), codes nearest to (x − o)·(1/s)."""
  x = np.asarray(x)
  values = np.asarray(values, F32)
  blocks, counts = blocks_of(x.astype(F32), axis, block_size, granularity)
  real = np.arange(blocks.shape[-1]) < counts[..., None]
  high = np.max(np.where(real, blocks, -np.inf), axis=-1).astype(F32)
  low = np.min(np.where(real, blocks, np.inf), axis=-1).astype(F32)
  peak = np.maximum(high, -low)
  low = np.where(peak < np.finfo(F32).tiny, F32(0), low).astype(F32)
  half_range = np.where(peak < np.finfo(F32).tiny, F32(0), high * F32(0.5) - low * F32(0.5))
  rho = F32((float(values[-1]) - float(values[0])) / 2)
  limit = ceiling(values, x.dtype, None if double_quant else scale_dtype)
  scales = flush(np.clip((half_range.astype(F32) * (F32(1) / rho)).astype(F32), -limit, limit))
  # Stored in the library's layout (`axis` in place), whose flat order groups double-quantised
  # scales.
  stored = lambda a, signed: np.moveaxis(store(np.moveaxis(a, -1, axis), scale_dtype,
                                               double_quant, signed), axis, -1)
  decoded = stored(scales, False)
  offset_limit = ceiling(np.ones(1), x.dtype, None if double_quant else scale_dtype)
  offsets = flush(np.clip((low - decoded * values[0]).astype(F32), -offset_limit, offset_limit))
  decoded_offsets = stored(offsets, True)
  codes = nearest(divide((blocks - decoded_offsets[..., None]).astype(F32), decoded[..., None]),
                  values)
  moved = np.moveaxis(x, axis, -1).shape
  unblock = lambda a: np.moveaxis(a.reshape(moved[:-1] + (-1,))[..., :moved[-1]], -1, axis)
  return unblock(codes), np.moveaxis(decoded, -1, axis), np.moveaxis(decoded_offsets, -1, axis)


SPECS = [
    dict(block_size=32, scale_dtype="float16"), dict(block_size=32, scale_dtype="float32"),
    dict(block_size=64, scale_dtype="bfloat16"), dict(block_size=32, scale_dtype="float8_e4m3fn"),
    dict(block_size=32, double_quant=True), dict(block_size="channel", scale_dtype="float32"),
    dict(block_size="tensor", scale_dtype="float32"),
]


@pytest.mark.parametrize("options", SPECS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("fmt", ["uint4", "int3", "nf4"])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantise_matches_the_reference_bit_for_bit(options, fmt, axis):
  x = (RNG.standard_t(4, size=(100, 72)) * 0.1 + RNG.normal(size=(1, 72))).astype(np.float32)
  spec = jq.QuantSpec(fmt, scaling="minmax", axis=axis, **options)
  q = jq.quantise(jnp.asarray(x), spec)
  granularity = options["block_size"] if isinstance(options["block_size"], str) else "block"
  codes, scales, offsets = minmax_reference(
      x, spec.format.values, axis=axis, block_size=q.block_size, granularity=granularity,
      scale_dtype=spec.scale_dtype or "float32", double_quant=spec.double_quant)
  got_codes = jq.packing.unpack(q.codes, q.bits, axis=axis)
  got_codes = jax.lax.slice_in_dim(got_codes, 0, x.shape[axis], axis=axis)
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_array_equal(q.decoded_scales(), scales.reshape(q.scales.shape))
  np.testing.assert_array_equal(q.decoded_offsets(), offsets.reshape(q.scales.shape))
  w = np.asarray(spec.format.values, F32)[codes]
  scale_of, offset_of = (np.repeat(a, q.block_size, axis=axis) for a in (scales, offsets))
  take = lambda a: jax.lax.slice_in_dim(jnp.asarray(a), 0, x.shape[axis], axis=axis)
  product, offset = (w * take(scale_of)).astype(F32), np.asarray(take(offset_of))
  expected = (product + offset).astype(F32)
  # s·v + o rounds once where the platform fuses it (XLA's CPU does), else twice: they differ
  # by at most the product's rounding and the sum's, an ulp of each.
  bound = (np.spacing(np.abs(product)) + np.spacing(np.abs(expected))).astype(F32)
  assert np.all(np.abs(np.asarray(q.dequantise()) - expected) <= bound)


def test_a_block_lands_on_the_whole_range_of_the_format():
  x = np.array([[3.0, 3.5, 4.0, 10.5] * 8], np.float32)  # one block of 32, min 3, max 10.5
  q = jq.quantise(x, jq.QuantSpec("uint4", block_size=32, axis=1, scale_dtype="float32"))
  w = np.asarray(q.dequantise())
  assert w.min() == 3.0 and w.max() == 10.5  # both ends exact: o = min, o + 15·s = max
  assert float(q.decoded_scales()[0, 0]) == np.float32(7.5 / 15)
  constant = jq.quantise(np.full((4, 64), 2.5, np.float32), jq.QuantSpec("uint4", block_size=32))
  np.testing.assert_array_equal(constant.dequantise(), 2.5)  # zero scale, offset = value


def test_minmax_beats_absmax_on_shifted_blocks():
  x = jnp.asarray(RNG.uniform(1.0, 2.0, size=(256, 64)), jnp.float32)
  error = lambda spec: float(jnp.mean((jq.quantise(x, spec).dequantise() - x) ** 2))
  assert error(jq.QuantSpec("uint4", block_size=32)) < error(jq.QuantSpec("int4", block_size=32)) / 10


def test_refusals():
  with pytest.raises(ValueError, match="scaling='minmax' needs signed offsets"):
    jq.QuantSpec("uint4", scale_dtype="e8m0")
  with pytest.raises(NotImplementedError, match="minmax"):
    jq.gptq.quantise(jnp.ones((64, 8)), jnp.eye(64), jq.QuantSpec("uint4", block_size=32))


def asymmetric(shape, axis, block_size=64):
  w = jnp.asarray(RNG.standard_t(5, size=shape) * 0.05 + 0.02, jnp.float32)
  return jq.quantise(w, jq.QuantSpec("uint4", block_size=block_size, axis=axis))


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_every_contraction_pattern_adds_the_offsets(name, backend):
  x_shape, w_shape, axis, numbers, _ = PATTERNS[name]
  q = asymmetric(w_shape, axis)
  x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
  assert_close(jq.dot_general(x, q, numbers, backend=backend),
               reference(x, q.dequantise(), numbers))


@pytest.mark.parametrize("bits, block_size", [(4, 32), (3, 64), (8, 128)])
def test_the_pallas_kernel_adds_the_offsets(bits, block_size):
  w = jnp.asarray(RNG.normal(size=(256, 96)) + 0.5, jnp.float32)
  q = jq.quantise(w, jq.QuantSpec(f"uint{bits}", block_size=block_size))
  x = jnp.asarray(RNG.normal(size=(5, 256)), jnp.float32)
  y = jq.qmatmul(x, q, backend="pallas")
  assert_close(y, np.asarray(x, np.float64) @ np.asarray(q.dequantise(), np.float64))


def test_gradient_with_respect_to_x_includes_the_offsets():
  q = asymmetric((256, 48), 0, 32)
  x = jnp.asarray(RNG.normal(size=(3, 256)), jnp.float32)
  loss = lambda f: (lambda a: jnp.sum(jnp.sin(f(a))))
  numbers = (((1,), (0,)), ((), ()))
  grad = jax.jit(jax.grad(loss(lambda a: jq.dot_general(a, q, numbers, backend="xla"))))(x)
  w = q.dequantise()
  expected = jax.grad(loss(lambda a: jax.lax.dot_general(
      a, w, numbers, precision=jax.lax.Precision.HIGHEST)))(x)
  assert_close(grad, np.asarray(expected, np.float64), 1e-4)


def test_gathered_rows_and_transposes_keep_the_offsets():
  table = asymmetric((50, 96), 1, 32)
  ids = jnp.asarray([3, 0, 49, 3])
  np.testing.assert_array_equal(jq.take(table, ids, axis=0), table.dequantise()[ids])
  for axes in [(1, 0), None]:
    np.testing.assert_array_equal(table.transpose(axes).dequantise(), table.dequantise().T)
  grouped = jq.quantise(jnp.ones((64, 64)), jq.QuantSpec("uint4", block_size=32,
                                                         double_quant=True))
  with pytest.raises(ValueError, match="reorder the groups"):
    grouped.T


def test_checkpoint_and_safetensors_round_trip(tmp_path):
  q = jq.quantise(jnp.asarray(RNG.normal(size=(64, 40)), jnp.float32),
                  jq.QuantSpec("uint4", block_size=32, double_quant=True))
  jq.checkpoint.save(tmp_path / "ckpt", {"w": q})
  restored = jq.checkpoint.restore(tmp_path / "ckpt", {"w": q})["w"]
  jq.interop.safetensors.save(tmp_path / "w.safetensors", {"w": q})
  loaded = jq.interop.safetensors.load(tmp_path / "w.safetensors")["w"]
  for again in (restored, loaded):
    assert again.offsets.dtype == jnp.int8 and again.scale_group == q.scale_group
    np.testing.assert_array_equal(again.dequantise(), q.dequantise())


def test_spec_of_a_minmax_array_packs_it_again_identically():
  q = jq.quantise(jnp.asarray(RNG.normal(size=(64, 40)), jnp.float32),
                  jq.QuantSpec("uint4", block_size=32, scale_dtype="float16"))
  spec = weights.spec_of(q)
  assert spec.scaling == "minmax"
  again = jq.quantise(q.dequantise(), spec)
  np.testing.assert_array_equal(again.dequantise(), q.dequantise())


def test_float16_offsets_saturate_instead_of_overflowing():
  x = np.array([[-70000.0] * 16 + [-69999.0] * 16], np.float32)
  q = jq.quantise(jnp.asarray(x), jq.QuantSpec("uint4", block_size=32, axis=1,
                                               scale_dtype="float16"))
  assert q.offsets.dtype == jnp.float16
  assert float(q.decoded_offsets()[0, 0]) == -65504.0  # float16's largest finite magnitude
  assert np.all(np.isfinite(np.asarray(q.dequantise())))


def test_sharding_specs_cover_the_offsets():
  q = asymmetric((128, 64), 0, 32)
  mesh = jax.sharding.AbstractMesh((1,), ("model",))
  specs = jq.sharding.partition_specs(q, jax.sharding.PartitionSpec(None, "model"), mesh)
  assert specs.offsets == specs.scales and specs.offset_scales is None
