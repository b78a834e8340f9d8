"""Lloyd–Max against a numpy k-means, Max's published table, and its own guarantees."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import formats

RNG = np.random.default_rng(1)

# Max (1960), "Quantizing for minimum distortion", Table I: optimal 16-level outputs for N(0, 1).
MAX_1960_NORMAL_16 = [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]


def numpy_lloyd(x, w, centroids, iterations):
  """Textbook weighted Lloyd: assign by nearest centroid, move to the weighted mean."""
  for _ in range(iterations):
    nearest = np.abs(x[:, None] - centroids[None, :]).argmin(1)
    for k in range(centroids.size):
      mask = nearest == k
      if w[mask].sum() > 0:
        centroids[k] = np.sum(w[mask] * x[mask]) / np.sum(w[mask])
    centroids = np.sort(centroids)
  return centroids


def mse(x, values, w=None):
  values = np.asarray(values)
  w = np.ones_like(x) if w is None else w
  return np.sum(w * np.min((x[:, None] - values[None, :]) ** 2, axis=1)) / np.sum(w)


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_numpy_kmeans(weighted):
  x = RNG.laplace(size=20000).astype(np.float32)
  w = RNG.uniform(0.1, 2.0, size=x.size).astype(np.float32) if weighted else np.ones_like(x)
  init = np.linspace(x.min(), x.max(), 8).astype(np.float32)
  ours = formats.lloyd_max(x, 3, weights=w if weighted else None, init=init, tol=0.0,
                           max_iters=300)
  reference = numpy_lloyd(x.astype(np.float64), w.astype(np.float64), init.astype(np.float64), 300)
  np.testing.assert_allclose(ours.values, reference, atol=2e-4)
  assert mse(x, ours.values, w) <= mse(x, reference, w) * (1 + 1e-4)


def test_reproduces_max_1960_on_normal_samples():
  x = np.asarray(RNG.standard_normal(4_000_000), np.float32)
  fmt = formats.lloyd_max(x, 4, tol=1e-6)
  # 4·10^6 samples estimate each level to about ±3e-3 (the outer ones are the noisiest).
  np.testing.assert_allclose(fmt.values[8:], MAX_1960_NORMAL_16, atol=6e-3)
  np.testing.assert_allclose(fmt.values[:8], -np.array(MAX_1960_NORMAL_16[::-1]), atol=6e-3)


def test_never_worse_than_its_initialisation():
  x = RNG.standard_t(4, size=50000).astype(np.float32) / 4
  for init in ("uniform", "quantile", formats.crd_format("t", 4, scaling="rms", df=4)):
    start = init.values if isinstance(init, formats.Format) else None
    fmt = formats.lloyd_max(x, 4, init=init)
    if start is not None:
      assert mse(x, fmt.values) <= mse(x, start)
    uniform = np.linspace(x.min(), x.max(), 16)
    assert mse(x, fmt.values) <= mse(x, uniform)


def test_weights_act_like_repeated_samples():
  x = RNG.normal(size=5000).astype(np.float32)
  repeats = RNG.integers(1, 4, size=x.size)
  weighted = formats.lloyd_max(x, 3, weights=repeats.astype(np.float32), tol=0.0, max_iters=200)
  repeated = formats.lloyd_max(np.repeat(x, repeats), 3, tol=0.0, max_iters=200)
  np.testing.assert_allclose(weighted.values, repeated.values, atol=1e-4)


def test_fixed_endpoints_are_held():
  x = np.clip(RNG.normal(size=10000) / 3, -1, 1).astype(np.float32)
  both = formats.lloyd_max(x, 3, fixed_endpoints=True, scaling="absmax", block_size=64)
  assert both.values[0] == -1 and both.values[-1] == 1
  assert both.scaling == "absmax" and both.block_size == 64
  high = formats.lloyd_max(x, 3, fixed_endpoints=(None, 1.0))
  assert high.values[-1] == 1 and high.values[0] > -1


@pytest.mark.parametrize("family, sampler", [
    ("normal", lambda n: RNG.standard_normal(n)),
    ("laplace", lambda n: RNG.laplace(size=n) / np.sqrt(2)),
    ("t", lambda n: RNG.standard_t(5, n) / np.sqrt(5 / 3)),
])
def test_block_absmax_lloyd_max_beats_crd_on_its_own_data(family, sampler):
  x = jnp.asarray(sampler(2**18).reshape(-1, 64), jnp.float32)
  crd = formats.crd_format(family, 4, scaling="absmax", block_size=64,
                           df=5 if family == "t" else None)
  lloyd = jq.fitting.fit_lloyd_max(x, 4, scaling="absmax", block_size=64, init=crd)
  error = lambda fmt: float(jq.metrics.relative_rmse(
      x, jq.quantise(x, jq.QuantSpec(fmt, scale_dtype=jnp.float32)).dequantise()))
  assert lloyd.values[0] == -1 and lloyd.values[-1] == 1
  assert error(lloyd) <= error(crd) + 1e-6


def test_bad_input():
  with pytest.raises(ValueError, match="samples"):
    formats.lloyd_max(np.ones(3), 2)
  with pytest.raises(ValueError, match="finite"):
    formats.lloyd_max(np.array([np.nan] * 10), 2)
  with pytest.raises(ValueError, match="weights"):
    formats.lloyd_max(np.ones(10), 2, weights=-np.ones(10))
  with pytest.raises(ValueError, match="init"):
    formats.lloyd_max(np.ones(10), 2, init="kmeans")
  with pytest.raises(ValueError, match="bits"):
    formats.lloyd_max(np.ones(10), 9)


@pytest.mark.parametrize("scaling", ["rms", "signmax"])
def test_fit_lloyd_max_refuses_a_constant_tensor_that_leaves_one_codepoint(scaling):
  # Every scaled value is -1 (rms) or +1 (signmax): the codebook collapses to it (absmax keeps
  # its fixed ends ±1, so a constant tensor gets a two-value codebook there).
  with pytest.raises(ValueError, match="collapsed to the single value -?1:"):
    jq.fitting.fit_lloyd_max(np.full((8, 64), -2.0, np.float32), 2, scaling=scaling)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_iters": -1}, ValueError, "max_iters=-1"),
    ({"max_iters": 2.5}, TypeError, "max_iters=2.5"),
    ({"tol": float("nan")}, ValueError, "tol=nan"),  # once stopped at once, returning init
    ({"tol": -1.0}, ValueError, "tol=-1.0"),
    ({"fixed_endpoints": (float("nan"), 1.0)}, ValueError, r"fixed_endpoints\[0\]=nan"),
    ({"fixed_endpoints": (1.0, -1.0)}, ValueError, "low < high"),
    ({"fixed_endpoints": (1.0, 2.0, 3.0)}, TypeError, "fixed_endpoints="),
    ({"weights": np.full(64, np.nan, np.float32)}, ValueError, "weights must be finite"),
    ({"init": np.array([0, 1, 2, np.inf])}, ValueError, "init must be finite"),
])
def test_lloyd_max_refuses_arguments_that_are_not_sane(kwargs, error, match):
  with pytest.raises(error, match=match):
    formats.lloyd_max(np.linspace(-1, 1, 64), 2, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"scaling": "max"}, ValueError, "scaling='max'"),  # once a KeyError
    ({"axis": 2}, ValueError, "axis=2"),  # once wrapped silently to axis 0
    ({"weights": np.ones(64)}, ValueError, r"weights has shape \(64,\)"),
])
def test_fit_lloyd_max_refuses_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    jq.fitting.fit_lloyd_max(RNG.standard_normal((4, 64)).astype(np.float32), 2, **kwargs)
