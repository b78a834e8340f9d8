"""The native CPU lookup matmul (`jaxquant.kernels.cpu`) against a float64 reference."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import kernels
from jaxquant.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernel is not built")

ISAS = cpu.isas()
SCALE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "e8m0")


def grid(bits: int):
  """A codebook of 2^bits distinct values (an odd uniform grid of 2^bits - 1, or two points)."""
  return jq.formats.uniform_grid(max(2**bits - 1, 2))


def float64_product(x, q):
  """x @ W in float64 from the dequantised W, and Σ|x||W| (the scale of rounding errors)."""
  w = np.asarray(q.dequantise(jnp.float32), np.float64)
  x = np.asarray(x.astype(jnp.float32), np.float64)
  return x @ w, np.abs(x) @ np.abs(w)


def assert_close(y, x, q):
  expected, magnitude = float64_product(x, q)
  assert y.dtype == jnp.float32 and y.shape == expected.shape
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - expected),
                               2e-6 * magnitude + 1e-30)


def weights(k, n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_t(5, size=(k, n)), jnp.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bits_scale_and_activation_dtype(bits, isa):
  w = weights(96, 45, seed=bits)
  for scale_dtype in SCALE_DTYPES:
    q = jq.quantise(w, jq.QuantSpec(grid(bits), block_size=32, scale_dtype=scale_dtype))
    for activation_dtype, m in itertools.product(("float32", "bfloat16", "float16"), (1, 7)):
      x = jnp.asarray(np.random.default_rng(m).normal(size=(m, 96)), activation_dtype)
      assert_close(cpu.qmatmul_cpu(x, q, isa=isa), x, q)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size", [16, 32, 48, 64, "channel", "tensor"])
def test_odd_shapes_and_blocks(block_size, isa):
  # N below, at and across the vector widths (8, 16, 32 columns); K not a multiple of 32;
  # M = 1 (the GEMV), the micro-kernel's 6 rows and a remainder.
  shapes = [(100, 37), (32, 1), (64, 5), (160, 8), (224, 200), (33, 64)]
  for (k, n), bits in zip(shapes, itertools.cycle((3, 4, 8))):
    q = jq.quantise(weights(k, n), jq.QuantSpec(grid(bits), block_size=block_size))
    for m in (1, 6, 13):
      x = jnp.asarray(np.random.default_rng(m).normal(size=(m, k)), jnp.float32)
      assert_close(cpu.qmatmul_cpu(x, q, isa=isa), x, q)


def test_double_quantised_and_asymmetric_weights():
  w = weights(512, 40)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 512)), jnp.float32)
  for spec in (jq.QuantSpec("nf4", block_size=64, double_quant=True),
               jq.QuantSpec("uint4", block_size=32), jq.QuantSpec("uint3", block_size=64)):
    q = jq.quantise(w, spec)
    assert_close(kernels.qmatmul_cpu(x, q), x, q)
    assert_close(jq.qmatmul(x, q, backend="cpu"), x, q)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [1, 9])
def test_threads_agree(m, bits):
  """Threads take column ranges, each column computed by one thread in one order, so any
  thread count agrees bit for bit; the 4-bit GEMV (byte tables) takes K blocks instead and
  sums the partial outputs, which agrees to rounding."""
  q = jq.quantise(weights(256, 1000), jq.QuantSpec(grid(bits), block_size=64))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(m, 256)), jnp.float32)
  one = cpu.qmatmul_cpu(x, q, threads=1)
  assert_close(one, x, q)
  for threads in (2, 3, 7, 64):
    y = cpu.qmatmul_cpu(x, q, threads=threads)
    if m == 1 and bits == 4:
      assert_close(y, x, q)
    else:
      np.testing.assert_array_equal(y, one)


def test_auto_runs_the_kernel_for_every_layer_product_on_cpu():
  q = jq.quantise(weights(128, 64), jq.QuantSpec("nf4", block_size=64))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 128)), jnp.float32)
  program = jax.jit(lambda x, q: jq.qmatmul(x, q)).lower(x, q).as_text()
  assert cpu.TARGET in program
  assert_close(jq.qmatmul(x, q).reshape(10, 64), x.reshape(10, 128), q)
  # Beyond AUTO_CPU_MAX_M rows, and for a contraction that is not x @ W[K, N] along the
  # packed axis, auto uses the XLA loop.
  rows = jnp.ones((kernels.AUTO_CPU_MAX_M + 1, 128), jnp.float32)
  assert cpu.TARGET not in jax.jit(lambda x, q: jq.qmatmul(x, q)).lower(rows, q).as_text()
  transposed = jax.jit(lambda x, q: jq.einsum("bk,nk->bn", x, q)).lower(
      x[0], jq.quantise(weights(128, 64).T, jq.QuantSpec("nf4", axis=1))).as_text()
  assert cpu.TARGET not in transposed


def test_gradient_with_respect_to_x_matches_the_reference():
  q = jq.quantise(weights(256, 48), jq.QuantSpec("nf4", block_size=64))
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 256)), jnp.float32)
  loss = lambda backend: lambda x: jnp.sum(jnp.sin(jq.qmatmul(x, q, backend=backend)))
  np.testing.assert_allclose(jax.grad(loss("cpu"))(x), jax.grad(loss("reference"))(x),
                             rtol=1e-4, atol=1e-5)


def test_the_xla_loop_serves_when_the_extension_is_absent(monkeypatch):
  monkeypatch.setattr(cpu, "_cpu", None)
  monkeypatch.setattr(cpu, "MISSING", "jaxquant's CPU kernel is not built (test)")
  monkeypatch.setattr(kernels, "_SAID", set())
  q = jq.quantise(weights(128, 64), jq.QuantSpec("nf4"))
  x = jnp.ones((1, 128), jnp.float32)
  with pytest.warns(UserWarning, match="uses the XLA loop on CPU: jaxquant's CPU kernel is not"):
    y = jq.qmatmul(x, q)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jq.qmatmul(x, q)  # said once
  assert_close(y, x, q)
  with pytest.raises(RuntimeError, match="not built"):
    jq.qmatmul(x, q, backend="cpu")


def test_bad_arguments_are_named():
  q = jq.quantise(weights(64, 16), jq.QuantSpec("nf4"))
  x = jnp.ones((1, 64), jnp.float32)
  with pytest.raises(ValueError, match="isa='avx9'"):
    cpu.qmatmul_cpu(x, q, isa="avx9")
  with pytest.raises(ValueError, match="threads=0"):
    cpu.qmatmul_cpu(x, q, threads=0)
  with pytest.raises(ValueError, match=r"x has shape \(1, 63\)"):
    cpu.qmatmul_cpu(x[:, :63], q)
  with pytest.raises(ValueError, match="packed along axis 0"):
    cpu.qmatmul_cpu(x, jq.quantise(weights(64, 16).reshape(64, 4, 4), jq.QuantSpec("nf4")))
  with pytest.raises(NotImplementedError, match="the CPU kernels compute"):
    jq.einsum("bk,nk->bn", x[:, :16], jq.quantise(weights(64, 16), jq.QuantSpec("nf4")),
              backend="cpu")
