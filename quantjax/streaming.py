"""Compress models larger than memory: one decoder layer at a time, disk to disk.

`compress_streaming(source, output, batches, rules, method)` reads a Llama-family
Hugging Face directory (`config.json` and F32 / BF16 / F16 safetensors, one
file or shards with `model.safetensors.index.json`) or a Llama-family GGUF file
(memory-mapped; each tensor dequantized to float32 when its layer is read, as
`models.load.load_gguf` dequantizes it (`io.gguf_dequant`), Q/K rows back in Hugging Face's order;
the embedding's calibration rows and the copies of the embedding, norm and head
read by rows, so a quantized vocabulary is never dequantized whole) and writes the quantized
model as a Hugging Face compressed-tensors directory (the layout `io.hf.export_hf`
writes, one safetensors shard per decoder layer) or as one GGUF file (the
bytes `io.gguf.export_gguf` writes), holding at most one layer in memory:

1. Every header is checked first (a missing tensor, a wrong shape, a shard
   whose dtype differs from `config.json`'s, unknown extra tensors: an
   `HFFormatError` naming the file and the tensor; for GGUF the checks of
   `io.gguf_read`, a `GGUFError`), before any work.
2. The calibration hidden states start as the embedding rows of the
   calibration tokens, gathered from a memory map (only those rows are read).
3. For each layer: its tensors are read from disk (a copy per tensor, no map
   left open; BF16 / F16 stay in their dtype and are cast to float32 inside
   the forward's computation and by the method), the method runs
   on it through the ordinary calibration driver (`methods.calibrate`,
   sequential mode) with the layer's own forward taken from the model code
   (`models.llama.Block`), the quantized tensors are encoded exactly as
   `export_hf` encodes them and written as one shard, and the layer's output
   hidden states, computed with the quantized weights, become the next
   layer's inputs (GPTQ's sequential recipe: every layer is calibrated on the
   outputs of the already-quantized layers before it, as llm-compressor's
   sequential pipeline does). The layer is then released.
4. The embedding, final norm and untied head are copied in row blocks; the
   shards, index, `config.json` and report are committed atomically as one
   directory (`io.atomic.atomic_dir`), or the GGUF file is assembled from the
   finished layers (memory maps) and renamed into place: the output is
   complete or absent, and an earlier output is kept until the new one is
   complete.

Across processes (`jax.distributed`): the calibration batches are dealt out,
each process carries its own batches' hidden states, XLA sums the statistics
across processes, and every process continues with process 0's layer (see
`compress_streaming`).

Resume: finished layer shards, the hidden states at the last layer boundary
and a manifest live in a work directory beside the output, each written
atomically. The manifest is keyed by everything the result depends on
(source files, config, rules, method, calibration tokens, output dtype,
versions); a run that finds a matching manifest continues after the last
finished layer and gives the same bytes as an uninterrupted run.

Memory: one layer's weights in their stored dtype (BF16 stays BF16; each
projection's array is freed once its result replaces it, via
`MemoryOptions(donate=True)`) and the float32 effective (dequantized) weights of
its finished parts (`MemoryOptions(stand_in_dtype=float32)`: exactly the values a
float32 copy of the model would compute with), the method's statistics and
working copies (for GPTQ the largest Hessian: its `K x K` float32 statistic,
dropped once GPTQ has its own copy, and that copy, solved in place, which the
column loop reads without a further copy for a float32 solve), plus the
calibration activations: `n_tokens x d` float32 between layers, and within a
layer the driver's stacks of each segment's activations over all batches.
With `activation_limit`, stacks above the limit live in files of the work
directory instead and the layer runs one batch at a time, so memory holds
one batch's activations. Freed heap pages are returned to the OS after each
layer. The peak is independent of the number of layers.

References:
  Frantar et al., GPTQ, ICLR 2023, arXiv:2210.17323 (layer-by-layer
  quantization on the quantized prefix's outputs). llm-compressor,
  `pipelines/sequential` (one decoder layer at a time, activations carried
  between layers). Hugging Face safetensors sharding
  (`model.safetensors.index.json`); compressed-tensors 0.19 (see `io/hf.py`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import gc
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from quantjax import methods
from quantjax import rules as rules_lib
from quantjax.eval import speed as speed_lib
from quantjax.io import atomic
from quantjax.io import gguf as gguf_io
from quantjax.io import gguf_dequant
from quantjax.io import gguf_read
from quantjax.io import hf
from quantjax.io import safetensors as st
from quantjax.methods import capture as capture_lib
from quantjax.models import llama
from quantjax.numerics.qarray import ActQuantized, InputScaled
from quantjax.version import __version__

__all__ = ["StreamResult", "compress_streaming", "check_source"]

MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "quantjax-stream"
_MANIFEST_VERSION = 2
_FLOAT = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_ROW_BLOCK_BYTES = 32 * 2**20  # row blocks of the embedding / head copy


@dataclasses.dataclass
class StreamResult:
  """What `compress_streaming` returns.

  Attributes:
    path: the output directory.
    layers: one record per decoder layer, in order: `layer`, `seconds`
      (read, calibrate, write, carry), `stats_seconds` / `quant_seconds`
      (the driver's forward statistics / the method), `peak_rss_bytes`
      (Linux VmHWM during that layer, None elsewhere), `spilled_bytes` (the
      driver's activations written to disk, `activation_limit`), `resumed` (True when
      an earlier run finished it and this one reused it; its figures are that
      run's).
    resumed_from: the first layer this call computed (0 for a fresh run,
      `num_layers` when every layer was already done).
    seconds: wall time of this call.
    peak_rss_bytes: the largest peak resident memory of this call's phases.
    output_bytes: total bytes of the output directory's files.
    report: the `hf.ExportReport` (per tensor: how it was stored), or for a
      GGUF output the list of `gguf.TensorExport`.
    info: the method's records merged over layers (e.g. `gptq_loss`), the
      number of `processes` and this process's share of the calibration
      batches (`local_batches`).
  """

  path: str
  layers: list[dict[str, Any]]
  resumed_from: int
  seconds: float
  peak_rss_bytes: int | None
  output_bytes: int
  report: hf.ExportReport
  info: dict[str, Any]


# ----------------------------------------------------------------------------
# The source.


class _HFTensors:
  """Tensors of a Hugging Face checkpoint (safetensors, one file or shards)."""

  def __init__(self, ckpt: hf.Checkpoint, directory: str):
    self.ckpt, self.directory = ckpt, directory

  def read(self, spec: hf.TensorSpec) -> np.ndarray:
    return self.ckpt.files[self.ckpt.where[spec.hf_name]].read(spec.hf_name)

  def mapped(self, spec: hf.TensorSpec) -> np.ndarray:
    return self.ckpt.files[self.ckpt.where[spec.hf_name]].get(spec.hf_name)

  def files(self) -> dict[str, str]:
    return {f: os.path.join(self.directory, f) for f in sorted(set(self.ckpt.where.values()))}

  def release(self) -> None:
    for f in self.ckpt.files.values():
      f.close()


class _GGUFRows:
  """A GGUF tensor seen as float32 rows: indexing reads and dequantizes only the rows
  asked for (the embedding's calibration rows, row blocks of a copy)."""

  def __init__(self, tensor: Any):
    self._t = tensor
    self.shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    self.ndim = len(self.shape)
    self.dtype = np.dtype(np.float32)
    self.nbytes = int(np.prod(self.shape)) * 4

  def __getitem__(self, rows: Any) -> np.ndarray:
    return gguf_dequant.dequantize_gguf_rows(self._t, rows)

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    a = self[:].reshape(self.shape)
    return a if dtype is None else a.astype(dtype)


class _GGUFTensors:
  """Tensors of a GGUF file, in the Hugging Face layout (`[out, in]`, Q/K rows in
  Hugging Face's order), dequantized to float32 per tensor as `load_gguf` does."""

  def __init__(self, path: str, config: Any, reader: Any):
    self.path, self._f = path, reader
    self.table = {tuple(dest): (g, heads) for g, dest, heads, _ in
                  gguf_io.tensor_table(config)}

  def _tensor(self, spec: hf.TensorSpec) -> tuple[Any, int | None]:
    if self._f is None:
      self._f = gguf_read.open_gguf(self.path)
    g, heads = self.table[tuple(spec.path)]
    return self._f.tensor(g), heads

  def read(self, spec: hf.TensorSpec) -> np.ndarray:
    t, heads = self._tensor(spec)
    w = gguf_dequant.dequantize_gguf_tensor(t)
    return gguf_dequant.unpermute_qk(w, heads) if heads else w

  def mapped(self, spec: hf.TensorSpec) -> _GGUFRows:
    t, heads = self._tensor(spec)
    if heads:  # pragma: no cover - only layer tensors are permuted, and those are read
      raise ValueError(f"{spec.hf_name}: Q/K tensors are read whole, not by rows")
    return _GGUFRows(t)

  def files(self) -> dict[str, str]:
    return {os.path.basename(self.path): self.path}

  def release(self) -> None:
    """The pages read so far leave this process (`GGUFFile.drop_pages`; where that is not
    available the file is unmapped and parsed again on next use)."""
    if self._f is not None and not self._f.drop_pages():
      self._f.close()
      self._f = None


@dataclasses.dataclass
class _Source:
  path: str  # the Hugging Face directory or the GGUF file
  cfg_path: str | None  # config.json (None for GGUF: its metadata is in the file)
  arch: hf.HFArchitecture
  config: Any
  tensors: _HFTensors | _GGUFTensors
  dtype: np.dtype  # what a tensor is read as: the stored float dtype (float32 for GGUF)
  layer_specs: list[list[hf.TensorSpec]]
  other_specs: list[hf.TensorSpec]

  def stored(self, spec: hf.TensorSpec) -> np.ndarray:
    """The tensor as stored (HF layout, stored dtype), read into a fresh array."""
    return self.tensors.read(spec)

  def mapped(self, spec: hf.TensorSpec) -> Any:
    """The tensor for reads by rows (a memory map, or dequantizing GGUF rows)."""
    return self.tensors.mapped(spec)

  def release(self) -> None:
    self.tensors.release()

  @property
  def tokenizer(self) -> str | None:
    """Where a GGUF output's vocabulary comes from by default ("auto")."""
    if self.cfg_path is None:
      return self.path  # the GGUF source carries its own
    return self.path if os.path.exists(os.path.join(self.path, "tokenizer.json")) else None


def _split_specs(specs: list[hf.TensorSpec], n_layers: int):
  layers: list[list[hf.TensorSpec]] = [[] for _ in range(n_layers)]
  others = []
  for spec in specs:
    if spec.path[0] == "layers":
      layers[int(spec.path[1])].append(spec)
    else:
      others.append(spec)
  return layers, others


def _check_gguf_source(path: str) -> _Source:
  """A Llama-family GGUF file: structure, metadata, tensor names and shapes checked
  (`quantjax.io.gguf_read`) before any tensor is read."""
  reader = gguf_read.open_gguf(path)
  try:
    config = gguf_io.config_from_reader(reader, path)
    if not isinstance(config, llama.LlamaConfig):
      raise gguf_read.GGUFError(f"{path}: architecture {reader.get('general.architecture')!r}: "
                                "streaming compression covers the Llama family")
    gguf_io.check_gguf_names(config, reader, path)
    gguf_io.check_tensor_shapes(config, reader, path)
  except BaseException:
    reader.close()
    raise
  arch = hf.architecture_for("llama")
  layers, others = _split_specs(arch.tensors(config), config.num_layers)
  return _Source(path, None, arch, config, _GGUFTensors(path, config, reader),
                 np.dtype(np.float32), layers, others)


def check_source(directory: str | os.PathLike) -> _Source:
  """Opens a Llama-family source for streaming and checks every tensor's header: a
  Hugging Face directory (presence, shape, dtype against `config.json`) or a `.gguf`
  file (structure, metadata, names and shapes, as `models.load.load_gguf` checks).

  Raises:
    FileNotFoundError: no directory or no `config.json`, no `.gguf` file.
    GGUFError: a damaged GGUF file, or one not of the Llama family (named).
    HFFormatError: not a Llama-family model, an already-quantized checkpoint,
      a missing shard or tensor, a shape that disagrees with `config.json`, a
      tensor whose dtype differs from the checkpoint's dtype (`config.json`'s
      `torch_dtype` / `dtype`, else the embedding's), a non-float tensor,
      tensors the architecture does not have. Each names the file and tensor.
  """
  directory = os.path.abspath(os.fspath(directory))
  if directory.endswith(".gguf"):
    if not os.path.isfile(directory):
      raise FileNotFoundError(f"GGUF source not found: {directory}")
    return _check_gguf_source(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a directory: {directory}")
  cfg_path, cfg_json = hf.read_config(directory)
  model_type = str(cfg_json.get("model_type"))
  try:
    arch = hf.architecture_for(model_type)
  except hf.HFFormatError as e:
    raise hf.HFFormatError(f"{cfg_path}: {e}") from None
  if arch.config_type is not llama.LlamaConfig:
    raise hf.HFFormatError(f"{cfg_path}: model_type {model_type!r}: streaming compression "
                           "covers the Llama family (model_type 'llama', 'mistral', 'smollm')")
  if cfg_json.get("quantization_config"):
    raise hf.HFFormatError(f"{cfg_path}: the checkpoint is already quantized "
                           f"({cfg_json['quantization_config'].get('quant_method')!r}); "
                           "streaming compression reads float checkpoints")
  try:
    config = arch.from_hf_config(cfg_json, os.path.basename(directory), cfg_path)
  except KeyError as e:
    raise hf.HFFormatError(f"{cfg_path}: missing field {e}") from None
  except ValueError as e:
    raise hf.HFFormatError(f"{cfg_path}: {e}") from None
  ckpt = hf.Checkpoint(directory)
  specs = arch.tensors(config)
  declared = cfg_json.get("torch_dtype") or cfg_json.get("dtype")
  if declared is not None and declared not in _FLOAT:
    raise hf.HFFormatError(f"{cfg_path}: dtype {declared!r} is not one of {sorted(_FLOAT)}")
  for spec in specs:
    if spec.hf_name not in ckpt:
      raise hf.HFFormatError(
          f"{directory}: tensor {spec.hf_name!r} is missing (no safetensors file holds it; "
          f"config.json has {config.num_layers} layers)")
    got = ckpt.shape(spec.hf_name)
    if tuple(got) != tuple(spec.hf_shape):
      raise hf.HFFormatError(f"{ckpt.file_of(spec.hf_name)}: tensor {spec.hf_name!r} has shape "
                             f"{list(got)}, config.json implies {list(spec.hf_shape)}")
  if declared is not None:
    want, where = _FLOAT[declared], f"config.json ({cfg_path}) declares {declared}"
  else:
    first = specs[0].hf_name
    want = ckpt.dtype(first)
    where = f"the checkpoint's first tensor {first!r} is {want.name} (no dtype in config.json)"
  for spec in specs:
    dt = ckpt.dtype(spec.hf_name)
    if dt not in _FLOAT.values():
      raise hf.HFFormatError(f"{ckpt.file_of(spec.hf_name)}: tensor {spec.hf_name!r} has dtype "
                             f"{dt.name}; streaming reads float32 / bfloat16 / float16 tensors")
    if dt != want:
      raise hf.HFFormatError(
          f"{ckpt.file_of(spec.hf_name)}: tensor {spec.hf_name!r} has dtype {dt.name}, but "
          f"{where}: a shard of another dtype (mixed checkpoints are refused: convert the "
          "shard or fix config.json)")
  names = {s.hf_name for s in specs}
  extra = sorted(k for k in ckpt.where if k not in names and
                 not any(re.fullmatch(p, k) for p in arch.ignorable))
  if extra:
    raise hf.HFFormatError(f"{ckpt.file_of(extra[0])}: tensors a {arch.hf_class} with this "
                           f"config.json does not have: {extra[:6]}")
  layers, others = _split_specs(specs, config.num_layers)
  return _Source(directory, cfg_path, arch, config, _HFTensors(ckpt, directory), want, layers,
                 others)


# ----------------------------------------------------------------------------
# Helpers.


def _set(tree: dict, path: Sequence[Any], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: Sequence[Any]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _fingerprint(src: _Source, rules, method, tokens: np.ndarray, out_dtype: str) -> dict:
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


def _write_json(path: str, obj: Any) -> None:
  with atomic.atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)


def _write_shard(path: str, entries: dict, metadata: dict) -> None:
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


def _row_blocks(a: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]
                ) -> Iterable[np.ndarray]:
  """`convert` of `a` (a memory-mapped tensor) in blocks of rows, each read as float32
  (exact for BF16 / F16 sources), so no whole float32 copy is ever made."""
  rows = max(1, _ROW_BLOCK_BYTES // max(1, a[0].nbytes if a.ndim > 1 else a.nbytes))
  for r in range(0, a.shape[0], rows):
    yield convert(np.asarray(a[r:r + rows], np.float32))


def _scheme_json(s: hf.Scheme) -> dict:
  return dataclasses.asdict(s)


def _scheme_from(d: dict) -> hf.Scheme:
  return hf.Scheme(d["format"], None if d["weights"] is None else hf.QArgs(**d["weights"]),
                   None if d["input_activations"] is None else
                   hf.QArgs(**d["input_activations"]))


def _clean_work(work: str) -> None:
  """Removes leftover temporary files of our atomic writes in the work directory, and the
  calibration activations a killed run left."""
  for name in os.listdir(work):
    if re.fullmatch(r"\..+\.tmp-[0-9a-f]{12}", name):
      p = os.path.join(work, name)
      if os.path.isfile(p):
        os.unlink(p)
  _remove_activations(work)


_ACTIVATIONS = "activations"  # the driver's spilled activations (MemoryOptions.activation_dir)


def _remove_activations(work: str) -> None:
  d = os.path.join(work, _ACTIVATIONS)
  if not os.path.isdir(d) or os.path.islink(d):
    return
  for name in os.listdir(d):
    if re.fullmatch(r"activations-[A-Za-z0-9_]+\.bin", name):
      os.unlink(os.path.join(d, name))
  try:
    os.rmdir(d)
  except OSError:
    pass  # something else is in it: left as it is


def _is_ours(work: str) -> bool:
  try:
    with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
      m = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  return isinstance(m, dict) and m.get("format") == _MANIFEST_FORMAT


def _remove_work(work: str) -> None:
  """Removes a work directory we wrote: only the files we name, then the directory."""
  _remove_activations(work)
  for name in os.listdir(work):
    if (name == MANIFEST or re.fullmatch(r"(layer-\d{5}|embed)\.safetensors", name)
        or re.fullmatch(r"hidden-\d{5}(\.p\d+)?\.npy", name)
        or re.fullmatch(r"\..+\.tmp-[0-9a-f]{12}", name)):
      os.unlink(os.path.join(work, name))
  try:
    os.rmdir(work)
  except OSError:
    pass  # something else is in it: left as it is


_GGUF_FLOAT = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _check_file_target(path: str, overwrite: bool) -> None:
  if os.path.islink(path) or os.path.isdir(path):
    raise FileExistsError(f"{path} is a {'symlink' if os.path.islink(path) else 'directory'}; "
                          "refusing to replace it with a GGUF file (nothing was written)")
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"GGUF file {path} exists (pass overwrite=True to replace it)")


class _GGUFPlan:
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

  def write_other_shard(self, src: _Source, path: str, fdt: np.dtype, meta: dict) -> list[dict]:
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
                      _row_blocks(a, functools.partial(self.lib.float_tensor, t=t)))
        nbytes = int(np.prod(a.shape)) * dt.itemsize
        recs.append(dataclasses.asdict(self.lib.TensorExport(
            g, spath, tuple(spec.shape), src.dtype.name, t, "float", nbytes)))
      else:
        v = np.asarray(a, np.float32)
        raw, rec = self.encode(spec.path, v.T if spec.kind == "linear" else v)
        entries[g] = (raw.dtype, raw.shape, (raw,))
        recs.append(dataclasses.asdict(rec))
    _write_shard(path, entries, meta)
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


def _hidden_name(boundary: int, pid: int, nproc: int) -> str:
  """The carried hidden states at a layer boundary (one file per process)."""
  return f"hidden-{boundary:05d}.npy" if nproc == 1 else f"hidden-{boundary:05d}.p{pid}.npy"


def _barrier(name: str) -> None:
  """Waits until every jax.distributed process has reached `name`."""
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a (possibly global, row-sharded) array, in order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
  return np.concatenate([np.asarray(sh.data) for sh in shards])


def _write_other_shard(src: _Source, path: str, fdt: np.dtype, meta: dict) -> list[dict]:
  """The embedding, final norm and untied head, converted in row blocks from memory
  maps that are closed on return (their pages then leave this process)."""
  entries, recs = {}, []
  for spec in src.other_specs:
    a = src.mapped(spec)
    entries[spec.hf_name] = (fdt, a.shape, _row_blocks(a, lambda b: b.astype(fdt)))
    note = f"cast to {fdt.name}" if src.dtype.itemsize > fdt.itemsize else ""
    recs.append(dataclasses.asdict(hf.TensorExport(
        spec.hf_name, "/".join(map(str, spec.path)), tuple(spec.shape), src.dtype.name,
        f"dense {st.dtype_name(fdt)}", "float", int(np.prod(a.shape)) * fdt.itemsize, note)))
  _write_shard(path, entries, meta)
  del entries, a
  src.release()
  return recs


class _Carried(collections.abc.Sequence):
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


def _write_carried(path: str, shape: tuple[int, ...], rows: Iterable[np.ndarray]) -> None:
  """The `.npy` file `np.save` writes for the stacked `rows`, one batch at a time, atomically."""
  fmt = np.lib.format
  with atomic.atomic_write(path) as f:
    fmt.write_array_header_1_0(f, {"descr": fmt.dtype_to_descr(np.dtype(np.float32)),
                                   "fortran_order": False, "shape": tuple(shape)})
    for x in rows:
      f.write(memoryview(np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint8)))


def _embed_rows(src: _Source, tokens: np.ndarray) -> np.ndarray:
  """`embed_tokens[tokens]` as float32, read from a memory map (only those rows)."""
  spec = next(s for s in src.other_specs if s.path == ("embed", "embedding"))
  table = src.mapped(spec)
  flat = np.asarray(tokens).reshape(-1)
  out = np.asarray(table[flat], np.float32).reshape(tuple(np.shape(tokens)) + (table.shape[1],))
  del table
  src.release()
  return out


# ----------------------------------------------------------------------------
# The driver.


def compress_streaming(source: str | os.PathLike, output: str | os.PathLike,
                       batches: Iterable[Any], rules: Sequence[Any], method: Any = None, *,
                       dtype: str | None = None, work_dir: str | os.PathLike | None = None,
                       overwrite: bool = False, resume: bool = True, progress: bool = True,
                       keep_work: bool = False, gguf_types: Any = None,
                       tokenizer: Any = "auto", activation_limit: int | None = None,
                       on_layer: Callable[[int, dict], None] | None = None) -> StreamResult:
  """Quantizes a Llama-family Hugging Face directory or GGUF file layer by layer, disk to disk.

  Args:
    source: the float checkpoint (`config.json` + safetensors, sharded or not),
      or a `.gguf` file (read as float32; its vocabulary is the GGUF output's
      tokenizer with `tokenizer="auto"`).
    output: the directory to write (a compressed-tensors Hugging Face model),
      or a `.gguf` file (llama.cpp): each layer is encoded as `export_gguf`
      encodes it (a QArray in a GGUF block format, e.g. GPTQ with format
      "q4_0", goes in code for code) and the file is assembled from the
      finished layers at the end, atomically.
    batches: calibration token batches, each `[B, T]` int, all of one shape.
    rules: `QuantRule`s over the model's params paths (e.g.
      `models.llama.PROJ_KERNELS`); they may select decoder-layer weights only
      (the embedding, final norm and head are copied as stored).
    method: a calibrated method of `quantjax.methods` (`GPTQ()` by default;
      `RTN()` works too); weight-only formats.
    dtype: dtype of the output's float tensors and scales ("bfloat16",
      "float16", "float32"); default the source's.
    work_dir: where finished layers, the carried hidden states and the
      manifest wait until the end (default `.<output name>.stream-work` beside
      the output; it must be on the output's filesystem for the shards to be
      linked, not copied, into place).
    overwrite: replace an existing output (only a directory quantjax
      committed); checked before any work.
    resume: continue a matching interrupted run found in `work_dir`; False
      discards it.
    progress: a tqdm bar over layers (elapsed, estimate to finish).
    keep_work: keep the work directory after success.
    gguf_types: GGUF output: `export_gguf`'s `types` rules (`{regex: GGUF
      type}`); float tensors without a rule are stored in `dtype`.
    tokenizer: GGUF output: where the tokenizer metadata comes from (a
      `.gguf` file or a Hugging Face tokenizer directory); "auto" takes a GGUF
      source's own, or the source directory when it holds `tokenizer.json`,
      else writes none (llama.cpp then refuses the file; quantjax reads it).
    activation_limit: bytes of calibration activations held in memory (None:
      no limit). Above it the hidden states carried between layers stay in
      the work directory (read one batch at a time, the next layer's written
      one batch at a time), and the driver keeps its stacks of activations
      within a layer in files there too (`methods.calibrate`'s
      `activation_limit`): memory then holds one batch's activations. The
      output is the same bytes either way. One process only (across
      processes each already holds only its batches).
    on_layer: called as `on_layer(i, record)` after layer `i` is safely on
      disk (tests interrupt a run here).

  Across processes: called by every process of `jax.distributed` with the
  same arguments (the same calibration tokens), the calibration batches are
  dealt out (process `p` takes batches `p, p + P, ...`; their number must
  divide by the process count P), each process carries only its own
  batches' hidden states, the statistics are summed across processes by XLA
  (`methods.calibrate` on a mesh over every process's devices) and every
  process continues with process 0's quantized layer. Process 0 writes the
  layer shards, the manifest and the output; each process writes its own
  carried hidden states. The work directory must be one all processes see
  (one machine, or a shared filesystem).

  Returns:
    A `StreamResult`.

  Raises:
    HFFormatError, GGUFError: a source that cannot be read as claimed (see
      `check_source`).
    ValueError: rules that select the embedding / head / norms, an activation
      (W8A8) or input-scale (AWQ / SmoothQuant) result, calibration batches of
      different shapes, a work directory holding another run (with resume).
    FileExistsError: `output` exists (without `overwrite`) or is not ours.
    OSError: a failed write (disk full, ...) naming the path; the previous
      output is untouched and finished layers stay in the work directory.
  """
  from flax import nnx

  t_start = time.perf_counter()
  nproc, pid = jax.process_count(), jax.process_index()
  lead = pid == 0  # the process that writes shards, manifest and output
  speed_lib.reset_peak_rss()
  peaks: list[int] = []

  def phase_peak():
    p = speed_lib.peak_rss_bytes()
    if p is not None:
      peaks.append(p)
    # Freed pages go back to the OS before the next phase (glibc keeps them otherwise,
    # in the arenas of the threads that freed them, and each layer's peak then grows).
    gc.collect()
    speed_lib.trim_heap()
    speed_lib.reset_peak_rss()
    return p

  method = methods.GPTQ() if method is None else method
  rules = tuple(rules)
  output = os.path.abspath(os.fspath(output))
  to_gguf = output.endswith(".gguf")
  kind = "GGUF file (streamed)" if to_gguf else "Hugging Face model (streamed)"
  if to_gguf:
    _check_file_target(output, overwrite)
  else:
    atomic.check_dir_target(output, overwrite, None, kind)
  src = check_source(source)
  cfg = src.config
  out_dtype = dtype or src.dtype.name
  if out_dtype not in _FLOAT:
    raise ValueError(f"dtype must be one of {sorted(_FLOAT)}, got {out_dtype!r}")
  fdt = _FLOAT[out_dtype]

  tokens = [np.asarray(b) for b in batches]
  if not tokens:
    raise ValueError("compress_streaming() got no calibration batches")
  for i, b in enumerate(tokens):
    if b.shape != tokens[0].shape or b.ndim != 2 or not np.issubdtype(b.dtype, np.integer):
      raise ValueError(f"calibration batch {i} has shape {b.shape} {b.dtype}; every batch must "
                       f"be [B, T] integer token ids of one shape (batch 0: {tokens[0].shape})")
    if b.size and (b.min() < 0 or b.max() >= cfg.vocab_size):
      raise ValueError(f"calibration batch {i}: token ids in [{b.min()}, {b.max()}] lie outside "
                       f"the vocabulary [0, {cfg.vocab_size})")
  tokens_all = np.stack(tokens).astype(np.int32)  # [nb, B, T]
  nb, bsz, t = tokens_all.shape
  mesh = None
  if nproc > 1:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if nb % nproc:
      raise ValueError(f"{nb} calibration batches do not divide over {nproc} processes; pass a "
                       "multiple of the process count")
    if bsz % jax.local_device_count():
      raise ValueError(f"calibration batches of {bsz} rows do not divide over this process's "
                       f"{jax.local_device_count()} devices")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    row_sharding = NamedSharding(mesh, PartitionSpec("data"))
  local_tokens = tokens_all[pid::nproc]  # this process's batches
  nb_local = local_tokens.shape[0]
  hidden_shape = (nb_local, bsz, t, cfg.hidden_size)
  if activation_limit is not None and int(activation_limit) < 0:
    raise ValueError(f"activation_limit must be a number of bytes >= 0, got {activation_limit!r}")
  if activation_limit is not None and nproc > 1:
    raise ValueError("activation_limit is for one process; across processes each holds only "
                     "its own calibration batches (pass None)")
  # The carried hidden states stay on disk when they exceed the limit.
  on_disk = activation_limit is not None and 4 * int(np.prod(hidden_shape)) > activation_limit

  # Rules over the whole model (abstract leaves): coverage, and nothing outside the layers.
  abstract: dict = {}
  for spec in [s for ls in src.layer_specs for s in ls] + src.other_specs:
    _set(abstract, spec.path, jax.ShapeDtypeStruct(spec.shape, jnp.float32))
  report = rules_lib.match_rules(abstract, rules)
  rules_lib.check_report(report, False, "compress_streaming")
  for spec in src.other_specs:
    idx = report.assignments.get("/".join(map(str, spec.path)))
    if idx is not None and not getattr(rules[idx], "skip", False):
      raise ValueError(
          f"rule {rules[idx].module_path!r} selects {'/'.join(map(str, spec.path))}: streaming "
          "quantizes the decoder layers; the embedding, final norm and head are copied as "
          "stored (add a skip rule before it, or narrow its regex)")

  # The work directory and the manifest.
  parent, base = os.path.dirname(output), os.path.basename(output)
  work = os.path.abspath(os.fspath(work_dir)) if work_dir else os.path.join(
      parent, f".{base}.stream-work")
  fp = _fingerprint(src, rules, method, tokens_all, out_dtype)
  gg = None
  if to_gguf:
    gg = _GGUFPlan(gguf_io, cfg, gguf_types, _GGUF_FLOAT[out_dtype])
    fp["output"] = f"gguf {gguf_types!r}"
  key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  manifest = None
  if not lead:
    _barrier("quantjax-stream-start")  # process 0 has checked and prepared the work directory
    with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("key") != key:
      raise ValueError(f"{work}: process 0 prepared a run with other inputs than this process's "
                       "(every process must pass the same arguments)")
  elif os.path.lexists(work):
    if not os.path.isdir(work) or (os.listdir(work) and not _is_ours(work)):
      raise FileExistsError(f"work directory {work} exists and is not one compress_streaming "
                            "wrote (no manifest); choose another work_dir or remove it")
    if _is_ours(work):
      with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
        old = json.load(f)
      if resume and old.get("key") == key and old.get("version") == _MANIFEST_VERSION:
        manifest = old
        _clean_work(work)
      elif resume:
        diff = sorted(k for k in fp if old.get("fingerprint", {}).get(k) != fp[k])
        raise ValueError(
            f"work directory {work} holds an interrupted run with other inputs (differs in: "
            f"{', '.join(diff) or 'version'}); pass resume=False to discard it, or another "
            "work_dir")
      else:
        _remove_work(work)
  if lead:
    os.makedirs(work, exist_ok=True)
    if manifest is None:
      manifest = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "key": key,
                  "fingerprint": fp, "embed_done": False, "done": [], "layers": {}}
      _write_json(os.path.join(work, MANIFEST), manifest)
    if nproc > 1:
      _barrier("quantjax-stream-start")

  # Progress.
  n_layers = cfg.num_layers
  start = len(manifest["done"])
  bar = None
  if progress and lead:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_layers, initial=start, desc=f"stream {getattr(method, 'label', 'method')}",
               unit="layer")

  # The embedding, final norm and head: copied as stored (row blocks), one shard.
  meta = {"format": "pt"}
  if lead and not manifest["embed_done"]:
    manifest["embed_records"] = (gg.write_other_shard if gg else _write_other_shard)(
        src, os.path.join(work, "embed.safetensors"), fdt, meta)
    manifest["embed_done"] = True
    _write_json(os.path.join(work, MANIFEST), manifest)

  # This process's calibration hidden states at the current layer boundary:
  # [nb / P, B, T, d] float32.
  hidden: Any = None
  hpath = os.path.join(work, _hidden_name(start, pid, nproc))
  if start == 0 and on_disk:
    _write_carried(hpath, hidden_shape,
                   (_embed_rows(src, local_tokens[b]) for b in range(nb_local)))
  elif start == 0:
    hidden = _embed_rows(src, local_tokens)
  elif not on_disk:
    hidden = np.load(hpath)
    if hidden.shape != hidden_shape:
      raise ValueError(f"{hpath}: carried hidden states of shape {hidden.shape}, expected "
                       f"{hidden_shape}")
  phase_peak()

  # The block's own forward (models.llama.Block), with the model's RoPE tables and mask.
  gd_fn, _, as_state, _ = llama.block_api
  graph = gd_fn(cfg)
  rows = bsz * nproc  # rows of a (global) calibration batch
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (rows, t))
  cos, sin, mask = llama.block_inputs(cfg, positions, t, causal=True)

  def block_apply(p, x):
    # BF16 / F16 weights are held as stored and cast up here, inside the computation.
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    return nnx.merge(graph, as_state(cfg, p))(x, cos, sin, mask)[0]

  carry = jax.jit(block_apply)
  segment_cache: dict = {}
  info: dict[str, Any] = {"processes": nproc, "local_batches": nb_local}
  layer_records: list[dict] = []
  for i in range(start):
    rec = dict(manifest["layers"][str(i)]["record"])
    rec["resumed"] = True
    layer_records.append(rec)
    for k, v in manifest["layers"][str(i)].get("info", {}).items():
      info.setdefault(k, {}).update(v)

  for i in range(start, n_layers):
    t0 = time.perf_counter()
    specs = src.layer_specs[i]
    layer: dict = {}
    for spec in specs:  # one tensor at a time: the stored copy is dropped once converted
      v = src.stored(spec)
      if v.dtype not in (_FLOAT["bfloat16"], _FLOAT["float16"]):
        v = np.asarray(v, np.float32)
      _set(layer, spec.path[2:], jnp.asarray(v.T if spec.kind == "linear" else v))
      del v
    src.release()  # a GGUF source's pages of this layer leave the process
    params = {"layers": {i: layer}}

    def fn(p, x, _i=i):
      return block_apply(p["layers"][_i], x)

    if on_disk:  # read by the driver one batch at a time
      batches_i = _Carried(os.path.join(work, _hidden_name(i, pid, nproc)), hidden_shape)
    elif mesh is None:
      batches_i = [jnp.asarray(hidden[b]) for b in range(nb_local)]
    else:  # global batches: this process's rows, the other processes' rows
      batches_i = [jax.make_array_from_process_local_data(row_sharding, hidden[b])
                   for b in range(nb_local)]
    with warnings.catch_warnings():
      # Rules for other layers match nothing here; coverage was checked on the whole model.
      warnings.simplefilter("ignore")
      # donate: each projection's float32 array is freed once its result replaces it.
      res = capture_lib.calibrate(fn, params, batches_i, rules, method, mode="sequential",
                                  progress=False, segment_cache=segment_cache, mesh=mesh,
                                  memory=capture_lib.MemoryOptions(
                                      donate=True, activation_limit=activation_limit,
                                      activation_dir=os.path.join(work, _ACTIVATIONS),
                                      stand_in_dtype=jnp.float32))
    new_layer = res.params["layers"][i]
    # Encode exactly as export_hf does; float leaves (norms, skipped weights) as stored.
    entries, recs, schemes = {}, [], {}
    eff: dict = {}
    for spec in specs:
      leaf = _get(new_layer, spec.path[2:])
      spath = "/".join(map(str, spec.path))
      if isinstance(leaf, (ActQuantized, InputScaled)):
        raise ValueError(f"{spath}: the method returned a {type(leaf).__name__}; streaming "
                         "supports weight-only results (no activation quantization, no "
                         "unfolded input scales)")
      changed = leaf is not _get(layer, spec.path[2:])
      if gg is not None:  # GGUF: the tensor's bytes in the file, as export_gguf encodes them
        raw, rec = gg.encode(spec.path, leaf if changed else np.asarray(leaf, np.float32))
        entries[rec.name] = (raw.dtype, raw.shape, (raw,))
        recs.append(dataclasses.asdict(rec))
        if changed:
          _set(eff, spec.path[2:], capture_lib.effective_weight(leaf, jnp.float32))
        else:
          _set(eff, spec.path[2:], _get(layer, spec.path[2:]))
        continue
      if changed:
        out, scheme, rec = hf.encode_leaf(spec, leaf, fdt)
        _set(eff, spec.path[2:], capture_lib.effective_weight(leaf, jnp.float32))
      else:  # as stored (norms, skipped weights): read again, not kept during the method
        v = src.stored(spec)
        out, scheme, rec = hf.encode_leaf(spec, v.T if spec.kind == "linear" else v, fdt)
        del v
        _set(eff, spec.path[2:], _get(layer, spec.path[2:]))
      for name, arr in out.items():
        entries[name] = (arr.dtype, arr.shape, (arr,))
      recs.append(dataclasses.asdict(rec))
      if scheme is not None:
        schemes[spec.module] = _scheme_json(scheme)
    src.release()
    if lead:
      _write_shard(os.path.join(work, f"layer-{i:05d}.safetensors"), entries, meta)
    del entries
    # The next layer's inputs: this layer's output with its quantized (effective) weights.
    hname = _hidden_name(i + 1, pid, nproc)
    if on_disk:
      _write_carried(os.path.join(work, hname), hidden_shape,
                     (np.asarray(carry(eff, jnp.asarray(batches_i[b]))) for b in range(nb_local)))
    else:
      hidden = np.stack([_local_rows(carry(eff, batches_i[b])) for b in range(nb_local)])
    timings = {"stats_seconds": float(res.info.get("stats_seconds", 0.0)),
               "quant_seconds": float(res.info.get("quant_seconds", 0.0)),
               "compiles": int(res.info.get("compiles", 0)),
               "spilled_bytes": int(res.info.get("spilled_bytes", 0))}
    layer_info = {k: {n: float(x) for n, x in v.items()} for k, v in res.info.items()
                  if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())}
    for k, v in layer_info.items():
      info.setdefault(k, {}).update(v)
    del batches_i, eff, layer, params, res, new_layer
    if not on_disk:
      with atomic.atomic_write(os.path.join(work, hname)) as f:
        np.save(f, hidden)
    if nproc > 1:
      _barrier(f"quantjax-stream-layer-{i}")  # every process's hidden states are on disk
    peak = phase_peak()
    rec = {"layer": i, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak,
           "resumed": False, **timings}
    manifest["layers"][str(i)] = {"record": {k: v for k, v in rec.items() if k != "resumed"},
                                  "records": recs, "schemes": schemes, "info": layer_info}
    manifest["done"].append(i)
    if lead:
      _write_json(os.path.join(work, MANIFEST), manifest)
    if nproc > 1:
      _barrier(f"quantjax-stream-manifest-{i}")  # the manifest names layer i as done
    atomic.unlink_quiet(os.path.join(work, _hidden_name(i, pid, nproc)))  # (none at 0 in memory)
    layer_records.append(rec)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(layer_s=f"{rec['seconds']:.1f}",
                      rss_gb=f"{(peak or 0) / 2**30:.2f}")
    if on_layer is not None:
      on_layer(i, rec)
  if bar is not None:
    bar.close()
  del hidden

  # Finish: link the shards into a fresh directory with index, config and report; commit.
  if nproc > 1:
    _barrier("quantjax-stream-layers-done")
    if not lead:  # process 0's manifest (only it holds the embedding's records)
      with open(os.path.join(work, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
  if gg is not None:
    report = [gg.record(r) for r in manifest["embed_records"]] + [
        gg.record(r) for i in range(n_layers) for r in manifest["layers"][str(i)]["records"]]
    if lead:
      tok = tokenizer
      if tok == "auto":
        tok = src.tokenizer
      gg.write(output, work, n_layers, tok, getattr(cfg, "name", "") or base)
    return _finish(nproc, lead, keep_work, work, phase_peak, output, layer_records, start,
                   t_start, peaks, report, info)
  n_files = n_layers + 1
  names = [f"model-{k + 1:05d}-of-{n_files:05d}.safetensors" for k in range(n_files)]
  sources = [os.path.join(work, "embed.safetensors")] + [
      os.path.join(work, f"layer-{i:05d}.safetensors") for i in range(n_layers)]
  tensor_recs = [hf.TensorExport(**r) for r in manifest["embed_records"]]
  schemes: dict[str, hf.Scheme] = {}
  weight_map: dict[str, str] = {}
  for r in manifest["embed_records"]:
    weight_map[r["name"]] = names[0]
  for i in range(n_layers):
    entry = manifest["layers"][str(i)]
    for r in entry["records"]:
      tensor_recs.append(hf.TensorExport(**{**r, "shape": tuple(r["shape"])}))
    for m, sj in entry["schemes"].items():
      schemes[m] = _scheme_from(sj)
  for k, path in enumerate(sources[1:], start=1):
    for name in st.SafetensorsFile(path).keys():
      weight_map[name] = names[k]
  specs = [s for ls in src.layer_specs for s in ls] + src.other_specs
  linear_modules = [s.module for s in specs if s.kind == "linear"]
  qconfig = hf.quantization_config(schemes, linear_modules) if schemes else None
  notes = hf.fused_notes(schemes, linear_modules)
  cfg_out = {"architectures": [src.arch.hf_class], "model_type": src.arch.model_types[0],
             "_name_or_path": getattr(cfg, "name", "") or base,
             **src.arch.to_hf_config(cfg), "dtype": out_dtype, "torch_dtype": out_dtype}
  if qconfig is not None:
    cfg_out["quantization_config"] = qconfig
  files = sorted(names + [hf.INDEX_FILE, "config.json", "generation_config.json",
                          hf.REPORT_FILE])
  report = hf.ExportReport(path=output, tensors=tensor_recs, notes=notes,
                           quantization_config=qconfig, files=files)
  if lead:
    _commit(output, overwrite, kind, src, sources, names, tensor_recs, weight_map, cfg_out,
            report)
  return _finish(nproc, lead, keep_work, work, phase_peak, output, layer_records, start,
                 t_start, peaks, report, info)


def _finish(nproc, lead, keep_work, work, phase_peak, output, layer_records, start, t_start,
            peaks, report, info) -> StreamResult:
  if nproc > 1:
    _barrier("quantjax-stream-committed")
  if lead and not keep_work:
    _remove_work(work)
  phase_peak()
  if os.path.isdir(output):
    out_bytes = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output))
  else:
    out_bytes = os.path.getsize(output)
  return StreamResult(path=output, layers=layer_records, resumed_from=start,
                      seconds=time.perf_counter() - t_start,
                      peak_rss_bytes=max(peaks) if peaks else None, output_bytes=out_bytes,
                      report=report, info=info)


def _commit(output, overwrite, kind, src, sources, names, tensor_recs, weight_map, cfg_out,
            report) -> None:
  """The output directory, atomically: the finished shards linked in, index, config, report."""
  with atomic.atomic_dir(output, overwrite=overwrite, kind=kind,
                         meta={"streamed_from": src.path}) as tmp:
    for path, name in zip(sources, names):
      dest = os.path.join(tmp, name)
      try:
        os.link(path, dest)  # no copy: the work directory keeps its own name until the end
      except OSError:
        shutil.copyfile(path, dest)
    index = {"metadata": {"total_size": int(sum(r.nbytes for r in tensor_recs))},
             "weight_map": weight_map}
    with open(os.path.join(tmp, hf.INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg_out, f, indent=2)
    gen = {k: cfg_out[k] for k in ("bos_token_id", "eos_token_id") if k in cfg_out}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    with open(os.path.join(tmp, hf.REPORT_FILE), "w") as f:
      json.dump(report.to_json(), f, indent=1, default=str)
