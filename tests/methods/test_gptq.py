"""GPTQ on synthetic linear layers with correlated inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from quantjax.methods import gptq
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat


def _layer(seed=0, k=128, out=48, n=1024):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k) + 0.2 * np.eye(k)
  x = (rng.normal(size=(n, k)) @ mix).astype(np.float32)
  x = x * np.exp(0.5 * rng.normal(size=k)).astype(np.float32)  # uneven channel scales
  w = rng.normal(size=(k, out)).astype(np.float32)
  h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(k), jnp.asarray(x)))
  return x, w, h


def _out_err(x, w, q):
  return float(np.linalg.norm(x @ w - x @ np.asarray(q)))


def _reference_gptq(w, h, fmt, percdamp=0.01):
  """Unblocked textbook GPTQ in float64 numpy (per-channel/per-tensor scales)."""
  wt = np.array(w, np.float64).T
  h = np.array(h, np.float64)
  h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  s, z = qarray_lib.scale_from_range(fmt, jnp.asarray(w.min(0, keepdims=True)),
                                     jnp.asarray(w.max(0, keepdims=True)))
  s = np.asarray(s, np.float64)[0]
  z = None if z is None else np.asarray(z, np.float64)[0]
  codes = np.zeros_like(wt)
  for i in range(wt.shape[1]):
    col = wt[:, i]
    v = col / s if z is None else col / s + z
    q = np.clip(np.round(v), fmt.qmin, fmt.qmax)
    dq = q * s if z is None else (q - z) * s
    codes[:, i] = q
    err = (col - dq) / u[i, i]
    wt[:, i:] -= np.outer(err, u[i, i:])
  return codes.T


@pytest.mark.parametrize("spec", ["int4_g32", "int4_g32_asym", "int3_g64_asymf", "int4",
                                  "int3_asym", "nf4_g32", "fp8_e4m3"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_is_on_grid(spec, act_order):
  x, w, h = _layer()
  fmt = QuantFormat.parse(spec)
  res = gptq.gptq_quantize(w, h, fmt, act_order=act_order)
  qa = res.qarray
  assert isinstance(qa, qarray_lib.QArray) and qa.fmt == fmt and qa.shape == w.shape
  rtn = qarray_lib.quantize(jnp.asarray(w), fmt)
  # Same layout as round-to-nearest: scales/zero points and packed codes.
  assert qa.scale.shape == rtn.scale.shape and qa.qvalue.shape == rtn.qvalue.shape
  assert qa.qvalue.dtype == rtn.qvalue.dtype
  if fmt.has_zero_point:
    assert qa.zero_point.shape == rtn.zero_point.shape
    assert qa.zero_point.dtype == rtn.zero_point.dtype
  if fmt.granularity == "group":
    assert qa.scale.shape == (w.shape[0] // fmt.group_size, w.shape[1])
  deq = qa.dequantize()
  # On the grid: re-quantizing with its own scales reproduces it exactly.
  again = qarray_lib.quantize_with_scale(deq, fmt, qa.scale, qa.zero_point).dequantize()
  np.testing.assert_array_equal(np.asarray(again), np.asarray(deq))
  ratio = _out_err(x, w, deq) / _out_err(x, w, rtn.dequantize())
  assert ratio < (0.7 if act_order else 0.85), ratio
  assert np.isfinite(res.loss) and res.loss > 0
  assert (res.perm is not None) == act_order


@pytest.mark.parametrize("spec", ["int4", "int3_asym"])
def test_blocked_jitted_loop_matches_textbook_algorithm(spec):
  x, w, h = _layer(seed=1, k=96, out=8, n=512)
  fmt = QuantFormat.parse(spec)
  # The reference uses min-max scales.
  res = gptq.gptq_quantize(w, h, fmt, block_size=32, calibration="minmax")  # 3 blocks, lazy updates
  ref = _reference_gptq(w, np.asarray(h), fmt)
  codes = np.asarray(res.qarray.codes(), np.float64)
  mismatch = np.mean(codes != ref)
  assert mismatch < 0.01, mismatch  # float32 vs float64 ties only


def test_block_size_and_padding_do_not_change_result():
  x, w, h = _layer(seed=2, k=192, out=16, n=800)
  a = gptq.gptq_quantize(w, h, "int4_g64", block_size=128)  # 192 -> padded to 256
  b = gptq.gptq_quantize(w, h, "int4_g64", block_size=64)
  np.testing.assert_allclose(np.asarray(a.qarray.dequantize()), np.asarray(b.qarray.dequantize()),
                             atol=1e-6)


def test_dead_inputs_and_act_order_static_groups():
  x, w, h = _layer(seed=3, k=128, out=16, n=600)
  x[:, 5] = 0.0
  h = gptq.hessian(gptq.hessian_update(gptq.hessian_init(128), jnp.asarray(x)))
  res = gptq.gptq_quantize(w, h, "int4_g32", act_order=True)
  deq = np.asarray(res.qarray.dequantize())
  np.testing.assert_array_equal(deq[5], 0.0)  # dead input row -> zero weights
  # Static groups: scales come from the original weights' groups (RTN's scales).
  rtn = qarray_lib.quantize(jnp.asarray(np.where(np.arange(128)[:, None] == 5, 0.0, w)),
                            "int4_g32")
  np.testing.assert_allclose(np.asarray(res.qarray.scale), np.asarray(rtn.scale), rtol=1e-6)
  assert sorted(res.perm.tolist()) == list(range(128))


def test_hessian_is_two_xtx_over_n():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 10, 8)).astype(np.float32)
  st = gptq.hessian_init(8)
  st = gptq.hessian_update(st, jnp.asarray(x[:2]))
  st = gptq.hessian_update(st, jnp.asarray(x[2:]))
  x2 = x.reshape(-1, 8).astype(np.float64)
  np.testing.assert_allclose(np.asarray(gptq.hessian(st)), 2 * x2.T @ x2 / 30, rtol=1e-5)


def test_errors():
  _, w, h = _layer(k=96, out=8, n=200)
  with pytest.raises(ValueError, match="does not divide"):
    gptq.gptq_quantize(w, h, "int4_g64")
  with pytest.raises(ValueError, match="binary"):
    gptq.gptq_quantize(w, h, "ternary")
  with pytest.raises(ValueError, match="Hessian shape"):
    gptq.gptq_quantize(w, np.eye(5), "int4")
  with pytest.raises(ValueError, match="NaN"):
    gptq.gptq_quantize(np.full((96, 8), np.nan, np.float32), h, "int4")


@pytest.mark.parametrize("spec", ["iq4_nl", "q2_0"])
def test_act_order_scale_search_weighs_errors_by_the_hessian_diagonal(spec):
  """Under act-order GPTQ's IQ4_NL / Q2_0 group scales come from llama.cpp's search weighted
  by the Hessian's diagonal (an importance matrix): rounding with them has less output error
  on uneven input channels than the unweighted search."""
  x, w, h = _layer(seed=3, k=256, out=64, n=2048)
  x = x * np.exp(0.7 * np.random.default_rng(4).normal(size=256)).astype(np.float32)
  h = np.asarray(gptq.hessian(gptq.hessian_update(gptq.hessian_init(256), jnp.asarray(x))))
  fmt = QuantFormat.parse(spec)

  def rtn_err(importance):
    s, _ = gptq._choose_scales(jnp.asarray(w), fmt, "auto", importance=importance)
    q = qarray_lib.quantize_with_scale(jnp.asarray(w), fmt, s)
    return _out_err(x, w, q.dequantize())
  assert rtn_err(np.diagonal(h)) < 0.95 * rtn_err(None)
  full = gptq.gptq_quantize(jnp.asarray(w), h, fmt, act_order=True).qarray
  assert _out_err(x, w, full.dequantize()) < rtn_err(np.diagonal(h))
