"""Flax Linen layers with packed quantised kernels, and quantised serving of unmodified models.

A dense layer computes y = x W + b with W[K, N] stored as a `QuantisedArray` in blocks of B
along the contraction axis (``axis=0``): W[k, n] ≈ s[⌊k/B⌋, n] · c[code[k, n]] for the block
scales s and the codebook c, and `qmatmul` evaluates x W from the packed codes. A DenseGeneral
layer contracting the input axes I into the output features F is the same product after
flattening both sides row-major:

    y[..., f] = Σ_{i ∈ I} x[..., i] · W[i, f] = (x reshaped to [..., K]) @ W[K, N],
    K = ∏ x.shape[I],  N = ∏ F,

so its kernel is stored as a 2-D [K, N] `QuantisedArray` (the layer knows I and F, and
reshapes its input and output to match).

Linen's `nn.Dense` cannot hold such a kernel: it reads it with ``self.param``, which checks
the stored value's shapes against a fresh float kernel and raises `ScopeParamShapeError`, and
injecting a ``dot_general`` changes the product but not what is stored. Hence two routes:

- `QDense` and `QDenseGeneral`: Linen modules whose ``params`` hold the `QuantisedArray`. They
  initialise a float kernel (lecun-normal, as Flax does) and quantise it with `spec`, or apply
  params converted from a float model.
- `quantise_params` converts a float param tree by `Rule`s, and `quantised_apply` (or the
  `quantised_dense` context manager, a `flax.linen.intercept_methods` interceptor) runs an
  existing, unmodified model on it: every `nn.Dense` / `nn.DenseGeneral` call whose ``kernel``
  is a `QuantisedArray` computes the quantised product instead, reading the variable with
  ``get_variable`` so that ``self.param`` never sees it. Both routes share one forward and one
  param layout, so converted params also apply to a model written with `QDense`.

The output dtype follows Linen: the layer's ``dtype``, else the promotion of the input, kernel
and bias dtypes. The product accumulates in float32 (Linen's ``precision`` has no effect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kernels import BACKENDS, qmatmul
from jaxquant.nn.rules import Rule, assign, check_rules
from jaxquant.qarray import QuantisedArray, QuantSpec, quantise

Initializer = Callable[..., jax.Array]


class QDense(nn.Module):
  """`nn.Dense` with a packed quantised kernel: y = x W + b, computed by `qmatmul`.

  ``params`` hold ``kernel``, a [K, N] `QuantisedArray` quantised along axis 0, and ``bias``,
  a float [N] array. `init` draws a float kernel with `kernel_init` and quantises it with
  `spec`; `apply` also takes params that `quantise_params` converted from an `nn.Dense`.

  Attributes:
    features: N, the number of output features.
    use_bias: whether to add a bias.
    dtype: the computation and output dtype (default: promote the input, kernel and bias).
    backend: the `qmatmul` backend.
    spec: the `QuantSpec` `init` quantises with (its axis is taken as 0); not needed to
      apply existing params.
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
    kernel = _quantised_kernel(self, (inputs.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype) if self.use_bias else None
    return _forward(inputs, kernel, bias, (-1,), (self.features,), self.dtype, self.backend)


class QDenseGeneral(nn.Module):
  """`nn.DenseGeneral` (without ``batch_dims``) with a packed quantised kernel.

  Contracts the input axes `axis` with a kernel stored as a 2-D [K, N] `QuantisedArray`,
  K = ∏ inputs.shape[axis] and N = ∏ features (see the module docstring); the output has the
  input's other axes, in order, followed by `features`. ``bias`` has shape `features`.

  Attributes:
    features: an int or a tuple of ints, the output feature shape.
    axis: an int or a tuple of ints, the input axes to contract (in sorted order, as
      `nn.DenseGeneral`).
    use_bias, dtype, backend, spec, param_dtype, kernel_init, bias_init: as `QDense`;
      `kernel_init` and `bias_init` draw the flat [K, N] kernel and [N] bias, as
      `nn.DenseGeneral` does.

  Example:
    >>> import jax, jax.numpy as jnp, jaxquant as jq
    >>> layer = QDenseGeneral((4, 8), axis=(-2, -1), spec=jq.QuantSpec("nf4", block_size=64))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 16, 8)))
    >>> variables["params"]["kernel"].shape, layer.apply(variables, jnp.ones((2, 16, 8))).shape
    ((128, 32), (2, 4, 8))
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
    k = math.prod(inputs.shape[a] for a in axis)
    kernel = _quantised_kernel(self, (k, math.prod(features)))
    bias = None
    if self.use_bias:
      flat_bias_init = lambda rng, shape, dtype: self.bias_init(
          rng, (math.prod(shape),), dtype).reshape(shape)
      bias = self.param("bias", flat_bias_init, features, self.param_dtype)
    return _forward(inputs, kernel, bias, axis, features, self.dtype, self.backend)


def _quantised_kernel(module: QDense | QDenseGeneral, shape: tuple[int, int]) -> QuantisedArray:
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
  spec = _along_contraction(module.spec)
  return module.param("kernel", lambda rng, shape: quantise(
      module.kernel_init(rng, shape, module.param_dtype), spec), shape)


def _along_contraction(spec: QuantSpec) -> QuantSpec:
  """`spec` with blocks along the kernel's first (contraction) axis, whatever its axis."""
  return spec if spec.axis == 0 else dataclasses.replace(spec, axis=0)


@functools.partial(jax.jit, static_argnames=("axis", "features", "dtype", "backend"))
def _forward(inputs: jax.Array, kernel, bias: jax.Array | None, axis: tuple[int, ...],
             features: tuple[int, ...], dtype, backend: str) -> jax.Array:
  """x contracted over `axis` with the [K, N] quantised kernel, reshaped to `features`, + b.

  Compiled as a whole, so that a model applied outside `jax.jit` dispatches one computation
  per layer rather than one per operation.
  """
  if not isinstance(kernel, QuantisedArray):
    raise TypeError(f"the kernel must be a QuantisedArray, got {type(kernel).__name__}; "
                    "convert float params with quantise_params")
  axis = _normalise_axes(axis, inputs.ndim)
  k = math.prod(inputs.shape[a] for a in axis)
  if kernel.shape != (k, math.prod(features)):
    raise ValueError(
        f"the kernel has shape {kernel.shape}, but inputs of shape {inputs.shape} contracted "
        f"over axes {axis} into features {features} need [{k}, {math.prod(features)}]")
  dtype = _result_dtype(dtype, inputs.dtype, kernel.dtype, *([] if bias is None else [bias.dtype]))
  batch_ndim = inputs.ndim - len(axis)
  x = jnp.moveaxis(inputs, axis, tuple(range(batch_ndim, inputs.ndim)))
  x = x.reshape(x.shape[:batch_ndim] + (k,)).astype(dtype)
  y = qmatmul(x, kernel, backend=backend).reshape(x.shape[:batch_ndim] + features)
  if bias is not None:
    y = y + bias.astype(dtype).reshape((1,) * batch_ndim + features)
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
                    feature_ndims: Mapping[str, int] | None = None) -> dict[str, Any]:
  """A copy of a float Linen param tree with the kernels the `rules` select quantised.

  A layer is a mapping with an array ``kernel`` of ndim ≥ 2; its path is the '/'-joined keys
  from the root (``"Dense_0"``, ``"encoder/layers_1/mlp"``). The first rule that fully
  matches the path decides (see `jaxquant.nn.rules`): its spec, with ``axis=0``, quantises
  the kernel, or spec None keeps it float; a `UserWarning` names rules that matched no layer.
  A kernel of shape in_shape + features becomes a 2-D [∏ in_shape, ∏ features]
  `QuantisedArray`; the layer (`nn.DenseGeneral` under `quantised_apply`, or
  `QDenseGeneral`) reshapes around it, so nothing else is recorded. The number of feature
  axes is the bias's ndim, else 1 for a 2-D kernel, else `feature_ndims[path]`.

  The result is a new tree of plain dicts that shares every other leaf with `params` (no
  float is copied) and holds no reference to a quantised kernel's float array.

  Args:
    params: the ``params`` collection of a Linen model (not the whole variables dict).
    rules: a `Rule` or a sequence of them.
    feature_ndims: path → number of output-feature axes, for kernels of ndim > 2 without a
      bias.

  Returns:
    The converted tree, for `quantised_apply(model, {"params": tree}, ...)`.

  Raises:
    TypeError: `params` or `feature_ndims` is not a mapping, `rules` are not `Rule`s, or a
      selected kernel is not float.
    ValueError: a selected kernel's feature axes are unknown or disagree with its bias.

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
  rules = check_rules(rules)
  feature_ndims = {} if feature_ndims is None else feature_ndims
  if not isinstance(feature_ndims, Mapping):
    raise TypeError(f"feature_ndims must be a mapping from layer path to int, got "
                    f"{type(feature_ndims).__name__}")
  specs, _ = assign(rules, [path for path, _ in _layers(params, "")])

  def convert(tree, path):
    new = {key: convert(value, _join(path, key)) if isinstance(value, Mapping) else value
           for key, value in tree.items()}
    if path in specs:
      new["kernel"] = _quantise_kernel(tree, path, specs[path], feature_ndims.get(path))
    return new

  return convert(params, "")


def _join(path: str, key) -> str:
  return f"{path}/{key}" if path else str(key)


def _is_kernel(value) -> bool:
  """An array of ndim ≥ 2 not yet quantised (its dtype is checked when it is quantised)."""
  return not isinstance(value, (Mapping, QuantisedArray)) and np.ndim(value) >= 2


def _layers(tree: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
  """(path, layer) for every mapping in `tree` whose ``kernel`` is a kernel, in order."""
  if path and _is_kernel(tree.get("kernel")):
    yield path, tree
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _layers(value, _join(path, key))


def _quantise_kernel(layer: Mapping[str, Any], path: str, spec: QuantSpec,
                     n_features: int | None) -> QuantisedArray:
  kernel, bias = layer["kernel"], layer.get("bias")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise TypeError(f"params[{path!r}]['kernel'] has dtype {kernel.dtype}; only float kernels "
                    "can be quantised (keep it with Rule(pattern, None))")
  if n_features is not None:
    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or not (
        1 <= n_features < kernel.ndim):
      raise ValueError(f"feature_ndims[{path!r}]={n_features!r} must be an int in "
                       f"[1, {kernel.ndim - 1}] for a kernel of shape {kernel.shape}")
  elif bias is not None:
    n_features = np.ndim(bias)  # a Dense(General) bias has the shape of the features
  elif kernel.ndim == 2:
    n_features = 1
  else:
    raise ValueError(
        f"params[{path!r}]['kernel'] has shape {kernel.shape} and no bias, so which axes are "
        f"output features is unknown; pass feature_ndims={{{path!r}: len(features)}}")
  if bias is not None and not (1 <= n_features < kernel.ndim and
                               np.shape(bias) == kernel.shape[kernel.ndim - n_features:]):
    raise ValueError(
        f"params[{path!r}] has a bias of shape {np.shape(bias)}, which is not the trailing "
        f"(feature) axes of its kernel of shape {kernel.shape}: not an nn.Dense or "
        "nn.DenseGeneral without batch_dims (keep it float with Rule(pattern, None))")
  features = kernel.shape[kernel.ndim - n_features:]
  matrix = kernel.reshape(math.prod(kernel.shape[:-n_features]), math.prod(features))
  return quantise(matrix, _along_contraction(spec))


@contextlib.contextmanager
def quantised_dense(backend: str = "auto") -> Iterator[None]:
  """Within it, `nn.Dense` / `nn.DenseGeneral` calls with a quantised kernel use `qmatmul`.

  Intercepts (`flax.linen.intercept_methods`) the ``__call__`` of every `nn.Dense` and
  `nn.DenseGeneral`, subclasses included (e.g. under `nn.remat`, whose checkpointing of that
  layer is then skipped), whose ``kernel`` param is a `QuantisedArray`, and computes the
  layer's output from it (see the module docstring); other calls run unchanged. It acts when
  the model's Python code runs, so under `jax.jit` enter it inside the compiled function.

  Args:
    backend: the `qmatmul` backend.

  Raises:
    ValueError: `backend` is unknown.
    NotImplementedError: (when an intercepted layer runs) the layer sets ``batch_dims``,
      ``dot_general``, ``dot_general_cls`` or a custom ``promote_dtype``.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
        or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    if not isinstance(kernel, QuantisedArray):
      return next_fun(*args, **kwargs)
    _check_supported(module)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if isinstance(module, nn.Dense):
      axis, features = (-1,), (module.features,)
    else:
      axis, features = _as_tuple(module.axis, "axis"), _as_tuple(module.features, "features")
    call = lambda inputs: _forward(jnp.asarray(inputs), kernel, bias, axis, features,
                                   module.dtype, backend)
    return call(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _check_supported(module: nn.Dense | nn.DenseGeneral):
  where = f"{type(module).__name__} at {'/'.join(module.path)!r}"
  if getattr(module, "batch_dims", ()):
    raise NotImplementedError(f"{where} has batch_dims={module.batch_dims}; quantised "
                              "kernels are supported without batch_dims only")
  for name in ("dot_general", "dot_general_cls"):
    if getattr(module, name) is not None:
      raise NotImplementedError(f"{where} sets {name}; a quantised kernel replaces the "
                                "product, so leave it None")
  if module.promote_dtype is not nn.dtypes.promote_dtype:
    raise NotImplementedError(f"{where} sets a custom promote_dtype, which cannot take a "
                              "QuantisedArray; set dtype instead")


def quantised_apply(model: nn.Module, variables: Mapping[str, Any], *args,
                    backend: str = "auto", **kwargs):
  """``model.apply(variables, *args, **kwargs)`` with quantised kernels run by `qmatmul`.

  `model` is unmodified: `variables["params"]` comes from `quantise_params`, and the
  `quantised_dense` interceptor runs its `nn.Dense` / `nn.DenseGeneral` layers. Keyword
  arguments (``method``, ``mutable``, ``rngs``, ...) go to `model.apply`. Traceable:
  ``jax.jit(functools.partial(quantised_apply, model))(variables, x)``.
  """
  with quantised_dense(backend):
    return model.apply(variables, *args, **kwargs)
