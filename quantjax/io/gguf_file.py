"""The parsed GGUF file: its error, constants and value types, the block types' scale
layout, the parsed objects (`GGUFFile`, `GGUFField`, `GGUFTensor`, gguf-py's
ReaderField / ReaderTensor surface) and the checks of tensor values. `gguf_read`
parses a file into these."""

from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import numpy as np

from quantjax.optional import require


class GGUFError(ValueError):
  """A GGUF file that cannot be read or holds something we do not support."""


def whole_blocks(raw: Any, type_name: str, block_bytes: int, what: str = "") -> np.ndarray:
  """Raw GGUF rows (uint8 `[..., row bytes]`) as contiguous whole blocks, uint8
  `[..., row bytes / block_bytes, block_bytes]`. A row that is not a whole number of
  `type_name`'s blocks is a `GGUFError` naming `what` (the tensor), the type, the row's
  byte count and the block size."""
  raw = np.ascontiguousarray(raw, dtype=np.uint8)
  nbytes = int(raw.shape[-1]) if raw.ndim else 0
  if raw.ndim == 0 or nbytes % block_bytes:
    raise GGUFError(f"{what + ': ' if what else ''}a {type_name} row of {nbytes} bytes is not a "
                    f"whole number of {type_name}'s {block_bytes}-byte blocks "
                    f"({nbytes % block_bytes} bytes over)")
  return raw.reshape(raw.shape[:-1] + (nbytes // block_bytes, block_bytes))


GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
DEFAULT_ALIGNMENT = 32

# GGUF value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_NP = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4",
       F32: "<f4", BOOL: "<u1", U64: "<u8", I64: "<i8", F64: "<f8"}
INT_VALUE_TYPES = frozenset({U8, I8, U16, I16, U32, I32, U64, I64})
FLOAT_VALUE_TYPES = frozenset({F32, F64})
VALUE_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
               "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64")

# Where each block type keeps its scales: (byte offset in the block, numpy dtype, name).
# From ggml-common.h (block_q4_0 ... block_iq4_xs, block_tq1_0, block_tq2_0, block_q1_0,
# block_q2_0).
SCALE_LAYOUT: dict[str, tuple[tuple[int, str, str], ...]] = {
    "Q4_0": ((0, "<f2", "d"),),
    "Q4_1": ((0, "<f2", "d"), (2, "<f2", "m")),
    "Q5_0": ((0, "<f2", "d"),),
    "Q5_1": ((0, "<f2", "d"), (2, "<f2", "m")),
    "Q8_0": ((0, "<f2", "d"),),
    "Q2_K": ((80, "<f2", "d"), (82, "<f2", "dmin")),
    "Q3_K": ((108, "<f2", "d"),),
    "Q4_K": ((0, "<f2", "d"), (2, "<f2", "dmin")),
    "Q5_K": ((0, "<f2", "d"), (2, "<f2", "dmin")),
    "Q6_K": ((208, "<f2", "d"),),
    "Q8_K": ((0, "<f4", "d"),),
    "IQ2_XXS": ((0, "<f2", "d"),),
    "IQ2_XS": ((0, "<f2", "d"),),
    "IQ2_S": ((0, "<f2", "d"),),
    "IQ3_XXS": ((0, "<f2", "d"),),
    "IQ3_S": ((0, "<f2", "d"),),
    "IQ1_S": ((0, "<f2", "d"),),
    "IQ4_NL": ((0, "<f2", "d"),),
    "IQ4_XS": ((0, "<f2", "d"),),
    "TQ1_0": ((52, "<f2", "d"),),
    "TQ2_0": ((64, "<f2", "d"),),
    "Q1_0": ((0, "<f2", "d"),),
    "Q2_0": ((0, "<f2", "d"),),
}
_FLOAT_TENSORS = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


# ggml types newer than gguf-py 0.19's table: {id: (name, block size, type size)}
# (ggml.h / ggml-common.h: GGML_TYPE_Q2_0 = 42, block_q2_0 = fp16 d + 64 2-bit codes).
EXTRA_GGML_TYPES = {42: ("Q2_0", 64, 2 + 16)}


class ExtraGGMLType(int):
  """A ggml type id gguf-py's `GGMLQuantizationType` lacks, with its `name`."""

  def __new__(cls, value: int, name: str):
    obj = super().__new__(cls, value)
    obj.name = name
    return obj

  def __repr__(self) -> str:
    return f"<GGMLQuantizationType.{self.name}: {int(self)}>"


def ggml_type(type_id: int):
  """gguf-py's `GGMLQuantizationType` for `type_id`, or an `ExtraGGMLType` for the ids in
  `EXTRA_GGML_TYPES`."""
  gguf = require("gguf", "gguf", "GGUF files")
  try:
    return gguf.GGMLQuantizationType(type_id)
  except ValueError:
    if type_id in EXTRA_GGML_TYPES:
      return ExtraGGMLType(type_id, EXTRA_GGML_TYPES[type_id][0])
    raise


def _quant_types():
  """`{id: (name, block size, type size)}` of the ggml types gguf-py knows, and
  `EXTRA_GGML_TYPES`."""
  gguf = require("gguf", "gguf", "GGUF files")
  out = {int(t): (t.name, int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}
  for tid, v in EXTRA_GGML_TYPES.items():
    out.setdefault(tid, v)
  return out


# ----------------------------------------------------------------------------
# Parsed objects (gguf-py's ReaderField / ReaderTensor surface).


@dataclasses.dataclass
class GGUFField:
  """One key/value pair. `types` as gguf-py gives them (`[ARRAY, sub]` for arrays)."""

  name: str
  offset: int            # where the key starts in the file
  value_offset: int      # where the value starts
  type_ids: tuple[int, ...]
  count: int             # array length (1 for scalars)
  _file: "GGUFFile" = dataclasses.field(repr=False, compare=False)
  _scalar: Any = dataclasses.field(default=None, repr=False)

  @property
  def types(self) -> list[Any]:
    gguf = require("gguf", "gguf", "GGUF files")
    return [gguf.GGUFValueType(t) for t in self.type_ids]

  @property
  def is_array(self) -> bool:
    return self.type_ids[0] == ARR

  @property
  def value_type(self) -> int:
    """The scalar type, or the element type of an array."""
    return self.type_ids[-1]

  def type_name(self) -> str:
    if self.is_array:
      return f"array of {self.count} {VALUE_TYPE_NAMES[self.value_type]}"
    return VALUE_TYPE_NAMES[self.value_type]

  def contents(self) -> Any:
    """The value: a Python scalar or str, or a list for arrays (decoded now)."""
    if not self.is_array:
      return self._scalar
    mm = self._file._mm
    if self.value_type == STR:
      out, off = [], self.value_offset + 12
      for j in range(self.count):
        (n,) = U64_AT(mm, off)
        try:
          out.append(bytes(mm[off + 8:off + 8 + n]).decode("utf-8"))
        except UnicodeDecodeError as e:
          raise GGUFError(f"{self._file.path}: string {j} of key {self.name!r} is not UTF-8 "
                          f"({e.reason})") from None
        off += 8 + n
      return out
    arr = np.frombuffer(mm, dtype=_NP[self.value_type], count=self.count,
                        offset=self.value_offset + 12)
    if self.value_type == BOOL:
      return [bool(v) for v in arr]
    return arr.tolist()

  def array(self) -> np.ndarray:
    """A numeric array's values as a read-only numpy view (no copy)."""
    if not self.is_array or self.value_type == STR:
      raise TypeError(f"GGUF key {self.name!r} is a {self.type_name()}, not a numeric array")
    return np.frombuffer(self._file._mm, dtype=_NP[self.value_type], count=self.count,
                         offset=self.value_offset + 12)


@dataclasses.dataclass
class GGUFTensor:
  """One tensor: `shape` in GGUF order (`ne[0]` = row length), data a zero-copy view."""

  name: str
  type_id: int
  shape: np.ndarray        # uint64 ne, GGUF order (innermost first)
  n_elements: int
  n_bytes: int
  data_offset: int         # absolute offset in the file
  info_offset: int         # where its description starts in the header
  _file: "GGUFFile" = dataclasses.field(repr=False, compare=False)

  @property
  def tensor_type(self):
    return ggml_type(self.type_id)

  @property
  def type_name(self) -> str:
    return self.tensor_type.name

  @property
  def data(self) -> np.ndarray:
    """The bytes as gguf-py shapes them: F32/F16/F64 values `[ne_{n-1}, ..., ne_0]`,
    everything else uint8 rows `[..., bytes per row]`. Read-only, backed by the file."""
    kind = self.type_name
    dims = tuple(int(s) for s in reversed(self.shape.tolist()))
    np_t = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2",
            "I32": "<i4", "I64": "<i8"}.get(kind)
    if np_t is not None:
      return np.frombuffer(self._file._mm, dtype=np_t, count=self.n_elements,
                           offset=self.data_offset).reshape(dims)
    _, block, tsize = self._file._types[self.type_id]
    row = dims[-1] // block * tsize if dims else tsize
    raw = np.frombuffer(self._file._mm, dtype=np.uint8, count=self.n_bytes,
                        offset=self.data_offset)
    return raw.reshape(dims[:-1] + (row,)) if dims else raw


class GGUFFile:
  """A parsed, checked GGUF file (see `read_gguf`). Its data stays memory-mapped."""

  def __init__(self, path: str, mm: mmap.mmap | bytes, size: int):
    self.path = path
    self.size = size
    self._mm = mm
    self._types = _quant_types()
    self.version = 0
    self.alignment = DEFAULT_ALIGNMENT
    self.data_start = 0
    self.data_size = 0
    self.fields: dict[str, GGUFField] = {}
    self.tensors: list[GGUFTensor] = []

  # gguf-py spelling
  @property
  def data_offset(self) -> int:
    return self.data_start

  def tensor(self, name: str) -> GGUFTensor | None:
    for t in self.tensors:
      if t.name == name:
        return t
    return None

  def get(self, key: str, default: Any = None) -> Any:
    f = self.fields.get(key)
    return default if f is None else f.contents()

  def drop_pages(self) -> bool:
    """Takes the pages read so far out of this process's resident memory (Linux
    `madvise(MADV_DONTNEED)` on the read-only map: later reads fault them in again from
    the page cache), keeping the parsed header. False where that is not available (the
    caller may `close()` instead)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not isinstance(self._mm, mmap.mmap) or self._mm.closed:
      return False
    self._mm.madvise(advice)
    return True

  def close(self) -> None:
    if isinstance(self._mm, mmap.mmap):
      try:
        self._mm.close()
      except BufferError:  # views still alive: the mapping closes when they go
        pass

  def __enter__(self) -> "GGUFFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (f"GGUFFile({self.path!r}, v{self.version}, {len(self.fields)} keys, "
            f"{len(self.tensors)} tensors, {self.size} bytes)")


U64_AT = struct.Struct("<Q").unpack_from


# ----------------------------------------------------------------------------
# Values.


def check_raw_tensor(where: str, name: str, kind: str, raw: np.ndarray, row: int, *,
                     full: bool = True, file_offset: int | None = None) -> None:
  """Checks one tensor's bytes: block scales finite (block types), and with
  `full` every value finite (F32 / F16 / BF16 / F64).

  Args:
    where: the file (or "export") for messages.
    name: the tensor's name.
    kind: its ggml type name ("Q4_0", "F16", ...).
    raw: its data, any numpy array holding exactly its bytes.
    row: values per row (`ne[0]`), to name the row of a bad block.
    full: check float values too.
    file_offset: where the data starts in the file, for messages.

  Raises:
    GGUFError: naming the tensor, the block and row, and the value.
  """
  layout = SCALE_LAYOUT.get(kind)
  if layout:
    _, block, tsize = next(v for v in _quant_types().values() if v[0] == kind)
    b = np.asarray(raw).reshape(-1).view(np.uint8).reshape(-1, tsize)
    per_row = max(1, row // block)
    for off, dt, label in layout:
      size = np.dtype(dt).itemsize
      s = b[:, off:off + size].view(dt)[:, 0]
      bad = ~np.isfinite(s)
      if bad.any():
        k = first_bad(bad)
        at = "" if file_offset is None else f" (file offset {file_offset + k * tsize + off})"
        raise GGUFError(
            f"{where}: tensor {name!r} ({kind}) has {int(bad.sum())} non-finite block "
            f"{'scales' if label == 'd' else 'values of ' + label} of {s.size}; the first is "
            f"{label} = {s[k]} in block {k % per_row} of row {k // per_row}{at}")
  elif full and kind in _FLOAT_TENSORS:
    flat = np.asarray(raw).reshape(-1)
    flat = flat.view(np.uint8).view(_FLOAT_TENSORS[kind])
    _check_float_values(where, name, kind, flat)


def first_bad(bad: np.ndarray) -> int:
  return int(np.argmax(bad))


def check_tensor_values(f: GGUFFile, *, full: bool = False, tensors: Any = None) -> None:
  """Checks the block scales (and with `full`, the float values) of `f`'s tensors.

  Raises `GGUFError` naming the tensor, the block (and its row) and the value.
  """
  for t in (f.tensors if tensors is None else tensors):
    if t.type_name not in SCALE_LAYOUT and not (full and t.type_name in _FLOAT_TENSORS):
      continue
    raw = np.frombuffer(f._mm, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset)
    check_raw_tensor(f.path, t.name, t.type_name, raw,
                     int(t.shape[0]) if len(t.shape) else 1, full=full,
                     file_offset=t.data_offset)


def _check_float_values(path: str, name: str, kind: str, flat: np.ndarray,
                        chunk: int = 1 << 22) -> None:
  for lo in range(0, flat.size, chunk):
    part = flat[lo:lo + chunk]
    bad = ((part & 0x7F80) == 0x7F80) if kind == "BF16" else ~np.isfinite(part)
    if bad.any():
      i = lo + first_bad(bad)
      v = flat[i]
      if kind == "BF16":
        v = np.array([int(v) << 16], np.uint32).view(np.float32)[0]
      raise GGUFError(f"{path}: tensor {name!r} ({kind}) holds {int(bad.sum())}+ non-finite "
                      f"values; the first is {v} at flat index {i} (of {flat.size})")
