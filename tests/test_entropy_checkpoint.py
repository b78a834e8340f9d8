"""Entropy-coded checkpoints: codes stored rANS-coded, restored bit for bit, sizes recorded."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from entropy_reference import ideal_rate
from flax import nnx
from test_checkpoint import (
  IDS,
  Model,
  abstract_quantised,
  assert_trees_identical,
  edit_metadata,
  flip_stored_bit,
  linen_params,
)

import jaxquant as jq
from jaxquant.nn import checkpoint

# A 31-point grid (skewed codes on Normal weights), asymmetric uint4, and NF4.
RULES = [jq.Rule("up", jq.QuantSpec(jq.formats.uniform_grid(31), block_size=64)),
         jq.Rule("down", jq.QuantSpec("uint4", block_size=32)),
         jq.Rule(".*", jq.QuantSpec("nf4"))]


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
  """(model, its outputs on IDS, path of its entropy-coded checkpoint)."""
  model = jq.nnx.quantise_model(Model(nnx.Rngs(0)), RULES)
  path = tmp_path_factory.mktemp("coded") / "model"
  checkpoint.save(path, model, entropy_coded=True)
  return model, model(IDS), path


def _quantised_leaves(model):
  state = nnx.to_pure_dict(nnx.state(model))
  flat = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, jq.QuantisedArray))[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat
          if isinstance(leaf, jq.QuantisedArray)}


def test_restore_decodes_into_the_same_model(coded):
  model, outputs, path = coded
  restored = checkpoint.restore(path, abstract_quantised(RULES))
  assert_trees_identical(nnx.state(restored), nnx.state(model))
  np.testing.assert_array_equal(restored(IDS), outputs, strict=True)


def test_codes_are_stored_coded_with_their_sizes(coded):
  model, _, path = coded
  metadata = checkpoint.read_metadata(path)
  assert metadata["format_version"] == checkpoint.FORMAT_VERSION
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.restore(path / "arrays")
  totals = dict.fromkeys(("ideal", "coded", "fixed"), 0.0)
  leaves = _quantised_leaves(model)
  assert sorted(leaves) == ["down/kernel", "embed/embedding", "up/kernel"]
  for name, q in leaves.items():
    entry = metadata["leaves"][name]
    node = stored
    for part in name.split("/"):
      node = node[part]
    compressed = jq.entropy.compress(q)
    # No packed codes on disk: the stream of jaxquant.entropy.compress instead, its parts one
    # after another in one uint32 array.
    assert "codes" not in node
    stream = compressed.stream
    frequencies = np.concatenate([stream.frequencies, np.zeros(stream.n_symbols % 2, np.uint16)])
    expected = np.concatenate([stream.words, stream.ends.view(np.uint32), stream.crcs,
                               frequencies.view(np.uint32)])
    np.testing.assert_array_equal(np.asarray(node["coded"]), expected, strict=True)
    bits = entry["coded"]["bits"]
    assert bits["fixed"] == q.storage_bits
    assert bits["coded"] == compressed.storage_bits < q.storage_bits
    np.testing.assert_allclose(bits["ideal"], ideal_rate(q) * q.size, rtol=1e-9)
    assert bits["ideal"] <= bits["coded"] <= 1.01 * bits["ideal"]
    for key in totals:
      totals[key] += bits[key]
  assert metadata["sizes"] == pytest.approx(totals, rel=1e-12)


def test_codes_that_code_no_smaller_stay_packed(tmp_path):
  # Every NF4 value equally often in every block: the codes' entropy is the full 4 bits.
  values = np.asarray(jq.formats.nf4().values, np.float32)
  w = jnp.asarray(np.stack([np.random.default_rng(i).permutation(np.tile(values, 4))
                            for i in range(32)], axis=1))
  params = {"w": jq.quantise(w, jq.QuantSpec("nf4", block_size=64)), "b": jnp.ones(3)}
  checkpoint.save(tmp_path / "c", params, entropy_coded=True)
  metadata = checkpoint.read_metadata(tmp_path / "c")
  assert "coded" not in metadata["leaves"]["w"]
  compressed = jq.entropy.compress(params["w"])
  assert compressed.storage_bits > params["w"].storage_bits
  assert metadata["sizes"]["coded"] == metadata["sizes"]["fixed"] == params["w"].storage_bits
  restored = checkpoint.restore(tmp_path / "c", jax.eval_shape(lambda: params))
  assert_trees_identical(restored, params)


def test_linen_params_round_trip(tmp_path):
  params = linen_params(jax.random.key(3))
  checkpoint.save(tmp_path / "linen", params, entropy_coded=True)
  assert all("coded" in checkpoint.read_metadata(tmp_path / "linen")["leaves"][name]
             for name in ("embed/embedding", "up/kernel", "down/kernel"))
  restored = checkpoint.restore(tmp_path / "linen", jax.eval_shape(linen_params,
                                                                   jax.random.key(0)))
  assert_trees_identical(restored, params)


@pytest.fixture
def coded_scratch(coded, tmp_path):
  shutil.copytree(coded[2], tmp_path / "scratch")
  return tmp_path / "scratch"


def test_flipped_bits_in_the_stream_raise(coded, coded_scratch):
  model = coded[0]
  words = jq.entropy.compress(model.up.kernel.get_value()).stream.words.tobytes()
  flip_stored_bit(coded_scratch, words[len(words) // 2:len(words) // 2 + 64], 0x01)
  with pytest.raises(ValueError, match="array 'up/kernel/coded' of the checkpoint at "
                                       ".*scratch does not match its checksum"):
    checkpoint.restore(coded_scratch, abstract_quantised(RULES))


def test_a_stream_that_disagrees_with_its_metadata_raises(coded_scratch):
  def shrink(metadata):
    metadata["leaves"]["up/kernel"]["coded"]["size"] -= 1
  edit_metadata(coded_scratch, shrink)
  # The length is part of every chunk's CRC context.
  with pytest.raises(ValueError, match=r"leaf 'up/kernel' of the checkpoint at .*: the coded "
                                       r"stream is corrupt: chunks 0, 1 of chunks 0\.\.1"):
    checkpoint.restore(coded_scratch, abstract_quantised(RULES))


def test_codes_that_decode_to_other_codes_raise(coded_scratch):
  def forge(metadata):
    metadata["leaves"]["down/kernel"]["arrays"]["codes"]["sha256"] = "0" * 64
  edit_metadata(coded_scratch, forge)
  with pytest.raises(ValueError, match="the codes of leaf 'down/kernel' of the checkpoint at "
                                       ".* decode to other codes than were saved"):
    checkpoint.restore(coded_scratch, abstract_quantised(RULES))


def test_version_2_files_are_read_and_cannot_hold_coded_codes(coded_scratch, tmp_path):
  model = jq.nnx.quantise_model(Model(nnx.Rngs(0)), RULES)
  checkpoint.save(tmp_path / "packed", model)
  edit_metadata(tmp_path / "packed", lambda m: m.update(format_version=2))
  restored = checkpoint.restore(tmp_path / "packed", abstract_quantised(RULES))
  assert_trees_identical(nnx.state(restored), nnx.state(model))
  edit_metadata(coded_scratch, lambda m: (m.update(format_version=2), m.pop("sizes")))
  with pytest.raises(ValueError, match="the entry of leaf 'down/kernel' is malformed"):
    checkpoint.read_metadata(coded_scratch)


def test_save_refuses_a_non_bool_entropy_coded(tmp_path):
  with pytest.raises(TypeError, match="entropy_coded=1 must be a bool"):
    checkpoint.save(tmp_path / "c", {"b": jnp.ones(3)}, entropy_coded=1)
