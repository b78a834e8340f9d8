"""Tests for jaxquant.distributions against scipy.stats, numerical integration and Monte Carlo."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from jaxquant.distributions import Laplace, Normal, StudentT, Truncated

T_DFS = [0.3, 1.0, 1.67, 3.0, 5.0, 30.0, 100.0]

FAMILIES = [
    Normal(0.5),
    Normal(2.0),
    Laplace(0.7),
    Laplace(3.0),
    *[StudentT(df) for df in T_DFS],
    StudentT(0.3, 0.01),
    StudentT(5.0, 2.5),
]


def reference(dist):
  """The matching frozen scipy distribution."""
  if isinstance(dist, Normal):
    return stats.norm(scale=dist.scale)
  if isinstance(dist, Laplace):
    return stats.laplace(scale=dist.scale)
  return stats.t(dist.df, scale=dist.scale)


# Every test uses these array sizes, so that each kernel compiles only once per size.
GRID_SIZE = 241


def probabilities():
  """float32 probabilities in [1e-6, 1 - 1e-6], dense in both tails, including 1/2 and its neighbours."""
  tail = np.logspace(-6, np.log10(0.5), (GRID_SIZE - 3) // 2)
  p = np.concatenate([tail, 1.0 - tail, [0.5, np.nextafter(0.5, 0.0), np.nextafter(0.5, 1.0)]])
  return np.sort(p.astype(np.float32))


def assert_ppf_close(actual, p, dist):
  """Relative 2e-5, or absolute 1e-6 * scale near 0, against scipy evaluated at the float32 p."""
  expected = reference(dist).ppf(np.asarray(p, np.float64))
  actual = np.asarray(actual, np.float64)
  np.testing.assert_array_less(np.abs(actual - expected),
                               2e-5 * np.abs(expected) + 1e-6 * dist.scale)


def x_grid(dist):
  """Points out to where the tail probability is 1e-20 (float32 densities still comfortably normal)."""
  reach = min(1e4, reference(dist).isf(1e-20) / dist.scale)
  tail = np.geomspace(8.0, reach, 40)
  x = np.concatenate([np.linspace(-8.0, 8.0, GRID_SIZE - 2 * tail.size), tail, -tail])
  return (x * dist.scale).astype(np.float32)


@pytest.mark.parametrize("dist", FAMILIES, ids=repr)
def test_pdf_and_cdf_match_scipy(dist):
  x = x_grid(dist)
  ref = reference(dist)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(dist.pdf(x), ref.pdf(x64), rtol=2e-5)
  # Near 1 the float32 cdf can only be absolutely accurate; the lower tail must be relatively accurate.
  np.testing.assert_allclose(dist.cdf(x), ref.cdf(x64), rtol=2e-5, atol=1e-7)
  lower = x[x < 0]
  np.testing.assert_allclose(dist.cdf(lower), ref.cdf(lower.astype(np.float64)), rtol=2e-5, atol=0)


@pytest.mark.parametrize("dist", FAMILIES, ids=repr)
def test_ppf_matches_scipy(dist):
  p = probabilities()
  assert_ppf_close(dist.ppf(p), p, dist)


def test_under_jit_match_scipy():
  # One jitted function for all the distributions, to compile once.
  dists = [Normal(2.0), Laplace(0.7), *[StudentT(df, 1.5) for df in T_DFS]]
  p = probabilities()
  xs = [x_grid(dist) for dist in dists]
  results = jax.jit(lambda p, xs: [(d.ppf(p), d.cdf(x), d.pdf(x)) for d, x in zip(dists, xs)])(p,
                                                                                               xs)
  for dist, x, (ppf, cdf, pdf) in zip(dists, xs, results):
    assert_ppf_close(ppf, p, dist)
    ref = reference(dist)
    np.testing.assert_allclose(cdf, ref.cdf(x.astype(np.float64)), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(pdf, ref.pdf(x.astype(np.float64)), rtol=2e-5)


@pytest.mark.parametrize("df", [0.3, 1.0, 1.67, 100.0])
@pytest.mark.parametrize("p", [1e-6, 1.0 - 1e-6])
def test_student_t_ppf_extreme_tails(df, p):
  dist = StudentT(df)
  p32 = np.float32(p)
  assert_ppf_close(dist.ppf(p32), p32, dist)


@pytest.mark.parametrize("dist", FAMILIES, ids=repr)
def test_round_trips(dist):
  p = probabilities()
  np.testing.assert_allclose(dist.cdf(dist.ppf(p)), p, rtol=1e-5, atol=1e-7)
  # x <= 1 only: above that a float32 cdf near 1 no longer determines x.
  x = np.linspace(-6.0, 1.0, GRID_SIZE, dtype=np.float32) * np.float32(dist.scale)
  np.testing.assert_allclose(dist.ppf(dist.cdf(x)), x, rtol=2e-5, atol=1e-5 * dist.scale)


@pytest.mark.parametrize(
    "dist", [Normal(1.3), Laplace(0.4),
             StudentT(0.3), StudentT(4.0, 2.0)], ids=repr)
def test_special_values(dist):
  p = jnp.asarray([0.0, 0.5, 1.0, -0.1, 1.1, np.nan])
  np.testing.assert_array_equal(dist.ppf(p), [-np.inf, 0.0, np.inf, np.nan, np.nan, np.nan])
  x = jnp.asarray([-np.inf, 0.0, np.inf, np.nan, np.nan, np.nan])
  np.testing.assert_array_equal(dist.cdf(x), [0.0, 0.5, 1.0, np.nan, np.nan, np.nan])


def test_student_t_float64():
  p = np.concatenate(
      [np.logspace(-12, np.log10(0.5), 60), 1.0 - np.logspace(-12, np.log10(0.5), 60)])
  with jax.enable_x64(True):
    for df in (0.3, 5.0, 100.0):
      dist = StudentT(df, 2.0)
      x = dist.ppf(p)
      assert x.dtype == jnp.float64
      np.testing.assert_allclose(x, reference(dist).ppf(p), rtol=1e-10)
      np.testing.assert_allclose(dist.cdf(x), p, rtol=1e-10)


@pytest.mark.parametrize(
    "value, dtype",
    [
        (0.25, jnp.float32),
        (1, jnp.float32),
        (np.arange(3), jnp.float32),
        (np.asarray([0.25, 0.5]), jnp.float32),  # float64 becomes float32 while x64 is disabled
        (jnp.asarray([0.25], jnp.bfloat16), jnp.bfloat16),
    ],
)
@pytest.mark.parametrize(
    "dist",
    [Normal(), Laplace(), StudentT(3.0), Truncated(Normal())], ids=repr)
def test_output_dtype(dist, value, dtype):
  for method in (dist.pdf, dist.cdf, dist.ppf):
    assert method(value).dtype == dtype


CUBE_ROOT_CASES = [
    Normal(1.0),
    Normal(0.3),
    Laplace(1.0),
    Laplace(2.5),
    StudentT(3.0),
    StudentT(5.0, 0.7),
    StudentT(30.0, 2.0),
]


@pytest.mark.parametrize("dist", CUBE_ROOT_CASES, ids=repr)
def test_cube_root_density_is_normalised_cube_root_of_pdf(dist):
  ref_pdf = reference(dist).pdf
  cube_root = lambda x: ref_pdf(x)**(1.0 / 3.0)
  total, _ = integrate.quad(cube_root, -np.inf, np.inf, epsabs=0, epsrel=1e-10, limit=200)
  x = np.linspace(-10.0, 10.0, 201) * dist.scale
  expected = cube_root(x) / total
  np.testing.assert_allclose(dist.cube_root().pdf(x.astype(np.float32)), expected, rtol=2e-5)


@pytest.mark.parametrize(
    "dist, expected",
    [
        (Normal(2.0), Normal(2.0 * math.sqrt(3.0))),
        (Laplace(0.5), Laplace(1.5)),
        (StudentT(5.0, 2.0), StudentT(1.0, 2.0 * math.sqrt(5.0))),
        (StudentT(8.0), StudentT(2.0, 2.0)),
    ],
    ids=repr,
)
def test_cube_root_closed_forms(dist, expected):
  result = dist.cube_root()
  assert type(result) is type(expected)
  for field in dataclasses.fields(expected):
    assert getattr(result, field.name) == pytest.approx(getattr(expected, field.name), rel=1e-12)


RMS_CASES = [Normal(0.3), Laplace(2.0), StudentT(2.5), StudentT(5.0, 0.2), StudentT(100.0, 3.0)]


@pytest.mark.parametrize("dist", RMS_CASES, ids=repr)
def test_rms_matches_scipy_std(dist):
  assert dist.rms == pytest.approx(reference(dist).std(), rel=1e-12)
  unit = dist.with_unit_rms()
  assert type(unit) is type(dist)
  assert reference(unit).std() == pytest.approx(1.0, rel=1e-12)


def test_scaled():
  assert Normal(2.0).scaled(3.0) == Normal(6.0)
  assert StudentT(4.0, 0.5).scaled(4.0) == StudentT(4.0, 2.0)
  x = np.linspace(-3.0, 3.0, 13)
  np.testing.assert_allclose(Laplace(1.0).scaled(0.25).pdf(x),
                             stats.laplace(scale=0.25).pdf(x),
                             rtol=2e-5)


# Monte Carlo: 20000 blocks, so the standard error of the sample mean is below 0.5% in every case
# here. The formulas are approximations, so the tolerances are set by their own error:
# * Normal, sqrt(2 ln(B/pi)): an asymptotic form that underestimates (exact quadrature: by 5.4%
#   at B = 64 and 2.6% at B = 256).
# * Laplace, gamma + ln B: the exact mean is the harmonic number H_B = gamma + ln B + 1/(2B) - ...,
#   so the formula is within 0.2% at these B; 1% leaves room for sampling error.
# * Student-t: within 4.5% of exact quadrature for df in {5, 10, 30} at B in {64, 256}.
@pytest.mark.parametrize(
    "dist, block_size, rtol",
    [
        (Normal(1.0), 64, 0.07),
        (Normal(0.3), 256, 0.04),
        (Laplace(1.0), 64, 0.01),
        (Laplace(2.0), 256, 0.01),
        (StudentT(5.0), 64, 0.06),
        (StudentT(10.0, 0.5), 64, 0.06),
        (StudentT(30.0, 2.0), 64, 0.06),
        (StudentT(5.0, 0.5), 256, 0.06),
        (StudentT(30.0), 256, 0.06),
    ],
    ids=repr,
)
def test_expected_absmax_matches_monte_carlo(dist, block_size, rtol):
  rng = np.random.default_rng(1234)
  shape = (20_000, block_size)
  if isinstance(dist, Normal):
    samples = rng.standard_normal(shape)
  elif isinstance(dist, Laplace):
    samples = rng.laplace(size=shape)
  else:
    samples = rng.standard_t(dist.df, size=shape)
  estimate = dist.scale * np.abs(samples).max(axis=1).mean()
  assert dist.expected_absmax(block_size) == pytest.approx(estimate, rel=rtol)


def test_expected_absmax_student_t_tends_to_normal():
  assert StudentT(1e9).expected_absmax(128) == pytest.approx(Normal().expected_absmax(128),
                                                             rel=1e-6)


def test_expected_absmax_laplace_accepts_small_blocks():
  euler_gamma = 0.5772156649015329
  assert Laplace(2.0).expected_absmax(2) == pytest.approx(2.0 * (euler_gamma + math.log(2.0)),
                                                          rel=1e-12)


def truncation_cases():
  return [
      Truncated(Normal(1.0), -1.0, 1.0),
      Truncated(Normal(2.0), -0.5, 3.0),
      Truncated(Laplace(0.5), -2.0, 1.0),
      Truncated(StudentT(3.0), -2.5, 2.5),
      Truncated(StudentT(0.3, 2.0), -40.0, 10.0),
  ]


def truncated_reference(dist):
  """(pdf, cdf, ppf) of the truncated distribution, built from scipy."""
  base = reference(dist.base)
  if isinstance(dist.base, Normal):
    s = dist.base.scale
    ref = stats.truncnorm(dist.low / s, dist.high / s, scale=s)
    return ref.pdf, ref.cdf, ref.ppf
  cdf_low, cdf_high = base.cdf(dist.low), base.cdf(dist.high)
  mass = cdf_high - cdf_low
  inside = lambda x: (x >= dist.low) & (x <= dist.high)
  return (
      lambda x: np.where(inside(x),
                         base.pdf(x) / mass, 0.0),
      lambda x: np.clip((base.cdf(x) - cdf_low) / mass, 0.0, 1.0),
      lambda u: base.ppf(cdf_low + u * mass),
  )


@pytest.mark.parametrize("dist", truncation_cases(), ids=repr)
def test_truncated_matches_scipy(dist):
  pdf, cdf, ppf = truncated_reference(dist)
  width = dist.high - dist.low
  x = np.linspace(dist.low - 0.2 * width, dist.high + 0.2 * width, GRID_SIZE).astype(np.float32)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(dist.pdf(x), pdf(x64), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(dist.cdf(x), cdf(x64), rtol=2e-5, atol=2e-7)
  u = np.linspace(0.0, 1.0, GRID_SIZE).astype(np.float32)
  actual = np.asarray(dist.ppf(u), np.float64)
  np.testing.assert_allclose(actual, ppf(u.astype(np.float64)), rtol=5e-5, atol=5e-6 * width)
  assert actual[0] == dist.low and actual[-1] == dist.high
  assert np.all((actual >= dist.low) & (actual <= dist.high))
  np.testing.assert_allclose(jax.jit(dist.cdf)(x), cdf(x64), rtol=2e-5, atol=2e-7)


def test_truncated_outside_interval():
  dist = Truncated(Laplace(1.0), -1.0, 2.0)
  np.testing.assert_array_equal(dist.pdf(jnp.asarray([-1.5, 2.5])), [0.0, 0.0])
  np.testing.assert_array_equal(dist.cdf(jnp.asarray([-1.5, 2.5])), [0.0, 1.0])


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: StudentT(2.0).rms, ValueError, "df"),
        (lambda: StudentT(1.5).with_unit_rms(), ValueError, "df"),
        (lambda: StudentT(2.0).cube_root(), ValueError, "df"),
        (lambda: StudentT(0.5).cube_root(), ValueError, "df"),
        (lambda: StudentT(2.0).expected_absmax(64), ValueError, "df"),
        (lambda: StudentT(0.0), ValueError, "df"),
        (lambda: StudentT(-3.0), ValueError, "df"),
        (lambda: StudentT(math.inf), ValueError, "df"),
        (lambda: StudentT(math.nan), ValueError, "df"),
        (lambda: StudentT("5"), TypeError, "df"),
        (lambda: Normal(0.0), ValueError, "scale"),
        (lambda: Laplace(-1.0), ValueError, "scale"),
        (lambda: StudentT(5.0, 0.0), ValueError, "scale"),
        (lambda: Normal(math.inf), ValueError, "scale"),
        (lambda: Laplace(None), TypeError, "scale"),
        (lambda: Normal().scaled(0.0), ValueError, "factor"),
        (lambda: Normal().scaled(-2.0), ValueError, "factor"),
        (lambda: Normal().expected_absmax(1), ValueError, "block_size"),
        (lambda: Laplace().expected_absmax(0), ValueError, "block_size"),
        (lambda: Laplace().expected_absmax(1), ValueError, "block_size"),
        (lambda: Laplace().expected_absmax(2.5), TypeError, "block_size"),
        (lambda: Normal().expected_absmax(64.0), TypeError, "block_size"),
        (lambda: Normal().expected_absmax(2), ValueError, "block_size.*4"),
        (lambda: Normal().expected_absmax(3), ValueError, "block_size.*4"),
        (lambda: StudentT(5.0).expected_absmax(3), ValueError, "block_size.*4"),
        (lambda: Truncated(Normal(), 1.0, 1.0), ValueError, "low"),
        (lambda: Truncated(Normal(), 2.0, -2.0), ValueError, "low"),
        (lambda: Truncated(Normal(), "a", 1.0), TypeError, "low"),
        (lambda: Truncated(Normal(), -1.0, math.nan), ValueError, "high=nan must be a number"),
        (lambda: Normal().scaled(math.nan), ValueError, "factor=nan must be a finite number"),
        (lambda: Normal().expected_absmax(True), TypeError, "block_size=True"),
        (lambda: Truncated("normal"), TypeError, "base"),
    ],
)
def test_bad_input(make, error, name):
  with pytest.raises(error, match=name):
    make()


def test_frozen_and_hashable():
  dist = StudentT(5.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    dist.df = 6.0
  assert hash(dist) == hash(StudentT(5, 1))
