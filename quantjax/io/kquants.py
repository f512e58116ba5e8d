"""Encoders for llama.cpp's k-quant GGUF types: Q4_K, Q5_K and Q6_K.

k-quants group values in super-blocks of 256 (`QK_K`) with two levels of
scales: Q4_K/Q5_K split a super-block into 8 sub-blocks of 32, each with a
6-bit scale and a 6-bit minimum (`x ~ d*sc*q - dmin*m`, q in [0, 15] or
[0, 31]) under fp16 super-scales `d` and `dmin`; Q6_K has 16 sub-blocks of
16 with int8 scales under one fp16 `d` (`x ~ d*sc*(q - 32)`, q in [0, 63]).
The byte layouts follow ggml's `block_q4_K` / `block_q5_K` / `block_q6_K`
(as `gguf.quants` decodes them; tests round-trip through it).

Sub-block parameters are fitted by weighted least squares over a small grid
of candidate scales (the search llama.cpp's reference quantizer describes;
weights `|x| + rms` for Q4_K/Q5_K, `x^2` for Q6_K), then the sub-block
scales are themselves quantized to 6 or 8 bits and the codes recomputed
against the rounded scales. An optional per-column `importance` (for
example mean squared activations, llama.cpp's "imatrix") multiplies the
weights.

Everything is numpy on `[rows, n]` float32 with `n % 256 == 0`; each
function returns `[rows, n / 256 * block_bytes]` uint8.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QK_K", "K_BLOCK_BYTES", "quantize_k", "quantize_q4_k", "quantize_q5_k",
           "quantize_q6_k", "fit_symmetric_blocks"]

QK_K = 256
K_BLOCK_BYTES = {"Q4_K": 2 + 2 + 12 + QK_K // 2,
                 "Q5_K": 2 + 2 + 12 + QK_K // 8 + QK_K // 2,
                 "Q6_K": QK_K // 2 + QK_K // 4 + QK_K // 16 + 2}


def _super_blocks(x: np.ndarray, importance: np.ndarray | None, name: str):
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[1] % QK_K:
    raise ValueError(f"{name} needs rows whose length is a multiple of {QK_K}, got shape {x.shape}")
  rows, n = x.shape
  return x.reshape(-1, QK_K), _importance_blocks(importance, rows, n, QK_K, name), rows


def _importance_blocks(importance, rows: int, n: int, block: int, name: str):
  """Per-column importance `[n]` broadcast to the rows and cut like them: `[-1, block]`."""
  if importance is None:
    return None
  imp = np.asarray(importance, np.float32).reshape(-1)
  if imp.shape[0] != n:
    raise ValueError(f"{name}: importance has {imp.shape[0]} values for rows of {n}")
  return np.broadcast_to(imp, (rows, n)).reshape(-1, block)


def _fit_affine(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
  """Per row of `x` [S, L]: scale a >= 0 and min m >= 0 with x ~ a*q - m, q in [0, nmax]."""
  xmin = np.minimum(x.min(axis=1), 0.0)
  xmax = x.max(axis=1)
  span = xmax - xmin
  flat = span <= 0
  safe = np.where(flat, 1.0, span)
  # start: plain min-max
  best_a = span / nmax
  best_b = xmin
  q0 = np.clip(np.rint((x - xmin[:, None]) * (nmax / safe)[:, None]), 0, nmax)
  best_err = np.sum(w * (best_a[:, None] * q0 + best_b[:, None] - x) ** 2, axis=1)
  sw = w.sum(axis=1)
  swx = (w * x).sum(axis=1)
  for step in range(nstep + 1):
    iscale = (rmin + rdelta * step + nmax) / safe
    q = np.clip(np.rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    swq = (w * q).sum(axis=1)
    swq2 = (w * q * q).sum(axis=1)
    swqx = (w * q * x).sum(axis=1)
    det = sw * swq2 - swq * swq
    ok = det > 0
    det = np.where(ok, det, 1.0)
    a = (sw * swqx - swq * swx) / det
    b = (swq2 * swx - swq * swqx) / det
    pos = b > 0  # the minimum must not be positive: x ~ a*q - m with m >= 0
    a = np.where(pos, swqx / np.where(swq2 > 0, swq2, 1.0), a)
    b = np.where(pos, 0.0, b)
    err = np.sum(w * (a[:, None] * q + b[:, None] - x) ** 2, axis=1)
    better = ok & (a > 0) & (err < best_err)
    best_a = np.where(better, a, best_a)
    best_b = np.where(better, b, best_b)
    best_err = np.where(better, err, best_err)
  best_a = np.where(flat, 0.0, best_a)
  return best_a, -best_b


def _fp16(v: np.ndarray) -> np.ndarray:
  return v.astype(np.float16).astype(np.float32)


def _affine_k(x, importance, bits: int, name: str):
  """Shared Q4_K / Q5_K fit: codes [B, 8, 32], 6-bit scales/mins [B, 8], fp16 d, dmin [B], rows."""
  nmax = 2 ** bits - 1
  xb, imp, rows = _super_blocks(x, importance, name)
  nb = xb.shape[0]
  sub = xb.reshape(nb * 8, 32)
  rms = np.sqrt(np.mean(sub * sub, axis=1, keepdims=True))
  w = np.abs(sub) + rms
  if imp is not None:
    w = w * imp.reshape(nb * 8, 32)
  rmin, rdelta, nstep = (-1.0, 0.1, 20) if bits == 4 else (-0.5, 0.1, 15)
  a, m = _fit_affine(sub, w, nmax, rmin, rdelta, nstep)
  a, m = a.reshape(nb, 8), m.reshape(nb, 8)
  d = _fp16(a.max(axis=1) / 63.0)
  dmin = _fp16(m.max(axis=1) / 63.0)
  ls = np.clip(np.rint(a / np.where(d > 0, d, 1.0)[:, None]), 0, 63).astype(np.uint8)
  lm = np.clip(np.rint(m / np.where(dmin > 0, dmin, 1.0)[:, None]), 0, 63).astype(np.uint8)
  step = d[:, None] * ls  # [B, 8]
  off = dmin[:, None] * lm
  xs = xb.reshape(nb, 8, 32)
  q = np.rint((xs + off[..., None]) / np.where(step > 0, step, 1.0)[..., None])
  q = np.where(step[..., None] > 0, np.clip(q, 0, nmax), 0).astype(np.uint8)
  return q, ls, lm, d, dmin, rows


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
  """8 six-bit scales and mins per super-block -> 12 bytes (ggml's k-quant scale layout)."""
  out = np.empty(ls.shape[:-1] + (12,), np.uint8)
  out[..., 0:4] = (ls[..., 0:4] & 0x3F) | ((ls[..., 4:8] >> 4) << 6)
  out[..., 4:8] = (lm[..., 0:4] & 0x3F) | ((lm[..., 4:8] >> 4) << 6)
  out[..., 8:12] = (ls[..., 4:8] & 0x0F) | ((lm[..., 4:8] & 0x0F) << 4)
  return out


def _f16_bytes(v: np.ndarray) -> np.ndarray:
  return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibble_pairs(q: np.ndarray) -> np.ndarray:
  """[B, 8, 32] codes -> [B, 128] bytes: sub-blocks 2c / 2c+1 in the low / high nibbles."""
  lo = q[:, 0::2, :] & 0x0F
  hi = q[:, 1::2, :] & 0x0F
  return (lo | (hi << 4)).reshape(q.shape[0], 128)


def quantize_q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
  q, ls, lm, d, dmin, rows = _affine_k(x, importance, 4, "Q4_K")
  blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(ls, lm), _nibble_pairs(q)],
                          axis=1)
  return blocks.reshape(rows, -1)


def quantize_q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
  q, ls, lm, d, dmin, rows = _affine_k(x, importance, 5, "Q5_K")
  # qh[l]: bit s = the fifth bit of sub-block s's value l
  high = ((q >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
  qh = np.bitwise_or.reduce(high, axis=1)  # [B, 32]
  blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(ls, lm), qh,
                           _nibble_pairs(q)], axis=1)
  return blocks.reshape(rows, -1)


def _fit_symmetric(x: np.ndarray, w: np.ndarray, nmax: int, nstep: int = 9):
  """Per row: scale s (signed) with x ~ s*q, q in [-nmax, nmax - 1]; weighted least squares."""
  idx = np.argmax(np.abs(x), axis=1)
  mx = x[np.arange(x.shape[0]), idx]
  zero = mx == 0
  safe = np.where(zero, 1.0, mx)
  best_s = np.zeros(x.shape[0], np.float32)
  best_err = np.full(x.shape[0], np.inf, np.float32)
  for step in range(-nstep, nstep + 1):
    iscale = -(nmax + 0.1 * step) / safe
    q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
    swq2 = (w * q * q).sum(axis=1)
    s = (w * q * x).sum(axis=1) / np.where(swq2 > 0, swq2, 1.0)
    err = np.sum(w * (s[:, None] * q - x) ** 2, axis=1)
    better = err < best_err
    best_s = np.where(better, s, best_s)
    best_err = np.where(better, err, best_err)
  return np.where(zero, 0.0, best_s)


def fit_symmetric_blocks(x: np.ndarray, bits: int, importance: np.ndarray | None = None,
                         block: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Importance-weighted scales for the legacy symmetric types (Q4_0: 4 bits, Q5_0: 5).

  `x` `[rows, n]`; returns `(codes [rows, n] in [-2^(b-1), 2^(b-1) - 1], fp16-rounded
  scales [rows, n / block])`. Weights per value: `importance * sqrt(rms^2 + x^2)`
  over a search of scales around the signed-max rule (extreme value -> lowest code).
  """
  x = np.asarray(x, np.float32)
  rows, n = x.shape
  if n % block:
    raise ValueError(f"rows of {n} values do not fill blocks of {block}")
  xb = x.reshape(-1, block)
  rms2 = np.mean(xb * xb, axis=1, keepdims=True)
  w = np.sqrt(rms2 + xb * xb)
  imp = _importance_blocks(importance, rows, n, block, f"Q{bits}_0 blocks")
  if imp is not None:
    w = w * imp
  half = 2 ** (bits - 1)
  d = _fp16(_fit_symmetric(xb, w, half))
  q = np.clip(np.rint(xb / np.where(d != 0, d, 1.0)[:, None]), -half, half - 1)
  q = np.where(d[:, None] != 0, q, 0)
  return q.reshape(rows, n).astype(np.int8), d.reshape(rows, n // block)


def quantize_q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
  xb, imp, rows = _super_blocks(x, importance, "Q6_K")
  nb = xb.shape[0]
  sub = xb.reshape(nb * 16, 16)
  w = sub * sub
  if imp is not None:
    w = w * imp.reshape(nb * 16, 16)
  w = w + 1e-12  # an all-zero sub-block still has a (zero) least-squares answer
  s = _fit_symmetric(sub, w, 32).reshape(nb, 16)
  pick = np.argmax(np.abs(s), axis=1)
  smax = s[np.arange(nb), pick]
  iscale = np.where(smax != 0, -128.0 / np.where(smax != 0, smax, 1.0), 0.0)
  d = _fp16(np.where(iscale != 0, 1.0 / np.where(iscale != 0, iscale, 1.0), 0.0))
  sc = np.clip(np.rint(iscale[:, None] * s), -128, 127).astype(np.int8)
  step = d[:, None] * sc.astype(np.float32)  # [B, 16]
  xs = xb.reshape(nb, 16, 16)
  q = np.rint(xs / np.where(step != 0, step, 1.0)[..., None])
  q = np.where(step[..., None] != 0, np.clip(q, -32, 31), 0)
  u = (q + 32).astype(np.uint8).reshape(nb, 2, 128)  # two halves of 128 values
  ql = (u[:, :, 0:64] & 0x0F) | ((u[:, :, 64:128] & 0x0F) << 4)  # [B, 2, 64]
  top = (u >> 4).reshape(nb, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
  qh = np.bitwise_or.reduce(top, axis=2)  # [B, 2, 32]
  blocks = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                           _f16_bytes(d)], axis=1)
  return blocks.reshape(rows, -1)


_ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_k(x: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
  """Encodes rows `[rows, n]` as k-quant type `name` ("Q4_K", "Q5_K", "Q6_K")."""
  if name not in _ENCODERS:
    raise ValueError(f"unknown k-quant type {name!r}; supported: {', '.join(_ENCODERS)}")
  return _ENCODERS[name](x, importance)
