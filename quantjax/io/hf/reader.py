"""`import_hf`: a Hugging Face directory (ours or llm-compressor's) into JAX, the
checkpoint's own codes, scales and zero points as QArrays; every file, tensor and shape
checked."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from quantjax.io import safetensors as st
from quantjax.io.hf.packing import unpack_fp4, unpack_int32
from quantjax.io.hf.scheme import (INDEX_FILE, QUANT_METHOD, SUPPORTED_FORMATS, HFFormatError,
                                   QArgs, Scheme, TensorSpec, family_for, scheme_format)
from quantjax.io.tokenizer import load_tokenizer
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized, QArray, StaticActQuantized


# ----------------------------------------------------------------------------
# Reading directories.


class Checkpoint:
  """The safetensors files of a directory (single file or index + shards), checked.

  Every shard the index names must exist and be a valid safetensors file,
  and must hold the tensors the index maps to it.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    self.files: dict[str, st.SafetensorsFile] = {}
    self.where: dict[str, str] = {}
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFFormatError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
      by_file: dict[str, list[str]] = collections.defaultdict(list)
      for k, fname in weight_map.items():
        by_file[fname].append(k)
      for fname, names in sorted(by_file.items()):
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
          raise HFFormatError(
              f"{directory}: shard {fname} listed in {INDEX_FILE} is missing (it should hold "
              f"{len(names)} tensors, e.g. {sorted(names)[:3]})")
        sf = self._open(path)
        for k in names:
          if k not in sf:
            raise HFFormatError(f"{path}: tensor {k!r} that {INDEX_FILE} maps to this shard "
                                "is not in it")
          self.where[k] = fname
    else:
      names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      if not names:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (only safetensors "
                                "checkpoints are read)")
      for fname in names:
        sf = self._open(os.path.join(directory, fname))
        for k in sf.keys():
          if k in self.where:
            raise HFFormatError(f"{directory}: tensor {k!r} is in both {self.where[k]} and "
                                f"{fname}")
          self.where[k] = fname

  def _open(self, path: str) -> st.SafetensorsFile:
    fname = os.path.basename(path)
    if fname not in self.files:
      try:
        self.files[fname] = st.SafetensorsFile(path)
      except st.SafetensorsError as e:
        raise HFFormatError(str(e)) from None
    return self.files[fname]

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def file_of(self, name: str) -> str:
    return os.path.join(self.directory, self.where[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[self.where[name]].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.files[self.where[name]].dtype(name)

  def get(self, name: str) -> np.ndarray:
    return self.files[self.where[name]].get(name)


@dataclasses.dataclass
class _QuantConfig:
  groups: list[tuple[str, Scheme, list[str]]]
  ignore: list[str]
  source: str

  def scheme_for(self, module: str, module_class: str) -> Scheme | None:
    if _matches(module, module_class, self.ignore):
      return None
    for _, scheme, targets in self.groups:
      if _matches(module, module_class, targets):
        return scheme
    return None


def _matches(module: str, module_class: str, targets: Sequence[str]) -> bool:
  for t in targets:
    if t.startswith("re:"):
      if re.match(t[3:], module):
        return True
    elif t == module or (module_class and t == module_class):
      return True
  return False


def _parse_args(d: Any, where: str) -> QArgs | None:
  if d is None:
    return None
  if not isinstance(d, Mapping):
    raise HFFormatError(f"{where}: expected an object of quantization args, got {d!r}")
  typ = str(d.get("type", "int")).lower()
  bits = int(d.get("num_bits", 8))
  group_size = d.get("group_size")
  strategy = d.get("strategy")
  if strategy is None:
    strategy = ("tensor" if group_size is None else "group" if group_size > 0 else "channel")
  strategy = str(strategy).lower()
  dyn = d.get("dynamic", False)
  if dyn not in (True, False):
    raise HFFormatError(f"{where}: dynamic={dyn!r} (NVFP4-style local scales) is not supported")
  if typ not in ("int", "float"):
    raise HFFormatError(f"{where}: quantization type {typ!r} is not supported")
  fp4 = {("group", 32): "torch.uint8", ("tensor_group", 16): "torch.float8_e4m3fn"}
  if typ == "float" and bits == 4:
    want = fp4.get((strategy, group_size))
    if want is None:
      raise HFFormatError(f"{where}: float4 with strategy {strategy!r} and group_size "
                          f"{group_size!r} is not supported (MXFP4: 'group' of 32; NVFP4: "
                          "'tensor_group' of 16)")
    sdt = d.get("scale_dtype")
    if sdt not in (None, want):
      raise HFFormatError(f"{where}: float4 scales of dtype {sdt!r}; this scheme stores {want}")
    if not d.get("symmetric", True):
      raise HFFormatError(f"{where}: asymmetric float4 weights are not supported")
    return QArgs(4, "float", True, strategy, int(group_size), bool(dyn), scale_dtype=want)
  if typ == "float" and bits != 8:
    raise HFFormatError(f"{where}: float{bits} is not supported; FP8 E4M3, MXFP4 and NVFP4 are")
  if strategy not in ("tensor", "channel", "group", "token"):
    raise HFFormatError(f"{where}: strategy {strategy!r} is not supported (tensor, channel, "
                        "group, token; tensor_group for NVFP4)")
  if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
    raise HFFormatError(f"{where}: strategy 'group' needs a positive group_size, got "
                        f"{group_size!r}")
  actorder = d.get("actorder")
  if actorder not in (None, False, "weight", "static"):
    raise HFFormatError(f"{where}: actorder {actorder!r} (a g_idx permutation of the groups) is "
                        "not supported; 'weight'/'static' keeps groups contiguous and is")
  return QArgs(bits, typ, bool(d.get("symmetric", True)), strategy,
               int(group_size) if strategy == "group" else None, bool(dyn))


def _parse_quant_config(q: Any, source: str) -> _QuantConfig | None:
  if q is None:
    return None
  if not isinstance(q, Mapping):
    raise HFFormatError(f"{source}: quantization_config is not an object")
  method = q.get("quant_method")
  if method != QUANT_METHOD:
    raise HFFormatError(f"{source}: unsupported quantization method {method!r}; quantjax "
                        f"reads '{QUANT_METHOD}' checkpoints (llm-compressor's format)")
  if q.get("kv_cache_scheme"):
    raise HFFormatError(f"{source}: kv_cache_scheme (quantized KV cache) is not supported")
  if q.get("transform_config"):
    raise HFFormatError(f"{source}: transform_config (rotations, e.g. SpinQuant / QuIP) is not "
                        "supported")
  sp = q.get("sparsity_config") or {}
  if sp and sp.get("format", "dense") != "dense":
    raise HFFormatError(f"{source}: sparsity format {sp.get('format')!r} is not supported "
                        "(compressed-tensors 0.19 itself no longer reads it)")
  default_fmt = q.get("format") or "dense"
  groups = []
  for gname, g in (q.get("config_groups") or {}).items():
    where = f"{source}: quantization_config.config_groups.{gname}"
    if not isinstance(g, Mapping):
      raise HFFormatError(f"{where}: preset schemes ({g!r}) are not supported; write the "
                          "scheme out")
    if g.get("output_activations"):
      raise HFFormatError(f"{where}: output activation quantization is not supported")
    w = _parse_args(g.get("weights"), where + ".weights")
    a = _parse_args(g.get("input_activations"), where + ".input_activations")
    fmt = g.get("format") or default_fmt
    if fmt == "mixed-precision":
      raise HFFormatError(f"{where}: no per-group format under a 'mixed-precision' config")
    if fmt not in SUPPORTED_FORMATS:
      raise HFFormatError(f"{where}: unsupported compressed-tensors format {fmt!r}; supported: "
                          f"{', '.join(SUPPORTED_FORMATS)}")
    if w is None and fmt != "dense":
      raise HFFormatError(f"{where}: format {fmt!r} without weight quantization")
    if a is not None:
      if a.num_bits != 8 or a.strategy not in ("token", "tensor"):
        raise HFFormatError(f"{where}: input activations {a.describe()} are not supported "
                            "(8-bit, per token or per tensor)")
      if a.strategy == "token" and not a.dynamic:
        raise HFFormatError(f"{where}: static per-token activations do not exist")
    if w is not None and fmt == "pack-quantized" and w.type != "int":
      raise HFFormatError(f"{where}: pack-quantized holds integer weights, not {w.type}")
    if w is not None and (fmt in ("mxfp4-pack-quantized", "nvfp4-pack-quantized")) != w.is_fp4:
      raise HFFormatError(f"{where}: format {fmt!r} with weights {w.describe()}")
    if w is not None and w.is_fp4 and fmt != scheme_format(w, None):
      raise HFFormatError(f"{where}: format {fmt!r} with weights {w.describe()} (expected "
                          f"{scheme_format(w, None)!r})")
    if w is not None and w.is_fp4 and a is not None:
      raise HFFormatError(f"{where}: FP4 input activations ({a.describe()}) are not supported")
    if w is not None and w.type == "float" and w.strategy == "group" and not w.is_fp4:
      raise HFFormatError(f"{where}: group-wise FP8 weights are not supported")
    targets = list(g.get("targets") or [])
    groups.append((gname, Scheme(fmt, w, a), targets))
  return _QuantConfig(groups, list(q.get("ignore") or []), source)


def read_config(directory: str) -> tuple[str, dict]:
  """`(path, parsed JSON)` of `directory`'s `config.json`."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  try:
    with open(path) as f:
      return path, json.load(f)
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{path}: not valid JSON ({e})") from None


class _Reader:
  """Reads tensors of a checkpoint, checking shapes and dtypes, recording what it used."""

  def __init__(self, ckpt: Checkpoint):
    self.ckpt = ckpt
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self.ckpt

  def get(self, name: str, *, module: str, shape: tuple | None = None, dtypes=None,
          what: str = "") -> np.ndarray:
    if name not in self.ckpt:
      raise HFFormatError(f"{self.ckpt.directory}: tensor {name!r} is missing{what} (no "
                          "safetensors file holds it)")
    self.used.add(name)
    got = self.ckpt.shape(name)
    if shape is not None and tuple(got) != tuple(shape):
      hint = ""
      if re.search(r"self_attn\.[qkvo]_proj\.weight$", name):
        hint = (" (attention widths are heads x head_dim: check num_attention_heads, "
                "num_key_value_heads and head_dim in config.json)")
      raise HFFormatError(f"{self.ckpt.file_of(name)}: tensor {name!r} has shape {list(got)}, "
                          f"config.json implies {list(shape)}{what}{hint}")
    dt = self.ckpt.dtype(name)
    if dtypes is not None and dt not in [np.dtype(d) for d in dtypes]:
      raise HFFormatError(f"{self.ckpt.file_of(name)}: tensor {name!r} has dtype {dt}, "
                          f"expected {' or '.join(np.dtype(d).name for d in dtypes)}{what}")
    return np.asarray(self.ckpt.get(name))


_SCALE_DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16)


def _scale_shape(args: QArgs, rows: int, cols: int) -> tuple[int, ...]:
  if args.strategy == "group":
    return (rows, -(-cols // args.group_size))
  if args.strategy == "channel":
    return (rows, 1)
  return (1,)


def _read_quantized(r: _Reader, spec: TensorSpec, scheme: Scheme, dtype: Any):
  """A QArray (maybe wrapped with its activation scheme) from a module's compressed tensors."""
  m = spec.module
  w = scheme.weights
  rows, cols = spec.hf_shape  # [out, in] for Linear, [vocab, d] for Embedding
  ax = 0 if spec.kind == "linear" else 1  # params contraction axis
  what = f" (module {m}, {scheme.describe()})"
  if w.strategy == "group" and cols % w.group_size:
    raise HFFormatError(f"{r.ckpt.directory}: {m} has {cols} input features, which group size "
                        f"{w.group_size} does not divide (a QArray needs whole groups){what}")
  if w.is_fp4:
    return _read_fp4(r, spec, w, what, dtype)
  if scheme.format == "pack-quantized":
    if w.type != "int":
      raise HFFormatError(f"{r.ckpt.directory}: {m}: pack-quantized float weights{what}")
    shp = r.get(f"{m}.weight_shape", module=m, shape=(2,),
                dtypes=(np.int64, np.int32), what=what)
    if tuple(int(s) for s in shp) != (rows, cols):
      raise HFFormatError(f"{r.ckpt.file_of(m + '.weight_shape')}: tensor {m}.weight_shape is "
                          f"{[int(s) for s in shp]}, config.json implies {[rows, cols]}{what}")
    packed = r.get(f"{m}.weight_packed", module=m, shape=(rows, -(-cols * w.num_bits // 32)),
                   dtypes=(np.int32,), what=what)
    codes = unpack_int32(packed, w.num_bits, cols)
  elif w.type == "float":
    codes = r.get(f"{m}.weight", module=m, shape=(rows, cols),
                  dtypes=(ml_dtypes.float8_e4m3fn,), what=what)
  else:
    codes = r.get(f"{m}.weight", module=m, shape=(rows, cols), dtypes=(np.int8,), what=what)
  sshape = _scale_shape(w, rows, cols)
  scale = r.get(f"{m}.weight_scale", module=m,
                shape=None if w.strategy == "tensor" else sshape, dtypes=_SCALE_DTYPES, what=what)
  if w.strategy == "tensor" and scale.size != 1:
    raise HFFormatError(f"{r.ckpt.file_of(m + '.weight_scale')}: tensor {m}.weight_scale has "
                        f"shape {list(scale.shape)}, a per-tensor scale has one value{what}")
  zp = None
  zname = f"{m}.weight_zero_point"
  if not w.symmetric:
    if scheme.format == "pack-quantized" and w.strategy in ("group", "channel"):
      zpk = r.get(zname, module=m, shape=(-(-rows * w.num_bits // 32), sshape[1]),
                  dtypes=(np.int32,), what=what)
      zp = np.ascontiguousarray(unpack_int32(np.ascontiguousarray(zpk.T), w.num_bits, rows).T)
    else:
      zp = r.get(zname, module=m, dtypes=(np.int8,), what=what)
      if zp.size != int(np.prod(sshape)):
        raise HFFormatError(f"{r.ckpt.file_of(zname)}: tensor {zname} has shape "
                            f"{list(zp.shape)}, expected {list(sshape)}{what}")
      zp = zp.reshape(sshape)
  elif r.has(zname):  # older writers saved zeros for symmetric schemes
    z = r.get(zname, module=m, what=what)
    if np.any(np.asarray(z) != 0):
      raise HFFormatError(f"{r.ckpt.file_of(zname)}: {zname} is non-zero but the scheme is "
                          f"symmetric{what}")
  gname = f"{m}.weight_g_idx"
  if r.has(gname):
    g = r.get(gname, module=m, shape=(cols,), what=what)
    gs = w.group_size or cols
    if not np.array_equal(np.asarray(g), np.arange(cols) // gs):
      raise HFFormatError(f"{r.ckpt.file_of(gname)}: {gname} permutes the groups (activation "
                          "order 'group'); a QArray needs contiguous groups")

  # Our layout: params [in, out] for Linear (transpose), [vocab, d] for Embedding.
  cax = -1 if ax == 0 else 0  # the output-channel axis, as QuantFormat.parse writes it
  if w.type == "float":
    gran = ("per_tensor" if w.strategy == "tensor" else "per_channel")
    fmt = QuantFormat(kind="fp8_e4m3", granularity=gran, channel_axis=cax, group_axis=ax,
                      scale_dtype=jnp.dtype(scale.dtype))
    qcodes = codes
  else:
    gran = {"group": dict(granularity="group", group_size=w.group_size),
            "channel": dict(granularity="per_channel"),
            "tensor": dict(granularity="per_tensor")}[w.strategy]
    if w.symmetric:
      fmt = QuantFormat(kind="int", bits=w.num_bits, symmetric=True, channel_axis=cax,
                        group_axis=ax, scale_dtype=jnp.dtype(scale.dtype), **gran)
      qcodes = codes.astype(np.int8)
    else:
      off = 1 << (w.num_bits - 1)
      fmt = QuantFormat(kind="int", bits=w.num_bits, symmetric=False, zero_point="int",
                        channel_axis=cax, group_axis=ax, scale_dtype=jnp.dtype(scale.dtype),
                        **gran)
      udt = np.uint8 if w.num_bits == 8 else np.int16
      qcodes = (codes.astype(np.int16) + off).astype(udt)
      zp = (zp.astype(np.int16) + off).astype(np.uint8)
  if w.strategy == "tensor":
    s_ours = scale.reshape(1, 1)
    z_ours = None if zp is None else zp.reshape(1, 1)
  else:
    s_ours = scale.T if ax == 0 else scale
    z_ours = None if zp is None else (zp.T if ax == 0 else zp)
  if ax == 0:
    qcodes = qcodes.T
  if qcodes.dtype == np.int16:
    qcodes = qcodes.astype(np.int8 if fmt.signed else np.uint8)
  q = QArray.from_codes(jnp.asarray(np.ascontiguousarray(qcodes)), fmt,
                        jnp.asarray(np.ascontiguousarray(s_ours)),
                        None if z_ours is None else jnp.asarray(np.ascontiguousarray(z_ours)),
                        dtype=dtype)
  a = scheme.input_activations
  if a is None:
    return q
  act_fmt = _act_format(a)
  if a.dynamic:
    return ActQuantized(weight=q, act_format=act_fmt)
  s = r.get(f"{m}.input_scale", module=m, dtypes=_SCALE_DTYPES, what=what)
  if s.size != 1:
    raise HFFormatError(f"{r.ckpt.file_of(m + '.input_scale')}: tensor {m}.input_scale has "
                        f"shape {list(s.shape)}, a static per-tensor scale has one value{what}")
  z = None
  if not a.symmetric:
    z = r.get(f"{m}.input_zero_point", module=m, dtypes=(np.int8,), what=what)
    z = jnp.asarray((z.reshape(1, 1).astype(np.int16) + 128).astype(np.uint8))
  elif r.has(f"{m}.input_zero_point"):
    r.get(f"{m}.input_zero_point", module=m, what=what)
  return StaticActQuantized(weight=q, act_format=act_fmt,
                            act_scale=jnp.asarray(np.asarray(s, np.float32).reshape(1, 1)),
                            act_zero_point=z)


def _read_fp4(r: _Reader, spec: TensorSpec, w: QArgs, what: str, dtype: Any) -> QArray:
  """An MXFP4 / NVFP4 QArray from `weight_packed` / `weight_scale` (/ `weight_global_scale`),
  code for code. NVFP4 with a global scale of 1 keeps its E4M3 scales (the file's size, and
  llama.cpp's NVFP4); any other global scale `g` gives float32 scales `s / g` (the values
  compressed-tensors decodes, before its bfloat16 cast)."""
  m = spec.module
  if spec.kind != "linear":
    raise HFFormatError(f"{r.ckpt.directory}: {m}: FP4 weights on a {spec.kind}{what}")
  rows, cols = spec.hf_shape
  gs = int(w.group_size)
  packed = r.get(f"{m}.weight_packed", module=m, shape=(rows, cols // 2), dtypes=(np.uint8,),
                 what=what)
  codes = unpack_fp4(packed)
  kind = "nvfp4" if w.strategy == "tensor_group" else "mxfp4"
  sname = f"{m}.weight_scale"
  if kind == "mxfp4":
    raw = r.get(sname, module=m, shape=(rows, cols // gs), dtypes=(np.uint8,), what=what)
    if np.any(raw == 255):
      raise HFFormatError(f"{r.ckpt.file_of(sname)}: {sname} holds E8M0 byte 255 (NaN){what}")
    scale, sdt = raw.view(ml_dtypes.float8_e8m0fnu), jnp.float8_e8m0fnu
  else:
    scale = r.get(sname, module=m, shape=(rows, cols // gs), dtypes=(ml_dtypes.float8_e4m3fn,),
                  what=what)
    sdt = jnp.float8_e4m3fn
    if np.any(~np.isfinite(scale.astype(np.float32))):
      raise HFFormatError(f"{r.ckpt.file_of(sname)}: {sname} holds a NaN scale{what}")
    gname = f"{m}.weight_global_scale"
    g = r.get(gname, module=m, dtypes=_SCALE_DTYPES, what=what)
    if g.size != 1 or not np.isfinite(g).all() or float(g.reshape(())) <= 0:
      raise HFFormatError(f"{r.ckpt.file_of(gname)}: {gname} must be one positive finite value, "
                          f"got {np.asarray(g).ravel()[:4].tolist()} of shape {list(g.shape)}{what}")
    gv = np.float32(g.reshape(()))
    if gv != 1:
      scale, sdt = scale.astype(np.float32) / gv, jnp.float32
  fmt = QuantFormat(kind=kind, bits=4, granularity="group", group_size=gs, group_axis=0,
                    channel_axis=-1, scale_dtype=sdt)
  return QArray.from_codes(jnp.asarray(np.ascontiguousarray(codes.T)), fmt,
                           jnp.asarray(np.ascontiguousarray(scale.T)), None, dtype=dtype)


def _act_format(a: QArgs) -> QuantFormat:
  gran = "per_channel" if a.strategy == "token" else "per_tensor"
  if a.type == "float":
    return QuantFormat(kind="fp8_e4m3", granularity=gran)
  if a.symmetric:
    return QuantFormat(kind="int", bits=8, symmetric=True, granularity=gran)
  return QuantFormat(kind="int", bits=8, symmetric=False, zero_point="int", granularity=gran)


def _dequantize_leaf(leaf: Any, dtype: Any) -> Any:
  if isinstance(leaf, ActQuantized):
    leaf = leaf.weight
  if isinstance(leaf, QArray):
    return leaf.dequantize(dtype)
  return leaf


def import_hf(directory: str | os.PathLike, *, dtype: Any = jnp.float32, tokenizer: bool = True,
              quantized: bool = True):
  """Loads a Hugging Face directory (plain or compressed-tensors) into a params tree.

  Args:
    directory: `config.json`, `*.safetensors` (or an index and its shards),
      optionally tokenizer files.
    dtype: dtype of float parameters and the `dtype` QArrays dequantize to.
    tokenizer: also load the directory's tokenizer (None in its place when the
      directory has none or this is False).
    quantized: keep compressed-tensors weights as QArrays (the checkpoint's own
      codes, scales and zero points; activation schemes as `ActQuantized` /
      `StaticActQuantized`); False dequantizes them to `dtype`.

  Returns:
    `(config, params, tokenizer, info)`; `info` maps each module / tensor to
    `(how it was stored, "qarray" | "float")`.

  Raises:
    FileNotFoundError: no directory or no config.json.
    HFFormatError: an unsupported model type, quantization method, format or
      scheme; a missing shard or tensor; a shape or dtype that disagrees
      with config.json; a truncated safetensors file; tensors the
      architecture does not have. The message names the file and tensor.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a directory: {directory}")
  cfg_path, cfg_json = read_config(directory)
  model_type = cfg_json.get("model_type")
  try:
    family = family_for(str(model_type))  # looked up once: names here, state below
  except HFFormatError as e:
    raise HFFormatError(f"{cfg_path}: {e}") from None
  arch = family.hf
  try:
    config = arch.from_hf_config(cfg_json, os.path.basename(os.path.abspath(directory)),
                                 cfg_path)
  except KeyError as e:
    raise HFFormatError(f"{cfg_path}: missing field {e}") from None
  except ValueError as e:
    msg = str(e)
    raise HFFormatError(msg if msg.startswith(cfg_path) else f"{cfg_path}: {msg}") from None
  qcfg = _parse_quant_config(cfg_json.get("quantization_config"), cfg_path)
  reader = _Reader(Checkpoint(directory))
  info: dict[str, tuple[str, str]] = {}
  pure: dict = {}
  for spec in arch.tensors(config):
    scheme = None
    if qcfg is not None and spec.kind in ("linear", "embedding"):
      scheme = qcfg.scheme_for(spec.module, spec.module_class)
    if scheme is None or scheme.format == "dense":
      a = reader.get(spec.hf_name, module=spec.module, shape=spec.hf_shape,
                     dtypes=(np.float32, np.float16, ml_dtypes.bfloat16, np.float64))
      if spec.kind == "linear":
        a = a.T
      a = np.ascontiguousarray(a).astype(np.float32)
      if spec.from_hf is not None:
        a = np.asarray(spec.from_hf(a), np.float32)
      leaf = jnp.asarray(a).astype(dtype)
      info[spec.hf_name] = (f"dense {st.dtype_name(reader.ckpt.dtype(spec.hf_name))}", "float")
    else:
      leaf = _read_quantized(reader, spec, scheme, dtype)
      info[spec.module] = (scheme.describe(), "qarray")
      if not quantized:
        leaf = _dequantize_leaf(leaf, dtype)
        info[spec.module] = (scheme.describe(), "dequantized")
    node = pure
    for k in spec.path[:-1]:
      node = node.setdefault(k, {})
    node[spec.path[-1]] = leaf
  extra = sorted(k for k in reader.ckpt.where if k not in reader.used and
                 not any(re.fullmatch(p, k) for p in arch.ignorable))
  if extra:
    raise HFFormatError(f"{directory}: tensors the {arch.hf_class} of config.json does not have "
                        f"(or a quantization_config that does not cover them): {extra[:6]}"
                        f"{' ...' if len(extra) > 6 else ''} in {reader.ckpt.where[extra[0]]}")
  params = family.as_state(config, pure)
  tok = None
  if tokenizer and any(os.path.exists(os.path.join(directory, f)) for f in
                       ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    tok = load_tokenizer(directory)
  return config, params, tok, info
