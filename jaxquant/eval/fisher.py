"""Diagonal Fisher information of a causal language model, and the KL divergence it predicts.

For next-token distributions p_θ(y | context) the Fisher information is

  F = E_context E_{y∼p_θ}[∇_θ log p_θ(y | context) ∇_θ log p_θ(y | context)ᵀ],

and to second order a small change δ of the weights costs KL(p_θ ‖ p_{θ+δ}) ≈ ½ δᵀ F δ
(Martens 2020, "New insights and perspectives on the natural gradient method"). Keeping the
diagonal gives ½ Σᵢ Fᵢᵢ δᵢ²; the optimal-formats paper (Orr et al. 2025, §5) goes one step
further and keeps only each tensor's mean f̄_t, which is what its bit allocation
(`jaxquant.eval.allocation`) needs.

The Fisher here is normalised per predicted token (a mean over the positions), so the KL it
predicts is the mean next-token KL. Parameters are keyed by their '/'-joined module path
(``"layers/0/mlp/up/kernel"``); `by_layer` maps them to the layer paths that `jaxquant.Rule`
patterns match (``"layers/0/mlp/up"``).

Typical use:

  fisher = diagonal_fisher(model, batches, key=jax.random.key(0))
  kernels = {p: w for p, w in params_by_path(model).items() if p.endswith("/kernel")}
  deltas = {p: jq.dequantise(jq.quantise(w, spec)) - w for p, w in kernels.items()}
  kl = predicted_kl({p: fisher[p] for p in deltas}, deltas)  # or tensor_means(...)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.nn.nnx import _path_string

LABELS = ("sampled", "data")
# The weight of each layer jaxquant quantises: Linear/Einsum kernels and Embed tables.
WEIGHT_NAMES = ("kernel", "embedding")


def params_by_path(model: nnx.Module, wrt=nnx.Param) -> dict[str, jax.Array]:
  """The model's variables matching the filter `wrt`, keyed by '/'-joined path.

  The keys are those of `diagonal_fisher`'s result, so the two line up in `predicted_kl` and,
  through `by_layer`, in `jaxquant.eval.allocation`.
  """
  return {_path_string(path): variable.get_value()
          for path, variable in nnx.to_flat_state(nnx.state(model, wrt))}


def _check_key(key) -> None:
  if key is None:
    raise ValueError("key is required: the Rademacher signs (and sampled labels) are random")
  typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
  if not ((typed and key.shape == ()) or raw):
    raise TypeError(f"key must be a single PRNG key from jax.random.key, got {key!r}")


def _check_batch(index: int, ids) -> jax.Array:
  ids = jnp.asarray(ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"batches[{index}] must be int token ids [batch, length], got "
                     f"{ids.dtype} {ids.shape}")
  if ids.shape[0] < 1 or ids.shape[1] < 2:
    raise ValueError(f"batches[{index}] has shape {ids.shape}: it needs a sequence of "
                     "at least 2 tokens (position t predicts token t + 1)")
  return ids


@functools.partial(jax.jit, static_argnames=("graphdef", "sampled"), donate_argnames="total")
def _accumulate(graphdef, params, rest, total, ids, key, sampled: bool):
  """total + (∇ Σ_t ε_t log p(y_t))² over one batch, with random signs ε_t = ±1."""
  key_labels, key_signs = jax.random.split(key)

  def signed_log_likelihood(params):
    logits = nnx.merge(graphdef, params, rest)(ids)[:, :-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = (jax.random.categorical(key_labels, jax.lax.stop_gradient(log_probs))
              if sampled else ids[:, 1:].astype(jnp.int32))
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    signs = jax.random.rademacher(key_signs, picked.shape, dtype=jnp.float32)
    return jnp.sum(signs * picked)

  grads = jax.grad(signed_log_likelihood)(params)
  return jax.tree.map(lambda s, g: s + jnp.square(g.astype(jnp.float32)), total, grads)


def diagonal_fisher(model: nnx.Module, batches: Iterable, *, key: jax.Array,
                    labels: str = "sampled", wrt=nnx.Param) -> dict[str, jax.Array]:
  """The diagonal Fisher information per predicted token of a causal language model.

  Fᵢᵢ = 1/n Σ_tokens E_y[(∂ log p_θ(y | context)/∂θᵢ)²] over the n predicted tokens of
  `batches` (the positions 0..T−2 of every sequence; position t predicts token t + 1), with
  y drawn from the model's own prediction (``labels="sampled"``: the true Fisher, one sample per
  token, as in Orr et al. 2025, §5) or y the next data token (``labels="data"``: the empirical
  Fisher; Martens 2020 on the difference).

  Per-token gradients would cost one backward pass per token, so each batch takes a single
  gradient g = Σ_t ε_t ∇ log p(y_t) with independent Rademacher signs ε_t = ±1: since
  E[ε_s ε_t] = δ_st, E_ε[gᵢ²] = Σ_t (∂ log p(y_t)/∂θᵢ)² exactly (Hutchinson 1990), so the
  squared gradient is an unbiased estimate of the per-token sum, in both label modes. The
  signs alone leave a relative standard error per element of at most √(2/M) over M batches of
  similar size, whatever the batch size: many small batches estimate better than few large.

  Args:
    model: an NNX module mapping int ids [batch, length] to logits [batch, length, vocab],
      causal; called as it is (put dropout and the like in evaluation mode first).
    batches: an iterable of int arrays [batch, length], length ≥ 2; shapes may differ.
    key: a PRNG key (`jax.random.key`); batch m uses ``fold_in(key, m)``.
    labels: ``"sampled"`` or ``"data"``.
    wrt: an `nnx` filter choosing the parameters (default every `nnx.Param`).

  Returns:
    Fᵢᵢ per parameter: float32 arrays shaped like the parameters, keyed by '/'-joined path
    (``"layers/0/mlp/up/kernel"``).

  Raises:
    ValueError: bad `labels`, no `key`, a malformed batch, no batches, or no parameters.
    TypeError: `key` is not a PRNG key.
  """
  if labels not in LABELS:
    raise ValueError(f"{labels=} is not one of {LABELS}")
  _check_key(key)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"{wrt=} matches no parameter of the model")
  total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  n_tokens = 0
  for index, ids in enumerate(batches):
    ids = _check_batch(index, ids)
    total = _accumulate(graphdef, params, rest, total, ids, jax.random.fold_in(key, index),
                        labels == "sampled")
    n_tokens += ids.shape[0] * (ids.shape[1] - 1)
  if not n_tokens:
    raise ValueError("batches is empty")
  return {_path_string(path): variable.get_value() / n_tokens
          for path, variable in nnx.to_flat_state(total)}


def tensor_means(fisher: Mapping[str, jax.Array]) -> dict[str, float]:
  """f̄_t = (1/N_t) Σ_{i∈t} Fᵢᵢ, the mean Fisher of each tensor t (Orr et al. 2025, §5)."""
  return {path: float(jnp.mean(jnp.asarray(values, jnp.float32)))
          for path, values in fisher.items()}


def by_layer(values: Mapping, names: Iterable[str] = WEIGHT_NAMES) -> dict:
  """The entries of `values` whose path ends in one of `names`, keyed by their layer's path.

  ``"layers/0/mlp/up/kernel"`` becomes ``"layers/0/mlp/up"`` and ``"embed/embedding"``
  becomes ``"embed"``: the paths `jaxquant.Rule` patterns match. Other entries (biases, norm
  scales) are left out.

  Example:
    >>> by_layer({"embed/embedding": 1.0, "mlp/up/kernel": 2.0, "mlp/up/bias": 3.0})
    {'embed': 1.0, 'mlp/up': 2.0}
  """
  names, layers = tuple(names), {}
  for path, value in values.items():
    layer, _, name = path.rpartition("/")
    if layer and name in names:
      layers[layer] = value
  return layers


def predicted_kl(fisher: Mapping, deltas: Mapping[str, jax.Array]) -> float:
  """The second-order prediction of the mean next-token KL: ½ Σ_t Σ_{i∈t} F_ti δθ_ti².

  δθ_t is the change of tensor t (quantised − float weights). Each Fisher entry is either a
  tensor's mean f̄_t (from `tensor_means`), giving ½ Σ_t f̄_t ‖δθ_t‖², the form the paper's
  bit allocation rests on (Orr et al. 2025, §5), or the per-element Fᵢᵢ shaped like δθ_t (from
  `diagonal_fisher`), giving ½ Σᵢ Fᵢᵢ δθᵢ², the diagonal of ½ δθᵀ F δθ (Martens 2020). The two
  agree in expectation when the errors within a tensor are independent of the Fisher. It is a
  prediction: the paper finds it 0.22–1.04× the measured KL per tensor on Llama-3.2-1B and up to
  1800× too high on Gemma-3-12B (§5).

  Args:
    fisher: per tensor, a scalar f̄_t or an array Fᵢᵢ, keyed like `deltas`.
    deltas: per tensor, the weight change δθ_t.

  Returns:
    The predicted KL divergence in nats (a float).

  Raises:
    ValueError: the keys differ, an array Fisher entry is not shaped like its δθ_t, a Fisher
      entry is negative or not finite, or a δθ_t is not finite (its ½ Σ F δθ² is not).
  """
  if set(fisher) != set(deltas):
    raise ValueError(f"fisher and deltas must have the same keys; only in fisher: "
                     f"{sorted(set(fisher) - set(deltas))}, only in deltas: "
                     f"{sorted(set(deltas) - set(fisher))}")
  total = 0.0
  for path, delta in deltas.items():
    f, delta = jnp.asarray(fisher[path], jnp.float32), jnp.asarray(delta, jnp.float32)
    if f.ndim and f.shape != delta.shape:
      raise ValueError(f"fisher[{path!r}] has shape {f.shape} but deltas[{path!r}] has shape "
                       f"{delta.shape}")
    if not bool(jnp.all(jnp.isfinite(f) & (f >= 0))):
      raise ValueError(f"fisher[{path!r}] must be finite and >= 0 (a diagonal Fisher)")
    term = 0.5 * float(jnp.sum(f * jnp.square(delta)))
    if not math.isfinite(term):
      raise ValueError(f"deltas[{path!r}] must be finite: its ½ Σ F δθ² is {term}")
    total += term
  return total
