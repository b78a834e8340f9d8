"""Fake quantisation's straight-through gradient, qat_matmul, and QAT against PTQ."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
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
  # Independent reference: the exact scale s = RMS·√3/8; INT4 spans [-8 s, 7 s].
  wn = np.asarray(w, np.float64)
  s = np.sqrt(np.mean(wn**2)) * np.sqrt(3) / 8
  inside = (wn >= -8 * s) & (wn <= 7 * s)
  assert 0 < (~inside).sum() < 0.2 * w.size
  np.testing.assert_array_equal(np.asarray(grad), np.where(inside, 3.0, 0.0))


@pytest.mark.parametrize("name", ["int4", "crd-t5-signmax-4b"])
def test_signmax_gradient_is_zero_where_the_other_end_clips(name):
  # Signmax puts each block's signed extreme on the format's end of larger magnitude; an
  # asymmetric format then clips on the other side (INT4: +8s -> 7s; CRD signmax: no -1).
  w = jax.random.normal(jax.random.key(2), (64, 64))
  spec = jq.QuantSpec(name, scaling="signmax", block_size=64, axis=0, scale_dtype="float32")
  grad = jax.grad(lambda v: jnp.sum(jq.fake_quantise(v, spec)))(w)
  values = np.asarray(spec.format.values)
  end = values[0] if -values[0] > values[-1] else values[-1]
  wn = np.asarray(w, np.float64)
  extreme = wn[np.abs(wn).argmax(0), np.arange(64)]
  low, high = np.sort(np.stack([extreme / end * values[0], extreme / end * values[-1]]), axis=0)
  inside = (wn >= low * (1 + 1e-6)) & (wn <= high * (1 + 1e-6))
  assert 0 < (~inside).sum() < 0.1 * w.size
  np.testing.assert_array_equal(np.asarray(grad), np.where(inside, 1.0, 0.0))


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
