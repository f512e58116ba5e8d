"""Quantization-aware training helpers: learned step sizes (LSQ) through rules.

`lsq_init(params, rules)` creates one step-size array per matched leaf (in the
format's scale layout); `lsq_apply(params, steps, rules)` fake-quantizes them
for the forward pass (straight-through for weights, LSQ gradient for steps);
`lsq_convert(params, steps, rules)` turns the trained result into real
`QArray`s whose dequantized values equal the fake-quantized ones exactly.
For fixed (min-max) scales, `fake_quant_params` + `quantize_params` with the
same rules do the same.

References:
  Esser et al., "Learned Step Size Quantization", ICLR 2020.
"""

from __future__ import annotations

from typing import Any, Sequence

from quantjax import rules as rules_lib
from quantjax.numerics import fake_quant as fq
from quantjax.numerics import qarray as qarray_lib

__all__ = ["lsq_init", "lsq_apply", "lsq_convert"]


def _rule_for(report, rules, path):
  idx = report.assignments.get(path)
  if idx is None or rules[idx].skip:
    return None
  return rules[idx]


def lsq_init(params: Any, rules: Sequence[rules_lib.QuantRule]) -> Any:
  """Initial LSQ step sizes (2 mean|w| / sqrt(qmax)) for matched leaves; None elsewhere."""
  rules = tuple(rules)
  report = rules_lib.match_rules(params, rules)

  def fn(path, w):
    r = _rule_for(report, rules, path)
    return None if r is None else fq.lsq_init_step(w, r.format)
  return rules_lib.map_with_paths(fn, params)


def _zip_map(fn, params, steps, rules):
  rules = tuple(rules)
  report = rules_lib.match_rules(params, rules)
  step_leaves = dict(rules_lib.tree_leaves_with_paths(steps))

  def g(path, w):
    r = _rule_for(report, rules, path)
    s = step_leaves.get(path)
    if r is None or s is None:
      return w
    return fn(w, s, r.format)
  return rules_lib.map_with_paths(g, params)


def lsq_apply(params: Any, steps: Any, rules: Sequence[rules_lib.QuantRule]) -> Any:
  """Fake-quantized params with learnable steps (use inside the loss)."""
  return _zip_map(fq.lsq_fake_quant, params, steps, rules)


def lsq_convert(params: Any, steps: Any, rules: Sequence[rules_lib.QuantRule]) -> Any:
  """Real QArrays with the learned steps as scales (same values as `lsq_apply`)."""
  return _zip_map(lambda w, s, f: qarray_lib.quantize_with_scale(w, f, s.astype(f.scale_dtype)),
                  params, steps, rules)
