"""H-weighted fitting: Lloyd–Max and CRD ν fits weighted per input row, as for GPTQ."""

import numpy as np
import pytest

import jaxquant as jq
from jaxquant import formats

RNG = np.random.default_rng(7)
K, N = 128, 96


def dequantised(x, fmt):
  """x quantised to `fmt` in blocks along axis 0, as float64."""
  return np.asarray(jq.quantise(x, jq.QuantSpec(fmt, axis=0)).dequantise(), np.float64)


def weighted_error(x, x_hat, c):
  """Σ c (x̂ - x)² / Σ c x², in float64."""
  x, c = np.asarray(x, np.float64), np.broadcast_to(np.asarray(c, np.float64), x.shape)
  return np.sum(c * (x_hat - x) ** 2) / np.sum(c * x**2)


def two_tailed_kernel():
  """Rows 0..63 t(3) (heavy tails) at 1/100 scale, rows 64..127 normal, and diag H that
  weights the heavy rows 10^6 times more: the unweighted error is the normal rows', the
  weighted one the heavy rows'. Blocks of 64 along axis 0 keep the halves apart."""
  heavy = 1e-2 * RNG.standard_t(3, (64, 256))
  light = RNG.standard_normal((64, 256))
  x = np.concatenate([heavy, light]).astype(np.float32)
  diag_h = np.concatenate([np.full(64, 1e6), np.ones(64)])
  return x, diag_h


X, DIAG_H = two_tailed_kernel()


@pytest.mark.parametrize("scaling", ["absmax", "rms"])
@pytest.mark.parametrize("shape", [(K, 1), (1, N), (1, 1)])
def test_fit_lloyd_max_broadcast_weights_equal_materialised_ones(scaling, shape):
  x = RNG.standard_t(4, (K, N)).astype(np.float32)
  c = RNG.uniform(0.1, 10.0, shape)
  fit = lambda weights: jq.fitting.fit_lloyd_max(x, 3, scaling=scaling, weights=weights)
  assert fit(c) == fit(np.broadcast_to(c, x.shape).copy())


@pytest.mark.parametrize("scaling", ["absmax", "signmax"])
def test_weighted_lloyd_max_lowers_the_weighted_error(scaling):
  # Rows 0..63 are normal, rows 64..127 heavy-tailed; only the normal rows count.
  x = np.concatenate([RNG.standard_normal((64, N)),
                      RNG.standard_t(2.5, (64, N))]).astype(np.float32)
  c = np.concatenate([np.ones(64), np.zeros(64)])[:, None]
  weighted = jq.fitting.fit_lloyd_max(x, 3, scaling=scaling, weights=c)
  plain = jq.fitting.fit_lloyd_max(x, 3, scaling=scaling)
  errors = {name: weighted_error(x, dequantised(x, fmt), c)
            for name, fmt in (("weighted", weighted), ("plain", plain))}
  assert errors["weighted"] < 0.9 * errors["plain"], errors


@pytest.mark.parametrize("scale", [2.0**-300, 2.0**-100, 2.0**100, 2.0**300])
def test_fits_are_unchanged_by_a_power_of_two_scale_of_the_weights(scale):
  # 2^±300 lies outside float32: the weights are normalised in float64 first.
  x = X[::2, :64]
  c = DIAG_H[::2, None]
  assert jq.fitting.fit_lloyd_max(x, 2, weights=c * scale) == jq.fitting.fit_lloyd_max(
      x, 2, weights=c)
  assert jq.fitting.fit_crd_t(x, 2, weights=c * scale) == jq.fitting.fit_crd_t(x, 2, weights=c)


@pytest.mark.parametrize("c", [np.full((1, 1), 3.0), np.full(X.shape, 0.7, np.float32)])
def test_fit_crd_t_with_uniform_weights_picks_the_unweighted_nu(c):
  assert jq.fitting.fit_crd_t(X, 3, weights=c) == jq.fitting.fit_crd_t(X, 3)


@pytest.mark.parametrize("bits", [3, 4])
def test_fit_crd_t_picks_the_nu_of_least_weighted_error(bits):
  candidates = [formats.crd_format("t", bits, scaling="absmax", block_size=64, df=df)
                for df in jq.fitting.crd.DF_GRID]
  c = DIAG_H[:, None]
  weighted = [weighted_error(X, dequantised(X, fmt), c) for fmt in candidates]
  plain = [weighted_error(X, dequantised(X, fmt), np.ones((1, 1))) for fmt in candidates]
  best = candidates[int(np.argmin(weighted))]
  assert jq.fitting.fit_crd_t(X, bits, weights=c) == best
  assert jq.fitting.fit_crd_t(X, bits) == candidates[int(np.argmin(plain))]
  # The heavy rows want a small ν, the normal ones a large one: the weights change the pick.
  assert best != candidates[int(np.argmin(plain))]


FITTERS = {
    "fit_lloyd_max": lambda x, c: jq.fitting.fit_lloyd_max(x, 2, weights=c),
    "fit_crd_t": lambda x, c: jq.fitting.fit_crd_t(x, 2, weights=c),
}
UNIT = RNG.standard_normal((8, 64)).astype(np.float32)
ZERO_TOP = np.concatenate([np.zeros((4, 64), np.float32), UNIT[4:]])


@pytest.mark.parametrize("fitter", FITTERS)
@pytest.mark.parametrize("x, c, match", [
    (UNIT, np.ones(8), r"weights has shape \(8,\)"),  # diag H without [:, None]
    (UNIT, np.ones(64), r"weights has shape \(64,\)"),  # would broadcast along the wrong axis
    (UNIT, np.ones((8, 2)), r"weights has shape \(8, 2\)"),
    (UNIT, np.ones((1, 8, 64)), r"weights has shape \(1, 8, 64\)"),
    (UNIT, -np.ones((8, 1)), "weights must be non-negative"),
    (UNIT, np.full((8, 1), np.nan), "weights must be finite"),
    (UNIT, np.full((8, 1), np.inf), "weights must be finite"),
    (UNIT, np.zeros((8, 1)), "weights must be positive at some element where x is nonzero"),
    (ZERO_TOP, np.repeat([1.0, 0.0], 4)[:, None], "weights must be positive at some element"),
])
def test_fitters_refuse_bad_weights(fitter, x, c, match):
  with pytest.raises(ValueError, match=match):
    FITTERS[fitter](x, c)


@pytest.mark.parametrize("x_scale", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("c_scale", [1e-30, 1.0, 1e30])
def test_weighted_relative_rmse_against_float64(x_scale, c_scale):
  # float32 squares of 1e30 overflow and of 1e-30 underflow; the metric rescales first.
  w = RNG.standard_normal((K, N))
  w_hat = w + 0.1 * RNG.standard_normal((K, N))
  c = RNG.uniform(0.0, 2.0, (K, 1))
  w32, w_hat32 = (np.float32(x_scale) * a.astype(np.float32) for a in (w, w_hat))
  c32 = np.float32(c_scale) * c.astype(np.float32)
  reference = np.sqrt(weighted_error(w32, w_hat32.astype(np.float64), c32))
  np.testing.assert_allclose(float(jq.metrics.relative_rmse(w32, w_hat32, c32)), reference,
                             rtol=1e-5)
  np.testing.assert_allclose(
      float(jq.metrics.relative_rmse(w32, w_hat32, np.broadcast_to(c32, w32.shape))), reference,
      rtol=1e-5)
