"""Fake quantization for training: quantize-dequantize with useful gradients.

`fake_quant(x, fmt)` returns `dequantize(quantize(x))` in the forward pass and
passes the gradient straight through (STE) inside the clipping range, zero
outside it. `lsq_fake_quant(x, step, fmt)` also learns the step size, with
LSQ's gradient for the step.

References:
  Bengio, Leonard & Courville, "Estimating or Propagating Gradients Through
  Stochastic Neurons", 2013 (straight-through estimator).
  Esser et al., "Learned Step Size Quantization", ICLR 2020 (LSQ).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import CODEBOOK_KINDS, QuantFormat, resolve_format

__all__ = ["round_ste", "fake_quant", "lsq_fake_quant", "lsq_init_step"]


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
  """Round half to even; gradient 1 (straight-through)."""
  return jnp.round(x)


def _round_fwd(x):
  return jnp.round(x), None


def _round_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_fwd, _round_bwd)


def _qdq(x: jax.Array, fmt: QuantFormat, calibration: Any) -> tuple[jax.Array, jax.Array]:
  """Quantize-dequantize and a mask of values inside the representable range."""
  xb, axes = qarray_lib.block_view(x, fmt)
  xb32 = xb.astype(jnp.float32)
  if fmt.is_cast:
    return x.astype(fmt.code_dtype).astype(x.dtype), jnp.ones(x.shape, bool)
  s, z, threshold = calibrate_lib.block_scales(xb32, axes, fmt, calibration)
  codes = qarray_lib.encode(xb32, fmt, s, z, threshold_b=threshold)
  d = qarray_lib.decode(codes, fmt, s, z)
  # Inside the range: the values the extreme codes decode to.
  lo_code = {"binary": -1, "ternary": -1}.get(fmt.kind)
  if fmt.kind == "int":
    a = qarray_lib.decode(jnp.full((), fmt.qmin), fmt, s, z)
    b = qarray_lib.decode(jnp.full((), fmt.qmax), fmt, s, z)
    half = 0.5 * jnp.abs(s)  # signed-max scales carry the sign of the extreme value
    inside = (xb32 >= jnp.minimum(a, b) - half) & (xb32 <= jnp.maximum(a, b) + half)
  elif lo_code is not None:
    inside = jnp.abs(xb32) <= 1.5 * jnp.abs(s.astype(jnp.float32))
  elif fmt.kind in CODEBOOK_KINDS:
    # Levels times a scale that may be negative (IQ4_NL, Q2_0: signed scales).
    lv = np.asarray(fmt.levels, np.float32)
    a, b = lv.min() * s.astype(jnp.float32), lv.max() * s.astype(jnp.float32)
    inside = (xb32 >= jnp.minimum(a, b)) & (xb32 <= jnp.maximum(a, b))
  else:
    m = fmt.max_representable if fmt.kind != "nf4" else 1.0
    inside = jnp.abs(xb32) <= m * s.astype(jnp.float32)
  return d.reshape(x.shape).astype(x.dtype), inside.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant(x: jax.Array, fmt: QuantFormat, calibration: Any = "auto") -> jax.Array:
  """`dequantize(quantize(x, fmt))` with a straight-through gradient.

  The gradient w.r.t. `x` is passed unchanged for values inside the
  format's clipping range and zeroed outside it (clipped STE). Scales are
  recomputed from `x` each call (treated as constants); use
  `lsq_fake_quant` to learn them.
  """
  return _qdq(x, resolve_format(fmt), calibration)[0]


def _fq_fwd(x, fmt, calibration):
  d, inside = _qdq(x, resolve_format(fmt), calibration)
  return d, inside


def _fq_bwd(fmt, calibration, inside, g):
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


fake_quant.defvjp(_fq_fwd, _fq_bwd)


def lsq_init_step(x: jax.Array, fmt: QuantFormat | str) -> jax.Array:
  """LSQ's initial step per block: 2 * mean|x| / sqrt(Qp), stored scale shape."""
  fmt = resolve_format(fmt)
  _check_lsq_format(fmt)
  xb, axes = qarray_lib.block_view(jnp.asarray(x), fmt)
  step = 2.0 * jnp.mean(jnp.abs(xb.astype(jnp.float32)), axis=axes, keepdims=True)
  step = step / math.sqrt(fmt.qmax)
  step = jnp.where(step > 0, step, 1e-8)
  return qarray_lib.stored_scale(step, tuple(x.shape), fmt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_grad(x: jax.Array, factor: float) -> jax.Array:
  return x


def _scale_grad_fwd(x, factor):
  return x, None


def _scale_grad_bwd(factor, _, g):
  return (g * factor,)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _check_lsq_format(fmt: QuantFormat) -> None:
  if fmt.kind != "int" or not fmt.symmetric:
    raise ValueError(f"LSQ here learns symmetric integer step sizes; got format {fmt}")


def lsq_fake_quant(x: jax.Array, step: jax.Array, fmt: QuantFormat | str) -> jax.Array:
  """Fake quantization with a learnable step size (LSQ).

  Forward: `clip(round(x / step), qmin, qmax) * step`. Backward: STE for `x`
  inside the range; for `step`, `(round(v) - v)` inside, `qmin`/`qmax` at the
  clipped ends, summed per block and scaled by `1 / sqrt(N * qmax)` as in the
  paper (N values share the step).

  Args:
    x: values (weights or activations).
    step: step sizes in the format's stored scale shape (see
      `lsq_init_step`).
    fmt: a symmetric integer format.
  """
  fmt = resolve_format(fmt)
  _check_lsq_format(fmt)
  shape = tuple(x.shape)
  xb, axes = qarray_lib.block_view(x, fmt)
  sb = qarray_lib.block_scale(step, shape, fmt)
  n_per_block = math.prod(xb.shape[a] for a in axes) if axes else 1
  grad_scale = 1.0 / math.sqrt(n_per_block * fmt.qmax)
  s = _scale_grad(sb, grad_scale)  # value exactly sb, gradient times grad_scale
  v = xb / s
  v = jnp.clip(v, fmt.qmin, fmt.qmax)
  out = round_ste(v) * s
  return out.reshape(shape).astype(x.dtype)
