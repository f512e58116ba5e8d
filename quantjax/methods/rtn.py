"""Round-to-nearest (RTN): the baseline every post-training method is compared to.

Each matched weight is quantized on its own, with scales from its own range
(min-max, percentile or an MSE clip search, per the rule's `calibration`).
No calibration data is needed. `rtn_params` is `quantjax.quantize_params`
under the name the methods share (formats on the axes the rules give);
`RTN()` is the same rounding as a method of the calibration driver
(`capture.calibrate`): formats are then oriented to each weight's matmul
(groups along its contraction axis, also for `[out, in]` and stacked
`[L, ...]` weights), and with an `act_observer` the rules' activation formats
get static ranges from the calibration inputs (static W8A8).

References:
  Nagel et al. A White Paper on Neural Network Quantization, 2021,
  arXiv:2106.08295 (round-to-nearest and range setting, section 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax

from quantjax import rules as rules_lib
from quantjax import transforms
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat

__all__ = ["rtn_quantize", "rtn_params", "rtn_transform", "RTN"]


def rtn_quantize(w: jax.Array, fmt: QuantFormat | str, *, calibration: Any = "auto",
                 key: jax.Array | None = None) -> qarray_lib.QArray:
  """Round-to-nearest quantization of one array (scales from its own range)."""
  return qarray_lib.quantize(w, fmt, calibration=calibration, key=key)


def rtn_params(params: Any, rules: Sequence[rules_lib.QuantRule], *, strict: bool = False,
               key: jax.Array | None = None) -> Any:
  """Round-to-nearest over a params tree: `quantize_params` with these rules."""
  return transforms.quantize_params(params, rules, strict=strict, key=key)


def rtn_transform(rules: Sequence[rules_lib.QuantRule], *,
                  strict: bool = False) -> transforms.Transform:
  """A `Transform` applying `rtn_params` (composable with `quantjax.chain`)."""
  return transforms.quantization(rules, strict=strict)


@dataclasses.dataclass(frozen=True)
class RTN:
  """Round-to-nearest as a calibration-driver method (`capture.calibrate`).

  Attributes:
    act_observer: static activation ranges (`activations.ActObserver`) for
      rules with an `act_format`; None keeps them dynamic.
  """

  act_observer: Any = None
  label: ClassVar[str] = "RTN"
  rule_type: ClassVar[type] = rules_lib.QuantRule

  @property
  def needs(self) -> frozenset:
    from quantjax.methods import activations as act_lib
    return act_lib.observer_needs(self.act_observer)

  def apply(self, parts, record) -> dict:
    from quantjax.methods import activations as act_lib
    out = {}
    for p in parts:
      q = qarray_lib.quantize(p.value, p.leaf_format(p.rule.format),
                              calibration=p.rule.calibration, name=p.name)
      out[p.key] = act_lib.wrap_weight(p, q, observer=self.act_observer)
    return out
