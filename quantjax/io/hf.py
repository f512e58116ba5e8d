"""Hugging Face model directories and compressed-tensors, out and in.

A Hugging Face model directory holds `config.json`, the tokenizer files and
`model.safetensors` (or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` mapping each tensor to its shard). Quantized
checkpoints in the format that llm-compressor writes and vLLM, SGLang and
transformers load add a `quantization_config` with `quant_method:
"compressed-tensors"` to `config.json`: config groups (a scheme of weight and
input-activation arguments plus a storage `format`, and the modules it
targets) and an `ignore` list. Per quantized Linear module `m` (weights
`[out, in]`, PyTorch's layout):

=================  ============================================================
format             tensors of module `m`
=================  ============================================================
pack-quantized     `m.weight_packed` int32 `[out, ceil(in*b/32)]`: signed b-bit
(W4A16, W8A16)     codes offset by 2^(b-1), densely packed, code `i` of a row at
                   bits `i*b` of the little-endian int32 stream;
                   `m.weight_shape` int64 `[2]`; `m.weight_scale` `[out,
                   in/g]` (group), `[out, 1]` (channel) or `[1]` (tensor);
                   asymmetric: `m.weight_zero_point`, signed codes packed the
                   same way along `out` (int32 `[ceil(out*b/32), in/g]`).
                   x = (q - z) * s.
int-quantized      `m.weight` int8 codes `[out, in]`, `m.weight_scale`,
(W8A8 int8)        `m.weight_zero_point` int8 when asymmetric; activations
                   quantized at run time per token (dynamic) or with a static
                   per-tensor `m.input_scale` `[1]` (and `m.input_zero_point`).
float-quantized    `m.weight` float8_e4m3fn `[out, in]`, `m.weight_scale`;
(W8A8 FP8)         activations as for int-quantized, in FP8 E4M3.
naive-quantized    weight-only codes stored unpacked (FP8 W8A16 here).
mxfp4-pack-        `m.weight_packed` uint8 `[out, in/2]`: FP4 E2M1 nibbles
quantized          (sign bit 3, magnitude 0, .5, 1, 1.5, 2, 3, 4, 6), element
                   2j low; `m.weight_scale` uint8 `[out, in/32]`: E8M0
                   exponents, scale 2^(e-127). x = fp4 * s.
nvfp4-pack-        `m.weight_packed` as MXFP4; `m.weight_scale` float8_e4m3fn
quantized          `[out, in/16]`; `m.weight_global_scale` float32 `[1]`.
                   x = fp4 * s / global (ours write global = 1: our NVFP4
                   scales are final, as in llama.cpp's NVFP4).
dense              `m.weight` in the model dtype.
=================  ============================================================

`export_hf` writes a params tree (arrays, `QArray`, `ActQuantized`,
`StaticActQuantized`) with its config and tokenizer as such a directory.
QArrays whose format *is* a compressed-tensors scheme are written code for
code (group-wise along the contraction axis, per channel or per tensor;
symmetric signed codes or integer zero points, our unsigned codes shifted by
2^(b-1); binary and ternary codes as exact 2-bit codes); anything else (a
GGUF-style float minimum, NF4, FP8 E5M2, groups along the wrong axis) is
re-quantized to the nearest scheme, and the returned report says so per
tensor. 2:4-sparse weights are written dense: compressed-tensors dropped its
sparse compressors after 0.14 and vLLM dropped Sparse24 models (both 2026),
so no servable sparse form remains. Everything is written to a temporary
directory next to the destination and renamed into place; a failed export
leaves nothing behind and never touches an existing directory.

`import_hf` reads such a directory (ours or llm-compressor's) into JAX:
compressed-tensors weights become QArrays holding the checkpoint's own codes,
scales and zero points (no dequantization), activation schemes become
`ActQuantized` / `StaticActQuantized`, plain safetensors directories load as
float arrays. What it reads is checked: an unsupported method, format or
scheme, a missing shard or tensor, shapes that disagree with `config.json`,
a truncated safetensors file: each is an `HFFormatError` naming the file and
tensor.

Architectures are data: each model module's `quantjax.io.architecture.Architecture`
record carries an `HFArchitecture` (the mapping between its params paths and the
checkpoint's tensor names, and the config translation), registered with
`quantjax.io.architecture.register`; `architecture_for` looks it up.

References:
  compressed-tensors (vLLM project), `compressors/pack_quantized`,
  `compressors/naive_quantized`, `quantization/quant_args.py`,
  `quantization/quant_config.py`, version 0.19.0.
  Hugging Face safetensors and sharded checkpoints
  (`model.safetensors.index.json`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from quantjax import rules as rules_lib
from quantjax.io import architecture as architecture_lib
from quantjax.io import safetensors as st
from quantjax.io.tokenizer import load_tokenizer
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray, StaticActQuantized

__all__ = [
    "CT_VERSION",
    "ExportReport",
    "HFArchitecture",
    "HFFormatError",
    "Scheme",
    "TensorExport",
    "TensorSpec",
    "architecture_for",
    "encode_leaf",
    "export_hf",
    "fused_notes",
    "import_hf",
    "pack_int32",
    "quantization_config",
    "read_config",
    "unpack_int32",
]

_log = logging.getLogger("quantjax.hf")

# The compressed-tensors release whose format we write and read (pinned in setup.py).
CT_VERSION = "0.19.0"
QUANT_METHOD = "compressed-tensors"
REPORT_FILE = "quantjax_export.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SUPPORTED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized",
                      "mxfp4-pack-quantized", "nvfp4-pack-quantized",
                      "dense")
_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class HFFormatError(ValueError):
  """A Hugging Face / compressed-tensors directory we cannot read or write as asked."""


# ----------------------------------------------------------------------------
# Architectures: params paths <-> checkpoint names, config <-> config.json.


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor of an architecture.

  Attributes:
    hf_name: the checkpoint name (`model.layers.3.self_attn.q_proj.weight`).
    path: the params path (`("layers", 3, "attn", "q_proj", "kernel")`).
    shape: the params leaf's shape (`[in, out]` for a kernel).
    kind: "linear" (params `[in, out]`, checkpoint `[out, in]`: transposed; a
      PyTorch `Linear`, quantizable), "embedding" (`[vocab, d]` both sides,
      PyTorch `Embedding`) or "vector" (norms, biases; always float).
    to_hf / from_hf: optional value maps for a float tensor whose stored
      values differ from the params' (e.g. a norm stored as `w - 1`), applied
      in the params layout on export / import.
  """

  hf_name: str
  path: tuple
  shape: tuple[int, ...]
  kind: str
  to_hf: Callable[[np.ndarray], np.ndarray] | None = None
  from_hf: Callable[[np.ndarray], np.ndarray] | None = None

  @property
  def module(self) -> str:
    return self.hf_name[:-len(".weight")] if self.hf_name.endswith(".weight") else self.hf_name

  @property
  def module_class(self) -> str:
    return {"linear": "Linear", "embedding": "Embedding"}.get(self.kind, "")

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.shape)) if self.kind == "linear" else tuple(self.shape)


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
  """What `export_hf` / `import_hf` need to know about one model family (data).

  Attributes:
    model_types: `config.json` `model_type` values read as this family; the
      first is written.
    hf_class: the transformers class named in `architectures`.
    config_type: the quantjax config class (e.g. `LlamaConfig`).
    to_hf_config: config -> the `config.json` body (no quantization_config).
    from_hf_config: (config.json dict, name, path of config.json for messages) -> config.
    tensors: config -> every `TensorSpec` of the checkpoint.
    to_params: (config, nested dict of leaves) -> the params tree the model
      takes (e.g. `llama.as_state`).
    ignorable: regexes of checkpoint tensors that may be present and are not
      parameters (rotary tables, a tied head saved anyway).
  """

  model_types: tuple[str, ...]
  hf_class: str
  config_type: type
  to_hf_config: Callable[[Any], dict]
  from_hf_config: Callable[[dict, str], Any]
  tensors: Callable[[Any], list[TensorSpec]]
  to_params: Callable[[Any, dict], Any]
  ignorable: tuple[str, ...] = ()


def architecture_for(config_or_model_type: Any) -> HFArchitecture:
  """The `HFArchitecture` of the registered architecture (`quantjax.io.architecture`) of a
  config object or a `model_type` string."""
  try:
    if isinstance(config_or_model_type, str):
      arch = architecture_lib.for_model_type(config_or_model_type)
    else:
      arch = architecture_lib.for_config(config_or_model_type)
  except architecture_lib.UnknownArchitecture as e:
    raise HFFormatError(str(e)) from None
  if arch.hf is None:
    raise HFFormatError(f"architecture {arch.name!r} has no Hugging Face names")
  return arch.hf


# ----------------------------------------------------------------------------
# compressed-tensors' int32 packing (numpy).


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
  """Signed b-bit codes `[rows, cols]` -> int32 `[rows, ceil(cols*b/32)]`.

  compressed-tensors' dense packing: each code is offset by 2^(b-1) to
  unsigned, and code `i` of a row occupies bits `[i*b, (i+1)*b)` of the row's
  little-endian stream of int32 words (so for 4 bits, eight codes per word,
  the first in the lowest nibble; codes may straddle two words for b = 3, 5,
  6, 7).
  """
  if not 1 <= bits <= 8:
    raise HFFormatError(f"pack-quantized holds 1 to 8 bits per code, not {bits}")
  c = np.asarray(codes)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if c.size and (c.min() < lo or c.max() > hi):
    raise HFFormatError(f"{bits}-bit codes must lie in [{lo}, {hi}], got [{c.min()}, {c.max()}]")
  rows, cols = c.shape
  u = (c.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
  bitplanes = ((u[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, cols * bits)
  nwords = -(-cols * bits // 32)
  pad = nwords * 32 - cols * bits
  if pad:
    bitplanes = np.pad(bitplanes, ((0, 0), (0, pad)))
  packed = np.packbits(bitplanes, axis=1, bitorder="little")  # [rows, 4 * nwords] bytes
  return np.ascontiguousarray(packed).view("<i4").reshape(rows, nwords).astype(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
  """Inverse of `pack_int32`: int32 `[rows, words]` -> signed int8 codes `[rows, cols]`."""
  p = np.ascontiguousarray(np.asarray(packed).astype("<i4"))
  rows, nwords = p.shape
  if nwords * 32 < cols * bits:
    raise HFFormatError(f"{nwords} int32 words per row cannot hold {cols} codes of {bits} bits")
  bitplanes = np.unpackbits(p.view(np.uint8).reshape(rows, 4 * nwords), axis=1,
                            bitorder="little")[:, :cols * bits].reshape(rows, cols, bits)
  u = np.sum(bitplanes.astype(np.int16) << np.arange(bits, dtype=np.int16), axis=-1)
  return (u - (1 << (bits - 1))).astype(np.int8)


# ----------------------------------------------------------------------------
# Schemes.


@dataclasses.dataclass(frozen=True)
class QArgs:
  """compressed-tensors `QuantizationArgs`, the fields we write and read."""

  num_bits: int
  type: str            # "int" | "float"
  symmetric: bool
  strategy: str        # "tensor" | "channel" | "group" | "tensor_group" | "token"
  group_size: int | None = None
  dynamic: bool = False
  scale_dtype: str | None = None  # e.g. "torch.uint8" (MXFP4's E8M0 bytes)

  @property
  def is_fp4(self) -> bool:
    """FP4 E2M1 weights: MXFP4 (group 32, E8M0 scales) or NVFP4 (group 16, E4M3 scales
    over a per-tensor global scale)."""
    return self.type == "float" and self.num_bits == 4

  def to_json(self) -> dict:
    return {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
            "group_size": self.group_size, "strategy": self.strategy, "block_structure": None,
            "dynamic": self.dynamic, "actorder": None, "scale_dtype": self.scale_dtype,
            "zp_dtype": None if self.symmetric else "torch.int8",
            "observer": None if self.dynamic else "minmax", "observer_kwargs": {}}

  def describe(self) -> str:
    s = f"{self.type}{self.num_bits}"
    if self.is_fp4:
      return ("nvfp4" if self.strategy == "tensor_group" else "mxfp4") + f" g{self.group_size}"
    s += f" g{self.group_size}" if self.strategy == "group" else f" per-{self.strategy}"
    s += " sym" if self.symmetric else " asym"
    return s + (" dynamic" if self.dynamic else "")


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One config group's scheme: storage format, weight args, input-activation args."""

  format: str
  weights: QArgs | None
  input_activations: QArgs | None = None

  def to_json(self, targets: Sequence[str]) -> dict:
    return {"targets": list(targets),
            "weights": None if self.weights is None else self.weights.to_json(),
            "input_activations": (None if self.input_activations is None else
                                  self.input_activations.to_json()),
            "output_activations": None, "format": self.format}

  def describe(self) -> str:
    w = "dense" if self.weights is None else self.weights.describe()
    a = "" if self.input_activations is None else f", act {self.input_activations.describe()}"
    return f"{self.format} ({w}{a})"


def _scheme_format(w: QArgs, a: QArgs | None) -> str:
  if w.is_fp4:
    if a is not None:
      raise HFFormatError(f"FP4 weights with {a.type}{a.num_bits} activations are not exported "
                          "(compressed-tensors' MXFP4 / NVFP4 activations are FP4 themselves)")
    return "nvfp4-pack-quantized" if w.strategy == "tensor_group" else "mxfp4-pack-quantized"
  if a is None:
    return "pack-quantized" if w.type == "int" else "naive-quantized"
  if w.type == "int" and a.type == "int":
    return "int-quantized"
  if w.type == "float" and a.type == "float":
    return "float-quantized"
  raise HFFormatError(f"compressed-tensors has no format for {w.type} weights with "
                      f"{a.type} activations")


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


def _weight_args(q: QArray, ax: int) -> QArgs | None:
  """The compressed-tensors weight args `q` is exactly, contraction axis `ax`; else None."""
  f = q.fmt
  if q.ndim != 2:
    return None
  if f.kind == "int":
    if f.has_zero_point and f.zero_point == "float":
      return None
    if f.symmetric and not f.signed:
      return None
    typ, bits = "int", f.bits
  elif f.kind in ("binary", "ternary"):
    typ, bits = "int", 2
  elif f.kind == "fp8_e4m3":
    typ, bits = "float", 8
  elif f.kind in _FP4:
    # compressed-tensors' FP4 schemes: groups of exactly 16 (NVFP4, E4M3 scales) or 32
    # (MXFP4, E8M0 scales) along the contraction axis.
    gs, sdt, strategy, name = _FP4[f.kind]
    if (f.granularity != "group" or f.group_axis % 2 != ax or int(f.group_size) != gs
        or jnp.dtype(f.scale_dtype) != jnp.dtype(sdt)):
      return None
    return QArgs(4, "float", True, strategy, gs, scale_dtype=name)
  else:
    return None
  if f.granularity == "group":
    if f.group_axis % 2 != ax or typ == "float":
      return None
    return QArgs(bits, typ, f.symmetric, "group", int(f.group_size))
  if f.granularity == "per_channel":
    if f.channel_axis % 2 != 1 - ax:
      return None
    return QArgs(bits, typ, f.symmetric, "channel")
  return QArgs(bits, typ, f.symmetric, "tensor")


# kind -> (group size, our scale dtype, compressed-tensors strategy, its scale_dtype name)
_FP4 = {"mxfp4": (32, jnp.float8_e8m0fnu, "group", "torch.uint8"),
        "nvfp4": (16, jnp.float8_e4m3fn, "tensor_group", "torch.float8_e4m3fn")}


def pack_fp4(codes: np.ndarray) -> np.ndarray:
  """FP4 E2M1 codes `[rows, cols]` (nibbles: sign bit 3, magnitude index 0-7, quantjax's
  and compressed-tensors' order alike) -> uint8 `[rows, cols / 2]`, element 2j in the low
  nibble of byte j (compressed-tensors' `pack_fp4_to_uint8`)."""
  c = np.asarray(codes).astype(np.uint8)
  if c.ndim != 2 or c.shape[1] % 2 or np.any(c > 15):
    raise HFFormatError(f"FP4 codes of shape {list(c.shape)}: need 2-D, an even row length and "
                        "codes 0-15")
  return np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4))


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
  """Inverse of `pack_fp4`: uint8 `[rows, n]` -> codes uint8 `[rows, 2 n]`."""
  p = np.asarray(packed, np.uint8)
  return np.ascontiguousarray(np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[0], -1))


def _requant_format(q: QArray, ax: int, n_in: int) -> QuantFormat:
  """The compressed-tensors-compatible format nearest to `q.fmt` (for re-quantization)."""
  f = q.fmt
  if f.granularity == "group" and f.kind != "fp8_e5m2" and n_in % int(f.group_size) == 0:
    gran = dict(granularity="group", group_size=int(f.group_size), group_axis=ax,
                channel_axis=1 - ax)
  elif f.granularity == "per_tensor":
    gran = dict(granularity="per_tensor")
  else:
    gran = dict(granularity="per_channel", channel_axis=1 - ax, group_axis=ax)
  if f.kind in ("fp8_e5m2", "fp8_e4m3"):
    if gran["granularity"] == "group":
      gran = dict(granularity="per_channel", channel_axis=1 - ax, group_axis=ax)
    return QuantFormat(kind="fp8_e4m3", **gran)
  bits = f.bits if f.kind == "int" else 4
  if f.kind == "int" and f.has_zero_point:
    return QuantFormat(kind="int", bits=bits, symmetric=False, zero_point="int", **gran)
  return QuantFormat(kind="int", bits=max(bits, 2), symmetric=True, **gran)


def _ct_codes(q: QArray, args: QArgs, ax: int) -> tuple[np.ndarray, np.ndarray | None]:
  """Signed codes `[out, in]` and signed zero points (HF layout) of a compatible QArray."""
  f = q.fmt
  codes = np.asarray(q.codes())
  zp = None if q.zero_point is None else np.asarray(q.zero_point).astype(np.int16)
  if args.type == "int":
    codes = codes.astype(np.int16)
    if not f.symmetric and not f.signed:
      off = 1 << (f.bits - 1)
      codes = codes - off
      zp = zp - off
    codes = codes.astype(np.int8)
    zp = None if zp is None else zp.astype(np.int8)
  if ax == 0:
    codes = codes.T
    zp = None if zp is None else zp.T
  return np.ascontiguousarray(codes), None if zp is None else np.ascontiguousarray(zp)


def _ct_scale(a: np.ndarray, args: QArgs, ax: int) -> np.ndarray:
  """A stored scale / zero point (params layout) in compressed-tensors' shape."""
  a = np.asarray(a)
  if args.strategy == "tensor":
    return a.reshape(1)
  return np.ascontiguousarray(a.T if ax == 0 else a)


def _cast_scale(s: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, bool]:
  """Scale in the export dtype; True when that rounded any value."""
  out = np.asarray(s).astype(dtype)
  exact = np.array_equal(out.astype(np.float64), np.asarray(s).astype(np.float64))
  return out, not exact


def _act_args(leaf: ActQuantized) -> QArgs:
  f = leaf.act_format
  if f.kind == "int":
    if f.bits != 8:
      raise HFFormatError(f"activation format {f.name}: compressed-tensors runtimes quantize "
                          "activations to 8 bits")
    if f.has_zero_point and f.zero_point == "float":
      raise HFFormatError(f"activation format {f.name}: a float minimum has no "
                          "compressed-tensors form (use an integer zero point)")
    typ = "int"
  elif f.kind == "fp8_e4m3":
    typ = "float"
  else:
    raise HFFormatError(f"activation format {f.name} has no compressed-tensors form "
                        "(int8 or fp8_e4m3)")
  if isinstance(leaf, StaticActQuantized):
    if leaf.act_scale is None or int(np.prod(np.shape(leaf.act_scale))) != 1:
      raise HFFormatError("static activation scales per input channel have no "
                          "compressed-tensors form (static input scales are per tensor)")
    return QArgs(8, typ, f.symmetric, "tensor", dynamic=False)
  if f.granularity == "group":
    raise HFFormatError(f"activation format {f.name}: group-wise activations are not exported")
  return QArgs(8, typ, f.symmetric, "token" if f.granularity == "per_channel" else "tensor",
               dynamic=True)


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
  wargs = _weight_args(q, ax)
  how, note = "lossless", ""
  if wargs is None:
    target = _requant_format(q, ax, shape[0])
    q = qarray_lib.quantize(jnp.asarray(_float_values(q)), target)
    wargs = _weight_args(q, ax)
    how = "re-quantized (lossy)"
    note = f"{weight.fmt.name} has no compressed-tensors form; written as {target.name}"
  aargs = None if act is None else _act_args(act)
  fmt = _scheme_format(wargs, aargs)
  if fmt == "int-quantized" and wargs.num_bits != 8:
    note = (note + "; " if note else "") + "vLLM's W8A8 kernels take 8-bit weights"
  if wargs.is_fp4:
    return _encode_fp4(spec, q, wargs, source, how, note)
  codes, zp = _ct_codes(q, wargs, ax)
  scale, rounded = _cast_scale(_ct_scale(q.scale, wargs, ax), dtype)
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
    s, r = _cast_scale(np.asarray(act.act_scale).reshape(1), dtype)
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
  scheme = Scheme(_scheme_format(wargs, None), wargs, None)
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


def quantization_config(schemes: dict[str, Scheme], linear_modules: list[str]) -> dict:
  """The `quantization_config` for modules -> scheme (quantized modules only)."""
  by_scheme: dict[Scheme, list[str]] = collections.OrderedDict()
  for m, s in schemes.items():
    by_scheme.setdefault(s, []).append(m)
  groups, ignore = {}, []
  if len(by_scheme) == 1:
    (scheme, mods), = by_scheme.items()
    ignore = [m for m in linear_modules if m not in schemes]
    if "lm_head" not in ignore and "lm_head" not in schemes:
      ignore.append("lm_head")  # the (tied) output head is a Linear too
    groups["group_0"] = scheme.to_json(["Linear"])
  else:
    for i, (scheme, mods) in enumerate(by_scheme.items()):
      groups[f"group_{i}"] = scheme.to_json(mods)
  formats = {s.format for s in by_scheme}
  return {"quant_method": QUANT_METHOD, "version": CT_VERSION,
          "format": formats.pop() if len(formats) == 1 else "mixed-precision",
          "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
          "kv_cache_scheme": None, "global_compression_ratio": None}


def fused_notes(schemes: dict[str, Scheme], modules: list[str]) -> list[str]:
  """vLLM fuses q/k/v and gate/up into one layer: their schemes must agree."""
  notes = []
  fused = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
  for m in modules:
    for names in fused:
      if m.endswith("." + names[0]):
        base = m[:-len(names[0])]
        got = {schemes.get(base + n) for n in names}
        if len(got) > 1:
          notes.append(f"{base}{{{','.join(names)}}} have different schemes: vLLM fuses them "
                       "into one layer and needs one scheme (transformers loads it as is)")
  return notes


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
  if dtype not in _FLOAT_DTYPES:
    raise HFFormatError(f"dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}")
  fdt = _FLOAT_DTYPES[dtype]
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
    if fmt not in _SUPPORTED_FORMATS:
      raise HFFormatError(f"{where}: unsupported compressed-tensors format {fmt!r}; supported: "
                          f"{', '.join(_SUPPORTED_FORMATS)}")
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
    if w is not None and w.is_fp4 and fmt != _scheme_format(w, None):
      raise HFFormatError(f"{where}: format {fmt!r} with weights {w.describe()} (expected "
                          f"{_scheme_format(w, None)!r})")
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
    arch = architecture_for(str(model_type))
  except HFFormatError as e:
    raise HFFormatError(f"{cfg_path}: {e}") from None
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
  params = arch.to_params(config, pure)
  tok = None
  if tokenizer and any(os.path.exists(os.path.join(directory, f)) for f in
                       ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    tok = load_tokenizer(directory)
  return config, params, tok, info
