"""Evaluation and calibration text for language models, and next-token metrics: KL and perplexity.

The text is English that ships with every Python: the docstrings of fixed lists of standard
library modules (technical prose with some code), so no dataset is downloaded. It is fixed for
a given Python version; docstrings change a little between versions, so compare numbers
measured under one Python. Models are scored on `evaluation_text` (`TEXT_MODULES`); weights are
fitted to activations of `calibration_text` (`CALIBRATION_MODULES`, a disjoint list), so a
quantiser (GPTQ) is not tuned on the text it is scored on.

The metrics compare a reference model p (the float model) with a quantised model q on the
same tokens, position by position, in float32 from the logits (softmax over the last axis).
`topk_kl` is the protocol of the optimal-formats paper (§6 of its research notes): the top-128
entries of p plus one bucket for the rest.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

# Standard-library modules whose docstrings are English prose with some code and API lists.
TEXT_MODULES = ("argparse", "csv", "heapq", "re", "json", "sqlite3", "subprocess", "unittest",
                "copy", "collections", "tempfile", "sched", "doctest", "inspect", "turtle",
                "typing")

# Calibration modules: none of `TEXT_MODULES`, each with at least a paragraph of docstring
# (pathlib, dataclasses and enum have none; asyncio, functools, datetime, … only a title line).
CALIBRATION_MODULES = ("logging", "http.server", "itertools", "pickle", "string", "random",
                       "statistics", "io", "os", "socket", "configparser", "socketserver",
                       "http.cookies", "shelve", "urllib.request", "uuid", "cmd", "timeit",
                       "pyclbr", "plistlib", "site")

# A sentence of `calibration_sentences` ends at ".", "!" or "?" followed by white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _docstrings(modules) -> str:
  """The docstrings of `modules`, in that order, separated by blank lines."""
  docs = [inspect.getdoc(importlib.import_module(name)) for name in modules]
  if not all(docs):
    raise RuntimeError("standard-library docstrings are missing (is Python running with -OO?)")
  return "\n\n".join(docs)


def evaluation_text() -> str:
  """The docstrings of `TEXT_MODULES`, in that order, separated by blank lines (~7,600 tokens)."""
  return _docstrings(TEXT_MODULES)


def calibration_text() -> str:
  """The docstrings of `CALIBRATION_MODULES`, in order, separated by blank lines (~11,500 tokens).

  No module is also in `TEXT_MODULES`, so statistics gathered on this text (GPTQ's Hessians)
  are not gathered on the evaluation text.
  """
  return _docstrings(CALIBRATION_MODULES)


def evaluation_tokens(tokenizer, n_tokens: int = 2048, seq_len: int = 256) -> np.ndarray:
  """The evaluation text as ⌈n_tokens / seq_len⌉ sequences [n, seq_len] of int32 token ids.

  The text is tokenised once without special tokens and cut into consecutive, non-overlapping
  pieces from its start; each sequence is the tokens the tokenizer puts in front of a text (BOS
  for SmolLM2's, found by encoding the empty string) followed by one piece. The defaults give 8
  sequences of 256 (2,040 text tokens with one BOS each).

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
    n_tokens: at least this many tokens in all, BOS included.
    seq_len: tokens per sequence, BOS included.

  Raises:
    ValueError: the text has too few tokens for the request.
  """
  return _sequences(tokenizer, evaluation_text(), n_tokens, seq_len, from_end=False)


def calibration_tokens(tokenizer, n_tokens: int = 2048, seq_len: int = 256) -> np.ndarray:
  """Sequences like `evaluation_tokens`, cut from the end of the text instead of its start.

  For statistics gathered on the model (the Fisher of bit allocation): as long as the two
  requests together need no more than the text's ~7,600 tokens, calibration and evaluation
  tokens do not overlap, so an allocation is not tuned on the tokens it is scored on.
  """
  return _sequences(tokenizer, evaluation_text(), n_tokens, seq_len, from_end=True)


def gptq_calibration_tokens(tokenizer, n_tokens: int = 4096, seq_len: int = 256,
                            text: str | None = None) -> np.ndarray:
  """Sequences like `evaluation_tokens` for calibrating a quantiser, cut from other text.

  ⌈n_tokens / seq_len⌉ sequences [n, seq_len] of int32 ids, each the tokenizer's prefix (BOS)
  and one consecutive piece of `text` from its start. The default text is `calibration_text`,
  which shares no module with the evaluation text, so no calibration token is an evaluation
  token; the defaults give 16 sequences of 256 (4,080 text tokens).

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
    n_tokens: at least this many tokens in all, BOS included.
    seq_len: tokens per sequence, BOS included.
    text: the calibration text (a user's file contents); default: `calibration_text()`.

  Raises:
    ValueError: the text has too few tokens for the request.
  """
  text = calibration_text() if text is None else text
  return _sequences(tokenizer, text, n_tokens, seq_len, from_end=False)


def _sequences(tokenizer, text, n_tokens, seq_len, from_end):
  """⌈n_tokens / seq_len⌉ sequences of the tokenizer's prefix and consecutive pieces of `text`.

  The pieces are taken from the start of the text, or with `from_end` from its end.
  """
  if n_tokens < 1:
    raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
  prefix = tokenizer.encode("").ids
  body = tokenizer.encode(text, add_special_tokens=False).ids
  n_sequences, piece = -(-n_tokens // seq_len), seq_len - len(prefix)
  if piece < 1:
    raise ValueError(f"seq_len={seq_len} leaves no room for text after the {len(prefix)} "
                     f"prefix token(s)")
  if n_sequences * piece > len(body):
    raise ValueError(f"n_tokens={n_tokens} in sequences of seq_len={seq_len}: {n_sequences} "
                     f"sequences need {n_sequences * piece} text tokens; the text has {len(body)}")
  start = len(body) - n_sequences * piece if from_end else 0
  return np.asarray([prefix + body[start + i * piece:start + (i + 1) * piece]
                     for i in range(n_sequences)], np.int32)


def calibration_sentences(text: str | None = None, n: int | None = None) -> list[str]:
  """Sentences of `text` for calibrating a sentence encoder (MiniLM's `encode` batches).

  The text is cut into paragraphs at blank lines; each paragraph's lines are joined with
  single spaces and cut into sentences after ".", "!" or "?" followed by white space. Sentences
  of at least 5 words are kept, in order (code and API lists in docstrings come through as
  long "sentences"; the encoder truncates them). The default text is `calibration_text()`,
  which shares nothing with MiniLM's evaluation sentences.

  Args:
    text: the calibration text (a user's file contents); default: `calibration_text()`.
    n: the number of sentences, the first n; default: all of them.

  Raises:
    ValueError: the text has fewer than `n` sentences (or none).
  """
  if n is not None and n < 1:
    raise ValueError(f"n must be at least 1, got {n}")
  text = calibration_text() if text is None else text
  sentences = [sentence
               for paragraph in re.split(r"\n\s*\n", text)
               for sentence in _SENTENCE_END.split(" ".join(paragraph.split()))
               if len(sentence.split()) >= 5]
  if len(sentences) < (1 if n is None else n):
    raise ValueError(f"calibration_sentences(n={n}): the text has only {len(sentences)} "
                     f"sentences of at least 5 words")
  return sentences[:n]


def _log_softmax(logits: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit
def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """The full next-token KL divergence D(p‖q) in nats at every position.

  D(p‖q) = Σⱼ pⱼ (log pⱼ − log qⱼ) over the whole vocabulary, with p = softmax(p_logits) the
  reference and q = softmax(q_logits); entries with pⱼ = 0 add nothing.

  Args:
    p_logits, q_logits: [..., vocab] logits of the two models at the same positions.

  Returns:
    [...] float32, ≥ 0 (0 where the distributions agree).
  """
  log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "tail_floor"))
def topk_kl(p_logits: jax.Array, q_logits: jax.Array, k: int = 128, *,
            tail_floor: float = 1e-6) -> jax.Array:
  """The paper's top-k + tail-bucket KL divergence in nats at every position.

  With T the k most probable entries of p and the tail masses p_tail = Σ_{j∉T} pⱼ and
  q_tail = Σ_{j∉T} qⱼ (both over the complement of p's top k, each clipped to ≥ `tail_floor`):

    D_k(p‖q) = Σ_{j∈T} pⱼ (log pⱼ − log qⱼ) + p_tail (log p_tail − log q_tail).

  This is the KL divergence between p and q with the tail merged into one outcome, so
  0 ≤ D_k ≤ D up to the clipping, and with k = vocab it is the full `kl_divergence` (both tails
  are empty and clip to the same floor). The tails are summed in log space over the complement
  (a masked log-sum-exp), not as 1 − Σ_T, which would cancel catastrophically when p is sharp.

  Args:
    p_logits, q_logits: [..., vocab] logits of the reference and the compared model.
    k: the number of reference entries kept (the paper uses 128), 1 ≤ k ≤ vocab.
    tail_floor: the least tail mass.

  Returns:
    [...] float32.
  """
  log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
  top_log_p, top = jax.lax.top_k(log_p, k)
  top_log_q = jnp.take_along_axis(log_q, top, axis=-1)
  in_top = jnp.put_along_axis(jnp.zeros(log_p.shape, bool), top, True, axis=-1, inplace=False)

  def log_tail(log_x):
    tail = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_x), axis=-1)
    return jnp.maximum(tail, math.log(tail_floor))

  log_p_tail, log_q_tail = log_tail(log_p), log_tail(log_q)
  return (jnp.sum(jnp.exp(top_log_p) * (top_log_p - top_log_q), axis=-1)
          + jnp.exp(log_p_tail) * (log_p_tail - log_q_tail))


@jax.jit
def perplexity(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """exp of the mean next-token cross-entropy of `ids` [batch, length] under `logits`.

  PPL = exp(−1/(B(T−1)) Σ_b Σ_{t<T−1} log softmax(logits[b, t])[ids[b, t+1]]): the logits
  [batch, length, vocab] at position t predict token t + 1, so the last position is unused.
  Returns a float32 scalar.
  """
  log_probs = _log_softmax(logits[:, :-1])
  targets = jnp.take_along_axis(log_probs, ids[:, 1:, None].astype(jnp.int32), axis=-1)
  return jnp.exp(-jnp.mean(targets))
