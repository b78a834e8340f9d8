"""GPTQ through the Flax integrations: calibrate a model, quantise it, serve it packed."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq

RNG = np.random.default_rng(0)
SPEC = jq.QuantSpec("int3", scaling="signmax", block_size=32)


MIXING = np.eye(64) + 0.6 * RNG.standard_normal((64, 64)) / 8


def _inputs(n, seed=0):
  """Correlated inputs (one distribution for every seed): where GPTQ's compensation matters."""
  rng = np.random.default_rng(seed)
  return jnp.asarray((rng.standard_normal((n, 64)) @ MIXING).astype(np.float32))


class Block(nnx.Module):
  """A stock Linear and a raw parameter used through `jnp.einsum`, the weight on the left."""

  def __init__(self, rngs):
    self.up = nnx.Linear(64, 96, rngs=rngs)
    self.w_out = nnx.Param(0.1 * jax.random.normal(rngs.params(), (64, 96)))  # [out, in]

  def __call__(self, x):
    return jnp.einsum("oi,ti->to", self.w_out[...], jax.nn.gelu(self.up(x)))


def _error(model, float_model, x):
  return float(jnp.linalg.norm(model(x) - float_model(x)))


def test_nnx_calibrate_then_gptq_packs_every_weight_and_lowers_the_error():
  model = Block(nnx.Rngs(0))
  rules = [jq.Rule(".*", SPEC)]
  batches = [_inputs(128, seed=s) for s in range(3)]
  moments = jq.nnx.calibrate(model, batches, rules)
  assert set(moments) == {"up/kernel", "w_out"}
  assert moments["w_out"].contracting == (1,) and moments["up/kernel"].tokens == 384
  x = _inputs(256, seed=9)  # held out
  rtn = jq.nnx.quantise_model(model, rules, inputs=(x,))
  gptq = jq.nnx.quantise_model(model, rules, inputs=(x,), calibration=moments)
  assert type(gptq.w_out).__name__ == "QuantisedWeight"
  # Each weight is exactly `gptq.quantise` of its float value with its own H and axis.
  direct = jq.gptq.quantise(model.w_out[...], moments["w_out"],
                            jq.QuantSpec("int3", scaling="signmax", block_size=32, axis=1))
  np.testing.assert_array_equal(np.asarray(gptq.w_out.get_value().codes),
                                np.asarray(direct.codes))
  assert _error(gptq, model, x) < _error(rtn, model, x)


def test_stock_layers_take_the_calibration_too():
  model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), jax.nn.relu,
                         nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
  rules = [jq.Rule(".*", SPEC)]
  moments = jq.nnx.calibrate(model, [_inputs(500, seed=s) for s in (1, 2)], rules)
  assert set(moments) == {"layers/0/kernel", "layers/2/kernel"}
  gptq = jq.nnx.quantise_model(model, rules, calibration=moments)
  assert type(gptq.layers[0]).__name__ == "QLinear"
  direct = jq.gptq.quantise(model.layers[2].kernel[...], moments["layers/2/kernel"], SPEC)
  np.testing.assert_array_equal(np.asarray(gptq.layers[2].kernel.get_value().codes),
                                np.asarray(direct.codes))
  x = _inputs(300, seed=5)
  assert _error(gptq, model, x) < _error(jq.nnx.quantise_model(model, rules), model, x)


def test_weights_without_a_second_moment_round_to_nearest_with_a_warning():
  model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
  rules = [jq.Rule(".*", SPEC)]
  moments = jq.nnx.calibrate(model, [_inputs(100)], [jq.Rule("layers/0", SPEC)])
  with pytest.warns(UserWarning, match=re.escape("['layers/1/kernel']")):
    mixed = jq.nnx.quantise_model(model, rules, calibration=moments)
  rtn = jq.nnx.quantise_model(model, rules)
  np.testing.assert_array_equal(np.asarray(mixed.layers[1].kernel.get_value().codes),
                                np.asarray(rtn.layers[1].kernel.get_value().codes))
  with pytest.raises(ValueError, match="mode='ptq'"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    jq.nnx.quantise_model(model, rules, calibration=moments, mode="qat")


def test_linen_params_by_gptq():
  model = nn.Sequential([nn.Dense(96), nn.gelu, nn.Dense(64)])
  params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  moments = jq.calibration.accumulate(apply, params, [_inputs(128, seed=s) for s in range(2)])
  assert set(moments) == {"layers_0/kernel", "layers_2/kernel"}
  rules = [jq.Rule(".*", SPEC)]
  gptq = jq.linen.quantise_params(params, rules, calibration=moments)
  rtn = jq.linen.quantise_params(params, rules)
  x = _inputs(256, seed=7)
  reference = apply(params, x)
  error = lambda p: float(jnp.linalg.norm(jq.linen.quantised_apply(model, {"params": p}, x)
                                          - reference))
  assert error(gptq) < 0.9 * error(rtn)
