"""Tensor-parallel inference with a packed NF4 MLP on a 2×4 mesh of (fake) CPU devices.

Quantises an NNX MLP, shards it Megatron-style (up column-parallel, down row-parallel, the
batch over "data"), prints what each device holds and checks that the jitted sharded model
gives the unsharded model's outputs.

    python examples/sharded_inference.py
"""

import os

# The device count is fixed when JAX starts: ask for 8 host devices before importing it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position
from jax.sharding import AxisType, NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import jaxquant as jq  # pylint: disable=wrong-import-position


class MLP(nnx.Module):
  """x ↦ down(gelu(up(x)))."""

  def __init__(self, rngs, width=1024, hidden=4096):
    self.up = nnx.Linear(width, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, width, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def main():
  # Auto axes: XLA propagates the shardings through the packed contraction (explicit axes need out_sharding).
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  model = jq.nnx.quantise_model(MLP(nnx.Rngs(0)),
                                [jq.Rule(r".*", jq.QuantSpec("nf4", block_size=64))])
  x = jax.random.normal(jax.random.key(1), (32, 1024))
  forward = jax.jit(lambda m, x: m(x))
  expected = forward(model, x)  # on one device
  unsharded = jq.nnx.quantised_bytes(model)
  jq.sharding.shard_model(model, mesh, {r"up": P(None, "model"), r"down": P("model", None)})
  print(f"mesh {dict(mesh.shape)}; what device 0 holds of each packed weight:")
  print(f"  {'layer':6} {'leaf':9} {'global shape':>14} {'shard shape':>13} {'bytes':>9}")
  per_device = 0
  for name in ("up", "down"):
    q = getattr(model, name).kernel.get_value()
    for leaf in ("codes", "scales", "codebook"):
      array = getattr(q, leaf)
      shard = array.addressable_shards[0].data
      per_device += shard.on_device_size_in_bytes()
      print(f"  {name:6} {leaf:9} {str(array.shape):>14} {str(shard.shape):>13} "
            f"{shard.on_device_size_in_bytes():>9,}")
  print(f"packed weights: {per_device:,} bytes on each device, {unsharded:,} unsharded "
        f"(float32: {2 * 1024 * 4096 * 4:,})")

  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  y = forward(model, xs)
  error = float(np.abs(np.asarray(y) - np.asarray(expected)).max() / np.abs(expected).max())
  assert error < 1e-5, f"the sharded output differs from the unsharded one by {error:.1e}"
  print(f"output {y.shape} sharded as {y.sharding.spec} matches the unsharded model "
        f"(max error {error:.1e} of the largest output)")


if __name__ == "__main__":
  main()
