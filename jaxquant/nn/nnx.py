"""Flax NNX layers with packed quantised weights, and conversion of whole models by rules.

- `QLinear`, `QEinsum`, `QEmbed`: inference layers holding a `QuantisedArray` in a
  `QuantisedWeight` variable. That variable type is not an `nnx.Param`, so `nnx.grad`,
  `nnx.Optimizer` and optax masks built on `nnx.Param` skip the packed codes, while the float
  leaves around them (biases, norms) still train.
- `QATLinear`: a float master kernel (an `nnx.Param`) whose forward is the packed forward
  (`jaxquant.qat.qat_matmul`): train it under `jit`, then `convert` it to a `QLinear` whose
  outputs are bit-identical.
- `quantise_model(model, rules)`: replaces every `nnx.Linear`, `nnx.Einsum` and `nnx.Embed` whose
  '/'-joined path a rule matches (first match wins, spec None keeps float), in place. With
  `params=` the model may be abstract (`nnx.eval_shape`) and the float weights come from host
  memory one layer at a time, so a model larger than device memory can be converted.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.kernels import qmatmul
from jaxquant.nn import rules as rules_lib
from jaxquant.qarray import QuantisedArray, QuantSpec, dequantise, quantise
from jaxquant.qat import qat_matmul


class QuantisedWeight(nnx.Variable):
  """A variable holding a `QuantisedArray` (packed codes, scales, codebook); not a Param."""


def _along(spec: QuantSpec, axis: int) -> QuantSpec:
  return spec if spec.axis == axis else dataclasses.replace(spec, axis=axis)


def _add_bias(y: jax.Array, bias, dtype) -> jax.Array:
  if bias is None:
    return y
  return y + bias[...].astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))


class QLinear(nnx.Module):
  """y = x @ W + b with W [in, out] packed along its input axis; forward by `qmatmul`."""

  def __init__(self, kernel: QuantisedArray, bias: jax.Array | None = None, *, dtype=None,
               backend: str = "auto"):
    if not isinstance(kernel, QuantisedArray) or kernel.ndim != 2 or kernel.axis != 0:
      raise ValueError("kernel must be a 2-D QuantisedArray quantised along axis 0")
    self.kernel = QuantisedWeight(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.dtype = dtype
    self.backend = backend
    self.in_features, self.out_features = kernel.shape

  @classmethod
  def from_linear(cls, linear: nnx.Linear, spec: QuantSpec, *, kernel=None, bias=None,
                  backend: str = "auto") -> "QLinear":
    """Quantises an `nnx.Linear` (its kernel, or `kernel` given from host memory)."""
    kernel = linear.kernel[...] if kernel is None else jnp.asarray(kernel)
    bias = (None if linear.bias is None else linear.bias[...]) if bias is None else bias
    return cls(quantise(kernel, _along(spec, 0)), bias, dtype=linear.dtype, backend=backend)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = qmatmul(x.astype(dtype), self.kernel.get_value(), backend=self.backend)
    return _add_bias(y, self.bias, dtype)


class QATLinear(nnx.Module):
  """A float master kernel trained through the packed forward (straight-through gradient)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, spec: QuantSpec, *,
               dtype=None, backend: str = "auto"):
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.spec = _along(spec, 0)
    self.dtype = dtype
    self.backend = backend

  @classmethod
  def from_linear(cls, linear: nnx.Linear, spec: QuantSpec, *, backend: str = "auto"):
    return cls(linear.kernel[...], None if linear.bias is None else linear.bias[...], spec,
               dtype=linear.dtype, backend=backend)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = qat_matmul(x.astype(dtype), self.kernel[...], self.spec, self.backend)
    return _add_bias(y, self.bias, dtype)

  def to_inference(self) -> QLinear:
    """The packed layer with exactly this forward."""
    return QLinear(quantise(self.kernel[...], self.spec, check_finite=False),
                   None if self.bias is None else self.bias[...], dtype=self.dtype,
                   backend=self.backend)


def _einsum_parts(einsum_str: str):
  """(input letters, kernel letters, output letters, contracted, free) of 'x,k->y'."""
  einsum_str = einsum_str.replace(" ", "")
  if "->" not in einsum_str or einsum_str.count(",") != 1 or "." in einsum_str:
    raise NotImplementedError(f"{einsum_str=}: QEinsum takes explicit 'x,k->y' equations")
  operands, out = einsum_str.split("->")
  lhs, rhs = operands.split(",")
  contracted = [c for c in rhs if c in lhs and c not in out]
  free = [c for c in rhs if c in out and c not in lhs]
  if len(contracted) + len(free) != len(rhs):
    raise NotImplementedError(
        f"{einsum_str=}: every kernel axis must be contracted or an output feature axis "
        "(no batch axes shared by input, kernel and output)")
  return lhs, rhs, out, contracted, free


class QEinsum(nnx.Module):
  """`nnx.Einsum` with a packed kernel: the kernel is stored as a 2-D [contracted, free] weight.

  For 'x,k->y' the kernel axes split into contracted ones (also in x) and free ones (also in
  y); the input's contracted axes are moved last, flattened and multiplied by `qmatmul`, and the
  result is laid out as `y`.
  """

  def __init__(self, einsum_str: str, kernel: QuantisedArray, kernel_shape, bias=None, *,
               dtype=None, backend: str = "auto"):
    self.einsum_str = einsum_str.replace(" ", "")
    _, rhs, _, contracted, free = _einsum_parts(self.einsum_str)
    self.kernel_shape = tuple(int(d) for d in kernel_shape)
    sizes = dict(zip(rhs, self.kernel_shape))
    expected = (math.prod(sizes[c] for c in contracted), math.prod(sizes[c] for c in free))
    if not isinstance(kernel, QuantisedArray) or kernel.shape != expected or kernel.axis != 0:
      raise ValueError(f"kernel must be a QuantisedArray of shape {expected} along axis 0")
    self.kernel = QuantisedWeight(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.dtype = dtype
    self.backend = backend

  @classmethod
  def from_einsum(cls, einsum: nnx.Einsum, spec: QuantSpec, *, kernel=None, bias=None,
                  backend: str = "auto") -> "QEinsum":
    if einsum.einsum_str is None:
      raise NotImplementedError("QEinsum needs the einsum_str given at construction")
    kernel = einsum.kernel[...] if kernel is None else jnp.asarray(kernel)
    bias = (None if einsum.bias is None else einsum.bias[...]) if bias is None else bias
    _, rhs, _, contracted, free = _einsum_parts(einsum.einsum_str)
    order = [rhs.index(c) for c in contracted + free]
    n_contracted = math.prod(kernel.shape[rhs.index(c)] for c in contracted)
    matrix = jnp.transpose(kernel, order).reshape(n_contracted, -1)
    return cls(einsum.einsum_str, quantise(matrix, _along(spec, 0)), kernel.shape, bias,
               dtype=einsum.dtype, backend=backend)

  def __call__(self, x: jax.Array) -> jax.Array:
    lhs, rhs, out, contracted, free = _einsum_parts(self.einsum_str)
    sizes = dict(zip(rhs, self.kernel_shape))
    kept = [c for c in lhs if c not in contracted]
    dtype = self.dtype or jnp.float32
    x = jnp.transpose(x.astype(dtype), [lhs.index(c) for c in kept + contracted])
    kept_shape = x.shape[:len(kept)]
    y = qmatmul(x.reshape(kept_shape + (-1,)), self.kernel.get_value(), backend=self.backend)
    y = y.reshape(kept_shape + tuple(sizes[c] for c in free))
    y = jnp.einsum(f"{''.join(kept + free)}->{out}", y)
    if self.bias is None:
      return y
    shape = [sizes[c] if c in free else 1 for c in out]
    return y + self.bias[...].astype(dtype).reshape(shape)


class QEmbed(nnx.Module):
  """`nnx.Embed` with a packed table [vocabulary, features], blocks along the features.

  A lookup gathers the packed rows and their scales and dequantises only those rows;
  `attend` (tied output heads) multiplies by the table one chunk of rows at a time.
  """

  def __init__(self, embedding: QuantisedArray, *, dtype=None):
    if not isinstance(embedding, QuantisedArray) or embedding.ndim != 2 or embedding.axis != 1:
      raise ValueError("embedding must be a 2-D QuantisedArray quantised along axis 1")
    if embedding.granularity == "tensor" or embedding.scale_scales is not None and (
        embedding.scales.dtype in (jnp.int8, jnp.uint8)):
      raise NotImplementedError("QEmbed needs per-row scales (no per-tensor or double-quantised"
                                " scales)")
    self.embedding = QuantisedWeight(embedding)
    self.dtype = dtype
    self.num_embeddings, self.features = embedding.shape

  @classmethod
  def from_embed(cls, embed: nnx.Embed, spec: QuantSpec, *, embedding=None) -> "QEmbed":
    table = embed.embedding[...] if embedding is None else jnp.asarray(embedding)
    return cls(quantise(table, _along(spec, 1)), dtype=embed.dtype)

  def _rows(self, q: QuantisedArray, rows: jax.Array) -> jax.Array:
    picked = dataclasses.replace(q, codes=q.codes[rows], scales=q.scales[rows],
                                 shape=(rows.shape[0], q.shape[1]))
    return dequantise(picked, self.dtype or q.dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids must be integers, got {ids.dtype}")
    rows = self._rows(self.embedding.get_value(), ids.reshape(-1))
    return rows.reshape(ids.shape + (self.features,))

  def attend(self, query: jax.Array, *, chunk: int = 4096) -> jax.Array:
    """query[..., features] @ tableᵀ, dequantising `chunk` rows of the table at a time."""
    q = self.embedding.get_value()
    chunk = min(chunk, self.num_embeddings)
    n_chunks = -(-self.num_embeddings // chunk)
    dtype = self.dtype or query.dtype
    flat = query.reshape(-1, self.features).astype(dtype)

    def part(index):
      rows = jnp.minimum(index * chunk + jnp.arange(chunk), self.num_embeddings - 1)
      return jnp.dot(flat, self._rows(q, rows).astype(dtype).T,
                     preferred_element_type=jnp.float32)

    logits = jnp.moveaxis(jax.lax.map(part, jnp.arange(n_chunks)), 0, 1)
    logits = logits.reshape(flat.shape[0], -1)[:, :self.num_embeddings]
    return logits.astype(dtype).reshape(query.shape[:-1] + (self.num_embeddings,))


_CONVERTIBLE = (nnx.Linear, nnx.Einsum, nnx.Embed)


def _path_string(path) -> str:
  return "/".join(str(part) for part in path)


def _parent_and_key(model, path):
  parent = model
  for part in path[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  return parent, path[-1]


def _replace(parent, key, module):
  if isinstance(key, int):
    parent[key] = module
  else:
    setattr(parent, key, module)


def _host_leaf(params, path, name):
  node = params
  for part in tuple(path) + (name,):
    node = node[part]
  return node


def quantise_model(model: nnx.Module, rules, *, mode: str = "ptq", backend: str = "auto",
                   params=None) -> nnx.Module:
  """Replaces the model's Linear/Einsum/Embed layers that `rules` quantise, in place.

  Args:
    model: an NNX model, or with `params` an abstract one from `nnx.eval_shape`.
    rules: a sequence of `jaxquant.Rule`; rules that match no layer are warned about.
    mode: ``"ptq"`` (packed inference layers) or ``"qat"`` (`QATLinear` for Linear layers:
      float master weights, packed forward; Einsum and Embed layers stay float in QAT).
    backend: the `qmatmul` backend of the new layers.
    params: optional nested dict of host (numpy) arrays shaped like `nnx.state(model)` as a
      pure dict; each quantised layer's float weight is then read from it and moved to the
      device alone, and every other variable is filled from it too.

  Returns:
    The same model object, converted.
  """
  if mode not in ("ptq", "qat"):
    raise ValueError(f"{mode=} is not one of ('ptq', 'qat')")
  rules = rules_lib.check_rules(rules)
  layers = [(path, module) for path, module in nnx.iter_modules(model)
            if path and isinstance(module, _CONVERTIBLE)]
  specs, _ = rules_lib.assign(rules, [_path_string(path) for path, _ in layers])
  if params is not None:
    _fill_floats(model, params, skip={_path_string(p) for p, _ in layers} & set(specs))
  for path, module in layers:
    spec = specs.get(_path_string(path))
    if spec is None:
      continue
    host = (lambda name, p=path: None if params is None else _host_leaf(params, p, name))
    if isinstance(module, nnx.Linear):
      bias = None if module.bias is None else host("bias")
      new = (QATLinear.from_linear(module, spec, backend=backend) if mode == "qat" else
             QLinear.from_linear(module, spec, kernel=host("kernel"), bias=bias,
                                 backend=backend))
    elif mode == "qat":
      continue
    elif isinstance(module, nnx.Einsum):
      bias = None if module.bias is None else host("bias")
      new = QEinsum.from_einsum(module, spec, kernel=host("kernel"), bias=bias, backend=backend)
    else:
      new = QEmbed.from_embed(module, spec, embedding=host("embedding"))
    _replace(*_parent_and_key(model, path), new)
  return model


def _fill_floats(model, params, skip):
  """Sets every variable not under a layer in `skip` from the host dict `params`."""
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    if any(_path_string(path).startswith(prefix + "/") for prefix in skip):
      continue
    value = params
    for part in path:
      value = value[part]
    variable.set_value(jnp.asarray(value))
  nnx.update(model, state)


def convert(model: nnx.Module) -> nnx.Module:
  """Replaces every `QATLinear` by its packed `QLinear` (bit-identical outputs), in place."""
  for path, module in list(nnx.iter_modules(model)):
    if path and isinstance(module, QATLinear):
      _replace(*_parent_and_key(model, path), module.to_inference())
  return model


def quantised_bytes(model: nnx.Module) -> int:
  """On-device bytes of every packed weight in the model (codes, scales, codebooks)."""
  total = 0
  for _, variable in nnx.to_flat_state(nnx.state(model, QuantisedWeight)):
    total += sum(leaf.on_device_size_in_bytes()
                 for leaf in jax.tree_util.tree_leaves(variable.get_value()))
  return total


__all__ = ["QATLinear", "QEinsum", "QEmbed", "QLinear", "QuantisedWeight", "convert",
           "quantise_model", "quantised_bytes"]
