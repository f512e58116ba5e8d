"""quantjax.models.llama against transformers (PyTorch FP32) on tiny random Llamas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quantjax.models import llama
from quantjax.models import load


def _torch_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def test_logits_match_transformers(tiny_hf, tiny_tokens):
  directory, torch_model, tied = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  assert cfg.tie_embeddings == tied
  assert cfg.num_kv_heads == 2 and cfg.num_heads == 4
  paths = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}
  assert ("['lm_head']['kernel']" in paths) == (not tied)
  ours = np.asarray(llama.forward(cfg, params, tiny_tokens))
  ref = _torch_logits(torch_model, tiny_tokens)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The stateful model and the functional forward agree.
  model = llama.model_from_params(cfg, params)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tiny_tokens))), ours, atol=1e-6)


def test_mha_and_pure_dict_params(tmp_path, tiny_tokens):
  from tests.models.conftest import make_tiny_hf
  torch_model = make_tiny_hf(str(tmp_path), tied=True, seed=3, num_kv_heads=4)
  cfg, params, _ = load.load_hf(str(tmp_path))
  pure = nnx.to_pure_dict(params)
  ours = np.asarray(llama.forward(cfg, pure, tiny_tokens))
  np.testing.assert_allclose(ours, _torch_logits(torch_model, tiny_tokens), atol=1e-4, rtol=0)


def test_param_paths_are_regex_friendly():
  from quantjax.rules import path_str
  cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=4, tie_embeddings=False)
  _, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  got = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  for want in ("embed/embedding", "layers/1/attn/q_proj/kernel", "layers/0/mlp/down_proj/kernel",
               "layers/0/input_norm/scale", "layers/1/pre_mlp_norm/scale",
               "final_norm/scale", "lm_head/kernel"):
    assert want in got, (want, sorted(got))
  # Llama has no sandwich norms: `post_attn_norm` is the attention output's norm (Gemma 3's)
  assert not any("post_attn_norm" in p or "post_mlp_norm" in p for p in got), sorted(got)


def test_kv_cache_matches_full_forward(tiny_hf, tiny_tokens):
  directory, _, _ = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  prompt = tiny_tokens[:, :10]
  out = llama.generate(cfg, params, prompt, 8)
  assert out.shape == (2, 18)
  np.testing.assert_array_equal(out[:, :10], prompt)
  # Greedy decoding with the cache equals argmax of the full (uncached) forward.
  full = np.asarray(llama.forward(cfg, params, out[:, :-1]))
  np.testing.assert_array_equal(full[:, 9:].argmax(-1), out[:, 10:])


def test_generate_sampling_and_eos(tiny_hf, tiny_tokens):
  directory, _, _ = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  a = llama.generate(cfg, params, tiny_tokens[0, :5], 6, temperature=0.8, top_k=20, seed=1)
  b = llama.generate(cfg, params, tiny_tokens[0, :5], 6, temperature=0.8, top_k=20, seed=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (1, 11) and a.min() >= 0 and a.max() < cfg.vocab_size
  greedy = llama.generate(cfg, params, tiny_tokens[0, :5], 6)
  stop = int(greedy[0, 5])
  short = llama.generate(cfg, params, tiny_tokens[0, :5], 6, eos_token_id=stop)
  assert short.shape == (1, 6)


def test_qarray_weights_under_jit(tiny_hf, tiny_tokens):
  from quantjax.numerics.formats import QuantFormat
  from quantjax.numerics.qarray import QArray
  from quantjax.rules import QuantRule
  from quantjax.transforms import dequantize_params, quantize_params
  directory, _, _ = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  rules = (QuantRule(module_path=r".*_proj/kernel", format=QuantFormat.parse("int4_g32_asym")),)
  qparams = quantize_params(params, rules)
  leaves = jax.tree_util.tree_leaves(qparams, is_leaf=lambda x: isinstance(x, QArray))
  assert sum(isinstance(x, QArray) for x in leaves) == 14
  q_logits = np.asarray(llama.forward(cfg, qparams, tiny_tokens))
  d_logits = np.asarray(llama.forward(cfg, dequantize_params(qparams), tiny_tokens))
  np.testing.assert_allclose(q_logits, d_logits, atol=1e-5)
  # Quantization changed the model (the test can fail if QArrays were ignored).
  f_logits = np.asarray(llama.forward(cfg, params, tiny_tokens))
  assert np.abs(q_logits - f_logits).max() > 1e-3
  # Generation also runs on QArray weights.
  assert llama.generate(cfg, qparams, tiny_tokens[:, :4], 3).shape == (2, 7)


def test_bf16_activations_close(tiny_hf, tiny_tokens):
  directory, _, _ = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  f32 = np.asarray(llama.forward(cfg, params, tiny_tokens))
  bf = np.asarray(llama.forward(cfg.replace(dtype="bfloat16"), params, tiny_tokens))
  assert bf.dtype == np.float32
  assert np.abs(bf - f32).max() < 0.1 * np.abs(f32).max()
  # Plain BF16 weight arrays (no QArray) also run, with FP32 or BF16 activations.
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  w16 = np.asarray(llama.forward(cfg, p16, tiny_tokens))
  assert np.abs(w16 - f32).max() < 0.05 * np.abs(f32).max()
  assert 0 < np.abs(w16 - f32).max()
  assert np.isfinite(np.asarray(llama.forward(cfg.replace(dtype="bfloat16"), p16, tiny_tokens))).all()


def test_config_from_transformers_object(tiny_hf):
  directory, torch_model, _ = tiny_hf
  from_obj = llama.LlamaConfig.from_hf(torch_model.config)
  from_dir, _, _ = load.load_hf(directory, tokenizer=False)
  assert from_obj.replace(name="x") == from_dir.replace(name="x")


def test_config_errors():
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=3, num_kv_heads=2, head_dim=4)
  with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
    llama.LlamaConfig.from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_scaling"):
    llama.LlamaConfig.from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"},
                               "num_attention_heads": 2, "hidden_size": 8})


def test_quantized_embedding_and_head(tiny_hf, tiny_tokens):
  from quantjax.numerics.formats import QuantFormat
  from quantjax.rules import QuantRule
  from quantjax.transforms import dequantize_params, quantize_params
  directory, _, tied = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  fmt = QuantFormat.parse("int4_g32")
  rules = (QuantRule(module_path="embed/embedding", format=fmt.replace(channel_axis=0, group_axis=1)),
           QuantRule(module_path=r"lm_head/kernel|.*_proj/kernel", format=fmt))
  qparams = quantize_params(params, rules)
  q_logits = np.asarray(llama.forward(cfg, qparams, tiny_tokens))
  d_logits = np.asarray(llama.forward(cfg, dequantize_params(qparams), tiny_tokens))
  np.testing.assert_allclose(q_logits, d_logits, atol=1e-5)


def test_device_decode_loop_equals_host_loop(tiny_hf, tiny_tokens):
  """generate's jitted while-loop gives the per-step Python loop's tokens, also when
  sampling and when rows reach eos at different steps; the decoder's `decode` too."""
  import functools

  from quantjax.models import functional
  directory, _, _ = tiny_hf
  cfg, params, _ = load.load_hf(directory)
  state = llama.as_state(cfg, params)
  step = functools.partial(llama.cached_step, cfg)
  init = functools.partial(llama.init_cache, cfg)
  prompt = tiny_tokens[:, :6]
  greedy_host = functional.generate_loop(step, init, state, prompt, 12, device_loop=False)
  for kw in ({}, dict(temperature=0.9, top_k=30, seed=3),
             dict(eos_token_id=int(greedy_host[1, 9])),   # row 1 stops first, row 0 goes on
             dict(eos_token_id=int(greedy_host[0, 6]))):
    host = functional.generate_loop(step, init, state, prompt, 12, device_loop=False, **kw)
    dev = functional.generate_loop(step, init, state, prompt, 12, **kw)
    np.testing.assert_array_equal(dev, host)
    if "eos_token_id" in kw:  # stops once every row has produced eos
      gen = greedy_host[:, 6:]
      hits = [np.flatnonzero(r == kw["eos_token_id"]) for r in gen]
      want = max(h[0] + 1 for h in hits) if all(len(h) for h in hits) else 12
      assert dev.shape == (2, 6 + want)
  # the benchmark's device loop: n greedy tokens from the prefill's logits
  dec = llama.decoder(cfg)
  cache = dec.init_cache(2, 20)
  logits, cache = dec.step(params, jnp.asarray(prompt), cache, jnp.int32(0))
  toks, _ = dec.decode(params, logits, cache, 6, 12)
  np.testing.assert_array_equal(np.asarray(toks), greedy_host[:, 6:])
  with pytest.raises(ValueError, match="n >= 1"):
    functional.decode_tokens(functional.BoundStep(llama.cached_step, (cfg,)), state, logits,
                             dec.init_cache(2, 20), 6, 0)
