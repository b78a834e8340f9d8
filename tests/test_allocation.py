"""Bit allocation: exact budgets, the Lagrange optimum against brute force, heuristic and rules."""

import itertools
import re

import jax
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.eval import allocation, fisher

PATHS = [f"t{i}" for i in range(7)]


def random_problem(rng, spread, equal_sizes=False):
  offsets = {path: float(spread * rng.standard_normal()) for path in PATHS}
  sizes = {path: 4096 if equal_sizes else int(rng.integers(1, 10**6)) for path in PATHS}
  return offsets, sizes


def predicted_loss(offsets, sizes, bits):
  """Σ_t N_t f̄_t σ_t² 2^(−2b_t), with f̄_t σ_t² = 4^δ_t for the Fisher offsets δ_t."""
  return sum(sizes[t] * 4.0 ** (offsets[t] - bits[t]) for t in offsets)


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_fractional_allocation_has_the_exact_mean_and_one_constant(spread):
  """Narrow offsets at 4 bits clip nothing; wide ones clip at both ends."""
  rng = np.random.default_rng(0)
  clipped = set()
  for _ in range(20):
    offsets, sizes = random_problem(rng, spread)
    for target in (2.0, 2.25, 3.0, 4.0, 5.5, 7.9, 8.0):
      bits = allocation.distribute(offsets, sizes, target, integer=False)
      assert list(bits) == PATHS
      assert abs(allocation.mean_bits(bits, sizes) - target) < 1e-12
      free = [t for t in PATHS if 2 < bits[t] < 8]
      clipped |= {(target == 4.0, bits[t]) for t in PATHS if t not in free}
      constants = [bits[t] - offsets[t] for t in free]
      assert max(constants, default=0) - min(constants, default=0) < 1e-12
      for s, t in itertools.combinations(PATHS, 2):  # clipping keeps the order of the offsets
        assert (bits[s] - bits[t]) * (offsets[s] - offsets[t]) >= 0
  if spread < 1:
    assert not any(at_four for at_four, _ in clipped)
  else:
    assert {(True, 2.0), (True, 8.0)} <= clipped


def test_flat_allocation_is_the_target_everywhere():
  sizes = {"a": 3, "b": 10**6}
  assert allocation.distribute({"a": 0.0, "b": 0.0}, sizes, 3.3, integer=False) == {
      "a": pytest.approx(3.3, abs=1e-12), "b": pytest.approx(3.3, abs=1e-12)}


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_integer_allocation_rounds_within_the_budget_and_fills_it(spread):
  rng = np.random.default_rng(1)
  for _ in range(20):
    offsets, sizes = random_problem(rng, spread)
    for target in (2.0, 2.5, 3.7, 4.0, 6.1, 8.0):
      fractional = allocation.distribute(offsets, sizes, target, integer=False)
      bits = allocation.distribute(offsets, sizes, target, integer=True)
      assert all(type(b) is int and 2 <= b <= 8 for b in bits.values())
      assert all(np.floor(fractional[t]) <= bits[t] <= np.ceil(fractional[t]) for t in PATHS)
      spare = target * sum(sizes.values()) - sum(sizes[t] * bits[t] for t in PATHS)
      assert spare >= 0
      # Maximal: no tensor still at the floor of a fractional solution fits one more bit.
      assert all(sizes[t] > spare for t in PATHS if bits[t] < fractional[t])


def test_integer_allocation_hits_an_achievable_target_exactly():
  rng = np.random.default_rng(2)
  paths = [f"t{i}" for i in range(8)]
  for _ in range(20):
    offsets = {path: float(2 * rng.standard_normal()) for path in paths}
    for target in (2.375, 4.0, 5.125):  # 19, 32 and 41 bits for eight tensors
      bits = allocation.distribute(offsets, dict.fromkeys(paths, 4096), target, integer=True)
      assert sum(bits.values()) == target * len(paths)


def test_integer_ties_are_broken_by_path():
  offsets = dict.fromkeys(["c", "a", "d", "b"], 0.0)
  bits = allocation.distribute(offsets, dict.fromkeys(offsets, 1), 3.5, integer=True)
  assert bits == {"c": 3, "a": 4, "d": 3, "b": 4}


def test_fisher_allocation_minimises_the_predicted_kl():
  """Against every integer allocation of four tensors within the budget (brute force)."""
  rng = np.random.default_rng(3)
  paths = PATHS[:4]
  for trial in range(40):
    rms = {t: float(np.exp(rng.normal(-3, 0.5))) for t in paths}
    means = {t: float(np.exp(rng.normal(-8, 2.0))) for t in paths}
    offsets = allocation.fisher_offsets(rms, means)
    for t in paths:
      assert 4.0 ** offsets[t] == pytest.approx(means[t] * rms[t] ** 2)
    equal = trial % 2 == 0
    sizes = {t: 512 if equal else int(rng.integers(1, 1000)) for t in paths}
    target = float(np.round(rng.uniform(2.5, 7.5) * 4) / 4)
    fractional = allocation.distribute(offsets, sizes, target, integer=False)
    # Lagrange: N f̄ σ² 2^(−2b) ∝ N, i.e. f̄ σ² 4^(−b) = λ for unclipped tensors; tensors at
    # 2 bits would rather give bits away (≤ λ), tensors at 8 bits take more (≥ λ).
    marginal = {t: 4.0 ** (offsets[t] - fractional[t]) for t in paths}
    free = [t for t in paths if 2 < fractional[t] < 8]
    lam = marginal[free[0]]
    for t in paths:
      if t in free:
        assert marginal[t] == pytest.approx(lam, rel=1e-9)
      elif fractional[t] == 2:
        assert marginal[t] <= lam * (1 + 1e-9)
      else:
        assert marginal[t] >= lam * (1 - 1e-9)
    budget = target * sum(sizes.values())
    feasible = [dict(zip(paths, b)) for b in itertools.product(range(2, 9), repeat=4)
                if sum(sizes[t] * bt for t, bt in zip(paths, b)) <= budget]
    best = min(predicted_loss(offsets, sizes, b) for b in feasible)
    # The fractional optimum bounds every integer allocation from below.
    assert predicted_loss(offsets, sizes, fractional) <= best * (1 + 1e-12)
    if equal:  # with equal sizes, rounding by fractional parts is the integer optimum
      bits = allocation.distribute(offsets, sizes, target, integer=True)
      assert predicted_loss(offsets, sizes, bits) == pytest.approx(best, rel=1e-12)


# ------------------------------------------------------------------- heuristic and rules

LAYER_PATHS = (["embed"] + [f"layers/{i}/{name}" for i in (11, 3, 0, 10, 1, 2)
                            for name in ("attention/q", "mlp/up")] + ["lm_head", "norm"])


def test_heuristic_boosts_embed_head_and_the_first_and_last_two_layers():
  boosted = allocation.boosted_layers(LAYER_PATHS)
  layers = {int(re.match(r"layers/(\d+)", p).group(1)) for p in boosted if "layers" in p}
  assert layers == {0, 1, 10, 11}  # numeric order: layer 2 is not among the last two
  assert {"embed", "lm_head"} <= set(boosted) and "norm" not in boosted
  assert boosted == [p for p in LAYER_PATHS if p in boosted]
  assert allocation.boosted_layers(LAYER_PATHS, n_first=0, n_last=1, names=()) == [
      "layers/11/attention/q", "layers/11/mlp/up"]
  assert allocation.boosted_layers(LAYER_PATHS, n_first=1, n_last=0, names=()) == [
      "layers/0/attention/q", "layers/0/mlp/up"]
  offsets = allocation.heuristic_offsets(LAYER_PATHS, boosted)
  assert offsets == {p: 2.0 if p in boosted else 0.0 for p in LAYER_PATHS}
  bits = allocation.distribute(offsets, dict.fromkeys(LAYER_PATHS, 100), 4.0, integer=False)
  assert bits["embed"] - bits["norm"] == pytest.approx(2.0)
  assert allocation.mean_bits(bits, dict.fromkeys(LAYER_PATHS, 100)) == pytest.approx(4.0)


def test_allocation_rules_match_only_their_own_path():
  paths = ["layers/1/mlp", "layers/10/mlp", "a.b", "axb", "x+"]
  bits = dict(zip(paths, [3, 4, 5, 6, 7]))
  rules = allocation.allocation_rules(
      bits, lambda path, b: None if path == "x+" else jq.QuantSpec(f"int{b}"))
  assert [rule.spec for rule in rules] == [jq.QuantSpec(f"int{b}") for b in (3, 4, 5, 6)] + [None]
  for rule, own in zip(rules, paths):
    assert [p for p in paths + ["layers/1/mlp/up", "xx"] if rule.matches(p)] == [own]


class TinyLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(13, 16, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(3)])

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.embed.attend(x)


def test_a_fisher_allocation_quantises_the_model_layer_by_layer():
  """Fisher → offsets → integer bits → rules → `quantise_model`, with every rule used."""
  model, ids = TinyLM(nnx.Rngs(0)), jax.random.randint(jax.random.key(0), (2, 9), 0, 13)
  means = fisher.by_layer(fisher.tensor_means(
      fisher.diagonal_fisher(model, [ids] * 4, key=jax.random.key(1))))
  weights = fisher.by_layer(fisher.params_by_path(model))
  assert set(means) == set(weights) == {"embed", "layers/0", "layers/1", "layers/2"}
  rms = {p: float(np.sqrt(np.mean(np.square(w)))) for p, w in weights.items()}
  sizes = {p: w.size for p, w in weights.items()}
  bits = allocation.distribute(allocation.fisher_offsets(rms, means), sizes, 4.0,
                               integer=True, min_bits=3, max_bits=6)
  rules = allocation.allocation_rules(
      bits, lambda path, b: jq.QuantSpec(f"int{b}", block_size="channel"))
  assert all(3 <= b <= 6 for b in bits.values()) and len(set(bits.values())) > 1
  model = jq.nnx.quantise_model(model, rules)  # an unused rule would warn: warnings are errors
  assert model.embed.embedding.get_value().bits == bits["embed"]
  for i, layer in enumerate(model.layers):
    assert layer.kernel.get_value().bits == bits[f"layers/{i}"]


# ------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("offsets, sizes, target, kwargs, error, message", [
    ({"a": 0.0}, {"a": 1}, 1.5, {}, ValueError, "average_bits=1.5 must lie in"),
    ({"a": 0.0}, {"a": 1}, 8.5, {}, ValueError, "average_bits=8.5"),
    ({"a": 0.0}, {"b": 1}, 4.0, {}, ValueError, r"only in offsets: \['a'\]"),
    ({}, {}, 4.0, {}, ValueError, "offsets is empty"),
    ({"a": 0.0}, {"a": 0}, 4.0, {}, ValueError, "sizes must be finite and > 0"),
    ({"a": float("nan")}, {"a": 1}, 4.0, {}, ValueError, "offsets must be finite"),
    ({"a": 0.0}, {"a": 1}, 4.0, {"min_bits": 2.5}, ValueError, "min_bits=2.5"),
    ({"a": 0.0}, {"a": 1}, 4.0, {"integer": 1}, TypeError, "integer=1 must be a bool"),
])
def test_distribute_rejects_bad_arguments(offsets, sizes, target, kwargs, error, message):
  with pytest.raises(error, match=message):
    allocation.distribute(offsets, sizes, target, **({"integer": True} | kwargs))


@pytest.mark.parametrize("kwargs, error, message", [
    # An infinite bound once gave a mean of 2 bits for a target of 4 without a word.
    ({"max_bits": float("inf")}, ValueError, "max_bits=inf must be a finite number >= 2"),
    ({"min_bits": -float("inf")}, ValueError, "min_bits=-inf must be a finite number >= 0"),
    ({"min_bits": float("nan")}, ValueError, "min_bits=nan"),  # once blamed average_bits
    ({"min_bits": 5, "max_bits": 3}, ValueError, "max_bits=3 must be a finite number >= 5"),
    ({"average_bits": float("nan")}, ValueError, "average_bits=nan must be a finite number"),
    ({"average_bits": "4"}, TypeError, "average_bits='4'"),
])
def test_distribute_refuses_bits_that_are_not_sane_numbers(kwargs, error, message):
  arguments = {"average_bits": 4.0, "integer": False} | kwargs
  with pytest.raises(error, match=message):
    allocation.distribute({"a": 0.0, "b": 1.0}, {"a": 1, "b": 1}, **arguments)


@pytest.mark.parametrize("call, error, message", [
    # A NaN boost once gave NaN offsets; NaN bits or empty or zero sizes a NaN mean.
    (lambda: allocation.heuristic_offsets(["a"], ["a"], float("nan")), ValueError, "boost=nan"),
    (lambda: allocation.heuristic_offsets(["a"], ["a"], "2"), TypeError, "boost='2'"),
    (lambda: allocation.mean_bits({"a": float("nan")}, {"a": 3}), ValueError,
     "bits must be finite"),
    (lambda: allocation.mean_bits({"a": 4}, {"a": 0}), ValueError, "sizes must be finite and > 0"),
    (lambda: allocation.mean_bits({}, {}), ValueError, "bits is empty"),
])
def test_offsets_and_mean_bits_refuse_numbers_that_are_not_sane(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_offsets_and_rules_reject_bad_arguments():
  with pytest.raises(ValueError, match="fisher_means must be finite and > 0"):
    allocation.fisher_offsets({"a": 1.0}, {"a": 0.0})
  with pytest.raises(ValueError, match=r"only in rms: \[\], only in fisher_means: \['b'\]"):
    allocation.fisher_offsets({"a": 1.0}, {"a": 1.0, "b": 1.0})
  with pytest.raises(ValueError, match=r"boosted paths \['c'\] are not among paths"):
    allocation.heuristic_offsets(["a", "b"], ["c"])
  with pytest.raises(ValueError, match="n_last=-1 must be an int >= 0"):
    allocation.boosted_layers(["a"], n_last=-1)
  with pytest.raises(TypeError, match="spec_for=.* must be callable"):
    allocation.allocation_rules({"a": 4}, "int4")
