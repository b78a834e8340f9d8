"""Formats fitted to a tensor: CRD Student-t ν, Lloyd–Max, the grid for a bits target.

Modules: `crd` (`fit_crd_t`), `lloyd_max` (`scaled_values`, `fit_lloyd_max`), `grid`
(`fit_grid`, `fit_grid_with_outliers`).
"""

from jaxquant.fitting.crd import DF_GRID as DF_GRID
from jaxquant.fitting.crd import fit_crd_t as fit_crd_t
from jaxquant.fitting.grid import MAX_HALF_N as MAX_HALF_N
from jaxquant.fitting.grid import fit_grid as fit_grid
from jaxquant.fitting.grid import fit_grid_with_outliers as fit_grid_with_outliers
from jaxquant.fitting.lloyd_max import fit_lloyd_max as fit_lloyd_max
from jaxquant.fitting.lloyd_max import scaled_values as scaled_values

__all__ = ["DF_GRID", "MAX_HALF_N", "fit_crd_t", "fit_grid", "fit_grid_with_outliers",
           "fit_lloyd_max", "scaled_values"]
