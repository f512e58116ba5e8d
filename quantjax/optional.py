"""Optional dependencies: each feature beyond the core names the extra that installs it.

The core (`pip install quantjax`) is the JAX stack alone: transforms, rules,
QArrays, the capture and every calibrated method, orbax checkpoints. File
formats and clients that live in other ecosystems are extras:

| extra        | packages                                   | what it adds                              |
|--------------|--------------------------------------------|-------------------------------------------|
| `gguf`       | gguf                                       | GGUF files out and in (llama.cpp's format)|
| `hf`         | transformers, tokenizers, safetensors,     | tokenizers from GGUF / Hugging Face dirs, |
|              | compressed-tensors                         | the transformers client of exported dirs  |
| `llamacpp`   | llama-cpp-python                           | llama.cpp as the runtime that scores files|
| `plots`      | matplotlib                                 | the report's plots                        |

`require(module, extra)` imports one of them where a feature first needs it,
so `import quantjax` pulls in none of them, and a missing one is an
`ImportError` that says which extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require"]

# extra -> the distributions it installs (setup.py's extras_require uses the same names).
EXTRAS = {
    "gguf": ("gguf",),
    "hf": ("transformers", "tokenizers", "safetensors", "compressed-tensors"),
    "llamacpp": ("llama-cpp-python",),
    "plots": ("matplotlib",),
}
# import name -> distribution name, where they differ.
_DIST = {"llama_cpp": "llama-cpp-python", "compressed_tensors": "compressed-tensors"}


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
  """Imports `module` (e.g. "gguf", "matplotlib.pyplot"), or raises an `ImportError`
  naming the package, the feature that needs it and `pip install 'quantjax[extra]'`."""
  if extra not in EXTRAS:
    raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    top = module.split(".")[0]
    if e.name is not None and e.name.split(".")[0] != top:
      raise  # the package is there; something it imports is missing: not ours to rename
    dist = _DIST.get(top, top)
    what = f"{feature} needs" if feature else "this feature needs"
    raise ImportError(f"{what} the package {dist!r}, which is not installed; install "
                      f"the extra: pip install 'quantjax[{extra}]'") from e
