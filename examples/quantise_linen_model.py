"""Quantise a Flax Linen MLP by rules and run the unmodified model on the packed weights.

The hidden layers become NF4 (blocks of 64 along the input axis, bf16 scales); the output
layer stays float. Prints the output error against the float model and the parameter memory
measured on the device.

    python examples/quantise_linen_model.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.nn.linen import quantise_params, quantised_apply


class MLP(nn.Module):
  """An ordinary Linen model: nothing in it knows about quantisation."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(512)(x))
    x = nn.gelu(nn.Dense(512)(x))
    return nn.Dense(10, name="head")(x)


def device_bytes(tree) -> int:
  return sum(leaf.on_device_size_in_bytes() for leaf in jax.tree_util.tree_leaves(tree))


def main():
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (64, 512))
  params = model.init(jax.random.key(0), x)["params"]
  rules = [jq.Rule("head", None), jq.Rule("Dense_.*", jq.QuantSpec("nf4", block_size=64))]
  qparams = quantise_params(params, rules)

  y_float = model.apply({"params": params}, x)
  y_quant = jax.jit(lambda p, x: quantised_apply(model, {"params": p}, x))(qparams, x)
  error = float(jnp.linalg.norm(y_quant - y_float) / jnp.linalg.norm(y_float))
  float_bytes, quantised_bytes = device_bytes(params), device_bytes(qparams)

  print(f"output error ‖y_q − y‖/‖y‖ = {error:.4f}")
  print(f"parameters: float {float_bytes:,} B, quantised {quantised_bytes:,} B "
        f"({quantised_bytes / float_bytes:.3f}×)")
  return error, float_bytes, quantised_bytes


if __name__ == "__main__":
  main()
