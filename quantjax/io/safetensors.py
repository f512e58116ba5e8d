"""The safetensors file format, read and written with numpy, checked as it is read.

A safetensors file is an 8-byte little-endian header length `N`, `N` bytes
of JSON (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`), then the tensor bytes, row-major and
little-endian, offsets relative to the end of the header. Our reader checks
every claim of the header against the file (a header length past the end of
the file, offsets past the end of the data, a byte count that does not match
dtype and shape, an unknown dtype) and names the file and the tensor when one
fails, before any data is read. Tensors come back as read-only numpy views of
a memory map; bfloat16 and float8 use `ml_dtypes`.

References:
  Hugging Face, safetensors format specification
  (https://github.com/huggingface/safetensors, README "Format").
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

__all__ = ["DTYPES", "SafetensorsError", "SafetensorsFile", "dtype_name", "write_safetensors",
           "write_safetensors_chunks"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsError(ValueError):
  """A safetensors file (or a directory of them) that cannot be read as claimed."""


def dtype_name(dtype: Any) -> str:
  """The safetensors name ("F32", "BF16", "I8", ...) of a numpy dtype."""
  dt = np.dtype(dtype)
  if dt not in _NAMES:
    raise SafetensorsError(f"dtype {dt} has no safetensors name; supported: "
                           f"{', '.join(str(d) for d in _NAMES)}")
  return _NAMES[dt]


class SafetensorsFile:
  """One `.safetensors` file, header validated on open.

  `keys()`, `shape(name)`, `dtype(name)` read the header only; `get(name)`
  returns the tensor as a read-only numpy array (a view of a memory map).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"safetensors file not found: {self.path}")
    size = os.path.getsize(self.path)
    if size < 8:
      raise SafetensorsError(f"{self.path}: {size} bytes is too short for a safetensors file "
                             "(8-byte header length missing): truncated")
    with open(self.path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > size - 8:
        raise SafetensorsError(
            f"{self.path}: header length {n} runs past the end of the file ({size} bytes): "
            "the file is truncated or not safetensors")
      if n > _MAX_HEADER:
        raise SafetensorsError(f"{self.path}: header length {n} exceeds {_MAX_HEADER} bytes")
      raw = f.read(n)
    try:
      header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{self.path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: the header is not a JSON object")
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    data_size = size - self._start
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      try:
        dt, shape, (b, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
      except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry "
                               f"{e!r}") from None
      if dt not in DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {dt!r}, which this "
                               f"reader does not know ({', '.join(DTYPES)})")
      want = math.prod(shape) * DTYPES[dt].itemsize
      if not 0 <= b <= end or end - b != want:
        raise SafetensorsError(
            f"{self.path}: tensor {name!r} ({dt}{list(shape)}) claims bytes [{b}, {end}), "
            f"but its dtype and shape need {want} bytes")
      if end > data_size:
        raise SafetensorsError(
            f"{self.path}: tensor {name!r} needs data bytes up to {end} but the file holds "
            f"{data_size} after its header: the file is truncated")
      self._entries[name] = (DTYPES[dt], shape, b, end)
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name)[1]

  def dtype(self, name: str) -> np.dtype:
    return self._entry(name)[0]

  def _entry(self, name):
    if name not in self._entries:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    return self._entries[name]

  def get(self, name: str) -> np.ndarray:
    dt, shape, b, end = self._entry(name)
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = self._mmap[self._start + b:self._start + end]
    return buf.view(dt).reshape(shape)

  def read(self, name: str) -> np.ndarray:
    """The tensor as a fresh writable array read from the file (no memory map).

    Its memory is the process's own and is freed with the array, whereas the
    pages of a memory map stay resident (and counted in the process's
    resident memory) while the map is open; streaming readers use this.
    """
    dt, shape, b, end = self._entry(name)
    out = np.empty(end - b, np.uint8)
    with open(self.path, "rb") as f:
      f.seek(self._start + b)
      got = f.readinto(memoryview(out))
    if got != end - b:
      raise SafetensorsError(f"{self.path}: tensor {name!r}: read {got} of {end - b} bytes "
                             "(the file shrank after it was opened)")
    return out.view(dt).reshape(shape)

  def close(self) -> None:
    """Drops this reader's memory map (arrays returned by `get` keep it alive until
    they are freed); a later `get` maps the file again."""
    self._mmap = None


def _tensor_bytes(a: np.ndarray) -> bytes:
  a = np.ascontiguousarray(a)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return a.tobytes()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Writes `tensors` (name -> numpy array) to `path`; returns the file size.

  Tensors are laid out in the order given, the header padded with spaces to a
  multiple of 8 bytes (so every tensor starts aligned, as the reference
  writer does). Not atomic by itself: callers write into a temporary
  directory.
  """
  arrays = {name: np.asarray(a) for name, a in tensors.items()}
  return write_safetensors_chunks(
      path, {name: (a.dtype, a.shape, (a,)) for name, a in arrays.items()}, metadata)


def _header_bytes(entries: Mapping[str, tuple[Any, Any, Any]],
                  metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  off = 0
  for name, (dtype, shape, _) in entries.items():
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape],
                    "data_offsets": [off, off + n]}
    off += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  return raw + b" " * ((-len(raw)) % 8), off


def write_safetensors_chunks(path: str | os.PathLike,
                             entries: Mapping[str, tuple[Any, Any, Any]],
                             metadata: Mapping[str, str] | None = None) -> int:
  """Like `write_safetensors`, with each tensor given as `(dtype, shape, chunks)`:
  `chunks` an iterable of arrays whose bytes, concatenated, are the tensor
  (row blocks of a tensor too large to hold twice, converted as they go).

  Returns the file size. Raises `SafetensorsError` when a tensor's chunks do
  not add up to its dtype and shape (naming the tensor).
  """
  raw, total = _header_bytes(entries, metadata)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, (dtype, shape, chunks) in entries.items():
      want = math.prod(shape) * np.dtype(dtype).itemsize
      got = 0
      for c in chunks:
        c = np.asarray(c)
        if c.dtype != np.dtype(dtype):
          raise SafetensorsError(f"{path}: tensor {name!r}: a chunk of dtype {c.dtype}, the "
                                 f"header says {np.dtype(dtype)}")
        b = _tensor_bytes(c)
        f.write(b)
        got += len(b)
      if got != want:
        raise SafetensorsError(f"{path}: tensor {name!r}: {got} bytes written, its dtype and "
                               f"shape {list(shape)} need {want}")
  return 8 + len(raw) + total
