"""The real-model tasks of `jaxquant report`: a float model, its layers, and a metric.

- ``minilm``: all-MiniLM-L6-v2. All 36 encoder Linear layers are quantised; the metric is
  1 − mean cosine between float and quantised sentence embeddings of the stored sentences
  (`jaxquant/eval/data/sentences.txt`), with the Spearman correlation of pairwise
  similarities reported beside it.
- ``smollm2``: SmolLM2-135M-Instruct. All 210 decoder-block Linear layers are quantised (the
  tied embedding stays as loaded); the metric is the paper's top-128 + tail next-token KL to
  the float model over ≥ 2,000 tokens of Python standard-library documentation, with the full
  KL and perplexity beside it. Its float weights already lie on a Q4_1 grid. Its diagonal
  Fisher, for bit allocation and the predicted KL, comes from other tokens of the same text.

GPTQ (`jaxquant report --method gptq`, `jaxquant quantise`) calibrates both models on
`jaxquant.eval.text.calibration_text` (docstrings of other modules) or a user's text: 4,096
SmolLM2 tokens in sequences of 256 by default, or MiniLM sentences of about 8,192 tokens,
batched by length (padding positions, a few percent, enter the second moments).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.eval.report import Task

# The Fisher of SmolLM2 (true Fisher, labels sampled from the model) is estimated on this many
# calibration tokens from the end of the text, in sequences of FISHER_SEQ_LEN.
FISHER_TOKENS = 2048
FISHER_SEQ_LEN = 128
# GPTQ calibrates SmolLM2 on sequences of this length (batches of 4) and MiniLM on batches of
# this many sentences, from `jaxquant.eval.text.calibration_text` (not the evaluation text).
CALIBRATION_SEQ_LEN = 256
MINILM_CALIBRATION_BATCH = 16


class ModelMissing(RuntimeError):
  """A model package (or a reader it needs) is not installed; the message says how to."""


def load_task(name: str, *, quick: bool = False) -> Task:
  """The task called `name` ("minilm" or "smollm2"); `quick` evaluates on less data."""
  loaders = {"minilm": _minilm, "smollm2": _smollm2}
  if name not in loaders:
    raise ValueError(f"{name=} is not one of {tuple(loaders)}")
  try:
    return loaders[name](quick)
  except ModuleNotFoundError as error:
    raise ModelMissing(str(error)) from None


def _minilm(quick: bool) -> Task:
  from jaxquant.eval import text  # pylint: disable=import-outside-toplevel
  from jaxquant.eval.models import minilm  # pylint: disable=import-outside-toplevel
  model, tokenizer = minilm.load_minilm()
  sentences = minilm.eval_sentences()[:16] if quick else minilm.eval_sentences()
  reference = minilm.encode(model, tokenizer, sentences)

  def score(quantised):
    metrics = minilm.evaluate(reference, minilm.encode(quantised, tokenizer, sentences))
    return {"1 - cosine": 1.0 - metrics["mean_cosine"], **metrics}

  def calibration(user_text, n_tokens):
    # Sentences sorted by length and batched, so that little padding enters the moments.
    chosen, total = [], 0
    for sentence in text.calibration_sentences(user_text):
      chosen.append(sentence)
      total += len(tokenizer.encode(sentence).ids)
      if total >= n_tokens:
        break
    chosen.sort(key=lambda sentence: len(tokenizer.encode(sentence).ids))
    batches = []
    for start in range(0, len(chosen), MINILM_CALIBRATION_BATCH):
      encodings = tokenizer.encode_batch(chosen[start:start + MINILM_CALIBRATION_BATCH])
      batches.append((jnp.asarray([e.ids for e in encodings], jnp.int32),
                      jnp.asarray([e.attention_mask for e in encodings], jnp.int32)))
    return batches

  return Task("all-MiniLM-L6-v2", model, layers=r"layers/\d+/.*", metric="1 - cosine",
              score=score, note=f"{len(sentences)} sentences; 36 encoder Linear layers",
              calibration=calibration, calibration_tokens=8192,
              tensor_name=minilm.safetensors_name)


def _smollm2(quick: bool) -> Task:
  from jaxquant.eval import text  # pylint: disable=import-outside-toplevel
  from jaxquant.eval.models import smollm2  # pylint: disable=import-outside-toplevel
  model, tokenizer = smollm2.load_smollm2()
  ids = jnp.asarray(text.evaluation_tokens(tokenizer, n_tokens=512 if quick else 2048))
  forward = jax.jit(lambda m, tokens: m(tokens))
  reference = forward(model, ids)

  def score(quantised):
    logits = forward(quantised, ids)
    return {"top-128 KL": float(jnp.mean(text.topk_kl(reference, logits))),
            "KL": float(jnp.mean(text.kl_divergence(reference, logits))),
            "perplexity": float(text.perplexity(logits, ids))}

  @functools.cache
  def fisher():
    from jaxquant.eval import fisher as fisher_lib  # pylint: disable=import-outside-toplevel
    # Many short sequences: the signed-gradient estimator's noise falls with their number.
    n_tokens = FISHER_TOKENS // 4 if quick else FISHER_TOKENS
    calibration = text.calibration_tokens(tokenizer, n_tokens=n_tokens, seq_len=FISHER_SEQ_LEN)
    per_element = fisher_lib.diagonal_fisher(
        model, [jnp.asarray(row[None]) for row in calibration], key=jax.random.key(0))
    return fisher_lib.by_layer(fisher_lib.tensor_means(per_element))

  def calibration(user_text, n_tokens):
    sequences = text.gptq_calibration_tokens(tokenizer, n_tokens, CALIBRATION_SEQ_LEN,
                                             text=user_text)
    return [jnp.asarray(sequences[i:i + 4]) for i in range(0, len(sequences), 4)]

  note = (f"{int(np.prod(ids.shape))} tokens; 210 decoder Linear layers. The float weights "
          "already lie on a Q4_1 grid (asymmetric, groups of 32), so errors are relative to "
          "that, and formats are compared at block 64.")
  return Task("SmolLM2-135M-Instruct", model, layers=r"layers/\d+/.*", metric="top-128 KL",
              score=score, note=note, fisher=fisher, calibration=calibration,
              calibration_tokens=4096, tensor_name=smollm2.gguf_name)
