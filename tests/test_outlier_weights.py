"""Outlier arrays as first-class weights: rules, NNX and Linen layers, checkpoints, sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant.nn import checkpoint, sharding
from jaxquant.outliers import OutlierQuantisedArray, OutlierSpec

NF4 = jq.QuantSpec("nf4", block_size=64)
OUTLIERS = OutlierSpec(NF4, 2**-8)


class Heavy(nnx.Module):
  """A linear layer and a raw parameter used through jnp.einsum, both with heavy-tailed weights."""

  def __init__(self, rngs):
    self.up = nnx.Linear(128, 256, use_bias=False, rngs=rngs)
    self.up.kernel.set_value(jax.random.t(rngs.params(), 3.0, (128, 256)))
    self.w = nnx.Param(jax.random.t(rngs.params(), 3.0, (4, 256, 32)))  # [heads, in, out]

  def __call__(self, x):
    h = self.up(x)
    return jnp.einsum("bd,hdo->bho", h, self.w[...])


RULES = [jq.Rule(".*", OUTLIERS)]
X = jax.random.normal(jax.random.key(9), (3, 128))


def _reference(model, x):
  """The forward in float64 numpy with each weight's reconstruction dense + outliers."""
  up, w = (np.asarray(weight.dequantise(), np.float64)
           for weight in (model.up.kernel.get_value(), model.w.get_value()))
  return np.einsum("bd,hdo->bho", np.asarray(x, np.float64) @ up, w)


@pytest.fixture(scope="module")
def quantised():
  return jq.nnx.quantise_model(Heavy(nnx.Rngs(0)), RULES, inputs=(X,))


def test_rules_give_outlier_weights_that_run_in_nnx(quantised):
  for weight, axis in ((quantised.up.kernel.get_value(), 0), (quantised.w.get_value(), 1)):
    assert isinstance(weight, OutlierQuantisedArray)
    assert weight.axis == axis  # blocks along the contraction, as for a QuantSpec
    assert weight.n_outliers == round(2**-8 * weight.size)
  expected = _reference(quantised, X)
  np.testing.assert_allclose(np.asarray(quantised(X), np.float64), expected,
                             rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # The outliers cut the error of the heavy-tailed weight: against NF4 alone.
  plain = jq.nnx.quantise_model(Heavy(nnx.Rngs(0)), [jq.Rule(".*", NF4)], inputs=(X,))
  float_w = np.asarray(Heavy(nnx.Rngs(0)).w.get_value())
  error = lambda weight: np.linalg.norm(np.asarray(weight.dequantise()) - float_w)
  assert error(quantised.w.get_value()) < 0.8 * error(plain.w.get_value())


def test_outlier_weights_in_linen():
  model = nn.Sequential([nn.Dense(256, use_bias=False), nn.relu, nn.Dense(8, use_bias=False)])
  params = model.init(jax.random.key(0), X)["params"]
  params = jax.tree.map(lambda w: jnp.where(jnp.abs(w) > 0.12, 10.0 * w, w), params)  # big values
  qparams = jq.linen.quantise_params(params, jq.Rule(".*", OUTLIERS))
  kernel = qparams["layers_0"]["kernel"]
  assert isinstance(kernel, OutlierQuantisedArray) and kernel.axis == 0
  y = jq.linen.quantised_apply(model, {"params": qparams}, X)
  dense = jax.tree.map(lambda w: w.dequantise(), qparams,
                       is_leaf=lambda w: isinstance(w, OutlierQuantisedArray))
  np.testing.assert_allclose(y, model.apply({"params": dense}, X), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("entropy_coded", [False, True])
def test_outlier_weights_checkpoint_bit_identically(quantised, tmp_path, entropy_coded):
  checkpoint.save(tmp_path / "c", quantised, entropy_coded=entropy_coded)
  leaves = checkpoint.read_metadata(tmp_path / "c")["leaves"]
  assert {"up/kernel/dense", "up/kernel/values", "up/kernel/indices"} <= set(leaves)
  assert ("coded" in leaves["up/kernel/dense"]) == entropy_coded
  target = nnx.eval_shape(lambda: jq.nnx.quantise_model(Heavy(nnx.Rngs(1)), RULES, inputs=(X,)))
  restored = checkpoint.restore(tmp_path / "c", target)
  for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(quantised))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)
  np.testing.assert_array_equal(restored(X), quantised(X))


def test_sharding_shards_the_dense_part_and_replicates_the_outliers(quantised):
  weight = quantised.up.kernel.get_value()
  mesh = AbstractMesh((4,), ("model",))
  specs = sharding.partition_specs(weight, P(None, "model"), mesh)
  assert specs.dense == sharding.partition_specs(weight.dense, P(None, "model"), mesh)
  assert (specs.values, specs.indices) == (P(), P())
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  placed = sharding.shard(weight, P(None, "model"), one)
  assert all(leaf.sharding.mesh == one for leaf in jax.tree.leaves(placed))


def test_spec_of_an_outlier_weight_gives_its_outlier_spec(quantised):
  weight = quantised.up.kernel.get_value()
  spec = jq.nn.weights.spec_of(weight)
  assert isinstance(spec, OutlierSpec) and round(spec.fraction * weight.size) == weight.n_outliers
  again = jq.outliers.quantise_with_outliers(weight.dequantise(), spec)
  assert again.n_outliers == weight.n_outliers and again.dense.bits == weight.dense.bits


def test_outlier_specs_refuse_what_they_cannot_do():
  with pytest.raises(ValueError, match="OutlierSpec packs weights by rounding to nearest"):
    jq.nnx.quantise_model(Heavy(nnx.Rngs(0)), RULES, mode="qat", inputs=(X,))
  with pytest.raises(ValueError, match="fraction"):
    OutlierSpec(NF4, 1.5)
  with pytest.raises(TypeError, match="spec must be a QuantSpec, an OutlierSpec or None"):
    jq.Rule(".*", 4)
  with pytest.raises(ValueError, match="fraction comes from the OutlierSpec"):
    jq.outliers.quantise_with_outliers(jnp.ones((64, 4)), OUTLIERS, 0.1)
  assert dataclasses.replace(OUTLIERS, fraction=0.0).fraction == 0.0
