"""Block scales: how a block of weights is mapped onto a format, and how scales are stored.

A block is `block_size` consecutive elements along one axis (a channel: the whole axis; a
tensor: everything). Its scale s maps the block onto the codebook, w ≈ s·v:

- absmax: s = max|w| / min(|v_min|, v_max), so the block's largest magnitude lands on the
  format's largest symmetric magnitude (7 for INT4, 1 for NF4);
- signmax: s = w_ext / v_end with w_ext the block's signed extreme and v_end the format's end
  of larger magnitude (ties: the positive end), so the extreme lands on that end exactly, with
  its sign (Orr et al. 2025); the scale is signed;
- rms: s = RMS(w) / ρ with ρ the RMS the format expects (1 for formats designed for unit-RMS
  data, max|v|/√3 otherwise).

Scales are stored as float32, bfloat16 (round to nearest), float8_e4m3fn (round to nearest,
relative to one float32 factor per tensor, max|s|/448, so no scale overflows or needs its own
exponent range) or e8m0 (a power of two rounded *up*, so no element overflows; as in the OCP MX
formats). Double quantisation (Dettmers et al. 2023, QLoRA) stores the float32 scales as 8-bit
codes in groups of 256 with one float32 absmax scale per group: uint8 for non-negative scales,
int8 for signed (signmax) ones. Unlike bitsandbytes we subtract no mean, so a zero scale (an
all-zero block) stays exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import Format

SCALE_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "e8m0")
_SCALE_DTYPE_ALIASES = {
    "f32": "float32", "fp32": "float32", "bf16": "bfloat16", "fp8": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn", "float8_e8m0fnu": "e8m0",
}
_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
            "float8_e4m3fn": jnp.float8_e4m3fn, "e8m0": jnp.float8_e8m0fnu}
_E4M3_MAX = 448.0
DOUBLE_QUANT_GROUP = 256


def canonical_scale_dtype(scale_dtype) -> str:
  """The name of a scale dtype given as a string, numpy/jax dtype or scalar type."""
  if isinstance(scale_dtype, str):
    name = scale_dtype.lower()
  else:
    try:
      name = np.dtype(scale_dtype).name
    except TypeError:
      raise TypeError(f"{scale_dtype=} is not a dtype; use one of {SCALE_DTYPES}") from None
  name = _SCALE_DTYPE_ALIASES.get(name, name)
  if name not in SCALE_DTYPES:
    raise ValueError(f"{scale_dtype=} is not one of {SCALE_DTYPES}")
  return name


def to_blocks(x: jax.Array, axis: int, block_size: int) -> jax.Array:
  """Zero-pads `axis` to a multiple of `block_size` and splits it into (n_blocks, block_size)."""
  n = x.shape[axis]
  n_blocks = -(-n // block_size)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n_blocks * block_size - n)
  x = jnp.pad(x, pad)
  return x.reshape(x.shape[:axis] + (n_blocks, block_size) + x.shape[axis + 1:])


def from_blocks(xb: jax.Array, axis: int, n: int) -> jax.Array:
  """Inverse of `to_blocks`: merges the block axes and drops the padding."""
  x = xb.reshape(xb.shape[:axis] + (-1,) + xb.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, n, axis=axis)


def block_statistic(xb: jax.Array, scaling: str, axis: int, n: int, per_tensor: bool = False):
  """The statistic each block of `to_blocks(x, axis, ·)` maps onto the format (float32).

  max|x|, the signed extreme (ties: the positive one), or the RMS over the block's real
  elements (the last block along an axis of length `n` may be partly padding). Reduced over
  the block axis, kept as a size-1 axis; with `per_tensor`, over everything.
  """
  if per_tensor:  # one block spanning the tensor: no padding
    reduce_axes, count = tuple(range(xb.ndim)), float(xb.size)
  else:
    block_size = xb.shape[axis + 1]
    counts = np.minimum(block_size, n - block_size * np.arange(xb.shape[axis]))
    shape = [1] * xb.ndim
    shape[axis] = xb.shape[axis]
    reduce_axes, count = (axis + 1,), jnp.asarray(counts.astype(np.float32).reshape(shape))
  if scaling == "absmax":
    return jnp.max(jnp.abs(xb), axis=reduce_axes, keepdims=True)
  if scaling == "signmax":
    high = jnp.max(xb, axis=reduce_axes, keepdims=True)
    low = jnp.min(xb, axis=reduce_axes, keepdims=True)
    return jnp.where(-low > high, low, high)
  return jnp.sqrt(jnp.sum(jnp.square(xb), axis=reduce_axes, keepdims=True) / count)


def format_reference(fmt: Format, scaling: str) -> float:
  """What the block statistic maps onto: min(|v_min|, v_max), the signed end of larger
  magnitude, or the RMS the format expects."""
  return {"absmax": fmt.absmax_target, "signmax": fmt.signmax_target,
          "rms": fmt.rms_reference}[scaling]


def encode_scales(scales: jax.Array, scale_dtype: str, double_quant: bool, signed: bool):
  """Stores float32 scales: returns (stored scales, second-level scales or None).

  `signed` (signmax scales) selects int8 double-quantisation codes; otherwise uint8.
  """
  if double_quant:
    groups = _groups(scales)
    levels, code_dtype = (127.0, jnp.int8) if signed else (255.0, jnp.uint8)
    group_scale = jnp.max(jnp.abs(groups), axis=1) / levels
    safe = jnp.where(group_scale > 0, group_scale, 1.0)
    codes = jnp.clip(jnp.round(groups / safe[:, None]), -levels if signed else 0, levels)
    codes = codes.astype(code_dtype).reshape(-1)[:scales.size].reshape(scales.shape)
    return codes, group_scale
  if scale_dtype == "float8_e4m3fn":
    factor = jnp.max(jnp.abs(scales)) / _E4M3_MAX
    factor = jnp.where(factor > 0, factor, 1.0)
    return (scales / factor).astype(jnp.float8_e4m3fn), factor
  if scale_dtype == "e8m0":
    # The biased exponent byte, built directly (2^-127, the byte 0, is kept to mean zero).
    exponent = jnp.clip(jnp.ceil(jnp.log2(scales)), -126, 127)
    byte = jnp.where(scales > 0, exponent + 127, 0).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu), None
  return scales.astype(_STORAGE[scale_dtype]), None


def decode_scales(scales: jax.Array, scale_scales=None) -> jax.Array:
  """Float32 scales from their stored form (the storage dtype says which encoding it is)."""
  if scales.dtype in (jnp.int8, jnp.uint8):
    groups = _groups(scales.astype(jnp.float32)) * scale_scales[:, None]
    return groups.reshape(-1)[:scales.size].reshape(scales.shape)
  if scales.dtype == jnp.float8_e8m0fnu:
    is_zero = jax.lax.bitcast_convert_type(scales, jnp.uint8) == 0
    return jnp.where(is_zero, 0.0, scales.astype(jnp.float32))
  decoded = scales.astype(jnp.float32)
  return decoded if scale_scales is None else decoded * scale_scales


def _groups(values: jax.Array) -> jax.Array:
  flat = values.reshape(-1)
  return jnp.pad(flat, (0, -flat.size % DOUBLE_QUANT_GROUP)).reshape(-1, DOUBLE_QUANT_GROUP)


def scale_search_multipliers(count: int = 17) -> np.ndarray:
  """Log-spaced multipliers in [1/4, 4] tried by the rms scale search (Orr et al. 2025)."""
  return np.geomspace(0.25, 4.0, count).astype(np.float32)

