"""Tokenizers of model files: a GGUF file's vocabulary or a Hugging Face directory's.

`load_tokenizer(path)` builds a transformers tokenizer (the `hf` extra) and
caches what a GGUF file's vocabulary gives, which takes transformers tens of
seconds to build, under quantjax's cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile

from quantjax.cache import cache_dir
from quantjax.optional import require

__all__ = ["load_tokenizer"]


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | os.PathLike):
  """A transformers tokenizer from a GGUF file or a Hugging Face directory (cached).

  Building one from a GGUF's vocabulary takes transformers tens of seconds, so
  the result is saved once (atomically) under `cache_dir()/tokenizers/`, keyed
  by the file's path, size and modification time, and loaded from there.
  """
  transformers = require("transformers", "hf", "tokenizers of GGUF files and Hugging Face directories")
  AutoTokenizer = transformers.AutoTokenizer
  path = os.fspath(path)
  if os.path.isdir(path):
    return AutoTokenizer.from_pretrained(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer source not found: {path}")
  st = os.stat(path)
  key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|"
                       f"{transformers.__version__}".encode()
                       ).hexdigest()[:16]
  cached = os.path.join(cache_dir(), "tokenizers", key)
  if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
    try:
      return AutoTokenizer.from_pretrained(cached)
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
      pass
  tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                      gguf_file=os.path.basename(path))
  try:
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(cached), prefix=".tmp-")
    try:
      tok.save_pretrained(tmp)
      if os.path.isdir(cached):
        shutil.rmtree(cached)  # ours: a damaged entry under quantjax's own cache
      os.replace(tmp, cached)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)
  except OSError:  # a read-only or full cache only costs time
    pass
  return tok
