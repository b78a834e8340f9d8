"""The Pallas TPU kernel: correctness, Mosaic lowering, bad input.

Correctness compares the kernel with x @ dequantise(q) in float32: compiled on a TPU, in
interpret mode elsewhere (plus one case under `pltpu.InterpretParams`, which models TPU memory
spaces). Interpret mode accepts things Mosaic cannot lower, so the lowering tests export each
configuration for TPU, which runs jax's Pallas-to-Mosaic lowering on any backend; Mosaic's own
compilation (layouts, LLO) still needs a TPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

import jaxquant as jq
from jaxquant import formats, packing
from jaxquant.kernels.pallas_tpu import GEMM, GEMV, BlockSizes, qmatmul_pallas_tpu

FORMATS = {
    "nf4": formats.nf4(),
    "int2": formats.int_format(2),
    "int3": formats.int_format(3),
    "int5": formats.int_format(5),
    "int6": formats.int_format(6),
    "int7": formats.int_format(7),
    "int8": formats.int_format(8),
    "crd-t5-signmax-3b": formats.crd_format("t", 3, scaling="signmax", block_size=64, df=5),
}
INTERPRET = jax.default_backend() != "tpu"
MOSAIC_CALL = "tpu_custom_call"


@functools.lru_cache(maxsize=None)
def weight(fmt, block_size, k, n):
  """W[k, n] quantised along K, with the kernel's codes, scales and padded codebook."""
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
  q = jq.quantise(w, jq.QuantSpec(FORMATS[fmt], block_size=block_size, axis=0))
  codebook = jnp.pad(q.codebook, (0, 2**q.bits - q.codebook.shape[0]), mode="edge")
  return q, (q.codes, jq.scaling.decode_scales(q.scales, q.scale_scales), codebook)


def problem(fmt, block_size, m, k, n, dtype):
  """Kernel arguments for x[m, k] @ W[k, n] and the float32 reference y."""
  q, weight_args = weight(fmt, block_size, k, n)
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
  reference = jnp.dot(x.astype(jnp.float32), jq.dequantise(q, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  padded_k = q.codes.shape[0] * 32 // q.bits
  return (jnp.pad(x, ((0, 0), (0, padded_k - k))), *weight_args), q.bits, reference


def relative_error(y, reference):
  return float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))


def tolerance(dtype):
  # bf16 activations meet bf16 weights (rounded after scaling) in the dot.
  return 1e-5 if dtype == jnp.float32 else 1e-2


# (format, block_size, M, K, N, x dtype, block sizes); None = `default_block_sizes(M)`, which
# is GEMV up to M = 64 and GEMM above. Every value of every axis appears at least once; at
# K = 4096 the grids stay short (interpret mode pays per step for the whole arrays).
CASES = [
    ("nf4", 64, 1, 4096, 512, jnp.float32, None),
    ("int3", 128, 3, 4096, 200, jnp.bfloat16, None),
    ("int8", 32, 130, 1000, 1, jnp.bfloat16, None),
    ("crd-t5-signmax-3b", 64, 8, 1000, 200, jnp.float32, None),
    ("int2", 32, 8, 1000, 512, jnp.bfloat16, None),
    ("nf4", 32, 130, 1000, 200, jnp.float32, None),
    ("int3", 64, 130, 64, 512, jnp.bfloat16, None),
    # The GEMM configuration at small M, and GEMV sizes at large M.
    ("nf4", 128, 8, 4096, 1, jnp.float32, GEMM),
    ("int2", 64, 3, 1000, 200, jnp.float32, GEMM),
    ("nf4", 32, 130, 1000, 200, jnp.bfloat16, GEMV),
    # Many tiles on every grid axis: 3 × 4 × 4 (bf16 M tiles are 16-row aligned) and 1 × 2 × 4
    # with 3-bit codes straddling words in every tile.
    ("nf4", 32, 130, 1000, 512, jnp.bfloat16, BlockSizes(block_m=64, block_n=128, block_k=256)),
    ("int3", 32, 3, 1000, 200, jnp.float32, BlockSizes(block_m=8, block_n=128, block_k=256)),
]


@pytest.mark.parametrize("fmt,block_size,m,k,n,dtype,sizes", CASES)
def test_matches_dequantised_matmul(fmt, block_size, m, k, n, dtype, sizes):
  args, bits, reference = problem(fmt, block_size, m, k, n, dtype)
  y = qmatmul_pallas_tpu(*args, bits=bits, block_size=block_size, block_sizes=sizes,
                         interpret=INTERPRET)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  assert relative_error(y, reference) < tolerance(dtype)


@pytest.mark.parametrize("fmt", ["int5", "int6", pytest.param("int7", marks=pytest.mark.slow)])
def test_other_code_widths(fmt):
  args, bits, reference = problem(fmt, 32, 3, 64, 1, jnp.float32)
  y = qmatmul_pallas_tpu(*args, bits=bits, block_size=32, interpret=INTERPRET)
  assert relative_error(y, reference) < 1e-5


def test_one_bit_codes():
  # No 1-bit format exists; pack random codes directly.
  key_codes, key_scales, key_x = jax.random.split(jax.random.key(2), 3)
  codes = jax.random.bernoulli(key_codes, shape=(256, 100)).astype(jnp.uint32)
  scales = jax.random.uniform(key_scales, (8, 100), jnp.float32, 0.5, 2.0)
  codebook = jnp.array([-0.75, 1.25], jnp.float32)
  x = jax.random.normal(key_x, (3, 256), jnp.float32)
  w = codebook[codes] * jnp.repeat(scales, 32, axis=0)
  y = qmatmul_pallas_tpu(x, packing.pack(codes, 1, axis=0), scales, codebook, bits=1,
                         block_size=32, interpret=INTERPRET)
  reference = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
  assert relative_error(y, reference) < 1e-5


@pytest.mark.parametrize("fmt,dtype", [("int3", jnp.float32), ("nf4", jnp.bfloat16)])
def test_tpu_interpret_params(fmt, dtype):
  # Simulated TPU memory: scratch starts as NaN (catches a missing accumulator zeroing) and
  # races between grid steps are detected.
  params = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
  args, bits, reference = problem(fmt, 32, 3, 256, 100, dtype)
  try:
    y = qmatmul_pallas_tpu(*args, bits=bits, block_size=32, interpret=params)
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  assert relative_error(y, reference) < tolerance(dtype)


def exported_text(bits, block_size, m, k, n, dtype, sizes):
  """The StableHLO text of the kernel exported for TPU (no TPU needed)."""
  kernel = functools.partial(qmatmul_pallas_tpu, bits=bits, block_size=block_size,
                             block_sizes=sizes)
  shapes = (jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((k * bits // 32, n), jnp.uint32),
            jax.ShapeDtypeStruct((k // block_size, n), jnp.float32),
            jax.ShapeDtypeStruct((2**bits,), jnp.float32))
  return jax.export.export(jax.jit(kernel), platforms=["tpu"])(*shapes).mlir_module()


@pytest.mark.parametrize("sizes", [GEMV, GEMM], ids=["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_lowers_to_mosaic(bits, dtype, sizes):
  m = 1 if sizes is GEMV else 256
  assert MOSAIC_CALL in exported_text(bits, 64, m, 4096, 4096, dtype, sizes)


@pytest.mark.parametrize("bits", [1, 2, 5, 6, 7])
def test_other_widths_lower_to_mosaic(bits):
  # Block sizes with fewer rows per scale than a loop step take the sublane-select path.
  assert MOSAIC_CALL in exported_text(bits, 32, 8, 2048, 128, jnp.bfloat16, None)


def test_lowers_with_ragged_shapes():
  # M, N and K padded inside the wrapper.
  assert MOSAIC_CALL in exported_text(4, 32, 3, 1024, 200, jnp.bfloat16, None)


def good_args():
  return (jnp.zeros((2, 64), jnp.float32), jnp.zeros((8, 16), jnp.uint32),
          jnp.ones((2, 16), jnp.float32), jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32))


@pytest.mark.parametrize("index,bad,error,match", [
    (0, jnp.zeros((2, 64), jnp.int32), TypeError, "x has dtype"),
    (0, jnp.zeros((2, 96), jnp.float32), ValueError, "x has shape"),
    (0, jnp.zeros((64,), jnp.float32), ValueError, "x has shape"),
    (1, jnp.zeros((8, 16), jnp.int32), TypeError, "codes"),
    (1, jnp.zeros((6, 16), jnp.uint32), ValueError, "codes has shape"),
    (2, jnp.ones((2, 16), jnp.bfloat16), TypeError, "scales"),
    (2, jnp.ones((1, 16), jnp.float32), ValueError, "scales has shape"),
    (3, jnp.zeros((15,), jnp.float32), ValueError, "codebook has shape"),
    (3, jnp.zeros((16,), jnp.float16), TypeError, "codebook"),
])
def test_bad_arrays(index, bad, error, match):
  args = list(good_args())
  args[index] = bad
  with pytest.raises(error, match=match):
    qmatmul_pallas_tpu(*args, bits=4, block_size=32, interpret=True)


def test_bad_settings():
  with pytest.raises(ValueError, match="bits"):
    qmatmul_pallas_tpu(*good_args(), bits=9, block_size=32, interpret=True)
  with pytest.raises(ValueError, match="block_size"):
    qmatmul_pallas_tpu(*good_args(), bits=4, block_size=0, interpret=True)
  with pytest.raises(NotImplementedError, match="block_size"):
    qmatmul_pallas_tpu(*good_args(), bits=4, block_size=48, interpret=True)
  with pytest.raises(TypeError, match="block_sizes"):
    qmatmul_pallas_tpu(*good_args(), bits=4, block_size=32, block_sizes=(8, 128, 128),
                       interpret=True)
  with pytest.raises(ValueError, match="block_n"):
    BlockSizes(block_m=8, block_n=100, block_k=256)

