"""The layer-by-layer driver on a tiny random Llama."""

import numpy as np

from quantjax.methods import sequential as seq
from quantjax.models import llama
from quantjax.numerics.qarray import QArray
from quantjax.rules import QuantRule

RULES = (QuantRule(module_path=r"layers/\d+/(attn|mlp)/.*_proj/kernel", format="int3_g32"),)


def _logits(cfg, params, tokens):
  return np.asarray(llama.forward(cfg, params, tokens))


def test_block_forward_matches_model(tiny, tiny_tokens):
  cfg, pure = tiny
  model = llama.model_from_params(cfg, pure)
  x, cos, sin, mask = seq.embed_inputs(cfg, pure, tiny_tokens)
  for i in range(cfg.num_layers):
    ref, _ = model.layers[i](x, cos, sin, mask)
    out, ins = seq.block_forward(cfg, pure["layers"][i], x, cos, sin, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert ins["attn_in"].shape == x.shape and ins["down_in"].shape[-1] == cfg.intermediate_size
    x = out


def test_sequential_gptq_beats_rtn_and_collects_stats(tiny, tiny_tokens):
  cfg, pure = tiny
  ref = _logits(cfg, pure, tiny_tokens)
  q_rtn, _ = seq.quantize_sequential(cfg, pure, tiny_tokens, seq.rtn_layer(RULES), batch_size=4,
                                     hessian=False, progress=False)
  q_gptq, info = seq.quantize_sequential(cfg, pure, tiny_tokens, seq.gptq_layer(RULES),
                                         batch_size=4, progress=False)
  for i in range(cfg.num_layers):
    assert isinstance(q_gptq["layers"][i]["mlp"]["down_proj"]["kernel"], QArray)
    assert not isinstance(q_gptq["layers"][i]["input_norm"]["scale"], QArray)
  err = lambda p: float(np.mean((_logits(cfg, p, tiny_tokens) - ref) ** 2))  # noqa: E731
  e_rtn, e_gptq = err(q_rtn), err(q_gptq)
  assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
  st = info["act_stats"]["layers/1/mlp/down_proj/kernel"]
  assert st.lo.shape == (cfg.intermediate_size,) and float(st.count) == 8 * 32
  assert st.sample.shape[0] > 0
  # The float input of layer 0's q_proj: its absmax matches a direct computation.
  x, cos, sin, mask = seq.embed_inputs(cfg, pure, tiny_tokens)
  _, ins = seq.block_forward(cfg, pure["layers"][0], x, cos, sin, mask)
  st0 = info["act_stats"]["layers/0/attn/q_proj/kernel"]
  np.testing.assert_allclose(np.asarray(st0.hi), np.asarray(ins["attn_in"]).max((0, 1)),
                             rtol=1e-5)
