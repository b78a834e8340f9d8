"""Sparse outliers: the split against numpy argsort, exact bit counts, reconstruction, qmatmul."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import outliers

RNG = np.random.default_rng(11)
NF4_ALONG_K = jq.QuantSpec("nf4", block_size=64, axis=0)


def heavy(shape, planted=0):
  """Student-t ν=3 values, with `planted` entries set to ±200 at random positions."""
  x = RNG.standard_t(3, size=shape).astype(np.float32)
  spots = RNG.choice(x.size, planted, replace=False)
  x.reshape(-1)[spots] = 200 * RNG.choice([-1, 1], planted)
  return jnp.asarray(x)


def fitted_crd_t(remainder):
  fmt = jq.fitting.fit_crd_t(remainder, 3, scaling="rms", axis=0)
  return jq.QuantSpec(fmt, block_size="tensor", scaling="rms", axis=0)


def numpy_split(x, fraction):
  """Top-n |x| by a stable numpy sort (lower flat index first among equals), ascending."""
  flat = np.asarray(x, np.float32).reshape(-1)
  n = int(np.rint(fraction * flat.size))
  indices = np.sort(np.argsort(-np.abs(flat), kind="stable")[:n])
  remainder = flat.copy()
  remainder[indices] = 0
  return remainder.reshape(np.shape(x)), indices


@pytest.mark.parametrize("shape, fraction, ties, dtype", [
    ((1000,), 0.01, False, jnp.float32), ((37, 53), 2**-7, False, jnp.float32),
    ((8, 16, 9), 0.3, True, jnp.float32), ((64, 64), 0.05, True, jnp.bfloat16),
    ((10,), 0.25, False, jnp.float32), ((6,), 0.25, False, jnp.float32),
    ((1000,), 1e-4, False, jnp.float32), ((4, 5), 0.99, True, jnp.float32),
], ids=str)
def test_split_takes_the_largest_magnitudes(shape, fraction, ties, dtype):
  if ties:  # few distinct magnitudes: the cut falls inside a group of equal |x|
    x = jnp.asarray(RNG.integers(-4, 5, size=shape), dtype)
  else:
    x = jnp.asarray(RNG.standard_t(3, size=shape), dtype)
  remainder, indices = outliers.split_outliers(x, fraction)
  expected_remainder, expected_indices = numpy_split(x, fraction)
  assert indices.dtype == jnp.int32 and remainder.dtype == dtype
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(np.asarray(remainder, np.float32), expected_remainder)


@pytest.mark.parametrize("fraction", [2**-10, 2**-7])
def test_bits_are_counted_exactly(fraction):
  x = heavy((1024, 1024))
  oq = outliers.quantise_with_outliers(x, NF4_ALONG_K, fraction)
  n = int(np.rint(fraction * 2**20))
  # 4-bit codes, one bf16 scale per 64 elements along K, then bf16 value + int32 index each.
  dense_bits = 4 * 2**20 + 16 * (1024 // 64) * 1024
  assert oq.n_outliers == n == 2**20 * fraction
  assert oq.dense.storage_bits == dense_bits
  assert oq.storage_bits == dense_bits + 48 * n
  assert oq.bits_per_param - oq.dense.bits_per_param == 48 * fraction  # 0.046875 at 2^-10


@pytest.mark.parametrize("spec", [
    NF4_ALONG_K,
    jq.QuantSpec("int4-sym", block_size="tensor", scaling="rms"),  # no exact zero
    jq.QuantSpec("crd-t5-signmax-3b-B32", block_size=32, axis=1),
], ids=lambda spec: spec.format.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reconstruction_is_exact_at_outliers_and_dense_elsewhere(spec, dtype):
  x = heavy((128, 96), planted=5).astype(dtype)
  oq = outliers.quantise_with_outliers(x, spec, 2**-5)
  remainder, indices = outliers.split_outliers(x, 2**-5)
  np.testing.assert_array_equal(oq.indices, indices)
  plain = jq.quantise(remainder, spec)
  np.testing.assert_array_equal(oq.dense.codes, plain.codes)
  np.testing.assert_array_equal(oq.dense.scales, plain.scales)

  got = np.asarray(oq.dequantise(jnp.float32), np.float64).reshape(-1)
  dense = np.asarray(jq.dequantise(plain, jnp.float32), np.float64).reshape(-1)
  target = np.asarray(x, np.float64).reshape(-1)
  at = np.zeros(x.size, bool)
  at[np.asarray(indices)] = True
  np.testing.assert_array_equal(got[~at], dense[~at])
  # One bf16 rounding of the correction x - dense (unit roundoff 2^-8), then one in float32.
  bound = 2**-8 * np.abs(target[at] - dense[at]) + 2**-23 * np.abs(target[at])
  assert np.all(np.abs(got[at] - target[at]) <= bound)
  correction = (target[at] - dense[at]).astype(np.float32).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(oq.values), correction)

  assert oq.dequantise().dtype == dtype and jq.dequantise(oq).dtype == dtype
  np.testing.assert_array_equal(jq.dequantise(oq, jnp.float32), oq.dequantise(jnp.float32))


@pytest.mark.parametrize("planted, fraction, ratio", [(0, 2**-7, 0.7), (16, 2**-10, 0.4)])
def test_outliers_cut_the_error_on_heavy_tails(planted, fraction, ratio):
  x = heavy((512, 256), planted)
  error = lambda q: float(jq.metrics.relative_rmse(x, jq.dequantise(q, jnp.float32)))
  int_spec = jq.QuantSpec("int4", block_size="tensor", scaling="rms", axis=0)
  assert error(outliers.quantise_with_outliers(x, int_spec, fraction)) < ratio * error(
      jq.quantise(x, int_spec))

  seen = []
  oq = outliers.quantise_with_outliers(x, lambda r: seen.append(r) or fitted_crd_t(r), fraction)
  assert error(oq) < ratio * error(jq.quantise(x, fitted_crd_t(x)))
  (remainder,) = seen
  np.testing.assert_array_equal(remainder, numpy_split(x, fraction)[0])
  assert np.abs(remainder).max() <= np.abs(np.asarray(x).reshape(-1)[oq.indices]).min()


def weight_and_activations(lead, dtype, k=320, n=96):
  w = heavy((k, n), planted=4) * 0.05
  oq = outliers.quantise_with_outliers(w, NF4_ALONG_K, 2**-6)
  x = jnp.asarray(RNG.normal(size=lead + (k,)), dtype)
  return x, oq, np.asarray(oq.dequantise(jnp.float32), np.float64)


def assert_close(y, expected, dtype):
  assert y.dtype == dtype and y.shape == expected.shape
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  scale = np.abs(expected).max()
  np.testing.assert_allclose(np.asarray(y, np.float64) / scale, expected / scale, atol=tolerance)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=str)
def test_qmatmul_adds_the_sparse_correction(backend, dtype, lead):
  x, oq, w = weight_and_activations(lead, dtype)
  expected = np.asarray(x, np.float64) @ w
  assert_close(jq.qmatmul(x, oq, backend=backend), expected, dtype)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_matches_the_dense_gradient(backend, dtype):
  x, oq, w = weight_and_activations((4,), dtype)
  cotangent = jnp.asarray(RNG.normal(size=(4, w.shape[1])), jnp.float32)
  loss = lambda a: jnp.sum(jq.qmatmul(a, oq, backend=backend).astype(jnp.float32) * cotangent)
  assert_close(jax.grad(loss)(x), np.asarray(cotangent, np.float64) @ w.T, dtype)


def test_everything_works_under_jit():
  x, oq, w = weight_and_activations((3,), jnp.float32)
  assert_close(jax.jit(lambda a, q: jq.qmatmul(a, q, backend="xla"))(x, oq),
               np.asarray(x, np.float64) @ w, jnp.float32)
  np.testing.assert_array_equal(jax.jit(lambda q: q.dequantise(jnp.float32))(oq), w)

  weight = heavy((64, 48), planted=2)
  split = jax.jit(outliers.split_outliers, static_argnums=1)(weight, 0.05)
  for got, expected in zip(split, outliers.split_outliers(weight, 0.05)):
    np.testing.assert_array_equal(got, expected)
  traced = jax.jit(lambda a: outliers.quantise_with_outliers(a, NF4_ALONG_K, 0.05))(weight)
  eager = outliers.quantise_with_outliers(weight, NF4_ALONG_K, 0.05)
  assert jax.tree.structure(traced) == jax.tree.structure(eager)
  for got, expected in zip(jax.tree.leaves(traced), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fraction", [0, 1e-4])  # 1e-4 · 3072 rounds to 0
def test_no_outliers_matches_plain_quantise(fraction):
  x = jnp.asarray(RNG.normal(size=(64, 48)), jnp.float32)
  oq = outliers.quantise_with_outliers(x, NF4_ALONG_K, fraction)
  plain = jq.quantise(x, NF4_ALONG_K)
  assert oq.n_outliers == 0 and oq.values.shape == (0,) and oq.values.dtype == jnp.bfloat16
  assert oq.storage_bits == plain.storage_bits
  np.testing.assert_array_equal(oq.dequantise(), plain.dequantise())
  activations = jnp.asarray(RNG.normal(size=(2, 64)), jnp.float32)
  np.testing.assert_array_equal(jq.qmatmul(activations, oq, backend="xla"),
                                jq.qmatmul(activations, plain, backend="xla"))


def test_pytree_and_repr():
  x, oq, _ = weight_and_activations((1,), jnp.float32)
  leaves, tree = jax.tree.flatten(oq)
  rebuilt = jax.tree.unflatten(tree, leaves)
  assert isinstance(rebuilt, outliers.OutlierQuantisedArray) and rebuilt.shape == oq.shape
  assert rebuilt.size == x.shape[-1] * 96 and rebuilt.ndim == 2
  text = repr(oq)
  assert text.startswith("OutlierQuantisedArray(shape=(320, 96), dtype=float32, ")
  assert f"n_outliers={320 * 96 // 2**6}" in text and "dense=QuantisedArray(" in text


@pytest.mark.parametrize("fraction, error", [
    (-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError), (True, TypeError),
    ("0.1", TypeError), (None, TypeError),
])
def test_bad_fraction_raises(fraction, error):
  with pytest.raises(error, match="fraction="):
    outliers.split_outliers(jnp.ones((4, 4)), fraction)


def test_bad_arguments_raise():
  x = heavy((64, 32), planted=1)
  with pytest.raises(TypeError, match="x has dtype int32"):
    outliers.split_outliers(jnp.ones((4, 4), jnp.int32), 0.1)
  with pytest.raises(ValueError, match=r"2\*\*31"):
    jax.eval_shape(lambda: outliers.split_outliers(jnp.zeros((2**16, 2**15)), 0.1))
  with pytest.raises(TypeError, match="spec must be a QuantSpec"):
    outliers.quantise_with_outliers(x, 4, 0.1)
  with pytest.raises(TypeError, match="spec must be a QuantSpec"):
    outliers.quantise_with_outliers(x, lambda r: 4, 0.1)
  for fraction in (0.0, 0.1):  # the NaN lands in the dense part, then among the outliers
    with pytest.raises(ValueError, match="NaN"):
      outliers.quantise_with_outliers(x.at[3, 4].set(jnp.nan), NF4_ALONG_K, fraction)

  oq = outliers.quantise_with_outliers(x, NF4_ALONG_K, 0.1)
  with pytest.raises(ValueError, match="K = 64"):
    jq.qmatmul(jnp.ones((2, 32)), oq)
  with pytest.raises(ValueError, match="backend="):
    jq.qmatmul(jnp.ones((2, 64)), oq, backend="cuda")
