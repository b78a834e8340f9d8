"""The CPU lookup matmul: x[M, K] @ W[K, N] by a native kernel registered with XLA's FFI.

W[k, n] = codebook[c[k, n]] · s[⌊k/B⌋, n] is read from its packed codes (layout 1, packed along
K) and never materialised (`_cpu.cc`). Three loop nests:

- M = 1 with 1-, 2- or 4-bit codes and blocks of whole 32-code groups: a GEMV by byte tables.
  Byte j of a group's bit stream holds 8/b codes, so its share of Σ_k x[k]·codebook[c[k, n]]
  is T_j[byte], a 256-entry table built once per group for all N columns; a column costs one
  load and one add per byte (two weights at 4 bits), and threads take ranges of K blocks.
- other M = 1 products, on AVX2: 8 columns' codes decoded at once with the same shifts, looked
  up in the codebook held in vector registers (``vpermps``; a gather above 5 bits), summed
  over each block in registers, then scaled.
- M > 1 on AVX2: a K chunk of a 16-column strip decoded and scaled into an L1-resident buffer,
  multiplied into all M rows by a 6 × 16 register-blocked micro-kernel.

Column ranges (K ranges for the byte tables) run on XLA's intra-op thread pool, a thread per
2^18 multiply-adds at most. The instruction set is chosen at run time (AVX2 with FMA and F16C
where the CPU has them, else plain C++, which is also the reference the tests hold the AVX2
path to).

The kernel takes block scales in float32, bfloat16 or float16 as stored and float32 or bfloat16
activations; other scale dtypes (float8, e8m0, 8-bit codes of double quantisation) are decoded
to float32 first, float16 activations are cast to float32, channel and tensor scales are one
block the length of K, and block offsets (minmax) are added outside the kernel
(`jaxquant.kernels.offset_product`).

The extension is compiled at install (``setup.py``); where it is absent, `available` is False
and `jaxquant.kernels`'s ``"auto"`` backend says so once and uses the XLA loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels import xla
from jaxquant.qarray import QuantisedArray

try:
  from jaxquant.kernels import _cpu
except ImportError as _error:  # a source checkout that was not built, or no compiler
  _cpu = None
  MISSING = f"jaxquant's CPU kernel is not built ({_error}); reinstall with `pip install -e .`"
else:
  MISSING = None

TARGET = "jaxquant_lookup_matmul"
ISAS = ("auto", "scalar", "avx2")
SCALE_DTYPES = ("float32", "bfloat16", "float16")  # taken as stored; others decoded to float32
ACTIVATION_DTYPES = ("float32", "bfloat16")  # taken as they are; float16 is cast to float32


def available() -> bool:
  """Whether the compiled kernel is importable."""
  return _cpu is not None


def isas() -> tuple[str, ...]:
  """The instruction sets this CPU runs the kernel with (``()`` when it is not built)."""
  return _cpu.isas() if _cpu is not None else ()


@functools.cache
def _register() -> None:
  jax.ffi.register_ffi_target(TARGET, _cpu.handler(), platform="cpu")


def qmatmul_cpu(x: jax.Array, q: QuantisedArray, *, threads: int | None = None,
                isa: str = "auto") -> jax.Array:
  """x[M, K] @ W[K, N] in float32 for a symmetric W [K, N] packed along K (axis 0).

  Args:
    x: [M, K] activations (float32, bfloat16 or float16).
    q: the weight, 2-d, quantised along axis 0, without offsets (`QuantisedArray.symmetric_part`).
    threads: workers over column ranges, or K ranges for the byte-table GEMV (None: a thread
      per 2^18 multiply-adds, at most XLA's intra-op pool size).
    isa: ``"auto"`` (the best this CPU has), ``"scalar"`` or ``"avx2"``.

  Raises:
    RuntimeError: the extension is not built.
    ValueError: a weight or argument the kernel does not take (named in the message).
  """
  if _cpu is None:
    raise RuntimeError(MISSING)
  if isa not in ISAS:
    raise ValueError(f"{isa=} is not one of {ISAS}")
  if isa not in ("auto",) + isas():
    raise ValueError(f"{isa=}: this CPU runs the kernel with {isas()} only")
  if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                              or threads < 1):
    raise ValueError(f"{threads=} must be a positive int or None")
  if q.ndim != 2 or q.axis != 0 or q.offsets is not None:
    raise ValueError(f"the CPU kernel takes a symmetric 2-d weight packed along axis 0; got "
                     f"shape {q.shape}, axis {q.axis}, "
                     f"{'with' if q.offsets is not None else 'without'} offsets")
  if x.ndim != 2 or x.shape[1] != q.shape[0]:
    raise ValueError(f"x has shape {x.shape}; it must be [M, K] with K = {q.shape[0]}")
  _register()
  k_stored = xla.padded_length(q)
  if jnp.dtype(x.dtype).name not in ACTIVATION_DTYPES:
    x = x.astype(jnp.float32)
  x = jnp.pad(x, ((0, 0), (0, k_stored - x.shape[1])))
  scales = q.scales
  if jnp.dtype(scales.dtype).name not in SCALE_DTYPES or q.scale_scales is not None:
    scales = q.decoded_scales()
  block_size = q.block_size if q.granularity == "block" else k_stored
  scales = jnp.broadcast_to(scales, (scales.shape[0], q.shape[1]))
  scales = jnp.pad(scales, ((0, -(-k_stored // block_size) - scales.shape[0]), (0, 0)))
  codebook = jnp.asarray(q.codebook, jnp.float32)[:2**q.bits]
  codebook = jnp.pad(codebook, (0, 2**q.bits - codebook.shape[0]))
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], q.shape[1]), jnp.float32),
                          vmap_method="sequential")
  return call(x, q.codes, scales, codebook, bits=np.int64(q.bits),
              block_size=np.int64(block_size), threads=np.int64(threads or 0),
              isa=np.int64(ISAS.index(isa)))
