"""llama.cpp's GGUF files to and from packed `QuantisedArray`s, without a float round trip.

GGUF (ggml-org/llama.cpp, read and written with the `gguf` package) stores a tensor with its
dimensions innermost first (ne₀ = the last numpy axis) and quantises it in blocks of
consecutive elements along ne₀. Each type becomes a `QuantisedArray` blocked along its last
axis whose `dequantise` gives the `gguf` package's float32 values bit for bit (both form the
same products in float32; the products before the last rounding are exact):

  ========  ==========================================  ===================  ===============
  type      block bytes                                  v[code]              w
  ========  ==========================================  ===================  ===============
  Q8_0      d, 32 int8 q                                 q (INT8)             d·v
  Q4_0      d, 16 bytes: low nibbles are elements 0-15,  q - 8 (INT4)         d·v
            high nibbles 16-31
  Q5_0      d, a little-endian uint32 of fifth bits      q - 16 (INT5)        d·v
            (bit j is element j's), 16 bytes as Q4_0
  IQ4_NL    d, 16 bytes as Q4_0                          16 fixed values,     d·v
                                                         -127 … 113
  Q4_1      d, m, 16 bytes as Q4_0                       q (UINT4)            d·v + m
  Q4_K      super-block of 256: d, dmin, 12 bytes of     q (UINT4)            (d·sc)·v
            6-bit (sc, mn) for 8 sub-blocks of 32,                            − dmin·mn
            128 bytes of nibbles
  Q6_K      super-block of 256: 128 bytes of low         q - 32 (INT6)        (d·sc)·v
            nibbles, 64 of high 2-bit pairs, 16 int8
            sc for sub-blocks of 16, d
  ========  ==========================================  ===================  ===============

d, m, dmin are float16. Q4_0, Q5_0, Q8_0 and IQ4_NL have float16 block scales (B = 32); Q4_1
adds float16 offsets (`scaling="minmax"`). The K types keep their two-level scales as
double-quantised ones: the sub-block scales sc (and Q4_K's minima mn) as 8-bit codes, with
d (and −dmin) as the float32 scale of each group of 8 (Q4_K) or 16 (Q6_K) codes
(`QuantisedArray.scale_group`). jaxquant stores those codes in whole bytes, so a Q4_K
tensor costs 4.75 bits per element packed against GGUF's 4.5, a Q6_K tensor 6.625 against
6.5625. Other quantised types (Q5_1, Q2_K, Q3_K, Q5_K, Q8_K, the IQ types but IQ4_NL) are
refused, or with ``unsupported="dequantise"`` returned as float32 from
`gguf.quants.dequantize`. F32, F16 and BF16 tensors are arrays.

`save` writes `QuantisedArray`s whose codebook, B = 32 and float16 scales (and offsets) are
one of Q4_0, Q4_1, Q5_0, Q8_0 and IQ4_NL (INT4 → Q4_0, UINT4 with minmax → Q4_1, INT5 →
Q5_0, INT8 → Q8_0, the IQ4_NL table → IQ4_NL), and float arrays as F32, F16 or BF16; it
refuses other arrays naming the nearest type and the `QuantSpec` that fits it. The blocked
axis is written last (ne₀): a Flax kernel [in, out] blocked along `in` is stored [out, in],
as llama.cpp stores its weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant import packing, scaling
from jaxquant.formats import Format, int_format, parse, uint_format
from jaxquant.qarray import QuantisedArray, padded_codebook

__all__ = ["IQ4_NL_VALUES", "SAVED_TYPES", "TYPES", "iq4_nl", "load", "save"]

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""llama.cpp's ``kvalues_iq4nl``: the IQ4_NL codebook (in units of the block scale)."""
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "IQ4_NL", "Q4_K", "Q6_K")
"""The quantised GGUF types read into packed arrays."""
SAVED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "IQ4_NL")
"""The quantised GGUF types written from packed arrays."""
_BLOCK = 32
_SUPER_BLOCK = 256  # the K types' QK_K
_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q8_0": 8, "IQ4_NL": 4, "Q4_K": 4, "Q6_K": 6}
_ROW_MULTIPLE = {"Q4_K": _SUPER_BLOCK, "Q6_K": _SUPER_BLOCK}
_FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16)}


def iq4_nl() -> Format:
  """The IQ4_NL format: llama.cpp's 16 non-uniform values, for blocks of 32."""
  return parse("lut4:" + ",".join(str(v) for v in IQ4_NL_VALUES))


def _format(gguf_type: str) -> Format:
  if gguf_type == "IQ4_NL":
    return iq4_nl()
  if gguf_type in ("Q4_1", "Q4_K"):
    return uint_format(4)
  return int_format(_BITS[gguf_type])


def _codebook(gguf_type: str) -> np.ndarray:
  return np.asarray(_format(gguf_type).values, np.float32)


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("GGUF files need the gguf package: pip install gguf (or jaxquant[eval])"
                      ) from None
  return gguf


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """[..., L] bytes → [..., 2L] codes: the low nibbles, then the high ones."""
  return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _crumbs(qh: np.ndarray) -> np.ndarray:
  """[..., L] bytes → [..., 4L] 2-bit fields: bits 0-1 of every byte, then 2-3, 4-5, 6-7."""
  return np.concatenate([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
  """The float16 at byte `start` of every block, as float16 [blocks]."""
  return blocks[:, start:start + 2].copy().view(np.float16)[:, 0]


class _Parts(NamedTuple):
  """A type's blocks as a `QuantisedArray`'s parts, flattened in storage order."""
  codes: np.ndarray  # [elements], indices into the sorted codebook
  scales: np.ndarray  # [sub-blocks]: float16, or 8-bit codes (K types)
  offsets: np.ndarray | None = None  # Q4_1: float16 minima; Q4_K: 8-bit codes
  scale_scales: np.ndarray | None = None  # K types: float32 [super-blocks]
  offset_scales: np.ndarray | None = None


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_K's 12 bytes → the 6-bit scales and minima of its 8 sub-blocks ([blocks, 8] each).

  Bytes 0-3 hold scales 0-3 in their low 6 bits and the top 2 bits of scales 4-7 above;
  bytes 4-7 the same for the minima; bytes 8-11 the low 4 bits of scale 4+j (low nibble)
  and of minimum 4+j (high nibble)."""
  scales_low, minima_low, nibbles = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
  scales = np.concatenate([scales_low & 0x3F, (nibbles & 0xF) | ((scales_low >> 6) << 4)], 1)
  minima = np.concatenate([minima_low & 0x3F, (nibbles >> 4) | ((minima_low >> 6) << 4)], 1)
  return scales, minima


def _decode_blocks(gguf_type: str, blocks: np.ndarray) -> _Parts:
  """A tensor's [blocks, block bytes] as its `_Parts` (layouts: the module docstring)."""
  if gguf_type == "Q4_K":
    scales, minima = _q4_k_scales(blocks[:, 4:16])
    codes = _nibbles(blocks[:, 16:].reshape(-1, 4, 32))  # each 32 bytes: 64 elements
    return _Parts(codes.reshape(-1), scales.reshape(-1), minima.reshape(-1),
                  _half(blocks, 0).astype(np.float32), -_half(blocks, 2).astype(np.float32))
  if gguf_type == "Q6_K":
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64))  # each half: 128 elements
    high = _crumbs(blocks[:, 128:192].reshape(-1, 2, 32))
    return _Parts((low | (high << 4)).reshape(-1), blocks[:, 192:208].view(np.int8).reshape(-1),
                  scale_scales=_half(blocks, 208).astype(np.float32))
  scales = _half(blocks, 0)
  if gguf_type == "Q8_0":
    codes = blocks[:, 2:].view(np.int8).astype(np.int32) + 128
  elif gguf_type == "Q5_0":
    high = blocks[:, 2:6].copy().view("<u4")[:, :1] >> np.arange(32, dtype=np.uint32)
    codes = _nibbles(blocks[:, 6:]) | ((high & 1).astype(np.uint8) << 4)
  elif gguf_type == "Q4_1":
    return _Parts(_nibbles(blocks[:, 4:]).reshape(-1), scales, _half(blocks, 2))
  else:  # Q4_0 (q - 8 is code q of INT4), IQ4_NL
    codes = _nibbles(blocks[:, 2:])
  return _Parts(codes.reshape(-1), scales)


def _encode_blocks(gguf_type: str, codes: np.ndarray, scales: np.ndarray,
                   offsets: np.ndarray | None) -> np.ndarray:
  """The inverse of `_decode_blocks` for `SAVED_TYPES`: [blocks, block bytes] uint8."""
  half = lambda values: values.astype(np.float16).reshape(-1, 1).view(np.uint8)
  if gguf_type == "Q8_0":
    return np.concatenate([half(scales),
                           (codes.astype(np.int32) - 128).astype(np.int8).view(np.uint8)], 1)
  low = (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)
  parts = [half(scales), low.astype(np.uint8)]
  if gguf_type == "Q5_0":
    fifth = ((codes >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    parts.insert(1, fifth.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8))
  if gguf_type == "Q4_1":
    parts.insert(1, half(offsets))
  return np.concatenate(parts, axis=1)


def _quantised(gguf_type: str, data: np.ndarray, shape: tuple[int, ...],
               block_bytes: int) -> QuantisedArray:
  bits = _BITS[gguf_type]
  parts = _decode_blocks(gguf_type, data.reshape(-1, block_bytes))
  block_size = parts.codes.size // parts.scales.size
  per_block = shape[:-1] + (shape[-1] // block_size,)
  codes = parts.codes.reshape(shape).astype(np.uint32)
  pad = [(0, 0)] * (len(shape) - 1) + [(0, -shape[-1] % packing.GROUP)]
  optional = lambda array, shape=None: None if array is None else jnp.asarray(
      array if shape is None else array.reshape(shape))
  return QuantisedArray(
      codes=packing.pack(jnp.asarray(np.pad(codes, pad)), bits, axis=len(shape) - 1),
      scales=jnp.asarray(parts.scales.reshape(per_block)),
      codebook=padded_codebook(jnp.asarray(_codebook(gguf_type)), bits),
      scale_scales=optional(parts.scale_scales), shape=shape, dtype=np.dtype(np.float32),
      axis=len(shape) - 1, block_size=block_size, bits=bits, granularity="block",
      offsets=optional(parts.offsets, per_block), offset_scales=optional(parts.offset_scales),
      scale_group=(_SUPER_BLOCK // block_size if parts.scale_scales is not None
                   else scaling.DOUBLE_QUANT_GROUP))


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
    elif kind in TYPES and shape[-1] % _ROW_MULTIPLE.get(kind, _BLOCK) == 0:
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
  """The type of `SAVED_TYPES` that holds `q` exactly, or a ValueError naming the nearest."""
  codebook = np.asarray(q.codebook, np.float32)
  by_codebook = [t for t in SAVED_TYPES if _BITS[t] == q.bits and
                 np.array_equal(np.asarray(padded_codebook(_codebook(t), q.bits)), codebook)]
  offsets_fit = lambda t: (q.offsets is None if t != "Q4_1" else
                           q.offsets is not None and q.offsets.dtype == jnp.float16)
  fits = (q.granularity == "block" and q.block_size == _BLOCK and q.scales.dtype == jnp.float16
          and q.shape[q.axis] % _BLOCK == 0)
  if by_codebook and fits and offsets_fit(by_codebook[0]):
    return by_codebook[0]
  nearest = (by_codebook[0] if by_codebook else "Q4_1" if q.offsets is not None and q.bits <= 4
             else {4: "IQ4_NL", 5: "Q5_0"}.get(q.bits, "Q8_0"))
  spec = {"Q4_0": "'int4'", "Q4_1": "'uint4'", "Q5_0": "'int5'", "Q8_0": "'int8'",
          "IQ4_NL": "jaxquant.interop.gguf.iq4_nl()"}[nearest]
  offsets = "float16 offsets" if nearest == "Q4_1" else "no offsets"
  raise ValueError(
      f"{name!r} ({q!r}, {q.scales.dtype} scales) is no GGUF type jaxquant writes; the "
      f"nearest is {nearest} (its codebook, B = 32 along an axis of whole blocks, float16 "
      f"scales, {offsets}): QuantSpec({spec}, block_size=32, scale_dtype='float16')")


def save(path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
         arch: str = "jaxquant") -> None:
  """Writes `tensors` (name → `QuantisedArray` or float array) to the GGUF file `path`.

  Args:
    path: the file to write.
    tensors: `QuantisedArray`s of a type in `SAVED_TYPES` (module docstring) and float32,
      float16 or bfloat16 arrays.
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
      per_block = lambda a: None if a is None else np.moveaxis(np.asarray(a), value.axis,
                                                              -1).reshape(-1)
      blocks = _encode_blocks(gguf_type, codes.reshape(-1, _BLOCK), per_block(value.scales),
                              per_block(value.offsets))
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
