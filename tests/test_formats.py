"""Formats against published values, scipy and ml_dtypes."""

import math

import ml_dtypes
import numpy as np
import pytest
from scipy import stats

from jaxquant import formats

# QLoRA's published NF4 table (bitsandbytes `create_normal_map`).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# SF4 as printed (3 decimals) in Dotzel et al. 2024 / the optimal-formats code (`SF4_DF5`).
PUBLISHED_SF4 = [-1, -0.628, -0.455, -0.334, -0.237, -0.153, -0.075, 0, 0.066, 0.133, 0.205,
                 0.284, 0.376, 0.491, 0.657, 1]
GAMMA = 0.5772156649015329


def test_nf4_is_the_published_table():
  fmt = formats.nf4()
  assert fmt.bits == 4 and fmt.name == "nf4"
  np.testing.assert_array_equal(fmt.values, PUBLISHED_NF4)


def test_nf4_matches_its_construction_from_normal_quantiles():
  offset = 0.9677083
  positive = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  values = np.sort(np.concatenate([negative, [0], positive]))
  np.testing.assert_allclose(formats.nf4().values, values / values.max(), atol=1e-7)


def test_sf4_matches_published_values():
  np.testing.assert_allclose(formats.sf4().values, PUBLISHED_SF4, atol=6e-4)
  assert formats.sf4().values[7] == 0 and formats.sf4().values[-1] == 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_formats(bits):
  half = 2 ** (bits - 1)
  np.testing.assert_array_equal(formats.int_format(bits).values, np.arange(-half, half))
  sym = formats.int_format(bits, symmetric=True).values
  np.testing.assert_array_equal(sym, np.arange(-half, half) + 0.5)
  np.testing.assert_array_equal(sym, -sym[::-1])


@pytest.mark.parametrize("e, m, dtype", [
    (2, 1, ml_dtypes.float4_e2m1fn), (2, 3, ml_dtypes.float6_e2m3fn),
    (3, 2, ml_dtypes.float6_e3m2fn)])
def test_fp_formats_equal_ml_dtypes_without_specials(e, m, dtype):
  every_pattern = np.arange(2 ** (1 + e + m), dtype=np.uint8).view(dtype).astype(np.float64)
  np.testing.assert_array_equal(formats.fp_format(e, m).values, np.unique(every_pattern))


def test_fp_e4m3_is_e4m3fn_plus_the_reclaimed_nan_pattern():
  patterns = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  finite = np.unique(patterns[np.isfinite(patterns)])
  ours = formats.fp_format(4, 3).values
  assert set(finite) <= set(ours)
  assert sorted(set(ours) - set(finite)) == [-480.0, 480.0]  # 2^8 · 1.875: no NaN reserved


def test_e2m1_and_e3m0_values():
  assert formats.fp_format(2, 1).values.tolist() == [
      -6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
  powers = [2.0**k for k in range(-2, 5)]
  assert formats.fp_format(3, 0).values.tolist() == [-p for p in powers[::-1]] + [0] + powers


def test_uniform_grid():
  fmt = formats.uniform_grid(15, 2.0)
  np.testing.assert_allclose(fmt.values, np.linspace(-2, 2, 15))
  assert fmt.values[7] == 0 and fmt.bits == 4


# --- cube-root-density formats against scipy ---------------------------------------------

def scipy_cube_root(family, scaling, block_size, df):
  """The cube-root density of the scaled data, from the closed forms, as a scipy distribution."""
  if scaling == "rms":
    return {"normal": stats.norm(scale=math.sqrt(3)),
            "laplace": stats.laplace(scale=3 / math.sqrt(2)),
            "t": stats.t((df - 2) / 3, scale=math.sqrt(3)) if df else None}[family]
  log_term = 2 * math.log(block_size / math.pi)
  if family == "normal":
    return stats.norm(scale=math.sqrt(3 / log_term))
  if family == "laplace":
    return stats.laplace(scale=3 / (GAMMA + math.log(block_size)))
  scale = math.sqrt(3) * log_term ** ((3 - df) / (2 * df)) * block_size ** (-1 / df)
  return stats.t((df - 2) / 3, scale=scale)


def paper_positions(n, scaling, symmetric):
  """CDF positions written out from the table in paper.md §3 (16 codes: RS, AS, RA, AA, SA)."""
  h = n // 2
  if symmetric and scaling == "rms":
    return [i / (n + 1) for i in range(1, n + 1)]
  if symmetric:
    return [j / (n - 1) for j in range(n)]
  if scaling == "rms":
    return [k / n for k in range(1, h + 1)] + [0.5 + k / (2 * (h + 1)) for k in range(1, h + 1)]
  if scaling == "absmax":
    return [j / (2 * (h - 1)) for j in range(h)] + [0.5 + k / n for k in range(1, h + 1)]
  return [k / n for k in range(1, n + 1)]


CRD_CASES = [(fam, scaling, sym, bits, df)
             for fam, df in (("normal", None), ("laplace", None), ("t", 7.0), ("t", 3.5))
             for scaling, sym in (("rms", True), ("rms", False), ("absmax", True),
                                  ("absmax", False), ("signmax", False))
             for bits in (3, 4)]


@pytest.mark.parametrize("family, scaling, symmetric, bits, df", CRD_CASES)
def test_crd_codepoints_match_scipy(family, scaling, symmetric, bits, df):
  block_size = 64
  fmt = formats.crd_format(family, bits, scaling=scaling, block_size=block_size,
                           symmetric=symmetric, df=df)
  dist = scipy_cube_root(family, scaling, block_size, df)
  u = np.array(paper_positions(2**bits, scaling, symmetric))
  if scaling == "rms":
    expected = dist.ppf(u)
  else:
    low, high = dist.cdf(-1.0), dist.cdf(1.0)
    expected = dist.ppf(low + u * (high - low))
  np.testing.assert_allclose(fmt.values, expected, atol=2e-5, rtol=2e-5)
  assert fmt.scaling == scaling
  assert fmt.block_size == (None if scaling == "rms" else block_size)
  if scaling != "rms":
    assert fmt.values[-1] == 1.0  # +1 exact
    assert (fmt.values[0] == -1.0) == (scaling == "absmax")
  if not symmetric:
    assert 0.0 in fmt.values


@pytest.mark.parametrize("family, df, expected", [
    # 4-bit, B=64, symmetric absmax: values recomputed with the paper's code (paper.md §3).
    ("normal", None, [0.0498, 0.1503, 0.2540, 0.3636, 0.4827, 0.6176, 0.7801, 1]),
    ("laplace", None, [0.0344, 0.1095, 0.1947, 0.2931, 0.4097, 0.5527, 0.7376, 1]),
    ("t", 7, [0.0416, 0.1263, 0.2154, 0.3131, 0.4249, 0.5605, 0.7380, 1]),
])
def test_crd_absmax_matches_paper_values(family, df, expected):
  fmt = formats.crd_format(family, 4, scaling="absmax", block_size=64, df=df)
  np.testing.assert_allclose(fmt.values[8:], expected, atol=6e-5)


def test_crd_rms_normal_matches_paper_values():
  fmt = formats.crd_format("normal", 4, scaling="rms")
  expected = [0.1278, 0.3863, 0.6537, 0.9377, 1.2497, 1.6089, 2.0557, 2.7102]
  np.testing.assert_allclose(fmt.values[8:], expected, atol=6e-5)


def test_crd_t_block128_matches_paper_values():
  fmt = formats.crd_format("t", 4, scaling="absmax", block_size=128, df=5)
  expected = [0.0340, 0.1036, 0.1784, 0.2634, 0.3658, 0.4986, 0.6883, 1]
  np.testing.assert_allclose(fmt.values[8:], expected, atol=6e-5)


def test_crd_mode_counts():
  aa = formats.crd_format("normal", 4, scaling="absmax", symmetric=False).values
  sa = formats.crd_format("normal", 4, scaling="signmax").values
  assert (np.sum(aa < 0), np.sum(aa > 0)) == (7, 8) and aa[0] == -1 and aa[-1] == 1
  assert (np.sum(sa < 0), np.sum(sa > 0)) == (7, 8) and sa[0] > -1 and sa[-1] == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"family": "t", "bits": 4, "df": 2.0}, "df"),
    ({"family": "t", "bits": 4, "df": 1.5}, "df"),
    ({"family": "t", "bits": 4}, "df"),
    ({"family": "normal", "bits": 4, "df": 5.0}, "df"),
    ({"family": "cauchy", "bits": 4}, "family"),
    ({"family": "normal", "bits": 1}, "bits"),
    ({"family": "normal", "bits": 9}, "bits"),
    ({"family": "normal", "bits": 4, "scaling": "max"}, "scaling"),
    ({"family": "normal", "bits": 4, "scaling": "signmax", "symmetric": True}, "signmax"),
    ({"family": "normal", "bits": 4, "block_size": 2}, "block_size"),
])
def test_crd_bad_input(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    formats.crd_format(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: formats.int_format(1), "bits"),
    (lambda: formats.int_format(9), "bits"),
    (lambda: formats.int_format(4.0), "bits"),
    (lambda: formats.fp_format(0, 3), "exponent_bits"),
    (lambda: formats.fp_format(4, 4), "bits"),
    (lambda: formats.fp_format(2, -1), "mantissa_bits"),
    (lambda: formats.uniform_grid(1), "n"),
    (lambda: formats.Format(np.array([1.0, 0.0]), 2, "x"), "increasing"),
    (lambda: formats.Format(np.zeros(5), 2, "x"), "2..4"),
    (lambda: formats.parse("nf5"), "unknown format"),
    (lambda: formats.parse(4), "name"),
])
def test_builders_bad_input(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("call, error, match", [
    (lambda: formats.uniform_grid(3, math.nan), ValueError, "max_value=nan"),
    (lambda: formats.uniform_grid(3, math.inf), ValueError, "max_value=inf"),
    (lambda: formats.uniform_grid(3, True), TypeError, "max_value=True"),  # once grid3-max1
    (lambda: formats.uniform_grid(3, "1"), TypeError, "max_value='1'"),
    (lambda: formats.uniform_grid(3.0), TypeError, "n=3.0"),
    (lambda: formats.fp_format(2.0, 1), TypeError, "exponent_bits=2.0"),
    (lambda: formats.crd_format("t", 4, df=math.inf), ValueError, "df=inf"),
    (lambda: formats.crd_format("t", 4, df=True), TypeError, "df=True"),
    # A bool block size was once recorded, giving the name 'lut2-BTrue:…' that does not parse.
    (lambda: formats.lut_format([-1, 0, 0.5, 1], 2, block_size=True), TypeError,
     "block_size=True"),
    (lambda: formats.Format(np.array([0.0, 1.0]), 1, "x", block_size=0), ValueError,
     "block_size=0"),
])
def test_builders_refuse_numbers_of_the_wrong_type_or_range(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --- names ---------------------------------------------------------------------------------

ALL_FORMATS = [
    formats.nf4(), formats.sf4(), formats.int_format(4), formats.int_format(3, symmetric=True),
    formats.fp_format(2, 1), formats.fp_format(3, 0), formats.fp_format(4, 3),
    formats.uniform_grid(15), formats.uniform_grid(31, 0.75),
    formats.crd_format("t", 4, scaling="absmax", block_size=64, symmetric=True, df=7),
    formats.crd_format("t", 3, scaling="signmax", block_size=128, df=4.13),
    formats.crd_format("laplace", 4, scaling="rms", symmetric=False),
    formats.crd_format("normal", 2, scaling="absmax", block_size=32, symmetric=False),
    formats.lut_format([-1.0, -0.123456789012, 0.3, 1.0], 2, scaling="absmax", block_size=64),
]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_names_parse_back_to_equal_formats(fmt):
  parsed = formats.parse(fmt.name)
  assert parsed == fmt and hash(parsed) == hash(fmt)
  np.testing.assert_array_equal(parsed.values, fmt.values)


def test_parse_short_names_and_aliases():
  assert formats.parse("FP4") == formats.fp_format(2, 1)
  assert formats.parse("crd-t7-signmax-4b") == formats.crd_format(
      "t", 4, scaling="signmax", block_size=64, symmetric=False, df=7)
  assert formats.parse("crd-t7-absmax-sym-4b-B64").name == "crd-t7-absmax-sym-4b-B64"
  assert formats.parse("int4-asym") == formats.int_format(4)


def test_format_values_are_read_only_and_hashable():
  fmt = formats.nf4()
  with pytest.raises(ValueError):
    fmt.values[0] = 3.0
  assert len({formats.nf4(), formats.nf4(), formats.sf4()}) == 2
