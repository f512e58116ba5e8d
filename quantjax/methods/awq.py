"""AWQ: activation-aware weight quantization by per-input-channel scaling.

Weights that see large activations matter most. AWQ multiplies input channel
`j` of the weights by `s_j = mean|X_j|^a` (and divides the input by it: the
scale travels with the weight as an `InputScaled` leaf, and can be folded
into the producing op, e.g. the RMSNorm before q/k/v, with
`methods.fold.fold_input_scales` and a model's fold table), with `a` chosen
on a grid in [0, 1) to minimise the error of the weights that share the
input, `||X W - (X/s) Q(diag(s) W)||^2`, on calibration rows. An optional clipping search then shrinks each group's
weight range (per output channel and weight group) to the ratio with the
least output error. The weights are finally quantized round-to-nearest to
plain `QArray`s; the model stays equivalent up to quantization.

Here the error is measured on the outputs of the weights that share the input
(their concatenation); the reference implementation measures it after the
whole attention / MLP module.

References:
  Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han. AWQ:
  Activation-aware Weight Quantization for LLM Compression and
  Acceleration. MLSys 2024, arXiv:2306.00978. Reference code:
  github.com/mit-han-lab/llm-awq.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.methods import activations as act_lib
from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat, resolve_format

__all__ = ["awq_search_scales", "awq_clip", "AWQ", "fake_quant_weight"]


@functools.partial(jax.jit, static_argnames=("fmt", "calibration"))
def fake_quant_weight(w: jax.Array, fmt: QuantFormat, calibration: str = "auto") -> jax.Array:
  """Round-to-nearest quantize-dequantize (the format's default scale rule), jitted per format."""
  return qarray_lib.quantize(w, fmt, calibration=calibration).dequantize(jnp.float32)


@functools.partial(jax.jit, static_argnames=("fmts",))
def _scaled_error(x, ref, ws, s, fmts):
  outs = []
  for w, f in zip(ws, fmts):
    outs.append(jnp.dot(x / s[None, :], fake_quant_weight(w * s[:, None], f),
                        precision=jax.lax.Precision.HIGHEST))
  out = jnp.concatenate(outs, axis=1)
  return jnp.mean((out - ref) ** 2)


def awq_search_scales(x: jax.Array, x_absmean: jax.Array, weights: Sequence[jax.Array],
                      formats: Sequence[QuantFormat | str], *, grid: int = 20,
                      name: str = "weights") -> tuple[jax.Array, float, list[float]]:
  """Grid search of AWQ's per-input-channel scales.

  Args:
    x: calibration input rows `[n, k]`.
    x_absmean: per-channel mean|x| `[k]` (over all calibration tokens).
    weights: the consumers' kernels, each `[k, out_c]`.
    formats: their formats.
    grid: exponents `a = i / grid`, `i = 0..grid-1` (a = 0 is plain RTN).
    name: the weights' paths, for messages.

  Returns:
    `(s [k], best error, errors per a)`.

  Raises:
    ValueError: no calibration rows, NaN/Inf in `x`, `x_absmean` or the weights,
      or no finite error on the grid (the search would silently return RTN).
  """
  _check_calib(x, "calibration inputs", name)
  _check_calib(x_absmean, "mean |input|", name)
  x = jnp.asarray(x, jnp.float32)
  ws = tuple(jnp.asarray(w, jnp.float32) for w in weights)
  fmts = tuple(resolve_format(f) for f in formats)
  ref = jnp.concatenate([jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) for w in ws], axis=1)
  m = jnp.maximum(jnp.asarray(x_absmean, jnp.float32), 1e-8)
  errs, best, best_s = [], None, None
  for i in range(grid):
    a = i / grid
    s = m ** a
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    e = float(_scaled_error(x, ref, ws, s, fmts))
    errs.append(e)
    if np.isfinite(e) and (best is None or e < best):
      best, best_s = e, s
  if best is None:
    raise ValueError(f"AWQ {name}: no scale on the grid gives a finite error ({errs[:3]} ...): "
                     "the weights or their quantization overflow")
  return best_s, best, errs


def _check_calib(x: Any, what: str, name: str) -> None:
  """Host check of concrete calibration statistics (skipped under tracing)."""
  if isinstance(x, jax.core.Tracer):
    return
  a = np.asarray(x)
  if a.size == 0:
    raise ValueError(f"AWQ {name}: no calibration rows ({what} of shape {a.shape})")
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(f"AWQ {name}: the {what} hold {int(bad.sum())} NaN/Inf values of {a.size} "
                     "(check the calibration batches: token ids beyond the vocabulary, "
                     "overflowing activations); the scale search would fall back to plain RTN")


def _signed_max_rule(fmt: QuantFormat, calibration: Any) -> bool:
  method = calibrate_lib.resolve_calibration(calibration).method
  if method == "auto":
    method = calibrate_lib.auto_method(fmt)
  return method == "signed_max"


@functools.partial(jax.jit, static_argnames=("fmt", "grid", "max_shrink", "signed_max"))
def _clip_search(w, x, fmt, grid, max_shrink, signed_max):
  k, out = w.shape
  g = fmt.group_size if fmt.granularity == "group" else k
  ng = k // g
  wg = w.reshape(ng, g, out)
  xg = x.reshape(x.shape[0], ng, g)
  amax0 = jnp.max(jnp.abs(wg), axis=1, keepdims=True)  # [G, 1, out]
  ref = jnp.einsum("nGg,Ggo->nGo", xg, wg, precision=jax.lax.Precision.HIGHEST)
  if signed_max:
    # Signed-max scales map the group's signed extreme to the code -2^(b-1): clip
    # that side at m and the other at m * qmax / 2^(b-1), so that after clipping
    # every code is used and nothing is clamped by a whole step.
    neg = -jnp.min(wg, axis=1, keepdims=True) > jnp.max(wg, axis=1, keepdims=True)
    other = fmt.qmax / -fmt.qmin
    lo_f, hi_f = jnp.where(neg, -1.0, -other), jnp.where(neg, other, 1.0)
  else:
    lo_f, hi_f = -1.0, 1.0
  cal = "signed_max" if signed_max else "minmax"

  def body(carry, r):
    best_e, best_m = carry
    mx = amax0 * r
    wc = jnp.clip(wg, lo_f * mx, hi_f * mx).reshape(k, out)
    q = fake_quant_weight(wc, fmt, cal).reshape(ng, g, out)
    e = jnp.mean((jnp.einsum("nGg,Ggo->nGo", xg, q, precision=jax.lax.Precision.HIGHEST)
                  - ref) ** 2, axis=0)[:, None, :]
    better = e < best_e
    return (jnp.where(better, e, best_e), jnp.where(better, mx, best_m)), None

  ratios = 1.0 - jnp.arange(int(grid * max_shrink), dtype=jnp.float32) / grid
  init = (jnp.full(amax0.shape, jnp.inf, jnp.float32), amax0)
  (_, best_m), _ = jax.lax.scan(body, init, ratios)
  return jnp.clip(wg, lo_f * best_m, hi_f * best_m).reshape(k, out)


def awq_clip(w: jax.Array, x: jax.Array, fmt: QuantFormat | str, *, grid: int = 20,
             max_shrink: float = 0.5, max_rows: int = 512, calibration: Any = "auto") -> jax.Array:
  """AWQ's clipping search: per (weight group, output channel), the clip
  ratio of max|w| in `1, 1 - 1/grid, ...` (down to `1 - max_shrink`) with the
  least error of `x @ w` restricted to that group. Returns the clipped `w`.

  With min-max scales both signs are clipped at the same bound. With
  signed-max scales (`calibration` "signed_max", or "auto" on a signed
  symmetric format) the side of the group's signed extreme is clipped at the
  bound and the other side at `qmax / 2^(b-1)` of it, the range that rule's
  codes cover, so quantizing the clipped weight with the same rule clamps
  nothing."""
  fmt = resolve_format(fmt)
  _check_calib(x, "calibration inputs", "clip search")
  w = jnp.asarray(w, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  if x.shape[0] > max_rows:
    x = x[:: x.shape[0] // max_rows][:max_rows]
  if fmt.granularity == "group" and w.shape[0] % fmt.group_size:
    raise ValueError(f"group_size {fmt.group_size} does not divide {w.shape[0]}")
  return _clip_search(w, x, fmt, grid, max_shrink, _signed_max_rule(fmt, calibration))


@dataclasses.dataclass(frozen=True)
class AWQ:
  """AWQ for the calibration driver (`capture.calibrate`), on any model.

  Weights that read one input (q/k/v; gate/up) share one scale vector `s`,
  searched on their joint output error; each weight is then clipped
  (optional) and quantized round-to-nearest as `Q(diag(s) W)`, and the
  division of its input by `s` travels with it (`InputScaled`), so the model
  runs unchanged. `methods.fold.fold_input_scales` with a model's fold table
  (`quantjax.models.llama.fold_groups`) moves `1/s` into the producing norm
  or linear and leaves plain QArrays.

  Attributes:
    grid: exponents `a = i / grid` searched (a = 0 is plain RTN).
    clip, clip_grid, max_shrink: the clipping search (`awq_clip`).
    scales_for: regex (fullmatch on the weight's path) of the weights that
      get input scales; None: all. Weights outside it are clipped and
      rounded only (for a model whose fold table cannot absorb some scales).
    no_clip: regex of weights not clipped (the reference skips q and k,
      whose errors the output metric does not see through the attention).
    max_rows: input rows used by the searches.
    act_observer: static activation ranges for rules with an `act_format`.
  """

  grid: int = 20
  clip: bool = True
  clip_grid: int = 20
  max_shrink: float = 0.5
  scales_for: str | None = None
  no_clip: str | None = None
  max_rows: int = 512
  act_observer: Any = None
  label: ClassVar[str] = "AWQ"
  rule_type: ClassVar[type] = rules_lib.QuantRule

  @property
  def needs(self) -> frozenset:
    return frozenset({"absmean", "sample"}) | act_lib.observer_needs(self.act_observer)

  def apply(self, parts, record) -> dict:
    errors = record.setdefault("awq_errors", {})
    by_source: dict[int, list] = {}
    for p in parts:
      by_source.setdefault(p.source, []).append(p)
    out = {}
    for ps in by_source.values():
      x = jnp.asarray(ps[0].stats.sample, jnp.float32)
      if x.shape[0] > self.max_rows:
        x = x[:: x.shape[0] // self.max_rows][: self.max_rows]
      scaled = [p for p in ps if not resolve_format(p.rule.format).is_cast and (
          self.scales_for is None or re.fullmatch(self.scales_for, p.path))]
      s = None
      if scaled:
        fmts = [p.matrix_format(p.rule.format) for p in scaled]
        s, _, errs = awq_search_scales(x, ps[0].stats.absmean, [p.matrix() for p in scaled],
                                       fmts, grid=self.grid,
                                       name=", ".join(p.name for p in scaled))
        errors[", ".join(p.name for p in scaled)] = errs
      for p in ps:
        fmt = resolve_format(p.rule.format)
        if fmt.is_cast:
          out[p.key] = act_lib.wrap_weight(p, qarray_lib.quantize(p.value, fmt, name=p.name),
                                           observer=self.act_observer)
          continue
        w, xs, sp = p.matrix(), x, None
        if any(p is q for q in scaled):
          w, xs, sp = w * s[:, None], x / s[None, :], s
        if self.clip and not (self.no_clip and re.fullmatch(self.no_clip, p.path)):
          w = awq_clip(w, xs, p.matrix_format(fmt), grid=self.clip_grid,
                       max_shrink=self.max_shrink, max_rows=self.max_rows,
                       calibration=p.rule.calibration)
        q = qarray_lib.quantize(p.from_matrix(w), p.leaf_format(fmt),
                                calibration=p.rule.calibration, name=p.name)
        out[p.key] = act_lib.wrap_weight(p, q, observer=self.act_observer, input_scale=sp)
    return out
