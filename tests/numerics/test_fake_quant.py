import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax.numerics import fake_quant as fq
from quantjax.numerics import qarray as qa


@pytest.mark.parametrize("spec", ["int8", "int4_g32_asym", "nf4_g32", "ternary", "fp8_e4m3"])
def test_forward_equals_quantize_dequantize(spec):
  x = jax.random.normal(jax.random.key(0), (64, 16))
  np.testing.assert_allclose(np.asarray(fq.fake_quant(x, spec)),
                             np.asarray(qa.quantize(x, spec).dequantize()), rtol=1e-6, atol=1e-7)


def test_ste_gradient_is_identity_inside_range_and_zero_outside():
  x = jnp.linspace(-1.0, 1.0, 64)[:, None]
  g = jax.grad(lambda v: jnp.sum(fq.fake_quant(v, "int4_t", "minmax") * 3.0))(x)
  np.testing.assert_array_equal(np.asarray(g), np.full(x.shape, 3.0))
  # Signed-max scales map +1 to code -8 with a negative scale, so the codes
  # reach [-7s, 8s] = [-0.875, 1]: values below -0.875 - s/2 clip.
  g = np.asarray(jax.grad(lambda v: jnp.sum(fq.fake_quant(v, "int4_t", "signed_max")))(x))[:, 0]
  xs = np.asarray(x)[:, 0]
  np.testing.assert_array_equal(g, (xs >= -0.9375).astype(np.float32))
  # a percentile-clipped range puts the extremes outside: their gradient is 0
  from quantjax.numerics.calibrate import Calibration
  c = Calibration(method="percentile", percentile=90.0)
  g2 = jax.grad(lambda v: jnp.sum(fq.fake_quant(v, "int4_t", c)))(x)
  # int4 covers [-8s, 7s]: only the top end (1.0 > 7s + s/2) falls outside
  assert float(g2[-1, 0]) == 0.0 and float(g2[0, 0]) == 1.0 and float(g2[32, 0]) == 1.0


def test_round_ste():
  x = jnp.array([0.4, 1.5, 2.5, -0.6])
  np.testing.assert_array_equal(np.asarray(fq.round_ste(x)), [0.0, 2.0, 2.0, -1.0])
  np.testing.assert_array_equal(np.asarray(jax.grad(lambda v: jnp.sum(fq.round_ste(v)))(x)),
                                np.ones(4))


def test_lsq_forward_and_step_gradient():
  x = jnp.array([[0.26], [-0.9], [3.0], [0.05]])
  step = jnp.array([[0.25]])
  fmt = "int4_t"  # qmin -8, qmax 7
  out = fq.lsq_fake_quant(x, step, fmt)
  np.testing.assert_allclose(np.asarray(out[:, 0]), [0.25, -1.0, 1.75, 0.0], atol=1e-7)
  g = jax.grad(lambda s: jnp.sum(fq.lsq_fake_quant(x, s, fmt)))(step)
  v = np.array([0.26, -0.9, 3.0, 0.05]) / 0.25
  inside = [np.round(v[0]) - v[0], np.round(v[1]) - v[1], 7.0, np.round(v[3]) - v[3]]
  expect = sum(inside) / np.sqrt(4 * 7)
  np.testing.assert_allclose(float(g[0, 0]), expect, rtol=1e-5)
  gx = jax.grad(lambda a: jnp.sum(fq.lsq_fake_quant(a, step, fmt)))(x)
  np.testing.assert_array_equal(np.asarray(gx[:, 0]), [1.0, 1.0, 0.0, 1.0])


def test_lsq_learns_a_better_step():
  import optax
  x = jax.random.normal(jax.random.key(1), (512, 4))
  fmt = "int3"
  step = fq.lsq_init_step(x, fmt)
  assert step.shape == (1, 4)
  loss = lambda s: jnp.mean((fq.lsq_fake_quant(x, s, fmt) - x) ** 2)
  opt = optax.adam(1e-2)
  st = opt.init(step)
  l0 = float(loss(step))
  for _ in range(100):
    g = jax.grad(loss)(step)
    u, st = opt.update(g, st)
    step = optax.apply_updates(step, u)
  assert float(loss(step)) < 0.9 * l0


def test_lsq_refuses_asymmetric():
  with pytest.raises(ValueError, match="symmetric integer"):
    fq.lsq_fake_quant(jnp.ones((4, 4)), jnp.ones((1, 4)), "int4_asym")
