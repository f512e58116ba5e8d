"""SparseGPT: one-shot pruning with second-order weight reconstruction.

For a linear layer with weight `W` `[in, out]` and input Hessian
`H = 2 X^T X / n`, SparseGPT walks the input features in blocks; inside a
block it chooses the mask by `w^2 / [H^-1]_ii^2` (unstructured: a threshold
over the block; N:M: in every run of `m` inputs, the `m - n` lowest-scoring
are pruned), zeroes the pruned weights and spreads each removed weight's error
over the features not yet visited, weighted by the inverse Hessian (the
OBS update), exactly as GPTQ does for rounding.

Implementation notes:
  * dead inputs (`H_ii == 0`) get `H_ii = 1` and a zero weight row;
  * the upper Cholesky factor of the dampened `H^-1` is computed in float64
    (`quantjax.methods.gptq.inverse_cholesky_upper`), once per Hessian:
    weights that read the same input (q/k/v, gate/up) share it through
    `inverse_factor`;
  * the column loop is jitted in float32, in GPTQ's shape: a `lax.fori_loop`
    over blocks of `block_size` inputs with a lazy batched update of the
    inputs after each block, and inside a block sub-blocks of 16 columns
    updated the same way (`_sparsegpt_loop`). An input width that is not a
    multiple of `block_size` is padded with inert inputs at the end. One
    executable per (shape, pattern): identical layers reuse it;
  * unstructured: exactly `int(out * width * sparsity)` weights are pruned
    per block of `width` inputs, the lowest scores, found by bisection (no
    sort), ties at the threshold resolved as the float64 reference did (the
    later ones, in row-major order, go first);
  * N:M: the mask of each run of `m` inputs is chosen from the partially
    updated weights when the loop reaches it (ties: the earlier input goes).

References:
  Frantar & Alistarh. "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", ICML 2023, arXiv:2301.00774.
  Reference code: github.com/IST-DASLab/sparsegpt.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.methods.gptq import inverse_cholesky_upper
from quantjax.sparsity import _select as select_lib

__all__ = ["SparseGPTResult", "InverseFactor", "inverse_factor", "sparsegpt_prune"]

_SUB = 16  # columns per inner sub-block (see _sparsegpt_loop)


class SparseGPTResult(NamedTuple):
  """`weight`: the pruned, reconstructed `[in, out]` weight; `mask`: True where kept."""

  weight: jax.Array
  mask: jax.Array


class InverseFactor(NamedTuple):
  """What SparseGPT needs of a Hessian: `hinv`, the upper Cholesky factor of the
  dampened inverse (float32 `[in, in]`), and `dead`, the inputs never seen
  (`H_ii == 0`, bool `[in]`)."""

  hinv: jax.Array
  dead: np.ndarray
  percdamp: float


def inverse_factor(h: jax.Array, percdamp: float = 0.01) -> InverseFactor:
  """The dampened inverse Hessian's upper Cholesky factor, computed in float64.

  Raises:
    ValueError: `h` is not square, holds NaN/Inf, or stays indefinite after
      dampening.
  """
  h = np.array(h, np.float64)
  if h.ndim != 2 or h.shape[0] != h.shape[1]:
    raise ValueError(f"SparseGPT needs a square Hessian [in, in]; got shape {h.shape}")
  if not np.all(np.isfinite(h)):
    raise ValueError("SparseGPT: the Hessian holds NaN/Inf values")
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  hinv = inverse_cholesky_upper(h, percdamp, what="SparseGPT")
  return InverseFactor(jnp.asarray(hinv, jnp.float32), dead, float(percdamp))


def _block_prune_unstructured(score: jax.Array, k: jax.Array) -> jax.Array:
  """Prune mask of one block's scores `[out, width]`: exactly the `k` lowest
  (padding holds +inf); among equal scores the later ones (row-major) first,
  as the reference loop resolved ties. A bisection, not a sort
  (`quantjax.sparsity._select`)."""
  rev = score.reshape(-1)[::-1]
  return select_lib.lowest_k_mask(rev, k)[::-1].reshape(score.shape)


def _run_prune_nm(score: jax.Array, n: int, m: int) -> jax.Array:
  """Prune mask `[out, m]`: the `m - n` lowest scores of each row (ties: the
  earlier input goes)."""
  return select_lib.run_rank(-score) < (m - n)


def _sub_size(width: int, m: int | None) -> int:
  """Columns per inner sub-block: a divisor of `width` (a multiple of `m` for N:M)
  near `_SUB`."""
  unit = m or 1
  runs = width // unit
  best = 1
  for c in range(1, max(1, _SUB // unit) + 1):
    if runs % c == 0:
      best = c
  return best * unit


@functools.partial(jax.jit, static_argnames=("block", "sparsity", "n", "m"))
def _sparsegpt_loop(wt: jax.Array, hinv: jax.Array, *, block: int, sparsity: float | None,
                    n: int | None, m: int | None) -> tuple[jax.Array, jax.Array]:
  """The jitted column loop.

  Two levels of lazy updates: blocks of `block` inputs update the inputs after
  them with one product when done (the paper's lazy batch update); inside a
  block, sub-blocks of a few columns (`_sub_size`) do their OBS updates
  column by column on their own `[out, sub]` slice, then update the rest of
  the block with one product. The same arithmetic as updating the whole row
  after every column, in another summation order, with a fraction of the
  memory traffic. An input width that is not a multiple of `block` is padded
  with zero inputs at the end (identity factor rows): they come after every
  real input, so they change nothing, and unstructured scores give them +inf
  and count only the real entries of the last block.

  Args:
    wt: `[out, in]` float32 weights (the paper's layout), dead inputs zeroed.
    hinv: `[in, in]` float32 upper Cholesky factor of the dampened `H^-1`.
    block: inputs per lazy-update block (a multiple of `m` for N:M).
    sparsity / n, m: the pattern (unstructured when `n` is None).

  Returns:
    (pruned and reconstructed `[out, in]` weights, prune mask `[out, in]`).
  """
  out, cols = wt.shape
  nm = n is not None
  nblocks = -(-cols // block)
  padded = nblocks * block
  if padded > cols:
    wt = jnp.pad(wt, ((0, 0), (0, padded - cols)))
    hinv = jnp.pad(hinv, ((0, padded - cols), (0, padded - cols)))
    hinv = hinv + jnp.diag((jnp.arange(padded) >= cols).astype(hinv.dtype))
  if not nm:
    last = cols - (nblocks - 1) * block
    k_full, k_last = int(out * block * sparsity), int(out * last * sparsity)
  sub = _sub_size(block, m)
  run = m if nm else 1
  hi = jax.lax.Precision.HIGHEST

  def block_body(b, carry):
    w_all, prune = carry
    i1 = b * block
    w1 = jax.lax.dynamic_slice(w_all, (0, i1), (out, block))
    h1 = jax.lax.dynamic_slice(hinv, (i1, i1), (block, block))
    d1 = jnp.diagonal(h1)
    if nm:
      mask1 = jnp.zeros((out, block), bool)
    else:
      real = (i1 + jnp.arange(block)) < cols
      score = jnp.where(real[None, :], (w1 * w1) / (d1 * d1)[None, :], jnp.inf)
      mask1 = _block_prune_unstructured(score, jnp.where(b == nblocks - 1, k_last, k_full))

    def sub_body(si, c):
      w1, mask1, e1 = c
      j0 = si * sub
      ws = jax.lax.dynamic_slice(w1, (0, j0), (out, sub))
      hs = jax.lax.dynamic_slice(h1, (j0, j0), (sub, sub))
      ms = jax.lax.dynamic_slice(mask1, (0, j0), (out, sub))
      es = jnp.zeros((out, sub), jnp.float32)

      def run_body(r, c2):
        ws, ms, es = c2
        r0 = r * run
        if nm:
          wg = jax.lax.dynamic_slice(ws, (0, r0), (out, m))
          dg = jax.lax.dynamic_slice(jnp.diagonal(hs), (r0,), (m,))
          ms = jax.lax.dynamic_update_slice(
              ms, _run_prune_nm((wg * wg) / (dg * dg)[None, :], n, m), (0, r0))
        for t in range(run):
          j = r0 + t
          col = jax.lax.dynamic_index_in_dim(ws, j, 1, keepdims=False)
          pruned = jax.lax.dynamic_index_in_dim(ms, j, 1, keepdims=False)
          hrow = jax.lax.dynamic_index_in_dim(hs, j, 0, keepdims=False)
          q = jnp.where(pruned, 0.0, col)
          e = (col - q) / jax.lax.dynamic_index_in_dim(hrow, j, 0, keepdims=False)
          # The factor is upper triangular: columns before j do not move;
          # column j is set to q.
          ws = jax.lax.dynamic_update_index_in_dim(ws - e[:, None] * hrow[None, :], q, j, 1)
          es = jax.lax.dynamic_update_index_in_dim(es, e, j, 1)
        return ws, ms, es

      ws, ms, es = jax.lax.fori_loop(0, sub // run, run_body, (ws, ms, es),
                                     unroll=1 if nm else 4)
      # The rest of the block (factor rows are zero left of the sub-block; its
      # own columns are overwritten with their final values).
      hrows = jax.lax.dynamic_slice(h1, (j0, 0), (sub, block))
      w1 = w1 - jnp.dot(es, hrows, precision=hi)
      w1 = jax.lax.dynamic_update_slice(w1, ws, (0, j0))
      mask1 = jax.lax.dynamic_update_slice(mask1, ms, (0, j0))
      e1 = jax.lax.dynamic_update_slice(e1, es, (0, j0))
      return w1, mask1, e1

    e1 = jnp.zeros((out, block), jnp.float32)
    w1, mask1, e1 = jax.lax.fori_loop(0, block // sub, sub_body, (w1, mask1, e1))
    # Lazy update of every later input, likewise.
    hrows = jax.lax.dynamic_slice(hinv, (i1, 0), (block, padded))
    w_all = w_all - jnp.dot(e1, hrows, precision=hi)
    w_all = jax.lax.dynamic_update_slice(w_all, w1, (0, i1))
    prune = jax.lax.dynamic_update_slice(prune, mask1, (0, i1))
    return w_all, prune

  w_all, prune = jax.lax.fori_loop(0, nblocks, block_body,
                                   (wt, jnp.zeros((out, padded), bool)))
  return w_all[:, :cols], prune[:, :cols]


def sparsegpt_prune(w: jax.Array, h: jax.Array | InverseFactor, *, sparsity: float | None = None,
                    n: int | None = None, m: int | None = None, block_size: int = 128,
                    percdamp: float = 0.01) -> SparseGPTResult:
  """Prunes `w` `[in, out]` given the input Hessian `h` `[in, in]`.

  Args:
    w: weight, Flax layout `[in, out]`.
    h: `2 X^T X / n` of the layer's inputs (see `quantjax.methods.gptq.hessian`),
      or its `inverse_factor(h, percdamp)` computed once for several weights
      that read the same input.
    sparsity: unstructured fraction of zeros (chosen per block of inputs).
    n, m: N:M pattern along the input axis (keep n of every m).
    block_size: inputs per lazy-update block (a multiple of m for N:M).
    percdamp: diagonal dampening, a fraction of mean(diag H) (taken from the
      factor when `h` is one).

  Returns:
    `SparseGPTResult(weight, mask)`: float32 `[in, out]` and bool `[in, out]`.

  Raises:
    ValueError: shapes that do not match, no pattern or a pattern that does
      not fit, a Hessian with NaN/Inf or indefinite after dampening.
  """
  w_shape = tuple(np.shape(w))
  h_shape = tuple(h.hinv.shape) if isinstance(h, InverseFactor) else tuple(np.shape(h))
  if len(w_shape) != 2 or h_shape != (w_shape[0], w_shape[0]):
    raise ValueError(f"SparseGPT needs w [in, out] and h [in, in]; got {w_shape}, {h_shape}")
  nm = n is not None and m is not None
  if not nm and (sparsity is None or not 0.0 <= sparsity < 1.0):
    raise ValueError(f"SparseGPT needs sparsity in [0, 1) or n and m; got sparsity={sparsity}")
  if nm:
    if not 0 < n <= m or w_shape[0] % m:
      raise ValueError(f"N:M {n}:{m} does not fit the input dimension {w_shape[0]}")
    block_size = max(m, block_size - block_size % m)
  if block_size < 1:
    raise ValueError(f"SparseGPT needs block_size >= 1, got {block_size}")
  wt = jnp.asarray(w, jnp.float32).T
  bad = int(jnp.sum(~jnp.isfinite(wt)))
  if bad:
    raise ValueError(f"SparseGPT: the weight (shape {w_shape}) holds {bad} NaN/Inf value(s)")
  fac = h if isinstance(h, InverseFactor) else inverse_factor(h, percdamp)
  if fac.dead.any():
    wt = jnp.where(jnp.asarray(fac.dead)[None, :], 0.0, wt)
  new, prune = _sparsegpt_loop(wt, fac.hinv, block=int(min(block_size, w_shape[0])),
                               sparsity=None if nm else float(sparsity),
                               n=int(n) if nm else None, m=int(m) if nm else None)
  return SparseGPTResult(weight=new.T, mask=~prune.T)
