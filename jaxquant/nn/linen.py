"""Flax Linen: packed weights in any model's params, and quantised serving of unmodified models.

`quantise_params(params, rules)` returns a copy of a ``params`` tree with the weights that
`rules` select replaced by `QuantisedArray`s of the same shape (or, with ``mode="qat"``,
`jaxquant.qat.FakeQuantised` float master weights). Which leaves are weights, and the axis each
is quantised along, comes from one of two places:

- ``model=`` and ``inputs=``: the model is traced once, abstractly
  (`jaxquant.interception.discover`): every parameter it contracts or gathers from is a weight
  (`jaxquant.nn.weights`), whatever module holds it and however its code reaches it: custom
  modules calling `jnp.einsum` on ``self.param("w", ...)`` (Google's gemma style), kernels
  stored [out, in] and contracted by `lax.dot_general` (Hugging Face's Flax style), tied
  embeddings used as a gather and as the head.
- Without them, the tree's structure: every ``kernel`` leaf of ndim ≥ 2, with Flax's
  Dense/DenseGeneral layout in_axes + features (the number of feature axes is the bias's
  ndim, else 1 for a 2-D kernel, else ``feature_ndims[path]``), contracted over its input
  axes.

`quantised_apply(model, variables, *args, **kwargs)` is ``model.apply(variables, ...)`` with
the quantised params, for the unmodified model: its code runs under interception
(`jaxquant.interception.call`), so each contraction of a weight is computed from the packed
codes. `QDense` and `QDenseGeneral` are Linen modules whose params hold the weight; they
compute through `jaxquant.contraction` directly and apply params that `quantise_params` made
from `nn.Dense` / `nn.DenseGeneral` (the same layout).

LoRA and QLoRA (`jaxquant.lora`): `init_lora(params, rules, rank=, alpha=)` makes adapters for
the selected weights (packed or float) in their own collection, ``variables[LORA]``;
`quantised_apply` with it computes x·Ŵ + (α/r)·(x·A)·B for each contraction of those weights,
and `merge_lora` folds the adapters into the params.

The output dtype follows the model's own code (interception) or, for `QDense` and
`QDenseGeneral`, the layer's ``dtype``, else the promotion of the input, kernel and bias
dtypes; products accumulate in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import contraction, interception, kernels
from jaxquant import lora as lora_lib
from jaxquant.lora import LoRAWeight
from jaxquant.nn import weights as weights_lib
from jaxquant.nn.rules import Rule, assign, check_rules
from jaxquant.qarray import QuantSpec, as_spec
from jaxquant.qat import FakeQuantised

Initializer = Callable[..., jax.Array]
LORA = "lora"  # the variable collection of LoRA adapters (`init_lora`)
_LORA_DROPOUT = 0x4C6F5241  # folded into the "dropout" rng for the adapters' masks ("LoRA")


class QDense(nn.Module):
  """`nn.Dense` with a weight kernel [K, N] (packed, or fake-quantised for QAT).

  ``params`` hold ``kernel``, a [K, N] weight quantised along K, and ``bias``, a float [N]
  array. `init` draws a float kernel with `kernel_init` and quantises it with `spec`; `apply`
  also takes params that `quantise_params` converted from an `nn.Dense`.

  Attributes:
    features: N, the number of output features.
    use_bias: whether to add a bias.
    dtype: the computation and output dtype (default: promote the input, kernel and bias).
    backend: the `jaxquant.kernels` backend.
    spec: the `QuantSpec` `init` quantises with (blocks along K whatever its axis); not
      needed to apply existing params.
    param_dtype: the dtype of the float kernel before quantising, and of the bias.
    kernel_init: initialiser of the float kernel (default lecun-normal, as `nn.Dense`).
    bias_init: initialiser of the bias.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> layer = QDense(8, spec=jq.QuantSpec("nf4", block_size=64))
    >>> params = layer.init(jax.random.key(0), jnp.ones((2, 128)))["params"]
    >>> params["kernel"].shape, params["kernel"].bits_per_param
    ((128, 8), 4.25)
    >>> layer.apply({"params": params}, jnp.ones((2, 128))).shape
    (2, 8)
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  backend: str = "auto"
  spec: QuantSpec | None = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    inputs = jnp.asarray(inputs)
    if inputs.ndim < 1:
      raise ValueError("inputs must have at least one axis")
    kernel = _weight(self, (inputs.shape[-1], self.features), 0)
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype) if self.use_bias else None
    return _dense(inputs, kernel, bias, (inputs.ndim - 1,), self.dtype, self.backend)


class QDenseGeneral(nn.Module):
  """`nn.DenseGeneral` (without ``batch_dims``) with a weight kernel in_shape + features.

  Contracts the input axes `axis` with the kernel's leading axes, as `nn.DenseGeneral`; the
  output has the input's other axes, in order, followed by `features`. The kernel is quantised
  along the input axis whose blocks need the least padding (`jaxquant.nn.weights.block_axis`).

  Attributes:
    features: an int or a tuple of ints, the output feature shape.
    axis: an int or a tuple of ints, the input axes to contract (in sorted order, as
      `nn.DenseGeneral`).
    use_bias, dtype, backend, spec, param_dtype, kernel_init, bias_init: as `QDense`;
      `kernel_init` draws the kernel as `nn.DenseGeneral` does (flat [K, N], reshaped).

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> layer = QDenseGeneral((4, 8), axis=(-2, -1), spec=jq.QuantSpec("nf4", block_size=64))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 64, 8)))
    >>> variables["params"]["kernel"].shape, layer.apply(variables, jnp.ones((2, 64, 8))).shape
    ((64, 8, 4, 8), (2, 4, 8))
  """

  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  dtype: Any = None
  backend: str = "auto"
  spec: QuantSpec | None = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    inputs = jnp.asarray(inputs)
    features = _as_tuple(self.features, "features")
    axis = _normalise_axes(_as_tuple(self.axis, "axis"), inputs.ndim)
    in_shape = tuple(inputs.shape[a] for a in axis)
    kernel = _weight(self, in_shape + features, weights_lib.block_axis(
        in_shape, range(len(in_shape)), as_spec(self.spec).block_size if self.spec else 64))
    bias = None
    if self.use_bias:
      flat_bias_init = lambda rng, shape, dtype: self.bias_init(
          rng, (int(np.prod(shape)),), dtype).reshape(shape)
      bias = self.param("bias", flat_bias_init, features, self.param_dtype)
    return _dense(inputs, kernel, bias, axis, self.dtype, self.backend)


def _weight(module: QDense | QDenseGeneral, shape: tuple[int, ...], axis: int):
  """The module's stored kernel, or (in `init`) a float kernel drawn and quantised.

  A stored kernel is read with ``get_variable``: ``self.param`` would compare its leaves
  with those `module.spec` would produce, rejecting params quantised with another spec.
  """
  if module.has_variable("params", "kernel"):
    return module.get_variable("params", "kernel")
  if not isinstance(module.spec, QuantSpec):
    raise ValueError(
        f"{type(module).__name__}.spec={module.spec!r}: initialising the kernel needs a "
        "QuantSpec (e.g. QuantSpec('nf4', block_size=64)); to apply converted params, pass "
        "them to apply() instead")

  def init(rng, shape):
    n_in = int(np.prod(shape[:len(shape) - _feature_count(module)]))
    flat = module.kernel_init(rng, (n_in, int(np.prod(shape)) // n_in), module.param_dtype)
    return weights_lib.prepare(flat.reshape(shape), module.spec, axis, "ptq")

  return module.param("kernel", init, shape)


def _feature_count(module) -> int:
  return 1 if isinstance(module, QDense) else len(_as_tuple(module.features, "features"))


def _dense(inputs, kernel, bias, axis: tuple[int, ...], dtype, backend: str) -> jax.Array:
  """inputs contracted over `axis` with the kernel's leading axes, plus the bias."""
  if kernel.shape[:len(axis)] != tuple(inputs.shape[a] for a in axis):
    raise ValueError(
        f"the kernel has shape {kernel.shape}, but inputs of shape {inputs.shape} contracted "
        f"over axes {axis} need leading axes {tuple(inputs.shape[a] for a in axis)}")
  dtype = _result_dtype(dtype, inputs.dtype, kernel.dtype,
                        *([] if bias is None else [bias.dtype]))
  numbers = ((axis, tuple(range(len(axis)))), ((), ()))
  y = contraction.dot_general(inputs.astype(dtype), kernel, numbers, backend=backend)
  if bias is not None:
    y = y + bias.astype(dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


def _result_dtype(dtype, *dtypes) -> np.dtype:
  """`dtype`, else the promotion of `dtypes` made inexact (as Linen's `canonicalize_dtype`)."""
  if dtype is not None:
    return jnp.dtype(dtype)
  dtype = jnp.result_type(*dtypes)
  return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.promote_types(jnp.float32, dtype)


def _as_tuple(value, name: str) -> tuple[int, ...]:
  values = tuple(value) if isinstance(value, Sequence) else (value,)
  if not values or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           for v in values):
    raise TypeError(f"{name}={value!r} must be an int or a non-empty tuple of ints")
  return tuple(int(v) for v in values)


def _normalise_axes(axis: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  """Non-negative, sorted axes (the kernel's order in `nn.DenseGeneral`)."""
  if not all(-ndim <= a < ndim for a in axis):
    raise ValueError(f"axis={axis} is out of range for inputs with {ndim} axes")
  normalised = tuple(sorted(a % ndim for a in axis))
  if len(set(normalised)) != len(normalised):
    raise ValueError(f"axis={axis} names an input axis twice")
  return normalised


def quantise_params(params: Mapping[str, Any], rules: Rule | Sequence[Rule], *,
                    mode: str = "ptq", model: nn.Module | None = None,
                    inputs: Sequence = (), input_kwargs: Mapping[str, Any] | None = None,
                    feature_ndims: Mapping[str, int] | None = None,
                    calibration: Mapping[str, Any] | None = None, damping: float = 0.01,
                    act_order: bool = False) -> dict[str, Any]:
  """A copy of a float Linen param tree with the weights the `rules` select quantised.

  A weight's path is the '/'-joined keys from the root of `params`
  (``"layer_0/attn/q_einsum/w"``); a rule matches it or its module's path (``"Dense_0"``),
  and the first match decides (`jaxquant.nn.rules`); spec None keeps it float, and a
  `UserWarning` names rules that matched no weight. The result shares every other leaf with
  `params` (no float is copied) and holds no reference to a quantised weight's float array.

  Args:
    params: the ``params`` collection of a Linen model (not the whole variables dict).
    rules: a `Rule` or a sequence of them.
    mode: ``"ptq"`` (`QuantisedArray`s) or ``"qat"`` (`FakeQuantised` master weights; train
      them through `quantised_apply`, then `convert`).
    model: the model, to find the weights by tracing it on `inputs` (module docstring).
    inputs: example positional arguments of ``model.apply`` after the variables (arrays or
      `jax.ShapeDtypeStruct`s; nothing is computed).
    input_kwargs: example keyword arguments of ``model.apply`` (e.g. ``method=``).
    feature_ndims: without `model`: path → number of output-feature axes, for kernels of
      ndim > 2 without a bias.
    calibration: path → `jaxquant.calibration.SecondMoment`, e.g. from
      ``jaxquant.calibration.accumulate(lambda p, x: model.apply({"params": p}, x), params,
      batches)``: those weights are packed by GPTQ (`jaxquant.gptq`), the others rounded to
      nearest with a warning naming them.
    damping, act_order: GPTQ's options (`jaxquant.gptq.quantise`).

  Returns:
    The converted tree, for `quantised_apply(model, {"params": tree}, ...)`.

  Raises:
    TypeError: `params` or `feature_ndims` is not a mapping, `rules` are not `Rule`s, or a
      selected kernel is not float.
    ValueError: `mode` is unknown; without `model`, a selected kernel's feature axes are
      unknown or disagree with its bias; with it, a selected weight is also used outside
      contractions and gathers (the message names each).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxquant as jq
    >>> model = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(4)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    >>> rules = [jq.Rule("layers_2", None), jq.Rule(".*", jq.QuantSpec("nf4", block_size=64))]
    >>> qparams = quantise_params(params, rules)
    >>> type(qparams["layers_0"]["kernel"]).__name__, type(qparams["layers_2"]["kernel"]).__name__
    ('QuantisedArray', 'ArrayImpl')
    >>> quantised_apply(model, {"params": qparams}, jnp.ones((1, 64))).shape
    (1, 4)
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a mapping (a Linen 'params' tree), got "
                    f"{type(params).__name__}")
  if mode not in weights_lib.MODES:
    raise ValueError(f"{mode=} is not one of {weights_lib.MODES}")
  rules = check_rules(rules)
  if model is not None:
    found = _traced_uses(params, model, tuple(inputs), dict(input_kwargs or {}))
  else:
    found = _structural_uses(params, feature_ndims)
  shapes = dict(_leaves(params))
  found = {path: uses for path, uses in found.items() if not contraction.is_weight(shapes[path])}
  specs, _ = assign(rules, [(path, path.rpartition("/")[0]) for path in found])
  selected = {path: weights_lib.classify(path, np.shape(shapes[path]), found[path],
                                         specs[path].block_size)
              for path in found if path in specs}
  refused = [w for w in selected.values() if w.refusal is not None]
  if refused:
    raise weights_lib.refused(refused)
  calibrated = weights_lib.calibrated(list(selected), calibration, damping=damping,
                                      act_order=act_order)

  def convert(tree, path):
    new = {}
    for key, value in tree.items():
      here = _join(path, key)
      if isinstance(value, Mapping):
        new[key] = convert(value, here)
      elif here in selected:
        if not jnp.issubdtype(value.dtype, jnp.floating):
          raise TypeError(f"params[{here!r}] has dtype {value.dtype}; only float weights can "
                          "be quantised (keep it with Rule(pattern, None))")
        new[key] = weights_lib.prepare(value, specs[here], selected[here].axis, mode,
                                       calibrated.get(here))
      else:
        new[key] = value
    return new

  return convert(params, "")


def _join(path: str, key) -> str:
  return f"{path}/{key}" if path else str(key)


def _leaves(tree: Mapping[str, Any], path: str = ""):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, _join(path, key))
    else:
      yield _join(path, key), value


def _traced_uses(params, model, inputs, input_kwargs) -> dict[str, list]:
  """Each weight's uses, found by tracing ``model.apply`` abstractly."""
  shapes = dict(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **input_kwargs)))
  shapes["params"] = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype), dict(params),
      is_leaf=contraction.is_weight)
  uses = interception.discover(
      model.apply, shapes, *inputs,
      follow=lambda path, leaf: path.startswith("params/") and jnp.issubdtype(
          leaf.dtype, jnp.floating), **input_kwargs)
  return {path[len("params/"):]: path_uses for path, path_uses in uses.items()
          if weights_lib.is_weight_use(path_uses)}


def _structural_uses(params, feature_ndims) -> dict[str, list]:
  """Dense/DenseGeneral kernels: each one contracted over its leading (input) axes."""
  feature_ndims = {} if feature_ndims is None else feature_ndims
  if not isinstance(feature_ndims, Mapping):
    raise TypeError(f"feature_ndims must be a mapping from layer path to int, got "
                    f"{type(feature_ndims).__name__}")
  found = {}
  for path, value in _leaves(params):
    layer, _, name = path.rpartition("/")
    if name != "kernel" or not layer or np.ndim(value) < 2:
      continue
    bias = _subtree(params, layer).get("bias")
    n_features = _feature_ndims(layer, np.shape(value), bias, feature_ndims.get(layer))
    found[path] = [interception.Use("contract", tuple(range(np.ndim(value) - n_features)))]
  return found


def _subtree(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _feature_ndims(path: str, shape, bias, n_features) -> int:
  if n_features is not None:
    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or not (
        1 <= n_features < len(shape)):
      raise ValueError(f"feature_ndims[{path!r}]={n_features!r} must be an int in "
                       f"[1, {len(shape) - 1}] for a kernel of shape {shape}")
  elif bias is not None:
    n_features = np.ndim(bias)  # a Dense(General) bias has the shape of the features
  elif len(shape) == 2:
    n_features = 1
  else:
    raise ValueError(
        f"params[{path!r}]['kernel'] has shape {shape} and no bias, so which axes are "
        f"output features is unknown; pass feature_ndims={{{path!r}: len(features)}}, or "
        "model= and inputs= to find them by tracing")
  if bias is not None and not (1 <= n_features < len(shape) and
                               np.shape(bias) == tuple(shape[len(shape) - n_features:])):
    raise ValueError(
        f"params[{path!r}] has a bias of shape {np.shape(bias)}, which is not the trailing "
        f"(feature) axes of its kernel of shape {shape}: not an nn.Dense or nn.DenseGeneral "
        "without batch_dims; pass model= and inputs= to find its contraction by tracing, or "
        "keep it float with Rule(pattern, None)")
  return int(n_features)


def quantised_apply(model: nn.Module, variables: Mapping[str, Any], *args,
                    backend: str = "auto", **kwargs):
  """``model.apply(variables, *args, **kwargs)`` with quantised weights, for the unmodified
  model (module docstring).

  `variables["params"]` comes from `quantise_params`. Keyword arguments (``method``,
  ``mutable``, ``rngs``, ...) go to `model.apply`. Traceable:
  ``jax.jit(functools.partial(quantised_apply, model))(variables, x)``; differentiable with
  respect to the float leaves and the inputs (and, in QAT, the master weights).

  Raises:
    ValueError: `backend` is unknown.
    jaxquant.interception.UnsupportedUse: a weight reaches an operation that packed codes
      cannot serve.
  """
  kernels.check_backend(backend)
  rngs = kwargs.get("rngs") or {}
  dropout_key = jax.random.fold_in(rngs["dropout"], _LORA_DROPOUT) if "dropout" in rngs else None
  return interception.call(model.apply, _with_adapters(variables, dropout_key), *args,
                           backend=backend, **kwargs)


def _with_adapters(variables: Mapping[str, Any], dropout_key: jax.Array | None = None
                   ) -> dict[str, Any]:
  """`variables` without the `LORA` collection, each weight it adapts a `LoRAWeight` (each
  with its own dropout key folded from `dropout_key`, if given)."""
  variables = dict(variables)
  adapters = dict(_leaves(variables.pop(LORA, {})))
  missing = [path for path in adapters if path not in dict(_leaves(variables["params"]))]
  if missing:
    raise ValueError(f"variables[{LORA!r}] holds adapters for {missing}, which are not in "
                     "variables['params']")

  keys = {path: None if dropout_key is None else jax.random.fold_in(dropout_key, index)
          for index, path in enumerate(adapters)}
  if adapters:
    variables["params"] = _map_leaves(variables["params"], lambda path, leaf: LoRAWeight(
        leaf, adapters[path], keys[path]) if path in adapters else leaf)
  return variables


def _map_leaves(tree: Mapping[str, Any], fn, path: str = "") -> dict[str, Any]:
  """A copy of a nested mapping with each leaf replaced by ``fn(path, leaf)``."""
  return {key: _map_leaves(value, fn, _join(path, key)) if isinstance(value, Mapping)
          else fn(_join(path, key), value) for key, value in tree.items()}


def init_lora(params: Mapping[str, Any], rules, *, rank: int, alpha: float,
              dropout: float = 0.0, seed: int = 0,
              model: nn.Module | None = None, inputs: Sequence = (),
              input_kwargs: Mapping[str, Any] | None = None,
              feature_ndims: Mapping[str, int] | None = None) -> dict[str, Any]:
  """LoRA adapters (`jaxquant.lora`) for the weights of a Linen ``params`` tree that `rules`
  select: the `LORA` collection, ``variables[LORA]`` beside ``variables["params"]``.

  The tree mirrors `params`: each selected weight's path holds a `jaxquant.lora.Adapters`, A
  (W's batch and contracted axes, then r; drawn N(0, 1/fan_in)) and B (r, then W's free axes;
  zero). `quantised_apply` with both collections computes x·Ŵ + (α/r)·(x·A)·B for each
  contraction of an adapted weight (packed or float), in one call; differentiate with respect
  to ``variables[LORA]`` to train the adapters alone. Which leaves are weights and which axes
  they contract comes, as in `quantise_params`, from tracing `model` on `inputs`, else from
  the Dense/DenseGeneral layout of every ``kernel``.

  Args:
    params: the ``params`` collection, float or from `quantise_params`.
    rules: a regex, or a sequence of them, matched in full against each weight's path
      (``layer_0/attn/q_einsum/w``) and its module's path.
    rank, alpha: r ≥ 1 and α (the product is scaled by α/r).
    dropout: the rate at which the adapters' input elements are dropped when
      `quantised_apply` is given a ``"dropout"`` rng (as `nn.Dropout` is); the base reads them
      all.
    seed: the seed A is drawn from.
    model, inputs, input_kwargs, feature_ndims: as for `quantise_params`.

  Raises:
    TypeError: `rules` are not regexes.
    ValueError: `rank` < 1, `alpha` is not finite or `dropout` not in [0, 1); no weight
      matches `rules`; a selected weight is also gathered, or contracted over different axes
      in different places.
  """
  lora_lib.check_options(rank, alpha, dropout)
  if model is not None:
    found = _traced_uses(params, model, tuple(inputs), dict(input_kwargs or {}))
  else:
    found = _structural_uses(params, feature_ndims)
  shapes = dict(_leaves(params))
  sites = [weights_lib.adapter_site(path, np.shape(shapes[path]), uses)
           for path, uses in found.items()]
  key = jax.random.key(seed)
  tree = {}
  for index, site in enumerate(weights_lib.select_sites(rules, sites)):
    layout = lora_lib.layout_for(site.shape, site.contracting, site.batch, rank=rank,
                                 alpha=alpha, dropout=dropout)
    node = tree
    *parents, name = site.path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = lora_lib.init_adapters(jax.random.fold_in(key, index), site.shape, layout,
                                        rank)
  return tree


def merge_lora(variables: Mapping[str, Any], rules: Rule | Sequence[Rule] = (), *,
               calibration: Mapping[str, Any] | None = None, damping: float = 0.01,
               act_order: bool = False) -> dict[str, Any]:
  """``variables["params"]`` with each weight that ``variables[LORA]`` adapts replaced by
  W + (α/r)·A·B: the float sum for a float weight; a packed one dequantised, summed and packed
  again along its own axis with the `QuantSpec` that `rules` give it (the rules it was
  quantised with), else with the spec it records (`jaxquant.nn.weights.spec_of`), by GPTQ for
  the weights `calibration` covers.

  Raises:
    ValueError: there is no `LORA` collection.
  """
  if not variables.get(LORA):
    raise ValueError(f"variables has no {LORA!r} collection (make it with init_lora)")
  adapted = {path: leaf for path, leaf in _leaves(_with_adapters(variables)["params"])
             if isinstance(leaf, LoRAWeight)}
  specs = weights_lib.merge_specs(check_rules(rules), adapted)
  calibrated = weights_lib.calibrated(list(specs), calibration, damping=damping,
                                      act_order=act_order)

  return _map_leaves(variables["params"], lambda path, leaf: weights_lib.merged(
      adapted[path], specs.get(path), calibrated.get(path)) if path in adapted else leaf)


def convert(params: Mapping[str, Any]) -> dict[str, Any]:
  """`params` with every `FakeQuantised` (QAT) weight packed: bit-identical outputs."""
  return jax.tree_util.tree_map(
      lambda leaf: leaf.pack() if isinstance(leaf, FakeQuantised) else leaf,
      dict(params), is_leaf=lambda leaf: isinstance(leaf, FakeQuantised))
