"""Where a quantised weight meets activations: `dot_general` on any weight type.

`dot_general(x, w, dimension_numbers)` computes `lax.dot_general(x, W, dimension_numbers)` for
the array W that the weight `w` represents, for any contraction: one or several contracting
axes, free axes in any order, batch axes (per-head or stacked weights), and a weight quantised
along whichever of its axes (a kernel stored [out, in] quantised along `in` included). The
packed codes are never copied or transposed: `jaxquant.kernels` streams them.

Weight types. The core needs four things of a weight, so any type that has them plugs in
(`QuantisedArray`, `jaxquant.outliers.OutlierQuantisedArray`, `jaxquant.qat.FakeQuantised`,
`jaxquant.lora.LoRAWeight`):

- ``shape`` and ``dtype``: those of the array it represents;
- ``contract(x, contraction, backend)``: `lax.dot_general(x, W, ...)` in float32, for a checked
  `jaxquant.kernels.dimensions.Contraction`, differentiable with respect to x;
- ``gather(indices, params)``: `lax.gather(W, indices, **params)` (embedding lookups);
- ``dequantise(dtype=None)`` and ``astype(dtype)`` (the same weight read as another dtype).

A plain array is the float weight itself: it meets x through `lax.dot_general`, or, with a
`spec`, through its packed quantisation (QAT: `FakeQuantised`, straight-through gradient).

The dtype rule. The result has the activations' dtype unless `preferred_element_type` says
otherwise; products accumulate in float32. Each dequantised slab is rounded to the weight's
dtype, then to the activations' dtype, which is what a float model computes with the
dequantised weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant import kernels
from jaxquant.kernels.dimensions import Contraction
from jaxquant.qat import FakeQuantised

ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")


def is_weight(w) -> bool:
  """Whether `w` is a weight type of this module (anything with the protocol's methods)."""
  return all(callable(getattr(w, name, None)) for name in ("contract", "gather", "dequantise"))


def dot_general(x, w, dimension_numbers, *, preferred_element_type=None, spec=None,
                backend: str = "auto") -> jax.Array:
  """`lax.dot_general(x, W, dimension_numbers)` for activations x and a weight `w`.

  Args:
    x: activations (float32, bfloat16 or float16), the left operand.
    w: the weight: a `QuantisedArray` (or any weight type, module docstring), or a float array.
    dimension_numbers: ``((x_contracting, w_contracting), (x_batch, w_batch))``, as for
      `jax.lax.dot_general`; the output has the batch axes, x's free axes, then w's.
    preferred_element_type: the output dtype (default: x's dtype).
    spec: with a float `w`, quantisation-aware training: the forward quantises w with this
      `QuantSpec` (blocks along its axis) and contracts the packed weight; the gradient with
      respect to w is the straight-through one (`jaxquant.qat`).
    backend: the `jaxquant.kernels` backend: ``"auto"``, ``"xla"``, ``"pallas"`` or
      ``"reference"``.

  Returns:
    The contraction, in `preferred_element_type` or x's dtype (accumulated in float32).

  Raises:
    TypeError: x is not a float array, or `w` is neither a weight nor an array.
    ValueError: `dimension_numbers` do not fit the shapes, or `backend` is unknown.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> w = jax.random.normal(jax.random.key(0), (3, 256, 64))     # [heads, in, out]
    >>> q = jq.quantise(w, jq.QuantSpec("nf4", axis=1))            # blocks along `in`
    >>> x = jnp.ones((3, 5, 256))                                  # [heads, tokens, in]
    >>> y = jq.dot_general(x, q, (((2,), (1,)), ((0,), (0,))))     # per-head x @ W[h]
    >>> y.shape, bool(jnp.allclose(y, jnp.einsum("htd,hdo->hto", x, q.dequantise()),
    ...                            rtol=1e-4, atol=1e-3))
    ((3, 5, 64), True)
  """
  kernels.check_backend(backend)
  x = _activations(x)
  if spec is not None:
    if is_weight(w):
      raise TypeError(f"spec applies to a float weight; this weight is already a "
                      f"{type(w).__name__}")
    w = FakeQuantised(jnp.asarray(w), spec)
  out_dtype = jnp.dtype(preferred_element_type or x.dtype)
  if not is_weight(w):
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
      raise TypeError(f"w must be a weight (e.g. a QuantisedArray) or an array, got "
                      f"{type(w).__name__}")
    return jax.lax.dot_general(x, w, dimension_numbers, preferred_element_type=out_dtype)
  contraction = Contraction.of(dimension_numbers, x.shape, w.shape)
  return w.contract(x, contraction, backend).astype(out_dtype)


def qmatmul(x, w, *, backend: str = "auto") -> jax.Array:
  """x[..., K] @ W[K, ...]: x's last axis contracted with the weight's first.

  For a Flax kernel [in, out] quantised along `in` (``QuantSpec(..., axis=0)``, the default)
  this is the layer's product; the weight may be quantised along any axis.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> w = jax.random.normal(jax.random.key(0), (256, 128))
    >>> q = jq.quantise(w, "nf4")
    >>> x = jnp.ones((2, 256))
    >>> y = jq.qmatmul(x, q)
    >>> y.shape, bool(jnp.allclose(y, x @ q.dequantise(), rtol=1e-4, atol=1e-3))
    ((2, 128), True)
  """
  x = _activations(x)
  if not is_weight(w):
    raise TypeError(f"w must be a QuantisedArray or another weight type, got "
                    f"{type(w).__name__}; quantise it first (jaxquant.quantise)")
  if x.ndim < 1 or len(w.shape) < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x has shape {x.shape}; its last axis must be the weight's first, "
                     f"K = {w.shape[0] if w.shape else None}")
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), backend=backend)


def qat_matmul(x, w, spec, backend: str = "auto") -> jax.Array:
  """x[..., K] @ fake_quantise(W[K, ...]): `qmatmul` of the float `w` quantised with `spec`.

  The forward is the packed forward; x's gradient comes from the packed weight and w's is the
  straight-through xᵀg, zero where the forward clipped (`jaxquant.qat`).
  """
  x = _activations(x)
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), spec=spec, backend=backend)


def _activations(x) -> jax.Array:
  x = x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)
  if jnp.dtype(x.dtype).name not in ACTIVATION_DTYPES:
    raise TypeError(f"x has dtype {jnp.dtype(x.dtype).name}; the activations must be one of "
                    f"{ACTIVATION_DTYPES}")
  return x
