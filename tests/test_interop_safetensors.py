"""Packed arrays in safetensors files: exact round trips, files other readers load, refusals."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

import jaxquant as jq
from jaxquant.interop import safetensors as jq_safetensors

SPECS = [
    jq.QuantSpec("nf4", axis=0),
    jq.QuantSpec("crd-t5-signmax-3b-B64", axis=1),
    jq.QuantSpec("int4", axis=0, double_quant=True),
    jq.QuantSpec("e2m1", axis=1, scale_dtype="e8m0", block_size=32),
    jq.QuantSpec("nf4", axis=0, scale_dtype="float8_e4m3fn", block_size=128),
    jq.QuantSpec("int8", axis=0, block_size="channel"),
    jq.QuantSpec("int2", axis=1, block_size="tensor"),
]


def leaves_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_is_exact(tmp_path, spec):
  w = jax.random.normal(jax.random.key(0), (200, 96), jnp.float32).astype(jnp.bfloat16)
  q = jq.quantise(w, spec)
  bias = jnp.arange(5, dtype=jnp.float16)
  path = tmp_path / "model.safetensors"
  jq_safetensors.save(path, {"layer.kernel": q, "layer.bias": bias}, metadata={"who": "test"})
  loaded = jq_safetensors.load(path)
  assert set(loaded) == {"layer.kernel", "layer.bias"}
  back = loaded["layer.kernel"]
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(q)  # static fields
  leaves_equal(back, q)
  np.testing.assert_array_equal(np.asarray(back.dequantise()).view(np.uint16),
                                np.asarray(q.dequantise()).view(np.uint16))
  leaves_equal(loaded["layer.bias"], bias)


def test_the_safetensors_package_reads_the_file(tmp_path):
  q = jq.quantise(jax.random.normal(jax.random.key(1), (128, 64)), jq.QuantSpec("nf4"))
  path = tmp_path / "w.safetensors"
  jq_safetensors.save(path, {"w": q, "b": jnp.ones(3)})
  tensors = dict(safetensors.deserialize(path.read_bytes()))
  assert tensors["w.codes"]["dtype"] == "U32" and tensors["w.scales"]["dtype"] == "BF16"
  with safetensors.safe_open(str(path), framework="numpy") as file:
    np.testing.assert_array_equal(file.get_tensor("w.codes"), np.asarray(q.codes))
    meta = json.loads(file.metadata()["jaxquant"])
  description = meta["arrays"]["w"]
  assert description["bits"] == 4 and description["layout"] == jq.packing.LAYOUT
  np.testing.assert_array_equal(np.float32(description["codebook"]), np.asarray(q.codebook))


def rewrite_metadata(path, edit):
  data = path.read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + length])
  meta = json.loads(header["__metadata__"]["jaxquant"])
  edit(meta)
  header["__metadata__"]["jaxquant"] = json.dumps(meta)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def test_refusals_name_what_is_wrong(tmp_path):
  q = jq.quantise(jax.random.normal(jax.random.key(2), (64, 32)), jq.QuantSpec("nf4"))
  path = tmp_path / "w.safetensors"
  with pytest.raises(ValueError, match="metadata key 'jaxquant'"):
    jq_safetensors.save(path, {"w": q}, metadata={"jaxquant": "x"})
  with pytest.raises(ValueError, match="'w.codes'"):
    jq_safetensors.save(path, {"w": q, "w.codes": jnp.ones(2)})
  with pytest.raises(TypeError, match="'c'.*complex"):
    jq_safetensors.save(path, {"c": np.ones(2, np.complex128)})
  jq_safetensors.save(path, {"w": q})
  cases = [
      (lambda m: m.update(format_version=2), "format_version 2; this jaxquant reads 1"),
      (lambda m: m["arrays"]["w"].update(layout_version=9), "layout bitstream-u32 v9"),
      (lambda m: m["arrays"]["w"].update(shape=[96, 32]), r"tensor w.codes has shape \[8, 32\]"),
  ]
  for edit, message in cases:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes())
    rewrite_metadata(broken, edit)
    with pytest.raises(ValueError, match=message):
      jq_safetensors.load(broken)
