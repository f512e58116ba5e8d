"""Models written the way users of other JAX frameworks write them: no quantjax inside.

The same byte-level language-model task as `user_models` (CPython's pydoc text,
a few hundred Adam steps), in two frameworks that are not Flax:

* `EqxLM`: Equinox. The model is an `eqx.Module` pytree of `eqx.nn.Embedding`,
  `eqx.nn.LayerNorm`, `eqx.nn.MultiheadAttention` (causal mask), `eqx.nn.Linear`
  MLPs and an `eqx.nn.RMSNorm`; layers act on one example (`[T, d]`, `vmap` over
  positions inside, over the batch outside) and `Linear` stores its weight
  `[out, in]`. The user splits it with `eqx.partition(model, eqx.is_array)` and
  calibrates `fn(params, x) = vmap(combine(params, static))(x)`.
* `keras_lm`: Keras 3 on the JAX backend, a functional model with `Embedding`,
  `MultiHeadAttention` (its projections are `EinsumDense` kernels `[d, heads, hd]`
  and `[heads, hd, d]`), `Dense` MLPs and `LayerNormalization`. Trained and
  calibrated through `model.stateless_call` on the list of trainable variables'
  values; the params paths are then list indices "0", "1", ...
"""

from __future__ import annotations

import functools
import os
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

from tests.methods import user_models
from tests.methods.user_models import VOCAB


def _import_keras_on_jax():
  """`keras`, on the JAX backend: the backend is read once, when keras is first imported."""
  if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"
  import keras
  if keras.backend.backend() != "jax":
    # Imported earlier with another backend: switch (keras reloads its modules).
    keras.config.set_backend("jax")
    import keras
  assert keras.backend.backend() == "jax", keras.backend.backend()
  return keras


keras = _import_keras_on_jax()


# ----------------------------------------------------------------------------
# Equinox.


class EqxBlock(eqx.Module):
  norm1: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  up: eqx.nn.Linear
  down: eqx.nn.Linear

  def __init__(self, d: int, heads: int, *, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.norm1 = eqx.nn.LayerNorm(d)
    self.attn = eqx.nn.MultiheadAttention(heads, d, use_query_bias=True, use_key_bias=True,
                                          use_value_bias=True, use_output_bias=True, key=k1)
    self.norm2 = eqx.nn.LayerNorm(d)
    self.up = eqx.nn.Linear(d, 4 * d, key=k2)
    self.down = eqx.nn.Linear(4 * d, d, key=k3)

  def __call__(self, x):  # x: [T, d], one example
    t = x.shape[0]
    h = jax.vmap(self.norm1)(x)
    x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((t, t), bool)))
    h = jax.vmap(self.norm2)(x)
    return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))


class EqxLM(eqx.Module):
  embed: eqx.nn.Embedding
  pos: jax.Array
  blocks: list
  norm: eqx.nn.RMSNorm
  head: eqx.nn.Linear

  def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, max_len: int = 64, *, key):
    ke, kp, kh, *kb = jax.random.split(key, 3 + layers)
    self.embed = eqx.nn.Embedding(VOCAB, d, key=ke)
    self.pos = 0.02 * jax.random.normal(kp, (max_len, d))
    self.blocks = [EqxBlock(d, heads, key=k) for k in kb]
    self.norm = eqx.nn.RMSNorm(d)
    self.head = eqx.nn.Linear(d, VOCAB, key=kh)

  def __call__(self, tokens):  # tokens: [T] int, one example -> [T, VOCAB]
    x = jax.vmap(self.embed)(tokens) + self.pos[:tokens.shape[0]]
    for b in self.blocks:
      x = b(x)
    return jax.vmap(self.head)(jax.vmap(self.norm)(x))


# ----------------------------------------------------------------------------
# Keras 3 (JAX backend).


def keras_lm(d: int = 64, heads: int = 4, layers: int = 2):
  keras.utils.set_random_seed(0)
  L = keras.layers
  tokens = keras.Input((None,), dtype="int32")
  x = L.Embedding(VOCAB, d, name="embed")(tokens)
  for i in range(layers):
    h = L.LayerNormalization(name=f"ln1_{i}")(x)
    x = x + L.MultiHeadAttention(heads, d // heads, name=f"attn_{i}")(h, h, use_causal_mask=True)
    h = L.LayerNormalization(name=f"ln2_{i}")(x)
    h = L.Dense(4 * d, activation="gelu", name=f"up_{i}")(h)
    x = x + L.Dense(d, name=f"down_{i}")(h)
  logits = L.Dense(VOCAB, name="head")(L.LayerNormalization(name="ln_f")(x))
  return keras.Model(tokens, logits)


# ----------------------------------------------------------------------------
# Training (the same data and loop as `user_models`).


@functools.lru_cache(maxsize=None)
def trained(name: str, steps: int = 300):
  """`(fn, params, loss, extra)` of a model trained on the text's first 80%.

  "eqx": `extra` is the static half of the partitioned module.
  "keras": `extra` is the `keras.Model`; `params` is the list of its trainable
  variables' values, `fn(tv, x) = model.stateless_call(tv, ntv, x)[0]`.
  """
  data = user_models.text_bytes()
  data = data[: int(0.8 * len(data))]
  if name == "eqx":
    params, extra = eqx.partition(EqxLM(key=jax.random.key(0)), eqx.is_array)

    def fn(p, tokens):
      return jax.vmap(eqx.combine(p, extra))(tokens)
  elif name == "keras":
    extra = keras_lm()
    params = [v.value for v in extra.trainable_variables]
    ntv = [v.value for v in extra.non_trainable_variables]

    def fn(tv, tokens):
      return extra.stateless_call(tv, ntv, tokens)[0]
  else:
    raise ValueError(name)
  params, loss = user_models.train(lambda p, b: user_models.xent(fn(p, b[:, :-1]), b), params,
                                    data, steps, seed=1)
  return fn, params, loss, extra


def keras_paths(model, pattern: str) -> str:
  """A rule regex over `stateless_call`'s list indices: the trainable variables whose
  Keras path (e.g. "attn_0/query/kernel") fully matches `pattern`."""
  idx = [str(i) for i, v in enumerate(model.trainable_variables) if re.fullmatch(pattern, v.path)]
  assert idx, pattern
  return "|".join(idx)
