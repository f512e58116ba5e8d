"""The Gemma 3 text decoder in Flax NNX; every matmul goes through `ops.qdot`.

What sets Gemma 3 apart from a Llama, all implemented here:

* RMSNorm with a `(1 + w)` multiplier, before *and after* each sublayer
  (`input_norm` -> attention -> `post_attn_norm` -> residual; `pre_mlp_norm`
  -> MLP -> `post_mlp_norm` -> residual), and RMSNorms on each query and key
  head (QK-norm) before RoPE;
* a GeGLU MLP with the tanh approximation of GELU;
* token embeddings multiplied by `sqrt(d)`, the factor rounded to the
  embedding's dtype first (as transformers and the reference JAX code do:
  25.25 rather than 25.298 for d = 640 in bfloat16);
* sliding-window layers (a query sees the `sliding_window` most recent keys,
  itself included) interleaved with global layers (5:1 by default), each kind
  with its own RoPE base (10,000 local, 1,000,000 global, optionally with
  linear RoPE scaling on the global layers);
* attention scores scaled by `query_pre_attn_scalar ** -0.5` (not
  `head_dim ** -0.5`), optional tanh soft-capping of the attention scores and
  of the final logits;
* a tied output head (the embedding), untied supported.

Norm weights are stored as the multiplier itself, `scale = 1 + w` (what GGUF
files hold; `load_hf` adds the 1 to transformers' `w`). The arithmetic is the
same as transformers' (`normalize(x) * (1.0 + w)` in float32) and it keeps
every norm an ordinary per-channel scale, so folding AWQ / SmoothQuant input
scales into it (`methods.fold_input_scales`) is an exact division, with no
Gemma-specific code in the methods.

Parameter paths (kernels `[in, out]`, as in `quantjax.models.llama`):

    embed/embedding                              [vocab, d]
    layers/{i}/input_norm/scale                  [d]
    layers/{i}/attn/{q,k,v,o}_proj/kernel
    layers/{i}/attn/{q,k}_norm/scale             [head_dim]
    layers/{i}/post_attn_norm/scale              [d]   (on the attention output)
    layers/{i}/pre_mlp_norm/scale                [d]
    layers/{i}/mlp/{gate,up,down}_proj/kernel
    layers/{i}/post_mlp_norm/scale               [d]   (on the MLP output)
    final_norm/scale                             [d]
    lm_head/kernel                               [d, vocab]   (untied only)

The functional surface is the Llama's (`forward(config, params, tokens)`,
`init_cache`, `generate`, `forward_fn`, `loss_fn`, `fold_groups`, `foldable`,
`PROJ_KERNELS`, `as_state`, `model_from_params`), so the experiment runner,
the generic calibration (`quantjax.methods.calibrate`) and the partition
rules of `quantjax.distributed` take either model.

`ARCHITECTURE` is the family as the file formats see it (data, registered with
`quantjax.io.architecture`): the Hugging Face names and `config.json` map
(`Gemma3ForCausalLM`, `model_type` gemma3_text; norms stored as `w`), llama.cpp's
`gemma3` tensor names (no Q/K permutation), the head-dimension checks of a GGUF
file (`check_gguf_shapes`) and the settings llama.cpp cannot represent
(`check_gguf_exportable`).

References:
  Gemma Team, "Gemma 3 Technical Report", arXiv:2503.19786 (2025).
  Hugging Face transformers `Gemma3ForCausalLM` (the parity oracle) and
  llama.cpp's `gemma3` architecture (the export target).

The configuration (`Gemma3Config`, `SLIDING` / `GLOBAL` layer types,
`default_layer_types`) is in `quantjax.models.gemma3_config`, importable from here.
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
from quantjax.io.gguf_read import GGUFError
from quantjax.io.hf import HFArchitecture, TensorSpec, decoder_tensors
from quantjax.kernels import dispatch
from quantjax.methods.rotation import HeadRotation, RotationTable
from quantjax.models import llama as llama_lib
from quantjax.models import functional
from quantjax.models.gemma3_config import GLOBAL, SLIDING, Gemma3Config, default_layer_types
from quantjax.models.llama import Linear, apply_rope
from quantjax.numerics.qarray import QArray

__all__ = [
    "ARCHITECTURE",
    "AWQ_NO_CLIP",
    "GGUF_LAYER_NAMES",
    "GGUF_TOP_NAMES",
    "GLOBAL",
    "Gemma3",
    "Gemma3Cache",
    "Gemma3Config",
    "PROJ_KERNELS",
    "SLIDING",
    "abstract_state",
    "as_state",
    "check_gguf_exportable",
    "check_gguf_shapes",
    "decoder",
    "forward_fn",
    "fold_groups",
    "foldable",
    "forward",
    "rotation_table",
    "generate",
    "graphdef",
    "init_cache",
    "loss_fn",
    "model_from_params",
    "token_nll",
    "window_nll_fn",
]

PROJ_KERNELS = llama_lib.PROJ_KERNELS
AWQ_NO_CLIP = llama_lib.AWQ_NO_CLIP


# ----------------------------------------------------------------------------
# Building blocks.


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: `normalize(x) * scale` in float32, `scale` = 1 + w."""

  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(var + self.eps)
    return (xf * jnp.asarray(self.scale.get_value()).astype(jnp.float32)).astype(x.dtype)


class Embed(llama_lib.Embed):
  """Token embedding scaled by `sqrt(d)` (rounded to the table's dtype first)."""

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    table = self.embedding.get_value()
    if isinstance(table, QArray):
      rows = jnp.asarray(table[ids])  # dequantizes the gathered rows only
    else:
      rows = jnp.take(jnp.asarray(table), ids, axis=0)
    normalizer = jnp.asarray(math.sqrt(rows.shape[-1]), rows.dtype)
    return (rows * normalizer).astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, factor: float = 1.0):
  """cos/sin `[..., T, head_dim]` (float32); `factor` is linear RoPE scaling."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                              / head_dim))
  inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class Attention(nnx.Module):
  """Grouped-query attention with QK-norm, RoPE, a query scale and optional soft-cap."""

  def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
    d, h, hk, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(d, h * hd, rngs=rngs)
    self.k_proj = Linear(d, hk * hd, rngs=rngs)
    self.v_proj = Linear(d, hk * hd, rngs=rngs)
    self.o_proj = Linear(h * hd, d, rngs=rngs)
    self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
    self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
    self.num_heads, self.num_kv_heads, self.head_dim = h, hk, hd
    self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
    self.softcap = cfg.attn_logit_softcapping

  def __call__(self, x, cos, sin, mask, kv=None, write=None):
    """`mask` `[B, T, S]`; with a cache, `write(kv, k, v) -> (keys, values, new_kv)`."""
    b, t, _ = x.shape
    h, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_norm(self.q_proj(x).reshape(b, t, h, hd))
    k = self.k_norm(self.k_proj(x).reshape(b, t, hk, hd))
    v = self.v_proj(x).reshape(b, t, hk, hd)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      k, v, new_kv = write(kv, k, v)
    out = functional.attend(q, k, v, mask, scale=self.scaling, cap=self.softcap)
    return self.o_proj(out), new_kv


class MLP(nnx.Module):
  """GeGLU: `down(gelu_tanh(gate(x)) * up(x))`."""

  def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):
  """Gemma 3 block: norms before and after each of attention and MLP."""

  def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
    d, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.input_norm = RMSNorm(d, eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(d, eps)
    self.pre_mlp_norm = RMSNorm(d, eps)
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_mlp_norm = RMSNorm(d, eps)

  def __call__(self, x, cos, sin, mask, kv=None, write=None):
    a, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv, write)
    x = x + self.post_attn_norm(a)
    x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
    return x, new_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Gemma3Cache:
  """Keys and values for generation.

  Global layers keep every position, `[L_global, B, S_max, H_kv, D]`, written
  at their position. Sliding layers keep only a ring of `window` slots,
  `[L_sliding, B, window, H_kv, D]` (position `p` in slot `p % window`), with
  `local_pos` `[window]` the position each slot holds (-1: empty), so their
  memory does not grow with the sequence.
  """

  k_global: jax.Array
  v_global: jax.Array
  k_local: jax.Array
  v_local: jax.Array
  local_pos: jax.Array


class Gemma3(nnx.Module):
  """Gemma 3 causal language model (text).

  Call with `tokens` `[B, T]` (int) for float32 logits `[B, T, vocab]`; with
  a `Gemma3Cache` and `index` (the position of `tokens[:, 0]`, the same for
  every row), returns `(logits, new_cache)`.
  """

  def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    if not config.tie_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, rngs=rngs)

  def hidden_states(self, tokens, cache: Gemma3Cache | None = None, index=None):
    """Final-norm hidden states `[B, T, d]` (and the updated cache, or None)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    if index is None:
      index = 0
    pos = index + jnp.arange(t, dtype=jnp.int32)  # the same positions for every row
    rope_g = rope_tables(jnp.broadcast_to(pos, (b, t)), cfg.head_dim, cfg.rope_theta,
                         cfg.rope_scaling_factor)
    rope_l = rope_tables(jnp.broadcast_to(pos, (b, t)), cfg.head_dim, cfg.rope_local_theta)
    window = cfg.sliding_window
    x = self.embed(tokens, dtype)
    q = pos[:, None]

    if cache is None:
      mask_g, mask_l = functional.Causal(), functional.Causal(window)
      write_g = write_l = None
    else:
      s = cache.k_global.shape[2]
      mask_g = jnp.arange(s, dtype=jnp.int32)[None, :] <= q

      def write_g(kv, k, v):
        ck, cv = kv
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
        return k, v, (k, v)

      w = cache.local_pos.shape[0]
      kp = jnp.concatenate([cache.local_pos, pos])[None, :]
      mask_l = (kp >= 0) & (kp <= q)
      if window is not None:
        mask_l = mask_l & (q - kp < window)
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

    if cache is not None:
      mask_g = jnp.broadcast_to(mask_g[None], (b,) + mask_g.shape)
      mask_l = jnp.broadcast_to(mask_l[None], (b,) + mask_l.shape)
    new = {"g": ([], []), "l": ([], [])}
    n = {"g": 0, "l": 0}
    for i, layer in enumerate(self.layers):
      kind = "l" if cfg.is_sliding(i) else "g"
      cos, sin = rope_l if cfg.layer_types[i] == SLIDING else rope_g
      mask = mask_l if kind == "l" else mask_g
      kv = write = None
      if cache is not None:
        j = n[kind]
        kv = ((cache.k_local[j], cache.v_local[j]) if kind == "l" else
              (cache.k_global[j], cache.v_global[j]))
        write = write_l if kind == "l" else write_g
        n[kind] += 1
      x, nkv = layer(x, cos, sin, mask, kv, write)
      if nkv is not None:
        new[kind][0].append(nkv[0])
        new[kind][1].append(nkv[1])
    x = self.final_norm(x)
    if cache is None:
      return x, None

    def stack(parts, like):
      return jnp.stack(parts) if parts else like
    new_cache = Gemma3Cache(stack(new["g"][0], cache.k_global), stack(new["g"][1], cache.v_global),
                            stack(new["l"][0], cache.k_local), stack(new["l"][1], cache.v_local),
                            new_local_pos)
    return x, new_cache

  def head(self):
    """The output head as `(weight, contract_axis)` for `qdot`."""
    if self.config.tie_embeddings:
      return self.embed.embedding.get_value(), 1
    return self.lm_head.kernel.get_value(), 0

  def logits(self, x):
    w, axis = self.head()
    out = ops.qdot(x, w, contract_axis=axis).astype(jnp.float32)
    return functional.softcap(out, self.config.final_logit_softcapping)

  def __call__(self, tokens, cache: Gemma3Cache | None = None, index=None):
    x, new_cache = self.hidden_states(tokens, cache, index)
    logits = self.logits(x)
    if cache is None:
      return logits
    return logits, new_cache


# ----------------------------------------------------------------------------
# Functional API.


graphdef, abstract_state, as_state, model_from_params = functional.model_api(Gemma3)


@dispatch.routed_jit(static_argnums=0)
def _forward(config, params, tokens):
  return nnx.merge(graphdef(config), params)(tokens)


def forward(config: Gemma3Config, params: Any, tokens: jax.Array) -> jax.Array:
  """Jitted logits `[B, T, vocab]` (float32) for `tokens` `[B, T]`.

  Same signature as `quantjax.models.llama.forward`. With Gemma's 262,144
  entry vocabulary the logits are large (1 GiB per 1,024 tokens); the
  perplexity path uses `token_nll`, which never holds them whole.
  """
  return _forward(config, as_state(config, params), jnp.asarray(tokens, jnp.int32))


def _chunked_nll(model: Gemma3, x: jax.Array, targets: jax.Array, rows: int) -> jax.Array:
  """NLL of `targets` `[B, T]` under the head applied to `x` `[B, T, d]`, `rows` at a time."""
  b, t, d = x.shape
  n = b * t
  rows = max(1, min(rows, n))
  pad = (-n) % rows
  xs = jnp.pad(x.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, rows, d)
  ys = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, rows)
  w, axis = model.head()
  cap = model.config.final_logit_softcapping

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


def token_nll(config: Gemma3Config, params: Any, tokens: jax.Array, *,
              rows: int = 512) -> jax.Array:
  """Next-token NLL `[B, T-1]` (float32) for `tokens` `[B, T]`, jitted.

  The head runs on `rows` positions at a time, so the `[B, T, vocab]` logits
  are never materialised (512 rows: 512 MiB of float32 logits at once).
  """
  return _token_nll(config, as_state(config, params), jnp.asarray(tokens, jnp.int32), rows)


def window_nll_fn(config: Gemma3Config, params: Any, *, rows: int = 512):
  """`tokens [B, T] -> NLL [B, T-1]` for `quantjax.eval.perplexity.evaluate(nll_fn=...)`."""
  state = as_state(config, params)

  def fn(tokens):
    return _token_nll(config, state, jnp.asarray(tokens, jnp.int32), rows)
  return fn


# ----------------------------------------------------------------------------
# Generation with a KV cache that honours the sliding window.


def init_cache(config: Gemma3Config, batch: int, max_len: int) -> Gemma3Cache:
  """An empty cache for `batch` rows of up to `max_len` positions.

  Sliding layers get `min(sliding_window, max_len)` ring slots, global layers
  `max_len`.
  """
  dtype = jnp.dtype(config.dtype)
  w = max_len if config.sliding_window is None else min(config.sliding_window, max_len)
  ng, nl = len(config.global_layers), len(config.sliding_layers)
  tail = (config.num_kv_heads, config.head_dim)
  return Gemma3Cache(jnp.zeros((ng, batch, max_len) + tail, dtype),
                     jnp.zeros((ng, batch, max_len) + tail, dtype),
                     jnp.zeros((nl, batch, w) + tail, dtype),
                     jnp.zeros((nl, batch, w) + tail, dtype),
                     jnp.full((w,), -1, jnp.int32))


@dispatch.routed_jit(static_argnums=0, donate_argnums=3)
def _step(config, params, tokens, cache, index):
  model = nnx.merge(graphdef(config), params)
  x, cache = model.hidden_states(tokens, cache, index)
  return model.logits(x[:, -1:, :])[:, 0, :], cache


def step(config: Gemma3Config, params: Any, tokens: jax.Array, cache: Gemma3Cache,
         index: int) -> tuple[jax.Array, Gemma3Cache]:
  """One cached step: logits `[B, vocab]` of the last of `tokens` `[B, T]` (at
  positions `index..index+T-1`) and the updated cache (the old one is donated)."""
  return _step(config, as_state(config, params), jnp.asarray(tokens, jnp.int32), cache,
               jnp.int32(index))


def generate(config: Gemma3Config, params: Any, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             eos_token_id: int | None = None) -> np.ndarray:
  """Autoregressive decoding with a KV cache (same arguments as `llama.generate`).

  Returns `[B, T + n]` int32 numpy (the prompt followed by the new tokens).
  """
  return functional.generate_loop(functools.partial(_step, config),
                                  functools.partial(init_cache, config),
                                  as_state(config, params), prompt, max_new_tokens,
                                  temperature=temperature, top_k=top_k, seed=seed,
                                  eos_token_id=eos_token_id)


# ----------------------------------------------------------------------------
# What calibrated methods need to know about this architecture (data only).


def decoder(config: Gemma3Config) -> functional.Decoder:
  """`(init_cache, step, decode)` for `quantjax.eval.speed.prefill_decode` (see
  `llama.decoder`)."""
  return functional.make_decoder(_step, init_cache, as_state, config)


def forward_fn(config: Gemma3Config):
  """`forward(params, tokens) -> logits`: what `methods.calibrate` captures and
  `eval.perplexity.evaluate` scores."""
  def fn(params, tokens):
    return forward(config, params, tokens)
  return fn


def loss_fn(config: Gemma3Config, *, rows: int = 512):
  """`loss(params, tokens) -> mean next-token NLL` (float32), e.g. for
  `methods.mixed.fisher_diagonal`; the head runs `rows` positions at a time."""
  def loss(params, tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    return jnp.mean(token_nll(config, params, tokens, rows=rows))
  return loss


def fold_groups(config: Gemma3Config, *, prefix: str = "layers", up_to_down: bool = True,
                v_to_o: bool = True) -> list:
  """The producer of each projection's input, for `methods.fold.fold_input_scales`.

  Exact folds only: `input_norm` -> q/k/v and `pre_mlp_norm` -> gate/up (a
  norm's output is `normalize(x) * scale`, so dividing `scale` by s divides
  the input of every reader by s); `up_proj` -> `down_proj` (GeGLU multiplies
  up's output elementwise into down's input); `v_proj` -> `o_proj` only
  without grouped-query attention. The post-norms (`post_attn_norm`,
  `post_mlp_norm`) produce no projection's input (they feed the residual
  stream), and scaling a projection *before* a norm does not commute with it
  (q/k before QK-norm, o/down before their post-norms), so no other fold is
  exact. The tied embedding also feeds the lookup, so `final_norm` -> head
  does not fold.
  """
  return functional.decoder_fold_groups(config, mlp_norm="pre_mlp_norm", prefix=prefix,
                                        up_to_down=up_to_down, v_to_o=v_to_o)


def foldable(config: Gemma3Config, **kw) -> str:
  """Regex of the projections whose input scales `fold_groups` can absorb."""
  return functional.consumers_regex(fold_groups(config, **kw))


GEMMA3_NO_R1 = (
    "Gemma 3 normalizes what each sublayer adds to the residual stream (post_attn_norm, "
    "post_mlp_norm: x + normalize(y) * (1 + s)). A residual rotation R would have to pass "
    "through that elementwise scale, and diag(1 + s) R != R diag(1 + s) unless s is uniform; "
    "the scale cannot fold into o_proj / down_proj either, because the norm's division by "
    "the RMS of y sits between them. So R1 is not function-preserving for Gemma 3 (q/k "
    "rotations are blocked the same way by the QK-norms); R2 (values / attention output "
    "per head) is, since v has no norm.")


def rotation_table(config: Gemma3Config, *, prefix: str = "layers"):
  """The rotations Gemma 3 allows, for `methods.rotation.rotate`: R2 only
  (`GEMMA3_NO_R1` says why not R1)."""
  heads = HeadRotation(
      pairs=tuple((f"{prefix}/{i}/attn/v_proj/kernel", f"{prefix}/{i}/attn/o_proj/kernel")
                  for i in range(config.num_layers)),
      head_dim=config.head_dim, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
  return RotationTable(None, heads, why_not=GEMMA3_NO_R1)


# ----------------------------------------------------------------------------
# The architecture record: what the file formats (`quantjax.io`) know of the family.


def _hf_config(cfg: Gemma3Config) -> dict:
  """`config.json` of a `Gemma3ForCausalLM` (`gemma3_text`; no quantization_config)."""
  full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_factor != 1.0:
    full = {"rope_type": "linear", "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling_factor}
  d = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
      "rope_parameters": {GLOBAL: full,
                          SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
      # transformers' config class types it int; keep a fractional value as it is
      "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar)
                                if float(cfg.query_pre_attn_scalar).is_integer()
                                else cfg.query_pre_attn_scalar),
      "final_logit_softcapping": cfg.final_logit_softcapping,
      "attn_logit_softcapping": cfg.attn_logit_softcapping,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
  }
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if getattr(cfg, k) is not None:
      d[k] = int(getattr(cfg, k))
  return d


def _hf_tensors(cfg: Gemma3Config) -> list[TensorSpec]:
  """Gemma 3's checkpoint names. quantjax keeps each RMSNorm weight as the multiplier
  `1 + w`; checkpoints store `w`."""
  d, hd = cfg.hidden_size, cfg.head_dim
  return decoder_tensors(
      cfg, ([("input_layernorm.weight", ("input_norm", "scale"), d)],
            [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), hd),
             ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), hd),
             ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), d),
             ("pre_feedforward_layernorm.weight", ("pre_mlp_norm", "scale"), d)],
            [("post_feedforward_layernorm.weight", ("post_mlp_norm", "scale"), d)]),
      norm_offset=1.0)


# llama.cpp's `gemma3` tensor names -> params paths: no Q/K row permutation (NEOX-style
# RoPE), and norm weights stored as the multiplier 1 + w, which is what quantjax keeps.
GGUF_LAYER_NAMES = {
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
GGUF_TOP_NAMES = llama_lib.GGUF_TOP_NAMES


def _gguf_metadata(cfg: Gemma3Config, w, gguf) -> None:
  """llama.cpp's "gemma3" keys beyond the common ones (`GGUFNames.write_metadata`)."""
  w.add_key_length(int(cfg.head_dim))
  w.add_value_length(int(cfg.head_dim))
  if cfg.sliding_window is not None:
    w.add_sliding_window(int(cfg.sliding_window))
  if cfg.final_logit_softcapping is not None:
    w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
  if cfg.rope_scaling_factor != 1.0:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(cfg.rope_scaling_factor))


def _config_from_gguf(meta: Mapping[str, Any], vocab_size: int, tie_embeddings: bool,
                      source: str) -> Gemma3Config:
  try:
    return Gemma3Config.from_gguf_metadata(meta, vocab_size=vocab_size,
                                           tie_embeddings=tie_embeddings, source=source)
  except ValueError as e:
    raise GGUFError(str(e) if source in str(e) else f"{source}: {e}") from None


def check_gguf_shapes(config: Gemma3Config, shapes: Mapping[str, tuple], source: str) -> None:
  """Head-dimension checks of a GGUF file's tensors that name the tensor and the metadata
  keys involved (`shapes`: tensor name -> row-major shape, `[out, in]`)."""
  h, hk, hd = config.num_heads, config.num_kv_heads, config.head_dim
  fields = ("gemma3.attention.head_count", "gemma3.attention.head_count_kv",
            "gemma3.attention.key_length")
  names = {"q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight",
           "v": "blk.{i}.attn_v.weight", "o": "blk.{i}.attn_output.weight",
           "qn": "blk.{i}.attn_q_norm.weight", "kn": "blk.{i}.attn_k_norm.weight"}
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


def check_gguf_exportable(config: Gemma3Config) -> None:
  """llama.cpp's `gemma3` hard-codes some settings; refuse (GGUFError) configs it would
  misread."""
  problems = []
  if config.sliding_window is not None and config.layer_types != default_layer_types(
      config.num_layers):
    problems.append(f"layer_types {config.layer_types} (llama.cpp makes every sixth layer "
                    "global)")
  if config.rope_local_theta != 10_000.0:
    problems.append(f"rope_local_theta={config.rope_local_theta} (llama.cpp uses 10000)")
  want = (config.hidden_size // config.num_heads if config.num_layers == 62 else
          config.head_dim)
  if float(config.query_pre_attn_scalar) != float(want):
    problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (llama.cpp uses "
                    f"{want} for a {config.num_layers}-layer model)")
  if config.attn_logit_softcapping is not None:
    problems.append(f"attn_logit_softcapping={config.attn_logit_softcapping} (llama.cpp's gemma3 "
                    "has none)")
  if problems:
    raise GGUFError("this Gemma3Config cannot be exported for llama.cpp: " + "; ".join(problems))


ARCHITECTURE = architecture_lib.Architecture(
    name="gemma3", config_type=Gemma3Config, model=Gemma3, module=sys.modules[__name__],
    abstract_state=abstract_state,
    as_state=as_state,
    hf=HFArchitecture(
        model_types=("gemma3_text",), hf_class="Gemma3ForCausalLM",
        to_hf_config=_hf_config,
        from_hf_config=lambda d, name, source: Gemma3Config.from_hf(d, name=name, source=source),
        tensors=_hf_tensors,
        ignorable=(r".*rotary_emb.*inv_freq", r"lm_head\.weight")),
    gguf=architecture_lib.GGUFNames(
        arch="gemma3", layer=GGUF_LAYER_NAMES, top=GGUF_TOP_NAMES,
        config_from_metadata=_config_from_gguf, ignored=llama_lib.GGUF_IGNORED_NAMES,
        check_shapes=check_gguf_shapes, check_exportable=check_gguf_exportable,
        write_metadata=_gguf_metadata),
    fold_groups=fold_groups, rotation_table=rotation_table)
architecture_lib.register(ARCHITECTURE)
