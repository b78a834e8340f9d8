"""Rules: which layers to quantise, and how, chosen by regexes over module paths.

A path is the '/'-joined names from the model's root to a layer (``"layers/0/mlp/up"``). The
first rule whose `pattern` fully matches a layer's path decides for it (as in qwix): its `spec`
quantises the layer, or keeps it in float when the spec is None. Layers no rule matches stay in
float. Rules that match no layer are reported, because a mistyped pattern must never silently
leave a model in float.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence

from jaxquant.qarray import QuantSpec


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantise the layers whose path fully matches `pattern` with `spec` (None: keep float).

  The quantisation axis is the layer's own (a kernel's contraction axis, an embedding's
  feature axis), whatever `spec.axis` says.

  Example:
    >>> import jaxquant as jq
    >>> rules = [jq.Rule(r".*head", None), jq.Rule(r".*", jq.QuantSpec("nf4"))]
  """

  pattern: str
  spec: QuantSpec | None

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise TypeError(f"pattern={self.pattern!r} must be a regex string")
    try:
      re.compile(self.pattern)
    except re.error as error:
      raise ValueError(f"pattern={self.pattern!r} is not a valid regex: {error}") from None
    if self.spec is not None and not isinstance(self.spec, QuantSpec):
      raise TypeError(f"spec must be a QuantSpec or None, got {type(self.spec).__name__}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


def check_rules(rules) -> tuple[Rule, ...]:
  if isinstance(rules, Rule):
    rules = (rules,)
  rules = tuple(rules)
  if not all(isinstance(rule, Rule) for rule in rules):
    raise TypeError("rules must be a sequence of jaxquant.Rule")
  return rules


def first_match(rules: Sequence[Rule], path: str) -> int | None:
  """Index of the first rule matching `path`, or None."""
  return next((i for i, rule in enumerate(rules) if rule.matches(path)), None)


def assign(rules: Sequence[Rule], paths: Iterable[str], *, warn: bool = True
           ) -> tuple[dict[str, QuantSpec], list[Rule]]:
  """The spec for each path a rule quantises, and the rules that matched no path.

  With `warn`, a `UserWarning` names every unused rule.
  """
  rules = check_rules(rules)
  used = [False] * len(rules)
  specs = {}
  for path in paths:
    index = first_match(rules, path)
    if index is None:
      continue
    used[index] = True
    if rules[index].spec is not None:
      specs[path] = rules[index].spec
  unused = [rule for rule, hit in zip(rules, used) if not hit]
  if warn and unused:
    warnings.warn(f"rules that matched no layer: {[rule.pattern for rule in unused]}",
                  stacklevel=3)
  return specs, unused
