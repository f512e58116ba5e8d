"""quantize_params on models written as a user would, with stock Flax layers."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj


class MLP(nn.Module):
  width: int = 1024
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth - 1):
      x = nn.gelu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(64, 256, rngs=rngs)
    self.fc2 = nnx.Linear(256, 256, rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


KERNELS = [qj.QuantRule(module_path=r".*kernel", format="int8")]


def test_memory_shrinks_on_1024_mlp():
  """INT8 per-channel <= 26% of FP32, INT4 group-64 <= 16% (biases stay FP32)."""
  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 1024)))
  fp32 = qj.tree_bytes(params)
  q8 = qj.quantize_params(params, KERNELS)
  q4 = qj.quantize_params(params, [qj.QuantRule(module_path=r".*kernel", format="int4_g64")])
  r8, r4 = qj.tree_bytes(q8) / fp32, qj.tree_bytes(q4) / fp32
  print(f"fp32 {fp32:,} B; int8 per-channel {qj.tree_bytes(q8):,} B ({100 * r8:.1f}%); "
        f"int4 g64 {qj.tree_bytes(q4):,} B ({100 * r4:.1f}%)")
  assert r8 <= 0.26 and r4 <= 0.16
  # the bytes are really in the leaves: codes are int8 / packed uint8
  k = q4["params"]["Dense_0"]["kernel"]
  assert k.qvalue.dtype == jnp.uint8 and k.qvalue.size == 1024 * 1024 // 2
  assert qj.bits_per_weight(q4, quantized_only=True) == pytest.approx(4.5)


@pytest.mark.parametrize("fmt", ["int8", "int4_g64_asym", "nf4_g64"])
def test_linen_mlp_runs_unchanged_and_matches_fake_quant(fmt):
  model = MLP(width=128)
  x = jax.random.normal(jax.random.key(1), (4, 128))
  params = model.init(jax.random.key(0), x)
  rules = [qj.QuantRule(module_path=r"params/Dense_\d+/kernel", format=fmt)]
  qparams = qj.quantize_params(params, rules)
  out = jax.jit(model.apply)(qparams, x)
  fake = model.apply(qj.fake_quant_params(params, rules), x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-5, atol=1e-5)
  full = model.apply(params, x)
  assert float(jnp.max(jnp.abs(out - full))) > 0  # it really is quantized


def test_linen_cnn_runs_unchanged():
  model = CNN()
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  params = model.init(jax.random.key(0), x)
  rules = [qj.QuantRule(module_path=r".*Conv_\d+/kernel", format="int8"),
           qj.QuantRule(module_path=r".*Dense_\d+/kernel", format="int4_g32")]
  qparams = qj.quantize_params(params, rules)
  assert isinstance(qparams["params"]["Conv_0"]["kernel"], qj.QArray)
  out = jax.jit(model.apply)(qparams, x)
  fake = model.apply(qj.fake_quant_params(params, rules), x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-5, atol=1e-5)


def test_nnx_mlp_state_runs_unchanged():
  model = NnxMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (5, 64))
  graphdef, state = nnx.split(model)
  rules = [qj.QuantRule(module_path=r"(fc1|fc2)/kernel", format="int4_g64_asym"),
           qj.QuantRule(module_path=r"out/kernel", format="int8"),
           qj.QuantRule(module_path=r".*bias", skip=True)]
  qstate = qj.quantize_params(state, rules, strict=True)
  assert isinstance(qstate["fc1"]["kernel"].value, qj.QArray)

  @jax.jit
  def forward(s, inp):
    return nnx.merge(graphdef, s)(inp)

  out = forward(qstate, x)
  fake = forward(qj.fake_quant_params(state, rules), x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fake), rtol=1e-5, atol=1e-5)
  # nnx.update puts QArrays into the live module too
  nnx.update(model, qstate)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(out), rtol=1e-6, atol=1e-6)


def test_plain_nested_dict_and_paths():
  tree = {"enc": {"w": jnp.ones((64, 8)), "b": jnp.zeros(8)}, "head": [jnp.ones((64, 4))]}
  out, report = qj.quantize_params(tree, [qj.QuantRule(module_path=r"enc/w", format="int8"),
                                          qj.QuantRule(module_path=r"head/0", format="int4")],
                                   return_report=True)
  assert isinstance(out["enc"]["w"], qj.QArray) and isinstance(out["head"][0], qj.QArray)
  assert out["enc"]["b"] is tree["enc"]["b"]
  assert report.uncovered == ("enc/b",)


def test_first_match_wins_and_skip():
  tree = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"kernel": jnp.ones((64, 8))}}
  rules = [qj.QuantRule(module_path=r"a/kernel", skip=True),
           qj.QuantRule(module_path=r".*kernel", format="int4"),
           qj.QuantRule(module_path=r"b/kernel", format="int8")]
  with pytest.warns(UserWarning, match="b/kernel"):
    out = qj.quantize_params(tree, rules)
  assert not isinstance(out["a"]["kernel"], qj.QArray)
  assert out["b"]["kernel"].fmt.bits == 4


def test_strict_errors():
  tree = {"a": {"kernel": jnp.ones((64, 8)), "bias": jnp.ones(8)}}
  with pytest.raises(ValueError, match=r"matched no leaf: 'nothing/.\*'"):
    qj.quantize_params(tree, [qj.QuantRule(module_path="a/kernel", format="int8"),
                              qj.QuantRule(module_path="nothing/.*", format="int8")], strict=True)
  with pytest.raises(ValueError, match="a/bias"):
    qj.quantize_params(tree, [qj.QuantRule(module_path="a/kernel", format="int8")], strict=True)


def test_bad_rules_and_inputs_name_the_problem():
  with pytest.raises(ValueError, match=r"not a valid regex"):
    qj.QuantRule(module_path="layers/(", format="int8")
  with pytest.raises(ValueError, match="needs a format"):
    qj.QuantRule(module_path=".*")
  with pytest.raises(ValueError, match="bits=12 is out of range"):
    qj.QuantRule(module_path=".*", format=qj.QuantFormat(kind="int", bits=12))
  tree = {"enc": {"kernel": jnp.ones((100, 8)).at[3, 3].set(jnp.nan)}}
  with pytest.raises(ValueError, match=r"enc/kernel.*NaN"):
    qj.quantize_params(tree, [qj.QuantRule(module_path=".*", format="int8")])
  tree = {"enc": {"kernel": jnp.ones((100, 8))}}
  with pytest.raises(ValueError, match=r"enc/kernel.*group_size 64 does not divide axis 0 of length 100"):
    qj.quantize_params(tree, [qj.QuantRule(module_path=".*", format="int4_g64")])


def test_jit_quantize_params_and_tree_utilities():
  model = MLP(width=128)
  params = model.init(jax.random.key(0), jnp.ones((1, 128)))
  rules = [qj.QuantRule(module_path=r".*kernel", format="int4_g32_asym")]
  eager = qj.quantize_params(params, rules)
  jitted = jax.jit(lambda p: qj.quantize_params(p, rules))(params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = jax.device_put(jitted, jax.devices()[0])
  assert isinstance(moved["params"]["Dense_0"]["kernel"], qj.QArray)
  same = jax.tree.map(lambda a: a, moved)
  assert isinstance(same["params"]["Dense_0"]["kernel"], qj.QArray)
  deq = qj.dequantize_params(jitted)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(deq))


def test_chain_and_transforms():
  params = {"w": jax.random.normal(jax.random.key(0), (64, 8))}
  t = qj.chain(qj.quantization([qj.QuantRule(module_path="w", format="int8")]),
               qj.dequantization(jnp.bfloat16))
  out = t(params)
  assert out["w"].dtype == jnp.bfloat16
  assert "quantize" in t.name and "dequantize" in t.name
  with pytest.raises(TypeError):
    qj.chain(3)


def test_fake_quant_then_quantize_identical():
  params = {"w": jax.random.normal(jax.random.key(0), (128, 16))}
  rules = [qj.QuantRule(module_path="w", format="int4_g64_asym")]
  fake = qj.fake_quant_params(params, rules)
  real = qj.dequantize_params(qj.quantize_params(params, rules))
  np.testing.assert_allclose(np.asarray(fake["w"]), np.asarray(real["w"]), rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda p: jnp.sum(qj.fake_quant_params(p, rules)["w"]))(params)
  assert float(jnp.mean(g["w"])) > 0.9


def test_stochastic_rounding_needs_key():
  params = {"w": jax.random.normal(jax.random.key(0), (64, 8))}
  rules = [qj.QuantRule(module_path="w", format="int4_sr")]
  with pytest.raises(ValueError, match="key"):
    qj.quantize_params(params, rules)
  a = qj.quantize_params(params, rules, key=jax.random.key(0))
  b = qj.quantize_params(params, rules, key=jax.random.key(1))
  assert not np.array_equal(np.asarray(a["w"].qvalue), np.asarray(b["w"].qvalue))
