"""Linen: QDense/QDenseGeneral, quantise_params and unmodified models run on quantised params.

References are independent of the quantised path: the float Linen model applied to params
whose kernels were replaced by `jq.dequantise` (the same weights, multiplied by XLA's float
dot), numpy einsums in float64, and the float model itself for the size of the error.
"""

import functools
import importlib.util
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.nn.linen import QDense, QDenseGeneral, quantise_params, quantised_apply

ROOT = pathlib.Path(__file__).resolve().parents[1]
NF4 = jq.QuantSpec("nf4", block_size=64)
RULES = [jq.Rule("Dense_2", None), jq.Rule(".*", NF4)]


class MLP(nn.Module):
  """256 → 512 → 512 → 10, as a user would write it."""
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(512, dtype=self.dtype)(x))
    x = nn.relu(nn.Dense(512, dtype=self.dtype)(x))
    return nn.Dense(10, dtype=self.dtype)(x)


@functools.cache
def mlp_params():
  """N(0, 1/fan_in) kernels and non-zero biases (so a dropped bias shows), drawn by numpy."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 256)), jnp.float32)
  shapes = jax.eval_shape(MLP().init, jax.random.key(0), x)["params"]
  draw = lambda s: rng.normal(size=s.shape) * (0.1 if len(s.shape) == 1 else s.shape[0] ** -0.5)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(draw(s), jnp.float32), shapes), x


def dequantised(tree):
  """`tree` with every QuantisedArray replaced by `jq.dequantise` of it."""
  return {k: jq.dequantise(v) if isinstance(v, jq.QuantisedArray) else
          dequantised(v) if isinstance(v, dict) else v for k, v in tree.items()}


def relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_mlp_quantised_by_rules_matches_dequantised_reference_and_float_model():
  params, x = mlp_params()
  qparams = quantise_params(params, RULES)
  for name in ("Dense_0", "Dense_1"):
    q = qparams[name]["kernel"]
    assert isinstance(q, jq.QuantisedArray)
    assert q.shape == params[name]["kernel"].shape and q.axis == 0 and q.bits == 4
    assert qparams[name]["bias"] is params[name]["bias"]
  assert qparams["Dense_2"]["kernel"] is params["Dense_2"]["kernel"]  # spec=None: kept float

  y = quantised_apply(MLP(), {"params": qparams}, x)
  reference = MLP().apply({"params": dequantised(qparams)}, x)
  assert y.dtype == jnp.float32 and y.shape == (32, 10)
  assert relative(y, reference) < 1e-5

  weight_error = np.mean([relative(jq.dequantise(qparams[n]["kernel"]), params[n]["kernel"])
                          for n in ("Dense_0", "Dense_1")])
  assert 0.07 < weight_error < 0.11  # NF4, B=64, Gaussian weights
  output_error = relative(y, MLP().apply({"params": params}, x))
  assert 0.5 * weight_error < output_error < 2 * weight_error


def test_unmodified_model_under_jit_and_with_apply_keywords():
  params, x = mlp_params()
  variables = {"params": quantise_params(params, RULES)}
  eager = quantised_apply(MLP(), variables, x)
  jitted = jax.jit(functools.partial(quantised_apply, MLP(), backend="reference"))(variables, x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
  method = quantised_apply(MLP(), variables, x, method="__call__")
  np.testing.assert_array_equal(method, eager)
  # Outside the interceptor, Linen's own Dense refuses the packed kernel.
  with pytest.raises(flax.errors.ScopeParamShapeError):
    MLP().apply(variables, x)


def test_gradient_with_respect_to_inputs():
  params, x = mlp_params()
  qparams = quantise_params(params, RULES)
  loss = lambda apply, p, x: jnp.sum(jnp.square(apply({"params": p}, x)))
  grad = jax.grad(functools.partial(loss, functools.partial(quantised_apply, MLP())),
                  argnums=1)(qparams, x)
  expected = jax.grad(functools.partial(loss, MLP().apply), argnums=1)(dequantised(qparams), x)
  assert relative(grad, expected) < 1e-5


def test_layer_dtype_sets_the_output_dtype():
  params, x = mlp_params()
  qparams = quantise_params(params, RULES)
  y = quantised_apply(MLP(dtype=jnp.bfloat16), {"params": qparams}, x)
  assert y.dtype == jnp.bfloat16
  reference = MLP().apply({"params": dequantised(qparams)}, x)
  assert relative(y, reference) < 2e-2


def test_qdense_init_and_apply():
  x = jax.random.normal(jax.random.key(3), (4, 7, 256))
  layer = QDense(512, spec=jq.QuantSpec("nf4", block_size=64, axis=-1))
  variables = layer.init(jax.random.key(0), x)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  assert isinstance(kernel, jq.QuantisedArray)
  assert kernel.shape == (256, 512) and kernel.axis == 0 and kernel.bits_per_param == 4.25
  w = np.asarray(jq.dequantise(kernel), np.float64)
  assert abs(w.std() * np.sqrt(256) - 1) < 0.1  # lecun-normal: std 1/sqrt(fan_in)
  np.testing.assert_array_equal(bias, np.zeros(512))

  bias = jax.random.normal(jax.random.key(4), (512,))
  y = layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  expected = np.asarray(x, np.float64) @ w + np.asarray(bias, np.float64)
  assert y.shape == (4, 7, 512) and relative(y, expected) < 1e-5


def test_qdense_applies_params_converted_from_dense():
  class QMLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(QDense(512, name="Dense_0")(x))
      x = nn.relu(QDense(512, name="Dense_1")(x))
      return nn.Dense(10, name="Dense_2")(x)

  params, x = mlp_params()
  variables = {"params": quantise_params(params, RULES)}
  np.testing.assert_array_equal(QMLP().apply(variables, x),
                                quantised_apply(MLP(), variables, x))


@pytest.mark.parametrize("x_shape, axis", [((2, 3, 64, 8), (-2, -1)), ((2, 64, 3, 8), (1, -1))])
def test_dense_general_two_contracted_axes_and_feature_shape(x_shape, axis):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  shapes = jax.eval_shape(nn.DenseGeneral(features=(4, 8), axis=axis).init, jax.random.key(0), x)
  assert shapes["params"]["kernel"].shape == (64, 8, 4, 8)  # Flax's layout: in axes + features
  params = {"kernel": jnp.asarray(rng.normal(size=(64, 8, 4, 8)) / np.sqrt(512), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}

  # The top-level layer has path "" and so is matched by no rule: nest it in a model.
  class Wrapped(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(features=(4, 8), axis=axis, name="proj")(x)

  qparams = quantise_params({"proj": params}, [jq.Rule("proj", NF4)])
  q = qparams["proj"]["kernel"]
  # The kernel keeps its shape; blocks run along the input axis of 64 (no padding).
  assert isinstance(q, jq.QuantisedArray) and q.shape == (64, 8, 4, 8) and q.axis == 0
  assert q.bits_per_param == 4.25

  w = np.asarray(jq.dequantise(q), np.float64)
  contracted = "bicj" if axis == (1, -1) else "bcij"
  expected = np.einsum(f"{contracted},ijkl->bckl", np.asarray(x, np.float64), w)
  expected = expected + np.asarray(params["bias"], np.float64)
  y = quantised_apply(Wrapped(), {"params": qparams}, x)
  assert y.shape == (2, 3, 4, 8) and relative(y, expected) < 1e-5
  assert 0.07 < relative(w, params["kernel"]) < 0.11  # ~R of NF4 B=64 on Gaussian weights

  layer = QDenseGeneral((4, 8), axis=axis)
  np.testing.assert_allclose(layer.apply({"params": qparams["proj"]}, x), y, rtol=1e-6,
                             atol=1e-6)


def test_qdense_general_init_and_apply():
  x = jax.random.normal(jax.random.key(7), (5, 64, 8))
  layer = QDenseGeneral((4, 8), axis=(-2, -1), spec=jq.QuantSpec("nf4", block_size=64, axis=1))
  variables = layer.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (64, 8, 4, 8) and kernel.axis == 0 and kernel.bits == 4
  assert variables["params"]["bias"].shape == (4, 8)
  w = np.asarray(jq.dequantise(kernel), np.float64)
  expected = np.einsum("bij,ijkl->bkl", np.asarray(x, np.float64), w)
  assert relative(layer.apply(variables, x), expected) < 1e-5


def test_dense_general_without_bias_needs_feature_ndims():
  kernel = jax.random.normal(jax.random.key(8), (4, 64, 8))
  params = {"proj": {"kernel": kernel}}
  with pytest.raises(ValueError, match="feature_ndims"):
    quantise_params(params, [jq.Rule("proj", NF4)])
  # Two feature axes: the input axis is 4 long; one: the inputs are (4, 64), blocked along 64.
  for n_features, axis in ((2, 0), (1, 1)):
    convert = functools.partial(quantise_params, rules=[jq.Rule("proj", NF4)],
                                feature_ndims={"proj": n_features})
    assert jax.eval_shape(convert, params)["proj"]["kernel"].axis == axis
  with pytest.raises(ValueError, match=r"feature_ndims\['proj'\]=3"):
    quantise_params(params, [jq.Rule("proj", NF4)], feature_ndims={"proj": 3})
  with pytest.raises(TypeError, match="feature_ndims"):
    quantise_params(params, [jq.Rule("proj", NF4)], feature_ndims=[("proj", 2)])


# axis=0: dataclasses.replace(spec, axis=0) rejects a double-quantised spec (its canonical
# scale_dtype is set), so the layers only replace the axis of specs that need it.
@pytest.mark.parametrize("spec", [NF4, jq.QuantSpec("nf4", block_size=64, double_quant=True,
                                                    axis=0)],
                         ids=["bf16 scales", "double quant"])
def test_on_device_bytes_match_bits_per_param(spec):
  params, _ = mlp_params()
  qparams = quantise_params(params, [jq.Rule("Dense_[01]", spec)])
  for name in ("Dense_0", "Dense_1"):
    q = qparams[name]["kernel"]
    stored = [q.codes, q.scales] + ([] if q.scale_scales is None else [q.scale_scales])
    assert (q.scale_scales is not None) == spec.double_quant
    on_device = sum(leaf.on_device_size_in_bytes() for leaf in stored)
    assert on_device == q.bits_per_param * q.size / 8
    assert on_device <= 0.15 * params[name]["kernel"].on_device_size_in_bytes()


def test_unused_rules_warn():
  params, _ = mlp_params()
  rules = [jq.Rule("decoder/.*", NF4)] + RULES
  with pytest.warns(UserWarning, match=r"decoder/\.\*"):
    qparams = quantise_params(params, rules)
  assert isinstance(qparams["Dense_0"]["kernel"], jq.QuantisedArray)


def test_nested_paths_and_leaves_untouched():
  kernel = jnp.ones((64, 8))
  params = {"encoder": {"layers_1": {"mlp": {"kernel": kernel, "bias": jnp.zeros(8)},
                                     "norm": {"scale": jnp.ones(64)}}},
            "embed": {"embedding": jnp.ones((10, 64))}}
  qparams = quantise_params(params, [jq.Rule("encoder/layers_1/mlp", NF4)])
  assert isinstance(qparams["encoder"]["layers_1"]["mlp"]["kernel"], jq.QuantisedArray)
  assert qparams["encoder"]["layers_1"]["norm"]["scale"] is params["encoder"]["layers_1"][
      "norm"]["scale"]
  assert qparams["embed"]["embedding"] is params["embed"]["embedding"]
  assert params["encoder"]["layers_1"]["mlp"]["kernel"] is kernel  # input left alone


def test_bad_input_names_the_argument():
  params, x = mlp_params()
  with pytest.raises(TypeError, match="params"):
    quantise_params([params], RULES)
  with pytest.raises(TypeError, match="rules"):
    quantise_params(params, ["nf4"])
  with pytest.raises(ValueError, match="backend"):
    quantised_apply(MLP(), {"params": params}, x, backend="fast")
  with pytest.raises(ValueError, match="spec"):
    QDense(8).init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="features"):
    QDenseGeneral((4, 2.0), spec=NF4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="axis"):
    QDenseGeneral(4, axis=(0, 2), spec=NF4).init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="kernel"):
    quantise_params({"Dense_0": {"kernel": jnp.ones((64, 8), jnp.int8)}}, RULES[1:])
  # A batch_dims DenseGeneral's bias does not match its kernel's trailing axes.
  batched = {"proj": {"kernel": jnp.ones((3, 64, 4)), "bias": jnp.zeros((3, 4))}}
  with pytest.raises(ValueError, match="batch_dims"):
    quantise_params(batched, [jq.Rule("proj", NF4)])


def test_batch_dims_and_injected_dot_general_are_intercepted_too():
  x = jax.random.normal(jax.random.key(9), (3, 5, 64))
  for model in (nn.DenseGeneral(4, batch_dims=(0,)), nn.Dense(4, dot_general=jax.lax.dot_general)):
    params = model.init(jax.random.key(0), x)["params"]
    qparams = quantise_params(params, [jq.Rule("kernel", NF4)], model=model, inputs=(x,))
    assert isinstance(qparams["kernel"], jq.QuantisedArray)
    y = quantised_apply(model, {"params": qparams}, x)
    assert relative(y, model.apply({"params": dequantised(qparams)}, x)) < 1e-6
  q = quantise_params({"kernel": jnp.ones((64, 4)), "bias": jnp.zeros(4)}, [jq.Rule("kernel", NF4)],
                      model=nn.Dense(4), inputs=(jnp.ones((3, 64)),))
  with pytest.raises(flax.errors.ScopeParamShapeError):
    quantised_apply(nn.Dense(5), {"params": q}, jnp.ones((3, 64)))


def test_example_runs(capsys):
  spec = importlib.util.spec_from_file_location(
      "quantise_linen_model", ROOT / "examples" / "quantise_linen_model.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  error, float_bytes, quantised_bytes = module.main()
  out = capsys.readouterr().out
  assert 0.02 < error < 0.3 and quantised_bytes < 0.2 * float_bytes
  assert "output error" in out and f"{quantised_bytes:,}" in out
