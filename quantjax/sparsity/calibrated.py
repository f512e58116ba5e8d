"""Calibrated pruning on any model: Wanda and SparseGPT through the capture driver.

`prune_calibrated(fn, params, batches, rules, Wanda())` (or `SparseGPT()`)
prunes the weights `PruneRule`s select, with the input statistics of each
weight's matmuls (`quantjax.methods.capture`): sequentially by default, so
each weight sees inputs from the already-pruned weights before it, as in both
papers. Each weight is pruned as its `[K, N]` matrix (contraction axes
first): unstructured sparsity is chosen per output (Wanda) or per block of
inputs (SparseGPT), N:M patterns run along the input (contraction) axis,
for `[in, out]`, `[out, in]` and stacked `[L, ...]` weights alike.

    params, masks = prune_calibrated(fn, params, batches,
                                     [PruneRule(module_path=r".*_proj/kernel", n=2, m=4)],
                                     SparseGPT())
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Sequence

import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.methods import capture
from quantjax.sparsity import magnitude as magnitude_lib
from quantjax.sparsity import sparsegpt as sparsegpt_lib
from quantjax.sparsity import wanda as wanda_lib

__all__ = ["Wanda", "SparseGPT", "prune_calibrated", "METHODS"]

METHODS = ("magnitude", "wanda", "sparsegpt")


def _check_nm(part, rule) -> None:
  if rule.n is None:
    return
  lay = part.layout
  inner = lay.shape[lay.contract[-1]]
  if inner % rule.m:
    raise ValueError(f"{part.name}: N:M with M={rule.m} does not divide its innermost input "
                     f"axis (length {inner}, weight slice {lay.shape})")


class _Pruner:
  rule_type: ClassVar[type] = rules_lib.PruneRule

  def apply(self, parts, record) -> dict:
    masks = record.setdefault("masks", {})
    out = {}
    shared: dict = {}  # per-input work reused by the weights that read one input
    for p in parts:
      _check_nm(p, p.rule)
      w = p.matrix()
      new_w, mask = self.prune(w, p, shared)
      masks[p.key] = p.layout.from_matrix(mask)
      out[p.key] = p.from_matrix(new_w)
    return out


@dataclasses.dataclass(frozen=True)
class Wanda(_Pruner):
  """Wanda: keep the weights with the largest `|W_ij| * ||X_i||`, no update.

  References: Sun, Liu, Bair, Kolter, ICLR 2024, arXiv:2306.11695.
  """

  label: ClassVar[str] = "Wanda"
  needs: ClassVar[frozenset] = frozenset({"sqmean"})

  def prune(self, w, part, shared):
    r = part.rule
    norms = jnp.sqrt(jnp.asarray(part.stats.sum_sq))  # ||X_i||_2 over every calibration row
    mask = wanda_lib.wanda_mask(w, norms, sparsity=r.sparsity, n=r.n, m=r.m)
    return jnp.where(mask, w, 0.0), mask


@dataclasses.dataclass(frozen=True)
class SparseGPT(_Pruner):
  """SparseGPT: OBS-style pruning with second-order weight reconstruction.

  References: Frantar & Alistarh, ICML 2023, arXiv:2301.00774.
  """

  percdamp: float = 0.01
  block_size: int = 128
  label: ClassVar[str] = "SparseGPT"
  needs: ClassVar[frozenset] = frozenset({"hessian"})

  def prune(self, w, part, shared):
    r = part.rule
    # q/k/v (gate/up) read one input: their parts hold the same statistics
    # object, so the float64 inverse factor is computed once for them.
    key = id(part.stats)
    if key not in shared:
      shared[key] = (part.stats, sparsegpt_lib.inverse_factor(part.stats.hessian(),
                                                              self.percdamp))
    res = sparsegpt_lib.sparsegpt_prune(w, shared[key][1], sparsity=r.sparsity, n=r.n,
                                        m=r.m, block_size=self.block_size)
    return res.weight, res.mask


def prune_calibrated(fn: Callable[[Any, Any], Any], params: Any, batches: Iterable[Any],
                     rules: Sequence[rules_lib.PruneRule], method: Any, *,
                     mode: str = "sequential", strict: bool = False, progress: bool = True,
                     **kwargs) -> tuple[Any, Any]:
  """Prunes the selected weights of any model; returns `(params, masks)`.

  `method` is `Wanda()`, `SparseGPT()` or the string "magnitude" (no
  calibration; `prune_params`). `masks` is a tree shaped like `params`
  (True where kept; None for leaves not pruned), for `apply_masks` and the
  distillation trainer.
  """
  if isinstance(method, str):
    if method == "magnitude":
      return magnitude_lib.prune_params(params, rules)
    raise ValueError(f"unknown pruning method {method!r}; pass 'magnitude', Wanda() or "
                     "SparseGPT()")
  res = capture.calibrate(fn, params, batches, rules, method, mode=mode, strict=strict,
                          progress=progress, **kwargs)
  masks = capture.tree_from_parts(params, res.info.get("masks", {}), fill=None,
                                  stack_axes={p.path: p.layout.fixed for p in res.parts})
  return res.params, masks
