"""quantjax's cache directory (built tokenizers, assembled model files, compiled kernels)."""

from __future__ import annotations

import os

__all__ = ["cache_dir"]


def cache_dir() -> str:
  """`$QUANTJAX_CACHE`, else `$XDG_CACHE_HOME/quantjax`, else `~/.cache/quantjax`."""
  d = os.environ.get("QUANTJAX_CACHE")
  if d:
    return d
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "quantjax")
