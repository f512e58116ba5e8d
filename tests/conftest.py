"""Same numerics on every machine: CPU, x64 off, strict dtype promotion, fixed seeds."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile("quantjax", deadline=None, max_examples=25, derandomize=True,
                          print_blob=True)
settings.load_profile("quantjax")


@pytest.fixture
def rng():
  return np.random.default_rng(0)
