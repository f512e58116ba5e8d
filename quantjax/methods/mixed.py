"""Mixed precision under a memory budget: one format per tensor, chosen by sensitivity.

1. **Sensitivity** (`fisher_diagonal`): the empirical Fisher diagonal
   `F = E[g ⊙ g]` of the model's loss (a user-supplied `loss_fn(params,
   batch)`, e.g. the next-token NLL) over calibration batches, one gradient
   per batch. To second order, quantizing tensor `t` to format `f`
   raises the loss by about `½ Σ F_t ⊙ (W_t − Q_f(W_t))²` (the diagonal-Fisher
   saliency of Optimal Brain Damage, LeCun et al., 1990; used for bit
   allocation in HAWQ-V2, Dong et al., NeurIPS 2020, arXiv:1911.03852, with
   the Hessian trace, and by Kim et al., SqueezeLLM, arXiv:2306.07629, with
   the Fisher). `candidate_costs` tabulates it for every tensor and candidate
   format, with each choice's exact bytes.
2. **Allocation** (`allocate`): the multiple-choice knapsack "minimise the sum
   of predicted increases subject to total bytes ≤ budget", solved by the
   Lagrangian relaxation (each tensor picks `argmin cost + λ·bytes`; `λ` by
   bisection) followed by a greedy pass that spends the remaining budget on
   the upgrades with the best cost reduction per byte.
3. `assignment_rules` turns the allocation into `QuantRule`s (one per tensor)
   that any method (RTN, GPTQ through `capture.calibrate`) and the GGUF
   exporter understand; with GGUF block formats as candidates (`q8_0`,
   `q5_0`, `q4_0`, ...) the result exports code for code with per-tensor types.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.numerics import llamacpp_types
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat, resolve_format

__all__ = ["Choice", "Allocation", "fisher_diagonal", "candidate_costs", "allocate",
           "assignment_rules", "calibration_for", "format_bytes"]


@dataclasses.dataclass(frozen=True)
class Choice:
  """One candidate for one tensor: its format, bytes and predicted loss increase."""
  fmt: str
  nbytes: int
  cost: float


@dataclasses.dataclass
class Allocation:
  """Chosen format per tensor path, with the totals."""
  formats: dict[str, str]
  nbytes: int
  predicted_cost: float
  budget: int
  count: int  # weights covered

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(self.count, 1)

  def histogram(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in self.formats.values():
      out[f] = out.get(f, 0) + 1
    return dict(sorted(out.items()))


def format_bytes(shape: Sequence[int], fmt: QuantFormat | str) -> int:
  """Exact bytes of a QArray of `shape` in `fmt` (codes + scales + zero points)."""
  fmt = resolve_format(fmt)
  q = jax.eval_shape(lambda x: qarray_lib.quantize(x, fmt),
                     jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
             for a in (q.qvalue, q.scale, q.zero_point) if a is not None)


def fisher_diagonal(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batches: Iterable[Any], targets: str, *, progress: bool = False
                    ) -> dict[str, np.ndarray]:
  """`E[(∂ loss / ∂W)²]` over `batches` for every float leaf whose path matches `targets`.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, the model's own loss (e.g.
      the mean next-token NLL of one window); one gradient per batch.
    params: any params pytree (NNX State, linen variables, dicts).
    batches: the calibration batches (one Fisher sample each).
    targets: regex, fullmatch on the leaf paths.
  """
  paths = [p for p, x in rules_lib.tree_leaves_with_paths(params)
           if re.fullmatch(targets, p) and hasattr(x, "dtype") and
           jnp.issubdtype(x.dtype, jnp.floating)]
  if not paths:
    raise ValueError(f"no float parameter path matches targets {targets!r}")
  batches = list(batches)
  if not batches:
    raise ValueError("fisher_diagonal needs at least one calibration batch")

  @jax.jit
  def sq_grad(p, batch):
    g = jax.grad(loss_fn)(p, batch)
    return jax.tree.map(lambda x: x * x, g)

  acc = None
  it = batches
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(batches, desc="fisher", unit="batch")
  for batch in it:
    g2 = sq_grad(params, batch)
    acc = g2 if acc is None else jax.tree.map(jnp.add, acc, g2)
  flat = dict(rules_lib.tree_leaves_with_paths(acc))
  return {p: np.asarray(flat[p]) / len(batches) for p in paths}


def calibration_for(fmt: QuantFormat | str, calibration: str = "auto") -> str:
  """`calibration` where the format supports it, else "minmax" ("signed_max" needs a
  signed symmetric integer format)."""
  fmt = resolve_format(fmt)
  if calibration == "signed_max" and not (fmt.kind == "int" and fmt.symmetric and fmt.signed):
    return "minmax"
  return calibration


def candidate_costs(params: Any, fisher: Mapping[str, np.ndarray],
                    candidates: Sequence[str], *, calibration: str = "auto",
                    ) -> dict[str, list[Choice]]:
  """Per tensor, every candidate format's bytes and `½ Σ F ⊙ (W − Q(W))²`.

  Only the candidates that fit a tensor are offered to it (whole groups along its rows,
  and whole GGUF blocks for llama.cpp's types: Q1_0 needs rows of 128, NVFP4 of 64,
  ...); a tensor that no candidate fits is an error naming it, its rows and the
  candidates, never a silent fallback."""
  flat = dict(rules_lib.tree_leaves_with_paths(params))
  out: dict[str, list[Choice]] = {}
  for path, f in fisher.items():
    w = jnp.asarray(flat[path], jnp.float32)
    choices = []
    fitting = [c for c in candidates if llamacpp_types.fits(w.shape, resolve_format(c))]
    if not fitting:
      raise ValueError(f"mixed precision: no candidate format fits tensor {path} of shape "
                       f"{tuple(w.shape)} (candidates: {', '.join(map(str, candidates))}); "
                       "add one whose groups and blocks divide its rows")
    for spec in fitting:
      fmt = resolve_format(spec)
      if fmt.is_cast:
        err = w - w.astype(fmt.code_dtype).astype(jnp.float32)
      else:
        err = w - qarray_lib.quantize(w, fmt, calibration=calibration_for(fmt, calibration)
                                      ).dequantize(jnp.float32)
      cost = 0.5 * float(jnp.sum(jnp.asarray(f) * err * err))
      choices.append(Choice(str(spec), format_bytes(w.shape, fmt), cost))
    out[path] = choices
  return out


def allocate(costs: Mapping[str, Sequence[Choice]], budget_bytes: int, *,
             count: int | None = None) -> Allocation:
  """Minimises total predicted cost with total bytes ≤ `budget_bytes`.

  Raises:
    ValueError: the budget is below the smallest choice for every tensor.
  """
  paths = sorted(costs)
  if not paths:
    raise ValueError("nothing to allocate: no tensors")
  floor = sum(min(c.nbytes for c in costs[p]) for p in paths)
  if budget_bytes < floor:
    raise ValueError(f"budget {budget_bytes:,} bytes is below the smallest possible size "
                     f"{floor:,} bytes (every tensor in its smallest candidate)")

  def pick(lam):
    sel = {p: min(costs[p], key=lambda c: (c.cost + lam * c.nbytes, c.nbytes)) for p in paths}
    return sel, sum(c.nbytes for c in sel.values())

  lo, hi = 0.0, 1.0
  sel, total = pick(lo)
  if total > budget_bytes:
    while pick(hi)[1] > budget_bytes:
      hi *= 4.0
      if hi > 1e30:
        break
    for _ in range(100):
      mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6 if hi > 1e-30 else 0.0
      if pick(mid)[1] > budget_bytes:
        lo = mid
      else:
        hi = mid
      if hi - lo <= 1e-9 * hi:
        break
    sel, total = pick(hi)
  # Greedy: spend what is left on the best cost reduction per extra byte.
  while True:
    best = None
    for p in paths:
      cur = sel[p]
      for c in costs[p]:
        extra = c.nbytes - cur.nbytes
        gain = cur.cost - c.cost
        if extra > 0 and gain > 0 and total + extra <= budget_bytes:
          ratio = gain / extra
          if best is None or ratio > best[0]:
            best = (ratio, p, c)
    if best is None:
      break
    _, p, c = best
    total += c.nbytes - sel[p].nbytes
    sel[p] = c
  return Allocation(formats={p: sel[p].fmt for p in paths}, nbytes=total,
                    predicted_cost=sum(c.cost for c in sel.values()), budget=int(budget_bytes),
                    count=int(count or 0))


def assignment_rules(allocation: Allocation | Mapping[str, str], *,
                     calibration: str = "auto") -> list[rules_lib.QuantRule]:
  """One exact-path `QuantRule` per allocated tensor (see `calibration_for`)."""
  formats = allocation.formats if isinstance(allocation, Allocation) else dict(allocation)
  return [rules_lib.QuantRule(module_path=re.escape(p), format=f,
                              calibration=calibration_for(f, calibration))
          for p, f in formats.items()]
