"""The OCP Microscaling (MX v1.0) element formats, as codebooks for blocks of 32.

The OCP Microscaling Formats specification v1.0 (2023) defines a block of k = 32 elements
sharing one E8M0 scale X, a power of two. For a block with largest magnitude amax,

    X = 2^(⌊log₂ amax⌋ − emax_elem),   element = round_to_nearest_even(x / X), saturated,

where emax_elem is the exponent of the element format's largest normal number. The element
formats, each a `Format` of all its finite values (±0 merged) with scaling ``"mx"`` and
block size 32:

  ==============  ===========================  ==============
  name            elements                     largest, emax
  ==============  ===========================  ==============
  ``mxfp4``       E2M1                         6, 2
  ``mxfp6_e2m3``  E2M3                         7.5, 2
  ``mxfp6_e3m2``  E3M2                         28, 4
  ``mxfp8_e4m3``  E4M3 (no infinities; one NaN 448, 8
                  pattern per sign)
  ``mxfp8_e5m2``  E5M2 (IEEE-like: Inf, NaNs)  57344, 15
  ``mxint8``      8-bit two's complement ×2⁻⁶  1.984375, 0
                  (-128·2⁻⁶ = -2 included)
  ==============  ===========================  ==============

The values come from ml_dtypes' types of the same names (`float4_e2m1fn`, `float6_e2m3fn`,
`float6_e3m2fn`, `float8_e4m3fn`, `float8_e5m2`), so they are the specification's. Rounding to
nearest-even is on the element's bit pattern: a value halfway between two neighbours goes to
the one whose magnitude is an even number of steps from zero
(`jaxquant.qarray.nearest_codes(..., ties_to_even=True)`).

NVIDIA's NVFP4 (`nvfp4`) has the same E2M1 elements in blocks of 16 with a two-level scale:
a float8 E4M3 scale per block relative to a float32 scale per tensor (NVIDIA, "Introducing
NVFP4 for efficient and accurate low-precision inference", 2025).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxquant.formats._format import Format

MX_BLOCK = 32
NVFP4_BLOCK = 16
_FLOAT_ELEMENTS = {
    "mxfp4": (ml_dtypes.float4_e2m1fn, 4), "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 6),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 6), "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 8),
}
MX_FORMATS = tuple(_FLOAT_ELEMENTS) + ("mxint8",)


def mx_format(name: str) -> Format:
  """The MX element format `name` (one of `MX_FORMATS`) with scaling ``"mx"``, B = 32."""
  if name == "mxint8":
    values, bits = np.arange(-128, 128) / 64.0, 8
  elif name in _FLOAT_ELEMENTS:
    dtype, bits = _FLOAT_ELEMENTS[name]
    decoded = np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)
    values = np.unique(decoded[np.isfinite(decoded)])
  else:
    raise ValueError(f"{name=} is not one of {MX_FORMATS}")
  return Format(values, bits, name, scaling="mx", block_size=MX_BLOCK, scale_dtype="e8m0",
                ties_to_even=True)


def nvfp4() -> Format:
  """NVIDIA's NVFP4: E2M1 elements in blocks of 16, each block with a float8 E4M3 scale that
  is itself relative to one float32 scale per tensor (absmax scaling onto 6, elements
  rounded to nearest-even and saturated).

  With `QuantSpec("nvfp4")` the recipe is jaxquant's float8 storage (`jaxquant.scaling`):
  block scales s_b = amax_b / 6, the per-tensor factor f = max_b(s_b)·(1/448) (so the largest
  block scale is stored as 448), stored e4m3(s_b·(1/f)), decoded e4m3·f, and elements
  x·(1/(e4m3·f)) rounded to nearest-even. NVIDIA's reference computes the factor as
  amax/(6·448) and divides instead of multiplying by the reciprocal, which can differ in the
  last bit of the factor, and so in a few rounded elements.
  """
  decoded = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
  return Format(np.unique(decoded), 4, "nvfp4", scaling="absmax", block_size=NVFP4_BLOCK,
                scale_dtype="float8_e4m3fn", ties_to_even=True)

