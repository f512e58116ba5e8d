"""Wanda: prune by weight magnitude times input activation norm.

Score `S_ij = |W_ij| * ||X_i||_2` for input feature `i` and output `j`
(`W` `[in, out]`), compared within each output (the paper's per-output
groups), with no weight update. N:M patterns use the same score.

References:
  Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large
  Language Models" (Wanda), ICLR 2024, arXiv:2306.11695.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quantjax.sparsity import magnitude as magnitude_lib
from quantjax.sparsity import nm as nm_lib

__all__ = ["input_norms", "wanda_scores", "wanda_mask"]


def input_norms(x: jax.Array) -> jax.Array:
  """`||X_i||_2` per input feature of activations `[..., in]`."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x2 * x2, axis=0))


def wanda_scores(w: jax.Array, x_norm: jax.Array) -> jax.Array:
  """`|W| * ||X||` broadcast over outputs, for `w` `[in, out]` and `x_norm` `[in]`."""
  if w.ndim != 2 or x_norm.shape != (w.shape[0],):
    raise ValueError(f"wanda needs w [in, out] and x_norm [in]; got {w.shape} and {x_norm.shape}")
  return jnp.abs(w.astype(jnp.float32)) * x_norm[:, None].astype(jnp.float32)


def wanda_mask(w: jax.Array, x_norm: jax.Array, *, sparsity: float | None = None,
               n: int | None = None, m: int | None = None) -> jax.Array:
  """Boolean keep-mask: unstructured per output (`sparsity`) or N:M along the input axis."""
  s = wanda_scores(w, x_norm)
  if n is not None and m is not None:
    return nm_lib.nm_mask_from_scores(s, n, m, axis=0)
  if sparsity is None:
    raise ValueError("wanda_mask needs sparsity or n and m")
  return magnitude_lib.mask_from_scores(s, sparsity, axis=0)
