"""The Pallas GPU kernel: correctness, Triton lowering for CUDA, bad input.

Correctness compares the kernel with x @ dequantise(q) in float32: compiled on a GPU, in
interpret mode elsewhere. Interpret mode accepts things Triton cannot lower (gathers,
non-power-of-two tensors), so the lowering tests export each variant for CUDA, which runs jax's
Pallas-to-Triton lowering on any backend; only Triton's own compilation to PTX needs a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import formats
from jaxquant.kernels.pallas_gpu import BlockSizes, default_block_sizes, qmatmul_pallas_gpu

FORMATS = {
    "nf4": formats.nf4(),
    "int2": formats.int_format(2),
    "int3": formats.int_format(3),
    "int8": formats.int_format(8),
    "crd-t5-signmax-3b": formats.crd_format("t", 3, scaling="signmax", block_size=64, df=5),
}
# The custom call that carries a Pallas Triton kernel (jaxlib 0.10). jax.export refuses custom
# calls without a compatibility guarantee, and a Triton kernel has none (its IR is tied to the
# jaxlib that built it), so the lowering tests disable that one check.
TRITON_CALL = "__gpu$xla.gpu.triton"
INTERPRET = jax.default_backend() != "gpu"


def few_steps(sizes):
  """`sizes` in interpret mode, which pays per grid step for the whole arrays; else defaults."""
  return sizes if INTERPRET else None


def problem(fmt, block_size, m, k, n, dtype, seed=0):
  """Kernel arguments for x[m, k] @ W[k, n] with W quantised along K, and the reference y."""
  key_w, key_x = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(key_w, (k, n), jnp.float32)
  q = jq.quantise(w, jq.QuantSpec(FORMATS[fmt], block_size=block_size, axis=0))
  padded_k = q.codes.shape[0] * 32 // q.bits
  x = jax.random.normal(key_x, (m, k), jnp.float32).astype(dtype)
  reference = jnp.dot(x.astype(jnp.float32), jq.dequantise(q, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  codebook = jnp.pad(q.codebook, (0, 2**q.bits - q.codebook.shape[0]), mode="edge")
  args = (jnp.pad(x, ((0, 0), (0, padded_k - k))), q.codes,
          jq.scaling.decode_scales(q.scales, q.scale_scales), codebook)
  return args, q.bits, reference


# (format, block_size, M, K, N, x dtype, variant, block sizes); None = the defaults. Every
# value of every axis appears at least once; in interpret mode the K = 4096 cases take one or
# two grid steps.
CASES = [
    ("nf4", 64, 1, 4096, 512, jnp.bfloat16, None, few_steps(BlockSizes(1, 512, 1024))),
    ("int3", 128, 3, 4096, 200, jnp.float32, "gemv",
     few_steps(BlockSizes(4, 256, 1024, split_k=2))),
    ("int8", 32, 130, 4096, 1, jnp.bfloat16, None, few_steps(BlockSizes(256, 16, 512))),
    ("crd-t5-signmax-3b", 64, 3, 1000, 200, jnp.float32, None, None),
    ("int2", 32, 8, 1000, 512, jnp.bfloat16, None, None),
    ("nf4", 32, 130, 1000, 200, jnp.float32, None, None),
    ("int3", 64, 130, 64, 512, jnp.bfloat16, None, None),
    ("int8", 128, 1, 64, 1, jnp.float32, None, None),
    ("nf4", 128, 8, 1000, 1, jnp.float32, "gemm", None),
    # Masked K: a partial tile (Kp = 96, block_k = 128); tiles beyond Kp when split-K does not
    # divide them (16 tiles in 3 splits of 6; 4 in 3 splits of 2, the last split wholly
    # masked); a tile inside one scale block (block_k < block_size).
    ("nf4", 32, 3, 96, 200, jnp.float32, None, None),
    ("nf4", 128, 1, 1000, 200, jnp.float32, "gemv", BlockSizes(1, 128, 64, split_k=3)),
    ("int2", 64, 3, 1000, 200, jnp.bfloat16, "gemm", BlockSizes(16, 64, 256, split_k=3)),
]


@pytest.mark.parametrize("fmt,block_size,m,k,n,dtype,variant,sizes", CASES)
def test_matches_dequantised_matmul(fmt, block_size, m, k, n, dtype, variant, sizes):
  args, bits, reference = problem(fmt, block_size, m, k, n, dtype)
  y = qmatmul_pallas_gpu(*args, bits=bits, block_size=block_size, block_sizes=sizes,
                         variant=variant, interpret=INTERPRET)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  # bf16 activations: the GEMM rounds the dequantised tile to bf16 for the tensor-core dot.
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  error = np.max(np.abs(np.asarray(y) - np.asarray(reference)))
  assert error <= tol * np.max(np.abs(np.asarray(reference))), (error, reference)


@pytest.mark.parametrize("bits", [1, 5, 6, 7])
@pytest.mark.parametrize("m,variant", [(20, "gemv"), (2, "gemm")])
def test_other_bit_widths_against_numpy(bits, m, variant):
  # Random codes packed by jaxquant.packing, a random codebook and scales; numpy reference.
  rng = np.random.default_rng(bits)
  k, n, block_size = 1024, 72, 64
  codes = rng.integers(0, 2**bits, (k, n))
  codebook = np.sort(rng.normal(size=2**bits)).astype(np.float32)
  scales = rng.uniform(0.5, 2.0, (k // block_size, n)).astype(np.float32)
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = codebook[codes] * np.repeat(scales, block_size, axis=0)
  reference = x.astype(np.float64) @ w.astype(np.float64)
  y = qmatmul_pallas_gpu(jnp.asarray(x), jq.packing.pack(jnp.asarray(codes), bits, axis=0),
                         jnp.asarray(scales), jnp.asarray(codebook), bits=bits,
                         block_size=block_size, variant=variant, interpret=INTERPRET)
  assert np.max(np.abs(np.asarray(y) - reference)) <= 1e-5 * np.max(np.abs(reference))


def test_split_k_sums_the_same_products():
  args, bits, _ = problem("nf4", 64, 2, 1024, 128, jnp.float32)
  whole = qmatmul_pallas_gpu(*args, bits=bits, block_size=64, interpret=INTERPRET,
                             block_sizes=BlockSizes(2, 128, 256))
  split = qmatmul_pallas_gpu(*args, bits=bits, block_size=64, interpret=INTERPRET,
                             block_sizes=BlockSizes(2, 128, 256, split_k=4))
  np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("variant,m,sizes", [
    ("gemv", 2, BlockSizes(2, 64, 128, split_k=3, split="atomic")),
    ("gemm", 32, BlockSizes(16, 32, 64, split_k=4, split="atomic")),
    ("gemm", 32, BlockSizes(32, 64, 256, split_k=2)),
])
@pytest.mark.parametrize("fmt,block_size", [("nf4", 64), ("int3", 32)])
def test_atomic_and_sliced_split_k_match_the_reference(variant, m, sizes, fmt, block_size):
  # 1000 rows: K tiles beyond Kp in the last split; N = 128 is whole tiles (atomic adds
  # have no masks).
  args, bits, reference = problem(fmt, block_size, m, 1000, 128, jnp.float32, seed=3)
  y = qmatmul_pallas_gpu(*args, bits=bits, block_size=block_size, block_sizes=sizes,
                         variant=variant, interpret=INTERPRET)
  error = np.max(np.abs(np.asarray(y) - np.asarray(reference)))
  assert error <= 1e-5 * np.max(np.abs(np.asarray(reference))), error


def test_gemm_decodes_every_position_of_straddling_codes():
  # 5 bits: 32 codes per 5-word unit, 4 of them straddling two words; a tile of one unit.
  rng = np.random.default_rng(5)
  k, n, m, block_size = 256, 16, 16, 32
  codes = rng.integers(0, 32, (k, n))
  codebook = rng.normal(size=32).astype(np.float32)
  scales = rng.uniform(0.5, 2.0, (k // block_size, n)).astype(np.float32)
  x = rng.normal(size=(m, k)).astype(np.float32)
  reference = x.astype(np.float64) @ (codebook[codes] * np.repeat(scales, block_size, 0))
  y = qmatmul_pallas_gpu(jnp.asarray(x), jq.packing.pack(jnp.asarray(codes), 5, axis=0),
                         jnp.asarray(scales), jnp.asarray(codebook), bits=5,
                         block_size=block_size, variant="gemm",
                         block_sizes=BlockSizes(16, 16, 32), interpret=INTERPRET)
  assert np.max(np.abs(np.asarray(y) - reference)) <= 1e-5 * np.max(np.abs(reference))


@pytest.mark.parametrize("variant,m,sizes", [
    ("gemv", 4, BlockSizes(4, 256, 64, split_k=16, num_warps=2, num_stages=1, split="atomic")),
    ("gemm", 64, BlockSizes(64, 256, 128, split_k=8, num_warps=2, num_stages=2,
                            split="atomic")),
])
def test_atomic_split_lowers_to_triton_for_cuda(variant, m, sizes):
  k, n, bits = 8192, 4096, 4
  shapes = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((k * bits // 32, n), jnp.uint32),
            jax.ShapeDtypeStruct((k // 64, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((2**bits,), jnp.float32))
  f = jax.jit(lambda *a: qmatmul_pallas_gpu(*a, bits=bits, block_size=64, variant=variant,
                                            block_sizes=sizes))
  exported = jax.export.export(
      f, platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
  text = exported.mlir_module()
  assert "output_operand_alias" in text  # the zeroed output the programs add into
  assert exported.out_avals[0].shape == (m, n)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,variant", [(1, "gemv"), (130, "gemm")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("k,block_size", [(1024, 64), (96, 32)])  # (96: a masked K tail)
def test_lowers_to_triton_for_cuda(bits, m, variant, dtype, k, block_size):
  n = 200
  shapes = (jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((k * bits // 32, n), jnp.uint32),
            jax.ShapeDtypeStruct((k // block_size, n), jnp.float32),
            jax.ShapeDtypeStruct((2**bits,), jnp.float32))
  # No `variant`: the default must pick the GEMV for M = 1 and the GEMM for M = 130.
  f = jax.jit(lambda *a: qmatmul_pallas_gpu(*a, bits=bits, block_size=block_size))
  exported = jax.export.export(
      f, platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
  text = exported.mlir_module()
  assert TRITON_CALL in text
  assert f'name = "jaxquant_qmatmul_{variant}"' in text
  assert exported.out_avals[0].shape == (m, n)


@pytest.mark.parametrize("bits", [1, 2, 5, 6, 7, 8])
def test_default_block_sizes_lower_for_every_bit_width(bits):
  k, n = 8192, 4096
  for m, variant in ((1, "gemv"), (8, "gemv"), (16, "gemm"), (512, "gemm")):
    shapes = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
              jax.ShapeDtypeStruct((k * bits // 32, n), jnp.uint32),
              jax.ShapeDtypeStruct((k // 128, n), jnp.float32),
              jax.ShapeDtypeStruct((2**bits,), jnp.float32))
    f = jax.jit(lambda *a: qmatmul_pallas_gpu(*a, bits=bits, block_size=128, variant=variant))
    exported = jax.export.export(
        f, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
    assert f'name = "jaxquant_qmatmul_{variant}"' in exported.mlir_module()
    assert default_block_sizes(variant, m, k, n, bits).split_k >= 1


def test_bad_input_names_the_argument():
  args, bits, _ = problem("nf4", 64, 2, 256, 64, jnp.float32)
  x, codes, scales, codebook = args

  def call(*a, **kw):
    return qmatmul_pallas_gpu(*a, **{"bits": bits, "block_size": 64, "interpret": True, **kw})

  with pytest.raises(TypeError, match="x must be"):
    call(x.astype(jnp.int32), codes, scales, codebook)
  with pytest.raises(TypeError, match="codes must be uint32"):
    call(x, codes.astype(jnp.int32), scales, codebook)
  with pytest.raises(TypeError, match="scales must be float32 or bfloat16"):
    call(x, codes, scales.astype(jnp.float16), codebook)
  with pytest.raises(TypeError, match="codebook must be float32"):
    call(x, codes, scales, codebook.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="x must be"):
    call(x[0], codes, scales, codebook)
  with pytest.raises(ValueError, match=r"x.shape\[1\]=224"):
    call(x[:, :224], codes, scales, codebook)
  with pytest.raises(ValueError, match="codes must be"):
    call(x, codes[:-4], scales, codebook)
  with pytest.raises(ValueError, match="scales must be"):
    call(x, codes, scales[:, :-1], codebook)
  with pytest.raises(ValueError, match="codebook must have exactly 2\\*\\*bits = 16"):
    call(x, codes, scales, codebook[:15])
  with pytest.raises(ValueError, match="bits=9"):
    call(x, codes, scales, codebook, bits=9)
  with pytest.raises(NotImplementedError, match="block_size=48"):
    call(x, codes, scales, codebook, block_size=48)
  with pytest.raises(ValueError, match="variant='gemx'"):
    call(x, codes, scales, codebook, variant="gemx")
  with pytest.raises(TypeError, match="block_sizes must be a BlockSizes"):
    call(x, codes, scales, codebook, block_sizes=(1, 64, 64))
  with pytest.raises(ValueError, match="block_sizes.block_n=48"):
    call(x, codes, scales, codebook, block_sizes=BlockSizes(2, 48, 64))
  with pytest.raises(ValueError, match="block_sizes.block_k=8 must be >= 16"):
    call(x, codes, scales, codebook, variant="gemm", block_sizes=BlockSizes(16, 64, 8))
  with pytest.raises(ValueError, match="block_sizes.split='tree'"):
    call(x, codes, scales, codebook, block_sizes=BlockSizes(2, 64, 64, split="tree"))
  with pytest.raises(ValueError, match="split='atomic' needs block_m=4 to divide M=2"):
    call(x, codes, scales, codebook, block_sizes=BlockSizes(4, 64, 64, split="atomic"))
