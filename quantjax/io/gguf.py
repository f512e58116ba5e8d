"""GGUF interop: export params that llama.cpp runs, import block types as QArrays.

llama.cpp's legacy block types are group-wise integer formats with 32 values
per block and float16 scales, stored along each row of a `[out, in]` matrix
(so the blocks run along the contraction axis):

=====  ===========================================  ==========================
type   block of 32 values                           `QuantFormat` equivalent
=====  ===========================================  ==========================
Q8_0   fp16 d, 32 x int8 q;            x = d*q      int8_g32, fp16 scales
Q4_0   fp16 d, 16 bytes of nibbles;    x = d*(u-8)  int4_g32 (q = u-8)
Q4_1   fp16 d, fp16 m, 16 bytes;       x = d*u + m  int4_g32_asymf
Q5_0   fp16 d, 32 high bits, 16 bytes; x = d*(u-16) int5_g32
Q5_1   fp16 d, fp16 m, high bits, 16B; x = d*u + m  int5_g32_asymf
=====  ===========================================  ==========================

Nibble order inside a block: value `j < 16` is the low nibble of byte `j`,
value `j + 16` its high nibble; Q5's fifth bits are bit `j` of a
little-endian uint32.

llama.cpp's newer types IQ4_NL, MXFP4, NVFP4, Q2_0, Q1_0, TQ2_0 and TQ1_0 are
formats of their own (`quantjax.numerics.llamacpp_types`; QuantFormat specs `iq4_nl`,
`mxfp4`, `nvfp4`, `q2_0`, `q1_0`, `tq2_0`, `tq1_0`) and go in and out code for code likewise
(`quantjax.io.gguf_codebook` has their block layouts).

* `export_gguf` writes a params tree (arrays and QArrays) with the model's
  config and tokenizer metadata. A QArray whose format *is* one of these block
  types (group 32 along the contraction axis, fp16 scales, the right
  signedness and offset kind) is written code for code: GPTQ and AWQ results
  export losslessly. Anything else is quantized (float leaves) or
  re-quantized (other QArray formats) to the type a rule or the default policy
  picks, and the returned report says so per tensor. llama.cpp's Q/K row
  permutation is re-applied. The file is written to a temporary name and
  renamed, so a failed export leaves nothing behind.
* `import_gguf` reads the block types above (and the newer ones) into QArrays without
  dequantizing (the same bits, the same bytes), F16/BF16 into cast QArrays,
  and dequantizes the k-quants (Q4_K, Q6_K, ...) to float32, recording which.
  Import then export of those tensor types is byte-identical.

This module knows the format, not the models: which tensors a model has, their
names and which carry llama.cpp's Q/K permutation come from the family's
architecture record (`quantjax.io.architecture`, registered by the model
modules), looked up by config class or `general.architecture`
(`architecture_of`, `tensor_table`, `expected_shapes`, `config_from_reader`,
`check_gguf_names`, `check_tensor_shapes`). Dequantizing to float32 is
`quantjax.io.gguf_dequant`'s.

This module is the writer (`export_gguf`, `write_gguf_file`, `encode_tensor`, the type
rules); the block types and their codecs are in `quantjax.io.gguf_blocks`, the tensor
names, the file checks and `import_gguf` in `quantjax.io.gguf_import`; their public
names are importable from here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from quantjax.io import atomic
from quantjax.io import gguf_codebook
from quantjax.io import gguf_read
from quantjax.io import kquants
from quantjax.io.gguf_blocks import (ALL_TYPES, BLOCK_TYPES, CODEBOOK_TYPES, FLOAT_TYPES, K_TYPES,
                                     QK, BlockType, block_format, block_type, block_type_of,
                                     blocks_to_qarray, pack_blocks, permute_qk, qarray_to_blocks,
                                     unpack_blocks)
from quantjax.io.gguf_import import (architecture_of, check_gguf_names, check_tensor_shapes,
                                     config_from_reader, expected_shapes, file_tensor_bytes,
                                     get_leaf, import_gguf, pure_tree, tensor_table)
from quantjax.io.gguf_read import GGUFError
from quantjax.numerics import llamacpp_types
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from quantjax.optional import require

__all__ = [
    "BLOCK_TYPES",
    "BlockType",
    "FLOAT_TYPES",
    "QK",
    "CODEBOOK_TYPES",
    "K_TYPES",
    "type_rules",
    "GGUFError",
    "block_format",
    "check_row_length",
    "fitting_types",
    "architecture_of",
    "block_type_of",
    "blocks_to_qarray",
    "check_gguf_names",
    "check_tensor_shapes",
    "config_from_reader",
    "expected_shapes",
    "export_gguf",
    "file_tensor_bytes",
    "float_tensor",
    "import_gguf",
    "match_type",
    "pack_blocks",
    "permute_qk",
    "qarray_to_blocks",
    "tensor_table",
    "unpack_blocks",
]


# ----------------------------------------------------------------------------
# Export.


@dataclasses.dataclass
class TensorExport:
  name: str
  path: str
  shape: tuple[int, ...]
  source: str        # the leaf's format: float32, int4_g64, ...
  gguf_type: str
  how: str           # "lossless" | "quantized" | "re-quantized (lossy)" | "float"
  nbytes: int


def _default_type(leaf: Any, axis: int, n_in: int) -> tuple[str, str]:
  """(type, how) when no rule names one."""
  if isinstance(leaf, QArray):
    fmt = leaf.fmt
    exact = block_type_of(fmt, axis)
    if exact is not None:
      return exact, "lossless"
    if fmt.is_cast:
      return ("F16" if fmt.kind == "fp16" else "BF16"), "lossless"
    own = {"iq4_nl": "IQ4_NL", "mxfp4": "MXFP4", "nvfp4": "NVFP4", "q2_0": "Q2_0"}.get(fmt.kind)
    if own is not None and n_in % gguf_codebook.TYPES[own].block == 0:
      return own, "re-quantized (lossy)"
    if fmt.kind == "int" and n_in % QK == 0:
      if fmt.bits >= 6:
        return "Q8_0", "re-quantized (lossy)"
      if fmt.bits == 5:
        return ("Q5_0" if fmt.symmetric else "Q5_1"), "re-quantized (lossy)"
      return ("Q4_0" if fmt.symmetric else "Q4_1"), "re-quantized (lossy)"
    if n_in % QK == 0:
      return "Q8_0", "re-quantized (lossy)"
    return "F16", "re-quantized (lossy)"
  return "F32", "float"


def float_tensor(x: np.ndarray, t: str) -> np.ndarray:
  """`x` as the data of float GGUF type `t` (F32, F16, or BF16 as uint16 bits)."""
  if t == "F32":
    return np.asarray(x, np.float32)
  if t == "F16":
    with np.errstate(over="ignore"):  # values past 65504 become inf: _check_encoded names them
      return np.asarray(x, np.float16)
  if t == "BF16":
    u = np.asarray(x, np.float32).view(np.uint32)
    # Round to nearest even, as a bf16 cast does.
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return u
  raise GGUFError(f"not a float GGUF type: {t}")


def match_type(types: Iterable[tuple[str, str]] | Mapping[str, str] | None, path: str,
               name: str) -> str | None:
  """The type of the first `types` rule whose pattern is found in `path` or matches all of
  `name` (upper case), else None."""
  if not types:
    return None
  items = types.items() if isinstance(types, Mapping) else types
  for pattern, t in items:
    if re.search(pattern, path) or re.fullmatch(pattern, name):
      return str(t).upper()
  return None


def _file_type(kinds: list[str]) -> int:
  gguf = require("gguf", "gguf", "GGUF export")
  ft = gguf.LlamaFileType
  table = {"F32": ft.ALL_F32, "F16": ft.MOSTLY_F16, "BF16": ft.MOSTLY_BF16,
           "Q8_0": ft.MOSTLY_Q8_0, "Q4_0": ft.MOSTLY_Q4_0, "Q4_1": ft.MOSTLY_Q4_1,
           "Q5_0": ft.MOSTLY_Q5_0, "Q5_1": ft.MOSTLY_Q5_1, "Q4_K": ft.MOSTLY_Q4_K_M,
           "Q5_K": ft.MOSTLY_Q5_K_M, "Q6_K": ft.MOSTLY_Q6_K,
           # llama.h's LLAMA_FTYPE_MOSTLY_*: IQ4_NL 25, MXFP4_MOE 38, NVFP4 39, Q1_0 40, Q2_0 41,
           # TQ1_0 36, TQ2_0 37
           "IQ4_NL": 25, "MXFP4": 38, "NVFP4": 39, "Q1_0": 40, "Q2_0": 41, "TQ2_0": 37,
           "TQ1_0": 36}
  if not kinds:
    return int(ft.ALL_F32)
  most = max(set(kinds), key=kinds.count)
  return int(table[most])


def _copy_tokenizer_fields(writer, source: str) -> int:
  """Copies `tokenizer.*` keys; returns the number of tokens."""
  gguf = require("gguf", "gguf", "GGUF export")
  reader = gguf_read.open_gguf(source)
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  for key, field in reader.fields.items():
    if not key.startswith("tokenizer."):
      continue
    types = list(field.types)
    if types[0] == gguf.GGUFValueType.ARRAY:
      writer.add_key_value(key, field.contents(), types[0], sub_type=types[-1])
    else:
      writer.add_key_value(key, field.contents(), types[0])
  return 0 if tokens is None else tokens.count


def _hf_tokenizer_fields(writer, tokenizer) -> int:
  """Tokenizer metadata for a byte-level BPE ("gpt2") Hugging Face tokenizer; returns
  the number of tokens."""
  import json
  if isinstance(tokenizer, (str, os.PathLike)):
    AutoTokenizer = require("transformers", "hf", "a Hugging Face tokenizer").AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise GGUFError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; "
                    "pass a GGUF file as tokenizer source instead")
  spec = json.loads(backend.to_str())
  model = spec.get("model", {})
  if model.get("type") != "BPE":
    raise GGUFError(f"only byte-level BPE tokenizers can be exported from Hugging Face "
                    f"(got {model.get('type')!r}); pass a GGUF file as tokenizer source")
  vocab = dict(model["vocab"])
  added = {t["content"]: t for t in spec.get("added_tokens", [])}
  for content, t in added.items():
    vocab.setdefault(content, t["id"])
  n = max(vocab.values()) + 1
  tokens = [f"[PAD{i}]" for i in range(n)]
  types = [1] * n  # NORMAL
  for tok, i in vocab.items():
    tokens[i] = tok
  for content, t in added.items():
    types[t["id"]] = 3 if t.get("special") else 4  # CONTROL / USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm" if "smollm" in str(getattr(tokenizer, "name_or_path", "")
                                                       ).lower() else "default")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  for attr, add in (("bos_token_id", writer.add_bos_token_id),
                    ("eos_token_id", writer.add_eos_token_id),
                    ("unk_token_id", writer.add_unk_token_id),
                    ("pad_token_id", writer.add_pad_token_id)):
    v = getattr(tokenizer, attr, None)
    if v is not None:
      add(int(v))
  template = getattr(tokenizer, "chat_template", None)
  if isinstance(template, str):
    writer.add_chat_template(template)
  return n


def encode_tensor(gname: str, ppath: tuple, heads: int | None, axis: int, leaf: Any,
                  want: Mapping[str, Any], types: Any, float_type: str,
                  importance: Mapping[str, Any] | None) -> tuple[np.ndarray, str, TensorExport]:
  """One tensor as GGUF bytes: `(raw array, GGUF type, report entry)` (`export_gguf`'s
  rules; `want` is `expected_shapes(config)`). Raises GGUFError naming the tensor."""
  spath = "/".join(map(str, ppath))
  if isinstance(leaf, InputScaled):
    raise GGUFError(
        f"{spath} carries per-input scales (InputScaled, from AWQ / SmoothQuant) that GGUF "
        "cannot store: fold them into the producing op first "
        "(quantjax.methods.fold_input_scales with the model's fold_groups(config), e.g. "
        "quantjax.models.llama.fold_groups) or calibrate with scales only where they fold "
        "(scales_for=<model>.foldable(config))")
  if isinstance(leaf, ActQuantized):
    leaf = leaf.weight  # llama.cpp quantizes activations itself
  shape = tuple(int(s) for s in leaf.shape)
  rows_shape = want[gname][0]
  exp = rows_shape[::-1] if ppath[-1] == "kernel" else rows_shape
  if shape != exp:
    raise GGUFError(f"{spath} has shape {shape} but the config implies {exp} (tensor {gname}); "
                    "llama.cpp and quantjax would refuse the file: fix the leaf or the config")
  if not isinstance(leaf, QArray):
    _check_finite_leaf(leaf, spath, gname)
  is_norm = ppath[-1] == "scale"
  n_in = shape[axis] if len(shape) == 2 else shape[-1]
  rows_fn = (lambda a, h=heads: permute_qk(a, h)) if heads else None
  forced = None if is_norm else match_type(types, spath, gname)
  if is_norm:
    t, how = "F32", "float"
  elif forced is not None:
    t = forced
    if t not in ALL_TYPES:
      raise GGUFError(f"rule for {spath}: unknown GGUF type {t!r}; supported: "
                      f"{', '.join(ALL_TYPES)}")
    if t not in FLOAT_TYPES:
      # A type the rows do not fill is an error naming the tensor and the types that fit,
      # never a silent fallback (llama-quantize swaps k-quants for Q5_0 / Q5_1 / Q8_0).
      if len(shape) != 2:
        raise GGUFError(f"tensor {gname} ({spath}) of shape {shape}: {t} is written for "
                        "matrices")
      check_row_length(n_in, t, f"tensor {gname} ({spath}, shape {shape}) as {t}")
    if isinstance(leaf, QArray):
      same = (block_type_of(leaf.fmt, axis) == t or
              (leaf.fmt.is_cast and {"fp16": "F16", "bf16": "BF16"}[leaf.fmt.kind] == t))
      how = "lossless" if same else "re-quantized (lossy)"
    else:
      how = "quantized" if (t in BLOCK_TYPES or t in K_TYPES or t in CODEBOOK_TYPES) else "float"
  else:
    t, how = _default_type(leaf, axis, n_in)
    if t == "F32" and not isinstance(leaf, QArray) and len(shape) == 2:
      t = float_type
  if t in BLOCK_TYPES:
    if len(shape) != 2:
      raise GGUFError(f"tensor {gname} ({spath}) of shape {shape}: {t} is written for matrices")
    check_row_length(n_in, t, f"tensor {gname} ({spath}, shape {shape}) as {t}")
    imp = None if importance is None else importance.get(spath)
    if isinstance(leaf, QArray) and block_type_of(leaf.fmt, axis) == t:
      raw = qarray_to_blocks(leaf, t, axis, rows_fn=rows_fn)  # code for code
    elif imp is not None and t in ("Q4_0", "Q5_0"):
      codes, d = kquants.fit_symmetric_blocks(_float_rows(leaf, axis, rows_fn),
                                              block_type(t).bits, imp)
      raw = pack_blocks(codes, d, None, t)
    else:
      x = leaf.dequantize(jnp.float32) if isinstance(leaf, QArray) else jnp.asarray(
          leaf, jnp.float32)
      # llama.cpp's rule for Q4_0/Q5_0: the extreme value maps to the lowest code
      cal = "signed_max" if t in ("Q4_0", "Q5_0") else "minmax"
      q = qarray_lib.quantize(x, block_format(t, axis), calibration=cal,
                              name=f"{spath} (tensor {gname}, {t})")
      raw = qarray_to_blocks(q, t, axis, rows_fn=rows_fn)
  elif t in CODEBOOK_TYPES:
    if len(shape) != 2:
      raise GGUFError(f"tensor {gname} ({spath}) of shape {shape}: {t} is written for matrices")
    check_row_length(n_in, t, f"tensor {gname} ({spath}, shape {shape}) as {t}")
    if isinstance(leaf, QArray) and block_type_of(leaf.fmt, axis) == t:
      raw = qarray_to_blocks(leaf, t, axis, rows_fn=rows_fn)  # code for code
    else:
      imp = None if importance is None else importance.get(spath)
      raw = _codebook_from_floats(_float_rows(leaf, axis, rows_fn), t, imp,
                                  f"{spath} (tensor {gname}, {t})")
  elif t in K_TYPES:
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing scales: checked below
      raw = kquants.quantize_k(_float_rows(leaf, axis, rows_fn), t,
                               importance=None if importance is None else importance.get(spath))
  else:
    raw = float_tensor(_float_rows(leaf, axis, rows_fn), t)
  _check_encoded(gname, spath, t, raw, leaf, axis, n_in)
  return raw, t, TensorExport(gname, spath, shape, _source_name(leaf), t, how, int(raw.nbytes))


def fitting_types(n: int) -> list[str]:
  """The GGUF block types (legacy, llama.cpp's newer ones, k-quants) whose block divides
  a row of `n` values."""
  blocks = {**{t: QK for t in BLOCK_TYPES},
            **{t: ct.block for t, ct in gguf_codebook.TYPES.items()},
            **{t: kquants.QK_K for t in K_TYPES}}
  return [t for t, b in blocks.items() if n % b == 0]


def check_row_length(n: int, t: str, what: str) -> None:
  """Raises a GGUFError naming `what` (the tensor), its row length and the types that fit
  when rows of `n` values do not fill block type `t`'s blocks."""
  block = gguf_codebook.TYPES[t].block if t in gguf_codebook.TYPES else (
      kquants.QK_K if t in K_TYPES else QK)
  if n % block:
    fit = fitting_types(n)
    raise GGUFError(f"{what}: its rows hold {n} values (the contraction axis), not a multiple "
                    f"of {t}'s blocks of {block}; types that fit rows of {n}: "
                    f"{', '.join(fit) if fit else 'none of the block types (use F16/BF16/F32)'}")


def _codebook_from_floats(x: np.ndarray, t: str, importance: Any, name: str) -> np.ndarray:
  """Float GGUF rows `[out, in]` as blocks of codebook type `t`: `quantize`'s scales
  (IQ4_NL / Q2_0 / TQ2_0 / TQ1_0: the least-squares search), weighting each value's
  error by the per-input-column `importance` when given (those types; ggml's imatrix
  weights)."""
  fmt = block_format(t, 1)
  xj = jnp.asarray(x, jnp.float32)
  if importance is None or not llamacpp_types.searches(fmt, "auto"):
    q = qarray_lib.quantize(xj, fmt, name=name)
  else:
    imp = jnp.asarray(np.asarray(importance, np.float32).reshape(1, -1))
    if imp.shape[1] != x.shape[1]:
      raise GGUFError(f"{name}: importance has {imp.shape[1]} values for rows of {x.shape[1]}")
    qarray_lib.check_range_fits(x, fmt, name)
    xb, axes = qarray_lib.block_view(xj, fmt)
    ib, _ = qarray_lib.block_view(jnp.broadcast_to(imp, xj.shape), fmt)
    w = llamacpp_types.importance_weights(xb, axes, ib)
    s = qarray_lib.stored_scale(llamacpp_types.search_scales(xb, axes, fmt, w), xj.shape, fmt)
    q = qarray_lib.quantize_with_scale(xj, fmt, s)
    qarray_lib.check_quantized(q, name, x)
  return qarray_to_blocks(q, t, 1)


def write_gguf_file(path: str | os.PathLike, config, tensors: Sequence[tuple[str, Any, str]], *,
                    tokenizer: Any = None, name: str | None = None) -> None:
  """Writes encoded tensors `(gguf name, raw array, GGUF type)` (in file order; arrays
  may be memory maps) with `config`'s metadata, atomically, and reads the file back
  with the checks any reader makes before it takes `path`'s name."""
  gguf = require("gguf", "gguf", "GGUF export")

  arch = architecture_of(config)
  arch_name = arch.gguf.arch
  path = os.fspath(path)

  def write(tmp):
    w = gguf.GGUFWriter(tmp, arch_name)
    w.add_name(name or config.name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_heads))
    w.add_head_count_kv(int(config.num_kv_heads))
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    arch.gguf.write_metadata(config, w, gguf)  # the family's own keys
    w.add_file_type(_file_type([t for _, r, t in tensors if r.ndim == 2]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
      if isinstance(tokenizer, (str, os.PathLike)) and os.fspath(tokenizer).endswith(".gguf"):
        n_tok = _copy_tokenizer_fields(w, os.fspath(tokenizer))
      else:
        n_tok = _hf_tokenizer_fields(w, tokenizer)
      if n_tok and n_tok != int(config.vocab_size):
        raise GGUFError(f"{path}: the tokenizer has {n_tok} tokens but the model's vocabulary "
                        f"(config.vocab_size, the embedding's rows) is {config.vocab_size}; "
                        "llama.cpp refuses such a file, so nothing was written")
    for gname, raw, t in tensors:
      if t in CODEBOOK_TYPES and t not in gguf.GGMLQuantizationType.__members__:
        # newer than gguf-py (Q2_0): its ggml id, and the shape in values
        ct = gguf_codebook.TYPES[t]
        rows = np.asarray(raw).reshape(np.asarray(raw).shape[0], -1)
        w.add_tensor(gname, rows.view(np.int8),
                     raw_shape=(rows.shape[0], rows.shape[1] // ct.type_size * ct.block),
                     raw_dtype=ct.ggml_id)
      elif t in BLOCK_TYPES or t in K_TYPES or t in CODEBOOK_TYPES:
        w.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType[t])
      elif t == "BF16":
        w.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
      else:
        w.add_tensor(gname, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

  def check(tmp):
    # Read back what was written, as any reader will, before it takes the name.
    try:
      with gguf_read.read_gguf(tmp) as back:
        gguf_read.validate_metadata(back)
        check_tensor_shapes(config, back, tmp)
        if len(back.tensors) != len(tensors):
          raise GGUFError(f"{len(back.tensors)} tensors were written, {len(tensors)} expected")
    except GGUFError as e:
      raise GGUFError(f"{path}: the written file fails the reader's checks, so it was not "
                      f"kept: {e}") from None

  # a new file: mode 0666 less the umask
  atomic.write_checked(path, write, check, what="GGUF file")


def export_gguf(path: str | os.PathLike, config, params: Any, *, tokenizer: Any = None,
                types: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                float_type: str = "F32", name: str | None = None,
                importance: Mapping[str, Any] | None = None) -> list[TensorExport]:
  """Writes `params` (arrays and QArrays) as a llama.cpp GGUF file.

  Args:
    path: output `.gguf`; written to a temporary file and renamed.
    config: the model's `LlamaConfig` (GGUF architecture "llama") or
      `Gemma3Config` ("gemma3"; llama.cpp fixes some of Gemma 3's settings,
      and a config it cannot represent is refused, naming the field).
    params: the params tree (`nnx.State` or nested dict, `[in, out]` kernels).
    tokenizer: a GGUF file whose `tokenizer.*` metadata is copied (e.g. the file
      the model came from), or a Hugging Face tokenizer / directory (byte-level
      BPE) to build it from. None writes no tokenizer (llama.cpp then refuses the
      file; useful only for tensor-level tests).
    types: rules `{regex: GGUF type}` matched (first wins) against each leaf's
      path (`layers/3/mlp/down_proj/kernel`) or GGUF name (`blk.3.ffn_down.weight`).
      A rule forces the type; a QArray already of that type stays lossless.
      Block types Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, llama.cpp's IQ4_NL/MXFP4/NVFP4/Q2_0/
      Q1_0/TQ2_0/TQ1_0, k-quants Q4_K/Q5_K/Q6_K (rows of 256), F32/F16/BF16. A type
      whose block does not divide a tensor's rows is an error naming the tensor,
      its row length and the types that fit: never a silent fallback (llama.cpp's
      own quantizer swaps k-quants for Q5_0 / Q5_1 / Q8_0 there).
    float_type: type for float matrices with no rule ("F32", "F16", "BF16").
      Norm weights are always F32, as llama.cpp requires.
    name: `general.name` (default: the config's name).
    importance: optional `{leaf path: per-input-column weights}` (e.g. mean
      squared activations, llama.cpp's imatrix): the k-quant encoders and the
      Q4_0/Q5_0/IQ4_NL/Q2_0/TQ2_0 scale searches weight each value's error by it (tensors written
      from floats only; QArrays already in their type stay lossless).

  Returns:
    One `TensorExport` per tensor: its type and whether it went in losslessly,
    was quantized from floats, or was re-quantized from another format.

  Raises:
    GGUFError: a leaf missing or of a shape the config contradicts, NaN/Inf in
      a leaf, values out of the chosen type's range (e.g. above F16's 65504,
      or beyond what Q4_0's fp16 scales reach): each names the leaf, the
      tensor and the value range, before any file is written.
    OSError: the file could not be written (disk full, ...); the message
      names it and nothing is left behind.

  Every tensor's encoding is checked as the reader checks a file (finite
  block scales and float values), and the written file is read back with
  `quantjax.io.gguf_read` before it is renamed into place.
  """
  arch = architecture_of(config)
  if arch.gguf.check_exportable is not None:
    arch.gguf.check_exportable(config)
  if float_type.upper() not in FLOAT_TYPES:
    raise GGUFError(f"float_type must be one of {FLOAT_TYPES}, got {float_type!r}")
  float_type = float_type.upper()
  pure = pure_tree(params)

  # Encode every tensor first: a bad leaf fails before any file exists.
  tensors: list[tuple[str, np.ndarray, str]] = []
  report: list[TensorExport] = []
  want = expected_shapes(config, arch)
  for gname, ppath, heads, axis in tensor_table(config, arch):
    raw, t, rec = encode_tensor(gname, ppath, heads, axis, get_leaf(pure, ppath), want, types,
                                float_type, importance)
    tensors.append((gname, raw, t))
    report.append(rec)

  write_gguf_file(path, config, tensors, tokenizer=tokenizer, name=name)
  return report


def _check_finite_leaf(leaf: Any, spath: str, gname: str) -> None:
  x = np.asarray(leaf)
  if not np.issubdtype(x.dtype, np.floating):
    raise GGUFError(f"{spath} (tensor {gname}) has dtype {x.dtype}; GGUF export takes floats")
  bad = ~np.isfinite(x)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise GGUFError(f"{spath} (tensor {gname}) holds {int(bad.sum())} NaN/Inf values of "
                    f"{x.size} (first at {first}: {x[first]}); nothing was written")


_FLOAT_MAX = {"F16": float(np.finfo(np.float16).max), "BF16": 3.3895313892515355e38,
              "F32": float(np.finfo(np.float32).max)}


def _check_encoded(gname: str, spath: str, t: str, raw: np.ndarray, leaf: Any, axis: int,
                   row: int) -> None:
  """The encoded tensor passes the reader's value checks, or a message says why not."""
  try:
    gguf_read.check_raw_tensor("export", gname, t, raw, row, full=True)
  except GGUFError as e:
    x = _float_rows(leaf, axis, None)
    lo, hi = float(np.min(x)), float(np.max(x))
    if t in _FLOAT_MAX:
      hint = (f"its values span [{lo:.4g}, {hi:.4g}], beyond {t}'s largest finite value "
              f"{_FLOAT_MAX[t]:.6g}: export it as F32 (or BF16)")
    else:
      hint = (f"its values span [{lo:.4g}, {hi:.4g}]; {t}'s float16 scales cannot represent "
              "them: export it as F32/BF16, or rescale it")
    raise GGUFError(f"{spath} (tensor {gname}, {t}): {hint} ({e})") from None


def type_rules(path: str | os.PathLike) -> list[tuple[str, str]]:
  """Rules that give every matrix the GGUF type it has in the file at `path`.

  `export_gguf(..., types=type_rules("model-Q4_K_M.gguf"))` writes quantjax's
  encoding of a model with the same per-tensor type mix as that file.
  """
  with gguf_read.read_gguf(os.fspath(path)) as reader:
    return [(f"^{re.escape(t.name)}$", t.tensor_type.name) for t in reader.tensors
            if len(t.shape) == 2]


def _float_rows(leaf: Any, axis: int, rows_fn) -> np.ndarray:
  """A leaf as float32 GGUF rows (`[out, in]` for matrices, Q/K permuted)."""
  if isinstance(leaf, QArray):
    x = np.asarray(leaf.dequantize(jnp.float32)) if not leaf.fmt.is_cast else \
        np.asarray(leaf.codes()).astype(np.float32)
  else:
    x = np.asarray(leaf, np.float32)
  if x.ndim == 2 and axis == 0:
    x = x.T
  if rows_fn is not None:
    x = rows_fn(x)
  return np.ascontiguousarray(x)


def _source_name(leaf: Any) -> str:
  if isinstance(leaf, QArray):
    return leaf.fmt.name
  return np.dtype(getattr(leaf, "dtype", np.float32)).name


def export_summary(report: list[TensorExport]) -> str:
  """One line per (type, how) with tensor counts and bytes."""
  groups: dict[tuple[str, str], list[TensorExport]] = {}
  for r in report:
    groups.setdefault((r.gguf_type, r.how), []).append(r)
  lines = []
  for (t, how), rs in sorted(groups.items()):
    lines.append(f"{t:5s} {how:22s} {len(rs):4d} tensors {sum(r.nbytes for r in rs):>13,} bytes")
  return "\n".join(lines)
