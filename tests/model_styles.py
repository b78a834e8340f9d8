"""Small random float Flax models written the way real libraries write them.

For testing op-interception quantisation against styles that no jaxquant layer wraps:

- `GemmaStyleDecoder` (Linen): the `gemma` library's `Einsum` modules, gathered and tied
  embeddings, grouped-query or fused-QKV attention and a gated MLP.
- `HFStyleModel` (Linen): Hugging Face transformers' Flax style: [out, in] kernels used by
  `lax.dot_general`, `nn.Embed`, LayerNorm and layers named "0", "1".
- `NNXRawParams` (NNX): raw `nnx.Param`s used by `@` and `jnp.einsum`, blocks in `nnx.List`.
- `TiedAutoencoder` (NNX): one weight contracted on both of its axes.

Every contracted weight axis is a multiple of 64. Weights are float32 with std about
1/sqrt(fan_in), so activations stay O(1). The builders `gemma_style`, `hf_style`, `nnx_raw`
and `tied_autoencoder` return each model with example inputs and the '/'-joined paths of its
intended weights (matrices, tensors and embedding tables; no biases or norm parameters).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BATCH, SEQ = 2, 16
D_MODEL, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 128, 4, 2, 64, 256, 512, 2


def _normal(std):
  """A float32 normal initialiser with standard deviation `std`."""
  return nn.initializers.normal(stddev=float(std))


def _rms_normalise(x, eps=1e-6):
  """x divided by its root mean square over the last axis."""
  var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(var + eps)


def _ids(seed, vocab=VOCAB):
  """Random token ids, int32 [BATCH, SEQ]."""
  return jax.random.randint(jax.random.key(seed + 1), (BATCH, SEQ), 0, vocab, dtype=jnp.int32)


def _features(seed, *shape):
  """Random float32 inputs of unit variance."""
  return jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32)


def _causal_attention(q, k, v):
  """Causal softmax attention: q, k, v [B, T, N, H] with equal head counts → [B, T, N, H]."""
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * (q.shape[-1] ** -0.5)
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


# ---------------------------------------------------------------------------------------------
# (a) gemma style (Linen)


class Einsum(nn.Module):
  """A weight `w` of `shape`, applied as `jnp.einsum(eqn, x, w)` (the gemma library's layer)."""
  shape: tuple
  std: float = 1.0

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param("w", _normal(self.std), self.shape)
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
  """Gemma's RMSNorm: normalise, then multiply by (1 + scale), scale initialised to zero."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    scale = scale.reshape((1,) * (x.ndim - 1) + (-1,))
    return _rms_normalise(x) * (1 + scale)


class Embedder(nn.Module):
  """A [vocab, d] table: `encode` gathers rows by indexing, `decode` is the tied head."""
  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param(
        "input_embedding", _normal(self.embed_dim ** -0.5), (self.vocab_size, self.embed_dim))

  def encode(self, ids):
    """Embeddings of int `ids`, scaled by sqrt(embed_dim)."""
    x = self.input_embedding_table[(ids,)]
    return x * jnp.sqrt(jnp.float32(self.embed_dim)).astype(x.dtype)

  def decode(self, x):
    """Logits: `x` contracted with the table's embedding axis."""
    return jnp.dot(x, self.input_embedding_table.T)


class GemmaAttention(nn.Module):
  """Causal attention; grouped-query K/V from `kv_einsum`, or one fused `qkv_einsum`."""
  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int
  fused_qkv: bool = False

  def setup(self):
    d, h = self.features, self.head_dim
    if self.fused_qkv:
      self.qkv_einsum = Einsum(shape=(3, self.num_heads, d, h), std=d ** -0.5)
    else:
      self.q_einsum = Einsum(shape=(self.num_heads, d, h), std=d ** -0.5)
      self.kv_einsum = Einsum(shape=(2, self.num_kv_heads, d, h), std=d ** -0.5)
    self.attn_vec_einsum = Einsum(shape=(self.num_heads, h, d), std=(self.num_heads * h) ** -0.5)

  def __call__(self, x):
    if self.fused_qkv:
      q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
    else:
      q = self.q_einsum("BTD,NDH->BTNH", x)
      k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
      repeats = self.num_heads // self.num_kv_heads
      k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    encoded = _causal_attention(q, k, v)
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class GemmaFeedForward(nn.Module):
  """Gated MLP: gelu(x W_gate) * (x W_up), then `linear` back to d."""
  features: int
  hidden_dim: int

  def setup(self):
    self.gating_einsum = Einsum(shape=(2, self.features, self.hidden_dim),
                                std=self.features ** -0.5)
    self.linear = Einsum(shape=(self.hidden_dim, self.features), std=self.hidden_dim ** -0.5)

  def __call__(self, x):
    gates = self.gating_einsum("BTD,GDF->GBTF", x)
    hidden = jax.nn.gelu(gates[0]) * gates[1]
    return self.linear("BTF,FD->BTD", hidden)


class GemmaBlock(nn.Module):
  """Pre-norm residual block: attention, then the gated MLP."""
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  hidden_dim: int
  fused_qkv: bool = False

  def setup(self):
    self.pre_attention_norm = RMSNorm()
    self.attn = GemmaAttention(self.num_heads, self.num_kv_heads, self.embed_dim,
                               self.head_dim, self.fused_qkv)
    self.pre_ffw_norm = RMSNorm()
    self.mlp = GemmaFeedForward(self.embed_dim, self.hidden_dim)

  def __call__(self, x):
    x = x + self.attn(self.pre_attention_norm(x))
    return x + self.mlp(self.pre_ffw_norm(x))


class GemmaStyleDecoder(nn.Module):
  """A gemma-library-style causal decoder: int ids [B, T] → logits [B, T, vocab_size]."""
  vocab_size: int = VOCAB
  embed_dim: int = D_MODEL
  num_heads: int = HEADS
  num_kv_heads: int = KV_HEADS
  head_dim: int = HEAD_DIM
  hidden_dim: int = FFN
  num_layers: int = LAYERS
  fused_qkv: bool = False

  def setup(self):
    self.embedder = Embedder(self.vocab_size, self.embed_dim)
    kv_heads = self.num_heads if self.fused_qkv else self.num_kv_heads
    self.layers = [GemmaBlock(self.num_heads, kv_heads, self.embed_dim, self.head_dim,
                              self.hidden_dim, self.fused_qkv, name=f"layer_{i}")
                   for i in range(self.num_layers)]
    self.final_norm = RMSNorm()

  def __call__(self, ids):
    x = self.embedder.encode(ids)
    for layer in self.layers:
      x = layer(x)
    return self.embedder.decode(self.final_norm(x))


def gemma_style(fused_qkv=False, seed=0):
  """(model, params, (ids,), weight_paths) for a `GemmaStyleDecoder`; apply {"params": params}."""
  model = GemmaStyleDecoder(fused_qkv=fused_qkv)
  ids = _ids(seed)
  params = jax.jit(model.init)(jax.random.key(seed), ids)["params"]
  projections = ["attn/qkv_einsum"] if fused_qkv else ["attn/q_einsum", "attn/kv_einsum"]
  projections += ["attn/attn_vec_einsum", "mlp/gating_einsum", "mlp/linear"]
  paths = ["embedder/input_embedding"]
  paths += [f"layer_{i}/{p}/w" for i in range(model.num_layers) for p in projections]
  return model, params, (ids,), paths


# ---------------------------------------------------------------------------------------------
# (b) Hugging Face transformers' Flax style (Linen)


class Linear(nn.Module):
  """A kernel stored [out, in], applied by `lax.dot_general` on x's last axis, plus a bias."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _normal(x.shape[-1] ** -0.5), (self.features, x.shape[-1]))
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


class HFEmbeddings(nn.Module):
  """Word embeddings (`nn.Embed`, gathered by `jnp.take`) followed by LayerNorm."""
  vocab_size: int
  hidden_size: int

  def setup(self):
    self.word_embeddings = nn.Embed(self.vocab_size, self.hidden_size,
                                    embedding_init=_normal(1.0))
    self.LayerNorm = nn.LayerNorm(epsilon=1e-12)  # pylint: disable=invalid-name

  def __call__(self, ids):
    return self.LayerNorm(self.word_embeddings(ids))


class HFLayer(nn.Module):
  """An attention-free layer: intermediate (gelu), output, residual, LayerNorm."""
  hidden_size: int
  intermediate_size: int

  def setup(self):
    self.intermediate = Linear(self.intermediate_size)
    self.output = Linear(self.hidden_size)
    self.LayerNorm = nn.LayerNorm(epsilon=1e-12)  # pylint: disable=invalid-name

  def __call__(self, x):
    hidden = jax.nn.gelu(self.intermediate(x))
    return self.LayerNorm(x + self.output(hidden))


class HFEncoder(nn.Module):
  """Layers named "0", "1", ... as in transformers' Flax layer collections."""
  hidden_size: int
  intermediate_size: int
  num_layers: int

  def setup(self):
    self.layers = [HFLayer(self.hidden_size, self.intermediate_size, name=str(i))
                   for i in range(self.num_layers)]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class HFStyleModel(nn.Module):
  """A transformers-Flax-style token classifier: int ids [B, T] → logits [B, T, num_labels]."""
  vocab_size: int = VOCAB
  hidden_size: int = D_MODEL
  intermediate_size: int = FFN
  num_layers: int = LAYERS
  num_labels: int = 10

  def setup(self):
    self.embeddings = HFEmbeddings(self.vocab_size, self.hidden_size)
    self.encoder = HFEncoder(self.hidden_size, self.intermediate_size, self.num_layers)
    self.classifier = Linear(self.num_labels)

  def __call__(self, ids):
    return self.classifier(self.encoder(self.embeddings(ids)))


def hf_style(seed=0):
  """(model, params, (ids,), weight_paths) for an `HFStyleModel`; apply {"params": params}."""
  model = HFStyleModel()
  ids = _ids(seed)
  params = jax.jit(model.init)(jax.random.key(seed), ids)["params"]
  paths = ["embeddings/word_embeddings/embedding"]
  paths += [f"encoder/{i}/{p}/kernel" for i in range(model.num_layers)
            for p in ("intermediate", "output")]
  paths += ["classifier/kernel"]
  return model, params, (ids,), paths


# ---------------------------------------------------------------------------------------------
# (c) NNX with raw parameters


class RawBlock(nnx.Module):
  """Pre-norm residual block of raw `nnx.Param`s: a per-head einsum projection, then an MLP."""

  def __init__(self, rngs: nnx.Rngs, d=D_MODEL, heads=HEADS, head_dim=HEAD_DIM, ffn=FFN):
    def normal(shape, fan_in):
      return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in ** -0.5)
    self.heads_norm = nnx.Param(jnp.ones((d,), jnp.float32))
    self.w_heads = normal((d, heads, head_dim), d)
    self.w_out = normal((heads, head_dim, d), heads * head_dim)
    self.ffn_norm = nnx.Param(jnp.ones((d,), jnp.float32))
    self.w_in = normal((d, ffn), d)
    self.b_in = nnx.Param(jnp.zeros((ffn,), jnp.float32))
    self.w_down = normal((ffn, d), ffn)

  def __call__(self, x):
    h = _rms_normalise(x) * self.heads_norm[None, None, :]
    h = jax.nn.gelu(jnp.einsum("btd,dhk->bthk", h, self.w_heads[...]))
    x = x + jnp.einsum("bthk,hkd->btd", h, self.w_out[...])
    h = _rms_normalise(x) * self.ffn_norm[None, None, :]
    h = jax.nn.gelu(h @ self.w_in[...] + self.b_in[None, None, :])
    return x + h @ self.w_down[...]


class NNXRawParams(nnx.Module):
  """Blocks of raw `nnx.Param`s in an `nnx.List`: float x [B, T, d] → [B, T, d]."""

  def __init__(self, rngs: nnx.Rngs, d=D_MODEL, heads=HEADS, head_dim=HEAD_DIM, ffn=FFN,
               num_blocks=LAYERS):
    self.blocks = nnx.List([RawBlock(rngs, d, heads, head_dim, ffn) for _ in range(num_blocks)])

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def nnx_raw(seed=0):
  """(model, (x,), weight_paths) for an `NNXRawParams`."""
  model = NNXRawParams(nnx.Rngs(seed))
  x = _features(seed, BATCH, SEQ, D_MODEL)
  paths = [f"blocks/{i}/{p}" for i in range(len(model.blocks))
           for p in ("w_heads", "w_out", "w_in", "w_down")]
  return model, (x,), paths


# ---------------------------------------------------------------------------------------------
# (d) a tied weight (NNX)


class TiedAutoencoder(nnx.Module):
  """One weight `w` [d_in, d_hidden] encodes (x @ w) and decodes (h @ w.T); `head` reads h."""

  def __init__(self, rngs: nnx.Rngs, d_in=256, d_hidden=128, num_labels=10):
    w = jax.random.normal(rngs.params(), (d_in, d_hidden), jnp.float32) * d_in ** -0.5
    self.w = nnx.Param(w)
    self.b = nnx.Param(jnp.zeros((d_hidden,), jnp.float32))
    self.head = nnx.Linear(d_hidden, num_labels, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(x @ self.w[...] + self.b[None, :])
    return h @ self.w[...].T, self.head(h)


def tied_autoencoder(seed=0):
  """(model, (x,), weight_paths) for a `TiedAutoencoder`; x is float [8, 256]."""
  model = TiedAutoencoder(nnx.Rngs(seed))
  x = _features(seed, 8, model.w.shape[0])
  return model, (x,), ["w", "head/kernel"]


def param_count(tree) -> int:
  """The number of scalars in a pytree of arrays (e.g. Linen params or an NNX state)."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))
