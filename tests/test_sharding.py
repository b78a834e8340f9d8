"""Sharding: spec derivation and errors in-process; placement and sharded compute on 8 devices.

Checks that need several devices run in a subprocess (`tests/sharding_check.py`, and the
example), because the fake CPU device count must be set before JAX starts.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant.nn import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH = AbstractMesh((2, 4), ("data", "model"))
NF4 = jq.QuantSpec("nf4", block_size=64, axis=0)


def weight(shape, spec=NF4):
  return jq.quantise(jax.random.normal(jax.random.key(0), shape), spec)


@pytest.mark.parametrize("spec", [P(None, "model"), P("model", None), P(("data", "model")),
                                  P(), P("data", "model")])
def test_codes_take_the_float_spec_and_scales_follow_it(spec):
  q = weight((1024, 256))
  specs = sharding.partition_specs(q, spec, MESH)
  full = tuple(spec) + (None,) * (2 - len(spec))
  assert jax.tree.structure(specs) == jax.tree.structure(q)
  assert (specs.codes, specs.scales, specs.codebook) == (P(*full), P(*full), P())
  assert specs.scale_scales is None
  assert (specs.shape, specs.axis, specs.block_size) == (q.shape, q.axis, q.block_size)


def test_size_one_scale_dimensions_and_second_level_scales_are_replicated():
  channel = sharding.partition_specs(
      weight((256, 64), jq.QuantSpec("int4", axis=0, block_size="channel")), P("model", "data"),
      MESH)
  assert (channel.codes, channel.scales) == (P("model", "data"), P(None, "data"))
  tensor = sharding.partition_specs(
      weight((256, 64), jq.QuantSpec("int4", axis=0, block_size="tensor")), P("model", "data"),
      MESH)
  assert tensor.scales == P(None, None)
  double = sharding.partition_specs(
      weight((256, 64), jq.QuantSpec("nf4", axis=0, double_quant=True)), P("model", None), MESH)
  assert (double.scales, double.scale_scales) == (P("model", None), P())


def test_specs_for_an_abstract_weight_along_a_middle_axis():
  spec = jq.QuantSpec("nf4", block_size=64, axis=1)
  q = jax.eval_shape(lambda w: jq.quantise(w, spec), jax.ShapeDtypeStruct((4, 512, 6), jnp.float32))
  specs = sharding.partition_specs(q, P("data", "model"), MESH)
  assert (specs.codes, specs.scales) == (P("data", "model", None), P("data", "model", None))


def test_one_scale_along_the_axis_needs_only_whole_words():
  q = weight((256, 64), jq.QuantSpec("int4", axis=0, block_size="channel"))
  sharding.partition_specs(q, P(("data", "model")), MESH)  # 32 rows a shard
  q = weight((128, 64), jq.QuantSpec("int4", axis=0, block_size="channel"))
  with pytest.raises(ValueError, match=r"16 elements, not a multiple of 32 \(one packed word"):
    sharding.partition_specs(q, P(("data", "model")), MESH)


def test_splitting_a_block_names_the_axis_sizes_mesh_axes_and_fixes():
  q = weight((1536, 256), jq.QuantSpec("nf4", block_size=128, axis=0))
  with pytest.raises(ValueError) as error:
    sharding.partition_specs(q, P(("data", "model"), None), MESH)
  assert str(error.value) == (
      "axis 0 (length 1536) of the weight of shape (1536, 256) cannot be split 8 ways over mesh "
      "axis ('data', 'model'): it is the quantised axis, and each shard would hold 192 "
      "elements, not a multiple of lcm(block_size=128, 32) = 128, so a block or a 32-code word "
      "would straddle two shards. What works: a shard count dividing 12, such as "
      "[2, 3, 4, 6, 12]; block_size in [32, 64]; leaving axis 0 unsharded (None)")
  sharding.partition_specs(q, P("model", None), MESH)  # 384 rows: three blocks a shard


def test_an_axis_that_needs_padding_says_so():
  q = weight((1000, 64), jq.QuantSpec("nf4", block_size=64, axis=0))
  with pytest.raises(ValueError, match=r"250 elements.*padding axis 0 to a multiple of 256"):
    sharding.partition_specs(q, P("model"), MESH)


@pytest.mark.parametrize("spec, message", [
    (P(None, ("data", "model")), r"axis 1 \(length 100\).*100 is not a multiple of 8"),
    (P(None, "tensor"), r"names mesh axis 'tensor', which the mesh lacks; its axes are "
                        r"\('data', 'model'\)"),
    (P("model", "model"), r"uses mesh axis 'model' twice"),
    (P(None, None, None), r"has 3 entries but the weight has 2 axes"),
    (P(P.UNCONSTRAINED, None), r"leaves axis 0 unconstrained"),
])
def test_invalid_specs_raise(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.partition_specs(weight((256, 100)), spec, MESH)


def test_wrong_argument_types_raise():
  q = weight((256, 64))
  with pytest.raises(TypeError, match=r"write PartitionSpec\(None, 'model'\)"):
    sharding.partition_specs(q, (None, "model"), MESH)
  with pytest.raises(TypeError, match="q must be a QuantisedArray"):
    sharding.partition_specs(jnp.ones((256, 64)), P(), MESH)
  with pytest.raises(TypeError, match="mesh must be"):
    sharding.partition_specs(q, P(), {"model": 4})
  with pytest.raises(TypeError, match="AbstractMesh can only give specs: use partition_specs"):
    sharding.shard(q, P(), MESH)


def one_device_mesh():
  return jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def test_shard_on_one_device_commits_every_leaf():
  mesh = one_device_mesh()
  q = weight((256, 64), jq.QuantSpec("nf4", axis=0, double_quant=True))
  sharded = sharding.shard(q, P(None, "model"), mesh)
  for leaf, spec in ((sharded.codes, P(None, "model")), (sharded.scale_scales, P())):
    assert leaf.sharding == NamedSharding(mesh, spec)
  x = jnp.ones((2, 256))
  np.testing.assert_array_equal(jax.jit(jq.qmatmul)(x, sharded), jq.qmatmul(x, q))


class Pair(nnx.Module):
  """Two linear layers."""

  def __init__(self, rngs):
    self.up = nnx.Linear(64, 128, rngs=rngs)
    self.down = nnx.Linear(128, 64, rngs=rngs)


def test_shard_model_places_everything_and_warns_about_unused_patterns():
  mesh = one_device_mesh()
  model = jq.nnx.quantise_model(Pair(nnx.Rngs(0)), [jq.Rule(r"up", NF4)])
  with pytest.warns(UserWarning, match=r"patterns \['.\*down', 'typo'\] matched no quantised"):
    sharding.shard_model(model, mesh, {r"up": P(None, "model"), r".*down": P("model", None),
                                       r"typo": P()})
  assert model.up.kernel.get_value().codes.sharding == NamedSharding(mesh, P(None, "model"))
  assert model.down.kernel[...].sharding == NamedSharding(mesh, P())
  with pytest.raises(ValueError, match=r"key '\(' is not a valid regex"):
    sharding.shard_model(model, mesh, {"(": P()})
  with pytest.raises(ValueError, match=r"^layer 'up' \(specs_by_path key 'u.'\): spec=.*'tensor'"):
    sharding.shard_model(model, mesh, {r"u.": P("tensor")})
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh with devices"):
    sharding.shard_model(model, MESH, {})


def run_script(relative):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, relative], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_sharding_checks_on_eight_devices():
  out = run_script("tests/sharding_check.py")
  assert re.search(r"(\d+) of \1 sharding checks passed", out), out


def test_sharded_inference_example():
  out = run_script("examples/sharded_inference.py")
  assert "mesh {'data': 2, 'model': 4}" in out
  assert "matches the unsharded model" in out, out
