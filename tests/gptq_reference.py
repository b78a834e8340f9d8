"""An independent float64 GPTQ for a kernel W [K, N] quantised along K, written from the paper.

Frantar et al. (2022), Algorithm 1 without lazy batches: H ← H + λI with λ = damping·mean(diag H),
U = the upper Cholesky factor of H⁻¹ (float64), then row by row in the processing order
e = (w_r − ŵ_r) / U_ii and w_j ← w_j − U_ij e for every later row j. A block's scale is computed
when its first row is reached, from the rows of the block as they are then, with the
documented statistic and storage of `quantise_reference` (float32, bfloat16 or e8m0: storages
without a second level). The act order takes blocks by decreasing Σ diag H, rows inside a
block by decreasing diag H (stable). No code is shared with the library.
"""

from __future__ import annotations

import numpy as np

from tests import quantise_reference as ref

F32 = np.float32


def processing_order(diagonal, block_size, act_order):
  k = diagonal.shape[0]
  blocks = np.arange(k) // block_size
  if not act_order:
    return np.arange(k)
  mass = np.bincount(blocks, weights=diagonal)
  rank = np.empty_like(blocks[: mass.size])
  rank[np.argsort(-mass, kind="stable")] = np.arange(mass.size)
  return np.lexsort((-diagonal, rank[blocks]))


def gptq_reference(w, h, values, *, block_size, scaling, scale_dtype, rho=None, damping=0.01,
                   act_order=False):
  """(codes [K, N], decoded scales [n_blocks, N], the weights each block's scale was computed
  from [K, N])."""
  w = np.asarray(w, np.float64).copy()
  h = np.asarray(h, np.float64)
  k, n = w.shape
  order = processing_order(np.diag(h), block_size, act_order)
  h = h + damping * np.mean(np.diag(h)) * np.eye(k)
  hp = h[np.ix_(order, order)]
  upper = np.linalg.cholesky(np.linalg.inv(hp)).T
  rho = ref.reference_value(values, scaling) if rho is None else rho
  ceiling = ref.ceiling(values, np.float32, scale_dtype)
  n_blocks = -(-k // block_size)
  decoded = np.zeros((n_blocks, n), F32)
  at_start = np.zeros((k, n), F32)
  seen = set()
  codes = np.zeros((k, n), np.int64)
  for i, r in enumerate(order):
    block = r // block_size
    if block not in seen:
      seen.add(block)
      rows = slice(block * block_size, min(k, (block + 1) * block_size))
      current = w[rows].astype(F32)
      at_start[rows] = current
      stat = ref.statistic(current.T[:, None, :], np.full((n, 1), current.shape[0]), scaling)
      exact = ref.flush(np.clip((stat * (F32(1) / F32(rho))).astype(F32), -ceiling, ceiling))
      decoded[block] = ref.store(exact, scale_dtype, False, scaling == "signmax")[:, 0]
    row = w[r].astype(F32)
    codes[r] = ref.nearest(ref.divide(row, decoded[block]), values)
    quantised = np.asarray(values, F32)[codes[r]].astype(np.float64) * decoded[block]
    error = (w[r] - quantised) / upper[i, i]
    later = order[i + 1:]
    w[later] -= upper[i, i + 1:, None] * error[None, :]
  return codes, decoded, at_start
