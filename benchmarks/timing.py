"""Timing for benchmarks: medians of jitted calls on device arrays (these machines are noisy)."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` runs, after one compiling warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
