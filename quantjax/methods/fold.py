"""Folding per-input-channel scales into the op that produces the input.

AWQ and SmoothQuant leave `InputScaled(weight, s)` leaves: the matmul divides
its input by `s`. When the input is produced by an op that can absorb `1/s`
exactly, an RMSNorm/LayerNorm scale before q/k/v or gate/up, or a linear whose
output columns are the input (up_proj before down_proj; v_proj before o_proj
without grouped-query attention), folding divides that producer by `s` and
leaves the consumers as their plain inner weights, so the model file holds
only QArrays and the run time pays no division.

Which producer feeds which consumers is architecture knowledge: it is data,
a list of `FoldGroup`s that lives beside each model
(`quantjax.models.llama.fold_groups(config)`), not code in the methods. A
producer that is already quantized is rescaled exactly through its per-column
scales (and float minima), so folding works after the whole model has been
quantized, in any order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray

__all__ = ["FoldGroup", "fold_input_scales", "get_leaves", "replace_leaves"]


@dataclasses.dataclass(frozen=True)
class FoldGroup:
  """Weights that read one input, and the op that produces it.

  Attributes:
    prev: path of the producer's parameter: a norm scale `[..., k]`
      (`prev_kind="norm"`) or a linear kernel `[..., in, k]` whose output
      columns are the consumers' inputs (`prev_kind="linear"`).
    consumers: paths of the weights that read that input.
    prev_kind: "norm" or "linear".
  """

  prev: str
  consumers: tuple[str, ...]
  prev_kind: str = "norm"

  def __post_init__(self):
    if self.prev_kind not in ("norm", "linear"):
      raise ValueError(f"prev_kind must be 'norm' or 'linear', got {self.prev_kind!r}")
    if not self.consumers:
      raise ValueError(f"FoldGroup({self.prev!r}) has no consumers")


def get_leaves(tree: Any) -> dict[str, Any]:
  """path -> leaf (QArrays and their wrappers kept whole)."""
  return dict(rules_lib.tree_leaves_with_paths(tree))


def replace_leaves(tree: Any, new: Mapping[str, Any]) -> Any:
  """The tree with the leaves at the given paths replaced (pure)."""
  missing = set(new) - set(get_leaves(tree))
  if missing:
    raise KeyError(f"no leaves at paths {sorted(missing)[:5]}")
  return rules_lib.map_with_paths(lambda p, x: new.get(p, x), tree)


def _input_vector(leaf: InputScaled, path: str) -> jax.Array:
  """The scale of a (possibly stacked) 2-D weight as `[..., k]`."""
  s = jnp.asarray(leaf.scale, jnp.float32)
  if s.ndim < 2:
    raise ValueError(f"{path}: an input scale of shape {s.shape} cannot be folded")
  if s.shape[-1] == 1:
    return s[..., 0]   # [..., in, 1]: an [in, out] kernel
  if s.shape[-2] == 1:
    return s[..., 0, :]  # [..., 1, in]: an [out, in] weight
  raise ValueError(f"{path}: input scale of shape {s.shape} is not that of a 2-D weight")


def _scale_columns(leaf: Any, inv_s: jax.Array, path: str) -> Any:
  """`leaf` with output column j multiplied by `inv_s[j]` (exact for QArrays with
  per-column scales)."""
  if isinstance(leaf, InputScaled):
    return dataclasses.replace(leaf, weight=_scale_columns(leaf.weight, inv_s, path))
  if isinstance(leaf, ActQuantized):
    return dataclasses.replace(leaf, weight=_scale_columns(leaf.weight, inv_s, path))
  if isinstance(leaf, QArray):
    f = leaf.fmt
    per_col = ((f.granularity == "per_channel" and f.channel_axis % leaf.ndim == leaf.ndim - 1) or
               (f.granularity == "group" and f.group_axis % leaf.ndim == leaf.ndim - 2))
    if f.is_cast or not per_col:
      raise ValueError(f"cannot fold into {path}: its {f.name} scales are not per output "
                       "column; fold before quantizing it or quantize it per channel / in groups")
    scale = (leaf.scale.astype(jnp.float32) * inv_s[..., None, :]).astype(leaf.scale.dtype)
    zp = leaf.zero_point
    if zp is not None and f.zero_point == "float":
      zp = (zp.astype(jnp.float32) * inv_s[..., None, :]).astype(zp.dtype)
    return dataclasses.replace(leaf, scale=scale, zero_point=zp)
  w = jnp.asarray(leaf)
  return (w.astype(jnp.float32) * inv_s[..., None, :]).astype(w.dtype)


def fold_input_scales(params: Any, groups: Sequence[FoldGroup], *, strict: bool = False
                      ) -> tuple[Any, list[str]]:
  """Folds the consumers' input scales into their producers.

  Args:
    params: a params tree with `InputScaled` leaves (from AWQ / SmoothQuant).
    groups: the model's fold table.
    strict: raise when a group's consumers are not all input-scaled.

  Returns:
    `(params, left)`: the tree with folded groups' consumers replaced by
    their inner weights and producers divided by the scales, and the paths
    of the `InputScaled` leaves that stay (no group absorbs them).

  Raises:
    ValueError: consumers of one group with different scales, a producer
      whose shape does not match, a quantized producer that cannot be rescaled.
  """
  leaves = get_leaves(params)
  new: dict[str, Any] = {}
  for g in groups:
    for path in (g.prev,) + g.consumers:
      if path not in leaves:
        raise KeyError(f"fold group {g.prev}: no parameter at {path}")
    cons = [new.get(c, leaves[c]) for c in g.consumers]
    scaled = [isinstance(c, InputScaled) for c in cons]
    if not any(scaled):
      continue
    if not all(scaled):
      msg = (f"fold group {g.prev}: only some consumers carry input scales "
             f"({[c for c, s in zip(g.consumers, scaled) if s]}); they cannot share a fold")
      if strict:
        raise ValueError(msg)
      continue
    s = _input_vector(cons[0], g.consumers[0])
    for c, leaf in zip(g.consumers[1:], cons[1:]):
      s2 = _input_vector(leaf, c)
      if s2.shape != s.shape or not np.allclose(np.asarray(s2), np.asarray(s), rtol=1e-6):
        raise ValueError(f"fold group {g.prev}: {g.consumers[0]} and {c} have different input "
                         "scales; only weights calibrated on one shared input fold together")
    prev = new.get(g.prev, leaves[g.prev])
    inv = 1.0 / s
    if g.prev_kind == "norm":
      if isinstance(prev, (QArray, InputScaled, ActQuantized)):
        raise ValueError(f"cannot fold into {g.prev}: the norm scale is quantized")
      p = jnp.asarray(prev)
      if p.shape != s.shape:
        raise ValueError(f"{g.prev} has shape {p.shape}, the scales of {g.consumers[0]} "
                         f"{s.shape}")
      new[g.prev] = (p.astype(jnp.float32) * inv).astype(p.dtype)
    else:
      if tuple(prev.shape[-1:]) != tuple(s.shape[-1:]):
        raise ValueError(f"{g.prev}: {prev.shape[-1]} output columns, {s.shape[-1]} input scales "
                         f"of {g.consumers[0]} (grouped-query attention cannot fold v into o)")
      new[g.prev] = _scale_columns(prev, inv, g.prev)
    for c, leaf in zip(g.consumers, cons):
      new[c] = leaf.weight
  out = replace_leaves(params, new)
  left = [p for p, x in rules_lib.tree_leaves_with_paths(out) if isinstance(x, InputScaled)]
  return out, left
