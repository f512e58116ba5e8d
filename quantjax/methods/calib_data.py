"""Calibration batches per the protocol (docs/protocol.md).

Calibration windows come only from tokens *before* the evaluation set, at
start offsets drawn with `numpy.random.default_rng(seed)`. The draw is
`calibration_starts`; the protocol's split (`quantjax.eval.data.make_split`)
takes its calibration windows from it too, so methods and the perplexity
protocol can never disagree about where the evaluation set starts. A
`Split` with calibration windows of another length, and the windows of a
named corpus, are `quantjax.eval.data.split_with_calibration` /
`load_calibration`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["calibration_starts", "calibration_windows", "calibration_batches"]


def calibration_starts(pre: int, n_samples: int, length: int, seed: int) -> np.ndarray:
  """Sorted start offsets of `n_samples` windows of `length` tokens within the first
  `pre` tokens (those before the evaluation set), drawn with `default_rng(seed)`."""
  if pre < length:
    raise ValueError(f"only {pre} tokens precede the evaluation set; a calibration window "
                     f"needs {length}")
  rng = np.random.default_rng(seed)
  return np.sort(rng.integers(0, pre - length + 1, size=n_samples))


def calibration_windows(tokens: np.ndarray, *, n_samples: int = 128, length: int = 512,
                        seed: int = 0, eval_tokens: int = 16384) -> np.ndarray:
  """int32 `[n_samples, length]` windows drawn from `tokens[:-eval_tokens]`.

  With `length` equal to the protocol window this is exactly
  `eval.data.make_split(...).calib_windows` (same seed, same draw).
  """
  tokens = np.asarray(tokens, np.int32)
  pre = tokens.shape[0] - eval_tokens
  starts = calibration_starts(pre, n_samples, length, seed)
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def calibration_batches(windows: np.ndarray, batch_size: int = 8) -> Iterator[np.ndarray]:
  """Yields `[batch_size, length]` slices of the windows (last may be short)."""
  windows = np.asarray(windows)
  for i in range(0, windows.shape[0], batch_size):
    yield windows[i:i + batch_size]
