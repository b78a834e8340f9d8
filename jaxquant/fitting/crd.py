"""The Student-t ν of a CRD format, fitted to a tensor by the error it gives."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant import metrics
from jaxquant.formats import Format, crd_format
from jaxquant.qarray import QuantSpec, dequantise, quantise

# Twelve log-spaced degrees of freedom in [3, 100], rounded so format names stay short.
DF_GRID = tuple(float(f"{v:.3g}") for v in np.geomspace(3.0, 100.0, 12))


def fit_crd_t(x, bits: int, *, scaling: str = "absmax", block_size: int | str = 64,
              symmetric: bool | None = None, axis: int = 0, scale_dtype=None,
              grid=DF_GRID) -> Format:
  """The CRD Student-t format whose ν (from `grid`) gives the lowest error R on `x`.

  LLM weights are heavier-tailed than normal; Orr et al. (2025) fit ν per tensor from twelve
  log-spaced values in [3, 100] by minimising R = ‖ŵ - w‖/‖w‖ under the scaling used.

  Args:
    x: the tensor to fit.
    bits, scaling, symmetric: as for `crd_format`.
    block_size: as for `QuantSpec`; the error is measured with it. An absmax or signmax
      format is designed for its block size, so those scalings take an int; ``"channel"``
      and ``"tensor"`` blocks go with ``scaling="rms"``.
    axis, scale_dtype: as for `QuantSpec`; the error is measured with these.
    grid: candidate ν values (each > 2).

  Returns:
    The best `Format` (named with its ν, e.g. ``crd-t5.55-absmax-sym-4b-B64``).
  """
  if scaling != "rms" and isinstance(block_size, str):
    raise ValueError(f"{block_size=} needs scaling='rms': a {scaling} CRD format is designed for "
                     "an integer block size")
  best, best_error = None, np.inf
  for df in grid:
    fmt = crd_format("t", bits, scaling=scaling, block_size=block_size, symmetric=symmetric, df=df)
    spec = QuantSpec(fmt, block_size=block_size, axis=axis, scale_dtype=scale_dtype)
    error = float(metrics.relative_rmse(x, dequantise(quantise(x, spec), jnp.float32)))
    if error < best_error:
      best, best_error = fmt, error
  return best

