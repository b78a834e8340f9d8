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

LoRA adapters (`jaxquant.lora`) go on weights whose every use is a contraction over the same
axes (`adapter_site`), shaped for those axes; `merged` folds them back in.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxquant import gptq
from jaxquant.calibration import SecondMoment
from jaxquant.contraction import is_weight
from jaxquant.formats import lut_format
from jaxquant.interception import Use
from jaxquant.lora import LoRAWeight
from jaxquant.nn.rules import Rule, assign
from jaxquant.outliers import OutlierQuantisedArray, OutlierSpec, quantise_with_outliers
from jaxquant.qarray import QuantisedArray, QuantSpec, as_spec, quantise
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


def block_size_of(spec) -> int | str:
  """The block size (or granularity) of a `QuantSpec`, format (name) or `OutlierSpec`."""
  return (spec if isinstance(spec, OutlierSpec) else as_spec(spec)).block_size


def prepare(value, spec: QuantSpec | OutlierSpec, axis: int, mode: str,
            calibration: Calibrated | None = None):
  """The weight for a float `value`: packed (``"ptq"``; by GPTQ with `calibration`, else by
  rounding to nearest; with sparse outliers for an `OutlierSpec`) or a `FakeQuantised` master
  weight (``"qat"``), blocks along `axis` whatever `spec.axis` says."""
  value = jnp.asarray(value)
  if isinstance(spec, OutlierSpec):
    if mode != "ptq" or calibration is not None:
      raise ValueError("an OutlierSpec packs weights by rounding to nearest (mode='ptq', no "
                       "GPTQ calibration); QAT and GPTQ take a QuantSpec")
    return quantise_with_outliers(value, spec.along(axis))
  spec = dataclasses.replace(as_spec(spec), axis=axis)
  if calibration is not None:
    if mode != "ptq":
      raise ValueError("GPTQ (a calibration) packs weights once, mode='ptq'; QAT weights "
                       "train through round-to-nearest")
    return gptq.quantise(value, calibration.hessian, spec, damping=calibration.damping,
                         act_order=calibration.act_order)
  return quantise(value, spec) if mode == "ptq" else FakeQuantised(value, spec)


@dataclasses.dataclass(frozen=True)
class AdapterSite:
  """A weight that LoRA adapters could go on (`jaxquant.lora`): its path and shape, the axes
  its contractions contract and keep as batch axes, or why it cannot take them (`refusal`)."""

  path: str
  shape: tuple[int, ...]
  contracting: tuple[int, ...] = ()
  batch: tuple[int, ...] = ()
  refusal: str | None = None


def adapter_site(path: str, shape: Sequence[int], uses: Sequence[Use]) -> AdapterSite:
  """The `AdapterSite` of a weight with `uses`: adapters need every use to be a contraction
  over the same axes."""
  shape = tuple(shape)
  kinds = {(use.kind, tuple(sorted(use.axes)), tuple(sorted(use.batch)), use.operation)
           for use in uses}
  kind, axes, batch, _ = next(iter(kinds))
  if len(kinds) == 1 and kind == "contract":
    return AdapterSite(path, shape, axes, batch)
  described = sorted(f"{k} {operation or axes}" for k, axes, _, operation in kinds)
  return AdapterSite(path, shape, refusal=(
      f"{path} (shape {shape}) is used as {', '.join(described)}; adapters take a weight that "
      "is only contracted, always over the same axes"))


def select_sites(rules, sites: Sequence[AdapterSite]) -> list[AdapterSite]:
  """The sites whose parameter or module path a regex of `rules` fully matches.

  Raises:
    TypeError: `rules` is not a regex or a non-empty sequence of them.
    ValueError: none matches, or a matched site cannot take adapters (the message names it).

  Warns:
    UserWarning: naming the patterns that matched no site.
  """
  patterns = (rules,) if isinstance(rules, str) else tuple(rules)
  if not patterns or not all(isinstance(pattern, str) for pattern in patterns):
    raise TypeError(f"rules={rules!r} must be a regex or a non-empty sequence of regexes over "
                    "weight and module paths")
  checked = [Rule(pattern, None) for pattern in patterns]
  matches = lambda rule, site: rule.matches(site.path) or rule.matches(site.path.rpartition("/")[0])
  selected = [site for site in sites if any(matches(rule, site) for rule in checked)]
  if not selected:
    raise ValueError(f"rules={list(patterns)} match no weight that can take adapters; those "
                     f"are {[site.path for site in sites]}")
  unused = [rule.pattern for rule in checked if not any(matches(rule, s) for s in selected)]
  if unused:
    warnings.warn(f"rules that matched no weight: {unused}", stacklevel=3)
  refusals = [site.refusal for site in selected if site.refusal is not None]
  if refusals:
    raise ValueError("rules select weights that cannot take adapters:\n" + "\n".join(
        f"  - {refusal}" for refusal in refusals))
  return selected


def spec_of(q: QuantisedArray | OutlierQuantisedArray) -> QuantSpec | OutlierSpec:
  """The `QuantSpec` that packs like `q`, as far as `q` records it: its codebook (distinct
  values), block size or granularity, axis and scale storage, with absmax scaling, signmax
  when its scales carry signs (int8 double-quantisation codes, or a negative scale), or
  minmax when it has offsets; for an `OutlierQuantisedArray`, the `OutlierSpec` of its dense
  part's spec with its share of outliers. How the
  scales were chosen is not recorded (a `QuantisedArray` keeps no scaling name): an rms base,
  or one quantised with a scale search, needs the rules it was quantised with."""
  if isinstance(q, OutlierQuantisedArray):
    return OutlierSpec(spec_of(q.dense), q.n_outliers / q.size)
  values = np.unique(np.asarray(q.codebook, np.float64))
  signed = q.scales.dtype == jnp.int8 or bool(jnp.any(q.decoded_scales() < 0))
  chosen = "minmax" if q.offsets is not None else "signmax" if signed else "absmax"
  double_quant = q.scales.dtype in (jnp.uint8, jnp.int8)
  return QuantSpec(lut_format(values, q.bits), axis=q.axis,
                   block_size=q.block_size if q.granularity == "block" else q.granularity,
                   scaling=chosen, double_quant=double_quant,
                   scale_dtype=None if double_quant else q.scales.dtype)


def merge_specs(rules, adapted: Mapping[str, LoRAWeight]) -> dict[str, QuantSpec]:
  """The `QuantSpec` each packed base of `adapted` (name → weight) is packed again with when
  its adapters are merged: the one `rules` give it, else `spec_of` the base."""
  packed = [name for name, weight in adapted.items() if is_weight(weight.base)]
  specs, _ = assign(rules, [(name, name.rpartition("/")[0]) for name in packed], warn=False)
  return {name: specs.get(name) or spec_of(adapted[name].base) for name in packed}


def merged(weight: LoRAWeight, spec: QuantSpec | None,
           calibration: Calibrated | None = None):
  """W + (α/r)·A·B for an adapted weight: the float sum for a float base; for a packed one,
  the sum packed again along the base's axis with `spec` (by GPTQ with `calibration`)."""
  total = weight.dequantise(jnp.float32)
  if not is_weight(weight.base):
    return total.astype(weight.dtype)
  return prepare(total, spec, weight.base.axis, "ptq", calibration)

