"""Sort-free mask selection equals a stable sort's, ties, signed zeros and NaN included."""

import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import sparsity as sp
from quantjax.sparsity import _select
from quantjax.sparsity import magnitude


def _scores(seed, shape, kind):
  rng = np.random.default_rng(seed)
  if kind == "float":
    return rng.standard_normal(shape).astype(np.float32)
  s = rng.integers(-3, 4, size=shape).astype(np.float32)  # many exact ties
  if kind == "zeros_nan":
    s[rng.random(shape) < 0.2] = -0.0
    s[rng.random(shape) < 0.05] = np.nan
    s[rng.random(shape) < 0.05] = -np.inf
  return s


def _lowest_ref(s, k, axis):
  """The k lowest by a stable ascending sort (NaN last)."""
  if axis is None:
    flat = s.reshape(-1)
    out = np.zeros(flat.size, bool)
    out[np.argsort(flat, kind="stable")[:k]] = True
    return out.reshape(s.shape)
  moved = np.moveaxis(s, axis, -1)
  ranks = np.argsort(np.argsort(moved, axis=-1, kind="stable"), axis=-1, kind="stable")
  return np.moveaxis(ranks < k, -1, axis)


@pytest.mark.parametrize("kind", ["float", "ties", "zeros_nan"])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_lowest_k_mask_equals_a_stable_sort(kind, axis):
  s = _scores(0, (37, 24), kind)
  n = s.size if axis is None else s.shape[axis]
  for k in (0, 1, n // 3, n // 2, n - 1, n):
    got = np.asarray(_select.lowest_k_mask(jnp.asarray(s), k, axis=axis))
    np.testing.assert_array_equal(got, _lowest_ref(s, k, axis), err_msg=f"k={k}")


@pytest.mark.parametrize("kind", ["float", "ties", "zeros_nan"])
@pytest.mark.parametrize("m", [2, 4, 8])
def test_run_rank_equals_a_stable_descending_sort(kind, m):
  g = _scores(1, (50, 3, m), kind)
  want = np.argsort(np.argsort(-g, axis=-1, kind="stable"), axis=-1, kind="stable")
  np.testing.assert_array_equal(np.asarray(_select.run_rank(jnp.asarray(g))), want)


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_masks_keep_their_old_definitions(kind):
  s = np.abs(_scores(2, (64, 20), kind))
  for n, m in ((2, 4), (1, 4), (3, 8), (5, 40)):  # m = 40 takes the sorting path
    keep = np.asarray(sp.nm.nm_mask_from_scores(jnp.asarray(s[:40 if m == 40 else 64]), n, m))
    g = s[:keep.shape[0]].reshape(-1, m, 20)
    ranks = np.argsort(np.argsort(-g, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(keep, (ranks < n).reshape(keep.shape))
  for axis in (None, 0):
    keep = np.asarray(magnitude.mask_from_scores(jnp.asarray(s), 0.5, axis=axis))
    k = int(round(0.5 * (s.size if axis is None else s.shape[0])))
    np.testing.assert_array_equal(keep, ~_lowest_ref(s, k, axis))
