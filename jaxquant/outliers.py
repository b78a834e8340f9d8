"""Sparse outliers: the largest-magnitude elements kept exactly beside a quantised remainder.

Orr et al. 2025, §4 item 9: remove the top fraction (e.g. 2^-10 ≈ 0.1% or 2^-7) of |θ|,
store each as a bfloat16 value and a 32-bit flat index (48 bits per outlier: +0.047 bits per
parameter at 2^-10), and quantise the dense remainder with a format fitted on the outlier-free
tensor. Heavy tails then no longer set the scale of the dense format.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import _arguments
from jaxquant.kernels.dimensions import Contraction
from jaxquant.qarray import QuantisedArray, QuantSpec, as_spec, dequantise, quantise

VALUE_DTYPE = jnp.bfloat16
INDEX_DTYPE = jnp.int32


def split_outliers(x, fraction: float) -> tuple[jax.Array, jax.Array]:
  """Splits `x` into a remainder and the flat indices of its n largest-magnitude elements.

  n = round(fraction · x.size), rounded to the nearest integer with halves to even (Python's
  `round`), so n may be 0. The outliers are the n largest |x| (`jax.lax.top_k` on the
  row-major flattened |x|: of equal magnitudes the lower flat index is taken first); the
  remainder is `x` with them set to 0 (Orr et al. 2025, §4 item 9). Traceable under `jax.jit`
  with a static `fraction`.

  Args:
    x: a floating-point array of fewer than 2^31 elements.
    fraction: the share of elements to take out, in [0, 1).

  Returns:
    `(remainder, indices)`: the remainder (x's shape and dtype) and the outliers' flat
    row-major indices (int32 [n], ascending).

  Raises:
    TypeError: `x` is not a floating-point array or `fraction` is not a real number.
    ValueError: `fraction` is outside [0, 1) or `x` has 2^31 elements or more.

  Example:
    >>> import jax.numpy as jnp
    >>> remainder, indices = split_outliers(jnp.array([[0.5, -5.0], [2.0, 0.25]]), 0.5)
    >>> remainder.tolist(), indices.tolist()
    ([[0.5, 0.0], [0.0, 0.25]], [1, 2])
  """
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x has dtype {jnp.dtype(x.dtype).name}; split_outliers takes a float array")
  if x.size >= 2**31:
    raise ValueError(f"x has {x.size} elements; int32 flat indices need fewer than 2**31")
  return _split(x, _count(x.size, fraction))


def _count(size: int, fraction: float) -> int:
  """round(fraction · size), after checking that `fraction` is a real number in [0, 1)."""
  return round(_arguments.real("fraction", fraction, low=0.0, high=1.0, high_open=True) * size)


@functools.partial(jax.jit, static_argnums=1)
def _split(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  flat = x.reshape(-1)
  _, indices = jax.lax.top_k(jnp.abs(flat), n)
  indices = jnp.sort(indices).astype(INDEX_DTYPE)
  return flat.at[indices].set(0).reshape(x.shape), indices


@dataclasses.dataclass(frozen=True)
class OutlierSpec:
  """Quantise with `spec` after taking out the largest-magnitude `fraction` of the elements as
  sparse bfloat16 outliers (`quantise_with_outliers`; Orr et al. 2025, §4 item 9).

  A rule's spec like a `QuantSpec` (`jaxquant.Rule`): the quantisation core packs the dense
  remainder along the weight's own axis and keeps the outliers beside it.

  Example:
    >>> import jaxquant as jq
    >>> rule = jq.Rule(".*", jq.outliers.OutlierSpec(jq.QuantSpec("nf4"), 2**-10))

  Raises:
    TypeError: `spec` is not a `QuantSpec` (or a format or its name), or `fraction` is not a
      real number.
    ValueError: `fraction` is outside [0, 1).
  """

  spec: QuantSpec
  fraction: float

  def __post_init__(self):
    object.__setattr__(self, "spec", as_spec(self.spec))
    object.__setattr__(self, "fraction", _arguments.real(
        "fraction", self.fraction, low=0.0, high=1.0, high_open=True))

  @property
  def block_size(self):
    return self.spec.block_size

  @property
  def axis(self) -> int:
    return self.spec.axis

  def along(self, axis: int) -> OutlierSpec:
    """The same spec with the dense part's blocks along `axis`."""
    return dataclasses.replace(self, spec=dataclasses.replace(self.spec, axis=axis))


@dataclasses.dataclass(frozen=True)
class OutlierQuantisedArray:
  """A quantised dense part plus sparse outliers in flat COO form, as a pytree.

  Represents dequantise(dense) + S, where S is zero except S.flat[indices[j]] = values[j]
  (Orr et al. 2025, §4 item 9).

  Attributes:
    dense: the `QuantisedArray` of the remainder; it gives the logical shape and dtype.
    values: bfloat16 [n], the corrections added at the outlier positions.
    indices: int32 [n], their flat row-major indices into `shape`, ascending.
  """

  dense: QuantisedArray
  values: jax.Array
  indices: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.dense.shape

  @property
  def dtype(self) -> np.dtype:
    return self.dense.dtype

  @property
  def ndim(self) -> int:
    return self.dense.ndim

  @property
  def size(self) -> int:
    return self.dense.size

  @property
  def axis(self) -> int:
    """The axis the dense part's blocks run along."""
    return self.dense.axis

  @property
  def n_outliers(self) -> int:
    return self.indices.shape[0]

  @property
  def storage_bits(self) -> int:
    """The dense part's bits plus each outlier's value and index (48 bits at bf16 + int32)."""
    sparse = sum(leaf.size * jnp.dtype(leaf.dtype).itemsize * 8
                 for leaf in (self.values, self.indices))
    return self.dense.storage_bits + sparse

  @property
  def bits_per_param(self) -> float:
    """Exact storage cost per logical element, outliers included."""
    return self.storage_bits / self.size

  def dequantise(self, dtype=None) -> jax.Array:
    """dequantise(dense) with `values` added at `indices`, in float32, then cast to `dtype`.

    Args:
      dtype: output dtype; default the dtype `x` was quantised from.
    """
    return _dequantise(self, dtype)

  # The weight protocol of `jaxquant.contraction`.

  def contract(self, x: jax.Array, contraction: Contraction, backend: str) -> jax.Array:
    """The dense part's contraction (by `backend`) plus the sparse part's, in float32.

    (x S) adds x's entries at each outlier's batch and contracting positions, times its value,
    into the output at its batch and free positions: O(n_outliers · x's free size) work, no
    dense S (Orr et al. 2025, §4 item 9).
    """
    return self.dense.contract(x, contraction, backend) + _sparse_contract(x, self, contraction)

  def gather(self, indices: jax.Array, params: dict) -> jax.Array:
    """`lax.gather` from the dequantised array (dense part and outliers; materialises it)."""
    return jax.lax.gather(self.dequantise(), indices, **params)

  def astype(self, dtype) -> OutlierQuantisedArray:
    return dataclasses.replace(self, dense=self.dense.astype(dtype))

  def __repr__(self):
    # Tools such as Flax's repr replace the leaves by summaries that have no size.
    arrays = all(hasattr(leaf, "size") for leaf in (self.values, self.indices))
    counts = (f", n_outliers={self.n_outliers}, bits_per_param={self.bits_per_param:.4f}"
              if arrays and hasattr(self.dense.codes, "size") else "")
    return (f"OutlierQuantisedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}"
            f"{counts}, dense={self.dense!r})")


jax.tree_util.register_dataclass(
    OutlierQuantisedArray, data_fields=["dense", "values", "indices"], meta_fields=[])


def _sparse_contract(x: jax.Array, q: OutlierQuantisedArray, contraction: Contraction
                     ) -> jax.Array:
  """`lax.dot_general(x, S, ...)` in float32 for the outliers S of `q`, in the output layout."""
  shape = q.shape
  position = jnp.unravel_index(q.indices, shape)

  def flat(axes):
    index = jnp.zeros(q.indices.shape, jnp.int32)
    for a in axes:
      index = index * shape[a] + position[a].astype(jnp.int32)
    return index, int(np.prod([shape[a] for a in axes]))

  (b, n_b), (c, n_c), (f, n_f) = (flat(contraction.w_batch), flat(contraction.w_contracting),
                                  flat(contraction.w_free))
  x_free_shape = tuple(x.shape[a] for a in contraction.x_free)
  order = contraction.x_batch + contraction.x_contracting + contraction.x_free
  x3 = jnp.transpose(x, order).reshape(n_b, n_c, -1).astype(jnp.float32)
  products = x3[b, c, :] * q.values.astype(jnp.float32)[:, None]  # [n, x free]
  y = jnp.zeros((n_b, x3.shape[2], n_f), jnp.float32).at[b, :, f].add(products)
  batch_shape = tuple(shape[a] for a in contraction.w_batch)
  return y.reshape(batch_shape + x_free_shape + tuple(shape[a] for a in contraction.w_free))


@functools.partial(jax.jit, static_argnums=1)
def _dequantise(q: OutlierQuantisedArray, dtype) -> jax.Array:
  flat = dequantise(q.dense, jnp.float32).reshape(-1)
  flat = flat.at[q.indices].add(q.values.astype(jnp.float32))
  return flat.reshape(q.shape).astype(q.dtype if dtype is None else dtype)


def quantise_with_outliers(x, spec: QuantSpec | OutlierSpec | str
                           | Callable[[jax.Array], QuantSpec],
                           fraction: float | None = None, *, check_finite: bool = True
                           ) -> OutlierQuantisedArray:
  """Quantises `x` with its largest-magnitude `fraction` of elements kept as sparse outliers.

  Orr et al. 2025, §4 item 9: the n = round(fraction · x.size) largest |xᵢ| are taken out
  (`split_outliers`), the remainder r (x with those set to 0) is quantised with `spec`, and at
  each outlier position i the correction vᵢ = bf16(xᵢ - dequantise(dense)ᵢ) is stored with
  its int32 flat index (48 bits per outlier). The reconstruction dequantise(dense)ᵢ + vᵢ then
  equals xᵢ up to that one bfloat16 rounding, whatever the dense format gives at a zeroed
  position (formats without an exact zero included); elsewhere it is dequantise(dense).

  Args:
    x: float32, bfloat16 or float16 array (float64 under x64) of fewer than 2^31 elements.
    spec: a `QuantSpec`, or a callable r -> `QuantSpec` called on the outlier-free remainder,
      so that a format is fitted without the outliers (not traceable if it fits eagerly);
      or an `OutlierSpec`, which gives both the spec and the fraction.
    fraction: the share of elements kept as outliers, in [0, 1) (None with an `OutlierSpec`).
    check_finite: raise if `x` has NaN or ±Inf (as `quantise` does; not under `jax.jit`).

  Returns:
    The `OutlierQuantisedArray`; its `storage_bits` count the outliers at 48 bits each.

  Raises:
    TypeError: `x` is not a float array, `spec` is neither a `QuantSpec` nor gives one, or
      `fraction` is missing.
    ValueError: `fraction` is outside [0, 1) or given twice, or `x` is too large, empty or
      not finite.

  Example:
    >>> import jax, jaxquant as jq
    >>> w = jax.random.t(jax.random.key(0), 3.0, (256, 128))
    >>> def fitted(r):
    ...   fmt = jq.fitting.fit_crd_t(r, 3, scaling="rms", block_size="tensor", axis=0)
    ...   return jq.QuantSpec(fmt, block_size="tensor", scaling="rms", axis=0)
    >>> oq = quantise_with_outliers(w, fitted, 2**-10)
    >>> oq.n_outliers, oq.bits_per_param  # (3·2^15 + 16 + 48·32) / 2^15
    (32, 3.04736328125)
  """
  if isinstance(spec, OutlierSpec):
    if fraction is not None:
      raise ValueError("fraction comes from the OutlierSpec; pass fraction=None")
    spec, fraction = spec.spec, spec.fraction
  elif fraction is None:
    raise TypeError("fraction is needed unless spec is an OutlierSpec")
  remainder, indices = split_outliers(x, fraction)
  spec = spec(remainder) if callable(spec) else spec
  try:
    spec = as_spec(spec)
  except TypeError:
    raise TypeError(f"spec must be a QuantSpec (or a Format or format name), or a callable "
                    f"returning one, got {type(spec).__name__}") from None
  dense = quantise(remainder, spec, check_finite=check_finite)
  values = _corrections(x, dense, indices)
  if check_finite and not isinstance(values, jax.core.Tracer) and not bool(
      jnp.all(jnp.isfinite(values))):
    raise ValueError("x contains NaN or Inf; quantise only finite arrays")
  return OutlierQuantisedArray(dense=dense, values=values, indices=indices)


@jax.jit
def _corrections(x: jax.Array, dense: QuantisedArray, indices: jax.Array) -> jax.Array:
  """bf16(x - dequantise(dense)) at the flat `indices`, computed in float32."""
  target = x.reshape(-1)[indices].astype(jnp.float32)
  return (target - dequantise(dense, jnp.float32).reshape(-1)[indices]).astype(VALUE_DTYPE)
