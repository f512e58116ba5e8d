"""SmoothQuant: migrate activation outliers into the weights before W8A8.

For a linear `y = x @ W` (W `[in, out]`) and per-input-channel smoothing
factors `s`, `y = (x / s) @ (diag(s) W)`. With
`s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)` (the max over every weight
that reads the same input) the activations' outlier channels shrink and the
weights' grow, so both quantize well to int8. `SmoothQuant()` is the method
for the calibration driver (`capture.calibrate`): it quantizes `diag(s) W`
with the rule's format (round-to-nearest) and attaches the rule's activation
format, dynamic, or static with an observer (ranges of `x / s`); the
division by `s` travels with the weight (`InputScaled`) and
`methods.fold.fold_input_scales` folds it into the producing norm / linear
with a model's fold table.

References:
  Xiao, Lin, Seznec, Wu, Demouth, Han. SmoothQuant: Accurate and Efficient
  Post-Training Quantization for Large Language Models. ICML 2023,
  arXiv:2211.10438.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.methods import activations as act_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import resolve_format

__all__ = ["smooth_scales", "SmoothQuant"]


def smooth_scales(act_absmax: jax.Array, weights: Sequence[jax.Array], alpha: float = 0.5,
                  eps: float = 1e-5, *, name: str = "weights") -> jax.Array:
  """`s_j = max|X_j|^alpha / max_consumers max|W_j,:|^(1-alpha)`, `[k]`.

  Channels that never fire (or have all-zero weights) get `s = 1`. NaN/Inf in
  a concrete `act_absmax` is an error naming `name` (it would silently give
  `s = 1`, plain round-to-nearest, for that channel).
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if not isinstance(act_absmax, jax.core.Tracer):
    a = np.asarray(act_absmax)
    if a.size == 0:
      raise ValueError(f"SmoothQuant {name}: no activation ranges (no calibration rows)")
    if not np.isfinite(a).all():
      raise ValueError(f"SmoothQuant {name}: the activation ranges hold "
                       f"{int((~np.isfinite(a)).sum())} NaN/Inf values of {a.size} (NaN/Inf "
                       "in the calibration batches, or no rows reached this input)")
  a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), eps)
  wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1)
                            for w in weights]), axis=0)
  wmax = jnp.maximum(wmax, eps)
  s = a ** alpha / wmax ** (1.0 - alpha)
  ok = jnp.isfinite(s) & (s > 0) & (jnp.asarray(act_absmax) > 0)
  return jnp.where(ok, s, 1.0)


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
  """SmoothQuant for the calibration driver, on any model.

  Attributes:
    alpha: migration strength in [0, 1] (0.5 is the paper's default; 0.8
      measured best on SmolLM2 here).
    scales_for: regex (fullmatch on the path) of the weights that get
      smoothing scales; None: all.
    act_observer: static activation ranges (per tensor for an int8 x int8
      dot); None: the rules' activation formats stay dynamic.
  """

  alpha: float = 0.5
  scales_for: str | None = None
  act_observer: Any = None
  label: ClassVar[str] = "SmoothQuant"
  rule_type: ClassVar[type] = rules_lib.QuantRule

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

  @property
  def needs(self) -> frozenset:
    return frozenset({"range"}) | act_lib.observer_needs(self.act_observer)

  def apply(self, parts, record) -> dict:
    by_source: dict[int, list] = {}
    for p in parts:
      by_source.setdefault(p.source, []).append(p)
    scales = record.setdefault("smoothquant_scales", {})
    out = {}
    for ps in by_source.values():
      scaled = [p for p in ps if not resolve_format(p.rule.format).is_cast and (
          self.scales_for is None or re.fullmatch(self.scales_for, p.path))]
      s = None
      if scaled:
        s = smooth_scales(ps[0].stats.absmax, [p.matrix() for p in scaled], self.alpha,
                          name=", ".join(p.name for p in scaled))
        for p in scaled:
          scales[p.name] = s
      for p in ps:
        fmt = resolve_format(p.rule.format)
        is_scaled = any(p is q for q in scaled)
        w = p.matrix() * s[:, None] if is_scaled else p.matrix()
        q = qarray_lib.quantize(p.from_matrix(w), p.leaf_format(fmt),
                                calibration=p.rule.calibration, name=p.name)
        out[p.key] = act_lib.wrap_weight(p, q, observer=self.act_observer,
                                         input_scale=s if is_scaled else None)
    return out
