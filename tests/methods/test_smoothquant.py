"""SmoothQuant folding on a tiny random Llama."""

import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import transforms
from quantjax.methods import sequential as seq
from quantjax.methods import smoothquant as sq
from quantjax.models import llama
from quantjax.rules import QuantRule


def _stats(cfg, pure, tokens):
  stats = seq.collect_model_stats(cfg, pure, tokens, batch_size=4)
  return {p: s.absmax for p, s in stats.items()}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85])
def test_smoothing_is_equivalent_before_quantization(tiny, tiny_tokens, alpha):
  cfg, pure = tiny
  groups = sq.llama_fold_groups(cfg.num_layers, up_to_down=True)
  smoothed, scales = sq.smooth_params(pure, _stats(cfg, pure, tiny_tokens), groups, alpha)
  ref = np.asarray(llama.forward(cfg, pure, tiny_tokens))
  out = np.asarray(llama.forward(cfg, smoothed, tiny_tokens))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert set(scales) == {g.prev for g in groups}
  s = np.asarray(scales["layers/0/input_norm/scale"])
  if alpha == 0.0:
    # s = 1 / max|W_j| over q, k and v
    w = np.concatenate([np.asarray(pure["layers"][0]["attn"][n]["kernel"]) for n in
                        ("q_proj", "k_proj", "v_proj")], axis=1)
    np.testing.assert_allclose(s, 1.0 / np.abs(w).max(1), rtol=1e-5)
  else:
    assert not np.allclose(s, 1.0)


def test_smoothing_lowers_w8a8_error(tiny, tiny_tokens):
  cfg, pure = tiny
  rules = (QuantRule(module_path=r"layers/\d+/(attn|mlp)/.*_proj/kernel", format="int8",
                     act_format="int8_t"),)
  ref = np.asarray(llama.forward(cfg, pure, tiny_tokens))

  def w8a8_err(p):
    q = transforms.quantize_params(p, rules)  # dynamic per-tensor int8 activations
    return float(np.mean((np.asarray(llama.forward(cfg, q, tiny_tokens)) - ref) ** 2))

  groups = sq.llama_fold_groups(cfg.num_layers)
  smoothed, _ = sq.smooth_params(pure, _stats(cfg, pure, tiny_tokens), groups, 0.5)
  assert w8a8_err(smoothed) < 0.7 * w8a8_err(pure)


def test_fold_errors(tiny):
  cfg, pure = tiny
  gqa = sq.llama_fold_groups(cfg.num_layers, v_to_o=True)  # tiny model has GQA (4 vs 2 heads)
  with pytest.raises(ValueError, match="grouped-query"):
    sq.apply_scales(pure, [g for g in gqa if g.prev_kind == "linear"],
                    {g.prev: jnp.ones((64,)) for g in gqa if g.prev_kind == "linear"})
  q = transforms.quantize_params(pure, [QuantRule(module_path=r".*q_proj/kernel", format="int8")])
  with pytest.raises(ValueError, match="already quantized"):
    sq.apply_scales(q, gqa[:1], {gqa[0].prev: jnp.ones((64,))})
  with pytest.raises(ValueError, match="alpha"):
    sq.smooth_scales(jnp.ones(4), [jnp.ones((4, 2))], alpha=1.5)
