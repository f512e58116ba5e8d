"""The jitted SparseGPT against the numpy float64 loop it replaced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import sparsity as sp
from quantjax.rules import PruneRule
from quantjax.sparsity import sparsegpt as sg
from tests.sparsity.sparsegpt_reference import sparsegpt_prune_reference


def _problem(seed, k=200, out=48, rows=512, dead=(3, 77)):
  """Correlated, unevenly scaled inputs (some never active) and a random weight."""
  rng = np.random.default_rng(seed)
  mix = np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k)
  x = (rng.standard_normal((rows, k)) @ mix * np.exp(np.linspace(-1, 1.5, k))).astype(np.float32)
  x[:, list(dead)] = 0.0
  h = (2.0 * x.T.astype(np.float64) @ x / rows).astype(np.float32)
  w = (rng.standard_normal((k, out)) / np.sqrt(k)).astype(np.float32)
  return x, w, h


def _blocks(k, block):
  return [(i, min(i + block, k)) for i in range(0, k, block)]


PATTERNS = [
    dict(sparsity=0.5, block_size=64),  # 200 = 3 x 64 + a block of 8
    dict(sparsity=0.7),  # 128 + a block of 72
    dict(sparsity=0.25, block_size=50),  # 4 x 50, no short block
    dict(n=2, m=4, block_size=64),
    dict(n=1, m=4),
    dict(n=4, m=8, block_size=30),  # rounded down to 24
]


@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_reference(kw, seed):
  x, w, h = _problem(seed)
  new = sp.sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), **kw)
  ref = sparsegpt_prune_reference(w, h, **kw)
  keep, keep_ref = np.asarray(new.mask), np.asarray(ref.mask)
  wn, wr = np.asarray(new.weight), np.asarray(ref.weight)
  assert new.weight.dtype == jnp.float32 and new.mask.dtype == jnp.bool_
  # Same masks (a float32 / float64 difference can only flip a near-tie; none here).
  np.testing.assert_array_equal(keep, keep_ref)
  np.testing.assert_array_equal(wn[~keep], 0.0)
  np.testing.assert_array_equal(wn[[3, 77]], 0.0)  # dead inputs
  # float32 against float64 reconstruction: relative 1e-7 measured.
  assert np.linalg.norm(wn - wr) <= 1e-5 * np.linalg.norm(wr)
  err = lambda v: np.linalg.norm(x.astype(np.float64) @ (w - v))  # noqa: E731
  assert err(wn) <= err(wr) * (1 + 1e-5)
  assert err(wn) < err(np.where(keep, w, 0.0))  # the OBS update helps
  if "n" in kw:
    assert np.all(keep.reshape(-1, kw["m"], w.shape[1]).sum(1) == kw["n"])
  else:
    for i1, i2 in _blocks(w.shape[0], kw.get("block_size", 128)):
      pruned = int((~keep[i1:i2]).sum())
      assert pruned == int((i2 - i1) * w.shape[1] * kw["sparsity"]), (i1, i2)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, block_size=16), dict(sparsity=0.3),
                                dict(n=2, m=4, block_size=16), dict(n=1, m=4), dict(n=3, m=4)],
                         ids=str)
def test_exact_ties_resolved_as_the_reference(kw):
  # Weights on a coarse grid and a diagonal Hessian with one value: equal scores
  # everywhere and no update moving them apart.
  rng = np.random.default_rng(3)
  w = rng.integers(-2, 3, size=(40, 12)).astype(np.float32)
  h = 3.0 * np.eye(40, dtype=np.float32)
  h[5, 5] = 0.0  # a dead input as well
  new = sp.sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), **kw)
  ref = sparsegpt_prune_reference(w, h, **kw)
  np.testing.assert_array_equal(np.asarray(new.mask), np.asarray(ref.mask))
  np.testing.assert_allclose(np.asarray(new.weight), np.asarray(ref.weight), atol=1e-6)
  if "sparsity" in kw:
    keep = np.asarray(new.mask)
    for i1, i2 in _blocks(40, kw.get("block_size", 128)):
      assert int((~keep[i1:i2]).sum()) == int((i2 - i1) * 12 * kw["sparsity"])


def test_one_executable_per_shape_and_pattern():
  _, w, h = _problem(4, k=72, out=20, dead=())
  fac = sg.inverse_factor(h)
  before = sg._sparsegpt_loop._cache_size()
  a = sp.sparsegpt_prune(w, fac, n=2, m=4)
  b = sp.sparsegpt_prune(-2.0 * w, fac, n=2, m=4)  # another layer of the same shape
  assert sg._sparsegpt_loop._cache_size() == before + 1
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  sp.sparsegpt_prune(w, fac, sparsity=0.5)
  assert sg._sparsegpt_loop._cache_size() == before + 2
  # The factor given or computed inside: the same result.
  c = sp.sparsegpt_prune(w, h, n=2, m=4)
  np.testing.assert_array_equal(np.asarray(a.weight), np.asarray(c.weight))


def test_prune_calibrated_factors_each_input_once(monkeypatch):
  rng = np.random.default_rng(5)
  params = {"q": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
            "k": jnp.asarray(rng.standard_normal((32, 8)), jnp.float32),
            "o": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}

  def fn(p, x):
    a = x @ p["q"]
    b = x @ p["k"]
    return jnp.tanh(a) @ p["o"] + jnp.sum(b)

  batches = [jnp.asarray(rng.standard_normal((64, 32)), jnp.float32) for _ in range(2)]
  calls = []
  real = sg.inverse_factor
  monkeypatch.setattr(sg, "inverse_factor", lambda h, p=0.01: calls.append(h.shape) or real(h, p))
  pruned, masks = sp.prune_calibrated(fn, params, batches, [PruneRule(module_path=".*", n=2, m=4)],
                                      sp.SparseGPT(), progress=False)
  assert sorted(calls) == [(16, 16), (32, 32)]  # q and k share their input
  for name in params:
    keep = np.asarray(masks[name])
    assert np.all(keep.reshape(-1, 4, keep.shape[1]).sum(1) == 2)
    np.testing.assert_array_equal(np.asarray(pruned[name])[~keep], 0.0)


def test_bad_input():
  with pytest.raises(ValueError, match="NaN/Inf value"):
    sp.sparsegpt_prune(jnp.ones((8, 4)).at[2, 1].set(jnp.inf), jnp.eye(8), sparsity=0.5)
  with pytest.raises(ValueError, match=r"w \[in, out\] and h \[in, in\]"):
    sp.sparsegpt_prune(jnp.ones((8, 4)), sg.inverse_factor(jnp.eye(6)), sparsity=0.5)
  with pytest.raises(ValueError, match="square Hessian"):
    sg.inverse_factor(jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="not positive definite"):
    sg.inverse_factor(-jnp.eye(4))
  with pytest.raises(ValueError, match="N:M 2:4 does not fit"):
    sp.sparsegpt_prune(jnp.ones((6, 4)), jnp.eye(6), n=2, m=4)
