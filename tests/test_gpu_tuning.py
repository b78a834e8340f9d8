"""The GPU tuning table: the nearest-measurement rule, and how the kernel and auto use it."""

import dataclasses
import functools
import json

import jax.numpy as jnp
import pytest

from jaxquant.kernels import gpu_tuning, pallas_gpu
from jaxquant.kernels.pallas_gpu import BlockSizes


def write_table(tmp_path, configs=(), dispatch=()):
  # A new file each time: `gpu_tuning.table` reads each path once.
  path = tmp_path / f"tuning-{len(list(tmp_path.iterdir()))}.json"
  path.write_text(json.dumps(dict(device="test", date="2026-12-03", source="test",
                                  configs=list(configs), dispatch=list(dispatch))))
  return str(path)


def config_row(m, k, n, bits, variant="gemv", **fields):
  sizes = dict(block_m=1, block_n=128, block_k=64, split_k=1, num_warps=4, num_stages=3,
               split="slices") | fields
  return dict(variant=variant, m=m, k=k, n=n, bits=bits, block_sizes=sizes)


def dispatch_row(m, k, n, bits, kernel_us, dequant_dot_us):
  return dict(m=m, k=k, n=n, bits=bits, kernel_us=kernel_us, dequant_dot_us=dequant_dot_us)


def test_nearest_prefers_m_then_shape_and_falls_back_to_other_bits():
  rows = [dispatch_row(1, 4096, 4096, 4, 1, 2), dispatch_row(16, 4096, 4096, 4, 1, 2),
          dispatch_row(1, 8192, 28672, 4, 1, 2), dispatch_row(1, 8192, 8192, 3, 1, 2)]
  pick = lambda m, k, n, bits: rows.index(gpu_tuning.nearest(rows, m, k, n, bits))
  assert pick(1, 4096, 4096, 4) == 0
  assert pick(4, 4096, 4096, 4) == 0      # log2 distance 2 to both M = 1 and 16: the smaller
  assert pick(8, 4096, 4096, 4) == 1      # nearer M = 16
  assert pick(1, 8192, 16384, 4) == 2     # |1-1| + |14-14.8| beats |13-12| + |14-12|
  assert pick(2, 4096, 4096, 3) == 3      # the only 3-bit row, whatever its shape
  assert pick(1, 4096, 4096, 8) == 0      # no 8-bit rows: the nearest of all
  assert gpu_tuning.nearest([], 1, 64, 64, 4) is None


def test_dispatch_follows_the_measured_times(tmp_path):
  path = write_table(tmp_path, dispatch=[dispatch_row(1, 8192, 8192, 4, 20.0, 140.0),
                                         dispatch_row(64, 8192, 8192, 4, 300.0, 150.0)])
  faster = functools.partial(gpu_tuning.pallas_is_faster, path=path)
  assert faster(1, 8192, 8192, 4) and faster(2, 4096, 4096, 4)
  assert not faster(64, 8192, 8192, 4) and not faster(256, 8192, 8192, 4)
  # Nothing measured: auto dequantises, whatever the shape.
  assert not gpu_tuning.pallas_is_faster(1, 8192, 8192, 4, path=write_table(tmp_path))


def test_block_sizes_filter_by_variant(tmp_path):
  path = write_table(tmp_path, configs=[
      config_row(1, 8192, 8192, 4, "gemv", block_n=256),
      config_row(16, 8192, 8192, 4, "gemm", block_m=16, block_n=64, block_k=128)])
  variant, fields = gpu_tuning.block_sizes(None, 2, 8192, 8192, 4, path=path)
  assert variant == "gemv" and fields["block_n"] == 256
  variant, fields = gpu_tuning.block_sizes("gemm", 1, 8192, 8192, 4, path=path)
  assert variant == "gemm" and fields["block_m"] == 16
  assert gpu_tuning.block_sizes(None, 1, 64, 64, 4, path=write_table(tmp_path)) is None


def test_kernel_takes_a_tuned_config_that_tiles_the_shape_else_the_default(tmp_path,
                                                                           monkeypatch):
  atomic = config_row(1, 8192, 8192, 4, "gemv", block_n=256, split_k=8, split="atomic")
  path = write_table(tmp_path, configs=[atomic])
  monkeypatch.setattr(gpu_tuning, "block_sizes",
                      functools.partial(gpu_tuning.block_sizes, path=path))
  variant, sizes = pallas_gpu.chosen_block_sizes(None, 1, 8192, 8192, 4, jnp.bfloat16)
  assert (variant, sizes) == ("gemv", BlockSizes(**atomic["block_sizes"]))
  # N = 200 is not whole 256-column tiles, which an atomic split needs: the default.
  variant, sizes = pallas_gpu.chosen_block_sizes(None, 1, 8192, 200, 4, jnp.bfloat16)
  assert sizes == pallas_gpu.default_block_sizes("gemv", 1, 8192, 200, 4, jnp.bfloat16)


def test_committed_table_is_well_formed():
  table = gpu_tuning.table()
  assert {"device", "date", "source", "configs", "dispatch"} <= set(table)
  for row in table["configs"]:
    sizes = BlockSizes(**row["block_sizes"])
    assert set(row["block_sizes"]) == {f.name for f in dataclasses.fields(BlockSizes)}
    pallas_gpu.validate_block_sizes(sizes, row["variant"], row["bits"], row["m"], row["n"])
  for row in table["dispatch"]:
    assert row["kernel_us"] > 0 and row["dequant_dot_us"] > 0
    assert min(row["m"], row["k"], row["n"]) >= 1 and 1 <= row["bits"] <= 8


@pytest.mark.parametrize("field,value", [("block_n", 96), ("split", "tree"), ("num_warps", 0)])
def test_validate_block_sizes_names_the_field(field, value):
  sizes = dataclasses.replace(BlockSizes(1, 128, 64), **{field: value})
  with pytest.raises(ValueError, match=f"block_sizes.{field}"):
    pallas_gpu.validate_block_sizes(sizes, "gemv", 4, 1, 128)
