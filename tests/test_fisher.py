"""The diagonal Fisher of a causal LM and its KL prediction, against brute force.

A tiny NNX language model (435 parameters, an 11-token vocabulary) is small enough to take the
gradient of every log-probability of every position and label (`jax.jacrev`), which gives the
exact true and empirical Fisher without the Rademacher trick; the predicted KL is checked
against the KL of perturbed models computed in float64 from their logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.eval import fisher as fisher_lib

VOCAB, FEATURES, HIDDEN = 11, 8, 12


class TinyLM(nnx.Module):
  """Logits at t from the embeddings of tokens t and t − 1 (causal, with real context)."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, FEATURES, rngs=rngs)
    self.hidden = nnx.Linear(2 * FEATURES, HIDDEN, rngs=rngs)
    self.head = nnx.Linear(HIDDEN, VOCAB, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return self.head(jnp.tanh(self.hidden(jnp.concatenate([x, previous], axis=-1))))


def tiny_model() -> TinyLM:
  model = TinyLM(nnx.Rngs(0))
  # Peaked predictions that disagree with the random data: the true and empirical Fisher differ.
  model.head.kernel.set_value(4.0 * model.head.kernel[...])
  return model


IDS = jax.random.randint(jax.random.key(1), (4, 7), 0, VOCAB)


@functools.cache
def brute_force_fisher(ids_bytes: bytes, shape: tuple[int, int]):
  """(true, empirical) Fisher per token from per-(position, label) gradients by `jacrev`."""
  ids = jnp.asarray(np.frombuffer(ids_bytes, np.int32).reshape(shape))
  graphdef, params = nnx.split(tiny_model())

  def log_probs(params):
    return jax.nn.log_softmax(nnx.merge(graphdef, params)(ids)[:, :-1], axis=-1)

  p = np.exp(np.asarray(log_probs(params), np.float64))  # [B, T − 1, V]
  data = np.asarray(ids[:, 1:])
  n_tokens = data.size
  true, empirical = {}, {}
  for path, jac in nnx.to_flat_state(jax.jacrev(log_probs)(params)):
    key = "/".join(str(part) for part in path)
    g = np.asarray(jac.get_value(), np.float64)  # [B, T − 1, V, *param_shape]
    g = g.reshape(g.shape[:3] + (-1,))
    true[key] = np.einsum("btv,btvi->i", p, g**2) / n_tokens
    picked = np.take_along_axis(g, data[:, :, None, None], axis=2)[:, :, 0]
    empirical[key] = np.sum(picked**2, axis=(0, 1)) / n_tokens
  return true, empirical


def reference(ids, labels):
  ids = np.asarray(ids, np.int32)
  true, empirical = brute_force_fisher(ids.tobytes(), ids.shape)
  return true if labels == "sampled" else empirical


def flat(fisher):
  return {path: np.asarray(values, np.float64).reshape(-1) for path, values in fisher.items()}


def test_the_true_and_empirical_fisher_of_the_test_model_differ():
  """Otherwise the convergence tests below could not tell the label modes apart."""
  true, empirical = reference(IDS, "sampled"), reference(IDS, "data")
  ratios = [np.mean(empirical[path]) / np.mean(true[path]) for path in true]
  assert max(abs(ratio - 1) for ratio in ratios) > 0.3


def test_one_predicted_token_per_batch_gives_the_exact_empirical_fisher():
  """With one token per batch the sign squares away: the estimate is exact, not random."""
  windows = np.lib.stride_tricks.sliding_window_view(np.asarray(IDS), 2, axis=1).reshape(-1, 2)
  fisher = fisher_lib.diagonal_fisher(tiny_model(), [w[None] for w in windows],
                                      key=jax.random.key(0), labels="data")
  exact = reference(windows, "data")
  assert set(fisher) == set(exact)
  for path, values in flat(fisher).items():
    np.testing.assert_allclose(values, exact[path], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("labels", ["sampled", "data"])
def test_the_estimate_converges_to_the_brute_force_fisher(labels):
  """Unbiased over many batches of 24 tokens; the relative error per element is ≈ √(2/M)."""
  n_batches = 1000
  fisher = fisher_lib.diagonal_fisher(tiny_model(), [IDS] * n_batches, key=jax.random.key(2),
                                      labels=labels)
  exact = reference(IDS, labels)
  means = fisher_lib.tensor_means(fisher)
  for path, values in flat(fisher).items():
    assert fisher[path].dtype == jnp.float32
    assert means[path] == pytest.approx(np.mean(exact[path]), rel=0.1)
    # √(2/M) ≈ 0.045 per element.
    assert np.linalg.norm(values - exact[path]) / np.linalg.norm(exact[path]) < 0.15


def test_a_filter_restricts_the_parameters_and_keeps_their_values():
  batches, key = [IDS] * 3, jax.random.key(3)
  full = fisher_lib.diagonal_fisher(tiny_model(), batches, key=key)
  head = fisher_lib.diagonal_fisher(tiny_model(), batches, key=key,
                                    wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
  assert set(head) == {"head/bias", "head/kernel"}
  for path, values in head.items():
    np.testing.assert_allclose(values, full[path], rtol=1e-5)


def test_tensor_means_and_layer_paths():
  fisher = {"embed/embedding": jnp.arange(6.0).reshape(2, 3), "head/bias": jnp.ones(2),
            "head/kernel": jnp.full((3, 2), 0.5)}
  means = fisher_lib.tensor_means(fisher)
  assert means == {"embed/embedding": 2.5, "head/bias": 1.0, "head/kernel": 0.5}
  assert fisher_lib.by_layer(means) == {"embed": 2.5, "head": 0.5}
  assert fisher_lib.by_layer(means, names=("bias",)) == {"head": 1.0}
  params = fisher_lib.params_by_path(tiny_model())
  assert set(params) == {"embed/embedding", "hidden/kernel", "hidden/bias", "head/kernel",
                         "head/bias"}
  assert params["hidden/kernel"].shape == (2 * FEATURES, HIDDEN)


# ------------------------------------------------------------------- the predicted KL


def shifted_logits(model, deltas, ids):
  """The logits [B, T − 1, V] of `model` with every parameter p moved to p + deltas[p]."""
  twin = nnx.clone(model)
  state = nnx.state(twin, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(variable.get_value() + deltas["/".join(str(part) for part in path)])
  nnx.update(twin, state)
  return twin(ids)[:, :-1]


def mean_kl_float64(p_logits, q_logits) -> float:
  """The mean over positions of Σ_y p(y) (log p(y) − log q(y)), in float64."""
  log_softmax = lambda x: x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
  log_p = log_softmax(np.asarray(p_logits, np.float64))
  log_q = log_softmax(np.asarray(q_logits, np.float64))
  return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def random_deltas(params, rng, relative=1e-3):
  """Independent normal changes of std `relative` × the RMS of each tensor."""
  return {path: jnp.asarray(relative * np.sqrt(np.mean(np.square(w)))
                            * rng.standard_normal(w.shape), jnp.float32)
          for path, w in params.items()}


@pytest.fixture(scope="module")
def kl_draws():
  """(measured KL, KL at twice the change, deltas) over 40 random weight changes."""
  model, rng = tiny_model(), np.random.default_rng(0)
  params, reference_logits = fisher_lib.params_by_path(model), model(IDS)[:, :-1]
  draws = []
  for _ in range(40):
    deltas = random_deltas(params, rng)
    doubled = {path: 2 * delta for path, delta in deltas.items()}
    draws.append((mean_kl_float64(reference_logits, shifted_logits(model, deltas, IDS)),
                  mean_kl_float64(reference_logits, shifted_logits(model, doubled, IDS)),
                  deltas))
  return draws


def test_the_predicted_kl_matches_the_measured_kl(kl_draws):
  """E_δ KL(p_θ ‖ p_θ+δ) = ½ Σᵢ Fᵢᵢ E δᵢ² to second order: the off-diagonal terms average out."""
  fisher = fisher_lib.diagonal_fisher(tiny_model(), [IDS] * 1000, key=jax.random.key(4))
  means = fisher_lib.tensor_means(fisher)
  measured = np.mean([kl for kl, _, _ in kl_draws])
  for form in (fisher, means):
    predicted = np.mean([fisher_lib.predicted_kl(form, deltas) for _, _, deltas in kl_draws])
    assert predicted == pytest.approx(measured, rel=0.15)


def test_the_kl_is_quadratic_in_the_weight_change(kl_draws):
  for kl, kl_doubled, _ in kl_draws:
    assert kl > 0
    assert kl_doubled / kl == pytest.approx(4.0, rel=0.02)


def test_predicted_kl_in_closed_form():
  deltas = {"a": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([[3.0]])}
  assert fisher_lib.predicted_kl({"a": 0.5, "b": 2.0}, deltas) == pytest.approx(
      0.5 * (0.5 * 5.0 + 2.0 * 9.0))
  elementwise = {"a": jnp.asarray([1.0, 0.25]), "b": jnp.asarray([[2.0]])}
  assert fisher_lib.predicted_kl(elementwise, deltas) == pytest.approx(
      0.5 * (1.0 + 0.25 * 4.0 + 2.0 * 9.0))


# ------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("kwargs, error, message", [
    ({"labels": "empirical"}, ValueError, "labels="),
    ({"key": None}, ValueError, "key is required"),
    ({"key": 0}, TypeError, "key must be"),
    ({"key": jax.random.split(jax.random.key(0))}, TypeError, "key must be"),
    ({"wrt": nnx.BatchStat}, ValueError, "wrt="),
])
def test_diagonal_fisher_rejects_bad_arguments(kwargs, error, message):
  arguments = {"key": jax.random.key(0)} | kwargs
  with pytest.raises(error, match=message):
    fisher_lib.diagonal_fisher(tiny_model(), [IDS], **arguments)


@pytest.mark.parametrize("batches, message", [
    ([], "batches is empty"),
    ([IDS.astype(jnp.float32)], r"batches\[0\] must be int"),
    ([IDS, IDS[0]], r"batches\[1\] must be int"),
    ([IDS[:, :1]], r"batches\[0\] has shape \(4, 1\)"),
    ([IDS[:0]], r"batches\[0\] has shape \(0, 7\)"),
])
def test_diagonal_fisher_rejects_bad_batches(batches, message):
  with pytest.raises(ValueError, match=message):
    fisher_lib.diagonal_fisher(tiny_model(), batches, key=jax.random.key(0))


def test_predicted_kl_rejects_mismatched_tensors():
  deltas = {"a": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"only in fisher: \['b'\], only in deltas: \[\]"):
    fisher_lib.predicted_kl({"a": 1.0, "b": 1.0}, deltas)
  with pytest.raises(ValueError, match=r"fisher\['a'\] has shape \(2,\)"):
    fisher_lib.predicted_kl({"a": jnp.ones(2)}, deltas)


@pytest.mark.parametrize("fisher, deltas, message", [
    # Each once gave a negative or NaN predicted KL.
    ({"a": -1.0}, {"a": jnp.ones(3)}, r"fisher\['a'\] must be finite and >= 0"),
    ({"a": float("nan")}, {"a": jnp.ones(3)}, r"fisher\['a'\] must be finite"),
    ({"a": jnp.array([1.0, jnp.inf, 1.0])}, {"a": jnp.ones(3)}, r"fisher\['a'\] must be finite"),
    ({"a": 1.0}, {"a": jnp.array([1.0, jnp.nan, 1.0])}, r"deltas\['a'\] must be finite"),
])
def test_predicted_kl_refuses_a_fisher_or_delta_that_is_not_sane(fisher, deltas, message):
  with pytest.raises(ValueError, match=message):
    fisher_lib.predicted_kl(fisher, deltas)
