"""Memory: bytes a params tree really holds, and what storing vs training costs.

`tree_bytes(tree)` counts every array leaf (a `QArray` counts its codes,
scales and zero points), `bits_per_weight(tree)` gives effective bits per
logical weight, `memory_table(tree)` lists leaves. `estimate(n_params, fmt)`
is the planning formula: storing costs the format's bits plus scales; training
with Adam in FP32 costs 4 B weights + 4 B gradients + 8 B moments, plus
activations (commonly estimated so the total is about 24 B per parameter).
`python -m quantjax.memory 1e9` prints the estimate for common formats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from quantjax import rules as rules_lib
from quantjax.numerics.formats import QuantFormat, resolve_format
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from quantjax.sparsity.nm import NMSparse

_BOXES = (QArray, ActQuantized, InputScaled, NMSparse)

__all__ = ["tree_bytes", "tree_param_count", "bits_per_weight", "LeafMemory", "memory_table",
           "markdown_memory_table", "MemoryEstimate", "estimate", "estimate_table",
           "format_bits_per_weight"]


def _leaf_bytes(x: Any) -> int:
  if isinstance(x, _BOXES):
    return int(x.nbytes)
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return 0


def _leaf_count(x: Any) -> int:
  if hasattr(x, "shape"):
    return int(math.prod(x.shape))
  return 0


def _leaves(tree: Any):
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, _BOXES))


def tree_bytes(tree: Any) -> int:
  """Bytes held by all array leaves (QArray: codes + scales + zero points)."""
  return sum(_leaf_bytes(x) for x in _leaves(tree))


def tree_param_count(tree: Any) -> int:
  """Logical number of values (a QArray counts its logical shape)."""
  return sum(_leaf_count(x) for x in _leaves(tree))


def bits_per_weight(tree: Any, *, quantized_only: bool = False) -> float:
  """Effective bits per logical value, scales included.

  With `quantized_only`, only QArray leaves are counted (the bits of the
  quantized weights themselves); otherwise the whole tree.
  """
  leaves = _leaves(tree)
  if quantized_only:
    leaves = [x for x in leaves if isinstance(x, _BOXES)]
  n = sum(_leaf_count(x) for x in leaves)
  return 8.0 * sum(_leaf_bytes(x) for x in leaves) / n if n else 0.0


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  path: str
  shape: tuple[int, ...]
  format: str
  nbytes: int
  bits_per_weight: float


def memory_table(tree: Any) -> list[LeafMemory]:
  """One row per leaf: path, shape, format, bytes, effective bits."""
  rows = []
  for path, leaf in rules_lib.tree_leaves_with_paths(tree):
    if not hasattr(leaf, "shape"):
      continue
    w = leaf
    while isinstance(w, (ActQuantized, InputScaled)):
      w = w.weight
    fmt = w.fmt.name if isinstance(w, QArray) else np.dtype(w.dtype).name
    n = _leaf_count(leaf)
    b = _leaf_bytes(leaf)
    rows.append(LeafMemory(path, tuple(leaf.shape), fmt, b, 8.0 * b / n if n else 0.0))
  return rows


def markdown_memory_table(tree: Any, *, reference: Any = None) -> str:
  """Markdown table of `memory_table(tree)` with a total (and ratio to `reference`)."""
  rows = memory_table(tree)
  lines = ["| leaf | shape | format | bytes | bits/weight |", "|---|---|---|---:|---:|"]
  for r in rows:
    lines.append(f"| {r.path} | {'x'.join(map(str, r.shape))} | {r.format} | {r.nbytes:,} | "
                 f"{r.bits_per_weight:.3f} |")
  total = tree_bytes(tree)
  lines.append(f"| **total** | {tree_param_count(tree):,} values | | {total:,} | "
               f"{bits_per_weight(tree):.3f} |")
  if reference is not None:
    ref = tree_bytes(reference)
    lines.append("")
    lines.append(f"{total:,} bytes = {100.0 * total / ref:.1f}% of the reference's {ref:,} bytes")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Planning estimates.
# ----------------------------------------------------------------------------

def format_bits_per_weight(fmt: QuantFormat | str | None, *, row_length: int | None = None) -> float:
  """Storage bits per weight of a format, scales and zero points included.

  `fmt=None` means FP32. Per-channel overhead needs the row length (values
  sharing one scale); without it, it is taken as negligible.
  """
  if fmt is None:
    return 32.0
  fmt = resolve_format(fmt)
  if fmt.is_cast:
    return 16.0
  bits = float(fmt.bits)
  sbits = 8.0 * np.dtype(fmt.scale_dtype).itemsize
  extra = sbits
  if fmt.has_zero_point:
    extra += sbits if fmt.zero_point == "float" else 8.0
  if fmt.granularity == "group":
    return bits + extra / fmt.group_size
  if fmt.granularity == "per_channel" and row_length:
    return bits + extra / row_length
  return bits


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes to store and to train `n_params` parameters.

  Training assumes FP32 master weights and gradients, Adam's two moments,
  and activations at `activation_bytes_per_param` (the common rule of thumb
  that makes the total ~24 B per parameter; a real figure depends on batch,
  sequence length and checkpointing).
  """

  n_params: float
  format: str
  store_bytes: float
  weights_bytes: float
  grad_bytes: float
  optimizer_bytes: float
  activation_bytes: float

  @property
  def train_bytes(self) -> float:
    return self.weights_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

  @property
  def store_bytes_per_param(self) -> float:
    return self.store_bytes / self.n_params

  @property
  def train_bytes_per_param(self) -> float:
    return self.train_bytes / self.n_params


def estimate(n_params: float, fmt: QuantFormat | str | None = None, *,
             activation_bytes_per_param: float = 8.0,
             row_length: int | None = None) -> MemoryEstimate:
  """Store vs train memory for `n_params` parameters in format `fmt`.

  Training keeps FP32 weights whatever the storage format (QAT keeps FP32
  master weights too): 4 B weights + 4 B grads + 8 B Adam moments + activations.
  """
  if not n_params > 0:
    raise ValueError(f"n_params must be positive, got {n_params}")
  name = "fp32" if fmt is None else resolve_format(fmt).name
  bpw = format_bits_per_weight(fmt, row_length=row_length)
  return MemoryEstimate(
      n_params=float(n_params), format=name, store_bytes=n_params * bpw / 8.0,
      weights_bytes=4.0 * n_params, grad_bytes=4.0 * n_params, optimizer_bytes=8.0 * n_params,
      activation_bytes=activation_bytes_per_param * n_params)


DEFAULT_FORMATS = (None, "bf16", "fp8_e4m3", "int8", "int4_g128", "int4_g64_asym", "int4_g32_asymf",
                   "nf4_g64", "int3_g64_asym", "int2_g64_asym", "ternary", "binary")


def _gb(b: float) -> str:
  return f"{b / 1e9:,.2f} GB"


def estimate_table(n_params: float, formats: Sequence[Any] = DEFAULT_FORMATS, *,
                   row_length: int | None = 4096) -> str:
  """Markdown table of store vs train memory across formats."""
  lines = [f"Parameters: {n_params:,.0f}", "",
           "| format | bits/weight | store | store B/param | train (Adam, FP32) | train B/param |",
           "|---|---:|---:|---:|---:|---:|"]
  for f in formats:
    e = estimate(n_params, f, row_length=row_length)
    bpw = format_bits_per_weight(f, row_length=row_length)
    lines.append(f"| {e.format} | {bpw:.3f} | {_gb(e.store_bytes)} | {e.store_bytes_per_param:.3f} | "
                 f"{_gb(e.train_bytes)} | {e.train_bytes_per_param:.1f} |")
  lines.append("")
  lines.append("Train = 4 B weights + 4 B gradients + 8 B Adam moments + ~8 B activations "
               "per parameter (rule of thumb; ~24 B/param).")
  return "\n".join(lines)
