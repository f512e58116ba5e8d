"""Architectures as data: what the file formats need to know about a model family.

A model module (`quantjax.models.llama`, `quantjax.models.gemma3`) describes
itself with one `Architecture` record (its config class, the entry points that
build its params, its Hugging Face names and config translation, its GGUF
tensor-name table) and registers it here. The readers and writers of
`quantjax.io` look a family up by what a file names (`model_type` of a
`config.json`, `general.architecture` of a GGUF) or by the config object they
are given, and read the record; they never import a model module, so the
imports run one way: models above io.

* `register(arch)`: makes a record available (a later one wins).
* `for_config(config)`, `for_model_type(name)`, `for_gguf(name)`: the record
  of a config object, of a Hugging Face `model_type`, of a GGUF
  `general.architecture` (`UnknownArchitecture` otherwise).
* `GGUFNames`: llama.cpp's tensor names of a family and which of them carry
  llama.cpp's Q/K row permutation; `GGUFNames.table(config)` lists every
  tensor of a model.
* `check_params_complete(arch, config, pure, source)`: a params tree holds
  exactly the leaves the config implies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from quantjax.numerics.qarray import is_qarray

__all__ = [
    "Architecture",
    "GGUFNames",
    "UnknownArchitecture",
    "check_params_complete",
    "for_config",
    "for_gguf",
    "for_model_type",
    "register",
    "registered",
]


class UnknownArchitecture(ValueError):
  """No registered architecture answers to a name or a config type."""


@dataclasses.dataclass(frozen=True)
class GGUFNames:
  """llama.cpp's GGUF tensor names of one model family (data).

  Attributes:
    arch: the `general.architecture` value ("llama", "gemma3").
    layer: per decoder block, the name after `blk.{i}.` -> the params path
      inside `layers/{i}` (`"attn_q.weight" -> ("attn", "q_proj", "kernel")`).
    top: top-level names -> params paths (`token_embd.weight`, ...); an
      `output.weight` is left out for tied embeddings.
    qk_heads: layer names whose rows llama.cpp's converter permutes ("rotate
      half" to interleaved pairs) -> the config attribute giving that tensor's
      head count (`{"attn_q.weight": "num_heads", ...}`); empty when the
      family uses NEOX-style RoPE (no permutation).
    ignored: tensors a file may hold that are neither loaded nor rejected.
    config_from_metadata: `(metadata dict, vocab_size, tie_embeddings, source)`
      -> the config (raises ValueError / GGUFError naming the key).
    check_shapes: optional `(config, {name: row-major shape}, source)` check of
      the tensors' shapes against the config, raising with a message that names
      the tensor and the metadata keys (run before the generic shape check).
    check_exportable: optional `config -> None` that refuses (GGUFError) a
      config llama.cpp would misread.
    write_metadata: optional `(config, writer, gguf module) -> None` that adds the
      family's own keys to a `gguf.GGUFWriter` beyond the common ones (context,
      widths, heads, RoPE base, norm epsilon), which the writer adds itself.
  """

  arch: str
  layer: Mapping[str, tuple]
  top: Mapping[str, tuple]
  config_from_metadata: Callable[[Mapping[str, Any], int, bool, str], Any]
  qk_heads: Mapping[str, str] = dataclasses.field(default_factory=dict)
  ignored: tuple[str, ...] = ()
  check_shapes: Callable[[Any, Mapping[str, tuple], str], None] | None = None
  check_exportable: Callable[[Any], None] | None = None
  write_metadata: Callable[[Any, Any, Any], None] = lambda config, writer, gguf: None

  def table(self, config: Any) -> list[tuple[str, tuple, int | None, int]]:
    """`(GGUF name, params path, Q/K heads to permute or None, contraction axis)` per
    tensor of a model of `config`, in the order a file holds them."""
    out = []
    for gname, path in self.top.items():
      if gname == "output.weight" and config.tie_embeddings:
        continue
      out.append((gname, tuple(path), None, 1 if tuple(path) == ("embed", "embedding") else 0))
    for i in range(config.num_layers):
      for rest, path in self.layer.items():
        attr = self.qk_heads.get(rest)
        heads = None if attr is None else int(getattr(config, attr))
        out.append((f"blk.{i}.{rest}", ("layers", i) + tuple(path), heads, 0))
    return out


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One model family, as the file formats see it (data; see the module docstring).

  Attributes:
    name: the family's name ("llama", "gemma3").
    config_type: the config class (`LlamaConfig`, ...); a config is of this
      family when it is an instance of it.
    model: the nnx module class (`Llama`, ...).
    module: the model module whose functions take such a config (`forward_fn`,
      `loss_fn`, `decoder`, ...; `quantjax.models.load.model_module`).
    abstract_state: `config -> nnx.State` of shape/dtype structs (no memory).
    as_state: `(config, nested dict of leaves) -> nnx.State` the model takes.
    hf: the Hugging Face names and config translation
      (`quantjax.io.hf.HFArchitecture`), or None.
    gguf: llama.cpp's tensor names (`GGUFNames`), or None.
    fold_groups: `config -> [FoldGroup]` (the scales that fold into producing ops).
    rotation_table: `config -> RotationTable` (rotations that leave the model's
      function unchanged).
  """

  name: str
  config_type: type
  model: Any
  module: Any
  abstract_state: Callable[[Any], Any]
  as_state: Callable[[Any, Any], Any]
  hf: Any = None
  gguf: GGUFNames | None = None
  fold_groups: Callable[..., Any] | None = None
  rotation_table: Callable[..., Any] | None = None


_REGISTRY: list[Architecture] = []


def register(arch: Architecture) -> None:
  """Makes `arch` available to the readers and writers of `quantjax.io` (a later
  registration of the same name or model type wins)."""
  _REGISTRY.append(arch)


def registered() -> tuple[Architecture, ...]:
  """The registered architectures, in registration order."""
  return tuple(_REGISTRY)


def for_config(config: Any) -> Architecture:
  """The registered architecture whose config class `config` is an instance of."""
  for a in reversed(_REGISTRY):
    if isinstance(config, a.config_type):
      return a
  raise UnknownArchitecture(f"no architecture registered for {type(config).__name__} "
                            "(quantjax.io.architecture.register)")


def for_model_type(model_type: str) -> Architecture:
  """The registered architecture that reads Hugging Face `model_type` `model_type`."""
  for a in reversed(_REGISTRY):
    if a.hf is not None and model_type in a.hf.model_types:
      return a
  known = sorted({t for a in _REGISTRY if a.hf is not None for t in a.hf.model_types})
  raise UnknownArchitecture(f"unsupported model_type {model_type!r}; registered: {known}")


def for_gguf(name: Any) -> Architecture:
  """The registered architecture whose GGUF `general.architecture` is `name`."""
  for a in reversed(_REGISTRY):
    if a.gguf is not None and a.gguf.arch == name:
      return a
  known = list(dict.fromkeys(a.gguf.arch for a in _REGISTRY if a.gguf is not None))
  raise UnknownArchitecture(f"unsupported architecture {name!r}; quantjax loads "
                            f"{', '.join(repr(k) for k in known)} GGUF files")


def check_params_complete(arch: Architecture, config: Any, pure: Mapping, source: str) -> None:
  """`pure` holds exactly the parameters `config` implies (`arch.abstract_state`), with
  their shapes (ValueError naming `source` otherwise)."""
  import jax
  from flax import nnx
  abstract = nnx.to_pure_dict(arch.abstract_state(config))
  want = {jax.tree_util.keystr(p): l.shape for p, l in
          jax.tree_util.tree_flatten_with_path(abstract)[0]}
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
