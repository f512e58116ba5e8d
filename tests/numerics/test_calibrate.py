import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax.numerics import calibrate as cal
from quantjax.numerics import qarray as qa


def _heavy_tailed(shape, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, shape)
  return x.at[0].set(40.0 * jax.random.normal(k2, shape[1:]))  # one outlier row


def test_minmax_scale_per_granularity():
  x = jax.random.normal(jax.random.key(0), (128, 6))
  s_t, _ = cal.choose_scales(x, "int8_t", "minmax")
  s_c, _ = cal.choose_scales(x, "int8", "minmax")
  s_g, _ = cal.choose_scales(x, "int8_g32", "minmax")
  assert s_t.shape == (1, 1) and s_c.shape == (1, 6) and s_g.shape == (4, 6)
  np.testing.assert_allclose(float(s_t[0, 0]), float(jnp.max(jnp.abs(x))) / 127, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s_c[0]), np.asarray(jnp.max(jnp.abs(x), 0)) / 127, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s_g[1]), np.asarray(jnp.max(jnp.abs(x[32:64]), 0)) / 127,
                             rtol=1e-6)


def test_asymmetric_zero_point_and_float_offset():
  x = jax.random.uniform(jax.random.key(1), (64, 3), minval=-1.0, maxval=3.0)
  s, z = cal.choose_scales(x, "uint8_t".replace("uint8_t", "int8_t_asym"))
  lo, hi = float(jnp.min(x)), float(jnp.max(x))
  np.testing.assert_allclose(float(s[0, 0]), (hi - lo) / 255, rtol=1e-6)
  assert z.dtype == jnp.uint8 and int(z[0, 0]) == round(-lo / float(s[0, 0]))
  s, m = cal.choose_scales(x, "int4_g32_asymf")
  np.testing.assert_allclose(np.asarray(m[0]), np.asarray(jnp.min(x[:32], 0)), rtol=1e-6)


def test_percentile_clips_outliers():
  x = _heavy_tailed((256, 4))
  s_mm, _ = cal.choose_scales(x, "int4", "minmax")
  s_p, _ = cal.choose_scales(x, "int4", cal.Calibration(method="percentile", percentile=99.0))
  assert bool(jnp.all(s_p < s_mm))


@pytest.mark.parametrize("spec", ["int4", "int3_g64_asym", "int4_g64_asymf", "nf4_g64", "fp8_e4m3"])
def test_mse_never_worse_than_minmax(spec):
  x = _heavy_tailed((256, 8), seed=3)
  err = {}
  for m in ("minmax", "mse"):
    q = qa.quantize(x, spec, calibration=m)
    xb, axes = qa.block_view(x, q.fmt)
    db, _ = qa.block_view(q.dequantize(), q.fmt)
    err[m] = jnp.sum((db - xb) ** 2, axis=axes)
  assert bool(jnp.all(err["mse"] <= err["minmax"] * (1 + 1e-6)))
  assert float(jnp.sum(err["mse"])) < float(jnp.sum(err["minmax"]))


def test_mse_recovers_known_optimum():
  """Many uniform values and one outlier: the least-squares clip ignores the outlier."""
  x = jnp.concatenate([jnp.linspace(-1, 1, 4095), jnp.array([5.0])])[:, None]
  s_mm, _ = cal.choose_scales(x, "int4", "minmax")
  s_mse, _ = cal.choose_scales(x, "int4", cal.Calibration(method="mse", grid=200, min_ratio=0.01))
  assert float(s_mse[0, 0]) < 0.5 * float(s_mm[0, 0])


def test_bad_calibration_arguments():
  with pytest.raises(ValueError, match="calibration method"):
    cal.Calibration(method="kl")
  with pytest.raises(ValueError, match="percentile"):
    cal.Calibration(method="percentile", percentile=0.0)
  with pytest.raises(TypeError):
    cal.resolve_calibration(3)


def test_auto_is_signed_max_for_signed_symmetric_ints_and_minmax_otherwise():
  x = jax.random.normal(jax.random.key(3), (128, 8))
  for spec in ("int4_g64", "int8_g32", "int3_g32", "q4_0", "q8_0"):
    auto = cal.choose_scales(x, spec)
    np.testing.assert_array_equal(np.asarray(auto[0]), np.asarray(cal.choose_scales(x, spec, "signed_max")[0]))
    assert not np.array_equal(np.asarray(auto[0]), np.asarray(cal.choose_scales(x, spec, "minmax")[0]))
  # Per-channel and per-tensor integers keep min-max (signed-max measured worse for W8).
  for spec in ("int8", "int4", "int8_t", "int4_g64_asym", "uint8", "nf4_g64", "fp8_e4m3", "q4_1"):
    auto, minmax = cal.choose_scales(x, spec), cal.choose_scales(x, spec, "minmax")
    for a, b in zip(auto, minmax):
      if a is not None:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Every code of int4 is in use: the extreme of each group decodes exactly.
  q = qa.quantize(x, "int4_g64")
  codes = np.round(np.asarray(q.dequantize()) / np.repeat(np.asarray(q.scale, np.float32), 64, axis=0))
  assert codes.min() == -8 and np.all(np.abs(codes) <= 8)
  np.testing.assert_allclose(np.max(np.abs(np.asarray(q.dequantize())), axis=0),
                             np.max(np.abs(np.asarray(x)), axis=0), rtol=1e-2)


def test_range_scales_is_calibrate_blocks_for_range_rules():
  from quantjax.numerics import blocks as blocks_lib
  from quantjax.numerics.formats import QuantFormat
  x = jnp.asarray(np.random.default_rng(3).laplace(size=(64, 16)).astype(np.float32))
  for name in ("int4_g32", "uint4_asym_g32"):
    fmt = QuantFormat.parse(name)
    xb, axes = blocks_lib.block_view(x, fmt)
    for m in ("minmax", "percentile", "mse"):
      c = cal.Calibration(method=m, percentile=99.0)
      a, b = cal.range_scales(xb, axes, fmt, c), cal.calibrate_blocks(xb, axes, fmt, c)
      np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  with pytest.raises(ValueError, match="range method"):
    cal.range_scales(xb, axes, fmt, cal.Calibration(method="signed_max"))
