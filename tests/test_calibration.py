"""Second moments of the inputs each weight meets, found through the interception core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.calibration import accumulate, second_moments

RNG = np.random.default_rng(0)


def _normal(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _gram(x):
  x = np.asarray(x, np.float64)
  return x.T @ x


def test_every_contraction_style_records_the_inputs_it_contracts():
  params = {"dense": _normal(8, 5), "left": _normal(6, 8), "heads": _normal(3, 8, 4),
            "attn_out": _normal(3, 4, 8), "norm": _normal(8)}
  x = _normal(2, 7, 8)

  def model(p, x):
    y = x @ p["dense"]                                          # [b, t, 5]
    z = jnp.einsum("of,btf->bto", p["left"], x)                 # weight on the left
    h = jnp.einsum("btf,nfk->btnk", x * p["norm"][None, None], p["heads"])  # free n
    per = jax.lax.dot_general(h, p["attn_out"], (((3,), (1,)), ((2,), (0,))))  # batch n
    return y.sum() + z.sum() + per.sum()

  moments = second_moments(model, params, x)
  assert set(moments) == {"dense", "left", "heads", "attn_out"}  # the norm is 1-D
  tokens = x.reshape(-1, 8)
  np.testing.assert_allclose(moments["dense"].matrix, _gram(tokens), rtol=1e-5, atol=1e-4)
  assert moments["dense"].contracting == (0,) and moments["dense"].tokens == 14
  np.testing.assert_allclose(moments["left"].matrix, _gram(tokens), rtol=1e-5, atol=1e-4)
  assert moments["left"].contracting == (1,)
  normed = tokens * params["norm"]
  np.testing.assert_allclose(moments["heads"].matrix, _gram(normed), rtol=1e-5, atol=1e-4)
  h = np.einsum("btf,nfk->btnk", x * params["norm"], params["heads"])
  per_head = np.stack([_gram(h[:, :, n].reshape(-1, 4)) for n in range(3)])
  np.testing.assert_allclose(moments["attn_out"].matrix, per_head, rtol=1e-4, atol=1e-3)
  assert (moments["attn_out"].contracting, moments["attn_out"].batch) == ((1,), (0,))
  np.testing.assert_allclose(moments["attn_out"].diagonal,
                             np.stack([np.diag(m) for m in per_head]), rtol=1e-4, atol=1e-3)


def test_several_contracted_axes_flatten_in_the_weights_axis_order():
  w = _normal(3, 4, 6)  # [heads, head_dim, features] contracted over heads and head_dim
  h = _normal(5, 4, 3)  # [tokens, head_dim, heads]: x lists the axes in another order
  moments = second_moments(lambda p, h: jnp.einsum("tdn,ndf->tf", h, p["w"]), {"w": w}, h)
  flat = np.transpose(h, (0, 2, 1)).reshape(5, 12)  # (heads, head_dim), as the weight's axes
  np.testing.assert_allclose(moments["w"].matrix, _gram(flat), rtol=1e-5, atol=1e-4)
  assert moments["w"].contracting == (0, 1)


def test_accumulate_sums_batches_and_counts_tokens():
  params = {"w": _normal(8, 3)}
  batches = [_normal(4, 8) for _ in range(3)]
  moments = accumulate(lambda p, x: jnp.tanh(x) @ p["w"], params, batches)
  expected = _gram(np.tanh(np.concatenate(batches)))
  np.testing.assert_allclose(moments["w"].matrix, expected, rtol=1e-5, atol=1e-4)
  assert moments["w"].tokens == 12
  with pytest.raises(ValueError, match="batches is empty"):
    accumulate(lambda p, x: x @ p["w"], params, [])


def test_a_weight_used_twice_sums_or_is_refused():
  w = _normal(8, 8)
  x = _normal(5, 8)
  twice = second_moments(lambda p, x: (x @ p["w"]) @ p["w"], {"w": w}, x)
  np.testing.assert_allclose(twice["w"].matrix, _gram(x) + _gram(x @ w), rtol=1e-5, atol=1e-3)
  assert twice["w"].tokens == 10
  with pytest.raises(ValueError, match="contracted over axes"):
    second_moments(lambda p, x: (x @ p["w"]) @ p["w"].T, {"w": w}, x)


def test_other_uses_and_selection():
  params = {"w": _normal(8, 3), "v": _normal(8, 3)}
  x = _normal(4, 8)
  with pytest.raises(jq.interception.UnsupportedUse, match="'w'"):
    second_moments(lambda p, x: (x @ (2 * p["w"])).sum(), params, x)
  only = second_moments(lambda p, x: x @ p["w"] + x @ p["v"], params, x,
                        select=lambda path, leaf: path == "v")
  assert set(only) == {"v"}


def test_calibrated_gptq_beats_round_to_nearest_on_held_out_inputs():
  """H from calibration batches of a two-layer model lowers the quantised model's error on
  other inputs drawn the same way."""
  mixing = np.eye(64) + 0.6 * _normal(64, 64) / 8

  def inputs(n):
    return (_normal(n, 64) @ mixing).astype(np.float32)

  params = {"up": 0.1 * _normal(64, 128), "down": 0.1 * _normal(128, 64)}
  model = lambda p, x: jax.nn.gelu(x @ p["up"]) @ p["down"]
  moments = accumulate(model, params, [inputs(256) for _ in range(4)])
  spec = jq.QuantSpec("int3", scaling="signmax", block_size=32)
  held_out = inputs(512)
  reference = model(params, held_out)

  def error(quantise):
    quantised = {name: quantise(name, w).dequantise() for name, w in params.items()}
    return float(jnp.linalg.norm(model(quantised, held_out) - reference))

  rtn = error(lambda name, w: jq.quantise(w, spec))
  gptq = error(lambda name, w: jq.gptq.quantise(w, moments[name], spec))
  assert gptq < 0.9 * rtn
