"""SmolLM2-135M: parity with transformers, the perplexity protocol, quantized bytes."""

import dataclasses
import math

import jax
import numpy as np

from quantjax.eval import data
from quantjax.eval import perplexity
from quantjax.models import llama
from tests.integration.conftest import torch_nll_fn

# docs/protocol.md: transformers (PyTorch FP32, CPU) on the full protocol (32 x 512).
TRANSFORMERS_FULL_PPL = 11.090


def test_config_from_gguf(smollm2):
  cfg = smollm2[0]
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
          cfg.intermediate_size, cfg.head_dim) == (30, 576, 9, 3, 49152, 1536, 64)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0


def test_logits_parity_one_window(smollm2, smollm2_split, hf_smollm2):
  import torch
  cfg, params, _ = smollm2
  window = smollm2_split.eval_windows[:1]
  ours = np.asarray(llama.forward(cfg, params, window))
  with torch.no_grad():
    ref = hf_smollm2(torch.as_tensor(window, dtype=torch.long)).logits.float().numpy()
  diff = np.abs(ours - ref).max()
  print(f"max |logits diff| = {diff:.3g} (max |logit| {np.abs(ref).max():.1f})")
  assert diff <= 1e-3
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_perplexity_matches_transformers(smollm2, smollm2_split, hf_smollm2):
  """Same protocol on the last 8 windows (4,096 tokens) for both; within 0.1%."""
  cfg, params, _ = smollm2
  sub = dataclasses.replace(smollm2_split, eval_windows=smollm2_split.eval_windows[-8:],
                            protocol=data.Protocol(eval_tokens=4096))
  ours = perplexity.evaluate(llama.forward_fn(cfg), params, sub, progress=False)
  ref = perplexity.evaluate(None, None, sub, progress=False, nll_fn=torch_nll_fn(hf_smollm2),
                            batch_size=4)
  print(f"perplexity (last 8 windows): JAX {ours['perplexity']:.5f}, "
        f"transformers {ref['perplexity']:.5f}; "
        f"tokens/s JAX {ours['eval_tokens_per_s']:.0f}, torch {ref['eval_tokens_per_s']:.0f}")
  assert ours["scored_tokens"] == 8 * 511
  assert abs(ours["perplexity"] / ref["perplexity"] - 1) < 1e-3
  # Per-window agreement too, so the match is not an accident of averaging.
  np.testing.assert_allclose(ours["per_window_nll"], ref["per_window_nll"], rtol=1e-3)
  # The whole-protocol figure is of the same magnitude (it is 11.090 on all 32 windows).
  assert 0.5 * TRANSFORMERS_FULL_PPL < ours["perplexity"] < 2 * TRANSFORMERS_FULL_PPL


def test_quantized_bytes_match_memory(smollm2, smollm2_split):
  from quantjax.eval import memory
  from quantjax.numerics.qarray import QArray
  from quantjax.rules import QuantRule
  from quantjax.transforms import quantize_params
  cfg, params, _ = smollm2
  rules = (QuantRule(module_path=r"layers/\d+/(attn|mlp)/\w+_proj/kernel", format="int4_g64"),)
  q = quantize_params(params, rules)
  leaves = jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, QArray))
  qs = [x for x in leaves if isinstance(x, QArray)]
  assert len(qs) == 7 * cfg.num_layers
  # Independent count: int4 codes (two per byte) + one float32 scale per 64 inputs per column.
  want = 0
  for x in leaves:
    if isinstance(x, QArray):
      k, n = x.shape
      want += k * n // 2 + (k // 64) * n * 4
    else:
      want += x.size * x.dtype.itemsize
  assert memory.tree_bytes(q) == want
  n_q = sum(math.prod(x.shape) for x in qs)
  np.testing.assert_allclose(memory.bits_per_weight(q, quantized_only=True), 4.5, rtol=1e-9)
  assert memory.tree_bytes(q) < 0.35 * memory.tree_bytes(params)
  assert n_q > 0.75 * sum(x.size for x in jax.tree.leaves(params))
  # The quantized model runs under jit and stays close to FP32 on one window.
  w = smollm2_split.eval_windows[:1]
  nll_q = float(perplexity.token_nll(llama.forward(cfg, q, w), w).mean())
  nll_f = float(perplexity.token_nll(llama.forward(cfg, params, w), w).mean())
  assert nll_f < nll_q < nll_f + 0.6


def test_greedy_generation_matches_transformers(smollm2, hf_smollm2):
  import torch
  cfg, params, tok = smollm2
  prompt = tok("The Python language reference says that a for statement",
               add_special_tokens=False)["input_ids"]
  ours = llama.generate(cfg, params, np.asarray([prompt]), 12)
  with torch.no_grad():
    ref = hf_smollm2.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False,
                              pad_token_id=cfg.eos_token_id)
  assert ours.shape == (1, len(prompt) + 12)
  np.testing.assert_array_equal(ours[0], ref[0].numpy())
  print("generated:", tok.decode(ours[0, len(prompt):]))
