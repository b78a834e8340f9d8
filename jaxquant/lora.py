"""Low-rank adapters on a frozen (packed or float) weight: LoRA and QLoRA.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") trains a weight
W as W + (α/r)·A·B with W frozen, A and B of rank r, A drawn at random and B zero, so
training starts from the base model. QLoRA (Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs") keeps the frozen base W in 4 bits (NF4) and back-propagates
through it into the adapters.

`LoRAWeight(base, Adapters(a, b, layout))` is a weight type of `jaxquant.contraction`, so
every layer and traced model that contracts weights serves it. For a contraction of x with W
over W's contracting axes C, with batch axes H (per-head or stacked weights) and free axes F,

  y = x·Ŵ + (α/r)·((x·A)·B),   A: [H..., C..., r],  B: [H..., r, F...]

(each group of axes in W's own order). x·Ŵ is the base's own contraction (a `QuantisedArray`
streams its packed codes, slab by slab on CPU, and its custom VJP computes x's cotangent from
the codes), so neither the forward nor the backward pass makes a float copy of W; the
adapters' gradients come from autodiff of the two small dense products, and the base's
cotangent is zero. The layout (which axes of W are C and H, and α/r) is fixed when the
adapters are made: a use of the weight that contracts other axes is refused. A kernel stored
[out, in] and contracted over `in` gets A [in, r] and B [r, out], a per-head einsum kernel
[heads, d, k] contracted over d gets A [d, r] and B [r, heads, k]. Dropout (rate p, Hu et al.
2021) drops elements of the adapters' input only, scaling the rest by 1/(1 − p).

`delta(adapters, shape)` is the dense update (α/r)·A·B in W's shape, for merging (W' = W + ΔW,
quantised again) and for references.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import contraction as contraction_lib
from jaxquant.interception import UnsupportedUse
from jaxquant.kernels.dimensions import Contraction


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
  """Which axes of the weight the adapters contract (`contracting`) and keep (`batch`), the
  scale α/r of their product, and the `dropout` rate of the adapters' input."""

  contracting: tuple[int, ...]
  batch: tuple[int, ...]
  scale: float
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "contracting", tuple(sorted(int(a) for a in self.contracting)))
    object.__setattr__(self, "batch", tuple(sorted(int(a) for a in self.batch)))
    object.__setattr__(self, "scale", float(self.scale))
    object.__setattr__(self, "dropout", float(self.dropout))

  def free(self, ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in self.contracting + self.batch)

  def shapes(self, shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A [H..., C..., r] and B [H..., r, F...] for a weight of `shape`."""
    pick = lambda axes: tuple(int(shape[a]) for a in axes)
    return (pick(self.batch) + pick(self.contracting) + (rank,),
            pick(self.batch) + (rank,) + pick(self.free(len(shape))))


def check_options(rank: int, alpha: float, dropout: float = 0.0) -> None:
  """Raises ValueError unless `rank` is an int ≥ 1, `alpha` a finite number and `dropout` in
  [0, 1)."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank={rank!r} must be an int ≥ 1")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not (
      math.isfinite(alpha)):
    raise ValueError(f"alpha={alpha!r} must be a finite number")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or not (
      0 <= dropout < 1):
    raise ValueError(f"dropout={dropout!r} must be a rate in [0, 1)")


def layout_for(shape: Sequence[int], contracting: Sequence[int], batch: Sequence[int],
               *, rank: int, alpha: float, dropout: float = 0.0) -> AdapterLayout:
  """The `AdapterLayout` of rank-`rank` adapters with scale α/r on a weight of `shape`.

  Raises:
    ValueError: `rank` < 1, `alpha` is not finite, `dropout` is not in [0, 1), or the axes
      do not fit `shape` (none contracted, one named twice or out of range, or no free axis).
  """
  check_options(rank, alpha, dropout)
  axes = tuple(contracting) + tuple(batch)
  ndim = len(shape)
  if not contracting or len(set(axes)) != len(axes) or not all(0 <= a < ndim for a in axes):
    raise ValueError(f"contracting={tuple(contracting)} and batch={tuple(batch)} must be "
                     f"distinct axes of a weight of shape {tuple(shape)}, at least one "
                     "contracted")
  if len(axes) == ndim:
    raise ValueError(f"a weight of shape {tuple(shape)} contracted over {tuple(contracting)} "
                     f"with batch axes {tuple(batch)} has no free axis for an adapter")
  return AdapterLayout(tuple(contracting), tuple(batch), alpha / rank, dropout)


@dataclasses.dataclass(frozen=True)
class Adapters:
  """The adapters of one weight: A, B and their `AdapterLayout` (a pytree: `a` and `b` are
  its children, `layout` static)."""

  a: jax.Array
  b: jax.Array
  layout: AdapterLayout

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])


jax.tree_util.register_dataclass(Adapters, data_fields=["a", "b"], meta_fields=["layout"])


@dataclasses.dataclass(frozen=True)
class LoRAWeight:
  """A frozen `base` (any weight type, or a float array) plus the product of its `adapters`
  (module docstring). A pytree of its fields.

  With a `dropout_key` and a layout's dropout rate p > 0, the adapters read x with each
  element dropped with probability p and the rest scaled by 1/(1 − p) (Hu et al. 2021's
  dropout on the LoRA branch); the base reads x whole.
  """

  base: Any
  adapters: Adapters
  dropout_key: jax.Array | None = None

  def __post_init__(self):
    adapters = self.adapters
    a_shape, b_shape = adapters.layout.shapes(self.shape, adapters.rank)
    if tuple(adapters.a.shape) != a_shape or tuple(adapters.b.shape) != b_shape:
      raise ValueError(f"adapters of shapes {tuple(adapters.a.shape)} and "
                       f"{tuple(adapters.b.shape)} do not fit a weight of shape {self.shape} "
                       f"with {adapters.layout}: A must be {a_shape} and B {b_shape}")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.base.dtype)

  def contract(self, x: jax.Array, contraction: Contraction, backend: str) -> jax.Array:
    _check_use(self, contraction)
    if contraction_lib.is_weight(self.base):
      y = self.base.contract(x, contraction, backend)
    else:
      y = jax.lax.dot_general(x, self.base.astype(x.dtype), contraction.dimension_numbers,
                              preferred_element_type=jnp.float32)
    scale = jnp.asarray(self.adapters.layout.scale, jnp.float32)
    return y.astype(jnp.float32) + scale * adapter_product(self._dropped(x), self.adapters,
                                                           contraction)

  def _dropped(self, x: jax.Array) -> jax.Array:
    rate = self.adapters.layout.dropout
    if self.dropout_key is None or rate == 0:
      return x
    keep = jax.random.bernoulli(self.dropout_key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))

  def gather(self, indices: jax.Array, params: dict) -> jax.Array:
    del indices, params
    raise UnsupportedUse(f"a weight of shape {self.shape} with LoRA adapters is gathered; "
                         "adapters serve contractions (put none on embedding lookups)")

  def dequantise(self, dtype=None) -> jax.Array:
    """W + (α/r)·A·B as a dense array (a float copy: for merging and references)."""
    base = (self.base.dequantise(jnp.float32) if contraction_lib.is_weight(self.base)
            else self.base.astype(jnp.float32))
    return (base + delta(self.adapters, self.shape)).astype(dtype or self.dtype)

  def astype(self, dtype) -> "LoRAWeight":
    return dataclasses.replace(self, base=self.base.astype(dtype))


jax.tree_util.register_dataclass(LoRAWeight, data_fields=["base", "adapters", "dropout_key"],
                                 meta_fields=[])


def _check_use(weight: LoRAWeight, contraction: Contraction) -> None:
  layout = weight.adapters.layout
  if (tuple(sorted(contraction.w_contracting)) != layout.contracting
      or tuple(sorted(contraction.w_batch)) != layout.batch):
    raise UnsupportedUse(
        f"the adapters of a weight of shape {weight.shape} were made for contracting axes "
        f"{layout.contracting} and batch axes {layout.batch}; this use contracts "
        f"{contraction.w_contracting} with batch axes {contraction.w_batch}")


def adapter_product(x: jax.Array, adapters: Adapters, contraction: Contraction) -> jax.Array:
  """(x·A)·B in float32, laid out as the core's output [batch, x free, W free]."""
  a, b = adapters.a, adapters.b
  batch = sorted(contraction.w_batch)
  contracting = sorted(contraction.w_contracting)
  n_batch = len(batch)
  a_batch = tuple(batch.index(w) for w in contraction.w_batch)
  a_contracting = tuple(n_batch + contracting.index(w) for w in contraction.w_contracting)
  xa = jax.lax.dot_general(x.astype(a.dtype), a,
                           ((contraction.x_contracting, a_contracting),
                            (contraction.x_batch, a_batch)),
                           preferred_element_type=jnp.float32)
  return jax.lax.dot_general(xa.astype(b.dtype), b,
                             (((xa.ndim - 1,), (n_batch,)), (tuple(range(n_batch)), a_batch)),
                             preferred_element_type=jnp.float32)


def delta(adapters: Adapters, shape: Sequence[int]) -> jax.Array:
  """(α/r)·A·B as an array of the weight's `shape`, in its axis order (float32)."""
  layout = adapters.layout
  n_batch = len(layout.batch)
  product = jax.lax.dot_general(adapters.a.astype(jnp.float32), adapters.b.astype(jnp.float32),
                                (((adapters.a.ndim - 1,), (n_batch,)),
                                 (tuple(range(n_batch)), tuple(range(n_batch)))))
  order = layout.batch + layout.contracting + layout.free(len(shape))
  return jnp.asarray(layout.scale, jnp.float32) * jnp.transpose(product, np.argsort(order))


def init_adapters(key: jax.Array, shape: Sequence[int], layout: AdapterLayout, rank: int,
                  dtype=jnp.float32) -> Adapters:
  """A ~ N(0, 1/fan_in), fan_in the product of the contracted lengths, and B = 0 (Hu et al.
  2021: the adapted weight starts as the base)."""
  a_shape, b_shape = layout.shapes(shape, rank)
  fan_in = math.prod(int(shape[a]) for a in layout.contracting)
  a = jax.random.normal(key, a_shape, jnp.float32) * (1.0 / math.sqrt(fan_in))
  return Adapters(a.astype(dtype), jnp.zeros(b_shape, dtype), layout)


__all__ = ["AdapterLayout", "Adapters", "LoRAWeight", "adapter_product", "check_options", "delta",
           "init_adapters", "layout_for"]
