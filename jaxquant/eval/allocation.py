"""Bits per tensor from the Fisher information: variable bit allocation (Orr et al. 2025, §5).

A tensor t of N_t weights with RMS σ_t quantised at b_t bits has a relative error
R_t ≈ ε_t 2^(−b_t), so its weight changes have ‖δθ_t‖² ≈ N_t σ_t² ε_t² 2^(−2b_t) and by the
Fisher prediction (`jaxquant.eval.fisher.predicted_kl`) the model loses

  KL ≈ ½ Σ_t N_t f̄_t σ_t² ε_t² 2^(−2b_t),

with f̄_t the tensor's mean diagonal Fisher. Minimising this subject to a budget
Σ_t N_t b_t = b̄ Σ_t N_t, the Lagrange condition N_t f̄_t σ_t² 2^(−2b_t) ∝ N_t gives

  b_t = c + δ_t,   δ_t = log2 σ_t + ½ log2 f̄_t,

one constant c for all tensors (`fisher_offsets`, then `distribute`). The paper drops the
format's ε_t, which varies far less across tensors than σ_t and f̄_t. Its baseline heuristic
instead gives 2 more bits to the embedding, the head and the first and last two layers
(`boosted_layers`, `heuristic_offsets`); a flat allocation has every δ_t = 0.

Typical use, with `fisher` from `jaxquant.eval.fisher.diagonal_fisher`:

  weights = by_layer(params_by_path(model))
  rms = {path: float(jnp.sqrt(jnp.mean(jnp.square(w)))) for path, w in weights.items()}
  sizes = {path: w.size for path, w in weights.items()}
  offsets = fisher_offsets(rms, by_layer(tensor_means(fisher)))
  bits = distribute(offsets, sizes, 4.0, integer=True)
  rules = allocation_rules(bits, lambda path, b: jq.QuantSpec(f"int{b}"))
  quantised = jq.nnx.quantise_model(model, rules)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from jaxquant import _arguments
from jaxquant.nn.rules import Rule
from jaxquant.qarray import QuantSpec

# The paper's heuristic: +2 bits for these layers.
HEURISTIC_BOOST = 2.0
_LAYER_INDEX = re.compile(r"(?:^|/)layers/(\d+)(?:/|$)")


def _check_same_keys(first: Mapping, second: Mapping, names: str) -> None:
  if set(first) != set(second):
    a, b = names.split(", ")
    raise ValueError(f"{names} must have the same keys; only in {a}: "
                     f"{sorted(set(first) - set(second))}, only in {b}: "
                     f"{sorted(set(second) - set(first))}")


def _finite(values: Mapping, name: str, *, positive: bool = False) -> None:
  bad = {k: v for k, v in values.items() if not (math.isfinite(v) and (v > 0 or not positive))}
  if bad:
    raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}; got {bad}")


def fisher_offsets(rms: Mapping[str, float], fisher_means: Mapping[str, float]
                   ) -> dict[str, float]:
  """δ_t = log2 RMS_t + ½ log2 f̄_t, the Fisher bit offsets (Orr et al. 2025, §5).

  With b_t = c + δ_t the tensors' shares of the KL, N_t f̄_t σ_t² 2^(−2b_t), are in proportion
  to their sizes N_t: the optimum of the Fisher-predicted KL for a fixed total of bits.

  Args:
    rms: per tensor, the RMS of its weights σ_t.
    fisher_means: per tensor, its mean diagonal Fisher f̄_t (`fisher.tensor_means`), same keys.

  Raises:
    ValueError: the keys differ or a value is not finite and positive.
  """
  _check_same_keys(rms, fisher_means, "rms, fisher_means")
  _finite(rms, "rms", positive=True)
  _finite(fisher_means, "fisher_means", positive=True)
  return {path: math.log2(rms[path]) + 0.5 * math.log2(fisher_means[path]) for path in rms}


def boosted_layers(paths: Iterable[str], n_first: int = 2, n_last: int = 2,
                   names: Iterable[str] = ("embed", "head")) -> list[str]:
  """The paths the paper's heuristic boosts (Orr et al. 2025, §5), in their given order.

  Those of the first `n_first` and last `n_last` layers, a layer's index being the integer
  after ``layers/`` (first and last among the indices in `paths`), and those containing any of
  `names` (the embedding ``embed_tokens`` and the head ``lm_head`` in the paper's models).

  Example:
    >>> paths = ["embed"] + [f"layers/{i}/mlp/up" for i in range(6)]
    >>> boosted_layers(paths)
    ['embed', 'layers/0/mlp/up', 'layers/1/mlp/up', 'layers/4/mlp/up', 'layers/5/mlp/up']

  Raises:
    ValueError: `n_first` or `n_last` is below 0.
    TypeError: `n_first` or `n_last` is not an int.
  """
  n_first = _arguments.integer("n_first", n_first, low=0)
  n_last = _arguments.integer("n_last", n_last, low=0)
  paths, names = list(paths), tuple(names)
  index = {path: int(match.group(1)) for path in paths
           if (match := _LAYER_INDEX.search(path))}
  order = sorted(set(index.values()))
  ends = set(order[:n_first]) | set(order[len(order) - n_last:])
  return [path for path in paths
          if index.get(path) in ends or any(name in path for name in names)]


def heuristic_offsets(paths: Iterable[str], boosted: Iterable[str],
                      boost: float = HEURISTIC_BOOST) -> dict[str, float]:
  """δ_t = `boost` (2 bits in the paper) for the `boosted` paths, 0 for the others.

  Orr et al. 2025, §5, boosting `boosted_layers(paths)`.

  Raises:
    ValueError: a boosted path is not among `paths`, or `boost` is not finite.
    TypeError: `boost` is not a real number.
  """
  boost = _arguments.real("boost", boost)
  paths, boosted = list(paths), set(boosted)
  if not boosted <= set(paths):
    raise ValueError(f"boosted paths {sorted(boosted - set(paths))} are not among paths")
  return {path: boost if path in boosted else 0.0 for path in paths}


def mean_bits(bits: Mapping[str, float], sizes: Mapping[str, int]) -> float:
  """Σ_t N_t b_t / Σ_t N_t, the bits per parameter of an allocation (float64).

  Raises:
    ValueError: the keys differ, no tensors, a size not a finite number > 0, or a bits value
      not finite.
  """
  _check_same_keys(bits, sizes, "bits, sizes")
  if not bits:
    raise ValueError("bits is empty")
  _finite(sizes, "sizes", positive=True)
  _finite(bits, "bits")
  n = np.asarray([sizes[path] for path in bits], np.float64)
  b = np.asarray([bits[path] for path in bits], np.float64)
  return float(np.sum(n * b) / np.sum(n))


def _solve_constant(offsets: np.ndarray, sizes: np.ndarray, average_bits: float, low: float,
                    high: float) -> float:
  """The c with Σ N_t clip(c + δ_t, low, high) = b̄ Σ N_t, solved on its linear piece.

  The weighted mean m(c) is continuous, non-decreasing and linear between the breakpoints
  c = low − δ_t and c = high − δ_t, so the solution lies on the first piece whose right end
  reaches b̄; there, with U the unclipped tensors, c = (b̄ ΣN − Σ_clipped N b − Σ_U N δ) / Σ_U N.
  """
  total = np.sum(sizes)
  breaks = np.unique(np.concatenate([low - offsets, high - offsets]))
  means = np.sum(sizes * np.clip(breaks[:, None] + offsets, low, high), axis=1) / total
  # means[k - 1] < b̄ <= means[k]; the clamp only guards against rounding in means[-1] = high.
  k = min(int(np.searchsorted(means, average_bits)), len(breaks) - 1)
  if k == 0:
    return float(breaks[0])
  middle = 0.5 * (breaks[k - 1] + breaks[k])
  free = (middle + offsets > low) & (middle + offsets < high)
  clipped = np.sum(np.where(free, 0.0, sizes * np.clip(middle + offsets, low, high)))
  return float((average_bits * total - clipped - np.sum(sizes[free] * offsets[free]))
               / np.sum(sizes[free]))


def _round_down(bits: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
  """Floors, then +1 bit for the largest fractional parts that still fit in `budget`."""
  floors = np.floor(bits)
  fractions = bits - floors
  spare = budget - float(np.sum(sizes * floors))
  for t in sorted(np.flatnonzero(fractions > 0), key=lambda t: -fractions[t]):
    if sizes[t] <= spare:
      floors[t] += 1
      spare -= sizes[t]
  return floors


def distribute(offsets: Mapping[str, float], sizes: Mapping[str, int], average_bits: float, *,
               integer: bool, min_bits: float = 2, max_bits: float = 8) -> dict:
  """Bits per tensor b_t = clip(c + δ_t, min_bits, max_bits) at a mean of `average_bits`.

  The single constant c makes the parameter-weighted mean Σ_t N_t b_t / Σ_t N_t equal
  b̄ = `average_bits` exactly (to float64 rounding): the clipped mean is piecewise linear and
  non-decreasing in c, so c is solved on its linear piece, not searched to a tolerance. The
  paper (Orr et al. 2025, §5) uses b_t = b̄ + δ_t − Σ N δ / Σ N and a floor, which is this
  when no tensor is clipped.

  With `integer`, each b_t is the floor or the ceiling of that fractional solution: starting
  from the floors, the tensors in order of decreasing fractional part (ties by path) are raised
  by one bit when that keeps Σ N_t b_t within the budget b̄ Σ N_t. The mean is then ≤ b̄, and
  no tensor left at its floor (with a fractional part) could be raised within the budget; it
  equals b̄ when the sizes are equal and b̄ times their count is an integer. Hitting b̄ as
  closely as possible in general is a subset-sum problem and is not attempted.

  Args:
    offsets: δ_t per tensor (`fisher_offsets`, `heuristic_offsets`, or all 0 for flat).
    sizes: N_t per tensor, the same keys.
    average_bits: the target mean b̄, within [min_bits, max_bits].
    integer: round to integer bits (fixed-length formats) or keep them fractional
      (compressed formats).
    min_bits, max_bits: the clip range, finite with 0 ≤ `min_bits` ≤ `max_bits`; integers
      when `integer`. The paper floors at 2 bits, 3 for floating-point formats.

  Returns:
    b_t per tensor in the order of `offsets`: ints when `integer`, else floats.

  Raises:
    ValueError: the keys differ, no tensors, a size ≤ 0, an offset not finite, `min_bits` not
      a finite number ≥ 0, `max_bits` not a finite number ≥ `min_bits`, or `average_bits` not
      a finite number between them.
    TypeError: `integer` is not a bool, or a bits argument is not a real number.
  """
  if not isinstance(integer, bool):
    raise TypeError(f"{integer=} must be a bool")
  _check_same_keys(offsets, sizes, "offsets, sizes")
  if not offsets:
    raise ValueError("offsets is empty")
  _finite(sizes, "sizes", positive=True)
  _finite(offsets, "offsets")
  min_bits = _arguments.real("min_bits", min_bits, low=0.0)
  max_bits = _arguments.real("max_bits", max_bits, low=min_bits)
  average_bits = _arguments.real("average_bits", average_bits)
  if integer and not (min_bits.is_integer() and max_bits.is_integer()):
    raise ValueError(f"{min_bits=} and {max_bits=} must be integers when integer=True")
  if not min_bits <= average_bits <= max_bits:
    raise ValueError(f"{average_bits=} must lie in [{min_bits=}, {max_bits=}]")
  paths = list(offsets)
  delta = np.asarray([offsets[path] for path in paths], np.float64)
  n = np.asarray([sizes[path] for path in paths], np.float64)
  c = _solve_constant(delta, n, average_bits, min_bits, max_bits)
  bits = np.clip(c + delta, min_bits, max_bits)
  if not integer:
    return {path: float(b) for path, b in zip(paths, bits)}
  order = np.argsort(paths)  # ties in the rounding are then broken by path
  rounded = np.empty_like(bits)
  rounded[order] = _round_down(bits[order], n[order], average_bits * float(np.sum(n)))
  return {path: int(b) for path, b in zip(paths, rounded)}


def allocation_rules(bits: Mapping[str, float],
                     spec_for: Callable[[str, float], QuantSpec | None]) -> list[Rule]:
  """One `jaxquant.Rule` per path, ``Rule(re.escape(path), spec_for(path, bits[path]))``.

  Each pattern fully matches its own path only, so the rules plug into
  `jaxquant.nnx.quantise_model(model, rules)` in any order.

  Args:
    bits: b_t per layer path (`distribute`).
    spec_for: maps (path, bits) to the `QuantSpec` of that layer, or None to keep it float.
  """
  if not callable(spec_for):
    raise TypeError(f"spec_for={spec_for!r} must be callable")
  return [Rule(re.escape(path), spec_for(path, b)) for path, b in bits.items()]
