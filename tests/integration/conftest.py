"""Session fixtures for the real-model tests: SmolLM2-135M in JAX and in transformers."""

import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def smollm2():
  """(config, params, tokenizer) from the shipped Q4_1 GGUF, dequantized to FP32."""
  from quantjax.models import load
  return load.load_smollm2()


@pytest.fixture(scope="session")
def smollm2_split(smollm2):
  from quantjax.eval import data
  return data.load_split(smollm2[2])


@pytest.fixture(scope="session")
def hf_smollm2():
  """The transformers (PyTorch FP32, CPU) model loaded from the same GGUF."""
  import torch
  import transformers
  from quantjax.models import load
  path = load.smollm2_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()


def torch_nll_fn(model):
  """`tokens [B, T] -> NLL [B, T-1]` with the transformers model (float32)."""
  import torch

  def fn(tokens):
    with torch.no_grad():
      t = torch.as_tensor(np.array(tokens), dtype=torch.long)
      logits = model(t).logits.float()[:, :-1]
      lp = torch.log_softmax(logits, dim=-1)
      return (-lp.gather(-1, t[:, 1:, None])[..., 0]).numpy()
  return fn
