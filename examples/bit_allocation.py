"""Bit allocation on SmolLM2-135M: flat, heuristic and Fisher at the same average bits.

Each of the 210 decoder Linear layers gets its own element bits b_t around an average b̄
(`jaxquant.eval.allocation`, Orr et al. 2025 §5): flat gives every layer b̄; the heuristic
gives the first and last two layers 2 bits more than the rest; Fisher sets
b_t = c + log2 RMS_t + ½ log2 f̄_t, f̄_t the layer's mean diagonal Fisher on calibration text.
Fixed-length formats get whole bits per layer, the entropy-coded grid fractional ones. For
each allocation the script prints the top-128 KL to the float model, and how many bits per
parameter the flat allocation needs for the same KL (log KL interpolated linearly in bits
between the flat points): the bits saved at equal KL.

    python examples/bit_allocation.py      # CRD-t signmax B=64, CRD-t + outliers, the grid
    python examples/bit_allocation.py --formats crd-t-signmax --quick --out /tmp/allocation
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from jaxquant.eval import report, tasks

FLAT_BITS = (3.0, 3.5, 4.0, 4.5)


def flat_bits_for(rows, family: str, metric: float) -> float | None:
  """Bits per parameter at which the flat allocation of `family` reaches `metric`, or None.

  Interpolates log(metric) linearly in bits per parameter between the flat rows; None
  outside their range.
  """
  points = sorted((row.metric, row.bits_per_param) for row in rows
                  if row.format == family and row.allocation == "flat")
  if not points or not points[0][0] <= metric <= points[-1][0]:
    return None
  metrics, bits = zip(*points)
  return float(np.interp(np.log(metric), np.log(metrics), bits))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--formats", nargs="+",
                      default=["crd-t-signmax", "crd-t-outliers", "grid-ideal"])
  parser.add_argument("--bits", type=float, nargs="+", default=[3.5, 4.0],
                      help="average element bits for the heuristic and Fisher allocations")
  parser.add_argument("--block-size", type=int, default=64)
  parser.add_argument("--quick", action="store_true", help="less evaluation and Fisher data")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bit-allocation"))
  args = parser.parse_args(argv)
  task = tasks.load_task("smollm2", quick=args.quick)
  flat_bits = sorted(set(FLAT_BITS) | set(args.bits))
  rows = (report.run_report(task, args.formats, flat_bits, args.block_size, ["flat"]) +
          report.run_report(task, args.formats, args.bits, args.block_size,
                            ["heuristic", "fisher"]))
  print(report.render(task, rows))
  print(f"\n{'format':<33}{'allocation':<11}{'bits':>5}{'b/param':>9}{'KL':>9}"
        f"{'flat b/param at equal KL':>26}{'saved':>7}")
  for row in rows:
    if row.bits not in args.bits:
      continue
    equal = flat_bits_for(rows, row.format, row.metric)
    saved = "" if equal is None else f"{equal - row.bits_per_param:>7.3f}"
    equal = "beyond the flat range" if equal is None else f"{equal:.3f}"
    print(f"{row.format:<33}{row.allocation:<11}{row.bits:>5g}{row.bits_per_param:>9.3f}"
          f"{row.metric:>9.4f}{equal:>26}{saved}")
  written = report.write_outputs(task, rows, args.out, dict(
      example="bit_allocation", formats=args.formats, bits=args.bits, quick=args.quick))
  print(f"wrote {', '.join(written)} to {args.out}")
  return rows


if __name__ == "__main__":
  main()
