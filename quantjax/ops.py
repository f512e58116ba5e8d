"""The one entry point for matmuls whose weight may be a `QArray`.

`qdot(x, w)` computes `x @ w` for a weight stored as `[in, out]` (Flax's
convention) or, with `contract_axis=1`, as `[out, in]` (an embedding table
used as a tied output head, or PyTorch's layout). The weight can be a plain
array or a `QArray`. This module holds the XLA reference path: dequantize then
`dot_general`, or for W8A8 an int8 x int8 -> int32 `dot_general` with the
scales applied after. Pallas kernels plug in behind the same call
(`quantjax.kernels`), so model code never changes. The weight wrappers of
`numerics.qarray` (`ActQuantized`, `StaticActQuantized`, `InputScaled`) are
data; their matmuls are computed here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from quantjax.kernels import cpu_matmul, dispatch
from quantjax.numerics import formats as formats_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import InputScaled, QArray, StaticActQuantized

__all__ = ["qdot", "qeinsum", "quantize_activation", "static_qdot"]


def _check_shapes(x: jax.Array, w_shape: tuple[int, ...], contract_axis: int) -> None:
  if len(w_shape) != 2:
    raise ValueError(f"qdot expects a 2-D weight, got shape {w_shape}")
  if contract_axis not in (0, 1):
    raise ValueError(f"contract_axis must be 0 ([in, out]) or 1 ([out, in]), got {contract_axis}")
  k = w_shape[contract_axis]
  if x.shape[-1] != k:
    raise ValueError(
        f"qdot: activation shape {tuple(x.shape)} does not contract with weight shape {w_shape} "
        f"(last dim {x.shape[-1]} vs contraction dim {k}, contract_axis={contract_axis})")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"qdot: activations must be floating point, got {x.dtype} "
                     f"(activation shape {tuple(x.shape)}, weight shape {w_shape})")


def quantize_activation(x: jax.Array, fmt: formats_lib.QuantFormat) -> QArray:
  """Dynamic (run-time) quantization of an activation `[..., k]`.

  The format's granularity decides the scale: `per_tensor` gives one scale,
  `per_channel` with `channel_axis=0` on a 2-D view means one scale per token.
  Here we always quantize per token (one scale per row of the flattened
  `[tokens, k]` view) when the format is per-channel, which is what W8A8
  inference uses.
  """
  x2 = x.reshape(-1, x.shape[-1])
  if fmt.granularity == "per_channel":
    fmt = fmt.replace(channel_axis=0)
  # Min-max scales (max|x| / 127 for int8), as vLLM's W8A8 kernels and our
  # compressed-tensors exports assume; "auto" (signed-max) is for weights.
  return qarray_lib.quantize(x2, fmt, calibration="minmax")


def _w8a8_dot(x: jax.Array, w: QArray, act_fmt: formats_lib.QuantFormat,
              contract_axis: int) -> jax.Array:
  """int8 x int8 -> int32 dot with per-token and per-output-channel scales."""
  wf = w.fmt
  out_axis = 1 - contract_axis
  if not (wf.kind == "int" and wf.bits == 8 and wf.symmetric and
          wf.granularity in ("per_channel", "per_tensor") and
          (wf.granularity == "per_tensor" or wf.channel_axis % 2 == out_axis)):
    raise ValueError(
        "W8A8 needs a symmetric int8 weight with per-tensor or per-output-channel scales; "
        f"got {wf}")
  if not (act_fmt.kind == "int" and act_fmt.bits == 8 and act_fmt.symmetric):
    raise ValueError(f"W8A8 needs a symmetric int8 activation format, got {act_fmt}")
  lead = x.shape[:-1]
  xq = quantize_activation(x, act_fmt)
  if contract_axis == 0:
    out = dispatch.quantized_matmul_w8a8(xq, w, out_dtype=x.dtype)
    if out is not None:
      return out.reshape(*lead, -1)
  xc = xq.codes()  # [t, k] int8
  wc = w.codes()  # [k, n] or [n, k] int8
  acc = jax.lax.dot_general(
      xc, wc, (((1,), (contract_axis,)), ((), ())),
      preferred_element_type=jnp.int32)
  x_scale = xq.scale.reshape(-1, 1) if xq.scale.size > 1 else xq.scale.reshape(())
  w_scale = w.scale.reshape(1, -1) if w.scale.size > 1 else w.scale.reshape(())
  out = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * w_scale.astype(jnp.float32)
  return out.astype(x.dtype).reshape(*lead, -1)


def qdot(x: jax.Array, w: Any, *, contract_axis: int = 0,
         act_format: formats_lib.QuantFormat | None = None,
         precision: Any = None) -> jax.Array:
  """`x @ w` where `w` may be a `QArray`.

  Args:
    x: activations `[..., k]`.
    w: weight `[k, n]` (contract_axis=0) or `[n, k]` (contract_axis=1); a
      `jax.Array`, a `QArray`, or one in a wrapper of `numerics.qarray`
      (`ActQuantized`, `StaticActQuantized`, `InputScaled`).
    contract_axis: which weight axis is contracted with `x`'s last axis.
    act_format: a `QuantFormat` or spec; if given, activations are quantized dynamically
      with it (W8A8 when both are int8), else the weight is dequantized to `x.dtype`.
    precision: passed to `dot_general` on the floating-point path.

  Returns:
    `[..., n]` in `x.dtype`.
  """
  if act_format is None and isinstance(w, InputScaled):
    return _input_scaled_dot(x, w, contract_axis=contract_axis, precision=precision)
  if act_format is None and isinstance(w, StaticActQuantized):
    return static_qdot(x, w, contract_axis=contract_axis, precision=precision)
  if isinstance(w, qarray_lib.ActQuantized):
    if act_format is None:
      act_format = w.act_format
    w = w.weight
  if act_format is not None:
    act_format = formats_lib.resolve_format(act_format)
  w_shape = tuple(w.shape)
  _check_shapes(x, w_shape, contract_axis)
  if isinstance(w, QArray):
    if act_format is not None and act_format.is_float_code:
      # FP8 activations (W8A8 FP8): quantize-dequantize the input per token / per
      # tensor, then the weight's own path (no FP8 x FP8 dot on CPU).
      xq = quantize_activation(x, act_format)
      x = xq.dequantize(dtype=x.dtype).reshape(x.shape)
      act_format = None
    if act_format is not None:
      return _w8a8_dot(x, w, act_format, contract_axis)
    out = dispatch.quantized_matmul(x, w, contract_axis=contract_axis, precision=precision)
    if out is not None:
      return out
    w = cpu_matmul.dequantized_operand(w.dequantize(dtype=x.dtype))
  else:
    w = jnp.asarray(w)
    if act_format is not None:
      # Activation-only fake quantization against a float weight.
      xq = quantize_activation(x, act_format)
      x = xq.dequantize(dtype=x.dtype).reshape(x.shape)
    if w.dtype != x.dtype:
      w = w.astype(x.dtype)
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (contract_axis,)), ((), ())),
                             precision=precision)


def qeinsum(spec: str, x: jax.Array, w: Any, *, precision: Any = None) -> jax.Array:
  """`jnp.einsum(spec, x, w)` where `w` may be a `QArray` (dequantized to x.dtype)."""
  if isinstance(w, QArray):
    w = w.dequantize(dtype=x.dtype)
  else:
    w = jnp.asarray(w).astype(x.dtype)
  return jnp.einsum(spec, x, w, precision=precision)


def _input_scaled_dot(x: jax.Array, w: InputScaled, *, contract_axis: int,
                      precision: Any) -> jax.Array:
  """`qdot(x / s, w.weight)`: the input divided by the leaf's per-input-channel scales."""
  if len(w.shape) != 2:
    raise ValueError(f"qdot takes 2-D weights; this InputScaled weight has shape {w.shape}")
  s = jnp.asarray(w.scale).reshape(-1)
  xs = (x.astype(jnp.float32) / s.astype(jnp.float32)).astype(x.dtype)
  return qdot(xs, w.weight, contract_axis=contract_axis, precision=precision)


def _int8_weight_ok(w: Any, contract_axis: int) -> bool:
  if not isinstance(w, QArray):
    return False
  f = w.fmt
  return (f.kind == "int" and f.bits == 8 and f.symmetric and
          (f.granularity == "per_tensor" or
           (f.granularity == "per_channel" and f.channel_axis % 2 == 1 - contract_axis)))


def static_qdot(x: jax.Array, w: StaticActQuantized, *, contract_axis: int = 0,
                precision: Any = None) -> jax.Array:
  """`x @ w.weight` with `x` quantized by the static scales of `w`.

  int8 x int8 -> int32 `dot_general` when the activation scale is per tensor,
  symmetric int8, and the weight an int8 QArray with per-tensor or
  per-output-channel scales; otherwise quantize-dequantize `x` and call
  `qdot` on the weight. `qdot(x, w)` calls this for a `StaticActQuantized` `w`.
  """
  lead = x.shape[:-1]
  xq = w.quantize_input(x)
  af = xq.fmt
  if (af.kind == "int" and af.bits == 8 and af.symmetric and af.granularity == "per_tensor"
      and _int8_weight_ok(w.weight, contract_axis)):
    acc = jax.lax.dot_general(xq.codes(), w.weight.codes(),
                              (((1,), (contract_axis,)), ((), ())),
                              preferred_element_type=jnp.int32)
    ws = w.weight.scale.reshape(1, -1) if w.weight.scale.size > 1 else w.weight.scale.reshape(())
    out = (acc.astype(jnp.float32) * xq.scale.reshape(()).astype(jnp.float32)
           * ws.astype(jnp.float32))
    return out.astype(x.dtype).reshape(*lead, -1)
  xd = xq.dequantize(jnp.float32).astype(x.dtype).reshape(x.shape)
  return qdot(xd, w.weight, contract_axis=contract_axis, precision=precision)
