"""Layer-by-layer pruning of a `quantjax.models.llama` model (Wanda, SparseGPT).

Uses the sequential driver of `quantjax.methods.sequential`: each decoder
layer sees inputs produced by the already-pruned layers before it (as in the
SparseGPT and Wanda papers), its linear inputs' statistics are collected in
one pass (the Hessian for SparseGPT, input norms for Wanda), and the pruned
layer's outputs feed the next layer.

    params, masks = prune_sequential(config, params, calib_tokens, "sparsegpt",
                                     [PruneRule(module_path=r".*_proj/kernel", n=2, m=4)])
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.methods import gptq as gptq_lib
from quantjax.sparsity import magnitude as magnitude_lib
from quantjax.sparsity import sparsegpt as sparsegpt_lib
from quantjax.sparsity import wanda as wanda_lib

__all__ = ["METHODS", "prune_sequential", "magnitude_prune", "mask_tree"]

METHODS = ("magnitude", "wanda", "sparsegpt")


def _rule(rules, path):
  for r in rules:
    if r.matches(path):
      return None if r.skip else r
  return None


def _layer_method(method: str, rules: Sequence[rules_lib.PruneRule], masks: dict[str, Any],
                  percdamp: float):
  from quantjax.methods import sequential as seq

  def run(i, lp, stats, ctx):
    for name in seq.LINEARS:
      path = f"{ctx['prefix']}/{name}"
      rule = _rule(rules, path)
      if rule is None:
        continue
      w = seq.get_param(lp, name)
      if method == "sparsegpt":
        h = gptq_lib.hessian(stats[name].hessian)
        res = sparsegpt_lib.sparsegpt_prune(w, h, sparsity=rule.sparsity, n=rule.n, m=rule.m,
                                            percdamp=percdamp)
        new_w, mask = res.weight.astype(w.dtype), res.mask
      else:  # wanda: ||x_i|| from the Hessian's diagonal (sum of x_i^2 over samples)
        st = stats[name].hessian
        norms = jnp.sqrt(jnp.diag(st.xtx))
        mask = wanda_lib.wanda_mask(w, norms, sparsity=rule.sparsity, n=rule.n, m=rule.m)
        new_w = jnp.where(mask, w, jnp.zeros((), w.dtype))
      masks[path] = mask
      lp = seq.set_param(lp, name, new_w)
    return lp
  return run


def magnitude_prune(params: Any, rules: Sequence[rules_lib.PruneRule]) -> tuple[Any, Any]:
  """Magnitude pruning (no calibration): `prune_params` with |w| scores."""
  return magnitude_lib.prune_params(params, rules)


def prune_sequential(config, params: Any, calib_tokens: np.ndarray, method: str,
                     rules: Sequence[rules_lib.PruneRule], *, batch_size: int = 8,
                     percdamp: float = 0.01, progress: bool = True) -> tuple[dict, dict]:
  """Prunes the model's linears with Wanda or SparseGPT, layer by layer.

  Args:
    config: `LlamaConfig`.
    params: float params (`nnx.State` or pure dict).
    calib_tokens: int `[N, T]` calibration windows.
    method: "wanda", "sparsegpt" or "magnitude".
    rules: `PruneRule`s over full paths (`layers/3/mlp/up_proj/kernel`).

  Returns:
    `(params, masks)`: pure-dict params, and `{path: keep-mask}` for the pruned leaves.
  """
  if method not in METHODS:
    raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")
  rules = tuple(rules)
  from quantjax.methods import sequential as seq
  pure = seq.to_pure(params)
  if method == "magnitude":
    pruned, mask_tree = magnitude_prune(pure, rules)
    masks = {p: m for p, m in rules_lib.tree_leaves_with_paths(mask_tree) if m is not None}
    return pruned, masks
  masks: dict[str, Any] = {}
  out, _ = seq.quantize_sequential(config, pure, calib_tokens,
                                   _layer_method(method, rules, masks, percdamp),
                                   batch_size=batch_size, hessian=True, progress=progress)
  return out, masks


def mask_tree(params: Any, masks: dict[str, Any]) -> Any:
  """The `{path: mask}` dict as a tree shaped like `params` (None where unpruned)."""
  return rules_lib.map_with_paths(lambda p, x: masks.get(p), params)
