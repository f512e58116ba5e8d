"""Rotations: Hadamard constructions, and R1 / R2 leaving the float model's function unchanged."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quantjax.methods import rotation
from quantjax.models import gemma3, llama
from quantjax.numerics import hadamard
from tests.methods.conftest import make_tiny


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 48, 64, 72, 576, 640, 896, 1536, 2048])
def test_hadamard_orders(n):
  h = hadamard.hadamard(n)
  assert set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_small_model_widths_factor_into_a_paley_block_and_walsh_hadamard():
  assert hadamard.hadamard_order_factor(576) == (36, 16)    # SmolLM2's residual
  assert hadamard.hadamard_order_factor(640) == (20, 32)    # Gemma 3 270M's residual
  assert hadamard.hadamard_order_factor(1536) == (12, 128)  # SmolLM2's MLP
  assert hadamard.hadamard_order_factor(10) is None
  assert hadamard.hadamard_order_factor(9) is None


@pytest.mark.parametrize("n,kind", [(576, "hadamard"), (10, "auto"), (30, "auto"), (64, "random"),
                                    (640, "auto")])
def test_orthogonal(n, kind):
  r = hadamard.orthogonal(n, kind, seed=3)
  np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)
  if kind == "hadamard":  # a randomized Hadamard: every entry +-1/sqrt(n)
    np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(n), rtol=1e-12)
  assert not np.allclose(r, hadamard.orthogonal(n, kind, seed=4))


def test_a_width_with_no_hadamard_is_named():
  with pytest.raises(ValueError, match=r"R1 \(residual stream\): no Hadamard matrix of width 10"):
    hadamard.orthogonal(10, "hadamard", what="R1 (residual stream)")
  with pytest.raises(ValueError, match="unknown rotation kind 'walsh'"):
    hadamard.orthogonal(8, "walsh")


def _tokens(vocab, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, size=(4, 24)).astype(np.int32)


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("r1,r2", [("hadamard", "hadamard"), ("random", None), (None, "auto")])
def test_llama_rotations_preserve_the_function(kv_heads, r1, r2):
  cfg, params = make_tiny(num_kv_heads=kv_heads)
  tok = _tokens(cfg.vocab_size)
  ref = np.asarray(llama.forward(cfg, params, tok))
  res = rotation.rotate(params, llama.rotation_table(cfg), r1=r1, r2=r2, seed=5)
  assert res.untied == (r1 is not None)
  out_cfg = cfg.replace(tie_embeddings=False) if res.untied else cfg
  out = np.asarray(llama.forward(out_cfg, res.params, tok))
  np.testing.assert_allclose(out, ref, atol=2e-4 * np.abs(ref).max())
  leaves = dict(rotation.rules_lib.tree_leaves_with_paths(res.params))
  if r1 is not None:
    # The norms are folded away, the weights that touch the stream changed.
    np.testing.assert_array_equal(np.asarray(leaves["layers/0/input_norm/scale"]), 1.0)
    assert leaves["lm_head/kernel"].shape == (cfg.hidden_size, cfg.vocab_size)
    assert not np.allclose(leaves["embed/embedding"], params["embed"]["embedding"])
  if r2 is not None:
    assert not np.allclose(leaves["layers/1/attn/v_proj/kernel"],
                           params["layers"][1]["attn"]["v_proj"]["kernel"])
  assert all(x.dtype == np.float32 for x in leaves.values())


def test_an_untied_llama_rotates_its_own_head():
  cfg, params = make_tiny()
  untied = rotation.untie(params, "embed/embedding", "lm_head/kernel")
  cfg2 = cfg.replace(tie_embeddings=False)
  tok = _tokens(cfg.vocab_size)
  ref = np.asarray(llama.forward(cfg, params, tok))
  np.testing.assert_allclose(np.asarray(llama.forward(cfg2, untied, tok)), ref, atol=1e-5)
  table = llama.rotation_table(cfg2)
  assert table.residual.untie is None
  res = rotation.rotate(untied, table)
  assert not res.untied
  np.testing.assert_allclose(np.asarray(llama.forward(cfg2, res.params, tok)), ref,
                             atol=2e-4 * np.abs(ref).max())
  with pytest.raises(ValueError, match="lm_head/kernel exists already"):
    rotation.untie(untied, "embed/embedding", "lm_head/kernel")


def _tiny_gemma():
  cfg = gemma3.Gemma3Config(vocab_size=96, hidden_size=40, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=12,
                            layer_types=(gemma3.SLIDING, gemma3.GLOBAL), sliding_window=8)
  model = gemma3.Gemma3(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)

  def fix(x):
    x = np.asarray(x)
    if x.ndim == 1:  # norms: (1 + s), random s
      return jnp.asarray(0.3 * rng.normal(size=x.shape), jnp.float32)
    return jnp.asarray(x * 5.0, jnp.float32)
  import jax
  return cfg, jax.tree.map(fix, params)


def test_gemma3_allows_r2_only_and_says_why_not_r1():
  cfg, params = _tiny_gemma()
  table = gemma3.rotation_table(cfg)
  assert table.residual is None and "post_attn_norm" in table.why_not
  tok = _tokens(cfg.vocab_size)
  ref = np.asarray(gemma3.forward(cfg, params, tok))
  res = rotation.rotate(params, table, r1=None, r2="hadamard")  # 12 = Paley's order 12
  np.testing.assert_allclose(np.asarray(gemma3.forward(cfg, res.params, tok)), ref,
                             atol=2e-4 * np.abs(ref).max())
  with pytest.raises(ValueError, match=r"R1 \(residual stream\) is not available.*post_mlp_norm"):
    rotation.rotate(params, table, r1="hadamard")


def test_bad_input_names_the_weight_and_the_width():
  cfg, params = make_tiny()
  table = llama.rotation_table(cfg)
  # A table for another model: the missing weight is named.
  wider = llama.rotation_table(cfg.replace(num_layers=3))
  with pytest.raises(KeyError, match="no weight at .layers/2/input_norm/scale"):
    rotation.rotate(params, wider)
  # A table whose width disagrees with a weight.
  bad = dataclasses.replace(table, residual=dataclasses.replace(table.residual, width=32))
  with pytest.raises(ValueError, match=r"embed/embedding has shape \(128, 64\); expected the "
                                       r"width 32"):
    rotation.rotate(params, bad, r2=None)
  # Quantized weights are refused: rotate the float model first.
  import quantjax as qj
  q = qj.quantize_params(params, (qj.QuantRule(module_path=llama.PROJ_KERNELS,
                                               format="int4_g16"),))
  with pytest.raises(TypeError, match="q_proj/kernel is a QArray"):
    rotation.rotate(q, table)
  # An explicit matrix must be orthogonal and of the width.
  with pytest.raises(ValueError, match="not orthogonal"):
    rotation.rotate(params, table, r1=np.ones((64, 64)))
  with pytest.raises(ValueError, match=r"matrix of shape \(8, 8\), expected \(16, 16\)"):
    rotation.rotate(params, table, r1=None, r2=np.eye(8))
  # Head dimension 16 has a Hadamard; a width without one is named with kind "hadamard".
  odd = dataclasses.replace(table, heads=dataclasses.replace(table.heads, head_dim=10))
  with pytest.raises(ValueError, match="R2 \\(value heads\\): no Hadamard matrix of width 10"):
    rotation.rotate(params, odd, r1=None)
  with pytest.raises(ValueError, match="nothing to rotate"):
    rotation.rotate(params, table, r1=None, r2=None)


def test_learned_rotation_lowers_the_quantized_loss_and_stays_orthogonal():
  import quantjax as qj
  cfg, params = make_tiny()
  cfg2 = cfg.replace(tie_embeddings=False)
  table = llama.rotation_table(cfg)
  # One batch: a fixed objective, so the steps are comparable (with batches that alternate,
  # the last step's rotation need not beat the start on their mean).
  batches = [np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 32)).astype(np.int32)]
  rules = (qj.QuantRule(module_path=llama.PROJ_KERNELS, format="int3_g16"),)
  learned = rotation.learn_rotation(llama.loss_fn(cfg2), params, table, batches, rules,
                                    steps=40, learning_rate=3e-3, progress=False)
  for r in (learned.r1, learned.r2):
    np.testing.assert_allclose(r @ r.T, np.eye(r.shape[0]), atol=1e-10)
  assert np.mean(learned.history[-4:]) < np.mean(learned.history[:4])

  def quantized_loss(r1, r2):
    res = rotation.rotate(params, table, r1=r1, r2=r2)
    q = qj.quantize_params(res.params, rules)
    return float(np.mean([llama.loss_fn(cfg2)(q, b) for b in batches]))
  assert quantized_loss(learned.r1, learned.r2) < quantized_loss("hadamard", "hadamard")
  # the learned matrices keep the float function
  tok = _tokens(cfg.vocab_size)
  ref = np.asarray(llama.forward(cfg, params, tok))
  out = rotation.rotate(params, table, r1=learned.r1, r2=learned.r2)
  np.testing.assert_allclose(np.asarray(llama.forward(cfg2, out.params, tok)), ref,
                             atol=2e-4 * np.abs(ref).max())


def test_learned_rotation_stops_on_a_non_finite_loss():
  import quantjax as qj
  cfg, params = make_tiny()
  rules = (qj.QuantRule(module_path=llama.PROJ_KERNELS, format="int4_g16"),)
  batch = np.zeros((1, 8), np.int32)
  with pytest.raises(FloatingPointError, match="the loss is nan at step 0"):
    rotation.learn_rotation(lambda p, b: np.nan * llama.loss_fn(cfg.replace(
        tie_embeddings=False))(p, b), params, llama.rotation_table(cfg), [batch], rules,
        steps=2, progress=False)
