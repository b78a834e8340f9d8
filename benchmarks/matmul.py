"""qmatmul speed on this machine's default backend, as ratios to dense dots in the same run.

For M ∈ {1, 8, 32, 128} and K = N ∈ {1024, 4096}, NF4 with B = 64 along K: the median time of
`jq.qmatmul` (backend "xla" on CPU, "auto" elsewhere) divided by the median time of a dense
float32 dot, next to a dense bfloat16 dot and the dequantise-then-dot path other JAX libraries
use. Every function is jitted and gets device arrays; medians over `--repeats` runs.

    python benchmarks/matmul.py [--repeats 15] [--sizes 1024 4096] [--ms 1 8 32 128]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxquant as jq
from timing import median_seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32, 128])
  parser.add_argument("--backend", default="xla" if jax.default_backend() == "cpu" else "auto")
  args = parser.parse_args(argv)
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
  dequantise_then_dot = jax.jit(lambda x, q: jnp.dot(x, jq.dequantise(q)))
  quantised = jax.jit(lambda x, q: jq.qmatmul(x, q, backend=args.backend))
  print(f"{jax.default_backend()}; qmatmul backend={args.backend!r}; NF4 B=64 along K; "
        f"ratios are time / dense f32 dot time (lower is faster)")
  print(f"{'K=N':>6}{'M':>5}{'f32 ms':>9}{'bf16':>8}{'qmatmul':>9}{'deq+dot':>9}"
        f"{'speed-up vs deq+dot':>21}")
  rows = []
  for size in args.sizes:
    w = jax.random.normal(jax.random.key(0), (size, size), jnp.float32) * 0.02
    w16 = w.astype(jnp.bfloat16)
    q = jq.quantise(w, jq.QuantSpec("nf4", block_size=64, axis=0))
    for m in args.ms:
      x = jax.random.normal(jax.random.key(1), (m, size), jnp.float32)
      t_f32 = median_seconds(dense, x, w, repeats=args.repeats)
      t_bf16 = median_seconds(dense, x.astype(jnp.bfloat16), w16, repeats=args.repeats)
      t_q = median_seconds(quantised, x, q, repeats=args.repeats)
      t_deq = median_seconds(dequantise_then_dot, x, q, repeats=args.repeats)
      rows.append((size, m, t_f32, t_bf16 / t_f32, t_q / t_f32, t_deq / t_f32, t_deq / t_q))
      print(f"{size:>6}{m:>5}{t_f32 * 1e3:>9.2f}{rows[-1][3]:>8.2f}{rows[-1][4]:>9.2f}"
            f"{rows[-1][5]:>9.2f}{rows[-1][6]:>21.1f}")
  return rows


if __name__ == "__main__":
  main()
