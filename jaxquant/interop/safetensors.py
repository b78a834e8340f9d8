"""Packed `QuantisedArray`s in one ``.safetensors`` file that describes itself.

The safetensors format (Hugging Face): an unsigned 64-bit little-endian header length N, N
bytes of JSON mapping each tensor name to its ``dtype``, ``shape`` and ``data_offsets`` (with
an optional ``__metadata__`` mapping of strings), then the tensors' little-endian bytes, back
to back. Any safetensors reader loads these files.

A `QuantisedArray` ``name`` is stored as the tensors ``name.codes`` (U32, the packed words),
``name.scales`` (in their storage dtype: F32, BF16, F8_E4M3, F8_E8M0, U8 or I8),
``name.codebook`` (F32) and, when it has them, ``name.scale_scales`` (F32), ``name.offsets``
(stored like the scales) and ``name.offset_scales``; the metadata key ``jaxquant`` holds a
JSON object::

    {"format_version": 1, "jaxquant_version": "0.1.0",
     "arrays": {"name": {"bits": 4, "block_size": 64, "axis": 0, "granularity": "block",
                         "shape": [512, 256], "dtype": "bfloat16",
                         "layout": "bitstream-u32", "layout_version": 1, "scale_group": 256,
                         "codebook": [-1.0, -0.6961928009986877, ...]}}}

which is everything needed to read the codes (`jaxquant.packing`), plus the codebook's values
for a reader that looks at the header alone. Every other tensor is stored as it is. `load`
refuses a file whose ``format_version`` or ``layout_version`` it does not read, and parts whose
shapes do not fit their metadata, naming the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jaxquant
from jaxquant import packing, scaling
from jaxquant.qarray import QuantisedArray

__all__ = ["FORMAT_VERSION", "load", "save"]

FORMAT_VERSION = 1
_KEY = "jaxquant"
_PARTS = ("codes", "scales", "codebook", "scale_scales", "offsets", "offset_scales")
_OPTIONAL_PARTS = ("scale_scales", "offsets", "offset_scales")
_STATIC = ("bits", "block_size", "axis", "granularity", "layout", "layout_version",
           "scale_group")
_DTYPES = {
    "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _host(name: str, array) -> np.ndarray:
  host = np.asarray(array)
  if host.dtype not in _NAMES:
    raise TypeError(f"tensor {name!r} has dtype {host.dtype}, which safetensors cannot hold "
                    f"(it holds {sorted(str(d) for d in _NAMES)})")
  return np.asarray(host, host.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d


def _description(q: QuantisedArray) -> dict[str, Any]:
  description = {field: getattr(q, field) for field in _STATIC}
  description |= {"shape": [int(d) for d in q.shape], "dtype": np.dtype(q.dtype).name,
                  "codebook": [float(v) for v in np.asarray(q.codebook, np.float32)]}
  return description


def save(path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name → `QuantisedArray` or array) to the safetensors file `path`.

  Args:
    path: the file to write (replaced if it exists).
    tensors: the tensors by name; a `QuantisedArray` takes the names ``name.codes`` etc.
    metadata: more ``__metadata__`` strings (any key but ``"jaxquant"``).

  Raises:
    TypeError: a tensor has a dtype safetensors cannot hold, or metadata is not strings.
    ValueError: two tensors would get one name, or `metadata` uses the key ``"jaxquant"``.
  """
  metadata = dict(metadata or {})
  if _KEY in metadata:
    raise ValueError(f"metadata key {_KEY!r} is jaxquant's own; use another key")
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise TypeError("metadata must map strings to strings, as safetensors stores it")
  flat, described = {}, {}
  for name, value in tensors.items():
    if isinstance(value, QuantisedArray):
      described[name] = _description(value)
      parts = {f"{name}.{part}": getattr(value, part) for part in _PARTS
               if getattr(value, part) is not None}
    else:
      parts = {name: value}
    for key, array in parts.items():
      if key in flat:
        raise ValueError(f"two tensors would be stored as {key!r}; rename one")
      flat[key] = _host(key, array)
  metadata[_KEY] = json.dumps({"format_version": FORMAT_VERSION,
                               "jaxquant_version": jaxquant.__version__, "arrays": described})
  header, offset = {"__metadata__": metadata}, 0
  for key, array in flat.items():
    header[key] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                   "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  text = json.dumps(header).encode("utf-8")
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(os.fspath(path), "wb") as file:
    file.write(struct.pack("<Q", len(text)))
    file.write(text)
    for array in flat.values():
      file.write(array.tobytes())


def _read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  with open(os.fspath(path), "rb") as file:
    data = file.read()
  if len(data) < 8:
    raise ValueError(f"{os.fspath(path)!r} is not a safetensors file (too short)")
  (length,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + length].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"{os.fspath(path)!r}: its safetensors header is not JSON: {error}") from None
  metadata = header.pop("__metadata__", None) or {}
  body, arrays = memoryview(data)[8 + length:], {}
  for name, entry in header.items():
    if entry.get("dtype") not in _DTYPES:
      raise ValueError(f"tensor {name!r} has dtype {entry.get('dtype')!r}, which this reader "
                       f"does not know")
    begin, end = entry["data_offsets"]
    dtype = _DTYPES[entry["dtype"]].newbyteorder("<")
    if not 0 <= begin <= end <= len(body) or (end - begin) != dtype.itemsize * int(
        np.prod(entry["shape"])):
      raise ValueError(f"tensor {name!r}: offsets {entry['data_offsets']} do not fit its "
                       f"shape {entry['shape']} and dtype {entry['dtype']} in the file")
    arrays[name] = np.frombuffer(body[begin:end], dtype).reshape(entry["shape"])
  return arrays, metadata


def _check(name: str, q: QuantisedArray) -> None:
  """Raises ValueError naming `name` when the parts of `q` do not fit its metadata."""
  n = q.shape[q.axis]
  along = -(-n // q.block_size) * q.block_size
  codes = list(q.shape)
  codes[q.axis] = packing.packed_length(-(-along // packing.GROUP) * packing.GROUP, q.bits)
  scales = [1] * q.ndim if q.granularity == "tensor" else list(q.shape)
  if q.granularity != "tensor":
    scales[q.axis] = q.n_blocks
  for part, want in (("codes", codes), ("scales", scales), ("codebook", [2**q.bits]),
                     ("offsets", scales)):
    if getattr(q, part) is None:
      continue
    got = list(getattr(q, part).shape)
    if got != want:
      raise ValueError(f"tensor {name}.{part} has shape {got}; its metadata (shape "
                       f"{list(q.shape)}, axis {q.axis}, block_size {q.block_size}, bits "
                       f"{q.bits}) needs {want}")


def load(path) -> dict[str, Any]:
  """The tensors of the safetensors file `path`: `QuantisedArray`s where `save` wrote them,
  jax arrays otherwise.

  Raises:
    ValueError: an unreadable file, a format or layout version this jaxquant does not read,
      or parts that do not fit their metadata (the message names the tensor).
  """
  arrays, metadata = _read(path)
  described = {}
  if _KEY in metadata:
    info = json.loads(metadata[_KEY])
    if info.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{os.fspath(path)!r} was written by jaxquant "
                       f"{info.get('jaxquant_version')} in format_version "
                       f"{info.get('format_version')}; this jaxquant reads {FORMAT_VERSION}")
    described = info["arrays"]
  out = {}
  for name, description in described.items():
    if (description["layout"], description["layout_version"]) != (packing.LAYOUT,
                                                                  packing.LAYOUT_VERSION):
      raise ValueError(f"tensor {name!r} is packed in layout {description['layout']} v"
                       f"{description['layout_version']}; this jaxquant reads "
                       f"{packing.LAYOUT} v{packing.LAYOUT_VERSION}")
    parts = {}
    for part in _PARTS:
      key = f"{name}.{part}"
      if key not in arrays and part not in _OPTIONAL_PARTS:
        raise ValueError(f"the file has no tensor {key!r}, which {name!r} needs")
      parts[part] = jnp.asarray(arrays.pop(key)) if key in arrays else None
    static = {"scale_group": scaling.DOUBLE_QUANT_GROUP} | description  # (older files)
    q = QuantisedArray(**parts, shape=tuple(static["shape"]),
                       dtype=np.dtype(jnp.dtype(static["dtype"])),
                       **{field: static[field] for field in _STATIC})
    _check(name, q)
    out[name] = q
  return out | {name: jnp.asarray(array) for name, array in arrays.items()}
