"""A Llama-family decoder in Flax NNX whose every Linear goes through `ops.qdot`.

Covers Llama 1/2/3-style checkpoints without RoPE scaling (SmolLM2 among them):
RMSNorm, rotary embeddings with the model's theta (the "rotate half" layout
that Hugging Face uses), grouped-query attention, a SwiGLU MLP and tied or
untied embeddings.

Weights are stored Flax-style, `[in, out]`, so a parameter tree reads

    embed/embedding                      [vocab, d]
    layers/{i}/input_norm/scale          [d]
    layers/{i}/attn/{q,k,v,o}_proj/kernel
    layers/{i}/post_attn_norm/scale      [d]
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
import functools
import math
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quantjax import ops
from quantjax.io import architecture as architecture_lib
from quantjax.io.hf import HFArchitecture, TensorSpec, decoder_tensors
from quantjax.kernels import dispatch
from quantjax.methods.fold import FoldGroup
from quantjax.methods.rotation import HeadRotation, ResidualRotation, RotationTable
from quantjax.models import functional
from quantjax.numerics.qarray import QArray

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


def _qdot(x, w, contract_axis: int = 0):
  # Every matmul goes through quantjax.ops.qdot.
  return ops.qdot(x, w, contract_axis=contract_axis)


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
# Building blocks.


def _normal(rngs: nnx.Rngs, shape, std=0.02):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
  """`y = x @ kernel` with `kernel` `[in, out]`, an array or a `QArray`."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_normal(rngs, (din, dout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return _qdot(x, self.kernel.get_value())


class Embed(nnx.Module):
  """Token embedding `[vocab, d]`; `attend` uses it as a tied output head."""

  def __init__(self, vocab: int, d: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (vocab, d)))

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    table = self.embedding.get_value()
    if isinstance(table, QArray):
      rows = table[ids]  # QArray indexing dequantizes the gathered rows only.
    else:
      rows = jnp.take(jnp.asarray(table), ids, axis=0)
    return jnp.asarray(rows).astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return _qdot(x, self.embedding.get_value(), contract_axis=1)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, like Hugging Face's LlamaRMSNorm."""

  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(var + self.eps)
    scale = jnp.asarray(self.scale.get_value()).astype(jnp.float32)
    return (scale * xf.astype(dtype).astype(jnp.float32)).astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos/sin `[..., T, head_dim]` in float32 for integer `positions` `[..., T]`."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                              / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x `[B, T, H, D]`; cos/sin `[B, T, D]` ("rotate half" layout)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return (xf * c + rot * s).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values for every layer: `k`, `v` `[L, B, S_max, H_kv, D]`."""

  k: jax.Array
  v: jax.Array


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, h, hk, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(d, h * hd, rngs=rngs)
    self.k_proj = Linear(d, hk * hd, rngs=rngs)
    self.v_proj = Linear(d, hk * hd, rngs=rngs)
    self.o_proj = Linear(h * hd, d, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, hk, hd

  def __call__(self, x, cos, sin, mask, cache_kv=None, index=None):
    b, t, _ = x.shape
    h, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_proj(x).reshape(b, t, h, hd)
    k = self.k_proj(x).reshape(b, t, hk, hd)
    v = self.v_proj(x).reshape(b, t, hk, hd)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    new_kv = None
    if cache_kv is not None:
      # The whole cache `[L, B, S, H_kv, D]` and this block's layer: the new
      # keys / values are written into it in place (XLA updates the donated
      # buffer), and attention reads this layer's slice. Writing into a
      # per-layer slice and stacking the layers again copied the cache twice
      # per step.
      ck, cv, layer = cache_kv
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (layer, 0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (layer, 0, index, 0, 0))
      k, v = ck[layer], cv[layer]
      new_kv = (ck, cv)
    out = functional.attend(q, k, v, mask, scale=1.0 / math.sqrt(hd))
    return self.o_proj(out), new_kv


class MLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache_kv=None, index=None):
    a, new_kv = self.attn(self.input_norm(x), cos, sin, mask, cache_kv, index)
    x = x + a
    x = x + self.mlp(self.post_attn_norm(x))
    return x, new_kv


def block_inputs(config: LlamaConfig, positions: jax.Array, kv_len: int, *,
                 causal: bool = False):
  """What every `Block` takes beside the hidden states: RoPE `cos`, `sin`
  `[B, T, head_dim]` (float32) and the causal mask `[B, T, kv_len]` for integer
  `positions` `[B, T]`, or `functional.Causal()` with `causal=True` (positions
  `0..T-1` and no cache: the attention then skips the masked keys).
  `Llama.hidden_states` and layer-by-layer drivers (`quantjax.streaming`)
  share it, so both compute the same numbers."""
  cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
  if causal:
    return cos, sin, functional.Causal()
  kpos = jnp.arange(kv_len)
  mask = kpos[None, None, :] <= positions[:, :, None]  # [B, T, S]
  return cos, sin, mask


class Llama(nnx.Module):
  """Llama-family causal language model.

  Call with `tokens` `[B, T]` (int) to get float32 logits `[B, T, vocab]`.
  With a `KVCache` and `index` (the position of `tokens[:, 0]`), returns
  `(logits, new_cache)`.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    if not config.tie_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, rngs=rngs)

  def hidden_states(self, tokens, cache: KVCache | None = None, index=None,
                    positions=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    if index is None:
      index = 0
    default_positions = positions is None
    if positions is None:
      positions = index + jnp.arange(t, dtype=jnp.int32)[None, :]
      positions = jnp.broadcast_to(positions, (b, t))
    cos, sin, mask = block_inputs(cfg, positions, t if cache is None else cache.k.shape[2],
                                  causal=cache is None and default_positions)
    x = self.embed(tokens, dtype)
    ck = cv = None
    if cache is not None:
      ck, cv = cache.k, cache.v
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (ck, cv, i)
      x, nkv = layer(x, cos, sin, mask, kv, index)
      if nkv is not None:
        ck, cv = nkv
    x = self.final_norm(x)
    new_cache = None if cache is None else KVCache(ck, cv)
    return x, new_cache

  def logits(self, x):
    if self.config.tie_embeddings:
      out = self.embed.attend(x)
    else:
      out = self.lm_head(x)
    return out.astype(jnp.float32)

  def __call__(self, tokens, cache: KVCache | None = None, index=None):
    x, new_cache = self.hidden_states(tokens, cache, index)
    logits = self.logits(x)
    if cache is None:
      return logits
    return logits, new_cache


# ----------------------------------------------------------------------------
# Functional API.


graphdef, abstract_state, as_state, model_from_params = functional.model_api(Llama)
# The same four functions for one decoder block (`Block(config, rngs=)`): its params
# are `input_norm/scale`, `attn/{q,k,v,o}_proj/kernel`, `post_attn_norm/scale`,
# `mlp/{gate,up,down}_proj/kernel`, i.e. `layers/{i}/...` of the model without the prefix.
block_api = functional.model_api(Block)


@dispatch.routed_jit(static_argnums=0)
def _forward(config, params, tokens):
  model = nnx.merge(graphdef(config), params)
  return model(tokens)


def forward(config: LlamaConfig, params: Any, tokens: jax.Array) -> jax.Array:
  """Jitted logits `[B, T, vocab]` (float32) for `tokens` `[B, T]`.

  `params` is an `nnx.State` or pure dict whose leaves may be `QArray`s; the
  function compiles once per (config, parameter structure, token shape).
  """
  return _forward(config, as_state(config, params), jnp.asarray(tokens, jnp.int32))


# ----------------------------------------------------------------------------
# Generation with a KV cache.


def init_cache(config: LlamaConfig, batch: int, max_len: int) -> KVCache:
  dtype = jnp.dtype(config.dtype)
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@dispatch.routed_jit(static_argnums=0, donate_argnums=3)
def _step(config, params, tokens, cache, index):
  model = nnx.merge(graphdef(config), params)
  x, cache = model.hidden_states(tokens, cache, index)
  logits = model.logits(x[:, -1:, :])[:, 0, :]
  return logits, cache


def decoder(config: LlamaConfig) -> functional.Decoder:
  """`(init_cache(batch, max_len), step(params, tokens, cache, index), decode(params,
  logits, cache, index, n))` for `quantjax.eval.speed.prefill_decode`: `step`
  returns the last position's logits `[B, V]` and the updated cache; `decode`
  runs `n` greedy steps in one jitted loop (`functional.decode_tokens`)."""
  return functional.make_decoder(_step, init_cache, as_state, config)


def generate(config: LlamaConfig, params: Any, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             eos_token_id: int | None = None) -> np.ndarray:
  """Autoregressive decoding with a KV cache.

  Args:
    config: the model config.
    params: `nnx.State` / pure dict (may hold QArrays).
    prompt: `[B, T]` (or `[T]`) token ids; all rows the same length.
    max_new_tokens: tokens to append.
    temperature: 0 for greedy, else sampling temperature.
    top_k: optional top-k filter for sampling.
    seed: PRNG seed for sampling.
    eos_token_id: stop early once every row has produced it.

  Returns:
    `[B, T + n]` int32 numpy array (prompt followed by the generated tokens).
  """
  return functional.generate_loop(functools.partial(_step, config),
                                  functools.partial(init_cache, config),
                                  as_state(config, params), prompt, max_new_tokens,
                                  temperature=temperature, top_k=top_k, seed=seed,
                                  eos_token_id=eos_token_id)


# ----------------------------------------------------------------------------
# What calibrated methods need to know about this architecture (data only).


def forward_fn(config: LlamaConfig):
  """`forward(params, tokens) -> logits`: what `methods.calibrate` captures and
  `eval.perplexity.evaluate` scores (params: pure dict or `nnx.State`)."""
  def fn(params, tokens):
    return forward(config, params, tokens)
  return fn


def loss_fn(config: LlamaConfig):
  """`loss(params, tokens) -> mean next-token NLL` (float32), e.g. for the Fisher
  sensitivity of `methods.mixed.fisher_diagonal`."""
  def loss(params, tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    logits = forward(config, params, tokens)[:, :-1].astype(jnp.float32)
    tgt = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(lse - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0])
  return loss


def fold_groups(config: LlamaConfig, *, prefix: str = "layers", up_to_down: bool = True,
                v_to_o: bool = True) -> list:
  """The producer of each projection's input, for `methods.fold.fold_input_scales`.

  input_norm -> q/k/v and post_attn_norm -> gate/up always; up_proj ->
  down_proj (SwiGLU multiplies up's output into down's input, so its columns
  absorb the scales); v_proj -> o_proj only without grouped-query attention
  (with it, one v head feeds several o inputs and scales per o input cannot
  fold: o_proj keeps its `InputScaled` leaf).
  """
  return functional.decoder_fold_groups(config, mlp_norm="post_attn_norm", prefix=prefix,
                                        up_to_down=up_to_down, v_to_o=v_to_o)


def foldable(config: LlamaConfig, **kw) -> str:
  """Regex of the projections whose input scales `fold_groups` can absorb."""
  return functional.consumers_regex(fold_groups(config, **kw))


def rotation_table(config: LlamaConfig, *, prefix: str = "layers"):
  """Where the residual stream is read and written, for `methods.rotation.rotate`.

  R1: `input_norm` feeds q/k/v, `post_attn_norm` (the norm before the MLP)
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
    norms += [FoldGroup(f"{p}/input_norm/scale", qkv), FoldGroup(f"{p}/post_attn_norm/scale", gu)]
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
                               [("post_attention_layernorm.weight", ("post_attn_norm", "scale"), d)],
                               []))


# llama.cpp's GGUF tensor names -> params paths (per block `blk.{i}.` / top level).
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
