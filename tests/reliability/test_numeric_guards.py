"""Finite inputs never turn silently into NaN, inf or zero: each case is computed
correctly or refused with a message naming the tensor and its value range."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import quantjax as qj
from quantjax.numerics import qarray as qa
from quantjax.numerics.formats import NF4_CODEBOOK, QuantFormat

RNG = np.random.default_rng(0)
W = RNG.standard_normal((64, 4)).astype(np.float32)


def _scaled(amax: float) -> np.ndarray:
  return (W / np.abs(W).max() * amax).astype(np.float32)


def _max_rel_err(q, x) -> float:
  d = np.asarray(q.dequantize(jnp.float32), np.float64)
  return float(np.max(np.abs(d - x)) / np.max(np.abs(x)))


# ----------------------------------------------------------------------------
# The cases of the issue.


@pytest.mark.parametrize("fmt,amax", [("q4_0", 1e6), ("q4_1", 1e6), ("q5_0", 3e6),
                                      ("int4_g32_fp16s", 2e6)])
def test_float16_scale_overflow_is_refused_with_the_range(fmt, amax):
  with pytest.raises(ValueError, match=r"layers/3/w to .*values in \[.*\].*overflow float16"):
    qa.quantize(_scaled(amax), fmt, name="layers/3/w")
  # the same values in float32 scales are fine, and so are values within float16's reach
  q = qa.quantize(_scaled(amax), QuantFormat.parse(fmt).replace(scale_dtype=jnp.float32))
  assert _max_rel_err(q, _scaled(amax)) < 0.15
  q = qa.quantize(_scaled(4e5), "q4_0")
  assert np.isfinite(np.asarray(q.dequantize())).all() and _max_rel_err(q, _scaled(4e5)) < 0.15


def test_float16_scale_underflow_keeps_small_values():
  x = _scaled(4e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    q = qa.quantize(x, "q8_0")
  d = np.asarray(q.dequantize())
  assert np.count_nonzero(d) > 0.9 * d.size  # was all zero: the fp16 scale underflowed
  assert _max_rel_err(q, x) < 0.02
  # far below float16's smallest scale, values do round to 0 and a warning says so
  with pytest.warns(UserWarning, match="smallest scale"):
    qa.quantize(_scaled(1e-9), "q8_0", name="tiny")


@pytest.mark.parametrize("fmt", ["int4_g32_asym", "int8_asym", "uint8_t", "int8", "nf4_g32",
                                 "nf4", "fp8_e4m3", "int3_g32_asym"])
def test_values_near_float32_max(fmt):
  for amax in (3e38, 1e38, 9e37):
    x = _scaled(amax)
    if fmt.startswith("uint"):
      x = np.abs(x)  # unsigned: negatives clip to 0 by design
    q = qa.quantize(x, fmt, name="big")
    d = np.asarray(q.dequantize())
    assert np.isfinite(d).all(), (fmt, amax)
    assert np.count_nonzero(d) > 0, (fmt, amax)
    assert _max_rel_err(q, x) < 0.2, (fmt, amax, _max_rel_err(q, x))


def test_float_offset_formats_refuse_spans_past_float32():
  with pytest.raises(ValueError, match=r"big to int4_g32_asymf.*float32's range"):
    qa.quantize(_scaled(3e38), "int4_g32_asymf", name="big")


@pytest.mark.parametrize("fmt", ["binary", "ternary", "ternary_g32"])
def test_sign_formats_at_extremes(fmt):
  x = _scaled(3e38)
  q = qa.quantize(x, fmt)
  d = np.asarray(q.dequantize())
  assert np.isfinite(d).all() and np.count_nonzero(d) > 0  # was inf / all zero


def test_nan_under_jit_stays_visible_and_checkify_names_it():
  x = W.copy()
  x[5, 2] = np.nan
  q = jax.jit(lambda a: qa.quantize(a, "int4_g32"))(x)
  d = np.asarray(q.dequantize())
  assert np.isnan(d[0:32, 2]).all()  # its block is NaN, not silently 0
  assert np.isfinite(np.delete(d, 2, axis=1)).all()  # the others are untouched
  with pytest.raises(ValueError, match=r"cannot quantize w: it holds 1 NaN"):
    qa.quantize(x, "int4_g32", name="w")  # eager: refused
  from jax.experimental import checkify
  f = checkify.checkify(jax.jit(lambda a: qa.quantize(a, "int4_g32", name="w", checks=True)),
                        errors=checkify.user_checks)
  err, _ = f(x)
  with pytest.raises(checkify.JaxRuntimeError, match="quantize w: the input holds NaN"):
    err.throw()
  err, _ = f(W)
  err.throw()  # clean input: no error
  err, _ = checkify.checkify(jax.jit(lambda a: qa.quantize(a, "q4_0", name="w", checks=True)),
                             errors=checkify.user_checks)(_scaled(1e6))
  with pytest.raises(checkify.JaxRuntimeError, match="scales overflow float16"):
    err.throw()


def test_quantize_params_names_the_leaf():
  params = {"a": {"kernel": _scaled(1e6)}, "b": {"kernel": W}}
  with pytest.raises(ValueError, match="a/kernel"):
    qj.quantize_params(params, [qj.QuantRule(module_path=r".*kernel", format="q4_0")])


def test_empty_arrays_and_contradictory_specs():
  with pytest.raises(ValueError, match=r"cannot quantize emb: it is empty \(shape \(0, 4\)\)"):
    qa.quantize(np.zeros((0, 4), np.float32), "int8", name="emb")
  for spec, what in (("int4_g64_g32", "granularity"), ("int4_t_g32", "granularity"),
                     ("int4_asym_sym", "symmetry"), ("int8_sr_sr", "rounding")):
    with pytest.raises(ValueError, match=f"sets the {what} twice"):
      QuantFormat.parse(spec)


def test_float16_cast_overflow_is_refused():
  with pytest.raises(ValueError, match="cannot cast w to fp16: values up to"):
    qa.quantize(_scaled(1e7), "fp16", name="w")
  q = qa.quantize(_scaled(1e7), "bf16", name="w")
  assert np.isfinite(np.asarray(q.dequantize())).all()


# ----------------------------------------------------------------------------
# GPTQ, AWQ, SmoothQuant and the capture driver.


def test_gptq_refuses_a_zero_or_underflowing_hessian():
  from quantjax.methods import gptq
  w = W.copy()
  stat = gptq.hessian_init(64)
  with pytest.raises(ValueError, match="layer.w: the Hessian is zero"):
    gptq.gptq_quantize(w, gptq.hessian(stat), "int4_g32", name="layer.w")  # no rows
  tiny = RNG.standard_normal((256, 64)).astype(np.float32) * 1e-25
  stat = gptq.hessian_update(stat, tiny)
  with pytest.raises(ValueError, match="underflows"):
    gptq.gptq_quantize(w, gptq.hessian(stat), "int4_g32", name="layer.w")
  h = np.eye(64, dtype=np.float32)
  h[3, 3] = np.nan
  with pytest.raises(ValueError, match="layer.w: the Hessian holds NaN"):
    gptq.gptq_quantize(w, h, "int4_g32", name="layer.w")
  # rank-deficient but non-zero: computed, finite
  few = RNG.standard_normal((4, 64)).astype(np.float32)
  r = gptq.gptq_quantize(w, gptq.hessian(gptq.hessian_update(gptq.hessian_init(64), few)),
                         "int4_g32")
  assert np.isfinite(np.asarray(r.qarray.dequantize())).all()
  with pytest.raises(ValueError, match=r"big \(GPTQ\) to q4_0.*overflow float16"):
    gptq.gptq_quantize(_scaled(1e6), np.eye(64), "q4_0", name="big")


def test_awq_and_smoothquant_refuse_nan_statistics():
  from quantjax.methods import awq, smoothquant
  x = RNG.standard_normal((32, 64)).astype(np.float32)
  x[7, 9] = np.nan
  with pytest.raises(ValueError, match="AWQ q, k: the calibration inputs hold 1 NaN"):
    awq.awq_search_scales(x, np.abs(np.nan_to_num(x)).mean(0), [W], ["int4_g32"], name="q, k")
  with pytest.raises(ValueError, match="no calibration rows"):
    awq.awq_search_scales(np.zeros((0, 64), np.float32), np.ones(64), [W], ["int4_g32"])
  am = np.abs(RNG.standard_normal(64)).astype(np.float32)
  am[4] = np.nan
  with pytest.raises(ValueError, match="SmoothQuant fc: the activation ranges hold 1 NaN"):
    smoothquant.smooth_scales(am, [W], name="fc")


def _tiny_llama():
  from flax import nnx

  from quantjax.models import llama
  from tests.io.test_gguf import TINY
  return TINY, nnx.state(llama.Llama(TINY, rngs=nnx.Rngs(0)), nnx.Param)


def test_calibrate_names_empty_calibration_and_ids_beyond_the_vocabulary():
  from quantjax import methods
  from quantjax.models import llama
  cfg, params = _tiny_llama()
  rules = [qj.QuantRule(module_path=r".*_proj/kernel", format="int4_g32")]
  with pytest.raises(ValueError, match="got no calibration batches"):
    methods.calibrate(llama.forward_fn(cfg), params, [], rules, methods.GPTQ(), progress=False)
  toks = RNG.integers(0, cfg.vocab_size, (2, 16))
  toks[1, 3] = cfg.vocab_size + 404
  with pytest.raises(ValueError, match=r"ids lie outside \[0, 96\).*embed/embedding"):
    methods.calibrate(llama.forward_fn(cfg), params, [toks], rules, methods.GPTQ(),
                      progress=False)


# ----------------------------------------------------------------------------
# GGUF export.


def test_export_refuses_values_its_types_cannot_hold(tmp_path):
  from quantjax.io import gguf as gio
  from tests.io.test_gguf import TINY, tiny_params
  params = tiny_params()
  params["layers"][1]["mlp"]["up_proj"]["kernel"] = jnp.asarray(
      np.asarray(params["layers"][1]["mlp"]["up_proj"]["kernel"]) * 1e7)
  path = tmp_path / "m.gguf"
  with pytest.raises(gio.GGUFError, match=r"layers/1/mlp/up_proj/kernel.*blk.1.ffn_up.weight.*"
                                          r"F16's largest finite value 65504"):
    gio.export_gguf(path, TINY, params, float_type="F16")
  with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel.*Q4_0.*overflow float16"):
    gio.export_gguf(path, TINY, params, types={"up_proj": "Q4_0"})
  assert os.listdir(tmp_path) == []
  gio.export_gguf(path, TINY, params, float_type="F32")  # F32 holds them
  _, imported, _, _ = gio.import_gguf(path, tokenizer=False, check_values=True)
  from flax import nnx
  got = nnx.to_pure_dict(imported)["layers"][1]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(params["layers"][1]["mlp"]["up_proj"]["kernel"]))


def test_kquant_encodings_are_checked_like_a_file():
  from quantjax.io import gguf_read, kquants
  x = (RNG.standard_normal((2, 256)) * 1e9).astype(np.float32)
  for t in ("Q4_K", "Q6_K"):
    raw = kquants.quantize_k(x, t)  # fp16 super-block scales overflow
    with pytest.raises(gguf_read.GGUFError, match=f"tensor 't' \\({t}\\) has .* non-finite"):
      gguf_read.check_raw_tensor("export", "t", t, raw, 256)
    gguf_read.check_raw_tensor("export", "t", t, kquants.quantize_k(x * 1e-9, t), 256)


def test_export_refuses_nan_and_shapes_that_contradict_the_config(tmp_path):
  from quantjax.io import gguf as gio
  from tests.io.test_gguf import TINY, tiny_params
  params = tiny_params()
  params["layers"][0]["attn"]["k_proj"]["kernel"] = jnp.zeros((64, 48))
  with pytest.raises(gio.GGUFError, match=r"layers/0/attn/k_proj/kernel has shape \(64, 48\) "
                                          r"but the config implies \(64, 32\)"):
    gio.export_gguf(tmp_path / "m.gguf", TINY, params)
  params = tiny_params()
  w = np.asarray(params["final_norm"]["scale"]).copy()
  w[3] = np.inf
  params["final_norm"]["scale"] = jnp.asarray(w)
  with pytest.raises(gio.GGUFError, match="final_norm/scale .* holds 1 NaN/Inf"):
    gio.export_gguf(tmp_path / "m.gguf", TINY, params)
  assert os.listdir(tmp_path) == []


def test_export_on_a_full_disk_names_the_path(tmp_path):
  """A write failing midway (file-size limit: EFBIG, as a full disk gives ENOSPC)."""
  out = tmp_path / "m.gguf"
  code = f"""
import os, resource, signal, sys
sys.path.insert(0, {os.getcwd()!r})
from quantjax.io import gguf as gio
from tests.io.test_gguf import TINY, tiny_params
params = tiny_params()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
  gio.export_gguf({str(out)!r}, TINY, params)
except OSError as e:
  print("ERR", e)
"""
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert "ERR" in p.stdout and f"cannot write GGUF file {out}" in p.stdout, p.stdout + p.stderr
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Properties (hypothesis): extreme magnitudes, NaN/Inf positions.

FORMATS = ["int8", "int4_g32", "int4_g32_asym", "uint8_t", "q4_0", "q4_1", "q8_0", "nf4_g32",
           "fp8_e4m3", "fp8_e5m2", "int3_g32_asym", "int2_g32", "ternary_g32", "binary"]


def _bound(f: QuantFormat) -> float | None:
  """Largest error relative to max|x| that round-to-nearest with the default scale rule allows."""
  if f.kind == "nf4":
    return float(np.max(np.diff(NF4_CODEBOOK))) / 2
  if f.kind == "fp8_e4m3":
    return 2.0 ** -4
  if f.kind == "fp8_e5m2":
    return 2.0 ** -3
  if f.kind != "int" or (f.symmetric and not f.signed):
    return None  # binary / ternary: no such bound; unsigned: negatives clip
  if f.symmetric and f.granularity == "group":
    # "auto" = signed-max: the extreme maps to qmin exactly; a value of the same
    # magnitude on the other side clamps to qmax, one step (max|x| / |qmin|) away.
    return 1.0 / -f.qmin
  if f.symmetric:
    return 1.0 / (2 * f.qmax)
  return 1.0 / (f.qmax - f.qmin)


def _refusal_is_documented(msg: str) -> bool:
  return any(k in msg for k in ("overflow float16", "float32's range"))


@given(fmt=st.sampled_from(FORMATS), exp=st.integers(-37, 38), mant=st.floats(1.0, 3.4),
       seed=st.integers(0, 2 ** 16))
def test_property_any_magnitude_is_computed_or_refused(fmt, exp, mant, seed):
  amax = mant * 10.0 ** exp
  if not np.isfinite(np.float32(amax)):
    return
  x = (np.random.default_rng(seed).standard_normal((64, 4)) / 3.0).astype(np.float32)
  x = np.clip(x, -1, 1) * np.float32(amax)
  x[0, 0] = np.float32(amax)  # the extreme is reached
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      q = qa.quantize(x, fmt, name="p")
    except ValueError as e:
      assert _refusal_is_documented(str(e)), str(e)
      assert "p to" in str(e) and "values in [" in str(e)
      return
  d = np.asarray(q.dequantize(jnp.float32))
  assert np.isfinite(d).all(), (fmt, amax)
  f = QuantFormat.parse(fmt)
  floor = qa.scale_floor(f.scale_dtype)
  if amax >= 1e4 * floor or f.kind in ("binary", "ternary"):
    assert d[0, 0] != 0 and np.sign(d[0, 0]) == 1, (fmt, amax, d[0, 0])  # no silent zero
  bound = _bound(f)
  if bound is not None and amax >= 1e4 * floor:
    rel = np.abs(d.astype(np.float64) - x).max() / amax
    assert rel <= bound * 1.02 + 2e-3, (fmt, amax, rel, bound)


@given(fmt=st.sampled_from(FORMATS), pos=st.tuples(st.integers(0, 63), st.integers(0, 3)),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_property_nan_inf_anywhere_is_refused_or_visible(fmt, pos, bad):
  x = W.copy()
  x[pos] = bad
  with pytest.raises(ValueError, match=rf"cannot quantize t: it holds 1 NaN/Inf .*first at index "
                                       rf"\({pos[0]}, {pos[1]}\)"):
    qa.quantize(x, fmt, name="t")
  d = np.asarray(jax.jit(lambda a: qa.quantize(a, fmt))(x).dequantize(jnp.float32))
  # under jit the bad value does not turn into finite numbers silently: its block shows it
  assert not np.isfinite(d).all(), (fmt, pos, bad)


@given(rows=st.integers(0, 3), scale_exp=st.integers(-30, 0))
def test_property_degenerate_calibration_gptq(rows, scale_exp):
  from quantjax.methods import gptq
  x = (RNG.standard_normal((rows, 64)) * 10.0 ** scale_exp).astype(np.float32)
  stat = gptq.hessian_update(gptq.hessian_init(64), x) if rows else gptq.hessian_init(64)
  h = np.asarray(gptq.hessian(stat))
  try:
    r = gptq.gptq_quantize(W, h, "int4_g32", name="w")
  except ValueError as e:
    assert "w: the Hessian is zero" in str(e) and not np.diag(h).any()
    return
  d = np.asarray(r.qarray.dequantize())
  assert np.isfinite(d).all() and np.count_nonzero(d) > 0
