"""Interception: unmodified JAX code run with packed weights, against the same code on floats.

Every test runs a plain function twice, once with `jaxquant.interception.call` on a weight and
once by JAX on the weight's dequantised array, and compares.
"""

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxquant as jq
from jaxquant.interception import Use

RNG = np.random.default_rng(5)


def quantised(shape, axis, name="nf4"):
  w = jnp.asarray(RNG.normal(size=shape) / np.sqrt(shape[axis]), jnp.float32)
  return jq.quantise(w, jq.QuantSpec(name, axis=axis))


def same_as_float(fn, weight, *args, rtol=1e-5):
  got = jq.interception.call(fn, weight, *args)
  expected = fn(weight.dequantise(), *args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                               atol=rtol * float(np.abs(np.asarray(b, np.float64)).max()))
  return got


X = jnp.asarray(RNG.normal(size=(2, 3, 128)), jnp.float32)

FUNCTIONS = {
    "matmul operator": (lambda w, x: x @ w, (128, 96), 0),
    "jnp.dot": (lambda w, x: jnp.dot(x, w), (128, 96), 0),
    "jnp.matmul": (lambda w, x: jnp.matmul(x, w), (128, 96), 0),
    "jnp.tensordot": (lambda w, x: jnp.tensordot(x, w, axes=1), (128, 96), 0),
    "transposed [out, in]": (lambda w, x: x @ w.T, (96, 128), 1),
    "lax.dot_general [out, in]": (
        lambda w, x: lax.dot_general(x, w, (((2,), (1,)), ((), ()))), (96, 128), 1),
    "einsum, weight first": (lambda w, x: jnp.einsum("dk,btd->kbt", w, x), (128, 96), 0),
    "einsum, ellipsis": (lambda w, x: jnp.einsum("...d,dhk->...hk", x, w), (128, 4, 24), 0),
    "einsum, implicit output": (lambda w, x: jnp.einsum("btd,dk", x, w), (128, 96), 0),
    "astype bf16": (lambda w, x: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16), (128, 96), 0),
    "nested jit": (jax.jit(lambda w, x: jnp.tanh(x @ w)), (128, 96), 0),
    "used twice": (lambda w, x: (x @ w) @ w.T, (128, 96), 0),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_contractions_anywhere_in_the_code(name):
  fn, shape, axis = FUNCTIONS[name]
  same_as_float(fn, quantised(shape, axis), X, rtol=2e-2 if "bf16" in name else 1e-5)


def test_gathers_take_packed_rows():
  table = quantised((500, 128), 1)
  ids = jnp.array([[0, 499, 3], [3, 7, 499]])
  same_as_float(lambda t, i: t[i], table, ids)
  same_as_float(lambda t, i: jnp.take(t, i, axis=0), table, ids)
  same_as_float(lambda t, i, x: (t[i], x @ t.T), table, ids, X)  # a tied embedding  # Out of range: what jnp.take does with a float table (NaN rows), not a clamped row.
  rows = jq.interception.call(lambda t, i: jnp.take(t, i, axis=0), table, jnp.array([500, 2]))
  assert np.isnan(rows[0]).all() and not np.isnan(rows[1]).any()


def test_under_jit_grad_and_vmap():
  w = quantised((128, 96), 0)
  fn = lambda w, x: jnp.sum(jnp.sin(x @ w))
  grad = jax.jit(jax.grad(lambda x: jq.interception.call(fn, w, x)))(X)
  expected = jax.grad(lambda x: fn(w.dequantise(), x))(X)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
  batched = jax.vmap(lambda x: jq.interception.call(lambda w, x: x @ w, w, x))(X)
  np.testing.assert_allclose(batched, X @ w.dequantise(), rtol=1e-5, atol=1e-5)


def test_remat_stays_remat():
  w = quantised((128, 96), 0)
  fn = lambda w, x: jax.checkpoint(lambda x: jnp.tanh(x @ w))(x)
  same_as_float(fn, w, X)
  jaxpr = str(jax.make_jaxpr(lambda x: jq.interception.call(fn, w, x))(X))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_other_uses_are_refused_naming_the_weight():
  w = quantised((128, 96), 0)
  with pytest.raises(jq.interception.UnsupportedUse, match=r"weight '0'.*`mul`"):
    jq.interception.call(lambda w, x: x @ (w * 2.0), w, X)
  with pytest.raises(jq.interception.UnsupportedUse, match=r"weight 'layer/w'.*`reduce_sum`"):
    jq.interception.call(lambda p: jnp.sum(p["layer"]["w"]), {"layer": {"w": w}})


def test_a_returned_weight_comes_back_as_itself():
  w = quantised((128, 96), 0)
  y, same = jq.interception.call(lambda w, x: (x @ w, w), w, X)
  assert same is w


def test_nothing_is_patched_and_threads_do_not_interfere():
  w = quantised((128, 96), 0)
  originals = (jnp.einsum, jnp.dot, jnp.matmul, lax.dot_general, jnp.take)
  fn = lambda w, x: jnp.einsum("btd,dk->btk", x, w)
  expected_q = np.asarray(jq.interception.call(fn, w, X))
  expected_f = np.asarray(fn(w.dequantise(), X))

  def work(i):
    if i % 2:
      return np.array_equal(np.asarray(jq.interception.call(fn, w, X)), expected_q)
    return np.array_equal(np.asarray(fn(w.dequantise(), X)), expected_f)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    assert all(pool.map(work, range(16)))
  assert (jnp.einsum, jnp.dot, jnp.matmul, lax.dot_general, jnp.take) == originals


def test_discover_reports_each_use():
  def fn(p, x, ids):
    h = jnp.einsum("btd,dk->btk", x, p["w"])
    return h + p["table"][ids] + (x @ p["table"].T) @ p["table"] * p["scale"][None, None]

  params = {"w": jnp.ones((128, 128)), "table": jnp.ones((64, 128)), "scale": jnp.ones((128,))}
  uses = jq.interception.discover(fn, params, X, jnp.zeros((2, 3), jnp.int32),
                                  follow=lambda path, leaf: path in params)
  assert uses["w"] == [Use("contract", (0,))]
  assert uses["table"] == [Use("gather", (0,)), Use("contract", (1,)), Use("contract", (0,))]
  assert uses["scale"] == [Use("other", operation="broadcast_in_dim")]  # then a product


def test_ops_module_functions():
  w = quantised((128, 4, 24), 0)
  np.testing.assert_allclose(jq.einsum("btd,dhk->bthk", X, w),
                             jnp.einsum("btd,dhk->bthk", X, w.dequantise()), rtol=1e-5,
                             atol=1e-5)
  table = quantised((50, 16), 1)
  np.testing.assert_array_equal(jq.take(table, jnp.array([3, 49])),
                                table.dequantise()[jnp.array([3, 49])])
  f = jnp.ones((4, 4))
  np.testing.assert_array_equal(jq.take(f, jnp.array([1])), f[1:2])
  spec = jq.QuantSpec("int4", scaling="rms", block_size="tensor")
  dense = jnp.asarray(RNG.normal(size=(128, 96)), jnp.float32)
  np.testing.assert_array_equal(jq.einsum("btd,dk->btk", X, dense, spec=spec),
                                jq.einsum("btd,dk->btk", X, jq.quantise(dense, spec)))
