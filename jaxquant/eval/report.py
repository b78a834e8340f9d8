"""The format report: every standard format on a real model, at each bit width.

For each format and bit width the float model's selected Linear layers are quantised through
`jaxquant.nnx.quantise_model` (formats fitted per tensor where the format is fitted: the
Student-t ν of CRD-t, Lloyd–Max codebooks), and the report records

- bits per parameter, codes plus scales, over the quantised layers;
- the mean weight error R = ‖ŵ − w‖/‖w‖, averaged over layers weighted by their size;
- the model metric (MiniLM: 1 − cosine between float and quantised sentence embeddings;
  SmolLM2: top-128 next-token KL to the float model, in nats);
- the on-device bytes of the packed weights.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
import time
from collections.abc import Callable, Sequence

import jax
from flax import nnx

import jaxquant as jq
from jaxquant import formats as formats_lib

STANDARD = ("int-absmax", "int-signmax", "e2m1", "nf4", "sf4", "crd-normal", "crd-laplace",
            "crd-t", "crd-t-signmax", "lloyd-max", "lloyd-max-signmax")
QUICK = ("int-absmax", "nf4", "crd-t", "crd-t-signmax", "lloyd-max-signmax")


@dataclasses.dataclass(frozen=True)
class FormatChoice:
  """A format family of the report: how to build its spec for one weight (kernel [in, out])."""
  label: str
  spec_for: Callable[[jax.Array, int, int], jq.QuantSpec | None]  # (w, bits, B) -> spec


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


@dataclasses.dataclass
class Row:
  format: str
  bits: int
  bits_per_param: float
  weight_r: float
  metric: float
  extra: dict
  quantised_mib: float
  seconds: float
  best: bool = False


def layer_paths(task: Task) -> list[str]:
  """The paths of the Linear layers the report quantises."""
  return list(_kernels(task.model, task.layers))


def _kernels(model, pattern) -> dict[str, jax.Array]:
  kernels = {}
  for path, module in nnx.iter_modules(model):
    name = "/".join(str(p) for p in path)
    if isinstance(module, nnx.Linear) and re.fullmatch(pattern, name):
      kernels[name] = module.kernel[...]
  return kernels


def run_report(task: Task, format_names: Sequence[str], bits_list: Sequence[int],
               block_size: int, progress=None) -> list[Row]:
  """Quantises `task.model` with every format at every bit width; returns the table rows."""
  graphdef, state = nnx.split(task.model)
  kernels = _kernels(task.model, task.layers)
  if not kernels:
    raise ValueError(f"no Linear layer of {task.name} matches {task.layers!r}")
  choices = [choice_for(name) for name in format_names]
  rows = []
  for bits in bits_list:
    for choice in choices:
      start = time.perf_counter()
      specs, errors = {}, []
      for path, w in kernels.items():
        spec = choice.spec_for(w, bits, block_size)
        if progress is not None:
          progress(f"{bits}-bit {choice.label}: {path}")
        if spec is None:
          break
        specs[path] = spec
      if len(specs) < len(kernels):
        continue  # the family has no format at this width (NF4/SF4 are 4-bit only)
      model = nnx.merge(graphdef, state)
      rules = [jq.Rule(re.escape(path), spec) for path, spec in specs.items()]
      jq.nnx.quantise_model(model, rules)
      sizes, storage = [], 0
      for path in kernels:
        layer = model
        for part in path.split("/"):
          layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        q = layer.kernel.get_value()
        errors.append(float(jq.metrics.relative_rmse(kernels[path], q.dequantise())))
        sizes.append(q.size)
        storage += q.storage_bits
      scores = task.score(_shared_compilation(model))
      rows.append(Row(
          format=choice.label, bits=bits, bits_per_param=storage / sum(sizes),
          weight_r=sum(e * s for e, s in zip(errors, sizes)) / sum(sizes),
          metric=float(scores[task.metric]), extra={k: float(v) for k, v in scores.items()},
          quantised_mib=jq.nnx.quantised_bytes(model) / 2**20,
          seconds=time.perf_counter() - start))
  for bits in bits_list:
    group = [row for row in rows if row.bits == bits]
    if group:
      min(group, key=lambda row: row.metric).best = True
  return rows


def _shared_compilation(model):
  """The model with its packed weights' format names and scalings blanked, in place.

  Both are static pytree metadata, so a jitted forward would recompile for every format;
  neither enters the computation (the codebook and the scales are array leaves), so blanking
  them lets formats of one bit width share one compiled forward.
  """
  for _, variable in nnx.to_flat_state(nnx.state(model, jq.nnx.QuantisedWeight)):
    q = variable.get_value()
    variable.set_value(dataclasses.replace(q, format_name="report", scaling="absmax"))
  return model


def render(task: Task, rows: Sequence[Row]) -> str:
  header = (f"{'format':<24}{'bits':>5}{'b/param':>9}{'weight R':>10}{task.metric:>14}"
            f"{'MiB':>8}")
  lines = [f"{task.name}: {task.metric} (lower is better; * = best at its bit width)", header]
  for row in rows:
    mark = "*" if row.best else " "
    lines.append(f"{row.format:<24}{row.bits:>5}{row.bits_per_param:>9.3f}{row.weight_r:>10.4f}"
                 f"{row.metric:>13.5f}{mark}{row.quantised_mib:>8.2f}")
  if task.note:
    lines.append(task.note)
  return "\n".join(lines)


def write_outputs(task: Task, rows: Sequence[Row], out: pathlib.Path, meta: dict) -> list[str]:
  """report.csv, report.json and (with matplotlib) report.png in `out`; returns the names."""
  out.mkdir(parents=True, exist_ok=True)
  fields = ["format", "bits", "bits_per_param", "weight_r", "metric", "quantised_mib",
            "seconds", "best"]
  with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(fields[:4] + [task.metric] + fields[5:])
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
  labels = list(dict.fromkeys(row.format for row in rows))
  for index, label in enumerate(labels):
    spread = 0.08 * (index / max(1, len(labels) - 1) - 0.5)  # side by side, not on top
    points = [(row.bits_per_param + spread, row.metric) for row in rows if row.format == label]
    axes.plot(*zip(*points), markers[index % len(markers)], label=label, linestyle="none")
  axes.set_xlabel("bits per parameter, codes + scales (formats spread ±0.04 to stay visible)")
  axes.set_ylabel(task.metric)
  axes.set_yscale("log")
  axes.set_title(f"{task.name}: {task.metric} against bits per parameter")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize=7, ncol=2)
  figure.tight_layout()
  figure.savefig(out / "report.png", dpi=120)
  plt.close(figure)
  return written + ["report.png"]

