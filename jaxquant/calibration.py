"""Calibration: the second moment H = Σ x xᵀ of the inputs every weight of a model meets.

GPTQ (`jaxquant.gptq`) needs, for each weight, the second moment of the activations that its
contraction contracts it with, summed over calibration tokens. `second_moments` finds it for
any function, through the interception core (`jaxquant.interception`): each selected float
array is stood in for by a recording weight, so every contraction the code makes with it —
``x @ w``, `jnp.einsum`, `lax.dot_general`, with the weight on either side, per-head (batch
axes) or contracted over several axes — records the activations it meets and still computes
the float product. For a contraction of x with W over W's axes C (batch axes B), the
activations flatten to X [*B, tokens, K] with K = Π C in the order of W's axes, and
H[b] = X[b]ᵀ X[b], in float32. `accumulate` sums H over a stream of calibration batches, one
jitted step per batch. diag H, the inputs' mean square times the token count, is the weight
of an H-weighted fit (`jaxquant.fitting`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import interception


@dataclasses.dataclass(frozen=True)
class SecondMoment:
  """The second moment H = Σ x xᵀ of the inputs a weight meets, over calibration tokens.

  Attributes:
    matrix: float32 [*batch, K, K]: one K × K matrix per index of the weight's batch axes;
      K is the product of the contracted axes' sizes, flattened in the order of `contracting`.
    contracting: the weight's contracted axes, in the order H flattens them.
    batch: the weight's batch axes (per-head weights), in the order of H's leading axes.
    tokens: how many input vectors were summed (per batch index).
  """

  matrix: jax.Array
  contracting: tuple[int, ...]
  batch: tuple[int, ...] = ()
  tokens: int = 0

  @property
  def diagonal(self) -> jax.Array:
    """diag H [*batch, K]: the inputs' mean square times `tokens`, per contracted index."""
    return jnp.diagonal(self.matrix, axis1=-2, axis2=-1)


jax.tree_util.register_dataclass(SecondMoment, data_fields=["matrix"],
                                 meta_fields=["contracting", "batch", "tokens"])


class _Recording:
  """A float weight that computes its contractions and records the inputs' second moment."""

  def __init__(self, value, path: str, records: dict):
    self.value, self.path, self.records = value, path, records
    self.shape, self.dtype = tuple(value.shape), value.dtype

  def contract(self, x, contraction, backend):
    del backend
    pairs = sorted(zip(contraction.w_contracting, contraction.x_contracting))
    batch = sorted(zip(contraction.w_batch, contraction.x_batch))
    x_free = [a for a in range(x.ndim) if a not in contraction.x_contracting + contraction.x_batch]
    order = [xa for _, xa in batch] + x_free + [xa for _, xa in pairs]
    batch_shape = tuple(x.shape[xa] for _, xa in batch)
    k = int(np.prod([x.shape[xa] for _, xa in pairs]))
    tokens = int(np.prod([x.shape[a] for a in x_free]))
    flat = jnp.transpose(x.astype(jnp.float32), order).reshape(
        (int(np.prod(batch_shape)), tokens, k))
    matrix = jnp.einsum("btk,btl->bkl", flat, flat, precision=jax.lax.Precision.HIGHEST)
    moment = SecondMoment(matrix.reshape(batch_shape + (k, k)), tuple(w for w, _ in pairs),
                          tuple(w for w, _ in batch), tokens)
    previous = self.records.get(self.path)
    if previous is not None:
      if (previous.contracting, previous.batch) != (moment.contracting, moment.batch):
        raise ValueError(
            f"weight {self.path!r} is contracted over axes {previous.contracting} (batch "
            f"{previous.batch}) and over axes {moment.contracting} (batch {moment.batch}); "
            "one second moment cannot describe both uses")
      moment = add(previous, moment)
    self.records[self.path] = moment
    return jax.lax.dot_general(x, self.value, contraction.dimension_numbers,
                               preferred_element_type=jnp.float32)

  def gather(self, indices, params):
    return jax.lax.gather(self.value, indices, **params)

  def dequantise(self, dtype=None):
    return self.value if dtype is None else self.value.astype(dtype)

  def astype(self, dtype):
    return _Recording(self.value.astype(dtype), self.path, self.records)


def add(a: SecondMoment, b: SecondMoment) -> SecondMoment:
  """The second moment of both sets of inputs (the same weight's, the same axes)."""
  return SecondMoment(a.matrix + b.matrix, a.contracting, a.batch, a.tokens + b.tokens)


def _default_select(path: str, leaf) -> bool:
  del path
  return len(leaf.shape) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def second_moments(fn: Callable, params, *args, select: Callable[[str, object], bool] | None
                   = None, **kwargs) -> dict[str, SecondMoment]:
  """The second moment of the inputs each selected array of `params` is contracted with,
  during one call ``fn(params, *args, **kwargs)``.

  Args:
    fn: any function of arrays; it may be jitted by the caller (so may this call).
    params: a pytree of arrays; its leaves are named by '/'-joined key paths
      (``layers/0/mlp/up/kernel``).
    *args, **kwargs: the rest of `fn`'s arguments (a calibration batch).
    select: ``select(path, leaf)`` picks the arrays to record (default: float arrays with at
      least two axes). A selected array that is never contracted is absent from the result.

  Returns:
    Path → `SecondMoment`, for every selected array some contraction reached.

  Raises:
    ValueError: an array is contracted over different axes in two places.
    jaxquant.interception.UnsupportedUse: a selected array is used other than by
      contractions, gathers, transposes and casts (deselect it).
  """
  select = select or _default_select
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  records: dict[str, SecondMoment] = {}
  leaves = []
  for key_path, leaf in with_paths:
    path = interception.path_name(key_path)
    chosen = hasattr(leaf, "shape") and hasattr(leaf, "dtype") and select(path, leaf)
    leaves.append(_Recording(jnp.asarray(leaf), path, records) if chosen else leaf)
  recording = jax.tree_util.tree_unflatten(treedef, leaves)
  interception.call(fn, recording, *args, **kwargs)
  return records


def accumulate(fn: Callable, params, batches: Iterable, *,
               select: Callable[[str, object], bool] | None = None) -> dict[str, SecondMoment]:
  """`second_moments` summed over calibration `batches`: ``fn(params, batch)`` for each.

  Each batch runs as one jitted step (compiled once per batch shape); the sums stay on the
  device, float32.

  Raises:
    ValueError: `batches` is empty, or as `second_moments`.
  """
  step = jax.jit(lambda params, batch: second_moments(fn, params, batch, select=select))
  total = None
  for batch in batches:
    moments = step(params, batch)
    total = moments if total is None else {path: add(total[path], m)
                                           for path, m in moments.items()}
  if total is None:
    raise ValueError("batches is empty; give at least one calibration batch")
  return total
