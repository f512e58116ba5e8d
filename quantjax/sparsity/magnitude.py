"""Magnitude pruning, masks as pytrees, and the rule-driven `prune_params`.

A mask tree has the params tree's structure with a boolean array where a leaf
is pruned and `None` elsewhere. `apply_masks` multiplies them in (training
loops call it after every update so pruned weights stay zero).

References:
  Han et al., "Learning both Weights and Connections for Efficient Neural
  Networks", NeurIPS 2015 (magnitude pruning).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.sparsity import _select as select_lib
from quantjax.sparsity import nm as nm_lib

__all__ = ["magnitude_mask", "mask_from_scores", "prune_params", "apply_masks", "sparsity_of"]


def mask_from_scores(scores: jax.Array, sparsity: float, *, axis: int | None = None) -> jax.Array:
  """Keeps the highest scores: a `sparsity` fraction of each slice is dropped.

  Args:
    scores: importance per value.
    sparsity: fraction of zeros, in [0, 1).
    axis: None ranks the whole tensor; an int ranks each slice along that axis
      separately (Wanda ranks per output: axis=0 for `[in, out]`).
  """
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  s = jnp.asarray(scores, jnp.float32)
  if axis is None:
    k = int(round(sparsity * s.size))
    if k == 0:
      return jnp.ones(s.shape, bool)
    return ~select_lib.lowest_k_mask(s, k)
  axis = axis % s.ndim
  k = int(round(sparsity * s.shape[axis]))
  if k == 0:
    return jnp.ones(s.shape, bool)
  return ~select_lib.lowest_k_mask(s, k, axis=axis)


def magnitude_mask(w: jax.Array, sparsity: float, *, axis: int | None = None) -> jax.Array:
  """Unstructured magnitude mask keeping the largest |w|."""
  return mask_from_scores(jnp.abs(w), sparsity, axis=axis)


def apply_masks(params: Any, masks: Any) -> Any:
  """`params * mask` where a mask is given; leaves with a `None` mask pass through."""
  def fn(p, m):
    if m is None:
      return p
    return jnp.where(m, p, jnp.zeros((), p.dtype))
  return jax.tree.map(fn, params, masks, is_leaf=lambda x: x is None)


def sparsity_of(params: Any, masks: Any | None = None) -> float:
  """Fraction of zeros over the masked leaves (or over all leaves without masks)."""
  zeros = total = 0
  if masks is None:
    for x in jax.tree.leaves(params):
      zeros += int(jnp.sum(x == 0))
      total += x.size
  else:
    for m in jax.tree.leaves(masks):
      zeros += int(jnp.sum(~m))
      total += m.size
  return zeros / total if total else 0.0


ScoreFn = Callable[[str, jax.Array], jax.Array]


def prune_params(params: Any, rules: Sequence[rules_lib.PruneRule], *,
                 scores: Mapping[str, jax.Array] | ScoreFn | None = None,
                 strict: bool = False) -> tuple[Any, Any]:
  """Prunes the leaves matched by `rules`; returns `(pruned_params, masks)`.

  Args:
    params: any params pytree.
    rules: `PruneRule`s (first match wins; `skip=True` keeps a leaf dense).
      `sparsity` gives unstructured pruning ranked per output (axis 0 slices
      of `[in, out]` kernels, as Wanda does) and `n`, `m` N:M pruning along
      the input axis.
    scores: importance per leaf: a dict path -> scores, or a function
      `(path, weight) -> scores`; default |w| (magnitude pruning). Wanda
      passes |w| * ||x||.
    strict: error on rules that match nothing or leaves no rule covers.
  """
  rules = tuple(rules)
  report = rules_lib.match_rules(params, rules)
  if report.unused_rules:
    msg = "prune_params: rules that matched no leaf: " + ", ".join(
        repr(r.module_path) for r in report.unused_rules)
    if strict:
      raise ValueError(msg)
    warnings.warn(msg, stacklevel=2)
  if strict and report.uncovered:
    raise ValueError(f"prune_params: leaves no rule covered: {', '.join(report.uncovered[:8])}")

  def score_of(path, w):
    if scores is None:
      return jnp.abs(w)
    if callable(scores):
      return scores(path, w)
    return scores.get(path, jnp.abs(w))

  def mask_fn(path, w):
    idx = report.assignments.get(path)
    if idx is None or rules[idx].skip:
      return None
    r = rules[idx]
    stack = rules_lib.stack_axes_of(r, path, w.shape, "prune_params")
    s = score_of(path, w)
    if r.n is not None and r.m is not None:
      return rules_lib.map_slices(lambda v: nm_lib.nm_mask_from_scores(v, r.n, r.m, axis=0), s,
                                  stack)
    own = w.ndim - len(stack)
    return rules_lib.map_slices(
        lambda v: mask_from_scores(v, r.sparsity, axis=None if own < 2 else 0), s, stack)

  masks = rules_lib.map_with_paths(mask_fn, params)
  return apply_masks(params, masks), masks
