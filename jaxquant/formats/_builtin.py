"""Fixed codebooks: integer grids, ExMy floating point, NF4, SF4 and uniform grids."""

from __future__ import annotations

import numpy as np

from jaxquant import _arguments
from jaxquant.formats._format import Format, check_bits, format_number

# QLoRA's NormalFloat4 (Dettmers et al. 2023, bitsandbytes `create_normal_map`), as published.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' offset: the mean of 1 - 1/32 and 1 - 1/30 (the quantiles kept off the tails).
_NORMAL_FLOAT_OFFSET = 0.9677083


def int_format(bits: int, symmetric: bool = False) -> Format:
  """An integer grid: the uniform format.

  Asymmetric (default): the two's-complement integers -2^(b-1) … 2^(b-1) - 1 (INT4 is -8..7,
  so absmax maps a block's max onto 7 and signmax onto -8). Symmetric: the half-integers
  ±0.5 … ±(2^(b-1) - 0.5), which have no zero but use every code symmetrically.

  Args:
    bits: code width, 2..8.
    symmetric: half-integer grid instead of two's complement.

  Returns:
    The `Format` named ``int{bits}`` or ``int{bits}-sym``.

  Example:
    >>> int_format(3).values.tolist()
    [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
  """
  bits = check_bits(bits)
  half = 2 ** (bits - 1)
  if symmetric:
    return Format(np.arange(-half, half) + 0.5, bits, f"int{bits}-sym")
  return Format(np.arange(-half, half), bits, f"int{bits}")


def uint_format(bits: int) -> Format:
  """The unsigned integers 0 … 2^b - 1, for the asymmetric min/max scaling (w = s·q + o, as
  llama.cpp's Q4_1 and K types store blocks).

  Example:
    >>> uint_format(2).values.tolist()
    [0.0, 1.0, 2.0, 3.0]
  """
  bits = check_bits(bits)
  return Format(np.arange(2**bits), bits, f"uint{bits}", scaling="minmax")


def fp_format(exponent_bits: int, mantissa_bits: int) -> Format:
  """A sign + ExMy floating-point format with subnormals and no reserved specials.

  With bias β = 2^(E-1) - 1 (the OCP convention, so E2M1 is ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}):
  exponent field e = 0 gives subnormals 2^(1-β)·m/2^M, e ≥ 1 gives 2^(e-β)·(1 + m/2^M). Every
  bit pattern is a number (the paper's convention); +0 and -0 coincide, so the codebook has
  2^b - 1 distinct values.

  Args:
    exponent_bits: E ≥ 1.
    mantissa_bits: M ≥ 0, with 1 + E + M in 2..8.

  Returns:
    The `Format` named ``e{E}m{M}``.

  Raises:
    TypeError: `exponent_bits` or `mantissa_bits` is not an int.
    ValueError: E < 1, M < 0, or 1 + E + M outside 2..8.

  Example:
    >>> fp_format(2, 1).values[7:].tolist()
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
  """
  exponent_bits = _arguments.integer("exponent_bits", exponent_bits, low=1)
  mantissa_bits = _arguments.integer("mantissa_bits", mantissa_bits, low=0)
  bits = check_bits(1 + exponent_bits + mantissa_bits)
  bias = 2 ** (exponent_bits - 1) - 1
  mantissa = np.arange(2**mantissa_bits) / 2**mantissa_bits
  magnitudes = [2.0 ** (1 - bias) * mantissa]
  magnitudes += [2.0 ** (e - bias) * (1 + mantissa) for e in range(1, 2**exponent_bits)]
  positive = np.concatenate(magnitudes)
  values = np.unique(np.concatenate([-positive, positive]))
  return Format(values, bits, f"e{exponent_bits}m{mantissa_bits}")


def nf4() -> Format:
  """QLoRA's NormalFloat4: 16 quantiles of N(0, 1), 7 negative, zero, 8 positive, ±1 exact.

  References: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023).
  """
  return Format(np.array(_NF4), 4, "nf4")


def sf4() -> Format:
  """Student Float 4: NF4's construction with Student-t (ν = 5) quantiles.

  Positive codepoints t₅⁻¹(linspace(δ, ½, 9)[:-1]), negative ones -t₅⁻¹(linspace(δ, ½, 8)[:-1]),
  plus zero, divided by the largest, with bitsandbytes' δ = 0.9677083.

  References: Dotzel et al., "Learning from Students: Applying t-Distributions to Explore
  Accurate and Efficient Formats for LLMs" (ICML 2024).
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel

  positive = stats.t.ppf(np.linspace(_NORMAL_FLOAT_OFFSET, 0.5, 9)[:-1], 5)
  negative = -stats.t.ppf(np.linspace(_NORMAL_FLOAT_OFFSET, 0.5, 8)[:-1], 5)
  values = np.sort(np.concatenate([negative, [0.0], positive]))
  return Format(values / values[-1], 4, "sf4")


def uniform_grid(n: int, max_value: float = 1.0) -> Format:
  """`n` equally spaced points spanning [-max_value, max_value].

  With odd `n` zero is exact; this is the grid that entropy coding makes optimal at high rate.

  Args:
    n: number of points, 2..256.
    max_value: the largest point (> 0).

  Returns:
    The `Format` named ``grid{n}-max{max_value}``, with ceil(log2 n) bits.

  Raises:
    TypeError: `n` is not an int or `max_value` not a real number.
    ValueError: `n` is outside 2..256 or `max_value` is not a finite number > 0.
  """
  n = _arguments.integer("n", n, low=2, high=256)
  max_value = _arguments.real("max_value", max_value, low=0.0, low_open=True)
  bits = max(1, int(np.ceil(np.log2(n))))
  values = np.linspace(-max_value, max_value, n)
  if n % 2:
    values[n // 2] = 0.0
  return Format(values, bits, f"grid{n}-max{format_number(max_value)}")
