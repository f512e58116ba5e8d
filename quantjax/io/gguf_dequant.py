"""GGUF tensors as float32 numpy arrays, and llama.cpp's Q/K row order undone.

* `dequantize_gguf_tensor(tensor)` / `dequantize_gguf_rows(tensor, rows)`: a
  tensor of a `quantjax.io.gguf_read.GGUFFile` (or gguf-py's `GGUFReader`)
  dequantized to float32: F32, F16, BF16, Q8_0, Q4_0 and Q4_1 by our own code
  (`dequantize_q8_0`, ...), IQ4_NL, MXFP4, NVFP4, Q1_0, Q2_0, TQ2_0 and TQ1_0 by
  `quantjax.io.gguf_codebook`, Q4_K, Q5_K, Q6_K and the rest of the k-quants
  through `gguf.quants.dequantize`.
* `unpermute_qk(w, n_head)`: undoes llama.cpp's convert-time permutation of
  Q/K rows (the inverse of `quantjax.io.gguf.permute_qk`). Which tensors carry
  it is the architecture's (`quantjax.io.architecture.GGUFNames.qk_heads`).

Pure array functions: no model or architecture knowledge.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quantjax.io import gguf_codebook
from quantjax.io.gguf_file import whole_blocks
from quantjax.io.gguf_read import GGUFError
from quantjax.optional import require

__all__ = [
    "dequantize_gguf_rows",
    "dequantize_gguf_tensor",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q8_0",
    "unpermute_qk",
]

# ----------------------------------------------------------------------------
# Block dequantizers (ggml's layouts). `raw` is uint8 `[..., n_blocks * block_bytes]`.

_QK = 32  # elements per block for Q4_0 / Q4_1 / Q8_0


def _blocks(raw: np.ndarray, name: str, block_bytes: int) -> tuple[np.ndarray, tuple[int, ...]]:
  """`[..., bytes]` -> (`[all blocks, block_bytes]`, the leading shape)."""
  b = whole_blocks(raw, name, block_bytes)
  return b.reshape(-1, block_bytes), b.shape[:-2]


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
  """Q8_0: per block of 32, an fp16 scale `d` and 32 int8 `q`; x = d * q."""
  b, lead = _blocks(raw, "Q8_0", 2 + _QK)
  d = b[:, :2].copy().view(np.float16).astype(np.float32)
  q = b[:, 2:].view(np.int8).astype(np.float32)
  return (d * q).reshape(*lead, -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  # Element j < 16 is the low nibble of byte j, element 16 + j its high nibble.
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
  """Q4_0: fp16 scale `d` and 16 bytes of nibbles per 32; x = d * (q - 8)."""
  b, lead = _blocks(raw, "Q4_0", 2 + _QK // 2)
  d = b[:, :2].copy().view(np.float16).astype(np.float32)
  q = _nibbles(b[:, 2:]) - 8.0
  return (d * q).reshape(*lead, -1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
  """Q4_1: fp16 step `d` and fp16 minimum `m` per 32; x = d * q + m."""
  b, lead = _blocks(raw, "Q4_1", 4 + _QK // 2)
  d = b[:, :2].copy().view(np.float16).astype(np.float32)
  m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
  q = _nibbles(b[:, 4:])
  return (d * q + m).reshape(*lead, -1)


_OWN = {
    "Q8_0": dequantize_q8_0,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
}
_VIA_GGUF_PY = ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1")


def dequantize_gguf_tensor(tensor: Any) -> np.ndarray:
  """A GGUF tensor (`quantjax.io.gguf_read.GGUFTensor`, or gguf-py's `ReaderTensor`) as
  float32 numpy `[ne_{n-1}, ..., ne_0]` (row-major)."""
  shape = tuple(int(s) for s in reversed(list(tensor.shape)))
  return dequantize_gguf_rows(tensor).reshape(shape)


def dequantize_gguf_rows(tensor: Any, rows: Any = slice(None)) -> np.ndarray:
  """Rows of a GGUF tensor as float32: `rows` (a slice, an index or an index array)
  selects along the first axis of `[ne_{n-1}, ..., ne_0]`; only those rows' bytes are
  read from the memory map and dequantized (ggml's blocks never cross a row)."""
  gguf = require("gguf", "gguf", "GGUF files")
  kind = tensor.tensor_type.name
  data = tensor.data[rows]
  if kind == "F32":
    out = np.array(data, np.float32)  # a copy: never a view of the file's memory map
  elif kind == "F16":
    out = np.asarray(data).astype(np.float32)
  elif kind == "BF16":
    u = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
    out = u.view(np.float32)
  elif kind in _OWN:
    out = _OWN[kind](data)
  elif kind in gguf_codebook.TYPES:
    raw = np.asarray(data)
    flat = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw
    out = gguf_codebook.dequantize(flat, kind).reshape(*raw.shape[:-1], -1)
  elif kind in _VIA_GGUF_PY:
    out = gguf.quants.dequantize(np.asarray(data), tensor.tensor_type).astype(np.float32)
  else:
    raise GGUFError(f"unsupported GGUF tensor type {kind} (tensor {tensor.name!r}); "
                    f"supported: F32, F16, BF16, {', '.join(_OWN)}, "
                    f"{', '.join(gguf_codebook.TYPES)}, {', '.join(_VIA_GGUF_PY)}")
  return np.asarray(out, np.float32)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's convert-time permutation of Q/K rows (`[out, in]`).

  llama.cpp reorders each head's rows from the "rotate half" layout that
  Hugging Face uses to interleaved pairs; this restores the original order.
  """
  out = w.shape[0]
  if n_head < 1 or out % n_head or (out // n_head) % 2:
    raise GGUFError(f"cannot undo llama.cpp's Q/K row order: {out} rows do not split into "
                    f"{n_head} heads of an even size (check attention.head_count / "
                    "head_count_kv in the file's metadata)")
  head = out // n_head
  return w.reshape(n_head, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
