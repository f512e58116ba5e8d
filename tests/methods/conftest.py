"""A tiny random Llama shared by the method tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quantjax.models import llama


def make_tiny(seed: int = 0, num_kv_heads: int = 2, num_layers: int = 2):
  cfg = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                          num_layers=num_layers, num_heads=4, num_kv_heads=num_kv_heads,
                          head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5)
  model = llama.Llama(cfg, rngs=nnx.Rngs(seed))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  # Larger weights than the init and uneven norm scales (some outlier channels),
  # so quantization errors and smoothing matter.
  def fix(path, x):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if names[-1] == "scale":
      s = 1.0 + 0.2 * rng.normal(size=x.shape)
      s[rng.choice(x.shape[0], 3, replace=False)] *= 8.0
      return jnp.asarray(s, jnp.float32)
    return jnp.asarray(np.asarray(x) * 5.0, jnp.float32)
  pure = jax.tree_util.tree_map_with_path(fix, pure)
  return cfg, pure


@pytest.fixture(scope="session")
def tiny():
  return make_tiny()


@pytest.fixture(scope="session")
def tiny_tokens():
  return np.random.default_rng(1).integers(0, 128, size=(8, 32)).astype(np.int32)
