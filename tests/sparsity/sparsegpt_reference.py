"""The numpy float64 SparseGPT that `quantjax.sparsity.sparsegpt` replaced.

A plain Python loop over columns, kept as the reference the jitted version
is checked against (tests) and timed against (`experiments/bench_sparsity.py`).
Same arguments, checks and result as `sparsegpt_prune`.

References:
  Frantar & Alistarh. "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", ICML 2023, arXiv:2301.00774.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from quantjax.methods.gptq import inverse_cholesky_upper
from quantjax.sparsity.sparsegpt import SparseGPTResult


def sparsegpt_prune_reference(w, h, *, sparsity=None, n=None, m=None, block_size=128,
                              percdamp=0.01) -> SparseGPTResult:
  """Prunes `w` `[in, out]` given the input Hessian `h` `[in, in]`, in float64 numpy."""
  w = np.asarray(w, np.float64)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"SparseGPT needs w [in, out] and h [in, in]; got {w.shape}, {h.shape}")
  nm = n is not None and m is not None
  if not nm and (sparsity is None or not 0.0 <= sparsity < 1.0):
    raise ValueError(f"SparseGPT needs sparsity in [0, 1) or n and m; got sparsity={sparsity}")
  if nm:
    if not 0 < n <= m or w.shape[0] % m:
      raise ValueError(f"N:M {n}:{m} does not fit the input dimension {w.shape[0]}")
    block_size = max(m, block_size - block_size % m)
  h = np.array(h, np.float64)
  if not np.all(np.isfinite(h)):
    raise ValueError("SparseGPT: the Hessian holds NaN/Inf values")
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  hinv = inverse_cholesky_upper(h, percdamp, what="SparseGPT")
  wt = w.T.copy()  # [out, in]: the paper's layout
  wt[:, dead] = 0.0
  rows, cols = wt.shape
  prune = np.zeros_like(wt, dtype=bool)
  for i1 in range(0, cols, block_size):
    i2 = min(i1 + block_size, cols)
    w1 = wt[:, i1:i2].copy()
    err1 = np.zeros_like(w1)
    h1 = hinv[i1:i2, i1:i2]
    d1 = np.diag(h1)
    mask1 = np.zeros_like(w1, dtype=bool)
    if not nm:
      score = w1 ** 2 / d1[None, :] ** 2
      k = int(score.size * sparsity)
      if k > 0:
        thresh = np.sort(score.reshape(-1))[k - 1]
        mask1 = score <= thresh
        # ties can prune a few extra; keep exactly k pruned
        extra = int(mask1.sum()) - k
        if extra > 0:
          tied = np.argwhere(mask1 & (score == thresh))
          for r, c in tied[:extra]:
            mask1[r, c] = False
    for i in range(i2 - i1):
      if nm and i % m == 0:
        score = w1[:, i:i + m] ** 2 / d1[None, i:i + m] ** 2
        drop = np.argsort(score, axis=1, kind="stable")[:, :m - n]
        np.put_along_axis(mask1[:, i:i + m], drop, True, axis=1)
      col = w1[:, i]
      q = np.where(mask1[:, i], 0.0, col)
      e = (col - q) / d1[i]
      w1[:, i:] -= np.outer(e, h1[i, i:])
      w1[:, i] = q
      err1[:, i] = e
    wt[:, i1:i2] = w1
    prune[:, i1:i2] = mask1
    wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  out = jnp.asarray(wt.T, jnp.float32)
  return SparseGPTResult(weight=out, mask=jnp.asarray(~prune.T))
