"""Weight distributions: Normal, Laplace, Student-t and their truncations.

Each family provides an elementwise, jit-compatible ``pdf``, ``cdf`` and ``ppf``
(float inputs keep their dtype, anything else becomes float32), plus the
closed forms a quantiser design needs:

* ``cube_root()``: the normalised density proportional to ``p(x) ** (1/3)``.
  By Panter & Dite (1951) this is the asymptotically optimal density of
  codepoints for minimum mean squared error; for these families it stays in
  the family.
* ``expected_absmax(block_size)``: the approximate expected absolute maximum
  of a block of i.i.d. samples, as used for block-scaled formats by Orr, Ribar
  & Luschi (2025).

References:
    P. F. Panter and W. Dite, "Quantization distortion in pulse-count
    modulation with nonuniform spacing of levels", Proc. IRE 39(1), 1951.

    D. Orr, L. Ribar and C. Luschi, "Optimal Formats for Weight
    Quantisation", arXiv:2505.12988, 2025.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.stats import norm

from jaxquant import _arguments

__all__ = ["Laplace", "Normal", "StudentT", "Truncated"]

_EULER_GAMMA = 0.5772156649015329
_NEEDS_B_ABOVE_PI = " (the approximation uses ln(B / pi), so needs B > pi)"
_BETAINC_CF_TERMS = 48  # enough for float64 where the fraction converges rapidly
_T_PPF_ITERATIONS = 16  # from its starting point the Student-t ppf iteration converges in <= 12
_T_PPF_MIN_LOG_V = -50.0  # |ppf(p)| / (scale sqrt(df)) >= e**-50 ~ 2e-22, i.e. ~0


def _positive_finite(name, value):
  return _arguments.real(name, value, low=0.0, low_open=True)


def _check_block_size(block_size, minimum, reason=""):
  block_size = _arguments.integer("block_size", block_size)
  if block_size < minimum:
    raise ValueError(f"{block_size=} must be >= {minimum}{reason}")
  return block_size


def _as_float(x):
  """``x`` as a JAX float array: float arrays keep their dtype, anything else is float32."""
  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.asarray(x)
  return jnp.asarray(x, jnp.float32)


def _elementwise(method):
  """Evaluate ``method`` in at least float32 and return the input's float dtype."""

  @functools.wraps(method)
  def wrapper(self, x):
    x = _as_float(x)
    work = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.float32
    return method(self, x.astype(work)).astype(x.dtype)

  return wrapper


class _ScaleFamily:
  """Methods shared by the scale families ``Normal``, ``Laplace`` and ``StudentT``."""

  def scaled(self, factor):
    """The same distribution with ``scale`` multiplied by ``factor`` (> 0)."""
    factor = _positive_finite("factor", factor)
    return dataclasses.replace(self, scale=self.scale * factor)

  def with_unit_rms(self):
    """The same distribution rescaled so that its RMS is 1."""
    return self.scaled(1.0 / self.rms)


# Unit-scale kernels, compiled once per input shape and dtype and shared by every instance.
_normal_pdf = jax.jit(norm.pdf)
_normal_cdf = jax.jit(norm.cdf)
_normal_ppf = jax.jit(norm.ppf)


@jax.jit
def _laplace_pdf(z):
  return 0.5 * jnp.exp(-jnp.abs(z))


@jax.jit
def _laplace_cdf(z):
  half_tail = 0.5 * jnp.exp(-jnp.abs(z))
  return jnp.where(z < 0, half_tail, 1.0 - half_tail)


@jax.jit
def _laplace_ppf(p):
  z = jnp.log(2.0 * jnp.minimum(p, 1.0 - p))
  return jnp.where(p > 0.5, -z, z)


@dataclasses.dataclass(frozen=True)
class Normal(_ScaleFamily):
  """Zero-mean normal distribution N(0, scale**2).

  ``p(x) ** (1/3)`` is proportional to N(0, 3 scale**2) (Panter & Dite, 1951).
  """

  scale: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "scale", _positive_finite("scale", self.scale))

  @_elementwise
  def pdf(self, x):
    """``exp(-x**2 / (2 scale**2)) / (scale sqrt(2 pi))``."""
    return _normal_pdf(x / self.scale) / self.scale

  @_elementwise
  def cdf(self, x):
    """``(1 + erf(x / (scale sqrt(2)))) / 2``."""
    return _normal_cdf(x / self.scale)

  @_elementwise
  def ppf(self, p):
    """Inverse of ``cdf``: ``scale sqrt(2) erfinv(2p - 1)``; +-inf at p = 1, 0."""
    return self.scale * _normal_ppf(p)

  @property
  def rms(self):
    """Root mean square, ``scale``."""
    return self.scale

  def cube_root(self):
    """Normalised ``p ** (1/3)`` (Panter & Dite, 1951): ``Normal(sqrt(3) * scale)``."""
    return Normal(math.sqrt(3.0) * self.scale)

  def expected_absmax(self, block_size):
    """Approximate E[max |x_i|] over ``block_size`` i.i.d. samples.

    ``scale * sqrt(2 ln(B / pi))`` (Orr, Ribar & Luschi, 2025). The
    approximation needs B > pi, so ``block_size`` must be >= 4; it
    underestimates slightly (about 5% at B = 64, 3% at B = 256).
    """
    block_size = _check_block_size(block_size, 4, _NEEDS_B_ABOVE_PI)
    return self.scale * math.sqrt(2.0 * math.log(block_size / math.pi))


@dataclasses.dataclass(frozen=True)
class Laplace(_ScaleFamily):
  """Zero-mean Laplace distribution, ``p(x) = exp(-|x| / scale) / (2 scale)``.

  ``p(x) ** (1/3)`` is proportional to ``Laplace(3 scale)`` (Panter & Dite, 1951).
  """

  scale: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "scale", _positive_finite("scale", self.scale))

  @_elementwise
  def pdf(self, x):
    """``exp(-|x| / scale) / (2 scale)``."""
    return _laplace_pdf(x / self.scale) / self.scale

  @_elementwise
  def cdf(self, x):
    """``exp(x / scale) / 2`` for x < 0, ``1 - exp(-x / scale) / 2`` otherwise."""
    return _laplace_cdf(x / self.scale)

  @_elementwise
  def ppf(self, p):
    """Inverse of ``cdf``: ``-sign(p - 1/2) scale ln(2 min(p, 1 - p))``."""
    return self.scale * _laplace_ppf(p)

  @property
  def rms(self):
    """Root mean square, ``sqrt(2) * scale``."""
    return math.sqrt(2.0) * self.scale

  def cube_root(self):
    """Normalised ``p ** (1/3)`` (Panter & Dite, 1951): ``Laplace(3 * scale)``."""
    return Laplace(3.0 * self.scale)

  def expected_absmax(self, block_size):
    """Approximate E[max |x_i|] over ``block_size`` i.i.d. samples.

    ``|x| / scale`` is Exp(1), whose maximum of B samples has mean the
    harmonic number ``H_B ~ gamma + ln B`` (Euler's gamma), so this returns
    ``scale * (gamma + ln B)`` (Orr, Ribar & Luschi, 2025); ``block_size >= 2``.
    """
    block_size = _check_block_size(block_size, 2)
    return self.scale * (_EULER_GAMMA + math.log(block_size))


@dataclasses.dataclass(frozen=True)
class StudentT(_ScaleFamily):
  """Zero-mean Student-t distribution with ``df`` degrees of freedom and ``scale``.

  ``p(x) ∝ (1 + x**2 / (df scale**2)) ** (-(df + 1) / 2)``. Its power
  ``p ** alpha`` is again a Student-t with ``df' = alpha (df + 1) - 1`` and
  ``scale' = scale sqrt(df / df')``; for the cube root this needs df > 2.

  ``cdf`` uses the regularised incomplete beta function: for x >= 0,
  ``P(X > x) = I_z(df/2, 1/2) / 2`` with ``z = df / (df + (x/scale)**2)``,
  evaluated in the log domain so that the far tail neither underflows nor
  loses relative accuracy. ``ppf`` inverts it on the smaller tail
  probability by safeguarded Newton iteration on ``log P(X > x)`` against
  ``log(x / (scale sqrt(df)))``, bisecting when a step leaves the bracket.
  In float32, for df <= 100, both match scipy to 2e-5 relative (ppf for p in
  [1e-6, 1 - 1e-6]); accuracy degrades slowly for larger df (to about 1e-4 at
  df = 1e4, where a Normal is the better model anyway).

  Example:
      >>> t = StudentT(df=5.0)
      >>> print(f"{float(t.ppf(0.975)):.4f}")
      2.5706
      >>> print(f"{float(t.cdf(-2.5706)):.4f}")
      0.0250
      >>> print(f"{t.cube_root().df:.4f}")
      1.0000
  """

  df: float
  scale: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "df", _positive_finite("df", self.df))
    object.__setattr__(self, "scale", _positive_finite("scale", self.scale))

  def _require_df_above_2(self, what):
    if self.df <= 2:
      raise ValueError(f"df={self.df!r} must be > 2 for {what}")

  def _constants(self, dtype):
    """``df``, ``log B(df/2, 1/2)`` and the log unit-scale density at 0, computed in
    float64 and passed to the kernels as arrays, so that one compilation serves every df."""
    log_beta = math.lgamma(self.df / 2.0) + math.lgamma(0.5) - math.lgamma((self.df + 1.0) / 2.0)
    log_pdf0 = -log_beta - 0.5 * math.log(self.df)
    return tuple(jnp.asarray(c, dtype) for c in (self.df, log_beta, log_pdf0))

  @property
  def _v_scale(self):
    """``scale sqrt(df)``: the kernels work in ``v = x / (scale sqrt(df))``."""
    return self.scale * math.sqrt(self.df)

  @_elementwise
  def pdf(self, x):
    """``C (1 + x**2 / (df scale**2)) ** (-(df + 1)/2)``,
    ``C = Gamma((df + 1)/2) / (Gamma(df/2) sqrt(df pi) scale)``."""
    df, _, log_pdf0 = self._constants(x.dtype)
    return _t_pdf(x / self._v_scale, df, log_pdf0) / self.scale

  @_elementwise
  def cdf(self, x):
    """``I_z(df/2, 1/2) / 2`` for x < 0, one minus that for x >= 0; ``z = df / (df + (x/scale)**2)``."""
    df, log_beta, _ = self._constants(x.dtype)
    return _t_cdf(x / self._v_scale, df, log_beta)

  @_elementwise
  def ppf(self, p):
    """Inverse of ``cdf`` (no closed form: solved iteratively, see the class docstring);
    0 at p = 1/2 and +-inf at p = 1, 0."""
    return _t_ppf(p, jnp.asarray(self._v_scale, p.dtype), *self._constants(p.dtype))

  @property
  def rms(self):
    """Root mean square, ``scale * sqrt(df / (df - 2))``; requires df > 2."""
    self._require_df_above_2("a finite RMS")
    return self.scale * math.sqrt(self.df / (self.df - 2.0))

  def cube_root(self):
    """Normalised ``p ** (1/3)`` (Panter & Dite, 1951), a Student-t with
    ``df' = (df - 2) / 3`` and ``scale' = scale sqrt(3 df / (df - 2))``; requires df > 2.
    """
    self._require_df_above_2("a normalisable cube-root density")
    return StudentT((self.df - 2.0) / 3.0, self.scale * math.sqrt(3.0 * self.df / (self.df - 2.0)))

  def expected_absmax(self, block_size):
    """Approximate E[max |x_i|] over ``block_size`` i.i.d. samples.

    ``scale (2 ln(B/pi)) ** ((df - 3) / (2 df)) B ** (1/df) sqrt(df / (df - 2))``
    (Orr, Ribar & Luschi, 2025), which tends to the normal formula as
    df -> inf. Requires df > 2 and ``block_size >= 4`` (B > pi).
    """
    self._require_df_above_2("the expected absmax approximation")
    block_size = _check_block_size(block_size, 4, _NEEDS_B_ABOVE_PI)
    nu = self.df
    return (self.scale * (2.0 * math.log(block_size / math.pi))**((nu - 3.0) / (2.0 * nu)) *
            block_size**(1.0 / nu) * math.sqrt(nu / (nu - 2.0)))


def _t_log_sf(log_v, df, log_beta):
  """``log P(T > x)`` for a unit-scale Student-t, ``x = sqrt(df) exp(log_v)``.

  With ``z = df / (df + x**2) = sigmoid(-2 log_v)`` and ``y = 1 - z``, the
  tail is ``I_z(a, 1/2) / 2`` with ``a = df / 2``, or equivalently
  ``(1 - I_y(1/2, a)) / 2``. The continued fraction for ``I_x(p, q)``
  converges rapidly for ``x < (p + 1) / (p + q + 2)`` and exactly one of the
  two forms satisfies this, so that one is used. Working from ``log z`` and
  ``log y`` with ``log_beta = log B(a, 1/2)`` precomputed in float64 keeps
  the far tail accurate where z itself would underflow (unlike
  ``jax.scipy.special.betainc``, whose float32 ``lgamma`` also loses
  accuracy for large df).
  """
  a = df / 2.0
  log_z = jax.nn.log_sigmoid(-2.0 * log_v)
  log_y = jax.nn.log_sigmoid(2.0 * log_v)
  tail = log_z < jnp.log((a + 1.0) / (a + 2.5))
  p = jnp.where(tail, a, 0.5)
  q = jnp.where(tail, 0.5, a)
  log_x = jnp.where(tail, log_z, log_y)
  log_1mx = jnp.where(tail, log_y, log_z)
  log_i = p * log_x + q * log_1mx - jnp.log(p) - log_beta + jnp.log(
      _betainc_cf(p, q, jnp.exp(log_x)))
  return math.log(0.5) + jnp.where(tail, log_i, jnp.log1p(-jnp.exp(log_i)))


def _betainc_cf(a, b, x):
  """``I_x(a, b) a B(a, b) / (x**a (1 - x)**b) = 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))``
  (DLMF 8.17.22), evaluated bottom-up from a fixed depth, which is stable and,
  unlike forward (Lentz) evaluation, does not accumulate rounding error.
  """

  def d_odd(m):  # d_{2m+1}
    return -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))

  def d_even(m):  # d_{2m}
    return m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m))

  def step(i, t):
    m = (_BETAINC_CF_TERMS - i).astype(x.dtype)
    return 1.0 + d_even(m) / (1.0 + d_odd(m) / t)

  t = lax.fori_loop(0, _BETAINC_CF_TERMS, step, jnp.ones_like(x))
  return 1.0 / (1.0 + d_odd(0.0) / t)


@jax.jit
def _t_pdf(v, df, log_pdf0):
  """Unit-scale Student-t density at ``sqrt(df) v``: ``p(0) (1 + v**2) ** (-(df + 1)/2)``."""
  return jnp.exp(log_pdf0 + (df + 1.0) / 2.0 * jax.nn.log_sigmoid(-2.0 * jnp.log(jnp.abs(v))))


@jax.jit
def _t_cdf(v, df, log_beta):
  """Unit-scale Student-t cdf at ``sqrt(df) v``, from the tail probability of ``|v|``."""
  tail = jnp.exp(_t_log_sf(jnp.log(jnp.abs(v)), df, log_beta))
  return jnp.where(v < 0, tail, 1.0 - tail)


@jax.jit
def _t_ppf(p, v_scale, df, log_beta, log_pdf0):
  """Student-t quantile ``v_scale v`` where ``P(T < sqrt(df) v) = p``, solved on ``min(p, 1 - p)``."""
  q = jnp.minimum(p, 1.0 - p)
  x = jnp.exp(_t_isf_log_v(q, jnp.log(v_scale), df, log_beta, log_pdf0) + jnp.log(v_scale))
  x = jnp.where(q == 0.5, 0.0, jnp.where(q == 0, jnp.inf, x))
  x = jnp.where(p < 0.5, -x, x)
  return jnp.where((p >= 0) & (p <= 1), x, jnp.nan)


def _t_isf_log_v(q, log_v_scale, df, log_beta, log_pdf0):
  """Solve ``P(T > sqrt(df) exp(u)) = q`` for u, elementwise, for q in (0, 1/2).

  ``g(u) = log P(T > sqrt(df) e**u) - log q`` decreases from
  ``log(1 / (2q)) > 0`` at u = -inf, with slope tending to -df as u -> inf
  (a power-law tail), and is concave, so Newton in u converges in a few
  steps. Each step is kept inside the bracket ``[lo, hi]`` known to contain
  the root, bisecting when Newton would leave it. The upper end of the
  initial bracket puts ``exp(u + log_v_scale)`` just past float overflow, so
  roots beyond the float range come out as +inf.
  """
  a = df / 2.0
  log_q = jnp.log(q)
  log_c = log_pdf0 + 0.5 * jnp.log(df)  # x p(x) = e**u exp(log_c) z**(a + 1/2)

  lo = jnp.full_like(q, _T_PPF_MIN_LOG_V)
  hi = jnp.full_like(q, math.log(float(jnp.finfo(q.dtype).max)) + 1.0) - log_v_scale
  # Start from the root of the tangent at 0, P(T > x) ~ 1/2 - p(0) x, which lies below the
  # root as P(T > x) is convex for x >= 0; by concavity, after at most one overshoot
  # Newton approaches the root monotonically from above.
  u = jnp.clip(jnp.log(0.5 - q) - log_c, lo, hi)

  def step(_, state):
    u, lo, hi = state
    log_sf = _t_log_sf(u, df, log_beta)
    g = log_sf - log_q
    lo = jnp.where(g > 0, u, lo)
    hi = jnp.where(g < 0, u, hi)
    # d log P(T > x) / du = -x p(x) / P(T > x)
    slope = -jnp.exp(log_c + u + (a + 0.5) * jax.nn.log_sigmoid(-2.0 * u) - log_sf)
    newton = u - g / slope
    inside = jnp.isfinite(newton) & (newton >= lo) & (newton <= hi)
    return jnp.where(inside, newton, 0.5 * (lo + hi)), lo, hi

  return lax.fori_loop(0, _T_PPF_ITERATIONS, step, (u, lo, hi))[0]


@dataclasses.dataclass(frozen=True)
class Truncated:
  """``base`` restricted to ``[low, high]`` and renormalised.

  ``pdf(x) = base.pdf(x) / (F(high) - F(low))`` inside the interval, 0 outside;
  ``cdf(x) = (F(x) - F(low)) / (F(high) - F(low))`` clipped to [0, 1];
  ``ppf(u) = base.ppf(F(low) + u (F(high) - F(low)))`` clipped to the interval,
  with ``ppf(0) = low`` and ``ppf(1) = high`` exactly. F is ``base.cdf``.

  Example:
      >>> d = Truncated(Normal(), low=-1.0, high=1.0)
      >>> print(f"{float(d.cdf(0.0)):.4f} {float(d.ppf(1.0)):.4f}")
      0.5000 1.0000
      >>> print(f"{float(d.pdf(0.0)):.4f}")
      0.5844
  """

  base: Normal | Laplace | StudentT
  low: float = -1.0
  high: float = 1.0

  def __post_init__(self):
    if not isinstance(self.base, (Normal, Laplace, StudentT)):
      raise TypeError(f"base must be a Normal, Laplace or StudentT, got {type(self.base).__name__}")
    low = _arguments.real("low", self.low, finite=False)
    high = _arguments.real("high", self.high, finite=False)
    if not low < high:
      raise ValueError(f"low={low!r} must be < high={high!r}")
    object.__setattr__(self, "low", low)
    object.__setattr__(self, "high", high)

  def _cdf_bounds(self, dtype):
    return self.base.cdf(jnp.asarray(self.low, dtype)), self.base.cdf(jnp.asarray(self.high, dtype))

  @_elementwise
  def pdf(self, x):
    """``base.pdf(x) / (F(high) - F(low))`` on ``[low, high]``, 0 outside."""
    cdf_low, cdf_high = self._cdf_bounds(x.dtype)
    inside = (x >= self.low) & (x <= self.high)
    return jnp.where(inside, self.base.pdf(x) / (cdf_high - cdf_low), 0.0)

  @_elementwise
  def cdf(self, x):
    """``(F(x) - F(low)) / (F(high) - F(low))``, clipped to [0, 1]."""
    cdf_low, cdf_high = self._cdf_bounds(x.dtype)
    return jnp.clip((self.base.cdf(x) - cdf_low) / (cdf_high - cdf_low), 0.0, 1.0)

  @_elementwise
  def ppf(self, u):
    """``base.ppf(F(low) + u (F(high) - F(low)))`` clipped to ``[low, high]``; exact at u = 0, 1."""
    cdf_low, cdf_high = self._cdf_bounds(u.dtype)
    x = jnp.clip(self.base.ppf(cdf_low + u * (cdf_high - cdf_low)), self.low, self.high)
    x = jnp.where(u == 0, self.low, jnp.where(u == 1, self.high, x))
    return jnp.where((u >= 0) & (u <= 1), x, jnp.nan)
