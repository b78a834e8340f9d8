"""Which 4-bit format is best for i.i.d. weights? The paper's comparison, reproduced.

For Normal, Laplace and Student-t (ν = 5) samples of unit RMS, in blocks of B ∈ {32, 64, 128}
with bf16 scales, prints the efficiency R·2^b of each format (R = ‖ŵ - w‖/‖w‖, b = bits per
parameter including the scales; lower is better) and marks the best in each column. At B = 32
it adds OCP MXFP4 (E2M1 with an E8M0 power-of-two scale per 32, the same 4.25 bits per
parameter as bf16 scales at B = 64: compare it with that column too) and NVIDIA's NVFP4
(E2M1 in blocks of 16 with E4M3 scales under one float32 scale per tensor: 4.5 bits per
parameter, which R·2^b charges it).

    python examples/formats_table.py                 # 2^22 samples per distribution
    python examples/formats_table.py --samples 65536 --markdown
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant import formats

BLOCK_SIZES = (32, 64, 128)
DISTRIBUTIONS = {
    "Normal": lambda rng, n: rng.standard_normal(n),
    "Laplace": lambda rng, n: rng.laplace(size=n) / np.sqrt(2),
    "Student-t ν=5": lambda rng, n: rng.standard_t(5, n) / np.sqrt(5 / 3),
}


def candidate_formats(x, block_size: int):
  """(label, format, scaling) for every format compared at this block size."""
  bits = 4
  crd = lambda family, scaling: formats.crd_format(family, bits, scaling=scaling,
                                                   block_size=block_size)
  return [
      ("INT absmax", formats.int_format(bits), "absmax"),
      ("INT signmax", formats.int_format(bits), "signmax"),
      ("E2M1", formats.fp_format(2, 1), "absmax"),
      ("E3M0", formats.fp_format(3, 0), "absmax"),
      ("NF4", formats.nf4(), "absmax"),
      ("SF4", formats.sf4(), "absmax"),
      ("CRD normal", crd("normal", "absmax"), "absmax"),
      ("CRD laplace", crd("laplace", "absmax"), "absmax"),
      ("CRD t (ν fit)", jq.fitting.fit_crd_t(x, bits, block_size=block_size), "absmax"),
      ("CRD t (ν fit) signmax",
       jq.fitting.fit_crd_t(x, bits, scaling="signmax", block_size=block_size), "signmax"),
      ("Lloyd–Max absmax", jq.fitting.fit_lloyd_max(x, bits, block_size=block_size), "absmax"),
      ("Lloyd–Max signmax",
       jq.fitting.fit_lloyd_max(x, bits, scaling="signmax", block_size=block_size), "signmax"),
  ] + ([("MXFP4 (E8M0 scales)", formats.mx_format("mxfp4"), "mx"),
         ("NVFP4 (B=16, E4M3 scales)", formats.nvfp4(), "absmax")] if block_size == 32 else [])


def efficiency_table(samples: int, seed: int = 0):
  """{distribution: {label: {block_size: (R·2^b, format name)}}}."""
  rng = np.random.default_rng(seed)
  table = {}
  for dist_name, sampler in DISTRIBUTIONS.items():
    table[dist_name] = rows = {}
    data = sampler(rng, samples).astype(np.float32)
    for block_size in BLOCK_SIZES:
      x = jnp.asarray(data.reshape(-1, block_size))
      for label, fmt, scaling in candidate_formats(x, block_size):
        spec = jq.QuantSpec(fmt, block_size=fmt.block_size or block_size, scaling=scaling)
        q = jq.quantise(x, spec)
        value = float(jq.metrics.efficiency(x, q.dequantise(), q.bits_per_param))
        rows.setdefault(label, {})[block_size] = (value, fmt.name)
  return table


def _cell(cells, b, best, markdown) -> str:
  """One entry: R·2^b, marked when it is the column's best; a dash where not measured."""
  if b not in cells:
    return "—"
  text = f"{cells[b][0]:.3f}"
  if cells[b][0] != best:
    return text
  return f"**{text}**" if markdown else f"{text}*"


def render(table, markdown: bool = False) -> str:
  lines = []
  for dist_name, rows in table.items():
    best = {b: min(rows[label][b][0] for label in rows if b in rows[label])
            for b in BLOCK_SIZES}
    header = ["format"] + [f"B={b} ({4 + 16 / b:.3f} b)" for b in BLOCK_SIZES]

    if markdown:
      lines += [f"**{dist_name}** (R·2^b, lower is better)", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
      lines += ["| " + " | ".join([label] + [_cell(rows[label], b, best[b], markdown) for b in BLOCK_SIZES]) + " |"
                for label in rows]
    else:
      lines += [f"{dist_name}: R·2^b (lower is better; * = best)",
                f"{header[0]:<24}" + "".join(f"{h:>20}" for h in header[1:])]
      lines += [f"{label:<24}" + "".join(f"{_cell(rows[label], b, best[b], markdown):>20}" for b in BLOCK_SIZES)
                for label in rows]
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=2**22, help="samples per distribution")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--markdown", action="store_true", help="print markdown tables")
  args = parser.parse_args(argv)
  if args.samples < 128 or args.samples % 128:
    parser.error(f"--samples={args.samples} must be a positive multiple of 128")
  start = time.perf_counter()
  table = efficiency_table(args.samples, args.seed)
  print(render(table, args.markdown))
  print(f"{args.samples} samples per distribution, {time.perf_counter() - start:.1f} s "
        f"on {jax.default_backend()}")
  return table


if __name__ == "__main__":
  main()
