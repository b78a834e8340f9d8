"""Quantisation-aware training: fake quantisation with a straight-through estimator.

`fake_quantise(w, spec)` returns dequantise(quantise(w, spec)) in w's dtype. Its gradient is
the straight-through estimator (Bengio et al. 2013): the identity where w lies inside the
range its block can represent, [s·v_min, s·v_max] for block scale s, and zero where w was
clipped (an element beyond the end codepoints, e.g. under rms scaling). Under absmax or
signmax scaling nothing is clipped (up to scale rounding), so the gradient is the identity.

`qat_matmul(x, w, spec)` is x @ fake_quantise(w) computed the way inference computes it:
`qmatmul(x, quantise(w, spec))`, so a model trained with it and then converted to packed
weights gives bit-identical outputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxquant.kernels import qmatmul
from jaxquant.kernels.xla import qmatmul_transposed_xla
from jaxquant.qarray import QuantisedArray, QuantSpec, dequantise, quantise


def representable(w: jax.Array, q: QuantisedArray) -> jax.Array:
  """True where w lies within its block's range [s·v_min, s·v_max] (was not clipped).

  Absmax and signmax map every block's extreme onto the format's range by construction; an
  element beyond it only by the rounding of the scale, which is not clipping, so every
  element counts as representable there.
  """
  if q.scaling in ("absmax", "signmax"):
    return jnp.ones(w.shape, bool)
  unit_codebook = jnp.ones_like(q.codebook)
  scale = dequantise(dataclasses.replace(q, codebook=unit_codebook), jnp.float32)
  low, high = scale * q.codebook[0], scale * q.codebook[-1]  # swapped where s < 0 (signmax)
  w = w.astype(jnp.float32)
  return (w >= jnp.minimum(low, high)) & (w <= jnp.maximum(low, high))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quantise(w: jax.Array, spec: QuantSpec) -> jax.Array:
  """dequantise(quantise(w, spec)) with a straight-through gradient (see module docstring).

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1.0, 1.0, 128)
    >>> g = jax.grad(lambda w: jnp.sum(jq.fake_quantise(w, jq.QuantSpec("int4")) ** 2))(w)
    >>> g.shape
    (128,)
  """
  return dequantise(quantise(w, spec, check_finite=False))


def _fake_quantise_fwd(w, spec):
  q = quantise(w, spec, check_finite=False)
  return dequantise(q), representable(w, q)


def _fake_quantise_bwd(spec, inside, g):
  del spec
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


fake_quantise.defvjp(_fake_quantise_fwd, _fake_quantise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def qat_matmul(x: jax.Array, w: jax.Array, spec: QuantSpec, backend: str = "auto") -> jax.Array:
  """x[..., K] @ fake_quantise(w[K, N]), computed as `qmatmul(x, quantise(w, spec))`.

  Gradients: x gets g @ ŵᵀ (from the packed weight), w gets the straight-through xᵀ g, zero
  where w was clipped. `spec.axis` is taken as 0 (blocks along the contraction axis).
  """
  return qmatmul(x, quantise(w, _along_k(spec), check_finite=False), backend=backend)


def _along_k(spec: QuantSpec) -> QuantSpec:
  return spec if spec.axis == 0 else dataclasses.replace(spec, axis=0)


def _qat_matmul_fwd(x, w, spec, backend):
  q = quantise(w, _along_k(spec), check_finite=False)
  return qmatmul(x, q, backend=backend), (x, q, representable(w, q))


def _qat_matmul_bwd(spec, backend, residuals, g):
  del spec, backend
  x, q, inside = residuals
  k, n = q.shape
  g2 = g.reshape(-1, n)
  grad_x = qmatmul_transposed_xla(g2, q).astype(x.dtype).reshape(x.shape)
  grad_w = jnp.dot(x.reshape(-1, k).T.astype(jnp.float32), g2.astype(jnp.float32))
  return grad_x, jnp.where(inside, grad_w, 0.0).astype(q.dtype)


qat_matmul.defvjp(_qat_matmul_fwd, _qat_matmul_bwd)
