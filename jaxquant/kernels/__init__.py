"""`qmatmul`: activations times a packed quantised weight, with a choice of backend.

Backends (each has a pure-jnp definition beside it, and tests compare them with "reference"):

- ``"reference"``: dequantise the weight, then one dense float32 dot (the oracle).
- ``"xla"``: a loop over K chunks that unpacks, looks up, scales and accumulates one tile at a
  time; the path for CPUs (`jaxquant.kernels.xla`).
- ``"pallas"``: the Pallas kernel for the platform: Triton on GPU (`pallas_gpu`), Mosaic on
  TPU (`pallas_tpu`); on CPU the GPU kernel runs with ``interpret=True`` (slow; for tests).
- ``"auto"``: Pallas on GPU/TPU while the weight stream dominates (small M), dequantise and a
  dense dot beyond; ``"xla"`` on CPU. Only "auto" ever falls back: a named backend that cannot
  run raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import scaling
from jaxquant.kernels import reference, xla
from jaxquant.kernels.lookup import padded_codebook
from jaxquant.outliers import OutlierQuantisedArray
from jaxquant.qarray import QuantisedArray, dequantise

BACKENDS = ("auto", "reference", "xla", "pallas")
ACTIVATION_DTYPES = ("float32", "bfloat16")
# Largest M for which "auto" uses the Pallas kernel. GPU: measured on an H200 (RESULTS.md,
# 2026-11-28), the Triton GEMV beats dequantise + dot at M = 1 (1.3-2.0× at K = N = 8192) and
# the GEMM loses to it from M = 16 on. TPU: where the 4-bit weight stream stops dominating
# (kernels.md §2.2: M_crit ≈ 64 on v5e at 4.25 bits); not yet measured.
AUTO_PALLAS_MAX_M = {"gpu": 8, "tpu": 64}


def qmatmul(x: jax.Array, q: QuantisedArray | OutlierQuantisedArray, *,
            backend: str = "auto") -> jax.Array:
  """x[..., K] @ W[K, N] for a weight quantised with blocks along K (``axis=0``).

  Differentiable with respect to `x` (a custom VJP computes g @ Wᵀ chunk by chunk from the
  packed weight, so no float copy of W is kept for the backward pass). The quantised weight
  is a constant: its gradient is zero (train float master weights with `fake_quantise`).

  With sparse outliers (Orr et al. 2025, §4 item 9), W = dequantise(dense) + S and the dense
  product (by `backend`) gets the sparse correction (x S)[m, n] = Σ_{j: n_j = n} x[m, k_j] v_j,
  (k_j, n_j) = divmod(indices_j, N), added in float32: O(M · n_outliers) work, no dense S.

  Args:
    x: activations, float32 or bfloat16, last axis K = q.shape[0].
    q: a 2-D `QuantisedArray` quantised along axis 0 (any format of 1–8 bits, any scaling
      and scale storage), or an `OutlierQuantisedArray` whose dense part is one.
    backend: one of ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas"``.

  Returns:
    x @ W with shape ``x.shape[:-1] + (N,)`` in x's dtype (accumulated in float32).

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> w = jax.random.normal(jax.random.key(0), (256, 128))
    >>> q = jq.quantise(w, jq.QuantSpec("nf4", axis=0))
    >>> x = jnp.ones((2, 256))
    >>> y = jq.qmatmul(x, q)
    >>> y.shape, bool(jnp.allclose(y, x @ q.dequantise(), rtol=1e-4, atol=1e-3))
    ((2, 128), True)
  """
  if backend not in BACKENDS:
    raise ValueError(f"{backend=} is not one of {BACKENDS}")
  outliers = None
  if isinstance(q, OutlierQuantisedArray):
    q, outliers = q.dense, q
  if not isinstance(q, QuantisedArray):
    raise TypeError(
        f"q must be a QuantisedArray or an OutlierQuantisedArray, got {type(q).__name__}")
  if q.ndim != 2 or q.axis != 0:
    raise ValueError(
        f"q must be a 2-D weight [K, N] quantised along axis 0 (the contraction axis); got "
        f"shape {q.shape} with axis={q.axis}: quantise with QuantSpec(..., axis=0)")
  x = jnp.asarray(x)
  if jnp.dtype(x.dtype).name not in ACTIVATION_DTYPES:
    raise TypeError(f"x has dtype {jnp.dtype(x.dtype).name}; qmatmul takes {ACTIVATION_DTYPES}")
  if x.ndim < 1 or x.shape[-1] != q.shape[0]:
    raise ValueError(f"x has shape {x.shape}; its last axis must be K = {q.shape[0]}")
  rows = x.reshape(-1, q.shape[0])
  y = _qmatmul(rows, q, backend)
  if outliers is not None:
    y = (y.astype(jnp.float32) + _sparse_correction(rows, outliers)).astype(x.dtype)
  return y.reshape(x.shape[:-1] + (q.shape[1],))


def _sparse_correction(x: jax.Array, q: OutlierQuantisedArray) -> jax.Array:
  """x[M, K] @ S[K, N] in float32 for the outliers S of `q`, scattered by output column."""
  k, n = jnp.divmod(q.indices, q.shape[1])
  products = x[:, k].astype(jnp.float32) * q.values.astype(jnp.float32)[None, :]
  return jnp.zeros((x.shape[0], q.shape[1]), jnp.float32).at[:, n].add(products)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul(x, q, backend):
  return _forward(x, q, backend).astype(x.dtype)


def _qmatmul_fwd(x, q, backend):
  return _qmatmul(x, q, backend), q


def _qmatmul_bwd(backend, q, g):
  transposed = (reference.qmatmul_transposed_reference if backend == "reference"
                else xla.qmatmul_transposed_xla)
  grad_x = transposed(g, q).astype(g.dtype)
  zero = lambda leaf: (np.zeros(leaf.shape, jax.dtypes.float0)
                       if not jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.zeros_like(leaf))
  return grad_x, jax.tree_util.tree_map(zero, q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _forward(x, q, backend):
  if backend == "reference":
    return reference.qmatmul_reference(x, q)
  if backend == "xla":
    return xla.qmatmul_xla(x, q)
  if backend == "pallas":
    return qmatmul_pallas(x, q)
  platform = jax.default_backend()
  if platform in AUTO_PALLAS_MAX_M:
    if x.shape[0] <= AUTO_PALLAS_MAX_M[platform]:
      try:
        return qmatmul_pallas(x, q)
      except NotImplementedError:
        return xla.qmatmul_xla(x, q)
    return jnp.dot(x, dequantise(q, x.dtype), preferred_element_type=jnp.float32)
  return xla.qmatmul_xla(x, q)


def qmatmul_pallas(x: jax.Array, q: QuantisedArray) -> jax.Array:
  """The platform's Pallas kernel (interpret mode on CPU); float32 result.

  Raises:
    NotImplementedError: the weight has one scale per channel or per tensor, or a block size
      the kernel does not take (the kernels take blocks along K of 32, 64 or 128).
  """
  if q.granularity != "block":
    raise NotImplementedError(
        f"the Pallas kernels take block scales; this weight has {q.granularity} scales")
  platform = jax.default_backend()
  if platform == "tpu":
    from jaxquant.kernels.pallas_tpu import qmatmul_pallas_tpu as kernel  # pylint: disable=import-outside-toplevel
  else:
    from jaxquant.kernels.pallas_gpu import qmatmul_pallas_gpu as kernel  # pylint: disable=import-outside-toplevel
  k_stored = xla.padded_length(q)
  x = jnp.pad(x, ((0, 0), (0, k_stored - x.shape[1])))
  if platform != "tpu" and q.scales.dtype == jnp.bfloat16:
    scales = q.scales  # read as stored: no decoding pass, half the bytes of float32
  else:
    scales = scaling.decode_scales(q.scales, q.scale_scales)
  scales = jnp.pad(scales, ((0, k_stored // q.block_size - scales.shape[0]), (0, 0)))
  return kernel(x, q.codes, scales, padded_codebook(q.codebook, q.bits), bits=q.bits,
                block_size=q.block_size, interpret=platform == "cpu")
