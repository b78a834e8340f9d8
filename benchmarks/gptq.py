"""GPTQ speed: one layer quantised by GPTQ, as a ratio to round-to-nearest in the same process.

For each kernel shape [K, N] (SmolLM2's and a 4096² one), a random kernel and the second
moment of random correlated inputs; both quantisers are jitted and timed on device arrays
(median of several runs, after a compiling call). GPTQ's cost grows as K²N (the row updates)
plus K³ (the Cholesky factors); round-to-nearest's as KN.

    python benchmarks/gptq.py [--repeats 5] [--act-order]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxquant as jq
from timing import median_seconds

SHAPES = ((576, 576), (576, 1536), (1536, 576), (4096, 4096))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--act-order", action="store_true")
  args = parser.parse_args(argv)
  spec = jq.QuantSpec("int3", scaling="signmax", block_size=64)
  print(f"{jax.default_backend()}; int3 signmax B=64, act order {args.act_order}")
  print(f"{'kernel [K, N]':<16}{'RTN ms':>10}{'GPTQ ms':>10}{'GPTQ / RTN':>12}")
  for k, n in SHAPES:
    keys = jax.random.split(jax.random.key(k + n), 3)
    w = 0.02 * jax.random.normal(keys[0], (k, n), jnp.float32)
    x = jax.random.normal(keys[1], (2 * k, k), jnp.float32)
    x = x + 0.5 * jnp.roll(x, 1, axis=1)
    h = x.T @ x
    rtn = jax.jit(lambda w: jq.quantise(w, spec))
    gptq = jax.jit(lambda w, h: jq.gptq.quantise(w, h, spec, act_order=args.act_order))
    rtn_seconds = median_seconds(rtn, w, repeats=args.repeats)
    gptq_seconds = median_seconds(gptq, w, h, repeats=args.repeats)
    print(f"{f'{k}×{n}':<16}{rtn_seconds * 1e3:>10.2f}{gptq_seconds * 1e3:>10.1f}"
          f"{gptq_seconds / rtn_seconds:>12.0f}")


if __name__ == "__main__":
  main()
