"""`QArray`: a quantized array that is a pytree, and the math to make one.

A `QArray` holds array children (`qvalue`: the stored codes, packed for
sub-byte formats; `scale`; optional `zero_point`) and static metadata (the
`QuantFormat`, the logical `shape` and the original `dtype`). It jits, vmaps,
shards and checkpoints like any pytree, and `nbytes` is what it really costs.

Layout:
  * Scales have the array's shape with the reduced axes kept as 1
    (per-channel on `[in, out]`: `[1, out]`; per-tensor: all ones), except for
    groups, where the group axis holds one entry per group (`[in/g, out]`).
  * Codes of 1, 2 and 4 bits are packed 8, 4 and 2 per byte along the group
    axis, low bits first; 3, 5, 6 and 7-bit codes are stored as bit planes:
    each run of 8 consecutive codes becomes `bits` bytes (byte p holds bit p
    of the 8 codes), runs one after another along the same axis. Every format
    costs exactly its bits per value, and a shard of whole bytes along the
    packing axis holds whole logical rows. The packing
    axis is padded to a whole number of bytes; `shape` keeps the logical size.
    TQ1_0 (ternary, groups of 256, fp16 scales) keeps llama.cpp's code bytes
    instead, 52 per group of 256 trits (`llamacpp_types.pack_trits`): with its
    scale, 1.6875 bits per value.
  * Integer codes are stored offset to unsigned (`u = q - qmin`) when packed,
    as int8/uint8 when 8-bit, FP8 codes as float8 dtypes, casts as fp16/bf16.

The block math (block views, scales from ranges, encode / decode, packing) lives in
`quantjax.numerics.blocks`, below both this module and `calibrate`; its public names
are importable from here too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta

from quantjax.numerics import blocks as blocks_lib
from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics import formats as formats_lib
from quantjax.numerics import llamacpp_types
from quantjax.numerics.blocks import (block_scale, block_view, decode, encode, norm_axis,
                                      pack_axis, packed_length, scale_floor,
                                      scale_from_range, stored_scale, unblock)
from quantjax.numerics.formats import QuantFormat

__all__ = [
    "QArray", "quantize", "dequantize", "encode", "decode", "scale_from_range",
    "block_view", "unblock", "pack_codes", "unpack_codes", "is_qarray", "ActQuantized",
    "InputScaled", "quantize_with_scale", "check_quantized", "check_range_fits", "check_finite",
    "scale_floor", "slice_format", "stack_index", "stack_qarrays", "quantize_stacked",
    "StaticActQuantized", "stored_scale", "block_scale", "packed_length",
]


def pack_codes(codes: jax.Array, fmt: QuantFormat) -> jax.Array:
  """`blocks.pack_codes`, except TQ1_0's trits: llama.cpp's code bytes along the group axis."""
  if llamacpp_types.stores_trits(fmt) and codes.ndim:
    return llamacpp_types.pack_trits(jnp.asarray(codes), pack_axis(fmt, codes.ndim))
  return blocks_lib.pack_codes(codes, fmt)


def unpack_codes(packed: jax.Array, fmt: QuantFormat, shape: Sequence[int]) -> jax.Array:
  """Inverse of `pack_codes`: int8 codes of the logical `shape`."""
  if llamacpp_types.stores_trits(fmt) and len(shape):
    codes = llamacpp_types.unpack_trits(jnp.asarray(packed), pack_axis(fmt, len(shape)))
    return codes.reshape(tuple(shape))
  return blocks_lib.unpack_codes(packed, fmt, shape)


# ----------------------------------------------------------------------------
# The pytree.
# ----------------------------------------------------------------------------

class _Box(flax_meta.AxisMetadata):
  """A Flax `AxisMetadata` box whose `unbox()` is the array it stands for: stock
  linen modules unbox their params, so they read quantized leaves as arrays."""

  def unbox(self) -> jax.Array:
    return self.__jax_array__()

  def replace_boxed(self, val):
    return val

  def add_axis(self, index, params):
    return self

  def remove_axis(self, index, params):
    return self


@dataclasses.dataclass(frozen=True)
class QArray(_Box):
  """A quantized array. Children: `qvalue`, `scale`, `zero_point`.

  Static: `fmt` (QuantFormat), `shape` (logical), `dtype` (of the original
  array, which `dequantize()` returns by default).

  Leading axes of the children are batch axes: when `jax.lax.scan` (or
  `vmap`, `nn.scan`, `nnx.scan`) slices a stacked QArray `[L, ...]`, or
  stacks per-layer ones, the logical shape follows the children (see
  `_qarray_unflatten`). A stacked QArray's format uses negative axes
  (`group_axis=-2`, `channel_axis=-1`), so each slice reads the same format.

  It stands in where an array is expected: `__jax_array__` and `__array__`
  dequantize, `x[idx]` indexes the dequantized values, and `shape`, `dtype`,
  `ndim`, `size` describe the logical array. It is also a Flax
  `AxisMetadata` box whose `unbox()` is the dequantized array, so stock linen
  modules (which unbox their params and check their shapes) read it as the
  array it stands for, dequantized inside the jitted computation.
  """

  qvalue: jax.Array
  scale: jax.Array | None
  zero_point: jax.Array | None
  fmt: QuantFormat = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))

  # --- array-like surface ---------------------------------------------------
  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(math.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes + scales + zero points."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize
               for a in (self.qvalue, self.scale, self.zero_point) if a is not None)

  @property
  def bits_per_value(self) -> float:
    """Effective bits per logical value, scales and zero points included."""
    return 8.0 * self.nbytes / max(self.size, 1)

  def codes(self) -> jax.Array:
    """Unpacked codes of the logical shape (int8 / uint8 / float8 / fp16)."""
    return unpack_codes(self.qvalue, self.fmt, self.shape)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The represented values, in `dtype` (default: the original dtype)."""
    dtype = self.dtype if dtype is None else dtype
    codes = self.codes()
    if self.fmt.is_cast:
      return codes.astype(dtype)
    cb, _ = block_view(codes, self.fmt)
    sb = block_scale(self.scale, self.shape, self.fmt)
    zb = None if self.zero_point is None else block_scale(self.zero_point, self.shape, self.fmt)
    return decode(cb, self.fmt, sb, zb).reshape(self.shape).astype(dtype)

  def __jax_array__(self) -> jax.Array:
    return self.dequantize()

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self.dequantize())
    return out.astype(dtype) if dtype is not None else out

  def __getitem__(self, idx) -> jax.Array:
    if self._rows_independent() and _is_int_index(idx):
      return self.take_rows(idx)
    return self.dequantize()[idx]

  def _rows_independent(self) -> bool:
    """True when each index of axis 0 has its own codes and scales (embedding tables)."""
    f = self.fmt
    if self.ndim < 2 or f.is_cast:
      return self.ndim >= 1 and f.is_cast
    if f.packed and pack_axis(f, self.ndim) == 0:
      return False
    if f.granularity == "per_tensor":
      return True
    if f.granularity == "per_channel":
      return f.channel_axis % self.ndim == 0
    return f.group_axis % self.ndim != 0

  def take_rows(self, ids) -> jax.Array:
    """`self.dequantize()[ids]` for integer `ids`, dequantizing only those rows."""
    ids = jnp.asarray(ids)
    flat = ids.reshape(-1)
    take = lambda a: None if a is None else (  # noqa: E731
        a if a.shape[0] == 1 else jnp.take(a, flat, axis=0))
    rows = QArray(qvalue=jnp.take(self.qvalue, flat, axis=0), scale=take(self.scale),
                  zero_point=take(self.zero_point), fmt=self.fmt,
                  shape=(flat.shape[0],) + tuple(self.shape[1:]), dtype=self.dtype)
    return rows.dequantize().reshape(ids.shape + tuple(self.shape[1:]))

  def astype(self, dtype) -> jax.Array:
    return self.dequantize(dtype)

  @property
  def T(self) -> jax.Array:  # noqa: N802
    return self.dequantize().T

  def reshape(self, *shape) -> jax.Array:
    return self.dequantize().reshape(*shape)

  def transpose(self, *axes) -> jax.Array:
    return self.dequantize().transpose(*axes)

  def __matmul__(self, other):
    return jnp.matmul(self.dequantize(), other)

  def __rmatmul__(self, other):
    return jnp.matmul(other, self.dequantize())

  def __repr__(self) -> str:
    return (f"QArray(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, fmt={self.fmt.name}, "
            f"qvalue={getattr(self.qvalue, 'dtype', '?')}{tuple(getattr(self.qvalue, 'shape', ()))}, "
            f"nbytes={self.nbytes if hasattr(self.qvalue, 'size') else '?'})")

  @classmethod
  def from_codes(cls, codes: jax.Array, fmt: QuantFormat, scale: jax.Array | None,
                 zero_point: jax.Array | None = None, dtype: Any = jnp.float32) -> "QArray":
    """Builds a QArray from unpacked codes of the logical shape and stored scales."""
    return cls(qvalue=pack_codes(codes, fmt), scale=scale, zero_point=zero_point,
               fmt=fmt, shape=tuple(codes.shape), dtype=jnp.dtype(dtype))


def _qarray_flatten_with_keys(q: "QArray"):
  keys = jax.tree_util.GetAttrKey
  return (((keys("qvalue"), q.qvalue), (keys("scale"), q.scale),
           (keys("zero_point"), q.zero_point)), (q.fmt, q.shape, q.dtype))


def _qarray_flatten(q: "QArray"):
  return (q.qvalue, q.scale, q.zero_point), (q.fmt, q.shape, q.dtype)


def _qarray_unflatten(aux, children) -> "QArray":
  """Rebuilds a QArray; leading axes the children gained or lost are batch axes.

  `scan` over a stacked QArray hands its body children without the leading
  axis (the treedef still holds the stacked shape), and stacking per-layer
  QArrays adds one: the logical shape drops or gains those leading axes.
  Children that are not arrays (shardings, None placeholders) keep `shape`.
  """
  fmt, shape, dtype = aux
  qvalue = children[0]
  nd = getattr(qvalue, "ndim", None)
  if isinstance(nd, int):
    base = len(shape) if (shape or not fmt.packed) else 1
    lead = nd - base
    if lead > 0:
      shape = tuple(qvalue.shape[:lead]) + tuple(shape)
    elif lead < 0 and len(shape) >= -lead:
      shape = tuple(shape[-lead:])
  return QArray(qvalue=children[0], scale=children[1], zero_point=children[2], fmt=fmt,
                shape=tuple(shape), dtype=dtype)


jax.tree_util.register_pytree_with_keys(QArray, _qarray_flatten_with_keys, _qarray_unflatten,
                                        flatten_func=_qarray_flatten)


def _is_int_index(idx: Any) -> bool:
  if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
    return True
  return hasattr(idx, "dtype") and jnp.issubdtype(idx.dtype, jnp.integer)


def is_qarray(x: Any) -> bool:
  return isinstance(x, QArray)


def check_finite(x: jax.Array, name: str) -> np.ndarray | None:
  """Raises on NaN/Inf (or no values) when `x` is concrete; returns it as numpy
  (None under tracing, where nothing can be checked on the host)."""
  if isinstance(x, jax.core.Tracer):
    return None
  arr = np.asarray(x)
  if arr.size == 0:
    raise ValueError(f"cannot quantize {name}: it is empty (shape {arr.shape})")
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
    return arr
  bad = ~np.isfinite(arr.astype(np.float32))
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"cannot quantize {name}: it holds {int(bad.sum())} NaN/Inf value(s) of "
        f"{arr.size} (shape {arr.shape}; first at index {first}: {arr[first]})")
  return arr


def _value_range(x: Any) -> str:
  if x is None:
    return ""
  a = np.asarray(x, np.float32)
  return f" (values in [{float(a.min()):.4g}, {float(a.max()):.4g}])"


def _overflow_message(name: str, fmt: QuantFormat, x: Any, what: str) -> str:
  sdt = jnp.dtype(fmt.scale_dtype)
  smax = float(jnp.finfo(sdt).max)
  reach = smax * (float(fmt.qmax - fmt.qmin) if fmt.has_zero_point else fmt.max_representable)
  fix = "float32 scales (drop fp16s, or a non-GGUF format), " if sdt != jnp.float32 else ""
  return (f"cannot quantize {name} to {fmt.name}{_value_range(x)}: {what} overflow {sdt.name} "
          f"(largest {smax:.6g}, so this format reaches |x| <= {reach:.4g}); use {fix}a float "
          "format, or rescale the tensor")


def check_range_fits(x: Any, fmt: QuantFormat, name: str = "array", *,
                     lo_hi: tuple[float, float] | None = None) -> None:
  """Raises when the scales `x`'s extremes need cannot be stored in `fmt.scale_dtype`
  (checked on the whole tensor, before quantizing: GPTQ's updates would otherwise
  spread an overflowed scale as NaN). Concrete `x` only; `lo_hi` = its min and
  max when already known."""
  if fmt.is_cast or fmt.kind in ("binary", "ternary") or isinstance(x, jax.core.Tracer):
    return
  if lo_hi is None:
    a = np.asarray(x, np.float32)
    if a.size == 0:
      return
    lo_hi = (float(a.min()), float(a.max()))
  smax = float(jnp.finfo(jnp.dtype(fmt.scale_dtype)).max)
  lo, hi = lo_hi
  if fmt.has_zero_point:
    need = (max(hi, 0.0) / 2 - min(lo, 0.0) / 2) / (fmt.qmax - fmt.qmin) * 2
    if fmt.zero_point == "float" and max(abs(lo), abs(hi)) > smax and np.isfinite(smax):
      need = float("inf")
  else:
    need = max(abs(lo), abs(hi)) / fmt.max_representable
  if need > smax:
    raise ValueError(_overflow_message(name, fmt, x, "its scales"))


def check_quantized(q: "QArray", name: str = "array", x: Any = None, *,
                    warn_underflow: bool = True) -> None:
  """Host-side check of a concrete QArray's scales: refuses a result that is not
  the quantization of finite values.

  Scales (or float minima) that overflowed their dtype (inf: float16 scales of
  Q4_0 at values near 1e6), a NaN scale, or a float-offset format whose
  `min + qmax * step` passes float32's range are errors naming `name`, the
  format and the value range; blocks of values so small that they use the
  smallest scale the format stores are warned about (values below half of it
  round to 0). Skipped under tracing (see `quantize(checks=True)` for checks
  inside `jit`).

  Args:
    q: the QArray.
    name: the tensor's path, for messages.
    x: the quantized input (for the value range in messages), optional.
    warn_underflow: warn about blocks at the smallest scale (needs `x`).

  Raises:
    ValueError: as above.
  """
  if q.scale is None or isinstance(q.scale, jax.core.Tracer):
    return
  fmt = q.fmt
  s = np.asarray(q.scale).astype(np.float32)
  sdt = jnp.dtype(fmt.scale_dtype)
  smax = float(jnp.finfo(sdt).max)
  lo_hi = None
  if x is not None:
    a = np.asarray(x, np.float32)
    lo_hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    check_range_fits(x, fmt, name, lo_hi=lo_hi)
  if np.isnan(s).any():
    raise ValueError(f"quantizing {name} to {fmt.name} gave NaN scales{_value_range(x)}: its "
                     "input holds NaN (inside jit, check it with quantize(..., checks=True))")
  bad = ~np.isfinite(s)
  if bad.any():
    raise ValueError(_overflow_message(name, fmt, x, f"{int(bad.sum())} of {s.size} scales"))
  if fmt.has_zero_point and fmt.zero_point == "float" and q.zero_point is not None:
    m = np.asarray(q.zero_point).astype(np.float32)
    if not np.isfinite(m).all():
      raise ValueError(f"cannot quantize {name} to {fmt.name}{_value_range(x)}: the block minima "
                       f"overflow {sdt.name} (largest {smax:.6g})")
    top = np.abs(m.astype(np.float64)) + float(fmt.qmax) * np.abs(s.astype(np.float64))
    if (top > float(np.finfo(np.float32).max)).any():
      raise ValueError(f"cannot quantize {name} to {fmt.name}{_value_range(x)}: min + "
                       f"{fmt.qmax} * step passes float32's range; use a symmetric or "
                       "integer-zero-point format")
  if warn_underflow and lo_hi is not None:
    # Only when nothing else is there: beside normal values they are far below a step.
    amax = max(abs(lo_hi[0]), abs(lo_hi[1]))
    tiny = float(np.finfo(np.float32).tiny)
    if 0 < amax < tiny:
      import warnings
      warnings.warn(f"{name}: all its non-zero values are float32 denormals (|x| <= {amax:.3g} "
                    f"< {tiny:.3g}), which XLA flushes to 0: they quantize to 0", stacklevel=3)
  if warn_underflow and x is not None and fmt.kind == "int":
    floor = scale_floor(sdt)
    at_floor = int(np.sum(np.abs(s) <= floor))
    if at_floor:
      import warnings
      warnings.warn(
          f"{name}: {at_floor} of {s.size} blocks hold values so small that they use "
          f"{fmt.name}'s smallest scale {floor:.3g}: they are stored in steps of {floor:.3g} "
          f"(values below {floor / 2:.3g} become 0)", stacklevel=3)


def quantize(x: jax.Array, fmt: QuantFormat | str, *, calibration: Any = "auto",
             key: jax.Array | None = None, name: str = "array", checks: bool = False) -> QArray:
  """Quantizes `x` to a `QArray` in format `fmt`.

  Args:
    x: a floating-point array.
    fmt: a `QuantFormat` or spec string (`"int4_g64_asym"`).
    calibration: how ranges are chosen: "auto" (signed-max for group-wise
      signed symmetric integers, min-max otherwise), "minmax", "signed_max",
      "percentile", "mse", or a `quantjax.numerics.calibrate.Calibration`. Binary and ternary formats
      always use their closed-form scales (XNOR-Net mean|w|; TWN threshold
      0.7 mean|w| and optimal alpha), except TQ1_0 under "auto": the exact
      least-squares ternary scale (`llamacpp_types.search_scales`).
    key: PRNG key, required for stochastic rounding.
    name: used in error messages.
    checks: under `jit` (traced `x`), add `jax.experimental.checkify` checks
      that `x` is finite and that every scale fits its dtype; wrap the caller
      with `checkify.checkify(...)` and call `err.throw()`. Concrete inputs are
      always checked on the host (`check_quantized`).

  Returns:
    A `QArray`; jittable, vmappable. Gradients flow to nothing through the
    codes (rounding); use `fake_quant` for a straight-through estimator.

  Raises:
    ValueError: NaN/Inf in a concrete `x`, an empty `x`, values whose scales
      overflow the format's scale dtype (Q4_0's float16 scales at |x| ~ 1e6),
      a group size that does not divide the grouped axis, or a non-float
      input; each names `name`.
  """
  fmt = formats_lib.resolve_format(fmt)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"cannot quantize {name}: dtype {x.dtype} is not floating point")
  if x.size == 0:
    raise ValueError(f"cannot quantize {name}: it is empty (shape {tuple(x.shape)})")
  host = check_finite(x, name)
  if not fmt.is_cast:
    llamacpp_types.check_blocks(x.shape, fmt, name)  # rows that fill llama.cpp's blocks
    jax.eval_shape(lambda a: block_view(a, fmt), x)  # shape errors, before compiling
  calibration = calibrate_lib.resolve_calibration(calibration)
  # One compiled computation per (format, calibration, shape): eager calls, calls
  # under an outer jit and sharded calls then round identically.
  q = _quantize_jit(x, key, fmt=fmt, calibration=calibration)
  if host is not None:
    check_quantized(q, name, host)
    if fmt.is_cast:
      _check_cast(q, name, host)
  elif checks:
    _checkify_quantized(x, q, name)
  return q


def _check_cast(q: "QArray", name: str, x: np.ndarray) -> None:
  v = np.asarray(q.qvalue).astype(np.float32)
  if not np.isfinite(v).all():
    big = float(np.abs(x.astype(np.float32)).max())
    raise ValueError(f"cannot cast {name} to {q.fmt.name}: values up to |x| = {big:.4g} exceed "
                     f"{q.fmt.name}'s largest finite value "
                     f"{float(jnp.finfo(q.fmt.code_dtype).max):.6g} and would become inf")


def _checkify_quantized(x: jax.Array, q: "QArray", name: str) -> None:
  from jax.experimental import checkify
  checkify.check(jnp.all(jnp.isfinite(x)), f"quantize {name}: the input holds NaN/Inf")
  if q.scale is not None:
    checkify.check(jnp.all(jnp.isfinite(q.scale.astype(jnp.float32))),
                   f"quantize {name} to {q.fmt.name}: scales overflow "
                   f"{jnp.dtype(q.fmt.scale_dtype).name} (values too large for the format)")
  if q.fmt.is_cast:
    checkify.check(jnp.all(jnp.isfinite(q.qvalue.astype(jnp.float32))),
                   f"quantize {name} to {q.fmt.name}: values overflow {q.fmt.name}")


@functools.partial(jax.jit, static_argnames=("fmt", "calibration"))
def _quantize_jit(x: jax.Array, key, *, fmt: QuantFormat, calibration: Any) -> QArray:
  shape = tuple(x.shape)
  if fmt.is_cast:
    return QArray(qvalue=x.astype(fmt.code_dtype), scale=None, zero_point=None, fmt=fmt,
                  shape=shape, dtype=jnp.dtype(x.dtype))
  xb, axes = block_view(x, fmt)
  scale_b, zp_b, threshold = calibrate_lib.block_scales(xb, axes, fmt, calibration)
  codes_b = encode(xb, fmt, scale_b, zp_b, key=key, threshold_b=threshold)
  codes = codes_b.reshape(shape)
  scale = stored_scale(scale_b, shape, fmt)
  zp = None if zp_b is None else stored_scale(zp_b, shape, fmt)
  return QArray(qvalue=pack_codes(codes, fmt), scale=scale, zero_point=zp, fmt=fmt,
                shape=shape, dtype=jnp.dtype(x.dtype))


def quantize_with_scale(x: jax.Array, fmt: QuantFormat, scale: jax.Array,
                        zero_point: jax.Array | None = None, *,
                        key: jax.Array | None = None) -> QArray:
  """Quantizes `x` with given stored-shape scales (as GPTQ/AWQ choose them)."""
  fmt = formats_lib.resolve_format(fmt)
  shape = tuple(x.shape)
  xb, _ = block_view(x, fmt)
  sb = block_scale(scale, shape, fmt)
  zb = None if zero_point is None else block_scale(zero_point, shape, fmt)
  codes = encode(xb, fmt, sb, zb, key=key).reshape(shape)
  return QArray(qvalue=pack_codes(codes, fmt), scale=scale, zero_point=zero_point, fmt=fmt,
                shape=shape, dtype=jnp.dtype(x.dtype))


# ----------------------------------------------------------------------------
# Stacks: one weight per slice along some axes (scanned layers, experts).
# ----------------------------------------------------------------------------

def slice_format(fmt: QuantFormat, ndim: int) -> QuantFormat:
  """`fmt` with its group and channel axes counted from the end of an `ndim`-axis
  slice, so every slice of a stack (and a stacked QArray) reads the same format."""
  fmt = formats_lib.resolve_format(fmt)
  if fmt.is_cast or ndim == 0:
    return fmt
  shape = ("?",) * ndim
  return fmt.replace(group_axis=norm_axis(fmt.group_axis, ndim, "group_axis", shape) - ndim,
                     channel_axis=norm_axis(fmt.channel_axis, ndim, "channel_axis", shape) - ndim)


def stack_index(idx: Sequence[int], stack_axes: Sequence[int], ndim: int) -> tuple:
  """The index of slice `idx` along `stack_axes` of an `ndim`-axis array
  (`x[stack_index(...)]`, `.at[stack_index(...)]`)."""
  out: list[Any] = [slice(None)] * ndim
  for a, i in zip(stack_axes, idx):
    out[a] = int(i)
  return tuple(out)


def stack_qarrays(items: Any, shape: Sequence[int], stack_axes: Sequence[int],
                  name: str = "array") -> "QArray":
  """One QArray of the leaf `shape` from per-slice QArrays.

  Args:
    items: `{index tuple along stack_axes: QArray of one slice}` for every slice.
    shape: the whole leaf's shape.
    stack_axes: ascending stacking axes of the leaf.
    name: used in error messages.

  Leading stacking axes give a stacked QArray (the children gain leading batch
  axes; `scan` hands each layer its slice). Stacking axes elsewhere give one
  QArray over the whole leaf whose groups run inside one slice: a group format
  keeps its groups; per-channel scales of a 2-D slice become one group spanning
  the slice's input axis (the same codes and scales). Per-tensor or
  many-axis per-channel slices can only be stacked along leading axes.
  """
  shape, stack_axes = tuple(int(d) for d in shape), tuple(int(a) for a in stack_axes)
  counts = [shape[a] for a in stack_axes]
  missing = [i for i in np.ndindex(*counts) if tuple(i) not in items]
  if missing:
    raise ValueError(f"{name}: slices {missing[:5]} of the stacked weight (stacking axes "
                     f"{stack_axes} of shape {shape}) have no result; every slice of a stacked "
                     "weight must be quantized")
  ordered = [items[tuple(i)] for i in np.ndindex(*counts)]
  first = ordered[0]
  for i, q in zip(np.ndindex(*counts), ordered):
    if not isinstance(q, QArray) or (q.fmt, q.shape, q.dtype) != (first.fmt, first.shape,
                                                                   first.dtype):
      got = (q.fmt.name, q.shape) if isinstance(q, QArray) else type(q).__name__
      raise ValueError(f"{name}: slice {tuple(i)} is {got}, slice {(0,) * len(counts)} is "
                       f"{(first.fmt.name, first.shape)}: the slices of one stacked leaf must "
                       "share one format and layout")
  if stack_axes == tuple(range(len(stack_axes))):
    def nest(qs, depth):
      if depth == len(counts):
        return qs[0]
      step = len(qs) // counts[depth]
      parts = [nest(qs[j * step:(j + 1) * step], depth + 1) for j in range(counts[depth])]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
    return nest(ordered, 0)
  f, sshape = first.fmt, first.shape
  sn = len(sshape)
  own = [a for a in range(len(shape)) if a not in stack_axes]  # leaf axis of each slice axis
  if f.is_cast:
    full_fmt = f
  elif f.granularity == "group":
    full_fmt = f.replace(group_axis=own[f.group_axis % sn] - len(shape))
  elif f.granularity == "per_channel" and sn == 2:
    other = 1 - f.channel_axis % sn
    full_fmt = f.replace(granularity="group", group_size=sshape[other],
                         group_axis=own[other] - len(shape), channel_axis=-1)
  else:
    raise ValueError(
        f"{name}: {f.granularity} scales of slices of shape {sshape} cannot be held in one "
        f"array with stacking axes {stack_axes} among its own axes (only leading stacking "
        "axes keep them per slice); use a group format or put the stacking axes first")

  def place(arrays):
    arrays = [np.asarray(a) for a in arrays]
    full_shape = list(arrays[0].shape)
    for a, n in zip(stack_axes, counts):
      full_shape.insert(a, n)
    out = np.empty(full_shape, arrays[0].dtype)
    for i, a in zip(np.ndindex(*counts), arrays):
      out[stack_index(i, stack_axes, len(full_shape))] = a
    return jnp.asarray(out)

  codes = place([q.codes() for q in ordered])
  scale = None if first.scale is None else place([q.scale for q in ordered])
  zp = None if first.zero_point is None else place([q.zero_point for q in ordered])
  return QArray.from_codes(codes, full_fmt, scale, zp, dtype=first.dtype)


def quantize_stacked(x: jax.Array, fmt: QuantFormat | str, stack_axes: Sequence[int], *,
                     calibration: Any = "auto", key: jax.Array | None = None,
                     name: str = "array") -> "QArray":
  """Quantizes every slice of `x` along `stack_axes` (ascending) as its own weight,
  with `fmt`'s axes counted within a slice, and stacks the results (`stack_qarrays`)."""
  fmt = formats_lib.resolve_format(fmt)
  x = jnp.asarray(x)
  stack_axes = tuple(stack_axes)
  if not stack_axes:
    return quantize(x, fmt, calibration=calibration, key=key, name=name)
  sf = slice_format(fmt, x.ndim - len(stack_axes))
  items = {}
  for n, i in enumerate(np.ndindex(*[x.shape[a] for a in stack_axes])):
    k = None if key is None else jax.random.fold_in(key, n)
    items[tuple(i)] = quantize(x[stack_index(i, stack_axes, x.ndim)], sf,
                               calibration=calibration, key=k,
                               name=name + "".join(f"[{j}]" for j in i))
  return stack_qarrays(items, x.shape, stack_axes, name)


def dequantize(x: Any, dtype: Any = None) -> jax.Array:
  """`x.dequantize(dtype)` for a QArray; arrays pass through (cast if `dtype`)."""
  if isinstance(x, QArray):
    return x.dequantize(dtype)
  return x if dtype is None else jnp.asarray(x).astype(dtype)


# ----------------------------------------------------------------------------
# Activation quantization carried beside a weight.
# ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActQuantized:
  """A weight plus the format its matmul's activations are quantized to.

  `ops.qdot` recognises it and quantizes the activations dynamically
  (int8 x int8 -> int32 when both are int8).
  """

  weight: Any
  act_format: Any = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.weight.shape

  @property
  def dtype(self):
    return self.weight.dtype

  @property
  def nbytes(self) -> int:
    return int(self.weight.nbytes)

  def __jax_array__(self):
    return dequantize(self.weight)

  def __getitem__(self, idx):
    return dequantize(self.weight)[idx]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticActQuantized(ActQuantized):
  """A weight plus fixed (calibrated) scales for its matmul's input.

  Children: `weight` (array or QArray), `act_scale` (`[1, 1]` or `[1, k]`),
  `act_zero_point` (or None). Static: `act_format`. `ops.qdot` computes its
  matmul (`ops.static_qdot`); `quantjax.methods.activations` chooses the scales.
  """

  act_scale: Any = None
  act_zero_point: Any = None

  def quantize_input(self, x: jax.Array) -> QArray:
    """The input `[..., k]` as a `[t, k]` QArray with the static scales."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return quantize_with_scale(x2, self.input_format, self.act_scale, self.act_zero_point)

  @property
  def input_format(self) -> QuantFormat:
    per_tensor = self.act_scale is None or int(np.prod(self.act_scale.shape)) == 1
    if per_tensor:
      return self.act_format.replace(granularity="per_tensor")
    return self.act_format.replace(granularity="per_channel", channel_axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputScaled(_Box):
  """A weight that expects its matmul's input divided by per-input-channel scales.

  AWQ and SmoothQuant quantize `diag(s) W` instead of `W`; the division of
  the input by `s` travels with the weight in this leaf, so no model change
  is needed: `ops.qdot(x, leaf)` computes `qdot(x / s, leaf.weight)` (the
  inner weight may be a `QArray`, an `ActQuantized` or a
  `StaticActQuantized`, whose activation quantization then sees `x / s`),
  and anywhere an array is expected the leaf is the effective weight
  `dequantize(weight) / s`, which gives the same product. Folding `1/s`
  into the op that produces the input (a norm, a linear) is an optional pass
  (`quantjax.methods.fold.fold_input_scales`) that turns the leaf back into
  its inner weight.

  Children: `weight` (`[..., in, ..., out]`), `scale` with the weight's rank,
  size 1 on every non-contracted axis (`[in, 1]` for a `[in, out]` kernel,
  `[1, in]` for an `[out, in]` one; stacked layers `[L, in, 1]`).
  """

  weight: Any
  scale: Any

  @property
  def shape(self):
    return tuple(self.weight.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    return self.weight.dtype

  @property
  def nbytes(self) -> int:
    return int(self.weight.nbytes) + int(self.scale.size) * jnp.dtype(self.scale.dtype).itemsize

  @property
  def inner_weight(self) -> Any:
    """The stored weight without any activation wrapper (a QArray or an array)."""
    w = self.weight
    return w.weight if isinstance(w, ActQuantized) else w

  def effective(self, dtype: Any = None) -> jax.Array:
    """`dequantize(weight) / scale`: the float weight the leaf stands for."""
    w = dequantize(self.inner_weight, jnp.float32)
    out = w / jnp.asarray(self.scale, jnp.float32)
    return out.astype(self.dtype if dtype is None else dtype)

  def __jax_array__(self) -> jax.Array:
    return self.effective()

  def __getitem__(self, idx) -> jax.Array:
    return self.effective()[idx]

  def astype(self, dtype) -> jax.Array:
    return self.effective(dtype)

  def reshape(self, *shape) -> jax.Array:
    return self.effective().reshape(*shape)

  @property
  def T(self) -> jax.Array:  # noqa: N802
    return self.effective().T

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self.effective())
    return out.astype(dtype) if dtype is not None else out
