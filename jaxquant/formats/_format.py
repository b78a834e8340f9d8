"""The `Format` value: a sorted codebook, its bit width and its name."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxquant import _arguments

SCALINGS = ("absmax", "signmax", "rms")
"""The scalings a codebook can be fitted or designed for."""
BLOCK_SCALINGS = SCALINGS + ("mx", "minmax")
"""Every block scaling: also the OCP MX rule (`jaxquant.formats.mx_format`) and the
asymmetric min/max rule, w ≈ s·v + o (`jaxquant.scaling`)."""
MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits, *, low: int = 2, high: int = MAX_BITS) -> int:
  """Returns `bits` as an int, or raises naming the argument and the allowed range."""
  return _arguments.integer("bits", bits, low=low, high=high)


def check_scaling(scaling) -> str:
  if scaling not in SCALINGS:
    raise ValueError(f"{scaling=} is not one of {SCALINGS}")
  return scaling


def format_number(x: float) -> str:
  """Shortest text that parses back to exactly `x` ('7', '0.5', '-0.6961928009986877')."""
  x = float(x)
  short = f"{x:g}"
  return short if float(short) == x else repr(x)


@dataclasses.dataclass(frozen=True, eq=False)
class Format:
  """A scalar quantisation format: the set of values a scaled element may take.

  Invariants: `values` is a read-only, strictly increasing, finite 1-D float64 array with
  2 ≤ len(values) ≤ 2**bits (a format may use fewer codes than its bits allow, e.g. E2M1
  has 15 distinct values because ±0 coincide); `name` parses back to an equal format with
  `jaxquant.formats.parse`. `scaling`, `block_size` and `scale_dtype` record what the codebook
  was designed for (None: any); `QuantSpec` takes them as defaults and refuses contradictions.

  Attributes:
    values: sorted codepoints, in the format's own units (INT4 is -8..7, NF4 lies in [-1, 1]).
    bits: code width in bits.
    name: canonical name, e.g. ``"nf4"``, ``"int4"``, ``"crd-t7-absmax-sym-4b-B64"``.
    scaling: the block scaling the codebook was designed for, or None.
    block_size: the block size the codebook was designed for, or None.
    scale_dtype: the scale storage the format is defined with (``"e8m0"`` for OCP MX,
      ``"float8_e4m3fn"`` for NVFP4), or None.
    ties_to_even: a value halfway between two codepoints rounds to the one an even number of
      steps from zero (round to nearest-even on an FP or INT element's bit pattern, as OCP MX
      and NVFP4 define); otherwise to the lower one.
  """

  values: np.ndarray
  bits: int
  name: str
  scaling: str | None = None
  block_size: int | None = None
  scale_dtype: str | None = None
  ties_to_even: bool = False

  def __post_init__(self):
    bits = check_bits(self.bits, low=MIN_BITS)
    values = np.array(self.values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"values of format {self.name!r} must be finite")
    if values.size < 2 or values.size > 2**bits:
      raise ValueError(
          f"format {self.name!r} has {values.size} values; a {bits}-bit format needs 2..{2**bits}")
    if np.any(np.diff(values) <= 0):
      raise ValueError(f"values of format {self.name!r} must be strictly increasing")
    if self.scaling is not None and self.scaling not in BLOCK_SCALINGS:
      raise ValueError(f"scaling={self.scaling!r} is not one of {BLOCK_SCALINGS}")
    if self.block_size is not None:
      object.__setattr__(self, "block_size",
                         _arguments.integer("block_size", self.block_size, low=1))
    if not isinstance(self.ties_to_even, bool):
      raise TypeError(f"ties_to_even={self.ties_to_even!r} must be a bool")
    values.setflags(write=False)
    object.__setattr__(self, "values", values)
    object.__setattr__(self, "bits", bits)

  def _key(self):
    return (self.values.tobytes(), self.bits, self.name, self.scaling, self.block_size,
            self.scale_dtype, self.ties_to_even)

  def __eq__(self, other):
    return isinstance(other, Format) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def __repr__(self):
    return f"Format({self.name!r}, bits={self.bits}, n={self.values.size})"

  @property
  def absmax_target(self) -> float:
    """The magnitude absmax scaling maps a block's largest |x| onto: min(|min|, max)."""
    return float(min(-self.values[0], self.values[-1]))

  @property
  def signmax_target(self) -> float:
    """The signed end of larger magnitude (ties go to the positive end), for signmax scaling."""
    low, high = float(self.values[0]), float(self.values[-1])
    return low if -low > high else high

  @property
  def rms_reference(self) -> float:
    """The RMS of data the codebook expects under rms scaling.

    1 for a codebook designed for unit-RMS data; otherwise the RMS of a uniform
    distribution over the codebook's range, max|v|/√3 (the paper's base scale for INT).
    """
    if self.scaling == "rms":
      return 1.0
    return float(np.max(np.abs(self.values))) / math.sqrt(3.0)
