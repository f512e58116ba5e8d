"""Sort-free selection of the lowest scores, for pruning masks.

XLA's sort is slow on CPU (a stable argsort of a 576 x 1536 score matrix
takes a few hundred milliseconds, and pruning a model sorts hundreds of
them). A mask only needs to know which scores fall below the k-th
smallest, and that threshold can be found by bisection over the scores'
order-preserving 32-bit keys: 32 counting passes, each one a comparison and
a sum. The results equal a stable ascending sort's exactly, ties included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["float_key", "lowest_k_mask", "run_rank"]


def float_key(x: jax.Array, *, nan_high: bool = True) -> jax.Array:
  """uint32 keys ordered as the float32 values `x`: `-0.0` and `0.0` share a key;
  NaN is above everything (`nan_high`, as in an ascending sort) or below."""
  x = jnp.asarray(x, jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  neg = (bits >> 31) == 1
  key = jnp.where(neg, ~bits, bits | jnp.uint32(0x80000000))
  return jnp.where(jnp.isnan(x), jnp.uint32(0xFFFFFFFF if nan_high else 0), key)


def lowest_k_mask(scores: jax.Array, k, axis: int | None = None) -> jax.Array:
  """True for the `k` lowest scores (of the whole array, or of each slice along
  `axis`); among equal scores the lower index first, as a stable ascending
  sort. `k` may be traced (then one for the whole array)."""
  return _lowest_k_mask(jnp.asarray(scores), jnp.asarray(k, jnp.int32), axis=axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def _lowest_k_mask(scores: jax.Array, k: jax.Array, *, axis: int | None) -> jax.Array:
  shape = scores.shape
  if axis is None:
    s = scores.reshape(1, -1)
  else:
    s = jnp.moveaxis(scores, axis, -1)
  key = float_key(s)

  def bisect(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(key <= mid, axis=-1, keepdims=True) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  # Per slice, the smallest key t with at least k keys <= t.
  ones = jnp.ones(key.shape[:-1] + (1,), jnp.uint32)
  t, _ = jax.lax.fori_loop(0, 32, bisect, (0 * ones, ones * jnp.uint32(0xFFFFFFFF)))
  below = key < t
  tied = key == t
  need = k - jnp.sum(below, axis=-1, keepdims=True)
  take = below | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=-1) <= need))
  take = take & (k > 0)
  if axis is None:
    return take.reshape(shape)
  return jnp.moveaxis(take, -1, axis)


def run_rank(g: jax.Array) -> jax.Array:
  """Rank of each score within its run (the last axis, of a few values): 0 for the
  largest; among equal scores the lower index ranks first (a stable descending
  sort). NaN ranks last."""
  key = float_key(g, nan_high=False)
  m = g.shape[-1]
  idx = jnp.arange(m)
  k_j, k_i = key[..., :, None], key[..., None, :]  # candidate j, other i
  ahead = (k_i > k_j) | ((k_i == k_j) & (idx[None, :] < idx[:, None]))
  return jnp.sum(ahead, axis=-1)
