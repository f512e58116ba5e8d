"""SmoothQuant: migrate activation outliers into the weights before W8A8.

For a linear `y = x @ W` (W `[in, out]`) and per-input-channel smoothing
factors `s`, `y = (x / s) @ (diag(s) W)`. With
`s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)` the activations' outlier
channels shrink and the weights' grow, so both quantize well to int8. The
division by `s` is folded into the op that produces `x`: the RMSNorm scale
before q/k/v (and before gate/up), which feed several linears at once, so
`max|W_j|` is taken over all consumers of the norm. After folding the model
computes the same function (up to float rounding); quantize it afterwards
(RTN W8 + `activations.attach_act_quant` A8).

The folding machinery (`FoldGroup`, `llama_fold_groups`, `apply_scales`) is
shared with AWQ.

References:
  Xiao, Lin, Seznec, Wu, Demouth, Han. SmoothQuant: Accurate and Efficient
  Post-Training Quantization for Large Language Models. ICML 2023,
  arXiv:2211.10438.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib

__all__ = ["FoldGroup", "llama_fold_groups", "apply_scales", "smooth_scales", "smooth_params",
           "get_leaves", "replace_leaves"]


@dataclasses.dataclass(frozen=True)
class FoldGroup:
  """Linears that share one input, and the op that produces it.

  Attributes:
    prev: path of the producer's parameter: an RMSNorm scale `[k]`
      (`prev_kind="norm"`) or a linear kernel `[*, k]` whose output columns
      are the consumers' inputs (`prev_kind="linear"`).
    consumers: paths of the kernels `[k, *]` that read that input; the first
      one's input statistics stand for all.
    prev_kind: "norm" or "linear".
  """

  prev: str
  consumers: tuple[str, ...]
  prev_kind: str = "norm"

  def __post_init__(self):
    if self.prev_kind not in ("norm", "linear"):
      raise ValueError(f"prev_kind must be 'norm' or 'linear', got {self.prev_kind!r}")


def llama_fold_groups(num_layers: int, *, v_to_o: bool = False, up_to_down: bool = False,
                      prefix: str = "layers") -> list[FoldGroup]:
  """Fold groups of `quantjax.models.llama` (paths `layers/{i}/...`).

  Always: input_norm -> q/k/v and post_attn_norm -> gate/up. Optionally
  v_proj -> o_proj (only valid without grouped-query attention, when v's
  output channels are o's input channels) and up_proj -> down_proj.
  """
  out = []
  for i in range(num_layers):
    p = f"{prefix}/{i}"
    out.append(FoldGroup(f"{p}/input_norm/scale",
                         tuple(f"{p}/attn/{n}_proj/kernel" for n in ("q", "k", "v"))))
    if v_to_o:
      out.append(FoldGroup(f"{p}/attn/v_proj/kernel", (f"{p}/attn/o_proj/kernel",), "linear"))
    out.append(FoldGroup(f"{p}/post_attn_norm/scale",
                         (f"{p}/mlp/gate_proj/kernel", f"{p}/mlp/up_proj/kernel")))
    if up_to_down:
      out.append(FoldGroup(f"{p}/mlp/up_proj/kernel", (f"{p}/mlp/down_proj/kernel",), "linear"))
  return out


def get_leaves(tree: Any) -> dict[str, Any]:
  """path -> leaf (QArrays kept whole)."""
  return dict(rules_lib.tree_leaves_with_paths(tree))


def replace_leaves(tree: Any, new: Mapping[str, Any]) -> Any:
  """The tree with the leaves at the given paths replaced (pure)."""
  missing = set(new) - set(get_leaves(tree))
  if missing:
    raise KeyError(f"no leaves at paths {sorted(missing)[:5]}")
  return rules_lib.map_with_paths(lambda p, x: new.get(p, x), tree)


def apply_scales(params: Any, groups: Sequence[FoldGroup], scales: Mapping[str, jax.Array]
                 ) -> Any:
  """Folds `1/s` into each group's producer and `s` into its consumers' rows.

  Args:
    params: params tree with float leaves at the groups' paths.
    groups: the fold groups.
    scales: `group.prev` -> `s` `[k]` (groups without an entry are skipped).

  Returns:
    A params tree computing the same function.
  """
  leaves = get_leaves(params)
  new: dict[str, Any] = {}
  for g in groups:
    if g.prev not in scales:
      continue
    s = jnp.asarray(scales[g.prev], jnp.float32)
    for path in (g.prev,) + g.consumers:
      if path not in leaves:
        raise KeyError(f"fold group {g.prev}: no parameter at {path}")
      leaf = leaves[path]
      if not isinstance(leaf, (jax.Array, np.ndarray)) or not jnp.issubdtype(leaf.dtype,
                                                                              jnp.floating):
        raise ValueError(f"{path} is already quantized; fold scales before quantizing")
    prev = jnp.asarray(new.get(g.prev, leaves[g.prev]))
    if g.prev_kind == "norm":
      if prev.shape != s.shape:
        raise ValueError(f"{g.prev} has shape {prev.shape}, scales {s.shape}")
      new[g.prev] = (prev.astype(jnp.float32) / s).astype(prev.dtype)
    else:
      if prev.shape[-1] != s.shape[0]:
        raise ValueError(f"{g.prev}: {prev.shape[-1]} output channels, {s.shape[0]} scales "
                         "(grouped-query attention cannot fold v_proj into o_proj)")
      new[g.prev] = (prev.astype(jnp.float32) / s[None, :]).astype(prev.dtype)
    for c in g.consumers:
      w = jnp.asarray(new.get(c, leaves[c]))
      if w.shape[0] != s.shape[0]:
        raise ValueError(f"{c} has {w.shape[0]} inputs, scales {s.shape[0]}")
      new[c] = (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)
  return replace_leaves(params, new)


def smooth_scales(act_absmax: jax.Array, weights: Sequence[jax.Array], alpha: float = 0.5,
                  eps: float = 1e-5) -> jax.Array:
  """`s_j = max|X_j|^alpha / max_consumers max|W_j,:|^(1-alpha)`, `[k]`.

  Channels that never fire (or have all-zero weights) get `s = 1`.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), eps)
  wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1)
                            for w in weights]), axis=0)
  wmax = jnp.maximum(wmax, eps)
  s = a ** alpha / wmax ** (1.0 - alpha)
  ok = jnp.isfinite(s) & (s > 0) & (jnp.asarray(act_absmax) > 0)
  return jnp.where(ok, s, 1.0)


def smooth_params(params: Any, act_absmax: Mapping[str, jax.Array], groups: Sequence[FoldGroup],
                  alpha: float = 0.5) -> tuple[Any, dict[str, jax.Array]]:
  """Applies SmoothQuant to every fold group.

  Args:
    params: float params tree.
    act_absmax: path of a consumer kernel -> per-input-channel max|x| `[k]`
      of its input (any consumer of the group; the first found is used).
    groups: e.g. `llama_fold_groups(n)`.
    alpha: migration strength (0.5 is the paper's default for most models;
      search it with `quantjax.methods.sequential` or a sweep).

  Returns:
    `(smoothed params, {prev path: s})`.
  """
  leaves = get_leaves(params)
  scales = {}
  for g in groups:
    stat = next((act_absmax[c] for c in g.consumers if c in act_absmax), None)
    if stat is None:
      raise ValueError(f"SmoothQuant: no activation statistics for any of {g.consumers}")
    scales[g.prev] = smooth_scales(stat, [leaves[c] for c in g.consumers], alpha)
  return apply_scales(params, groups, scales), scales
