"""Sharding quantised weights: partition specs derived from the float weight's, and placement.

A `QuantisedArray` is laid out over a device mesh as the float weight it replaces would be.
Given that weight's `PartitionSpec`, `partition_specs` gives one spec per array leaf:

- `codes`: the float weight's mesh axes, dimension by dimension. The quantised axis keeps its
  mesh axis although packing shortens it to n·bits/32 words.
- `scales` (and `offsets`): the same mesh axes, except that a dimension of size 1 is
  replicated (the quantised axis of per-channel scales, every axis of a per-tensor scale), so
  every shard holds the scales its codes need.
- `codebook`, `scale_scales` and `offset_scales` (second-level scales): small, replicated.

An `jaxquant.outliers.OutlierQuantisedArray` shards its dense part so and replicates its
sparse outliers (`values`, `indices`) on purpose: they are a small fraction of the weight
(2^-10 of it: 48 bits each), their flat indices address the whole weight, and every shard's
sparse product then reads them locally with no communication; XLA keeps the part of the
scatter each shard's output needs.

So that each shard holds whole blocks and whole packed words, and its codes line up with its
scales, a spec must satisfy:

- Along the quantised axis (length n, split s ways), each shard's n/s elements must be a
  multiple of lcm(block_size, 32): 32 codes pack into one group of `bits` words
  (`jaxquant.packing`), and a block must not straddle two shards. Per-channel and per-tensor
  scales have one scale along the axis, replicated, so a multiple of 32 suffices. Either way n
  needs no padding, so the packed axis (n·bits/32 words) splits at the same places.
- Every other sharded axis must divide evenly by its number of shards.

A spec that breaks a rule raises `ValueError` naming the axis, the sizes, the mesh axes and
what would work.

For a Flax kernel W[K, N] quantised along K (as `qmatmul` takes it):

- column-parallel, ``P(None, "model")``: each device holds all of K for N/s columns, with
  their scales; x @ W needs no communication and comes out sharded along N;
- row-parallel, ``P("model", None)``: each device holds K/s rows in whole blocks, with their
  scales, so it can form its partial product, summed over "model".

`shard` places one `QuantisedArray`; `shard_model` places every variable of an NNX model,
sharding each packed weight by the first regex that matches its layer's path. Under `jax.jit`
the sharded arrays are ordinary inputs: XLA partitions the computation, and chooses its
communication, from their shardings.

Example (no devices needed: an abstract mesh only names axes and sizes):

  >>> import jax, jaxquant as jq
  >>> from jax.sharding import AbstractMesh, PartitionSpec as P
  >>> w = jax.numpy.ones((512, 256))
  >>> q = jq.quantise(w, jq.QuantSpec("nf4", block_size=64, axis=0))
  >>> specs = partition_specs(q, P("model", None), AbstractMesh((4,), ("model",)))
  >>> specs.codes, specs.scales, specs.codebook
  (P('model', None), P('model', None), P())
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxquant import packing
from jaxquant.nn.nnx import QuantisedWeight
from jaxquant.outliers import OutlierQuantisedArray
from jaxquant.qarray import QuantisedArray

_COMMON_BLOCK_SIZES = (32, 64, 128, 256)


def _mesh_axes(entry) -> tuple[str, ...]:
  """The mesh axis names of one spec entry (None, a name or a tuple of names)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _check_spec(q, spec, mesh) -> tuple:
  """The spec's entries, one per axis of `q` (None where unsharded), after checking names."""
  if not isinstance(q, QuantisedArray):
    raise TypeError(f"q must be a QuantisedArray, got {type(q).__name__}")
  if not isinstance(spec, PartitionSpec):
    raise TypeError(f"spec must be a jax.sharding.PartitionSpec, got {type(spec).__name__}: "
                    f"write PartitionSpec{tuple(spec) if isinstance(spec, tuple) else '(...)'}")
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise TypeError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got {type(mesh).__name__}")
  if len(spec) > q.ndim:
    raise ValueError(f"spec={spec} has {len(spec)} entries but the weight has {q.ndim} axes "
                     f"(shape {q.shape}); give at most {q.ndim}")
  entries = tuple(spec) + (None,) * (q.ndim - len(spec))
  seen = set()
  for dim, entry in enumerate(entries):
    if entry is PartitionSpec.UNCONSTRAINED:
      raise ValueError(f"spec={spec} leaves axis {dim} unconstrained; a stored weight needs a "
                       "mesh axis name or None for every axis")
    for name in _mesh_axes(entry):
      if name not in mesh.shape:
        raise ValueError(f"spec={spec} names mesh axis {name!r}, which the mesh lacks; its axes "
                         f"are {tuple(mesh.axis_names)}")
      if name in seen:
        raise ValueError(f"spec={spec} uses mesh axis {name!r} twice; each mesh axis may shard "
                         "one axis of the weight")
      seen.add(name)
  return entries


def _check_divisible(q: QuantisedArray, dim: int, names: tuple[str, ...], shards: int) -> None:
  """Raises unless `shards` shards along axis `dim` hold whole blocks and words (or rows)."""
  n = q.shape[dim]
  named = repr(names[0]) if len(names) == 1 else repr(names)
  where = (f"axis {dim} (length {n}) of the weight of shape {q.shape} cannot be split "
           f"{shards} ways over mesh axis {named}")
  if dim != q.axis:
    if n % shards:
      raise ValueError(f"{where}: {n} is not a multiple of {shards}; use mesh axes whose sizes "
                       f"multiply to a divisor of {n}, or leave axis {dim} unsharded (None)")
    return
  if q.granularity == "block":
    unit = math.lcm(q.block_size, packing.GROUP)
    rule = f"lcm(block_size={q.block_size}, {packing.GROUP}) = {unit}"
  else:
    unit, rule = packing.GROUP, f"{packing.GROUP} (one packed word group)"
  if n % (shards * unit) == 0:
    return
  units = n // unit if n % unit == 0 else 0
  counts = [c for c in range(2, min(units, 1024) + 1) if units % c == 0][:8]
  fixes = [f"a shard count dividing {units}, such as {counts}" if counts else
           f"padding axis {dim} to a multiple of {shards * unit} before quantising"]
  if q.granularity == "block" and n % shards == 0:
    sizes = [b for b in _COMMON_BLOCK_SIZES if (n // shards) % math.lcm(b, packing.GROUP) == 0]
    if sizes:
      fixes.append(f"block_size in {sizes}")
  fixes.append(f"leaving axis {dim} unsharded (None)")
  raise ValueError(
      f"{where}: it is the quantised axis, and each shard would hold {n / shards:g} elements, "
      f"not a multiple of {rule}, so a block or a {packing.GROUP}-code word would straddle two "
      f"shards. What works: {'; '.join(fixes)}")


def partition_specs(q: QuantisedArray | OutlierQuantisedArray, spec: PartitionSpec,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
                    ) -> QuantisedArray | OutlierQuantisedArray:
  """The `PartitionSpec` of each leaf of `q`, from the spec of the float weight it quantises.

  Args:
    q: the quantised weight (its leaves may be abstract, e.g. from `jax.eval_shape`); an
      `OutlierQuantisedArray`'s dense part is specified so, its outliers replicated.
    spec: the float weight's spec: per axis None, a mesh axis name or a tuple of names;
      missing trailing entries mean unsharded.
    mesh: the mesh (a `jax.sharding.Mesh`, or an `AbstractMesh`: only axis sizes are read).

  Returns:
    A pytree with `q`'s structure whose leaves are `PartitionSpec`s: `codes` as `spec`,
    `scales` (and `offsets`) as `spec` with size-1 dimensions unsharded, `codebook`,
    `scale_scales` and `offset_scales` replicated (``P()``); leaves `q` lacks stay None.

  Raises:
    TypeError: an argument has the wrong type.
    ValueError: `spec` has too many entries, names a mesh axis the mesh lacks or one twice,
      or would split a block, a packed word group or an uneven axis across shards.
  """
  if isinstance(q, OutlierQuantisedArray):
    return dataclasses.replace(q, dense=partition_specs(q.dense, spec, mesh),
                               values=PartitionSpec(), indices=PartitionSpec())
  entries = _check_spec(q, spec, mesh)
  for dim, entry in enumerate(entries):
    names = _mesh_axes(entry)
    shards = math.prod(mesh.shape[name] for name in names)
    if shards > 1:
      _check_divisible(q, dim, names, shards)
  scales = tuple(None if size == 1 else entry for entry, size in zip(entries, q.scales.shape))
  return dataclasses.replace(
      q, codes=PartitionSpec(*entries), scales=PartitionSpec(*scales),
      codebook=PartitionSpec(),
      scale_scales=None if q.scale_scales is None else PartitionSpec(),
      offsets=None if q.offsets is None else PartitionSpec(*scales),
      offset_scales=None if q.offset_scales is None else PartitionSpec())


def _check_concrete(mesh) -> None:
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh with devices, got {type(mesh).__name__}; "
                    "an AbstractMesh can only give specs: use partition_specs")


def shard(q: QuantisedArray | OutlierQuantisedArray, spec: PartitionSpec,
          mesh: jax.sharding.Mesh) -> QuantisedArray | OutlierQuantisedArray:
  """`q` with every leaf placed on `mesh` by `partition_specs` (as `jax.device_put` does).

  Args:
    q: the quantised weight (a `QuantisedArray` or `OutlierQuantisedArray`).
    spec: the float weight's `PartitionSpec` (see `partition_specs`).
    mesh: a concrete `jax.sharding.Mesh`.

  Returns:
    The same weight, its leaves committed with `NamedSharding(mesh, leaf_spec)`.

  Raises:
    TypeError: `mesh` is not a concrete `Mesh`, or as `partition_specs`.
    ValueError: as `partition_specs`.
  """
  _check_concrete(mesh)
  specs = partition_specs(q, spec, mesh)
  return jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh,
                specs_by_path: Mapping[str, PartitionSpec]) -> nnx.Module:
  """Places every variable of an NNX model on `mesh`, sharding its packed weights, in place.

  A layer's path is the '/'-joined names from the model's root (``"layers/0/up"``), as in
  `jaxquant.Rule`. Each `QuantisedWeight` is sharded (`shard`) with the spec of the first
  pattern in `specs_by_path` that fully matches its layer's path; the spec is the float
  weight's (packed weights keep their float shape). Packed weights no pattern matches, and
  every other array
  (biases, norms, float layers), are replicated. Patterns that match no packed weight are
  warned about, since a mistyped pattern would silently replicate a layer.

  Args:
    model: an NNX model, e.g. after `jaxquant.nnx.quantise_model`.
    mesh: a concrete `jax.sharding.Mesh`.
    specs_by_path: regex → the float kernel's `PartitionSpec`, e.g. tensor-parallel MLP
      ``{".*up": P(None, "model"), ".*down": P("model", None)}``.

  Returns:
    The same model object, its variables placed on `mesh`.

  Raises:
    TypeError: `mesh` is not a concrete `Mesh`.
    ValueError: a pattern is not a valid regex, or a spec does not fit its layer's weight (the
      message names the layer; see `partition_specs`).
  """
  _check_concrete(mesh)
  patterns = []
  for pattern, spec in specs_by_path.items():
    try:
      patterns.append((pattern, re.compile(pattern), spec))
    except re.error as error:
      raise ValueError(f"specs_by_path key {pattern!r} is not a valid regex: {error}") from None
  replicated = NamedSharding(mesh, PartitionSpec())
  used = set()
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    value = variable.get_value()
    if isinstance(variable, QuantisedWeight):
      layer = "/".join(str(part) for part in path[:-1])
      match = next(((p, s) for p, regex, s in patterns if regex.fullmatch(layer)), None)
      if match is not None:
        used.add(match[0])
      try:
        variable.set_value(shard(value, PartitionSpec() if match is None else match[1], mesh))
      except ValueError as error:
        raise ValueError(f"layer {layer!r} (specs_by_path key {match[0]!r}): {error}") from None
    else:
      variable.set_value(jax.tree.map(
          lambda leaf: jax.device_put(leaf, replicated) if isinstance(leaf, jax.Array) else leaf,
          value))
  nnx.update(model, state)
  unused = [pattern for pattern, _, _ in patterns if pattern not in used]
  if unused:
    warnings.warn(f"specs_by_path patterns {unused} matched no quantised weight; check them "
                  "against the layer paths ('/'-joined, e.g. 'layers/0/up')", stacklevel=2)
  return model


__all__ = ["partition_specs", "shard", "shard_model"]
