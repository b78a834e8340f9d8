"""The numerical oracle for `qmatmul`: dequantise the whole weight, then one dense dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.qarray import QuantisedArray, dequantise


def qmatmul_reference(x: jax.Array, q: QuantisedArray) -> jax.Array:
  """x[M, K] @ W[K, N] in float32 at the highest precision (materialises W)."""
  return jnp.dot(x.astype(jnp.float32), dequantise(q, jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def qmatmul_transposed_reference(g: jax.Array, q: QuantisedArray) -> jax.Array:
  """g[M, N] @ W[K, N]ᵀ in float32 (the gradient of `qmatmul_reference` w.r.t. x)."""
  return jnp.dot(g.astype(jnp.float32), dequantise(q, jnp.float32).T,
                 precision=jax.lax.Precision.HIGHEST)
