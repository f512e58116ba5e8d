"""Calibration batches per the protocol (docs/protocol.md).

Calibration windows come only from tokens *before* the evaluation set, at
start offsets drawn with `numpy.random.default_rng(seed)`; this reuses
`quantjax.eval.data.make_split` so methods and the perplexity protocol can
never disagree about where the evaluation set starts.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from quantjax.eval import data as data_lib

__all__ = ["calibration_windows", "calibration_batches", "split_with_calibration",
           "load_calibration"]


def split_with_calibration(tokens: np.ndarray, *, n_samples: int = 128, length: int = 512,
                           seed: int = 0, eval_tokens: int = 16384,
                           eval_window: int = 512) -> data_lib.Split:
  """A protocol `Split` of `tokens` whose calibration windows are `n_samples`
  windows of `length` tokens (evaluation windows keep `eval_window`)."""
  base = data_lib.make_split(tokens, data_lib.Protocol(
      eval_tokens=eval_tokens, window=eval_window, calib_windows=0, seed=seed))
  calib = calibration_windows(tokens, n_samples=n_samples, length=length, seed=seed,
                              eval_tokens=eval_tokens)
  starts = _starts(len(tokens) - eval_tokens, n_samples, length, seed)
  return data_lib.Split(eval_windows=base.eval_windows, calib_windows=calib, calib_starts=starts,
                        num_tokens=base.num_tokens, corpus=base.corpus,
                        corpus_sha256=base.corpus_sha256, protocol=base.protocol)


def _starts(pre: int, n: int, length: int, seed: int) -> np.ndarray:
  if pre < length:
    raise ValueError(f"only {pre} tokens precede the evaluation set; a calibration window "
                     f"needs {length}")
  rng = np.random.default_rng(seed)
  return np.sort(rng.integers(0, pre - length + 1, size=n))


def calibration_windows(tokens: np.ndarray, *, n_samples: int = 128, length: int = 512,
                        seed: int = 0, eval_tokens: int = 16384) -> np.ndarray:
  """int32 `[n_samples, length]` windows drawn from `tokens[:-eval_tokens]`.

  With `length` equal to the protocol window this is exactly
  `eval.data.make_split(...).calib_windows` (same seed, same draw).
  """
  tokens = np.asarray(tokens, np.int32)
  pre = tokens.shape[0] - eval_tokens
  starts = _starts(pre, n_samples, length, seed)
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def calibration_batches(windows: np.ndarray, batch_size: int = 8) -> Iterator[np.ndarray]:
  """Yields `[batch_size, length]` slices of the windows (last may be short)."""
  windows = np.asarray(windows)
  for i in range(0, windows.shape[0], batch_size):
    yield windows[i:i + batch_size]


def load_calibration(tokenizer: Any, *, n_samples: int = 128, length: int = 512, seed: int = 0,
                     corpus: str = data_lib.DEFAULT_CORPUS) -> np.ndarray:
  """Calibration windows of the default corpus for a tokenizer."""
  text = data_lib.corpus_text(corpus)
  return calibration_windows(data_lib.tokenize(text, tokenizer), n_samples=n_samples,
                             length=length, seed=seed)
