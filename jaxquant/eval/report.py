"""The format report: every standard format on a real model, at each bit width.

For each format, bit width and bit allocation the float model's selected Linear layers are
quantised (formats fitted per tensor where the format is fitted: the Student-t ν of CRD-t,
Lloyd–Max codebooks, the step of an entropy-coded grid), and the report records

- bits per parameter over the quantised layers: codes plus scales for fixed-length formats;
  the coded size (ideal coder or rANS, with scales, code table and checks) for entropy-coded
  grids, plus 48 bits per sparse outlier where a grid of 255 points cannot spend the bits;
  the dense part plus 48 bits per outlier for CRD-t with sparse outliers;
- the mean weight error R = ‖ŵ − w‖/‖w‖, averaged over layers weighted by their size;
- the model metric (MiniLM: 1 − cosine between float and quantised sentence embeddings;
  SmolLM2: top-128 next-token KL to the float model, in nats);
- the on-device bytes of the weights as held for inference (`on_device_size_in_bytes`).

Fixed-length families run through `jaxquant.nnx.quantise_model` (QLinear, the packed
contraction); formats of one bit width share one compiled forward (no format is static
metadata).
Variable-length ones (Orr et al. 2025, §4 items 8–9) hold each weight as a decoded
`QuantisedArray`, plus the sparse outliers where there are any, and the model runs on their
reconstruction. A bit allocation (`flat`, `heuristic` or `fisher`, Orr et al. 2025 §5) gives
each layer its own element bits around the requested average (`jaxquant.eval.allocation`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq
from jaxquant import entropy, outliers
from jaxquant import formats as formats_lib
from jaxquant.eval import allocation

STANDARD = ("int-absmax", "int-signmax", "e2m1", "nf4", "sf4", "crd-normal", "crd-laplace",
            "crd-t", "crd-t-signmax", "lloyd-max", "lloyd-max-signmax")
QUICK = ("int-absmax", "nf4", "crd-t", "crd-t-signmax", "lloyd-max-signmax")
VARIABLE = ("grid-ideal", "grid-rans", "crd-t-outliers")
ALLOCATIONS = ("flat", "heuristic", "fisher")
METHODS = ("rtn", "gptq")  # round to nearest, or GPTQ against the task's calibration
OUTLIER_FRACTION = 2.0**-10


class Stored(NamedTuple):
  """One weight as a variable-length family stores it."""
  reconstruction: jax.Array  # ŵ, float32
  storage_bits: float  # the stored size (coded codes, scales, tables, outliers)
  device_bytes: int  # what inference holds: the decoded QuantisedArray (+ outliers)


@dataclasses.dataclass(frozen=True)
class FormatChoice:
  """A format family of the report: how to store one weight (kernel [in, out]) at some bits.

  Fixed-length families give `spec_for(w, bits, B) -> QuantSpec | None` (None: no format at
  that width); variable-length ones give `encode(w, bits, B) -> Stored`, with `integer_bits`
  False where a tensor's bits may be fractional (the entropy-coded grid).
  """
  label: str
  spec_for: Callable[[jax.Array, int, int], jq.QuantSpec | None] | None = None
  encode: Callable[[jax.Array, float, int], Stored] | None = None
  integer_bits: bool = True


def _fixed(builder, scaling="absmax", only_bits=None):
  def spec_for(w, bits, block_size):
    del w
    if only_bits is not None and bits != only_bits:
      return None
    return jq.QuantSpec(builder(bits, block_size), block_size=block_size, scaling=scaling,
                        axis=0)
  return spec_for


def _fp(bits, block_size):
  del block_size
  return formats_lib.fp_format(2, bits - 3)  # E2M1 at 4 bits, E2M0 at 3


def _fitted_t(scaling):
  def spec_for(w, bits, block_size):
    fmt = jq.fitting.fit_crd_t(w, bits, scaling=scaling, block_size=block_size, axis=0)
    return jq.QuantSpec(fmt, axis=0)
  return spec_for


def _lloyd(scaling):
  def spec_for(w, bits, block_size):
    fmt = jq.fitting.fit_lloyd_max(w, bits, scaling=scaling, block_size=block_size, axis=0)
    return jq.QuantSpec(fmt, axis=0)
  return spec_for


def _crd(family):
  return _fixed(lambda bits, block_size: formats_lib.crd_format(
      family, bits, scaling="absmax", block_size=block_size))


CHOICES = {
    "int-absmax": FormatChoice("INT absmax", _fixed(lambda b, _: formats_lib.int_format(b))),
    "int-signmax": FormatChoice("INT signmax",
                                _fixed(lambda b, _: formats_lib.int_format(b), "signmax")),
    "e2m1": FormatChoice("E2M1 (FP4) / E2M0", _fixed(_fp)),
    "nf4": FormatChoice("NF4", _fixed(lambda b, _: formats_lib.nf4(), only_bits=4)),
    "sf4": FormatChoice("SF4", _fixed(lambda b, _: formats_lib.sf4(), only_bits=4)),
    "crd-normal": FormatChoice("CRD normal", _crd("normal")),
    "crd-laplace": FormatChoice("CRD laplace", _crd("laplace")),
    "crd-t": FormatChoice("CRD t (ν fit)", _fitted_t("absmax")),
    "crd-t-signmax": FormatChoice("CRD t (ν fit) signmax", _fitted_t("signmax")),
    "lloyd-max": FormatChoice("Lloyd–Max", _lloyd("absmax")),
    "lloyd-max-signmax": FormatChoice("Lloyd–Max signmax", _lloyd("signmax")),
}


def _device_bytes(tree) -> int:
  return sum(leaf.on_device_size_in_bytes() for leaf in jax.tree.leaves(tree))


def _entropy_grid(coder):
  """Tensor RMS + an odd uniform grid, with sparse outliers where 255 points cannot spend the
  bits (`fit_grid_with_outliers`), whose ideal-coded size meets the bits; `coder` sizes the
  dense codes, the outliers cost 48 bits each."""
  def encode(w, bits, block_size):
    del block_size
    _, spec = jq.fitting.fit_grid_with_outliers(w, bits, axis=0)
    oq = outliers.quantise_with_outliers(w, spec)
    size = (entropy.coded_size(oq.dense)[f"{coder}_bits_per_param"] * oq.size
            + oq.storage_bits - oq.dense.storage_bits)
    return Stored(oq.dequantise(jnp.float32), size, _device_bytes(oq))
  return encode


def _crd_t_outliers(w, bits, block_size):
  """Tensor RMS CRD-t fitted on the tensor without its 2^-10 largest magnitudes, kept in bf16."""
  del block_size
  def spec_for(remainder):
    fmt = jq.fitting.fit_crd_t(remainder, int(bits), scaling="rms", block_size="tensor", axis=0)
    return jq.QuantSpec(fmt, block_size="tensor", axis=0)
  oq = outliers.quantise_with_outliers(w, spec_for, OUTLIER_FRACTION)
  return Stored(oq.dequantise(jnp.float32), oq.storage_bits, _device_bytes(oq))


CHOICES.update({
    "grid-ideal": FormatChoice("tensor RMS + ideal coding", encode=_entropy_grid("ideal"),
                               integer_bits=False),
    "grid-rans": FormatChoice("tensor RMS + rANS", encode=_entropy_grid("rans"),
                                 integer_bits=False),
    "crd-t-outliers": FormatChoice("tensor RMS CRD-t + 0.1% outliers", encode=_crd_t_outliers),
})


def choice_for(name: str) -> FormatChoice:
  """A standard family by key, or any format name `jaxquant.formats.parse` accepts."""
  if name in CHOICES:
    return CHOICES[name]
  fmt = formats_lib.parse(name)  # raises ValueError for unknown names

  def spec_for(w, bits, block_size):
    del w
    if fmt.bits != bits:
      return None
    return jq.QuantSpec(fmt, block_size=fmt.block_size or block_size, axis=0)
  return FormatChoice(fmt.name, spec_for)


@dataclasses.dataclass
class Task:
  """A model and its metric. `score(model) -> {metric: value}`; lower `metric` is better."""
  name: str
  model: nnx.Module
  layers: str  # regex over layer paths: the layers the report quantises
  metric: str
  score: Callable[[nnx.Module], dict]
  note: str = ""
  fisher: Callable[[], dict[str, float]] | None = None  # layer path -> mean diagonal Fisher
  # Calibration batches for `model(*batch)` from a text (None: the default calibration text,
  # never the evaluation data) with about n tokens: calibration(text, n).
  calibration: Callable[[str | None, int], list] | None = None
  calibration_tokens: int = 4096  # the default n
  # Kernel path -> (the model file's tensor name, whether its array is the kernel transposed).
  tensor_name: Callable[[str], tuple[str, bool]] | None = None


@dataclasses.dataclass
class Row:
  format: str
  method: str
  allocation: str
  bits: float  # the requested average element bits
  bits_per_param: float
  weight_r: float
  metric: float
  extra: dict
  quantised_mib: float
  seconds: float
  best: bool = False


def layer_paths(task: Task) -> list[str]:
  """The paths of the Linear layers the report quantises."""
  return list(kernels_of(task.model, task.layers))


def second_moments(task: Task, text: str | None = None, n_tokens: int | None = None) -> dict:
  """Kernel path → `jaxquant.calibration.SecondMoment` of the inputs of every layer the
  report quantises, over the task's calibration batches (`Task.calibration`)."""
  if task.calibration is None:
    raise ValueError(f"{task.name} has no calibration data for GPTQ")
  batches = task.calibration(text, n_tokens or task.calibration_tokens)
  rules = [jq.Rule(task.layers, jq.QuantSpec("int4"))]  # selects the layers; spec unused
  return jq.nnx.calibrate(task.model, batches, rules)


def kernels_of(model, pattern) -> dict[str, jax.Array]:
  """Layer path → kernel of every `nnx.Linear` whose path fully matches `pattern`."""
  kernels = {}
  for path, module in nnx.iter_modules(model):
    name = "/".join(str(p) for p in path)
    if isinstance(module, nnx.Linear) and re.fullmatch(pattern, name):
      kernels[name] = module.kernel[...]
  return kernels


def bits_per_layer(task: Task, kernels: dict[str, jax.Array], method: str, average_bits: float,
                   *, integer: bool) -> dict[str, float]:
  """Element bits per layer for `method` in `ALLOCATIONS`, averaging `average_bits`.

  flat: every layer the same (with whole bits, floors and ceilings that meet the average);
  heuristic: 2 bits more for the first and last two layers than for the rest; fisher:
  b_t = c + log2 RMS_t + ½ log2 f̄_t (Orr et al. 2025, §5). All within 2..8 bits.
  """
  paths = list(kernels)
  if method == "flat":
    offsets = {path: 0.0 for path in paths}
  elif method == "heuristic":
    offsets = allocation.heuristic_offsets(paths, allocation.boosted_layers(paths))
  elif method == "fisher":
    if task.fisher is None:
      raise ValueError(f"allocation 'fisher' needs a language model; {task.name} has no Fisher")
    rms = {path: float(jnp.sqrt(jnp.mean(jnp.square(w.astype(jnp.float32)))))
           for path, w in kernels.items()}
    fisher_means = task.fisher()  # may hold layers the report leaves in float (embeddings)
    offsets = allocation.fisher_offsets(rms, {path: fisher_means[path] for path in kernels})
  else:
    raise ValueError(f"{method=} is not one of {ALLOCATIONS}")
  sizes = {path: int(w.size) for path, w in kernels.items()}
  return allocation.distribute(offsets, sizes, average_bits, integer=integer)


def run_report(task: Task, format_names: Sequence[str], bits_list: Sequence[float],
               block_size: int, allocations: Sequence[str] = ("flat",),
               progress=None, methods: Sequence[str] = ("rtn",)) -> list[Row]:
  """Quantises `task.model` with every format, average bit width, allocation and rounding
  method (`METHODS`; GPTQ applies to fixed-length families, with act order); the rows."""
  graphdef, state = nnx.split(task.model)
  kernels = kernels_of(task.model, task.layers)
  if not kernels:
    raise ValueError(f"no Linear layer of {task.name} matches {task.layers!r}")
  if any(method not in METHODS for method in methods):
    raise ValueError(f"{methods=}: each must be one of {METHODS}")
  choices = [choice_for(name) for name in format_names]
  moments = second_moments(task) if "gptq" in methods else None
  rows = []
  for allocation_method in allocations:
    for bits in bits_list:
      for choice, method in ((c, m) for c in choices for m in methods):
        if method == "gptq" and choice.encode is not None:
          continue  # variable-length families are stored apart from the packed layout
        start = time.perf_counter()
        layer_bits = bits_per_layer(task, kernels, allocation_method, bits,
                                    integer=choice.integer_bits)
        model = nnx.merge(graphdef, state)
        if choice.encode is None:
          measured = quantise_fixed(model, kernels, choice, layer_bits, block_size, progress,
                                    moments if method == "gptq" else None)
        else:
          measured = _store_variable(model, kernels, choice, layer_bits, block_size, progress)
        if measured is None:
          continue  # the family has no format at some width (NF4/SF4 are 4-bit only)
        model, storage, errors, device_bytes = measured
        sizes = [w.size for w in kernels.values()]
        scores = task.score(model)
        if task.fisher is not None:
          scores["predicted KL"] = _predicted_kl(task.fisher(), kernels, errors)
        rows.append(Row(
            format=choice.label, method=method, allocation=allocation_method, bits=bits,
            bits_per_param=storage / sum(sizes),
            weight_r=sum(e * s for e, s in zip(errors, sizes)) / sum(sizes),
            metric=float(scores[task.metric]), extra={k: float(v) for k, v in scores.items()},
            quantised_mib=device_bytes / 2**20, seconds=time.perf_counter() - start))
  for allocation_method in allocations:
    for bits in bits_list:
      group = [row for row in rows if row.bits == bits and row.allocation == allocation_method]
      if group:
        min(group, key=lambda row: row.metric).best = True
  return rows


def _predicted_kl(fisher_means, kernels, errors) -> float:
  """½ Σ_t f̄_t ‖δθ_t‖² (Orr et al. 2025, §5), with ‖δθ_t‖ = R_t ‖w_t‖."""
  squared = {path: (error * float(jnp.linalg.norm(w.astype(jnp.float32))))**2
             for (path, w), error in zip(kernels.items(), errors)}
  return 0.5 * sum(fisher_means[path] * squared[path] for path in kernels)


def layer(model, path: str):
  """The submodule of `model` at the '/'-joined `path` (``layers/3/mlp/up``)."""
  module = model
  for part in path.split("/"):
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def quantise_fixed(model, kernels, choice, layer_bits, block_size, progress=None,
                   calibration=None):
  """`model` quantised through `quantise_model` (by GPTQ with `calibration`, kernel path →
  `SecondMoment`, in act order): (model, storage bits, errors, bytes), or None when the
  family has no format at some layer's bits."""
  specs = {}
  for path, w in kernels.items():
    if progress is not None:
      progress(f"{choice.label} ({layer_bits[path]} b): {path}")
    spec = choice.spec_for(w, int(layer_bits[path]), block_size)
    if spec is None:
      return None
    specs[path] = spec
  model = jq.nnx.quantise_model(
      model, [jq.Rule(re.escape(path), spec) for path, spec in specs.items()],
      calibration=calibration, act_order=True)
  storage, errors = 0, []
  for path in kernels:
    q = layer(model, path).kernel.get_value()
    errors.append(float(jq.metrics.relative_rmse(kernels[path], q.dequantise())))
    storage += q.storage_bits
  return model, storage, errors, jq.nnx.quantised_bytes(model)


def _store_variable(model, kernels, choice, layer_bits, block_size, progress):
  """`model` with its kernels set to their stored reconstructions, in place: (model, storage
  bits, errors, bytes)."""
  storage, errors, device_bytes = 0.0, [], 0
  for path, w in kernels.items():
    if progress is not None:
      progress(f"{choice.label} ({layer_bits[path]:.3g} b): {path}")
    stored = choice.encode(w, layer_bits[path], block_size)
    errors.append(float(jq.metrics.relative_rmse(w, stored.reconstruction)))
    storage += stored.storage_bits
    device_bytes += stored.device_bytes
    # A new Param: the merged model shares its Variables with the float state of the report.
    layer(model, path).kernel = nnx.Param(stored.reconstruction.astype(w.dtype))
  return model, storage, errors, device_bytes


def render(task: Task, rows: Sequence[Row]) -> str:
  """The rows as a text table, with a method column when a row is not round-to-nearest, an
  allocation column when a row is not flat and the predicted KL ½ Σ f̄_t ‖δθ_t‖² when the
  task has a Fisher."""
  show = any(row.allocation != "flat" for row in rows)
  methods = any(row.method != "rtn" for row in rows)
  predicted = all("predicted KL" in row.extra for row in rows) and bool(rows)
  header = (f"{'format':<33}" + (f"{'method':<7}" if methods else "") +
            (f"{'allocation':<11}" if show else "") +
            f"{'bits':>5}{'b/param':>9}{'weight R':>10}{task.metric:>14}" +
            (f"{'predicted':>11}" if predicted else "") + f"{'MiB':>8}")
  lines = [f"{task.name}: {task.metric} (lower is better; * = best at its bits"
           f"{' and allocation' if show else ''})", header]
  for row in rows:
    mark = "*" if row.best else " "
    lines.append(f"{row.format:<33}" + (f"{row.method:<7}" if methods else "") +
                 (f"{row.allocation:<11}" if show else "") +
                 f"{row.bits:>5g}{row.bits_per_param:>9.3f}{row.weight_r:>10.4f}"
                 f"{row.metric:>13.5f}{mark}" +
                 (f"{row.extra['predicted KL']:>11.5f}" if predicted else "") +
                 f"{row.quantised_mib:>8.2f}")
  if predicted:
    lines.append("predicted: ½ Σ_t f̄_t ‖ŵ_t − w_t‖², from the mean diagonal Fisher f̄_t of each "
                 "layer (Orr et al. 2025, §5)")
  if task.note:
    lines.append(task.note)
  return "\n".join(lines)


def write_outputs(task: Task, rows: Sequence[Row], out: pathlib.Path, meta: dict) -> list[str]:
  """report.csv, report.json and (with matplotlib) report.png in `out`; returns the names."""
  out.mkdir(parents=True, exist_ok=True)
  fields = ["format", "method", "allocation", "bits", "bits_per_param", "weight_r", "metric",
            "quantised_mib", "seconds", "best"]
  with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(fields[:6] + [task.metric] + fields[7:])
    for row in rows:
      writer.writerow([getattr(row, field) for field in fields])
  (out / "report.json").write_text(json.dumps(
      dict(meta, model=task.name, metric=task.metric, note=task.note,
           rows=[dataclasses.asdict(row) for row in rows]), indent=1, ensure_ascii=False))
  written = ["report.csv", "report.json"]
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return written
  figure, axes = plt.subplots(figsize=(7, 4.5))
  markers = "osD^v<>phX*P"
  variable = {choice.label for choice in CHOICES.values() if choice.encode is not None}
  series = list(dict.fromkeys((row.format, row.method, row.allocation) for row in rows))
  for index, (label, method, allocated) in enumerate(series):
    spread = 0.06 * (index / max(1, len(series) - 1) - 0.5)  # side by side, not on top
    points = sorted((row.bits_per_param + spread, row.metric) for row in rows
                    if (row.format, row.method, row.allocation) == (label, method, allocated))
    tags = [tag for tag in (method if method != "rtn" else "",
                            allocated if allocated != "flat" else "") if tag]
    name = label + (f" [{', '.join(tags)}]" if tags else "")
    axes.plot(*zip(*points), marker=markers[index % len(markers)],
              linestyle="--" if label in variable else "-", label=name)
  axes.set_xlabel("bits per parameter (stored size; series spread ±0.03 to stay visible)")
  axes.set_ylabel(task.metric)
  axes.set_yscale("log")
  axes.set_title(f"{task.name}: {task.metric} against bits per parameter")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize=7, ncol=2, title="dashed: variable-length", title_fontsize=7)
  figure.tight_layout()
  figure.savefig(out / "report.png", dpi=120)
  plt.close(figure)
  return written + ["report.png"]

