"""The Student-t ν of a CRD format, fitted to a tensor by the error it gives."""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

from jaxquant import _arguments, metrics
from jaxquant.formats import Format, crd_format
from jaxquant.qarray import QuantSpec, dequantise, quantise

# Twelve log-spaced degrees of freedom in [3, 100], rounded so format names stay short.
DF_GRID = tuple(float(f"{v:.3g}") for v in np.geomspace(3.0, 100.0, 12))


def fit_crd_t(x, bits: int, *, scaling: str = "absmax", block_size: int | str = 64,
              symmetric: bool | None = None, axis: int = 0, scale_dtype=None,
              grid=DF_GRID, weights=None) -> Format:
  """The CRD Student-t format whose ν (from `grid`) gives the lowest error R on `x`.

  LLM weights are heavier-tailed than normal; Orr et al. (2025) fit ν per tensor from twelve
  log-spaced values in [3, 100] by minimising R = ‖ŵ - w‖/‖w‖ under the scaling used
  (`jaxquant.metrics.relative_rmse`, which neither underflows for tiny nor overflows for huge
  values). With `weights` c it minimises the weighted error instead,
  R_c = sqrt(Σᵢ cᵢ (ŵᵢ - wᵢ)² / Σᵢ cᵢ wᵢ²): with cᵢ = H_kk, the diagonal of the input second
  moment H = Σ x xᵀ at element i's input row k, that is GPTQ's proxy Σ_k H_kk Σ_n ΔW_kn² for
  the output error of a kernel W [K, N], relative to the same weighting of W.

  Args:
    x: the tensor to fit: finite, with an element of magnitude ≥ 2^-126.
    bits, scaling, symmetric: as for `crd_format`.
    block_size: as for `QuantSpec`; the error is measured with it. An absmax or signmax
      format is designed for its block size, so those scalings take an int; ``"channel"``
      and ``"tensor"`` blocks go with ``scaling="rms"``.
    axis, scale_dtype: as for `QuantSpec`; the error is measured with these.
    grid: a non-empty sequence of candidate ν values (each > 2); of equal errors the first
      wins (every ν fits a constant block exactly under absmax scaling).
    weights: optional non-negative weights c broadcastable to x's shape with x's rank (see
      `jaxquant._arguments.fitting_weights`), e.g. ``diag_h[:, None]`` for a kernel
      [K, N]; None weighs every element equally (R).

  Returns:
    The best `Format` (named with its ν, e.g. ``crd-t5.55-absmax-sym-4b-B64``).

  Raises:
    ValueError: `x` is empty, not finite, or all zero or subnormal (nothing to fit: every ν
      gives the same error); `weights` does not broadcast to x's shape, or is not finite and
      non-negative, or is zero wherever x is nonzero; `grid` is empty; a ν is not > 2; or
      another argument is invalid (as for `crd_format` and `QuantSpec`).
    TypeError: `grid` is not a sequence of numbers, or another argument has the wrong type.
  """
  if scaling != "rms" and isinstance(block_size, str):
    raise ValueError(f"{block_size=} needs scaling='rms': a {scaling} CRD format is designed for "
                     "an integer block size")
  array = _arguments.fitting_input(x)
  if weights is not None:
    weights = _arguments.fitting_weights(weights, array)
  if isinstance(grid, str) or not isinstance(grid, Iterable):
    raise TypeError(f"{grid=} must be a sequence of numbers > 2")
  candidates = [crd_format("t", bits, scaling=scaling, block_size=block_size, symmetric=symmetric,
                           df=_arguments.real(f"grid[{i}]", df, low=2.0, low_open=True))
                for i, df in enumerate(grid)]
  if not candidates:
    raise ValueError(f"{grid=} is empty; give at least one ν > 2")

  def error(fmt: Format) -> float:
    spec = QuantSpec(fmt, block_size=block_size, axis=axis, scale_dtype=scale_dtype)
    return float(metrics.relative_rmse(x, dequantise(quantise(x, spec), jnp.float32), weights))

  return min(candidates, key=error)

