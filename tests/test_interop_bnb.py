"""bitsandbytes 4-bit state dicts, against an independent numpy model of bitsandbytes' layout.

The reference below re-implements, from bitsandbytes' documented behaviour (and its CUDA
kernels' order: the even element of a pair in the high nibble), how a `Linear4bit` state dict
is quantised and dequantised: flat row-major blocks of the [out, in] weight, float32 products,
nested scales as code·absmax2 + offset, then a rounding to the stored dtype. No torch.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.interop import bnb

NESTED_MAP = np.linspace(-1, 1, 256, dtype=np.float32)  # any 256-entry map (bnb's is dynamic)
STATE = ".quant_state.bitsandbytes__"


def reference_quantise(w, quant_type, blocksize, nested, dtype, name="w"):
  """A bitsandbytes-style state dict for the float [out, in] array `w` (numpy only)."""
  quant_map = bnb.NF4_MAP if quant_type == "nf4" else bnb.FP4_MAP
  flat = w.astype(np.float32).reshape(-1, blocksize)
  absmax = np.max(np.abs(flat), axis=1)
  scaled = flat / np.where(absmax == 0, 1, absmax)[:, None]
  codes = np.argmin(np.abs(scaled[..., None] - quant_map), axis=-1).astype(np.uint8).reshape(-1)
  codes = np.pad(codes, (0, codes.size % 2))
  sd = {name: ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1), f"{name}.quant_map": quant_map}
  state = dict(quant_type=quant_type, blocksize=blocksize, dtype=dtype, shape=list(w.shape))
  if nested:
    offset = np.float32(absmax.mean())
    centred = (absmax - offset).reshape(-1)
    groups = np.pad(centred, (0, -centred.size % 256)).reshape(-1, 256)
    absmax2 = np.max(np.abs(groups), axis=1).astype(np.float32)
    normed = (groups / np.where(absmax2 == 0, 1, absmax2)[:, None]).reshape(-1)[:centred.size]
    sd[f"{name}.absmax"] = np.argmin(np.abs(normed[:, None] - NESTED_MAP), 1).astype(np.uint8)
    sd[f"{name}.nested_absmax"] = absmax2
    sd[f"{name}.nested_quant_map"] = NESTED_MAP
    state |= dict(nested_blocksize=256, nested_offset=float(offset), nested_dtype="float32")
  else:
    sd[f"{name}.absmax"] = absmax.astype(np.float32)
  sd[f"{name}{STATE}{quant_type}"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
  return sd


def reference_dequantise(sd, name="w"):
  """bitsandbytes' dequantisation of weight `name` of a state dict (numpy only)."""
  key = next(k for k in sd if k.startswith(name + STATE))
  state = json.loads(bytes(np.asarray(sd[key], np.uint8)))
  out_features, in_features = state["shape"]
  numel = out_features * in_features
  packed = np.asarray(sd[name], np.uint8).reshape(-1)
  codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:numel]
  absmax = np.asarray(sd[f"{name}.absmax"])
  if "nested_blocksize" in state:
    groups = np.arange(absmax.size) // state["nested_blocksize"]
    absmax = (sd[f"{name}.nested_quant_map"][absmax] * sd[f"{name}.nested_absmax"][groups]
              + np.float32(state["nested_offset"]))
  values = sd[f"{name}.quant_map"][codes] * absmax[np.arange(numel) // state["blocksize"]]
  dtype = {"bfloat16": ml_dtypes.bfloat16}.get(state["dtype"], state["dtype"])
  return values.astype(np.float32).astype(dtype).reshape(out_features, in_features)


def bits_of(a):
  a = np.asarray(a)
  return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype,shape,blocksize", [
    ("bfloat16", (40, 128), 64), ("float16", (7, 96), 32), ("float32", (600, 64), 64)])
def test_import_dequantises_bit_exactly(quant_type, nested, dtype, shape, blocksize):
  w = np.random.default_rng(1).standard_t(5, shape).astype(np.float32)
  sd = reference_quantise(w, quant_type, blocksize, nested, dtype, name="layer.weight")
  sd["layer.bias"] = np.arange(shape[0], dtype=np.float32)
  tensors = jq.interop.bnb.from_state_dict(sd)
  assert set(tensors) == {"layer.weight", "layer.bias"}
  q = tensors["layer.weight"]
  assert isinstance(q, jq.QuantisedArray) and q.shape == shape and q.axis == 1
  expected = reference_dequantise(sd, "layer.weight")
  np.testing.assert_array_equal(bits_of(q.dequantise()), bits_of(expected))
  np.testing.assert_array_equal(tensors["layer.bias"], sd["layer.bias"])


@pytest.mark.parametrize("spec", [
    jq.QuantSpec("nf4", axis=0),                                 # Flax kernel [in, out]
    jq.QuantSpec("nf4", axis=1, scale_dtype="float32"),          # torch weight [out, in]
    jq.QuantSpec("nf4", axis=1, double_quant=True),              # nested absmax
    jq.QuantSpec("nf4", axis=0, double_quant=True),              # decoded to float32 absmax
    jq.QuantSpec("nf4", axis=0, scale_dtype="float8_e4m3fn", block_size=32),
])
def test_export_is_read_by_the_reference_bit_exactly(spec):
  w = jax.random.normal(jax.random.key(0), (256, 192), jnp.float32)
  q = jq.quantise(w, spec)
  sd = jq.interop.bnb.to_state_dict({"w": q})
  expected = np.asarray(q.dequantise())
  expected = expected.T if spec.axis == 0 else expected   # bitsandbytes stores [out, in]
  np.testing.assert_array_equal(bits_of(reference_dequantise(sd, "w")), bits_of(expected))
  assert ("w.nested_absmax" in sd) == (spec.double_quant and spec.axis == 1)
  again = jq.interop.bnb.from_state_dict(sd)["w"]     # and back: the same weight
  np.testing.assert_array_equal(bits_of(again.dequantise()), bits_of(expected))


def test_state_dict_round_trips_tensor_for_tensor():
  w = np.random.default_rng(2).normal(size=(32, 128)).astype(np.float32)
  for quant_type in ("nf4", "fp4"):
    sd = reference_quantise(w, quant_type, 64, nested=False, dtype="bfloat16")
    again = jq.interop.bnb.to_state_dict(jq.interop.bnb.from_state_dict(sd))
    assert set(again) == set(sd)
    for key, value in sd.items():
      if STATE in key:
        assert json.loads(bytes(again[key])) == json.loads(bytes(value))
      else:
        np.testing.assert_array_equal(again[key].reshape(-1), np.asarray(value).reshape(-1))


def test_refusals_name_the_tensor():
  w = np.random.default_rng(3).normal(size=(8, 100)).astype(np.float32)
  sd = reference_quantise(w[:, :64], "nf4", 64, False, "float32")
  bad = dict(sd)
  state = json.loads(bytes(sd[f"w{STATE}nf4"])) | {"shape": [4, 96], "blocksize": 64}
  bad[f"w{STATE}nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8)
  with pytest.raises(ValueError, match="'w': in = 96 is not a multiple of blocksize = 64"):
    jq.interop.bnb.from_state_dict(bad)
  with pytest.raises(KeyError, match="'w.quant_map'"):
    jq.interop.bnb.from_state_dict({k: v for k, v in sd.items() if k != "w.quant_map"})
  q = jq.quantise(jnp.asarray(w[:, :64]), jq.QuantSpec("int4", axis=1))
  with pytest.raises(ValueError, match=r"'k': bitsandbytes decodes only .*\(nearest: (nf4|fp4)\)"):
    jq.interop.bnb.to_state_dict({"k": q})
  q3 = jq.quantise(jnp.asarray(w[:, :64]), jq.QuantSpec("int3", axis=1))
  with pytest.raises(ValueError, match="'k3': bitsandbytes 4-bit takes 2-D arrays of 4-bit"):
    jq.interop.bnb.to_state_dict({"k3": q3})
