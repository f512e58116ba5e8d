"""Pruning: magnitude, N:M, Wanda, SparseGPT; masks as pytrees; compressed N:M storage."""

from quantjax.sparsity.calibrated import SparseGPT, Wanda, prune_calibrated
from quantjax.sparsity.magnitude import apply_masks, magnitude_mask, prune_params, sparsity_of
from quantjax.sparsity.nm import NMSparse, compress_nm, nm_mask
from quantjax.sparsity.sparsegpt import sparsegpt_prune
from quantjax.sparsity.wanda import wanda_mask
from quantjax.methods import base as _methods_base

_methods_base.register("wanda", Wanda)
_methods_base.register("sparsegpt", SparseGPT)

__all__ = ["NMSparse", "SparseGPT", "Wanda", "apply_masks", "compress_nm", "magnitude_mask",
           "nm_mask", "prune_calibrated", "prune_params", "sparsegpt_prune", "sparsity_of",
           "wanda_mask"]
