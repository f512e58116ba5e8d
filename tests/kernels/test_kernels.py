"""Pallas kernels vs their pure-jnp references, in interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax.kernels import dispatch
from quantjax.kernels import w8a8_matmul as w8a8
from quantjax.kernels import wq_matmul as wq

SHAPES = [(1, 256, 128), (7, 256, 96), (32, 512, 64), (130, 384, 128)]  # (M, K, N); M not blocked


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("fmt", ["int8", "int8_g64", "int4", "int4_g32", "int4_g64_asym",
                                 "int4_g128_asymf", "int4_g128"])
def test_wq_matmul_matches_reference(m, k, n, fmt):
  kw, kx = jax.random.split(jax.random.key(m * 7 + n))
  w = qj.quantize(jax.random.normal(kw, (k, n)), fmt)
  x = jax.random.normal(kx, (m, k))
  assert wq.can_use_wq_matmul(x, w)
  out = wq.wq_matmul(x, w, interpret=True)
  ref = wq.wq_matmul_reference(x, w)
  # float32 accumulation in a different order: relative to the output scale
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5,
                             atol=2e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_wq_matmul_half_activations(dtype):
  w = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), "int4_g64_asym")
  x = jax.random.normal(jax.random.key(1), (3, 4, 256)).astype(dtype)
  out = wq.wq_matmul(x, w, interpret=True)
  assert out.dtype == dtype and out.shape == (3, 4, 64)
  ref = wq.wq_matmul_reference(x, w)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def test_custom_blocks_and_errors():
  w = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), "int4_g32")
  x = jax.random.normal(jax.random.key(1), (5, 256))
  out = wq.wq_matmul(x, w, blocks=wq.BlockSizes(bm=8, bn=32, bk=64), interpret=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(wq.wq_matmul_reference(x, w)), rtol=2e-5,
                             atol=1e-4)
  with pytest.raises(ValueError, match="not a multiple of blocks"):
    wq.wq_matmul(x, w, blocks=wq.BlockSizes(bm=8, bn=48, bk=64), interpret=True)
  with pytest.raises(ValueError, match="multiple of the group size"):
    wq.wq_matmul(x, w, blocks=wq.BlockSizes(bm=8, bn=32, bk=16), interpret=True)
  with pytest.raises(ValueError, match="int8 and int4"):
    wq.wq_matmul(x, qj.quantize(jnp.ones((256, 64)), "nf4_g32"), interpret=True)
  assert not wq.can_use_wq_matmul(x, qj.quantize(jnp.ones((256, 64)), "int3_g32"))
  assert not wq.can_use_wq_matmul(x, qj.quantize(jnp.ones((256, 60)), "int8"))  # N % 8


@pytest.mark.parametrize("m,k,n", [(1, 128, 64), (9, 256, 128), (33, 512, 96)])
def test_w8a8_matmul_matches_reference(m, k, n):
  x = jax.random.normal(jax.random.key(0), (m, k))
  w = qj.quantize(jax.random.normal(jax.random.key(1), (k, n)), "int8")
  xq = qj.quantize(x, qj.QuantFormat.parse("int8", channel_axis=0))
  assert w8a8.can_use_w8a8_matmul(xq, w)
  out = w8a8.w8a8_matmul(xq, w, interpret=True)
  ref = w8a8.w8a8_matmul_reference(xq, w)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
  # and the same as ops.qdot's XLA integer path
  np.testing.assert_allclose(np.asarray(out), np.asarray(qj.qdot(x, w, act_format="int8")),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="per-token int8"):
    w8a8.w8a8_matmul(xq, qj.quantize(jnp.ones((k, n)), "int4_g32"), interpret=True)


def test_dispatch_routes_to_kernel_and_model_outputs_match():
  """An MLP through ops.qdot: identical outputs on the XLA and interpret paths."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"up": jax.random.normal(keys[0], (256, 512)), "down": jax.random.normal(keys[1], (512, 256))}
  q = qj.quantize_params(params, [qj.QuantRule(module_path=".*", format="int4_g64_asym")])
  x = jax.random.normal(keys[2], (4, 256))

  def mlp(p, a):
    return qj.qdot(jax.nn.gelu(qj.qdot(a, p["up"])), p["down"])

  with dispatch.matmul_path("xla"):
    ref = jax.jit(mlp)(q, x)
  calls = []
  orig = wq.wq_matmul

  def spy(*a, **kw):
    calls.append(kw.get("interpret"))
    return orig(*a, **kw)

  wq.wq_matmul = spy
  try:
    with dispatch.matmul_path("interpret"):
      out = mlp(q, x)
  finally:
    wq.wq_matmul = orig
  assert calls == [True, True]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-3)
  # on CPU, auto takes the XLA path
  assert jax.default_backend() == "cpu"
  np.testing.assert_array_equal(np.asarray(jax.jit(mlp)(q, x)), np.asarray(ref))


def test_benchmark_script_writes_its_tables(tmp_path):
  from experiments import bench_kernels
  rows = bench_kernels.run({"tiny": (128, 64)}, (1,), ("int8", "int4_g64"), str(tmp_path), repeats=1)
  assert {r["path"] for r in rows} == {"bf16", "xla_int8", "xla_int4_g64"}
  assert all(r["GB_s"] > 0 and r["roofline"] > 0 for r in rows)
  assert (tmp_path / "bench.md").read_text().count("| tiny |") == 3
  assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").exists()
