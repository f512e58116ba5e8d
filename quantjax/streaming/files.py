"""The streaming run's files and helpers: the manifest and its fingerprint, the work
directory, shard and carried-activation writers, the GGUF output plan, the cross-process
barrier."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from quantjax.io import atomic
from quantjax.io import gguf as gguf_io
from quantjax.io import hf
from quantjax.io import safetensors as st
from quantjax.streaming.source import Source
from quantjax.version import __version__

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "quantjax-stream"
MANIFEST_VERSION = 2
ROW_BLOCK_BYTES = 32 * 2**20  # row blocks of the embedding / head copy


# ----------------------------------------------------------------------------
# Helpers.


def set_leaf(tree: dict, path: Sequence[Any], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_leaf(tree: dict, path: Sequence[Any]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def fingerprint(src: Source, rules, method, tokens: np.ndarray, out_dtype: str) -> dict:
  files = {}
  for fname, fpath in src.tensors.files().items():
    stt = os.stat(fpath)
    files[fname] = [stt.st_size, stt.st_mtime_ns]
  config = atomic.file_sha256(src.cfg_path) if src.cfg_path else repr(src.config)
  return {"source": src.path, "files": files, "config": config,
          "rules": repr(tuple(rules)), "method": repr(method),
          "tokens": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest() +
          f" {list(tokens.shape)} {tokens.dtype}",
          "dtype": out_dtype, "processes": jax.process_count(),
          "quantjax": __version__, "jax": jax.__version__}


def write_json(path: str, obj: Any) -> None:
  with atomic.atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)


def write_shard(path: str, entries: dict, metadata: dict) -> None:
  """One safetensors file, atomically (a failed write leaves nothing at `path`)."""
  tmp = atomic.temp_path(path)
  try:
    st.write_safetensors_chunks(tmp, entries, metadata)
    atomic.commit_file(tmp, path)
  except OSError as e:
    atomic.unlink_quiet(tmp)
    raise atomic.named_os_error(e, f"cannot write {path}") from e
  except BaseException:
    atomic.unlink_quiet(tmp)
    raise


def row_blocks(a: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]
                ) -> Iterable[np.ndarray]:
  """`convert` of `a` (a memory-mapped tensor) in blocks of rows, each read as float32
  (exact for BF16 / F16 sources), so no whole float32 copy is ever made."""
  rows = max(1, ROW_BLOCK_BYTES // max(1, a[0].nbytes if a.ndim > 1 else a.nbytes))
  for r in range(0, a.shape[0], rows):
    yield convert(np.asarray(a[r:r + rows], np.float32))


def scheme_json(s: hf.Scheme) -> dict:
  return dataclasses.asdict(s)


def scheme_from(d: dict) -> hf.Scheme:
  return hf.Scheme(d["format"], None if d["weights"] is None else hf.QArgs(**d["weights"]),
                   None if d["input_activations"] is None else
                   hf.QArgs(**d["input_activations"]))


def clean_work(work: str) -> None:
  """Removes leftover temporary files of our atomic writes in the work directory, and the
  calibration activations a killed run left."""
  for name in os.listdir(work):
    if re.fullmatch(r"\..+\.tmp-[0-9a-f]{12}", name):
      p = os.path.join(work, name)
      if os.path.isfile(p):
        os.unlink(p)
  remove_activations(work)


ACTIVATIONS = "activations"  # the driver's spilled activations (MemoryOptions.activation_dir)


def remove_activations(work: str) -> None:
  d = os.path.join(work, ACTIVATIONS)
  if not os.path.isdir(d) or os.path.islink(d):
    return
  for name in os.listdir(d):
    if re.fullmatch(r"activations-[A-Za-z0-9_]+\.bin", name):
      os.unlink(os.path.join(d, name))
  try:
    os.rmdir(d)
  except OSError:
    pass  # something else is in it: left as it is


def is_ours(work: str) -> bool:
  try:
    with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
      m = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT


def remove_work(work: str) -> None:
  """Removes a work directory we wrote: only the files we name, then the directory."""
  remove_activations(work)
  for name in os.listdir(work):
    if (name == MANIFEST or re.fullmatch(r"(layer-\d{5}|embed)\.safetensors", name)
        or re.fullmatch(r"hidden-\d{5}(\.p\d+)?\.npy", name)
        or re.fullmatch(r"\..+\.tmp-[0-9a-f]{12}", name)):
      os.unlink(os.path.join(work, name))
  try:
    os.rmdir(work)
  except OSError:
    pass  # something else is in it: left as it is


GGUF_FLOAT = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def check_file_target(path: str, overwrite: bool) -> None:
  if os.path.islink(path) or os.path.isdir(path):
    raise FileExistsError(f"{path} is a {'symlink' if os.path.islink(path) else 'directory'}; "
                          "refusing to replace it with a GGUF file (nothing was written)")
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"GGUF file {path} exists (pass overwrite=True to replace it)")


class GGUFPlan:
  """Streaming to one GGUF file: per-tensor encoding as `export_gguf` does it, finished
  layers kept as raw tensors in the work directory, the file assembled at the end."""

  def __init__(self, gguf_lib, cfg, types, float_type: str):
    self.lib, self.cfg, self.types, self.float_type = gguf_lib, cfg, types, float_type
    self.names = gguf_io.tensor_table(cfg)  # the file's tensors, in its order
    self.table = {tuple(path): (g, heads, axis) for g, path, heads, axis in self.names}
    self.want = gguf_lib.expected_shapes(cfg)

  def encode(self, path, leaf):
    g, heads, axis = self.table[tuple(path)]
    raw, _, rec = self.lib.encode_tensor(g, tuple(path), heads, axis, leaf, self.want,
                                         self.types, self.float_type, None)
    return raw, rec

  def record(self, r: dict):
    return self.lib.TensorExport(**{**r, "shape": tuple(r["shape"])})

  def write_other_shard(self, src: Source, path: str, fdt: np.dtype, meta: dict) -> list[dict]:
    """Embedding, final norm and untied head: float rows converted in row blocks from
    memory maps (norms F32, as llama.cpp requires); a `gguf_types` rule that names one of
    them encodes it whole."""
    entries, recs = {}, []
    for spec in src.other_specs:
      g, heads, axis = self.table[tuple(spec.path)]
      spath = "/".join(map(str, spec.path))
      a = src.mapped(spec)  # GGUF rows already (Q/K, the permuted ones, are layer tensors)
      forced = self.lib.match_type(self.types, spath, g) if spec.path[-1] != "scale" else None
      t = "F32" if spec.path[-1] == "scale" else (forced or self.float_type)
      if t in self.lib.FLOAT_TYPES:
        dt = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(np.uint16)}[t]
        entries[g] = (dt, a.shape,
                      row_blocks(a, functools.partial(self.lib.float_tensor, t=t)))
        nbytes = int(np.prod(a.shape)) * dt.itemsize
        recs.append(dataclasses.asdict(self.lib.TensorExport(
            g, spath, tuple(spec.shape), src.dtype.name, t, "float", nbytes)))
      else:
        v = np.asarray(a, np.float32)
        raw, rec = self.encode(spec.path, v.T if spec.kind == "linear" else v)
        entries[g] = (raw.dtype, raw.shape, (raw,))
        recs.append(dataclasses.asdict(rec))
    write_shard(path, entries, meta)
    del entries, a
    src.release()
    return recs

  def write(self, output: str, work: str, n_layers: int, tokenizer: Any, name: str) -> None:
    """The GGUF file from the finished shards (memory maps, in the file's tensor order)."""
    with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
      m = json.load(f)
    t_of = {r["name"]: r["gguf_type"] for r in m["embed_records"]}
    for i in range(n_layers):
      t_of.update({r["name"]: r["gguf_type"] for r in m["layers"][str(i)]["records"]})
    files = [st.SafetensorsFile(os.path.join(work, "embed.safetensors"))] + [
        st.SafetensorsFile(os.path.join(work, f"layer-{i:05d}.safetensors"))
        for i in range(n_layers)]
    where = {k: f for f in files for k in f.keys()}
    try:
      tensors = [(g, where[g].get(g), t_of[g]) for g, _, _, _ in self.names]
      self.lib.write_gguf_file(output, self.cfg, tensors, tokenizer=tokenizer, name=name)
      del tensors
    finally:
      for f in files:
        f.close()


def hidden_name(boundary: int, pid: int, nproc: int) -> str:
  """The carried hidden states at a layer boundary (one file per process)."""
  return f"hidden-{boundary:05d}.npy" if nproc == 1 else f"hidden-{boundary:05d}.p{pid}.npy"


def barrier(name: str) -> None:
  """Waits until every jax.distributed process has reached `name`."""
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a (possibly global, row-sharded) array, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
  return np.concatenate([np.asarray(sh.data) for sh in shards])


def write_other_shard(src: Source, path: str, fdt: np.dtype, meta: dict) -> list[dict]:
  """The embedding, final norm and untied head, converted in row blocks from memory
  maps that are closed on return (their pages then leave this process)."""
  entries, recs = {}, []
  for spec in src.other_specs:
    a = src.mapped(spec)
    entries[spec.hf_name] = (fdt, a.shape, row_blocks(a, lambda b: b.astype(fdt)))
    note = f"cast to {fdt.name}" if src.dtype.itemsize > fdt.itemsize else ""
    recs.append(dataclasses.asdict(hf.TensorExport(
        spec.hf_name, "/".join(map(str, spec.path)), tuple(spec.shape), src.dtype.name,
        f"dense {st.dtype_name(fdt)}", "float", int(np.prod(a.shape)) * fdt.itemsize, note)))
  write_shard(path, entries, meta)
  del entries, a
  src.release()
  return recs


class Carried(collections.abc.Sequence):
  """Carried hidden states `[nb, B, T, d]` float32 in an `.npy` file, one batch read per
  index by positioned reads (no memory map: the file's pages never count as this process's
  memory). What `compress_streaming(activation_limit=)` hands the driver."""

  def __init__(self, path: str, shape: tuple[int, ...]):
    fmt = np.lib.format
    try:
      with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        got, fortran, dt = read(f)
        self.offset = f.tell()
    except ValueError as e:
      raise ValueError(f"{path}: not a carried hidden-state file ({e})") from None
    if tuple(got) != tuple(shape) or fortran or dt != np.float32:
      raise ValueError(f"{path}: carried hidden states of shape {tuple(got)} {dt}, expected "
                       f"{tuple(shape)} float32")
    self.path, self.shape = path, tuple(shape)
    self.rec = int(np.prod(shape[1:], dtype=np.int64)) * 4
    if os.path.getsize(path) < self.offset + shape[0] * self.rec:
      raise ValueError(f"{path}: carried hidden states cut short ({os.path.getsize(path)} "
                       f"bytes, expected {self.offset + shape[0] * self.rec})")

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, b: int) -> np.ndarray:
    if not 0 <= b < self.shape[0]:
      raise IndexError(b)
    out = np.empty(self.shape[1:], np.float32)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self.offset + b * self.rec)
      while view.nbytes:
        n = f.readinto(view)
        if not n:
          raise ValueError(f"{self.path}: carried hidden states of batch {b} cut short")
        view = view[n:]
    return out


def write_carried(path: str, shape: tuple[int, ...], rows: Iterable[np.ndarray]) -> None:
  """The `.npy` file `np.save` writes for the stacked `rows`, one batch at a time, atomically."""
  fmt = np.lib.format
  with atomic.atomic_write(path) as f:
    fmt.write_array_header_1_0(f, {"descr": fmt.dtype_to_descr(np.dtype(np.float32)),
                                   "fortran_order": False, "shape": tuple(shape)})
    for x in rows:
      f.write(memoryview(np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint8)))


def embed_rows(src: Source, tokens: np.ndarray) -> np.ndarray:
  """`embed_tokens[tokens]` as float32, read from a memory map (only those rows)."""
  spec = next(s for s in src.other_specs if s.path == ("embed", "embedding"))
  table = src.mapped(spec)
  flat = np.asarray(tokens).reshape(-1)
  out = np.asarray(table[flat], np.float32).reshape(tuple(np.shape(tokens)) + (table.shape[1],))
  del table
  src.release()
  return out
