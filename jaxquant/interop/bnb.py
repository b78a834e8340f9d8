"""bitsandbytes 4-bit state dicts to and from packed `QuantisedArray`s, bit-exactly.

The layout (bitsandbytes' `Params4bit` and `QuantState.as_dict(packed=True)`, as a
`Linear4bit` saves it under the prefix of its weight, e.g. ``layer.weight``):

- ``{w}``: uint8, ⌈numel/2⌉ bytes (bitsandbytes keeps them as [⌈numel/2⌉, 1]): the codes of
  the [out, in] weight in row-major order, two per byte, the even element in the high nibble;
- ``{w}.absmax``: the block scales, one per `blocksize` consecutive elements of that order;
  float32, or with nested (double) quantisation uint8 codes of the scales minus their mean;
- ``{w}.quant_map``: float32 [16], the value of each 4-bit code (NF4 or FP4, unsorted for FP4);
- with nested quantisation ``{w}.nested_absmax`` (float32, one per `nested_blocksize` scales)
  and ``{w}.nested_quant_map`` (float32 [256]);
- ``{w}.quant_state.bitsandbytes__{nf4|fp4}``: uint8, the UTF-8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype`` (of the dequantised weight), ``shape`` and, when
  nested, ``nested_blocksize``, ``nested_offset`` and ``nested_dtype``.

bitsandbytes dequantises in float32, then rounds to ``dtype``:

    absmax[b] = nested_quant_map[absmax_code[b]] · nested_absmax[b // nested_blocksize]
                + nested_offset                                       (nested only)
    W[i] = quant_map[code[i]] · absmax[i // blocksize].

Import (`from_state_dict`) gives a `QuantisedArray` of shape [out, in] blocked along `in`
(axis 1) with the codebook sorted and the codes renumbered to match, and the float32 scales
that formula gives, so `dequantise` returns bitsandbytes' values bit for bit (nested scales
are decoded: jaxquant's own double quantisation has no offset). Blocks must not cross rows
(`in` a multiple of `blocksize`): the blocks of a jaxquant array run along one axis.

Export (`to_state_dict`) takes a 2-D 4-bit array with block scales whose codebook is
bitsandbytes' NF4 or FP4 map (its CUDA kernels decode by `quant_type`, not `quant_map`); the
blocked axis becomes `in`, so a Flax kernel [in, out] blocked along axis 0 is written as the
torch weight [out, in]. Scales are written as the float32 absmax they decode to (any scale
dtype: the products bitsandbytes forms are then jaxquant's), except double-quantised scales of
an array blocked along axis 1, whose groups of 256 are in bitsandbytes' order: those keep their
uint8 codes c and group scales g as nested absmax with nested_quant_map[c] = c,
nested_absmax = g and offset 0, which bitsandbytes decodes to the same float32 products c·g.

No torch is needed: tensors are numpy arrays (anything `numpy.asarray` reads, e.g. CPU torch
tensors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant import packing, scaling
from jaxquant.formats import nf4
from jaxquant.qarray import QuantisedArray

__all__ = ["FP4_MAP", "NF4_MAP", "from_state_dict", "to_state_dict"]

NF4_MAP = np.asarray(nf4().values, np.float32)
"""bitsandbytes' ``quant_map`` for ``quant_type="nf4"`` (QLoRA's NormalFloat4, sorted)."""
FP4_MAP = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                    np.float32) / np.float32(12))
"""bitsandbytes' ``quant_map`` for ``quant_type="fp4"`` (`get_4bit_type("fp4")`): indexed by
the 4-bit code, sign in bit 3, divided by its largest magnitude 12 in float32."""
_MAPS = {"nf4": NF4_MAP, "fp4": FP4_MAP}
_STATE = ".quant_state.bitsandbytes__"
_DTYPES = ("float32", "bfloat16", "float16")


def _code_order(quant_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sorted codebook, rank of each bitsandbytes code in it); -0 and +0 keep their codes."""
  order = np.argsort(quant_map, kind="stable")
  rank = np.empty(16, np.uint32)
  rank[order] = np.arange(16, dtype=np.uint32)
  return quant_map[order], rank


def _state(state_dict: Mapping[str, Any], name: str, quant_type: str) -> dict:
  key = f"{name}{_STATE}{quant_type}"
  raw = np.asarray(state_dict[key]).astype(np.uint8).tobytes()
  try:
    state = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"{key!r} is not bitsandbytes' packed JSON quant state: {error}") from None
  for field in ("blocksize", "shape", "dtype"):
    if field not in state:
      raise ValueError(f"{key!r} lacks {field!r} (it has {sorted(state)})")
  return state


def _required(state_dict, key: str, dtype) -> np.ndarray:
  if key not in state_dict:
    raise KeyError(f"the state dict has no {key!r}, which a bitsandbytes 4-bit weight needs")
  array = np.asarray(state_dict[key])
  if array.dtype != dtype:
    raise TypeError(f"{key!r} must be {np.dtype(dtype).name}, got {array.dtype}")
  return array


def _absmax(state_dict, name: str, state: dict, n_blocks: int) -> np.ndarray:
  """bitsandbytes' float32 block scales, nested ones decoded as bitsandbytes does."""
  stored = np.asarray(state_dict[f"{name}.absmax"])
  if "nested_blocksize" not in state:
    absmax = _required(state_dict, f"{name}.absmax", np.float32)
  else:
    if stored.dtype != np.uint8:
      raise TypeError(f"'{name}.absmax' of a nested quant state must be uint8 codes, got "
                      f"{stored.dtype}")
    group = int(state["nested_blocksize"])
    nested = _required(state_dict, f"{name}.nested_absmax", np.float32).reshape(-1)
    code = _required(state_dict, f"{name}.nested_quant_map", np.float32).reshape(-1)
    index = np.arange(stored.size) // group
    if code.size != 256 or nested.size <= index[-1]:
      raise ValueError(f"'{name}': {code.size} nested_quant_map entries (256 needed) and "
                       f"{nested.size} nested_absmax for {stored.size} scales in groups of "
                       f"{group}")
    absmax = code[stored.reshape(-1)] * nested[index] + np.float32(state["nested_offset"])
  absmax = absmax.reshape(-1)
  if absmax.size != n_blocks:
    raise ValueError(f"'{name}.absmax' has {absmax.size} scales; shape {state['shape']} in "
                     f"blocks of {state['blocksize']} needs {n_blocks}")
  return absmax.astype(np.float32)


def _import(state_dict, name: str, quant_type: str) -> QuantisedArray:
  state = _state(state_dict, name, quant_type)
  blocksize, shape = int(state["blocksize"]), tuple(int(d) for d in state["shape"])
  if len(shape) != 2:
    raise ValueError(f"{name!r}: bitsandbytes weights are [out, in]; shape {shape}")
  out_features, in_features = shape
  if in_features % blocksize:
    raise ValueError(f"{name!r}: in = {in_features} is not a multiple of blocksize = "
                     f"{blocksize}, so bitsandbytes' blocks cross rows, which a jaxquant "
                     "array (blocks along one axis) cannot hold")
  if state["dtype"] not in _DTYPES:
    raise ValueError(f"{name!r}: dtype {state['dtype']!r} is not one of {_DTYPES}")
  packed = _required(state_dict, name, np.uint8).reshape(-1)
  numel = out_features * in_features
  if packed.size != -(-numel // 2):
    raise ValueError(f"{name!r} holds {packed.size} bytes; shape {shape} needs "
                     f"{-(-numel // 2)}")
  quant_map = _required(state_dict, f"{name}.quant_map", np.float32).reshape(-1)
  if quant_map.size != 16:
    raise ValueError(f"'{name}.quant_map' has {quant_map.size} entries, not 16")
  codebook, rank = _code_order(quant_map)
  nibbles = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:numel]
  codes = np.pad(rank[nibbles].reshape(shape), ((0, 0), (0, -in_features % packing.GROUP)))
  n_blocks = in_features // blocksize
  absmax = _absmax(state_dict, name, state, out_features * n_blocks)
  return QuantisedArray(
      codes=packing.pack(jnp.asarray(codes), 4, axis=1),
      scales=jnp.asarray(absmax.reshape(out_features, n_blocks)), codebook=jnp.asarray(codebook),
      scale_scales=None, shape=shape, dtype=np.dtype(jnp.dtype(state["dtype"])), axis=1,
      block_size=blocksize, bits=4, granularity="block")


def from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The tensors of a bitsandbytes state dict, 4-bit weights as `QuantisedArray`s.

  Every weight with a ``{name}.quant_state.bitsandbytes__{nf4|fp4}`` entry becomes a
  `QuantisedArray` [out, in] under ``name`` (module docstring); its quant-state tensors are
  consumed; every other tensor is returned as a numpy array under its own key.

  Raises:
    KeyError: a quantised weight's tensor is missing.
    TypeError, ValueError: a tensor or the quant state does not fit the layout (the message
      names the key).
  """
  quantised = {}
  for key in state_dict:
    if _STATE in key:
      name, quant_type = key.split(_STATE)
      quantised[name] = _import(state_dict, name, quant_type)
  consumed = {f"{name}{suffix}" for name in quantised
              for suffix in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")}
  out = {}
  for key, value in state_dict.items():
    if key in quantised:
      out[key] = quantised[key]
    elif _STATE not in key and key not in consumed:
      out[key] = np.asarray(value)
  return out


def _quant_type(q: QuantisedArray, name: str) -> str:
  codebook = np.asarray(q.codebook, np.float32)
  for quant_type, quant_map in _MAPS.items():
    if np.array_equal(codebook.view(np.uint32), _code_order(quant_map)[0].view(np.uint32)):
      return quant_type
  unit = codebook / max(float(np.max(np.abs(codebook))), 1e-30)  # the scale is free: compare shapes
  nearest = min(_MAPS, key=lambda t: float(np.max(np.abs(_code_order(_MAPS[t])[0] - unit))))
  raise ValueError(f"{name!r}: bitsandbytes decodes only its own NF4 and FP4 maps, and this "
                   f"codebook is neither (nearest: {nearest}); quantise with "
                   f"QuantSpec('nf4') to export it")


def _export(name: str, q: QuantisedArray) -> dict[str, np.ndarray]:
  if q.bits != 4 or q.ndim != 2 or q.granularity != "block":
    raise ValueError(f"{name!r}: bitsandbytes 4-bit takes 2-D arrays of 4-bit codes with block "
                     f"scales; this is {q!r}")
  if np.dtype(q.dtype).name not in _DTYPES:
    raise ValueError(f"{name!r}: dtype {np.dtype(q.dtype).name} is not one of {_DTYPES}")
  quant_type = _quant_type(q, name)
  in_features = q.shape[q.axis]
  if in_features % q.block_size:
    raise ValueError(f"{name!r}: the blocked axis ({in_features}) is not whole blocks of "
                     f"{q.block_size}; bitsandbytes' blocks would cross rows")
  rank_to_code = np.argsort(_code_order(_MAPS[quant_type])[1])
  codes = np.asarray(packing.unpack(q.codes, 4, axis=q.axis))
  codes = np.moveaxis(codes[:in_features] if q.axis == 0 else codes[:, :in_features], q.axis, 1)
  nibbles = rank_to_code[codes].reshape(-1).astype(np.uint8)
  packed = (nibbles[0::2] << 4) | np.pad(nibbles[1::2], (0, nibbles.size % 2))
  scales = np.asarray(q.scales)
  state = {"quant_type": quant_type, "blocksize": q.block_size,
           "dtype": np.dtype(q.dtype).name, "shape": [q.shape[1 - q.axis], in_features]}
  tensors = {name: packed.reshape(-1, 1), f"{name}.quant_map": _MAPS[quant_type].copy()}
  if q.scales.dtype == jnp.uint8 and q.axis == 1:  # groups of 256 in bitsandbytes' order
    state |= {"nested_blocksize": scaling.DOUBLE_QUANT_GROUP, "nested_offset": 0.0,
              "nested_dtype": "float32"}
    tensors |= {f"{name}.absmax": scales.reshape(-1),
                f"{name}.nested_absmax": np.asarray(q.scale_scales, np.float32),
                f"{name}.nested_quant_map": np.arange(256, dtype=np.float32)}
  else:
    decoded = np.asarray(q.decoded_scales(), np.float32)
    tensors[f"{name}.absmax"] = np.moveaxis(decoded, q.axis, 1).reshape(-1)
  blob = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
  tensors[f"{name}{_STATE}{quant_type}"] = blob
  return tensors


def to_state_dict(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A bitsandbytes state dict: each `QuantisedArray` as a 4-bit weight under its key, every
  other tensor as a numpy array (module docstring).

  Raises:
    ValueError: a `QuantisedArray` that bitsandbytes cannot read as it is (not 4-bit NF4 or
      FP4 with block scales, or blocks that would cross rows); the message names it.
  """
  out = {}
  for name, value in tensors.items():
    if isinstance(value, QuantisedArray):
      out |= _export(name, value)
    else:
      out[name] = np.asarray(value)
  return out
