"""The protocol follows the model's tokenizer: BOS in front of each window when it adds one."""

import math

import numpy as np
import pytest

from quantjax.eval import data
from quantjax.eval import perplexity


class _Tok:
  """A whitespace tokenizer that adds BOS (id 1) by default, or not."""

  def __init__(self, adds_bos: bool):
    self.adds_bos = adds_bos
    self.bos_token_id = 1

  def __call__(self, text, add_special_tokens=True):
    ids = [2 + (sum(map(ord, w)) % 50) for w in text.split()]
    if add_special_tokens and self.adds_bos:
      ids = [self.bos_token_id] + ids
    return {"input_ids": ids}


def test_tokenizer_bos_follows_the_tokenizer():
  assert data.tokenizer_bos(_Tok(True)) == 1
  assert data.tokenizer_bos(_Tok(False)) is None


def _fake_nll(tokens):
  """NLL of predicting token t from its prefix := t / 10 (checks which positions count)."""
  return np.asarray(tokens[:, 1:], np.float32) / 10.0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bos_windows_score_the_same_tokens(batch_size):
  toks = np.random.default_rng(0).integers(2, 50, 2000).astype(np.int32)
  p = data.Protocol(eval_tokens=4 * 32, window=32, calib_windows=2)
  plain = data.make_split(toks, p)
  bos = data.make_split(toks, p, bos_token_id=1)
  np.testing.assert_array_equal(plain.eval_windows, bos.eval_windows)
  assert plain.model_inputs().shape == (4, 32) and plain.skip == 0
  inp = bos.model_inputs()
  assert inp.shape == (4, 33) and bos.skip == 1 and (inp[:, 0] == 1).all()
  np.testing.assert_array_equal(inp[:, 1:], bos.eval_windows)
  assert bos.model_inputs(bos.calib_windows).shape == (2, 33)
  a = perplexity.evaluate(None, None, plain, nll_fn=_fake_nll, progress=False,
                          batch_size=batch_size)
  b = perplexity.evaluate(None, None, bos, nll_fn=_fake_nll, progress=False,
                          batch_size=batch_size)
  # Both score tokens 1..31 of each window: the BOS -> token 0 prediction is dropped.
  assert a["scored_tokens"] == b["scored_tokens"] == 4 * 31
  want = float(np.mean(plain.eval_windows[:, 1:] / 10.0))
  np.testing.assert_allclose([a["nll"], b["nll"]], [want, want], rtol=1e-6)
  assert math.isclose(b["perplexity"], math.exp(want), rel_tol=1e-6)
  assert (a["bos"], a["bos_token_id"]) == (False, None)
  assert (b["bos"], b["bos_token_id"]) == (True, 1)
  assert b["predicted_tokens"] == 4 * 31


def test_load_split_records_the_choice(monkeypatch):
  monkeypatch.setattr(data, "corpus_text", lambda corpus="x": "word " * 3000)
  p = data.Protocol(eval_tokens=256, window=64, calib_windows=1)
  assert data.load_split(_Tok(True), protocol=p).bos_token_id == 1
  assert data.load_split(_Tok(False), protocol=p).bos_token_id is None
  assert data.load_split(_Tok(True), protocol=p, bos=False).record()["bos"] is False
  assert data.load_split(_Tok(False), protocol=p, bos=True).bos_token_id == 1
