"""GGUF, the reader side: tensor names <-> parameter paths from the architecture record,
the checks of a file against a config (names, shapes), and `import_gguf` (block types as
QArrays, code for code)."""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.io import architecture as architecture_lib
from quantjax.io import gguf_dequant
from quantjax.io import gguf_read
from quantjax.io.gguf_blocks import BLOCK_TYPES, CODEBOOK_TYPES, blocks_to_qarray
from quantjax.io.gguf_read import GGUFError
from quantjax.io.tokenizer import load_tokenizer
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import QArray

_log = logging.getLogger("quantjax.gguf")


# ----------------------------------------------------------------------------
# Tensor names <-> parameter paths.


def architecture_of(config) -> architecture_lib.Architecture:
  """The registered architecture (`quantjax.io.architecture`) of `config`, with its GGUF
  names; GGUFError naming the config's type when there is none."""
  try:
    arch = architecture_lib.for_config(config)
  except architecture_lib.UnknownArchitecture:
    arch = None
  if arch is None or arch.gguf is None:
    known = [f"{a.config_type.__module__}.{a.config_type.__name__}"
             for a in architecture_lib.registered() if a.gguf is not None]
    raise GGUFError(f"GGUF supports the configs of the registered architectures "
                    f"({', '.join(known)}), got {type(config).__name__}")
  return arch


def tensor_table(config, arch: architecture_lib.Architecture | None = None,
                 ) -> list[tuple[str, tuple, int | None, int]]:
  """`(gguf name, params path, Q/K heads or None, contraction axis)` for every tensor of a
  model of `config`, in file order (`arch.gguf.table`; `arch` defaults to `config`'s
  registered architecture)."""
  return (arch or architecture_of(config)).gguf.table(config)


def get_leaf(tree: Any, path: tuple) -> Any:
  return rules_lib.leaf_at(tree, path, GGUFError)


def pure_tree(params: Any) -> Any:
  from flax import nnx
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params)
  return params


def expected_shapes(config, arch: architecture_lib.Architecture | None = None,
                    ) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{gguf name: (row-major shape in the file, params path)}` the config implies."""
  from flax import nnx
  arch = arch or architecture_of(config)
  pure = nnx.to_pure_dict(arch.abstract_state(config))
  out = {}
  for gname, ppath, _, _ in tensor_table(config, arch):
    node = pure
    for k in ppath:
      node = node[k]
    shape = tuple(int(s) for s in node.shape)
    out[gname] = (shape[::-1] if ppath[-1] == "kernel" else shape, "/".join(map(str, ppath)))
  return out


def config_from_reader(reader: Any, path: str) -> Any:
  """The model config of a GGUF file, by its `general.architecture` (the registered
  architectures, `quantjax.io.architecture.for_gguf`), with the architecture's own
  shape checks (`GGUFNames.check_shapes`)."""
  meta = gguf_read.gguf_metadata(reader)
  names = {t.name for t in reader.tensors}
  try:
    arch = architecture_lib.for_gguf(meta.get("general.architecture"))
  except architecture_lib.UnknownArchitecture as e:
    raise GGUFError(f"{path}: {e}") from None
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise GGUFError(f"{path}: no token_embd.weight tensor")
  vocab = int(list(emb.shape)[-1])
  tie = "output.weight" not in names
  config = arch.gguf.config_from_metadata(meta, vocab, tie, path)
  if arch.gguf.check_shapes is not None:
    shapes = {t.name: tuple(int(s) for s in reversed(list(t.shape))) for t in reader.tensors}
    arch.gguf.check_shapes(config, shapes, path)
  return config


def check_gguf_names(config, reader, path: str) -> None:
  """Every tensor the config needs is in the file, and nothing unknown is."""
  arch = architecture_of(config)
  have = {t.name for t in reader.tensors}
  table = tensor_table(config, arch)
  missing = [g for g, *_ in table if g not in have]
  if missing:
    raise GGUFError(f"{path}: missing tensor{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}"
                    f" ({len(missing)} of {len(table)} that a {config.num_layers}-layer "
                    f"{type(config).__name__} needs)")
  unknown = sorted(have - {g for g, *_ in table} - set(arch.gguf.ignored))
  if unknown:
    raise GGUFError(f"{path}: unsupported tensor{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(u) for u in unknown[:5])}")


_SHAPE_KEYS = ("embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "block_count")


def check_tensor_shapes(config, reader, path: str) -> None:
  """Checks, before any data is read, that the file holds exactly the tensors
  `config` implies with the shapes it implies (GGUF rows: `[out, in]`).

  Raises:
    GGUFError: a missing or unexpected tensor, or a shape that contradicts the
      metadata (the message names the tensor and the metadata keys involved).
  """
  arch = architecture_of(config)
  want = expected_shapes(config, arch)
  have = {t.name: t for t in reader.tensors}
  missing = [n for n in want if n not in have]
  if missing:
    raise GGUFError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                    f"(the metadata implies {len(want)} tensors)")
  unknown = sorted(set(have) - set(want) - set(arch.gguf.ignored))
  if unknown:
    raise GGUFError(f"{path}: unsupported tensors {unknown[:5]}")
  arch = getattr(reader, "get", lambda *_: None)("general.architecture") or "llama"
  for name, (shape, ppath) in want.items():
    got = tuple(int(s) for s in reversed(have[name].shape.tolist()))
    if got != shape:
      raise GGUFError(
          f"{path}: tensor {name!r} has shape {list(got)} but the metadata implies "
          f"{list(shape)} (for {ppath}); check the keys "
          f"{', '.join(arch + '.' + k for k in _SHAPE_KEYS)}")


# ----------------------------------------------------------------------------
# Import.


def import_gguf(path: str | os.PathLike, *, tokenizer: bool = True, dtype: Any = jnp.float32,
                check_values: bool = False):
  """Loads a llama or gemma3 GGUF keeping block-quantized tensors as QArrays.

  Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 become QArrays of the equivalent format with
  the file's codes and scales (no dequantization); F16 and BF16 become cast
  QArrays; F32 stays float32; k-quants (Q4_K, Q6_K, ...) are dequantized to
  float32. Returns `(config, params, tokenizer, info)` with `info` mapping each
  GGUF tensor name to `(type, "qarray" | "float" | "dequantized")`.

  The file is checked before any tensor is read (`quantjax.io.gguf_read`:
  structure, offsets, block scales, metadata, tensor shapes against the
  metadata); `check_values=True` also checks every float tensor value.
  """
  path = os.fspath(path)
  reader = gguf_read.open_gguf(path, check_values=check_values)
  config = config_from_reader(reader, path)
  arch = architecture_of(config)
  check_tensor_shapes(config, reader, path)
  by_name = {t.name: t for t in reader.tensors}
  info: dict[str, tuple[str, str]] = {}
  pure: dict = {}
  table = tensor_table(config, arch)
  known = {g for g, *_ in table} | set(arch.gguf.ignored)
  unknown = sorted(set(by_name) - known)
  if unknown:
    raise GGUFError(f"{path}: unsupported tensors {unknown[:5]}")
  for gname, ppath, heads, axis in table:
    t = by_name.get(gname)
    if t is None:
      raise GGUFError(f"{path}: missing tensor {gname!r}")
    kind = t.tensor_type.name
    rows_fn = (lambda a, h=heads: gguf_dequant.unpermute_qk(a, h)) if heads else None
    shape = tuple(int(s) for s in reversed(list(t.shape)))  # row-major [out, in]
    if kind in BLOCK_TYPES or kind in CODEBOOK_TYPES:
      raw = np.asarray(t.data).reshape(shape[0], -1)
      try:
        leaf = blocks_to_qarray(raw, kind, axis, rows_fn=rows_fn, dtype=dtype)
      except GGUFError as e:
        raise GGUFError(f"{path}: tensor {gname!r}: {e}") from None
      how = "qarray"
    elif kind in ("F16", "BF16") and len(shape) == 2:
      x = np.asarray(t.data)
      if kind == "BF16":
        x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
      x = x.reshape(shape)
      if rows_fn is not None:
        x = rows_fn(x)
      if axis == 0:
        x = x.T
      fmt = QuantFormat(kind="fp16" if kind == "F16" else "bf16", granularity="per_tensor")
      leaf = QArray.from_codes(jnp.asarray(np.ascontiguousarray(x)).astype(fmt.code_dtype), fmt,
                               None, dtype=dtype)
      how = "qarray"
    else:
      x = gguf_dequant.dequantize_gguf_tensor(t)
      if rows_fn is not None:
        x = rows_fn(x)
      if len(shape) == 2 and axis == 0:
        x = x.T
      leaf = jnp.asarray(np.ascontiguousarray(x), dtype)
      how = "float" if kind == "F32" else "dequantized"
    info[gname] = (kind, how)
    node = pure
    for k in ppath[:-1]:
      node = node.setdefault(k, {})
    node[ppath[-1]] = leaf
  architecture_lib.check_params_complete(arch, config, pure, path)
  deq = collections.Counter(k for k, h in info.values() if h == "dequantized")
  if deq:
    _log.warning("%s: dequantized to float32 on import (no QArray equivalent): %s", path,
                 ", ".join(f"{k} x{n}" for k, n in sorted(deq.items())))
  params = arch.as_state(config, pure)
  tok = load_tokenizer(path) if tokenizer else None
  return config, params, tok, info


def file_tensor_bytes(path: str | os.PathLike) -> int:
  """Sum of the tensor data sizes in a GGUF file."""
  reader = gguf_read.open_gguf(os.fspath(path))
  return sum(int(t.n_bytes) for t in reader.tensors)
