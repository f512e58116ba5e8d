"""llama.cpp's codebook block types as quantjax formats: IQ4_NL, MXFP4, NVFP4, Q2_0, TQ2_0,
and the scale search and trit storage of TQ1_0 (the ternary kind).

A code is an index into a fixed table of levels (`QuantFormat.levels`) and a
value is `levels[code] * scale`, one scale per block along the contraction
axis. The definitions are ggml's (`ggml/src/ggml-common.h` for the blocks and
tables, `ggml/src/ggml-quants.c` for the (de)quantizers, `ggml/src/ggml-impl.h`
for the E8M0 / UE4M3 scale bytes), as the llama.cpp pinned here
(llama-cpp-python 0.3.36's libggml) computes them; `tests/numerics/
test_llamacpp_types.py` checks them against that library:

=======  =====  ======================================  ===================  =====
type     block  levels                                  scale                bpw
=======  =====  ======================================  ===================  =====
IQ4_NL   32     kvalues_iq4nl: -127 ... 113 (16, int8)  fp16, signed         4.5
MXFP4    32     FP4 E2M1: 0, .5, 1, 1.5, 2, 3, 4, 6, -  E8M0 (2^k), 1 byte   4.25
NVFP4    16     FP4 E2M1 (as MXFP4)                     UE4M3, 1 byte; 4 per 4.5
                                                        64-value GGUF block
Q2_0     64     -1, 0, 1, 2                             fp16, signed         2.25
Q1_0     128    -1, +1 (`kind="binary"`, packed signs)  fp16 mean |x|        1.125
TQ2_0    256    -1, 0, 1, 2 (Q2_0's kind, blocks of     fp16, signed         2.0625
                256, ggml's ternary type)
TQ1_0    256    -1, 0, 1 (`kind="ternary"`; trits 5     fp16, >= 0           1.6875
                per byte, `pack_trits`)
=======  =====  ======================================  ===================  =====

Scales, as llama.cpp chooses them (`scale_from_range`, the "minmax" rule):

* MXFP4: `2^(floor(log2 max|x|) - 2)` (the OCP MX rule: the block maximum
  lands in [4, 8) and saturates at 6), stored as its E8M0 byte
  (`jnp.float8_e8m0fnu`; ggml's byte `e` is the same byte: it multiplies
  its doubled levels by `2^(e - 128)`).
* NVFP4: `max|x| / 6` rounded to UE4M3 the way `ggml_fp32_to_ue4m3` does
  (half up; subnormals `round(x * 512) / 512`; saturating at 448), stored as
  `jnp.float8_e4m3fn` (the same byte below 0x7F). llama.cpp's NVFP4 has no
  second, per-tensor scale: blocks with `max|x| < 6 * 2^-10` (about 0.006)
  quantize to zero, and small blocks get few significant scale bits.
* IQ4_NL: the signed extreme maps to level -127. `quantize` searches
  further by default (`search_scales`, llama.cpp's `quantize_iq4_nl`): 16
  candidate scales, each refitted by weighted least squares (weights `x^2`,
  or `importance * sqrt(2 mean(x^2) + x^2)` with an importance vector), and
  the best fit kept.
* Q2_0 (and TQ2_0): llama.cpp's quantizer uses `max|x|` (so its codes are only
  -1, 0, 1); `quantize` searches by default (`search_scales`: 26 candidate
  scales with least-squares refits, uniform weights), which uses all four
  levels and halves the error (relative RMS 0.72 -> 0.36 on Gaussian rows).
  "minmax" is llama.cpp's rule.
* TQ1_0: llama.cpp's quantizer uses `d = max|x|` and rounds `x / d`, which
  zeroes most of a block (relative RMS error 0.81 on Gaussian rows). Q2_0's
  candidate search applies to the ternary grid, and there it can be solved
  exactly: for a scale `d` a value takes +-1 iff `|x| > d / 2`, so the best
  non-zero set is always the `k` largest magnitudes, and the least-squares
  scale of that set is `sum(w |x|) / sum(w)` over it with error reduction
  `sum(w |x|)^2 / sum(w)`; `search_scales` sorts each block by `|x|` and
  takes the best `k` (0.435 on Gaussian rows; TWN's closed-form threshold,
  the ternary kind's rule elsewhere, gives 0.437, and 0.65 vs 0.59 on
  Student-t rows). So "auto" on TQ1_0 is this search (`searches`); every
  other calibration name keeps the ternary kind's TWN scales
  (`calibrate.sign_scales`). llama.cpp's own rule is not a calibration here:
  its bytes are read code for code and re-written byte for byte, and
  `quantize_with_scale` with `max|x|` scales reproduces them except where
  `x / d` sits within float16 rounding of 1/2.

TQ1_0 QArrays keep llama.cpp's block bytes as their codes (`pack_trits`): per
256 values along the group axis, 48 bytes of 5 trits (values `32 n + m` in
byte m < 32 for n < 5, then `160 + 16 n + m` in byte 32 + m) and 4 bytes of 4
trits (`240 + 4 n + m` in byte 48 + m), trit `t + 1` digits most significant
first, each byte `ceil(q * 256 / 243)` so that trit n is `((b * 3^n) mod 256 * 3)
>> 8`; `nbytes` is 54 per 256 values with the fp16 scale, the GGUF size.
`quantize` (calibration "auto") and GPTQ's group scales call `search_scales`
where `searches(fmt, calibration)`; every other calibration method goes through
`numerics.calibrate`, whose range rules end in `scale_from_range` here.

All-zero blocks get scale 0 (IQ4_NL, Q2_0: ggml's bytes; IQ4_NL has no zero level)
or 1 (MXFP4, whose E8M0 scale cannot be 0; ggml writes byte 0 there); both decode
to zeros. Codes round to the nearest level for the stored scale: IQ4_NL and Q2_0 break
ties upward (ggml's `best_index_int8`), MXFP4 / NVFP4 toward the smaller
magnitude (ggml's `best_index_mxfp4` keeps the first of equal errors).
Dequantization is `levels[code] * scale` in float32, exact for every type, so
it equals ggml's dequantizers bit for bit (float32 denormals aside: XLA
flushes them, so blocks below ~1e-38 decode to 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.numerics import formats as formats_lib
from quantjax.numerics.formats import CODEBOOK_KINDS, QuantFormat

__all__ = ["CODEBOOK_KINDS", "SEARCH_KINDS", "encode", "decode", "scale_from_range",
           "search_scales", "searches", "importance_weights", "e8m0_scale", "ue4m3_scale",
           "check_blocks", "fits", "nearest_level", "stores_trits", "pack_trits",
           "unpack_trits", "TRIT_BLOCK", "TRIT_BLOCK_BYTES"]

# Kinds whose default ("auto") scales come from a least-squares search.
SEARCH_KINDS = ("iq4_nl", "q2_0")
_FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
# Candidate positions for the signed block extreme (in level units): IQ4_NL as ggml's
# quantize_iq4_nl (first 1/d = 127/max, then (itry - 127)/max for itry in -7..7); Q2_0
# both orientations of its asymmetric levels.
_TARGETS = {
    "iq4_nl": (127.0,) + tuple(float(t - 127) for t in range(-7, 8)),
    "q2_0": tuple(round(2.4 - 0.1 * i, 1) for i in range(17)) +
            tuple(round(-0.8 - 0.1 * i, 1) for i in range(9)),
}
_LEVELS = {"iq4_nl": formats_lib.IQ4_NL_LEVELS, "q2_0": formats_lib.Q2_0_LEVELS}
GROUP_MAX_EPS = 1e-15  # ggml: blocks with max|x| below this are all zero
# TQ1_0's code bytes: 256 trits in 48 bytes of 5 (runs of 32 then 16) and 4 bytes of 4.
TRIT_BLOCK = 256
TRIT_BLOCK_BYTES = 52
_TRIT_RUNS = ((0, 160, 5, 32), (160, 240, 5, 16), (240, 256, 4, 4))  # start, stop, trits, bytes


def _safe(d: jax.Array) -> jax.Array:
  return jnp.where(d != 0, d, 1.0)


def nearest_level(v: jax.Array, kind: str) -> jax.Array:
  """Codes (int8) of the levels nearest to `v` (values in level units)."""
  if kind in ("mxfp4", "nvfp4"):
    mids = (_FP4_MAGNITUDES[1:] + _FP4_MAGNITUDES[:-1]) / 2
    m = jnp.zeros(v.shape, jnp.int32)
    a = jnp.abs(v)
    for t in mids:  # ties toward the smaller magnitude
      m = m + (a > t).astype(jnp.int32)
    return jnp.where((v < 0) & (m > 0), m + 8, m).astype(jnp.int8)
  lv = _LEVELS.get(kind)
  if lv is None:
    raise ValueError(f"{kind} is not a codebook kind")
  sums = lv[1:] + lv[:-1]
  v2 = v + v
  idx = jnp.zeros(v.shape, jnp.int32)
  for t in sums:  # ties upward, as ggml's best_index_int8
    idx = idx + (v2 >= t).astype(jnp.int32)
  return idx.astype(jnp.int8)


def encode(xb: jax.Array, fmt: QuantFormat, scale_b: jax.Array) -> jax.Array:
  """Codes (int8 indices into `fmt.levels`) of block-shaped `xb` for block-shaped scales."""
  x = xb.astype(jnp.float32)
  s = scale_b.astype(jnp.float32)
  v = jnp.where(s != 0, x / _safe(s), 0.0)
  return nearest_level(v, fmt.kind)


def decode(codes_b: jax.Array, fmt: QuantFormat, scale_b: jax.Array) -> jax.Array:
  """`levels[code] * scale` in float32 (exact: ggml's dequantizers give the same bits)."""
  lv = jnp.asarray(fmt.levels)
  return lv[codes_b.astype(jnp.int32)] * scale_b.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Scales.

def e8m0_scale(amax: jax.Array) -> jax.Array:
  """MXFP4's block scale, float32: `2^(floor(log2 amax) - 2)` (ggml's
  `quantize_row_mxfp4_ref`; its E8M0 byte is `floor(log2 amax) - 2 + 127`).
  All-zero blocks get 1, NaN stays NaN."""
  amax = jnp.asarray(amax, jnp.float32)
  _, ex = jnp.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
  k = jnp.clip(ex - 3, -126, 127)
  s = jnp.ldexp(jnp.ones_like(amax), k)
  s = jnp.where(amax > 0, s, 1.0)
  return jnp.where(jnp.isnan(amax), jnp.nan, s)


def ue4m3_scale(t: jax.Array) -> jax.Array:
  """`t` (>= 0) rounded to an unsigned E4M3 value as ggml's `ggml_fp32_to_ue4m3` does
  (round half up on the fourth mantissa bit, subnormals to multiples of 2^-9,
  saturating at 448 = byte 0x7E), as float32. NaN stays NaN."""
  t = jnp.asarray(t, jnp.float32)
  nan = jnp.isnan(t)
  pos = t > 0.0
  t = jnp.where(pos, jnp.minimum(t, 448.0), 1.0)
  bits = jax.lax.bitcast_convert_type(t, jnp.uint32)
  e0 = ((bits >> 23) & 0xFF).astype(jnp.int32) - 120  # the float32 exponent + 7
  man = ((bits >> 20) & 0x7).astype(jnp.int32) + ((bits >> 19) & 1).astype(jnp.int32)
  e = jnp.where(man > 7, e0 + 1, e0)
  man = jnp.where(man > 7, 0, man)
  normal = jnp.where(e >= 15, 0x7E, (e << 3) | man)
  sub = jnp.clip(jnp.floor(t * 512.0 + 0.5), 0, 7).astype(jnp.int32)
  byte = jnp.where(e0 <= 0, sub, jnp.where(e0 >= 15, 0x7E, normal))
  byte = jnp.where(pos, byte, 0).astype(jnp.uint8)
  val = jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn).astype(jnp.float32)
  return jnp.where(nan, jnp.nan, val)


def _guard_signed(raw: jax.Array, amax: jax.Array, fmt: QuantFormat) -> jax.Array:
  """A signed scale: |raw| at least the scale dtype's floor, NaN for a block holding NaN
  (as `qarray.scale_from_range` treats scales), and 0 for an all-zero block, as ggml
  writes it (IQ4_NL has no zero level: any other scale would decode zeros as +-d)."""
  # qarray.scale_floor's rule (this module sits below qarray): float16's smallest
  # subnormal for float16 scales, float32's smallest normal number otherwise
  floor = 2.0 ** -24 if jnp.dtype(fmt.scale_dtype) == jnp.float16 else float(
      jnp.finfo(jnp.float32).tiny)
  sign = jnp.where(raw < 0, -1.0, 1.0)
  s = jnp.where(amax > 0, sign * jnp.maximum(jnp.abs(raw), floor), 0.0)
  return jnp.where(jnp.isnan(amax) | jnp.isnan(raw), jnp.nan, s)


def scale_from_range(fmt: QuantFormat, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """llama.cpp's closed-form block scale from the block's range, in `fmt.scale_dtype`.

  MXFP4 `2^(floor(log2 amax) - 2)`; NVFP4 UE4M3(`amax / 6`); IQ4_NL the signed
  extreme over -127 (it maps to the lowest level); Q2_0 `amax` (ggml's
  `quantize_row_q2_0_ref`).
  """
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  amax = jnp.where(jnp.isnan(lo) | jnp.isnan(hi), jnp.nan, amax)
  k = fmt.kind
  if k == "mxfp4":
    s = e8m0_scale(amax)
  elif k == "nvfp4":
    s = ue4m3_scale(amax / 6.0)
  elif k == "iq4_nl":
    ext = jnp.where(-lo > hi, lo, hi)
    s = _guard_signed(ext / float(fmt.levels[0]), amax, fmt)
  elif k == "q2_0":
    s = _guard_signed(amax, amax, fmt)
  else:
    raise ValueError(f"{fmt.name} is not a llama.cpp codebook format")
  return s.astype(fmt.scale_dtype)


def importance_weights(xb: jax.Array, axes: tuple[int, ...], importance_b: jax.Array) -> jax.Array:
  """ggml's error weights with an importance matrix: `imp * sqrt(sigma2 + x^2)`, with
  `sigma2 = 2 mean(x^2)` over the block (`quantize_row_iq4_nl_impl`)."""
  x = xb.astype(jnp.float32)
  sigma2 = 2.0 * jnp.mean(x * x, axis=axes, keepdims=True)
  return importance_b.astype(jnp.float32) * jnp.sqrt(sigma2 + x * x)


def search_scales(xb: jax.Array, axes: tuple[int, ...], fmt: QuantFormat,
                  weights: jax.Array | None = None) -> jax.Array:
  """Weighted least-squares block scales over candidate scales (IQ4_NL, Q2_0).

  For each candidate, the signed block extreme is placed at a target level
  position, every value takes its nearest level, and the scale is refitted to
  `sum(w q x) / sum(w q^2)`; the candidate with the largest `sum(w q x)^2 /
  sum(w q^2)` (the least weighted error) wins, the first on ties (ggml's
  `quantize_row_iq4_nl_impl` with ntry = 7 for IQ4_NL). Default weights: `x^2`
  for IQ4_NL (ggml's, without an importance matrix), 1 for Q2_0. The ternary
  grid (TQ1_0) takes every candidate at once: the exact least-squares scale
  over the sorted magnitudes (`_ternary_scales`).

  Returns the block-shaped scale in `fmt.scale_dtype` (all-zero blocks get 0).
  """
  if fmt.kind not in SEARCH_KINDS and fmt.kind != "ternary":
    raise ValueError(f"no scale search for {fmt.name}; it has a closed-form scale")
  x = xb.astype(jnp.float32)
  if weights is None:
    w = x * x if fmt.kind == "iq4_nl" else jnp.ones_like(x)
  else:
    w = jnp.broadcast_to(weights.astype(jnp.float32), x.shape)
  if fmt.kind == "ternary":
    return _ternary_scales(x, w, axes, fmt)
  lv = jnp.asarray(fmt.levels)
  hi = jnp.max(x, axis=axes, keepdims=True)
  lo = jnp.min(x, axis=axes, keepdims=True)
  ext = jnp.where(-lo > hi, lo, hi)
  amax = jnp.maximum(hi, -lo)
  safe_ext = _safe(ext)

  def fit(t):
    q = lv[nearest_level(x * (t / safe_ext), fmt.kind).astype(jnp.int32)]
    sqx = jnp.sum(w * q * x, axis=axes, keepdims=True)
    sq2 = jnp.sum(w * q * q, axis=axes, keepdims=True)
    return jnp.where(sq2 > 0, sqx / _safe(sq2), 0.0), sqx, sq2

  targets = jnp.asarray(_TARGETS[fmt.kind], jnp.float32)
  d0, sqx0, _ = fit(targets[0])

  def step(carry, t):
    best_d, best = carry
    d, sqx, sq2 = fit(t)
    better = (sq2 > 0) & (sqx * sqx > best * sq2)
    return (jnp.where(better, d, best_d), jnp.where(better, d * sqx, best)), None

  (best_d, _), _ = jax.lax.scan(step, (d0, d0 * sqx0), targets[1:])
  best_d = jnp.where(amax < GROUP_MAX_EPS, 0.0, best_d)
  # A degenerate fit (weights all zero) falls back to the closed-form scale.
  fallback = scale_from_range(fmt, lo, hi).astype(jnp.float32)
  best_d = jnp.where((best_d == 0) & (amax >= GROUP_MAX_EPS), fallback, best_d)
  return _guard_signed(best_d, amax, fmt).astype(fmt.scale_dtype)


def _ternary_scales(x: jax.Array, w: jax.Array, axes: tuple[int, ...],
                    fmt: QuantFormat) -> jax.Array:
  """The weighted least-squares scale of a ternary block, exactly: with the block's
  magnitudes sorted in decreasing order, `k` maximizing `S_k^2 / W_k` (`S_k` the sum of
  the first `k` of `w |x|`, `W_k` of `w`; the first on ties) and `d = S_k / W_k`."""
  nd = x.ndim
  red = sorted(a % nd for a in axes)
  keep = [a for a in range(nd) if a not in red]
  perm = keep + red
  kept = tuple(x.shape[a] for a in keep)
  a = jnp.transpose(jnp.abs(x), perm).reshape(kept + (-1,))
  wt = jnp.transpose(w, perm).reshape(kept + (-1,))
  order = jnp.argsort(-a, axis=-1, stable=True)
  wa = jnp.cumsum(jnp.take_along_axis(a * wt, order, axis=-1), axis=-1)
  ws = jnp.cumsum(jnp.take_along_axis(wt, order, axis=-1), axis=-1)
  gain = jnp.where(ws > 0, wa * wa / jnp.where(ws > 0, ws, 1.0), 0.0)
  k = jnp.argmax(gain, axis=-1)[..., None]
  sk, wk = jnp.take_along_axis(wa, k, axis=-1), jnp.take_along_axis(ws, k, axis=-1)
  amax = a.max(axis=-1, keepdims=True)
  # A degenerate fit (weights all zero) falls back to llama.cpp's max|x|.
  d = jnp.where((wk > 0) & (sk > 0), sk / jnp.where(wk > 0, wk, 1.0), amax)
  d = jnp.where(amax < GROUP_MAX_EPS, 0.0, d)
  kshape = tuple(1 if i in red else x.shape[i] for i in range(nd))
  inv = np.argsort(perm)
  d = jnp.transpose(d.reshape(kept + (1,) * len(red)), inv).reshape(kshape)
  amax = jnp.transpose(amax.reshape(kept + (1,) * len(red)), inv).reshape(kshape)
  return _guard_signed(d, amax, fmt).astype(fmt.scale_dtype)


def searches(fmt: QuantFormat, calibration: Any) -> bool:
  """True when `calibration` (a `calibrate.Calibration` or a method name) means
  `search_scales` for `fmt`: "auto" on IQ4_NL / Q2_0 / TQ2_0 and on TQ1_0 (the ternary
  format that is exactly llama.cpp's type; other ternary formats keep TWN). Every other
  method, and every other kind, takes the range rules of `calibrate` (which end in
  `scale_from_range`)."""
  method = getattr(calibration, "method", calibration)
  if method not in ("auto", None):
    return False
  return fmt.kind in SEARCH_KINDS or stores_trits(fmt)


# ----------------------------------------------------------------------------
# TQ1_0's trits, 5 per byte (numpy or jax arrays alike).

def stores_trits(fmt: QuantFormat) -> bool:
  """True when `fmt` is llama.cpp's TQ1_0 (ternary, blocks of 256, fp16 scales), whose
  QArray codes are kept as TQ1_0's code bytes (`pack_trits`) rather than 2-bit fields."""
  return fmt.llamacpp_type == "TQ1_0"


def _xp(a):
  return np if isinstance(a, np.ndarray) else jnp


def pack_trits(codes, axis: int = -1):
  """Ternary codes (-1, 0, 1; any integer dtype) -> uint8 TQ1_0 code bytes along `axis`,
  `TRIT_BLOCK_BYTES` per `TRIT_BLOCK` codes (whose multiple that axis must be). Numpy in,
  numpy out; otherwise jax."""
  xp = _xp(codes)
  u = xp.moveaxis(codes, axis, -1).astype(xp.int32) + 1
  n = u.shape[-1]
  if n % TRIT_BLOCK:
    raise ValueError(f"TQ1_0 packs trits in blocks of {TRIT_BLOCK}: an axis of {n} codes is "
                     "not a whole number of them")
  u = u.reshape(u.shape[:-1] + (n // TRIT_BLOCK, TRIT_BLOCK))
  parts = []
  for start, stop, per, nbytes in _TRIT_RUNS:
    run = u[..., start:stop].reshape(u.shape[:-1] + (per, nbytes))
    q = xp.zeros(run.shape[:-2] + (nbytes,), xp.int32)
    for j in range(per):  # value start + j * nbytes + m is trit j of byte m, most significant first
      q = q * 3 + run[..., j, :]
    q = q * 3 ** (5 - per)  # qh: the four trits sit in the top digits
    parts.append((q * 256 + 242) // 243)  # ceil(q * 256 / 243): trits come back by multiply-shift
  out = xp.concatenate(parts, axis=-1).astype(xp.uint8)
  out = out.reshape(out.shape[:-2] + (-1,))
  return xp.moveaxis(out, -1, axis)


def unpack_trits(packed, axis: int = -1):
  """Inverse of `pack_trits`: uint8 TQ1_0 code bytes -> int8 codes (-1, 0, 1) along `axis`
  (`TRIT_BLOCK` per `TRIT_BLOCK_BYTES` bytes). Every byte decodes, as in ggml's
  `dequantize_row_tq1_0`: trit n of byte b is `((b * 3^n) mod 256 * 3) >> 8`."""
  xp = _xp(packed)
  b = xp.moveaxis(packed, axis, -1).astype(xp.int32)
  n = b.shape[-1]
  if n % TRIT_BLOCK_BYTES:
    raise ValueError(f"TQ1_0 code bytes come in blocks of {TRIT_BLOCK_BYTES}: an axis of {n} "
                     "bytes is not a whole number of them")
  b = b.reshape(b.shape[:-1] + (n // TRIT_BLOCK_BYTES, TRIT_BLOCK_BYTES))
  parts, lo = [], 0
  for _, _, per, nbytes in _TRIT_RUNS:
    run = b[..., lo:lo + nbytes]
    lo += nbytes
    parts += [((run * 3 ** j) % 256 * 3) >> 8 for j in range(per)]
  u = xp.concatenate(parts, axis=-1)
  u = u.reshape(u.shape[:-2] + (-1,))
  return xp.moveaxis((u - 1).astype(xp.int8), -1, axis)


def fits(shape, fmt: QuantFormat) -> bool:
  """True when an array of `shape` can be stored in `fmt` without padding: whole groups
  along the group axis, and whole GGUF blocks for llama.cpp's block types (NVFP4: 64)."""
  if not shape or fmt.granularity != "group":
    return True
  n = int(shape[fmt.group_axis % len(shape)])
  t = fmt.llamacpp_type
  block = formats_lib.LLAMACPP_BLOCKS[t.lower()] if t is not None else int(fmt.group_size)
  return n % int(fmt.group_size) == 0 and n % block == 0


def check_blocks(shape, fmt: QuantFormat, name: str = "array") -> None:
  """Raises a ValueError naming `name`, its row length (the group axis) and the llama.cpp
  types that fit, when `fmt` is a llama.cpp block type (`fmt.llamacpp_type`) whose GGUF
  block (64 values for NVFP4, whose scales cover 16) does not divide that axis."""
  t = fmt.llamacpp_type
  if t is None or not shape:
    return
  ax = fmt.group_axis % len(shape)
  n = int(shape[ax])
  block = formats_lib.LLAMACPP_BLOCKS[t.lower()]
  if n % block:
    fit = [k.upper() for k, b in formats_lib.LLAMACPP_BLOCKS.items() if n % b == 0]
    raise ValueError(f"cannot quantize {name} (shape {tuple(shape)}) to {t}: its rows along "
                     f"axis {ax} hold {n} values, not a multiple of {t}'s GGUF blocks of "
                     f"{block}; llama.cpp types that fit rows of {n}: "
                     f"{', '.join(fit) if fit else 'none'}"
                     + (" (and Q8_0/Q4_0/Q4_1/Q5_0/Q5_1)" if n % 32 == 0 else ""))
