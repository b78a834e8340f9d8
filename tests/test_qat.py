"""Fake quantisation's straight-through gradient, qat_matmul, and QAT against PTQ."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_forward_is_dequantise_of_quantise():
  w = jax.random.normal(jax.random.key(0), (64, 96))
  for spec in (jq.QuantSpec("nf4"), jq.QuantSpec("int3", scaling="signmax", axis=0)):
    np.testing.assert_array_equal(jq.fake_quantise(w, spec), jq.quantise(w, spec).dequantise())


def test_straight_through_gradient_is_zero_exactly_where_clipped():
  w = jax.random.normal(jax.random.key(1), (4096,)) * 2.0
  spec = jq.QuantSpec("int4", block_size="tensor", scaling="rms")
  grad = jax.grad(lambda v: jnp.sum(jq.fake_quantise(v, spec) * 3.0))(w)
  # Independent reference: s = RMS·√3/8 rounded to bf16; INT4 spans [-8 s, 7 s].
  wn = np.asarray(w, np.float64)
  s = np.float32(np.sqrt(np.mean(wn**2)) * np.sqrt(3) / 8).astype(ml_dtypes.bfloat16).astype(np.float64)
  inside = (wn >= -8 * s) & (wn <= 7 * s)
  assert 0 < (~inside).sum() < 0.2 * w.size
  np.testing.assert_array_equal(np.asarray(grad), np.where(inside, 3.0, 0.0))


def test_absmax_gradient_is_the_identity():
  w = jax.random.normal(jax.random.key(2), (32, 128))
  grad = jax.jit(jax.grad(lambda v: jnp.sum(jq.fake_quantise(v, jq.QuantSpec("nf4")))))(w)
  np.testing.assert_array_equal(grad, jnp.ones_like(w))


@pytest.mark.parametrize("spec", [jq.QuantSpec("nf4", axis=0),
                                  jq.QuantSpec("int3", scaling="rms", axis=0)], ids=str)
def test_qat_matmul_matches_fake_quantised_dense_gradients(spec):
  x = jax.random.normal(jax.random.key(3), (2, 3, 256))
  w = jax.random.normal(jax.random.key(4), (256, 48))
  loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b))))
  dense = loss(lambda a, b: jnp.dot(a, jq.fake_quantise(b, spec),
                                    precision=jax.lax.Precision.HIGHEST))
  packed = loss(lambda a, b: jq.qat_matmul(a, b, spec))
  np.testing.assert_allclose(packed(x, w), dense(x, w), rtol=1e-5)
  for ours, theirs in zip(jax.grad(packed, (0, 1))(x, w), jax.grad(dense, (0, 1))(x, w)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(jnp.abs(theirs).max()))


def test_qat_beats_ptq_at_3_bits():
  spec = importlib.util.spec_from_file_location("qat_example", ROOT / "examples" /
                                                "qat_training_loop.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes Python floats and int32
    losses = example.main(steps=600, qat_steps=250)
  assert losses["float"] < losses["qat 3-bit"] < losses["ptq 3-bit"]
