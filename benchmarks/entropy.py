"""Entropy coding at scale: the rANS codec's rates, and SmolLM2-135M checkpoints coded.

Part 1. `jaxquant.entropy.encode` / `decode` on 2^24 codes of a Normal rounded to uniform
grids of 16 and 255 points: million codes per second (median of 5 runs, all CPUs and one
thread) and the coded size against the ideal -Σ log2 p̂(cᵢ) of `jaxquant.entropy.ideal_bits`.

Part 2. SmolLM2-135M-Instruct quantised two ways, each saved as a fixed-length checkpoint and
as an entropy-coded one (`jaxquant.checkpoint.save(..., entropy_coded=True)`):

- ``gguf``: the file's own Q4_1 linears and Q8_0 table, packed as they are
  (`load_smollm2(packed=True)`);
- ``grid``: every linear on the odd uniform grid `jaxquant.fitting.fit_grid` fits for 4 bits
  per element (tensor RMS scale; Orr et al. 2025 §1), the table kept in float.

Printed: the sizes the checkpoint records (ideal coder, as stored, packed), the stored size
over the ideal one, and the median of 3 restores of each checkpoint into the same model, as a
ratio to the fixed-length one's.

    python benchmarks/entropy.py [--part codec|smollm2|all]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time

import numpy as np
from flax import nnx

import jaxquant as jq
from jaxquant.eval.models import smollm2


def _median_seconds(run, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def codec(size: int = 2**24, repeats: int = 5) -> None:
  rng = np.random.default_rng(0)
  x = rng.standard_normal(size)
  print("| alphabet | threads | encode M codes/s | decode M codes/s | stored / ideal |")
  print("|---|---|---|---|---|")
  for n_symbols in (16, 255):
    symbols = np.clip(np.round((x + 4) / 8 * (n_symbols - 1)), 0, n_symbols - 1).astype(np.uint8)
    ideal = jq.entropy.ideal_bits(symbols, n_symbols)
    for threads in (None, 1):
      stream = jq.entropy.encode(symbols, n_symbols, threads=threads)
      encode = _median_seconds(lambda: jq.entropy.encode(symbols, n_symbols, threads=threads),
                               repeats)
      decode = _median_seconds(lambda: jq.entropy.decode(stream, threads=threads), repeats)
      assert np.array_equal(jq.entropy.decode(stream), symbols)
      shown = "all" if threads is None else threads
      print(f"| {n_symbols} | {shown} | {size / encode / 1e6:.0f} | {size / decode / 1e6:.0f} | "
            f"{stream.storage_bits / ideal:.5f} |")


def _grid_model():
  model, _ = smollm2.load_smollm2()
  rules = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Linear):
      _, spec = jq.fitting.fit_grid(module.kernel.get_value(), 4.0, scaling="rms", axis=0)
      rules.append(jq.Rule(re.escape("/".join(map(str, path))), spec))
  return jq.nnx.quantise_model(model, rules)


def smollm2_checkpoints(repeats: int = 3) -> None:
  print("| model | ideal MiB | stored MiB | packed MiB | stored / ideal | restore coded / fixed |")
  print("|---|---|---|---|---|---|")
  for name, build in (("gguf", lambda: smollm2.load_smollm2(packed=True)[0]),
                      ("grid", _grid_model)):
    model = build()
    with tempfile.TemporaryDirectory() as directory:
      jq.checkpoint.save(f"{directory}/fixed", model)
      jq.checkpoint.save(f"{directory}/coded", model, entropy_coded=True)
      sizes = jq.checkpoint.read_metadata(f"{directory}/coded")["sizes"]
      times = {kind: _median_seconds(lambda kind=kind: jq.checkpoint.restore(
          f"{directory}/{kind}", model), repeats) for kind in ("fixed", "coded")}
    mib = {key: bits / 8 / 2**20 for key, bits in sizes.items()}
    print(f"| {name} | {mib['ideal']:.2f} | {mib['coded']:.2f} | {mib['fixed']:.2f} | "
          f"{sizes['coded'] / sizes['ideal']:.4f} | {times['coded'] / times['fixed']:.2f} "
          f"({times['coded']:.2f} s / {times['fixed']:.2f} s) |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("codec", "smollm2", "all"), default="all")
  args = parser.parse_args()
  if args.part in ("codec", "all"):
    codec()
  if args.part in ("smollm2", "all"):
    smollm2_checkpoints()


if __name__ == "__main__":
  main()
