"""compressed-tensors' vocabulary: the file names and constants, the error, an
architecture's tensor list (`TensorSpec`, `HFArchitecture`), the quantization
arguments and schemes (`QArgs`, `Scheme`) and the `quantization_config` they make."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from quantjax.io import architecture as architecture_lib

# The compressed-tensors release whose format we write and read (pinned in setup.py).
CT_VERSION = "0.19.0"
QUANT_METHOD = "compressed-tensors"
REPORT_FILE = "quantjax_export.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized",
                     "mxfp4-pack-quantized", "nvfp4-pack-quantized",
                     "dense")
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
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
  """What `export_hf` / `import_hf` need to know about one model family (data): the
  `hf` field of its `quantjax.io.architecture.Architecture` (whose config class and
  `as_state` the reader uses too).

  Attributes:
    model_types: `config.json` `model_type` values read as this family; the
      first is written.
    hf_class: the transformers class named in `architectures`.
    to_hf_config: config -> the `config.json` body (no quantization_config).
    from_hf_config: (config.json dict, name, path of config.json for messages) -> config.
    tensors: config -> every `TensorSpec` of the checkpoint.
    ignorable: regexes of checkpoint tensors that may be present and are not
      parameters (rotary tables, a tied head saved anyway).
  """

  model_types: tuple[str, ...]
  hf_class: str
  to_hf_config: Callable[[Any], dict]
  from_hf_config: Callable[[dict, str], Any]
  tensors: Callable[[Any], list[TensorSpec]]
  ignorable: tuple[str, ...] = ()


def decoder_tensors(config: Any, norms: tuple[Sequence, Sequence, Sequence], *,
                    norm_offset: float = 0.0) -> list[TensorSpec]:
  """Every checkpoint tensor of a Llama-style decoder, in file order: the embedding;
  per layer (`model.layers.{i}.`) the norms `norms[0]`, the attention projections
  (`self_attn.q_proj` ... `o_proj`, params `attn/q_proj/kernel` ...), the norms
  `norms[1]`, the MLP projections (`mlp.gate_proj`, `up_proj`, `down_proj`), the norms
  `norms[2]`; the final norm; an untied head. A norm is `(name after the layer
  prefix, params path inside the layer, width)`. `norm_offset` c: the checkpoint
  stores each norm weight as `w - c` (Gemma's `1 + w` multipliers: c = 1)."""
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  attn = [("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), (d, q)),
          ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), (d, kv)),
          ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), (d, kv)),
          ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), (q, d))]
  mlp = [("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (d, f)),
         ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (d, f)),
         ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (f, d))]
  c = np.float32(norm_offset)

  def norm(name, path, n):
    if not norm_offset:
      return TensorSpec(name, path, (n,), "vector")
    return TensorSpec(name, path, (n,), "vector", to_hf=lambda w: w - c,
                      from_hf=lambda w: (c + w).astype(np.float32))
  out = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"),
                    (config.vocab_size, d), "embedding")]
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    for part, linears in zip(norms, (attn, mlp, ())):
      out += [norm(pre + n, ("layers", i) + tuple(p), w) for n, p, w in part]
      out += [TensorSpec(pre + n, ("layers", i) + p, shape, "linear") for n, p, shape in linears]
  out.append(norm("model.norm.weight", ("final_norm", "scale"), d))
  if not config.tie_embeddings:
    out.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (d, config.vocab_size),
                          "linear"))
  return out


def family_for(config_or_model_type: Any) -> architecture_lib.Architecture:
  """The registered architecture record (`quantjax.io.architecture`) of a config object
  or a `model_type` string, one with Hugging Face names (`HFFormatError` otherwise)."""
  try:
    if isinstance(config_or_model_type, str):
      arch = architecture_lib.for_model_type(config_or_model_type)
    else:
      arch = architecture_lib.for_config(config_or_model_type)
  except architecture_lib.UnknownArchitecture as e:
    raise HFFormatError(str(e)) from None
  if arch.hf is None:
    raise HFFormatError(f"architecture {arch.name!r} has no Hugging Face names")
  return arch


def architecture_for(config_or_model_type: Any) -> HFArchitecture:
  """The `HFArchitecture` (Hugging Face names) of `family_for(config_or_model_type)`."""
  return family_for(config_or_model_type).hf


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


def scheme_format(w: QArgs, a: QArgs | None) -> str:
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
