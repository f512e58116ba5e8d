"""The input-importance matrix (llama.cpp's "imatrix"): mean x² per input feature.

For every weight the rules select, the mean of the squared input of each of
its input features (its contraction axis), over the calibration batches: the
diagonal of `X^T X / n`, collected alone (no `K x K` Hessian), from the float
model in one pass. The GGUF encoders weight each value's rounding error by it
(`quantjax.io.gguf.export_gguf(..., importance=...)`).

References:
  llama.cpp `tools/imatrix` (Kawrakow, 2024): the importance matrix and its
  use in the k-quant and legacy-quant encoders.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

from quantjax import rules as rules_lib
from quantjax.methods import capture

__all__ = ["Importance", "input_importance"]


@dataclasses.dataclass(frozen=True)
class Importance:
  """Records `mean x²` per input feature of each selected weight; changes nothing."""

  label: ClassVar[str] = "importance"
  needs: ClassVar[frozenset] = frozenset({"sqmean"})
  rule_type: ClassVar[type] = rules_lib.QuantRule
  changes_weights: ClassVar[bool] = False

  def apply(self, parts, record) -> dict:
    out = record.setdefault("importance", {})
    for p in parts:
      out[p.name] = np.asarray(p.stats.sqmean, np.float32)
    return {}


def input_importance(fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any],
                     targets: str | Sequence[rules_lib.QuantRule], *, progress: bool = True
                     ) -> dict[str, np.ndarray]:
  """`{weight path: mean x² per input feature}` over `batches`, for every weight whose
  path fully matches `targets` (a regex, or `QuantRule`s)."""
  rules = ([rules_lib.QuantRule(module_path=targets, format="int8")]
           if isinstance(targets, str) else list(targets))
  res = capture.calibrate(fn, params, batches, rules, Importance(), mode="one_pass",
                          progress=progress)
  return res.info["importance"]
