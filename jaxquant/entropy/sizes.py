"""Sizes in bits of the parts of quantised arrays: stored scales and ideally coded codes.

With N elements, S the bits of the stored scales (second-level scales and block offsets
included) and c the codes over the format's K values, the ideal rate is
(-Σ log2 p̂(cᵢ) + S)/N with the +1-smoothed histogram p̂ (`ideal.ideal_bits`). The codebook
is not counted, as in `QuantisedArray.storage_bits`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.entropy import ideal


def scale_bits(*leaves) -> int:
  """Bits stored for the scales, second-level scales and offsets given (None: absent)."""
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize * 8 for leaf in leaves if leaf is not None)


def histogram_rate(counts: np.ndarray, n_scale_bits: int) -> float:
  """(-Σ log2 p̂(cᵢ) + S)/N from the histogram of N codes stored with S bits of scales."""
  return (ideal.histogram_bits(counts) + n_scale_bits) / int(np.sum(counts))
