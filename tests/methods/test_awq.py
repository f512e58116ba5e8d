"""AWQ scale search, clipping and the per-layer method."""

import jax.numpy as jnp
import numpy as np

from quantjax.methods import awq
from quantjax.methods import sequential as seq
from quantjax.models import llama
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import QArray
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


def test_awq_layer_on_tiny_llama(tiny, tiny_tokens):
  cfg, pure = tiny
  rules = (QuantRule(module_path=r"layers/\d+/(attn|mlp)/.*_proj/kernel", format="int3_g32"),)
  ref = np.asarray(llama.forward(cfg, pure, tiny_tokens))
  record = {}
  q_awq, _ = seq.quantize_sequential(cfg, pure, tiny_tokens, awq.awq_layer(rules, grid=10,
                                                                          record=record),
                                     batch_size=4, hessian=False, progress=False)
  q_rtn, _ = seq.quantize_sequential(cfg, pure, tiny_tokens, seq.rtn_layer(rules), batch_size=4,
                                     hessian=False, progress=False)

  def err(p):
    return float(np.mean((np.asarray(llama.forward(cfg, p, tiny_tokens)) - ref) ** 2))

  assert err(q_awq) < 0.9 * err(q_rtn), (err(q_awq), err(q_rtn))
  assert isinstance(q_awq["layers"][0]["attn"]["o_proj"]["kernel"], QArray)
  # Norm scales absorbed 1/s (stay float); groups searched: qkv, gate/up, down (GQA: no v->o).
  assert not isinstance(q_awq["layers"][0]["input_norm"]["scale"], QArray)
  assert not np.allclose(np.asarray(q_awq["layers"][0]["input_norm"]["scale"]),
                         np.asarray(pure["layers"][0]["input_norm"]["scale"]))
  assert sorted(k.split("/", 2)[2] for k in record if k.startswith("layers/0/")) == [
      "input_norm/scale", "mlp/up_proj/kernel", "post_attn_norm/scale"]
