"""`QuantSpec`, the packed `QuantisedArray` pytree, and `quantise` / `dequantise`.

Quantising maps each block onto the format with its scale (see `jaxquant.scaling`) and
rounds every element to its nearest codepoint: with sorted codepoints v₀ < … < v_{K-1}, the
code of y is the number of midpoints (vᵢ + vᵢ₊₁)/2 below y, found by binary search
(`searchsorted`), never through an N × K distance tensor. Values beyond the ends round to the
end codepoints (clipping). Codes are packed densely into uint32 words along the quantised axis
(`jaxquant.packing`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import packing, scaling
from jaxquant.formats import BLOCK_SCALINGS, Format, parse

GRANULARITIES = ("channel", "tensor")
INPUT_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantise an array: a format, a block layout, a scaling and a scale storage.

  Attributes:
    format: a `Format`, or its name (e.g. ``"nf4"``). A name that leaves the block size
      open (``"crd-t7-signmax-4b"``) is built for this spec's integer `block_size`.
    block_size: elements per block along `axis` (an int ≥ 1), ``"channel"`` (one scale per
      slice along `axis`: the whole axis is one block) or ``"tensor"`` (one scale). Default:
      the format's own block size, else 64.
    scaling: ``"absmax"``, ``"signmax"``, ``"rms"``, ``"mx"`` (the OCP MX rule: E8M0 scale
      2^(⌊log₂ amax⌋ − emax), elements rounded to nearest-even and saturated; the MX formats'
      own) or ``"minmax"`` (asymmetric: w ≈ s·v + o with a block offset o, stored like the
      scales; `jaxquant.scaling`). Default: the format's own, else absmax.
    scale_dtype: ``float32``, ``bfloat16`` (default; the format's own where it has one:
      ``"e8m0"`` for MX, ``float8_e4m3fn`` for NVFP4), ``float16``, ``float8_e4m3fn`` or
      ``"e8m0"``; None with `double_quant`.
    axis: the axis blocks run along. Default 0, the contraction axis of a Flax kernel
      [in, out] (and of `qmatmul`'s W[K, N]); `jaxquant.Rule`s and the Flax layers choose the
      contraction axis themselves, whatever this says.
    double_quant: store the scales as 8-bit codes in groups of 256 with one float32 scale
      per group (QLoRA): uint8 codes for non-negative scales, int8 for signed (signmax) ones.
    scale_search: rms only: choose a per-tensor scale multiplier from 17 log-spaced values in
      [1/4, 4] that minimises the squared error.
  """

  format: Format | str
  block_size: int | str | None = dataclasses.field(default=None, kw_only=True)
  scaling: str | None = dataclasses.field(default=None, kw_only=True)
  scale_dtype: Any = dataclasses.field(default=None, kw_only=True)
  axis: int = dataclasses.field(default=0, kw_only=True)
  double_quant: bool = dataclasses.field(default=False, kw_only=True)
  scale_search: bool = dataclasses.field(default=False, kw_only=True)

  def __post_init__(self):
    if isinstance(self.format, str):
      numeric = isinstance(self.block_size, (int, np.integer)) and not isinstance(
          self.block_size, bool)
      fmt = parse(self.format,
                  block_size=int(self.block_size) if numeric and self.block_size >= 1 else None)
    else:
      fmt = self.format
    if not isinstance(fmt, Format):
      raise TypeError(f"format={self.format!r} must be a jaxquant Format or a format name")
    chosen = self.scaling or fmt.scaling or "absmax"
    if chosen not in BLOCK_SCALINGS:
      raise ValueError(f"scaling={self.scaling!r} is not one of {BLOCK_SCALINGS}")
    if fmt.scaling is not None and chosen != fmt.scaling:
      raise ValueError(
          f"format {fmt.name!r} was built for scaling={fmt.scaling!r} but the spec asks for "
          f"scaling={chosen!r}; build the format for {chosen!r} instead")
    block_size = self.block_size if self.block_size is not None else (fmt.block_size or 64)
    if isinstance(block_size, str):
      if block_size not in GRANULARITIES:
        raise ValueError(f"block_size={block_size!r} must be an int >= 1 or one of {GRANULARITIES}")
    elif isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
      raise TypeError(f"block_size={block_size!r} must be an int >= 1 or one of {GRANULARITIES}")
    elif block_size < 1:
      raise ValueError(f"block_size={block_size!r} must be >= 1")
    else:
      block_size = int(block_size)
    if fmt.block_size is not None and block_size != fmt.block_size:
      raise ValueError(
          f"format {fmt.name!r} was built for block_size={fmt.block_size} but the spec asks "
          f"for block_size={block_size!r}; build the format for that block size instead")
    if self.double_quant and self.scale_dtype is not None:
      raise ValueError(
          f"scale_dtype={self.scale_dtype!r} cannot be combined with double_quant=True, which "
          "stores scales as int8 with float32 group scales")
    # With double quantisation the scales are 8-bit codes: no scale_dtype is stored.
    default_dtype = fmt.scale_dtype or ("e8m0" if chosen == "mx" else "bfloat16")
    scale_dtype = None if self.double_quant else scaling.canonical_scale_dtype(
        self.scale_dtype or default_dtype)
    if chosen == "mx" and scale_dtype != "e8m0":
      raise ValueError(f"scaling='mx' (OCP MX) stores E8M0 scales; scale_dtype={scale_dtype!r} "
                       f"and double_quant={self.double_quant} do not")
    if fmt.scale_dtype is not None and scale_dtype != fmt.scale_dtype:
      raise ValueError(
          f"format {fmt.name!r} is defined with {fmt.scale_dtype} scales but the spec asks for "
          f"scale_dtype={scale_dtype!r} (double_quant={self.double_quant})")
    if chosen in ("signmax", "minmax") and scale_dtype == "e8m0":
      raise ValueError(f"scaling={chosen!r} needs signed {'scales' if chosen == 'signmax' else 'offsets'}; "
                       "scale_dtype='e8m0' has no sign")
    if chosen == "absmax" and fmt.absmax_target <= 0:
      raise ValueError(f"scaling='absmax' needs a format with values of both signs; {fmt.name!r}")
    if self.scale_search and chosen != "rms":
      raise ValueError(f"scale_search=True applies to scaling='rms' only, not {chosen!r}")
    if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
      raise TypeError(f"axis={self.axis!r} must be an int")
    object.__setattr__(self, "format", fmt)
    object.__setattr__(self, "scaling", chosen)
    object.__setattr__(self, "block_size", block_size)
    object.__setattr__(self, "scale_dtype", scale_dtype)
    object.__setattr__(self, "axis", int(self.axis))


@dataclasses.dataclass(frozen=True)
class QuantisedArray:
  """A quantised array: packed codes, block scales and the codebook, as a pytree.

  Array leaves: `codes` (uint32 words, codes packed along `axis`), `scales` (one per block;
  the logical shape with `axis` replaced by the number of blocks, and every axis 1 for a
  per-tensor scale; the dtype says how they are stored), `codebook` (float32, the format's
  values padded with its last value to 2**bits entries; codes never point at the padding),
  and, when the scale storage needs it, `scale_scales` (float32: group scales for double
  quantisation, or the per-tensor factor of float8 scales; else None). An asymmetric array
  (minmax scaling) also has block `offsets`, shaped and stored like the scales, with their own
  second level `offset_scales`; else both are None.
  Static metadata, all of it needed to read the leaves: the logical `shape` and `dtype`,
  `axis` (non-negative), `block_size` (the effective block length), `bits`, `granularity`
  ("block", "channel" or "tensor"), the packing `layout` and `layout_version`, and
  `scale_group`, how many consecutive double-quantised codes share one group scale (256, as
  QLoRA; GGUF's K types have 8 or 16 sub-block scales per super-block). What the
  codebook is called and how its scales were chosen are not metadata, so arrays of every
  format with the same bits, blocks and shape share one compiled program.

  Invariants: `dequantise(q).shape == q.shape`; along `axis`, `codes` has
  ceil(n_blocks·block_size / 32)·bits words; `w ≈ scale · codebook[code] (+ offset)`
  elementwise.
  """

  codes: jax.Array
  scales: jax.Array
  codebook: jax.Array
  scale_scales: jax.Array | None
  shape: tuple[int, ...]
  dtype: np.dtype
  axis: int
  block_size: int
  bits: int
  granularity: str
  layout: str = packing.LAYOUT
  layout_version: int = packing.LAYOUT_VERSION
  offsets: jax.Array | None = None
  offset_scales: jax.Array | None = None
  scale_group: int = scaling.DOUBLE_QUANT_GROUP

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def n_blocks(self) -> int:
    return -(-self.shape[self.axis] // self.block_size)

  @property
  def storage_bits(self) -> int:
    """Bits stored for codes, scales and second-level scales (the codebook is not counted)."""
    leaves = (self.codes, self.scales, self.scale_scales, self.offsets, self.offset_scales)
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize * 8 for leaf in leaves if leaf is not None)

  @property
  def bits_per_param(self) -> float:
    """Exact storage cost per logical element: codes + scales + second-level scales."""
    return self.storage_bits / self.size

  def dequantise(self, dtype=None) -> jax.Array:
    return dequantise(self, dtype)

  def decoded_scales(self) -> jax.Array:
    """The block scales in float32 (shaped as `scales`)."""
    return scaling.decode_scales(self.scales, self.scale_scales, self.scale_group)

  def decoded_offsets(self) -> jax.Array | None:
    """The block offsets in float32 (shaped as `scales`), or None for a symmetric array."""
    if self.offsets is None:
      return None
    return scaling.decode_scales(self.offsets, self.offset_scales, self.scale_group)

  def symmetric_part(self) -> QuantisedArray:
    """The array without its offsets: W − O, where O spreads each block's offset over it."""
    return dataclasses.replace(self, offsets=None, offset_scales=None)

  # The weight protocol of `jaxquant.contraction`: how the array meets activations.

  def contract(self, x: jax.Array, contraction, backend: str) -> jax.Array:
    """`lax.dot_general(x, self, contraction.dimension_numbers)` in float32, from the codes."""
    from jaxquant import kernels  # pylint: disable=import-outside-toplevel  (kernels import this module)
    return kernels.contract(x, self, contraction, backend)

  def gather(self, indices: jax.Array, params: dict) -> jax.Array:
    """`lax.gather(self, indices, **params)` that gathers packed codes, then dequantises."""
    return gather(self, indices, params)

  def transpose(self, axes=None) -> QuantisedArray:
    """The array with its axes permuted (`numpy.transpose`'s `axes`; default reversed).

    The packed words, scales and offsets are permuted as arrays and no code is repacked:
    codes stay packed along the same logical axis, now at its new position. Refused for
    double-quantised scales with more than one scale per row of groups, whose groups of
    consecutive scales a permutation would reorder.
    """
    axes = tuple(reversed(range(self.ndim))) if axes is None else tuple(
        int(a) % self.ndim for a in axes)
    if sorted(axes) != list(range(self.ndim)):
      raise ValueError(f"axes={axes} is not a permutation of the {self.ndim} axes")
    order = np.arange(self.scales.size).reshape(self.scales.shape).transpose(axes).reshape(-1)
    if self.scales.dtype in (jnp.int8, jnp.uint8) and np.any(order != np.arange(order.size)):
      raise ValueError("transposing would reorder the groups of this array's "
                       "double-quantised scales; dequantise and quantise again instead")
    moved = lambda leaf: None if leaf is None else jnp.transpose(leaf, axes)
    return dataclasses.replace(
        self, codes=moved(self.codes), scales=moved(self.scales), offsets=moved(self.offsets),
        shape=tuple(self.shape[a] for a in axes), axis=axes.index(self.axis))

  @property
  def T(self) -> QuantisedArray:  # noqa: N802  (numpy's name)
    return self.transpose()

  def astype(self, dtype) -> QuantisedArray:
    """The same codes and scales read as an array of `dtype` (it only relabels)."""
    return dataclasses.replace(self, dtype=np.dtype(dtype))

  def __repr__(self):
    blocks = self.granularity if self.granularity != "block" else f"block_size={self.block_size}"
    # Tools such as Flax's repr replace the leaves by summaries that have no size.
    arrays = all(hasattr(leaf, "size") for leaf in (self.codes, self.scales))
    cost = f", bits_per_param={self.bits_per_param:.4f}" if arrays else ""
    return (f"QuantisedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"bits={self.bits}, {blocks}, axis={self.axis}{cost})")


jax.tree_util.register_dataclass(
    QuantisedArray,
    data_fields=["codes", "scales", "codebook", "scale_scales", "offsets", "offset_scales"],
    meta_fields=["shape", "dtype", "axis", "block_size", "bits", "granularity", "layout",
                 "layout_version", "scale_group"],
)


def nearest_codes(y: jax.Array, codebook: jax.Array, ties_to_even: bool = False) -> jax.Array:
  """Index of the nearest codepoint of sorted `codebook` for every element of `y` (uint32).

  The code is the number of midpoints (vᵢ + vᵢ₊₁)/2 below y; ties at a midpoint go to the
  lower codepoint, or with `ties_to_even` (the OCP MX rule) to the codepoint an even number
  of steps from the zero codepoint: round to nearest-even on the bit pattern of an FP or INT
  element, whose magnitudes count up from zero (never to the padding). Up to 16 codepoints it is counted with 15 fused
  comparisons per element (XLA keeps no temporary: 0 bytes of temp memory at 4096², about
  1.4× one f32 elementwise pass); larger codebooks use a branch-free binary search of
  ceil(log2 K) steps.
  """
  midpoints = (codebook[1:] + codebook[:-1]) / 2
  up = None  # whether a tie at each midpoint goes up
  if ties_to_even:
    steps = jnp.abs(jnp.arange(1, codebook.shape[0]) - jnp.argmin(jnp.abs(codebook)))
    up = (steps % 2 == 0) & (codebook[1:] != codebook[:-1])
  if codebook.shape[0] <= 16:
    code = jnp.searchsorted(midpoints, y, method="compare_all")
    if up is not None:
      lead = (None,) * y.ndim  # (strict rank promotion: broadcast explicitly)
      code = code + jnp.sum((y[..., None] == midpoints[lead]) & up[lead], axis=-1)
    return code.astype(jnp.uint32)
  levels = max(1, math.ceil(math.log2(codebook.shape[0])))
  padding = jnp.full((2**levels - 1 - midpoints.shape[0],), jnp.inf, midpoints.dtype)
  midpoints = jnp.concatenate([midpoints, padding])
  up = None if up is None else jnp.concatenate([up, jnp.zeros(padding.shape, bool)])

  def above(index):  # y past the midpoint at `index`, ties included where they go up
    m = midpoints[index] if isinstance(index, int) else jnp.take(midpoints, index)
    if up is None:
      return y > m
    return (y > m) | ((y == m) & (up[index] if isinstance(index, int) else jnp.take(up, index)))

  half = 2 ** (levels - 1)
  # The first step compares with one scalar (a gather at a constant index would be
  # constant-folded into an array of y's size).
  code = jnp.where(above(half - 1), half, 0)
  for level in reversed(range(levels - 1)):
    step = 2**level
    code = code + jnp.where(above(code + (step - 1)), step, 0)
  return code.astype(jnp.uint32)


def codebook_lookup(codebook: jax.Array, codes: jax.Array) -> jax.Array:
  """codebook[codes], laid out like `codes` (so it also works on explicitly sharded codes)."""
  return codebook.at[codes.astype(jnp.int32)].get(out_sharding=jax.typeof(codes).sharding)


def as_spec(spec) -> QuantSpec:
  """`spec` as a `QuantSpec`: a spec, or a `Format` or format name with the spec defaults."""
  if isinstance(spec, QuantSpec):
    return spec
  if isinstance(spec, (Format, str)):
    return QuantSpec(spec)
  raise TypeError(f"spec must be a QuantSpec, a Format or a format name, got "
                  f"{type(spec).__name__}")


def _check_input(x, spec: QuantSpec) -> jax.Array:
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    x = jnp.asarray(x)
  if jnp.dtype(x.dtype).name not in INPUT_DTYPES:
    raise TypeError(f"x has dtype {jnp.dtype(x.dtype).name}; quantise takes one of {INPUT_DTYPES}")
  if x.ndim == 0:
    raise ValueError("x must have at least one axis")
  if not -x.ndim <= spec.axis < x.ndim:
    raise ValueError(f"axis={spec.axis} is out of range for x of shape {tuple(x.shape)}")
  if x.size == 0:
    raise ValueError(f"x of shape {tuple(x.shape)} is empty")
  return x


def quantise(x, spec: QuantSpec | Format | str, *, check_finite: bool = True) -> QuantisedArray:
  """Quantises `x` into a packed `QuantisedArray` (jit-compiled; `spec` is static).

  Args:
    x: float32, bfloat16 or float16 array (float64 under x64), any shape with ≥ 1 axis.
    spec: the `QuantSpec`, or a `Format` or format name (``"nf4"``) for its defaults.
    check_finite: raise if `x` has NaN or ±Inf. The check reads a flag computed from the
      block scales (a non-finite element makes its block's scale non-finite), so it costs no
      extra pass. Under an enclosing `jax.jit` it cannot raise; a non-finite block then gets a
      non-finite scale, so it dequantises to NaN/Inf rather than to plausible wrong values.

  Returns:
    The `QuantisedArray`; `dequantise` gives back `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not a float array, or `spec` is not a `QuantSpec`, `Format` or name.
    ValueError: `axis` is out of range, `x` is empty, or `x` is not finite.

  Warns:
    UserWarning: (eagerly) blocks with nonzero values whose stored scale is zero: below
      2^-126, or beyond the range of float8 or double-quantised scales relative to the
      largest; they dequantise to zero. Scales saturate instead of overflowing (see
      `jaxquant.scaling`), so every element dequantises to a finite value.

  Example:
    >>> import jax.numpy as jnp, jaxquant as jq
    >>> w = jnp.linspace(-1.0, 1.0, 256).reshape(128, 2)
    >>> q = jq.quantise(w, jq.QuantSpec("nf4", block_size=64))
    >>> q.codes.shape, q.bits_per_param
    ((16, 2), 4.25)
  """
  return quantise_with_scales(x, spec, check_finite=check_finite)[0]


def quantise_with_scales(x, spec: QuantSpec | Format | str, *, check_finite: bool = True
                         ) -> tuple[QuantisedArray, jax.Array]:
  """`quantise(x, spec)` and each block's float32 scale before it was stored.

  The scale s maps the block onto the codebook, w ≈ s·v (with the rms search's multiplier;
  shaped as `q.scales`), so the block represents [s·v_min, s·v_max] without clipping (swapped
  for s < 0; shifted by its offset under minmax). Storing s (bf16, fp8, e8m0, double
  quantisation) rounds it.
  """
  spec = as_spec(spec)
  x = _check_input(x, spec)
  plan = plan_for(x, spec)
  words, scales, scale_scales, exact, finite, some_zero, _, offsets = round_to_nearest(x, plan)
  if not isinstance(finite, jax.core.Tracer):
    if check_finite and not bool(finite):
      beyond = " or (as float64) values beyond float32's range" if x.dtype == np.float64 else ""
      raise ValueError(f"x contains NaN or Inf{beyond}; quantise only finite arrays")
    # Counted apart (compiled only when some scale is zero, e.g. for all-zero blocks).
    zeroed = int(_zero_scaled_blocks(x, scales, scale_scales, offsets, plan.static)
                 ) if bool(some_zero) else 0
    if zeroed:
      warnings.warn(
          f"quantise: {zeroed} block(s) of x with nonzero values have a stored scale of "
          "zero and dequantise to zero: the scale is below float32's smallest normal number "
          f"({scaling.FLOAT32_TINY:.3g}), or below the range of float8 or double-quantised "
          "scales relative to the largest scale", stacklevel=2)
  return plan.assemble(words, scales, scale_scales, x, offsets), exact


def padded_codebook(codebook: jax.Array, bits: int) -> jax.Array:
  """The codebook padded with its last value to exactly 2**bits float32 entries."""
  codebook = jnp.asarray(codebook, jnp.float32)
  pad = 2**bits - codebook.shape[0]
  return jnp.concatenate([codebook, jnp.broadcast_to(codebook[-1:], (pad,))]) if pad else codebook


class _Static(NamedTuple):
  """The static configuration `_quantise` compiles for (formats of one bit width share it)."""
  axis: int
  block_size: int
  granularity: str
  bits: int
  scaling: str
  scale_dtype: str
  double_quant: bool
  scale_search: bool
  ties_to_even: bool


class Plan(NamedTuple):
  """How `spec` quantises an array like `x`: the static configuration, the float32 codebook
  and the host constants (passed as arrays, so formats of one bit width share programs)."""
  static: _Static
  codebook: jax.Array
  inverse_reference: jax.Array  # 1 / what the block statistic maps onto
  ceiling: jax.Array  # the largest stored scale magnitude (`scaling.scale_ceiling`)
  offset_ceiling: jax.Array  # the largest stored offset magnitude (minmax)

  def assemble(self, words, scales, scale_scales, x, offsets=None) -> QuantisedArray:
    """The `QuantisedArray` of packed `words`, stored scales and, for minmax, the stored
    (offsets, second-level offset scales) for an array like `x`."""
    offsets, offset_scales = (None, None) if offsets is None else offsets
    return QuantisedArray(
        codes=words, scales=scales, codebook=padded_codebook(self.codebook, self.static.bits),
        scale_scales=scale_scales, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
        axis=self.static.axis, block_size=self.static.block_size, bits=self.static.bits,
        granularity=self.static.granularity, offsets=offsets, offset_scales=offset_scales)


def plan_for(x, spec: QuantSpec) -> Plan:
  """The `Plan` of quantising `x` (its shape and dtype) with `spec`."""
  axis = spec.axis % len(x.shape)
  granularity = spec.block_size if spec.block_size in GRANULARITIES else "block"
  block_size = spec.block_size if granularity == "block" else x.shape[axis]
  static = _Static(axis, block_size, granularity, spec.format.bits, spec.scaling,
                   spec.scale_dtype, spec.double_quant, spec.scale_search,
                   spec.format.ties_to_even or spec.scaling == "mx")
  inverse_reference = np.float32(1) / np.float32(scaling.format_reference(spec.format,
                                                                          spec.scaling))
  ceiling = scaling.scale_ceiling(spec.format.values, x.dtype, spec.scale_dtype)
  offset_ceiling = scaling.scale_ceiling(np.ones(1), x.dtype, spec.scale_dtype)
  return Plan(static, jnp.asarray(spec.format.values, jnp.float32),
              jnp.float32(inverse_reference), jnp.float32(ceiling), jnp.float32(offset_ceiling))


def stored_scales(scales, multiplier, ceiling, static: _Static, factors=None):
  """Exact, stored and decoded block scales from s = statistic / reference.

  The exact scale is s·multiplier, saturated at ±`ceiling` and zero below 2^-126; it is then
  stored (`scaling.encode_scales`, or with `factors` elementwise relative to second-level
  factors fixed beforehand, `scaling.encode_relative`). Returns (exact, (stored, second-level
  scales or None), decoded); with `factors` the second level is left to the caller (None).
  """
  exact = jnp.clip(scales * multiplier, -ceiling, ceiling)
  exact = jnp.where(jnp.abs(exact) < scaling.FLOAT32_TINY, 0.0, exact)
  return exact, *_store(exact, static, static.scaling == "signmax", factors)


def stored_offsets(low, decoded_scales, v_min, ceiling, static: _Static):
  """Minmax: the exact, stored and decoded block offsets o = min − s·v_min for the decoded
  scales s, saturated at ±`ceiling` and zero below 2^-126, stored signed like the scales."""
  exact = jnp.clip(low - decoded_scales * v_min, -ceiling, ceiling)
  exact = jnp.where(jnp.abs(exact) < scaling.FLOAT32_TINY, 0.0, exact)
  return exact, *_store(exact, static, True, None)


def _store(exact, static: _Static, signed: bool, factors):
  """(stored, decoded) of exact block scales or offsets (see `stored_scales`)."""
  if factors is None and (static.double_quant or static.scale_dtype == "float8_e4m3fn"):
    stored = scaling.encode_scales(exact, static.scale_dtype, static.double_quant, signed)
    return stored, scaling.decode_scales(*stored)
  codes, decoded = scaling.encode_relative(exact, factors, static.scale_dtype,
                                           static.double_quant, signed,
                                           round_up=static.scaling != "mx")
  return (codes, None), decoded


def scale_multiplier(xb, scales, codebook, ceiling, static: _Static):
  """The rms scale search's multiplier (1 without `scale_search`): of
  `scaling.scale_search_multipliers`, the one whose stored scales give the least squared
  error on the blocks `xb`."""
  if not static.scale_search:
    return jnp.float32(1.0)

  def squared_error(m):
    _, _, decoded = stored_scales(scales, m, ceiling, static)
    codes = nearest_codes(scaling.divide(xb, decoded), codebook, static.ties_to_even)
    return jnp.sum(jnp.square(codebook[codes] * decoded - xb))
  candidates = jnp.asarray(scaling.scale_search_multipliers())
  return candidates[jnp.argmin(jax.lax.map(squared_error, candidates))]


def _scale_and_round(xb, codebook, inverse_reference, ceiling, offset_ceiling,
                     static: _Static, n: int):
  """The stored scales, the nearest codes, the exact scales, a finiteness flag, whether
  some stored scale is zero, the rms search's multiplier and the stored offsets (minmax;
  else None)."""
  per_tensor = static.granularity == "tensor"
  statistic = scaling.block_statistic(xb, static.scaling, static.axis, n, per_tensor)
  scales = statistic * inverse_reference
  multiplier = scale_multiplier(xb, scales, codebook, ceiling, static)
  exact, stored, decoded = stored_scales(scales, multiplier, ceiling, static)
  offsets, shifted = None, xb
  if static.scaling == "minmax":
    low = scaling.block_minimum(xb, static.axis, n, per_tensor)
    _, offsets, decoded_offsets = stored_offsets(low, decoded, codebook[0], offset_ceiling,
                                                 static)
    # The padding of a partial last block is 0 after the shift too, so that it takes the
    # code nearest 0, as under symmetric scaling (`jaxquant.entropy.symbols` rebuilds it).
    real = True if per_tensor else scaling.is_real(xb, static.axis, n)
    shifted = jnp.where(real, xb - decoded_offsets, 0.0)
  codes = nearest_codes(scaling.divide(shifted, decoded), codebook, static.ties_to_even)
  lost = decoded == 0 if offsets is None else (decoded == 0) & (decoded_offsets == 0)
  return (stored, codes, exact, jnp.all(jnp.isfinite(statistic)), jnp.any(lost),
          multiplier, offsets)


def pack_codes(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  """Codes laid out like the array (blocks merged along `axis`) packed into uint32 words."""
  pad = [(0, 0)] * codes.ndim
  pad[axis] = (0, -codes.shape[axis] % packing.GROUP)
  return packing.pack(jnp.pad(codes, pad), bits, axis)


def round_to_nearest(x: jax.Array, plan: Plan):
  """`quantise`'s program: (packed words, stored scales, second-level scales, exact scales,
  whether x is finite, whether some stored scale is zero, the rms search's multiplier, and
  for minmax (stored offsets, their second-level scales), else None)."""
  return _quantise(x, plan.codebook, plan.inverse_reference, plan.ceiling, plan.offset_ceiling,
                   plan.static)


@functools.partial(jax.jit, static_argnums=5)
def _quantise(x: jax.Array, codebook: jax.Array, inverse_reference: jax.Array,
              ceiling: jax.Array, offset_ceiling: jax.Array, static: _Static):
  axis, n = static.axis, x.shape[static.axis]
  xb = scaling.to_blocks(x.astype(jnp.float32), axis, static.block_size)
  (scales, scale_scales), codes, exact, finite, some_zero, multiplier, offsets = (
      _scale_and_round(xb, codebook, inverse_reference, ceiling, offset_ceiling, static, n))
  codes = codes.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 1:])
  words = pack_codes(codes, static.bits, axis)
  if offsets is not None:
    offsets = (jnp.squeeze(offsets[0], axis + 1), offsets[1])
  return (words, jnp.squeeze(scales, axis + 1), scale_scales, jnp.squeeze(exact, axis + 1),
          finite, some_zero, multiplier, offsets)


@functools.partial(jax.jit, static_argnums=4)
def _zero_scaled_blocks(x, scales, scale_scales, offsets, static: _Static):
  xb = scaling.to_blocks(x.astype(jnp.float32), static.axis, static.block_size)
  decoded = scaling.decode_scales(scales, scale_scales)
  if offsets is not None:  # a block with a zero scale and a nonzero offset keeps a value
    decoded = jnp.where(scaling.decode_scales(*offsets) != 0, 1.0, decoded)
  decoded = jnp.expand_dims(decoded, static.axis + 1)
  reduce_axes = tuple(range(xb.ndim)) if static.granularity == "tensor" else (static.axis + 1,)
  return scaling.zero_scaled_blocks(xb, decoded, reduce_axes)


@functools.partial(jax.jit, static_argnums=1)
def dequantise(q: QuantisedArray, dtype=None) -> jax.Array:
  """The array a `QuantisedArray` represents: codebook[code] · scale (+ offset), in `dtype`.

  Computed in float32; with offsets, scale·value + offset may round once (a fused
  multiply-add, as XLA's CPU emits) or twice, which differ by at most one ulp (none where the
  product is exact, as for GGUF's Q4_1 and K types).

  Args:
    q: the quantised array, or a container built on one that dequantises itself (e.g.
      `jaxquant.outliers.OutlierQuantisedArray`).
    dtype: output dtype; default the dtype `q` was quantised from.

  Returns:
    An array of shape `q.shape`.
  """
  if not isinstance(q, QuantisedArray):
    # Calling the container's own method keeps this module free of imports of its containers.
    return q.dequantise(dtype)
  axis, n = q.axis, q.shape[q.axis]
  codes = packing.unpack(q.codes, q.bits, axis)
  codes = jax.lax.slice_in_dim(codes, 0, q.n_blocks * q.block_size, axis=axis)
  values = codebook_lookup(q.codebook, codes)
  blocked = values.reshape(values.shape[:axis] + (q.n_blocks, q.block_size) + values.shape[axis + 1:])
  blocked = blocked * jnp.expand_dims(q.decoded_scales(), axis + 1)
  if q.offsets is not None:
    blocked = blocked + jnp.expand_dims(q.decoded_offsets(), axis + 1)
  w = scaling.from_blocks(blocked, axis, n)
  return w.astype(q.dtype if dtype is None else dtype)


def gather(q: QuantisedArray, indices: jax.Array, params: dict) -> jax.Array:
  """`lax.gather(W, indices, **params)` for the W that `q` represents, in `q.dtype`.

  Takes point gathers of whole slices along axes other than the packed one (rows of an
  embedding table [vocabulary, features] packed along the features, as ``table[ids]`` and
  ``jnp.take(table, ids, axis=0)`` produce): the same gather picks the packed words and the
  scales, and only the gathered slices are dequantised. Out-of-range indices behave as the
  gather's `mode` says (NaN rows under ``jnp.take``'s fill mode, as for a float table).

  Raises:
    NotImplementedError: the gather takes part of a slice, indexes the packed axis, or has
      batching dimensions.
  """
  numbers, sizes = params["dimension_numbers"], tuple(params["slice_sizes"])
  indexed = set(numbers.start_index_map)
  whole = all(sizes[a] == q.shape[a] for a in range(q.ndim) if a not in indexed)
  if (q.axis in indexed or set(numbers.collapsed_slice_dims) != indexed or not whole
      or numbers.operand_batching_dims):
    raise NotImplementedError(
        f"this gather from a weight of shape {q.shape} quantised along axis {q.axis} "
        f"(slice sizes {sizes}, {numbers}) is not a gather of whole slices along other axes; "
        "only those (embedding rows) are taken from packed codes")
  code_sizes = list(sizes)
  code_sizes[q.axis] = q.codes.shape[q.axis]
  codes = jax.lax.gather(q.codes, indices, numbers, tuple(code_sizes),
                         indices_are_sorted=params["indices_are_sorted"],
                         unique_indices=params["unique_indices"],
                         mode=jax.lax.GatherScatterMode.CLIP)

  def gathered(block_values):  # the decoded scales or offsets of the gathered slices
    block_values = jnp.broadcast_to(block_values, tuple(
        q.shape[a] if a in indexed else block_values.shape[a] for a in range(q.ndim)))
    value_sizes = [block_values.shape[a] if a not in indexed else sizes[a]
                   for a in range(q.ndim)]
    return jax.lax.gather(block_values, indices, numbers, tuple(value_sizes),
                          indices_are_sorted=params["indices_are_sorted"],
                          unique_indices=params["unique_indices"], mode=params["mode"],
                          fill_value=params["fill_value"])

  kept = [a for a in range(q.ndim) if a not in indexed]
  axis = numbers.offset_dims[kept.index(q.axis)]
  shape = tuple(codes.shape[:axis]) + (q.shape[q.axis],) + tuple(codes.shape[axis + 1:])
  offsets = None if q.offsets is None else gathered(q.decoded_offsets())
  rows = dataclasses.replace(q, codes=codes, scales=gathered(q.decoded_scales()),
                             scale_scales=None, offsets=offsets, offset_scales=None,
                             shape=shape, axis=axis)
  return dequantise(rows)
