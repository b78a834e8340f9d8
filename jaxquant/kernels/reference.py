"""The numerical oracle for the packed contraction: dequantise the whole weight, one dense dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.kernels.dimensions import Contraction
from jaxquant.qarray import QuantisedArray, dequantise


def dot_general_reference(x: jax.Array, q: QuantisedArray, contraction: Contraction
                          ) -> jax.Array:
  """`lax.dot_general(x, W, ...)` in float32 at the highest precision (materialises W)."""
  return jax.lax.dot_general(x.astype(jnp.float32), dequantise(q, jnp.float32),
                             contraction.dimension_numbers,
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
