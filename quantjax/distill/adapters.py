"""Low-rank adapters on a frozen (possibly quantized) base, as a pure pytree transform.

`lora_init(base, pattern, rank, key)` gives one adapter `{"a": [din, r],
"b": [r, dout]}` per matched 2-D weight `[din, dout]` (A Gaussian with
standard deviation `1/sqrt(din)`, B zero, so training starts exactly at the
base model). `lora_merge(base, adapters)` returns the params the forward pass
uses: `W + (alpha / r) * A @ B`, where `W` is the base leaf dequantized when it
is a `QArray`. The base stays frozen (pass it to `distill.fit` as `frozen=`),
only the adapters are trained; the model's code is unchanged.

Memory: the base costs its stored bytes; each adapter parameter costs 16 B
with FP32 Adam. Merging materialises the effective weight of every adapted
layer in the compute dtype, and without rematerialisation the backward pass
keeps these copies (it needs `W_eff` for the input gradient): this
formulation trades the memory QLoRA saves by recomputing for model
independence (`eval/memory.train_regime_estimate(..., "adapters")` counts it).
`lora_convert(base, adapters)` merges for inference; re-quantize the result
with `quantize_params` to store it in the base's format.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.numerics.qarray import dequantize

__all__ = ["lora_init", "lora_merge", "lora_convert", "adapter_param_count"]


def lora_init(base: Any, pattern: str, rank: int, key: jax.Array, *,
              dtype: Any = jnp.float32) -> dict[str, dict[str, jax.Array]]:
  """Adapters `{path: {"a", "b"}}` for the 2-D leaves whose path fully matches `pattern`.

  Raises:
    ValueError: no leaf matches, a matched leaf is not 2-D, or `rank` is not
      in [1, min(din, dout)].
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  regex = re.compile(pattern)
  out = {}
  matched = [(p, x) for p, x in rules_lib.tree_leaves_with_paths(base)
             if hasattr(x, "shape") and regex.fullmatch(p)]
  if not matched:
    raise ValueError(f"LoRA pattern {pattern!r} matches no leaf")
  for i, (path, leaf) in enumerate(matched):
    shape = tuple(leaf.shape)
    if len(shape) != 2:
      raise ValueError(f"LoRA adapts 2-D weights [din, dout]; {path} has shape {shape}")
    din, dout = shape
    if rank > min(din, dout):
      raise ValueError(f"LoRA rank {rank} exceeds min(din, dout) = {min(din, dout)} of {path}")
    a = jax.random.normal(jax.random.fold_in(key, i), (din, rank), jnp.float32) / math.sqrt(din)
    out[path] = {"a": a.astype(dtype), "b": jnp.zeros((rank, dout), dtype)}
  return out


def lora_merge(base: Any, adapters: dict[str, dict[str, jax.Array]], *,
               alpha: float | None = None) -> Any:
  """Params with `W + (alpha / r) A @ B` at every adapted leaf (alpha defaults to r).

  QArray base leaves are dequantized (to the adapters' dtype) before the sum;
  other leaves pass through unchanged.

  Raises:
    KeyError: an adapter names a path that is not in `base`.
  """
  paths = {p for p, _ in rules_lib.tree_leaves_with_paths(base)}
  missing = sorted(set(adapters) - paths)
  if missing:
    raise KeyError(f"adapters for paths not in the base params: {missing[:5]}")

  def fn(path: str, w: Any) -> Any:
    ad = adapters.get(path)
    if ad is None:
      return w
    a, b = ad["a"], ad["b"]
    r = a.shape[1]
    scale = (r if alpha is None else alpha) / r
    dense = dequantize(w, a.dtype)
    return dense + scale * (a @ b)
  return rules_lib.map_with_paths(fn, base)


def lora_convert(base: Any, adapters: dict[str, dict[str, jax.Array]], *,
                 alpha: float | None = None) -> Any:
  """The merged dense params for inference (same as `lora_merge`, outside training)."""
  return jax.jit(lambda b, a: lora_merge(b, a, alpha=alpha))(base, adapters)


def adapter_param_count(adapters: dict[str, dict[str, jax.Array]]) -> int:
  """Trainable values in `adapters` (r * (din + dout) per adapted weight)."""
  return sum(int(x.size) for x in jax.tree.leaves(adapters))
