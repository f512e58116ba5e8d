"""One decoder for quantjax's language models; Llama and Gemma 3 are presets of it.

A pre-norm transformer decoder in Flax NNX whose every matmul goes through
`ops.qdot` (so any kernel may be a `QArray`). What differs between families is
a set of switches, `Switches`, that a config hands over with `switches()`:

* the MLP's gate activation (SwiGLU's SiLU, GeGLU's tanh-approximated GELU);
* RMSNorms on each query and key head before RoPE (QK-norm);
* "sandwich" norms on each sublayer's output before it joins the residual
  stream (`post_attn_norm`, `post_mlp_norm`);
* where the RMSNorm rounds: Hugging Face's `LlamaRMSNorm` casts the normalized
  activations to the compute dtype before the scale, Gemma multiplies in
  float32 (the same numbers in float32);
* the embedding multiplied by `sqrt(d)` (rounded to the table's dtype first);
* the attention score scale and optional tanh soft-caps of the scores and of
  the final logits;
* per layer, sliding-window or full attention and the local or global RoPE
  base (the global one optionally with linear scaling).

Parameter paths mean one thing in every family (kernels `[in, out]`):

    embed/embedding                              [vocab, d]
    layers/{i}/input_norm/scale                  [d]   (before attention)
    layers/{i}/attn/{q,k,v,o}_proj/kernel
    layers/{i}/attn/{q,k}_norm/scale             [head_dim]   (QK-norm only)
    layers/{i}/post_attn_norm/scale              [d]   (on the attention output; sandwich only)
    layers/{i}/pre_mlp_norm/scale                [d]   (before the MLP)
    layers/{i}/mlp/{gate,up,down}_proj/kernel
    layers/{i}/post_mlp_norm/scale               [d]   (on the MLP output; sandwich only)
    final_norm/scale                             [d]
    lm_head/kernel                               [d, vocab]   (untied only)

Norm scales are the multiplier itself (Gemma's `1 + w` is stored as such), so
every norm is an ordinary per-channel scale that methods fold into.
Parameter trees written before the names were unified called Llama's
`pre_mlp_norm` `post_attn_norm`; `as_state` (so `forward` and every function
here) renames it for a config without sandwich norms (`rename_legacy`).

One KV cache (`KVCache`): full-attention layers keep every position and are
written in place; sliding layers keep a ring of `window` slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quantjax import ops
from quantjax.kernels import dispatch
from quantjax.methods.fold import FoldGroup
from quantjax.models import functional
from quantjax.numerics.qarray import QArray

__all__ = [
    "Attention", "Block", "CausalLM", "Embed", "KVCache", "Linear", "MLP", "RMSNorm",
    "Switches", "abstract_state", "apply_rope", "as_state", "block_api", "block_inputs",
    "cached_step", "decoder", "fold_groups", "foldable", "forward", "forward_fn", "generate",
    "graphdef", "init_cache", "loss_fn", "model_from_params", "rename_legacy", "rope_tables",
    "step", "token_nll", "window_nll_fn",
]

_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class Switches:
  """What sets one decoder family apart (a config's `switches()`; see the module docstring).

  Attributes:
    activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    qk_norm: RMSNorm on each query and key head before RoPE.
    post_norms: RMSNorm on each sublayer's output before the residual add.
    norm_in_float32: multiply the norm scale in float32 (Gemma); otherwise the
      normalized activations are cast to the compute dtype first (Llama).
    embed_scale: multiply embeddings by `sqrt(d)`.
    attn_scale: the attention scores' scale.
    attn_softcap / final_softcap: `cap * tanh(x / cap)` on the scores / logits.
    rope_theta / rope_scaling: RoPE base and linear scaling of the global layers.
    rope_local_theta: RoPE base of the layers marked in `local_rope`.
    local_rope: per layer, whether it uses `rope_local_theta` (empty: none).
    sliding: per layer, whether it attends through a sliding window (empty: none).
    window: the sliding window, keys a query sees, itself included.
  """

  activation: str = "silu"
  qk_norm: bool = False
  post_norms: bool = False
  norm_in_float32: bool = False
  embed_scale: bool = False
  attn_scale: float = 0.125
  attn_softcap: float | None = None
  final_softcap: float | None = None
  rope_theta: float = 10_000.0
  rope_scaling: float = 1.0
  rope_local_theta: float = 10_000.0
  local_rope: tuple[bool, ...] = ()
  sliding: tuple[bool, ...] = ()
  window: int | None = None

  def __post_init__(self):
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"Switches.activation must be one of {_ACTIVATIONS}, got "
                       f"{self.activation!r}")
    if any(self.sliding) and self.window is None:
      raise ValueError("Switches: sliding layers need a window")

  def is_sliding(self, i: int) -> bool:
    return bool(self.sliding) and self.sliding[i]

  def is_local_rope(self, i: int) -> bool:
    return bool(self.local_rope) and self.local_rope[i]


# ----------------------------------------------------------------------------
# Building blocks.


def _normal(rngs: nnx.Rngs, shape, std=0.02):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
  """`y = x @ kernel` with `kernel` `[in, out]`, an array or a `QArray`."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_normal(rngs, (din, dout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return ops.qdot(x, self.kernel.get_value(), contract_axis=0)


class Embed(nnx.Module):
  """Token embedding `[vocab, d]` (times `sqrt(d)` with `scale`); `attend` uses it as a
  tied output head."""

  def __init__(self, vocab: int, d: int, *, scale: bool = False, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (vocab, d)))
    self.scale = scale

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    table = self.embedding.get_value()
    if isinstance(table, QArray):
      rows = jnp.asarray(table[ids])  # QArray indexing dequantizes the gathered rows only
    else:
      rows = jnp.take(jnp.asarray(table), ids, axis=0)
    if self.scale:
      # the factor rounded to the table's dtype first, as transformers and the reference do
      rows = rows * jnp.asarray(math.sqrt(rows.shape[-1]), rows.dtype)
    return rows.astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return ops.qdot(x, self.embedding.get_value(), contract_axis=1)


class RMSNorm(nnx.Module):
  """Root-mean-square norm in float32; `in_float32=False` casts the normalized
  activations to the input's dtype before the scale (Hugging Face's LlamaRMSNorm)."""

  def __init__(self, d: int, eps: float, *, in_float32: bool = False):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
    self.eps = eps
    self.in_float32 = in_float32

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(var + self.eps)
    if not self.in_float32:
      xf = xf.astype(dtype).astype(jnp.float32)
    return (xf * jnp.asarray(self.scale.get_value()).astype(jnp.float32)).astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, factor: float = 1.0):
  """cos/sin `[..., T, head_dim]` (float32) for integer `positions` `[..., T]`; `factor`
  is linear RoPE scaling."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                              / head_dim))
  inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
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


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE (QK-norm and a score soft-cap when switched on)."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    s = cfg.switches()
    d, h, hk, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(d, h * hd, rngs=rngs)
    self.k_proj = Linear(d, hk * hd, rngs=rngs)
    self.v_proj = Linear(d, hk * hd, rngs=rngs)
    self.o_proj = Linear(h * hd, d, rngs=rngs)
    self.qk_norm = s.qk_norm
    if s.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, in_float32=s.norm_in_float32)
      self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, in_float32=s.norm_in_float32)
    self.num_heads, self.num_kv_heads, self.head_dim = h, hk, hd
    self.scaling = s.attn_scale
    self.softcap = s.attn_softcap

  def __call__(self, x, cos, sin, mask, kv=None, write=None):
    """`mask` `[B, T, S]` or `functional.Causal`; with a cache, `write(kv, k, v)` returns
    `(keys, values, new_kv)`: the keys and values to attend to and the updated cache."""
    b, t, _ = x.shape
    h, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_proj(x).reshape(b, t, h, hd)
    k = self.k_proj(x).reshape(b, t, hk, hd)
    v = self.v_proj(x).reshape(b, t, hk, hd)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      k, v, new_kv = write(kv, k, v)
    out = functional.attend(q, k, v, mask, scale=self.scaling, cap=self.softcap)
    return self.o_proj(out), new_kv


class MLP(nnx.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))`, SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
    self.activation = cfg.switches().activation

  def __call__(self, x):
    g = self.gate_proj(x)
    g = jax.nn.silu(g) if self.activation == "silu" else jax.nn.gelu(g, approximate=True)
    return self.down_proj(g * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block; with `post_norms`, each sublayer's output is normalized too."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
    s = cfg.switches()
    d, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.input_norm = RMSNorm(d, eps, in_float32=s.norm_in_float32)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_norms = s.post_norms
    if s.post_norms:
      self.post_attn_norm = RMSNorm(d, eps, in_float32=s.norm_in_float32)
    self.pre_mlp_norm = RMSNorm(d, eps, in_float32=s.norm_in_float32)
    self.mlp = MLP(cfg, rngs=rngs)
    if s.post_norms:
      self.post_mlp_norm = RMSNorm(d, eps, in_float32=s.norm_in_float32)

  def __call__(self, x, cos, sin, mask, kv=None, write=None):
    a, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv, write)
    if self.post_norms:
      a = self.post_attn_norm(a)
    x = x + a
    m = self.mlp(self.pre_mlp_norm(x))
    if self.post_norms:
      m = self.post_mlp_norm(m)
    return x + m, new_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values for generation.

  Full-attention layers keep every position, `k_global` / `v_global`
  `[L_full, B, S_max, H_kv, D]`, written in place at their position (XLA
  updates the donated buffer). Sliding layers keep only a ring of `window`
  slots, `k_local` / `v_local` `[L_sliding, B, window, H_kv, D]` (position `p`
  in slot `p % window`), with `local_pos` `[window]` the position each slot
  holds (-1: empty), so their memory does not grow with the sequence.
  """

  k_global: jax.Array
  v_global: jax.Array
  k_local: jax.Array
  v_local: jax.Array
  local_pos: jax.Array


def block_inputs(config: Any, positions: jax.Array, kv_len: int, *, causal: bool = False):
  """What a full-attention `Block` takes beside the hidden states: RoPE `cos`, `sin`
  `[B, T, head_dim]` (float32) and the causal mask `[B, T, kv_len]` for integer
  `positions` `[B, T]`, or `functional.Causal()` with `causal=True` (positions
  `0..T-1` and no cache: the attention then skips the masked keys). Layer-by-layer
  drivers (`quantjax.streaming`) use it to compute the model's own numbers."""
  s = config.switches()
  cos, sin = rope_tables(positions, config.head_dim, s.rope_theta, s.rope_scaling)
  if causal:
    return cos, sin, functional.Causal()
  kpos = jnp.arange(kv_len)
  mask = kpos[None, None, :] <= positions[:, :, None]  # [B, T, S]
  return cos, sin, mask


class CausalLM(nnx.Module):
  """A causal language model of any preset (`LlamaConfig`, `Gemma3Config`, ...).

  Call with `tokens` `[B, T]` (int) for float32 logits `[B, T, vocab]`; with a
  `KVCache` and `index` (the position of `tokens[:, 0]`, the same for every
  row), returns `(logits, new_cache)`.
  """

  def __init__(self, config: Any, *, rngs: nnx.Rngs):
    s = config.switches()
    self.config = config
    self.embed = Embed(config.vocab_size, config.hidden_size, scale=s.embed_scale, rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                              in_float32=s.norm_in_float32)
    if not config.tie_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, rngs=rngs)

  def hidden_states(self, tokens, cache: KVCache | None = None, index=None):
    """Final-norm hidden states `[B, T, d]` (and the updated cache, or None)."""
    cfg = self.config
    s = cfg.switches()
    dtype = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    if index is None:
      index = 0
    pos = index + jnp.arange(t, dtype=jnp.int32)  # the same positions for every row
    positions = jnp.broadcast_to(pos, (b, t))
    rope_g = rope_tables(positions, cfg.head_dim, s.rope_theta, s.rope_scaling)
    rope_l = (rope_tables(positions, cfg.head_dim, s.rope_local_theta) if any(s.local_rope)
              else None)
    x = self.embed(tokens, dtype)

    if cache is None:
      write_g = write_l = None
      mask_g, mask_l = functional.Causal(), functional.Causal(s.window)
    else:
      kpos = jnp.arange(cache.k_global.shape[2], dtype=jnp.int32)
      mask_g = kpos[None, None, :] <= positions[:, :, None]  # [B, T, S]

      def write_g(kv, k, v):
        # the whole [L, B, S, H, D] buffer and this layer's index: written in place,
        # attention reads the layer's slice (stacking per-layer slices copied it twice)
        ck, cv, j = kv
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (j, 0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (j, 0, index, 0, 0))
        return ck[j], cv[j], (ck, cv)

      w = cache.local_pos.shape[0]
      if any(s.sliding):
        q = pos[:, None]
        kp = jnp.concatenate([cache.local_pos, pos])[None, :]
        mask_l = (kp >= 0) & (kp <= q) & (q - kp < s.window)
        mask_l = jnp.broadcast_to(mask_l[None], (b,) + mask_l.shape)
        m = min(t, w)
        slots = pos[t - m:] % w  # distinct: m consecutive positions, m <= w
        new_local_pos = cache.local_pos.at[slots].set(pos[t - m:])

        def write_l(kv, k, v):
          ck, cv = kv
          keys = jnp.concatenate([ck.astype(k.dtype), k], axis=1)
          vals = jnp.concatenate([cv.astype(v.dtype), v], axis=1)
          nk = ck.at[:, slots].set(k[:, t - m:].astype(ck.dtype))
          nv = cv.at[:, slots].set(v[:, t - m:].astype(cv.dtype))
          return keys, vals, (nk, nv)

    ck = cv = None
    if cache is not None:
      ck, cv = cache.k_global, cache.v_global
    new_local = ([], [])
    n_full = n_local = 0
    for i, layer in enumerate(self.layers):
      sliding = s.is_sliding(i)
      cos, sin = rope_l if s.is_local_rope(i) else rope_g
      kv = write = None
      if cache is not None:
        if sliding:
          kv, write = (cache.k_local[n_local], cache.v_local[n_local]), write_l
        else:
          kv, write = (ck, cv, n_full), write_g
      x, nkv = layer(x, cos, sin, mask_l if sliding else mask_g, kv, write)
      if cache is not None:
        if sliding:
          new_local[0].append(nkv[0])
          new_local[1].append(nkv[1])
          n_local += 1
        else:
          ck, cv = nkv
          n_full += 1
    x = self.final_norm(x)
    if cache is None:
      return x, None
    if not new_local[0]:
      return x, KVCache(ck, cv, cache.k_local, cache.v_local, cache.local_pos)
    return x, KVCache(ck, cv, jnp.stack(new_local[0]), jnp.stack(new_local[1]), new_local_pos)

  def head(self):
    """The output head as `(weight, contract_axis)` for `qdot`."""
    if self.config.tie_embeddings:
      return self.embed.embedding.get_value(), 1
    return self.lm_head.kernel.get_value(), 0

  def logits(self, x):
    w, axis = self.head()
    out = ops.qdot(x, w, contract_axis=axis).astype(jnp.float32)
    return functional.softcap(out, self.config.switches().final_softcap)

  def __call__(self, tokens, cache: KVCache | None = None, index=None):
    x, new_cache = self.hidden_states(tokens, cache, index)
    logits = self.logits(x)
    if cache is None:
      return logits
    return logits, new_cache


# ----------------------------------------------------------------------------
# Functional API (every function takes the config first; it is static under jit).


graphdef, abstract_state, _as_state, model_from_params = functional.model_api(CausalLM)
# The same four functions for one decoder block (`Block(config, rngs=)`): its params
# are `layers/{i}/...` of the model without the prefix.
block_api = functional.model_api(Block)


def rename_legacy(config: Any, params: Any) -> Any:
  """`params` with the old name of a no-sandwich config's MLP norm
  (`layers/{i}/post_attn_norm`) renamed to `pre_mlp_norm`; anything else unchanged."""
  if config.switches().post_norms or not isinstance(params, Mapping):
    return params
  layers = params.get("layers")
  if not isinstance(layers, Mapping) or not any(
      isinstance(layer, Mapping) and "post_attn_norm" in layer for layer in layers.values()):
    return params  # nothing old: the tree is handed on as it is (every forward call)
  renamed = {}
  for k, layer in layers.items():
    if (isinstance(layer, Mapping) and "post_attn_norm" in layer
        and "pre_mlp_norm" not in layer):
      layer = {("pre_mlp_norm" if n == "post_attn_norm" else n): v for n, v in layer.items()}
    renamed[k] = layer
  return {**params, "layers": renamed}


def as_state(config: Any, params: Any) -> nnx.State:
  """Accepts an `nnx.State` or its pure dict (old names renamed, `rename_legacy`);
  returns an `nnx.State`."""
  if isinstance(params, nnx.State):
    return params
  return _as_state(config, rename_legacy(config, params))


@dispatch.routed_jit(static_argnums=0)
def _forward(config, params, tokens):
  return nnx.merge(graphdef(config), params)(tokens)


def forward(config: Any, params: Any, tokens: jax.Array) -> jax.Array:
  """Jitted logits `[B, T, vocab]` (float32) for `tokens` `[B, T]`.

  `params` is an `nnx.State` or pure dict whose leaves may be `QArray`s; the
  function compiles once per (config, parameter structure, token shape). With a
  large vocabulary the logits are large (Gemma 3's 262,144 entries: 1 GiB per
  1,024 tokens); `token_nll` never holds them whole.
  """
  return _forward(config, as_state(config, params), jnp.asarray(tokens, jnp.int32))


def _chunked_nll(model: CausalLM, x: jax.Array, targets: jax.Array, rows: int) -> jax.Array:
  """NLL of `targets` `[B, T]` under the head applied to `x` `[B, T, d]`, `rows` at a time."""
  b, t, d = x.shape
  n = b * t
  rows = max(1, min(rows, n))
  pad = (-n) % rows
  xs = jnp.pad(x.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, rows, d)
  ys = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, rows)
  w, axis = model.head()
  cap = model.config.switches().final_softcap

  def one(args):
    xc, yc = args
    logits = functional.softcap(ops.qdot(xc, w, contract_axis=axis).astype(jnp.float32), cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, yc[:, None], axis=-1)[:, 0]

  return jax.lax.map(one, (xs, ys)).reshape(-1)[:n].reshape(b, t)


@dispatch.routed_jit(static_argnums=(0, 3))
def _token_nll(config, params, tokens, rows):
  model = nnx.merge(graphdef(config), params)
  x, _ = model.hidden_states(tokens)
  return _chunked_nll(model, x[:, :-1], tokens[:, 1:], rows)


def token_nll(config: Any, params: Any, tokens: jax.Array, *, rows: int = 512) -> jax.Array:
  """Next-token NLL `[B, T-1]` (float32) for `tokens` `[B, T]`, jitted.

  The head runs on `rows` positions at a time, so the `[B, T, vocab]` logits
  are never materialised (512 rows of a 262,144 vocabulary: 512 MiB at once).
  """
  return _token_nll(config, as_state(config, params), jnp.asarray(tokens, jnp.int32), rows)


def window_nll_fn(config: Any, params: Any, *, rows: int = 512):
  """`tokens [B, T] -> NLL [B, T-1]` for `quantjax.eval.perplexity.evaluate(nll_fn=...)`."""
  state = as_state(config, params)

  def fn(tokens):
    return _token_nll(config, state, jnp.asarray(tokens, jnp.int32), rows)
  return fn


def init_cache(config: Any, batch: int, max_len: int) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` positions: full-attention
  layers get `max_len` positions, sliding layers `min(window, max_len)` ring slots."""
  s = config.switches()
  dtype = jnp.dtype(config.dtype)
  w = max_len if s.window is None else min(s.window, max_len)
  nl = sum(s.is_sliding(i) for i in range(config.num_layers))
  ng = config.num_layers - nl
  tail = (config.num_kv_heads, config.head_dim)
  return KVCache(jnp.zeros((ng, batch, max_len) + tail, dtype),
                 jnp.zeros((ng, batch, max_len) + tail, dtype),
                 jnp.zeros((nl, batch, w) + tail, dtype),
                 jnp.zeros((nl, batch, w) + tail, dtype),
                 jnp.full((w,), -1, jnp.int32))


@dispatch.routed_jit(static_argnums=0, donate_argnums=3)
def cached_step(config, params, tokens, cache, index):
  """The jitted cached step on an `nnx.State` (`step` takes a pure dict too); the cache is
  donated."""
  model = nnx.merge(graphdef(config), params)
  x, cache = model.hidden_states(tokens, cache, index)
  return model.logits(x[:, -1:, :])[:, 0, :], cache


def step(config: Any, params: Any, tokens: jax.Array, cache: KVCache,
         index: int) -> tuple[jax.Array, KVCache]:
  """One cached step: logits `[B, vocab]` of the last of `tokens` `[B, T]` (at
  positions `index..index+T-1`) and the updated cache (the old one is donated)."""
  return cached_step(config, as_state(config, params), jnp.asarray(tokens, jnp.int32), cache,
               jnp.int32(index))


def decoder(config: Any) -> functional.Decoder:
  """`(init_cache(batch, max_len), step(params, tokens, cache, index), decode(params,
  logits, cache, index, n))` for `quantjax.eval.speed.prefill_decode`: `step`
  returns the last position's logits `[B, V]` and the updated cache; `decode`
  runs `n` greedy steps in one jitted loop (`functional.decode_tokens`)."""
  return functional.make_decoder(cached_step, init_cache, as_state, config)


def generate(config: Any, params: Any, prompt: jax.Array, max_new_tokens: int, *,
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
  return functional.generate_loop(functools.partial(cached_step, config),
                                  functools.partial(init_cache, config),
                                  as_state(config, params), prompt, max_new_tokens,
                                  temperature=temperature, top_k=top_k, seed=seed,
                                  eos_token_id=eos_token_id)


# ----------------------------------------------------------------------------
# What calibrated methods need to know about the decoder (data only).


def forward_fn(config: Any):
  """`forward(params, tokens) -> logits`: what `methods.calibrate` captures and
  `eval.perplexity.evaluate` scores (params: pure dict or `nnx.State`)."""
  def fn(params, tokens):
    return forward(config, params, tokens)
  return fn


def loss_fn(config: Any, *, rows: int | None = None):
  """`loss(params, tokens) -> mean next-token NLL` (float32), e.g. for the Fisher
  sensitivity of `methods.mixed.fisher_diagonal`; with `rows`, the head runs that many
  positions at a time (`token_nll`), otherwise on the whole logits."""
  def loss(params, tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    if rows is not None:
      return jnp.mean(token_nll(config, params, tokens, rows=rows))
    logits = forward(config, params, tokens)[:, :-1].astype(jnp.float32)
    tgt = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(lse - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0])
  return loss


def fold_groups(config: Any, *, prefix: str = "layers", up_to_down: bool = True,
                v_to_o: bool = True) -> list:
  """The producer of each projection's input, for `methods.fold.fold_input_scales`.

  Exact folds only: `input_norm` -> q/k/v and `pre_mlp_norm` -> gate/up (a
  norm's output is `normalize(x) * scale`, so dividing `scale` by s divides
  the input of every reader by s); `up_proj` -> `down_proj` (the gate
  multiplies up's output elementwise into down's input); `v_proj` -> `o_proj`
  only without grouped-query attention (with it, one v head feeds several o
  inputs and scales per o input cannot fold: o_proj keeps its `InputScaled`
  leaf). Sandwich norms (`post_attn_norm`, `post_mlp_norm`) produce no
  projection's input, and scaling a projection *before* a norm does not commute
  with it (q/k before QK-norm, o/down before their post-norms), so no other fold
  is exact. A tied embedding also feeds the lookup, so `final_norm` -> head does
  not fold.
  """
  out = []
  for i in range(config.num_layers):
    p = f"{prefix}/{i}"
    out.append(FoldGroup(f"{p}/input_norm/scale",
                         tuple(f"{p}/attn/{n}_proj/kernel" for n in ("q", "k", "v"))))
    if v_to_o and config.num_heads == config.num_kv_heads:
      out.append(FoldGroup(f"{p}/attn/v_proj/kernel", (f"{p}/attn/o_proj/kernel",), "linear"))
    out.append(FoldGroup(f"{p}/pre_mlp_norm/scale",
                         (f"{p}/mlp/gate_proj/kernel", f"{p}/mlp/up_proj/kernel")))
    if up_to_down:
      out.append(FoldGroup(f"{p}/mlp/up_proj/kernel", (f"{p}/mlp/down_proj/kernel",), "linear"))
  return out


def foldable(config: Any, **kw) -> str:
  """Regex of the projections whose input scales `fold_groups` can absorb."""
  return functional.consumers_regex(fold_groups(config, **kw))
