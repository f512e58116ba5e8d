"""Static (observer) and dynamic activation quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import ops, transforms
from quantjax.methods import activations as act
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized
from quantjax.rules import QuantRule

INT8_T = QuantFormat.parse("int8_t")


def _acts(seed=0, n=3, t=64, k=32, outlier=True):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(2, t, k)).astype(np.float32) for _ in range(n)]
  if outlier:
    xs[1][0, 3, 7] = 40.0
  return xs


def test_minmax_observer_per_tensor_and_per_channel():
  xs = _acts()
  allx = np.concatenate([x.reshape(-1, 32) for x in xs])
  st = act.observe(act.ActObserver(), [jnp.asarray(x) for x in xs])
  s, z = act.ActObserver().finalize(st, INT8_T)
  assert z is None and s.shape == (1, 1)
  np.testing.assert_allclose(float(s[0, 0]), np.abs(allx).max() / 127, rtol=1e-6)
  obs = act.ActObserver(granularity="per_channel")
  s, _ = obs.finalize(act.observe(obs, [jnp.asarray(x) for x in xs]), INT8_T)
  assert s.shape == (1, 32)
  np.testing.assert_allclose(np.asarray(s[0]), np.abs(allx).max(0) / 127, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st.absmean), np.abs(allx).mean(0), rtol=1e-5)
  # Asymmetric uint8: zero point from the observed min.
  s, z = act.ActObserver().finalize(st, QuantFormat.parse("uint8_t_asym"))
  assert z is not None and z.dtype == jnp.uint8


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_clipping_observers_beat_minmax_on_heavy_tails(method):
  rng = np.random.default_rng(0)
  xs = [rng.laplace(size=(2, 64, 32)).astype(np.float32) for _ in range(3)]
  allx = jnp.asarray(np.concatenate([x.reshape(-1, 32) for x in xs]))
  fmt = QuantFormat.parse("int4_t")
  errs = {}
  for m in ("minmax", method):
    obs = act.ActObserver(method=m, percentile=99.0)
    s, z = obs.finalize(act.observe(obs, [jnp.asarray(x) for x in xs]), fmt)
    q = qarray_lib.quantize_with_scale(allx, fmt, s, z).dequantize()
    errs[m] = float(jnp.mean((q - allx) ** 2))
  assert errs[method] < 0.5 * errs["minmax"], errs


def _w8(k=32, n=24, seed=1):
  w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
  return w, qarray_lib.quantize(jnp.asarray(w), "int8")


def test_static_int8_dot_matches_fake_quant_reference():
  xs = _acts(outlier=False)
  w, wq = _w8()
  obs = act.ActObserver()
  s, z = obs.finalize(act.observe(obs, [jnp.asarray(x) for x in xs]), INT8_T)
  leaf = act.StaticActQuantized(weight=wq, act_format=INT8_T, act_scale=s, act_zero_point=z)
  x = jnp.asarray(xs[0])
  y = jax.jit(lambda x, l: act.static_qdot(x, l))(x, leaf)
  xq = np.clip(np.round(np.asarray(x) / float(s[0, 0])), -128, 127) * float(s[0, 0])
  ref = xq @ np.asarray(wq.dequantize())
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
  assert y.shape == (2, 64, 24)
  # A static scale equal to this batch's own max is dynamic per-tensor quantization.
  s_dyn = jnp.max(jnp.abs(x)).reshape(1, 1) / 127
  leaf2 = act.StaticActQuantized(weight=wq, act_format=INT8_T, act_scale=s_dyn,
                                 act_zero_point=None)
  dyn = ops.qdot(x, ActQuantized(weight=wq, act_format=INT8_T))
  np.testing.assert_allclose(np.asarray(act.static_qdot(x, leaf2)), np.asarray(dyn),
                             rtol=1e-5, atol=1e-5)
  # Outside the calibrated range, values clip to the static range.
  big = x * 10.0
  yb = act.static_qdot(big, leaf)
  assert float(jnp.max(jnp.abs(leaf.quantize_input(big).dequantize()))) <= \
      float(s[0, 0]) * 128 + 1e-5
  assert yb.shape == (2, 64, 24)


def test_static_per_channel_and_float_weight_fake_quant_path():
  xs = _acts(outlier=False)
  w, _ = _w8()
  obs = act.ActObserver(granularity="per_channel")
  s, z = obs.finalize(act.observe(obs, [jnp.asarray(x) for x in xs]), INT8_T)
  leaf = act.StaticActQuantized(weight=jnp.asarray(w), act_format=INT8_T, act_scale=s,
                                act_zero_point=z)
  x = jnp.asarray(xs[2])
  y = act.static_qdot(x, leaf)
  sn = np.asarray(s)
  xq = np.clip(np.round(np.asarray(x) / sn), -128, 127) * sn
  np.testing.assert_allclose(np.asarray(y), xq @ w, rtol=1e-4, atol=1e-4)


def test_attach_act_quant_static_and_dynamic_trees():
  w, _ = _w8()
  params = {"a": {"kernel": jnp.asarray(w)}, "b": {"kernel": jnp.asarray(w)},
            "norm": {"scale": jnp.ones((32,), jnp.float32)}}
  rules = (QuantRule(module_path=r".*/kernel", format="int8", act_format="int8_t"),
           QuantRule(module_path=r".*", skip=True))
  q = transforms.quantize_params(params, [QuantRule(module_path=r".*/kernel", format="int8")])
  xs = _acts(outlier=False)
  stats = {p: act.observe(act.ActObserver(), [jnp.asarray(x) for x in xs])
           for p in ("a/kernel", "b/kernel")}
  static = act.attach_act_quant(q, rules, act_stats=stats, observer=act.ActObserver())
  assert isinstance(static["a"]["kernel"], act.StaticActQuantized)
  assert isinstance(static["a"]["kernel"].weight, qarray_lib.QArray)
  assert not isinstance(static["norm"]["scale"], ActQuantized)
  dyn = act.attach_act_quant(q, rules)
  assert type(dyn["b"]["kernel"]) is ActQuantized
  # Pytree round trip under jit, and dequantize_params unwraps to the weight.
  out = jax.jit(lambda p: p)(static)
  np.testing.assert_array_equal(np.asarray(out["a"]["kernel"].act_scale),
                                np.asarray(static["a"]["kernel"].act_scale))
  deq = transforms.dequantize_params(static)
  np.testing.assert_allclose(np.asarray(deq["a"]["kernel"]), w, atol=0.05)
  with pytest.raises(ValueError, match="no activation statistics"):
    act.attach_act_quant(q, rules, act_stats={}, observer=act.ActObserver())


def test_observer_errors():
  with pytest.raises(ValueError, match="observer method"):
    act.ActObserver(method="max")
  obs = act.ActObserver()
  with pytest.raises(ValueError, match="saw no activations"):
    obs.finalize(obs.init(4), INT8_T)
  with pytest.raises(ValueError, match="per tensor or per channel"):
    obs.finalize(act.observe(obs, [jnp.ones((3, 64))]), QuantFormat.parse("int8_g32"))


def test_observer_range_is_a_calibration():
  from quantjax.numerics import calibrate as cal
  obs = act.ActObserver()
  assert obs.range == act.ACT_RANGE == cal.Calibration(method="minmax", percentile=99.99, grid=50,
                                                         min_ratio=0.3)
  short = act.ActObserver(method="mse", grid=20, granularity="per_channel")
  assert short == act.ActObserver(range=cal.Calibration(method="mse", percentile=99.99, grid=20,
                                                        min_ratio=0.3), granularity="per_channel")
  assert (short.range.method, short.range.grid, short.range.min_ratio,
          short.range.percentile) == ("mse", 20, 0.3, 99.99)
  # One validation: the range rule's own, plus the methods an observer can use.
  with pytest.raises(ValueError, match="percentile"):
    act.ActObserver(method="percentile", percentile=0.0)
  with pytest.raises(ValueError, match="observer method"):
    act.ActObserver(range=cal.Calibration())  # "auto" is a weight rule
  # The observer's range is the weights' estimator on its sample, within the observed range.
  xs = _acts()
  for m in ("percentile", "mse"):
    obs = act.ActObserver(method=m, percentile=99.0, granularity="per_channel")
    st = act.observe(obs, [jnp.asarray(x) for x in xs])
    s, _ = obs.finalize(st, INT8_T)
    fmt = INT8_T.replace(granularity="per_channel", channel_axis=-1)
    s_ref, _ = cal.range_scales(st.sample, (0,), fmt, obs.range, st.lo[None], st.hi[None])
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
