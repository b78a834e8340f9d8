"""Quantise a Flax NNX model with rules, and measure what it costs and saves.

Every Linear layer of a small transformer-style MLP stack is packed to 4 bits (CRD-t signmax,
B=64), the embedding to NF4, the output head stays in float. Prints the output error against the
float model and the weight memory measured on device.

    python examples/quantise_nnx_model.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq


class Model(nnx.Module):

  def __init__(self, rngs, vocab=4096, width=512, depth=4):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.blocks = nnx.List([nnx.List([nnx.Linear(width, 4 * width, rngs=rngs),
                                      nnx.Linear(4 * width, width, rngs=rngs)])
                            for _ in range(depth)])
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for up, down in self.blocks:
      x = x + down(jax.nn.gelu(up(x))) / 4
    return self.head(x)


def weight_bytes(model):
  return sum(leaf.on_device_size_in_bytes() for leaf in jax.tree_util.tree_leaves(nnx.state(model)))


def main():
  model = Model(nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (8, 32), 0, 4096)
  reference = model(ids)
  before = weight_bytes(model)
  rules = [
      jq.Rule(r"head", None),                                            # keep the head in float
      jq.Rule(r"embed", jq.QuantSpec("nf4")),
      jq.Rule(r"blocks/\d+/\d+", jq.QuantSpec("crd-t7-signmax-4b")),     # every MLP matrix
  ]
  model = jq.nnx.quantise_model(model, rules)  # a new model; the float one is untouched
  logits = jax.jit(lambda m, i: m(i))(model, ids)
  after = weight_bytes(model)
  error = float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference))
  print(f"weights on device: {before / 2**20:.1f} MiB float32 -> {after / 2**20:.1f} MiB "
        f"({after / before:.2f}×; the float head is {model.head.kernel[...].nbytes / 2**20:.1f} MiB)")
  print(f"packed weights: {jq.nnx.quantised_bytes(model) / 2**20:.2f} MiB")
  print(f"relative error of the logits: {error:.3f}")
  return error, before, after


if __name__ == "__main__":
  main()
