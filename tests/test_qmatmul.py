"""qmatmul: every backend against float64 numpy on the dequantised weight, gradients, dispatch."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import formats, kernels
from jaxquant.kernels import cpu

RNG = np.random.default_rng(3)


def format_for(bits, block_size):
  if bits == 3:
    return formats.crd_format("t", 3, scaling="signmax", block_size=block_size, df=5)
  return {2: formats.int_format(2), 4: formats.nf4(), 8: formats.int_format(8)}[bits]


def make(m, k, n, bits, block_size=64, dtype=jnp.float32, **spec):
  w = jnp.asarray(RNG.standard_t(5, size=(k, n)) * 0.05, jnp.float32)
  q = jq.quantise(w, jq.QuantSpec(format_for(bits, block_size), block_size=block_size, axis=0,
                                  **spec))
  x = jnp.asarray(RNG.normal(size=(m, k)), dtype)
  expected = np.asarray(x, np.float64) @ np.asarray(q.dequantise(jnp.float32), np.float64)
  return x, q, expected


def assert_close(y, expected, dtype):
  assert y.dtype == dtype and y.shape == expected.shape
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  scale = np.abs(expected).max() + 1e-30
  np.testing.assert_allclose(np.asarray(y, np.float64) / scale, expected / scale,
                             atol=tolerance)


# Every M, K, N, bit width and activation dtype of the issue appears; not the full product.
SHAPES = [(1, 64, 1), (3, 1000, 200), (8, 4096, 512), (130, 1000, 512), (1, 4096, 200),
          (130, 64, 200), (3, 4096, 1), (8, 64, 512)]
CASES = [(shape, bits, dtype) for (shape, bits), dtype in zip(
    itertools.product(SHAPES, (2, 3, 4, 8)), itertools.cycle((jnp.float32, jnp.bfloat16)))][::3]


@pytest.mark.parametrize("backend", ["reference", "xla", "auto"])
@pytest.mark.parametrize("shape, bits, dtype", CASES, ids=str)
def test_backends_match_float64(backend, shape, bits, dtype):
  x, q, expected = make(*shape, bits, dtype=dtype)
  assert_close(jq.qmatmul(x, q, backend=backend), expected, dtype)


@pytest.mark.parametrize("bits, block_size, m", [(4, 64, 1), (3, 32, 3), (2, 128, 8), (8, 64, 2)])
def test_pallas_backend_in_interpret_mode(bits, block_size, m):
  x, q, expected = make(m, 256, 128, bits, block_size=block_size)
  assert_close(jq.qmatmul(x, q, backend="pallas"), expected, jnp.float32)


@pytest.mark.parametrize("spec", [
    dict(scaling="signmax"), dict(scaling="rms"), dict(scale_dtype="e8m0"),
    dict(scale_dtype="float8_e4m3fn"), dict(double_quant=True), dict(block_size=32),
    dict(block_size=128), dict(block_size="channel"), dict(block_size="tensor"),
], ids=str)
def test_every_scaling_and_scale_storage(spec):
  spec = {"block_size": 64, **spec}
  x, q, expected = make(5, 320, 96, 4, **spec)
  for backend in ("xla", "reference"):
    assert_close(jq.qmatmul(x, q, backend=backend), expected, jnp.float32)


def test_leading_axes_and_jit():
  x, q, expected = make(6, 256, 64, 4)
  y = jax.jit(lambda a, w: jq.qmatmul(a, w))(x.reshape(2, 3, 256), q)
  assert y.shape == (2, 3, 64)
  assert_close(y.reshape(6, 64), expected, jnp.float32)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_matches_the_dense_gradient(backend, dtype):
  x, q, _ = make(7, 1000, 48, 3, dtype=dtype)
  w = q.dequantise(jnp.float32)
  loss = lambda y: jnp.sum(jnp.sin(y.astype(jnp.float32)))
  grad = jax.jit(jax.grad(lambda a: loss(jq.qmatmul(a, q, backend=backend))))(x)
  expected = jax.grad(lambda a: loss(jnp.dot(a.astype(jnp.float32), w,
                                             precision=jax.lax.Precision.HIGHEST)))(x)
  assert grad.dtype == dtype and grad.shape == x.shape
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                             atol=tolerance * float(jnp.abs(expected).max()))


def test_backward_pass_keeps_no_float_weight():
  x, q, _ = make(1, 4096, 4096, 4)
  f = jax.jit(jax.grad(lambda a: jnp.sum(jq.qmatmul(a, q, backend="xla"))))
  temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4096 * 4096 * 4 / 8  # a float32 W would be 64 MiB; chunks are ~1 MiB


def test_auto_on_cpu_is_the_native_kernel_or_the_xla_loop():
  x, q, _ = make(2, 1024, 2048, 4)  # 2M weights: slabs of 512 rows of K, a loop
  jaxpr = str(jax.make_jaxpr(lambda a: jq.qmatmul(a, q))(x))
  assert "pallas_call" not in jaxpr
  if cpu.available():
    assert "ffi_call" in jaxpr and "scan" not in jaxpr
  else:
    assert "scan" in jaxpr  # fori_loop with a static count
  rows = jnp.ones((kernels.AUTO_CPU_MAX_M + 1, 1024), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda a: jq.qmatmul(a, q))(rows))
  assert "scan" in jaxpr and "ffi_call" not in jaxpr


@pytest.mark.parametrize("call, error, match", [
    (lambda x, q: jq.qmatmul(x, q, backend="cuda"), ValueError, "backend"),
    (lambda x, q: jq.qmatmul(x.astype(jnp.int32), q), TypeError, "dtype"),
    (lambda x, q: jq.qmatmul(x[:, :10], q), ValueError, "last axis"),
    (lambda x, q: jq.qmatmul(x, q.dequantise()), TypeError, "QuantisedArray"),
])
def test_bad_input(call, error, match):
  x, q, _ = make(2, 128, 32, 4)
  with pytest.raises(error, match=match):
    call(x, q)


def test_named_pallas_backend_does_not_fall_back():
  x, q, _ = make(2, 128, 32, 4, block_size="channel")
  with pytest.raises(NotImplementedError, match="block scales"):
    jq.qmatmul(x, q, backend="pallas")
