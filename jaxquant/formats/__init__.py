"""Scalar quantisation formats (codebooks): INT, FP, NF4, SF4, cube-root-density, Lloyd–Max,
OCP MX and NVFP4.

A `Format` is a sorted set of values plus a bit width and a name; builders construct the
classic formats and the distribution-optimal ones, and `parse` rebuilds any of them by name.
"""

from jaxquant.formats._builtin import fp_format as fp_format
from jaxquant.formats._builtin import int_format as int_format
from jaxquant.formats._builtin import nf4 as nf4
from jaxquant.formats._builtin import sf4 as sf4
from jaxquant.formats._builtin import uint_format as uint_format
from jaxquant.formats._builtin import uniform_grid as uniform_grid
from jaxquant.formats._crd import FAMILIES as FAMILIES
from jaxquant.formats._crd import crd_format as crd_format
from jaxquant.formats._format import BLOCK_SCALINGS as BLOCK_SCALINGS
from jaxquant.formats._format import SCALINGS as SCALINGS
from jaxquant.formats._format import Format as Format
from jaxquant.formats._lloyd_max import lloyd_max as lloyd_max
from jaxquant.formats._lloyd_max import lut_format as lut_format
from jaxquant.formats._mx import MX_FORMATS as MX_FORMATS
from jaxquant.formats._mx import mx_format as mx_format
from jaxquant.formats._mx import nvfp4 as nvfp4
from jaxquant.formats._parse import parse as parse

__all__ = [
    "BLOCK_SCALINGS", "FAMILIES", "MX_FORMATS", "SCALINGS", "Format", "crd_format", "fp_format",
    "int_format", "lloyd_max", "lut_format", "mx_format", "nf4", "nvfp4", "parse", "sf4",
    "uint_format", "uniform_grid",
]
