"""LoRA and QLoRA (`jaxquant.lora`) in NNX and Linen, against independent float references."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import model_styles
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq

NF4 = jq.QuantSpec("nf4", block_size=64)
RULES = [jq.Rule(r".*", NF4)]
RANK, ALPHA = 4, 8.0


class MLP(nnx.Module):
  """Two linears with a tanh between them: x [batch, 128] → [batch, 64]."""

  def __init__(self, rngs, sizes=(128, 256, 64)):
    self.hidden = nnx.Linear(sizes[0], sizes[1], rngs=rngs)
    self.out = nnx.Linear(sizes[1], sizes[2], rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def randomise_adapters(model, seed=1):
  """Gives every adapter (B included, zero at init) random values, so gradients see all."""
  state = nnx.state(model, jq.nnx.LoRAParam)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)]
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
  return model


def qlora_mlp(seed=0):
  base = jq.nnx.quantise_model(MLP(nnx.Rngs(seed)), RULES)
  return randomise_adapters(jq.nnx.add_lora(base, r".*", rank=RANK, alpha=ALPHA))


def relative_error(ours, reference):
  return float(np.linalg.norm(np.asarray(ours, np.float64) - reference)
               / np.linalg.norm(reference))


def numpy_lora_gradients(model, x):
  """float64 forward and hand-written backward of the MLP with W = dequantise(q) + (α/r)AB for
  the loss ½Σy²: the gradients of each layer's A and B."""
  s = ALPHA / RANK
  f64 = lambda a: np.asarray(a, np.float64)
  layers = []
  for layer in (model.hidden, model.out):
    layers.append((f64(layer.kernel.get_value().dequantise()), f64(layer.bias[...]),
                   f64(layer.kernel_lora_a[...]), f64(layer.kernel_lora_b[...])))
  (w1, b1, a1, bb1), (w2, b2, a2, bb2) = layers
  x = f64(x)
  z = x @ w1 + s * (x @ a1) @ bb1 + b1
  h = np.tanh(z)
  y = h @ w2 + s * (h @ a2) @ bb2 + b2
  dy = y
  dh = dy @ (w2 + s * a2 @ bb2).T
  dz = dh * (1 - h ** 2)
  return {"hidden": (s * x.T @ (dz @ bb1.T), s * (x @ a1).T @ dz),
          "out": (s * h.T @ (dy @ bb2.T), s * (h @ a2).T @ dy)}


def lora_loss(model, x):
  return 0.5 * jnp.sum(model(x) ** 2)


def test_adapter_gradients_equal_lora_on_the_dequantised_float_base():
  model = qlora_mlp()
  x = jax.random.normal(jax.random.key(2), (8, 128))
  grads = nnx.jit(nnx.grad(lora_loss, argnums=nnx.DiffState(0, jq.nnx.LoRAParam)))(model, x)
  reference = numpy_lora_gradients(model, x)
  for name, (grad_a, grad_b) in reference.items():
    layer = getattr(grads, name)
    assert relative_error(layer.kernel_lora_a[...], grad_a) <= 1e-5
    assert relative_error(layer.kernel_lora_b[...], grad_b) <= 1e-5
  # The same adapters on the float model holding the dequantised weights: LoRA on a float base.
  twin = MLP(nnx.Rngs(0))
  for float_layer, layer in ((twin.hidden, model.hidden), (twin.out, model.out)):
    float_layer.kernel.set_value(layer.kernel.get_value().dequantise())
    float_layer.bias.set_value(layer.bias[...])
  twin = jq.nnx.add_lora(twin, r".*", rank=RANK, alpha=ALPHA)
  nnx.update(twin, nnx.state(model, jq.nnx.LoRAParam))
  float_grads = nnx.grad(lora_loss, argnums=nnx.DiffState(0, jq.nnx.LoRAParam))(twin, x)
  for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(float_grads), strict=True):
    assert relative_error(ours, np.asarray(theirs, np.float64)) <= 1e-5


def test_the_adapted_model_starts_as_the_base_and_is_left_untouched():
  base = jq.nnx.quantise_model(MLP(nnx.Rngs(0)), RULES)
  x = jax.random.normal(jax.random.key(2), (3, 128))
  model = jq.nnx.add_lora(base, r"hidden", rank=RANK, alpha=ALPHA)
  np.testing.assert_array_equal(model(x), base(x))  # B = 0
  assert not hasattr(base.hidden, "kernel_lora_a")  # the given model is left as it was
  assert model.hidden.kernel_lora_a[...].shape == (128, RANK)
  assert model.hidden.kernel_lora_b[...].shape == (RANK, 256)
  assert not hasattr(model.out, "kernel_lora_a")
  assert float(jnp.std(model.hidden.kernel_lora_a[...])) == pytest.approx(128 ** -0.5, rel=0.1)


def train(model, x, target, steps=5, learning_rate=1e-2):
  optimiser = nnx.Optimizer(model, optax.adam(learning_rate), wrt=jq.nnx.LoRAParam)

  @nnx.jit
  def step(model, optimiser, x, target):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2),
                                     argnums=nnx.DiffState(0, jq.nnx.LoRAParam))(model)
    optimiser.update(model, grads)
    return loss

  with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes Python floats and int32
    return [float(step(model, optimiser, x, target)) for _ in range(steps)]


def packed_leaves(model):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, jq.nnx.QuantisedWeight))]


def test_jitted_optax_training_changes_only_the_adapters_and_keeps_codes_bit_identical():
  model = jq.nnx.add_lora(jq.nnx.quantise_model(MLP(nnx.Rngs(0)), RULES), r".*", rank=RANK,
                          alpha=ALPHA)
  x = jax.random.normal(jax.random.key(2), (32, 128))
  target = jax.random.normal(jax.random.key(3), (32, 64))
  codes = packed_leaves(model)
  biases = [np.asarray(model.hidden.bias[...]), np.asarray(model.out.bias[...])]
  adapters = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, jq.nnx.LoRAParam))]
  losses = train(model, x, target)
  assert losses[-1] < losses[0]
  for before, after in zip(codes, packed_leaves(model), strict=True):
    assert before.dtype == after.dtype and np.array_equal(before, after)
  np.testing.assert_array_equal(model.hidden.bias[...], biases[0])
  np.testing.assert_array_equal(model.out.bias[...], biases[1])
  trained = jax.tree.leaves(nnx.state(model, jq.nnx.LoRAParam))
  assert all(not np.array_equal(a, b) for a, b in zip(adapters, trained, strict=True))
  # Eager and jitted forward passes agree.
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), model(x), rtol=1e-5,
                             atol=1e-6)


def test_merge_repacks_base_plus_delta_and_a_float_base_sums_exactly():
  model = qlora_mlp()
  merged = jq.nnx.merge_lora(model, RULES)
  assert not hasattr(merged.hidden, "kernel_lora_a") and hasattr(model.hidden, "kernel_lora_a")
  x = jax.random.normal(jax.random.key(2), (8, 128))
  for name in ("hidden", "out"):
    layer = getattr(model, name)
    w = layer.kernel.get_value().dequantise()
    delta = ALPHA / RANK * layer.kernel_lora_a[...] @ layer.kernel_lora_b[...]
    expected = jq.quantise(w + delta, NF4)  # blocks along the kernel's input axis, as the base
    got = getattr(merged, name).kernel.get_value()
    np.testing.assert_array_equal(got.codes, expected.codes)
    np.testing.assert_array_equal(got.scales, expected.scales)
    # Within NF4's error of the sum: half the widest codebook gap times each block's absmax
    # (blocks of 64 along the input axis), plus the bfloat16 rounding of the scale.
    total = np.asarray(w + delta, np.float64)
    gap = np.max(np.diff(np.unique(np.asarray(got.codebook)))) / 2
    absmax = np.repeat(np.abs(total).reshape(-1, 64, total.shape[1]).max(axis=1), 64, axis=0)
    error = np.abs(np.asarray(got.dequantise(), np.float64) - total)
    assert np.all(error <= (gap + 2 ** -8) * absmax) and error.max() > 0
  # A float base merges to W + ΔW exactly.
  float_model = randomise_adapters(jq.nnx.add_lora(MLP(nnx.Rngs(0)), r".*", rank=RANK,
                                                   alpha=ALPHA))
  float_merged = jq.nnx.merge_lora(float_model)
  layer = float_model.hidden
  np.testing.assert_allclose(float_merged.hidden.kernel[...], layer.kernel[...] + ALPHA / RANK
                             * layer.kernel_lora_a[...] @ layer.kernel_lora_b[...], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(float_merged(x), float_model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [
    NF4, jq.QuantSpec("crd-t5-signmax-3b-B64", scale_dtype="float16"),
    jq.QuantSpec("int4", block_size=32, double_quant=True),
    jq.QuantSpec("e2m1", block_size=32, scale_dtype="e8m0"),
], ids=str)
def test_merge_without_rules_repacks_with_the_spec_the_base_records(spec):
  # Absmax and signmax bases, every scale storage: the recorded spec packs as the rules do.
  rules = [jq.Rule(r".*", spec)]
  base = jq.nnx.quantise_model(MLP(nnx.Rngs(0)), rules)
  model = randomise_adapters(jq.nnx.add_lora(base, r".*", rank=RANK, alpha=ALPHA))
  with_rules, without = jq.nnx.merge_lora(model, rules), jq.nnx.merge_lora(model)
  for name in ("hidden", "out"):
    a, b = (getattr(m, name).kernel.get_value() for m in (with_rules, without))
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                              strict=True):
      np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))


def test_merge_by_gptq_with_calibration_statistics():
  float_model = MLP(nnx.Rngs(0))
  batches = [jax.random.normal(jax.random.key(i), (64, 128)) for i in range(2)]
  calibration = jq.nnx.calibrate(float_model, batches, RULES)
  model = randomise_adapters(jq.nnx.add_lora(jq.nnx.quantise_model(float_model, RULES), r".*",
                                             rank=RANK, alpha=ALPHA))
  merged = jq.nnx.merge_lora(model, RULES, calibration=calibration)
  layer = model.hidden
  total = layer.kernel.get_value().dequantise() + ALPHA / RANK * (
      layer.kernel_lora_a[...] @ layer.kernel_lora_b[...])
  expected = jq.gptq.quantise(total, calibration["hidden/kernel"], NF4)
  np.testing.assert_array_equal(merged.hidden.kernel.get_value().codes, expected.codes)
  rtn = jq.nnx.merge_lora(model, RULES).hidden.kernel.get_value()
  assert not np.array_equal(rtn.codes, expected.codes)


def test_adapters_alone_are_saved_and_restored_onto_a_packed_base(tmp_path):
  model = qlora_mlp()
  jq.nnx.save_lora(tmp_path / "adapters", model)
  leaves = jq.checkpoint.read_metadata(tmp_path / "adapters")["leaves"]
  assert set(leaves) == {f"{layer}/kernel_lora_{f}" for layer in ("hidden", "out")
                         for f in "ab"}
  fresh = jq.nnx.add_lora(jq.nnx.quantise_model(MLP(nnx.Rngs(0)), RULES), r".*", rank=RANK,
                          alpha=ALPHA, seed=5)
  restored = jq.nnx.restore_lora(tmp_path / "adapters", fresh)
  for ours, saved in zip(jax.tree.leaves(nnx.state(restored, jq.nnx.LoRAParam)),
                         jax.tree.leaves(nnx.state(model, jq.nnx.LoRAParam)), strict=True):
    np.testing.assert_array_equal(ours, saved)
  x = jax.random.normal(jax.random.key(2), (4, 128))
  np.testing.assert_array_equal(restored(x), model(x))


def test_custom_einsum_modules_get_adapters_shaped_for_their_contraction():
  float_model, (x,), paths = model_styles.nnx_raw()
  base = jq.nnx.quantise_model(float_model, RULES, inputs=(x,))
  model = randomise_adapters(jq.nnx.add_lora(base, r"blocks/\d+/w_.*", rank=RANK, alpha=ALPHA,
                                             inputs=(x,)))
  block = model.blocks[0]
  d, heads, head_dim, ffn = 128, 4, 64, 256
  shapes = {"w_heads": ((d, RANK), (RANK, heads, head_dim)),  # btd,dhk->bthk: contracts d
            "w_out": ((heads, head_dim, RANK), (RANK, d)),  # bthk,hkd->btd: contracts h, k
            "w_in": ((d, RANK), (RANK, ffn)), "w_down": ((ffn, RANK), (RANK, d))}
  for name, (a_shape, b_shape) in shapes.items():
    assert getattr(block, name + "_lora_a")[...].shape == a_shape
    assert getattr(block, name + "_lora_b")[...].shape == b_shape
  # Reference: the float model holding dequantise(q) + (α/r)·A·B, the product by einsum.
  twin, _, _ = model_styles.nnx_raw()
  products = {"w_heads": "dr,rhk->dhk", "w_out": "hkr,rd->hkd", "w_in": "dr,rf->df",
              "w_down": "fr,rd->fd"}
  for twin_block, quantised in zip(twin.blocks, model.blocks, strict=True):
    for name, equation in products.items():
      w = getattr(quantised, name).get_value().dequantise()
      a, b = getattr(quantised, name + "_lora_a")[...], getattr(quantised, name + "_lora_b")[...]
      getattr(twin_block, name).set_value(w + ALPHA / RANK * jnp.einsum(equation, a, b))
  np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, x), twin(x), rtol=1e-4,
                             atol=1e-4)


def test_nnx_errors_name_the_problem():
  base = jq.nnx.quantise_model(MLP(nnx.Rngs(0)), RULES)
  with pytest.raises(ValueError, match="rank=0"):
    jq.nnx.add_lora(base, r".*", rank=0, alpha=1.0)
  with pytest.raises(ValueError, match="alpha=nan"):
    jq.nnx.add_lora(base, r".*", rank=2, alpha=float("nan"))
  with pytest.raises(ValueError, match=r"dropout=1.0 must be a rate in \[0, 1\)"):
    jq.nnx.add_lora(base, r".*", rank=2, alpha=1.0, dropout=1.0)
  with pytest.raises(ValueError, match=re.escape("match no weight that can take adapters; those "
                                                 "are ['hidden/kernel', 'out/kernel']")):
    jq.nnx.add_lora(base, r"missing", rank=2, alpha=1.0)
  with pytest.raises(TypeError, match="must be a regex"):
    jq.nnx.add_lora(base, [jq.Rule(".*", NF4)], rank=2, alpha=1.0)
  with pytest.warns(UserWarning, match=r"matched no weight: \['nothing'\]"):
    jq.nnx.add_lora(base, [r"hidden", "nothing"], rank=2, alpha=1.0)
  tied, (x,), _ = model_styles.tied_autoencoder()
  with pytest.raises(ValueError, match="w .* is used as contract .*only contracted"):
    jq.nnx.add_lora(tied, r"w", rank=2, alpha=1.0, inputs=(x,))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    jq.nnx.merge_lora(base)


def test_dropout_masks_the_adapters_input_in_training_only():
  base = jq.nnx.quantise_model(MLP(nnx.Rngs(0)), RULES)
  x = jax.random.normal(jax.random.key(2), (8, 128))
  model = jq.nnx.add_lora(base, r".*", rank=RANK, alpha=ALPHA, dropout=0.5)
  np.testing.assert_array_equal(model(x), base(x))  # B = 0: the base reads x undropped
  randomise_adapters(model)
  plain = jq.nnx.add_lora(base, r".*", rank=RANK, alpha=ALPHA)
  nnx.update(plain, nnx.state(model, jq.nnx.LoRAParam))
  first, second = model(x), model(x)
  assert not np.allclose(first, plain(x)) and not np.allclose(first, second)
  model.eval()
  np.testing.assert_array_equal(model(x), plain(x))
  # One layer by hand: x W + s · (x ⊙ m / (1 − p)) A B, m ~ Bernoulli(1 − p).
  layer = model.hidden
  adapters = jq.lora.Adapters(layer.kernel_lora_a[...], layer.kernel_lora_b[...],
                              layer.kernel_lora_a.get_metadata()["lora"])
  key = jax.random.key(7)
  weight = jq.lora.LoRAWeight(layer.kernel.get_value(), adapters, key)
  mask = np.asarray(jax.random.bernoulli(key, 0.5, x.shape), np.float64)
  f64 = lambda a: np.asarray(a, np.float64)
  expected = (f64(x) @ f64(layer.kernel.get_value().dequantise()) + ALPHA / RANK
              * (f64(x) * mask / 0.5) @ f64(adapters.a) @ f64(adapters.b))
  np.testing.assert_allclose(jq.qmatmul(x, weight), expected, rtol=1e-4, atol=1e-4)


def hlo_float_sizes(compiled_text: str) -> list[int]:
  """The element counts of every floating-point array shape in an HLO module's text."""
  sizes = []
  for dims in re.findall(r"\b(?:f16|bf16|f32|f64)\[([0-9,]*)\]", compiled_text):
    sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
  return sizes


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_no_float_copy_of_the_weight_in_the_jitted_forward_and_backward(backend):
  # W is 1024 × 1024 (2^20 values); x has 4 rows, so any float array of W's size is a copy of
  # W. The xla backend contracts it in slabs of 256 rows: no such array may appear in the
  # optimised HLO of the training step's forward and backward. The reference backend
  # dequantises W whole, which shows that the check finds a copy when there is one.
  size = 1024
  w = jax.random.normal(jax.random.key(0), (size, size)) * size ** -0.5
  layer = jq.nnx.QLinear(jq.quantise(w, NF4), backend=backend)
  model = jq.nnx.add_lora(layer, r".*", rank=8, alpha=16.0, backend=backend)
  x = jax.random.normal(jax.random.key(1), (4, size))
  graphdef, state = nnx.split(model)

  def step(state, x):
    loss = lambda model: jnp.sum(jnp.tanh(model(x)))
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, jq.nnx.LoRAParam))(
        nnx.merge(graphdef, state))

  text = jax.jit(step).lower(state, x).compile().as_text()
  largest = max(hlo_float_sizes(text))
  if backend == "xla":
    assert largest < size * size // 2
  else:
    assert largest >= size * size


# ---------------------------------------------------------------------------------------------
# Linen


def dense_mlp():
  model = nn.Sequential([nn.Dense(256), nn.tanh, nn.Dense(64)])
  x = jax.random.normal(jax.random.key(2), (8, 128))
  return model, model.init(jax.random.key(0), x)["params"], x


def randomise_collection(lora, seed=1):
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
                                                for k, leaf in zip(keys, leaves, strict=True)])


def test_linen_adapter_gradients_equal_lora_on_the_dequantised_float_base():
  model, params, x = dense_mlp()
  qparams = jq.linen.quantise_params(params, RULES)
  lora = jq.linen.init_lora(qparams, r".*", rank=RANK, alpha=ALPHA)
  assert lora["layers_0"]["kernel"].a.shape == (128, RANK)
  assert lora["layers_2"]["kernel"].b.shape == (RANK, 64)
  np.testing.assert_array_equal(  # B = 0: the base model
      jq.linen.quantised_apply(model, {"params": qparams, "lora": lora}, x),
      jq.linen.quantised_apply(model, {"params": qparams}, x))
  lora = randomise_collection(lora)
  loss = lambda lora: 0.5 * jnp.sum(jq.linen.quantised_apply(
      model, {"params": qparams, "lora": lora}, x) ** 2)
  grads = jax.jit(jax.grad(loss))(lora)

  class Twin(nnx.Module):  # the same network in NNX, so numpy_lora_gradients applies
    def __init__(self):
      self.hidden, self.out = (jq.nnx.QLinear(qparams[name]["kernel"], qparams[name]["bias"])
                               for name in ("layers_0", "layers_2"))

  twin = Twin()
  for layer, name in ((twin.hidden, "layers_0"), (twin.out, "layers_2")):
    layer.kernel_lora_a = jq.nnx.LoRAParam(lora[name]["kernel"].a)
    layer.kernel_lora_b = jq.nnx.LoRAParam(lora[name]["kernel"].b)
  reference = numpy_lora_gradients(twin, x)
  for name, key in (("layers_0", "hidden"), ("layers_2", "out")):
    assert relative_error(grads[name]["kernel"].a, reference[key][0]) <= 1e-5
    assert relative_error(grads[name]["kernel"].b, reference[key][1]) <= 1e-5


def test_linen_training_keeps_codes_and_merge_repacks_the_sum():
  model, params, x = dense_mlp()
  qparams = jq.linen.quantise_params(params, RULES)
  lora = jq.linen.init_lora(qparams, r".*", rank=RANK, alpha=ALPHA)
  target = jax.random.normal(jax.random.key(3), (8, 64))
  optimiser = optax.adam(1e-2)

  @jax.jit
  def step(lora, state):
    loss, grads = jax.value_and_grad(lambda lora: jnp.mean((jq.linen.quantised_apply(
        model, {"params": qparams, "lora": lora}, x) - target) ** 2))(lora)
    updates, state = optimiser.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, loss

  codes = [np.asarray(leaf) for leaf in jax.tree.leaves(qparams)]
  with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes Python floats and int32
    state = optimiser.init(lora)
    losses = []
    for _ in range(5):
      lora, state, loss = step(lora, state)
      losses.append(float(loss))
  assert losses[-1] < losses[0]
  for before, after in zip(codes, jax.tree.leaves(qparams), strict=True):
    assert np.array_equal(before, after)
  merged = jq.linen.merge_lora({"params": qparams, "lora": lora}, RULES)
  adapters = lora["layers_0"]["kernel"]
  total = qparams["layers_0"]["kernel"].dequantise() + ALPHA / RANK * adapters.a @ adapters.b
  np.testing.assert_array_equal(merged["layers_0"]["kernel"].codes,
                                jq.quantise(total, NF4).codes)
  np.testing.assert_array_equal(merged["layers_0"]["bias"], qparams["layers_0"]["bias"])


def test_linen_adapters_alone_round_trip_through_a_checkpoint(tmp_path):
  model, params, x = dense_mlp()
  qparams = jq.linen.quantise_params(params, RULES)
  lora = randomise_collection(jq.linen.init_lora(qparams, r".*", rank=RANK, alpha=ALPHA))
  jq.checkpoint.save(tmp_path / "adapters", lora)
  target = jq.linen.init_lora(qparams, r".*", rank=RANK, alpha=ALPHA, seed=3)
  restored = jq.checkpoint.restore(tmp_path / "adapters", target)
  assert restored["layers_0"]["kernel"].layout == lora["layers_0"]["kernel"].layout
  for ours, saved in zip(jax.tree.leaves(restored), jax.tree.leaves(lora), strict=True):
    np.testing.assert_array_equal(ours, saved)


@pytest.mark.parametrize("style", ["gemma", "hf"])
def test_linen_custom_einsums_and_out_in_kernels_get_adapters_for_their_contraction(style):
  if style == "gemma":
    model, params, inputs, _ = model_styles.gemma_style()
    pattern = r"layer_\d+/.*"
    # [N, D, H] by BTD,NDH->BTNH contracts D; [N, H, D] by BTNH,NHD->BTD contracts N and H.
    expected = {"layer_0/attn/q_einsum/w": ((128, RANK), (RANK, 4, 64)),
                "layer_0/attn/attn_vec_einsum/w": ((4, 64, RANK), (RANK, 128))}
  else:
    model, params, inputs, _ = model_styles.hf_style()
    pattern = r"(encoder|classifier)/.*"
    # [out, in] kernels contracted over `in` (axis 1): A [in, r], B [r, out].
    expected = {"encoder/0/intermediate/kernel": ((128, RANK), (RANK, 256)),
                "encoder/0/output/kernel": ((256, RANK), (RANK, 128))}
  qparams = jq.linen.quantise_params(params, [jq.Rule(pattern, NF4)], model=model,
                                     inputs=inputs)
  lora = randomise_collection(jq.linen.init_lora(qparams, pattern, rank=RANK, alpha=ALPHA,
                                                 model=model, inputs=inputs), seed=4)
  flat_lora = dict(jq.linen._leaves(lora))  # pylint: disable=protected-access
  for path, (a_shape, b_shape) in expected.items():
    assert flat_lora[path].a.shape == a_shape and flat_lora[path].b.shape == b_shape
  # Reference: the unmodified float model applying dequantise(q) + (α/r)·A·B, the product
  # formed by an einsum over the letters of A's and B's axes placed as the weight's.
  def summed(path, leaf):
    path = jq.interception.path_name(path)
    if path not in flat_lora:
      return leaf
    adapters, w = flat_lora[path], leaf.dequantise()
    layout = adapters.layout
    letters = "abcdefg"[:w.ndim]
    a = "".join(letters[i] for i in layout.batch + layout.contracting) + "r"
    free = [i for i in range(w.ndim) if i not in layout.batch + layout.contracting]
    b = "".join(letters[i] for i in layout.batch) + "r" + "".join(letters[i] for i in free)
    product = jnp.einsum(f"{a},{b}->{letters}", adapters.a, adapters.b)
    return w + layout.scale * product

  dequantised = jax.tree_util.tree_map_with_path(
      lambda path, leaf: summed(path, leaf) if isinstance(leaf, jq.QuantisedArray) else leaf,
      qparams, is_leaf=lambda leaf: isinstance(leaf, jq.QuantisedArray))
  ours = jax.jit(lambda v, *i: jq.linen.quantised_apply(model, v, *i))(
      {"params": qparams, "lora": lora}, *inputs)
  np.testing.assert_allclose(ours, model.apply({"params": dequantised}, *inputs), rtol=1e-4,
                             atol=1e-4)


def test_linen_dropout_applies_with_a_dropout_rng():
  model, params, x = dense_mlp()
  qparams = jq.linen.quantise_params(params, RULES)
  lora = randomise_collection(jq.linen.init_lora(qparams, r".*", rank=RANK, alpha=ALPHA,
                                                 dropout=0.25))
  variables = {"params": qparams, "lora": lora}
  apply = lambda **kwargs: jq.linen.quantised_apply(model, variables, x, **kwargs)
  deterministic = apply()
  dropped = apply(rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(dropped, deterministic)
  np.testing.assert_array_equal(dropped, apply(rngs={"dropout": jax.random.key(0)}))
  no_dropout = {"params": qparams, "lora": jax.tree.map(
      lambda a: jq.lora.Adapters(a.a, a.b, dataclasses.replace(a.layout, dropout=0.0)), lora,
      is_leaf=lambda leaf: isinstance(leaf, jq.lora.Adapters))}
  np.testing.assert_array_equal(
      jq.linen.quantised_apply(model, no_dropout, x, rngs={"dropout": jax.random.key(0)}),
      deterministic)


def test_linen_errors_name_the_problem():
  _, params, _ = dense_mlp()
  with pytest.raises(ValueError, match="rank=-1"):
    jq.linen.init_lora(params, r".*", rank=-1, alpha=1.0)
  with pytest.raises(ValueError, match="match no weight"):
    jq.linen.init_lora(params, r"nothing", rank=2, alpha=1.0)
  with pytest.raises(ValueError, match="no 'lora' collection"):
    jq.linen.merge_lora({"params": params})
  model, gemma_params, inputs, _ = model_styles.gemma_style()
  with pytest.raises(ValueError, match="embedder/input_embedding .* gather"):
    jq.linen.init_lora(gemma_params, r"embedder/.*", rank=2, alpha=1.0, model=model,
                       inputs=inputs)
