"""quantjax: functional quantization, pruning and distillation for JAX/Flax.

Transforms are pure functions over params pytrees (NNX `State`, linen dicts,
nested dicts) selected by path-regex rules; quantized leaves are `QArray`
pytrees that really hold fewer bytes. See README.md and docs/.
"""

from quantjax import ops
from quantjax.eval.memory import (bits_per_weight, estimate, memory_table, train_regime_estimate,
                                  tree_bytes)
from quantjax.io.gguf import export_gguf, import_gguf
from quantjax.io.hf import export_hf, import_hf
from quantjax.io.imatrix import read_imatrix, write_imatrix
from quantjax.numerics.calibrate import Calibration, choose_scales
from quantjax.numerics.fake_quant import fake_quant, lsq_fake_quant, lsq_init_step, round_ste
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.inspect import describe as inspect_value
from quantjax import methods, sparsity
from quantjax.methods import CalibratedMethod, SignRound, calibrate
from quantjax.numerics.qarray import (ActQuantized, InputScaled, QArray, dequantize, quantize,
                                     quantize_with_scale)
from quantjax.ops import qdot, qeinsum
from quantjax.rules import PruneRule, QuantRule, RuleReport, match_rules
from quantjax.streaming import StreamResult, compress_streaming
from quantjax.sparsity import (NMSparse, apply_masks, compress_nm, magnitude_mask, nm_mask,
                               prune_params, sparsegpt_prune, sparsity_of, wanda_mask)
from quantjax.transforms import (Transform, chain, dequantization, dequantize_params,
                                 fake_quant_params, fake_quantization, quantization,
                                 quantize_params)

from quantjax.version import __version__

__all__ = [
    "ActQuantized",
    "CalibratedMethod",
    "Calibration",
    "InputScaled",
    "NMSparse",
    "PruneRule",
    "QArray",
    "QuantFormat",
    "QuantRule",
    "RuleReport",
    "SignRound",
    "StreamResult",
    "Transform",
    "apply_masks",
    "bits_per_weight",
    "calibrate",
    "choose_scales",
    "methods",
    "chain",
    "compress_nm",
    "compress_streaming",
    "dequantization",
    "dequantize",
    "dequantize_params",
    "estimate",
    "export_gguf",
    "export_hf",
    "fake_quant",
    "fake_quant_params",
    "import_gguf",
    "import_hf",
    "fake_quantization",
    "inspect_value",
    "lsq_fake_quant",
    "lsq_init_step",
    "magnitude_mask",
    "match_rules",
    "memory_table",
    "train_regime_estimate",
    "nm_mask",
    "ops",
    "prune_params",
    "qdot",
    "qeinsum",
    "quantization",
    "quantize",
    "quantize_params",
    "quantize_with_scale",
    "read_imatrix",
    "round_ste",
    "sparsegpt_prune",
    "sparsity",
    "sparsity_of",
    "tree_bytes",
    "wanda_mask",
    "write_imatrix",
]
