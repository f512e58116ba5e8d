"""`export_hf`: a params tree as a Hugging Face directory (compressed-tensors when
quantized), written to a temporary directory and renamed into place."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from quantjax import rules as rules_lib
from quantjax.io import safetensors as st
from quantjax.io.hf.packing import (act_args, cast_scale, ct_codes, ct_scale, pack_fp4,
                                    pack_int32, requant_format, weight_args)
from quantjax.io.hf.scheme import (FLOAT_DTYPES, REPORT_FILE, INDEX_FILE, SINGLE_FILE,
                                   HFFormatError, QArgs, Scheme, TensorSpec, architecture_for,
                                   fused_notes, quantization_config, scheme_format)
from quantjax.io.tokenizer import load_tokenizer
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray, StaticActQuantized


# ----------------------------------------------------------------------------
# Export.


@dataclasses.dataclass
class TensorExport:
  """What happened to one params leaf.

  `how`: "lossless" (codes, scales and zero points written as they are),
  "float" (a float tensor, cast to the export dtype when `source` is wider),
  "dequantized" (a quantized leaf compressed-tensors cannot hold here, written
  as the float values it represents), "re-quantized (lossy)" (written in the
  nearest compressed-tensors scheme, new codes), or "scales rounded (lossy)".
  """

  name: str
  path: str
  shape: tuple[int, ...]
  source: str
  stored: str
  how: str
  nbytes: int
  note: str = ""


@dataclasses.dataclass
class ExportReport:
  """The result of `export_hf`: per-tensor records and notes about runtimes."""

  path: str
  tensors: list[TensorExport]
  notes: list[str]
  quantization_config: dict | None
  files: list[str]

  def __iter__(self):
    return iter(self.tensors)

  def __len__(self) -> int:
    return len(self.tensors)

  def summary(self) -> str:
    groups: dict[tuple[str, str], list[TensorExport]] = collections.defaultdict(list)
    for r in self.tensors:
      groups[(r.stored, r.how)].append(r)
    lines = [f"{len(rs):4d} tensors {sum(r.nbytes for r in rs):>13,} bytes  {how:22s} {stored}"
             for (stored, how), rs in sorted(groups.items())]
    return "\n".join(lines + [f"note: {n}" for n in self.notes])

  def to_json(self) -> dict:
    return {"path": self.path, "files": self.files, "notes": self.notes,
            "quantization_config": self.quantization_config,
            "tensors": [dataclasses.asdict(t) for t in self.tensors]}


def _pure(params: Any) -> Any:
  from flax import nnx
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _get(tree: Any, path: tuple) -> Any:
  return rules_lib.leaf_at(tree, path, HFFormatError)


def _source_name(leaf: Any) -> str:
  if isinstance(leaf, StaticActQuantized):
    return f"{_source_name(leaf.weight)} + static act {leaf.act_format.name}"
  if isinstance(leaf, ActQuantized):
    return f"{_source_name(leaf.weight)} + dynamic act {leaf.act_format.name}"
  if isinstance(leaf, QArray):
    return leaf.fmt.name
  if type(leaf).__name__ == "NMSparse":
    return f"{leaf.n}:{leaf.m} sparse {np.dtype(leaf.dtype).name}"
  return np.dtype(getattr(leaf, "dtype", np.float32)).name


def _float_values(leaf: Any) -> np.ndarray:
  """The float32 values of a float / QArray / NMSparse leaf, params layout."""
  if isinstance(leaf, QArray):
    return np.asarray(leaf.dequantize(jnp.float32))
  if type(leaf).__name__ == "NMSparse":
    return np.asarray(leaf.dense(jnp.float32))
  return np.asarray(jnp.asarray(leaf, jnp.float32))


def encode_leaf(spec: TensorSpec, leaf: Any, dtype: np.dtype):
  """(tensors {name: array}, scheme or None, TensorExport) for one params leaf."""
  spath = "/".join(map(str, spec.path))
  if isinstance(leaf, InputScaled):
    raise HFFormatError(
        f"{spath} carries per-input scales (InputScaled, from AWQ / SmoothQuant) that "
        "compressed-tensors cannot store: fold them into the producing op first "
        "(quantjax.methods.fold_input_scales with the model's fold table, e.g. "
        "quantjax.models.llama.fold_groups) or calibrate with scales only where they fold")
  source = _source_name(leaf)
  shape = tuple(int(s) for s in leaf.shape)
  if shape != tuple(spec.shape):
    raise HFFormatError(f"{spath}: leaf of shape {shape}, the config implies {spec.shape}")
  act = leaf if isinstance(leaf, ActQuantized) else None
  weight = leaf.weight if act is not None else leaf
  module = spec.module
  if act is not None and spec.kind != "linear":
    raise HFFormatError(f"{spath}: activation quantization is exported on Linear weights only")

  quantizable = spec.kind == "linear" and isinstance(weight, QArray) and not weight.fmt.is_cast
  if not quantizable:
    if act is not None:
      raise HFFormatError(f"{spath}: activation quantization ({act.act_format.name}) over a "
                          f"float weight has no compressed-tensors form; quantize the weight "
                          "too (e.g. int8 per channel for W8A8)")
    note = ""
    if isinstance(weight, QArray) and weight.fmt.is_cast and spec.to_hf is None:
      arr = np.asarray(weight.codes())
      how = "lossless"
    else:
      arr = _float_values(weight)
      src = np.dtype(getattr(weight, "dtype", np.float32))
      if isinstance(weight, QArray) and not weight.fmt.is_cast:
        how = "dequantized"
        note = ("compressed-tensors runtimes quantize Linear layers; this tensor is written as "
                "the float values it holds")
        src = np.dtype(np.float32)
      elif type(weight).__name__ == "NMSparse":
        how = "float"
        note = ("2:4 sparse, stored dense (zeros kept): compressed-tensors 0.19 and vLLM have "
                "no sparse format any more")
      else:
        how = "float"
      if src.itemsize > dtype.itemsize:
        note = (note + "; " if note else "") + f"cast to {dtype.name}"
      if spec.to_hf is not None:
        arr = np.asarray(spec.to_hf(arr), np.float32)
      arr = arr.astype(dtype)
    if spec.kind == "linear":
      arr = arr.T
    arr = np.ascontiguousarray(arr)
    rec = TensorExport(spec.hf_name, spath, shape, source, f"dense {st.dtype_name(arr.dtype)}",
                       how, int(arr.nbytes), note)
    return {spec.hf_name: arr}, None, rec

  ax = 0  # params kernels are [in, out]: the contraction axis is 0
  q = weight
  wargs = weight_args(q, ax)
  how, note = "lossless", ""
  if wargs is None:
    target = requant_format(q, ax, shape[0])
    q = qarray_lib.quantize(jnp.asarray(_float_values(q)), target)
    wargs = weight_args(q, ax)
    how = "re-quantized (lossy)"
    note = f"{weight.fmt.name} has no compressed-tensors form; written as {target.name}"
  aargs = None if act is None else act_args(act)
  fmt = scheme_format(wargs, aargs)
  if fmt == "int-quantized" and wargs.num_bits != 8:
    note = (note + "; " if note else "") + "vLLM's W8A8 kernels take 8-bit weights"
  if wargs.is_fp4:
    return _encode_fp4(spec, q, wargs, source, how, note)
  codes, zp = ct_codes(q, wargs, ax)
  scale, rounded = cast_scale(ct_scale(q.scale, wargs, ax), dtype)
  if rounded and how == "lossless":
    how = "scales rounded (lossy)"
    note = f"scales rounded to {dtype.name}"
  out: dict[str, np.ndarray] = {}
  if fmt == "pack-quantized":
    out[f"{module}.weight_packed"] = pack_int32(codes, wargs.num_bits)
    out[f"{module}.weight_shape"] = np.asarray(codes.shape, np.int64)
  elif wargs.type == "float":
    out[f"{module}.weight"] = codes.astype(ml_dtypes.float8_e4m3fn)
  else:
    out[f"{module}.weight"] = codes.astype(np.int8)
  out[f"{module}.weight_scale"] = scale
  if zp is not None:
    if wargs.strategy == "tensor":  # zp is in the HF layout already
      zpc = np.asarray(zp).reshape(1).astype(np.int8)
    elif fmt == "pack-quantized":
      zpc = np.ascontiguousarray(pack_int32(np.ascontiguousarray(zp.T), wargs.num_bits).T)
    else:
      zpc = np.asarray(zp, np.int8)
    out[f"{module}.weight_zero_point"] = zpc
  if isinstance(act, StaticActQuantized):
    s, r = cast_scale(np.asarray(act.act_scale).reshape(1), dtype)
    if r and how == "lossless":
      how, note = "scales rounded (lossy)", f"input scale rounded to {dtype.name}"
    out[f"{module}.input_scale"] = s
    if act.act_zero_point is not None:
      z = np.asarray(act.act_zero_point).reshape(1).astype(np.int16)
      if not act.act_format.signed:
        z = z - 128
      out[f"{module}.input_zero_point"] = z.astype(np.int8)
  scheme = Scheme(fmt, wargs, aargs)
  nbytes = sum(int(a.nbytes) for a in out.values())
  if fmt == "pack-quantized" and wargs.num_bits not in (4, 8):
    note = (note + "; " if note else "") + (f"vLLM's WNA16 kernels take 4 or 8 bits, not "
                                            f"{wargs.num_bits}")
  rec = TensorExport(spec.hf_name, spath, shape, source, scheme.describe(), how, nbytes, note)
  return out, scheme, rec


def _encode_fp4(spec: TensorSpec, q: QArray, wargs: QArgs, source: str, how: str, note: str):
  """MXFP4 / NVFP4 tensors of one Linear, code for code: packed nibbles `[out, in / 2]`, the
  block scales' own bytes (E8M0 as uint8, E4M3 as float8_e4m3fn) and, for NVFP4, a global
  scale of exactly 1 (compressed-tensors divides the block scales by it; ours are the final
  scales already, as in llama.cpp's NVFP4)."""
  m = spec.module
  codes = np.asarray(q.codes()).T  # [out, in]
  scale = np.ascontiguousarray(np.asarray(q.scale).T)  # [out, in / group]
  out = {f"{m}.weight_packed": pack_fp4(codes)}
  if wargs.strategy == "tensor_group":
    out[f"{m}.weight_scale"] = scale.astype(ml_dtypes.float8_e4m3fn)
    out[f"{m}.weight_global_scale"] = np.ones((1,), np.float32)
  else:
    out[f"{m}.weight_scale"] = scale.view(np.uint8)
  scheme = Scheme(scheme_format(wargs, None), wargs, None)
  nbytes = sum(int(a.nbytes) for a in out.values())
  rec = TensorExport(spec.hf_name, "/".join(map(str, spec.path)), tuple(int(s) for s in q.shape),
                     source, scheme.describe(), how, nbytes, note)
  return out, scheme, rec


def _parse_size(size: int | str) -> int:
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.I)
  if not m:
    raise HFFormatError(f"cannot read shard size {size!r} (an int of bytes or e.g. '2GB')")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def _shards(tensors: list[tuple[str, np.ndarray]], limit: int) -> list[list[tuple[str, np.ndarray]]]:
  shards: list[list] = [[]]
  size = 0
  for name, a in tensors:
    n = int(a.nbytes)
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append((name, a))
    size += n
  return shards


def _save_tokenizer(tokenizer: Any, directory: str) -> list[str]:
  before = set(os.listdir(directory))
  tok = tokenizer
  if isinstance(tokenizer, (str, os.PathLike)):
    tok = load_tokenizer(os.fspath(tokenizer))
  if not hasattr(tok, "save_pretrained"):
    raise HFFormatError(f"tokenizer must be a transformers tokenizer, a Hugging Face directory "
                        f"or a GGUF file, got {type(tokenizer).__name__}")
  tok.save_pretrained(directory)
  return sorted(set(os.listdir(directory)) - before)


def export_hf(directory: str | os.PathLike, config: Any, params: Any, *, tokenizer: Any = None,
              dtype: str = "float32", max_shard_size: int | str = "5GB",
              overwrite: bool = False, name: str | None = None) -> ExportReport:
  """Writes `params` as a Hugging Face model directory (compressed-tensors when quantized).

  Args:
    directory: the output directory; must not exist (or `overwrite=True` and
      it is an earlier `export_hf` output, recognised by its report file).
    config: the model config (e.g. `LlamaConfig`; see `quantjax.io.architecture`).
    params: the params tree (`nnx.State` or nested dict): float arrays,
      `QArray`, `ActQuantized` (dynamic activations), `StaticActQuantized`
      (static per-tensor activations), `NMSparse`.
    tokenizer: a transformers tokenizer, a Hugging Face directory or a GGUF
      file whose tokenizer is saved beside the weights; None writes none.
    dtype: "float32", "bfloat16" or "float16": float tensors and scales
      (the `dtype` of `config.json`).
    max_shard_size: bytes (or "2GB") per safetensors file; above it the
      checkpoint is sharded with an index file.
    overwrite: replace an earlier export at `directory` (atomically).
    name: `_name_or_path` for `config.json` (default: the config's name).

  Returns:
    An `ExportReport`: per tensor, how it was stored (lossless code for code,
    float, dequantized, re-quantized) and notes on what vLLM will refuse.

  Raises:
    FileExistsError: `directory` exists and is not ours to replace.
    HFFormatError: a leaf compressed-tensors cannot store (unfolded AWQ /
      SmoothQuant input scales, per-channel static activation scales,
      activation quantization over a float weight), a shape that disagrees
      with the config, an unknown dtype.
  """
  directory = os.path.abspath(os.fspath(directory))
  if dtype not in FLOAT_DTYPES:
    raise HFFormatError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
  fdt = FLOAT_DTYPES[dtype]
  if os.path.lexists(directory):
    if not overwrite:
      raise FileExistsError(f"{directory} exists; export_hf writes a new directory "
                            "(overwrite=True replaces an earlier export_hf output)")
    if not os.path.isfile(os.path.join(directory, REPORT_FILE)):
      raise FileExistsError(f"{directory} exists and is not an export_hf output "
                            f"(no {REPORT_FILE}); refusing to replace it")
  limit = _parse_size(max_shard_size)
  arch = architecture_for(config)
  pure = _pure(params)

  # Encode everything first: a bad leaf fails before any file exists.
  tensors: list[tuple[str, np.ndarray]] = []
  records: list[TensorExport] = []
  schemes: dict[str, Scheme] = {}
  specs = arch.tensors(config)
  for spec in specs:
    out, scheme, rec = encode_leaf(spec, _get(pure, spec.path), fdt)
    tensors.extend(out.items())
    records.append(rec)
    if scheme is not None:
      schemes[spec.module] = scheme
  linear_modules = [s.module for s in specs if s.kind == "linear"]
  qconfig = quantization_config(schemes, linear_modules) if schemes else None
  notes = fused_notes(schemes, linear_modules)
  if any(r.how == "re-quantized (lossy)" for r in records):
    notes.append("some tensors were re-quantized (lossy): see their records")

  cfg = {"architectures": [arch.hf_class], "model_type": arch.model_types[0],
         "_name_or_path": name or getattr(config, "name", "") or os.path.basename(directory),
         **arch.to_hf_config(config), "dtype": dtype, "torch_dtype": dtype}
  if qconfig is not None:
    cfg["quantization_config"] = qconfig

  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
  try:
    shards = _shards(tensors, limit)
    files = []
    meta = {"format": "pt"}
    if len(shards) == 1:
      files.append(SINGLE_FILE)
      st.write_safetensors(os.path.join(tmp, SINGLE_FILE), dict(shards[0]), meta)
    else:
      n = len(shards)
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        files.append(fname)
        st.write_safetensors(os.path.join(tmp, fname), dict(shard), meta)
        weight_map.update({k: fname for k, _ in shard})
      index = {"metadata": {"total_size": int(sum(a.nbytes for _, a in tensors))},
               "weight_map": weight_map}
      with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
      files.append(INDEX_FILE)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    files.append("config.json")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    files.append("generation_config.json")
    if tokenizer is not None:
      files.extend(_save_tokenizer(tokenizer, tmp))
    report = ExportReport(path=directory, tensors=records, notes=notes,
                          quantization_config=qconfig, files=sorted(files + [REPORT_FILE]))
    with open(os.path.join(tmp, REPORT_FILE), "w") as f:
      json.dump(report.to_json(), f, indent=1, default=str)
    _move_into_place(tmp, directory, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def _move_into_place(tmp: str, directory: str, overwrite: bool) -> None:
  if not os.path.lexists(directory):
    os.rename(tmp, directory)
    return
  if not overwrite:  # appeared while we were writing
    raise FileExistsError(f"{directory} appeared during the export; left as it was")
  old = tempfile.mkdtemp(dir=os.path.dirname(directory),
                         prefix=f".{os.path.basename(directory)}.old-")
  os.rmdir(old)
  os.rename(directory, old)
  try:
    os.rename(tmp, directory)
  except BaseException:
    os.rename(old, directory)
    raise
  shutil.rmtree(old, ignore_errors=True)
