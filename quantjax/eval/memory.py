"""Memory: bytes a params tree really holds, and what storing vs training costs.

`tree_bytes(tree)` counts every array leaf (a `QArray` counts its codes,
scales and zero points), `bits_per_weight(tree)` gives effective bits per
logical weight, `memory_table(tree)` lists leaves. `estimate(n_params, fmt)`
is the planning formula: storing costs the format's bits plus scales; training
with Adam in FP32 costs 4 B weights + 4 B gradients + 8 B moments, plus
activations (commonly estimated so the total is about 24 B per parameter).
`python -m quantjax.cli.memory 1e9` prints the estimate for common formats.

`train_regime_estimate(n_params, regime, ...)` breaks training memory down
per regime (`TRAIN_REGIMES`): FP32 with Adam; mixed precision (BF16 weights
and gradients, FP32 master weights and moments); pure BF16; QAT with fake
quantization; a frozen quantized base with trainable low-rank adapters. The
activation term is passed in (`quantjax.eval.plan.activation_bytes` models it for
a Llama-shaped model).

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (mixed-precision Adam: 2 + 2 + 12 B/parameter).
  Esser et al., "Learned Step Size Quantization", ICLR 2020.
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from quantjax import rules as rules_lib
from quantjax.numerics import llamacpp_types
from quantjax.numerics.formats import QuantFormat, resolve_format
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from quantjax.sparsity.nm import NMSparse

_BOXES = (QArray, ActQuantized, InputScaled, NMSparse)

__all__ = ["tree_bytes", "tree_param_count", "bits_per_weight", "LeafMemory", "memory_table",
           "markdown_memory_table", "MemoryEstimate", "estimate", "estimate_table",
           "format_bits_per_weight", "TRAIN_REGIMES", "TrainEstimate", "train_regime_estimate",
           "train_regime_table"]


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
  if llamacpp_types.stores_trits(fmt):  # TQ1_0: trits 5 to a byte, 52 bytes per 256
    bits = 8.0 * llamacpp_types.TRIT_BLOCK_BYTES / llamacpp_types.TRIT_BLOCK
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
  """Markdown table of store memory across formats."""
  lines = [f"Parameters: {n_params:,.0f}", "",
           "| format | bits/weight | store | store B/param |",
           "|---|---:|---:|---:|"]
  for f in formats:
    e = estimate(n_params, f, row_length=row_length)
    bpw = format_bits_per_weight(f, row_length=row_length)
    lines.append(f"| {e.format} | {bpw:.3f} | {_gb(e.store_bytes)} | {e.store_bytes_per_param:.3f} |")
  lines.append("")
  lines.append("Training does not depend on the storage format but on the regime: see the "
               "per-regime rows (`train_regime_estimate`).")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Training memory per regime.
# ----------------------------------------------------------------------------

TRAIN_REGIMES = ("fp32_adam", "mixed_bf16", "pure_bf16", "qat_fake_quant", "adapters")

_REGIME_TEXT = {
    "fp32_adam": "FP32 weights 4 + gradients 4 + Adam moments 8",
    "mixed_bf16": "FP32 master 4 + BF16 copy 2 + BF16 gradients 2 + FP32 moments 8",
    "pure_bf16": "BF16 weights 2 + gradients 2 + moments 2 + 2",
    "qat_fake_quant": "FP32 Adam (16) + fake-quantized weight copy 4 per quantized weight "
                      "(held for the backward pass) + LSQ step sizes with their Adam state",
    "adapters": "frozen base as stored + adapters with FP32 Adam (16 per adapter value) "
                "+ merged effective weight 4 per adapted weight (held for the backward pass)",
}


@dataclasses.dataclass(frozen=True)
class TrainEstimate:
  """Bytes to train in one regime, by component.

  Attributes:
    regime: one of `TRAIN_REGIMES`.
    n_params: parameters of the model (the base, for adapters).
    weights: trained weights as held (FP32 masters and BF16 working copies).
    frozen: the frozen base (adapters only).
    grads: gradients.
    optimizer: Adam's two moments.
    extra: per-regime working copies kept for the backward pass (QAT's
      fake-quantized weights, the adapters' merged weights) and LSQ step sizes.
    activations: what the caller passed (see `quantjax.eval.plan.activation_bytes`).
  """

  regime: str
  n_params: float
  weights: float
  frozen: float
  grads: float
  optimizer: float
  extra: float
  activations: float

  @property
  def states(self) -> float:
    return self.weights + self.frozen + self.grads + self.optimizer + self.extra

  @property
  def total(self) -> float:
    return self.states + self.activations

  @property
  def bytes_per_param(self) -> float:
    return self.total / self.n_params


def train_regime_estimate(n_params: float, regime: str, *, quantized_params: float | None = None,
                          fmt: QuantFormat | str | None = "int4_g64", row_length: int | None = None,
                          lsq_steps: float = 0.0, adapter_params: float = 0.0,
                          activations: float = 0.0, kept_fraction: float = 1.0) -> TrainEstimate:
  """Training bytes for `n_params` parameters in `regime`.

  Args:
    n_params: parameters of the model.
    regime: one of `TRAIN_REGIMES`.
    quantized_params: parameters of the fake-quantized (QAT) or frozen
      quantized and adapted (adapters) weights; default all of them.
    fmt: storage format of those weights in the adapters regime (their
      frozen bytes); the rest of the base is FP32.
    row_length: values per per-channel scale, for `format_bits_per_weight`.
    lsq_steps: number of learned step sizes (QAT with LSQ; 0 for fixed scales).
    adapter_params: trainable adapter values (adapters regime).
    activations: activation bytes (regime-dependent dtype: the caller's model).
    kept_fraction: share of the per-weight working copies (QAT's fake-quantized
      weights, the adapters' merged weights) alive at the peak: 1 without
      rematerialisation (every layer's copy waits for the backward pass),
      1 / layers with per-layer rematerialisation.

  Raises:
    ValueError: unknown regime or non-positive `n_params`.
  """
  if regime not in TRAIN_REGIMES:
    raise ValueError(f"unknown training regime {regime!r}; expected one of {TRAIN_REGIMES}")
  if not n_params > 0:
    raise ValueError(f"n_params must be positive, got {n_params}")
  n = float(n_params)
  q = n if quantized_params is None else float(quantized_params)
  if not 0 <= q <= n:
    raise ValueError(f"quantized_params must be in [0, n_params], got {quantized_params}")
  weights = frozen = grads = optimizer = extra = 0.0
  if regime == "fp32_adam":
    weights, grads, optimizer = 4 * n, 4 * n, 8 * n
  elif regime == "mixed_bf16":
    weights, grads, optimizer = (4 + 2) * n, 2 * n, 8 * n
  elif regime == "pure_bf16":
    weights, grads, optimizer = 2 * n, 2 * n, 4 * n
  elif regime == "qat_fake_quant":
    weights, grads, optimizer = 4 * n, 4 * n, 8 * n
    extra = 4 * q * kept_fraction + 16 * float(lsq_steps)
  else:  # adapters
    bpw = format_bits_per_weight(fmt, row_length=row_length)
    frozen = q * bpw / 8 + 4 * (n - q)
    r = float(adapter_params)
    weights, grads, optimizer = 4 * r, 4 * r, 8 * r
    extra = 4 * q * kept_fraction
  return TrainEstimate(regime, n, weights, frozen, grads, optimizer, extra, float(activations))


def train_regime_table(estimates: Sequence[TrainEstimate], *, measured: dict | None = None) -> str:
  """Markdown rows per regime (GB); `measured` maps regime -> bytes for a side column."""
  head = ("| regime | weights | frozen base | grads | Adam moments | working copies | activations "
          "| total | B/param |")
  sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  if measured is not None:
    head += " measured | measured / estimate |"
    sep += "---:|---:|"
  lines = [head, sep]
  for e in estimates:
    row = (f"| {e.regime} | {_gb(e.weights)} | {_gb(e.frozen)} | {_gb(e.grads)} | "
           f"{_gb(e.optimizer)} | {_gb(e.extra)} | {_gb(e.activations)} | {_gb(e.total)} | "
           f"{e.bytes_per_param:.1f} |")
    if measured is not None:
      m = measured.get(e.regime)
      row += (f" {_gb(m)} | {m / e.total:.2f} |" if m else " - | - |")
    lines.append(row)
  lines.append("")
  for e in estimates:
    lines.append(f"- {e.regime}: {_REGIME_TEXT[e.regime]} (B per parameter).")
  return "\n".join(lines)
