import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax import sparsity as sp
from quantjax.eval import memory
from quantjax.methods import gptq


def _layer(seed=0, n=2048, k=128, out=64):
  """A linear layer with correlated, unevenly scaled inputs (like LLM activations)."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  mix = jax.random.normal(k1, (k, k)) / jnp.sqrt(k)
  x = jax.random.normal(k2, (n, k)) @ (jnp.eye(k) + mix) * jnp.exp(jnp.linspace(-1, 1.5, k))
  w = jax.random.normal(k3, (k, out)) / jnp.sqrt(k)
  return x, w


def test_magnitude_mask_unstructured_and_per_output():
  w = jax.random.normal(jax.random.key(0), (64, 8))
  m = sp.magnitude_mask(w, 0.75)
  assert int(m.sum()) == 128
  assert float(jnp.min(jnp.abs(w)[m])) >= float(jnp.max(jnp.abs(w)[~m]))
  m0 = sp.magnitude_mask(w, 0.5, axis=0)
  np.testing.assert_array_equal(np.asarray(m0.sum(0)), np.full(8, 32))
  with pytest.raises(ValueError, match="sparsity"):
    sp.magnitude_mask(w, 1.0)


def test_nm_mask_and_compressed_storage():
  w = jax.random.normal(jax.random.key(1), (64, 24)).astype(jnp.float16)
  mask = sp.nm_mask(w, 2, 4)
  g = np.asarray(mask).reshape(16, 4, 24)
  assert np.all(g.sum(1) == 2)
  kept = np.abs(np.asarray(w, np.float32)).reshape(16, 4, 24)
  assert np.all(np.where(g, kept, np.inf).min(1) >= np.where(g, -np.inf, kept).max(1))
  c = sp.compress_nm(w, mask, 2, 4)
  np.testing.assert_array_equal(np.asarray(c.dense()), np.asarray(jnp.where(mask, w, 0)))
  dense_bytes = w.size * 2
  assert c.nbytes == dense_bytes // 2 + w.size // 4 // 2  # half the values + 2 bits per kept value
  assert memory.tree_bytes({"w": c}) == c.nbytes
  assert memory.tree_param_count({"w": c}) == w.size
  assert memory.bits_per_weight({"w": c}) == pytest.approx(9.0)
  assert c.nbytes / dense_bytes == pytest.approx(9 / 16)
  out = jax.jit(lambda cc: cc.dense())(c)
  assert out.shape == w.shape
  with pytest.raises(ValueError, match="multiple of 4"):
    sp.nm_mask(jnp.ones((10, 3)), 2, 4)
  with pytest.raises(ValueError, match="not 2:4"):
    sp.compress_nm(w, jnp.ones(w.shape, bool), 2, 4)


def test_prune_params_rules_and_masks_on_nnx():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(64, 32, rngs=rngs)
      self.b = nnx.Linear(32, 16, rngs=rngs)
  state = nnx.state(Net(nnx.Rngs(0)))
  rules = [qj.PruneRule(module_path="a/kernel", sparsity=0.5),
           qj.PruneRule(module_path="b/kernel", n=2, m=4)]
  pruned, masks = sp.prune_params(state, rules)
  pa = nnx.to_pure_dict(pruned)
  assert float(jnp.mean(pa["a"]["kernel"] == 0)) == pytest.approx(0.5)
  assert sp.sparsity_of(None, masks) == pytest.approx(0.5)
  assert float(jnp.mean(pa["b"]["kernel"] == 0)) == pytest.approx(0.5)
  # masks stay enforced after an update
  bumped = jax.tree.map(lambda p: p + 1.0, pruned)
  again = nnx.to_pure_dict(sp.apply_masks(bumped, masks))
  np.testing.assert_array_equal(np.asarray(again["a"]["kernel"] == 0),
                                np.asarray(pa["a"]["kernel"] == 0))
  with pytest.warns(UserWarning, match="matched no leaf"):
    sp.prune_params(state, rules + [qj.PruneRule(module_path="zzz", sparsity=0.1)])


def test_wanda_beats_magnitude_on_uneven_inputs():
  x, w = _layer()
  norms = sp.wanda.input_norms(x)
  err = {}
  for name, mask in {"magnitude": sp.magnitude_mask(w, 0.5, axis=0),
                     "wanda": sp.wanda_mask(w, norms, sparsity=0.5)}.items():
    err[name] = float(jnp.linalg.norm(x @ w - x @ jnp.where(mask, w, 0)))
  assert err["wanda"] < 0.8 * err["magnitude"]
  nm = sp.wanda_mask(w, norms, n=2, m=4)
  assert np.all(np.asarray(nm).reshape(-1, 4, w.shape[1]).sum(1) == 2)


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda(kind):
  x, w = _layer(seed=3)
  stat = gptq.hessian_update(gptq.hessian_init(w.shape[0]), x)
  h = gptq.hessian(stat)
  norms = sp.wanda.input_norms(x)
  if kind == "2:4":
    res = sp.sparsegpt_prune(w, h, n=2, m=4)
    wmask = sp.wanda_mask(w, norms, n=2, m=4)
    assert np.all(np.asarray(res.mask).reshape(-1, 4, w.shape[1]).sum(1) == 2)
  else:
    res = sp.sparsegpt_prune(w, h, sparsity=0.5)
    wmask = sp.wanda_mask(w, norms, sparsity=0.5)
    assert float(jnp.mean(res.mask)) == pytest.approx(0.5, abs=1e-3)
  assert bool(jnp.all(jnp.where(res.mask, True, res.weight == 0)))
  err = lambda v: float(jnp.linalg.norm(x @ w - x @ v))  # noqa: E731
  e_sg, e_wanda = err(res.weight), err(jnp.where(wmask, w, 0))
  e_mask_only = err(jnp.where(res.mask, w, 0))
  # the OBS update is what helps: same mask without it is clearly worse
  # (measured on this layer: unstructured 0.82x, 2:4 0.94x of the mask-only error)
  ratio = 0.9 if kind == "unstructured" else 0.97
  assert e_sg < ratio * e_mask_only and e_sg < ratio * e_wanda


def test_sparsegpt_bad_input():
  with pytest.raises(ValueError, match=r"w \[in, out\] and h \[in, in\]"):
    sp.sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(4), sparsity=0.5)
  with pytest.raises(ValueError, match="sparsity"):
    sp.sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(8))
  with pytest.raises(ValueError, match="NaN"):
    sp.sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(8).at[0, 0].set(jnp.nan), sparsity=0.5)
