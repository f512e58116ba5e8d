"""The shared decoder: presets, old parameter names, switches."""

import jax
import numpy as np
import pytest
from flax import nnx

from quantjax.models import decoder, gemma3, llama

_LLAMA = llama.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=4)


def _params(cfg, seed=0):
  p = nnx.to_pure_dict(nnx.split(decoder.CausalLM(cfg, rngs=nnx.Rngs(seed)))[1])
  # norms away from 1, so a norm read under the wrong name changes the logits
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1.5 + 0.25 if "scale" in jax.tree_util.keystr(path) else x, p)


def test_old_llama_names_are_renamed_on_load():
  params = _params(_LLAMA)
  tokens = np.arange(10, dtype=np.int32).reshape(1, 10) % 48
  want = np.asarray(llama.forward(_LLAMA, params, tokens))
  old = {**params, "layers": {i: {("post_attn_norm" if k == "pre_mlp_norm" else k): v
                                  for k, v in layer.items()}
                              for i, layer in params["layers"].items()}}
  assert "pre_mlp_norm" not in old["layers"][0]
  np.testing.assert_array_equal(np.asarray(llama.forward(_LLAMA, old, tokens)), want)
  # a Gemma 3 tree keeps its own post_attn_norm: nothing is renamed there
  gcfg = gemma3.Gemma3Config(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=4, sliding_window=4)
  gp = _params(gcfg)
  assert decoder.rename_legacy(gcfg, gp) is gp


def test_switches_change_what_they_name():
  params = _params(_LLAMA)
  tokens = np.arange(8, dtype=np.int32).reshape(1, 8)
  base = np.asarray(decoder.forward(_LLAMA, params, tokens))

  class Geglu(llama.LlamaConfig):
    def switches(self):
      return decoder.Switches(activation="gelu_tanh", attn_scale=0.5,
                              rope_theta=self.rope_theta)

  geglu = Geglu(**{f: getattr(_LLAMA, f) for f in _LLAMA.__dataclass_fields__})
  other = np.asarray(decoder.forward(geglu, params, tokens))
  assert np.abs(other - base).max() > 1e-3


def test_switches_reject_bad_values():
  with pytest.raises(ValueError, match="activation"):
    decoder.Switches(activation="relu")
  with pytest.raises(ValueError, match="window"):
    decoder.Switches(sliding=(True, False))


def test_presets():
  s = _LLAMA.switches()
  assert (s.activation, s.qk_norm, s.post_norms, s.embed_scale) == ("silu", False, False, False)
  assert s.attn_scale == 0.5
  g = gemma3.Gemma3Config(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=6,
                          num_heads=4, num_kv_heads=2, head_dim=4, query_pre_attn_scalar=16.0)
  s = g.switches()
  assert (s.activation, s.qk_norm, s.post_norms, s.embed_scale) == ("gelu_tanh", True, True, True)
  assert s.attn_scale == 0.25 and s.window == g.sliding_window
  assert s.sliding == (True,) * 5 + (False,)
  # Llama and Gemma 3 are one model class: the param trees differ only by the switches
  assert llama.Llama is gemma3.Gemma3 is decoder.CausalLM
