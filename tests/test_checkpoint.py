"""Checkpoints: save → restore gives bit-identical models and trees; every mismatch raises."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.nn import checkpoint

NF4 = jq.QuantSpec("nf4")
RULES = [jq.Rule(".*", NF4)]
IDS = jnp.arange(0, 1000, 37)


class Model(nnx.Module):
  """An embedding and a two-layer MLP: 256 → `hidden` → 256."""

  def __init__(self, rngs, *, hidden=512, param_dtype=jnp.float32, use_bias=True):
    self.embed = nnx.Embed(1000, 256, rngs=rngs)
    self.up = nnx.Linear(256, hidden, param_dtype=param_dtype, use_bias=use_bias, rngs=rngs)
    self.down = nnx.Linear(hidden, 256, param_dtype=param_dtype, use_bias=use_bias, rngs=rngs)

  def __call__(self, ids):
    return self.down(jax.nn.relu(self.up(self.embed(ids))))


def abstract_quantised(rules=RULES, **kwargs):
  """How users get a restore target: the quantised model's shapes, with no arrays allocated."""
  return nnx.eval_shape(lambda: jq.nnx.quantise_model(Model(nnx.Rngs(1), **kwargs), rules))


def linen_forward(params, ids):
  """The model's forward on a Linen-style nested dict of arrays and QuantisedArrays."""
  table = jq.dequantise(params["embed"]["embedding"])
  x = jnp.take(table, ids, axis=0)
  x = jax.nn.relu(jq.qmatmul(x, params["up"]["kernel"]) + params["up"]["bias"][None])
  return jq.qmatmul(x, params["down"]["kernel"]) + params["down"]["bias"][None]


def linen_params(key):
  """Quantised params as a Linen model holds them, in the NNX model's layout."""
  keys = jax.random.split(key, 3)
  return {
      "embed": {"embedding": jq.quantise(jax.random.normal(keys[0], (1000, 256)),
                                         dataclasses.replace(NF4, axis=1))},
      "up": {"kernel": jq.quantise(jax.random.normal(keys[1], (256, 512)),
                                   dataclasses.replace(NF4, axis=0)),
             "bias": jnp.zeros((512,))},
      "down": {"kernel": jq.quantise(jax.random.normal(keys[2], (512, 256)),
                                     dataclasses.replace(NF4, axis=0)),
               "bias": jnp.zeros((256,))},
  }


def plain(leaf):
  """Leaves as numpy arrays (PRNG keys as their data) for bit-exact comparison."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def assert_trees_identical(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(plain(a), plain(e), strict=True)


def directory_bytes(path):
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(quantised model, its outputs on IDS, checkpoint path), saved once for the module."""
  model = jq.nnx.quantise_model(Model(nnx.Rngs(0)), RULES)
  path = tmp_path_factory.mktemp("checkpoints") / "nf4"
  checkpoint.save(path, model)
  return model, model(IDS), path


@pytest.fixture
def scratch(saved, tmp_path):
  """A private copy of the saved checkpoint, free to damage."""
  shutil.copytree(saved[2], tmp_path / "scratch")
  return tmp_path / "scratch"


@pytest.mark.parametrize("kind", ["abstract", "concrete"])
def test_restore_into_model_is_bit_identical(saved, kind):
  model, outputs, path = saved
  target = (abstract_quantised() if kind == "abstract"
            else jq.nnx.quantise_model(Model(nnx.Rngs(1)), RULES))
  restored = checkpoint.restore(path, target)
  assert restored is target  # Updated in place, like nnx.update.
  assert isinstance(restored.up, jq.nnx.QLinear) and isinstance(restored.embed, jq.nnx.QEmbed)
  assert_trees_identical(nnx.state(restored), nnx.state(model))
  np.testing.assert_array_equal(restored(IDS), outputs, strict=True)


def test_save_and_restore_nnx_state(saved, tmp_path):
  model, outputs, path = saved
  checkpoint.save(tmp_path / "state", nnx.state(model))
  assert (checkpoint.read_metadata(tmp_path / "state")["leaves"]
          == checkpoint.read_metadata(path)["leaves"])
  graphdef, state = nnx.split(abstract_quantised())
  assert checkpoint.restore(path, state) is state
  assert_trees_identical(state, nnx.state(model))
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(IDS), outputs, strict=True)


def test_restore_into_linen_style_params_is_bit_identical(saved):
  model, _, path = saved
  target = jax.eval_shape(linen_params, jax.random.key(1))
  restored = checkpoint.restore(path, target)
  expected = nnx.to_pure_dict(nnx.state(model))
  assert_trees_identical(restored, expected)
  np.testing.assert_array_equal(linen_forward(restored, IDS), linen_forward(expected, IDS),
                                strict=True)


def test_pytree_round_trip_with_every_kind_of_leaf(tmp_path):
  """Double-quantised, e8m0, float8 and per-tensor scales, 3-bit codes, lists, keys, scalars."""
  key = jax.random.key(2)
  w = jax.random.normal(key, (64, 96))

  def params(key):
    return {
        "double_quant": jq.quantise(w, jq.QuantSpec("nf4", double_quant=True)),
        "layers": [jq.quantise(w, jq.QuantSpec("e2m1", scale_dtype="e8m0", block_size=32)),
                   jq.quantise(w, jq.QuantSpec("int3-sym", scale_dtype="float8_e4m3fn",
                                               block_size="tensor", axis=0))],
        "norm": w[0].astype(jnp.bfloat16),
        "step": jnp.int32(7),
        "key": key,
    }

  tree = params(key)
  assert tree["double_quant"].scale_scales is not None and tree["layers"][0].bits == 4
  checkpoint.save(tmp_path / "tree", tree)
  target = jax.eval_shape(params, jax.random.key(0))
  restored = checkpoint.restore(tmp_path / "tree", target)
  assert_trees_identical(restored, tree)
  for q, r in zip(jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jq.QuantisedArray)),
                  jax.tree.leaves(restored, is_leaf=lambda x: isinstance(x, jq.QuantisedArray))):
    if isinstance(q, jq.QuantisedArray):
      np.testing.assert_array_equal(jq.dequantise(r), jq.dequantise(q), strict=True)


def test_metadata_describes_every_leaf(saved):
  _, _, path = saved
  metadata = checkpoint.read_metadata(path)
  assert metadata["format_version"] == checkpoint.FORMAT_VERSION
  assert metadata["jaxquant_version"] == jq.__version__
  assert metadata["packing"] == {"layout": jq.packing.LAYOUT,
                                 "layout_version": jq.packing.LAYOUT_VERSION}
  leaves = metadata["leaves"]
  assert list(leaves) == ["down/bias", "down/kernel", "embed/embedding", "up/bias", "up/kernel"]
  assert leaves["up/kernel"]["quantised_array"] == {
      "bits": 4, "block_size": 64, "axis": 0, "granularity": "block", "shape": [256, 512],
      "dtype": "float32", "layout": "bitstream-u32", "layout_version": 1, "scale_group": 256}
  arrays = leaves["up/kernel"]["arrays"]
  assert {name: (a["shape"], a["dtype"]) for name, a in arrays.items()} == {
      "codes": ([32, 512], "uint32"), "scales": ([4, 512], "bfloat16"),
      "codebook": ([16], "float32")}
  assert leaves["embed/embedding"]["quantised_array"]["axis"] == 1
  assert leaves["up/bias"]["shape"] == [512] and leaves["up/bias"]["dtype"] == "float32"
  assert len(leaves["up/bias"]["sha256"]) == 64
  # The arrays are a plain orbax checkpoint of nested dicts: readable without jaxquant.
  with ocp.StandardCheckpointer() as checkpointer:
    arrays = checkpointer.restore(path / "arrays")
  assert set(arrays["up"]["kernel"]) == {"codes", "scales", "codebook"}
  assert arrays["up"]["kernel"]["codes"].dtype == jnp.uint32


def test_nf4_checkpoint_is_at_most_0_15_of_float32(saved, tmp_path):
  _, _, path = saved
  checkpoint.save(tmp_path / "f32", Model(nnx.Rngs(0)))
  quantised, full = directory_bytes(path), directory_bytes(tmp_path / "f32")
  print(f"NF4 B=64 checkpoint {quantised} bytes, float32 checkpoint {full} bytes, "
        f"ratio {quantised / full:.4f}")
  assert quantised <= 0.15 * full


def test_save_refuses_a_non_empty_directory(saved, scratch, tmp_path):
  model, _, _ = saved
  with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
    checkpoint.save(scratch, model)
  other = jq.nnx.quantise_model(Model(nnx.Rngs(5)), RULES)
  checkpoint.save(scratch, other, overwrite=True)
  assert_trees_identical(nnx.state(checkpoint.restore(scratch, abstract_quantised())),
                         nnx.state(other))
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=r"holds \['todo.txt'\].*refusing to overwrite"):
    checkpoint.save(tmp_path / "notes", model, overwrite=True)
  assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
  (tmp_path / "empty").mkdir()
  checkpoint.save(tmp_path / "empty", model)


def test_save_rejects_what_it_cannot_store(tmp_path):
  with pytest.raises(TypeError, match="leaf 'down/bias' holds no concrete array"):
    checkpoint.save(tmp_path / "a", abstract_quantised())
  with pytest.raises(TypeError, match="leaf 'name' is a str, not an array"):
    checkpoint.save(tmp_path / "b", {"name": "nf4", "w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="nothing to save"):
    checkpoint.save(tmp_path / "c", {"a": [], "b": None})
  with pytest.raises(ValueError, match="key 'a/b' with a '/'"):
    checkpoint.save(tmp_path / "c", {"a/b": jnp.zeros(3)})


def edit_metadata(path, edit):
  file = path / "jaxquant.json"
  metadata = json.loads(file.read_text())
  edit(metadata)
  file.write_text(json.dumps(metadata))


def test_missing_or_corrupt_metadata_raises(scratch, tmp_path):
  target = abstract_quantised()
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    checkpoint.restore(tmp_path / "nowhere", target)
  text = (scratch / "jaxquant.json").read_text()
  (scratch / "jaxquant.json").unlink()
  with pytest.raises(ValueError, match="has no jaxquant.json"):
    checkpoint.restore(scratch, target)
  (scratch / "jaxquant.json").write_text(text[:len(text) // 2])
  with pytest.raises(ValueError, match="jaxquant.json is not valid JSON"):
    checkpoint.restore(scratch, target)
  (scratch / "jaxquant.json").write_text(text)
  edit_metadata(scratch, lambda m: m["leaves"]["up/bias"].pop("sha256"))
  with pytest.raises(ValueError, match="the entry of leaf 'up/bias' is malformed"):
    checkpoint.restore(scratch, target)


WRITTEN_BY = rf"\(it was written by jaxquant {re.escape(jq.__version__)}\)"
READER = rf"this jaxquant \({re.escape(jq.__version__)}\) reads"


def put_layout_version(where, version):
  """An edit of jaxquant.json: the packing layout_version at top level or of leaf up/kernel."""
  def edit(metadata):
    if where == "packing":
      metadata["packing"]["layout_version"] = version
    else:
      metadata["leaves"]["up/kernel"]["quantised_array"]["layout_version"] = version
  return edit


@pytest.mark.parametrize("where", ["packing", "leaf"])
def test_load_refuses_a_newer_layout_version_naming_both(scratch, where):
  newer = jq.packing.LAYOUT_VERSION + 1
  edit_metadata(scratch, put_layout_version(where, newer))
  leaf = r" \(leaf 'up/kernel'\)" if where == "leaf" else ""
  with pytest.raises(ValueError, match=(
      rf"checkpoint at .*scratch has layout_version {newer}{leaf}, newer than the layout_version "
      rf"{jq.packing.LAYOUT_VERSION} {READER} {WRITTEN_BY}: upgrade jaxquant to load it$")):
    checkpoint.restore(scratch, abstract_quantised())


@pytest.mark.parametrize("where", ["packing", "leaf"])
def test_load_refuses_an_older_layout_version_naming_both(scratch, where):
  older = jq.packing.LAYOUT_VERSION - 1
  edit_metadata(scratch, put_layout_version(where, older))
  leaf = r" \(leaf 'up/kernel'\)" if where == "leaf" else ""
  with pytest.raises(ValueError, match=(
      rf"has layout_version {older}{leaf}, older than the layout_version "
      rf"{jq.packing.LAYOUT_VERSION} {READER} {WRITTEN_BY}: this jaxquant reads no other$")):
    checkpoint.read_metadata(scratch)


@pytest.mark.parametrize("where", ["packing", "leaf"])
def test_load_refuses_another_packing_layout_naming_both(scratch, where):
  def edit(metadata):
    static = (metadata["packing"] if where == "packing"
              else metadata["leaves"]["up/kernel"]["quantised_array"])
    static["layout"] = "bitstream-u8"
  edit_metadata(scratch, edit)
  leaf = r" \(leaf 'up/kernel'\)" if where == "leaf" else ""
  with pytest.raises(ValueError, match=(
      rf"packs codes{leaf} in layout 'bitstream-u8', but this jaxquant \(.*\) reads only "
      rf"'{jq.packing.LAYOUT}' {WRITTEN_BY}$")):
    checkpoint.restore(scratch, abstract_quantised())


@pytest.mark.parametrize("version, relation, advice", [
    (checkpoint.FORMAT_VERSION + 1, "newer", "upgrade jaxquant to load it"),
    (1, "older", "this jaxquant reads no other"),
])
def test_load_refuses_another_format_version_naming_both(scratch, version, relation, advice):
  edit_metadata(scratch, lambda m: m.update(format_version=version, jaxquant_version="9.0.1"))
  with pytest.raises(ValueError, match=(
      rf"has format_version {version}, {relation} than the format_version "
      rf"2 or {checkpoint.FORMAT_VERSION} {READER} \(it was written by jaxquant 9\.0\.1\): "
      rf"{advice}$")):
    checkpoint.restore(scratch, abstract_quantised())


@pytest.mark.parametrize("field, value", [
    ("format_version", 2.0), ("format_version", "2"), ("format_version", True),
    ("layout_version", 1.0), ("layout_version", "1"), ("layout_version", True),
])
def test_load_refuses_a_version_that_is_not_an_integer(scratch, field, value):
  edit_metadata(scratch, (lambda m: m.update(format_version=value)) if field == "format_version"
                else put_layout_version("packing", value))
  with pytest.raises(ValueError, match=rf"not a valid jaxquant checkpoint: {field} "
                                       rf"{re.escape(repr(value))} is not an integer"):
    checkpoint.read_metadata(scratch)


@pytest.mark.parametrize("version", [None, 1, 0.1, "", "latest", "v0.1.0", "0.1.0 ", "0.1.0+",
                                     "01.0"])
def test_load_refuses_a_jaxquant_version_that_is_not_a_version_string(scratch, version):
  edit_metadata(scratch, lambda m: m.update(jaxquant_version=version))
  with pytest.raises(ValueError, match=rf"jaxquant_version {re.escape(repr(version))} is not a "
                                       r"version string \(PEP 440\)"):
    checkpoint.restore(scratch, abstract_quantised())


def test_jaxquant_version_is_provenance_and_changes_nothing_loaded(saved, scratch):
  """Another writer's version string is read back as such; the weights are the saved ones."""
  model, outputs, _ = saved
  edit_metadata(scratch, lambda m: m.update(jaxquant_version="0.3.0.dev2+g1a2b3c"))
  assert checkpoint.read_metadata(scratch)["jaxquant_version"] == "0.3.0.dev2+g1a2b3c"
  restored = checkpoint.restore(scratch, abstract_quantised())
  assert_trees_identical(nnx.state(restored), nnx.state(model))
  np.testing.assert_array_equal(restored(IDS), outputs, strict=True)


@pytest.mark.parametrize("kwargs, rules, message", [
    ({"hidden": 384}, RULES,
     (r"leaf 'down/kernel': shape is \[512, 256\] in the checkpoint but \[384, 256\] in the "
      r"target")),
    ({"param_dtype": jnp.bfloat16}, RULES,
     r"array 'down/bias' is .*'float32'.* in the checkpoint but .*'bfloat16'.* in the target"),
    ({"use_bias": False}, RULES, "leaf 'down/bias' is in the checkpoint but not in the target"),
    ({}, [jq.Rule("down", None), jq.Rule(".*", NF4)],
     "leaf 'down/kernel' is a QuantisedArray in the checkpoint but an array in the target"),
    ({}, [jq.Rule(".*", jq.QuantSpec("nf4", block_size=32))],
     "leaf 'down/kernel': block_size is 64 in the checkpoint but 32 in the target"),
    ({}, [jq.Rule(".*", jq.QuantSpec("nf4", scale_dtype="float32"))],
     r"array 'down/kernel/scales' is .*'bfloat16'.* in the checkpoint but .*'float32'.*"),
])
def test_mismatching_model_raises(saved, kwargs, rules, message):
  with pytest.raises(ValueError, match=f"the target does not match the checkpoint .*: {message}"):
    checkpoint.restore(saved[2], abstract_quantised(rules, **kwargs))


@pytest.mark.parametrize("change, message", [
    ({"bits": 3}, "leaf 'up/kernel': bits is 4 in the checkpoint but 3"),
    ({"block_size": 128}, "leaf 'up/kernel': block_size is 64 in the checkpoint but 128"),
    ({"axis": 1}, "leaf 'up/kernel': axis is 0 in the checkpoint but 1"),
    ({"layout": "bitstream-u8"},
     "leaf 'up/kernel': layout is 'bitstream-u32' in the checkpoint but 'bitstream-u8'"),
    ({"layout_version": 2}, "leaf 'up/kernel': layout_version is 1 in the checkpoint but 2"),
    ({"scale_scales": jax.ShapeDtypeStruct((1,), jnp.float32)},
     "array 'up/kernel/scale_scales' is only in the target"),
])
def test_mismatching_quantised_array_metadata_raises(saved, change, message):
  target = jax.eval_shape(linen_params, jax.random.key(1))
  target["up"]["kernel"] = dataclasses.replace(target["up"]["kernel"], **change)
  with pytest.raises(ValueError, match=message):
    checkpoint.restore(saved[2], target)


def test_extra_target_leaf_raises(saved):
  target = jax.eval_shape(linen_params, jax.random.key(1))
  target["head"] = jax.ShapeDtypeStruct((256,), jnp.float32)
  with pytest.raises(ValueError, match="leaf 'head' is in the target but not in the checkpoint"):
    checkpoint.restore(saved[2], target)


def data_files(path):
  files = [os.path.join(root, name) for root, _, names in os.walk(path / "arrays")
           for name in names if os.path.basename(root) == "d"]
  return sorted(files, key=os.path.getsize)


def flip_stored_bit(path, snippet: bytes, mask: int) -> None:
  """XORs `mask` into the first byte of `snippet` where the checkpoint at `path` stores it."""
  for name in data_files(path):
    with open(name, "r+b") as file:
      offset = file.read().find(snippet)
      if offset >= 0:
        file.seek(offset)
        file.write(bytes([snippet[0] ^ mask]))
        return
  pytest.fail("the snippet is not stored verbatim in any data file of the checkpoint")


def test_truncated_array_file_raises(scratch):
  """Runs in a child process: when one read fails, orbax abandons its other reads, which later
  raise from the garbage collector and tensorstore's threads (unraisable exceptions, whenever
  they happen to finish), so they must not land in other tests."""
  largest = data_files(scratch)[-1]
  with open(largest, "r+b") as file:
    file.truncate(os.path.getsize(largest) // 2)
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import pytest
      import test_checkpoint
      with pytest.raises(ValueError, match="could not read the arrays of the checkpoint at "
                         ".*scratch: OUT_OF_RANGE: Error reading "):
        test_checkpoint.checkpoint.restore({str(scratch)!r},
                                           test_checkpoint.abstract_quantised())
      """)
  child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)
  assert child.returncode == 0, child.stderr[-3000:]


def test_flipped_bits_in_array_file_raise(saved, scratch):
  """orbax reads a flipped bit back as a wrong value without complaint; the checksums catch it."""
  codes = np.asarray(saved[0].up.kernel.get_value().codes).tobytes()
  snippet = codes[len(codes) // 2:len(codes) // 2 + 64]  # Stored verbatim (incompressible).
  flip_stored_bit(scratch, snippet, 0x10)
  with ocp.StandardCheckpointer() as checkpointer:
    silently_wrong = checkpointer.restore(scratch / "arrays")["up"]["kernel"]["codes"]
  assert np.asarray(silently_wrong).tobytes() != codes
  with pytest.raises(ValueError, match="array 'up/kernel/codes' of the checkpoint at .*scratch "
                                       "does not match its checksum"):
    checkpoint.restore(scratch, abstract_quantised())
