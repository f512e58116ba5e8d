"""Reading GGUF files defensively: every length, offset and type is checked before use.

GGUF (llama.cpp's format) is a header of key/value metadata and tensor
descriptions followed by an aligned data section. A damaged or hostile file
can declare a string or an array longer than the file, a tensor whose type
does not match its bytes, offsets that overlap or point past the end, or
metadata that makes a model divide by zero. `read_gguf` parses the header
itself (it never asks gguf-py to allocate from a declared length) and
refuses, with the file, tensor or key named, anything llama.cpp's reader
(`ggml/src/gguf.cpp`) or model loader refuses, and more:

Structure (always):
  * magic, version 2 or 3 (v1 and byte-swapped files are named as such);
  * tensor and key/value counts, key and string lengths, array lengths
    against the bytes left in the file: nothing is allocated from a
    declared length, and string arrays are only walked (decoded on demand);
  * keys non-empty, UTF-8 and unique; value types known; no nested arrays;
    `general.alignment` a uint32 power of two;
  * tensor names UTF-8, shorter than 64 bytes, unique; at most 4 dimensions,
    sizes representable; a known ggml type whose block size divides the row;
  * tensor data laid out as llama.cpp writes and requires it: the data
    section starts at the aligned end of the header, tensors follow one
    another in header order, each at an aligned offset exactly where the
    previous one ends (padded), so no tensor overlaps another, has a gap, or
    is shifted; every tensor ends inside the file.

Values:
  * always: every fp16/fp32 block scale (and block minimum) of the block
    types (`d`, `m`, `dmin` of Q4_0 ... Q8_0, the k-quants and the i-quants)
    is finite: one NaN scale turns its whole block into NaN;
  * with `check_values=True` (llama.cpp's `check_tensors`): every value of
    the F32 / F16 / BF16 / F64 tensors is finite too.

Metadata (`validate_metadata`, called by the model loaders through
`open_gguf`, which reads and validates): the
architecture's hyper-parameters have integer types and positive values
(`llama.attention.head_count_kv = 0` is named as such), head counts divide,
epsilons and RoPE bases are finite, the tokenizer's arrays agree in length,
special token ids lie inside the vocabulary, the tokenizer type is one
llama.cpp knows (with its merges for byte-level BPE), the embedding has a row
per token, and no `blk.N` tensor lies beyond `block_count`. The file ends
where its last tensor ends (padded or not): bytes beyond mean a tensor's
type or shape does not match what was written.

`GGUFFile` presents the parsed file with the attributes of gguf-py's
`GGUFReader` that quantjax uses (`fields[key].contents()`, `.types`;
`tensors[i].name`, `.tensor_type`, `.shape`, `.n_bytes`, `.data_offset`,
`.data`), so loaders read either.

References:
  GGUF specification: github.com/ggml-org/ggml/blob/master/docs/gguf.md.
  llama.cpp's reader: `ggml/src/gguf.cpp` (`gguf_init_from_file_impl`);
  block layouts: `ggml/src/ggml-common.h`; value checks:
  `ggml_validate_row_data` in `ggml/src/ggml-quants.c`.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from typing import Any, Iterator

import numpy as np

from quantjax.optional import require

__all__ = [
    "GGUFError",
    "GGUFField",
    "GGUFFile",
    "GGUFTensor",
    "GGML_MAX_DIMS",
    "GGML_MAX_NAME",
    "SCALE_LAYOUT",
    "check_raw_tensor",
    "check_tensor_values",
    "EXTRA_GGML_TYPES",
    "ggml_type",
    "gguf_metadata",
    "open_gguf",
    "read_gguf",
    "validate_metadata",
]


class GGUFError(ValueError):
  """A GGUF file that cannot be read or holds something we do not support."""


GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
DEFAULT_ALIGNMENT = 32

# GGUF value types: (struct code, size) for fixed-size scalars.
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR = {_U8: ("<B", 1), _I8: ("<b", 1), _U16: ("<H", 2), _I16: ("<h", 2),
           _U32: ("<I", 4), _I32: ("<i", 4), _F32: ("<f", 4), _BOOL: ("<B", 1),
           _U64: ("<Q", 8), _I64: ("<q", 8), _F64: ("<d", 8)}
_NP = {_U8: "<u1", _I8: "<i1", _U16: "<u2", _I16: "<i2", _U32: "<u4", _I32: "<i4",
       _F32: "<f4", _BOOL: "<u1", _U64: "<u8", _I64: "<i8", _F64: "<f8"}
_INT_TYPES = frozenset({_U8, _I8, _U16, _I16, _U32, _I32, _U64, _I64})
_FLOAT_TYPES = frozenset({_F32, _F64})
_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
               "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64")

# Where each block type keeps its scales: (byte offset in the block, numpy dtype, name).
# From ggml-common.h (block_q4_0 ... block_iq4_xs, block_tq2_0, block_q1_0, block_q2_0).
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
    return self.type_ids[0] == _ARR

  @property
  def value_type(self) -> int:
    """The scalar type, or the element type of an array."""
    return self.type_ids[-1]

  def type_name(self) -> str:
    if self.is_array:
      return f"array of {self.count} {_TYPE_NAMES[self.value_type]}"
    return _TYPE_NAMES[self.value_type]

  def contents(self) -> Any:
    """The value: a Python scalar or str, or a list for arrays (decoded now)."""
    if not self.is_array:
      return self._scalar
    mm = self._file._mm
    if self.value_type == _STR:
      out, off = [], self.value_offset + 12
      for j in range(self.count):
        (n,) = _U64_AT(mm, off)
        try:
          out.append(bytes(mm[off + 8:off + 8 + n]).decode("utf-8"))
        except UnicodeDecodeError as e:
          raise GGUFError(f"{self._file.path}: string {j} of key {self.name!r} is not UTF-8 "
                          f"({e.reason})") from None
        off += 8 + n
      return out
    arr = np.frombuffer(mm, dtype=_NP[self.value_type], count=self.count,
                        offset=self.value_offset + 12)
    if self.value_type == _BOOL:
      return [bool(v) for v in arr]
    return arr.tolist()

  def array(self) -> np.ndarray:
    """A numeric array's values as a read-only numpy view (no copy)."""
    if not self.is_array or self.value_type == _STR:
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


# ----------------------------------------------------------------------------
# The header parser.


class _Cursor:
  """Bounded reads from the mapped file; every length is checked before use."""

  def __init__(self, f: GGUFFile):
    self.f = f
    self.mm = f._mm
    self.end = f.size
    self.off = 0

  def fail(self, msg: str) -> GGUFError:
    return GGUFError(f"{self.f.path}: {msg}")

  def left(self) -> int:
    return self.end - self.off

  def need(self, n: int, what: str) -> None:
    if n > self.left():
      raise self.fail(f"truncated at byte {self.off} of {self.end}: {what} needs {n} bytes, "
                      f"{self.left()} are left")

  def scalar(self, t: int, what: str):
    code, size = _SCALAR[t]
    self.need(size, what)
    (v,) = struct.unpack_from(code, self.mm, self.off)
    self.off += size
    return v

  def u32(self, what: str) -> int:
    return self.scalar(_U32, what)

  def u64(self, what: str) -> int:
    return self.scalar(_U64, what)

  def string(self, what: str, *, decode: bool = True) -> str | None:
    n = self.u64(f"the length of {what}")
    if n > self.left():
      raise self.fail(f"{what} declares {n} bytes at offset {self.off - 8} but only "
                      f"{self.left()} bytes are left in the file")
    raw = self.mm[self.off:self.off + n] if decode else None
    self.off += n
    if not decode:
      return None
    try:
      return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
      raise self.fail(f"{what} at offset {self.off - n} is not UTF-8 ({e.reason})") from None


def _type_id(cur: _Cursor, key: str, what: str) -> int:
  t = cur.u32(f"the type of {what}")
  if t >= len(_TYPE_NAMES):
    raise cur.fail(f"{what} has unknown value type {t} (GGUF types are 0..{len(_TYPE_NAMES) - 1})")
  return t


def _read_kv(cur: _Cursor, i: int, f: GGUFFile) -> GGUFField:
  start = cur.off
  key = cur.string(f"key {i}")
  if not key:
    raise cur.fail(f"key {i} (at offset {start}) is empty")
  if key in f.fields:
    raise cur.fail(f"duplicate key {key!r} (key {i}, at offset {start})")
  t = _type_id(cur, key, f"key {key!r}")
  voff = cur.off
  if t == _ARR:
    sub = _type_id(cur, key, f"the elements of key {key!r}")
    if sub == _ARR:
      raise cur.fail(f"key {key!r} is an array of arrays, which llama.cpp does not read")
    n = cur.u64(f"the length of key {key!r}")
    if sub == _STR:
      # each string costs at least its 8-byte length
      if n > cur.left() // 8:
        raise cur.fail(f"key {key!r} declares {n} strings at offset {voff}, more than the "
                       f"{cur.left()} bytes left in the file can hold")
      _skip_strings(cur, n, key)
    else:
      size = _SCALAR[sub][1]
      if n > cur.left() // size:
        raise cur.fail(f"key {key!r} declares {n} {_TYPE_NAMES[sub]} values ({n * size} bytes) "
                       f"at offset {voff} but only {cur.left()} bytes are left in the file")
      cur.off += n * size
    return GGUFField(key, start, voff, (_ARR, sub), int(n), f)
  if t == _STR:
    v = cur.string(f"the value of key {key!r}")
  else:
    v = cur.scalar(t, f"the value of key {key!r}")
    if t == _BOOL:
      v = bool(v)
  return GGUFField(key, start, voff, (t,), 1, f, v)


_U64_AT = struct.Struct("<Q").unpack_from


def _skip_strings(cur: _Cursor, n: int, key: str) -> None:
  """Walks `n` length-prefixed strings without decoding them (bounds checked)."""
  mm, off, end = cur.mm, cur.off, cur.end
  for j in range(n):
    if end - off < 8:
      cur.off = off
      raise cur.fail(f"truncated inside key {key!r}: string {j} of {n} has no length")
    (ln,) = _U64_AT(mm, off)
    off += 8
    if ln > end - off:
      raise cur.fail(f"string {j} of key {key!r} declares {ln} bytes at offset {off - 8} but "
                     f"only {end - off} bytes are left in the file")
    off += ln
  cur.off = off


def _pseudo(f: GGUFFile, name: str, t: int, value: int) -> GGUFField:
  return GGUFField(name, 0, 0, (t,), 1, f, value)


def _read_tensor_info(cur: _Cursor, i: int, f: GGUFFile, names: set) -> tuple:
  start = cur.off
  name = cur.string(f"the name of tensor {i}")
  if len(name.encode("utf-8")) >= GGML_MAX_NAME:
    raise cur.fail(f"tensor {i} name {name[:80]!r} is {len(name.encode())} bytes; ggml allows "
                   f"at most {GGML_MAX_NAME - 1}")
  if name in names:
    raise cur.fail(f"duplicate tensor name {name!r} (tensor {i})")
  names.add(name)
  nd = cur.u32(f"the number of dimensions of tensor {name!r}")
  if nd > GGML_MAX_DIMS:
    raise cur.fail(f"tensor {name!r} has {nd} dimensions; ggml allows at most {GGML_MAX_DIMS}")
  ne = [cur.u64(f"dimension {j} of tensor {name!r}") for j in range(nd)]
  for j, n in enumerate(ne):
    if n >= 2 ** 63:
      raise cur.fail(f"tensor {name!r} dimension {j} has invalid size {n} (negative as int64)")
  n_el = math.prod(ne) if ne else 1
  if n_el >= 2 ** 63:
    raise cur.fail(f"tensor {name!r} of shape {ne} has {n_el} elements, more than int64 holds")
  t = cur.u32(f"the type of tensor {name!r}")
  if t not in f._types:
    known = ", ".join(sorted(v[0] for v in f._types.values()))
    raise cur.fail(f"tensor {name!r} has unknown ggml type id {t} (known: {known})")
  tname, block, tsize = f._types[t]
  row = ne[0] if ne else 1
  if row % block:
    raise cur.fail(f"tensor {name!r} of type {tname} has rows of {row} values, not a multiple "
                   f"of its block size {block} (shape {ne}); the type id may be wrong")
  n_bytes = n_el // block * tsize
  off = cur.u64(f"the data offset of tensor {name!r}")
  return name, t, ne, n_el, n_bytes, off, start


def read_gguf(path: str | os.PathLike, *, check_values: bool = False) -> GGUFFile:
  """Parses and checks the GGUF file at `path` (see the module docstring).

  Args:
    path: the file.
    check_values: also check that every value of the float tensors (F32, F16,
      BF16, F64) is finite, as llama.cpp's `check_tensors` does. Block scales
      are always checked.

  Returns:
    A `GGUFFile` whose tensor data are read-only views of the memory-mapped file.

  Raises:
    FileNotFoundError: no file at `path`.
    GGUFError: anything damaged or inconsistent; the message names the file,
      the offset and the key or tensor.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  if os.path.isdir(path):
    raise GGUFError(f"{path} is a directory, not a GGUF file")
  size = os.path.getsize(path)
  if size < 24:
    raise GGUFError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes); the file "
                    "is truncated or not GGUF")
  with open(path, "rb") as fh:
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
  f = GGUFFile(path, mm, size)
  try:
    _parse(f)
    check_tensor_values(f, full=check_values)
  except BaseException:
    f.close()
    raise
  return f


def _parse(f: GGUFFile) -> None:
  cur = _Cursor(f)
  magic = bytes(f._mm[0:4])
  if magic != GGUF_MAGIC:
    raise cur.fail(f"not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
  cur.off = 4
  version = cur.u32("the version")
  if version & 0xFFFF == 0 and version:
    raise cur.fail(f"version field reads {version:#x}: the file is big-endian (byte-swapped); "
                   "only little-endian GGUF files are read")
  if version == 1:
    raise cur.fail("GGUF version 1 is no longer supported (llama.cpp reads versions 2 and 3)")
  if version not in (2, 3):
    raise cur.fail(f"unsupported GGUF version {version} (versions 2 and 3 are read)")
  f.version = version
  n_tensors = cur.u64("the tensor count")
  n_kv = cur.u64("the key/value count")
  # A key/value needs at least 8 (key length) + 1 + 4 (type) + 1 bytes, a tensor
  # description 8 + 1 + 4 + 4 + 8 bytes: counts beyond that cannot be honest.
  if n_kv > cur.left() // 14:
    raise cur.fail(f"the header declares {n_kv} key/value pairs; the {cur.left()} bytes left "
                   "cannot hold them")
  if n_tensors > cur.left() // 25:
    raise cur.fail(f"the header declares {n_tensors} tensors; the {cur.left()} bytes left "
                   "cannot hold them")
  f.fields["GGUF.version"] = _pseudo(f, "GGUF.version", _U32, version)
  f.fields["GGUF.tensor_count"] = _pseudo(f, "GGUF.tensor_count", _U64, n_tensors)
  f.fields["GGUF.kv_count"] = _pseudo(f, "GGUF.kv_count", _U64, n_kv)
  for i in range(n_kv):
    fld = _read_kv(cur, i, f)
    f.fields[fld.name] = fld

  al = f.fields.get("general.alignment")
  if al is not None:
    if al.type_ids != (_U32,):
      raise cur.fail(f"key 'general.alignment' must be a UINT32, it is a {al.type_name()}")
    a = int(al.contents())
    if a == 0 or a & (a - 1):
      raise cur.fail(f"key 'general.alignment' = {a} is not a power of two")
    f.alignment = a

  infos = []
  names: set = set()
  for i in range(n_tensors):
    infos.append(_read_tensor_info(cur, i, f, names))

  al = f.alignment
  data_start = -(-cur.off // al) * al if n_tensors else cur.off
  if data_start > f.size:
    raise cur.fail(f"truncated: the data section should start at byte {data_start} (the aligned "
                   f"end of the header) but the file has {f.size} bytes")
  f.data_start = data_start
  expected = 0
  for name, t, ne, n_el, n_bytes, off, start in infos:
    tname = f._types[t][0]
    if off != expected:
      why = ("not a multiple of the alignment " + str(al)) if off % al else (
          "it overlaps the tensor before it" if off < expected else
          "it leaves a gap after the tensor before it")
      raise cur.fail(f"tensor {name!r} ({tname}, shape {ne}) has data offset {off}, expected "
                     f"{expected}: {why} (llama.cpp requires tensors stored in header order, "
                     "each aligned right after the previous one)")
    end = data_start + off + n_bytes
    if end > f.size:
      raise cur.fail(f"truncated: tensor {name!r} ({tname}, shape {ne}, {n_bytes} bytes) needs "
                     f"bytes up to {end} but the file has {f.size}")
    f.tensors.append(GGUFTensor(name, t, np.asarray(ne, np.uint64), int(n_el), int(n_bytes),
                                data_start + off, start, f))
    expected = off + -(-n_bytes // al) * al
  f.data_size = expected
  if n_tensors:
    last = f.tensors[-1]
    ends = (data_start + expected, last.data_offset + last.n_bytes)  # padded, or not
    if f.size not in ends:
      raise cur.fail(f"the file has {f.size - ends[0]} bytes after the end of its last tensor "
                     f"{last.name!r} (byte {ends[1]}, padded {ends[0]}): a tensor's type or "
                     "shape does not match the data that was written, or the file was "
                     "appended to")


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
        k = _first_bad(bad)
        at = "" if file_offset is None else f" (file offset {file_offset + k * tsize + off})"
        raise GGUFError(
            f"{where}: tensor {name!r} ({kind}) has {int(bad.sum())} non-finite block "
            f"{'scales' if label == 'd' else 'values of ' + label} of {s.size}; the first is "
            f"{label} = {s[k]} in block {k % per_row} of row {k // per_row}{at}")
  elif full and kind in _FLOAT_TENSORS:
    flat = np.asarray(raw).reshape(-1)
    flat = flat.view(np.uint8).view(_FLOAT_TENSORS[kind])
    _check_float_values(where, name, kind, flat)


def _first_bad(bad: np.ndarray) -> int:
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
      i = lo + _first_bad(bad)
      v = flat[i]
      if kind == "BF16":
        v = np.array([int(v) << 16], np.uint32).view(np.float32)[0]
      raise GGUFError(f"{path}: tensor {name!r} ({kind}) holds {int(bad.sum())}+ non-finite "
                      f"values; the first is {v} at flat index {i} (of {flat.size})")


# ----------------------------------------------------------------------------
# Metadata.

# Hyper-parameters an architecture's loader divides by or sizes arrays with:
# (suffix, lower bound). Per-layer arrays are accepted where llama.cpp takes them.
_ARCH_INTS = (
    ("block_count", 1), ("context_length", 1), ("embedding_length", 1),
    ("feed_forward_length", 1), ("attention.head_count", 1), ("attention.head_count_kv", 1),
    ("attention.key_length", 1), ("attention.value_length", 1), ("rope.dimension_count", 1),
    ("vocab_size", 1), ("attention.sliding_window", 1), ("expert_count", 0),
    ("expert_used_count", 0),
)
_ARCH_FLOATS = (  # (suffix, strictly positive?)
    ("rope.freq_base", True), ("rope.freq_base_swa", True), ("rope.scaling.factor", True),
    ("attention.layer_norm_rms_epsilon", False), ("attention.layer_norm_epsilon", False),
    ("final_logit_softcapping", True), ("attn_logit_softcapping", True),
)


# llama.cpp's tokenizer types (llama-vocab.cpp); anything else it refuses.
_TOKENIZER_MODELS = frozenset({"no_vocab", "none", "llama", "bert", "gpt2", "t5", "rwkv",
                               "plamo2"})


def validate_metadata(f: GGUFFile) -> None:
  """Checks the model metadata of `f`; raises `GGUFError` naming the key.

  See the module docstring for the list. Hyper-parameters of the file's own
  architecture (`{arch}.block_count`, ...) are checked for type and range.
  """
  def fail(msg: str) -> GGUFError:
    return GGUFError(f"{f.path}: {msg}")

  arch_f = f.fields.get("general.architecture")
  if arch_f is None:
    raise fail("no 'general.architecture' key: not a model file")
  if arch_f.type_ids != (_STR,):
    raise fail(f"key 'general.architecture' must be a STRING, it is a {arch_f.type_name()}")
  arch = arch_f.contents()
  if not arch:
    raise fail("key 'general.architecture' is empty")

  ints: dict[str, Any] = {}
  for suffix, lo in _ARCH_INTS:
    key = f"{arch}.{suffix}"
    fld = f.fields.get(key)
    if fld is None:
      continue
    if fld.value_type not in _INT_TYPES:
      raise fail(f"key {key!r} must be an integer, it is a {fld.type_name()}")
    vals = fld.array() if fld.is_array else np.asarray([fld.contents()])
    if fld.is_array:
      if fld.count == 0:
        raise fail(f"key {key!r} is an empty array")
      if vals.size and (np.min(vals.astype(np.int64)) < 0 or np.max(vals.astype(np.int64)) == 0):
        raise fail(f"key {key!r} = {vals.tolist()[:8]} must hold non-negative values, "
                   "not all zero")
      ints[key] = vals.astype(np.int64)
    else:
      v = int(vals[0])
      if v < lo:
        raise fail(f"key {key!r} = {v} is out of range: it must be >= {lo}")
      ints[key] = v
  for suffix, positive in _ARCH_FLOATS:
    key = f"{arch}.{suffix}"
    fld = f.fields.get(key)
    if fld is None:
      continue
    if fld.is_array or fld.value_type not in (_FLOAT_TYPES | _INT_TYPES):
      raise fail(f"key {key!r} must be a number, it is a {fld.type_name()}")
    v = float(fld.contents())
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
      raise fail(f"key {key!r} = {v} is out of range: it must be finite and "
                 f"{'> 0' if positive else '>= 0'}")
  heads, kv = ints.get(f"{arch}.attention.head_count"), ints.get(f"{arch}.attention.head_count_kv")
  if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
    raise fail(f"key '{arch}.attention.head_count_kv' = {kv} does not divide "
               f"'{arch}.attention.head_count' = {heads} (grouped-query attention needs it)")
  blocks = ints.get(f"{arch}.block_count")
  if isinstance(blocks, int):
    for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv",
                f"{arch}.feed_forward_length"):
      v = ints.get(key)
      if isinstance(v, np.ndarray) and v.size != blocks:
        raise fail(f"key {key!r} holds {v.size} per-layer values but '{arch}.block_count' = "
                   f"{blocks}")
    for t in f.tensors:
      if t.name.startswith("blk."):
        idx = t.name.split(".")[1]
        if not idx.isdigit() or int(idx) >= blocks:
          raise fail(f"tensor {t.name!r} lies beyond '{arch}.block_count' = {blocks}")

  # Tokenizer arrays agree, special tokens lie in the vocabulary, one embedding row per token.
  tok = f.fields.get("tokenizer.ggml.tokens")
  n_tok = None
  if tok is not None:
    if not (tok.is_array and tok.value_type == _STR):
      raise fail(f"key 'tokenizer.ggml.tokens' must be an array of strings, it is a "
                 f"{tok.type_name()}")
    n_tok = tok.count
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
      fld = f.fields.get(key)
      if fld is not None and (not fld.is_array or fld.count != n_tok):
        raise fail(f"key {key!r} holds {fld.count if fld.is_array else 'a scalar'} values for "
                   f"{n_tok} tokens in 'tokenizer.ggml.tokens'")
    scores = f.fields.get("tokenizer.ggml.scores")
    if scores is not None and scores.value_type in _FLOAT_TYPES:
      s = scores.array()
      if not np.isfinite(s).all():
        raise fail(f"key 'tokenizer.ggml.scores' holds non-finite values (first at token "
                   f"{_first_bad(~np.isfinite(s))})")
  model = f.fields.get("tokenizer.ggml.model")
  if model is not None:
    if model.type_ids != (_STR,):
      raise fail(f"key 'tokenizer.ggml.model' must be a STRING, it is a {model.type_name()}")
    name = model.contents()
    if name not in _TOKENIZER_MODELS:
      raise fail(f"key 'tokenizer.ggml.model' = {name!r} is not a tokenizer llama.cpp knows "
                 f"({', '.join(sorted(_TOKENIZER_MODELS))})")
    if name not in ("none", "no_vocab") and tok is None:
      raise fail(f"tokenizer {name!r} without its vocabulary 'tokenizer.ggml.tokens'")
    if name == "gpt2":
      merges = f.fields.get("tokenizer.ggml.merges")
      if merges is None or not (merges.is_array and merges.value_type == _STR):
        raise fail("a 'gpt2' (byte-level BPE) tokenizer needs 'tokenizer.ggml.merges', an "
                   "array of strings: "
                   + ("it is missing" if merges is None else f"it is a {merges.type_name()}"))
  for key, fld in f.fields.items():
    if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
      if fld.is_array or fld.value_type not in _INT_TYPES:
        raise fail(f"key {key!r} must be an integer token id, it is a {fld.type_name()}")
      v = int(fld.contents())
      if v < 0 or (n_tok is not None and v >= n_tok):
        raise fail(f"key {key!r} = {v} is not a token id: the vocabulary has {n_tok} tokens")
  emb = f.tensor("token_embd.weight")
  if emb is not None and n_tok is not None and len(emb.shape) == 2 and int(emb.shape[1]) != n_tok:
    raise fail(f"tensor 'token_embd.weight' has {int(emb.shape[1])} rows but "
               f"'tokenizer.ggml.tokens' has {n_tok} tokens")
  vs = ints.get(f"{arch}.vocab_size")
  if emb is not None and isinstance(vs, int) and len(emb.shape) == 2 and int(emb.shape[1]) != vs:
    raise fail(f"key '{arch}.vocab_size' = {vs} but tensor 'token_embd.weight' has "
               f"{int(emb.shape[1])} rows")
  d = ints.get(f"{arch}.embedding_length")
  if emb is not None and isinstance(d, int) and len(emb.shape) == 2 and int(emb.shape[0]) != d:
    raise fail(f"key '{arch}.embedding_length' = {d} but tensor 'token_embd.weight' has rows "
               f"of {int(emb.shape[0])} values")


def iter_fields(f: GGUFFile) -> Iterator[GGUFField]:
  """The file's key/value pairs in file order (pseudo-fields `GGUF.*` first)."""
  return iter(f.fields.values())


def open_gguf(path: str, *, check_values: bool = False) -> GGUFFile:
  """The checked GGUF file at `path` (`read_gguf`): structure, block scales and model
  metadata (`validate_metadata`) are validated before any tensor is read."""
  f = read_gguf(path, check_values=check_values)
  validate_metadata(f)
  return f


# The tokenizer's small fields; its vocabulary arrays are large and read by the tokenizer.
_TOKENIZER_SCALARS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                      "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                      "tokenizer.ggml.unknown_token_id")


def gguf_metadata(reader: Any) -> dict[str, Any]:
  """Key/value metadata of a `GGUFFile` (or gguf-py's `GGUFReader`) as Python values,
  without the tokenizer's vocabulary arrays."""
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key not in _TOKENIZER_SCALARS:
      continue  # vocabularies are large; the tokenizer reads them itself
    try:
      meta[key] = field.contents()
    except Exception:  # pragma: no cover - unusual field types
      continue
  return meta
