"""An independent numpy quantiser that follows `jaxquant.scaling`'s documented arithmetic.

Written from the docstrings, loop-free numpy with explicit float32 rounding at each documented
step: block statistics (exact maxima; subnormal blocks read as zero), scale = statistic·(1/ρ),
saturation at the documented ceiling, each scale storage, x·(1/s) with the 2^-4 rescale above
2^124, nearest codepoint by counting midpoints below (ties low). Subnormal inputs and results
are read and written as zero, as XLA's CPU does (where the suite runs; `jaxquant.scaling`
leaves them to the platform). It shares no code with the library. RMS statistics are sums, whose order differs between XLA and numpy: the reference
computes them in float64 and `quantise_reference` can take the library's float32 scales from
there on, so that codes and stored scales are still compared bit for bit.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

F32 = np.float32
TINY = F32(np.finfo(np.float32).tiny)
F32_MAX = float(np.finfo(np.float32).max)
E4M3_MAX = 448.0
GROUP = 256


def flush(a):
  """Float32 with magnitudes below 2^-126 (subnormals) read as zero."""
  a = np.asarray(a, F32)
  return np.where(np.abs(a) < TINY, F32(0), a).astype(F32)


def divide(x, s):
  """x/s as documented: x·(1/s) in float32, both scaled by 2^-4 when |s| ≥ 2^124; 0 if s = 0."""
  x, s = flush(x), np.asarray(s, F32)
  with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
    step = np.where(np.abs(s) >= F32(2.0**124), F32(2.0**-4), F32(1)).astype(F32)
    safe = np.where(s == 0, F32(1), (s * step).astype(F32))
    reciprocal = np.where(s == 0, F32(0), (F32(1) / safe).astype(F32)).astype(F32)
    return flush((x * step).astype(F32) * reciprocal)


def reference_value(values, scaling):
  """ρ: what the block statistic maps onto."""
  v = np.asarray(values, np.float64)
  if scaling == "absmax":
    return min(-v[0], v[-1])
  if scaling == "signmax":
    return v[0] if -v[0] > v[-1] else v[-1]
  return None  # rms: the format's own, passed in by the caller


def ceiling(values, dtype, scale_dtype):
  """The largest stored scale: c·max|v| below dtype's largest finite (≤ float32's), with
  2^-20 headroom, rounded down onto bfloat16's 8-bit significands or e8m0's powers of two,
  or for float16 to at most 65504 and then down onto float16's grid."""
  largest = min(float(ml_dtypes.finfo(dtype).max), F32_MAX)
  c = float(F32(largest * (1 - 2.0**-20) / float(np.max(np.abs(values)))))
  if scale_dtype == "float16":
    c = min(c, 65504.0)
    exponent = max(math.floor(math.log2(c)), -14)  # float16's ulp is 2^(e - 10), e >= -14
    ulp = 2.0 ** (exponent - 10)
    return F32(math.floor(c / ulp) * ulp)
  exponent = math.floor(math.log2(c))
  if scale_dtype == "bfloat16":
    ulp = 2.0 ** (exponent - 7)
    return F32(math.floor(c / ulp) * ulp)
  if scale_dtype == "e8m0":
    return F32(2.0**exponent)
  return F32(c)


def blocks_of(x, axis, block_size, granularity):
  """x (float32) as (..., n_blocks, block_size) with `axis` last and zero padding; one block
  holding everything for per-tensor scales. Also the real-element count of each block."""
  moved = np.moveaxis(x, axis, -1)
  n = moved.shape[-1]
  if granularity == "tensor":
    return moved.reshape((1,) * (x.ndim - 1) + (1, -1)), np.full((1,) * x.ndim, x.size)
  size = n if granularity == "channel" else block_size
  n_blocks = -(-n // size)
  padded = np.zeros(moved.shape[:-1] + (n_blocks * size,), F32)
  padded[..., :n] = moved
  counts = np.minimum(size, n - size * np.arange(n_blocks))
  return padded.reshape(moved.shape[:-1] + (n_blocks, size)), np.broadcast_to(
      counts, moved.shape[:-1] + (n_blocks,))


def statistic(blocks, counts, scaling):
  """Each block's statistic in float32 (rms via float64), NaN if it holds NaN or Inf."""
  peak = np.max(np.abs(blocks), axis=-1)
  if scaling == "absmax":
    stat = peak
  elif scaling == "signmax":
    high, low = np.max(blocks, axis=-1), np.min(blocks, axis=-1)
    stat = np.where(-low > high, low, high)
  else:
    with np.errstate(over="ignore", invalid="ignore"):
      wide = blocks.astype(np.float64)
      stat = np.sqrt(np.sum(wide * wide, axis=-1) / counts)
  with np.errstate(invalid="ignore"):
    stat = np.where(peak < TINY, 0.0, stat)
    return np.where(np.isfinite(peak), stat, np.nan).astype(F32)


def store(scales, scale_dtype, double_quant, signed):
  """The decoded form of the stored scales (float32), bit for bit."""
  if double_quant:
    flat = scales.reshape(-1)
    groups = np.zeros(-(-flat.size // GROUP) * GROUP, F32)
    groups[:flat.size] = flat
    groups = groups.reshape(-1, GROUP)
    levels = 127.0 if signed else 255.0
    group_scale = (np.max(np.abs(groups), axis=1) * F32(1 / levels)).astype(F32)
    codes = np.clip(np.round(divide(groups, group_scale[:, None])), -levels if signed else 0,
                    levels)
    decoded = (codes.astype(F32) * group_scale[:, None]).astype(F32)
    return decoded.reshape(-1)[:flat.size].reshape(scales.shape)
  if scale_dtype == "float32":
    return scales
  if scale_dtype in ("bfloat16", "float16"):
    return scales.astype({"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[scale_dtype]
                         ).astype(F32)
  if scale_dtype == "float8_e4m3fn":
    factor = max(F32(np.max(np.abs(scales)) * F32(1 / E4M3_MAX)), TINY)
    stored = divide(scales, factor).astype(ml_dtypes.float8_e4m3fn).astype(F32)
    return (stored * F32(factor)).astype(F32)
  assert scale_dtype == "e8m0"
  mantissa, exponent = np.frexp(scales.astype(np.float64))
  up = np.where(mantissa == 0.5, exponent - 1, exponent)
  return np.where(scales > 0, np.ldexp(1.0, up), 0.0).astype(F32)


def nearest(y, values):
  """Index of the nearest of the sorted `values` (ties: the lower), clipping at the ends."""
  v = np.asarray(values, F32)
  midpoints = ((v[1:] + v[:-1]).astype(F32) / F32(2)).astype(F32)
  return np.sum(y[..., None] > midpoints, axis=-1)


def quantise_reference(x, values, *, axis, block_size, granularity, scaling, scale_dtype,
                       double_quant, rho, exact_scales=None):
  """(codes, decoded scales, exact scales, dequantised float32, zeroed-block count).

  `x` is the input (float32, bfloat16 or float16; subnormals included), `values` the format's
  codepoints, `rho` the RMS reference for rms scaling (None otherwise). `exact_scales`, laid
  out as `QuantisedArray.scales`, replaces the reference's own pre-storage scales (for rms,
  whose sums the two compute in different orders). Codes and values come back in x's layout,
  scales in the layout of `QuantisedArray.scales` (`axis` in place, all ones per tensor).
  """
  x = np.asarray(x)
  axis = axis % x.ndim
  blocks, counts = blocks_of(x.astype(F32), axis, block_size, granularity)
  stat = statistic(blocks, counts, scaling)
  rho = reference_value(values, scaling) if rho is None else rho
  if exact_scales is None:
    ceil = ceiling(values, x.dtype, None if double_quant else scale_dtype)
    with np.errstate(over="ignore", invalid="ignore"):
      exact = np.clip((stat * (F32(1) / F32(rho))).astype(F32), -ceil, ceil).astype(F32)
    exact = flush(exact)
  else:
    exact = np.moveaxis(np.asarray(exact_scales, F32), axis, -1)
  decoded = store(exact, scale_dtype, double_quant, scaling == "signmax")
  codes = nearest(divide(blocks, decoded[..., None]), values)
  w = flush(np.asarray(values, F32)[codes] * decoded[..., None])
  nonzero = np.any(blocks != 0, axis=-1)
  zeroed = int(np.sum(nonzero & (decoded == 0) & np.isfinite(stat)))

  def unblock(a):
    moved_shape = np.moveaxis(x, axis, -1).shape
    flat = a.reshape(moved_shape[:-1] + (-1,))[..., :moved_shape[-1]]
    return np.moveaxis(flat, -1, axis)

  def scale_layout(a):
    return np.moveaxis(a, -1, axis)

  return (unblock(codes), scale_layout(decoded), scale_layout(exact), unblock(w), zeroed)
