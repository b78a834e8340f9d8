"""Sharding checks on a 2×4 mesh of fake CPU devices; `tests/test_sharding.py` runs this script.

The device count is fixed when JAX starts, so these checks run in their own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/sharding_check.py

Every check runs; the script prints each failure with its traceback and exits 1 if any failed.
"""

import dataclasses
import sys
import tempfile
import time
import traceback
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant.nn import sharding

NF4 = jq.QuantSpec("nf4", block_size=64, axis=0)
COLUMN, ROW = P(None, "model"), P("model", None)
CHECKS = []


def check(function):
  CHECKS.append(function)
  return function


def mesh(axis_type=AxisType.Auto):
  """A 2×4 ("data", "model") mesh; Auto axes unless asked.

  With explicit axes (`jax.make_mesh`'s default) only plain block scales with x sharded on its
  batch work today: an activation sharded along K (the down projection of a tensor-parallel
  MLP) and double-quantised scales need `out_sharding` arguments that the kernels and
  `scaling.decode_scales` do not pass yet.
  """
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def weight(shape=(1024, 2048), spec=NF4, seed=0):
  return jq.quantise(jax.random.normal(jax.random.key(seed), shape), spec)


def activations(k, m=16):
  return jax.random.normal(jax.random.key(99), (m, k))


def assert_close(actual, expected, rtol=1e-5):
  """Equal up to float reassociation: error within rtol of the largest expected magnitude."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def assert_sharding(array, the_mesh, spec):
  expected = NamedSharding(the_mesh, spec)
  assert array.sharding.is_equivalent_to(expected, array.ndim), (
      f"sharding {array.sharding} is not {expected}")


def assert_placed(leaf, reference, shard_shape):
  """Each of the 8 devices holds one shard of `shard_shape`: the matching slice of `reference`."""
  shards = leaf.addressable_shards
  assert len({s.device for s in shards}) == 8, f"{len(shards)} shards for 8 devices"
  for s in shards:
    assert s.data.shape == shard_shape, f"shard on {s.device} is {s.data.shape}, not {shard_shape}"
    np.testing.assert_array_equal(np.asarray(s.data), np.asarray(reference)[s.index])


@check
def column_and_row_parallel_leaves_land_on_the_expected_devices():
  q, the_mesh = weight(), mesh()  # codes (128, 2048) uint32, scales (16, 2048), codebook (16,)
  cases = {COLUMN: ((128, 512), (16, 512)), ROW: ((32, 2048), (4, 2048))}
  for spec, (codes_shape, scales_shape) in cases.items():
    sharded = sharding.shard(q, spec, the_mesh)
    assert_placed(sharded.codes, q.codes, codes_shape)
    assert_placed(sharded.scales, q.scales, scales_shape)
    assert_placed(sharded.codebook, q.codebook, (16,))
    assert sharded.scale_scales is None
    # Each device's codes and scales are a self-contained weight: whole blocks and words.
    full = np.asarray(q.dequantise())
    rows = codes_shape[0] * 32 // q.bits
    for codes, scales in zip(sharded.codes.addressable_shards, sharded.scales.addressable_shards):
      local = dataclasses.replace(q, codes=codes.data, scales=scales.data,
                                  shape=(rows, codes_shape[1]))
      first = codes.index[0].indices(q.codes.shape[0])[0] * 32 // q.bits
      np.testing.assert_array_equal(np.asarray(local.dequantise()),
                                    full[first:first + rows, codes.index[1]])


@check
def jitted_qmatmul_on_sharded_inputs_matches_unsharded():
  q = weight()
  x = activations(1024)
  expected = jq.qmatmul(x, q)
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    the_mesh = mesh(axis_type)
    xs = jax.device_put(x, NamedSharding(the_mesh, P("data", None)))
    for spec, out_spec in ((COLUMN, P("data", "model")), (ROW, P("data", None))):
      # "reference" dequantises with a gather: on an explicit mesh it must say its layout.
      for backend in ("xla", "reference"):
        y = jax.jit(lambda a, w, b=backend: jq.qmatmul(a, w, backend=b))(
            xs, sharding.shard(q, spec, the_mesh))
        assert_close(y, expected)
        assert_sharding(y, the_mesh, out_spec)


@check
def every_scale_storage_shards_and_multiplies():
  the_mesh = mesh()
  x = activations(1024)
  xs = jax.device_put(x, NamedSharding(the_mesh, P("data", None)))
  specs = {
      "double_quant": jq.QuantSpec("nf4", axis=0, double_quant=True),
      "float8": jq.QuantSpec("nf4", axis=0, scale_dtype="float8_e4m3fn"),
      "channel": jq.QuantSpec("int4", axis=0, block_size="channel"),
      "tensor": jq.QuantSpec("int4", axis=0, block_size="tensor"),
  }
  for name, spec in specs.items():
    q = weight((1024, 512), spec)
    expected = jq.qmatmul(x, q)
    for layout in (COLUMN, ROW):
      sharded = sharding.shard(q, layout, the_mesh)
      if q.scale_scales is not None:
        assert sharded.scale_scales.sharding.is_fully_replicated, name
      scales_spec = P(*(None if size == 1 else e for e, size in zip(layout, q.scales.shape)))
      assert_sharding(sharded.scales, the_mesh, scales_spec)
      try:
        assert_close(jax.jit(jq.qmatmul)(xs, sharded), expected)
      except AssertionError as error:
        raise AssertionError(f"{name} {layout}: {error}") from None


class MLP(nnx.Module):
  """A tensor-parallel MLP block and a small head."""

  def __init__(self, rngs, width=256, hidden=1024):
    self.up = nnx.Linear(width, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, width, rngs=rngs)
    self.head = nnx.Linear(width, 64, rngs=rngs)

  def __call__(self, x):
    return self.head(self.down(jax.nn.gelu(self.up(x))))


@check
def sharded_nnx_model_matches_unsharded():
  the_mesh = mesh()
  model = jq.nnx.quantise_model(MLP(nnx.Rngs(0)), [jq.Rule(r".*", NF4)])
  x = activations(256)
  forward = jax.jit(lambda m, x: m(x))
  expected = forward(model, x)
  sharding.shard_model(model, the_mesh, {r".*up": COLUMN, r".*down": ROW})
  up, down, head = (layer.kernel.get_value() for layer in (model.up, model.down, model.head))
  assert_sharding(up.codes, the_mesh, COLUMN)
  assert_sharding(up.scales, the_mesh, COLUMN)
  assert_sharding(down.codes, the_mesh, ROW)
  assert_sharding(down.scales, the_mesh, ROW)
  for leaf in (head.codes, head.scales, up.codebook, model.up.bias[...], model.head.bias[...]):
    assert_sharding(leaf, the_mesh, P())
  assert up.codes.addressable_shards[0].data.shape == (32, 256)  # of (32, 1024)
  assert down.codes.addressable_shards[0].data.shape == (32, 256)  # of (128, 256)
  y = forward(model, jax.device_put(x, NamedSharding(the_mesh, P("data", None))))
  assert_close(y, expected)
  assert_sharding(y, the_mesh, P("data", None))


@check
def outlier_weights_shard_their_dense_part_and_replicate_the_outliers():
  q = jq.outliers.quantise_with_outliers(jax.random.t(jax.random.key(3), 3.0, (1024, 512)), NF4,
                                         2**-10)
  x = activations(1024)
  expected = jq.qmatmul(x, q)
  the_mesh = mesh()
  xs = jax.device_put(x, NamedSharding(the_mesh, P("data", None)))
  for layout in (COLUMN, ROW):
    sharded = sharding.shard(q, layout, the_mesh)
    assert_sharding(sharded.dense.codes, the_mesh, layout)
    assert sharded.values.sharding.is_fully_replicated
    assert sharded.indices.sharding.is_fully_replicated
    assert_close(jax.jit(jq.qmatmul)(xs, sharded), expected)


@check
def entropy_coded_checkpoints_restore_into_sharded_targets():
  q = weight((1024, 512), jq.QuantSpec(jq.formats.uniform_grid(31), block_size=64, axis=0))
  the_mesh = mesh()
  with tempfile.TemporaryDirectory() as directory:
    jq.checkpoint.save(f"{directory}/c", {"w": q}, entropy_coded=True)
    assert "coded" in jq.checkpoint.read_metadata(f"{directory}/c")["leaves"]["w"]
    specs = sharding.partition_specs(q, COLUMN, the_mesh)
    target = {"w": jax.tree.map(
        lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                sharding=NamedSharding(the_mesh, spec)),
        q, specs)}
    restored = jq.checkpoint.restore(f"{directory}/c", target)["w"]
  assert_sharding(restored.codes, the_mesh, COLUMN)
  np.testing.assert_array_equal(np.asarray(restored.codes), np.asarray(q.codes))


@check
def shard_refuses_to_split_blocks():
  the_mesh = mesh()
  q = weight((1536, 256), jq.QuantSpec("nf4", block_size=128, axis=0))
  try:
    sharding.shard(q, P(("data", "model"), None), the_mesh)  # 192 rows a shard
  except ValueError as error:
    message = str(error)
    for part in ("axis 0", "1536", "8 ways", "('data', 'model')", "192", "128", "dividing 12"):
      assert part in message, f"{part!r} missing from: {message}"
  else:
    raise AssertionError("shard split blocks of 128 into shards of 192 rows without an error")
  four_way = sharding.shard(q, ROW, the_mesh)  # 384 rows: three whole blocks a shard
  assert four_way.scales.addressable_shards[0].data.shape == (3, 256)


def main() -> int:
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  warnings.simplefilter("error")
  if jax.device_count() != 8:
    print(f"FAIL: {jax.device_count()} devices; run with "
          "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")
    return 1
  failed = []
  for function in CHECKS:
    start = time.perf_counter()
    try:
      function()
    except Exception:  # pylint: disable=broad-except  # report every failing check
      failed.append(function.__name__)
      print(f"FAIL {function.__name__}")
      traceback.print_exc()
    else:
      print(f"ok   {function.__name__} ({time.perf_counter() - start:.1f} s)")
  print(f"{len(CHECKS) - len(failed)} of {len(CHECKS)} sharding checks passed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
