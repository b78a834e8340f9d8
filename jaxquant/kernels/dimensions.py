"""The axes of a `lax.dot_general` between activations x and a weight W, and their roles.

`lax.dot_general(x, W, ((x_c, w_c), (x_b, w_b)))` pairs the contracting axes x_c with w_c and
the batch axes x_b with w_b; every other axis is free. The output lists the batch axes (in the
order given), then x's free axes, then W's free axes (each in increasing order). Its gradient
with respect to x is the same kind of product with the roles of W's axes swapped: contract g's
W-free axes with W's free axes, keep the batch axes, and W's contracting axes come out free
(in increasing order), which a transpose puts back where x had them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class Contraction:
  """A checked `lax.dot_general` dimension spec for x (`x_ndim` axes) and W (`w_ndim` axes)."""

  x_ndim: int
  w_ndim: int
  x_contracting: tuple[int, ...]
  w_contracting: tuple[int, ...]
  x_batch: tuple[int, ...]
  w_batch: tuple[int, ...]

  @classmethod
  def of(cls, dimension_numbers, x_shape: Sequence[int], w_shape: Sequence[int]
         ) -> "Contraction":
    """Validates `dimension_numbers` for these shapes (non-negative axes in the result)."""
    try:
      (x_c, w_c), (x_b, w_b) = dimension_numbers
      axes = [tuple(int(a) for a in group) for group in (x_c, w_c, x_b, w_b)]
    except (TypeError, ValueError):
      raise TypeError(f"dimension_numbers={dimension_numbers!r} must be "
                      "((x_contracting, w_contracting), (x_batch, w_batch)), tuples of ints, "
                      "as for jax.lax.dot_general") from None
    x_c, w_c, x_b, w_b = axes
    x_ndim, w_ndim = len(x_shape), len(w_shape)
    for name, group, ndim in (("x_contracting", x_c, x_ndim), ("w_contracting", w_c, w_ndim),
                              ("x_batch", x_b, x_ndim), ("w_batch", w_b, w_ndim)):
      if not all(-ndim <= a < ndim for a in group):
        raise ValueError(f"dimension_numbers={dimension_numbers!r}: {name}={group} is out of "
                         f"range for an operand with {ndim} axes")
    x_c, x_b = tuple(a % x_ndim for a in x_c), tuple(a % x_ndim for a in x_b)
    w_c, w_b = tuple(a % w_ndim for a in w_c), tuple(a % w_ndim for a in w_b)
    if len(x_c) != len(w_c) or len(x_b) != len(w_b):
      raise ValueError(f"dimension_numbers={dimension_numbers!r} pairs {len(x_c)} with "
                       f"{len(w_c)} contracting axes, {len(x_b)} with {len(w_b)} batch axes")
    for name, group in (("x", x_c + x_b), ("w", w_c + w_b)):
      if len(set(group)) != len(group):
        raise ValueError(f"dimension_numbers={dimension_numbers!r} names an axis of {name} "
                         "twice")
    for kind, xs, ws in (("contracting", x_c, w_c), ("batch", x_b, w_b)):
      for a, b in zip(xs, ws):
        if x_shape[a] != w_shape[b]:
          raise ValueError(
              f"{kind} axes disagree: x axis {a} has length {x_shape[a]} but the weight's "
              f"axis {b} has {w_shape[b]} (x shape {tuple(x_shape)}, weight shape "
              f"{tuple(w_shape)}, dimension_numbers={dimension_numbers!r})")
    return cls(x_ndim, w_ndim, x_c, w_c, x_b, w_b)

  @property
  def dimension_numbers(self) -> DimensionNumbers:
    return ((self.x_contracting, self.w_contracting), (self.x_batch, self.w_batch))

  @property
  def x_free(self) -> tuple[int, ...]:
    return tuple(a for a in range(self.x_ndim) if a not in self.x_contracting + self.x_batch)

  @property
  def w_free(self) -> tuple[int, ...]:
    return tuple(a for a in range(self.w_ndim) if a not in self.w_contracting + self.w_batch)

  def x_axis_for(self, w_axis: int) -> int | None:
    """The axis of x that W's `w_axis` is contracted or batched with (None if free)."""
    for xs, ws in ((self.x_contracting, self.w_contracting), (self.x_batch, self.w_batch)):
      if w_axis in ws:
        return xs[ws.index(w_axis)]
    return None

  def output_axis_for(self, w_axis: int) -> int | None:
    """Where W's `w_axis` appears in the output (None if contracted)."""
    if w_axis in self.w_batch:
      return self.w_batch.index(w_axis)
    if w_axis in self.w_free:
      return len(self.w_batch) + len(self.x_free) + self.w_free.index(w_axis)
    return None

  def transposed(self) -> tuple["Contraction", tuple[int, ...]]:
    """The contraction of the output cotangent g with W that gives x's cotangent, and the
    permutation that lays its result out as x (module docstring)."""
    n_batch, n_free = len(self.w_batch), len(self.x_free)
    g_ndim = n_batch + n_free + len(self.w_free)
    g_contracting = tuple(range(n_batch + n_free, g_ndim))
    backward = Contraction(g_ndim, self.w_ndim, g_contracting, self.w_free,
                           tuple(range(n_batch)), self.w_batch)
    # Result axes: batch, x's free axes, then x's contracting axes ordered by W's axis.
    result_to_x = (self.x_batch + self.x_free +
                   tuple(self.x_axis_for(a) for a in sorted(self.w_contracting)))
    return backward, tuple(int(i) for i in np.argsort(result_to_x))

  def output_shape(self, x_shape: Sequence[int], w_shape: Sequence[int]) -> tuple[int, ...]:
    return (tuple(x_shape[a] for a in self.x_batch) + tuple(x_shape[a] for a in self.x_free) +
            tuple(w_shape[a] for a in self.w_free))
