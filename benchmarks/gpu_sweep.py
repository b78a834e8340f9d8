"""One sweep of the Pallas GPU kernel's configurations against baselines timed in the same run.

Shapes: M ∈ {1, 2, 4, 8, 16, 64, 256}; (K, N) ∈ {(4096, 4096), (8192, 8192), (8192, 28672),
(28672, 8192)}; 4-bit NF4 and 3-bit CRD-t signmax codes with B = 64, bfloat16 activations.

Configurations are *recipes*: a variant, a tile (block_n and K rows per step; block_m follows
M), warps, stages, a split-K strategy and a target number of programs, from which the split
count follows for each shape. The sweep times many recipes on the headline shapes (M = 1 and
M = 64 at K = N = 8192), then the best few of each variant, with the kernel's own default,
on every shape, highest priority first, until `--budget-s` is spent. Every configuration's
result is checked against dequantise-then-dot before it is timed; a wrong one is recorded
and never chosen.

Timing. A timed program runs the operation on enough distinct weight copies to stream about
256 MB, at least 2 and at most 16 copies (above the 50 MB L2 of an H100/H200, so the weights
come from HBM); the program
is launched `--per-group` times back to back (so host dispatch hides behind the GPU) and the
time per call is the median over `--groups` groups divided by the calls per group. Baselines
in the same run: XLA's bf16 dot, torch's bf16 ``F.linear`` (cuBLAS), torch's int4
``_weight_int4pack_mm`` (tinygemm, 4-bit, g = 64) where it exists, and jaxquant's
dequantise-then-dot. Torch is timed with CUDA events.

Writes into `--out`: ``gpu_sweep.json`` (every configuration tried, with its time or why it
failed), ``h200.json`` (one row per shape: the schema of ``benchmarks/results/h200.json``),
``gpu_tuning.json`` (the table for ``jaxquant/kernels/gpu_tuning.json``) and
``gpu_sweep.md`` (the table printed at the end).

    python benchmarks/gpu_sweep.py --out DIR            # on the GPU machine (benchmarks/gpu_sweep.sh)
    python benchmarks/gpu_sweep.py --out DIR --dry-run  # tiny sizes, Pallas interpreted (CPU)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import math
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant import kernels
from jaxquant.kernels import pallas_gpu

FORMATS = {4: "nf4", 3: "crd-t5-signmax-3b-B64"}
MS = (1, 2, 4, 8, 16, 64, 256)
SHAPES = ((4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192))
HEADLINE = ((1, 8192, 8192, "gemv"), (64, 8192, 8192, "gemm"))
STREAM_BYTES = 256 * 2**20
# At most this many weight copies per timed program (each is a kernel call XLA compiles).
MAX_COPIES = 16
GEMV_MAX_M = 16  # GEMV recipes are tried up to this M, GEMM recipes from GEMV_MAX_M / 2 on


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A kernel configuration independent of the shape (module docstring)."""

  variant: str
  block_n: int
  depth: int  # GEMV: packed units per K step; GEMM: block_k
  num_warps: int
  num_stages: int
  split: str
  programs: int  # split_k is chosen to reach about this many programs
  block_m: int = 16  # the GEMM's M tile (the GEMV's follows M)

  def block_sizes(self, m: int, k: int, n: int, bits: int) -> pallas_gpu.BlockSizes:
    v = 32 // math.gcd(bits, 32)
    if self.variant == "gemv":
      block_m = min(_pow2_at_least(m), GEMV_MAX_M)
      block_k = self.depth * v
    else:
      block_m, block_k = max(16, min(self.block_m, _pow2_at_least(m))), max(self.depth, v, 16)
    block_k = min(block_k, max(_pow2_at_least(k), v))
    block_n = min(self.block_n, _pow2_at_least(n))
    k_tiles = -(-k // block_k)
    tiles = -(-m // block_m) * -(-n // block_n)
    split_k = 1
    while split_k * 2 <= k_tiles and tiles * split_k * 2 <= self.programs:
      split_k *= 2
    return pallas_gpu.BlockSizes(block_m, block_n, block_k, split_k, self.num_warps,
                                 self.num_stages, self.split)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def gemv_recipes() -> list[Recipe]:
  """GEMV recipes, most promising first: 8-32 partial sums per thread, many programs."""
  recipes = []
  for programs, split in itertools.product((4096, 1024, 264), ("atomic", "slices")):
    for block_n, depth, warps in ((256, 8, 2), (512, 4, 2), (128, 16, 2), (256, 16, 4),
                                  (512, 8, 4), (128, 8, 1), (64, 16, 1), (1024, 4, 4)):
      for stages in (1, 3):
        recipes.append(Recipe("gemv", block_n, depth, warps, stages, split, programs))
  return recipes


def gemm_recipes() -> list[Recipe]:
  """GEMM recipes: tensor-core tiles with a decoded weight tile of at most 64 KiB."""
  recipes = []
  for (block_m, block_n, block_k), warps, stages, (split, programs) in itertools.product(
      ((64, 128, 128), (32, 128, 128), (16, 128, 256), (64, 64, 256), (128, 128, 64),
       (16, 256, 128)),
      (4, 8), (3, 2), (("slices", 264), ("atomic", 528), ("slices", 1))):
    recipes.append(Recipe("gemm", block_n, block_k, warps, stages, split, programs, block_m))
  return recipes


def interleave(*lists):
  """Items of `lists` taken in turn: a short budget samples every dimension of the grid."""
  return [item for group in itertools.zip_longest(*lists) for item in group if item is not None]


class Timer:
  """Seconds per call of jitted programs and torch callables, as the module docstring says."""

  def __init__(self, groups: int, per_group: int):
    self.groups, self.per_group = groups, per_group

  def jax(self, program, *args, calls: int) -> float:
    jax.block_until_ready(program(*args))
    times = []
    for _ in range(self.groups):
      start = time.perf_counter()
      outs = [program(*args) for _ in range(self.per_group)]
      jax.block_until_ready(outs)
      times.append((time.perf_counter() - start) / (self.per_group * calls))
    return float(np.median(times))

  def torch(self, op, inputs) -> float:
    import torch  # pylint: disable=import-outside-toplevel
    for x in inputs[:2]:
      op(x)
    times = []
    for _ in range(self.groups):
      begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      begin.record()
      for _ in range(self.per_group):
        for x in inputs:
          op(x)
      end.record()
      torch.cuda.synchronize()
      times.append(begin.elapsed_time(end) / 1e3 / (self.per_group * len(inputs)))
    return float(np.median(times))


def copies_for(nbytes: int, limit: int) -> int:
  return int(min(max(2, math.ceil(STREAM_BYTES / nbytes)), limit))


def distinct_copies(tree, copies: int):
  """`copies` pytrees like `tree`, each in its own device buffers (the same values)."""
  duplicate = jax.jit(lambda t: jax.tree_util.tree_map(lambda a: a + jnp.zeros((), a.dtype), t))
  return [tree] + [duplicate(tree) for _ in range(copies - 1)]


def torch_baselines(x, k: int, n: int, bits: int, copies: int, timer: Timer) -> dict:
  """torch's bf16 F.linear and, for 4 bits, tinygemm: µs per call, None where unavailable."""
  out = dict(torch_bf16_us=None, tinygemm_us=None)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    if not torch.cuda.is_available():
      return out
  except ImportError:
    return out
  xt = torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda", torch.bfloat16)
  dense = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
           for _ in range(copies_for(n * k * 2, MAX_COPIES))]
  out["torch_bf16_us"] = 1e6 * timer.torch(lambda w: torch.nn.functional.linear(xt, w), dense)
  del dense
  if bits == 4:
    try:
      codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
      packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
      packed = [torch.ops.aten._convert_weight_to_int4pack(packed_bytes, 8)
                for _ in range(copies)]
      scales_zeros = torch.randn(k // 64, n, 2, dtype=torch.bfloat16, device="cuda")
      out["tinygemm_us"] = 1e6 * timer.torch(
          lambda w: torch.ops.aten._weight_int4pack_mm(xt, w, 64, scales_zeros), packed)
    except (RuntimeError, AttributeError, TypeError) as error:
      print(f"tinygemm unavailable: {type(error).__name__}: {str(error)[:200]}", flush=True)
  return out


def sweep_case(m, k, n, bits, recipes, timer, *, interpret, copy_limit, workers):
  """Baselines and every recipe's kernel for one shape; a dict with all the times."""
  key_w, key_x = jax.random.split(jax.random.key(m * 7 + k + n + bits))
  w = jax.random.normal(key_w, (k, n), jnp.float32) * 0.02
  q = jq.quantise(w, jq.QuantSpec(FORMATS[bits], axis=0))
  x = jax.random.normal(key_x, (m, k), jnp.float32).astype(jnp.bfloat16)
  stored_bytes = q.storage_bits / 8
  copies = copies_for(int(stored_bytes), copy_limit)
  quantised = distinct_copies(q, copies)
  dense = distinct_copies(w.astype(jnp.bfloat16), copies_for(k * n * 2, copy_limit))
  del w
  reference = jnp.dot(x.astype(jnp.float32), jq.dequantise(q, jnp.float32))

  def over_copies(op):
    return jax.jit(lambda a, ws: [op(a, one) for one in ws])

  bf16_dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
  case = dict(m=m, k=k, n=n, bits=bits, format=FORMATS[bits], copies=copies,
              stored_bytes=stored_bytes, bits_per_param=q.bits_per_param)
  case["xla_bf16_us"] = 1e6 * timer.jax(over_copies(bf16_dot), x, dense, calls=len(dense))
  del dense
  case["dequant_dot_us"] = 1e6 * timer.jax(
      over_copies(lambda a, one: bf16_dot(a, jq.dequantise(one, jnp.bfloat16))), x, quantised,
      calls=copies)
  case.update(torch_baselines(x, k, n, bits, copies, timer) if not interpret else
              dict(torch_bf16_us=None, tinygemm_us=None))

  operands = [kernels.kernel_operands(x, one, "gpu")[1:] for one in quantised]
  x_padded = kernels.kernel_operands(x, q, "gpu")[0]
  configs = []
  for recipe in recipes:
    sizes = recipe.block_sizes(m, k, n, bits)
    try:
      pallas_gpu.validate_block_sizes(sizes, recipe.variant, bits, m, n)
    except ValueError:
      continue
    entry = dict(variant=recipe.variant, block_sizes=dataclasses.asdict(sizes))
    if entry not in configs:
      configs.append(entry)
  default_variant, default_sizes = pallas_gpu.chosen_block_sizes(None, m, k, n, bits, x.dtype)
  default = dict(variant=default_variant, block_sizes=dataclasses.asdict(default_sizes))
  if default not in configs:
    configs.insert(0, default)

  def program(config):
    sizes = pallas_gpu.BlockSizes(**config["block_sizes"])
    call = lambda a, ops: pallas_gpu.qmatmul_pallas_gpu(
        a, *ops, bits=q.bits, block_size=q.block_size, block_sizes=sizes,
        variant=config["variant"], interpret=interpret)
    return over_copies(call).lower(x_padded, operands).compile()

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    compiled = list(pool.map(lambda c: _attempt(program, c), configs))
  tried = []
  for config, (executable, error) in zip(configs, compiled, strict=True):
    row = dict(config, default=config == default)
    if executable is not None:
      y = executable(x_padded, operands)[0]  # every copy holds the same weight
      scale = float(jnp.max(jnp.abs(reference)))
      row["relative_error"] = float(jnp.max(jnp.abs(y - reference))) / scale
      if row["relative_error"] > 2e-2:
        error = f"wrong result: relative error {row['relative_error']:.3g}"
      else:
        row["kernel_us"] = 1e6 * timer.jax(executable, x_padded, operands, calls=copies)
    if error is not None:
      row["error"] = error
    tried.append(row)
  case["tried"] = tried
  timed = [row for row in tried if "kernel_us" in row]
  case["best"] = min(timed, key=lambda row: row["kernel_us"]) if timed else None
  return case


def _attempt(build, config):
  try:
    return build(config), None
  except Exception as error:  # pylint: disable=broad-except  # recorded, never chosen
    return None, f"{type(error).__name__}: {str(error)[:300]}"


def ranked(cases, variant: str, count: int) -> list[Recipe]:
  """The `count` recipes of `variant` that were fastest on the headline cases."""
  best = {}
  for case in cases:
    for row in case["tried"]:
      if row["variant"] == variant and "kernel_us" in row and "recipe" in row:
        recipe = Recipe(**row["recipe"])
        best[recipe] = min(best.get(recipe, math.inf), row["kernel_us"])
  return sorted(best, key=best.get)[:count]


def tag_recipes(case, recipes, bits):
  """Records in each tried row the recipe that produced it (for `ranked`)."""
  for row in case["tried"]:
    for recipe in recipes:
      sizes = recipe.block_sizes(case["m"], case["k"], case["n"], bits)
      if row["variant"] == recipe.variant and row["block_sizes"] == dataclasses.asdict(sizes):
        row["recipe"] = dataclasses.asdict(recipe)
        break


def summary_row(case, date: str, device: str) -> dict:
  """One row of benchmarks/results/h200.json."""
  best = case["best"]
  kernel_us = None if best is None else best["kernel_us"]
  return dict(date=date, device=device, m=case["m"], k=case["k"], n=case["n"],
              bits=case["bits"], kernel_us=kernel_us, xla_bf16_us=case["xla_bf16_us"],
              torch_bf16_us=case["torch_bf16_us"], tinygemm_us=case["tinygemm_us"],
              dequant_dot_us=case["dequant_dot_us"],
              weight_gbps=None if kernel_us is None else case["stored_bytes"] / kernel_us / 1e3,
              config=None if best is None else dict(variant=best["variant"],
                                                    **best["block_sizes"]))


def markdown(rows) -> str:
  def cell(value, fmt="{:.1f}"):
    return "—" if value is None else fmt.format(value)
  lines = ["| M | K | N | bits | kernel µs | XLA bf16 µs | torch bf16 µs | tinygemm µs | "
           "deq+dot µs | vs best bf16 | GB/s | config |", "|" + "---|" * 12]
  for r in rows:
    bf16 = min(t for t in (r["xla_bf16_us"], r["torch_bf16_us"]) if t is not None)
    speedup = None if r["kernel_us"] is None else bf16 / r["kernel_us"]
    c = r["config"]
    config = "—" if c is None else (
        f"{c['variant']} {c['block_m']}×{c['block_n']}×{c['block_k']} s{c['split_k']} "
        f"{c['split']} w{c['num_warps']} st{c['num_stages']}")
    lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['bits']} | {cell(r['kernel_us'])} | "
                 f"{cell(r['xla_bf16_us'])} | {cell(r['torch_bf16_us'])} | "
                 f"{cell(r['tinygemm_us'])} | {cell(r['dequant_dot_us'])} | "
                 f"{cell(speedup, '{:.2f}×')} | {cell(r['weight_gbps'], '{:.0f}')} | {config} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny sizes and few configurations, Pallas interpreted (any CPU)")
  parser.add_argument("--budget-s", type=float, default=240.0,
                      help="stop starting new shapes after this many seconds")
  parser.add_argument("--groups", type=int, default=5)
  parser.add_argument("--per-group", type=int, default=10)
  parser.add_argument("--workers", type=int, default=8, help="threads compiling configurations")
  args = parser.parse_args(argv)
  warnings.filterwarnings("ignore", message=".*Mosaic GPU backend.*", category=DeprecationWarning)
  start = time.perf_counter()
  interpret = args.dry_run or jax.default_backend() != "gpu"
  if args.dry_run:
    # M = 2 is not a headline shape: it runs the best recipes of the headline ones.
    ms, shapes, headline = (1, 2, 16), ((256, 128),), ((1, 256, 128, "gemv"),
                                                      (16, 256, 128, "gemm"))
    gemv, gemm, top, copy_limit = gemv_recipes()[::16][:2], gemm_recipes()[::12][:2], 1, 2
    timer = Timer(1, 1)
  else:
    ms, shapes, headline = MS, SHAPES, HEADLINE
    gemv, gemm, top, copy_limit = interleave(gemv_recipes()), gemm_recipes(), 4, MAX_COPIES
    timer = Timer(args.groups, args.per_group)
  device = str(jax.devices()[0].device_kind)
  date = datetime.date.today().isoformat()
  cases, done = [], set()

  def run(m, k, n, bits, recipes):
    case = sweep_case(m, k, n, bits, recipes, timer, interpret=interpret,
                      copy_limit=copy_limit, workers=args.workers)
    tag_recipes(case, recipes, bits)
    cases.append(case)
    done.add((m, k, n, bits))
    best = case["best"]
    print(f"M={m} K={k} N={n} bits={bits}: {len(case['tried'])} configs, best "
          f"{'—' if best is None else round(best['kernel_us'], 1)} µs, xla bf16 "
          f"{case['xla_bf16_us']:.1f} µs, deq+dot {case['dequant_dot_us']:.1f} µs "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)

  for (m, k, n, variant), bits in itertools.product(headline, sorted(FORMATS, reverse=True)):
    run(m, k, n, bits, gemv if variant == "gemv" else gemm)
  queue = [(m, k, n, bits) for (k, n), bits, m in itertools.product(shapes, (4, 3), ms)]
  queue.sort(key=lambda c: (c[1] * c[2] != 8192 * 8192, c[0] > 1, c))
  skipped = []
  for m, k, n, bits in queue:
    if (m, k, n, bits) in done:
      continue
    if time.perf_counter() - start > args.budget_s:
      skipped.append(dict(m=m, k=k, n=n, bits=bits))
      continue
    recipes = ((ranked(cases, "gemv", top) if m <= GEMV_MAX_M else []) +
               (ranked(cases, "gemm", top) if m >= GEMV_MAX_M // 2 else []))
    run(m, k, n, bits, recipes)

  rows = [summary_row(case, date, device) for case in cases]
  rows.sort(key=lambda r: (r["k"], r["n"], -r["bits"], r["m"]))
  chosen = [dict(m=c["m"], k=c["k"], n=c["n"], bits=c["bits"], variant=c["best"]["variant"],
                 block_sizes=c["best"]["block_sizes"]) for c in cases if c["best"] is not None]
  dispatch = [dict(m=r["m"], k=r["k"], n=r["n"], bits=r["bits"], kernel_us=r["kernel_us"],
                   dequant_dot_us=r["dequant_dot_us"]) for r in rows if r["kernel_us"]]
  source = (f"benchmarks/gpu_sweep.py on {device}, jax {jax.__version__}: bf16 activations, "
            f"B = 64, about {STREAM_BYTES >> 20} MB of weight copies per timed program, "
            f"median of {timer.groups} groups of {timer.per_group} programs")
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "gpu_sweep.json").write_text(json.dumps(
      dict(device=device, date=date, jax=jax.__version__, dry_run=args.dry_run,
           seconds=time.perf_counter() - start, skipped=skipped, cases=cases), indent=1))
  (args.out / "h200.json").write_text(json.dumps(rows, indent=1))
  (args.out / "gpu_tuning.json").write_text(json.dumps(
      dict(device=device, date=date, source=source, configs=chosen, dispatch=dispatch),
      indent=1))
  table = markdown(rows)
  (args.out / "gpu_sweep.md").write_text(f"{source}\n\n{table}")
  print(f"{source}; {len(skipped)} shapes skipped for time\n\n{table}", flush=True)
  return rows


if __name__ == "__main__":
  main()
