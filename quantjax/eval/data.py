"""Corpora, tokenization and the calibration / evaluation split.

The protocol (docs/protocol.md):

1. Text: `"\\n\\n".join(topics[k] for k in sorted(topics))` from CPython's
   `pydoc_data.topics.topics` (the default corpus, `"pydoc_topics"`), or any
   UTF-8 text file, tokenized with the model's tokenizer and no special
   tokens. SmolLM2's tokenizer gives 113,108 tokens on CPython 3.11.
2. Evaluation: the last `eval_tokens` (16,384) tokens as `eval_tokens /
   window` (32) windows of `window` (512) tokens, each scored independently.
3. Calibration: only tokens before the evaluation set; `calib_windows` (128)
   windows of `window` tokens at start positions drawn with
   `numpy.random.default_rng(seed)`.
4. BOS: a model whose tokenizer adds a BOS token by default (Gemma) sees BOS
   in front of every window, as llama.cpp's perplexity tool does: the model
   input is `window + 1` tokens and the prediction of the window's first token
   from BOS is not scored, so the predicted tokens stay the same
   `eval_windows x (window - 1)`. SmolLM2's tokenizer adds none. The choice is
   recorded (`bos`, `bos_token_id`) in every result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from quantjax.eval import corpora
from quantjax.methods import calib_data

__all__ = [
    "DEFAULT_CORPUS",
    "Protocol",
    "Split",
    "corpus_text",
    "load_calibration",
    "make_split",
    "load_split",
    "sha256",
    "split_with_calibration",
    "tokenize",
    "tokenizer_bos",
]

DEFAULT_CORPUS = "pydoc_topics"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Sizes of the evaluation and calibration sets (defaults: docs/protocol.md)."""

  eval_tokens: int = 16384
  window: int = 512
  calib_windows: int = 128
  seed: int = 0

  def __post_init__(self):
    if self.window < 2:
      raise ValueError(f"window must be >= 2 tokens, got {self.window}")
    if self.eval_tokens < self.window or self.eval_tokens % self.window:
      raise ValueError(f"eval_tokens ({self.eval_tokens}) must be a positive multiple of "
                       f"window ({self.window})")
    if self.calib_windows < 0:
      raise ValueError(f"calib_windows must be >= 0, got {self.calib_windows}")

  @property
  def eval_windows(self) -> int:
    return self.eval_tokens // self.window


@dataclasses.dataclass(frozen=True)
class Split:
  """A tokenized corpus cut per the protocol.

  Attributes:
    eval_windows: int32 `[eval_tokens / window, window]`.
    calib_windows: int32 `[calib_windows, window]`, from tokens before the
      evaluation set only.
    calib_starts: start offsets of the calibration windows.
    num_tokens: tokens in the whole corpus.
    corpus: the corpus name or path.
    corpus_sha256: hash of the corpus text (UTF-8).
    protocol: the sizes used.
    calib_corpus: the corpus of the calibration windows when it is not
      `corpus` (cross-domain calibration), else "".
    calib_corpus_sha256: its hash.
    bos_token_id: prefixed to every window the model sees (`model_inputs`),
      or None (no BOS).
  """

  eval_windows: np.ndarray
  calib_windows: np.ndarray
  calib_starts: np.ndarray
  num_tokens: int
  corpus: str
  corpus_sha256: str
  protocol: Protocol
  calib_corpus: str = ""  # where the calibration windows come from, when not `corpus`
  calib_corpus_sha256: str = ""
  bos_token_id: int | None = None

  @property
  def skip(self) -> int:
    """Leading positions of `model_inputs` whose prediction is not scored (1 with BOS)."""
    return 0 if self.bos_token_id is None else 1

  def model_inputs(self, windows: np.ndarray | None = None) -> np.ndarray:
    """`windows` (default: the evaluation windows) as the model sees them:
    `[n, window + 1]` with BOS in front when the split has one, else unchanged.
    Score `nll[:, self.skip:]` of them (`[n, window - 1]` either way)."""
    w = self.eval_windows if windows is None else np.asarray(windows, np.int32)
    if self.bos_token_id is None:
      return w
    bos = np.full((w.shape[0], 1), self.bos_token_id, np.int32)
    return np.concatenate([bos, w], axis=1)

  def record(self) -> dict[str, Any]:
    """The protocol fields every result carries."""
    p = self.protocol
    return {
        "bos": self.bos_token_id is not None,
        "bos_token_id": None if self.bos_token_id is None else int(self.bos_token_id),
        "corpus": self.corpus,
        "corpus_sha256": self.corpus_sha256,
        "corpus_tokens": int(self.num_tokens),
        "eval_tokens": int(p.eval_tokens),
        "eval_windows": int(p.eval_windows),
        "window": int(p.window),
        "predicted_tokens": int(p.eval_windows * (p.window - 1)),
        "calib_windows": int(self.calib_windows.shape[0]),
        "calib_tokens_available": int(self.num_tokens - p.eval_tokens),
        "seed": int(p.seed),
        "calib_corpus": self.calib_corpus or self.corpus,
        "calib_corpus_sha256": self.calib_corpus_sha256 or self.corpus_sha256,
    }


def corpus_text(corpus: str = DEFAULT_CORPUS) -> str:
  """The text of `corpus`: "pydoc_topics", a name of `eval/corpora.py`'s
  `NAMED_CORPORA` (e.g. "gutenberg_kjv_new_testament"), or the path of a UTF-8
  text file."""
  if corpus == DEFAULT_CORPUS:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))
  if corpus in corpora.NAMED_CORPORA:
    return corpora.named_corpus_text(corpus)
  path = os.fspath(corpus)
  if not os.path.exists(path):
    raise FileNotFoundError(f"corpus {corpus!r} is neither {DEFAULT_CORPUS!r}, a named corpus "
                            f"({', '.join(sorted(corpora.NAMED_CORPORA))}) nor an existing "
                            "text file")
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"corpus file {path} is not UTF-8 text: {e}") from e


def sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
  """Token ids (int32) of `text` without special tokens (no BOS/EOS)."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def tokenizer_bos(tokenizer: Any) -> int | None:
  """The BOS id `tokenizer` puts in front of a text by default, or None.

  Decided by encoding a probe text with and without special tokens, so it
  follows the tokenizer's own setting (Gemma's adds `<bos>`, SmolLM2's adds
  nothing).
  """
  probe = "The quick brown fox."
  plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
  full = list(tokenizer(probe)["input_ids"])
  bos = getattr(tokenizer, "bos_token_id", None)
  if bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain:
    return int(bos)
  return None


def make_split(tokens: np.ndarray, protocol: Protocol = Protocol(), *,
               corpus: str = DEFAULT_CORPUS, corpus_sha256: str = "",
               bos_token_id: int | None = None) -> Split:
  """Cuts `tokens` into evaluation and calibration windows (`bos_token_id`: see `Split`).

  Raises:
    ValueError: the corpus is too short for `protocol` (the message gives both
      counts).
  """
  tokens = np.asarray(tokens, np.int32)
  p = protocol
  n = int(tokens.shape[0])
  need = p.eval_tokens + (p.window if p.calib_windows else 0)
  if n < need:
    raise ValueError(
        f"corpus {corpus!r} has {n} tokens; the protocol needs at least {need} "
        f"({p.eval_tokens} evaluation tokens"
        + (f" + one {p.window}-token calibration window before them" if p.calib_windows else "")
        + "). Use a longer text or lower eval.tokens / calib windows.")
  eval_windows = tokens[n - p.eval_tokens:].reshape(p.eval_windows, p.window)
  pre = n - p.eval_tokens
  if p.calib_windows:
    starts = calib_data.calibration_starts(pre, p.calib_windows, p.window, p.seed)
    calib = np.stack([tokens[s:s + p.window] for s in starts])
  else:
    starts = np.zeros((0,), np.int64)
    calib = np.zeros((0, p.window), np.int32)
  return Split(eval_windows=eval_windows, calib_windows=calib, calib_starts=starts,
               num_tokens=n, corpus=str(corpus), corpus_sha256=corpus_sha256, protocol=p,
               bos_token_id=None if bos_token_id is None else int(bos_token_id))


def load_split(tokenizer: Any, corpus: str = DEFAULT_CORPUS,
               protocol: Protocol = Protocol(), *, bos: bool | None = None) -> Split:
  """Reads, hashes, tokenizes and splits `corpus`.

  `bos`: None (default) follows the tokenizer (`tokenizer_bos`); True
  requires a BOS token, False scores windows without one.
  """
  text = corpus_text(corpus)
  bos_id = tokenizer_bos(tokenizer) if bos is None else None
  if bos:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
      raise ValueError(f"bos=True but the tokenizer {type(tokenizer).__name__} has no "
                       "bos_token_id")
  return make_split(tokenize(text, tokenizer), protocol, corpus=corpus,
                    corpus_sha256=sha256(text), bos_token_id=bos_id)


def split_with_calibration(tokens: np.ndarray, *, n_samples: int = 128, length: int = 512,
                           seed: int = 0, eval_tokens: int = 16384,
                           eval_window: int = 512) -> Split:
  """A protocol `Split` of `tokens` whose calibration windows are `n_samples`
  windows of `length` tokens (evaluation windows keep `eval_window`)."""
  base = make_split(tokens, Protocol(eval_tokens=eval_tokens, window=eval_window,
                                     calib_windows=0, seed=seed))
  pre = len(tokens) - eval_tokens
  calib = calib_data.calibration_windows(tokens, n_samples=n_samples, length=length, seed=seed,
                                         eval_tokens=eval_tokens)
  starts = calib_data.calibration_starts(pre, n_samples, length, seed)
  return Split(eval_windows=base.eval_windows, calib_windows=calib, calib_starts=starts,
               num_tokens=base.num_tokens, corpus=base.corpus,
               corpus_sha256=base.corpus_sha256, protocol=base.protocol)


def load_calibration(tokenizer: Any, *, n_samples: int = 128, length: int = 512, seed: int = 0,
                     corpus: str = DEFAULT_CORPUS) -> np.ndarray:
  """Calibration windows (`methods.calib_data.calibration_windows`) of `corpus` for a
  tokenizer."""
  return calib_data.calibration_windows(tokenize(corpus_text(corpus), tokenizer),
                                        n_samples=n_samples, length=length, seed=seed)
