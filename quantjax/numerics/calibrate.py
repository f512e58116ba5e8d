"""Choosing scales and zero points: min-max, percentile clipping, MSE search.

Every method works per block (tensor, channel or group, from the format's
granularity) and returns block-shaped `(scale, zero_point)`; see
`blocks.block_view`. `Calibration` is the one range rule and `range_scales`
the one range estimator (min-max, percentile, MSE clip search), for weight
blocks here and for static activation ranges
(`methods.activations.ActObserver.range`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from quantjax.numerics import blocks as blocks_lib
from quantjax.numerics import llamacpp_types
from quantjax.numerics.formats import QuantFormat, resolve_format

__all__ = ["Calibration", "choose_scales", "calibrate_blocks", "range_scales", "block_scales",
           "sign_scales", "resolve_calibration", "auto_method", "RANGE_METHODS"]

METHODS = ("auto", "minmax", "percentile", "mse", "signed_max")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
  """How a range is chosen for each block: the range rule of weights' scales
  (`choose_scales`, defaults below) and of static activation ranges
  (`methods.activations.ActObserver.range`, defaults `ACT_RANGE`: min-max,
  percentile 99.99, grid 50, min_ratio 0.3); `range_scales` computes it.

  Attributes:
    method: "auto" (the default, `auto_method(fmt)`: "signed_max" for
      group-wise signed symmetric integer formats, where it measured better
      for RTN, GPTQ and AWQ at 3 and 4 bits on SmolLM2; "minmax" for every
      other format, including per-channel int8, where signed-max measured
      worse; see README.md's default comparison),
      "minmax" (the full range), "percentile" (clip at the given
      percentile of |x|, or of x at both ends for asymmetric formats) or "mse"
      (search `grid` clip ratios from 1 down to min_ratio of the min-max range
      for the least `norm`-error; the first least wins), or
      "signed_max" (signed symmetric integers only: the value of largest
      magnitude maps exactly to the code `qmin = -2^(b-1)`, so the scale
      carries that value's sign and all 2^b codes are in use; llama.cpp's
      rule for Q4_0/Q5_0, finer by a factor qmax/|qmin| than max|x|/qmax).
    percentile: for "percentile", in (0, 100].
    grid: number of clip ratios tried by "mse".
    min_ratio: smallest clip ratio tried by "mse".
    norm: error exponent for "mse" (2 = mean squared error; GPTQ's reference
      search uses 2.4).
  """

  method: str = "auto"
  percentile: float = 99.9
  grid: int = 100
  min_ratio: float = 0.2
  norm: float = 2.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"calibration method {self.method!r} is not one of {METHODS}")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
    if self.grid < 1:
      raise ValueError(f"grid must be >= 1, got {self.grid}")
    if not 0.0 < self.min_ratio <= 1.0:
      raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio}")


def resolve_calibration(calibration: Any) -> Calibration:
  if isinstance(calibration, Calibration):
    return calibration
  if isinstance(calibration, str):
    return Calibration(method=calibration)
  if calibration is None:
    return Calibration()
  raise TypeError(f"calibration must be a Calibration or a method name, got {calibration!r}")


def _percentile(x: jax.Array, q: float, axes: tuple[int, ...]) -> jax.Array:
  keep = [a for a in range(x.ndim) if a not in axes]
  xt = jnp.transpose(x, keep + list(axes))
  flat = xt.reshape(xt.shape[:len(keep)] + (-1,))
  p = jnp.percentile(flat.astype(jnp.float32), q, axis=-1)
  out_shape = [1 if a in axes else x.shape[a] for a in range(x.ndim)]
  return p.reshape(out_shape)


RANGE_METHODS = ("minmax", "percentile", "mse")


def range_scales(x: jax.Array, axes: tuple[int, ...], fmt: QuantFormat, cal: Calibration,
                 lo: jax.Array | None = None, hi: jax.Array | None = None):
  """Block-shaped `(scale, zero_point)` by a range rule: the range estimator.

  The one implementation of "minmax", "percentile" and "mse" (`RANGE_METHODS`)
  for weight blocks (`calibrate_blocks`) and activation observers
  (`activations.ActObserver.finalize`).

  Args:
    x: values, block-shaped: `cal.percentile` is taken of them over `axes`
      (of |x|, or of x at both ends for formats with a zero point) and "mse"
      measures its error on them.
    axes: the axes of `x` that one block spans.
    fmt: the format.
    cal: the rule; `cal.method` one of `RANGE_METHODS`.
    lo, hi: the min-max range, `x` reduced over `axes` with keepdims
      (default: that of `x`; an observer passes the range of all it saw, `x`
      being a sample). "minmax" uses it, "mse" searches `cal.grid` clip ratios
      from 1 down to `cal.min_ratio` of it (the first least `cal.norm`-error
      wins), "percentile" at 100 is "minmax".
  """
  if cal.method not in RANGE_METHODS:
    raise ValueError(f"range method {cal.method!r} is not one of {RANGE_METHODS}")
  x = x.astype(jnp.float32)
  if lo is None or hi is None:
    lo = jnp.min(x, axis=axes, keepdims=True)
    hi = jnp.max(x, axis=axes, keepdims=True)
  if cal.method == "percentile" and cal.percentile < 100.0:
    if fmt.has_zero_point:
      lo, hi = _percentile(x, 100.0 - cal.percentile, axes), _percentile(x, cal.percentile, axes)
    else:
      amax = _percentile(jnp.abs(x), cal.percentile, axes)
      lo, hi = -amax, amax
  if cal.method != "mse":
    return blocks_lib.scale_from_range(fmt, lo, hi)

  search_fmt = fmt.replace(rounding="nearest_even") if fmt.rounding == "stochastic" else fmt
  ratios = jnp.linspace(1.0, cal.min_ratio, cal.grid)

  def err_for(r):
    s, z = blocks_lib.scale_from_range(fmt, lo * r, hi * r)
    q = blocks_lib.encode(x, search_fmt, s, z)
    d = blocks_lib.decode(q, search_fmt, s, z)
    return jnp.sum(jnp.abs(d - x) ** cal.norm, axis=axes, keepdims=True), s, z

  e0, s0, z0 = err_for(ratios[0])

  def body(carry, r):
    best_e, best_s, best_z = carry
    e, s, z = err_for(r)
    better = e < best_e
    best_s = jnp.where(better, s, best_s)
    best_z = None if z is None else jnp.where(better, z, best_z)
    return (jnp.where(better, e, best_e), best_s, best_z), None

  (_, s, z), _ = jax.lax.scan(body, (e0, s0, z0), ratios[1:])
  return s, z


def calibrate_blocks(xb: jax.Array, axes: tuple[int, ...], fmt: QuantFormat,
                     calibration: Any = "auto"):
  """Block-shaped `(scale, zero_point)` for block-shaped `xb`: "auto" resolved
  (`auto_method`), "signed_max", else `range_scales`."""
  cal = resolve_calibration(calibration)
  if cal.method == "auto":
    cal = dataclasses.replace(cal, method=auto_method(fmt))
  if cal.method == "signed_max":
    return _signed_max_scale(xb, axes, fmt)
  return range_scales(xb, axes, fmt, cal)


def _signed_symmetric(fmt: QuantFormat) -> bool:
  return fmt.kind == "int" and fmt.symmetric and fmt.signed


def auto_method(fmt: QuantFormat) -> str:
  """The scale rule "auto" stands for: "signed_max" for group-wise signed
  symmetric integers (llama.cpp's Q4_0 rule; one more code in use), else "minmax".

  Measured on SmolLM2-135M (README.md, the default comparison; min-max -> signed-max
  perplexity): RTN W4 g64 16.08 -> 14.07, GPTQ W4 g64 12.67 -> 12.50, GPTQ W3
  g64 25.69 -> 16.32, AWQ W4 g64 13.33 -> 12.66; RTN W8 per channel 11.094 ->
  11.132 (worse: in a block of ~1,000 weights the other sign's extreme is
  often within half a step of the largest, and signed-max clamps it by up to
  one step).
  """
  return "signed_max" if _signed_symmetric(fmt) and fmt.granularity == "group" else "minmax"


def _signed_max_scale(xb: jax.Array, axes: tuple[int, ...], fmt: QuantFormat):
  if not _signed_symmetric(fmt):
    raise ValueError(f"calibration 'signed_max' needs a signed symmetric integer format, "
                     f"not {fmt.name}")
  x = xb.astype(jnp.float32)
  hi = jnp.max(x, axis=axes, keepdims=True)
  lo = jnp.min(x, axis=axes, keepdims=True)
  ext = jnp.where(-lo > hi, lo, hi)  # the signed value of largest magnitude
  raw = ext / fmt.qmin
  floor = blocks_lib.scale_floor(fmt.scale_dtype)
  scale = jnp.where(ext != 0, jnp.sign(raw) * jnp.maximum(jnp.abs(raw), floor), 1.0)
  scale = jnp.where(jnp.isnan(lo) | jnp.isnan(hi), jnp.nan, scale)  # NaN stays visible
  return scale.astype(fmt.scale_dtype), None


def sign_scales(xb: jax.Array, axes: tuple[int, ...], fmt: QuantFormat):
  """Closed-form scales for binary and ternary codes.

  Binary: alpha = mean|x| (the L2-optimal scale for sign(x), XNOR-Net).
  Ternary: Delta = 0.7 * mean|x|, alpha = mean of |x| over |x| > Delta (TWN).

  Returns `(scale, threshold)`, block-shaped; threshold is None for binary.

  References:
    Rastegari et al., XNOR-Net, ECCV 2016. Li & Liu, Ternary Weight Networks
    (TWN), 2016, arXiv:1605.04711.
  """
  a = jnp.abs(xb.astype(jnp.float32))
  n = 1
  for ax in axes:
    n *= a.shape[ax]
  mean_abs = _safe_mean(a, axes, float(n))
  if fmt.kind == "binary":
    # An all-zero block gets alpha = 0: its values decode to exactly 0.
    return mean_abs.astype(fmt.scale_dtype), None
  delta = 0.7 * mean_abs
  mask = a > delta
  cnt = jnp.sum(mask, axis=axes, keepdims=True).astype(jnp.float32)
  total = jnp.sum(jnp.where(mask, a, 0.0), axis=axes, keepdims=True)
  # a sum past float32's range (values near 3e38): average the pre-divided terms instead
  alpha = jnp.where(jnp.isinf(total),
                    jnp.sum(jnp.where(mask, a / jnp.maximum(cnt, 1), 0.0), axis=axes,
                            keepdims=True),
                    total / jnp.maximum(cnt, 1))
  alpha = jnp.where(cnt > 0, alpha, 0.0)
  alpha = jnp.where(jnp.isfinite(mean_abs), alpha, jnp.nan)  # NaN/Inf input stays visible
  return alpha.astype(fmt.scale_dtype), delta


def _safe_mean(a: jax.Array, axes: tuple[int, ...], n: float) -> jax.Array:
  """`mean(a)` over `axes` that does not overflow when the sum passes float32's max."""
  total = jnp.sum(a, axis=axes, keepdims=True)
  return jnp.where(jnp.isinf(total), jnp.sum(a * (1.0 / n), axis=axes, keepdims=True), total / n)


def block_scales(xb: jax.Array, axes: tuple[int, ...], fmt: QuantFormat,
                 calibration: Any = "auto"):
  """Block-shaped `(scale, zero_point, threshold)` for any non-cast format.

  Binary and ternary use their closed-form scales (`sign_scales`; `threshold`
  is TWN's Delta for ternary); IQ4_NL and Q2_0 / TQ2_0 under "auto" llama.cpp's
  scale search, TQ1_0 under "auto" the exact least-squares ternary scale
  (`llamacpp_types.search_scales`); every other kind
  `calibrate_blocks`. `qarray.quantize`, `choose_scales` and `fake_quant` all
  take their scales from here.
  """
  if llamacpp_types.searches(fmt, calibration):
    return llamacpp_types.search_scales(xb, axes, fmt), None, None
  if fmt.kind in ("binary", "ternary"):
    s, threshold = sign_scales(xb, axes, fmt)
    return s, None, threshold
  s, z = calibrate_blocks(xb, axes, fmt, calibration)
  return s, z, None


def choose_scales(x: jax.Array, fmt: QuantFormat, calibration: Any = "auto"):
  """The scale search: stored-shape `(scale, zero_point)` for `x` in `fmt` by the
  `calibration` rule (see `QArray` for the layout). Not to be confused with
  `quantjax.calibrate`, the calibrated-method driver."""
  fmt = resolve_format(fmt)
  xb, axes = blocks_lib.block_view(jnp.asarray(x), fmt)
  s, z, _ = block_scales(xb, axes, fmt, calibration)
  shape = tuple(jnp.shape(x))
  return (blocks_lib.stored_scale(s, shape, fmt),
          None if z is None else blocks_lib.stored_scale(z, shape, fmt))
