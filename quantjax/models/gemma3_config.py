"""The Gemma 3 text decoder's configuration: `Gemma3Config` (checked on construction,
read from a Hugging Face `config.json` or GGUF metadata) and its layer types."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from quantjax.models.decoder import Switches

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
_LAYER_TYPES = (SLIDING, GLOBAL)


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Every `pattern`-th layer global, the rest sliding (Gemma 3: 5 local, 1 global)."""
  if pattern < 1:
    raise ValueError(f"sliding_window_pattern must be >= 1, got {pattern}")
  return tuple(GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Architecture of a Gemma 3 text decoder.

  Attributes:
    vocab_size: number of token embeddings.
    hidden_size: model width `d`.
    intermediate_size: MLP width.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when smaller).
    head_dim: width of one head (independent of `hidden_size / num_heads`).
    layer_types: per layer, "sliding_attention" or "full_attention"
      (default: every sixth layer global).
    sliding_window: keys a sliding layer's query sees, itself included
      (`0 <= q - k < sliding_window`); None makes every layer global.
    rope_theta: RoPE base of the global layers.
    rope_local_theta: RoPE base of the sliding layers.
    rope_scaling_factor: linear RoPE scaling of the global layers (1: none).
    query_pre_attn_scalar: scores are multiplied by its inverse square root.
    attn_logit_softcapping: `cap * tanh(scores / cap)` on the attention scores
      when set (Gemma 2's; transformers' and llama.cpp's Gemma 3 never apply
      it, so the loaders leave it None).
    final_logit_softcapping: `cap * tanh(logits / cap)` when set.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: the output head reuses `embed/embedding`.
    max_position_embeddings: longest sequence the model was trained on.
    bos_token_id / eos_token_id / pad_token_id: special tokens.
    dtype: activation dtype ("float32", "bfloat16"); norms, RoPE, softmax and
      the returned logits are float32.
    name: a label for reports.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = 512
  rope_theta: float = 1_000_000.0
  rope_local_theta: float = 10_000.0
  rope_scaling_factor: float = 1.0
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_position_embeddings: int = 32768
  bos_token_id: int | None = 2
  eos_token_id: int | None = 1
  pad_token_id: int | None = 0
  dtype: str = "float32"
  name: str = "gemma3"

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"Gemma3Config.{f} must be a positive integer, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Gemma3Config: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"Gemma3Config.head_dim={self.head_dim} is odd; RoPE rotates pairs of "
                       "dimensions")
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", default_layer_types(self.num_layers))
    else:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"Gemma3Config.layer_types has {len(self.layer_types)} entries for "
                       f"num_layers={self.num_layers}")
    bad = sorted(set(self.layer_types) - set(_LAYER_TYPES))
    if bad:
      raise ValueError(f"Gemma3Config.layer_types: unknown {bad}; expected {_LAYER_TYPES}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"Gemma3Config.sliding_window must be >= 1 or None, got "
                       f"{self.sliding_window}")
    if self.query_pre_attn_scalar <= 0:
      raise ValueError(f"Gemma3Config.query_pre_attn_scalar must be > 0, got "
                       f"{self.query_pre_attn_scalar}")
    if self.rope_scaling_factor <= 0:
      raise ValueError(f"Gemma3Config.rope_scaling_factor must be > 0, got "
                       f"{self.rope_scaling_factor}")

  def replace(self, **kw) -> "Gemma3Config":
    return dataclasses.replace(self, **kw)

  def switches(self):
    """The decoder preset (`quantjax.models.decoder.Switches`): GeGLU, QK-norm, sandwich
    norms multiplied in float32, the embedding times sqrt(d), sliding and global layers
    with their RoPE bases, the query scale and the soft-caps."""
    n = self.num_layers
    return Switches(activation="gelu_tanh", qk_norm=True, post_norms=True,
                    norm_in_float32=True, embed_scale=True,
                    attn_scale=float(self.query_pre_attn_scalar) ** -0.5,
                    attn_softcap=self.attn_logit_softcapping,
                    final_softcap=self.final_logit_softcapping,
                    rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_factor,
                    rope_local_theta=self.rope_local_theta,
                    local_rope=tuple(t == SLIDING for t in self.layer_types),
                    sliding=tuple(self.is_sliding(i) for i in range(n)),
                    window=self.sliding_window)

  def is_sliding(self, i: int) -> bool:
    """Whether layer `i` uses the sliding window."""
    return self.sliding_window is not None and self.layer_types[i] == SLIDING

  @property
  def sliding_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_sliding(i))

  @property
  def global_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if not self.is_sliding(i))

  @classmethod
  def from_hf(cls, hf: Any, name: str = "gemma3", source: str = "config") -> "Gemma3Config":
    """From a `transformers.Gemma3TextConfig` or the dict of its `config.json`.

    `source` names the file in error messages.
    """
    d = hf if isinstance(hf, Mapping) else hf.to_dict()
    arch = d.get("model_type")
    if arch == "gemma3" and "text_config" in d:
      raise ValueError(f"{source}: model_type 'gemma3' is the multimodal Gemma 3; "
                       "quantjax.models.gemma3 loads the text decoder (model_type 'gemma3_text')")
    if arch != "gemma3_text":
      raise ValueError(f"{source}: unsupported model_type {arch!r}; quantjax.models.gemma3 "
                       "loads 'gemma3_text'")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
      raise ValueError(f"{source}: hidden_activation {act!r} is not Gemma 3's tanh GELU "
                       "('gelu_pytorch_tanh')")
    if d.get("attention_bias"):
      raise ValueError(f"{source}: attention_bias=True is not supported (Gemma 3 has none)")
    if d.get("use_bidirectional_attention"):
      raise ValueError(f"{source}: use_bidirectional_attention=True (an encoder) is not "
                       "supported")
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim")
    if head_dim is None:
      if hidden % heads:
        raise ValueError(f"{source}: no head_dim, and hidden_size={hidden} is not a multiple "
                         f"of num_attention_heads={heads}")
      head_dim = hidden // heads
    head_dim = int(head_dim)
    if head_dim <= 0 or head_dim % 2:
      raise ValueError(f"{source}: head_dim={head_dim} must be a positive even number (RoPE)")
    # Rope: transformers 5 nests it per layer type; older configs are flat.
    rp = d.get("rope_parameters") or {}
    full = rp.get(GLOBAL) or {}
    local = rp.get(SLIDING) or {}
    theta = full.get("rope_theta", d.get("rope_theta", 1_000_000.0))
    local_theta = local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    scaling = dict(d.get("rope_scaling") or {})
    if full.get("rope_type", "default") != "default":
      scaling = full
    factor = 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default"):
      if kind != "linear":
        raise ValueError(f"{source}: unsupported RoPE scaling {kind!r}; Gemma 3 uses 'linear'")
      factor = float(scaling["factor"])
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"{source}: RoPE scaling on sliding layers is not supported")
    layers = int(d["num_hidden_layers"])
    types = d.get("layer_types")
    if types is None:
      pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
      types = default_layer_types(layers, int(pattern))
    eos = d.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
      eos = eos[0] if eos else None
    cap_a, cap_f = d.get("attn_logit_softcapping"), d.get("final_logit_softcapping")
    if cap_a is not None:
      # transformers' Gemma3Attention never applies it (Gemma 2 did), nor does
      # llama.cpp's gemma3: load what they run.
      logging.getLogger("quantjax").warning(
          "%s: attn_logit_softcapping=%s is ignored, as transformers' and llama.cpp's Gemma 3 "
          "ignore it (set Gemma3Config.attn_logit_softcapping to apply it)", source, cap_a)
      cap_a = None
    try:
      return cls(
          vocab_size=int(d["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(d["intermediate_size"]),
          num_layers=layers,
          num_heads=heads,
          num_kv_heads=int(d.get("num_key_value_heads") or heads),
          head_dim=head_dim,
          layer_types=tuple(types),
          sliding_window=None if d.get("sliding_window") is None else int(d["sliding_window"]),
          rope_theta=float(theta),
          rope_local_theta=float(local_theta),
          rope_scaling_factor=factor,
          query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
          attn_logit_softcapping=None if cap_a is None else float(cap_a),
          final_logit_softcapping=None if cap_f is None else float(cap_f),
          rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
          tie_embeddings=bool(d.get("tie_word_embeddings", True)),
          max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
          bos_token_id=d.get("bos_token_id"),
          eos_token_id=eos,
          pad_token_id=d.get("pad_token_id"),
          name=d.get("_name_or_path") or name,
      )
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int | None = None,
                         tie_embeddings: bool = True, source: str = "GGUF") -> "Gemma3Config":
    """From GGUF key/values (`general.architecture` "gemma3").

    Mirrors what llama.cpp reads: the global RoPE base from
    `gemma3.rope.freq_base`, the sliding layers' base fixed at 10,000, every
    sixth layer global, queries scaled by `key_length ** -0.5` (by
    `(d / heads) ** -0.5` for the 62-layer 27B model), and sliding attention
    only when `gemma3.attention.sliding_window` is set.

    Raises:
      ValueError: a required key is missing, or the head dimension is
        inconsistent (`key_length` != `value_length`, a `rope.dimension_count`
        that differs, or an odd / undivisible width); the message names the key
        and `source`.
    """
    arch = meta.get("general.architecture")
    if arch != "gemma3":
      raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; expected 'gemma3'")

    def get(key, default=None, required=True):
      full = f"gemma3.{key}"
      if full in meta:
        return meta[full]
      if required and default is None:
        raise ValueError(f"{source}: GGUF metadata lacks {full!r}")
      return default

    d = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    key_len = get("attention.key_length", required=False)
    val_len = get("attention.value_length", required=False)
    if key_len is None:
      if d % heads:
        raise ValueError(f"{source}: no gemma3.attention.key_length, and embedding_length={d} "
                         f"is not a multiple of attention.head_count={heads}")
      key_len = d // heads
    key_len = int(key_len)
    if val_len is not None and int(val_len) != key_len:
      raise ValueError(f"{source}: inconsistent head dimension: gemma3.attention.key_length="
                       f"{key_len} but gemma3.attention.value_length={int(val_len)}")
    rope_dim = get("rope.dimension_count", required=False)
    if rope_dim is not None and int(rope_dim) != key_len:
      raise ValueError(f"{source}: inconsistent head dimension: gemma3.rope.dimension_count="
                       f"{int(rope_dim)} but gemma3.attention.key_length={key_len} (Gemma 3 "
                       "rotates whole heads)")
    if key_len % 2:
      raise ValueError(f"{source}: gemma3.attention.key_length={key_len} is odd (RoPE rotates "
                       "pairs)")
    window = get("attention.sliding_window", required=False)
    window = int(window) if window else None
    pattern = get("attention.sliding_window_pattern", required=False)
    if pattern is None:
      types = default_layer_types(n_layers)
    elif isinstance(pattern, (list, tuple)):
      if len(pattern) != n_layers:
        raise ValueError(f"{source}: gemma3.attention.sliding_window_pattern has {len(pattern)} "
                         f"entries for block_count={n_layers}")
      types = tuple(SLIDING if p else GLOBAL for p in pattern)
    else:
      types = default_layer_types(n_layers, int(pattern))
    factor = 1.0
    stype = get("rope.scaling.type", required=False)
    if stype not in (None, "none"):
      if stype != "linear":
        raise ValueError(f"{source}: unsupported gemma3.rope.scaling.type {stype!r}")
      factor = float(get("rope.scaling.factor"))
    if vocab_size is None:
      vocab_size = get("vocab_size", required=False) or len(meta["tokenizer.ggml.tokens"])
    scalar = float(d // heads) if n_layers == 62 else float(key_len)
    cap_f = get("final_logit_softcapping", required=False)
    return cls(
        vocab_size=int(vocab_size),
        hidden_size=d,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=key_len,
        layer_types=types,
        sliding_window=window,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=10_000.0,
        rope_scaling_factor=factor,
        query_pre_attn_scalar=scalar,
        final_logit_softcapping=float(cap_f) if cap_f else None,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_embeddings=tie_embeddings,
        max_position_embeddings=int(get("context_length", 32768)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        name=str(meta.get("general.name", "gemma3")),
    )
