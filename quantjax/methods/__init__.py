"""Post-training quantization methods: pure transforms of params + calibration data.

Each method is selected by the same `QuantRule` path rules and produces plain
`QArray`s (group-wise / per-channel), so its output runs, exports and is
measured like round-to-nearest's.
"""

from quantjax.methods.activations import (ActObserver, ActStat, StaticActQuantized,
                                          attach_act_quant, observe, static_qdot)
from quantjax.methods.awq import awq_clip, awq_layer, awq_search_scales
from quantjax.methods.calib_data import calibration_batches, calibration_windows
from quantjax.methods.gptq import (GPTQResult, HessianStat, gptq_quantize, hessian, hessian_init,
                                   hessian_update)
from quantjax.methods.mixed import (Allocation, Choice, allocate, assignment_rules,
                                    candidate_costs, fisher_diagonal)
from quantjax.methods.rtn import rtn_params, rtn_quantize, rtn_transform
from quantjax.methods.sequential import (LinearStats, block_forward, collect_model_stats,
                                         gptq_layer, quantize_sequential, rtn_layer)
from quantjax.methods.smoothquant import (FoldGroup, apply_scales, llama_fold_groups,
                                          smooth_params, smooth_scales)
from quantjax.methods.ternary import (binary_rules, format_rules, fp8_rules, nf4_rules,
                                      quantize_lowbit, ternary_rules)

__all__ = [
    "ActObserver", "ActStat", "Allocation", "Choice", "allocate", "assignment_rules",
    "candidate_costs", "fisher_diagonal", "FoldGroup", "GPTQResult", "HessianStat", "LinearStats",
    "StaticActQuantized", "apply_scales", "attach_act_quant", "awq_clip", "awq_layer",
    "awq_search_scales", "binary_rules", "block_forward", "calibration_batches",
    "calibration_windows", "collect_model_stats", "format_rules", "fp8_rules", "gptq_layer",
    "gptq_quantize", "hessian", "hessian_init", "hessian_update", "llama_fold_groups",
    "nf4_rules", "observe", "quantize_lowbit", "quantize_sequential", "rtn_layer",
    "rtn_params", "rtn_quantize", "rtn_transform", "smooth_params", "smooth_scales", "static_qdot",
    "ternary_rules",
]
