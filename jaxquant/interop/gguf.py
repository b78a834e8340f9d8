"""llama.cpp's GGUF files to and from packed `QuantisedArray`s, without a float round trip.

GGUF (ggml-org/llama.cpp, read and written with the `gguf` package) stores a tensor with its
dimensions innermost first (ne₀ = the last numpy axis) and quantises it in blocks of 32
consecutive elements along ne₀, each block a float16 scale d and 32 codes. The symmetric
types are a codebook and a block scale, w = d·v[code]:

  ========  ===========================================  ==================================
  type      block bytes                                   v[code]
  ========  ===========================================  ==================================
  Q8_0      d, 32 int8 q                                  q (INT8, -128..127)
  Q4_0      d, 16 bytes: low nibbles are elements 0-15,   q - 8 (INT4)
            high nibbles 16-31
  Q5_0      d, a little-endian uint32 of fifth bits       q - 16 (INT5)
            (bit j is element j's), 16 bytes as Q4_0
  IQ4_NL    d, 16 bytes as Q4_0                           a fixed table of 16 values,
                                                          -127 … 113
  ========  ===========================================  ==================================

so each becomes a `QuantisedArray` blocked along its last axis (B = 32, float16 scales, the
format's codebook sorted by code), whose `dequantise` gives the `gguf` package's float32
values bit for bit (both form d·v in float32). The asymmetric types (Q4_1, Q5_1, the K types)
need a block minimum jaxquant's scaling does not yet have: `load` refuses them, or with
``unsupported="dequantise"`` returns their float32 values from `gguf.quants.dequantize`.
F32, F16 and BF16 tensors are arrays.

`save` writes `QuantisedArray`s whose codebook, B = 32 and float16 scales are one of those
types (INT4 → Q4_0, INT5 → Q5_0, INT8 → Q8_0, the IQ4_NL table → IQ4_NL) and float arrays as
F32, F16 or BF16, and refuses other arrays naming the nearest type and the `QuantSpec` that
fits it. The blocked axis is written last (ne₀): a Flax kernel [in, out] blocked along `in`
is stored [out, in], as llama.cpp stores its weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import packing
from jaxquant.formats import Format, int_format, parse
from jaxquant.qarray import QuantisedArray, padded_codebook

__all__ = ["IQ4_NL_VALUES", "TYPES", "iq4_nl", "load", "save"]

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""llama.cpp's ``kvalues_iq4nl``: the IQ4_NL codebook (in units of the block scale)."""
TYPES = ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL")
"""The quantised GGUF types read into and written from packed arrays."""
_BLOCK = 32
_BITS = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8, "IQ4_NL": 4}
_FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16)}


def iq4_nl() -> Format:
  """The IQ4_NL format: llama.cpp's 16 non-uniform values, for blocks of 32."""
  return parse("lut4:" + ",".join(str(v) for v in IQ4_NL_VALUES))


def _codebook(gguf_type: str) -> np.ndarray:
  fmt = iq4_nl() if gguf_type == "IQ4_NL" else int_format(_BITS[gguf_type])
  return np.asarray(fmt.values, np.float32)


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("GGUF files need the gguf package: pip install gguf (or jaxquant[eval])"
                      ) from None
  return gguf


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """[blocks, 16] bytes → [blocks, 32] codes: the low nibbles, then the high ones."""
  return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _decode_blocks(gguf_type: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(codes [blocks, 32] as indices into the sorted codebook, float16 scales [blocks])."""
  scales = blocks[:, :2].copy().view(np.float16)[:, 0]
  if gguf_type == "Q8_0":
    return blocks[:, 2:].view(np.int8).astype(np.int32) + 128, scales
  if gguf_type == "Q5_0":
    high = blocks[:, 2:6].copy().view("<u4")[:, :1] >> np.arange(32, dtype=np.uint32)
    return _nibbles(blocks[:, 6:]) | ((high & 1).astype(np.uint8) << 4), scales
  return _nibbles(blocks[:, 2:]), scales  # Q4_0 (q - 8 is code q of INT4), IQ4_NL


def _encode_blocks(gguf_type: str, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """The inverse of `_decode_blocks`: [blocks, block bytes] uint8."""
  d = scales.astype(np.float16).reshape(-1, 1).view(np.uint8)
  if gguf_type == "Q8_0":
    return np.concatenate([d, (codes.astype(np.int32) - 128).astype(np.int8).view(np.uint8)], 1)
  low = (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)
  parts = [d, low.astype(np.uint8)]
  if gguf_type == "Q5_0":
    fifth = ((codes >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    parts.insert(1, fifth.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8))
  return np.concatenate(parts, axis=1)


def _quantised(gguf_type: str, data: np.ndarray, shape: tuple[int, ...],
               block_bytes: int) -> QuantisedArray:
  bits = _BITS[gguf_type]
  codes, scales = _decode_blocks(gguf_type, data.reshape(-1, block_bytes))
  scales_shape = shape[:-1] + (shape[-1] // _BLOCK,)
  codes = codes.reshape(shape[:-1] + (-1,))[..., :shape[-1]].astype(np.uint32)
  pad = [(0, 0)] * (len(shape) - 1) + [(0, -shape[-1] % packing.GROUP)]
  return QuantisedArray(
      codes=packing.pack(jnp.asarray(np.pad(codes, pad)), bits, axis=len(shape) - 1),
      scales=jnp.asarray(scales.reshape(scales_shape)),
      codebook=padded_codebook(jnp.asarray(_codebook(gguf_type)), bits), scale_scales=None,
      shape=shape, dtype=np.dtype(np.float32), axis=len(shape) - 1, block_size=_BLOCK,
      bits=bits, granularity="block")


def load(path, *, unsupported: str = "raise") -> dict[str, Any]:
  """The tensors of the GGUF file `path` by name: `QuantisedArray`s for the types in `TYPES`,
  numpy arrays for F32/F16/BF16 (shapes in numpy order, ne reversed).

  Args:
    path: a ``.gguf`` file.
    unsupported: ``"raise"`` for other quantised types, or ``"dequantise"`` to return them as
      float32 arrays (`gguf.quants.dequantize`).

  Raises:
    NotImplementedError: a tensor of another quantised type (with ``unsupported="raise"``);
      the message names it and its type.
    ValueError: `unsupported` is neither value.
  """
  if unsupported not in ("raise", "dequantise"):
    raise ValueError(f"{unsupported=} must be 'raise' or 'dequantise'")
  gguf = _gguf()
  out = {}
  for tensor in gguf.GGUFReader(os.fspath(path)).tensors:
    shape = tuple(int(d) for d in reversed(tensor.shape))
    kind, data = tensor.tensor_type.name, np.asarray(tensor.data)
    if kind in _FLOATS:
      out[tensor.name] = data.view(_FLOATS[kind]).reshape(shape)
    elif kind in TYPES and shape[-1] % _BLOCK == 0:
      block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
      out[tensor.name] = _quantised(kind, data, shape, block_bytes)
    elif unsupported == "dequantise":
      out[tensor.name] = gguf.quants.dequantize(data, tensor.tensor_type).reshape(shape)
    else:
      raise NotImplementedError(
          f"tensor {tensor.name!r} is {kind}, which jaxquant does not read as packed codes "
          f"(it reads {TYPES}); load(..., unsupported='dequantise') returns it as float32")
  return out


def _gguf_type(name: str, q: QuantisedArray) -> str:
  """The GGUF type that holds `q` exactly, or a ValueError naming the nearest."""
  codebook = np.asarray(q.codebook, np.float32)
  by_codebook = [t for t in TYPES if _BITS[t] == q.bits and
                 np.array_equal(np.asarray(padded_codebook(_codebook(t), q.bits)), codebook)]
  fits = (q.granularity == "block" and q.block_size == _BLOCK and q.scales.dtype == jnp.float16
          and q.shape[q.axis] % _BLOCK == 0)
  if by_codebook and fits:
    return by_codebook[0]
  nearest = by_codebook[0] if by_codebook else {4: "IQ4_NL", 5: "Q5_0"}.get(q.bits, "Q8_0")
  spec = {"Q4_0": "'int4'", "Q5_0": "'int5'", "Q8_0": "'int8'",
          "IQ4_NL": "jaxquant.interop.gguf.iq4_nl()"}[nearest]
  raise ValueError(
      f"{name!r} ({q!r}, {q.scales.dtype} scales) is no GGUF type; the nearest is {nearest} "
      f"(its codebook, B = 32 along an axis of whole blocks, float16 scales): "
      f"QuantSpec({spec}, block_size=32, scale_dtype='float16')")


def save(path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
         arch: str = "jaxquant") -> None:
  """Writes `tensors` (name → `QuantisedArray` or float array) to the GGUF file `path`.

  Args:
    path: the file to write.
    tensors: `QuantisedArray`s of a type in `TYPES` (module docstring) and float32, float16
      or bfloat16 arrays.
    metadata: key-value pairs for the header: str, bool, int, float or lists of them.
    arch: ``general.architecture``.

  Raises:
    ValueError: a `QuantisedArray` no GGUF type holds exactly (the message names the
      nearest), or a metadata value of another kind.
    TypeError: an array of another dtype.
  """
  gguf = _gguf()
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  for key, value in (metadata or {}).items():
    if isinstance(value, (list, tuple)):
      writer.add_array(key, list(value))
    elif isinstance(value, bool):
      writer.add_bool(key, value)
    elif isinstance(value, int):
      writer.add_int64(key, value)
    elif isinstance(value, float):
      writer.add_float32(key, value)
    elif isinstance(value, str):
      writer.add_string(key, value)
    else:
      raise ValueError(f"metadata[{key!r}] is a {type(value).__name__}; GGUF holds str, bool, "
                       "int, float and lists of them")
  for name, value in tensors.items():
    if isinstance(value, QuantisedArray):
      gguf_type = _gguf_type(name, value)
      codes = np.asarray(packing.unpack(value.codes, value.bits, axis=value.axis))
      codes = np.moveaxis(np.take(codes, np.arange(value.shape[value.axis]), value.axis),
                          value.axis, -1)
      scales = np.moveaxis(np.asarray(value.scales), value.axis, -1)
      blocks = _encode_blocks(gguf_type, codes.reshape(-1, _BLOCK), scales.reshape(-1))
      # The bytes of each row; gguf infers the element shape from them and the type.
      writer.add_tensor(name, blocks.reshape(codes.shape[:-1] + (-1,)),
                        raw_dtype=getattr(gguf.GGMLQuantizationType, gguf_type))
    else:
      array = np.asarray(value)
      kind = next((k for k, dtype in _FLOATS.items() if dtype == array.dtype), None)
      if kind is None:
        raise TypeError(f"tensor {name!r} has dtype {array.dtype}; GGUF floats are float32, "
                        "float16 and bfloat16 (quantise it, or cast it)")
      raw = array.view(np.uint16) if kind == "BF16" else array
      writer.add_tensor(name, raw, raw_shape=array.shape,
                        raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
