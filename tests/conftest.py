"""Same numerics on every machine: CPU, 8 host devices, x64 off, fixed seeds.

Dtype promotion is pinned to "standard" rather than "strict": stock Flax
(`nn.avg_pool`) and Optax (Adam's step count) mix int32 and float32 inside,
and the tests run such user code unchanged.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_dtype_promotion", "standard")

settings.register_profile("quantjax", deadline=None, max_examples=25, derandomize=True,
                          print_blob=True)
settings.load_profile("quantjax")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def pytest_configure(config):
  # Tests that need a package beyond the core and the gguf / plots extras (the torch
  # world: transformers, torch; or llama.cpp). `make test` runs them; `make
  # test-oldest` (the core at the oldest JAX stack) deselects them with -m.
  config.addinivalue_line("markers", "requires_extra(name): needs quantjax[name] beyond the "
                          "core, gguf and plots (deselected by make test-oldest)")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Each test module's compiled programs (and the constants they hold) are dropped when
  the module ends: a pytest-xdist worker runs dozens of modules, and jit's caches
  otherwise keep every executable of every earlier module alive (a worker grew past
  10 GB by the end of the suite, and two such workers do not fit a 24 GiB machine)."""
  yield
  import gc
  jax.clear_caches()
  gc.collect()
