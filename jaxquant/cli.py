"""The `jaxquant` command: `jaxquant report` compares formats on a real model.

    jaxquant report                        # MiniLM, standard formats, 3 and 4 bits, B=64
    jaxquant report --model smollm2 --bits 4 --formats nf4 crd-t lloyd-max-signmax
    jaxquant report --model smollm2 --bits 3.5 4 --formats crd-t grid-ideal \
        --allocate flat fisher heuristic
    python -m jaxquant report --quick --out /tmp/report
    jaxquant report --model smollm2 --bits 3 4 --formats nf4 int-signmax --method rtn gptq

`jaxquant quantise` writes one quantised model as a checkpoint:

    jaxquant quantise --model smollm2 --format int-signmax --bits 3 --method gptq --out q3
    jaxquant quantise --model minilm --format nf4 --bits 4 --method rtn --out nf4 \
        --export-dequantised nf4/weights.safetensors
    jaxquant quantise --model smollm2 --format nf4 --bits 4 --method rtn --entropy-coded
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
                      "lloyd-max-signmax), variable-length ones (grid-ideal, grid-rans, "
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
  report.add_argument("--method", nargs="+", choices=("rtn", "gptq"), default=["rtn"],
                      metavar="METHOD",
                      help="rounding: rtn (round to nearest, default) and/or gptq (error-"
                      "compensating, in act order, calibrated on text apart from the "
                      "evaluation text); fixed-length formats only")
  quantise = commands.add_parser(
      "quantise", help="quantise a real model with one format into a checkpoint",
      description="Quantise a real model's Linear layers with one format, by round-to-"
      "nearest or GPTQ, write a jaxquant checkpoint and print its size and metric.")
  quantise.add_argument("--model", choices=MODELS, default="smollm2",
                        help="smollm2 (default) or minilm")
  quantise.add_argument("--format", default="int-signmax", metavar="NAME",
                        help="a fixed-length family of the report (nf4, int-signmax, "
                        "crd-t-signmax, lloyd-max-signmax, ...) or a format name such as int4; "
                        "default int-signmax")
  quantise.add_argument("--bits", type=int, default=4, metavar="B",
                        help="element bits, 2..8 (default 4)")
  quantise.add_argument("--method", choices=("rtn", "gptq"), default="gptq",
                        help="gptq (default) or rtn (round to nearest)")
  quantise.add_argument("--block-size", type=int, default=64, metavar="B",
                        help="block size along the input axis (default 64)")
  quantise.add_argument("--calibration-file", type=pathlib.Path, metavar="F",
                        help="UTF-8 text to calibrate GPTQ on (default: built-in text that is "
                        "not the evaluation text)")
  quantise.add_argument("--calibration-tokens", type=int, metavar="N",
                        help="calibration tokens (default 4096 for smollm2; minilm: 8192)")
  quantise.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQ in activation order (default: on)")
  quantise.add_argument("--damping", type=float, default=0.01,
                        help="GPTQ damping, a fraction of mean(diag H) (default 0.01)")
  quantise.add_argument("--entropy-coded", action="store_true",
                        help="store the codes rANS-coded in the checkpoint (smaller; decoded "
                        "when restored)")
  quantise.add_argument("--out", type=pathlib.Path, default=pathlib.Path("jaxquant-quantised"),
                        help="folder for the checkpoint and quantise.json")
  quantise.add_argument("--export-dequantised", type=pathlib.Path, metavar="FILE",
                        help="also write every quantised weight dequantised to float32 "
                        "(a .safetensors file), under the model file's tensor names")
  return parser


def _writable(parser, flag: str, folder: pathlib.Path) -> None:
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".jaxquant-write-test"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    parser.error(f"{flag} {folder}: cannot write there ({error.strerror or error})")


def _check_quantise(args, parser):
  """Validates `jaxquant quantise`'s arguments before any model is loaded."""
  from jaxquant.eval import report  # pylint: disable=import-outside-toplevel
  if not 2 <= args.bits <= 8:
    parser.error(f"--bits {args.bits}: must be in 2..8")
  if args.block_size < 1:
    parser.error(f"--block-size {args.block_size}: must be a positive int")
  try:
    choice = report.choice_for(args.format)
  except ValueError:
    parser.error(f"--format: unknown format {args.format!r}; families are "
                 f"{', '.join(report.STANDARD)}, or a name like nf4, int4, crd-t7-signmax-4b")
  if choice.spec_for is None:
    parser.error(f"--format {args.format}: variable-length formats are not packed; use "
                 "jaxquant report for them")
  if args.method == "rtn" and (args.calibration_file or args.calibration_tokens):
    parser.error("--calibration-file and --calibration-tokens need --method gptq")
  if args.calibration_tokens is not None and args.calibration_tokens < 1:
    parser.error(f"--calibration-tokens {args.calibration_tokens}: must be a positive int")
  if not args.damping >= 0:
    parser.error(f"--damping {args.damping}: must be >= 0")
  if args.calibration_file is not None:
    try:
      if not args.calibration_file.read_text(encoding="utf-8").strip():
        parser.error(f"--calibration-file {args.calibration_file}: the file is empty")
    except (OSError, UnicodeDecodeError) as error:
      parser.error(f"--calibration-file {args.calibration_file}: cannot read it as UTF-8 "
                   f"text ({getattr(error, 'strerror', None) or error})")
  if args.export_dequantised is not None:
    if args.export_dequantised.suffix != ".safetensors":
      parser.error(f"--export-dequantised {args.export_dequantised}: the file must end in "
                   ".safetensors")
    _writable(parser, "--export-dequantised", args.export_dequantised.parent)
  _writable(parser, "--out", args.out)


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
  _writable(parser, "--out", args.out)


def main(argv=None) -> int:
  parser = _parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    argv = ["report"] + argv
  args = parser.parse_args(argv)
  if args.command == "quantise":
    _check_quantise(args, parser)
  else:
    _check(args, parser)
  from jaxquant.eval import report, tasks  # pylint: disable=import-outside-toplevel
  try:
    task = tasks.load_task(args.model, quick=getattr(args, "quick", False))
  except tasks.ModelMissing as error:
    parser.exit(2, f"jaxquant: error: {error}\n")
  if args.command == "quantise":
    return _quantise(task, args)
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
                             progress=advance, methods=args.method)


def _quantise(task, args) -> int:
  """`jaxquant quantise`: quantise, save, report (and export)."""
  from jaxquant.eval import quantise  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  settings = quantise.Settings(
      model=args.model, format=args.format, bits=args.bits, method=args.method,
      block_size=args.block_size, calibration_tokens=args.calibration_tokens,
      act_order=args.act_order, damping=args.damping, entropy_coded=args.entropy_coded)
  text = (args.calibration_file.read_text(encoding="utf-8") if args.calibration_file
          else None)
  try:
    model, outcome = quantise.quantise(task, settings, text, progress=print)
  except ValueError as error:  # e.g. a calibration file too short for the tokens asked for
    print(f"jaxquant: error: {error}", file=sys.stderr)
    return 2
  quantise.save(model, settings, outcome, args.out)
  on_disk = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
  order = " in act order" if args.act_order and args.method == "gptq" else ""
  scores = ", ".join(f"{name} {value:.4g}" for name, value in outcome.scores.items()
                     if name != outcome.metric)
  print(f"{task.name}: {args.format} {args.bits}-bit, block {args.block_size}, "
        f"{args.method}{order}: {outcome.layers} layers")
  coded = " entropy-coded" if args.entropy_coded else ""
  print(f"bits per parameter {outcome.bits_per_param:.3f} · quantised layers "
        f"{outcome.quantised_mib:.2f} MiB on device · checkpoint{coded} "
        f"{on_disk / 2**20:.1f} MiB (with the layers kept in float)")
  print(f"{outcome.metric} {outcome.scores[outcome.metric]:.5f} ({scores}) on the report's "
        "evaluation data")
  if args.export_dequantised is not None:
    count = quantise.export_dequantised(model, task, task.tensor_name, args.export_dequantised)
    print(f"wrote {count} dequantised float32 tensors to {os.fspath(args.export_dequantised)}")
  print(f"wrote {os.fspath(args.out)} in {time.perf_counter() - start:.0f} s (quantisation "
        f"{outcome.seconds:.0f} s); load it with "
        f"jaxquant.eval.quantise.restore({os.fspath(args.out)!r})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
