"""`jaxquant quantise`: a real model quantised with one format, by RTN or GPTQ, as a checkpoint.

The task's Linear layers (those the report quantises) get one format at `bits` with blocks of
`block_size` along their inputs, fitted per layer where the family is fitted
(`jaxquant.eval.report.choice_for`). With ``method="gptq"`` the model is first calibrated on
text that is not the evaluation text (`jaxquant.eval.text.calibration_text`, or a user's
file), then each layer is packed by GPTQ in act order (`jaxquant.gptq`). The quantised model
is saved with `jaxquant.checkpoint.save` (entropy-coded when asked), next to ``quantise.json``
(what was run, and the results); `restore` reads both back. `export_dequantised` writes every
quantised weight, dequantised to float32, under the model file's own tensor name and
orientation, for tools outside jaxquant.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import time

import numpy as np

import jaxquant as jq
from jaxquant.eval import report, tasks

METHODS = report.METHODS
SETTINGS = "quantise.json"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `quantise` is asked to do."""
  model: str
  format: str
  bits: int
  method: str = "gptq"
  block_size: int = 64
  calibration_tokens: int | None = None  # None: the task's default
  act_order: bool = True
  damping: float = 0.01
  entropy_coded: bool = False  # codes stored rANS-coded where that is smaller


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What `quantise` measured."""
  bits_per_param: float  # codes and scales over the quantised layers
  quantised_mib: float  # on-device size of the packed layers
  layers: int
  seconds: float  # calibration + quantisation wall time
  metric: str
  scores: dict


def _rules(task: tasks.Task, settings: Settings) -> list[jq.Rule]:
  choice = report.choice_for(settings.format)
  if choice.spec_for is None:
    raise ValueError(f"format {settings.format!r} is variable-length; quantise writes packed "
                     "fixed-length formats (see jaxquant report for the others)")
  rules = []
  for path, kernel in report.kernels_of(task.model, task.layers).items():
    spec = choice.spec_for(kernel, settings.bits, settings.block_size)
    if spec is None:
      raise ValueError(f"format {settings.format!r} has no {settings.bits}-bit version")
    rules.append(jq.Rule(re.escape(path), spec))
  return rules


def quantise(task: tasks.Task, settings: Settings, calibration_text: str | None = None,
             progress=print):
  """The quantised model of `task` and its `Outcome`; `progress` gets one line per stage."""
  start = time.perf_counter()
  rules = _rules(task, settings)
  moments = None
  if settings.method == "gptq":
    progress(f"calibrating on {settings.calibration_tokens or task.calibration_tokens} tokens "
             f"of {'the calibration file' if calibration_text else 'the calibration text'}")
    moments = report.second_moments(task, calibration_text, settings.calibration_tokens)
  elif settings.method != "rtn":
    raise ValueError(f"method={settings.method!r} is not one of {METHODS}")
  progress(f"quantising {len(rules)} layers by {settings.method}")
  model = jq.nnx.quantise_model(task.model, rules, calibration=moments,
                                damping=settings.damping, act_order=settings.act_order)
  seconds = time.perf_counter() - start
  kernels = [report.layer(model, path).kernel.get_value() for path in report.layer_paths(task)]
  outcome = Outcome(
      bits_per_param=sum(q.storage_bits for q in kernels) / sum(q.size for q in kernels),
      quantised_mib=jq.nnx.quantised_bytes(model) / 2**20, layers=len(kernels),
      seconds=seconds, metric=task.metric, scores={k: float(v) for k, v in
                                                   task.score(model).items()})
  return model, outcome


def save(model, settings: Settings, outcome: Outcome, out: pathlib.Path) -> None:
  """The checkpoint in `out`, with `SETTINGS` (the settings and the outcome) beside it."""
  jq.checkpoint.save(out / "checkpoint", model, overwrite=True,
                     entropy_coded=settings.entropy_coded)
  (out / SETTINGS).write_text(json.dumps(
      {"settings": dataclasses.asdict(settings), "outcome": dataclasses.asdict(outcome)},
      indent=1, ensure_ascii=False))


def restore(out: pathlib.Path, task: tasks.Task | None = None):
  """The quantised model saved by `save` in `out` (its task loaded unless given)."""
  stored = json.loads((pathlib.Path(out) / SETTINGS).read_text())
  settings = Settings(**stored["settings"])
  task = task or tasks.load_task(settings.model)
  # Any format with the same bits and blocks has the same structure: the codebooks are leaves.
  target = jq.nnx.quantise_model(task.model, [
      jq.Rule(re.escape(path), jq.QuantSpec(f"int{settings.bits}",
                                            block_size=settings.block_size))
      for path in report.layer_paths(task)])
  return jq.checkpoint.restore(pathlib.Path(out) / "checkpoint", target)


def export_dequantised(model, task: tasks.Task, name_of, path: pathlib.Path) -> int:
  """Every quantised layer's kernel, dequantised to float32, as safetensors at `path`.

  `name_of(kernel_path) -> (tensor name, transposed)` gives the model file's name and
  whether its array is the transpose of the kernel [in, out]. Returns the tensor count.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tensors = {}
  for layer_path in report.layer_paths(task):
    name, transposed = name_of(f"{layer_path}/kernel")
    kernel = np.asarray(report.layer(model, layer_path).kernel.get_value().dequantise(
        np.float32))
    tensors[name] = np.ascontiguousarray(kernel.T if transposed else kernel)
  save_file(tensors, str(path))
  return len(tensors)
