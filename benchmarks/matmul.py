"""qmatmul speed on this machine, as ratios to a dense float32 dot in the same run.

For M ∈ {1, 8, 32, 128, 512} and K = N ∈ {1024, 4096}, NF4 with B = 64 along K and float32
activations: the median time of `jq.qmatmul` by each backend measured (on CPU the native
kernel ``"cpu"`` and the XLA loop ``"xla"``; elsewhere ``"auto"``) divided by the median time of
a dense float32 dot, next to a dense bfloat16 dot and the dequantise-then-dot path other JAX
libraries use. Every function is jitted and gets device arrays; medians over `--repeats` runs.

    python benchmarks/matmul.py [--repeats 15] [--sizes 1024 4096] [--ms 1 8 32 128 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import median_seconds

import jaxquant as jq
from jaxquant.kernels import cpu


def default_backends() -> list[str]:
  if jax.default_backend() != "cpu":
    return ["auto"]
  return ["cpu", "xla"] if cpu.available() else ["xla"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32, 128, 512])
  parser.add_argument("--backends", nargs="+", default=default_backends())
  args = parser.parse_args(argv)
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
  dequantise_then_dot = jax.jit(lambda x, q: jnp.dot(x, jq.dequantise(q)))
  quantised = {backend: jax.jit(lambda x, q, b=backend: jq.qmatmul(x, q, backend=b))
               for backend in args.backends}
  print(f"{jax.default_backend()}; NF4 B=64 along K; ratios are time / dense f32 dot time "
        "(lower is faster)")
  print(f"{'K=N':>6}{'M':>5}{'f32 ms':>9}{'bf16':>8}" +
        "".join(f"{backend:>9}" for backend in args.backends) + f"{'deq+dot':>9}")
  rows = []
  for size in args.sizes:
    w = jax.random.normal(jax.random.key(0), (size, size), jnp.float32) * 0.02
    w16 = w.astype(jnp.bfloat16)
    q = jq.quantise(w, jq.QuantSpec("nf4", block_size=64, axis=0))
    for m in args.ms:
      x = jax.random.normal(jax.random.key(1), (m, size), jnp.float32)
      t_f32 = median_seconds(dense, x, w, repeats=args.repeats)
      ratios = {"bf16": median_seconds(dense, x.astype(jnp.bfloat16), w16,
                                       repeats=args.repeats) / t_f32}
      for backend, fn in quantised.items():
        ratios[backend] = median_seconds(fn, x, q, repeats=args.repeats) / t_f32
      ratios["deq+dot"] = median_seconds(dequantise_then_dot, x, q, repeats=args.repeats) / t_f32
      rows.append((size, m, t_f32, ratios))
      print(f"{size:>6}{m:>5}{t_f32 * 1e3:>9.2f}" +
            "".join(f"{value:>{8 if name == 'bf16' else 9}.2f}" for name, value in ratios.items()))
  return rows


if __name__ == "__main__":
  main()
