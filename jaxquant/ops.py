"""`jnp`-style functions that take a weight as an operand: `einsum` and `take`.

Each runs the `jax.numpy` function itself through `jaxquant.interception`, so it accepts exactly
what `jnp` accepts (ellipses, implicit outputs, the weight as either operand) and every use of
the weight becomes the contraction core (`jaxquant.contraction.dot_general`) or the weight's
gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant import contraction, interception
from jaxquant.qat import FakeQuantised


def einsum(subscripts: str, *operands, preferred_element_type=None, spec=None,
           backend: str = "auto") -> jax.Array:
  """`jnp.einsum(subscripts, *operands)` where operands may be weights (`QuantisedArray`, …).

  Args:
    subscripts: the equation, as for `jnp.einsum`.
    *operands: the operands; weights contract through the core.
    preferred_element_type: the output dtype (default: as `jnp.einsum`, the activations').
    spec: quantisation-aware training: the last operand is a float weight, trained through
      its packed quantisation with this `QuantSpec` (`jaxquant.qat.FakeQuantised`).
    backend: the `jaxquant.kernels` backend.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> w = jax.random.normal(jax.random.key(0), (64, 4, 16))          # [d, heads, head_dim]
    >>> q = jq.quantise(w, jq.QuantSpec("nf4", axis=0))
    >>> x = jnp.ones((2, 7, 64))
    >>> y = jq.einsum("btd,dhk->bthk", x, q)
    >>> y.shape, bool(jnp.allclose(y, jnp.einsum("btd,dhk->bthk", x, q.dequantise()),
    ...                            rtol=1e-4, atol=1e-3))
    ((2, 7, 4, 16), True)
  """
  if spec is not None:
    operands = operands[:-1] + (FakeQuantised(jnp.asarray(operands[-1]), spec),)
  fn = functools.partial(jnp.einsum, subscripts, preferred_element_type=preferred_element_type)
  return interception.call(fn, *operands, backend=backend)


def take(w, indices, axis: int = 0, *, mode=None) -> jax.Array:
  """`jnp.take(W, indices, axis)` for a weight: gathers packed slices, then dequantises them.

  For an embedding table [vocabulary, features] quantised along the features, the rows the
  indices pick are the only ones dequantised. Out-of-range indices behave as in `jnp.take`
  (NaN rows by default, as for a float table).

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> table = jax.random.normal(jax.random.key(0), (1000, 64))
    >>> q = jq.quantise(table, jq.QuantSpec("nf4", axis=1))
    >>> rows = jq.take(q, jnp.array([3, 999]))
    >>> rows.shape, bool(jnp.array_equal(rows, q.dequantise()[jnp.array([3, 999])]))
    ((2, 64), True)
  """
  if not contraction.is_weight(w):
    return jnp.take(w, indices, axis=axis, mode=mode)
  return interception.call(functools.partial(jnp.take, axis=axis, mode=mode), w, indices)
