"""SignRound: learned rounding and clipping by signed gradient descent, block by block.

Round-to-nearest rounds every weight on its own. SignRound learns, for each
weight matrix `W` `[K, N]` (contraction axis first), an offset `V` in
`[-0.5, 0.5]` per weight that is added before rounding, and two clipping
factors `alpha`, `beta` in `[min_clip, 1]` per scale block (group, channel or
tensor) that shrink the block's maximum and minimum before its scale (and
zero point) is computed:

    lo, hi  = beta * min(block), alpha * max(block)
    s, z    = the format's own scale rule on [lo, hi]
    q       = clip(round(W / s + V) [+ z], qmin, qmax)
    Q       = decode(q, s, z)

The objective (`SignRound`, the calibrated method) is block-wise, as in the
paper and Intel's AutoRound, but found in the user's own traced program
without model names: the capture driver hands over, for each group of weights
that read one input (q/k/v; o; gate/up; down), the program from the group's
first matmul to the next group boundary (`capture.Block`: through attention
and its softmax, norms, activations and residual adds), its inputs from the
already-quantized prefix and the float model's values at that boundary (the
float span on the float model's inputs, AutoRound's target). The group's
`V`, `alpha`, `beta` are learned jointly to minimise the mean over the values
there that depend on the group of `|out - float|^2 / |float|^2`, one
calibration batch per step (cycling), by signed gradient descent
(`p <- p - lr_t * sign(grad)`, `lr_t` decayed linearly from `lr` = 1/iters
to 0) with a straight-through estimator for every rounding (codes, zero
point, the scale's storage dtype). The step kept is the one whose loss,
relative to round-to-nearest's on the same batch, was lowest; if it is not
below round-to-nearest's on all batches together, round-to-nearest is kept.
The last group's objective is its own matmul outputs. One jitted loop per
span structure: identical layers share it.

Why one group at a time rather than a whole decoder layer: the cost of a step
is the span's forward and backward, so fitting the four groups of a layer
costs about what one layer-wide fit costs for the same number of steps, while
each group's target is the float model at its own boundary (the error of the
groups before it is compensated where it arises) and no notion of "layer" is
needed.

Measured on SmolLM2-135M (perplexity vs FP32 on pydoc text, 8 calibration
windows of 512 tokens, one per batch, every `*_proj` kernel; shared 2-core
CPU under other jobs' load):

    python -m experiments.main \\
        --config=configs/rounding.py:fp32,signround_w4_g64,signround_w3_g64 \\
        --workdir=runs/rounding

W4 g64, 80 steps per group: +6.22% in 406 s at a load of 2-5 (557 s at 5-7);
Intel's AutoRound, 200 steps: +6.26% in 1,554 s; GPTQ act-order +11.56%; the
old per-layer objective +15.2%. W3 g64: +29.2% at 80 steps (556 s), +26.3% at
200 steps (`--config.quantize.iters=200`, 1,049 s); GPTQ act-order +55.0%.

`signround_quantize(w, h, fmt)` is the one-matrix form on a layer's input
Hessian (`tr(E^T H E) / tr(W^T H W)`, all rows every step), for callers that
hold a weight and its Hessian but no program; the method does not use it (on
SmolLM2 it reached +15.2% at W4 g64, behind GPTQ).

The result is an ordinary QArray of the rule's format: the same codes,
scale and zero-point dtypes and layouts as `qarray.quantize` gives, the same
decode; only which codes (and which scales) differ. GGUF block formats (q4_0,
q4_1, q5_0, q8_0) keep their own scale math (q4_0's signed `d = ext / -8`,
q4_1's float minimum) and export code for code.

References:
  Cheng, Zhang, Shen, Guo, Luo, Liu, Lv. Optimize Weight Rounding via Signed
  Gradient Descent for the Quantization of LLMs (SignRound), 2023,
  arXiv:2309.05516.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.methods import activations as act_lib
from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat, resolve_format
from quantjax.numerics.qarray import QArray

__all__ = ["SignRound", "SignRoundResult", "signround_quantize"]

# Amplitude of the random start of the offsets when a seed is given.
_JITTER = 0.25
_HIGHEST = jax.lax.Precision.HIGHEST


class SignRoundResult(NamedTuple):
  """`qarray`: the quantized weight; `loss_init` / `loss`: the normalised layer output
  error `tr(E^T H E) / tr(W^T H W)` at the start and of the result; `best_iter`: the
  iteration whose parameters were kept (0: the start)."""

  qarray: QArray
  loss_init: float
  loss: float
  best_iter: int


# ----------------------------------------------------------------------------
# The format's math, differentiable (straight-through where it rounds).
# ----------------------------------------------------------------------------

def _ste(x: jax.Array, y: jax.Array) -> jax.Array:
  """`y`'s value with `x`'s gradient."""
  return x + jax.lax.stop_gradient(y - x)


def _stored(s: jax.Array, fmt: QuantFormat) -> jax.Array:
  """`s` rounded to the format's scale dtype (straight through)."""
  return _ste(s, s.astype(fmt.scale_dtype).astype(jnp.float32))


def _scale_rule(fmt: QuantFormat, calibration: Any) -> tuple[str, calibrate_lib.Calibration]:
  """`(rule, cal)`: "signed_max" or "max" (the formula that maps a clipped range to a
  scale) and the resolved calibration."""
  cal = calibrate_lib.resolve_calibration(calibration)
  method = calibrate_lib.auto_method(fmt) if cal.method == "auto" else cal.method
  if method == "signed_max":
    if not (fmt.kind == "int" and fmt.symmetric and fmt.signed):
      raise ValueError(f"calibration 'signed_max' needs a signed symmetric integer format, "
                       f"not {fmt.name}")
    return "signed_max", cal
  return "max", dataclasses.replace(cal, method=method)


def _scale_zero(lo: jax.Array, hi: jax.Array, fmt: QuantFormat, rule: str):
  """Block scale (float32, already rounded to `fmt.scale_dtype`) and zero point (float32:
  integer values, or the float minimum) for the clipped range `[lo, hi]`: the math of
  `qarray.scale_from_range` and of the signed-max rule, with straight-through rounding."""
  floor = qarray_lib.scale_floor(fmt.scale_dtype)
  if fmt.has_zero_point:
    n = float(fmt.qmax - fmt.qmin)
    if fmt.zero_point == "float":
      span = (hi - lo) / n
      s = _stored(jnp.where(span > 0, jnp.maximum(span, floor), 1.0), fmt)
      return s, _stored(lo, fmt)
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    span = (hi - lo) / n
    s = _stored(jnp.where(span > 0, jnp.maximum(span, floor), 1.0), fmt)
    z = fmt.qmin - lo / s
    return s, jnp.clip(_ste(z, jnp.round(z)), fmt.qmin, fmt.qmax)
  if rule == "signed_max":
    ext = jnp.where(-lo > hi, lo, hi)  # the signed value of largest magnitude
    raw = ext / fmt.qmin
    s = jnp.where(ext != 0, jnp.sign(raw) * jnp.maximum(jnp.abs(raw), floor), 1.0)
    return _stored(s, fmt), None
  amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if fmt.signed else jnp.maximum(hi, 0.0)
  s = jnp.where(amax > 0, jnp.maximum(amax / fmt.max_representable, floor), 1.0)
  return _stored(s, fmt), None


def _unrounded(xb: jax.Array, s: jax.Array, z: jax.Array | None, fmt: QuantFormat):
  """What `qarray.encode` rounds: `W / s`, `(W - m) / s` or `W / s + z`."""
  if not fmt.has_zero_point:
    return xb / s
  if fmt.zero_point == "float":
    return (xb - z) / s
  return xb / s + z


def _codes(xb: jax.Array, v: jax.Array, s: jax.Array, z: jax.Array | None,
           fmt: QuantFormat) -> jax.Array:
  """Float32 codes `clip(round(u + V))`, `u` what `qarray.encode` rounds."""
  r = _unrounded(xb, s, z, fmt) + v
  return jnp.clip(_ste(r, jnp.round(r)), fmt.qmin, fmt.qmax)


def _decode(q: jax.Array, s: jax.Array, z: jax.Array | None, fmt: QuantFormat) -> jax.Array:
  """`qarray.decode` for integer formats."""
  if not fmt.has_zero_point:
    return q * s
  if fmt.zero_point == "float":
    return z + q * s
  return (q - z) * s


@jax.custom_vjp
def _quad(e: jax.Array, h: jax.Array) -> jax.Array:
  """`tr(E^T H E)` for a symmetric `H`; its gradient `2 H E` costs no second product."""
  return jnp.sum(e * jnp.dot(h, e, precision=_HIGHEST))


def _quad_fwd(e, h):
  he = jnp.dot(h, e, precision=_HIGHEST)
  return jnp.sum(e * he), (he, h)


def _quad_bwd(res, g):
  he, h = res
  return 2.0 * g * he, jnp.zeros_like(h)


_quad.defvjp(_quad_fwd, _quad_bwd)


def _dequant(xb, lo, hi, v, a, b, fmt, rule):
  s, z = _scale_zero(lo * b, hi * a, fmt, rule)
  q = _codes(xb, v, s, z, fmt)
  return q, s, z, _decode(q, s, z, fmt)


# ----------------------------------------------------------------------------
# The optimisation: one compiled loop per (shapes, format, rule, iterations).
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("fmt", "rule", "iters"))
def _optimize(xb, h, lo, hi, v0, a0, b0, lr, min_clip, *, fmt, rule, iters):
  """Signed gradient descent on `(V, alpha, beta)`; keeps the best.

  Returns `(v, alpha, beta, best_loss, best_iter, loss_init, first_bad)`;
  `first_bad` is the first iteration whose loss was NaN/Inf (-1: none).
  """
  k = h.shape[0]
  n = xb.size // k
  w2 = xb.reshape(k, n)
  denom = jnp.sum(w2 * jnp.dot(h, w2, precision=_HIGHEST))
  # tr(W^T H W) > 0 unless W or H is zero (then the loss is 0 anyway); NaN stays NaN.
  denom = jnp.where(denom > 0, denom, jnp.where(jnp.isnan(denom), denom, 1.0))

  def loss_fn(v, a, b):
    _, _, _, dq = _dequant(xb, lo, hi, v, a, b, fmt, rule)
    return _quad((xb - dq).reshape(k, n), h) / denom

  value_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))

  def body(t, c):
    v, a, b, bv, ba, bb, best, best_t, bad, loss0 = c
    loss, (gv, ga, gb) = value_and_grad(v, a, b)
    bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), t, bad)
    better = loss < best
    bv, ba, bb = (jnp.where(better, x, y) for x, y in ((v, bv), (a, ba), (b, bb)))
    best = jnp.where(better, loss, best)
    best_t = jnp.where(better, t, best_t)
    loss0 = jnp.where(t == 0, loss, loss0)
    step = lr * (1.0 - t.astype(jnp.float32) / iters)  # linear decay to 0
    v = jnp.clip(v - step * jnp.sign(gv), -0.5, 0.5)
    a = jnp.clip(a - step * jnp.sign(ga), min_clip, 1.0)
    b = jnp.clip(b - step * jnp.sign(gb), min_clip, 1.0)
    return v, a, b, bv, ba, bb, best, best_t, bad, loss0

  inf = jnp.asarray(jnp.inf, jnp.float32)
  c = (v0, a0, b0, v0, a0, b0, inf, jnp.int32(0), jnp.int32(-1), jnp.float32(jnp.nan))
  if iters:
    c = jax.lax.fori_loop(0, iters, body, c)
  v, a, b, bv, ba, bb, best, best_t, bad, loss0 = c
  last = loss_fn(v, a, b)  # the parameters after the last step
  bad = jnp.where((bad < 0) & ~jnp.isfinite(last), iters, bad)
  better = last < best
  bv, ba, bb = (jnp.where(better, x, y) for x, y in ((v, bv), (a, ba), (b, bb)))
  best_t = jnp.where(better, iters, best_t)
  best = jnp.where(better, last, best)
  if not iters:
    loss0 = last
  return bv, ba, bb, best, best_t, loss0, bad


@functools.partial(jax.jit, static_argnames=("fmt", "rule"))
def _final(xb, lo, hi, v, a, b, *, fmt, rule):
  q, s, z, _ = _dequant(xb, lo, hi, v, a, b, fmt, rule)
  return q, s, z


# ----------------------------------------------------------------------------
# One weight.
# ----------------------------------------------------------------------------

def _check_format(fmt: QuantFormat, shape, name: str) -> None:
  if fmt.kind != "int":
    raise ValueError(
        f"SignRound {name}: format {fmt.name} (kind {fmt.kind!r}) is not supported; SignRound "
        "learns the rounding of integer formats (int4_g64, int3_g64_asym, int8, q4_0, q4_1, "
        "q5_0, q8_0, ...); fp16/bf16/fp8 pass through, nf4/binary/ternary use RTN, GPTQ or "
        "quantjax.methods.ternary")
  if len(shape) != 2:
    raise ValueError(f"SignRound {name}: expected a 2-D weight [K, N], got shape {tuple(shape)}")
  if fmt.granularity == "group":
    if fmt.group_axis % 2 != 0:
      raise ValueError(f"SignRound {name}: groups must run along the contraction axis "
                       f"(group_axis=0) of a [K, N] weight; got group_axis={fmt.group_axis}")
    if shape[0] % fmt.group_size:
      raise ValueError(f"SignRound {name}: group_size {fmt.group_size} does not divide the "
                       f"input dimension {shape[0]} (weight shape {tuple(shape)})")
  if fmt.granularity == "per_channel" and fmt.channel_axis % 2 != 1:
    raise ValueError(f"SignRound {name}: per-channel scales must be per output column "
                     f"(channel_axis=-1) of a [K, N] weight; got {fmt.channel_axis}")


def _base_range(xb, axes, fmt, cal):
  """The block ranges the clipping factors scale, and their starting values."""
  if cal.method == "percentile" and cal.percentile < 100.0:  # the range `quantize` clips to
    if fmt.has_zero_point:
      lo = jnp.percentile(xb, 100.0 - cal.percentile, axis=axes, keepdims=True)
      hi = jnp.percentile(xb, cal.percentile, axis=axes, keepdims=True)
    else:
      hi = jnp.percentile(jnp.abs(xb), cal.percentile, axis=axes, keepdims=True)
      lo = -hi
  else:
    lo = jnp.min(xb, axis=axes, keepdims=True)
    hi = jnp.max(xb, axis=axes, keepdims=True)
  ones = jnp.ones(lo.shape, jnp.float32)
  if cal.method != "mse":
    return lo, hi, ones
  # The MSE search shrinks both ends by one ratio per block: start there.
  s_mse, _ = calibrate_lib.calibrate_blocks(xb, axes, fmt, cal)
  s_full, _ = qarray_lib.scale_from_range(fmt, lo, hi)
  s_full = s_full.astype(jnp.float32)
  r = jnp.where(s_full > 0, s_mse.astype(jnp.float32) / jnp.where(s_full > 0, s_full, 1.0), 1.0)
  return lo, hi, jnp.minimum(r, 1.0)


def signround_quantize(w: jax.Array, h: Any, fmt: QuantFormat | str, *,
                       count: float | None = None, calibration: Any = "auto",
                       iters: int = 200, lr: float | None = None, min_clip: float = 0.5,
                       key: jax.Array | None = None,
                       name: str = "weight") -> SignRoundResult:
  """SignRound-quantizes one weight matrix.

  Args:
    w: `[K, N]` float weight (`y = x @ w`).
    h: `[K, K]` input Hessian `X^T X / n` (any positive multiple of it: the loss is
      normalised), or `X^T X` summed over `count` rows.
    fmt: an integer format with groups along K, per-output-channel or per-tensor
      scales, symmetric or asymmetric (integer or float zero point); GGUF's q4_0,
      q4_1, q5_0, q5_1, q8_0.
    count: rows summed in `h` (then `h / count` is the Hessian).
    calibration: the rule's scale rule ("auto", "minmax", "signed_max", "percentile",
      "mse" or a `Calibration`): the range the clipping factors start from (percentile:
      the clipped range; mse: the factors start at the ratio the MSE search picks).
    iters: signed gradient steps (0: the starting point, round-to-nearest).
    lr: the first step's size (default `1 / iters`, the paper's), decayed linearly to 0.
    min_clip: the smallest clipping factor (factors stay in `[min_clip, 1]`).
    key: when given, the offsets start at uniform noise of +-0.25 instead of 0.
    name: the weight's path, for messages.

  Returns:
    `SignRoundResult(qarray, loss_init, loss, best_iter)`; `qarray` is a plain QArray
    of `fmt`, laid out as `qarray.quantize(w, fmt)` lays it out.

  Raises:
    ValueError: an unsupported format or layout; NaN/Inf in the weight; a zero
      Hessian; a loss that becomes NaN/Inf (named with its iteration); scales that
      overflow the format's scale dtype. Each names `name`.
  """
  fmt = resolve_format(fmt)
  w = jnp.asarray(w)
  _check_format(fmt, w.shape, name)
  iters = int(iters)
  if iters < 0:
    raise ValueError(f"SignRound {name}: iters must be >= 0, got {iters}")
  if not 0.0 < float(min_clip) <= 1.0:
    raise ValueError(f"SignRound {name}: min_clip must be in (0, 1], got {min_clip}")
  lr = (1.0 / max(iters, 1)) if lr is None else float(lr)
  if not lr > 0:
    raise ValueError(f"SignRound {name}: lr must be > 0, got {lr}")
  qarray_lib.check_finite(w, f"{name} (SignRound weight)")
  qarray_lib.check_range_fits(w, fmt, f"{name} (SignRound)")
  k, n = w.shape
  hm = jnp.asarray(h, jnp.float32)
  if hm.shape != (k, k):
    raise ValueError(f"SignRound {name}: Hessian shape {tuple(hm.shape)} does not match the "
                     f"weight's input dimension {k} (weight shape {(k, n)})")
  if count is not None:
    hm = hm / jnp.float32(max(float(count), 1.0))
  if not bool(jnp.any(jnp.diagonal(hm) != 0)):
    raise ValueError(
        f"SignRound {name}: the Hessian is zero: no calibration rows reached this weight or "
        "its inputs are all zero; give it calibration data that exercises the layer, or "
        "quantize it round-to-nearest")
  rule, cal = _scale_rule(fmt, calibration)
  w32 = w.astype(jnp.float32)
  xb, axes = qarray_lib.block_view(w32, fmt)
  lo, hi, r0 = _base_range(xb, axes, fmt, cal)
  a0 = b0 = jnp.clip(r0, float(min_clip), 1.0)
  v0 = jnp.zeros(xb.shape, jnp.float32)
  if key is not None:
    v0 = jnp.clip(v0 + jax.random.uniform(key, v0.shape, jnp.float32, -_JITTER, _JITTER),
                  -0.5, 0.5)
  v, a, b, best, best_t, loss0, bad = _optimize(
      xb, hm, lo, hi, v0, a0, b0, jnp.float32(lr), jnp.float32(min_clip),
      fmt=fmt, rule=rule, iters=iters)
  bad = int(bad)
  if bad >= 0:
    what = "the Hessian holds NaN/Inf" if not bool(jnp.all(jnp.isfinite(hm))) else (
        "values overflow float32")
    raise ValueError(f"SignRound {name}: the layer loss became NaN/Inf at iteration {bad} of "
                     f"{iters} ({what}); nothing was quantized")
  qa = _to_qarray(w, xb, lo, hi, v, a, b, fmt, rule, name)
  return SignRoundResult(qa, float(loss0), float(best), int(best_t))


def _to_qarray(w, xb, lo, hi, v, a, b, fmt, rule, name) -> QArray:
  """The QArray of `w` `[K, N]` with the learned offsets and clipping factors: the codes,
  scales and zero points `qarray.quantize` would store, laid out as it lays them out."""
  q, s, z = _final(xb, lo, hi, v, a, b, fmt=fmt, rule=rule)
  code_dtype = jnp.uint8 if (fmt.bits == 8 and not fmt.signed) else jnp.int8
  codes = q.reshape(w.shape).astype(code_dtype)
  scale = qarray_lib.stored_scale(s, w.shape, fmt).astype(fmt.scale_dtype)
  zp = None
  if z is not None:
    zdtype = fmt.scale_dtype if fmt.zero_point == "float" else (
        jnp.int8 if fmt.signed else jnp.uint8)
    zp = qarray_lib.stored_scale(z, w.shape, fmt).astype(zdtype)
  qa = QArray.from_codes(codes, fmt, scale, zp, dtype=w.dtype)
  qarray_lib.check_quantized(qa, f"{name} (SignRound)", np.asarray(w, np.float32),
                             warn_underflow=False)
  return qa


# ----------------------------------------------------------------------------
# The block objective: a group's weights fitted to the float model downstream.
# ----------------------------------------------------------------------------

class _Learned(NamedTuple):
  """What the compiled loop needs to know of one learned weight (static, hashable)."""

  fmt: QuantFormat
  rule: str
  slot: int  # its position among the block's weight inputs
  sizes: tuple[int, ...]  # the [K, N] matrix as the weight's (permuted) axes
  inv: tuple[int, ...]  # the permutation back to the weight's axes
  dtype: Any  # the weight input's dtype


class _Spec(NamedTuple):
  fn: Any  # the block's span (one object per structure)
  n_env: int
  outputs: tuple[int, ...]
  learned: tuple[_Learned, ...]
  iters: int


def _block_loss(spec: _Spec, params, fixed, b, env, targets, weights, consts, norms):
  """Mean over the compared outputs of `|out - float|^2 / |float|^2` on batch `b`, the
  group's weights replaced by their (straight-through) quantized values."""
  ws = list(weights)
  for (v, a, bb), (xb, lo, hi), d in zip(params, fixed, spec.learned):
    dq = _dequant(xb, lo, hi, v, a, bb, d.fmt, d.rule)[3]
    ws[d.slot] = jnp.transpose(dq.reshape(d.sizes), d.inv).astype(d.dtype)
  outs = spec.fn(*[x[b] for x in env], *ws, *consts)
  total = jnp.float32(0.0)
  for j, t, nrm in zip(spec.outputs, targets, norms):
    e = outs[j].astype(jnp.float32) - t[b].astype(jnp.float32)
    total = total + jnp.mean(e * e) / nrm
  return total / len(spec.outputs)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fit_block(params0, fixed, env, targets, weights, consts, lr, min_clip, *, spec: _Spec):
  """Signed gradient descent on every learned weight's `(V, alpha, beta)` against the
  block loss, one calibration batch per step (cycling), lr decayed linearly to 0.

  The step kept is the one with the lowest loss relative to the start's on the same batch;
  if on all batches together it is not below the start, the start is kept.
  Returns `(params, loss_init, loss, best_iter, first_bad)` (losses over all batches;
  `first_bad`: the first step whose loss was NaN/Inf, -1: none).
  """
  n_b = targets[0].shape[0]
  norms = [jnp.maximum(jnp.mean(jnp.square(t.astype(jnp.float32))), 1e-30) for t in targets]
  loss_b = functools.partial(_block_loss, spec)

  def over_batches(p):
    return jax.lax.map(lambda b: loss_b(p, fixed, b, env, targets, weights, consts, norms),
                       jnp.arange(n_b))
  init = over_batches(params0)
  bad0 = jnp.where(jnp.all(jnp.isfinite(init)), -1, 0).astype(jnp.int32)
  ref = jnp.where(init > 0, init, 1.0)
  vg = jax.value_and_grad(loss_b)
  iters = spec.iters

  def body(t, c):
    p, best_p, best, best_t, bad = c
    b = t % n_b
    loss, g = vg(p, fixed, b, env, targets, weights, consts, norms)
    bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), t, bad)
    ratio = loss / ref[b]
    better = ratio < best
    best_p = jax.tree.map(lambda x, y: jnp.where(better, x, y), p, best_p)
    best = jnp.where(better, ratio, best)
    best_t = jnp.where(better, t, best_t)
    step = lr * (1.0 - t.astype(jnp.float32) / iters)
    new = []
    for (v, a, bb), (gv, ga, gb) in zip(p, g):
      new.append((jnp.clip(v - step * jnp.sign(gv), -0.5, 0.5),
                  jnp.clip(a - step * jnp.sign(ga), min_clip, 1.0),
                  jnp.clip(bb - step * jnp.sign(gb), min_clip, 1.0)))
    return tuple(new), best_p, best, best_t, bad

  c = (params0, params0, jnp.float32(1.0), jnp.int32(0), bad0)
  if iters:
    c = jax.lax.fori_loop(0, iters, body, c)
  _, best_p, _, best_t, bad = c
  final = over_batches(best_p)
  keep = jnp.mean(final) < jnp.mean(init)
  best_p = jax.tree.map(lambda x, y: jnp.where(keep, x, y), best_p, params0)
  best_t = jnp.where(keep, best_t, 0)
  return (best_p, jnp.mean(init), jnp.where(keep, jnp.mean(final), jnp.mean(init)), best_t,
          bad)


# ----------------------------------------------------------------------------
# The calibrated method.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SignRound:
  """SignRound for the calibration driver (`capture.calibrate`, sequential mode).

  The driver hands each group of weights that share an input (q/k/v, gate/up, ...)
  with its `capture.Block`: the user's traced program from the group's first matmul
  to the next group boundary (through attention, norms, activations, residual adds),
  its inputs from the already-quantized prefix, and the float model's values at that
  boundary (the float span on the float model's inputs, as AutoRound's target). The
  group's offsets and clipping factors are learned jointly to minimise the relative
  squared error of the values there that depend on the group (for the last group: its
  own matmul outputs). The result is a QArray in the rule's format placed on the
  weight's own axes (`Part.leaf_format`). Cast formats (fp16, bf16) and FP8 pass
  through as round-to-nearest; NF4, binary and ternary are refused, naming the weight.

  Attributes:
    iters: signed gradient steps per group, one calibration batch each (cycling over
      the batches: the batches are the mini-batches).
    lr: the first step's size (None: `1 / iters`, the paper's), decayed linearly to 0.
    min_clip: the smallest clipping factor.
    seed: None (the default): the offsets start at 0 (round-to-nearest; nothing is
      random); an int: at uniform noise of +-0.25, drawn per weight from this seed and
      the weight's name.
    act_observer: static activation ranges for rules with an `act_format`
      (see `activations.wrap_weight`); None keeps them dynamic.

  `record["signround_loss"][name]` = `{"init", "final", "best_iter"}` per weight: the
  block loss (mean over the calibration batches) of round-to-nearest and of the result.
  """

  iters: int = 200
  lr: float | None = None
  min_clip: float = 0.5
  seed: int | None = None
  act_observer: Any = None
  label: ClassVar[str] = "SignRound"
  wants_block: ClassVar[bool] = True

  def __post_init__(self):
    if int(self.iters) < 0:
      raise ValueError(f"SignRound: iters must be >= 0, got {self.iters}")
    if self.lr is not None and not float(self.lr) > 0:
      raise ValueError(f"SignRound: lr must be > 0, got {self.lr}")
    if not 0.0 < float(self.min_clip) <= 1.0:
      raise ValueError(f"SignRound: min_clip must be in (0, 1], got {self.min_clip}")

  rule_type: ClassVar[type] = rules_lib.QuantRule

  @property
  def needs(self) -> frozenset:
    return frozenset() | act_lib.observer_needs(self.act_observer)

  def apply(self, parts, record) -> dict:
    losses = record.setdefault("signround_loss", {})
    blocks: dict[int, tuple[Any, list]] = {}
    for p in parts:
      if p.block is None:
        raise ValueError(f"SignRound {p.name}: no block objective was handed over (SignRound "
                         "runs inside capture.calibrate in sequential mode)")
      blocks.setdefault(id(p.block), (p.block, []))[1].append(p)
    out = {}
    for blk, ps in blocks.values():
      out.update(self._fit(blk, ps, losses))
    return {p.key: act_lib.wrap_weight(p, out[p.key], observer=self.act_observer)
            for p in parts}

  def _fit(self, blk, ps, losses) -> dict:
    out: dict = {}
    weights = list(blk.weights)
    learned, params0, fixed, meta = [], [], [], []
    for p in ps:
      fmt = resolve_format(p.rule.format)
      slot = blk.slot[p.key]
      if fmt.is_cast or fmt.kind in ("fp8_e4m3", "fp8_e5m2"):
        q = qarray_lib.quantize(p.value, p.leaf_format(fmt), calibration=p.rule.calibration,
                                name=p.name)
        out[p.key] = q
        weights[slot] = jnp.asarray(q.dequantize()).astype(weights[slot].dtype)
        continue
      if fmt.kind != "int":
        _check_format(fmt, (1, 1), p.name)  # raises, naming the weight and format
      mfmt = p.matrix_format(fmt)
      w = p.matrix()
      _check_format(mfmt, w.shape, p.name)
      qarray_lib.check_finite(w, f"{p.name} (SignRound weight)")
      qarray_lib.check_range_fits(w, mfmt, f"{p.name} (SignRound)")
      if tuple(weights[slot].shape) != tuple(p.layout.shape):
        raise ValueError(f"SignRound {p.name}: the block reads it with shape "
                         f"{tuple(weights[slot].shape)}, its layout is {p.layout.shape}")
      rule, cal = _scale_rule(mfmt, p.rule.calibration)
      xb, axes = qarray_lib.block_view(w, mfmt)
      lo, hi, r0 = _base_range(xb, axes, mfmt, cal)
      a0 = jnp.clip(r0, float(self.min_clip), 1.0)
      v0 = jnp.zeros(xb.shape, jnp.float32)
      if self.seed is not None:
        key = jax.random.fold_in(jax.random.key(int(self.seed)),
                                 zlib.crc32(p.name.encode()) & 0x7FFFFFFF)
        v0 = jnp.clip(jax.random.uniform(key, v0.shape, jnp.float32, -_JITTER, _JITTER),
                      -0.5, 0.5)
      perm = tuple(p.layout.contract) + tuple(p.layout.free)
      learned.append(_Learned(mfmt, rule, slot, tuple(p.layout.shape[a] for a in perm),
                              tuple(int(i) for i in np.argsort(perm)),
                              jnp.dtype(weights[slot].dtype)))
      params0.append((v0, a0, a0))
      fixed.append((xb, lo, hi))
      meta.append((p, w))
    if not learned:
      return out
    iters = int(self.iters) if blk.outputs else 0
    params, loss0, loss, best_t, bad = params0, float("nan"), float("nan"), 0, -1
    if blk.outputs:
      lr = (1.0 / max(iters, 1)) if self.lr is None else float(self.lr)
      spec = _Spec(blk.fn, len(blk.env), tuple(blk.outputs), tuple(learned), iters)
      params, loss0, loss, best_t, bad = _fit_block(
          tuple(params0), tuple(fixed), list(blk.env), list(blk.targets), weights,
          list(blk.consts), jnp.float32(lr), jnp.float32(self.min_clip), spec=spec)
      bad = int(bad)
      if bad >= 0:
        what = ("the float model's values at the block's end hold NaN/Inf"
                if not all(bool(jnp.all(jnp.isfinite(t))) for t in blk.targets)
                else "the block's values overflow float32")
        raise ValueError(f"SignRound block [{blk.name}]: the block loss became NaN/Inf at "
                         f"iteration {bad} of {iters} ({what}); nothing was quantized")
      loss0, loss, best_t = float(loss0), float(loss), int(best_t)
    for (p, w), d, (v, a, b), (xb, lo, hi) in zip(meta, learned, params, fixed):
      qa = _to_qarray(w, xb, lo, hi, v, a, b, d.fmt, d.rule, p.name)
      out[p.key] = p.qarray_from_matrix(qa)
      losses[p.name] = {"init": loss0, "final": loss, "best_iter": best_t}
    return out
