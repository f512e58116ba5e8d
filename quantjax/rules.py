"""Rules: which leaf of a params tree gets which treatment.

A rule is a frozen, keyword-only dataclass whose `module_path` regex is matched
with `re.fullmatch` against the leaf's path: its keys joined with '/' (e.g.
`params/Dense_0/kernel`, `layers/3/attn/q_proj/kernel`). Rules are an ordered
tuple; the first match wins. `match_rules` also reports the rules that
matched nothing and the leaves that no rule covered.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.numerics.calibrate import Calibration, resolve_calibration
from quantjax.numerics.formats import QuantFormat, resolve_format
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray

__all__ = ["QuantRule", "PruneRule", "RuleReport", "match_rules", "check_report", "path_str", "tree_leaves_with_paths",
           "map_with_paths", "to_pure", "stack_axes_of", "map_slices"]


def _compile(pattern: str, what: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise TypeError(f"{what}.module_path must be a regex string, got {type(pattern).__name__}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what}.module_path {pattern!r} is not a valid regex: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  """Quantize the leaves whose path fully matches `module_path`.

  Attributes:
    module_path: regex, matched with `re.fullmatch` on the '/'-joined path.
    format: a `QuantFormat` or spec string (`"int4_g64_asym"`); required
      unless `skip`.
    calibration: how scales are chosen: "auto" (default: llama.cpp's
      signed-max rule for group-wise signed symmetric integers, min-max
      otherwise; `numerics.calibrate.auto_method`),
      "minmax", "signed_max", "percentile", "mse" or a `Calibration`.
    skip: leave matching leaves as they are (and stop searching rules).
    act_format: optional activation format applied at run time by
      `ops.qdot` (dynamic activation quantization, e.g. W8A8).
    stack_axes: the leaf's stacking axes (layers of an `nn.scan` / `nnx.scan`
      stack, experts, at any position, negative allowed): each slice along
      them is its own weight, quantized with its own scales, and `format`'s
      axes count within a slice. `()`: every axis is the weight's own (a
      `DenseGeneral` kernel `[d, heads, head_dim]`, a conv kernel). None (the
      default) is fine for leaves of 0-2 axes and for per-channel or
      per-tensor formats; a group format on a leaf of 3 or more axes is
      ambiguous to the plain transforms and refused, naming it (the
      calibrated driver, `methods.calibrate`, reads the stacking and
      contraction axes from the model's own matmuls instead).
  """

  module_path: str
  format: QuantFormat | str | None = None
  calibration: Calibration | str = "auto"
  skip: bool = False
  act_format: QuantFormat | str | None = None
  stack_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    _compile(self.module_path, "QuantRule")
    _check_stack_axes(self)
    if self.skip:
      if self.format is not None:
        raise ValueError(f"QuantRule({self.module_path!r}) has skip=True and a format; pick one")
    else:
      if self.format is None:
        raise ValueError(f"QuantRule({self.module_path!r}) needs a format (or skip=True)")
      object.__setattr__(self, "format", resolve_format(self.format))
    if self.act_format is not None:
      object.__setattr__(self, "act_format", resolve_format(self.act_format))
    object.__setattr__(self, "calibration", resolve_calibration(self.calibration))

  @property
  def regex(self) -> re.Pattern:
    return _compile(self.module_path, "QuantRule")

  def matches(self, path: str) -> bool:
    return self.regex.fullmatch(path) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneRule:
  """Prune the leaves whose path fully matches `module_path`.

  Attributes:
    module_path: regex, matched with `re.fullmatch`.
    sparsity: fraction of zeros for unstructured pruning.
    n, m: keep n of every m consecutive values along the input axis (N:M).
    skip: leave matching leaves dense.
    stack_axes: stacking axes of the leaf, as in `QuantRule`: each slice is
      pruned on its own (None: the whole leaf, N:M along its axis 0).
  """

  module_path: str
  sparsity: float | None = None
  n: int | None = None
  m: int | None = None
  skip: bool = False
  stack_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    _compile(self.module_path, "PruneRule")
    _check_stack_axes(self)
    if self.skip:
      return
    if self.sparsity is None and (self.n is None or self.m is None):
      raise ValueError(f"PruneRule({self.module_path!r}) needs sparsity or n and m")
    if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"PruneRule sparsity must be in [0, 1), got {self.sparsity}")
    if self.n is not None and self.m is not None and not 0 < self.n <= self.m:
      raise ValueError(f"PruneRule needs 0 < n <= m, got {self.n}:{self.m}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.module_path, path) is not None


def _check_stack_axes(rule: Any) -> None:
  axes = rule.stack_axes
  if axes is None:
    return
  if isinstance(axes, (int, np.integer)):
    axes = (int(axes),)
  try:
    axes = tuple(int(a) for a in axes)
  except TypeError:
    raise TypeError(f"{type(rule).__name__}({rule.module_path!r}).stack_axes must be a tuple "
                    f"of ints, got {rule.stack_axes!r}") from None
  object.__setattr__(rule, "stack_axes", axes)


def stack_axes_of(rule: Any, path: str, shape: Sequence[int], what: str) -> tuple[int, ...]:
  """`rule.stack_axes` for a leaf of `shape`, as ascending non-negative axes.

  A group format on a leaf of 3 or more axes whose rule does not say
  (`stack_axes=None`) is refused: `[L, in, out]` (a scanned stack) and
  `[d, heads, head_dim]` (one weight) look alike, and guessing wrong puts the
  values of different layers in one group. Per-channel and per-tensor scales
  keep their meaning (every axis but the channel axis, or all of them).
  """
  nd = len(shape)
  axes = rule.stack_axes
  if axes is None:
    fmt = getattr(rule, "format", None)
    if nd >= 3 and fmt is not None and fmt.granularity == "group":
      raise ValueError(
          f"{what}: {path} has {nd} axes {tuple(shape)}: say which are stacking axes "
          "(layers, experts), e.g. QuantRule(..., stack_axes=(0,)) for an nn.scan stack "
          "[L, in, out], or stack_axes=() when every axis is the weight's own (a "
          "DenseGeneral [d, heads, head_dim] or conv kernel); or calibrate it with "
          "methods.calibrate(fn, params, batches, rules, methods.RTN()), which reads "
          "the axes from the model's matmuls")
    return ()
  out = []
  for a in axes:
    if not -nd <= a < nd:
      raise ValueError(f"{what}: stack_axes {axes} of the rule {rule.module_path!r} are out "
                       f"of range for {path} of shape {tuple(shape)}")
    out.append(a % nd)
  if len(set(out)) != len(out):
    raise ValueError(f"{what}: stack_axes {axes} name one axis twice ({path})")
  if len(out) >= nd:
    raise ValueError(f"{what}: stack_axes {axes} leave {path} of shape {tuple(shape)} no "
                     "axis of its own")
  return tuple(sorted(out))


def map_slices(fn: Callable[[Any], Any], x: Any, stack_axes: Sequence[int]) -> Any:
  """`fn` applied to every slice of `x` along `stack_axes` (array -> array of the
  same shape), under `vmap`; the results are put back where the slices were."""
  if not stack_axes:
    return fn(x)
  x = jnp.asarray(x)
  k = len(stack_axes)
  front = jnp.moveaxis(x, tuple(stack_axes), tuple(range(k)))
  lead = front.shape[:k]
  flat = front.reshape((-1,) + front.shape[k:])
  out = jax.vmap(fn)(flat).reshape(lead + front.shape[k:])
  return jnp.moveaxis(out, tuple(range(k)), tuple(stack_axes))


def _key_name(k: Any) -> str | None:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined key path; a trailing `.value` (Flax NNX Variables) is dropped."""
  names = [_key_name(k) for k in path]
  if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return "/".join(n for n in names if n is not None)


def _is_leaf(x: Any) -> bool:
  return isinstance(x, (QArray, ActQuantized, InputScaled))


def tree_leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """`[(path, leaf)]` with QArrays kept whole."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return [(path_str(p), leaf) for p, leaf in flat]


def to_pure(params: Any) -> Any:
  """An `nnx.State` as its pure nested dict (QArrays kept); other trees pass through."""
  from flax import nnx
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params)
  return params


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """`jax.tree.map` with the leaf's path string; QArrays are leaves."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree,
                                          is_leaf=_is_leaf)


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """What rules did to a tree.

  Attributes:
    assignments: path -> index of the rule that matched it (first match).
    unused_rules: rules that matched no leaf.
    uncovered: paths of array leaves no rule matched.
  """

  assignments: dict[str, int]
  unused_rules: tuple[Any, ...]
  uncovered: tuple[str, ...]

  def summary(self) -> str:
    lines = [f"{len(self.assignments)} leaves matched a rule"]
    if self.unused_rules:
      lines.append("rules that matched nothing: " +
                   ", ".join(repr(r.module_path) for r in self.unused_rules))
    if self.uncovered:
      shown = ", ".join(self.uncovered[:10]) + (" ..." if len(self.uncovered) > 10 else "")
      lines.append(f"{len(self.uncovered)} leaves no rule covered: {shown}")
    return "\n".join(lines)


def match_rules(tree: Any, rules: Iterable[Any]) -> RuleReport:
  """First-match assignment of `rules` to the leaves of `tree`."""
  rules = tuple(rules)
  assignments: dict[str, int] = {}
  used = [False] * len(rules)
  uncovered = []
  for path, leaf in tree_leaves_with_paths(tree):
    if leaf is None or not hasattr(leaf, "shape"):
      continue
    for i, rule in enumerate(rules):
      if rule.matches(path):
        assignments[path] = i
        used[i] = True
        break
    else:
      uncovered.append(path)
  unused = tuple(r for r, u in zip(rules, used) if not u)
  return RuleReport(assignments=assignments, unused_rules=unused, uncovered=tuple(uncovered))


def check_report(report: RuleReport, strict: bool, what: str, *, stacklevel: int = 3) -> None:
  """Warns about rules that matched nothing; with `strict`, raises on those and on
  leaves no rule covered (the message names them)."""
  import warnings
  problems = []
  if report.unused_rules:
    problems.append("rules that matched no leaf: " +
                    ", ".join(repr(r.module_path) for r in report.unused_rules))
  if report.uncovered and strict:
    shown = ", ".join(report.uncovered[:8]) + (" ..." if len(report.uncovered) > 8 else "")
    problems.append(f"{len(report.uncovered)} leaves matched no rule: {shown}")
  if problems:
    msg = f"{what}: " + "; ".join(problems)
    if strict:
      raise ValueError(msg + " (strict=True; add a rule with skip=True to leave leaves as "
                       "they are)")
    warnings.warn(msg, stacklevel=stacklevel)


def leaf_at(tree: Any, path: tuple, error: type[Exception] = KeyError) -> Any:
  """The leaf of a nested-dict params tree at `path` (integer layer keys also
  match their string form); `error` names the path when it is missing."""
  from collections.abc import Mapping
  node = tree
  for k in path:
    if isinstance(node, Mapping) and k in node:
      node = node[k]
    elif isinstance(node, Mapping) and str(k) in node:
      node = node[str(k)]
    else:
      raise error(f"params have no leaf {'/'.join(map(str, path))} (is this a params tree "
                  "of the model this config describes?)")
  return node
