"""Rules: which weights to quantise, and how, chosen by regexes over paths.

A path is the '/'-joined names from the model's root: a module's (``"layers/0/mlp/up"``) or a
parameter's (``"layer_3/attn/qkv_einsum/w"``). A rule matches a weight when its `pattern` fully
matches the weight's parameter path or the path of the module that holds it; the first rule
that matches decides (as in qwix): its `spec` quantises the weight, or keeps it in float when
the spec is None. Weights no rule matches stay in float. Rules that match no weight are
reported, because a mistyped pattern must never silently leave a model in float.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence

from jaxquant.outliers import OutlierSpec
from jaxquant.qarray import QuantSpec


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantise the weights whose path fully matches `pattern` with `spec` (None: keep float).

  `spec` is a `QuantSpec`, or a `jaxquant.outliers.OutlierSpec` to keep the largest
  magnitudes as sparse outliers beside the packed remainder.

  The quantisation axis is the weight's own (a kernel's contraction axis, an embedding's
  feature axis), whatever `spec.axis` says.

  Example:
    >>> import jaxquant as jq
    >>> rules = [jq.Rule(r".*head", None), jq.Rule(r".*", jq.QuantSpec("nf4"))]
  """

  pattern: str
  spec: QuantSpec | OutlierSpec | None

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise TypeError(f"pattern={self.pattern!r} must be a regex string")
    try:
      re.compile(self.pattern)
    except re.error as error:
      raise ValueError(f"pattern={self.pattern!r} is not a valid regex: {error}") from None
    if self.spec is not None and not isinstance(self.spec, (QuantSpec, OutlierSpec)):
      raise TypeError(f"spec must be a QuantSpec, an OutlierSpec or None, got "
                      f"{type(self.spec).__name__}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


def check_rules(rules) -> tuple[Rule, ...]:
  if isinstance(rules, Rule):
    rules = (rules,)
  rules = tuple(rules)
  if not all(isinstance(rule, Rule) for rule in rules):
    raise TypeError("rules must be a sequence of jaxquant.Rule")
  return rules


def assign(rules: Sequence[Rule], paths: Iterable[str | tuple[str, ...]], *, warn: bool = True
           ) -> tuple[dict[str, QuantSpec], list[Rule]]:
  """The spec for each weight a rule quantises, and the rules that matched no weight.

  Args:
    rules: the rules.
    paths: each weight's path, or a tuple of the paths it answers to (its parameter path,
      then its module's path); the result is keyed by the first.
    warn: warn (`UserWarning`) naming every unused rule.
  """
  rules = check_rules(rules)
  used = [False] * len(rules)
  specs = {}
  for names in paths:
    names = (names,) if isinstance(names, str) else tuple(names)
    path = names[0]
    index = next((i for i, rule in enumerate(rules) if any(rule.matches(n) for n in names)),
                 None)
    if index is None:
      continue
    used[index] = True
    if rules[index].spec is not None:
      specs[path] = rules[index].spec
  unused = [rule for rule, hit in zip(rules, used) if not hit]
  if warn and unused:
    warnings.warn(f"rules that matched no weight: {[rule.pattern for rule in unused]}",
                  stacklevel=3)
  return specs, unused
