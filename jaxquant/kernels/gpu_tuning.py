"""What was measured on a GPU: the fastest Pallas block sizes per shape, and where they win.

`gpu_tuning.json` beside this module is written by `benchmarks/gpu_sweep.py` on a GPU and
committed. It holds two lists of rows keyed by (M, K, N, bits):

- ``configs``: the `pallas_gpu.BlockSizes` fields and variant that ran fastest for the shape;
- ``dispatch``: the kernel's time and that of dequantise-then-dot for the shape, from which
  ``backend="auto"`` decides whether to call the kernel.

A shape that was not measured takes the nearest measured row of the same bits (of any bits
if none): first the nearest M (by |log₂ M − log₂ m|, ties to the smaller M: the weight
stream dominates as M falls), then the nearest (K, N) by |log₂ K − log₂ k| + |log₂ N − log₂ n|.
With no rows at all there is no measurement: `block_sizes` returns None (the kernel's
reasoned default) and `pallas_is_faster` False (dequantise-then-dot, the path that never
depends on the kernel's tuning).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

TABLE = pathlib.Path(__file__).with_name("gpu_tuning.json")


@functools.lru_cache(maxsize=None)
def table(path: str = str(TABLE)) -> dict:
  """The tuning table (``device``, ``date``, ``source``, ``configs``, ``dispatch``)."""
  return json.loads(pathlib.Path(path).read_text())


def nearest(rows: list[dict], m: int, k: int, n: int, bits: int) -> dict | None:
  """The row that stands for shape (m, k, n, bits) under the module's rule, or None."""
  same_bits = [row for row in rows if row["bits"] == bits]
  candidates = same_bits or rows
  if not candidates:
    return None
  log = math.log2
  return min(candidates, key=lambda row: (
      abs(log(row["m"]) - log(m)), row["m"],
      abs(log(row["k"]) - log(k)) + abs(log(row["n"]) - log(n))))


def block_sizes(variant: str | None, m: int, k: int, n: int, bits: int,
                path: str = str(TABLE)) -> tuple[str, dict] | None:
  """(variant, `BlockSizes` fields) measured fastest for the shape, or None.

  With `variant` given, only configurations of that variant are considered.
  """
  rows = [row for row in table(path)["configs"] if variant in (None, row["variant"])]
  row = nearest(rows, m, k, n, bits)
  return None if row is None else (row["variant"], dict(row["block_sizes"]))


def pallas_is_faster(m: int, k: int, n: int, bits: int, path: str = str(TABLE)) -> bool:
  """Whether the measured kernel beat dequantise-then-dot at the nearest measured shape."""
  row = nearest(table(path)["dispatch"], m, k, n, bits)
  return row is not None and row["kernel_us"] < row["dequant_dot_us"]
