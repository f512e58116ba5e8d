"""AWQ scale search, clipping and the per-layer method."""

import jax.numpy as jnp
import numpy as np

from quantjax import methods
from quantjax.methods import awq
from quantjax.models import llama
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import InputScaled, QArray
from quantjax.rules import QuantRule


def _salient_layer(seed=0, k=128, out=64, n=512):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, k)).astype(np.float32)
  x[:, :4] *= 30.0  # a few salient input channels
  w = rng.normal(size=(k, out)).astype(np.float32)
  return x, w


def test_scale_search_beats_rtn_on_salient_channels():
  x, w = _salient_layer()
  s, best, errs = awq.awq_search_scales(x, np.abs(x).mean(0), [w], ["int3_g32"], grid=10)
  assert len(errs) == 10 and best == min(errs)
  assert best < 0.8 * errs[0], errs  # errs[0]: a = 0, plain RTN
  assert float(s[0]) > float(jnp.median(s))  # salient channels scaled up
  # The reported error is the real output error of the scaled quantized layer.
  q = np.asarray(awq.fake_quant_weight(jnp.asarray(w) * s[:, None], qarray_lib.QuantFormat.parse(
      "int3_g32")))
  e = np.mean(((x / np.asarray(s)) @ q - x @ w) ** 2)
  np.testing.assert_allclose(e, best, rtol=1e-3)


def test_clip_search_never_worse_than_no_clip():
  x, w = _salient_layer(seed=1)
  fmt = qarray_lib.QuantFormat.parse("int3_g32")
  wc = np.asarray(awq.awq_clip(w, x, fmt))
  assert np.all(np.abs(wc) <= np.abs(w) + 1e-6)
  err = lambda ww: np.mean((x @ np.asarray(awq.fake_quant_weight(jnp.asarray(ww), fmt))  # noqa
                            - x @ w) ** 2)
  assert err(wc) <= err(w) * 1.0001
  assert not np.allclose(wc, w)


def test_awq_on_tiny_llama_and_fold(tiny, tiny_tokens):
  cfg, pure = tiny
  rules = (QuantRule(module_path=llama.PROJ_KERNELS, format="int3_g32"),)
  fn = llama.forward_fn(cfg)
  batches = [tiny_tokens[:4], tiny_tokens[4:]]
  ref = np.asarray(fn(pure, tiny_tokens))

  def err(p):
    return float(np.mean((np.asarray(fn(p, tiny_tokens)) - ref) ** 2))

  res = methods.calibrate(fn, pure, batches, rules, awq.AWQ(grid=10), progress=False)
  q_rtn = methods.rtn_params(pure, rules)
  assert err(res.params) < 0.9 * err(q_rtn), (err(res.params), err(q_rtn))
  # One scale search per shared input: q/k/v, o, gate/up, down in each layer.
  searched = [k for k in res.info["awq_errors"] if k.startswith("layers/0/")]
  assert len(searched) == 4 and "layers/0/attn/q_proj/kernel, " in searched[0]
  o = res.params["layers"][0]["attn"]["o_proj"]["kernel"]
  assert isinstance(o, InputScaled) and isinstance(o.weight, QArray)
  # Folding into the norms / up_proj leaves plain QArrays, the same function; with
  # grouped-query attention o_proj's scales have no producer to fold into.
  folded, left = methods.fold_input_scales(res.params, llama.fold_groups(cfg))
  assert left == [f"layers/{i}/attn/o_proj/kernel" for i in range(cfg.num_layers)]
  assert isinstance(folded["layers"][0]["mlp"]["down_proj"]["kernel"], QArray)
  assert not np.allclose(np.asarray(folded["layers"][0]["input_norm"]["scale"]),
                         np.asarray(pure["layers"][0]["input_norm"]["scale"]))
  np.testing.assert_allclose(np.asarray(fn(folded, tiny_tokens)),
                             np.asarray(fn(res.params, tiny_tokens)), rtol=2e-4, atol=2e-4)
  # Restricting the scales to what the fold table absorbs: everything folds.
  res2 = methods.calibrate(fn, pure, batches, rules,
                           awq.AWQ(grid=10, scales_for=llama.foldable(cfg)), progress=False)
  folded2, left2 = methods.fold_input_scales(res2.params, llama.fold_groups(cfg))
  assert left2 == [] and err(folded2) < err(q_rtn)
