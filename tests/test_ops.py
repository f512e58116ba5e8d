import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax.kernels import dispatch
from quantjax.numerics.qarray import ActQuantized


@pytest.mark.parametrize("fmt", ["int8", "int4_g32_asym", "int3_g32", "nf4_g32", "fp8_e4m3", "bf16"])
@pytest.mark.parametrize("contract_axis", [0, 1])
def test_qdot_matches_dequantized_dot(fmt, contract_axis):
  w = jax.random.normal(jax.random.key(0), (64, 96))
  if contract_axis == 1:
    w = w.T
    q = qj.quantize(w, qj.QuantFormat.parse(fmt, channel_axis=0, group_axis=1)
                    if fmt != "bf16" else fmt)
  else:
    q = qj.quantize(w, fmt)
  x = jax.random.normal(jax.random.key(1), (2, 3, 64))
  ref = jnp.einsum("btk,kn->btn", x, q.dequantize()) if contract_axis == 0 else \
      jnp.einsum("btk,nk->btn", x, q.dequantize())
  out = jax.jit(lambda a, b: qj.qdot(a, b, contract_axis=contract_axis))(x, q)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
  assert out.shape == (2, 3, 96) and out.dtype == x.dtype


def test_qdot_plain_array_and_dtype():
  w = jax.random.normal(jax.random.key(0), (16, 8))
  x = jnp.ones((4, 16), jnp.bfloat16)
  out = qj.qdot(x, w)
  assert out.dtype == jnp.bfloat16


def test_qdot_shape_errors():
  w = qj.quantize(jnp.ones((64, 8)), "int8")
  with pytest.raises(ValueError, match=r"activation shape \(2, 32\) does not contract with weight "
                                       r"shape \(64, 8\) \(last dim 32 vs contraction dim 64"):
    qj.qdot(jnp.ones((2, 32)), w)
  with pytest.raises(ValueError, match=r"floating point, got int32 \(activation shape \(2, 64\)"):
    qj.qdot(jnp.ones((2, 64), jnp.int32), w)
  with pytest.raises(ValueError, match="2-D weight"):
    qj.qdot(jnp.ones((2, 4)), jnp.ones((4, 4, 4)))


def test_w8a8_integer_path_matches_fake_quant():
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.normal(k1, (128, 64))
  x = jax.random.normal(k2, (5, 128)) * jnp.linspace(0.1, 3.0, 5)[:, None]
  wq = qj.quantize(w, "int8")
  act = qj.QuantFormat.parse("int8")
  out = qj.qdot(x, wq, act_format=act)
  # reference: per-token fake-quant activations times dequantized weights
  xq = qj.quantize(x, act.replace(channel_axis=0)).dequantize()
  ref = xq @ wq.dequantize()
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
  # carried in the tree, the activation format reaches qdot with no model change
  out2 = qj.qdot(x, ActQuantized(weight=wq, act_format=act))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
  rel = float(jnp.linalg.norm(out - x @ w) / jnp.linalg.norm(x @ w))
  assert rel < 0.02
  with pytest.raises(ValueError, match="W8A8 needs a symmetric int8 weight"):
    qj.qdot(x, qj.quantize(w, "int4_g32"), act_format=act)


def test_w8a8_via_rules():
  params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
  q = qj.quantize_params(params, [qj.QuantRule(module_path="w", format="int8", act_format="int8")])
  assert isinstance(q["w"], ActQuantized)
  assert qj.tree_bytes(q) == q["w"].weight.nbytes
  out = jax.jit(qj.qdot)(jnp.ones((3, 64)), q["w"])
  assert out.shape == (3, 32)


def test_dispatch_paths():
  w = qj.quantize(jnp.ones((64, 8)), "int8")
  x = jnp.ones((2, 64))
  with dispatch.matmul_path("xla"):
    a = qj.qdot(x, w)
  b = qj.qdot(x, w)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="unknown matmul path"):
    with dispatch.matmul_path("cuda"):
      pass
  nf4 = qj.quantize(jnp.ones((64, 8)), "nf4_g32")
  with dispatch.matmul_path("kernel"):
    with pytest.raises(ValueError, match=r"no kernel accepts weight nf4_g32 \(64, 8\)"):
      qj.qdot(x, nf4)


def test_qeinsum():
  w = jax.random.normal(jax.random.key(0), (64, 16))
  q = qj.quantize(w, "int8")
  x = jnp.ones((2, 64))
  np.testing.assert_allclose(np.asarray(qj.qeinsum("bk,kn->bn", x, q)),
                             np.asarray(x @ q.dequantize()), rtol=1e-5)
