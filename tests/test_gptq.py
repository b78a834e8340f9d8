"""GPTQ against an independent float64 re-implementation, round-to-nearest and the output error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.calibration import SecondMoment
from tests.gptq_reference import gptq_reference


def _layer(k=160, n=24, tokens=400, seed=1):
  """Correlated, unevenly scaled inputs X [tokens, K] and a heavy-tailed kernel W [K, N]."""
  rng = np.random.default_rng(seed)
  mixing = np.eye(k) + 0.5 * rng.normal(size=(k, k)) / np.sqrt(k)
  x = (rng.normal(size=(tokens, k)) @ mixing * np.exp(0.5 * rng.normal(size=k))).astype(np.float32)
  w = (0.02 * rng.standard_t(5, size=(k, n))).astype(np.float32)
  return x, w, (x.T.astype(np.float64) @ x).astype(np.float32)


def _codes(q):
  codes = np.asarray(jq.packing.unpack(q.codes, q.bits, q.axis))
  return np.take(codes, np.arange(q.shape[q.axis]), axis=q.axis)


def _decoded(q):
  return np.asarray(jq.scaling.decode_scales(q.scales, q.scale_scales))


@pytest.mark.parametrize("name, scaling, scale_dtype, block_size, act_order", [
    ("nf4", "absmax", "bfloat16", 64, False),
    ("nf4", "absmax", "bfloat16", 64, True),
    ("int3", "signmax", "float32", 32, True),
    ("nf4", "rms", "bfloat16", 64, True),
    ("e2m1", "absmax", "e8m0", 32, False),
    ("int4", "signmax", "bfloat16", 48, False),
])
def test_matches_float64_reference(name, scaling, scale_dtype, block_size, act_order):
  _, w, h = _layer()
  spec = jq.QuantSpec(name, scaling=scaling, scale_dtype=scale_dtype, block_size=block_size)
  q = jq.gptq.quantise(w, h, spec, act_order=act_order)
  rho = spec.format.rms_reference if scaling == "rms" else None
  codes, decoded, _ = gptq_reference(w, h, spec.format.values, block_size=block_size,
                                     scaling=scaling, scale_dtype=scale_dtype, rho=rho,
                                     act_order=act_order)
  np.testing.assert_array_equal(_codes(q), codes)
  # float32 scales come from float32 (library) and float64 (reference) compensated weights.
  np.testing.assert_allclose(_decoded(q), decoded, rtol=2**-20 if scale_dtype == "float32" else 0)


@pytest.mark.parametrize("spec", [
    jq.QuantSpec("nf4"), jq.QuantSpec("int3", scaling="signmax", double_quant=True),
    jq.QuantSpec("nf4", scale_dtype="float8_e4m3fn"), jq.QuantSpec("e2m1", scale_dtype="e8m0"),
    jq.QuantSpec("nf4", scaling="rms", block_size="tensor"),
    jq.QuantSpec("int4", block_size="channel"),
    jq.QuantSpec("int4", scaling="rms", scale_search=True, block_size=48),
], ids=lambda spec: f"{spec.format.name}-{spec.scaling}-{spec.block_size}-{spec.scale_dtype}")
def test_diagonal_hessian_is_round_to_nearest(spec):
  _, w, _ = _layer()
  rtn = jq.quantise(w, spec)
  diagonal = np.diag(np.random.default_rng(0).uniform(0.1, 10.0, w.shape[0])).astype(np.float32)
  for h in (np.eye(w.shape[0], dtype=np.float32), diagonal):
    q = jq.gptq.quantise(w, h, spec, act_order=True)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(rtn.codes))
    np.testing.assert_array_equal(_decoded(q), _decoded(rtn))
    assert q.scales.dtype == rtn.scales.dtype and q.codes.shape == rtn.codes.shape


def _family_specs(w, bits):
  fit = jq.fitting
  return {
      "int-absmax": jq.QuantSpec(f"int{bits}"),
      "int-signmax": jq.QuantSpec(f"int{bits}", scaling="signmax"),
      "fp": jq.QuantSpec(jq.formats.fp_format(2, bits - 3)),
      "nf4": jq.QuantSpec("nf4") if bits == 4 else None,
      "crd-t-signmax": jq.QuantSpec(fit.fit_crd_t(w, bits, scaling="signmax")),
      "lloyd-max-signmax": jq.QuantSpec(fit.fit_lloyd_max(w, bits, scaling="signmax")),
  }


@pytest.mark.parametrize("bits", [3, 4])
def test_lowers_output_error_for_every_family(bits):
  x, w, h = _layer(k=256, n=64, tokens=1024, seed=2)
  error = lambda q: float(np.linalg.norm(x @ (np.asarray(q.dequantise()) - w)))
  for family, spec in _family_specs(w, bits).items():
    if spec is None:
      continue
    rtn, q = error(jq.quantise(w, spec)), error(jq.gptq.quantise(w, h, spec))
    assert q < 0.95 * rtn, (family, q, rtn)


def test_block_scales_are_quantise_of_the_compensated_weights():
  _, w, h = _layer()
  for scaling in ("absmax", "signmax"):
    spec = jq.QuantSpec("int4", scaling=scaling, block_size=32)
    q = jq.gptq.quantise(w, h, spec, act_order=True)
    _, _, at_start = gptq_reference(w, h, spec.format.values, block_size=32, scaling=scaling,
                                    scale_dtype="bfloat16", act_order=True)
    # Each block's scale is the one quantise gives the block's rows as they were when GPTQ
    # reached it, and differs from round-to-nearest's on the original weights.
    np.testing.assert_array_equal(_decoded(q), _decoded(jq.quantise(at_start, spec)))
    assert not np.array_equal(_decoded(q), _decoded(jq.quantise(w, spec)))


def test_per_head_weight_is_gptq_of_each_head():
  rng = np.random.default_rng(3)
  heads, k, n = 3, 64, 16
  w = rng.normal(size=(heads, k, n)).astype(np.float32)
  x = rng.normal(size=(heads, 200, k)).astype(np.float32) * np.linspace(0.2, 3, k, dtype=np.float32)
  x[..., 1:] += x[..., :-1]
  h = np.einsum("htk,htl->hkl", x, x)
  spec = jq.QuantSpec("nf4", axis=1, block_size=32)
  q = jq.gptq.quantise(w, SecondMoment(h, contracting=(1,), batch=(0,)), spec)
  for head in range(heads):
    alone = jq.gptq.quantise(w[head], h[head], jq.QuantSpec("nf4", axis=0, block_size=32))
    np.testing.assert_array_equal(_codes(q)[head], _codes(alone))
    np.testing.assert_array_equal(_decoded(q)[head], _decoded(alone))


@pytest.mark.parametrize("axis", [0, 1])
def test_several_contracted_axes_are_one_hessian(axis):
  """W [n, h, d] contracted over (n, h) is GPTQ on W as [n·h, d] rows, the quantised axis
  innermost (rows and H reordered when it is the outer one)."""
  rng = np.random.default_rng(4)
  w = rng.normal(size=(4, 32, 8)).astype(np.float32)
  x = rng.normal(size=(300, 4, 32)).astype(np.float32)
  x[:, :, 1:] += 0.7 * x[:, :, :-1]
  flat = x.reshape(300, -1)
  h = flat.T @ flat
  block = (4, 16)[axis]  # blocks that divide the quantised axis: they never straddle rows
  q = jq.gptq.quantise(w, SecondMoment(h, contracting=(0, 1)),
                       jq.QuantSpec("int4", axis=axis, block_size=block))
  moved = np.moveaxis(w, axis, 1)  # quantised axis second: rows (outer, quantised)
  perm = np.moveaxis(np.arange(128).reshape(4, 32), axis, 1).reshape(-1)
  rows = jq.gptq.quantise(moved.reshape(-1, 8), h[np.ix_(perm, perm)],
                          jq.QuantSpec("int4", axis=0, block_size=block))
  expected = np.moveaxis(_codes(rows).reshape(moved.shape), 1, axis)
  np.testing.assert_array_equal(_codes(q), expected)
  error = lambda q: np.linalg.norm(np.einsum("tnh,nhd->td", x, np.asarray(q.dequantise()) - w))
  assert error(q) < error(jq.quantise(w, jq.QuantSpec("int4", axis=axis, block_size=block)))


def test_jit_gives_the_eager_result():
  _, w, h = _layer()
  spec = jq.QuantSpec("nf4", block_size=32)
  eager = jq.gptq.quantise(w, h, spec, act_order=True)
  jitted = jax.jit(lambda w, h: jq.gptq.quantise(w, h, spec, act_order=True))(w, h)
  np.testing.assert_array_equal(np.asarray(jitted.codes), np.asarray(eager.codes))
  np.testing.assert_array_equal(_decoded(jitted), _decoded(eager))


def test_bfloat16_weight_keeps_its_dtype():
  _, w, h = _layer()
  q = jq.gptq.quantise(jnp.asarray(w, jnp.bfloat16), h, "nf4")
  assert q.dtype == jnp.bfloat16 and q.dequantise().dtype == jnp.bfloat16


def test_refusals_name_the_problem():
  _, w, h = _layer()
  with pytest.raises(ValueError, match="hessian has shape"):
    jq.gptq.quantise(w, h[:10, :10], "nf4")
  with pytest.raises(ValueError, match="must be one of the contracted axes"):
    jq.gptq.quantise(w, SecondMoment(np.eye(24, dtype=np.float32), (1,)), "nf4")
  with pytest.raises(ValueError, match="all-zero diagonal"):
    jq.gptq.quantise(w, np.zeros_like(h), "nf4")
  indefinite = h.copy()
  indefinite[0, 1] = indefinite[1, 0] = 10 * np.sqrt(h[0, 0] * h[1, 1])
  with pytest.raises(ValueError, match="not positive definite"):
    jq.gptq.quantise(w, indefinite, "nf4")
  with pytest.raises(ValueError, match="hessian contains NaN"):
    jq.gptq.quantise(w, np.full_like(h, np.nan), "nf4")
  with pytest.raises(ValueError, match="w contains NaN"):
    jq.gptq.quantise(np.full_like(w, np.nan), h, "nf4")
  with pytest.raises(ValueError, match="damping"):
    jq.gptq.quantise(w, h, "nf4", damping=-1.0)
  with pytest.raises(TypeError, match="float array"):
    jq.gptq.quantise(np.ones((4, 4), np.int32), np.eye(4, dtype=np.float32), "nf4")
