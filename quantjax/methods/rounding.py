"""SignRound: learned rounding and clipping by signed gradient descent.

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

The objective is the layer's output error on the calibration inputs,
`tr((W - Q)^T H (W - Q)) / tr(W^T H W)` with `H = X^T X / n` (the same
Hessian GPTQ reads), minimised by signed gradient descent
(`p <- p - lr_t * sign(grad)`, `lr_t` decayed linearly from `lr` to 0),
with a straight-through estimator for every rounding (codes, zero point, the
scale's storage dtype). The lowest loss seen is kept, so the result is never
worse on this objective than where it started (round-to-nearest with the
rule's scale rule).

The result is an ordinary QArray of the rule's format: the same codes,
scale and zero-point dtypes and layouts as `qarray.quantize` gives, the same
decode; only which codes (and which scales) differ. GGUF block formats (q4_0,
q4_1, q5_0, q8_0) keep their own scale math (q4_0's signed `d = ext / -8`,
q4_1's float minimum) and export code for code.

Differences from the paper's implementation (Intel's AutoRound): the
objective here is per linear layer, through its input Hessian (exact, all
calibration rows in every step, one `K x K` by `K x N` product per step),
not the output of a whole decoder block on mini-batches; layers are still
quantized sequentially (each one's Hessian comes from the model with the
layers before it quantized). It is much cheaper, and it cannot compensate
across the layers of a block.

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
  qarray_lib.check_quantized(qa, f"{name} (SignRound)", np.asarray(w32), warn_underflow=False)
  return SignRoundResult(qa, float(loss0), float(best), int(best_t))


# ----------------------------------------------------------------------------
# The calibrated method.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SignRound:
  """SignRound for the calibration driver (`capture.calibrate`).

  Each selected weight is seen as its `[K, N]` matrix (contraction axes first)
  with the Hessian of its input; the result is a QArray in the rule's format
  placed on the weight's own axes (`Part.leaf_format`). Cast formats (fp16,
  bf16) and FP8 pass through as round-to-nearest; NF4, binary and ternary are
  refused, naming the weight.

  Attributes:
    iters, lr, min_clip: as in `signround_quantize`.
    seed: None (the default): the offsets start at 0 (the paper's start,
      round-to-nearest; nothing is random); an int: at uniform noise of +-0.25,
      drawn per weight from this seed and the weight's name.
    act_observer: static activation ranges for rules with an `act_format`
      (see `activations.wrap_weight`); None keeps them dynamic.

  `record["signround_loss"][name]` = `{"init", "final", "best_iter"}` per weight.
  """

  iters: int = 200
  lr: float | None = None
  min_clip: float = 0.5
  seed: int | None = None
  act_observer: Any = None
  label: ClassVar[str] = "SignRound"

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
    return frozenset({"hessian"}) | act_lib.observer_needs(self.act_observer)

  def apply(self, parts, record) -> dict:
    out = {}
    losses = record.setdefault("signround_loss", {})
    for i, p in enumerate(parts):
      fmt = resolve_format(p.rule.format)
      if fmt.is_cast or fmt.kind in ("fp8_e4m3", "fp8_e5m2"):
        q = qarray_lib.quantize(p.value, p.leaf_format(fmt), calibration=p.rule.calibration,
                                name=p.name)
      else:
        if fmt.kind != "int":
          _check_format(fmt, (1, 1), p.name)  # raises, naming the weight and format
        st = p.stats
        if st is None or st.xtx is None:
          raise ValueError(f"{p.name}: the Hessian was not collected")
        key = None
        if self.seed is not None:
          key = jax.random.fold_in(jax.random.key(int(self.seed)),
                                   zlib.crc32(p.name.encode()) & 0x7FFFFFFF)
        res = signround_quantize(
            p.matrix(), st.xtx, p.matrix_format(fmt), count=st.count,
            calibration=p.rule.calibration, iters=self.iters, lr=self.lr,
            min_clip=self.min_clip, key=key, name=p.name)
        if not any(q.stats is st for q in parts[i + 1:]):
          st.xtx = None  # the driver keeps no other reference to a finished source's stats
        del st
        q = p.qarray_from_matrix(res.qarray)
        losses[p.name] = {"init": res.loss_init, "final": res.loss, "best_iter": res.best_iter}
      out[p.key] = act_lib.wrap_weight(p, q, observer=self.act_observer)
    return out
