"""Which parameters of a traced model are weights, and the axis to quantise each one along.

`jaxquant.interception.discover` reports how a model uses each float parameter (`Use`). A
parameter is a *weight* when something contracts it or gathers from it. Its blocks run along
one contracted axis of its first contraction (Orr et al. 2025 block along the contraction),
never along an axis that a gather indexes, so an embedding table [vocabulary, features] used
as ``table[ids]`` and as a tied head ``x @ table.T`` is blocked along its features, and both
uses read packed codes. Of those axes it takes the one whose blocks need the least padding
(an axis shorter than the block is padded to a whole block), then the longest. Any other use (``w * 2``, ``jnp.sum(w**2)``, a
reshape, a loop over a stacked weight) cannot be served from packed codes: a rule that asks for
such a weight to be quantised is refused with the weight's path and the operation.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from jaxquant import gptq
from jaxquant.calibration import SecondMoment
from jaxquant.interception import Use
from jaxquant.qarray import QuantSpec, as_spec, quantise
from jaxquant.qat import FakeQuantised

MODES = ("ptq", "qat")


@dataclasses.dataclass(frozen=True)
class Weight:
  """A weight found by tracing: its path, shape, uses and the axis its blocks run along.

  `refusal` is None when it can be quantised, else why not.
  """

  path: str
  shape: tuple[int, ...]
  uses: tuple[Use, ...]
  axis: int | None
  refusal: str | None


def is_weight_use(uses: Sequence[Use]) -> bool:
  """Whether a parameter with these uses is a weight (contracted or gathered from)."""
  return any(use.kind in ("contract", "gather") for use in uses)


def block_axis(shape: Sequence[int], choices: Sequence[int], block_size: int | str) -> int:
  """Of the axes `choices`, the one whose blocks need the least padding, then the longest."""
  def stored(n):  # codes stored along the axis: whole blocks, then whole 32-code groups
    blocks = -(-n // block_size) * block_size if isinstance(block_size, int) else n
    return -(-blocks // 32) * 32
  return min(choices, key=lambda a: (stored(shape[a]) / shape[a], -shape[a], -a))


def classify(path: str, shape: Sequence[int], uses: Sequence[Use],
             block_size: int | str = 64) -> Weight:
  """The `Weight` for a parameter with `uses` and blocks of `block_size` (module docstring)."""
  shape = tuple(shape)
  others = sorted({use.operation for use in uses if use.kind == "other"})
  if others:
    return Weight(path, shape, tuple(uses), None,
                  f"{path} (shape {shape}) is also used by {', '.join(others)}, which packed "
                  "codes cannot serve")
  indexed = {a for use in uses if use.kind == "gather" for a in use.axes}
  contracted = next((use.axes for use in uses if use.kind == "contract"), ())
  choices = [a for a in contracted if a not in indexed] or [
      a for a in range(len(shape)) if a not in indexed]
  if not choices:
    return Weight(path, shape, tuple(uses), None,
                  f"{path} (shape {shape}) is gathered along every axis")
  return Weight(path, shape, tuple(uses), block_axis(shape, choices, block_size), None)


def refused(weights: Sequence[Weight]) -> ValueError:
  """The error for weights a rule selected that cannot be quantised."""
  lines = "\n".join(f"  - {weight.refusal}" for weight in weights)
  paths = ", ".join(repr(weight.path) for weight in weights)
  return ValueError(
      f"rules select weights that cannot be quantised:\n{lines}\n"
      f"keep them in float with a rule before the others, e.g. Rule({paths.split(', ')[0]}, "
      "None)")


@dataclasses.dataclass(frozen=True)
class Calibrated:
  """GPTQ's inputs for one weight: its second moment and `jaxquant.gptq.quantise`'s options."""

  hessian: SecondMoment
  damping: float = 0.01
  act_order: bool = False


def calibrated(paths: Sequence[str], calibration: Mapping[str, SecondMoment] | None, *,
               damping: float, act_order: bool) -> dict[str, Calibrated]:
  """The `Calibrated` of each weight in `paths` that `calibration` has a second moment for;
  warns (`UserWarning`) naming the weights it lacks, which round to nearest."""
  if calibration is None:
    return {}
  lacking = [path for path in paths if path not in calibration]
  if lacking:
    warnings.warn(f"calibration has no second moment for {lacking}: they round to nearest "
                  "(no contraction reached them during calibration, or they were not "
                  "selected then)", stacklevel=3)
  return {path: Calibrated(calibration[path], damping, act_order) for path in paths
          if path in calibration}


def prepare(value, spec: QuantSpec, axis: int, mode: str, calibration: Calibrated | None = None):
  """The weight for a float `value`: packed (``"ptq"``; by GPTQ with `calibration`, else by
  rounding to nearest) or a `FakeQuantised` master weight (``"qat"``), blocks along `axis`
  whatever `spec.axis` says."""
  spec = dataclasses.replace(as_spec(spec), axis=axis)
  value = jnp.asarray(value)
  if calibration is not None:
    if mode != "ptq":
      raise ValueError("GPTQ (a calibration) packs weights once, mode='ptq'; QAT weights "
                       "train through round-to-nearest")
    return gptq.quantise(value, calibration.hessian, spec, damping=calibration.damping,
                         act_order=calibration.act_order)
  return quantise(value, spec) if mode == "ptq" else FakeQuantised(value, spec)
