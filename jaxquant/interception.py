"""Run any JAX function with quantised weights where it expects float arrays.

`call(fn, *args, **kwargs)` evaluates `fn` where some leaves of its arguments are weights
(`QuantisedArray` or any weight type of `jaxquant.contraction`). It traces `fn` once on the
float arrays the weights represent (shapes and dtypes only: nothing is materialised), then
evaluates that program equation by equation with the weights in place, so code that calls
`jnp.einsum`, `jnp.dot`, `jnp.matmul`, `@`, `lax.dot_general`, `jnp.take` or ``w[ids]`` on its
own parameters needs no change. Every equation a weight reaches is routed to the contraction
core:

- ``transpose`` and ``convert_element_type`` are followed lazily (``x @ table.T`` contracts the
  table along its own axes; ``w.astype(bf16)`` reads the same codes as bf16);
- ``dot_general`` becomes `jaxquant.contraction.dot_general`, whichever operand the weight is;
- ``gather`` becomes the weight's own gather (packed rows for an embedding lookup);
- nested ``jit`` programs are evaluated in place, and ``checkpoint`` (remat) stays one;
- anything else a weight meets raises `UnsupportedUse`, naming the weight and the operation.

Equations that no weight reaches are bound unchanged. Nothing is patched: the interception is
this evaluation, so it is scoped to the call and thread-safe.

`discover(fn, *args)` traces the same way with every float array argument standing in for a
weight and reports how each one is used (`Use`): which axes its contractions contract, which
axes its gathers index, and any other operation. `jaxquant.nn` reads it to find a model's
weights and the axis to quantise each along.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core

from jaxquant import contraction as contraction_lib
from jaxquant.kernels.dimensions import Contraction

_NESTED_PROGRAMS = ("jit", "pjit", "closed_call", "core_call")
_REMAT = ("remat2", "checkpoint")


class UnsupportedUse(NotImplementedError):
  """A weight reached an operation that the interception cannot compute from packed codes."""


@dataclasses.dataclass(frozen=True)
class _View:
  """`weight` seen through a transpose: view axis i is the weight's axis `perm[i]`."""

  weight: Any
  perm: tuple[int, ...]
  name: str

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.weight.shape[a] for a in self.perm)


jax.tree_util.register_dataclass(_View, data_fields=["weight"], meta_fields=["perm", "name"])


def _is_array(leaf) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct,
                           jax.core.Tracer))


def call(fn: Callable, *args, backend: str = "auto", **kwargs):
  """``fn(*args, **kwargs)`` with the weights among the arguments' leaves (module docstring).

  Array leaves are traced, weights stand in for their float arrays, and every other leaf
  (Python numbers, strings, None, functions) is static. Outputs that are a weight passed
  through unchanged come back as that weight.

  Args:
    fn: any function of arrays (a Linen ``model.apply``, an NNX module's method, ...).
    *args: its positional arguments, weights anywhere among their leaves.
    backend: the `jaxquant.kernels` backend of every contraction.
    **kwargs: its keyword arguments.

  Raises:
    UnsupportedUse: a weight reaches an operation other than those in the module docstring;
      the message names it by its place in the arguments.
  """
  paths, leaves, treedef = _flatten((args, kwargs), contraction_lib.is_weight)
  return _run(fn, leaves, treedef, paths, backend, on_other=_refuse)


def path_name(key_path) -> str:
  """'/'-joined names of a pytree key path (``params/layer_0/w``)."""
  parts = []
  for key in key_path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _flatten(tree, is_leaf=None):
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  # The first two parts are the (args, kwargs) pair and the argument's position or keyword.
  paths = [path_name(path[2:]) or path_name(path[1:]) for path, _ in with_paths]
  return paths, [leaf for _, leaf in with_paths], treedef


def _run(fn, leaves, treedef, paths, backend, on_other):
  is_weight = [contraction_lib.is_weight(leaf) for leaf in leaves]
  traced = [i for i, leaf in enumerate(leaves) if is_weight[i] or _is_array(leaf)]
  abstract = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in traced]

  def flat(*values):
    full = list(leaves)
    for i, value in zip(traced, values):
      full[i] = value
    args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
    return fn(*args, **kwargs)

  closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*abstract)
  inputs = [_View(leaves[i], tuple(range(len(leaves[i].shape))), f"weight {paths[i]!r}")
            if is_weight[i] else leaves[i] for i in traced]
  outputs = _evaluate(closed.jaxpr, closed.consts, inputs, backend, on_other)
  outputs = [_returned(value) for value in outputs]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outputs)


def _returned(value):
  if not isinstance(value, _View):
    return value
  if value.perm != tuple(range(len(value.perm))):
    raise UnsupportedUse(f"the function returns {value.name} transposed; return it as stored")
  return value.weight


def _refuse(eqn, values) -> list:
  view = next(value for value in values if isinstance(value, _View))
  raise UnsupportedUse(
      f"{view.name} is used by `{eqn.primitive.name}`, which jaxquant cannot compute from a "
      "quantised weight (it intercepts contractions, gathers, transposes and dtype casts); "
      "keep this weight in float")


def _evaluate(jaxpr, consts, args, backend, on_other) -> list:
  env = {}

  def read(var):
    return var.val if isinstance(var, jax_core.Literal) else env[var]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    values = [read(var) for var in eqn.invars]
    if any(isinstance(value, _View) for value in values):
      outs = _intercepted(eqn, values, backend, on_other)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    for var, value in zip(eqn.outvars, outs):
      if not isinstance(var, jax_core.DropVar):
        env[var] = value
  return [read(var) for var in jaxpr.outvars]


def _intercepted(eqn, values, backend, on_other) -> list:
  name, params = eqn.primitive.name, eqn.params
  if name in _NESTED_PROGRAMS:
    program = params.get("jaxpr", params.get("call_jaxpr"))
    closed = program if isinstance(program, jax_core.ClosedJaxpr) else None
    return _evaluate(closed.jaxpr if closed else program, closed.consts if closed else [],
                     values, backend, on_other)
  if name in _REMAT:
    remat = jax.checkpoint(lambda *vals: _evaluate(params["jaxpr"], [], vals, backend, on_other),
                           prevent_cse=params["prevent_cse"], policy=params["policy"])
    return list(remat(*values))
  views = [value for value in values if isinstance(value, _View)]
  view = views[0]
  if name == "transpose":
    return [dataclasses.replace(view, perm=tuple(view.perm[a] for a in params["permutation"]))]
  if name == "convert_element_type" and jnp.issubdtype(params["new_dtype"], jnp.floating):
    return [dataclasses.replace(view, weight=view.weight.astype(params["new_dtype"]))]
  if name in ("copy", "copy_p"):
    return [view]
  if name == "dot_general" and len(views) == 1:
    return [_dot_general(eqn, values, backend)]
  if name == "gather" and isinstance(values[0], _View) and len(views) == 1:
    if view.perm == tuple(range(len(view.perm))):
      return [view.weight.gather(values[1], params)]
  return on_other(eqn, values)


def _dot_general(eqn, values, backend):
  """The equation's dot_general with the weight (either operand) through the core."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
  lhs, rhs = values
  weight_left = isinstance(lhs, _View)
  view, x = (lhs, rhs) if weight_left else (rhs, lhs)
  view_c, x_c = (lhs_c, rhs_c) if weight_left else (rhs_c, lhs_c)
  view_b, x_b = (lhs_b, rhs_b) if weight_left else (rhs_b, lhs_b)
  numbers = ((tuple(x_c), tuple(view.perm[a] for a in view_c)),
             (tuple(x_b), tuple(view.perm[a] for a in view_b)))
  out_dtype = eqn.outvars[0].aval.dtype
  y = contraction_lib.dot_general(x, view.weight, numbers, preferred_element_type=out_dtype,
                                  backend=backend)
  # The core lays out [batch, x free, weight free in the weight's axis order]; the equation
  # wants the weight's free axes in the view's order, and before x's when the weight is lhs.
  core = Contraction.of(numbers, x.shape, view.weight.shape)
  n_batch, n_x = len(x_b), len(core.x_free)
  view_free = [a for a in range(len(view.perm)) if a not in tuple(view_c) + tuple(view_b)]
  w_positions = [n_batch + n_x + core.w_free.index(view.perm[a]) for a in view_free]
  x_positions = list(range(n_batch, n_batch + n_x))
  order = list(range(n_batch)) + (w_positions + x_positions if weight_left
                                  else x_positions + w_positions)
  return jnp.transpose(y, order) if order != list(range(y.ndim)) else y


@dataclasses.dataclass(frozen=True)
class Use:
  """How a traced function uses one of its arrays.

  Attributes:
    kind: ``"contract"``, ``"gather"`` or ``"other"``.
    axes: for a contraction, the array's contracted axes; for a gather, its indexed axes.
    batch: for a contraction, the array's batch axes.
    operation: the primitive, for ``"other"``.
  """

  kind: str
  axes: tuple[int, ...] = ()
  batch: tuple[int, ...] = ()
  operation: str = ""


class _Probe:
  """A weight that records its uses and contributes zeros (for `discover`)."""

  def __init__(self, shape, dtype, uses: list):
    self.shape, self.dtype, self.uses = tuple(shape), np.dtype(dtype), uses

  def contract(self, x, contraction: Contraction, backend):
    del backend
    self.uses.append(Use("contract", contraction.w_contracting, contraction.w_batch))
    return jnp.zeros(contraction.output_shape(x.shape, self.shape), jnp.float32)

  def gather(self, indices, params):
    numbers = params["dimension_numbers"]
    whole = all(params["slice_sizes"][a] == self.shape[a] for a in range(len(self.shape))
                if a not in numbers.start_index_map)
    if (whole and set(numbers.collapsed_slice_dims) == set(numbers.start_index_map)
        and not numbers.operand_batching_dims):
      self.uses.append(Use("gather", tuple(numbers.start_index_map)))
    else:
      self.uses.append(Use("other", operation="gather of partial slices"))
    return lax.gather(jnp.zeros(self.shape, self.dtype), indices, **params)

  def dequantise(self, dtype=None):
    return jnp.zeros(self.shape, dtype or self.dtype)

  def astype(self, dtype):
    return _Probe(self.shape, dtype, self.uses)


def discover(fn: Callable, *args, follow: Callable[[str, Any], bool] | None = None,
             **kwargs) -> dict[str, list[Use]]:
  """How `fn(*args, **kwargs)` uses its float array arguments, found abstractly.

  Args:
    fn: the function.
    *args, **kwargs: its arguments (arrays or `jax.ShapeDtypeStruct`s: nothing is computed).
    follow: `follow(path, leaf)` says which leaves to follow, by their '/'-joined place in the
      arguments (default: every floating-point array with at least one axis).

  Returns:
    For each followed leaf's path, the list of its `Use`s, in program order.
  """
  follow = follow or (lambda path, leaf: len(leaf.shape) > 0 and jnp.issubdtype(
      leaf.dtype, jnp.floating))
  paths, leaves, treedef = _flatten((args, kwargs))
  uses = {}
  probes = []
  for path, leaf in zip(paths, leaves):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype") and follow(path, leaf):
      uses[path] = []
      leaf = _Probe(leaf.shape, leaf.dtype, uses[path])
    probes.append(leaf)

  def trace():
    _run(fn, probes, treedef, paths, "auto", on_other=_record_and_bind)

  jax.eval_shape(trace)
  return uses


def _record_and_bind(eqn, values) -> list:
  """Discovery's answer to any other operation: note it, then bind it on float stand-ins."""
  dense = []
  for value in values:
    if isinstance(value, _View):
      value.weight.uses.append(Use("other", operation=eqn.primitive.name))
      value = jnp.transpose(value.weight.dequantise(), value.perm)
    dense.append(value)
  outs = eqn.primitive.bind(*dense, **eqn.primitive.get_bind_params(eqn.params))
  return outs if eqn.primitive.multiple_results else [outs]
