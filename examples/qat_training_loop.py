"""Quantisation-aware training at 3 bits beats post-training quantisation.

A float MLP is fitted to a smooth regression task; quantising it directly to 3 bits (PTQ)
costs accuracy. Fine-tuning a copy in QAT mode (float master weights, packed 3-bit forward,
straight-through gradients) inside a jitted optax training step recovers most of it, and
`convert` turns the QAT model into packed inference layers with identical outputs.

    python examples/qat_training_loop.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxquant as jq

RULES = [jq.Rule(r"layers/\d+", jq.QuantSpec("int3", block_size=32))]


class MLP(nnx.Module):

  def __init__(self, rngs, sizes=(16, 128, 128, 1)):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def task(key, n=4096):
  x = jax.random.normal(key, (n, 16))
  y = jnp.sin(x[:, :4].sum(1, keepdims=True)) + 0.5 * jnp.cos(x[:, 4:8]).prod(1, keepdims=True)
  return x, y


def mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def train(model, x, y, steps, learning_rate):
  optimiser = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimiser, x, y):
    loss, grads = nnx.value_and_grad(mse)(model, x, y)
    optimiser.update(model, grads)
    return loss

  for _ in range(steps):
    step(model, optimiser, x, y)
  return model


def main(steps=1500, qat_steps=500):
  x, y = task(jax.random.key(0))
  x_test, y_test = task(jax.random.key(1), 2048)
  float_model = train(MLP(nnx.Rngs(0)), x, y, steps, 3e-3)
  state = nnx.state(float_model)
  fresh = lambda: nnx.merge(nnx.graphdef(float_model), jax.tree_util.tree_map(jnp.copy, state))
  ptq = jq.nnx.quantise_model(fresh(), RULES)
  qat = train(jq.nnx.quantise_model(fresh(), RULES, mode="qat"), x, y, qat_steps, 1e-3)
  converted = jq.nnx.convert(qat)
  losses = {name: float(mse(m, x_test, y_test)) for name, m in
            (("float", float_model), ("ptq 3-bit", ptq), ("qat 3-bit", converted))}
  for name, value in losses.items():
    print(f"{name:>10}: test MSE {value:.5f}")
  recovered = 1 - (losses["qat 3-bit"] - losses["float"]) / (losses["ptq 3-bit"] - losses["float"])
  print(f"QAT recovers {recovered:.0%} of the loss PTQ adds")
  return losses


if __name__ == "__main__":
  main()
