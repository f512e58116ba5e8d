import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax.io import checkpoint


def _tree():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"layers": [{"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros(32)},
                       {"kernel": jax.random.normal(k[1], (32, 16)), "bias": jnp.ones(16)}],
            "head": {"w": jax.random.normal(k[2], (64, 8))}}
  rules = [qj.QuantRule(module_path=r"layers/0/kernel", format="int4_g32_asym"),
           qj.QuantRule(module_path=r"layers/1/kernel", format="int3_g32"),
           qj.QuantRule(module_path=r"head/w", format="int8", act_format="int8")]
  return qj.quantize_params(params, rules)


def _assert_same(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_with_qarrays(tmp_path):
  q = _tree()
  path = checkpoint.save_params(tmp_path / "ckpt", q)
  r = checkpoint.restore_params(path)
  _assert_same(q, r)
  assert r["layers"][0]["kernel"].fmt == q["layers"][0]["kernel"].fmt
  # integer dict keys (nnx lists as pure dicts) come back as integers
  checkpoint.save_params(tmp_path / "ints", {"layers": {0: jnp.ones(2), 1: jnp.zeros(2)}})
  assert set(checkpoint.restore_params(tmp_path / "ints")["layers"]) == {0, 1}
  assert qj.tree_bytes(r) == qj.tree_bytes(q)
  # packed codes are stored as they are: the array files are small
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  assert size < 3 * qj.tree_bytes(q) + 64_000


def test_nnx_state_roundtrip_and_overwrite(tmp_path):
  model = nnx.Linear(64, 16, rngs=nnx.Rngs(0))
  state = qj.quantize_params(nnx.state(model), [qj.QuantRule(module_path="kernel", format="nf4_g32")])
  path = tmp_path / "s"
  checkpoint.save_params(path, state)
  checkpoint.save_params(path, state)  # overwrite atomically
  with pytest.raises(FileExistsError):
    checkpoint.save_params(path, state, overwrite=False)
  r = checkpoint.restore_params(path)
  assert isinstance(r, nnx.State)
  x = jnp.ones((2, 64))
  plain = nnx.to_pure_dict(state)
  nnx.update(model, r)
  np.testing.assert_allclose(np.asarray(model(x)),
                             np.asarray(x @ plain["kernel"].dequantize() + plain["bias"]),
                             rtol=1e-5)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_failed_save_leaves_previous_checkpoint(tmp_path):
  path = tmp_path / "ckpt"
  q = _tree()
  checkpoint.save_params(path, q)
  with pytest.raises(TypeError, match="cannot checkpoint leaf"):
    checkpoint.save_params(path, {"bad": object()})
  _assert_same(checkpoint.restore_params(path), q)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_restore_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a quantjax checkpoint"):
    checkpoint.restore_params(tmp_path)
  (tmp_path / "quantjax_manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt checkpoint manifest"):
    checkpoint.restore_params(tmp_path)


def test_roundtrip_keeps_input_scales_and_static_activation_ranges(tmp_path):
  from quantjax.methods.activations import StaticActQuantized
  w = qj.quantize(jax.random.normal(jax.random.key(1), (64, 16)), "int8")
  leaf = qj.InputScaled(weight=StaticActQuantized(weight=w, act_format=qj.QuantFormat.parse(
      "int8_t"), act_scale=jnp.full((1, 1), 0.05), act_zero_point=None),
      scale=jnp.linspace(0.5, 2.0, 64)[:, None])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), w, w)  # a [2, 64, 16] stacked QArray
  tree = {"a": leaf, "s": stacked}
  r = checkpoint.restore_params(checkpoint.save_params(tmp_path / "c", tree))
  _assert_same(tree, r)
  assert isinstance(r["a"], qj.InputScaled) and isinstance(r["a"].weight, StaticActQuantized)
  assert r["s"].shape == (2, 64, 16)
  x = jax.random.normal(jax.random.key(2), (4, 64))
  np.testing.assert_array_equal(np.asarray(qj.qdot(x, r["a"])), np.asarray(qj.qdot(x, leaf)))
