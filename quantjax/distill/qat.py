"""Quantization-aware training helpers: learned step sizes (LSQ) through rules.

`lsq_init(params, rules)` creates one step-size array per matched leaf (in the
format's scale layout; LSQ's `2 mean|w| / sqrt(Qp)` or, with `init="minmax"`,
the round-to-nearest scales, so that training starts from the RTN model); `lsq_apply(params, steps, rules)` fake-quantizes them
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

import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics import fake_quant as fq
from quantjax.numerics import formats as formats_lib
from quantjax.numerics import qarray as qarray_lib

__all__ = ["INITS", "lsq_init", "lsq_apply", "lsq_convert"]


def _rule_for(report, rules, path):
  idx = report.assignments.get(path)
  if idx is None or rules[idx].skip:
    return None
  return rules[idx]


INITS = ("lsq", "minmax", "percentile", "mse")


def lsq_init(params: Any, rules: Sequence[rules_lib.QuantRule], *, init: str = "lsq") -> Any:
  """Initial step sizes for matched leaves (stored scale shape); None elsewhere.

  Args:
    params: float params.
    rules: `QuantRule`s with symmetric integer formats.
    init: "lsq" (the paper's `2 mean|w| / sqrt(Qp)` per block, meant for long
      training) or a calibration method of `quantjax.numerics.calibrate`
      ("minmax", "percentile", "mse"): the scales round-to-nearest would use,
      so the fake-quantized model starts exactly at the RTN model (the better
      start for a short fine-tune: LSQ's init has a much coarser step).
  """
  if init not in INITS:
    raise ValueError(f"unknown LSQ init {init!r}; expected one of {INITS}")
  rules = tuple(rules)
  report = rules_lib.match_rules(params, rules)

  def fn(path, w):
    r = _rule_for(report, rules, path)
    if r is None:
      return None
    if init == "lsq":
      return fq.lsq_init_step(w, r.format)
    fmt = formats_lib.resolve_format(r.format)
    if fmt.kind != "int" or not fmt.symmetric:
      raise ValueError(f"LSQ learns symmetric integer step sizes; {path} has format {fmt}")
    scale, _ = calibrate_lib.choose_scales(w, fmt, init)
    return scale.astype(jnp.float32)
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
