"""Saving and restoring quantised models and parameter trees (orbax arrays + JSON metadata).

A checkpoint is a local directory holding two entries:

- ``arrays/``: an orbax checkpoint (`orbax.checkpoint.StandardCheckpointer`) of a plain nested
  dict of arrays with string keys. Every leaf of the saved tree sits under its path; a
  `QuantisedArray` leaf becomes a dict of its array leaves, ``codes``, ``scales``,
  ``codebook`` and, when present, ``scale_scales``, ``offsets`` and ``offset_scales``. No
  Python class is pickled.
- ``jaxquant.json``: what orbax does not store. Static metadata is not part of a pytree's
  leaves, so without this file a checkpoint could not say how its codes are packed::

    {
      "format_version": 3,
      "jaxquant_version": "0.1.0",
      "packing": {"layout": "bitstream-u32", "layout_version": 1},
      "leaves": {
        "down/bias": {"shape": [256], "dtype": "float32", "sha256": "…"},
        "down/kernel": {
          "quantised_array": {"bits": 4, "block_size": 64, "axis": 0,
                              "granularity": "block",
                              "shape": [512, 256], "dtype": "float32",
                              "layout": "bitstream-u32", "layout_version": 1,
                              "scale_group": 256},
          "arrays": {"codes": {"shape": [64, 256], "dtype": "uint32", "sha256": "…"},
                     "scales": {"shape": [8, 256], "dtype": "bfloat16", "sha256": "…"},
                     "codebook": {"shape": [16], "dtype": "float32", "sha256": "…"}}},
        …
      }
    }

  With ``save(..., entropy_coded=True)`` a `QuantisedArray` whose codes rANS-code smaller
  than they pack (`jaxquant.entropy.compress`) keeps no ``codes`` array: ``arrays/`` holds
  its coded stream as one uint32 array ``<path>/coded``
  (`jaxquant.entropy.rans.CodedStream.serialised`), and its entry gains ``"coded": {"size",
  "chunk_size", "precision", "n_symbols", "array": {shape, dtype, sha256}, "bits": {"ideal",
  "coded", "fixed"}}`` (the sizes in bits of the codes and scales under the ideal coder, as stored,
  and packed), while ``arrays.codes`` still describes, and checksums, the packed codes that
  `restore` rebuilds. The top level then records ``"sizes"``: the same three totals over
  every `QuantisedArray` of the file, coded or not.

  ``leaves`` lists the saved tree's leaves in pytree order by their '/'-joined paths (the
  keys of the nested dict in ``arrays/``). An array leaf records its shape, dtype and the
  SHA-256 of its bytes (C order, little-endian; a PRNG key array its `jax.random.key_data`); a
  `QuantisedArray` records its static metadata and the same for each of its arrays.
  ``format_version`` is `FORMAT_VERSION`, bumped whenever this layout changes; ``packing``
  names the bit layout of the codes (`jaxquant.packing`; each `QuantisedArray` names it too).
  These two decide how the file is read: a checkpoint whose format_version or layout_version
  (top level or any leaf) is not one this jaxquant reads is refused, and the message names
  both versions (a newer one means: upgrade jaxquant). ``jaxquant_version`` is the
  `jaxquant.__version__` that wrote the file: provenance, named in those refusals. It does not
  decide how the file is read (a later jaxquant writing the same format_version writes files
  this one reads), so it changes nothing that is loaded; it must be a PEP 440 version string
  (PEP 440, Appendix B: the canonical public version, with an optional local label), else the
  file is refused as invalid.

`restore` needs a target of the saved structure (orbax restores against an abstract tree, and
the static metadata must come from the model's code). It checks the target against
``jaxquant.json`` (paths, shapes, dtypes, every `QuantisedArray` field) before reading any
array, and checks every array read against its SHA-256, because orbax reads flipped bytes
back without complaint. Any disagreement raises rather than returning wrong weights.

Saving writes ``arrays/`` first and ``jaxquant.json`` last, so a directory without
``jaxquant.json`` is an incomplete save. Checkpoints are written by one process with fully
addressable arrays.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import jaxquant
from jaxquant import entropy, packing, scaling
from jaxquant.entropy import rans, symbols
from jaxquant.qarray import QuantisedArray

__all__ = ["FORMAT_VERSION", "read_metadata", "restore", "save"]

# 2: QuantisedArray has no format_name or scaling; codebooks have 2**bits. 3: entropy-coded
# codes and the "sizes" field (version 2 files are read as well).
FORMAT_VERSION = 3
_READABLE_FORMAT_VERSIONS = (2, 3)

_ARRAYS = "arrays"
_METADATA = "jaxquant.json"
_STATIC_FIELDS = ("bits", "block_size", "axis", "granularity",
                  "shape", "dtype", "layout", "layout_version", "scale_group")
_PARTS = ("codes", "scales", "codebook", "scale_scales", "offsets", "offset_scales")
_ARRAY_KEYS = {"shape", "dtype", "sha256"}
_CODED_KEYS = {"size", "chunk_size", "precision", "n_symbols", "array", "bits"}
_SIZE_KEYS = ("ideal", "coded", "fixed")
# PEP 440, Appendix B: a canonical public version, then an optional local version label.
_VERSION = re.compile(r"([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
                      r"((a|b|rc)(0|[1-9][0-9]*))?(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?"
                      r"(\+[a-z0-9]+(\.[a-z0-9]+)*)?")


def _pure(tree):
  """The tree whose leaves are saved: an NNX model's state as a nested dict, else `tree`."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _key_name(entry) -> str:
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      name = str(getattr(entry, attribute))
      if "/" in name:
        raise ValueError(f"the tree has a key {name!r} with a '/', which checkpoint paths use "
                         "as a separator")
      return name
  raise TypeError(f"unsupported pytree key {entry!r}")


def _flatten(tree) -> tuple[dict[str, Any], Any]:
  """({'/'-joined path: leaf}, treedef), `QuantisedArray`s kept whole as leaves."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, QuantisedArray))
  flat = {}
  for key_path, leaf in leaves:
    path = "/".join(_key_name(entry) for entry in key_path)
    if not isinstance(leaf, QuantisedArray) and not (
        hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      raise TypeError(f"leaf {path!r} is a {type(leaf).__name__}, not an array or a "
                      "QuantisedArray")
    flat[path] = leaf
  return flat, treedef


def _parts(q: QuantisedArray) -> dict[str, Any]:
  return {name: getattr(q, name) for name in _PARTS if getattr(q, name) is not None}


def _sha256(path: str, array) -> str:
  """The SHA-256 of a concrete array's bytes (C order, little-endian)."""
  if not getattr(array, "is_fully_addressable", True):
    raise ValueError(f"array {path!r} is not fully addressable; checkpoints are written and "
                     "read by one process")
  if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
    array = jax.random.key_data(array)
  host = np.asarray(array)
  host = np.ascontiguousarray(host, host.dtype.newbyteorder("<"))
  return hashlib.sha256(host.reshape(-1).view(np.uint8)).hexdigest()


def _array_entry(path: str, array, checksum: bool) -> dict[str, Any]:
  entry = {"shape": [int(d) for d in array.shape], "dtype": str(array.dtype)}
  if checksum:
    entry["sha256"] = _sha256(path, array)
  return entry


def _describe(flat: dict[str, Any], checksum: bool, coded=None) -> dict[str, Any]:
  """The ``leaves`` table of ``jaxquant.json`` (without checksums for a restore target);
  `coded` maps the paths whose codes are stored coded to their `EntropyCodedArray`s."""
  coded = coded or {}
  leaves = {}
  for path, leaf in flat.items():
    if isinstance(leaf, QuantisedArray):
      static = {name: getattr(leaf, name) for name in _STATIC_FIELDS}
      static["shape"] = [int(d) for d in leaf.shape]
      static["dtype"] = str(np.dtype(leaf.dtype))
      leaves[path] = {"quantised_array": static, "arrays": {
          name: _array_entry(f"{path}/{name}", part, checksum)
          for name, part in _parts(leaf).items()}}
      if path in coded:
        leaves[path]["coded"] = _coded_entry(path, coded[path], leaf)
    else:
      leaves[path] = _array_entry(path, leaf, checksum)
  return leaves


def _leaf_sizes(compressed, leaf: QuantisedArray) -> dict[str, float]:
  """The bits of a leaf's codes and scales: ideal coder, as `save` stores them, packed."""
  return {"ideal": compressed.ideal_bits_per_param * leaf.size,
          "coded": min(compressed.storage_bits, leaf.storage_bits),
          "fixed": leaf.storage_bits}


def _coded_entry(path: str, compressed, leaf: QuantisedArray) -> dict[str, Any]:
  stream = compressed.stream
  return {"size": stream.size, "chunk_size": stream.chunk_size, "precision": stream.precision,
          "n_symbols": stream.n_symbols,
          "array": _array_entry(f"{path}/coded", stream.serialised(), True),
          "bits": _leaf_sizes(compressed, leaf)}


def _arrays_tree(flat: dict[str, Any], value, coded=None) -> dict[str, Any]:
  """The nested dict stored by orbax, each array (or `QuantisedArray` part) mapped by `value`;
  `coded` maps the paths stored coded to their serialised streams, which replace their codes."""
  coded = coded or {}
  tree = {}
  for path, leaf in flat.items():
    *parents, last = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    if isinstance(leaf, QuantisedArray):
      node[last] = {name: value(part) for name, part in _parts(leaf).items()
                    if not (path in coded and name == "codes")}
      if path in coded:
        node[last]["coded"] = value(coded[path])
    else:
      node[last] = value(leaf)
  return tree


def _compressed_leaves(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
  """Each `QuantisedArray` leaf rANS-coded: those that code smaller than they pack, and the
  ``sizes`` totals over all of them."""
  coded, totals = {}, dict.fromkeys(_SIZE_KEYS, 0.0)
  for path, leaf in flat.items():
    if isinstance(leaf, QuantisedArray):
      compressed = entropy.compress(leaf)
      for key, bits in _leaf_sizes(compressed, leaf).items():
        totals[key] += bits
      if compressed.storage_bits < leaf.storage_bits:
        coded[path] = compressed
  return coded, totals


def save(path, model_or_params, *, overwrite: bool = False, entropy_coded: bool = False) -> None:
  """Saves an NNX model's state, or a pytree of arrays and `QuantisedArray`s, to `path`.

  Args:
    path: a local directory; created if missing.
    model_or_params: an `nnx.Module` (its whole `nnx.state`), an `nnx.State`, or any pytree
      whose leaves are arrays or `QuantisedArray`s (e.g. Linen params).
    overwrite: replace a checkpoint already at `path`.
    entropy_coded: store the codes of each `QuantisedArray` rANS-coded
      (`jaxquant.entropy.compress`) where that is smaller than packed, and record the sizes
      (module docstring); `restore` decodes them back into the packed codes.

  Raises:
    FileExistsError: `path` is not empty and `overwrite` is False, or `path` holds files that
      are not a jaxquant checkpoint's (they are never deleted).
    TypeError: a leaf is not an array or a `QuantisedArray`, or `entropy_coded` is not a bool.
    ValueError: the tree has no arrays, a key contains '/', or an array is not fully
      addressable.
  """
  if not isinstance(entropy_coded, bool):
    raise TypeError(f"entropy_coded={entropy_coded!r} must be a bool")
  path = os.path.abspath(os.fspath(path))
  flat, _ = _flatten(_pure(model_or_params))
  if not flat:
    raise ValueError("there is nothing to save: the tree has no arrays")
  for leaf_path, leaf in flat.items():
    arrays = _parts(leaf).values() if isinstance(leaf, QuantisedArray) else (leaf,)
    if not all(isinstance(a, (jax.Array, np.ndarray, np.generic)) for a in arrays):
      raise TypeError(f"leaf {leaf_path!r} holds no concrete array (an abstract model or "
                      "ShapeDtypeStruct cannot be saved)")
  coded, totals = _compressed_leaves(flat) if entropy_coded else ({}, None)
  metadata = {"format_version": FORMAT_VERSION, "jaxquant_version": jaxquant.__version__,
              "packing": {"layout": packing.LAYOUT, "layout_version": packing.LAYOUT_VERSION},
              "leaves": _describe(flat, checksum=True, coded=coded)}
  if totals is not None:
    metadata["sizes"] = totals
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace the "
                            "checkpoint there")
    foreign = sorted(set(os.listdir(path)) - {_ARRAYS, _METADATA})
    if foreign:
      raise FileExistsError(f"{path} holds {foreign}, which a jaxquant checkpoint does not; "
                            "refusing to overwrite it")
    # The metadata goes first: a save interrupted from here on leaves no jaxquant.json.
    if os.path.exists(os.path.join(path, _METADATA)):
      os.remove(os.path.join(path, _METADATA))
    shutil.rmtree(os.path.join(path, _ARRAYS), ignore_errors=True)
  os.makedirs(path, exist_ok=True)
  streams = {leaf_path: compressed.stream.serialised() for leaf_path, compressed in coded.items()}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, _ARRAYS), _arrays_tree(flat, lambda a: a, streams))
    checkpointer.wait_until_finished()
  partial = os.path.join(path, _METADATA + ".partial")
  with open(partial, "w", encoding="utf-8") as file:
    json.dump(metadata, file, indent=1)
  os.replace(partial, os.path.join(path, _METADATA))


def _require(condition: bool, path: str, problem: str) -> None:
  if not condition:
    raise ValueError(f"{path} is not a valid jaxquant checkpoint: {problem}")


def _check_version(path: str, name: str, where: str, found, supported: tuple[int, ...],
                   written_by: str) -> None:
  """Refuses `found` unless it is one of the `supported` versions called `name`, naming them."""
  _require(isinstance(found, int) and not isinstance(found, bool), path,
           f"{name} {found!r}{where} is not an integer")
  if found not in supported:
    newer = found > max(supported)
    shown = " or ".join(map(str, supported))
    raise ValueError(
        f"the checkpoint at {path} has {name} {found}{where}, {'newer' if newer else 'older'} "
        f"than the {name} {shown} this jaxquant ({jaxquant.__version__}) reads{written_by}: "
        + ("upgrade jaxquant to load it" if newer else "this jaxquant reads no other"))


def _check_packing(path: str, where: str, layout, written_by: str) -> None:
  """Refuses a packing layout other than the one this jaxquant reads, naming both."""
  _require(isinstance(layout, dict) and set(layout) == {"layout", "layout_version"}, path,
           f"packing {layout!r}{where} is malformed")
  if layout["layout"] != packing.LAYOUT:
    raise ValueError(f"the checkpoint at {path} packs codes{where} in layout "
                     f"{layout['layout']!r}, but this jaxquant ({jaxquant.__version__}) reads "
                     f"only {packing.LAYOUT!r}{written_by}")
  _check_version(path, "layout_version", where, layout["layout_version"],
                 (packing.LAYOUT_VERSION,), written_by)


def _valid_array_entry(entry) -> bool:
  return (isinstance(entry, dict) and set(entry) == _ARRAY_KEYS
          and isinstance(entry["shape"], list)
          and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
          and isinstance(entry["dtype"], str) and isinstance(entry["sha256"], str))


def read_metadata(path) -> dict[str, Any]:
  """The parsed and checked ``jaxquant.json`` of the checkpoint at `path`.

  Raises:
    FileNotFoundError: `path` is not a directory.
    ValueError: ``jaxquant.json`` is missing or is not valid JSON; its ``format_version``, its
      packing layout or a leaf's is not the one this jaxquant reads (newer or older: the
      message names both versions); its ``jaxquant_version`` is not a PEP 440 version string;
      or it lacks a field this format requires.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  file = os.path.join(path, _METADATA)
  _require(os.path.isfile(file), path, f"it has no {_METADATA} (an interrupted save, or not "
           "written by jaxquant.checkpoint.save)")
  try:
    with open(file, encoding="utf-8") as handle:
      metadata = json.load(handle)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not a valid jaxquant checkpoint: {_METADATA} is not valid "
                     f"JSON ({error})") from None
  _require(isinstance(metadata, dict) and "format_version" in metadata, path,
           f"{_METADATA} has no format_version")
  written = metadata.get("jaxquant_version")
  written_by = f" (it was written by jaxquant {written})" if isinstance(written, str) else ""
  _check_version(path, "format_version", "", metadata["format_version"],
                 _READABLE_FORMAT_VERSIONS, written_by)
  coding = metadata["format_version"] >= 3  # entropy-coded leaves and sizes are allowed
  fields = {"format_version", "jaxquant_version", "packing", "leaves"}
  _require(set(metadata) in (fields, fields | {"sizes"}) and (coding or "sizes" not in metadata),
           path, f"{_METADATA} has fields {sorted(metadata)}")
  _require("sizes" not in metadata or _valid_sizes(metadata["sizes"]), path,
           f"sizes {metadata.get('sizes')!r} is malformed")
  _require(isinstance(written, str) and _VERSION.fullmatch(written) is not None, path,
           f"jaxquant_version {written!r} is not a version string (PEP 440)")
  _check_packing(path, "", metadata["packing"], written_by)
  _require(isinstance(metadata["leaves"], dict), path, "leaves is not a JSON object")
  for leaf_path, entry in metadata["leaves"].items():
    if isinstance(entry, dict) and isinstance(entry.get("quantised_array"), dict):
      # Written before offsets and K-type groups: every group held 256 scales.
      entry["quantised_array"].setdefault("scale_group", scaling.DOUBLE_QUANT_GROUP)
    if isinstance(entry, dict) and "quantised_array" in entry:
      valid = (set(entry) - {"coded"} == {"quantised_array", "arrays"}
               and ("coded" not in entry or coding and _valid_coded(entry["coded"]))
               and isinstance(entry["quantised_array"], dict)
               and set(entry["quantised_array"]) == set(_STATIC_FIELDS)
               and isinstance(entry["arrays"], dict)
               and {"codes", "scales", "codebook"} <= set(entry["arrays"]) <= set(_PARTS)
               and all(map(_valid_array_entry, entry["arrays"].values())))
    else:
      valid = _valid_array_entry(entry)
    _require(valid, path, f"the entry of leaf {leaf_path!r} is malformed: {entry!r}")
    if "quantised_array" in entry:
      static = entry["quantised_array"]
      _check_packing(path, f" (leaf {leaf_path!r})", {name: static[name] for name in (
          "layout", "layout_version")}, written_by)
  return metadata


def _valid_sizes(sizes) -> bool:
  return (isinstance(sizes, dict) and set(sizes) == set(_SIZE_KEYS)
          and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  for v in sizes.values()))


def _valid_coded(coded) -> bool:
  counts = ("size", "chunk_size", "precision", "n_symbols")
  return (isinstance(coded, dict) and set(coded) == _CODED_KEYS
          and all(isinstance(coded[k], int) and not isinstance(coded[k], bool) for k in counts)
          and _valid_array_entry(coded["array"]) and _valid_sizes(coded["bits"]))


def _without_checksum(entry: dict[str, Any]) -> dict[str, Any]:
  return {name: value for name, value in entry.items() if name != "sha256"}


def _leaf_mismatch(path: str, saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
  """How the target's leaf `wanted` differs from the saved leaf `saved`, or None."""
  saved_kind, wanted_kind = ("a QuantisedArray" if "quantised_array" in entry else "an array"
                             for entry in (saved, wanted))
  if saved_kind != wanted_kind:
    return f"leaf {path!r} is {saved_kind} in the checkpoint but {wanted_kind} in the target"
  if "quantised_array" in saved:
    for field in _STATIC_FIELDS:
      if saved["quantised_array"][field] != wanted["quantised_array"][field]:
        return (f"leaf {path!r}: {field} is {saved['quantised_array'][field]!r} in the "
                f"checkpoint but {wanted['quantised_array'][field]!r} in the target")
    arrays = [(f"{path}/{name}", saved["arrays"].get(name), wanted["arrays"].get(name))
              for name in _PARTS]
  else:
    arrays = [(path, saved, wanted)]
  for array_path, saved_array, wanted_array in arrays:
    if (saved_array is None) != (wanted_array is None):
      where = "target" if saved_array is None else "checkpoint"
      return f"array {array_path!r} is only in the {where}"
    if saved_array is not None and _without_checksum(saved_array) != wanted_array:
      return (f"array {array_path!r} is {_without_checksum(saved_array)} in the checkpoint "
              f"but {wanted_array} in the target")
  return None


def _check_target(path: str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
  for leaf_path, entry in saved.items():
    problem = (f"leaf {leaf_path!r} is in the checkpoint but not in the target"
               if leaf_path not in wanted else _leaf_mismatch(leaf_path, entry, wanted[leaf_path]))
    if problem:
      raise ValueError(f"the target does not match the checkpoint at {path}: {problem}")
  extra = next((leaf_path for leaf_path in wanted if leaf_path not in saved), None)
  if extra is not None:
    raise ValueError(f"the target does not match the checkpoint at {path}: leaf {extra!r} is "
                     "in the target but not in the checkpoint")


def restore(path, target):
  """The checkpoint at `path` restored into the structure of `target`.

  Args:
    path: a directory written by `save`.
    target: an NNX model (e.g. ``nnx.eval_shape(lambda: quantise_model(Model(rngs), rules))``,
      or a freshly built quantised model) or `nnx.State`, which is updated in place and
      returned; or a pytree like the saved one with array or `jax.ShapeDtypeStruct` leaves
      (a sharding on a leaf is kept), for which a new pytree is returned.

  Returns:
    `target` holding the saved values (NNX), or a pytree of `target`'s structure.

  Raises:
    FileNotFoundError: `path` is not a directory.
    ValueError: ``jaxquant.json`` is missing or invalid (see `read_metadata`); the target's
      leaf paths, shapes, dtypes or `QuantisedArray` metadata differ from the checkpoint's
      (the message names the first differing leaf and both values); the array files are
      unreadable or do not match their checksums; or an entropy-coded leaf's stream fails its
      checks or decodes to codes other than those saved.

  Entropy-coded codes are decoded in parallel threads, one leaf per thread.
  """
  metadata = read_metadata(path)
  path = os.path.abspath(os.fspath(path))
  flat, treedef = _flatten(_pure(target))
  _check_target(path, metadata["leaves"], _describe(flat, checksum=False))

  def abstract(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))

  host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])  # streams decode on the host
  coded = {leaf_path: jax.ShapeDtypeStruct(tuple(saved["coded"]["array"]["shape"]),
                                            np.dtype(saved["coded"]["array"]["dtype"]),
                                            sharding=host)
           for leaf_path, saved in metadata["leaves"].items() if "coded" in saved}
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      arrays = checkpointer.restore(os.path.join(path, _ARRAYS),
                                    _arrays_tree(flat, abstract, coded))
  except Exception as error:  # orbax raises bare Exceptions for bad files.
    cause = error  # The innermost error says which file failed and how (tensorstore's).
    while cause.__cause__ is not None:
      cause = cause.__cause__
    raise ValueError(f"could not read the arrays of the checkpoint at {path}: {cause}") from error
  restored, nodes = {}, {}
  for leaf_path, leaf in flat.items():
    node = arrays
    for part in leaf_path.split("/"):
      node = node[part]
    nodes[leaf_path] = node
    saved = metadata["leaves"][leaf_path]
    stored = ([(f"{leaf_path}/{name}", node[name], entry)
               for name, entry in saved["arrays"].items() if name in node]
              + ([(f"{leaf_path}/coded", node["coded"], saved["coded"]["array"])]
                 if "coded" in saved else [])
              if isinstance(leaf, QuantisedArray) else [(leaf_path, node, saved)])
    for array_path, array, entry in stored:
      if _sha256(array_path, array) != entry["sha256"]:
        raise ValueError(f"array {array_path!r} of the checkpoint at {path} does not match its "
                         "checksum: the array files are corrupted")
  with concurrent.futures.ThreadPoolExecutor(rans.default_threads()) as pool:
    decoded = dict(zip(coded, pool.map(
        lambda leaf_path: _decoded_codes(path, leaf_path, flat[leaf_path], nodes[leaf_path],
                                         metadata["leaves"][leaf_path]), coded)))
  for leaf_path, leaf in flat.items():
    node = nodes[leaf_path]
    if leaf_path in decoded:
      node = {**node, "codes": decoded[leaf_path]}
    restored[leaf_path] = (dataclasses.replace(leaf, **{name: node.get(name) for name in _PARTS})
                           if isinstance(leaf, QuantisedArray) else node)
  values = jax.tree_util.tree_unflatten(treedef, list(restored.values()))
  if not isinstance(target, (nnx.Module, nnx.State)):
    return values
  state = nnx.state(target) if isinstance(target, nnx.Module) else target
  nnx.replace_by_pure_dict(state, values)
  if isinstance(target, nnx.Module):
    nnx.update(target, state)
  return target


def _decoded_codes(path: str, leaf_path: str, leaf: QuantisedArray, node, saved) -> jax.Array:
  """The packed codes of an entropy-coded leaf: its stream decoded (one thread), packed, and
  checked against the saved codes' checksum; placed like the target's codes."""
  coded, static = saved["coded"], saved["quantised_array"]
  try:
    stream = rans.CodedStream.deserialised(node["coded"], coded["size"], coded["chunk_size"],
                                           coded["precision"], coded["n_symbols"])
    codes = rans.decode(stream, threads=1).reshape(tuple(static["shape"]))
  except ValueError as error:
    raise ValueError(f"leaf {leaf_path!r} of the checkpoint at {path}: {error}") from None
  words = symbols.packed_words(codes, np.asarray(node["codebook"]), static["axis"],
                               static["block_size"], static["bits"])
  if _sha256(f"{leaf_path}/codes", words) != saved["arrays"]["codes"]["sha256"]:
    raise ValueError(f"the codes of leaf {leaf_path!r} of the checkpoint at {path} decode to "
                     "other codes than were saved")
  sharding = getattr(leaf.codes, "sharding", None)
  return words if sharding is None else jax.device_put(words, sharding)
