"""Quantisation-aware training: fake quantisation with a straight-through estimator.

`fake_quantise(w, spec)` returns dequantise(quantise(w, spec)) in w's dtype. Its gradient is
the straight-through estimator (Bengio et al. 2013): the identity where w lies inside the range
its block represents, s·[v_min, v_max] for the block's scale s (before the scale is stored),
and zero where the forward clipped it to an end codepoint. Absmax and signmax put each block's
extreme on an end by construction, so under absmax nothing is clipped; under signmax the other
side of an asymmetric format clips (INT4 signmax maps +8s to 7s when the extreme is negative;
CRD signmax tables stop short of -1); under rms everything beyond the range clips.

`FakeQuantised(w, spec)` is the weight type of a float master weight trained through the packed
forward: contracted with activations (`jaxquant.contraction.dot_general`), it quantises w with
`spec` and runs the packed contraction, so a model trained with it and then converted to packed
weights gives bit-identical outputs; x's gradient comes from the packed weight and w's is the
straight-through xᵀg.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import kernels, scaling
from jaxquant.kernels.dimensions import Contraction
from jaxquant.qarray import QuantisedArray, QuantSpec, as_spec, dequantise, quantise_with_scales

# Relative slack at the ends of a block's range: the block extreme divided by its own scale
# lands on the end codepoint up to float32 rounding.
_END_SLACK = 1e-6


def representable(w: jax.Array, q: QuantisedArray, exact_scales: jax.Array) -> jax.Array:
  """True where w lies within its block's range s·[v_min, v_max] (was not clipped).

  Args:
    w: the array `q` quantises.
    q: `quantise(w, spec)`.
    exact_scales: the float32 block scales before storage (`quantise_with_scales`).
  """
  axis = q.axis
  blocks = scaling.to_blocks(w.astype(jnp.float32), axis, q.block_size)
  s = jnp.expand_dims(exact_scales, axis + 1)
  y = scaling.divide(blocks, s)
  low, high = q.codebook[0], q.codebook[-1]
  slack = _END_SLACK * jnp.maximum(jnp.abs(low), jnp.abs(high))
  inside = (y >= low - slack) & (y <= high + slack)
  return scaling.from_blocks(inside, axis, w.shape[axis])


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
  return dequantise(quantise_with_scales(w, spec, check_finite=False)[0])


def _fake_quantise_fwd(w, spec):
  q, exact = quantise_with_scales(w, spec, check_finite=False)
  return dequantise(q), representable(w, q, exact)


def _fake_quantise_bwd(spec, inside, g):
  del spec
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


fake_quantise.defvjp(_fake_quantise_fwd, _fake_quantise_bwd)


@dataclasses.dataclass(frozen=True)
class FakeQuantised:
  """A float weight that meets activations through its packed quantisation (see module doc).

  A pytree: `weight` is the leaf (trainable), `spec` static. Blocks run along `spec.axis`.
  """

  weight: jax.Array
  spec: QuantSpec

  def __post_init__(self):
    object.__setattr__(self, "spec", as_spec(self.spec))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.weight.dtype)

  def dequantise(self, dtype=None) -> jax.Array:
    return fake_quantise(self.weight, self.spec).astype(dtype or self.dtype)

  def pack(self) -> QuantisedArray:
    """The packed weight whose contractions equal this one's, bit for bit."""
    return quantise_with_scales(self.weight, self.spec, check_finite=False)[0]

  def contract(self, x: jax.Array, contraction: Contraction, backend: str) -> jax.Array:
    return _qat_contract(x, self.weight, contraction, self.spec, kernels.check_backend(backend))

  def gather(self, indices: jax.Array, params: dict) -> jax.Array:
    return jax.lax.gather(self.dequantise(), indices, **params)

  def astype(self, dtype) -> "FakeQuantised":
    return dataclasses.replace(self, weight=self.weight.astype(dtype))


jax.tree_util.register_dataclass(FakeQuantised, data_fields=["weight"], meta_fields=["spec"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qat_contract(x, w, contraction, spec, backend):
  q, _ = quantise_with_scales(w, spec, check_finite=False)
  return kernels.contract(x, q, contraction, backend)


def _qat_contract_fwd(x, w, contraction, spec, backend):
  q, exact = quantise_with_scales(w, spec, check_finite=False)
  y = kernels.contract(x, q, contraction, backend)
  return y, (x, q, representable(w, q, exact))


def _qat_contract_bwd(contraction, spec, backend, residuals, g):
  del spec
  x, q, inside = residuals
  grad_x = kernels.contract_transposed(g, q, contraction, backend).astype(x.dtype)
  weight = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  product = lambda w: jax.lax.dot_general(x.astype(jnp.float32), w,
                                          contraction.dimension_numbers,
                                          preferred_element_type=jnp.float32)
  (grad_w,) = jax.linear_transpose(product, weight)(g.astype(jnp.float32))
  return grad_x, jnp.where(inside, grad_w, 0.0).astype(q.dtype)


_qat_contract.defvjp(_qat_contract_fwd, _qat_contract_bwd)
