"""Round-to-nearest (RTN): the baseline every post-training method is compared to.

Each matched weight is quantized on its own, with scales from its own range
(min-max, percentile or an MSE clip search, per the rule's `calibration`).
No calibration data is needed. This is `quantjax.quantize_params` under the
name the methods share, plus a single-matrix helper.

References:
  Nagel et al. A White Paper on Neural Network Quantization, 2021,
  arXiv:2106.08295 (round-to-nearest and range setting, section 3).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from quantjax import rules as rules_lib
from quantjax import transforms
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat

__all__ = ["rtn_quantize", "rtn_params", "rtn_transform"]


def rtn_quantize(w: jax.Array, fmt: QuantFormat | str, *, calibration: Any = "minmax",
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
