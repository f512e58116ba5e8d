"""The functional surface of quantjax's NNX models (`quantjax.models.decoder`).

`model_api(ModelClass)` builds a model's `graphdef` / `abstract_state` /
`as_state` / `model_from_params`; `generate_loop` and `decode_tokens` run a
model's jitted cached step; `attend` is the attention every decoder layer uses.

Decoding runs on the device: after the prefill step, `decode_tokens` runs
every decode step, the sampling and the end-of-sequence test inside one
jitted `lax.while_loop`, so a token costs no Python dispatch (flattening the
parameter tree, ~1,700 leaves for a quantized SmolLM2, took about as long as
a step's matmuls on a 2-core CPU) and no host round trip.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quantjax.kernels import dispatch

__all__ = ["model_api", "intify", "sample", "generate_loop", "decode_tokens", "Decoder",
           "BoundStep", "make_decoder", "Causal", "attend", "softcap"]


class Decoder(NamedTuple):
  """What `quantjax.eval.speed.prefill_decode` times (a model's `decoder(config)`).

  `init_cache(batch, max_len)`; `step(params, tokens [B, T], cache, index)`
  -> `(logits [B, V], cache)`; `decode(params, logits, cache, index, n)` ->
  `(tokens [B, n], cache)`: `n` greedy tokens, the first sampled from
  `logits`, decoded on the device (`decode_tokens`).
  """

  init_cache: Callable[..., Any]
  step: Callable[..., Any]
  decode: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """`fn(*args, params, tokens, cache, index)`: a model's step with its static
  leading arguments (the config), equal by value, so the jitted decode loop
  compiles once per model and shape rather than once per call."""

  fn: Callable[..., Any]
  args: tuple = ()

  def __call__(self, params, tokens, cache, index):
    return self.fn(*self.args, params, tokens, cache, index)


def intify(d):
  """Pure dicts may come with string layer indices ("3"); nnx uses ints."""
  if isinstance(d, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): intify(v)
            for k, v in d.items()}
  return d


def model_api(model_cls: type):
  """`(graphdef, abstract_state, as_state, model_from_params)` of `model_cls(config, rngs=)`.

  * `graphdef(config)`: the `nnx.GraphDef` (cached per config);
  * `abstract_state(config)`: the parameter `nnx.State` with
    `jax.ShapeDtypeStruct` leaves;
  * `as_state(config, params)`: an `nnx.State` from a state or its pure dict
    (leaves may be QArrays);
  * `model_from_params(config, params)`: a stateful module holding `params`.
  """
  @functools.lru_cache(maxsize=32)
  def split_abstract(config):
    return nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0))))

  def graphdef(config):
    return split_abstract(config)[0]

  def abstract_state(config) -> nnx.State:
    return split_abstract(config)[1]

  def as_state(config, params: Any) -> nnx.State:
    if isinstance(params, nnx.State):
      return params
    state = jax.tree.map(lambda x: x, abstract_state(config))
    nnx.replace_by_pure_dict(state, intify(params))
    return state

  def model_from_params(config, params: Any):
    return nnx.merge(graphdef(config), as_state(config, params))

  for f, doc in ((graphdef, f"The `nnx.GraphDef` of a `{model_cls.__name__}` with this config."),
                 (abstract_state, "The parameter `nnx.State` of this config with "
                                  "`jax.ShapeDtypeStruct` leaves."),
                 (as_state, "Accepts an `nnx.State` or its pure dict; returns an `nnx.State`."),
                 (model_from_params, f"A stateful `{model_cls.__name__}` holding `params` "
                                     "(arrays or QArrays).")):
    f.__doc__ = doc
  return graphdef, abstract_state, as_state, model_from_params


def sample(logits, key, temperature: float, top_k: int | None):
  """Greedy (`temperature <= 0`) or temperature / top-k sampling of `[B, V]` logits."""
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode_impl(step, n, temperature, top_k, eos, params, logits, cache, start, key):
  """The device loop of `decode_tokens` (static: step, n, temperature, top_k, eos)."""
  b = logits.shape[0]
  key, sub = jax.random.split(key)
  tok = sample(logits, sub, temperature, top_k)
  out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok)
  done = jnp.zeros((b,), bool) if eos is None else tok == eos

  def cond(c):
    i, _, _, _, _, done = c
    return (i < n) & ~jnp.all(done)

  def body(c):
    i, tok, cache, key, out, done = c
    logits, cache = step(params, tok[:, None], cache, start + i - 1)
    key, sub = jax.random.split(key)
    nxt = sample(logits, sub, temperature, top_k)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    if eos is not None:
      done = done | (nxt == eos)
    return i + 1, nxt, cache, key, out, done

  count, _, cache, _, out, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), tok, cache, key, out, done))
  return out, count, cache


_decode_jit = dispatch.routed_jit(_decode_impl, static_argnums=(0, 1, 2, 3, 4),
                                  donate_argnums=(7,))


def decode_tokens(step: Callable, params: Any, logits: jax.Array, cache: Any, start: Any,
                  n: int, *, temperature: float = 0.0, top_k: int | None = None,
                  key: jax.Array | None = None, eos_token_id: int | None = None
                  ) -> tuple[jax.Array, jax.Array, Any]:
  """Up to `n` new tokens from the logits of position `start - 1`, on the device.

  One jitted `lax.while_loop`: sample a token from `logits` (greedy when
  `temperature <= 0`; otherwise the same key splits as `generate_loop`'s
  host loop), feed it to `step(params, tokens [B, 1], cache, index)` at
  position `start + i`, repeat; stop after `n` tokens or once every row has
  produced `eos_token_id`. `step` must be hashable and equal by value across
  calls for the compiled loop to be reused (a module-level jitted function,
  or a `BoundStep`). The cache is donated.

  Returns:
    `(tokens [B, n] int32, count, cache)`: the first `count` columns of
    `tokens` are the generated ones.
  """
  if n < 1:
    raise ValueError(f"decode_tokens needs n >= 1 new tokens, got {n}")
  if key is None:
    key = jax.random.key(0)
  return _decode_jit(step, int(n), float(temperature), top_k,
                     None if eos_token_id is None else int(eos_token_id), params, logits, cache,
                     jnp.asarray(start, jnp.int32), key)


def make_decoder(step: Callable, init_cache: Callable, as_state: Callable, config: Any
                 ) -> Decoder:
  """A model's `Decoder` from its jitted `step(config, params, tokens, cache, index)`,
  `init_cache(config, batch, max_len)` and `as_state(config, params)`."""
  bound = BoundStep(step, (config,))

  def init(batch: int, max_len: int):
    return init_cache(config, batch, max_len)

  def step_fn(params, tokens, cache, index):
    return step(config, as_state(config, params), tokens, cache, index)

  def decode(params, logits, cache, index, n: int):
    toks, _, cache = decode_tokens(bound, as_state(config, params), logits, cache, index, n)
    return toks, cache

  return Decoder(init, step_fn, decode)


def _hashable_step(step: Callable) -> Callable | None:
  """`step` as a static argument for the decode loop, or None when it is not one."""
  if isinstance(step, functools.partial) and not step.keywords:
    step = BoundStep(step.func, tuple(step.args))
  try:
    hash(step)
  except TypeError:
    return None
  return step


def generate_loop(step: Callable, init_cache: Callable, params: Any, prompt: Any,
                  max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                  seed: int = 0, eos_token_id: int | None = None,
                  device_loop: bool = True) -> np.ndarray:
  """Autoregressive decoding with a KV cache.

  `step(params, tokens [B, T], cache, index)` returns the last position's
  logits `[B, V]` and the cache; `init_cache(batch, max_len)` an empty cache.
  Returns `[B, T + n]` int32 numpy (the prompt followed by the new tokens);
  stops early once every row has produced `eos_token_id`. With `device_loop`
  (the default) the decode steps run in one jitted loop (`decode_tokens`);
  otherwise one jitted step per token from Python (the same tokens; kept as
  the reference the device loop is tested against).
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim == 1:
    prompt = prompt[None]
  b, t = prompt.shape
  cache = init_cache(b, t + max_new_tokens)
  key = jax.random.key(seed)
  logits, cache = step(params, jnp.asarray(prompt), cache, jnp.int32(0))
  if max_new_tokens <= 0:
    return prompt
  static_step = _hashable_step(step) if device_loop else None
  if static_step is not None:
    toks, count, _ = decode_tokens(static_step, params, logits, cache, t, max_new_tokens,
                                   temperature=temperature, top_k=top_k, key=key,
                                   eos_token_id=eos_token_id)
    return np.concatenate([prompt, np.asarray(toks)[:, :int(count)]], axis=1)
  out = [prompt]
  done = np.zeros((b,), bool)
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    nxt = sample(logits, sub, temperature, top_k)
    nxt_np = np.asarray(nxt)
    out.append(nxt_np[:, None])
    if eos_token_id is not None:
      done |= nxt_np == eos_token_id
      if done.all():
        break
    if i + 1 == max_new_tokens:
      break
    logits, cache = step(params, nxt[:, None], cache, jnp.int32(t + i))
  return np.concatenate(out, axis=1)


def consumers_regex(groups: list) -> str:
  """Regex (fullmatch) of every consumer of `groups`: the weights whose input scales fold."""
  import re
  return "|".join(re.escape(c) for g in groups for c in g.consumers)


# ----------------------------------------------------------------------------
# Attention.

# Queries per block of the causal path. Measured on the 2-core CPU (SmolLM2's
# shapes, batch 8 x 512, 9 query / 3 key-value heads of 64): the attention of
# one layer took 340 ms with one [T, S] score tensor per head in the
# [B, Hkv, G, T, S] layout, 200 ms with the query heads of a group stacked
# into one matrix per key-value head, and 105 ms in blocks of 64 or 128
# queries that skip the keys after the block (118 ms at 256).
ATTN_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class Causal:
  """The mask of a forward pass without a cache: query i sees keys 0..i (and,
  with `window`, only the `window` most recent of them, itself included)."""

  window: int | None = None


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """`cap * tanh(x / cap)` (Gemma's logit soft-capping); `x` when `cap` is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def _attend_block(qg, k, v, mask, scale, cap):
  """qg `[B, Hkv, G, C, D]`, k/v `[B, Hkv, S, D]`, mask `[B, C, S]` -> `[B, Hkv, G, C, D]`."""
  b, hk, g, c, d = qg.shape
  scores = jnp.einsum("bkqd,bksd->bkqs", qg.reshape(b, hk, g * c, d), k,
                      preferred_element_type=jnp.float32).reshape(b, hk, g, c, -1) * scale
  scores = softcap(scores, cap)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype).reshape(b, hk, g * c, -1)
  return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, hk, g, c, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, *, scale: float,
           cap: float | None = None, chunk: int = ATTN_CHUNK) -> jax.Array:
  """Grouped-query softmax attention: `q` `[B, T, H, D]`, `k`/`v` `[B, S, Hkv, D]`.

  Scores are float32 (`scale * q.k`, soft-capped when `cap` is set), masked,
  softmaxed and cast to `q`'s dtype before the product with `v`. `mask` is a
  boolean `[B, T, S]` (any pattern, e.g. a KV cache's), or `Causal(window)`
  for a forward pass without a cache (`S == T`, query i at position i): the
  queries then go in blocks of `chunk`, each against the keys up to its own
  end, which skips the masked upper triangle (the same result: masked scores
  contribute exact zeros to the softmax).

  Returns `[B, T, H * D]`.
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  if h % hk:
    raise ValueError(f"attend: {h} query heads do not group over {hk} key-value heads "
                     f"(q {q.shape}, k {k.shape})")
  qg = q.reshape(b, t, hk, h // hk, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
  kt = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
  vt = v.astype(q.dtype).transpose(0, 2, 1, 3)
  if isinstance(mask, Causal):
    if k.shape[1] != t:
      raise ValueError(f"attend: a causal mask needs as many keys as queries, got q {q.shape} "
                       f"and k {k.shape}")
    pos = jnp.arange(t, dtype=jnp.int32)
    outs = []
    for lo in range(0, t, chunk):
      hi = min(t, lo + chunk)
      qp, kp = pos[lo:hi, None], pos[None, :hi]
      m = kp <= qp
      if mask.window is not None:
        m = m & (qp - kp < mask.window)
      m = jnp.broadcast_to(m[None], (b, hi - lo, hi))
      outs.append(_attend_block(qg[:, :, :, lo:hi], kt[:, :, :hi], vt[:, :, :hi], m, scale,
                                cap))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  else:
    out = _attend_block(qg, kt, vt, mask, scale, cap)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)
