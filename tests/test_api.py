"""The public contract of DESIGN.md exists, and the core imports no Flax."""

import subprocess
import sys

import jaxquant as jq

CONTRACT = ["formats.nf4", "formats.sf4", "formats.int_format", "formats.fp_format",
            "formats.crd_format", "formats.lloyd_max", "formats.parse", "QuantSpec", "quantise",
            "dequantise", "QuantisedArray", "qmatmul", "metrics.relative_rmse", "Rule",
            "fake_quantise", "nnx.QLinear", "nnx.QEinsum", "nnx.QEmbed", "nnx.quantise_model",
            "linen.QDense", "linen.QDenseGeneral", "linen.quantise_params",
            "checkpoint.save", "checkpoint.restore", "fitting.fit_grid", "entropy.compress",
            "outliers.quantise_with_outliers", "dot_general", "einsum", "take", "qat_matmul",
            "FakeQuantised", "interception.call", "interception.discover", "linen.quantised_apply",
            "nnx.convert", "nnx.QATWeight", "lora.LoRAWeight", "lora.Adapters", "nnx.add_lora",
            "nnx.merge_lora", "nnx.LoRAParam", "nnx.save_lora", "nnx.restore_lora",
            "linen.init_lora", "linen.merge_lora", "interop.gguf.load", "interop.gguf.save",
            "interop.bnb.from_state_dict", "interop.bnb.to_state_dict", "interop.safetensors.save",
            "interop.safetensors.load", "interop.mx.from_blocks", "interop.mx.to_blocks",
            "formats.mx_format"]


def test_contract_names_exist_and_are_documented():
  for dotted in CONTRACT:
    obj = jq
    for part in dotted.split("."):
      obj = getattr(obj, part)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20, dotted
  assert set(jq.__all__) <= set(dir(jq))


def test_core_import_does_not_load_flax():
  code = ("import sys, jaxquant, jaxquant.interception, jaxquant.nn.weights; "
          "assert 'flax' not in sys.modules, 'flax was imported'")
  subprocess.run([sys.executable, "-c", code], check=True)
