"""Models written the way a user writes them: stock Flax, no quantjax inside.

Byte-level language models (vocabulary 256) on CPython's own documentation
text, small enough to train for a few hundred steps in the test session, so
that their weights (and activations) are not random:

* `GPT2`: linen; fused QKV `nn.DenseGeneral` (kernel `[d, 3, heads, hd]`),
  an output `nn.DenseGeneral` contracting two axes, LayerNorm with bias,
  GELU MLP, learned positions, untied head.
* `EinsumLM`: NNX; every projection an `nnx.Einsum`.
* `ScanLM`: linen; the blocks under `nn.scan`, weights stacked `[L, ...]`.
* `ConvLM`: linen; causal 1-D `nn.Conv` layers.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB = 256


def text_bytes() -> np.ndarray:
  from pydoc_data.topics import topics
  text = "\n\n".join(topics[k] for k in sorted(topics))
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def windows(data: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
  starts = np.random.default_rng(seed).integers(0, len(data) - length, size=n)
  return np.stack([data[s:s + length] for s in starts])


def _causal_attention(q, k, v):
  # q, k, v: [B, T, H, D]
  t = q.shape[1]
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  mask = jnp.tril(jnp.ones((t, t), bool))
  s = jnp.where(mask, s, -1e9)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v)


class GPT2Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    hd = self.d // self.heads
    h = nn.LayerNorm()(x)
    qkv = nn.DenseGeneral(features=(3, self.heads, hd), name="qkv")(h)
    a = _causal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    x = x + nn.DenseGeneral(features=self.d, axis=(-2, -1), name="proj")(a)
    h = nn.LayerNorm()(x)
    h = nn.gelu(nn.Dense(4 * self.d, name="fc")(h))
    return x + nn.Dense(self.d, name="out")(h)


class GPT2(nn.Module):
  d: int = 64
  heads: int = 4
  layers: int = 2
  max_len: int = 64

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.d, name="wte")(tokens)
    pos = self.param("wpe", nn.initializers.normal(0.02), (self.max_len, self.d))
    x = x + pos[None, :tokens.shape[1]]
    for i in range(self.layers):
      x = GPT2Block(self.d, self.heads, name=f"h_{i}")(x)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm()(x))


class EinsumBlock(nnx.Module):
  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    hd = d // heads
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.q = nnx.Einsum("btd,dhk->bthk", (d, heads, hd), rngs=rngs)
    self.k = nnx.Einsum("btd,dhk->bthk", (d, heads, hd), rngs=rngs)
    self.v = nnx.Einsum("btd,dhk->bthk", (d, heads, hd), rngs=rngs)
    self.o = nnx.Einsum("bthk,hkd->btd", (heads, hd, d), rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (d, 4 * d), rngs=rngs)
    self.down = nnx.Einsum("btf,fd->btd", (4 * d, d), rngs=rngs)

  def __call__(self, x):
    h = self.norm1(x)
    x = x + self.o(_causal_attention(self.q(h), self.k(h), self.v(h)))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class EinsumLM(nnx.Module):
  def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
    self.blocks = nnx.List([EinsumBlock(d, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Einsum("btd,dv->btv", (d, VOCAB), rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for b in self.blocks:
      x = b(x)
    return self.head(self.norm(x))


class ScanBlock(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    hd = self.d // self.heads
    h = nn.LayerNorm()(x)
    q = nn.DenseGeneral((self.heads, hd), name="q")(h)
    k = nn.DenseGeneral((self.heads, hd), name="k")(h)
    v = nn.DenseGeneral((self.heads, hd), name="v")(h)
    x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="o")(_causal_attention(q, k, v))
    h = nn.gelu(nn.Dense(4 * self.d, name="up")(nn.LayerNorm()(x)))
    return x + nn.Dense(self.d, name="down")(h), None


class ScanLM(nn.Module):
  d: int = 64
  heads: int = 4
  layers: int = 3

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.d)(tokens)
    stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.layers)
    x, _ = stack(self.d, self.heads, name="blocks")(x, None)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


class ConvLM(nn.Module):
  d: int = 64
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.d)(tokens)
    for i in range(self.layers):
      h = nn.Conv(self.d, kernel_size=(4,), padding=[(3, 0)], name=f"conv_{i}")(x)
      x = x + nn.gelu(h)
    return nn.Dense(VOCAB, name="head")(x)


def train(loss_of, params, data, steps: int, seed: int):
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, batch):
    loss, g = jax.value_and_grad(loss_of)(p, batch)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    starts = rng.integers(0, len(data) - 65, size=16)
    batch = jnp.asarray(np.stack([data[s:s + 65] for s in starts]))
    params, state, loss = step(params, state, batch)
  return params, float(loss)


def xent(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@functools.lru_cache(maxsize=None)
def trained(name: str, steps: int = 300):
  """`(fn, params, loss)` of a model trained on the text's first 80%."""
  data = text_bytes()
  data = data[: int(0.8 * len(data))]
  if name == "einsum":
    model = EinsumLM(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def fn(st, tokens):
      return nnx.merge(graphdef, st)(tokens)
    params = state
  else:
    module = {"gpt2": GPT2(), "scan": ScanLM(), "conv": ConvLM()}[name]
    params = module.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))

    def fn(v, tokens):
      return module.apply(v, tokens)
  params, loss = train(lambda p, b: xent(fn(p, b[:, :-1]), b), params, data, steps, seed=1)
  return fn, params, loss


def held_out(n: int = 8, length: int = 64, seed: int = 7) -> np.ndarray:
  data = text_bytes()
  return windows(data[int(0.8 * len(data)):], n, length, seed)


def calibration(n: int = 16, length: int = 64, seed: int = 3) -> list[np.ndarray]:
  data = text_bytes()
  w = windows(data[: int(0.8 * len(data))], n, length, seed)
  return [w[i:i + 4] for i in range(0, n, 4)]
