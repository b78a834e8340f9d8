"""NNX layers and conversion by rules, against the float model and independent references."""

import gc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq

NF4 = jq.QuantSpec("nf4")


class Model(nnx.Module):
  """Embedding, a two-layer MLP, an einsum projection and a float head."""

  def __init__(self, rngs, width=128):
    self.embed = nnx.Embed(300, width, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(width, 2 * width, rngs=rngs),
                            nnx.Linear(2 * width, width, rngs=rngs)])
    self.project = nnx.Einsum("bd,dhk->bhk", (width, 4, 16), (4, 16), rngs=rngs)
    self.head = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.head(x), self.project(x), self.embed.attend(x)


def dequantised_twin(model):
  """An independent reference: the float model with every weight replaced by dequantise(q)."""
  twin = Model(nnx.Rngs(0))
  twin.embed.embedding.set_value(model.embed.embedding.get_value().dequantise())
  for float_layer, layer in zip(twin.layers, model.layers):
    float_layer.kernel.set_value(layer.kernel.get_value().dequantise())
    float_layer.bias.set_value(layer.bias[...])
  kernel = model.project.kernel.get_value().dequantise()  # [d, h·k]
  twin.project.kernel.set_value(kernel.reshape(twin.project.kernel.shape))
  twin.project.bias.set_value(model.project.bias[...])
  twin.head.kernel.set_value(model.head.kernel[...])
  twin.head.bias.set_value(model.head.bias[...])
  return twin


def test_quantised_model_matches_its_dequantised_twin_and_the_float_model():
  float_model, ids = Model(nnx.Rngs(0)), jnp.arange(12) * 7
  reference = float_model(ids)
  model = jq.nnx.quantise_model(float_model, [jq.Rule(r"head", None), jq.Rule(r".*", NF4)])
  assert isinstance(float_model.layers[0], nnx.Linear)  # the float model is left alone
  np.testing.assert_array_equal(float_model(ids)[0], reference[0])
  assert isinstance(model.layers[0], jq.nnx.QLinear)
  assert isinstance(model.project, jq.nnx.QEinsum) and isinstance(model.embed, jq.nnx.QEmbed)
  assert isinstance(model.head, nnx.Linear)
  outputs = jax.jit(lambda m, i: m(i))(model, ids)
  twin_outputs = dequantised_twin(model)(ids)
  for out, twin, ref in zip(outputs, twin_outputs, reference):
    np.testing.assert_allclose(out, twin, rtol=2e-5, atol=2e-5 * float(jnp.abs(twin).max()))
    # NF4 B=64 has R ≈ 0.1 per weight; three quantised layers compound to ~0.1-0.3.
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.35


def test_packed_bytes_match_bits_per_param_and_save_memory():
  model = Model(nnx.Rngs(0), width=256)
  float_bytes = sum(layer.kernel[...].on_device_size_in_bytes() for layer in model.layers)
  model = jq.nnx.quantise_model(model, [jq.Rule(r"layers/\d+", NF4)])
  total = 0
  for layer in model.layers:
    q = layer.kernel.get_value()
    measured = sum(leaf.on_device_size_in_bytes() for leaf in (q.codes, q.scales))
    assert measured * 8 == q.bits_per_param * q.size
    total += measured
  assert total / float_bytes == pytest.approx((4 + 16 / 64) / 32)  # 0.133
  assert jq.nnx.quantised_bytes(model) == total + sum(
      layer.kernel.get_value().codebook.on_device_size_in_bytes() for layer in model.layers)


def test_conversion_releases_the_float_weights():
  model = Model(nnx.Rngs(0), width=512)
  kernel_shapes = {layer.kernel[...].shape for layer in model.layers}
  model = jq.nnx.quantise_model(model, [jq.Rule(r"layers/\d+", NF4)])
  gc.collect()
  alive = [a for a in jax.live_arrays() if a.shape in kernel_shapes and a.dtype == jnp.float32]
  assert not alive


def test_grad_skips_packed_codes_and_trains_the_floats():
  ids = jnp.arange(5)
  model = jq.nnx.quantise_model(Model(nnx.Rngs(0)), [jq.Rule(r"head", None), jq.Rule(r".*", NF4)])
  grads = nnx.grad(lambda m: jnp.sum(m(ids)[0] ** 2))(model)
  flat = dict(nnx.to_flat_state(grads))
  assert ("head", "kernel") in flat and ("layers", 0, "bias") in flat
  assert not any(isinstance(v, jq.nnx.QuantisedWeight) for v in flat.values())
  float_grad = nnx.grad(lambda m: jnp.sum(m(ids)[0] ** 2))(dequantised_twin(model))
  np.testing.assert_allclose(flat[("layers", 0, "bias")][...],
                             dict(nnx.to_flat_state(float_grad))[("layers", 0, "bias")][...],
                             rtol=1e-4, atol=1e-6)


def test_unused_rules_are_reported_and_none_keeps_float():
  with pytest.warns(UserWarning, match=r"matched no weight: \['decoder.\*'\]"):
    model = jq.nnx.quantise_model(Model(nnx.Rngs(0)), [
        jq.Rule("decoder.*", NF4), jq.Rule("layers/0", None), jq.Rule(r"layers/\d/kernel", NF4)])
  assert isinstance(model.layers[0], nnx.Linear) and isinstance(model.layers[1], jq.nnx.QLinear)


def test_conversion_from_host_memory_equals_conversion_on_device():
  rules = [jq.Rule(r"head", None), jq.Rule(r".*", NF4)]
  full = Model(nnx.Rngs(0))
  host = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(full)))
  expected = jq.nnx.quantise_model(full, rules)(jnp.arange(4))
  abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(1)))
  converted = jq.nnx.quantise_model(abstract, rules, params=host)
  for out, ref in zip(converted(jnp.arange(4)), expected):
    np.testing.assert_array_equal(out, ref)


def test_qembed_lookup_and_attend_match_dequantised_table():
  embed = nnx.Embed(1000, 64, rngs=nnx.Rngs(0))
  q = jq.nnx.QEmbed.from_embed(embed, jq.QuantSpec("int4", scaling="signmax"))
  table = q.embedding.get_value().dequantise()
  ids = jnp.array([[0, 999, 5], [7, 7, 3]])
  np.testing.assert_array_equal(q(ids), table[ids])
  query = jax.random.normal(jax.random.key(0), (2, 3, 64))
  np.testing.assert_allclose(q.attend(query), query @ table.T, rtol=1e-5, atol=1e-5)


def test_qembed_out_of_range_ids_behave_as_nnx_embed():
  embed = nnx.Embed(100, 64, rngs=nnx.Rngs(0))
  q = jq.nnx.QEmbed.from_embed(embed, NF4)
  ids = jnp.array([0, 100, -1, -101, 7])
  expected = embed(ids)  # NaN rows beyond the table, negative ids count from the end
  got = q(ids)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
  assert np.isnan(got[1]).all() and np.isnan(got[3]).all()
  np.testing.assert_array_equal(got[2], q.embedding.get_value().dequantise()[99])


def test_qat_layers_train_and_convert_to_identical_outputs():
  model = Model(nnx.Rngs(0))
  qat = jq.nnx.quantise_model(model, [jq.Rule(r"head", None), jq.Rule(".*", jq.QuantSpec("int3"))],
                              mode="qat")
  for layer in (qat.layers[0], qat.project, qat.embed):  # Einsum and Embed too, not only Linear
    assert isinstance(next(iter(nnx.to_flat_state(nnx.state(layer, jq.nnx.QATWeight))))[1],
                      jq.nnx.QATWeight)
  ids = jnp.arange(12) * 7
  grads = nnx.grad(lambda m: sum(jnp.sum(y ** 2) for y in m(ids)))(qat)
  for name in (("layers", 0, "kernel"), ("project", "kernel"), ("embed", "embedding")):
    grad = dict(nnx.to_flat_state(grads))[name][...]
    assert float(jnp.abs(grad).sum()) > 0
  packed = jq.nnx.convert(qat)
  assert isinstance(packed.project.kernel, jq.nnx.QuantisedWeight)
  for out, ref in zip(packed(ids), qat(ids)):
    np.testing.assert_array_equal(out, ref)


def test_qat_from_host_memory_reads_the_host_weights():
  rules = [jq.Rule(r"head", None), jq.Rule(r".*", jq.QuantSpec("int4"))]
  full = Model(nnx.Rngs(0))
  host = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(full)))
  expected = jq.nnx.quantise_model(full, rules, mode="qat")(jnp.arange(4))
  abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(1)))
  converted = jq.nnx.quantise_model(abstract, rules, mode="qat", params=host)
  for out, ref in zip(converted(jnp.arange(4)), expected):
    np.testing.assert_array_equal(out, ref)


def test_bad_input():
  with pytest.raises(ValueError, match="mode"):
    jq.nnx.quantise_model(Model(nnx.Rngs(0)), [jq.Rule(".*", NF4)], mode="int8")
  with pytest.raises(TypeError, match="Rule"):
    jq.nnx.quantise_model(Model(nnx.Rngs(0)), ["layers"])
  with pytest.raises(ValueError, match="pattern"):
    jq.Rule("(", NF4)
  with pytest.raises(TypeError, match="spec"):
    jq.Rule(".*", "nf4")
  with pytest.raises(ValueError, match="contracts no kernel axis"):
    jq.nnx.QEinsum.from_einsum(nnx.Einsum("bd,bdk->bdk", (2, 8, 4), rngs=nnx.Rngs(0)), NF4)
  with pytest.raises(ValueError, match="2-D weight"):
    jq.nnx.QLinear(jnp.ones((4, 4)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jq.nnx.quantise_model(Model(nnx.Rngs(0)), [jq.Rule(".*", None)])  # every rule used


def test_quantise_nnx_model_example():
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quantise_nnx_model.py"
  spec = importlib.util.spec_from_file_location("quantise_nnx_model", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  error, before, after = example.main()
  assert error < 0.2 and after < 0.3 * before
