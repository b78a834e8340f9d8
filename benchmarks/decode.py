"""SmolLM2-135M greedy decoding on this machine: tokens per second, NF4 against float32.

The float model (weights dequantised from the GGUF to float32) against the same model with its
210 decoder Linear layers in NF4 (B = 64, bfloat16 scales; the tied embedding and head stay
float), run by each CPU backend measured (the native kernel ``"cpu"``, the XLA loop
``"xla"``). Each model generates `--tokens` tokens greedily after a short prompt, one jitted
program (`jaxquant.eval.models.smollm2.greedy_generate`, batch 1, so every product is M = 1);
medians over `--repeats` runs, every model timed in the same process.

    python benchmarks/decode.py [--tokens 32] [--repeats 5] [--backends cpu xla]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx
from timing import median_seconds

import jaxquant as jq
from jaxquant.eval.models import smollm2

PROMPT = "The capital of France is"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--backends", nargs="+", default=["cpu", "xla"])
  args = parser.parse_args(argv)
  model, tokenizer = smollm2.load_smollm2()
  ids = jnp.asarray([tokenizer.encode(PROMPT).ids], jnp.int32)
  rules = [jq.Rule(r"layers/\d+/.*", jq.QuantSpec("nf4", block_size=64))]
  models = {"float32": model}
  for backend in args.backends:
    models[f"nf4 {backend}"] = jq.nnx.quantise_model(model, rules, backend=backend)
  steps = ids.shape[1] + args.tokens - 1
  print(f"{jax.default_backend()}; SmolLM2-135M, batch 1, {ids.shape[1]}-token prompt + "
        f"{args.tokens} tokens ({steps} decode steps)")
  print(f"{'model':<14}{'tokens/s':>10}{'vs float32':>12}{'linear MiB':>12}")
  rows = {}
  for name, candidate in models.items():
    seconds = median_seconds(lambda m: smollm2.greedy_generate(m, ids, args.tokens), candidate,
                             repeats=args.repeats)
    rows[name] = steps / seconds
    mib = (jq.nnx.quantised_bytes(candidate) if name != "float32" else
           sum(layer.kernel.get_value().size * 4 for layer in _linears(candidate))) / 2**20
    print(f"{name:<14}{rows[name]:>10.1f}{rows[name] / rows['float32']:>12.2f}{mib:>12.1f}")
  return rows


def _linears(model):
  return [module for path, module in nnx.iter_modules(model)
          if path and path[0] == "layers" and hasattr(module, "kernel")]


if __name__ == "__main__":
  main()
