"""Block math under `QArray`: where scales are shared (block views), scales from
ranges, encode and decode of codes, and the packing of sub-byte codes into bytes (the
layout is described in `quantjax.numerics.qarray`). `qarray` and `calibrate` both build
on it."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from quantjax.numerics import formats as formats_lib
from quantjax.numerics import llamacpp_types
from quantjax.numerics.formats import QuantFormat


# ----------------------------------------------------------------------------
# Block views: where scales are shared.
# ----------------------------------------------------------------------------

def norm_axis(axis: int, ndim: int, what: str, shape) -> int:
  if ndim == 0:
    return 0
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what}={axis} is out of range for an array of shape {tuple(shape)}")
  return axis % ndim


def block_view(x: jax.Array, fmt: QuantFormat) -> tuple[jax.Array, tuple[int, ...]]:
  """Reshapes `x` so each scale covers the values along the returned axes.

  Returns `(xb, axes)`: reducing `xb` over `axes` with keepdims gives the
  scale's shape in block space (see `unblock_scale` for the stored shape).
  """
  shape = tuple(x.shape)
  nd = len(shape)
  if fmt.granularity == "per_tensor" or nd == 0:
    return x, tuple(range(nd))
  if fmt.granularity == "per_channel":
    ca = norm_axis(fmt.channel_axis, nd, "channel_axis", shape)
    return x, tuple(a for a in range(nd) if a != ca)
  ga = norm_axis(fmt.group_axis, nd, "group_axis", shape)
  g = fmt.group_size
  n = shape[ga]
  if n % g:
    raise ValueError(
        f"group_size {g} does not divide axis {ga} of length {n} (array shape {shape}); "
        f"choose a group size that divides {n} (e.g. "
        f"{', '.join(str(d) for d in (32, 64, 128, 256) if n % d == 0) or 'per_channel'})")
  xb = x.reshape(shape[:ga] + (n // g, g) + shape[ga + 1:])
  return xb, (ga + 1,)


def unblock(xb: jax.Array, shape: Sequence[int], fmt: QuantFormat) -> jax.Array:
  """Inverse of `block_view` for arrays of the blocked shape."""
  return xb.reshape(tuple(shape))


def stored_scale(scale_b: jax.Array, shape, fmt: QuantFormat) -> jax.Array:
  """Block-space scale `[.., n/g, 1, ..]` -> stored scale `[.., n/g, ..]`."""
  if fmt.granularity == "group" and len(shape) > 0:
    ga = norm_axis(fmt.group_axis, len(shape), "group_axis", shape)
    return jnp.squeeze(scale_b, axis=ga + 1)
  return scale_b


def block_scale(scale: jax.Array, shape, fmt: QuantFormat) -> jax.Array:
  """Stored scale -> block-space scale that broadcasts against `block_view`."""
  if fmt.granularity == "group" and len(shape) > 0:
    ga = norm_axis(fmt.group_axis, len(shape), "group_axis", shape)
    return jnp.expand_dims(scale, ga + 1)
  return scale


# ----------------------------------------------------------------------------
# Scales from ranges, encode and decode.
# ----------------------------------------------------------------------------

def scale_floor(scale_dtype: Any) -> float:
  """The smallest positive scale that survives storage in `scale_dtype` and XLA's
  flush of float32 denormals: 2^-24 (float16's smallest subnormal, exact in
  float32) for float16 scales, float32's smallest normal number otherwise."""
  if jnp.dtype(scale_dtype) == jnp.float16:
    return 2.0 ** -24
  return float(jnp.finfo(jnp.float32).tiny)


def _span(lo: jax.Array, hi: jax.Array, n: float) -> jax.Array:
  """`(hi - lo) / n` without overflow when `hi - lo` exceeds float32 (values near 3e38)."""
  d = hi - lo
  return jnp.where(jnp.isfinite(d) | jnp.isnan(d), d / n, hi / n - lo / n)


def _guard_scale(raw: jax.Array, amax: jax.Array, fmt: QuantFormat) -> jax.Array:
  """A block's scale: `raw` raised to `scale_floor` (a non-zero block never gets a
  scale that rounds to 0 in storage), 1 for an all-zero block, NaN for a block
  holding NaN (so NaN stays visible instead of becoming 0). Not clamped above:
  a scale beyond the scale dtype's range becomes inf, which `check_quantized`
  reports on concrete arrays."""
  floor = scale_floor(fmt.scale_dtype)
  s = jnp.where(amax > 0, jnp.maximum(raw, floor), 1.0)
  return jnp.where(jnp.isnan(amax) | jnp.isnan(raw), jnp.nan, s)


def scale_from_range(fmt: QuantFormat, lo: jax.Array, hi: jax.Array):
  """Scale (and zero point) that map `[lo, hi]` onto the format's codes.

  Symmetric formats use `max(|lo|, |hi|)`. An all-zero block gets scale 1 so
  nothing becomes NaN or inf; a block of tiny values gets at least
  `scale_floor(fmt.scale_dtype)` (float16 scales would otherwise round to 0
  and zero the block); ranges near float32's limit do not overflow; a NaN in
  the range gives a NaN scale. Returns `(scale, zero_point_or_None)` with the
  scale rounded to `fmt.scale_dtype` already (inf where it does not fit:
  `check_quantized` names such tensors).
  """
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  if fmt.is_cast:
    return None, None
  if fmt.kind in formats_lib.CODEBOOK_KINDS:  # llama.cpp's rules (IQ4_NL, MXFP4, ...)
    return llamacpp_types.scale_from_range(fmt, lo, hi), None
  if fmt.kind == "int" and not fmt.symmetric:
    n = float(fmt.qmax - fmt.qmin)
    if fmt.zero_point == "float":
      span = _span(lo, hi, n)
      scale = _guard_scale(span, span, fmt).astype(fmt.scale_dtype)
      return scale, lo.astype(fmt.scale_dtype)
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    span = _span(lo, hi, n)
    scale = _guard_scale(span, span, fmt).astype(fmt.scale_dtype)
    s32 = scale.astype(jnp.float32)
    zp = jnp.clip(jnp.round(fmt.qmin - _div(lo, s32)), fmt.qmin, fmt.qmax)
    return scale, zp.astype(jnp.int8 if fmt.signed else jnp.uint8)
  if fmt.kind == "int" and not fmt.signed:
    amax = jnp.maximum(hi, 0.0)  # unsigned symmetric: [0, hi], negatives clip to 0
    amax = jnp.where(jnp.isnan(lo), jnp.nan, amax)
  else:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  scale = _guard_scale(amax / fmt.max_representable, amax, fmt)
  return scale.astype(fmt.scale_dtype), None


_BIG = 2.0 ** 100


def _div(x: jax.Array, s: jax.Array) -> jax.Array:
  """`x / s`, also for scales above ~8.5e37, whose reciprocal (which XLA may
  multiply by instead of dividing) is a float32 denormal flushed to 0."""
  k = jnp.where(s > _BIG, 2.0 ** -64, 1.0).astype(jnp.float32)
  return (x * k) / (s * k)


def _round(v: jax.Array, fmt: QuantFormat, key: jax.Array | None) -> jax.Array:
  if fmt.rounding == "stochastic":
    if key is None:
      raise ValueError(f"format {fmt} uses stochastic rounding: pass key=jax.random.key(...)")
    return jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))
  return jnp.round(v)  # round half to even


def encode(xb: jax.Array, fmt: QuantFormat, scale_b: jax.Array | None,
           zp_b: jax.Array | None = None, *, key: jax.Array | None = None,
           threshold_b: jax.Array | None = None) -> jax.Array:
  """Codes for block-shaped `xb` with block-shaped scale and zero point.

  Integer-like kinds return int8 codes in `[qmin, qmax]` (NF4: indices
  0..15); FP8 and casts return their float dtype. For ternary codes,
  `threshold_b` (TWN's Delta) decides zeros; without it, round(x/scale).
  """
  x = xb.astype(jnp.float32)
  if fmt.is_cast:
    return xb.astype(fmt.code_dtype)
  if fmt.kind in formats_lib.CODEBOOK_KINDS:
    return llamacpp_types.encode(xb, fmt, scale_b)
  s = scale_b.astype(jnp.float32)
  if fmt.kind in ("fp8_e4m3", "fp8_e5m2"):
    m = fmt.max_representable
    return jnp.clip(_div(x, s), -m, m).astype(fmt.code_dtype)
  if fmt.kind == "binary":
    return jnp.where(x >= 0, 1, -1).astype(jnp.int8)
  if fmt.kind == "ternary":
    if threshold_b is not None:
      return jnp.where(jnp.abs(x) > threshold_b, jnp.sign(x), 0.0).astype(jnp.int8)
    safe = jnp.where(s > 0, s, 1.0)
    return jnp.clip(_round(_div(x, safe), fmt, key), -1, 1).astype(jnp.int8)
  if fmt.kind == "nf4":
    v = jnp.clip(_div(x, s), -1.0, 1.0)
    cb = jnp.asarray(formats_lib.NF4_CODEBOOK)
    mids = (cb[1:] + cb[:-1]) / 2
    return jnp.sum(v[..., None] > mids, axis=-1).astype(jnp.int8)
  # integer
  if fmt.symmetric:
    v = _div(x, s)
  elif fmt.zero_point == "float":
    v = _div(x - zp_b.astype(jnp.float32), s)
  else:
    v = _div(x, s) + zp_b.astype(jnp.float32)
  q = jnp.clip(_round(v, fmt, key), fmt.qmin, fmt.qmax)
  return q.astype(jnp.uint8 if (fmt.bits == 8 and not fmt.signed) else
                  (jnp.int8 if fmt.qmax <= 127 else jnp.int16))


def decode(codes_b: jax.Array, fmt: QuantFormat, scale_b: jax.Array | None,
           zp_b: jax.Array | None = None) -> jax.Array:
  """Float32 values of block-shaped codes (exact math, no rounding)."""
  if fmt.is_cast:
    return codes_b.astype(jnp.float32)
  if fmt.kind in formats_lib.CODEBOOK_KINDS:
    return llamacpp_types.decode(codes_b, fmt, scale_b)
  s = scale_b.astype(jnp.float32)
  if fmt.kind in ("fp8_e4m3", "fp8_e5m2"):
    return codes_b.astype(jnp.float32) * s
  if fmt.kind == "nf4":
    cb = jnp.asarray(formats_lib.NF4_CODEBOOK)
    return cb[codes_b.astype(jnp.int32)] * s
  q = codes_b.astype(jnp.float32)
  if fmt.kind == "int" and not fmt.symmetric:
    if fmt.zero_point == "float":
      return zp_b.astype(jnp.float32) + q * s
    return (q - zp_b.astype(jnp.float32)) * s
  return q * s


# ----------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------

def pack_axis(fmt: QuantFormat, ndim: int) -> int:
  if ndim == 0:
    return 0
  return fmt.group_axis % ndim if -ndim <= fmt.group_axis < ndim else 0


def _to_unsigned(codes: jax.Array, fmt: QuantFormat) -> jax.Array:
  if fmt.kind == "binary":
    return (codes > 0).astype(jnp.uint8)
  return (codes.astype(jnp.int32) - fmt.qmin).astype(jnp.uint8)


def _from_unsigned(u: jax.Array, fmt: QuantFormat) -> jax.Array:
  if fmt.kind == "binary":
    return (u.astype(jnp.int8) * 2 - 1).astype(jnp.int8)
  return (u.astype(jnp.int32) + fmt.qmin).astype(jnp.int8)


def packed_length(n: int, bits: int) -> int:
  """Bytes along the packing axis for `n` codes of `bits` bits."""
  if bits in (1, 2, 4):
    per = 8 // bits
    return -(-n // per)
  return bits * (-(-n // 8))


def pack_codes(codes: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Packs sub-byte integer codes (logical shape) into uint8 along the group axis."""
  if not fmt.packed:
    return codes
  b = fmt.bits
  if codes.ndim == 0:
    codes = codes.reshape(1)
  axis = pack_axis(fmt, codes.ndim)
  u = jnp.moveaxis(_to_unsigned(codes, fmt), axis, -1)
  n = u.shape[-1]
  per = 8 // b if b in (1, 2, 4) else 8
  pad = (-n) % per
  if pad:
    u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
  u = u.reshape(u.shape[:-1] + (-1, per)).astype(jnp.uint32)
  if b in (1, 2, 4):
    shifts = jnp.arange(per, dtype=jnp.uint32) * b
    packed = jnp.sum(u << shifts, axis=-1).astype(jnp.uint8)
  else:
    shifts = jnp.arange(8, dtype=jnp.uint32)
    planes = [jnp.sum(((u >> p) & 1) << shifts, axis=-1).astype(jnp.uint8) for p in range(b)]
    # [..., n/8, b] -> [..., n/8 * b]: the b plane bytes of each run of 8 codes sit together,
    # so a shard of whole runs along this axis is a contiguous slice.
    packed = jnp.stack(planes, axis=-1).reshape(u.shape[:-2] + (-1,))
  return jnp.moveaxis(packed, -1, axis)


def unpack_codes(packed: jax.Array, fmt: QuantFormat, shape: Sequence[int]) -> jax.Array:
  """Inverse of `pack_codes`: int8 codes of the logical `shape`."""
  if not fmt.packed:
    return packed
  b = fmt.bits
  shape = tuple(shape)
  lshape = shape if shape else (1,)
  axis = pack_axis(fmt, len(lshape))
  n = lshape[axis]
  p = jnp.moveaxis(packed, axis, -1).astype(jnp.uint32)
  if b in (1, 2, 4):
    per = 8 // b
    shifts = jnp.arange(per, dtype=jnp.uint32) * b
    u = (p[..., None] >> shifts) & ((1 << b) - 1)
    u = u.reshape(u.shape[:-2] + (-1,))
  else:
    nbytes = p.shape[-1] // b
    shifts = jnp.arange(8, dtype=jnp.uint32)
    p = p.reshape(p.shape[:-1] + (nbytes, b))
    u = jnp.zeros(p.shape[:-2] + (nbytes, 8), jnp.uint32)
    for plane in range(b):
      bits = (p[..., plane, None] >> shifts) & 1
      u = u | (bits << plane)
    u = u.reshape(u.shape[:-2] + (-1,))
  u = u[..., :n]
  codes = _from_unsigned(u, fmt)
  return jnp.moveaxis(codes, -1, axis).reshape(shape)
