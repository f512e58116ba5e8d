"""The perplexity protocol's corpus, token counts and split."""

import numpy as np
import pytest

from quantjax.eval import data


class _CharTokenizer:
  """One token per character; stands in for a real tokenizer in fast tests."""

  def __call__(self, text, add_special_tokens=True):
    ids = [ord(c) % 1000 for c in text]
    if add_special_tokens:
      ids = [1] + ids
    return {"input_ids": ids}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  from quantjax.models import load
  return load.load_tokenizer(load.smollm2_path())


def test_default_corpus_is_pydoc_topics():
  from pydoc_data.topics import topics
  text = data.corpus_text()
  assert text == "\n\n".join(topics[k] for k in sorted(topics))
  assert len(text) > 400_000


def test_protocol_token_counts_smollm2(smollm2_tokenizer):
  split = data.load_split(smollm2_tokenizer)
  assert split.num_tokens == 113_108  # docs/protocol.md, CPython 3.11
  assert split.eval_windows.shape == (32, 512)
  assert split.calib_windows.shape == (128, 512)
  toks = data.tokenize(data.corpus_text(), smollm2_tokenizer)
  np.testing.assert_array_equal(split.eval_windows.reshape(-1), toks[-16384:])
  assert toks[:200].tolist() == smollm2_tokenizer(
      data.corpus_text()[:2000], add_special_tokens=False)["input_ids"][:200]
  rec = split.record()
  assert rec["predicted_tokens"] == 32 * 511
  assert rec["corpus_sha256"] == data.sha256(data.corpus_text())
  assert rec["calib_tokens_available"] == 113_108 - 16_384


def test_calibration_only_before_eval_and_seeded():
  toks = np.arange(10_000, dtype=np.int32)
  p = data.Protocol(eval_tokens=2048, window=256, calib_windows=16, seed=3)
  a = data.make_split(toks, p)
  b = data.make_split(toks, p)
  np.testing.assert_array_equal(a.calib_windows, b.calib_windows)
  assert a.calib_windows.max() < 10_000 - 2048  # never touches the evaluation tokens
  assert (np.diff(a.calib_windows, axis=1) == 1).all()  # contiguous windows
  c = data.make_split(toks, data.Protocol(eval_tokens=2048, window=256, calib_windows=16, seed=4))
  assert not np.array_equal(a.calib_starts, c.calib_starts)
  np.testing.assert_array_equal(a.eval_windows.reshape(-1), toks[-2048:])


def test_text_file_corpus(tmp_path):
  text = "héllo wörld\n" * 300
  path = tmp_path / "corpus.txt"
  path.write_text(text, encoding="utf-8")
  split = data.load_split(_CharTokenizer(), str(path),
                          data.Protocol(eval_tokens=1024, window=128, calib_windows=4))
  assert split.num_tokens == len(text)  # no special tokens added (the fake adds one if asked)
  assert split.corpus == str(path)
  assert split.corpus_sha256 == data.sha256(text)
  assert split.eval_windows.shape == (8, 128)


def test_too_short_corpus_is_a_clear_error(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("only a few words", encoding="utf-8")
  with pytest.raises(ValueError, match=r"short.txt.*16 tokens.*16896"):
    data.load_split(_CharTokenizer(), str(path))


def test_missing_and_non_utf8_corpus(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    data.corpus_text(str(tmp_path / "missing.txt"))
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("caf\xe9".encode("latin-1") * 10)
  with pytest.raises(ValueError, match="UTF-8"):
    data.corpus_text(str(bad))


def test_protocol_validation():
  with pytest.raises(ValueError, match="multiple of window"):
    data.Protocol(eval_tokens=1000, window=512)
