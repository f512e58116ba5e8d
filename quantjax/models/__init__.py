"""Flax NNX models whose Linear layers call `quantjax.ops.qdot`, and their loaders."""

from quantjax.models.gemma3 import Gemma3, Gemma3Config
from quantjax.models.llama import Llama, LlamaConfig, forward, generate, model_from_params
from quantjax.models.load import (gemma3_path, load_gemma3, load_gguf, load_hf, load_smollm2,
                                  model_module, smollm2_path)

__all__ = [
    "Gemma3",
    "Gemma3Config",
    "Llama",
    "LlamaConfig",
    "forward",
    "gemma3_path",
    "generate",
    "load_gemma3",
    "load_gguf",
    "load_hf",
    "load_smollm2",
    "model_from_params",
    "model_module",
    "smollm2_path",
]
