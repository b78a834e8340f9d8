"""jaxquant: weight quantisation (quantization) for JAX, built on optimal formats.

Formats (codebooks) come from quantisation theory (Panter–Dite's cube-root rule, Lloyd–Max);
arrays are quantised in blocks with absmax, signmax or RMS scales and stored truly packed.
"""

from jaxquant import distributions as distributions
from jaxquant import fitting as fitting
from jaxquant import formats as formats
from jaxquant import metrics as metrics
from jaxquant import packing as packing
from jaxquant import scaling as scaling
from jaxquant.kernels import qmatmul as qmatmul
from jaxquant.qarray import QuantisedArray as QuantisedArray
from jaxquant.qarray import QuantSpec as QuantSpec
from jaxquant.qarray import dequantise as dequantise
from jaxquant.qarray import quantise as quantise

__version__ = "0.1.0"

__all__ = [
    "QuantSpec", "QuantisedArray", "dequantise", "distributions", "fitting", "formats", "metrics",
    "packing", "qmatmul", "quantise", "scaling",
]
