"""Pure transforms over params pytrees: quantize, dequantize, fake-quantize, chain.

Each function takes a params tree (a Flax NNX `nnx.State`, a linen
`{'params': ...}` dict or any nested container of arrays) and returns a tree of
the same structure. Nothing is mutated; everything is jit-friendly (the rule
matching only looks at the tree's structure).

A `Transform` is a small named tuple `(name, apply)` with `apply(params) ->
params`, so pipelines compose with `chain(...)`, in the spirit of Optax.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.numerics import fake_quant as fake_quant_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray

__all__ = [
    "quantize_params", "dequantize_params", "dequantize_leaf", "fake_quant_params", "Transform",
    "chain", "quantization", "dequantization", "fake_quantization", "ActQuantized",
]

logger = logging.getLogger("quantjax")


def _report(tree: Any, rules: Sequence[Any], strict: bool, what: str) -> rules_lib.RuleReport:
  report = rules_lib.match_rules(tree, rules)
  rules_lib.check_report(report, strict, what, stacklevel=4)
  return report


def quantize_params(params: Any, rules: Sequence[rules_lib.QuantRule], *, strict: bool = False,
                    key: jax.Array | None = None, return_report: bool = False) -> Any:
  """Replaces the leaves matched by `rules` with `QArray`s.

  Args:
    params: any params pytree (NNX State, linen dict, nested dict).
    rules: ordered `QuantRule`s; first match wins; `skip=True` rules keep a
      leaf as it is. Already-quantized leaves are left alone.
    strict: raise if a rule matches nothing or a leaf matches no rule
      (otherwise unused rules are warned about).
    key: PRNG key for formats with stochastic rounding (split per leaf).
    return_report: also return the `RuleReport`.

  Returns:
    The tree with QArray leaves (and the report if asked). Leaves whose rule
    has an `act_format` become `ActQuantized(weight, act_format)` so
    `ops.qdot` quantizes activations at run time.

  Raises:
    ValueError: NaN/Inf in a concrete leaf (the message names its path), a
      group size that does not divide the leaf's axis, a group format on a
      leaf of 3 or more axes whose rule does not say its `stack_axes`, strict
      violations.
  """
  rules = tuple(rules)
  report = _report(params, rules, strict, "quantize_params")
  counter = [0]

  def fn(path: str, leaf: Any) -> Any:
    idx = report.assignments.get(path)
    if idx is None or isinstance(leaf, (QArray, ActQuantized, InputScaled)) or leaf is None:
      return leaf
    rule = rules[idx]
    if rule.skip:
      return leaf
    leaf_key = None
    if key is not None:
      leaf_key = jax.random.fold_in(key, counter[0])
      counter[0] += 1
    try:
      stack = rules_lib.stack_axes_of(rule, path, leaf.shape, "quantize_params")
      q = qarray_lib.quantize_stacked(leaf, rule.format, stack, calibration=rule.calibration,
                                      key=leaf_key, name=path)
    except ValueError as e:
      if path in str(e):
        raise
      raise ValueError(f"{path}: {e}") from None
    if rule.act_format is not None:
      return ActQuantized(weight=q, act_format=rule.act_format)
    return q

  out = rules_lib.map_with_paths(fn, params)
  return (out, report) if return_report else out


def dequantize_leaf(x: Any, dtype: Any = None) -> Any:
  """The float value a (possibly wrapped) quantized leaf stands for; arrays pass through."""
  if isinstance(x, InputScaled):
    return x.effective(dtype)
  if isinstance(x, ActQuantized):
    x = x.weight
  if isinstance(x, QArray):
    return x.dequantize(dtype)
  return x


def dequantize_params(params: Any, dtype: Any = None) -> Any:
  """Replaces every `QArray` leaf (and its wrappers) with its dequantized array."""
  return jax.tree.map(lambda x: dequantize_leaf(x, dtype), params,
                      is_leaf=lambda x: isinstance(x, (QArray, ActQuantized, InputScaled)))


def fake_quant_params(params: Any, rules: Sequence[rules_lib.QuantRule], *,
                      strict: bool = False) -> Any:
  """Quantize-dequantize the matched leaves with a straight-through gradient.

  The result has plain arrays (same dtype) that lie on the quantization
  grid (per slice of a rule's `stack_axes`); differentiate through it for
  quantization-aware training. Converting the trained params with
  `quantize_params` and the same rules gives QArrays whose dequantized values
  equal these.
  """
  rules = tuple(rules)
  report = _report(params, rules, strict, "fake_quant_params")

  def fn(path: str, leaf: Any) -> Any:
    idx = report.assignments.get(path)
    if idx is None or rules[idx].skip or isinstance(leaf, QArray) or leaf is None:
      return leaf
    rule = rules[idx]
    stack = rules_lib.stack_axes_of(rule, path, leaf.shape, "fake_quant_params")
    fmt = qarray_lib.slice_format(rule.format, leaf.ndim - len(stack)) if stack else rule.format
    return rules_lib.map_slices(lambda w: fake_quant_lib.fake_quant(w, fmt, rule.calibration),
                                leaf, stack)

  return rules_lib.map_with_paths(fn, params)


# ----------------------------------------------------------------------------
# Composable transforms.
# ----------------------------------------------------------------------------

class Transform(NamedTuple):
  """A named pure function `params -> params`."""

  name: str
  apply: Callable[[Any], Any]

  def __call__(self, params: Any) -> Any:
    return self.apply(params)


def quantization(rules: Sequence[rules_lib.QuantRule], *, strict: bool = False,
                 key: jax.Array | None = None) -> Transform:
  """A `Transform` running `quantize_params` with these rules."""
  rules = tuple(rules)
  return Transform("quantize", lambda p: quantize_params(p, rules, strict=strict, key=key))


def dequantization(dtype: Any = None) -> Transform:
  """A `Transform` replacing QArrays by their dequantized arrays (in `dtype`)."""
  return Transform("dequantize", lambda p: dequantize_params(p, dtype))


def fake_quantization(rules: Sequence[rules_lib.QuantRule], *, strict: bool = False) -> Transform:
  """A `Transform` running `fake_quant_params` (straight-through quantize-dequantize)."""
  rules = tuple(rules)
  return Transform("fake_quant", lambda p: fake_quant_params(p, rules, strict=strict))


def chain(*transforms: Transform | Callable[[Any], Any]) -> Transform:
  """Composes transforms left to right: `chain(a, b)(p) == b(a(p))`."""
  fns = []
  names = []
  for t in transforms:
    if not callable(t):
      raise TypeError(f"chain() takes Transforms or callables, got {type(t).__name__}")
    fns.append(t)
    names.append(getattr(t, "name", getattr(t, "__name__", "fn")))

  def apply(params):
    for f in fns:
      params = f(params)
    return params

  return Transform("chain(" + ", ".join(names) + ")", apply)
