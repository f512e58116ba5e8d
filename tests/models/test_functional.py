"""The shared attention: the blocked causal path equals the explicit-mask path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax.models import functional


def _qkv(b, t, h, hk, d, seed=0):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(r.standard_normal(s), jnp.float32)
               for s in ((b, t, h, d), (b, t, hk, d), (b, t, hk, d)))


def _explicit(t, window=None):
  q, k = np.arange(t)[:, None], np.arange(t)[None, :]
  m = k <= q
  if window is not None:
    m &= q - k < window
  return m


def _reference(q, k, v, mask, scale, cap=None):
  """Textbook attention in float64 numpy, heads repeated for GQA."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) * scale
  if cap is not None:
    s = cap * np.tanh(s / cap)
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", p, v)
  return out.reshape(out.shape[0], out.shape[1], -1)


@pytest.mark.parametrize("t,chunk,window,heads,cap", [
    (37, 8, None, (6, 2), None),     # chunks that do not divide T, GQA
    (64, 16, 5, (4, 1), None),       # a window shorter than a chunk, one KV head
    (50, 16, 20, (3, 3), 30.0),      # a window spanning chunks, MHA, soft-cap
    (12, 128, None, (2, 1), None),   # one chunk
])
def test_blocked_causal_equals_the_explicit_mask(t, chunk, window, heads, cap):
  h, hk = heads
  q, k, v = _qkv(2, t, h, hk, 8)
  scale = 1 / math.sqrt(8)
  mask = np.broadcast_to(_explicit(t, window)[None], (2, t, t))
  blocked = functional.attend(q, k, v, functional.Causal(window), scale=scale, cap=cap,
                              chunk=chunk)
  explicit = functional.attend(q, k, v, jnp.asarray(mask), scale=scale, cap=cap)
  assert blocked.shape == (2, t, h * 8)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(explicit), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(explicit), _reference(q, k, v, mask, scale, cap),
                             rtol=1e-4, atol=1e-5)
  jitted = jax.jit(lambda q, k, v: functional.attend(q, k, v, functional.Causal(window),
                                                      scale=scale, cap=cap, chunk=chunk))
  np.testing.assert_allclose(np.asarray(jitted(q, k, v)), np.asarray(blocked), rtol=1e-6,
                             atol=1e-7)


def test_bad_shapes_name_both():
  q, k, v = _qkv(1, 8, 4, 3, 8)
  with pytest.raises(ValueError, match=r"4 query heads .* 3 key-value heads"):
    functional.attend(q, k, v, functional.Causal(), scale=1.0)
  q, k, v = _qkv(1, 8, 4, 2, 8)
  with pytest.raises(ValueError, match="causal mask needs as many keys as queries"):
    functional.attend(q, k[:, :5], v[:, :5], functional.Causal(), scale=1.0)
