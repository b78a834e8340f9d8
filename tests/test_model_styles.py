"""Quantising models as people write them: every intended weight found, packed and served.

The models (`model_styles`) are the styles the interception must meet unchanged: gemma's Linen
`Einsum` modules (fused QKV, grouped K/V, per-head output, gated MLP, a tied embedding used as a
gather and as the head), Hugging Face's Linen [out, in] kernels under `lax.dot_general`, NNX
raw `nnx.Param`s under ``@`` and `jnp.einsum`, and one weight contracted on both of its axes.
The reference for every output and gradient is the float model itself, run by Flax on the
dequantised weights (or, for QAT, at the fake-quantised weights).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import model_styles
from jaxquant.nn import linen as jq_linen

NF4 = jq.QuantSpec("nf4", block_size=64)
RULES = [jq.Rule(".*", NF4)]


def relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def flat(tree):
  """{'/'-joined path: leaf}, weights kept whole."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jq.contraction.is_weight)[0]
  return {jq.interception.path_name(path): leaf for path, leaf in leaves}


def dequantised(tree):
  return jax.tree_util.tree_map(lambda leaf: leaf.dequantise() if jq.contraction.is_weight(
      leaf) else leaf, tree, is_leaf=jq.contraction.is_weight)


def packed_bytes(weights):
  return sum(leaf.on_device_size_in_bytes() for w in weights for leaf in jax.tree.leaves(w))


LINEN_STYLES = {
    "gemma": functools.partial(model_styles.gemma_style, fused_qkv=False),
    "gemma-fused-qkv": functools.partial(model_styles.gemma_style, fused_qkv=True),
    "hugging-face": model_styles.hf_style,
}


@pytest.fixture(scope="module", params=sorted(LINEN_STYLES))
def linen_quantised(request):
  model, params, args, paths = LINEN_STYLES[request.param]()
  qparams = jq_linen.quantise_params(params, RULES, model=model, inputs=args)
  return request.param, model, params, qparams, args, paths


def test_linen_every_intended_weight_is_packed(linen_quantised):
  _, _, params, qparams, _, paths = linen_quantised
  quantised = {path for path, leaf in flat(qparams).items() if isinstance(leaf, jq.QuantisedArray)}
  assert quantised == set(paths)
  weights = [flat(qparams)[path] for path in paths]
  float_bytes = sum(flat(params)[path].on_device_size_in_bytes() for path in paths)
  assert packed_bytes(weights) <= 0.14 * float_bytes  # codes, scales and codebooks
  assert all(w.bits_per_param == 4.25 for w in weights)  # no axis shorter than a block


def test_linen_outputs_match_the_float_model_on_dequantised_weights(linen_quantised):
  _, model, _, qparams, args, _ = linen_quantised
  y = jax.jit(lambda p, *a: jq_linen.quantised_apply(model, {"params": p}, *a))(qparams, *args)
  reference = model.apply({"params": dequantised(qparams)}, *args)
  assert relative(y, reference) < 1e-5


def test_linen_gradients_of_the_float_parameters(linen_quantised):
  _, model, _, qparams, args, _ = linen_quantised
  loss = lambda apply, p: jnp.sum(jnp.sin(apply({"params": p}, *args)))
  # allow_int: the packed codes are integers (their cotangents are float0).
  grads = jax.jit(jax.grad(functools.partial(
      loss, functools.partial(jq_linen.quantised_apply, model)), allow_int=True))(qparams)
  reference = jax.grad(functools.partial(loss, model.apply))(dequantised(qparams))
  floats = {path for path, leaf in flat(qparams).items() if not jq.contraction.is_weight(leaf)}
  assert floats  # norm scales and biases
  for path in floats:
    np.testing.assert_allclose(flat(grads)[path], flat(reference)[path], rtol=2e-4,
                               atol=2e-4 * float(np.abs(flat(reference)[path]).max()) + 1e-7)


def test_linen_qat_trains_master_weights_and_converts(linen_quantised):
  _, model, params, _, args, paths = linen_quantised
  qat = jq_linen.quantise_params(params, RULES, mode="qat", model=model, inputs=args)
  assert {p for p, leaf in flat(qat).items() if isinstance(leaf, jq.FakeQuantised)} == set(paths)
  loss = lambda apply, p: jnp.sum(jnp.sin(apply({"params": p}, *args)))
  grads = jax.jit(jax.grad(functools.partial(
      loss, functools.partial(jq_linen.quantised_apply, model))))(qat)
  # Straight-through: the float model's gradient at the fake-quantised weights (absmax NF4
  # clips nothing, so no element is masked).
  fake = jax.tree_util.tree_map(lambda leaf: leaf.dequantise() if isinstance(
      leaf, jq.FakeQuantised) else leaf, qat, is_leaf=lambda leaf: isinstance(leaf, jq.FakeQuantised))
  reference = jax.grad(functools.partial(loss, model.apply))(fake)
  for path in paths:
    ours, theirs = flat(grads)[path].weight, flat(reference)[path]
    assert relative(ours, theirs) < 1e-4
  packed = jq_linen.convert(qat)
  np.testing.assert_array_equal(jq_linen.quantised_apply(model, {"params": packed}, *args),
                                jq_linen.quantised_apply(model, {"params": qat}, *args))


def test_gemma_tied_embedding_is_blocked_along_features_for_both_uses():
  model, params, args, _ = model_styles.gemma_style()
  qparams = jq_linen.quantise_params(params, RULES, model=model, inputs=args)
  table = qparams["embedder"]["input_embedding"]
  assert table.axis == 1  # gathered along the vocabulary, contracted along the features
  # The output projection is contracted on (heads, head_dim): blocks along head_dim (64).
  assert qparams["layer_0"]["attn"]["attn_vec_einsum"]["w"].axis == 1


NNX_STYLES = {"nnx-raw-params": model_styles.nnx_raw,
              "tied-autoencoder": model_styles.tied_autoencoder}


@pytest.fixture(scope="module", params=sorted(NNX_STYLES))
def nnx_quantised(request):
  model, args, paths = NNX_STYLES[request.param]()
  quantised = jq.nnx.quantise_model(model, RULES, inputs=args)
  return model, quantised, args, paths


def weights_of(model):
  return {"/".join(map(str, path)): variable.get_value()
          for path, variable in nnx.to_flat_state(nnx.state(model, jq.nnx.QuantisedWeight))}


def dequantised_twin(float_model, quantised):
  twin = nnx.clone(float_model)
  for path, variable in nnx.to_flat_state(nnx.state(twin, nnx.Param)):
    name = "/".join(map(str, path))
    if name in weights_of(quantised):
      variable.set_value(weights_of(quantised)[name].dequantise())
  return twin


def test_nnx_every_intended_weight_is_packed(nnx_quantised):
  model, quantised, _, paths = nnx_quantised
  assert set(weights_of(quantised)) == set(paths)
  float_bytes = sum(v[...].on_device_size_in_bytes() for p, v in
                    nnx.to_flat_state(nnx.state(model)) if "/".join(map(str, p)) in paths)
  assert packed_bytes(weights_of(quantised).values()) <= 0.14 * float_bytes
  assert jq.nnx.quantised_bytes(quantised) == packed_bytes(weights_of(quantised).values())
  assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(nnx.state(model)))


def test_nnx_outputs_match_the_float_model_on_dequantised_weights(nnx_quantised):
  model, quantised, args, _ = nnx_quantised
  outputs = jax.jit(lambda m, *a: m(*a))(quantised, *args)
  reference = dequantised_twin(model, quantised)(*args)
  for y, ref in zip(jax.tree.leaves(outputs), jax.tree.leaves(reference)):
    assert relative(y, ref) < 1e-5


def test_nnx_gradients_of_the_float_parameters(nnx_quantised):
  model, quantised, args, _ = nnx_quantised
  loss = lambda m: sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(m(*args)))
  grads = nnx.jit(nnx.grad(loss))(quantised)
  reference = nnx.grad(loss)(dequantised_twin(model, quantised))
  ours = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
  theirs = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(reference)}
  assert ours and set(ours) <= set(theirs)
  for path, grad in ours.items():
    np.testing.assert_allclose(grad, theirs[path], rtol=2e-4,
                               atol=2e-4 * float(np.abs(theirs[path]).max()) + 1e-7)


def test_nnx_qat_trains_master_weights_and_converts(nnx_quantised):
  model, _, args, paths = nnx_quantised
  qat = jq.nnx.quantise_model(model, RULES, mode="qat", inputs=args)
  masters = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(qat, jq.nnx.QATWeight))}
  assert masters == set(paths)
  loss = lambda m: sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(m(*args)))
  grads = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.grad(loss)(qat))}
  specs = {"/".join(map(str, p)): v.get_metadata()["quantisation"]
           for p, v in nnx.to_flat_state(nnx.state(qat, jq.nnx.QATWeight))}
  fake = nnx.clone(model)
  for path, variable in nnx.to_flat_state(nnx.state(fake, nnx.Param)):
    if "/".join(map(str, path)) in paths:  # blocks along the axis quantise_model chose
      variable.set_value(jq.fake_quantise(variable[...], specs["/".join(map(str, path))]))
  reference = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.grad(loss)(fake))}
  for path in paths:
    assert relative(grads[path], reference[path]) < 1e-4
  packed = jq.nnx.convert(qat)
  assert set(weights_of(packed)) == set(paths)
  for y, ref in zip(jax.tree.leaves(packed(*args)), jax.tree.leaves(qat(*args))):
    np.testing.assert_array_equal(y, ref)


def test_a_weight_contracted_on_both_axes_is_never_dequantised_whole():
  model = model_styles.TiedAutoencoder(nnx.Rngs(0), d_in=2048, d_hidden=1024)
  x = jnp.ones((8, 2048))
  quantised = jq.nnx.quantise_model(model, RULES, inputs=(x,))
  assert quantised.w.get_value().axis == 0  # the encoder's; the decoder reads the free axis
  jaxpr = str(jax.make_jaxpr(lambda m, x: m(x))(quantised, x))
  assert "f32[2048,1024]" not in jaxpr  # each product streams slabs of the packed weight
  reference = dequantised_twin(model, quantised)(x)
  for y, ref in zip(quantised(x), reference):
    assert relative(y, ref) < 1e-5


class Regularised(nnx.Module):
  """A weight that is contracted and also squared and summed (a penalty in the forward)."""

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (128, 64)) / 8)
    self.v = nnx.Param(jax.random.normal(rngs.params(), (64, 32)) / 8)

  def __call__(self, x):
    return (x @ self.w[...]) @ self.v[...] + jnp.sum(self.w[...] ** 2)


def test_a_weight_used_outside_contractions_is_refused_by_name():
  model, x = Regularised(nnx.Rngs(0)), jnp.ones((2, 128))
  with pytest.raises(ValueError, match=r"w \(shape \(128, 64\)\) is also used by integer_pow"):
    jq.nnx.quantise_model(model, RULES, inputs=(x,))
  quantised = jq.nnx.quantise_model(model, [jq.Rule("w", None)] + RULES, inputs=(x,))
  assert isinstance(quantised.w, nnx.Param) and isinstance(quantised.v, jq.nnx.QuantisedWeight)
  np.testing.assert_allclose(quantised(x), dequantised_twin(model, quantised)(x), rtol=1e-5)
  with pytest.warns(UserWarning, match=r"matched no weight: \['decoder'\]"):
    jq.nnx.quantise_model(model, [jq.Rule("w", None), jq.Rule("decoder", NF4)], inputs=(x,))


def test_an_abstract_model_is_quantised_from_host_arrays_one_weight_at_a_time():
  model, args, paths = model_styles.nnx_raw()
  host = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  expected = jq.nnx.quantise_model(model, RULES, inputs=args)
  abstract = nnx.eval_shape(lambda: model_styles.NNXRawParams(nnx.Rngs(1)))
  quantised = jq.nnx.quantise_model(abstract, RULES, params=host, inputs=args)
  assert set(weights_of(quantised)) == set(paths)
  np.testing.assert_array_equal(quantised(*args), expected(*args))
