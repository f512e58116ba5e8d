"""The kernels compiled for the machine's accelerator, against their references.

Skipped where JAX has no GPU or TPU backend (CI is CPU-only: there the
kernels run in interpret mode, tests/kernels/test_kernels.py). On a GPU/TPU
machine: `pip install -U "jax[cuda12]"` (or `jax[tpu]`), then
`pytest tests/kernels/test_native.py` and `python -m experiments.bench_kernels`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax.kernels import dispatch
from quantjax.kernels import int4_matmul as i4
from quantjax.kernels import int8_matmul as i8
from quantjax.kernels import w8a8_matmul as w8a8

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="needs a GPU or TPU backend")

SHAPES = [(1, 576, 1536), (7, 1536, 576), (1, 4096, 14336), (32, 14336, 4096), (256, 4096, 4096)]


FORMATS = ["int4_g64", "int4_g64_asym", "int4_g128_asymf", "q4_0", "int8", "q8_0"]


@pytest.mark.parametrize("fmt,m,k,n", [(f, *s) for f in FORMATS for s in SHAPES
                                       if "g128" not in f or s[1] % 128 == 0])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_matches_reference_on_device(m, k, n, fmt, dtype):
  mod = i4 if "4" in fmt.split("_")[0] else i8
  w = qj.quantize(jax.random.normal(jax.random.key(0), (k, n)), fmt)
  x = jax.random.normal(jax.random.key(1), (m, k)).astype(dtype)
  can_use = i4.can_use_int4_matmul if mod is i4 else i8.can_use_int8_matmul
  assert can_use(x, w)
  out = (i4.int4_matmul if mod is i4 else i8.int8_matmul)(x, w)
  ref = i4.int4_matmul_reference(x, w)
  # bf16 / tf32 tensor-core dots: relative to the output's scale
  tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=tol * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))), rtol=0)


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (256, 4096, 14336)])
def test_w8a8_on_device(m, k, n):
  xq = qj.quantize(jax.random.normal(jax.random.key(0), (m, k)),
                   qj.QuantFormat.parse("int8", channel_axis=0))
  w = qj.quantize(jax.random.normal(jax.random.key(1), (k, n)), "int8")
  np.testing.assert_allclose(np.asarray(w8a8.w8a8_matmul(xq, w)),
                             np.asarray(w8a8.w8a8_matmul_reference(xq, w)), rtol=1e-5, atol=1e-3)


def test_qdot_kernel_path_on_device():
  x = jax.random.normal(jax.random.key(0), (4, 1536)).astype(jnp.bfloat16)
  w = qj.quantize(jax.random.normal(jax.random.key(1), (1536, 576)), "int4_g64_asym")

  def under(path):  # a fresh function per path: jit caches traces per function
    def f(a, b):
      with dispatch.matmul_path(path):
        return qj.qdot(a, b)
    return jax.jit(f)

  ref, out = under("xla")(x, w), under("kernel")(x, w)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))), rtol=0)
