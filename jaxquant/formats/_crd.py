"""Cube-root-density (CRD) formats: codepoints placed by Panter–Dite's p(x)^(1/3) rule."""

from __future__ import annotations

import numpy as np

from jaxquant import _arguments, distributions
from jaxquant.formats._format import Format, check_bits, check_scaling, format_number

FAMILIES = ("normal", "laplace", "t")


def _family_distribution(family: str, df):
  if family not in FAMILIES:
    raise ValueError(f"{family=} is not one of {FAMILIES}")
  if family != "t":
    if df is not None:
      raise ValueError(f"{df=} is only meaningful for family='t'")
    return distributions.Normal() if family == "normal" else distributions.Laplace()
  if df is None:
    raise ValueError("df must be given for family='t' (a number > 2)")
  # The cube-root density of a Student-t needs ν > 2.
  return distributions.StudentT(_arguments.real("df", df, low=2.0, low_open=True))


def cdf_positions(n: int, scaling: str, symmetric: bool) -> np.ndarray:
  """Where the n codepoints sit in the CDF u ∈ [0, 1] of the (truncated) cube-root density.

  The grid is split into the halves [0, ½] and [½, 1], each with n/2 points, and each of the
  endpoints 0, ½, 1 is kept or left out (Orr et al. 2025, §3):

  - symmetric rms: u = i/(n+1), no endpoint, no zero;
  - symmetric absmax: u = linspace(0, 1, n), so ±1 are exact;
  - asymmetric rms: ½ kept on the negative half: n/2 - 1 negatives, zero, n/2 positives;
  - asymmetric absmax: 0, ½ and 1 kept: -1, n/2 - 2 negatives, zero, n/2 - 1 positives, +1;
  - asymmetric signmax: ½ and 1 kept, u = k/n: n/2 - 1 negatives, zero, n/2 - 1 positives, +1
    (no -1: signmax scaling maps every block's extreme onto +1, freeing a code).
  """
  half = n // 2
  if symmetric:
    if scaling == "signmax":
      raise ValueError(
          "scaling='signmax' needs an asymmetric codebook (symmetric=False): signmax maps the "
          "block extreme onto +1 only, so a symmetric table would waste its -1 code")
    if scaling == "rms":
      return np.arange(1, n + 1) / (n + 1)
    return np.linspace(0.0, 1.0, n)
  if scaling == "rms":
    negative = 0.5 * np.arange(1, half + 1) / half
    positive = 0.5 + 0.5 * np.arange(1, half + 1) / (half + 1)
  elif scaling == "absmax":
    negative = 0.5 * np.arange(half) / (half - 1)
    positive = 0.5 + 0.5 * np.arange(1, half + 1) / half
  else:
    return np.arange(1, n + 1) / n
  return np.concatenate([negative, positive])


def crd_name(family, bits, *, scaling, block_size, symmetric, df) -> str:
  label = f"t{format_number(df)}" if family == "t" else family
  mode = "sym" if symmetric else "asym"
  suffix = "" if scaling == "rms" else f"-B{block_size}"
  return f"crd-{label}-{scaling}-{mode}-{bits}b{suffix}"


def crd_format(family: str, bits: int, *, scaling: str = "absmax", block_size: int = 64,
               symmetric: bool | None = None, df: float | None = None) -> Format:
  """A cube-root-density format for Normal, Laplace or Student-t weights.

  Panter & Dite (1951): a fixed-length quantiser of data with density p has, at high
  resolution, mean squared error (1/12N²)(∫p^(1/3))³ when its codepoint density is
  λ(x) ∝ p(x)^(1/3), and no density does better. For these families p^(1/3) stays in the
  family: N(0, σ²) → N(0, 3σ²); Laplace(b) → Laplace(3b); t(ν, s) → t((ν-2)/3, s·√(3ν/(ν-2))).

  - ``scaling="rms"``: data of unit RMS; codepoints are quantiles of the untruncated
    cube-root density.
  - ``scaling="absmax"``/``"signmax"``: blocks of `block_size` divided by their (signed)
    absolute maximum. The scaled values follow the density truncated to [-1, 1] at the
    expected block maximum (Normal √(2 ln(B/π)), Laplace γ + ln B, the t formula), plus atoms
    at the ends; ±1 (signmax: +1) are codepoints exactly and the others are equally spaced in
    the CDF of the truncated, rescaled cube-root density (see `cdf_positions`).

  Args:
    family: ``"normal"``, ``"laplace"`` or ``"t"``.
    bits: code width, 2..8.
    scaling: ``"absmax"``, ``"signmax"`` or ``"rms"``.
    block_size: block size B ≥ 4 the format is designed for (absmax/signmax only).
    symmetric: symmetric table (no zero) or asymmetric (exact zero). Default: symmetric for
      rms and absmax, asymmetric for signmax (the only mode signmax allows).
    df: Student-t degrees of freedom ν > 2 (family "t" only).

  Returns:
    A `Format` named like ``crd-t7-absmax-sym-4b-B64`` that records its scaling and block size.

  Raises:
    ValueError: a bad `family`, `bits`, `scaling` or mode; `df` given for a family other than
      "t", or missing or not a finite number > 2 for "t"; `block_size` below the family's
      minimum (4; 2 for Laplace).
    TypeError: `bits`, `df` or `block_size` of the wrong type.

  Example:
    >>> fmt = crd_format("normal", 3, scaling="absmax", block_size=64, symmetric=False)
    >>> print(" ".join(f"{v:.4f}" for v in fmt.values))
    -1.0000 -0.5477 -0.2540 0.0000 0.1887 0.3923 0.6361 1.0000

  References:
    Panter & Dite, "Quantization distortion in pulse-count modulation with nonuniform spacing
    of levels" (1951); Orr, Ribar & Luschi, "Optimal Formats for Weight Quantisation" (2025).
  """
  bits = check_bits(bits)
  check_scaling(scaling)
  data = _family_distribution(family, df)
  if symmetric is None:
    symmetric = scaling != "signmax"
  u = cdf_positions(2**bits, scaling, bool(symmetric))
  if scaling == "rms":
    density = data.with_unit_rms().cube_root()
    block_size = None
  else:
    block_size = _arguments.integer("block_size", block_size)
    spread = data.expected_absmax(block_size)
    density = distributions.Truncated(data.cube_root().scaled(1.0 / spread), -1.0, 1.0)
  values = np.asarray(density.ppf(u.astype(np.float32)), dtype=np.float64)
  values[u == 0.5] = 0.0
  if symmetric:
    values = (values - values[::-1]) / 2  # exactly antisymmetric
  name = crd_name(family, bits, scaling=scaling, block_size=block_size,
                  symmetric=bool(symmetric), df=df)
  return Format(values, bits, name, scaling=scaling, block_size=block_size)
