"""The perplexity computation on a tiny model, against a direct numpy computation."""

import math

import numpy as np
import pytest
from flax import nnx

from quantjax.eval import data
from quantjax.eval import perplexity
from quantjax.models import llama


@pytest.fixture(scope="module")
def tiny():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)
  _, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  return cfg, state


def _reference(cfg, state, windows):
  logits = np.asarray(llama.forward(cfg, state, windows), np.float64)[:, :-1]
  m = logits.max(-1, keepdims=True)
  lse = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
  tgt = np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]
  return (lse - tgt).mean()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_reference(tiny, batch_size):
  cfg, state = tiny
  toks = np.random.default_rng(0).integers(0, 64, 2000).astype(np.int32)
  split = data.make_split(toks, data.Protocol(eval_tokens=5 * 64, window=64, calib_windows=2))
  rec = perplexity.evaluate(llama.forward_fn(cfg), state, split, batch_size=batch_size,
                            progress=False)
  want = _reference(cfg, state, split.eval_windows)
  np.testing.assert_allclose(rec["nll"], want, rtol=1e-5)
  np.testing.assert_allclose(rec["perplexity"], math.exp(want), rtol=1e-5)
  assert rec["scored_tokens"] == 5 * 63
  assert len(rec["per_window_nll"]) == 5
  for field in ("model", "corpus_sha256", "corpus_tokens", "eval_tokens", "window", "dtype",
                "seed", "jax_version", "jaxlib_version", "device", "compile_s", "eval_s",
                "eval_tokens_per_s"):
    assert field in rec, field


def test_token_nll_matches_log_softmax():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  toks = rng.integers(0, 7, (2, 5)).astype(np.int32)
  got = np.asarray(perplexity.token_nll(logits, toks))
  lp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
  want = -np.take_along_axis(lp, toks[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_custom_nll_fn_uses_same_protocol(tiny):
  cfg, state = tiny
  toks = np.random.default_rng(0).integers(0, 64, 1000).astype(np.int32)
  split = data.make_split(toks, data.Protocol(eval_tokens=128, window=64, calib_windows=0))
  rec = perplexity.evaluate(None, None, split, progress=False,
                            nll_fn=lambda b: np.full((b.shape[0], 63), 2.0, np.float32))
  np.testing.assert_allclose(rec["perplexity"], math.exp(2.0), rtol=1e-6)


def _log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _int3_case(tiny, seed):
  """The tiny model, 4 windows of 64 random tokens, and its int3 round-to-nearest copy."""
  from quantjax.rules import QuantRule
  from quantjax.transforms import quantize_params
  cfg, state = tiny
  toks = np.random.default_rng(seed).integers(0, 64, 2000).astype(np.int32)
  split = data.make_split(toks, data.Protocol(eval_tokens=4 * 64, window=64, calib_windows=0))
  q = quantize_params(nnx.to_pure_dict(state), [QuantRule(module_path=r".*_proj/kernel",
                                                           format="int3")])
  return cfg, state, toks, split, llama.forward_fn(cfg), q


def test_kl_and_top1_against_a_reference(tiny):
  """KL over the reference's top-k plus a remainder bucket: exact when k covers the
  vocabulary, a lower bound (and close) when it does not; top-1 agreement exact."""
  cfg, state, toks, split, fwd, q = _int3_case(tiny, seed=0)
  w = split.eval_windows
  p = _log_softmax(np.asarray(llama.forward(cfg, state, w))[:, :-1])
  r = _log_softmax(np.asarray(llama.forward(cfg, q, w))[:, :-1])
  exact = (np.exp(p) * (p - r)).sum(-1)
  top1 = (p.argmax(-1) == r.argmax(-1)).mean()
  for k in (64, 8):
    ref = perplexity.evaluate(fwd, state, split, progress=False, collect_top_k=k)
    base = ref.pop("baseline")
    assert base.top_idx.shape == (4, 63, k)
    got = perplexity.evaluate(fwd, q, split, progress=False, baseline=base, batch_size=3)
    assert got["top1_agreement"] == pytest.approx(top1)
    if k == 64:
      np.testing.assert_allclose(got["kl_mean"], exact.mean(), rtol=1e-3, atol=2e-6)
      assert got["kl_rest_mass"] < 1e-5
    else:
      # a flat random model: most mass is outside the top 8, so the bound is loose
      assert 0 < got["kl_mean"] <= exact.mean() + 2e-6 and got["kl_rest_mass"] > 0.5
  with pytest.raises(ValueError, match="other token windows"):
    other = data.make_split(toks[::-1].copy(), data.Protocol(eval_tokens=4 * 64, window=64,
                                                             calib_windows=0))
    perplexity.evaluate(fwd, q, other, progress=False, baseline=base)


def test_logits_from_another_runtime_scored_as_jax_scores_them(tiny):
  """`evaluate_logits` (llama.cpp, transformers) and `evaluate` (JAX) give the same
  perplexity, KL and top-1 statistics for the same logits."""
  cfg, state, toks, split, fwd, q = _int3_case(tiny, seed=3)
  base = perplexity.evaluate(fwd, state, split, progress=False, collect_top_k=8).pop("baseline")
  want = perplexity.evaluate(fwd, q, split, progress=False, baseline=base)
  got = perplexity.evaluate_logits(lambda b: np.asarray(llama.forward(cfg, q, b)), split,
                                   baseline=base, batch_size=3, progress=False)
  for key in ("perplexity", "kl_mean", "kl_p99", "top1_agreement", "kl_rest_mass"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
  np.testing.assert_allclose(got["per_window_nll"], want["per_window_nll"], rtol=1e-5)
  nll, kl, top1, rest = perplexity.token_stats(
      np.asarray(llama.forward(cfg, q, split.eval_windows[:1]))[0, :-1],
      split.eval_windows[0, 1:])
  assert kl is None and top1 is None and rest is None
  np.testing.assert_allclose(nll.mean(), want["per_window_nll"][0], rtol=1e-5)
