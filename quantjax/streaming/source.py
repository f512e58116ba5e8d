"""The streaming source: a Hugging Face directory or a GGUF file, checked, read one
tensor (or row block) at a time."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import ml_dtypes
import numpy as np

from quantjax.io import gguf as gguf_io
from quantjax.io import gguf_dequant
from quantjax.io import gguf_read
from quantjax.io import hf
from quantjax.models import llama

FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


# ----------------------------------------------------------------------------
# The source.


class HFTensors:
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


class GGUFRows:
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


class GGUFTensors:
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

  def mapped(self, spec: hf.TensorSpec) -> GGUFRows:
    t, heads = self._tensor(spec)
    if heads:  # pragma: no cover - only layer tensors are permuted, and those are read
      raise ValueError(f"{spec.hf_name}: Q/K tensors are read whole, not by rows")
    return GGUFRows(t)

  def files(self) -> dict[str, str]:
    return {os.path.basename(self.path): self.path}

  def release(self) -> None:
    """The pages read so far leave this process (`GGUFFile.drop_pages`; where that is not
    available the file is unmapped and parsed again on next use)."""
    if self._f is not None and not self._f.drop_pages():
      self._f.close()
      self._f = None


@dataclasses.dataclass
class Source:
  path: str  # the Hugging Face directory or the GGUF file
  cfg_path: str | None  # config.json (None for GGUF: its metadata is in the file)
  arch: hf.HFArchitecture
  config: Any
  tensors: HFTensors | GGUFTensors
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


def split_specs(specs: list[hf.TensorSpec], n_layers: int):
  layers: list[list[hf.TensorSpec]] = [[] for _ in range(n_layers)]
  others = []
  for spec in specs:
    if spec.path[0] == "layers":
      layers[int(spec.path[1])].append(spec)
    else:
      others.append(spec)
  return layers, others


def check_gguf_source(path: str) -> Source:
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
  layers, others = split_specs(arch.tensors(config), config.num_layers)
  return Source(path, None, arch, config, GGUFTensors(path, config, reader),
                 np.dtype(np.float32), layers, others)


def check_source(directory: str | os.PathLike) -> Source:
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
    return check_gguf_source(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a directory: {directory}")
  cfg_path, cfg_json = hf.read_config(directory)
  model_type = str(cfg_json.get("model_type"))
  try:
    arch = hf.architecture_for(model_type)
  except hf.HFFormatError as e:
    raise hf.HFFormatError(f"{cfg_path}: {e}") from None
  if arch is not llama.ARCHITECTURE.hf:
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
  if declared is not None and declared not in FLOAT_DTYPES:
    raise hf.HFFormatError(f"{cfg_path}: dtype {declared!r} is not one of {sorted(FLOAT_DTYPES)}")
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
    want, where = FLOAT_DTYPES[declared], f"config.json ({cfg_path}) declares {declared}"
  else:
    first = specs[0].hf_name
    want = ckpt.dtype(first)
    where = f"the checkpoint's first tensor {first!r} is {want.name} (no dtype in config.json)"
  for spec in specs:
    dt = ckpt.dtype(spec.hf_name)
    if dt not in FLOAT_DTYPES.values():
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
  layers, others = split_specs(specs, config.num_layers)
  return Source(directory, cfg_path, arch, config, HFTensors(ckpt, directory), want, layers,
                 others)
