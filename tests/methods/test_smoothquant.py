"""SmoothQuant through the calibration driver on a tiny random Llama; scale folding."""

import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import methods, transforms
from quantjax.methods import capture
from quantjax.methods import smoothquant as sq
from quantjax.models import llama
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from quantjax.rules import QuantRule

W8A8 = (QuantRule(module_path=llama.PROJ_KERNELS, format="int8", act_format="int8_t"),)


def _err(cfg, p, ref, tokens):
  return float(np.mean((np.asarray(llama.forward(cfg, p, tokens)) - ref) ** 2))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85])
def test_scales_follow_the_formula(tiny, tiny_tokens, alpha):
  cfg, pure = tiny
  fn = llama.forward_fn(cfg)
  batches = [tiny_tokens[:4], tiny_tokens[4:]]
  res = methods.calibrate(fn, pure, batches, W8A8, sq.SmoothQuant(alpha=alpha), progress=False)
  stats = capture.collect_stats(fn, pure, batches, W8A8, needs=("range",))
  s = np.asarray(res.params["layers"][0]["attn"]["q_proj"]["kernel"].scale)[:, 0]
  w = np.concatenate([np.asarray(pure["layers"][0]["attn"][n]["kernel"]) for n in
                      ("q_proj", "k_proj", "v_proj")], axis=1)
  a = np.asarray(stats["layers/0/attn/q_proj/kernel"].absmax)
  want = np.maximum(a, 1e-5) ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha)
  np.testing.assert_allclose(s, want, rtol=1e-5)


def test_smoothing_lowers_w8a8_error_and_folds(tiny, tiny_tokens):
  cfg, pure = tiny
  ref = np.asarray(llama.forward(cfg, pure, tiny_tokens))
  rtn = _err(cfg, transforms.quantize_params(pure, W8A8), ref, tiny_tokens)
  res = methods.calibrate(llama.forward_fn(cfg), pure, [tiny_tokens[:4], tiny_tokens[4:]], W8A8,
                          sq.SmoothQuant(alpha=0.5), progress=False)
  leaf = res.params["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(leaf, InputScaled) and isinstance(leaf.weight, ActQuantized)
  smooth = _err(cfg, res.params, ref, tiny_tokens)
  assert smooth < 0.7 * rtn, (smooth, rtn)
  folded, left = methods.fold_input_scales(res.params, llama.fold_groups(cfg))
  assert all("o_proj" in p for p in left)  # GQA: o_proj keeps its scales
  down = folded["layers"][1]["mlp"]["down_proj"]["kernel"]
  assert isinstance(down, ActQuantized) and isinstance(down.weight, QArray)
  np.testing.assert_allclose(_err(cfg, folded, ref, tiny_tokens), smooth, rtol=1e-2)


def test_static_w8a8_ranges(tiny, tiny_tokens):
  cfg, pure = tiny
  res = methods.calibrate(llama.forward_fn(cfg), pure, [tiny_tokens[:4], tiny_tokens[4:]], W8A8,
                          sq.SmoothQuant(alpha=0.5, act_observer=methods.ActObserver()),
                          progress=False)
  leaf = res.params["layers"][0]["attn"]["q_proj"]["kernel"]
  assert isinstance(leaf.weight, methods.StaticActQuantized)
  assert leaf.weight.act_scale.shape == (1, 1)


def test_fold_errors(tiny):
  cfg, pure = tiny
  groups = llama.fold_groups(cfg)
  q = transforms.quantize_params(pure, [QuantRule(module_path=r".*q_proj/kernel", format="int8")])
  s = jnp.ones((64, 1))
  scaled = dict(q)
  scaled["layers"] = dict(q["layers"])
  blk = {k: dict(v) if isinstance(v, dict) else v for k, v in q["layers"][0].items()}
  blk["attn"] = {k: dict(v) for k, v in blk["attn"].items()}
  blk["attn"]["q_proj"]["kernel"] = InputScaled(weight=q["layers"][0]["attn"]["q_proj"]["kernel"],
                                                scale=s)
  scaled["layers"][0] = blk
  with pytest.raises(ValueError, match="only some consumers carry input scales"):
    methods.fold_input_scales(scaled, groups, strict=True)
  blk["attn"]["k_proj"]["kernel"] = InputScaled(weight=blk["attn"]["k_proj"]["kernel"], scale=s)
  blk["attn"]["v_proj"]["kernel"] = InputScaled(weight=blk["attn"]["v_proj"]["kernel"],
                                                scale=2 * s)
  with pytest.raises(ValueError, match="different input scales"):
    methods.fold_input_scales(scaled, groups)
  with pytest.raises(ValueError, match="alpha"):
    sq.smooth_scales(jnp.ones(4), [jnp.ones((4, 2))], alpha=1.5)
