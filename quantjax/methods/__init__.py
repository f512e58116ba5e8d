"""Post-training quantization methods: pure transforms of params + calibration data.

Calibrated methods (`GPTQ`, `AWQ`, `SmoothQuant`, `RTN` with static activation
ranges, `Importance`) run on any model through `capture.calibrate(fn,
params, batches, rules, method)`, which sees the model only through its own
forward function. Each method is selected by the same `QuantRule` path rules
and produces plain `QArray`s (group-wise / per-channel), possibly wrapped with
activation quantization or input scales, so its output runs, exports and is
measured like round-to-nearest's.
"""

from quantjax.methods.activations import (ActObserver, ActStat, StaticActQuantized,
                                          attach_act_quant, observe, static_qdot, wrap_weight)
from quantjax.methods import base
from quantjax.methods.awq import AWQ, awq_clip, awq_search_scales
from quantjax.methods.calib_data import calibration_batches, calibration_windows
from quantjax.methods.capture import (CalibrationResult, Capture, InputStats, MemoryOptions,
                                      Part, calibrate,
                                      collect_stats, linen_apply, nnx_apply, trace,
                                      tree_from_parts)
from quantjax.methods.fold import FoldGroup, fold_input_scales
from quantjax.methods.gptq import (GPTQ, GPTQResult, HessianStat, gptq_quantize, hessian,
                                   hessian_init, hessian_update)
from quantjax.methods.importance import Importance, input_importance
from quantjax.methods.mixed import (Allocation, Choice, allocate, assignment_rules,
                                    candidate_costs, fisher_diagonal)
from quantjax.methods.rounding import SignRound, SignRoundResult, signround_quantize
from quantjax.methods.rtn import RTN, rtn_params, rtn_quantize, rtn_transform
from quantjax.methods.smoothquant import SmoothQuant, smooth_scales
from quantjax.methods.ternary import (binary_rules, format_rules, fp8_rules, nf4_rules,
                                      quantize_lowbit, ternary_rules)

from quantjax.methods.base import CalibratedMethod

for _name, _factory in (("rtn", RTN), ("gptq", GPTQ), ("awq", AWQ), ("smoothquant", SmoothQuant),
                        ("importance", Importance), ("signround", SignRound)):
  base.register(_name, _factory)

__all__ = [
    "AWQ", "ActObserver", "CalibratedMethod", "base", "ActStat", "Allocation",
    "CalibrationResult", "Capture", "Choice",
    "FoldGroup", "GPTQ", "GPTQResult", "HessianStat", "Importance", "InputStats",
    "MemoryOptions", "Part", "RTN", "SignRound", "SignRoundResult",
    "SmoothQuant", "StaticActQuantized", "allocate", "assignment_rules", "attach_act_quant",
    "awq_clip", "awq_search_scales", "binary_rules", "calibrate", "calibration_batches",
    "calibration_windows", "candidate_costs", "collect_stats", "fisher_diagonal",
    "fold_input_scales", "format_rules", "fp8_rules", "gptq_quantize", "hessian", "hessian_init",
    "hessian_update", "input_importance", "linen_apply", "nf4_rules", "nnx_apply", "observe",
    "quantize_lowbit", "rtn_params", "rtn_quantize", "rtn_transform", "signround_quantize",
    "smooth_scales", "static_qdot", "ternary_rules", "trace", "tree_from_parts", "wrap_weight",
]
