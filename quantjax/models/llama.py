"""The Llama family: a preset of the shared decoder (`quantjax.models.decoder`).

Covers Llama 1/2/3-style checkpoints without RoPE scaling (SmolLM2 among them):
RMSNorm, rotary embeddings with the model's theta (the "rotate half" layout
that Hugging Face uses), grouped-query attention, a SwiGLU MLP and tied or
untied embeddings. `LlamaConfig.switches()` is the preset; the model
(`Llama`, the decoder's `CausalLM`) and its functions are the decoder's.

Weights are stored Flax-style, `[in, out]`, so a parameter tree reads

    embed/embedding                      [vocab, d]
    layers/{i}/input_norm/scale          [d]
    layers/{i}/attn/{q,k,v,o}_proj/kernel
    layers/{i}/pre_mlp_norm/scale        [d]   (called post_attn_norm before; renamed on load)
    layers/{i}/mlp/{gate,up,down}_proj/kernel
    final_norm/scale                     [d]
    lm_head/kernel                       [d, vocab]   (untied models only)

and quantization rules are plain regexes over those paths. Any kernel may be
a `QArray`: the model never looks inside a weight, it hands it to `qdot`.

Two ways to call it:

* stateful: `model = Llama(config, rngs=nnx.Rngs(0)); logits = model(tokens)`;
* functional, for jit and for parameter trees produced by transforms:
  `logits = forward(config, params, tokens)` where `params` is an
  `nnx.State` (or the equivalent pure dict) that may hold `QArray` leaves.
  `forward` is jitted with the config static, so it compiles once per
  parameter structure (formats, shapes) and input shape.

`ARCHITECTURE` is the family as the file formats see it (data, registered with
`quantjax.io.architecture`): the Hugging Face checkpoint names and
`config.json` map (`LlamaForCausalLM`; `model_type` llama, mistral, smollm),
llama.cpp's GGUF tensor names (`GGUF_LAYER_NAMES`, `GGUF_TOP_NAMES`,
`GGUF_IGNORED_NAMES`) and the Q/K rows its converter permutes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Mapping


from quantjax.io import architecture as architecture_lib
from quantjax.io.hf import HFArchitecture, TensorSpec, decoder_tensors
from quantjax.methods.fold import FoldGroup
from quantjax.methods.rotation import HeadRotation, ResidualRotation, RotationTable
from quantjax.models import decoder as decoder_lib

__all__ = [
    "ARCHITECTURE",
    "GGUF_IGNORED_NAMES",
    "GGUF_LAYER_NAMES",
    "GGUF_TOP_NAMES",
    "PROJ_KERNELS",
    "AWQ_NO_CLIP",
    "LlamaConfig",
    "Llama",
    "KVCache",
    "abstract_state",
    "as_state",
    "cached_step",
    "forward",
    "graphdef",
    "generate",
    "init_cache",
    "model_from_params",
    "decoder",
    "block_inputs",
    "block_api",
    "forward_fn",
    "loss_fn",
    "fold_groups",
    "foldable",
    "rotation_table",
]

# Every projection kernel of a block: the weights methods compare on (the
# embedding / tied head and the norms stay float unless a rule says otherwise).
PROJ_KERNELS = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"
# The reference AWQ does not clip q and k (their error acts through the attention scores).
AWQ_NO_CLIP = r"layers/\d+/attn/(q|k)_proj/kernel"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder.

  Attributes:
    vocab_size: number of token embeddings.
    hidden_size: model width `d`.
    intermediate_size: MLP width.
    num_layers: number of decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when smaller).
    head_dim: width of one head.
    rope_theta: RoPE base frequency.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: the output head reuses `embed/embedding`.
    max_position_embeddings: longest sequence the model was trained on.
    bos_token_id / eos_token_id: special tokens, when known.
    dtype: activation (compute) dtype, e.g. "float32" or "bfloat16". Norms,
      RoPE, softmax and the returned logits are always float32.
    name: a label for reports.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  dtype: str = "float32"
  name: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def switches(self) -> decoder_lib.Switches:
    """The decoder preset: SwiGLU, pre-norms only, Hugging Face's LlamaRMSNorm rounding,
    every layer global with one RoPE base."""
    return decoder_lib.Switches(activation="silu", attn_scale=1.0 / math.sqrt(self.head_dim),
                                rope_theta=self.rope_theta)

  @classmethod
  def from_hf(cls, hf: Any, name: str = "llama") -> "LlamaConfig":
    """From a `transformers.LlamaConfig` or the dict of a `config.json`."""
    d = hf if isinstance(hf, Mapping) else hf.to_dict()
    arch = d.get("model_type", "llama")
    if arch not in ("llama", "smollm", "smollm2", "mistral"):
      raise ValueError(f"unsupported architecture {arch!r}: quantjax.models.llama covers "
                       "Llama-family decoders (model_type 'llama')")
    scaling = d.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
      raise ValueError(f"unsupported rope_scaling {scaling!r}; only plain RoPE is implemented")
    if d.get("attention_bias") or d.get("mlp_bias"):
      raise ValueError("unsupported: attention_bias / mlp_bias (Llama uses none)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"unsupported hidden_act {act!r}; Llama uses 'silu'")
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    theta = d.get("rope_theta")
    if theta is None:
      theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = d.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
      eos = eos[0] if eos else None
    return cls(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        name=d.get("_name_or_path") or name,
    )

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int | None = None,
                         tie_embeddings: bool = True) -> "LlamaConfig":
    """From GGUF key/values (`general.architecture` must be "llama")."""
    arch = meta.get("general.architecture")
    if arch != "llama":
      raise ValueError(f"unsupported GGUF architecture {arch!r}; expected 'llama'")

    def get(key, default=None):
      full = f"llama.{key}"
      if full in meta:
        return meta[full]
      if default is None:
        raise ValueError(f"GGUF metadata lacks {full!r}")
      return default

    d = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count",
                                                                    d // heads)))
    if "llama.rope.scaling.type" in meta and meta["llama.rope.scaling.type"] not in ("none",):
      raise ValueError(f"unsupported RoPE scaling {meta['llama.rope.scaling.type']!r}")
    if vocab_size is None:
      vocab_size = meta.get("llama.vocab_size")
      if vocab_size is None:
        vocab_size = len(meta["tokenizer.ggml.tokens"])
    name = meta.get("general.name", "llama")
    return cls(
        vocab_size=int(vocab_size),
        hidden_size=d,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tie_embeddings,
        max_position_embeddings=int(get("context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        name=str(name),
    )


# ----------------------------------------------------------------------------
# The model and its functional API: the shared decoder with this preset.

Llama = decoder_lib.CausalLM
KVCache = decoder_lib.KVCache
graphdef, abstract_state, as_state, model_from_params = (
    decoder_lib.graphdef, decoder_lib.abstract_state, decoder_lib.as_state,
    decoder_lib.model_from_params)
block_api, block_inputs = decoder_lib.block_api, decoder_lib.block_inputs
forward, init_cache, generate, decoder = (decoder_lib.forward, decoder_lib.init_cache,
                                          decoder_lib.generate, decoder_lib.decoder)
cached_step = decoder_lib.cached_step
forward_fn, loss_fn = decoder_lib.forward_fn, decoder_lib.loss_fn
fold_groups, foldable = decoder_lib.fold_groups, decoder_lib.foldable


# ----------------------------------------------------------------------------
# What calibrated methods need to know about this architecture (data only).


def rotation_table(config: LlamaConfig, *, prefix: str = "layers"):
  """Where the residual stream is read and written, for `methods.rotation.rotate`.

  R1: `input_norm` feeds q/k/v, `pre_mlp_norm`
  feeds gate/up, `final_norm` feeds the head; the embedding, `o_proj` and
  `down_proj` write the stream. A tied head is untied into `lm_head/kernel`
  (use `config.replace(tie_embeddings=False)` for the result). R2: each
  layer's `v_proj` columns and `o_proj` rows, per head of `head_dim`.
  """
  n = config.num_layers
  lay = [f"{prefix}/{i}" for i in range(n)]
  head = "lm_head/kernel"
  norms, readers, writers = [], [], []
  for p in lay:
    qkv = tuple(f"{p}/attn/{x}_proj/kernel" for x in ("q", "k", "v"))
    gu = tuple(f"{p}/mlp/{x}_proj/kernel" for x in ("gate", "up"))
    norms += [FoldGroup(f"{p}/input_norm/scale", qkv), FoldGroup(f"{p}/pre_mlp_norm/scale", gu)]
    readers += [*qkv, *gu]
    writers += [f"{p}/attn/o_proj/kernel", f"{p}/mlp/down_proj/kernel"]
  norms.append(FoldGroup("final_norm/scale", (head,)))
  readers.append(head)
  residual = ResidualRotation(
      width=config.hidden_size, norms=tuple(norms), embeddings=("embed/embedding",),
      readers=tuple(readers), writers=tuple(writers),
      untie=("embed/embedding", head) if config.tie_embeddings else None)
  heads = HeadRotation(
      pairs=tuple((f"{p}/attn/v_proj/kernel", f"{p}/attn/o_proj/kernel") for p in lay),
      head_dim=config.head_dim, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
  return RotationTable(residual, heads)


# ----------------------------------------------------------------------------
# The architecture record: what the file formats (`quantjax.io`) know of the family.


def _hf_config(cfg: LlamaConfig) -> dict:
  """`config.json` of a `LlamaForCausalLM` (no quantization_config)."""
  d = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      "pretraining_tp": 1,
  }
  if cfg.bos_token_id is not None:
    d["bos_token_id"] = int(cfg.bos_token_id)
  if cfg.eos_token_id is not None:
    d["eos_token_id"] = int(cfg.eos_token_id)
  return d


def _hf_tensors(cfg: LlamaConfig) -> list[TensorSpec]:
  """The Hugging Face checkpoint's tensors (`model.layers.3.self_attn.q_proj.weight`, ...)."""
  d = cfg.hidden_size
  return decoder_tensors(cfg, ([("input_layernorm.weight", ("input_norm", "scale"), d)],
                               [("post_attention_layernorm.weight", ("pre_mlp_norm", "scale"), d)],
                               []))


# llama.cpp's GGUF tensor names -> params paths (per block `blk.{i}.` / top level).
GGUF_LAYER_NAMES = {
    "attn_norm.weight": ("input_norm", "scale"),
    "ffn_norm.weight": ("pre_mlp_norm", "scale"),
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


def _gguf_metadata(cfg: LlamaConfig, w, gguf) -> None:
  """llama.cpp's "llama" keys beyond the common ones (`GGUFNames.write_metadata`)."""
  del gguf
  w.add_rope_dimension_count(int(cfg.head_dim))
  if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    w.add_key_length(int(cfg.head_dim))
    w.add_value_length(int(cfg.head_dim))
  w.add_vocab_size(int(cfg.vocab_size))


def _config_from_gguf(meta: Mapping[str, Any], vocab_size: int, tie_embeddings: bool,
                      source: str) -> LlamaConfig:
  return LlamaConfig.from_gguf_metadata(meta, vocab_size=vocab_size,
                                        tie_embeddings=tie_embeddings)


ARCHITECTURE = architecture_lib.Architecture(
    name="llama", config_type=LlamaConfig, model=Llama, module=sys.modules[__name__],
    abstract_state=abstract_state,
    as_state=as_state,
    hf=HFArchitecture(
        model_types=("llama", "mistral", "smollm", "smollm2"), hf_class="LlamaForCausalLM",
        to_hf_config=_hf_config,
        from_hf_config=lambda d, name, source: LlamaConfig.from_hf(d, name=name),
        tensors=_hf_tensors,
        ignorable=(r".*rotary_emb\.inv_freq", r"lm_head\.weight")),
    # llama.cpp permutes Q/K rows at conversion (its RoPE rotates interleaved pairs)
    gguf=architecture_lib.GGUFNames(
        arch="llama", layer=GGUF_LAYER_NAMES, top=GGUF_TOP_NAMES,
        config_from_metadata=_config_from_gguf,
        qk_heads={"attn_q.weight": "num_heads", "attn_k.weight": "num_kv_heads"},
        ignored=GGUF_IGNORED_NAMES, write_metadata=_gguf_metadata),
    fold_groups=fold_groups, rotation_table=rotation_table)
architecture_lib.register(ARCHITECTURE)
