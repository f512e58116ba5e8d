"""Flax NNX models whose Linear layers call `quantjax.ops.qdot`, and their loaders."""

from quantjax.models.llama import Llama, LlamaConfig, forward, generate, model_from_params
from quantjax.models.load import load_gguf, load_hf, load_smollm2, smollm2_path

__all__ = [
    "Llama",
    "LlamaConfig",
    "forward",
    "generate",
    "load_gguf",
    "load_hf",
    "load_smollm2",
    "model_from_params",
    "smollm2_path",
]
