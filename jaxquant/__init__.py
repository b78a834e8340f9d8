"""jaxquant: weight quantisation (quantization) for JAX, built on optimal formats.

Formats (codebooks) come from quantisation theory (Panter–Dite's cube-root rule, Lloyd–Max);
arrays are quantised in blocks with absmax, signmax or RMS scales and stored truly packed.
"""

from jaxquant import calibration as calibration
from jaxquant import distributions as distributions
from jaxquant import entropy as entropy
from jaxquant import fitting as fitting
from jaxquant import formats as formats
from jaxquant import gptq as gptq
from jaxquant import interception as interception
from jaxquant import interop as interop
from jaxquant import lora as lora
from jaxquant import metrics as metrics
from jaxquant import outliers as outliers
from jaxquant import packing as packing
from jaxquant import scaling as scaling
from jaxquant.contraction import dot_general as dot_general
from jaxquant.contraction import qat_matmul as qat_matmul
from jaxquant.contraction import qmatmul as qmatmul
from jaxquant.nn.rules import Rule as Rule
from jaxquant.ops import einsum as einsum
from jaxquant.ops import take as take
from jaxquant.qarray import QuantisedArray as QuantisedArray
from jaxquant.qarray import QuantSpec as QuantSpec
from jaxquant.qarray import dequantise as dequantise
from jaxquant.qarray import quantise as quantise
from jaxquant.qat import FakeQuantised as FakeQuantised
from jaxquant.qat import fake_quantise as fake_quantise

# The Flax layers import Flax, so they load on first use: jaxquant.nnx, jaxquant.linen.
_LAZY_MODULES = {"nnx": "jaxquant.nn.nnx", "linen": "jaxquant.nn.linen",
                 "checkpoint": "jaxquant.nn.checkpoint", "sharding": "jaxquant.nn.sharding"}


def __getattr__(name):
  if name in _LAZY_MODULES:
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module(_LAZY_MODULES[name])
  raise AttributeError(f"module 'jaxquant' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "FakeQuantised", "QuantSpec", "QuantisedArray", "Rule", "calibration", "dequantise",
    "distributions", "dot_general", "einsum", "entropy", "fake_quantise", "fitting", "formats",
    "gptq", "interception", "interop", "lora", "metrics", "outliers", "packing", "qat_matmul", "qmatmul",
    "quantise", "scaling", "take",
]
