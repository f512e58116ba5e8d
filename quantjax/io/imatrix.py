"""llama.cpp importance-matrix files: write what `llama-quantize --imatrix` reads, read them back.

quantjax computes llama.cpp's importance matrix itself
(`quantjax.methods.importance.input_importance`: the mean of x² per input
feature of each weight) and hands it to encoders in memory. This module
writes it as a file llama.cpp's tools take, and reads such files (from
llama.cpp's `llama-imatrix` too).

The GGUF layout (llama.cpp's `tools/imatrix/imatrix.cpp`, read by
`common/imatrix-loader.cpp` for `llama-quantize`):

* `general.type = "imatrix"`; no `general.architecture`.
* `imatrix.datasets` (array of strings), `imatrix.chunk_count` (uint32: the
  calibration windows), `imatrix.chunk_size` (uint32: tokens per window).
  `llama-quantize` refuses a GGUF imatrix without all three ("missing imatrix
  metadata").
* Per weight `<name>` (its GGUF tensor name, `blk.3.attn_q.weight`):
  `<name>.in_sum2`, F32 of ggml shape `[n_in, n_mat]` (one row per expert; 1
  for a dense weight): the SUM of x² over the rows (tokens) seen, and
  `<name>.counts`, F32 `[1, n_mat]`: the number of rows summed. (Newer
  llama-imatrix files may add `<name>.in_sum`, the sum of x; it is optional and
  read here as `Imatrix.in_sums`. Other tensors are ignored, as llama.cpp does.)
  `llama-quantize` hands its quantizer `in_sum2 / count` (float32 division,
  after rounding the count to an integer); a row with count 0 becomes all ones.

The counts `write_imatrix` stores: quantjax keeps means, not sums. With the
true number of calibration tokens as the count, `float32(mean * count) /
count` misses the mean by an ulp for many values (no float32 sum divides back
exactly for a count of 3 in about 1 value of 7), so by default the count is
the largest power of two not above the number of calibration tokens
(`chunk_count * chunk_size`): then `in_sum2 = mean * count` is exact in
float32 and `in_sum2 / count` is the mean bit for bit, in llama-quantize and
in `read_imatrix`. The count only weighs a file against others when
llama-imatrix merges several (`--in-file`): a power of two within a factor of
2 of the tokens keeps that weighting honest. An explicit `counts=` is stored
as given (the means then come back to within an ulp).

The legacy `.dat` layout (`llama-imatrix --output-format dat`, still read by
llama.cpp) is read too: int32 entry count; per entry int32 name length, the
name, int32 `ncall`, int32 value count, float32 values (mean x² times
`ncall`); optionally int32 chunk count, int32 length and the dataset name.
Its means are `values / ncall` (the values as they are when `ncall` is 0),
as `llama-quantize` computes them.

Names: this module takes GGUF tensor names. `gguf_names(config)` maps a
model's params paths to them from the architecture record
(`quantjax.io.architecture`, the table `quantjax.io.gguf` exports with), and
`tensor_importance(importance, names)` renames an `input_importance` result.

Files are written to a temporary name, read back with the checks below, and
renamed into place (`quantjax.io.atomic`): a failed write leaves nothing.

Errors (ValueError, or GGUFError for a damaged file; each names the file and
the tensor): a vector that is not 1-D, empty, or holds a NaN/Inf/negative
value; a sum that overflows float32; a name llama.cpp cannot hold; a file that
is not GGUF or legacy imatrix, is truncated, holds no entries, has an
`in_sum2` without its `counts` (or the reverse), non-F32 tensors, sizes that do
not divide, negative, fractional or non-finite counts or sums.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

from quantjax.io import atomic
from quantjax.io import gguf_read
from quantjax.io.gguf_file import GGML_MAX_NAME, STR, GGUFError
from quantjax.io.gguf_import import tensor_table
from quantjax.optional import require

__all__ = [
    "Imatrix",
    "exact_count",
    "gguf_names",
    "read_imatrix",
    "read_imatrix_file",
    "tensor_importance",
    "write_imatrix",
]

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM2, COUNTS, SUM = ".in_sum2", ".counts", ".in_sum"
_U32_MAX = 2 ** 32 - 1
_F32_MAX = float(np.finfo(np.float32).max)
_GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass
class Imatrix:
  """An importance-matrix file as read (`read_imatrix_file`).

  Attributes:
    means: `{tensor name: mean x² per input feature}` as llama-quantize hands
      them to its quantizer: float32 `[n_in]` for a dense weight, `[n_mat, n_in]`
      for a weight with several matrices (experts).
    counts: `{tensor name: int64 [n_mat]}` rows (tokens) summed per matrix; for
      a legacy file, its `ncall` (one entry).
    sums: `{tensor name: the stored float32 sums}` (`in_sum2`, `[n_mat, n_in]`;
      the legacy file's values, `[n_in]`).
    in_sums: `{tensor name: float32 [n_mat, n_in]}`, the sums of x where the file
      holds them (newer llama-imatrix files), else empty.
    datasets: `imatrix.datasets` (the legacy file's dataset name, if any).
    chunk_count: `imatrix.chunk_count` (the legacy trailer's), or None.
    chunk_size: `imatrix.chunk_size`, or None (legacy files do not store it).
    legacy: the file is in the legacy `.dat` layout.
  """

  means: dict[str, np.ndarray]
  counts: dict[str, np.ndarray]
  sums: dict[str, np.ndarray]
  in_sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  datasets: list[str] = dataclasses.field(default_factory=list)
  chunk_count: int | None = None
  chunk_size: int | None = None
  legacy: bool = False

  @property
  def has_metadata(self) -> bool:
    """The three `imatrix.*` keys `llama-quantize` requires of a GGUF imatrix are there."""
    return self.legacy or (self.chunk_count is not None and self.chunk_size is not None
                           and bool(self.datasets))


# ----------------------------------------------------------------------------
# Names.


def gguf_names(config: Any) -> dict[str, str]:
  """`{params path: GGUF tensor name}` for every tensor of a model of `config`
  (`layers/3/attn/q_proj/kernel -> blk.3.attn_q.weight`), from the family's
  registered architecture record: the names `quantjax.io.gguf.export_gguf` writes."""
  return {"/".join(map(str, ppath)): gname for gname, ppath, _, _ in tensor_table(config)}


def tensor_importance(importance: Mapping[str, Any], names: Mapping[str, str]
                      ) -> dict[str, np.ndarray]:
  """`importance` (`{params path: vector}`, `input_importance`'s result) keyed by GGUF
  tensor name through `names` (`gguf_names(config)`); a path with no name, or two paths
  with one name, is a ValueError naming them. The vectors are the same (the input
  features are the GGUF rows' values; llama.cpp's Q/K permutation moves rows only)."""
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for path, vec in importance.items():
    name = names.get(path)
    if name is None:
      raise ValueError(f"importance for {path}: no GGUF tensor name for this params path "
                       f"(the names known: {', '.join(sorted(names)[:4])}, ...)")
    if name in out:
      raise ValueError(f"importance for {path} and {origin[name]}: both name GGUF tensor {name}")
    out[name] = np.asarray(vec)
    origin[name] = path
  return out


# ----------------------------------------------------------------------------
# Writing.


def exact_count(tokens: int) -> int:
  """The count `write_imatrix` stores for means over `tokens` rows: the largest power of
  two not above `tokens` (at least 1), so `float32(mean * count) / count == mean`."""
  tokens = int(tokens)
  return 1 << (max(tokens, 1).bit_length() - 1)


def _check_vector(path: str, name: str, vec: Any) -> np.ndarray:
  if not isinstance(name, str) or not name:
    raise ValueError(f"{path}: imatrix tensor names must be non-empty strings, got {name!r}")
  longest = len((name + SUM2).encode("utf-8"))
  if longest >= GGML_MAX_NAME:
    raise ValueError(f"{path}: tensor {name}: '{name}{SUM2}' is {longest} bytes; llama.cpp "
                     f"holds tensor names of at most {GGML_MAX_NAME - 1}")
  a = np.asarray(vec)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{path}: tensor {name}: the importance must be a non-empty 1-D vector "
                     f"(mean x² per input feature), got shape {a.shape}")
  if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
    raise ValueError(f"{path}: tensor {name}: the importance has dtype {a.dtype}, not a number")
  a = a.astype(np.float32)
  bad = ~np.isfinite(a) | (a < 0)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{path}: tensor {name}: the importance holds {int(bad.sum())} NaN, Inf or "
                     f"negative values of {a.size} (first at {i}: {a[i]}); a mean of x² is "
                     "finite and >= 0")
  return a


def _check_u32(path: str, what: str, v: Any) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= _U32_MAX:
    raise ValueError(f"{path}: {what} must be an integer in [0, 2^32), got {v!r}")
  return int(v)


def write_imatrix(path: str | os.PathLike, importance: Mapping[str, Any], *, chunk_count: int,
                  chunk_size: int, datasets: Sequence[str] = (),
                  counts: int | Mapping[str, int] | None = None) -> None:
  """Writes `importance` as a llama.cpp GGUF imatrix file (see the module docstring).

  Args:
    path: the output file (`imatrix.gguf`); written atomically.
    importance: `{GGUF tensor name: mean x² per input feature}` (1-D, finite,
      >= 0). From params paths: `tensor_importance(imp, gguf_names(config))`.
    chunk_count: the calibration windows the means are over (`imatrix.chunk_count`).
    chunk_size: tokens per window (`imatrix.chunk_size`, llama.cpp's n_ctx).
    datasets: `imatrix.datasets`, the calibration texts' names. llama-quantize
      needs the key, and GGUF stores no empty array, so none given writes
      `["quantjax"]`.
    counts: the rows each mean is over, stored as `<name>.counts` with
      `in_sum2 = mean * count`. Default: `exact_count(chunk_count * chunk_size)`,
      a power of two for which the means come back bit for bit. An int, or
      `{name: int}`, is stored as given (an integer float32 holds exactly).

  Raises:
    ValueError: a bad vector, name, count or key (naming `path` and the tensor);
      nothing is written.
    OSError: the file could not be written (naming it); nothing is left behind.
  """
  gguf = require("gguf", "gguf", "imatrix files")
  path = os.fspath(path)
  if not importance:
    raise ValueError(f"{path}: no importance vectors to write (llama.cpp refuses an "
                     "imatrix without entries)")
  chunk_count = _check_u32(path, "chunk_count", chunk_count)
  chunk_size = _check_u32(path, "chunk_size", chunk_size)
  if chunk_size == 0:
    raise ValueError(f"{path}: chunk_size must be positive (tokens per calibration window)")
  datasets = [str(d) for d in datasets] or ["quantjax"]
  default = exact_count(chunk_count * chunk_size)

  entries = []
  for name in sorted(importance):
    mean = _check_vector(path, name, importance[name])
    c = counts.get(name, default) if isinstance(counts, Mapping) else (
        default if counts is None else counts)
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) < 1 \
        or float(np.float32(int(c))) != int(c):
      raise ValueError(f"{path}: tensor {name}: count {c!r} is not a positive integer that "
                       "float32 holds exactly")
    c = int(c)
    with np.errstate(over="ignore"):
      s = (mean.astype(np.float64) * c).astype(np.float32)
    if not np.isfinite(s).all():
      i = int(np.argmax(~np.isfinite(s)))
      raise ValueError(f"{path}: tensor {name}: mean {float(mean[i]):.6g} at {i} times count {c} "
                       f"overflows float32 (largest {_F32_MAX:.4g}); pass a smaller count")
    entries.append((name, mean, s.reshape(1, -1), np.full((1, 1), c, np.float32)))
  if isinstance(counts, Mapping):
    extra = sorted(set(counts) - set(importance))
    if extra:
      raise ValueError(f"{path}: counts for tensors without importance: {extra[:4]}")

  def write(tmp):
    w = gguf.GGUFWriter(tmp, "")  # an empty architecture writes no general.architecture
    w.add_type("imatrix")
    w.add_key_value(KEY_DATASETS, datasets, gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    w.add_uint32(KEY_CHUNK_COUNT, chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name, _, s, cnt in entries:  # sorted, in_sum2 then counts, as llama-imatrix writes
      w.add_tensor(name + SUM2, s)    # numpy [1, n_in] = ggml [n_in, 1]
      w.add_tensor(name + COUNTS, cnt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

  def check(tmp):
    # Read back what was written, as llama-quantize will, before it takes the name.
    try:
      back = read_imatrix_file(tmp)
    except (GGUFError, ValueError) as e:
      raise GGUFError(f"{path}: the written file fails the reader's checks, so it was not "
                      f"kept: {e}") from None
    for name, mean, _, _ in entries:
      if counts is None and not np.array_equal(back.means[name], mean):
        raise GGUFError(f"{path}: tensor {name}: the means read back differ from those "
                        "written, so the file was not kept")

  atomic.write_checked(path, write, check, what="imatrix file")


# ----------------------------------------------------------------------------
# Reading.


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{tensor name: mean x² per input feature}` of an imatrix file (GGUF or legacy
  `.dat`), exactly as llama-quantize computes them (`read_imatrix_file(path).means`)."""
  return read_imatrix_file(path).means


def read_imatrix_file(path: str | os.PathLike) -> Imatrix:
  """An imatrix file, GGUF or legacy `.dat` (told apart by the GGUF magic), with its
  sums, counts and metadata (`Imatrix`). GGUFError names the file and the tensor of
  anything malformed; FileNotFoundError when there is no file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"imatrix file not found: {path}")
  if os.path.isdir(path):
    raise GGUFError(f"{path} is a directory, not an imatrix file")
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError as e:
    raise atomic.named_os_error(e, f"cannot read imatrix file {path}") from e
  if head == _GGUF_MAGIC:
    return _read_gguf(path)
  return _read_legacy(path)


def _means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """llama-quantize's values: each matrix's sums over its count, ones where it is 0."""
  out = np.empty_like(sums)
  for j, c in enumerate(counts):
    out[j] = sums[j] / np.float32(c) if c > 0 else np.float32(1.0)
  return out


def _read_gguf(path: str) -> Imatrix:
  try:
    f = gguf_read.read_gguf(path)
  except GGUFError as e:
    msg = str(e)
    raise GGUFError(msg if path in msg else f"{path}: {msg}") from None
  with f:
    fields = f.fields

    def value(key):
      return fields[key].contents() if key in fields else None

    gtype = value(KEY_TYPE)
    if gtype is not None and gtype != "imatrix":
      raise GGUFError(f"{path}: general.type is {gtype!r}, not 'imatrix' (a model file?)")
    datasets = []
    if KEY_DATASETS in fields:
      fd = fields[KEY_DATASETS]
      if not fd.is_array or fd.value_type != STR:
        raise GGUFError(f"{path}: {KEY_DATASETS} is {fd.type_name()}, not an array of strings")
      datasets = [str(s) for s in fd.contents()]
    meta = {}
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
      v = value(key)
      if v is not None and (isinstance(v, (bool, list, str, float)) or int(v) < 0):
        raise GGUFError(f"{path}: {key} is {fields[key].type_name()} {v!r}, not an unsigned "
                        "integer")
      meta[key] = None if v is None else int(v)

    parts: dict[str, dict[str, Any]] = {}
    for t in f.tensors:
      for suffix in (SUM2, COUNTS, SUM):
        if t.name.endswith(suffix) and len(t.name) > len(suffix):
          parts.setdefault(t.name[:-len(suffix)], {})[suffix] = t
          break
    if not parts:
      raise GGUFError(f"{path}: holds no imatrix entries ('<name>{SUM2}' and '<name>{COUNTS}' "
                      "tensors); is it a model file?")
    means, counts, sums, in_sums = {}, {}, {}, {}
    for name in sorted(parts):
      p = parts[name]
      for need, other in ((SUM2, COUNTS), (COUNTS, SUM2)):
        if need not in p:
          raise GGUFError(f"{path}: tensor '{name}{other}' has no '{name}{need}' beside it "
                          f"(entry {name})")
      for suffix, t in p.items():
        if t.type_name != "F32":
          raise GGUFError(f"{path}: tensor '{name}{suffix}' is {t.type_name}; imatrix "
                          "tensors are F32")
      s_t, c_t = p[SUM2], p[COUNTS]
      s = np.array(s_t.data, np.float32).reshape(-1)
      c = np.array(c_t.data, np.float32).reshape(-1)
      n_mat = c.size
      if n_mat == 0 or s.size == 0 or s.size % n_mat:
        raise GGUFError(f"{path}: entry {name}: {s.size} sums ('{name}{SUM2}') do not divide "
                        f"into {n_mat} matrices ('{name}{COUNTS}')")
      if not np.isfinite(c).all() or (c < 0).any() or (c != np.round(c)).any():
        raise GGUFError(f"{path}: entry {name}: the counts ('{name}{COUNTS}') must be finite "
                        f"non-negative integers, got {c[:8].tolist()}")
      bad = ~np.isfinite(s) | (s < 0)
      if bad.any():
        i = int(np.argmax(bad))
        raise GGUFError(f"{path}: entry {name}: '{name}{SUM2}' holds {int(bad.sum())} NaN, "
                        f"Inf or negative sums of x² (first at {i}: {s[i]})")
      s2 = s.reshape(n_mat, -1)
      ci = c.astype(np.int64)
      m = _means(s2, ci)
      means[name] = m[0] if n_mat == 1 else m
      counts[name] = ci
      sums[name] = s2
      if SUM in p:
        a = np.array(p[SUM].data, np.float32).reshape(-1)
        if a.size != s.size:
          raise GGUFError(f"{path}: entry {name}: '{name}{SUM}' has {a.size} values, "
                          f"'{name}{SUM2}' {s.size}")
        in_sums[name] = a.reshape(n_mat, -1)
  return Imatrix(means=means, counts=counts, sums=sums, in_sums=in_sums, datasets=datasets,
                 chunk_count=meta[KEY_CHUNK_COUNT], chunk_size=meta[KEY_CHUNK_SIZE])


def _read_legacy(path: str) -> Imatrix:
  try:
    with open(path, "rb") as fh:
      data = fh.read()
  except OSError as e:
    raise atomic.named_os_error(e, f"cannot read imatrix file {path}") from e
  off = 0

  def take(n: int, what: str) -> bytes:
    nonlocal off
    if n < 0 or off + n > len(data):
      raise GGUFError(f"{path}: truncated or not an imatrix file (GGUF or legacy .dat): "
                      f"{what} needs {n} bytes at offset {off}, the file has {len(data)}")
    b = data[off:off + n]
    off += n
    return b

  def i32(what: str) -> int:
    return struct.unpack("<i", take(4, what))[0]

  n_entries = i32("the entry count")
  if n_entries < 1 or n_entries * 16 > len(data):
    raise GGUFError(f"{path}: not an imatrix file (neither GGUF nor legacy .dat): it starts "
                    f"with an entry count of {n_entries}")
  means, counts, sums = {}, {}, {}
  for i in range(n_entries):
    n = i32(f"entry {i}'s name length")
    if not 0 < n < 4096:
      raise GGUFError(f"{path}: entry {i}: a name of {n} bytes (truncated or not an imatrix "
                      "file)")
    try:
      name = take(n, f"entry {i}'s name").decode("utf-8")
    except UnicodeDecodeError:
      raise GGUFError(f"{path}: entry {i}: the name is not UTF-8") from None
    if name in sums:
      raise GGUFError(f"{path}: entry {i}: tensor {name} appears twice")
    ncall = i32(f"entry {name}'s ncall")
    nval = i32(f"entry {name}'s value count")
    if ncall < 0 or nval < 1:
      raise GGUFError(f"{path}: entry {name}: ncall {ncall}, {nval} values")
    v = np.frombuffer(take(4 * nval, f"entry {name}'s {nval} values"), "<f4").astype(np.float32)
    bad = ~np.isfinite(v) | (v < 0)
    if bad.any():
      j = int(np.argmax(bad))
      raise GGUFError(f"{path}: entry {name}: {int(bad.sum())} NaN, Inf or negative values "
                      f"(first at {j}: {v[j]})")
    sums[name] = v
    counts[name] = np.array([ncall], np.int64)
    means[name] = v / np.float32(ncall) if ncall > 0 else v.copy()
  chunk_count, datasets = None, []
  if off + 4 <= len(data):  # the optional trailer: chunk count, dataset name
    chunk_count = i32("the chunk count")
    if off + 4 <= len(data):
      n = i32("the dataset name length")
      if n > 0:
        datasets.append(take(n, "the dataset name").decode("utf-8", "replace"))
  return Imatrix(means=means, counts=counts, sums=sums, datasets=datasets,
                 chunk_count=chunk_count, legacy=True)
