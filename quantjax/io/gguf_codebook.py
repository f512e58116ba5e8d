"""GGUF blocks of llama.cpp's newer types <-> quantjax codes and scales.

The formats are `quantjax.numerics.llamacpp_types`' (IQ4_NL, MXFP4, NVFP4,
Q2_0, TQ2_0), binary signs for Q1_0 and ternary codes for TQ1_0; their codes
and scales go into the bytes of
ggml's blocks (`ggml/src/ggml-common.h`) one for one, so a QArray of such a
format is written code for code and read back without dequantizing:

======  =======  ==========  ==================================================
type    ggml id  block       bytes of one block
======  =======  ==========  ==================================================
IQ4_NL  20       32 values   fp16 d; 16 bytes: code j low nibble of byte j,
                             code j + 16 its high nibble
MXFP4   39       32 values   E8M0 byte e; 16 bytes of nibbles as IQ4_NL
NVFP4   40       64 values   4 UE4M3 bytes (one per 16 values); 32 bytes: for
                             sub-block s, byte 8s + j holds codes 16s + j (low)
                             and 16s + j + 8 (high)
Q1_0    41       128 values  fp16 d; 16 bytes: bit j % 8 of byte j / 8 set
                             when value j is +d (clear: -d)
Q2_0    42       64 values   fp16 d; 16 bytes: code j in bits 2 (j % 4) of
                             byte j / 4; value (code - 1) * d
TQ2_0   35       256 values  64 bytes, then fp16 d: in each run of 128 values,
                             byte m holds codes m, m + 32, m + 64, m + 96 in
                             bits 0-1, 2-3, 4-5, 6-7; value (code - 1) * d
TQ1_0   34       256 values  48 bytes qs, 4 bytes qh, then fp16 d: trits t + 1
                             (t = -1, 0, 1; value t * d) in base 3, most
                             significant first: qs byte m < 32 holds values
                             m, m + 32, ..., m + 128, byte 32 + m values 160 +
                             m, 176 + m, ..., 224 + m; qh byte m holds 240 + m,
                             244 + m, 248 + m, 252 + m (and a fifth trit 0);
                             each byte is ceil(q * 256 / 243) of its base-3
                             number q (`llamacpp_types.pack_trits`)
======  =======  ==========  ==================================================

Any byte decodes in TQ1_0 (ggml's multiply-shift): a file whose bytes are not
ceil(q * 256 / 243) for their trits (no llama.cpp quantizer writes one) is read
at its values and re-written in the canonical bytes.

Q2_0 is newer than gguf-py 0.19 (`gguf.GGMLQuantizationType` has no 42), so
its id, block and size are kept here (`EXTRA_GGML_TYPES`) for the reader and
the writer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from quantjax.io.gguf_file import whole_blocks
from quantjax.io.gguf_read import EXTRA_GGML_TYPES, GGUFError
from quantjax.numerics import llamacpp_types
from quantjax.numerics.formats import QuantFormat

__all__ = ["CodebookType", "TYPES", "EXTRA_GGML_TYPES", "pack", "unpack", "dequantize"]


@dataclasses.dataclass(frozen=True)
class CodebookType:
  name: str
  ggml_id: int
  block: int        # values per GGUF block
  type_size: int    # bytes per GGUF block
  spec: str         # the QuantFormat spec

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.type_size / self.block

  def format(self, axis: int = 0) -> QuantFormat:
    return QuantFormat.parse(self.spec, group_axis=axis, channel_axis=1 - axis)


TYPES: dict[str, CodebookType] = {
    "IQ4_NL": CodebookType("IQ4_NL", 20, 32, 2 + 16, "iq4_nl"),
    "MXFP4": CodebookType("MXFP4", 39, 32, 1 + 16, "mxfp4"),
    "NVFP4": CodebookType("NVFP4", 40, 64, 4 + 32, "nvfp4"),
    "Q1_0": CodebookType("Q1_0", 41, 128, 2 + 16, "q1_0"),
    "Q2_0": CodebookType("Q2_0", 42, 64, 2 + 16, "q2_0"),
    "TQ2_0": CodebookType("TQ2_0", 35, 256, 64 + 2, "tq2_0"),
    "TQ1_0": CodebookType("TQ1_0", 34, 256, 48 + 4 + 2, "tq1_0"),
}


def _type(name: str) -> CodebookType:
  if name not in TYPES:
    raise GGUFError(f"unknown llama.cpp codebook type {name!r}; supported: {', '.join(TYPES)}")
  return TYPES[name]


def _scale_dtype(name: str):
  return np.dtype(_type(name).format().scale_dtype)


def _nibbles(codes: np.ndarray, half: int) -> np.ndarray:
  """[..., 2*half] codes -> [..., half] bytes: code j low nibble, code j + half high."""
  return (codes[..., :half] & 0x0F) | ((codes[..., half:] & 0x0F) << 4)


def _from_nibbles(qs: np.ndarray) -> np.ndarray:
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack(codes: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
  """Codes `[rows, n]` (the QuantFormat's: level indices 0..15 for IQ4_NL / MXFP4 /
  NVFP4, 0..3 for Q2_0 / TQ2_0, -1/+1 for Q1_0, -1/0/+1 for TQ1_0) and scales `[rows, n / group]` (in the format's
  scale dtype) -> uint8 GGUF blocks `[rows, n / block * type_size]`."""
  ct = _type(name)
  codes = np.asarray(codes)
  rows, n = codes.shape
  if n % ct.block:
    raise GGUFError(f"rows of {n} values do not fill {name}'s blocks of {ct.block}")
  nb = n // ct.block
  fmt = ct.format()
  lo, hi = (-1, 1) if name == "Q1_0" else (fmt.qmin, fmt.qmax)
  if codes.size and (codes.min() < lo or codes.max() > hi or
                     (name == "Q1_0" and np.any(codes == 0))):
    raise GGUFError(f"{name} codes must lie in {'{-1, +1}' if name == 'Q1_0' else [lo, hi]}, "
                    f"got [{codes.min()}, {codes.max()}]")
  sdt = _scale_dtype(name)
  s = np.asarray(scales)
  if s.dtype != sdt:
    s = s.astype(np.float32).astype(sdt)
  s = np.ascontiguousarray(s).reshape(rows, n // fmt.group_size)
  sbytes = s.view(np.uint8)
  if name == "MXFP4" and np.any(sbytes == 0xFF):
    raise GGUFError("MXFP4 scales must be finite powers of two (E8M0 byte 255 is NaN)")
  if name == "NVFP4" and np.any(sbytes >= 0x7F):
    raise GGUFError("NVFP4 scales must be non-negative finite UE4M3 values (bytes 0..0x7E)")
  u = codes.astype(np.int16).reshape(rows, nb, ct.block)
  if name in ("IQ4_NL", "MXFP4"):
    head = sbytes.reshape(rows, nb, -1)
    body = _nibbles(u.astype(np.uint8), 16)
  elif name == "NVFP4":
    head = sbytes.reshape(rows, nb, 4)
    body = _nibbles(u.astype(np.uint8).reshape(rows, nb, 4, 16), 8).reshape(rows, nb, 32)
  elif name == "Q2_0":
    head = sbytes.reshape(rows, nb, 2)
    c = u.astype(np.uint8).reshape(rows, nb, 16, 4)
    body = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
  elif name == "TQ2_0":  # the scale goes last
    c = u.astype(np.uint8).reshape(rows, nb, 2, 4, 32)
    body = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    out = np.concatenate([body.reshape(rows, nb, 64), sbytes.reshape(rows, nb, 2)], axis=-1)
    return out.reshape(rows, nb * ct.type_size)
  elif name == "TQ1_0":  # 52 code bytes, then the scale
    body = llamacpp_types.pack_trits(u.reshape(rows, n)).reshape(rows, nb, 52)
    out = np.concatenate([body, sbytes.reshape(rows, nb, 2)], axis=-1)
    return out.reshape(rows, nb * ct.type_size)
  else:  # Q1_0
    head = sbytes.reshape(rows, nb, 2)
    bits = (u > 0).astype(np.uint8).reshape(rows, nb, 16, 8)
    body = np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8), axis=-1)
  out = np.concatenate([head, body.astype(np.uint8)], axis=-1)
  return out.reshape(rows, nb * ct.type_size)


def unpack(raw: np.ndarray, name: str, *, what: str = "tensor"):
  """Inverse of `pack`: uint8 `[rows, bytes]` -> `(codes int8 [rows, n], scales [rows, n /
  group] in the format's scale dtype)`. Scale bytes that the format's dtype would read
  differently from llama.cpp (MXFP4's 255; NVFP4's bytes >= 0x7F, which llama.cpp reads
  without their sign bit, or as 0) are refused, naming `what`."""
  ct = _type(name)
  raw = np.asarray(raw)
  b = whole_blocks(raw[None] if raw.ndim == 1 else raw, name, ct.type_size, what)
  rows, nb = b.shape[:2]
  sdt = _scale_dtype(name)
  if name in ("IQ4_NL", "Q1_0", "Q2_0"):
    sbytes, body = b[..., :2], b[..., 2:]
  elif name == "MXFP4":
    sbytes, body = b[..., :1], b[..., 1:]
  elif name == "TQ2_0":
    sbytes, body = b[..., 64:], b[..., :64]
  elif name == "TQ1_0":
    sbytes, body = b[..., 52:], b[..., :52]
  else:
    sbytes, body = b[..., :4], b[..., 4:]
  if name == "MXFP4" and np.any(sbytes == 0xFF):
    raise GGUFError(f"{what}: an MXFP4 scale byte is 255, which quantjax's E8M0 scales read "
                    "as NaN (llama.cpp as 2^127); no quantizer writes it")
  if name == "NVFP4" and np.any(sbytes >= 0x7F):
    k = int(np.argmax(sbytes.reshape(-1) >= 0x7F))
    raise GGUFError(f"{what}: NVFP4 scale byte {int(sbytes.reshape(-1)[k]):#04x} (scale {k % 4} "
                    f"of block {k // 4 % nb}, row {k // (4 * nb)}) is not an unsigned E4M3 "
                    "value below 0x7F; llama.cpp's quantizer never writes one")
  scales = np.ascontiguousarray(sbytes).view(sdt).reshape(rows, -1)
  if name in ("IQ4_NL", "MXFP4"):
    codes = _from_nibbles(body)
  elif name == "NVFP4":
    codes = _from_nibbles(body.reshape(rows, nb, 4, 8)).reshape(rows, nb, 64)
  elif name == "Q2_0":
    codes = ((body[..., None] >> (2 * np.arange(4, dtype=np.uint8))) & 3).reshape(rows, nb, 64)
  elif name == "TQ2_0":
    c = (body.reshape(rows, nb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    codes = c.reshape(rows, nb, 256)
  elif name == "TQ1_0":
    codes = llamacpp_types.unpack_trits(np.ascontiguousarray(body).reshape(rows, nb * 52))
  else:
    bits = (body[..., None] >> np.arange(8, dtype=np.uint8)) & 1
    codes = bits.reshape(rows, nb, 128).astype(np.int8) * 2 - 1
  return codes.reshape(rows, -1).astype(np.int8), scales


def dequantize(raw: np.ndarray, name: str) -> np.ndarray:
  """float32 values `[rows, n]` of GGUF rows of type `name` (ggml's dequantizers: the
  level times the block's scale, in float32)."""
  codes, scales = unpack(raw, name)
  fmt = _type(name).format()
  s = np.repeat(scales.astype(np.float32), fmt.group_size, axis=1)
  if name in ("Q1_0", "TQ1_0"):  # the codes are the levels: -1, +1 / -1, 0, +1
    return codes.astype(np.float32) * s
  return fmt.levels[codes.astype(np.int64)] * s
