"""The `jaxquant` command: `jaxquant report` compares formats on a real model.

    jaxquant report                        # MiniLM, standard formats, 3 and 4 bits, B=64
    jaxquant report --model smollm2 --bits 4 --formats nf4 crd-t lloyd-max-signmax
    jaxquant report --model smollm2 --bits 3.5 4 --formats crd-t grid-ideal \
        --allocate flat fisher heuristic
    python -m jaxquant report --quick --out /tmp/report
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

MODELS = ("minilm", "smollm2")


class _Parser(argparse.ArgumentParser):
  """Reports bad arguments in one line (and exit status 2), without the usage block."""

  def error(self, message):
    self.exit(2, f"jaxquant: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxquant", description="Weight quantisation with optimal formats.")
  commands = parser.add_subparsers(dest="command", parser_class=_Parser)
  report = commands.add_parser(
      "report", help="compare formats on a real model (the default command)",
      description="Quantise a real model with every standard format at each bit width and "
      "report bits per parameter, weight error, the model metric and memory.")
  report.add_argument("--model", choices=MODELS, default="minilm",
                      help="all-MiniLM-L6-v2 (default) or SmolLM2-135M-Instruct")
  report.add_argument("--formats", nargs="+", metavar="NAME",
                      help="standard families (int-absmax, int-signmax, e2m1, nf4, sf4, "
                      "crd-normal, crd-laplace, crd-t, crd-t-signmax, lloyd-max, "
                      "lloyd-max-signmax), variable-length ones (grid-ideal, grid-huffman, "
                      "crd-t-outliers) or format names such as crd-t7-signmax-4b; default: "
                      "the standard families, and for smollm2 the variable-length ones too")
  report.add_argument("--bits", type=float, nargs="+", default=[3, 4], metavar="B",
                      help="average element bits, 2..8, fractional allowed (default: 3 4); "
                      "fixed-length formats give each layer whole bits that meet the average")
  report.add_argument("--allocate", nargs="+", choices=("flat", "heuristic", "fisher"),
                      default=["flat"], metavar="METHOD",
                      help="bit allocation across layers: flat (default), heuristic (+2 bits "
                      "for the first and last two layers) or fisher (smollm2 only: "
                      "log2 RMS + ½ log2 mean Fisher per layer); several compare them")
  report.add_argument("--block-size", type=int, default=64, metavar="B",
                      help="block size along the input axis (default 64)")
  report.add_argument("--out", type=pathlib.Path, default=pathlib.Path("jaxquant-report"),
                      help="folder for report.csv, report.json, report.png")
  report.add_argument("--quick", action="store_true",
                      help="fewer formats and less evaluation data (a fast smoke run)")
  return parser


def _check(args, parser):
  """Validates what argparse cannot, before any model is loaded."""
  from jaxquant.eval import report  # pylint: disable=import-outside-toplevel
  if any(not 2 <= bits <= 8 for bits in args.bits):
    parser.error(f"--bits {' '.join(f'{bits:g}' for bits in args.bits)}: each must be in 2..8")
  if "fisher" in args.allocate and args.model != "smollm2":
    parser.error(f"--allocate fisher needs a language model (--model smollm2), not {args.model}")
  if args.block_size < 1:
    parser.error(f"--block-size {args.block_size}: must be a positive int")
  for name in args.formats or ():
    try:
      report.choice_for(name)
    except ValueError:
      parser.error(f"--formats: unknown format {name!r}; standard families are "
                   f"{', '.join(report.STANDARD)}, or a name like nf4, int4, crd-t7-signmax-4b")
  try:
    args.out.mkdir(parents=True, exist_ok=True)
    probe = args.out / ".jaxquant-write-test"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    parser.error(f"--out {args.out}: cannot write there ({error.strerror or error})")


def main(argv=None) -> int:
  parser = _parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    argv = ["report"] + argv
  args = parser.parse_args(argv)
  _check(args, parser)
  from jaxquant.eval import report, tasks  # pylint: disable=import-outside-toplevel
  try:
    task = tasks.load_task(args.model, quick=args.quick)
  except tasks.ModelMissing as error:
    parser.exit(2, f"jaxquant: error: {error}\n")
  names = args.formats or (report.QUICK if args.quick else report.STANDARD)
  if not args.formats and args.model == "smollm2":
    names = names + report.VARIABLE
  start = time.perf_counter()
  rows = _run_with_progress(report, task, names, args)
  print(report.render(task, rows))
  written = report.write_outputs(task, rows, args.out, dict(
      bits=args.bits, block_size=args.block_size, quick=args.quick, allocate=args.allocate,
      seconds=time.perf_counter() - start))
  print(f"wrote {', '.join(written)} to {os.fspath(args.out)} "
        f"in {time.perf_counter() - start:.0f} s")
  return 0


def _run_with_progress(report, task, names, args):
  """Runs the report under a rich progress bar over layers × formats × bit widths."""
  from rich.progress import Progress  # pylint: disable=import-outside-toplevel
  layers = len(report.layer_paths(task))
  total = layers * len(names) * len(args.bits) * len(args.allocate)
  with Progress(transient=True) as progress:
    bar = progress.add_task(f"{task.name}", total=total)
    advance = lambda text: progress.update(bar, advance=1, description=text[:60])
    return report.run_report(task, names, args.bits, args.block_size, args.allocate,
                             progress=advance)


if __name__ == "__main__":
  sys.exit(main())
