"""Flax NNX: packed weights in any model, chosen by rules.

`quantise_model(model, rules)` returns a new model (the given one is untouched) in one of two
ways:

- Stock layers, no inputs needed: every `nnx.Linear`, `nnx.Einsum` and `nnx.Embed` whose path
  a rule matches becomes a `QLinear`, `QEinsum` or `QEmbed`, layers that hold the weight as
  the float layer does (kernel [in, out], the einsum kernel in its own shape, the table
  [vocabulary, features]) and compute through `jaxquant.contraction`.
- Any model, with `inputs=`: the model is traced once, abstractly, on the example inputs
  (`jaxquant.interception.discover`). Every parameter it contracts or gathers from is a weight
  (`jaxquant.nn.weights`), whatever module holds it and however the code reaches it (``@``,
  `jnp.einsum`, `jnp.dot`, `lax.dot_general`, ``w.T``, ``table[ids]``); rules match parameter
  paths (``blocks/0/w_in``) and module paths (``blocks/0``). Each selected weight is replaced in
  place, and the model's `methods` then run the model's own code under interception
  (`jaxquant.interception.call`): the contractions become packed ones, nothing is patched.

Variables: a packed weight lives in a `QuantisedWeight`, which is not an `nnx.Param`, so
`nnx.grad`, `nnx.Optimizer` and optax masks built on `nnx.Param` skip the codes while biases
and norms still train. With ``mode="qat"`` a weight stays a float master weight in a
`QATWeight`, an `nnx.Param` whose ``quantisation`` metadata is its `QuantSpec`: it trains
through the packed forward (`jaxquant.qat.FakeQuantised`), and `convert` packs it, with
bit-identical outputs.

With `params=` the model may be abstract (`nnx.eval_shape`): the float weights come from
host memory one at a time, so a model larger than device memory can be converted.

LoRA and QLoRA (`jaxquant.lora`): `add_lora(model, rules, rank=, alpha=)` returns a new model
whose selected weights (packed or float) stay frozen where they are and gain two `LoRAParam`
adapters each, A and B, shaped for the weight's contraction; its methods run under
interception, so each contraction computes x·Ŵ + (α/r)·(x·A)·B from the packed codes.
``nnx.Optimizer(model, tx, wrt=LoRAParam)`` trains the adapters alone, `save_lora` and
`restore_lora` write and read them alone, and `merge_lora` folds them into the weights.

GPTQ: `calibrate(model, batches, rules)` records the second moment of the inputs of every
weight the rules select (through `jaxquant.calibration`, so any module's weights), and
``quantise_model(model, rules, calibration=...)`` packs those weights by GPTQ
(`jaxquant.gptq`) instead of rounding each to nearest; the layout is the same.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant import calibration as calibration_lib
from jaxquant import contraction, interception, kernels, ops
from jaxquant import lora as lora_lib
from jaxquant.calibration import SecondMoment
from jaxquant.lora import LoRAWeight
from jaxquant.nn import checkpoint
from jaxquant.nn import rules as rules_lib
from jaxquant.nn import weights as weights_lib
from jaxquant.qarray import QuantSpec
from jaxquant.qat import FakeQuantised

# Set while an intercepted method runs the model's code, so methods it calls run plainly.
_INTERCEPTING = contextvars.ContextVar("jaxquant_intercepting", default=False)


class QuantisedWeight(nnx.Variable):
  """A variable holding a packed weight (a `QuantisedArray` or another weight type); not a
  Param."""


class QATWeight(nnx.Param):
  """A float master weight trained through its packed quantisation (metadata
  ``quantisation``: the `QuantSpec`, blocks along its axis)."""


def weight_variable(weight) -> nnx.Variable:
  """The variable for a weight: a `QATWeight` for a `FakeQuantised`, else a `QuantisedWeight`."""
  if isinstance(weight, FakeQuantised):
    return QATWeight(weight.weight, quantisation=weight.spec)
  return QuantisedWeight(weight)


def weight_of(variable: nnx.Variable):
  """The weight a variable holds (a `FakeQuantised` for a `QATWeight`), else its value."""
  if isinstance(variable, QATWeight):
    return FakeQuantised(variable.get_value(), variable.get_metadata()["quantisation"])
  return variable.get_value()


def _add_bias(y: jax.Array, bias, shape) -> jax.Array:
  return y if bias is None else y + bias[...].astype(y.dtype).reshape(shape)


class QLinear(nnx.Module):
  """y = x @ W + b for a weight W [in, out] (packed, or fake-quantised for QAT)."""

  def __init__(self, kernel, bias: jax.Array | None = None, *, dtype=None,
               backend: str = "auto"):
    if not contraction.is_weight(kernel) or len(kernel.shape) != 2:
      raise ValueError(f"kernel must be a 2-D weight [in, out] (a QuantisedArray or a "
                       f"FakeQuantised), got {type(kernel).__name__}")
    self.kernel = weight_variable(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.dtype = dtype
    self.backend = backend
    self.in_features, self.out_features = kernel.shape

  @classmethod
  def from_linear(cls, linear: nnx.Linear, spec: QuantSpec, *, kernel=None, bias=None,
                  mode: str = "ptq", backend: str = "auto",
                  calibration: weights_lib.Calibrated | None = None) -> "QLinear":
    """Quantises an `nnx.Linear` (its kernel, or `kernel` given from host memory; by GPTQ
    with `calibration`)."""
    kernel = linear.kernel[...] if kernel is None else kernel
    bias = (None if linear.bias is None else linear.bias[...]) if bias is None else bias
    return cls(weights_lib.prepare(kernel, spec, 0, mode, calibration), bias, dtype=linear.dtype,
               backend=backend)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = jnp.asarray(x).astype(dtype)
    y = contraction.dot_general(x, weight_of(self.kernel), (((x.ndim - 1,), (0,)), ((), ())),
                                backend=self.backend)
    return _add_bias(y, self.bias, (1,) * (y.ndim - 1) + (-1,))


def _einsum_letters(einsum_str: str) -> tuple[str, str, str]:
  """(input, kernel, output) subscripts of an explicit two-operand equation."""
  einsum_str = einsum_str.replace(" ", "")
  if "->" not in einsum_str or einsum_str.count(",") != 1:
    raise ValueError(f"{einsum_str=}: QEinsum takes explicit 'x,kernel->y' equations")
  operands, out = einsum_str.split("->")
  lhs, rhs = operands.split(",")
  if "." in rhs:
    raise ValueError(f"{einsum_str=}: the kernel's subscripts must name every axis")
  return lhs, rhs, out


class QEinsum(nnx.Module):
  """`nnx.Einsum` with a weight in the kernel's own shape (packed, or fake-quantised)."""

  def __init__(self, einsum_str: str, kernel, bias=None, *, dtype=None,
               backend: str = "auto"):
    _, rhs, _ = _einsum_letters(einsum_str)
    if not contraction.is_weight(kernel) or len(kernel.shape) != len(rhs):
      raise ValueError(f"kernel must be a weight with {len(rhs)} axes for {einsum_str!r}")
    self.einsum_str = einsum_str.replace(" ", "")
    self.kernel = weight_variable(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.dtype = dtype
    self.backend = backend

  @classmethod
  def from_einsum(cls, einsum: nnx.Einsum, spec: QuantSpec, *, kernel=None, bias=None,
                  mode: str = "ptq", backend: str = "auto",
                  calibration: weights_lib.Calibrated | None = None) -> "QEinsum":
    """Quantises an `nnx.Einsum` along its longest contracted kernel axis (by GPTQ with
    `calibration`)."""
    if einsum.einsum_str is None:
      raise ValueError("QEinsum needs the einsum_str given at construction")
    lhs, rhs, out = _einsum_letters(einsum.einsum_str)
    kernel = einsum.kernel[...] if kernel is None else kernel
    bias = (None if einsum.bias is None else einsum.bias[...]) if bias is None else bias
    contracted = [a for a, c in enumerate(rhs) if c in lhs and c not in out]
    if not contracted:
      raise ValueError(f"{einsum.einsum_str!r} contracts no kernel axis")
    axis = weights_lib.block_axis(kernel.shape, contracted, weights_lib.block_size_of(spec))
    return cls(einsum.einsum_str, weights_lib.prepare(kernel, spec, axis, mode, calibration), bias,
               dtype=einsum.dtype, backend=backend)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    kernel = weight_of(self.kernel)
    y = ops.einsum(self.einsum_str, jnp.asarray(x).astype(dtype), kernel, backend=self.backend)
    _, rhs, out = _einsum_letters(self.einsum_str)
    out = out.replace("...", "." * (y.ndim - len(out.replace("...", ""))))
    shape = [kernel.shape[rhs.index(c)] if c in rhs else 1 for c in out]
    return _add_bias(y, self.bias, shape)


class QEmbed(nnx.Module):
  """`nnx.Embed` with a weight table [vocabulary, features] quantised along the features.

  A lookup gathers the packed rows and dequantises only those (out-of-range ids give NaN rows,
  as `nnx.Embed`'s `jnp.take` does); `attend` (a tied output head) contracts the table along
  its features from the packed codes.
  """

  def __init__(self, embedding, *, dtype=None, backend: str = "auto"):
    if not contraction.is_weight(embedding) or len(embedding.shape) != 2:
      raise ValueError("embedding must be a 2-D weight [vocabulary, features]")
    self.embedding = weight_variable(embedding)
    self.dtype = dtype
    self.backend = backend
    self.num_embeddings, self.features = embedding.shape

  @classmethod
  def from_embed(cls, embed: nnx.Embed, spec: QuantSpec, *, embedding=None,
                 mode: str = "ptq", backend: str = "auto",
                 calibration: weights_lib.Calibrated | None = None) -> "QEmbed":
    """Quantises an `nnx.Embed` along its features (by GPTQ with `calibration`, from the
    second moment of a tied head's inputs)."""
    table = embed.embedding[...] if embedding is None else embedding
    return cls(weights_lib.prepare(table, spec, 1, mode, calibration), dtype=embed.dtype,
               backend=backend)

  def __call__(self, ids: jax.Array) -> jax.Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids must be integers, got {ids.dtype}")
    rows = ops.take(weight_of(self.embedding), ids, axis=0)
    return rows.astype(self.dtype or rows.dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    """query[..., features] @ tableᵀ, from the packed table."""
    dtype = self.dtype or query.dtype
    query = jnp.asarray(query).astype(dtype)
    return contraction.dot_general(query, weight_of(self.embedding),
                                   (((query.ndim - 1,), (1,)), ((), ())), backend=self.backend)


_STOCK = (nnx.Linear, nnx.Einsum, nnx.Embed)
_STOCK_WEIGHT = {nnx.Linear: "kernel", nnx.Einsum: "kernel", nnx.Embed: "embedding"}


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


def replace_module(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
  """Puts `module` at `path` (attribute names and list indices, as `nnx.iter_modules`
  gives them) in `model`, in place."""
  _replace(*_parent_and_key(model, path), module)


def _host_leaf(params, path):
  node = params
  for part in path:
    node = node[part]
  return node


def quantise_model(model: nnx.Module, rules, *, mode: str = "ptq", backend: str = "auto",
                   params=None, inputs: Sequence | None = None,
                   methods: Sequence[str] = ("__call__",),
                   calibration: Mapping[str, SecondMoment] | None = None,
                   damping: float = 0.01, act_order: bool = False) -> nnx.Module:
  """A new model with the weights that `rules` select quantised (module docstring).

  Args:
    model: an NNX model, or with `params` an abstract one from `nnx.eval_shape`.
    rules: a sequence of `jaxquant.Rule`; rules that match no weight are warned about.
    mode: ``"ptq"`` (packed weights) or ``"qat"`` (float master weights trained through the
      packed forward; `convert` packs them).
    backend: the `jaxquant.kernels` backend of the contractions.
    params: optional nested dict of host (numpy) arrays shaped like `nnx.state(model)` as a
      pure dict; every variable is filled from it, each quantised weight moved to the device
      alone.
    inputs: example positional arguments of ``methods[0]`` (arrays or `jax.ShapeDtypeStruct`s;
      nothing is computed). With them every weight of any module is found by tracing; without
      them only stock layers are quantised.
    methods: with `inputs`, the model's methods that run under interception.
    calibration: parameter path → `jaxquant.calibration.SecondMoment` (from `calibrate`):
      the weights it covers are packed by GPTQ (`jaxquant.gptq`), the others rounded to
      nearest with a warning naming them. One weight's H is in use at a time.
    damping, act_order: GPTQ's options (`jaxquant.gptq.quantise`).

  Returns:
    The quantised model; `model` is left as it was.

  Raises:
    ValueError: `mode` is unknown, or a rule selects a weight that packed codes cannot serve
      (one used outside contractions and gathers; the message names each).

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> from flax import nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (128, 4, 32)))
    ...   def __call__(self, x):
    ...     return jnp.einsum("btd,dhk->bthk", x, self.w[...])
    >>> x = jnp.ones((2, 5, 128))
    >>> quantised = quantise_model(Block(nnx.Rngs(0)), [jq.Rule("w", jq.QuantSpec("nf4"))],
    ...                            inputs=(x,))
    >>> type(quantised.w).__name__, quantised(x).shape
    ('QuantisedWeight', (2, 5, 4, 32))
  """
  if mode not in weights_lib.MODES:
    raise ValueError(f"{mode=} is not one of {weights_lib.MODES}")
  rules = rules_lib.check_rules(rules)
  model = nnx.clone(model)
  gptq = functools.partial(weights_lib.calibrated, calibration=calibration, damping=damping,
                           act_order=act_order)
  if inputs is None:
    return _quantise_stock_layers(model, rules, mode, backend, params, gptq)
  return _quantise_traced(model, rules, mode, backend, params, tuple(inputs), tuple(methods),
                          gptq)


def _quantise_stock_layers(model, rules, mode, backend, params, gptq):
  layers = [(path, module) for path, module in nnx.iter_modules(model)
            if path and isinstance(module, _STOCK)]
  weight_path = lambda path, module: _path_string(path) + "/" + _STOCK_WEIGHT[type(module)]
  specs, _ = rules_lib.assign(rules, [(weight_path(path, module), _path_string(path))
                                      for path, module in layers])
  chosen = {path: specs[weight_path(path, module)] for path, module in layers
            if weight_path(path, module) in specs}
  calibrated = gptq([weight_path(path, module) for path, module in layers
                     if path in chosen])
  if params is not None:
    _fill_floats(model, params, skip={_path_string(path) for path in chosen})
  for path, module in layers:
    spec = chosen.get(path)
    if spec is None:
      continue
    host = (lambda name, p=path: None if params is None else _host_leaf(params, p + (name,)))
    calibration = calibrated.get(weight_path(path, module))
    if isinstance(module, nnx.Linear):
      new = QLinear.from_linear(module, spec, kernel=host("kernel"),
                                bias=None if module.bias is None else host("bias"),
                                mode=mode, backend=backend, calibration=calibration)
    elif isinstance(module, nnx.Einsum):
      new = QEinsum.from_einsum(module, spec, kernel=host("kernel"),
                                bias=None if module.bias is None else host("bias"),
                                mode=mode, backend=backend, calibration=calibration)
    else:
      new = QEmbed.from_embed(module, spec, embedding=host("embedding"), mode=mode,
                              backend=backend, calibration=calibration)
    replace_module(model, path, new)
  return model


def _fill_floats(model, params, skip):
  """Sets every variable not under a layer in `skip` from the host dict `params`."""
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    if any(_path_string(path).startswith(prefix + "/") for prefix in skip):
      continue
    variable.set_value(jnp.asarray(_host_leaf(params, path)))
  nnx.update(model, state)


def _traced_uses(model, inputs, methods, followed) -> tuple[list, dict, dict]:
  """The model's flat state, its variables' shapes, and the `Use`s of the variables that
  `followed(variable)` selects, found by tracing ``methods[0]`` abstractly on `inputs`."""
  base = getattr(type(model), "_jaxquant_float_type", type(model))
  graphdef, state = nnx.split(model)
  flat = list(nnx.to_flat_state(state))
  chosen = {_path_string(path) for path, variable in flat if followed(variable)}
  abstract = {_path_string(path): jax.ShapeDtypeStruct(variable.get_value().shape,
                                                       variable.get_value().dtype)
              for path, variable in flat}

  def run(values, *args):
    module = nnx.merge(graphdef, _with_values(flat, values))
    return getattr(base, methods[0])(module, *args)

  uses = interception.discover(
      run, abstract, *inputs,
      follow=lambda path, leaf: path in chosen and jnp.issubdtype(leaf.dtype, jnp.floating))
  return flat, abstract, uses


def _quantise_traced(model, rules, mode, backend, params, inputs, methods, gptq):
  base = getattr(type(model), "_jaxquant_float_type", type(model))
  trainable = lambda variable: (isinstance(variable, nnx.Param)
                                and not isinstance(variable, QATWeight)
                                and not contraction.is_weight(variable.get_value()))
  flat, abstract, uses = _traced_uses(model, inputs, methods, trainable)
  found = [path for path, path_uses in uses.items() if weights_lib.is_weight_use(path_uses)]
  specs, _ = rules_lib.assign(rules, [(path, path.rpartition("/")[0]) for path in found])
  selected = [weights_lib.classify(path, abstract[path].shape, uses[path],
                                   specs[path].block_size)
              for path in found if path in specs]
  refused = [w for w in selected if w.refusal is not None]
  if refused:
    raise weights_lib.refused(refused)
  chosen = {w.path: (specs[w.path], w.axis) for w in selected}
  calibrated = gptq(list(chosen))
  for path, variable in flat:
    name = _path_string(path)
    value = variable.get_value() if params is None else _host_leaf(params, path)
    if name in chosen:
      spec, axis = chosen[name]
      new = weight_variable(weights_lib.prepare(value, spec, axis, mode, calibrated.get(name)))
      replace_module(model, path, new)
    elif params is not None:
      variable.set_value(jnp.asarray(value))
  if params is not None:
    nnx.update(model, nnx.from_flat_state(
        [(path, variable) for path, variable in flat if _path_string(path) not in chosen]))
  model.__class__ = _intercepting_class(base, methods, backend)
  return model


def _with_values(flat, values: dict) -> nnx.State:
  return nnx.from_flat_state([(path, variable.replace(values[_path_string(path)]))
                              for path, variable in flat])


def _stored(leaf):
  """What a variable stores for a weight the model's code passed through."""
  leaf = leaf.base if isinstance(leaf, LoRAWeight) else leaf
  return leaf.weight if isinstance(leaf, FakeQuantised) else leaf


@functools.cache
def _intercepting_class(base: type, methods: tuple[str, ...], backend: str) -> type:
  """`base` with `methods` run under `jaxquant.interception` (one class per combination, so
  quantised models of one class share compiled programs)."""
  fields = {"_jaxquant_float_type": base, "_jaxquant_methods": methods,
            "_jaxquant_backend": backend}
  for name in methods:
    fields[name] = _intercepted_method(getattr(base, name), backend)
  return type(base.__name__, (base,), fields)


def _intercepted_method(original, backend: str):

  @functools.wraps(original)
  def method(self, *args, **kwargs):
    if _INTERCEPTING.get():
      return original(self, *args, **kwargs)  # called inside the trace of another method
    dropout_key = _lora_dropout_key(self)
    graphdef, state = nnx.split(self)
    flat = list(nnx.to_flat_state(state))
    values = _with_adapters({_path_string(path): weight_of(variable)
                             for path, variable in flat}, flat, dropout_key)
    if not any(contraction.is_weight(value) for value in values.values()):
      return original(self, *args, **kwargs)

    def run(values, args, kwargs):
      module = nnx.merge(graphdef, _with_values(flat, values))
      out = original(module, *args, **kwargs)
      return out, nnx.state(module)

    token = _INTERCEPTING.set(True)
    try:
      out, after = interception.call(run, values, args, kwargs, backend=backend)
    finally:
      _INTERCEPTING.reset(token)
    nnx.update(self, jax.tree_util.tree_map(
        _stored, after, is_leaf=lambda leaf: isinstance(leaf, (FakeQuantised, LoRAWeight))))
    return out

  return method


def calibrate(model: nnx.Module, batches: Iterable, rules=None, *,
              method: str = "__call__") -> dict[str, SecondMoment]:
  """The second moment H = Σ x xᵀ of the inputs of each weight of a float `model`, over
  calibration `batches`, for GPTQ (`quantise_model(..., calibration=...)`).

  The model's `method` runs on each batch (a tuple of positional arguments, or one argument)
  as one jitted step, under `jaxquant.calibration`: every contraction the model's code makes
  with a selected parameter records the activations it meets, whatever module holds it.

  Args:
    model: a float NNX model.
    batches: calibration batches (e.g. token ids [batch, length]).
    rules: the `jaxquant.Rule`s the model will be quantised with: only the weights they
      quantise are recorded (default: every float parameter with two or more axes).
    method: the method to run on each batch.

  Returns:
    Parameter path (``layers/0/attention/q/kernel``) → `SecondMoment`.
  """
  graphdef, state = nnx.split(model)
  flat = list(nnx.to_flat_state(state))
  values = {_path_string(path): variable.get_value() for path, variable in flat}
  if rules is None:
    chosen = None
  else:
    float_paths = [name for name, value in values.items()
                   if getattr(value, "ndim", 0) >= 2 and jnp.issubdtype(value.dtype, jnp.floating)]
    chosen, _ = rules_lib.assign(rules, [(name, name.rpartition("/")[0]) for name in float_paths],
                                 warn=False)

  def run(values, batch):
    module = nnx.merge(graphdef, _with_values(flat, values))
    return getattr(module, method)(*(batch if isinstance(batch, tuple) else (batch,)))

  select = None if chosen is None else (lambda path, leaf: path in chosen)
  return calibration_lib.accumulate(run, values, batches, select=select)


def convert(model: nnx.Module) -> nnx.Module:
  """A new model with every fake-quantised (QAT) weight packed: bit-identical outputs."""
  model = nnx.clone(model)
  for path, variable in list(nnx.to_flat_state(nnx.state(model))):
    if isinstance(variable, QATWeight):
      replace_module(model, path, QuantisedWeight(weight_of(variable).pack()))
  return model


def quantised_bytes(model: nnx.Module) -> int:
  """On-device bytes of every packed weight in the model (codes, scales, codebooks)."""
  total = 0
  for _, variable in nnx.to_flat_state(nnx.state(model, QuantisedWeight)):
    total += sum(leaf.on_device_size_in_bytes()
                 for leaf in jax.tree_util.tree_leaves(variable.get_value()))
  return total


class LoRAParam(nnx.Param):
  """A LoRA adapter factor, A or B, of a frozen weight (metadata ``lora``: its
  `jaxquant.lora.AdapterLayout`); ``nnx.Optimizer(model, tx, wrt=LoRAParam)`` trains only
  these."""


# The adapters of a weight held as `name` are the attributes `name + suffix` of its module.
_LORA_A, _LORA_B = "_lora_a", "_lora_b"


def _with_adapters(values: dict, flat, dropout_key: jax.Array | None = None) -> dict:
  """`values` (path → weight or array) with each adapted weight made a `LoRAWeight` (each
  with its own dropout key folded from `dropout_key`, if given)."""
  adapted = dict(values)
  firsts = [(_path_string(path), variable) for path, variable in flat
            if isinstance(variable, LoRAParam) and _path_string(path).endswith(_LORA_A)]
  for index, (name, variable) in enumerate(firsts):
    weight = name[:-len(_LORA_A)]
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
    adapted[weight] = LoRAWeight(values[weight], lora_lib.Adapters(
        values[name], values[weight + _LORA_B], variable.get_metadata()["lora"]), key)
  return adapted


def _lora_dropout_key(model) -> jax.Array | None:
  """A fresh key from the model's adapter dropout (`add_lora`), unless it is off."""
  dropout = getattr(model, "lora_dropout", None)
  if not isinstance(dropout, nnx.Dropout) or dropout.deterministic:
    return None
  return dropout.rngs()


def _stock_sites(model) -> list[weights_lib.AdapterSite]:
  """The kernels of the stock and jaxquant linear and einsum layers, with their axes."""
  found = []
  for path, module in nnx.iter_modules(model):
    name = _path_string(path + ("kernel",))
    if isinstance(module, (nnx.Linear, QLinear)):
      found.append(weights_lib.AdapterSite(name, tuple(module.kernel.get_value().shape), (0,)))
    elif isinstance(module, (nnx.Einsum, QEinsum)) and module.einsum_str is not None:
      lhs, rhs, out = _einsum_letters(module.einsum_str)
      found.append(weights_lib.AdapterSite(
          name, tuple(module.kernel.get_value().shape),
          tuple(a for a, c in enumerate(rhs) if c in lhs and c not in out),
          tuple(a for a, c in enumerate(rhs) if c in lhs and c in out)))
  return found


def _traced_sites(model, inputs, methods) -> list[weights_lib.AdapterSite]:
  """Every weight the model's code contracts or gathers from, found by tracing it."""
  followed = lambda variable: (isinstance(variable, (nnx.Param, QuantisedWeight))
                               and not isinstance(variable, LoRAParam))
  _, abstract, uses = _traced_uses(model, inputs, methods, followed)
  return [weights_lib.adapter_site(name, abstract[name].shape, path_uses)
          for name, path_uses in uses.items() if weights_lib.is_weight_use(path_uses)]


def add_lora(model: nnx.Module, rules, *, rank: int, alpha: float, dropout: float = 0.0,
             seed: int = 0, inputs: Sequence | None = None, methods: Sequence[str] | None = None,
             backend: str | None = None) -> nnx.Module:
  """A new model with LoRA adapters on every weight that `rules` select (`jaxquant.lora`).

  Each selected weight W (packed, as `quantise_model` left it, or float) stays where it is,
  frozen, and its module gains two `LoRAParam`s, ``<name>_lora_a`` (A: W's batch and
  contracted axes, then r; drawn N(0, 1/fan_in)) and ``<name>_lora_b`` (B: r, then W's free
  axes; zero), so the new model computes what `model` does until B is trained. Its methods
  run under interception: each contraction of W computes x·Ŵ + (α/r)·(x·A)·B in one call,
  from the packed codes. Train with ``nnx.Optimizer(model, tx, wrt=LoRAParam)``.

  Args:
    model: an NNX model (float, or quantised by `quantise_model`); it is left as it was.
    rules: a regex, or a sequence of them, matched in full against each weight's parameter
      path (``layers/3/mlp/up/kernel``) and its module's path (``layers/3/mlp/up``).
    rank: r ≥ 1.
    alpha: α; the adapters' product is scaled by α/r.
    dropout: the rate at which the adapters' input elements are dropped in training (the base
      reads them all); an `nnx.Dropout` at ``model.lora_dropout`` draws the masks, so
      ``model.eval()`` turns it off and ``model.train()`` on.
    seed: the seed A and the dropout masks are drawn from.
    inputs: example positional arguments of ``methods[0]`` (arrays or
      `jax.ShapeDtypeStruct`s): every weight the model's code contracts is found by tracing,
      whatever module holds it, with the axes of its contraction. Without them, the kernels
      of `nnx.Linear`, `nnx.Einsum`, `QLinear` and `QEinsum` layers.
    methods: the methods that run under interception (default: those `quantise_model` chose,
      else ``("__call__",)``).
    backend: the `jaxquant.kernels` backend (default: the one `quantise_model` chose, else
      ``"auto"``).

  Raises:
    TypeError: `rules` are not regexes.
    ValueError: `rank` < 1, `alpha` is not finite or `dropout` not in [0, 1); no weight
      matches `rules`; a selected weight is gathered or contracted over different axes in
      different places, or is an item of a list rather than an attribute of a module.

  Warns:
    UserWarning: naming patterns that matched no weight.
  """
  lora_lib.check_options(rank, alpha, dropout)
  model = nnx.clone(model)
  methods = tuple(methods or getattr(type(model), "_jaxquant_methods", ("__call__",)))
  backend = kernels.check_backend(backend or getattr(type(model), "_jaxquant_backend", "auto"))
  sites = (_stock_sites(model) if inputs is None
           else _traced_sites(model, tuple(inputs), methods))
  paths = {_path_string(path): path for path, _ in nnx.to_flat_state(nnx.state(model))}
  key = jax.random.key(seed)
  for index, site in enumerate(weights_lib.select_sites(rules, sites)):
    parent, name = _parent_and_key(model, paths[site.path])
    if not isinstance(name, str):
      raise ValueError(f"{site.path} is an item of a list; adapters are attributes of the "
                       "module that holds the weight")
    layout = lora_lib.layout_for(site.shape, site.contracting, site.batch, rank=rank,
                                 alpha=alpha, dropout=dropout)
    adapters = lora_lib.init_adapters(jax.random.fold_in(key, index), site.shape, layout, rank)
    setattr(parent, name + _LORA_A, LoRAParam(adapters.a, lora=layout))
    setattr(parent, name + _LORA_B, LoRAParam(adapters.b, lora=layout))
  if dropout > 0:
    model.lora_dropout = nnx.Dropout(dropout, rngs=nnx.Rngs(dropout=seed))
  base = getattr(type(model), "_jaxquant_float_type", type(model))
  model.__class__ = _intercepting_class(base, methods, backend)
  return model


def merge_lora(model: nnx.Module, rules: rules_lib.Rule | Sequence[rules_lib.Rule] = (), *,
               calibration: Mapping[str, SecondMoment] | None = None, damping: float = 0.01,
               act_order: bool = False) -> nnx.Module:
  """A new model with each adapted weight replaced by W + (α/r)·A·B and its adapters removed.

  A float base becomes the float sum. A packed base is dequantised, summed and packed again,
  one weight at a time, along the base's own axis with the `QuantSpec` that `rules` give it
  (the rules it was quantised with), else with the spec the base records
  (`jaxquant.nn.weights.spec_of`: its codebook, blocks and scale storage; absmax or signmax
  scaling): by rounding to nearest, or by GPTQ (`jaxquant.gptq`) for the weights
  `calibration` has a second moment for (`calibrate`).

  Raises:
    ValueError: the model has no adapters.
  """
  model = nnx.clone(model)
  flat = list(nnx.to_flat_state(nnx.state(model)))
  values = {_path_string(path): weight_of(variable) for path, variable in flat}
  adapted = {name: weight for name, weight in _with_adapters(values, flat).items()
             if isinstance(weight, LoRAWeight)}
  if not adapted:
    raise ValueError("the model has no LoRA adapters (add them with add_lora)")
  specs = weights_lib.merge_specs(rules_lib.check_rules(rules), adapted)
  calibrated = weights_lib.calibrated(list(specs), calibration, damping=damping,
                                      act_order=act_order)
  variables = {_path_string(path): (path, variable) for path, variable in flat}
  for name, weight in adapted.items():
    path, variable = variables[name]
    merged = weights_lib.merged(weight, specs.get(name), calibrated.get(name))
    new = QuantisedWeight(merged) if name in specs else variable.replace(merged)
    parent, key = _parent_and_key(model, path)
    _replace(parent, key, new)
    delattr(parent, key + _LORA_A)
    delattr(parent, key + _LORA_B)
  if isinstance(getattr(model, "lora_dropout", None), nnx.Dropout):
    del model.lora_dropout
  return model


def save_lora(path, model: nnx.Module, *, overwrite: bool = False) -> None:
  """Saves the model's adapters alone (its `LoRAParam`s) as a `jaxquant.nn.checkpoint`."""
  checkpoint.save(path, nnx.state(model, LoRAParam), overwrite=overwrite)


def restore_lora(path, model: nnx.Module) -> nnx.Module:
  """Loads adapters saved by `save_lora` into `model` (the same weights adapted at the same
  rank: `add_lora` on the packed base), in place; returns it."""
  nnx.update(model, checkpoint.restore(path, nnx.state(model, LoRAParam)))
  return model


__all__ = ["LoRAParam", "QATWeight", "QEinsum", "QEmbed", "QLinear", "QuantisedWeight",
           "add_lora", "calibrate", "convert", "merge_lora", "quantise_model", "quantised_bytes",
           "restore_lora", "save_lora", "weight_of", "weight_variable"]
