"""Quantise speed: 4096×4096 f32 → 4-bit B=64 packed, as a ratio to one f32 elementwise pass.

Both are jitted and timed in the same process (median of several runs, device arrays in,
`block_until_ready` out); the baseline `x * 2` reads and writes the same 64 MiB once.

    python benchmarks/quantise.py [--size 4096] [--repeats 15]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxquant as jq
from timing import median_seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
  elementwise = jax.jit(lambda a: a * 2.0)
  baseline = median_seconds(elementwise, x, repeats=args.repeats)
  print(f"{jax.default_backend()}, {args.size}×{args.size} f32; baseline one elementwise pass "
        f"{baseline * 1e3:.1f} ms")
  print(f"{'spec':<44}{'ms':>8}{'× pass':>8}")
  specs = {
      "nf4 B=64 axis=0 (kernel layout)": jq.QuantSpec("nf4", block_size=64, axis=0),
      "nf4 B=64 axis=-1": jq.QuantSpec("nf4", block_size=64),
      "crd-t5 signmax 3-bit B=64 axis=0": jq.QuantSpec("crd-t5-signmax-3b", axis=0),
      "int8 B=64 axis=0": jq.QuantSpec("int8", block_size=64, axis=0),
      "nf4 B=64 double-quantised scales": jq.QuantSpec("nf4", axis=0, double_quant=True),
  }
  for label, spec in specs.items():
    quantise = jax.jit(lambda a, spec=spec: jq.quantise(a, spec))
    seconds = median_seconds(quantise, x, repeats=args.repeats)
    print(f"{label:<44}{seconds * 1e3:>8.1f}{seconds / baseline:>8.2f}")
  q = jq.quantise(x, specs["nf4 B=64 axis=0 (kernel layout)"])
  seconds = median_seconds(jq.dequantise, q, repeats=args.repeats)
  print(f"{'dequantise nf4 B=64 axis=0':<44}{seconds * 1e3:>8.1f}{seconds / baseline:>8.2f}")
  print(f"packed codes on device: {q.codes.on_device_size_in_bytes() / 2**20:.2f} MiB; "
        f"bits per parameter {q.bits_per_param}")


if __name__ == "__main__":
  main()
