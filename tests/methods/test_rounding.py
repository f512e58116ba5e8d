"""SignRound (learned rounding and clipping, `methods.SignRound`): fitted block by block
through the capture driver it beats GPTQ on user-written models, the one-matrix function
lowers a layer's output error from round-to-nearest's, its results are ordinary QArrays of
the rule's format (GGUF blocks included), and bad input is named before anything is
returned."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax
from quantjax import methods
from quantjax import rules as rules_lib
from quantjax.io import gguf as gguf_io
from quantjax.io import gguf_dequant
from quantjax.methods import rounding
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import QArray
from quantjax.rules import QuantRule
from tests.methods import user_models
from tests.methods.test_capture import SKIP, TARGETS, _err
from tests.methods.test_capture import _two_block_fn

# The formats SignRound learns: group-wise sym / asym, per channel, GGUF blocks.
FORMATS = ("int4_g32", "int3_g64_asym", "int8", "q4_0", "q4_1", "q5_0", "q8_0")


def _layer(seed=0, k=128, n=64, rows=512):
  """A weight and the Hessian X^T X / n of correlated inputs with a few outlier features."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(k, n)) * 0.05
  x = rng.normal(size=(rows, k)) @ (np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k))
  x[:, :4] *= 6.0
  return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x / rows, jnp.float32)


def _loss(w, h, q):
  """The normalised layer output error, independently in float64."""
  w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
  e = w - np.asarray(q.dequantize(), np.float64)
  return float(np.sum(e * (h @ e)) / np.sum(w * (h @ w)))


def _same_layout(a: QArray, b: QArray):
  assert (a.fmt, a.shape) == (b.fmt, b.shape)
  for f in ("qvalue", "scale", "zero_point"):
    x, y = getattr(a, f), getattr(b, f)
    assert (x is None) == (y is None), f
    if x is not None:
      assert (x.dtype, x.shape) == (y.dtype, y.shape), (f, x.dtype, x.shape, y.dtype, y.shape)


@pytest.mark.parametrize("spec", FORMATS)
def test_learned_rounding_lowers_the_layer_loss_on_the_formats_grid(spec):
  w, h = _layer()
  rtn = qarray_lib.quantize(w, spec)
  # No step: round-to-nearest bit for bit (the format's own scale math).
  zero = rounding.signround_quantize(w, h, spec, iters=0).qarray
  _same_layout(zero, rtn)
  for f in ("qvalue", "scale", "zero_point"):
    if getattr(rtn, f) is not None:
      np.testing.assert_array_equal(np.asarray(getattr(zero, f)), np.asarray(getattr(rtn, f)),
                                    err_msg=f)
  res = rounding.signround_quantize(w, h, spec, iters=60)
  q = res.qarray
  _same_layout(q, rtn)
  assert res.loss <= res.loss_init
  # The reported losses are the layer's real output error (checked in float64).
  np.testing.assert_allclose(res.loss_init, _loss(w, h, rtn), rtol=1e-3)
  np.testing.assert_allclose(res.loss, _loss(w, h, q), rtol=1e-3)
  bits = QuantFormat.parse(spec).bits
  if bits <= 5:  # 8-bit codes leave little to learn (measured 0.83-0.89 at 3-4 bits, 0.94 at 5)
    assert res.loss < (0.92 if bits <= 4 else 0.97) * res.loss_init, (res.loss, res.loss_init)
    assert 0 < res.best_iter <= 60
  # On the grid: re-encoding the values with their own scales gives them back.
  dq = q.dequantize()
  again = qarray_lib.quantize_with_scale(dq, q.fmt, q.scale, q.zero_point)
  np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(dq))
  codes = np.asarray(q.codes())
  assert codes.min() >= q.fmt.qmin and codes.max() <= q.fmt.qmax


@pytest.mark.parametrize("spec", ["q4_0", "q4_1"])
def test_gguf_blocks_export_code_for_code(spec):
  w, h = _layer(seed=1, k=64, n=32)
  q = rounding.signround_quantize(w, h, spec, iters=40).qarray
  assert q.fmt.gguf_type == spec.upper()
  raw = gguf_io.qarray_to_blocks(q, spec.upper(), axis=0)  # [out, in/32 * block bytes]
  ggml = {"q4_0": gguf_dequant.dequantize_q4_0, "q4_1": gguf_dequant.dequantize_q4_1}[spec](raw)
  np.testing.assert_array_equal(ggml.T, np.asarray(q.dequantize()))
  back = gguf_io.blocks_to_qarray(raw, spec.upper(), axis=0)
  np.testing.assert_array_equal(np.asarray(back.codes()), np.asarray(q.codes()))


# The two-block user MLP of the capture tests (`a` and `b` read one input).
_mlp = _two_block_fn


def _mlp_params_and_batches(seed=0, d=32, f=64):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)  # noqa: E731
  params = {b: {"a": mk(d, f), "b": mk(d, f), "c": mk(f, d)} for b in ("b0", "b1")}
  batches = [jnp.asarray(rng.normal(size=(64, d)) * (1 + 3 * (np.arange(d) < 3)), jnp.float32)
             for _ in range(3)]
  return params, batches


@pytest.mark.parametrize("spec", FORMATS)
def test_every_format_through_the_driver_is_a_plain_qarray(spec):
  params, batches = _mlp_params_and_batches(d=64, f=128)  # int3_g64_asym: K a multiple of 64
  rules = (QuantRule(module_path=r"b\d/[abc]", format=spec),)
  res = methods.calibrate(_mlp, params, batches, rules, methods.SignRound(iters=20),
                          strict=True, progress=False)
  losses = res.info["signround_loss"]
  assert sorted(losses) == [f"{b}/{n}" for b in ("b0", "b1") for n in "abc"]
  for name, rec in losses.items():
    assert rec["final"] <= rec["init"], name
    blk, leaf = name.split("/")
    q = res.params[blk][leaf]
    assert isinstance(q, QArray) and q.fmt.gguf_type == QuantFormat.parse(spec).gguf_type
    _same_layout(q, qarray_lib.quantize(params[blk][leaf], q.fmt))
    # On the grid: re-encoding the values with their own scales gives them back.
    dq = q.dequantize()
    again = qarray_lib.quantize_with_scale(dq, q.fmt, q.scale, q.zero_point)
    np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(dq))
  if spec in ("q4_0", "q4_1"):  # GGUF blocks export code for code
    q = res.params["b1"]["c"]
    raw = gguf_io.qarray_to_blocks(q, spec.upper(), axis=0)
    back = gguf_io.blocks_to_qarray(raw, spec.upper(), axis=0)
    np.testing.assert_array_equal(np.asarray(back.codes()), np.asarray(q.codes()))


def test_one_compile_per_block_structure_and_a_mistyped_rule():
  params, batches = _mlp_params_and_batches()
  rules = (QuantRule(module_path=r"b\d/[abc]", format="int4_g32"),)
  before = rounding._fit_block._cache_size()
  methods.calibrate(_mlp, params, batches, rules, methods.SignRound(iters=10), strict=True,
                    progress=False)
  # Three span structures (a/b -> c's input, c -> the next block's input, the last c's
  # output); the two blocks' a/b spans share one compiled loop.
  assert rounding._fit_block._cache_size() - before <= 3
  with pytest.raises(ValueError, match="matched no leaf"):
    methods.calibrate(_mlp, params, batches, (QuantRule(module_path=r"b\d/[abcd]x",
                                                        format="int4_g32"),),
                      methods.SignRound(iters=5), strict=True, progress=False)
  with pytest.raises(ValueError, match="sequential"):
    methods.calibrate(_mlp, params, batches, rules, methods.SignRound(iters=5),
                      mode="one_pass", progress=False)


def test_nan_weight_and_nan_loss_are_named_and_nothing_is_returned():
  params, batches = _mlp_params_and_batches()
  rules = (QuantRule(module_path=r"b\d/[abc]", format="int4_g32"),)
  bad = {b: dict(v) for b, v in params.items()}
  bad["b1"]["b"] = bad["b1"]["b"].at[3, 5].set(jnp.nan)
  with pytest.raises(ValueError, match=re.escape("b1/b") + ".*NaN"):
    methods.calibrate(_mlp, bad, batches, rules, methods.SignRound(iters=5), progress=False)
  # Finite inputs whose products overflow float32: the float model's values at the end
  # of the first block, and so its loss, are not finite at the first step; the driver
  # returns nothing.
  huge = [x.at[0, 0].set(1e20) for x in batches]
  with pytest.raises(ValueError, match=re.escape("SignRound block [b0/a, b0/b]: the block loss "
                                                 "became NaN/Inf at iteration 0")):
    methods.calibrate(_mlp, params, huge, rules, methods.SignRound(iters=5), progress=False)
  assert not any(isinstance(x, QArray) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, QArray)))  # the caller's tree is untouched
  w, h = _layer(k=64, n=32)
  with pytest.raises(ValueError, match="SignRound layer/q: .*iteration 0 .*Hessian holds NaN"):
    rounding.signround_quantize(w, h.at[2, 3].set(jnp.inf), "int4_g32", iters=5,
                                name="layer/q")


def test_formats_it_cannot_learn_are_refused_and_casts_pass_through():
  params, batches = _mlp_params_and_batches()
  with pytest.raises(ValueError, match=r"SignRound b0/a: format nf4_g32 .*not supported"):
    methods.calibrate(_mlp, params, batches, (QuantRule(module_path=r"b\d/[abc]",
                                                        format="nf4_g32"),),
                      methods.SignRound(iters=5), progress=False)
  res = methods.calibrate(_mlp, params, batches, (QuantRule(module_path=r"b\d/[abc]",
                                                            format="bf16"),),
                          quantjax.SignRound(iters=5), progress=False)
  assert res.params["b0"]["a"].qvalue.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="min_clip"):
    methods.SignRound(min_clip=0.0)
  # A seed starts the offsets at noise: another result, the same for the same seed.
  w, h = _layer()
  runs = [rounding.signround_quantize(w, h, "int4_g32", iters=60, key=k).qarray.codes()
          for k in (None, jax.random.key(1), jax.random.key(1))]
  assert np.any(np.asarray(runs[0]) != np.asarray(runs[1]))
  np.testing.assert_array_equal(np.asarray(runs[1]), np.asarray(runs[2]))
  assert methods.base.make("signround", iters=7).iters == 7


def test_block_rounding_beats_gptq_on_the_user_models():
  """Held-out output error (windows not used for calibration) at int3 g16 on the four
  user-written models of test_capture.py, SignRound (block objective, 50 steps: a
  quarter of the default, for the suite's time) against GPTQ. Measured SignRound / GPTQ
  at 50 steps: einsum 0.45, gpt2 0.60, scan 0.60, conv 1.17 (200 steps: 0.41, 0.51,
  0.53, 1.11); SignRound / RTN 0.18-0.42. Three of the four must beat GPTQ; all must
  beat RTN by 40%."""
  wins = {}
  for name in sorted(TARGETS):
    fn, params, loss = user_models.trained(name)
    assert loss < 3.2, (name, loss)
    rules = (QuantRule(module_path=TARGETS[name], format="int3_g16"), SKIP)
    batches, x = user_models.calibration(), user_models.held_out()
    rtn = methods.calibrate(fn, params, batches, rules, methods.RTN(), progress=False)
    gptq = methods.calibrate(fn, params, batches, rules, methods.GPTQ(), progress=False)
    sr = methods.calibrate(fn, params, batches, rules, methods.SignRound(iters=50),
                           strict=True, progress=False)
    e_rtn, e_gptq, e_sr = (_err(fn, params, r.params, x) for r in (rtn, gptq, sr))
    assert e_sr < 0.6 * e_rtn, (name, e_sr, e_rtn)
    wins[name] = e_sr / e_gptq
    quantized = [p for p, leaf in rules_lib.tree_leaves_with_paths(sr.params)
                 if isinstance(leaf, QArray)]
    assert quantized and all(re.fullmatch(TARGETS[name], p) for p in quantized)
    losses = sr.info["signround_loss"]
    assert losses and all(r["final"] < r["init"] for r in losses.values()), (name, losses)
  assert sum(r < 1.0 for r in wins.values()) >= 3, wins


def test_an_untied_head_is_learned_against_the_logits():
  """The last group of an untied Llama is its head, whose span ends in the program's
  output (the logits): the block objective takes them as its target (a rotated model's
  head is untied, so rotation -> SignRound needs this)."""
  from flax import nnx
  from quantjax.models import llama
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=False)
  params = rules_lib.to_pure(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32) for _ in range(2)]
  rules = [QuantRule(module_path=r"(layers/\d+/(attn|mlp)/\w+_proj|lm_head)/kernel",
                     format="int4_g16"), QuantRule(module_path=".*", skip=True)]
  res = methods.calibrate(llama.forward_fn(cfg), params, batches, rules,
                          methods.SignRound(iters=20), strict=True, progress=False)
  assert isinstance(res.params["lm_head"]["kernel"], QArray)
  head = res.info["signround_loss"]["lm_head/kernel"]
  assert head["final"] <= head["init"], head
  rtn = methods.calibrate(llama.forward_fn(cfg), params, batches, rules, methods.RTN(),
                          progress=False)
  x = batches[0]
  ref = llama.forward(cfg, params, x)
  err = [float(jnp.mean((llama.forward(cfg, r.params, x) - ref) ** 2)) for r in (res, rtn)]
  assert err[0] < err[1], err
