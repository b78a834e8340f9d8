"""Codebook lookup without a gather: a select tree over the bits of the code.

For a codebook v₀ … v_{2^b − 1} and a b-bit code c = Σ_j c_j 2^j, level j of the tree keeps
v_{…c_j…}: pairs (v_{2i}, v_{2i+1}) are merged by `where(c_j, v_{2i+1}, v_{2i})`, halving the
candidates each level, 2^b − 1 selects in all. Every select is elementwise with scalar
operands, so the tree runs where a gather cannot (Pallas TPU and Triton lowerings) and, on
CPU, vectorises where XLA's gather does not: it is the faster lookup up to 4 bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select_lookup(codes: jax.Array, codebook, bits: int) -> jax.Array:
  """codebook[codes] for uint32 `codes` < 2**bits; `codebook` has ≥ 2**bits entries.

  `codebook` may be an array or a Pallas ref (entries are read as scalars, `codebook[i]`).
  Returns float32 values of the shape of `codes`.
  """
  values = [jnp.asarray(codebook[i], jnp.float32) for i in range(2**bits)]
  for level in range(bits):
    bit = jnp.bitwise_and(jnp.right_shift(codes, jnp.uint32(level)), jnp.uint32(1)) != 0
    values = [jnp.where(bit, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
  return jnp.broadcast_to(values[0], codes.shape)
