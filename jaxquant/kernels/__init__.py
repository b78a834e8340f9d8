"""Activations contracted with a packed `QuantisedArray`, by a choice of backend.

`contract(x, q, contraction, backend)` is `lax.dot_general(x, W, ...)` in float32 for the
weight W that `q` represents, for any `Contraction` (`jaxquant.kernels.dimensions`).
Backends, each with a pure-jnp definition beside it (tests compare them with "reference"):

- ``"reference"``: dequantise the weight, then one dense float32 dot (the oracle).
- ``"xla"``: a loop over slabs of the weight that unpacks, looks up, scales and contracts one
  slab at a time, for every contraction (`jaxquant.kernels.xla`); the path for CPUs.
- ``"cpu"``: the native CPU kernel for x[M, K] @ W[K, N] (`jaxquant.kernels.cpu`, an XLA FFI
  handler compiled at install), for the same contractions as ``"pallas"``.
- ``"pallas"``: the platform's Pallas kernel for x[M, K] @ W[K, N] (Triton on GPU,
  `pallas_gpu`; Mosaic on TPU, `pallas_tpu`; on CPU the GPU kernel in interpret mode, for
  tests). It takes contractions that are that product without moving a code: W contracted
  on its packed axis 0 alone, no batch axes (W's other axes are flattened into N). Block
  offsets (minmax scaling) are added outside the kernels (`offset_product`).
- ``"auto"``: on CPU ``"cpu"`` for a contraction it takes with M ≤ `AUTO_CPU_MAX_M` (beyond,
  the XLA loop's dense slab dots are the faster path, `benchmarks/matmul.py`; where the
  extension is not built auto says so once) when there is one device, else ``"xla"``: XLA
  cannot partition the kernel's custom call, so under a mesh of CPU devices it would run it
  replicated on whole operands (the named ``"cpu"`` backend does that). On GPU and TPU, for a
  contraction the kernel takes, the Pallas kernel where it is the faster path, else
  dequantise and one dense dot. GPU: where the kernel beat dequantise-then-dot when measured at
  the nearest shape
  (`jaxquant.kernels.gpu_tuning`, a committed table written by `benchmarks/gpu_sweep.sh`).
  TPU: while the weight stream dominates, M ≤ `AUTO_PALLAS_MAX_M` (reasoned, not yet
  measured). When the kernel refuses a weight (per-channel scales, a block size it does not
  take) auto says why, once, and dequantises. A named backend never falls back: one that
  cannot run raises.

The custom VJP differentiates with respect to x only: the cotangent is the same kind of
contraction of g with W (`Contraction.transposed`), computed from the packed weight, so no float
copy of W is kept for the backward pass. The packed weight is a constant (zero cotangent).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels import cpu, gpu_tuning, reference, xla
from jaxquant.kernels.dimensions import Contraction
from jaxquant.qarray import QuantisedArray, dequantise

BACKENDS = ("auto", "reference", "xla", "cpu", "pallas")
PALLAS_ACTIVATION_DTYPES = ("float32", "bfloat16")
# Largest M for which "auto" uses the Pallas kernel on TPU: where the 4-bit weight stream stops
# dominating (kernels.md §2.2: M_crit ≈ 64 on v5e at 4.25 bits); not yet measured.
AUTO_PALLAS_MAX_M = {"tpu": 64}
# Largest M for which "auto" uses the native CPU kernel: it was the faster path up to M = 32 and
# the XLA loop from M = 64 on (K = N ∈ {576, 1024, 4096}, NF4, benchmarks/RESULTS.md).
AUTO_CPU_MAX_M = 32
_PALLAS_PLATFORMS = ("gpu", "tpu")
_SAID = set()


def check_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"{backend=} is not one of {BACKENDS}")
  return backend


def contract(x: jax.Array, q: QuantisedArray, contraction: Contraction,
             backend: str = "auto") -> jax.Array:
  """`lax.dot_general(x, W, contraction.dimension_numbers)` in float32 for the packed W."""
  return _contract(x, q, contraction, check_backend(backend), jnp.dtype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _contract(x, q, contraction, backend, x_dtype):
  del x_dtype
  return _forward(x, q, contraction, backend)


def _contract_fwd(x, q, contraction, backend, x_dtype):
  return _contract(x, q, contraction, backend, x_dtype), q


def _contract_bwd(contraction, backend, x_dtype, q, g):
  grad_x = contract_transposed(g, q, contraction, backend).astype(x_dtype)
  zero = lambda leaf: (np.zeros(leaf.shape, jax.dtypes.float0)
                       if not jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.zeros_like(leaf))
  return grad_x, jax.tree_util.tree_map(zero, q)


_contract.defvjp(_contract_fwd, _contract_bwd)


def contract_transposed(g: jax.Array, q: QuantisedArray, contraction: Contraction,
                        backend: str = "auto") -> jax.Array:
  """The cotangent of x for `contract(x, q, contraction)` and output cotangent `g` (float32).

  The product is not the kernel's x @ W, so a "pallas" or "cpu" forward is differentiated by
  "auto".
  """
  backward, to_x = contraction.transposed()
  backend = "auto" if backend in ("pallas", "cpu") else backend
  return jnp.transpose(_forward(g, q, backward, backend), to_x)


def _forward(x, q: QuantisedArray, contraction: Contraction, backend: str) -> jax.Array:
  if backend == "reference":
    return reference.dot_general_reference(x, q, contraction)
  if backend == "xla":
    return xla.dot_general_xla(x, q, contraction)
  if backend in ("pallas", "cpu"):
    return _matrix_product(x, q, contraction, backend)
  platform = jax.default_backend()
  if platform not in _PALLAS_PLATFORMS:
    if (not _is_kernel_product(q, contraction) or _rows(x, contraction) > AUTO_CPU_MAX_M
        or jax.device_count() > 1):
      return xla.dot_general_xla(x, q, contraction)
    if not cpu.available():
      _say_once(f"backend='auto' uses the XLA loop on CPU: {cpu.MISSING}")
      return xla.dot_general_xla(x, q, contraction)
    return _matrix_product(x, q, contraction, "cpu")
  if _is_kernel_product(q, contraction) and _pallas_is_faster(platform, _rows(x, contraction), q):
    try:
      return _matrix_product(x, q, contraction, "pallas")
    except NotImplementedError as error:
      _say_once(f"backend='auto' dequantises the weight and uses a dense dot on {platform}: "
                f"{error}")
  return jax.lax.dot_general(x, dequantise(q).astype(x.dtype), contraction.dimension_numbers,
                             preferred_element_type=jnp.float32)


def _say_once(message: str) -> None:
  if message not in _SAID:
    _SAID.add(message)
    warnings.warn(message, stacklevel=4)


def _is_kernel_product(q: QuantisedArray, contraction: Contraction) -> bool:
  """W contracted on its packed axis 0 alone with no batch axes: x[M, K] @ W[K, N]."""
  return q.axis == 0 and contraction.w_contracting == (0,) and not contraction.w_batch


def _rows(x: jax.Array, contraction: Contraction) -> int:
  return math.prod(x.shape[a] for a in contraction.x_free)


def _pallas_is_faster(platform: str, rows: int, q: QuantisedArray) -> bool:
  """Whether auto should call the Pallas kernel for x[rows, K] @ q (module docstring)."""
  if platform == "tpu":
    return rows <= AUTO_PALLAS_MAX_M["tpu"]
  return gpu_tuning.pallas_is_faster(max(rows, 1), q.shape[0], math.prod(q.shape[1:]), q.bits)


def _matrix_product(x, q: QuantisedArray, contraction: Contraction, backend: str) -> jax.Array:
  """The contraction as the `backend` kernel's x[M, K] @ W[K, N] (x's free axes flattened into
  M, W's into N)."""
  if not _is_kernel_product(q, contraction):
    raise NotImplementedError(
        f"the {'Pallas' if backend == 'pallas' else 'CPU'} kernels compute x[M, K] @ W[K, N] "
        "for a weight contracted on its packed axis 0 alone; this contraction "
        f"({contraction.dimension_numbers} with the weight quantised along axis {q.axis}) is "
        "not one: use backend 'xla' or 'auto'")
  k_axis = contraction.x_contracting[0]
  rows = jnp.moveaxis(x, k_axis, -1)
  kernel = qmatmul_pallas if backend == "pallas" else qmatmul_cpu
  y = kernel(rows.reshape(-1, q.shape[0]), as_matrix(q))
  return y.reshape(rows.shape[:-1] + q.shape[1:])


def qmatmul_cpu(x: jax.Array, q: QuantisedArray, **options) -> jax.Array:
  """x[M, K] @ W[K, N] in float32 by the CPU kernel (`jaxquant.kernels.cpu.qmatmul_cpu`, which
  takes `options`); block offsets are added by `offset_product`."""
  return _plus_offsets(x, q, cpu.qmatmul_cpu(x, q.symmetric_part(), **options))


def _plus_offsets(x: jax.Array, q: QuantisedArray, symmetric_product: jax.Array) -> jax.Array:
  return symmetric_product if q.offsets is None else symmetric_product + offset_product(x, q)


def as_matrix(q: QuantisedArray) -> QuantisedArray:
  """`q` [K, F...] viewed as [K, ∏F] (a reshape of the trailing axes: no code moves)."""
  if q.ndim == 2:
    return q
  n = math.prod(q.shape[1:])
  return QuantisedArray(
      codes=q.codes.reshape(q.codes.shape[0], n), scales=q.scales.reshape(q.scales.shape[0], -1),
      codebook=q.codebook, scale_scales=q.scale_scales, shape=(q.shape[0], n), dtype=q.dtype,
      axis=0, block_size=q.block_size, bits=q.bits, granularity=q.granularity,
      layout=q.layout, layout_version=q.layout_version,
      offsets=None if q.offsets is None else q.offsets.reshape(q.offsets.shape[0], -1),
      offset_scales=q.offset_scales, scale_group=q.scale_group)


def qmatmul_pallas(x: jax.Array, q: QuantisedArray) -> jax.Array:
  """The platform's Pallas kernel for x[M, K] @ W[K, N] (interpret mode on CPU); float32.

  An asymmetric W (block offsets o) is the kernel's product with its symmetric part plus
  `offset_product`, so every kernel takes it unchanged.

  Raises:
    NotImplementedError: the kernel does not take this weight or these activations: scales
      per channel or per tensor, a block size that is not a power of two ≥ 32, or
      activations that are not float32 or bfloat16.
  """
  if q.granularity != "block":
    raise NotImplementedError(
        f"the Pallas kernels take block scales; this weight has {q.granularity} scales")
  if jnp.dtype(x.dtype).name not in PALLAS_ACTIVATION_DTYPES:
    raise NotImplementedError(f"the Pallas kernels take {PALLAS_ACTIVATION_DTYPES} "
                              f"activations, not {jnp.dtype(x.dtype).name}")
  platform = jax.default_backend()
  if platform == "tpu":
    from jaxquant.kernels.pallas_tpu import qmatmul_pallas_tpu as kernel  # pylint: disable=import-outside-toplevel
  else:
    from jaxquant.kernels.pallas_gpu import qmatmul_pallas_gpu as kernel  # pylint: disable=import-outside-toplevel
  y = kernel(*kernel_operands(x, q.symmetric_part(), platform), bits=q.bits,
             block_size=q.block_size, interpret=platform == "cpu")
  return _plus_offsets(x, q, y)


def offset_product(x: jax.Array, q: QuantisedArray) -> jax.Array:
  """The offsets' share of x[M, K] @ W[K, N] for W = S + O with O[k, n] = o[⌊k/B⌋, n]:
  Σ_k x[m, k]·o[⌊k/B⌋, n] = Σ_b (Σ_{k in block b} x[m, k])·o[b, n], a dot of x's block sums
  [M, K/B] with the offsets [K/B, N] (float32)."""
  m, k = x.shape
  length = q.n_blocks * q.block_size
  sums = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, length - k)))
  sums = jnp.sum(sums.reshape(m, q.n_blocks, q.block_size), axis=2)
  return jnp.dot(sums, q.decoded_offsets(), precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def kernel_operands(x: jax.Array, q: QuantisedArray, platform: str) -> tuple[jax.Array, ...]:
  """(x, codes, scales, codebook) as the Pallas kernels of `platform` take them: x zero-padded
  along K to the stored length, the scales decoded (bfloat16 scales kept as stored for the
  GPU kernel: no decoding pass, half the bytes of float32) and padded to whole blocks."""
  k_stored = xla.padded_length(q)
  x = jnp.pad(x, ((0, 0), (0, k_stored - x.shape[1])))
  if platform != "tpu" and q.scales.dtype == jnp.bfloat16:
    scales = q.scales
  else:
    scales = q.decoded_scales()
  scales = jnp.pad(scales, ((0, k_stored // q.block_size - scales.shape[0]), (0, 0)))
  return x, q.codes, scales, q.codebook
