"""The contraction core: every dot_general pattern, every backend, against float64 numpy.

The reference is numpy's einsum in float64 on the dequantised weight. Weights are large enough
that every way of slabbing the packed weight (`jaxquant.kernels.xla.slab_plan`) is exercised:
summing over slabs of the packed axis, and splitting the output along a free, a batch or the
packed axis itself.
"""

import string
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import kernels
from jaxquant.kernels import cpu, xla
from jaxquant.kernels.dimensions import Contraction

RNG = np.random.default_rng(11)


def reference(x, w, dimension_numbers):
  """lax.dot_general's result in float64 numpy, via einsum subscripts."""
  (xc, wc), (xb, wb) = dimension_numbers
  letters = iter(string.ascii_letters)
  x_sub = [next(letters) for _ in range(x.ndim)]
  w_sub = [next(letters) for _ in range(w.ndim)]
  for a, b in zip(xc + xb, wc + wb):
    w_sub[b] = x_sub[a]
  out = ([x_sub[a] for a in xb] + [x_sub[a] for a in range(x.ndim) if a not in xc + xb] +
         [w_sub[a] for a in range(w.ndim) if a not in wc + wb])
  return np.einsum(f"{''.join(x_sub)},{''.join(w_sub)}->{''.join(out)}",
                   np.asarray(x, np.float64), np.asarray(w, np.float64))


def assert_close(y, expected, tolerance=1e-5):
  assert y.shape == expected.shape
  scale = np.abs(expected).max() + 1e-30
  np.testing.assert_allclose(np.asarray(y, np.float64) / scale, expected / scale, atol=tolerance)


# (x shape, weight shape, quantised axis, dimension numbers, slab axis the plan picks): every
# role of the slab axis appears: the packed axis contracted (summed over slabs), another
# contracted axis, a free axis, a batch axis, the packed axis free and the packed axis batched.
PATTERNS = {
    "x@W[K,N]": ((3, 1024), (1024, 2048), 0, (((1,), (0,)), ((), ())), 0),
    "x@W[N,K]ᵀ (Hugging Face)": ((2, 5, 1024), (2048, 1024), 1, (((2,), (1,)), ((), ())), 0),
    "table head x@Tᵀ": ((4, 256), (8192, 256), 1, (((1,), (1,)), ((), ())), 0),
    "gemma qkv (3,h,d,hd) on d": ((2, 3, 256), (3, 4, 256, 512), 2, (((2,), (2,)), ((), ())), 0),
    "per-head batch": ((8, 5, 256), (8, 256, 1024), 1, (((2,), (1,)), ((0,), (0,))), 0),
    "two contracted axes": ((2, 7, 8, 128), (8, 128, 2048), 1, (((2, 3), (0, 1)), ((), ())), 0),
    "contracted out of order": ((2, 7, 128, 8), (8, 128, 2048), 1,
                                (((3, 2), (0, 1)), ((), ())), 0),
    "packed axis free (gᵀ)": ((3, 2048), (1024, 2048), 0, (((1,), (1,)), ((), ())), 0),
    "packed axis batched": ((512, 3, 96), (512, 96, 32), 0, (((2,), (1,)), ((0,), (0,))), 0),
    "small, one slab": ((3, 100), (100, 40), 0, (((1,), (0,)), ((), ())), 0),
}


def weight(shape, axis, spec=None, bits=4):
  w = jnp.asarray(RNG.standard_t(5, size=shape) * 0.05, jnp.float32)
  spec = spec or jq.QuantSpec({3: "int3", 4: "nf4", 8: "int8"}[bits], block_size=64)
  return jq.quantise(w, jq.QuantSpec(spec.format, block_size=spec.block_size,
                                     scaling=spec.scaling, axis=axis,
                                     scale_dtype=spec.scale_dtype))


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("backend", ["xla", "reference", "auto"])
def test_every_pattern_matches_float64(name, backend):
  x_shape, w_shape, axis, numbers, slab_axis = PATTERNS[name]
  q = weight(w_shape, axis)
  assert xla.slab_plan(q)[0] == slab_axis
  x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
  y = jq.dot_general(x, q, numbers, backend=backend)
  assert y.dtype == jnp.float32
  assert_close(y, reference(x, q.dequantise(), numbers))


@pytest.mark.parametrize("name", ["x@W[N,K]ᵀ (Hugging Face)", "two contracted axes",
                                  "packed axis batched", "table head x@Tᵀ"])
def test_gradient_with_respect_to_x(name):
  x_shape, w_shape, axis, numbers, _ = PATTERNS[name]
  q = weight(w_shape, axis)
  x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
  w = q.dequantise()
  loss = lambda f: (lambda a: jnp.sum(jnp.sin(f(a))))
  grad = jax.jit(jax.grad(loss(lambda a: jq.dot_general(a, q, numbers))))(x)
  expected = jax.grad(loss(lambda a: jax.lax.dot_general(
      a, w, numbers, precision=jax.lax.Precision.HIGHEST)))(x)
  assert_close(grad, np.asarray(expected, np.float64), 1e-4)


@pytest.mark.parametrize("spec, bits", [
    (jq.QuantSpec("int3", block_size=32), 3), (jq.QuantSpec("int8", block_size=128), 8),
    (jq.QuantSpec("nf4", block_size="channel"), 4), (jq.QuantSpec("nf4", block_size="tensor"), 4),
    (jq.QuantSpec("nf4", block_size=64, scale_dtype="e8m0"), 4),
    (jq.QuantSpec("nf4", block_size=48), 4),  # 48 does not divide 32: one slab along K
], ids=str)
def test_granularities_bits_and_awkward_blocks_on_the_out_in_layout(spec, bits):
  q = weight((1536, 1000), 1, spec, bits)  # 1000 is not a multiple of 32 or of the block
  x = jnp.asarray(RNG.normal(size=(2, 1000)), jnp.float32)
  numbers = (((1,), (1,)), ((), ()))
  assert_close(jq.dot_general(x, q, numbers, backend="xla"),
               reference(x, q.dequantise(), numbers))


@pytest.mark.parametrize("backend", ["xla", "cpu"])
def test_dtype_rule(backend):
  if backend == "cpu" and not cpu.available():
    pytest.skip("the CPU kernel is not built")
  q = weight((256, 128), 0)
  x = jnp.asarray(RNG.normal(size=(3, 256)), jnp.bfloat16)
  numbers = (((1,), (0,)), ((), ()))
  assert jq.dot_general(x, q, numbers, backend=backend).dtype == jnp.bfloat16  # x's dtype
  y = jq.dot_general(x, q, numbers, preferred_element_type=jnp.float32, backend=backend)
  assert y.dtype == jnp.float32
  # Products accumulate in float32. The XLA loop rounds its slab of W to bf16 like x (a bf16
  # dot); the CPU kernel multiplies x by W in float32.
  w = q.dequantise()
  expected = jax.lax.dot_general(x, w.astype(jnp.bfloat16) if backend == "xla" else w,
                                 numbers, preferred_element_type=jnp.float32,
                                 precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_outlier_weights_contract_in_any_pattern():
  name = "two contracted axes"
  x_shape, w_shape, axis, numbers, _ = PATTERNS[name]
  w = jnp.asarray(RNG.standard_t(3, size=w_shape), jnp.float32)
  oq = jq.outliers.quantise_with_outliers(w, jq.QuantSpec("nf4", axis=axis), 2**-8)
  x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
  assert_close(jq.dot_general(x, oq, numbers), reference(x, oq.dequantise(), numbers))
  grad = jax.grad(lambda a: jnp.sum(jq.dot_general(a, oq, numbers) ** 2))(x)
  expected = jax.grad(lambda a: jnp.sum(jax.lax.dot_general(
      a, oq.dequantise(), numbers, precision=jax.lax.Precision.HIGHEST) ** 2))(x)
  assert_close(grad, np.asarray(expected, np.float64), 1e-4)


class Negated:
  """A weight type the core has never heard of: -W for a packed W."""

  def __init__(self, q):
    self.q, self.shape, self.dtype = q, q.shape, q.dtype

  def contract(self, x, contraction, backend):
    return -self.q.contract(x, contraction, backend)

  def gather(self, indices, params):
    return -self.q.gather(indices, params)

  def dequantise(self, dtype=None):
    return -self.q.dequantise(dtype)

  def astype(self, dtype):
    return Negated(self.q.astype(dtype))


def test_any_type_with_the_protocol_plugs_in():
  q = weight((512, 64), 0)
  w = Negated(q)
  x = jnp.asarray(RNG.normal(size=(3, 512)), jnp.float32)
  np.testing.assert_allclose(jq.qmatmul(x, w), -jq.qmatmul(x, q), rtol=1e-6)
  np.testing.assert_allclose(jq.einsum("bk,kn->bn", x, w), -jq.qmatmul(x, q), rtol=1e-6)


def test_spec_makes_the_float_weight_quantisation_aware():
  w = jnp.asarray(RNG.normal(size=(256, 64)), jnp.float32)
  x = jnp.asarray(RNG.normal(size=(3, 256)), jnp.float32)
  numbers = (((1,), (0,)), ((), ()))
  spec = jq.QuantSpec("int4", scaling="rms", block_size="tensor")
  y = jq.dot_general(x, w, numbers, spec=spec)
  np.testing.assert_array_equal(y, jq.dot_general(x, jq.quantise(w, spec), numbers))
  grad_w = jax.grad(lambda v: jnp.sum(jq.dot_general(x, v, numbers, spec=spec)))(w)
  expected = jax.grad(lambda v: jnp.sum(x @ jq.fake_quantise(v, spec)))(w)
  np.testing.assert_allclose(grad_w, expected, rtol=1e-5, atol=1e-5)
  assert 0 < int(jnp.sum(grad_w == 0)) < w.size // 4  # clipped elements get no gradient


def test_formats_of_one_bit_width_share_one_compiled_program():
  w = jnp.asarray(RNG.normal(size=(512, 256)), jnp.float32)
  x = jnp.asarray(RNG.normal(size=(2, 512)), jnp.float32)
  forward = jax.jit(lambda a, q: jq.qmatmul(a, q))
  names = ["int4", "int4-sym", "nf4", "sf4", "e2m1", "crd-normal-absmax-4b",
           "crd-laplace-absmax-4b", "crd-t5-absmax-4b", "crd-normal-signmax-4b", "grid15",
           "crd-t5-signmax-4b"]
  for name in names:
    q = jq.quantise(w, jq.QuantSpec(name, block_size=64))
    assert_close(forward(x, q), reference(x, q.dequantise(), (((1,), (0,)), ((), ()))))
  assert forward._cache_size() == 1  # pylint: disable=protected-access


def test_auto_on_an_accelerator_says_once_why_it_dequantises(monkeypatch):
  q = weight((256, 64), 0, jq.QuantSpec("nf4", block_size="channel"))
  x = jnp.asarray(RNG.normal(size=(2, 256)), jnp.float32)
  monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
  kernels._SAID.clear()  # pylint: disable=protected-access
  with pytest.warns(UserWarning, match="channel scales"):
    y = jq.qmatmul(x, q)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jq.qmatmul(x, q)  # said once
  assert_close(y, reference(x, q.dequantise(), (((1,), (0,)), ((), ()))))


def test_transposed_contraction_is_the_gradient_layout():
  contraction = Contraction.of((((3, 1), (0, 2)), ((0,), (1,))), (5, 4, 2, 3), (3, 5, 4, 7))
  backward, to_x = contraction.transposed()
  g_shape = contraction.output_shape((5, 4, 2, 3), (3, 5, 4, 7))
  assert g_shape == (5, 2, 7)
  z_shape = backward.output_shape(g_shape, (3, 5, 4, 7))
  assert tuple(z_shape[i] for i in to_x) == (5, 4, 2, 3)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, q: jq.dot_general(x, q, (((1,), (1,)), ((), ()))), ValueError, "disagree"),
    (lambda x, q: jq.dot_general(x, q, (((1,), (5,)), ((), ()))), ValueError, "out of range"),
    (lambda x, q: jq.dot_general(x, q, (((1, 0), (0,)), ((), ()))), ValueError, "pairs"),
    (lambda x, q: jq.dot_general(x, q, ((1, 0), ((), ()))), TypeError, "dimension_numbers"),
    (lambda x, q: jq.dot_general(x.astype(jnp.int32), q, (((1,), (0,)), ((), ()))), TypeError,
     "activations"),
    (lambda x, q: jq.dot_general(x, q, (((1,), (0,)), ((), ())), backend="tpu"), ValueError,
     "backend"),
    (lambda x, q: jq.dot_general(x, q, (((1,), (0,)), ((), ())), spec="nf4"), TypeError, "spec"),
    (lambda x, q: jq.dot_general(x, "w", (((1,), (0,)), ((), ()))), TypeError, "weight"),
    (lambda x, q: jq.dot_general(x, q, (((1,), (0,)), ((), ())), backend="pallas"),
     NotImplementedError, "Pallas"),
])
def test_bad_input(call, error, match):
  q = weight((256, 64), 1)  # quantised along N: not the Pallas kernel's layout
  x = jnp.ones((2, 256))
  with pytest.raises(error, match=match):
    call(x, q)
