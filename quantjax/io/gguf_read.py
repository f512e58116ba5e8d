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
`.data`), so loaders read either. The parsed objects, the constants and value types and
the value checks are in `quantjax.io.gguf_file` (importable from here); this module is
the header parser and the metadata checks.

References:
  GGUF specification: github.com/ggml-org/ggml/blob/master/docs/gguf.md.
  llama.cpp's reader: `ggml/src/gguf.cpp` (`gguf_init_from_file_impl`);
  block layouts: `ggml/src/ggml-common.h`; value checks:
  `ggml_validate_row_data` in `ggml/src/ggml-quants.c`.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any, Iterator

import numpy as np

from quantjax.io.gguf_file import (ARR, BOOL, DEFAULT_ALIGNMENT, EXTRA_GGML_TYPES, ExtraGGMLType,
                                   F32, F64, FLOAT_VALUE_TYPES, GGML_MAX_DIMS, GGML_MAX_NAME,
                                   GGUFError, GGUFField, GGUFFile, GGUFTensor, GGUF_MAGIC, I16, I32,
                                   I64, I8, INT_VALUE_TYPES, SCALE_LAYOUT, STR, U16, U32, U64,
                                   U64_AT, U8, VALUE_TYPE_NAMES, check_raw_tensor,
                                   check_tensor_values, first_bad, ggml_type)

__all__ = [
    "DEFAULT_ALIGNMENT",
    "ExtraGGMLType",
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


# GGUF value types: (struct code, size) for fixed-size scalars.
_SCALAR = {U8: ("<B", 1), I8: ("<b", 1), U16: ("<H", 2), I16: ("<h", 2),
           U32: ("<I", 4), I32: ("<i", 4), F32: ("<f", 4), BOOL: ("<B", 1),
           U64: ("<Q", 8), I64: ("<q", 8), F64: ("<d", 8)}


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
    return self.scalar(U32, what)

  def u64(self, what: str) -> int:
    return self.scalar(U64, what)

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
  if t >= len(VALUE_TYPE_NAMES):
    raise cur.fail(f"{what} has unknown value type {t} "
                   f"(GGUF types are 0..{len(VALUE_TYPE_NAMES) - 1})")
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
  if t == ARR:
    sub = _type_id(cur, key, f"the elements of key {key!r}")
    if sub == ARR:
      raise cur.fail(f"key {key!r} is an array of arrays, which llama.cpp does not read")
    n = cur.u64(f"the length of key {key!r}")
    if sub == STR:
      # each string costs at least its 8-byte length
      if n > cur.left() // 8:
        raise cur.fail(f"key {key!r} declares {n} strings at offset {voff}, more than the "
                       f"{cur.left()} bytes left in the file can hold")
      _skip_strings(cur, n, key)
    else:
      size = _SCALAR[sub][1]
      if n > cur.left() // size:
        raise cur.fail(f"key {key!r} declares {n} {VALUE_TYPE_NAMES[sub]} values "
                       f"({n * size} bytes) at offset {voff} but only {cur.left()} bytes are left in the file")
      cur.off += n * size
    return GGUFField(key, start, voff, (ARR, sub), int(n), f)
  if t == STR:
    v = cur.string(f"the value of key {key!r}")
  else:
    v = cur.scalar(t, f"the value of key {key!r}")
    if t == BOOL:
      v = bool(v)
  return GGUFField(key, start, voff, (t,), 1, f, v)


def _skip_strings(cur: _Cursor, n: int, key: str) -> None:
  """Walks `n` length-prefixed strings without decoding them (bounds checked)."""
  mm, off, end = cur.mm, cur.off, cur.end
  for j in range(n):
    if end - off < 8:
      cur.off = off
      raise cur.fail(f"truncated inside key {key!r}: string {j} of {n} has no length")
    (ln,) = U64_AT(mm, off)
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
  f.fields["GGUF.version"] = _pseudo(f, "GGUF.version", U32, version)
  f.fields["GGUF.tensor_count"] = _pseudo(f, "GGUF.tensor_count", U64, n_tensors)
  f.fields["GGUF.kv_count"] = _pseudo(f, "GGUF.kv_count", U64, n_kv)
  for i in range(n_kv):
    fld = _read_kv(cur, i, f)
    f.fields[fld.name] = fld

  al = f.fields.get("general.alignment")
  if al is not None:
    if al.type_ids != (U32,):
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
  if arch_f.type_ids != (STR,):
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
    if fld.value_type not in INT_VALUE_TYPES:
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
    if fld.is_array or fld.value_type not in (FLOAT_VALUE_TYPES | INT_VALUE_TYPES):
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
    if not (tok.is_array and tok.value_type == STR):
      raise fail(f"key 'tokenizer.ggml.tokens' must be an array of strings, it is a "
                 f"{tok.type_name()}")
    n_tok = tok.count
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
      fld = f.fields.get(key)
      if fld is not None and (not fld.is_array or fld.count != n_tok):
        raise fail(f"key {key!r} holds {fld.count if fld.is_array else 'a scalar'} values for "
                   f"{n_tok} tokens in 'tokenizer.ggml.tokens'")
    scores = f.fields.get("tokenizer.ggml.scores")
    if scores is not None and scores.value_type in FLOAT_VALUE_TYPES:
      s = scores.array()
      if not np.isfinite(s).all():
        raise fail(f"key 'tokenizer.ggml.scores' holds non-finite values (first at token "
                   f"{first_bad(~np.isfinite(s))})")
  model = f.fields.get("tokenizer.ggml.model")
  if model is not None:
    if model.type_ids != (STR,):
      raise fail(f"key 'tokenizer.ggml.model' must be a STRING, it is a {model.type_name()}")
    name = model.contents()
    if name not in _TOKENIZER_MODELS:
      raise fail(f"key 'tokenizer.ggml.model' = {name!r} is not a tokenizer llama.cpp knows "
                 f"({', '.join(sorted(_TOKENIZER_MODELS))})")
    if name not in ("none", "no_vocab") and tok is None:
      raise fail(f"tokenizer {name!r} without its vocabulary 'tokenizer.ggml.tokens'")
    if name == "gpt2":
      merges = f.fields.get("tokenizer.ggml.merges")
      if merges is None or not (merges.is_array and merges.value_type == STR):
        raise fail("a 'gpt2' (byte-level BPE) tokenizer needs 'tokenizer.ggml.merges', an "
                   "array of strings: "
                   + ("it is missing" if merges is None else f"it is a {merges.type_name()}"))
  for key, fld in f.fields.items():
    if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
      if fld.is_array or fld.value_type not in INT_VALUE_TYPES:
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
