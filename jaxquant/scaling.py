"""Block scales: how a block of weights is mapped onto a format, and how scales are stored.

A block is `block_size` consecutive elements along one axis (a channel: the whole axis; a
tensor: everything). Its scale s maps the block onto the codebook, w ≈ s·v:

- absmax: s = max|w| / min(|v_min|, v_max), so the block's largest magnitude lands on the
  format's largest symmetric magnitude (7 for INT4, 1 for NF4);
- signmax: s = w_ext / v_end with w_ext the block's signed extreme and v_end the format's end
  of larger magnitude (ties: the positive end), so the extreme lands on that end exactly, with
  its sign (Orr et al. 2025); the scale is signed;
- rms: s = RMS(w) / ρ with ρ the RMS the format expects (1 for formats designed for unit-RMS
  data, max|v|/√3 otherwise);
- minmax (asymmetric): w ≈ s·v + o with s = (max w − min w) / (v_max − v_min) and the block
  offset o = min w − s·v_min, so the block's range [min w, max w] lands on the format's whole
  range (llama.cpp's Q4_1 and K types, with v = 0 … 2^b − 1: o is the block minimum). Offsets
  are stored like scales, signed (int8 codes under double quantisation).

Scales are stored as float32, bfloat16 or float16 (round to nearest; float16, GGUF's scale
type, also saturates at its largest finite number 65504 and reads scales below its smallest
subnormal 2^-24 as zero), float8_e4m3fn (round to nearest,
relative to one float32 factor per tensor, max|s|/448, so no scale overflows or needs its own
exponent range) or e8m0 (a power of two rounded *up*, so no element overflows; as in the OCP MX
formats). Double quantisation (Dettmers et al. 2023, QLoRA) stores the float32 scales as 8-bit
codes in groups of 256 with one float32 absmax scale per group: uint8 for non-negative scales,
int8 for signed (signmax) ones. Unlike bitsandbytes we subtract no mean, so a zero scale (an
all-zero block) stays exactly zero.

At the edges of float32 every step is defined so that it gives the same bits on every platform
(XLA's CPU flushes subnormals to zero; other backends need not):

- a block whose largest magnitude is below float32's smallest normal number 2^-126 has
  statistic 0 (its elements are subnormal: read as zero), as has any scale below 2^-126 after
  dividing by the reference;
- scales saturate at a ceiling c with c·max|v| finite in the dtype being quantised (see
  `scale_ceiling`), so every stored (scale, code) pair decodes to a finite value; a block with
  NaN or Inf gets a NaN scale;
- x/s is computed as x·(1/s), with both pre-multiplied by 2^-4 when |s| ≥ 2^124 so that 1/s is
  a normal number (`divide`); a quotient below 2^-126 is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._arguments import FLOAT32_TINY
from jaxquant.formats import Format

SCALE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "e8m0")
_SCALE_DTYPE_ALIASES = {
    "f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16", "fp16": "float16",
    "half": "float16", "fp8": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn", "float8_e8m0fnu": "e8m0",
}
_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
            "float8_e4m3fn": jnp.float8_e4m3fn, "e8m0": jnp.float8_e8m0fnu}
_E4M3_MAX = 448.0
DOUBLE_QUANT_GROUP = 256
_MAGNITUDE = 0x7FFFFFFF
_BIG = 2.0**124  # beyond this 1/s is subnormal or nearly so: `divide` rescales first
_BIG_STEP = 2.0**-4
# Relative headroom of the scale ceiling: what stored scales may gain in rounding (one
# float32 ulp for fp8 and double quantisation, whose decoding multiplies two rounded factors).
_CEILING_HEADROOM = 1.0 - 2.0**-20


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


def is_real(xb: jax.Array, axis: int, n: int) -> jax.Array:
  """Which positions of `to_blocks(x, axis, ·)` hold x's elements (not padding)."""
  n_blocks, block_size = xb.shape[axis], xb.shape[axis + 1]
  position = np.arange(n_blocks)[:, None] * block_size + np.arange(block_size)[None, :]
  shape = [1] * xb.ndim
  shape[axis], shape[axis + 1] = n_blocks, block_size
  return jnp.asarray((position < n).reshape(shape))


def _real_range(xb: jax.Array, axis: int, n: int, per_tensor: bool):
  """(min, max) of each block's real elements (size-1 block axis; everything `per_tensor`)."""
  reduce_axes = tuple(range(xb.ndim)) if per_tensor else (axis + 1,)
  real = True if per_tensor else is_real(xb, axis, n)
  low = jnp.min(jnp.where(real, xb, jnp.inf), axis=reduce_axes, keepdims=True)
  high = jnp.max(jnp.where(real, xb, -jnp.inf), axis=reduce_axes, keepdims=True)
  return low, high


def block_minimum(xb: jax.Array, axis: int, n: int, per_tensor: bool = False) -> jax.Array:
  """The smallest of each block's real elements (float32; reduced as `block_statistic`: 0 for
  a block below 2^-126 in magnitude, NaN for one with NaN or Inf)."""
  low, high = _real_range(xb, axis, n, per_tensor)
  low = jnp.where(jnp.maximum(-low, high) < FLOAT32_TINY, 0.0, low)
  reduce_axes = tuple(range(xb.ndim)) if per_tensor else (axis + 1,)
  some_nan = jnp.any(jnp.isnan(xb), axis=reduce_axes, keepdims=True)
  return jnp.where(jnp.isfinite(low) & ~some_nan, low, jnp.nan)


def block_statistic(xb: jax.Array, scaling: str, axis: int, n: int, per_tensor: bool = False,
                    count=None):
  """The statistic each block of `to_blocks(x, axis, ·)` maps onto the format (float32).

  max|x|, the signed extreme (ties: the positive one), the RMS over the block's real
  elements (the last block along an axis of length `n` may be partly padding; `count`, if
  given, is the number of real elements of each block instead), or for minmax half the
  range of the real elements, max/2 − min/2 (which cannot overflow). Reduced over the block
  axis, kept as a size-1 axis; with `per_tensor`, over everything.

  The maxima are exact on every platform; a block whose elements are all below 2^-126 in
  magnitude has statistic 0, one with NaN or Inf has NaN (NaN found by its own reduction:
  XLA's CPU max reductions over a middle axis can skip it).
  The RMS is m·sqrt(mean((x/m)²)) with m = max|x|, which cannot overflow.
  """
  if per_tensor:  # one block spanning the tensor: no padding
    reduce_axes, count = tuple(range(xb.ndim)), float(xb.size)
  else:
    block_size = xb.shape[axis + 1]
    counts = np.minimum(block_size, n - block_size * np.arange(xb.shape[axis]))
    shape = [1] * xb.ndim
    shape[axis] = xb.shape[axis]
    reduce_axes = (axis + 1,)
    if count is None:
      count = jnp.asarray(counts.astype(np.float32).reshape(shape))
  if scaling == "minmax":
    low, high = _real_range(xb, axis, n, per_tensor)
    statistic = high * np.float32(0.5) - low * np.float32(0.5)
    peak = jnp.maximum(high, -low)
  elif scaling == "signmax":
    high = jnp.max(xb, axis=reduce_axes, keepdims=True)
    low = jnp.min(xb, axis=reduce_axes, keepdims=True)
    statistic = jnp.where(-low > high, low, high)
    peak = jnp.abs(statistic)
  else:
    peak = statistic = jnp.max(jnp.abs(xb), axis=reduce_axes, keepdims=True)
    if scaling == "rms":
      unit = divide(xb, peak)
      statistic = peak * jnp.sqrt(jnp.sum(jnp.square(unit), axis=reduce_axes, keepdims=True)
                                  / count)
  # A normal maximum is exact whether or not a platform reads subnormals as zero; a block of
  # subnormals has a subnormal maximum or 0, and is 0 here either way.
  statistic = jnp.where(peak < FLOAT32_TINY, 0.0, statistic)
  # XLA's CPU max reductions over a middle axis can skip NaN: the flag is reduced apart.
  some_nan = jnp.any(jnp.isnan(xb), axis=reduce_axes, keepdims=True)
  return jnp.where(jnp.isfinite(statistic) & ~some_nan, statistic, jnp.nan)


def zero_scaled_blocks(xb: jax.Array, decoded: jax.Array, reduce_axes: tuple[int, ...]):
  """How many blocks hold a nonzero element (subnormals included) but a zero decoded scale.

  Read from the bits, since a platform that reads subnormals as zero cannot see them.
  """
  magnitude = jax.lax.bitcast_convert_type(xb, jnp.int32) & _MAGNITUDE
  nonzero = jnp.any(magnitude != 0, axis=reduce_axes, keepdims=True)
  return jnp.sum(nonzero & (decoded == 0))


def divide(x: jax.Array, s: jax.Array) -> jax.Array:
  """x/s in float32 as x·(1/s), defined where XLA's own x/s is not; 0 where s = 0.

  XLA rewrites a division by a broadcast scale as a multiplication by its reciprocal, and
  1/s is subnormal (flushed to zero on CPU) for |s| > 2^126. Here both factors are first
  multiplied by 2^-4 when |s| ≥ 2^124 (exact), so 1/s stays normal.
  """
  step = jnp.where(jnp.abs(s) >= _BIG, _BIG_STEP, 1.0).astype(jnp.float32)
  reciprocal = jnp.where(s == 0, 0.0, 1.0 / jnp.where(s == 0, 1.0, s * step))
  return (x * step) * reciprocal


def scale_ceiling(values: np.ndarray, dtype, scale_dtype: str | None) -> np.float32:
  """The largest scale magnitude stored for a format with codepoints `values`.

  c·max|v| stays below the largest finite number of `dtype` (the dtype quantised; at most
  float32's, in which quantisation computes), with a 2^-20 relative headroom for the
  rounding of fp8 and double-quantised scales; rounded down onto the grid of `scale_dtype`
  (bfloat16: truncated to 8 significant bits; e8m0: to a power of two; float16: at most its
  largest finite number, then to the float16 at or below) so that rounding a scale to storage
  never exceeds it.
  """
  largest = min(float(np.finfo(np.dtype(dtype)).max), float(np.finfo(np.float32).max))
  ceiling = np.float32(largest * _CEILING_HEADROOM / float(np.max(np.abs(values))))
  if scale_dtype == "float16":
    half = np.float16(min(ceiling, float(np.finfo(np.float16).max)))
    half = half if half <= ceiling else np.nextafter(half, np.float16(0))
    return np.float32(half)
  bits = np.array(ceiling, np.float32).view(np.uint32)
  mask = {"bfloat16": 0xFFFF0000, "e8m0": 0x7F800000}.get(scale_dtype, 0xFFFFFFFF)
  return (bits & np.uint32(mask)).view(np.float32)[()]


def format_reference(fmt: Format, scaling: str) -> float:
  """What the block statistic maps onto: min(|v_min|, v_max), the signed end of larger
  magnitude, the RMS the format expects, or for the OCP MX rule 2^emax, the largest power of
  two at most the largest value (so s = amax / 2^emax, stored rounded *down* to a power of
  two, is 2^(⌊log₂ amax⌋ − emax)), or for minmax half the format's range (v_max − v_min)/2."""
  if scaling == "mx":
    return float(2.0 ** np.floor(np.log2(fmt.values[-1])))
  if scaling == "minmax":
    return float(fmt.values[-1] - fmt.values[0]) / 2
  return {"absmax": fmt.absmax_target, "signmax": fmt.signmax_target,
          "rms": fmt.rms_reference}[scaling]


def encode_scales(scales: jax.Array, scale_dtype: str, double_quant: bool, signed: bool):
  """Stores float32 scales: returns (stored scales, second-level scales or None).

  `scales` are already within the ceiling of `scale_ceiling`. `signed` (signmax scales)
  selects int8 double-quantisation codes; otherwise uint8. Group scales are max|s|·(1/L)
  for L = 127 or 255, and codes round(s·(1/g)) (half to even); the float8 factor is
  max(max|s|·(1/448), 2^-126), so that every scale ≥ 2^-126 stays representable relative to it;
  e8m0 stores ceil(log2 s) exactly, from the bits of s.
  """
  if double_quant:
    levels = 127.0 if signed else 255.0
    group_scale = jnp.max(jnp.abs(_groups(scales)), axis=1) * np.float32(1 / levels)
    factors = second_level_factors(group_scale, scales.shape, double_quant)
    return encode_relative(scales, factors, scale_dtype, double_quant, signed)[0], group_scale
  if scale_dtype == "float8_e4m3fn":
    factor = jnp.maximum(jnp.max(jnp.abs(scales)) * np.float32(1 / _E4M3_MAX), FLOAT32_TINY)
    return encode_relative(scales, factor, scale_dtype, double_quant, signed)[0], factor
  return encode_relative(scales, None, scale_dtype, double_quant, signed)[0], None


def second_level_factors(scale_scales, shape, double_quant: bool) -> jax.Array | None:
  """The second-level factor of each scale of an array of `shape` (float8's per-tensor
  factor, or each scale's double-quantisation group scale), from `encode_scales`' second
  output; None when the storage has none."""
  if scale_scales is None:
    return None
  if not double_quant:
    return jnp.broadcast_to(scale_scales, shape)
  size = int(np.prod(shape))
  factors = jnp.broadcast_to(scale_scales[:, None], (scale_scales.shape[0], DOUBLE_QUANT_GROUP))
  return factors.reshape(-1)[:size].reshape(shape)


def encode_relative(scales: jax.Array, factors, scale_dtype: str, double_quant: bool,
                    signed: bool, round_up: bool = True) -> tuple[jax.Array, jax.Array]:
  """Each scale stored on its own, given its second-level factor: (stored, decoded float32).

  Double quantisation: the code round(s·(1/f)) clipped to the 8-bit range; float8: s·(1/f)
  clipped to ±448 then rounded to e4m3; `factors` is None for the storages without a second
  level (float32, bfloat16, float16, e8m0; e8m0 rounds the power of two up, or down without
  `round_up`). Elementwise, so a block's scale can be stored as soon as
  it is known, relative to factors fixed beforehand (`jaxquant.gptq` does).
  """
  if double_quant:
    levels, code_dtype = (127.0, jnp.int8) if signed else (255.0, jnp.uint8)
    codes = jnp.clip(jnp.round(divide(scales, factors)), -levels if signed else 0, levels)
    return codes.astype(code_dtype), codes * factors
  if scale_dtype == "float8_e4m3fn":
    stored = jnp.clip(divide(scales, factors), -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn)
    return stored, stored.astype(jnp.float32) * factors
  if scale_dtype == "e8m0":
    # The biased exponent byte of 2^ceil(log2 s): s's own exponent field, plus one unless s
    # is a power of two (of 2^floor(log2 s), the field itself, without `round_up`). The byte
    # 0 (2^-127) is kept to mean zero, 0xFF is NaN.
    bits = jax.lax.bitcast_convert_type(scales, jnp.uint32)
    biased = (bits >> 23) & 0xFF
    if round_up:
      biased = biased + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    byte = jnp.minimum(biased, 254)
    byte = jnp.where(scales > 0, byte, 0)
    byte = jnp.where(jnp.isnan(scales), 255, byte).astype(jnp.uint8)
    stored = jax.lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)
    return stored, decode_scales(stored)
  stored = scales.astype(_STORAGE[scale_dtype])
  return stored, stored.astype(jnp.float32)


def decode_scales(scales: jax.Array, scale_scales=None, group: int = DOUBLE_QUANT_GROUP
                  ) -> jax.Array:
  """Float32 scales from their stored form (the storage dtype says which encoding it is):
  8-bit codes times the scale of their group of `group` consecutive codes (flattened order),
  float8 times its factor, e8m0 (byte 0 read as zero), or a float cast."""
  if scales.dtype in (jnp.int8, jnp.uint8):
    groups = _groups(scales.astype(jnp.float32), group) * scale_scales[:, None]
    return groups.reshape(-1)[:scales.size].reshape(scales.shape)
  if scales.dtype == jnp.float8_e8m0fnu:
    is_zero = jax.lax.bitcast_convert_type(scales, jnp.uint8) == 0
    return jnp.where(is_zero, 0.0, scales.astype(jnp.float32))
  decoded = scales.astype(jnp.float32)
  return decoded if scale_scales is None else decoded * scale_scales


def _groups(values: jax.Array, group: int = DOUBLE_QUANT_GROUP) -> jax.Array:
  flat = values.reshape(-1)
  return jnp.pad(flat, (0, -flat.size % group)).reshape(-1, group)


def scale_search_multipliers(count: int = 17) -> np.ndarray:
  """Log-spaced multipliers in [1/4, 4] tried by the rms scale search (Orr et al. 2025)."""
  return np.geomspace(0.25, 4.0, count).astype(np.float32)

