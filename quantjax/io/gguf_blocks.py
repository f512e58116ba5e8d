"""GGUF block types and their codecs: the legacy block types (`BLOCK_TYPES`, the
table in `quantjax.io.gguf`), their `QuantFormat` equivalents, rows of codes <-> rows of
blocks, QArray <-> blocks, and llama.cpp's Q/K row permutation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from quantjax.io import gguf_codebook
from quantjax.io.gguf_file import whole_blocks
from quantjax.io.gguf_read import GGUFError
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import QArray


QK = 32  # values per block of every legacy type


@dataclasses.dataclass(frozen=True)
class BlockType:
  name: str
  bits: int
  symmetric: bool
  block_bytes: int


BLOCK_TYPES: dict[str, BlockType] = {
    "Q8_0": BlockType("Q8_0", 8, True, 2 + QK),
    "Q4_0": BlockType("Q4_0", 4, True, 2 + QK // 2),
    "Q4_1": BlockType("Q4_1", 4, False, 4 + QK // 2),
    "Q5_0": BlockType("Q5_0", 5, True, 2 + 4 + QK // 2),
    "Q5_1": BlockType("Q5_1", 5, False, 4 + 4 + QK // 2),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# k-quants (super-blocks of 256; `quantjax.io.kquants`): written from float
# weights, on rows that are multiples of 256 (other rows: an error naming the
# tensor and the types that fit).
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
# llama.cpp's newer block types (`gguf_codebook`): IQ4_NL, MXFP4, NVFP4, Q1_0, Q2_0, TQ2_0,
# TQ1_0.
CODEBOOK_TYPES = tuple(gguf_codebook.TYPES)
ALL_TYPES = tuple(BLOCK_TYPES) + CODEBOOK_TYPES + K_TYPES + FLOAT_TYPES


def block_type(name: str) -> BlockType:
  if name not in BLOCK_TYPES:
    raise GGUFError(f"unknown GGUF block type {name!r}; supported: "
                    f"{', '.join(list(BLOCK_TYPES) + list(FLOAT_TYPES))}")
  return BLOCK_TYPES[name]


def block_format(name: str, axis: int = 0) -> QuantFormat:
  """The `QuantFormat` that is GGUF type `name` with blocks along `axis`.

  `axis` is the contraction axis: 0 for `[in, out]` kernels, 1 for `[vocab, d]`
  embedding tables. `QuantFormat.parse("q4_0")` is the axis-0 format. The newer
  types (IQ4_NL, MXFP4, NVFP4, Q2_0, Q1_0, TQ2_0, TQ1_0) are accepted too.
  """
  if name in gguf_codebook.TYPES:
    return gguf_codebook.TYPES[name].format(axis)
  block_type(name)
  return QuantFormat.parse(name.lower(), group_axis=axis, channel_axis=1 - axis)


def block_type_of(fmt: QuantFormat, axis: int, ndim: int = 2) -> str | None:
  """The GGUF block type `fmt` is exactly, with blocks along `axis`; else None."""
  if fmt.gguf_type is None or fmt.group_axis % ndim != axis % ndim:
    return None
  return fmt.gguf_type


# ----------------------------------------------------------------------------
# Rows of codes <-> rows of blocks (numpy; rows are `[..., n]`, blocks along n).


def _code_offset(bt: BlockType) -> int:
  # Symmetric types store u = q + 2^(bits-1) (Q8_0 stores q itself as int8).
  return 0 if (not bt.symmetric or bt.bits == 8) else 2 ** (bt.bits - 1)


def pack_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, name: str) -> np.ndarray:
  """Integer codes `[rows, n]` + fp16 scales (and minima) `[rows, n/32]` -> uint8 blocks.

  Codes are in the `QuantFormat`'s range: signed for Q8_0/Q4_0/Q5_0, unsigned
  for Q4_1/Q5_1. Returns `[rows, n/32 * block_bytes]` uint8.
  """
  bt = block_type(name)
  codes = np.asarray(codes)
  rows, n = codes.shape
  if n % QK:
    raise GGUFError(f"rows of {n} values do not fit {name}'s blocks of {QK}")
  nb = n // QK
  d = np.asarray(d, np.float16).reshape(rows, nb, 1)
  lo_code = -(2 ** (bt.bits - 1)) if bt.symmetric else 0
  hi_code = lo_code + 2 ** bt.bits - 1
  if codes.size and (codes.min() < lo_code or codes.max() > hi_code):
    raise GGUFError(f"{name} codes must lie in [{lo_code}, {hi_code}], got "
                    f"[{codes.min()}, {codes.max()}]")
  q = codes.astype(np.int32).reshape(rows, nb, QK)
  head = [d.view(np.uint8)]
  if not bt.symmetric:
    if m is None:
      raise GGUFError(f"{name} needs a minimum per block")
    head.append(np.asarray(m, np.float16).reshape(rows, nb, 1).view(np.uint8))
  if bt.bits == 8:
    body = [q.astype(np.int8).view(np.uint8)]
  else:
    u = (q + _code_offset(bt)).astype(np.uint8)
    lo = u & 0x0F
    qs = lo[..., :QK // 2] | (lo[..., QK // 2:] << 4)
    body = [qs]
    if bt.bits == 5:
      hi = ((u >> 4) & 1).astype(np.uint32) << np.arange(QK, dtype=np.uint32)
      qh = np.bitwise_or.reduce(hi, axis=-1, keepdims=True).astype("<u4")
      body = [qh.view(np.uint8), qs]
  return np.concatenate(head + body, axis=-1).reshape(rows, nb * bt.block_bytes)


def unpack_blocks(raw: np.ndarray, name: str):
  """Inverse of `pack_blocks`: uint8 `[rows, bytes]` -> `(codes, d, m_or_None)`."""
  bt = block_type(name)
  raw = np.asarray(raw)
  b = whole_blocks(raw[None] if raw.ndim == 1 else raw, name, bt.block_bytes)
  rows = b.shape[0]
  d = b[..., 0:2].copy().view(np.float16)[..., 0]
  off = 2
  m = None
  if not bt.symmetric:
    m = b[..., 2:4].copy().view(np.float16)[..., 0]
    off = 4
  if bt.bits == 8:
    q = b[..., off:].copy().view(np.int8).astype(np.int16)
  else:
    hi = None
    if bt.bits == 5:
      qh = b[..., off:off + 4].copy().view("<u4")
      hi = ((qh >> np.arange(QK, dtype=np.uint32)) & 1).astype(np.int16)
      off += 4
    qs = b[..., off:].astype(np.int16)
    u = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    if hi is not None:
      u = u | (hi << 4)
    q = u - _code_offset(bt)
  return q.reshape(rows, -1).astype(np.int8), d, m


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert-time Q/K row permutation (rows of `[out, ...]`).

  Inverse of `quantjax.io.gguf_dequant.unpermute_qk`; applies to codes, scales and
  minima alike since it only moves whole rows.
  """
  head = w.shape[0] // n_head
  return w.reshape(n_head, 2, head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qarray_to_blocks(q: QArray, name: str, axis: int, *, rows_fn=None) -> np.ndarray:
  """A 2-D QArray of format `block_format(name, axis)` -> uint8 rows of blocks.

  Rows are the non-contraction axis (GGUF's `[out, in]`). `rows_fn` (e.g. the
  Q/K permutation) is applied to codes, scales and minima as rows.
  """
  if block_type_of(q.fmt, axis) != name:
    raise GGUFError(f"QArray format {q.fmt.name} (group axis {q.fmt.group_axis}, scale dtype "
                    f"{jnp.dtype(q.fmt.scale_dtype).name}) is not GGUF {name} along axis {axis}")
  codes = np.asarray(q.codes())
  d = np.asarray(q.scale)
  if name in gguf_codebook.TYPES:
    if axis == 0:
      codes, d = codes.T, d.T
    if rows_fn is not None:
      codes, d = rows_fn(codes), rows_fn(d)
    return gguf_codebook.pack(codes, d, name)
  m = None if q.zero_point is None else np.asarray(q.zero_point)
  if axis == 0:
    codes, d = codes.T, d.T
    m = None if m is None else m.T
  if rows_fn is not None:
    codes, d = rows_fn(codes), rows_fn(d)
    m = None if m is None else rows_fn(m)
  return pack_blocks(codes, d, m, name)


def blocks_to_qarray(raw: np.ndarray, name: str, axis: int, *, rows_fn=None,
                     dtype: Any = jnp.float32) -> QArray:
  """uint8 rows of blocks `[rows, bytes]` -> QArray (blocks along `axis`), no dequantization."""
  if name in gguf_codebook.TYPES:
    codes, d = gguf_codebook.unpack(raw, name)
    if rows_fn is not None:
      codes, d = rows_fn(codes), rows_fn(d)
    if axis == 0:
      codes, d = codes.T, d.T
    return QArray.from_codes(jnp.asarray(np.ascontiguousarray(codes)), block_format(name, axis),
                             jnp.asarray(np.ascontiguousarray(d)), dtype=dtype)
  codes, d, m = unpack_blocks(raw, name)
  if rows_fn is not None:
    codes, d = rows_fn(codes), rows_fn(d)
    m = None if m is None else rows_fn(m)
  if axis == 0:
    codes, d = codes.T, d.T
    m = None if m is None else m.T
  fmt = block_format(name, axis)
  return QArray.from_codes(jnp.asarray(np.ascontiguousarray(codes)), fmt,
                           jnp.asarray(np.ascontiguousarray(d)),
                           None if m is None else jnp.asarray(np.ascontiguousarray(m)),
                           dtype=dtype)
