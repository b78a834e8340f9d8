"""Entropy coding: ideal bits, canonical Huffman, and the entropy-coded uniform grid."""

import numpy as np
import pytest

import jaxquant as jq
from jaxquant import entropy


def _skewed(rng, n_symbols, size):
  p = rng.dirichlet(np.full(n_symbols, 0.3))
  return rng.choice(n_symbols, size=size, p=p)


@pytest.mark.parametrize("n_symbols", [1, 2, 7, 64, 256])
def test_huffman_round_trip(n_symbols):
  rng = np.random.default_rng(n_symbols)
  codes = _skewed(rng, n_symbols, 20_000)
  code = entropy.HuffmanCode.from_counts(np.bincount(codes, minlength=n_symbols))
  data = code.encode(codes)
  assert len(data) == -(-code.encoded_bits(codes) // 8)
  np.testing.assert_array_equal(code.decode(data, codes.size), codes)
  assert code.table_bits == entropy.LENGTH_FIELD_BITS * n_symbols


def test_huffman_single_present_symbol_and_deterministic():
  codes = np.full(1000, 3)
  code = entropy.HuffmanCode.from_counts(np.bincount(codes, minlength=10))
  assert code.lengths.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(code.decode(code.encode(codes), codes.size), codes)
  # Ties break by symbol, then merge order: the lengths and canonical codewords are fixed.
  tied = entropy.HuffmanCode.from_counts([5, 5, 5, 5, 1, 1])
  assert tied.lengths.tolist() == [3, 2, 2, 2, 4, 4]
  expected = "".join(["00", "01", "10", "110", "1110", "1111"])  # symbols 1, 2, 3, 0, 4, 5
  assert np.unpackbits(np.frombuffer(tied.encode([1, 2, 3, 0, 4, 5]), np.uint8))[:17].tolist() == [
      int(bit) for bit in expected]
  with pytest.raises(ValueError, match="no codeword"):
    code.encode([0])
  with pytest.raises(ValueError, match="fewer than"):
    code.decode(code.encode(codes[:8]), 9)


def test_huffman_length_limit():
  counts = np.array([1, 1] + [int(1.7**k) for k in range(2, 60)])  # Fibonacci-like: deep tree
  code = entropy.HuffmanCode.from_counts(counts)
  assert code.lengths.max() <= entropy.MAX_CODE_LENGTH
  codes = np.arange(counts.size)
  np.testing.assert_array_equal(code.decode(code.encode(codes), codes.size), codes)


def test_huffman_near_entropy_on_smooth_distribution():
  rng = np.random.default_rng(0)
  codes = np.clip(np.round(rng.standard_normal(10**6) * 20 + 128), 0, 255).astype(np.int64)
  counts = np.bincount(codes, minlength=256)
  code = entropy.HuffmanCode.from_counts(counts)
  p = counts[counts > 0] / codes.size
  entropy_bits = -codes.size * np.sum(p * np.log2(p))
  payload = code.encoded_bits(codes)
  assert entropy_bits <= payload <= 1.01 * entropy_bits
  np.testing.assert_array_equal(code.decode(code.encode(codes), codes.size), codes)


def test_ideal_bits_matches_direct_computation():
  rng = np.random.default_rng(1)
  codes = _skewed(rng, 50, (300, 7))
  counts = np.bincount(codes.reshape(-1), minlength=60)
  p = (counts + 1) / (codes.size + 60)
  np.testing.assert_allclose(entropy.ideal_bits(codes, 60), -np.sum(np.log2(p[codes])), rtol=1e-12)
  with pytest.raises(ValueError, match="codes"):
    entropy.ideal_bits([0, 60], 60)
  with pytest.raises(ValueError, match="n_symbols"):
    entropy.ideal_bits([0], 0)


_SAMPLERS = {
    "normal": (lambda rng, n: rng.standard_normal(n), 1.193),
    "laplace": (lambda rng, n: rng.laplace(size=n) / np.sqrt(2.0), 1.110),
    "t5": (lambda rng, n: rng.standard_t(5, size=n) / np.sqrt(5.0 / 3.0), 1.138),
}


@pytest.mark.parametrize("name", sorted(_SAMPLERS))
def test_entropy_coded_grid_constants_and_beats_fixed_length(name):
  sampler, constant = _SAMPLERS[name]
  x = sampler(np.random.default_rng(2), 2**20).astype(np.float32)
  fmt, spec = entropy.fit_grid(x, 4.0)
  assert fmt.values.size % 2 == 1 and fmt.values[fmt.values.size // 2] == 0.0
  q = jq.quantise(x, spec)
  size = entropy.coded_size(q)
  bits = size["ideal_bits_per_param"]
  assert 3.85 <= bits <= 4.0
  assert bits <= size["huffman_bits_per_param"] <= 1.02 * bits
  error = float(jq.metrics.relative_rmse(x, q.dequantise()))
  assert error * 2**bits == pytest.approx(constant, rel=0.03)
  fixed_specs = [jq.QuantSpec("nf4", block_size=64, scaling="absmax"),
                 jq.QuantSpec("int4", block_size="tensor", scaling="rms")]
  for fixed_spec in fixed_specs:
    fixed = jq.quantise(x, fixed_spec)
    assert bits <= fixed.bits_per_param
    assert error < float(jq.metrics.relative_rmse(x, fixed.dequantise())), fixed_spec.format.name


def test_fit_grid_absmax_and_fractional_target():
  x = np.random.default_rng(3).standard_normal(2**16).astype(np.float32)
  fmt, spec = entropy.fit_grid(x, 3.3, scaling="absmax")
  assert spec.scaling == "absmax" and fmt.values[-1] == 1.0
  bits = entropy.coded_size(jq.quantise(x, spec))["ideal_bits_per_param"]
  assert 3.2 <= bits <= 3.3


@pytest.mark.parametrize("target", [0.1, 9.0])
def test_fit_grid_unreachable_target(target):
  x = np.random.default_rng(4).standard_normal(4096).astype(np.float32)
  with pytest.raises(ValueError, match="bits_per_param"):
    entropy.fit_grid(x, target)


def test_coded_size_needs_per_tensor_scaling():
  q = jq.quantise(np.ones((4, 64), np.float32), jq.QuantSpec("int4", block_size=64))
  with pytest.raises(ValueError, match="q must be"):
    entropy.coded_size(q)
