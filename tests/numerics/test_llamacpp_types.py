"""llama.cpp's IQ4_NL, MXFP4, NVFP4, Q2_0, Q1_0, TQ2_0 and TQ1_0 as formats: sizes, nearest-level codes,
llama.cpp's scale rules, ggml's own (de)quantizers (the pinned libggml of llama-cpp-python,
when installed), quantize_params / qdot / GPTQ."""

import ctypes
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantjax as qj
from quantjax import ops
from quantjax.io import gguf_codebook as cb
from quantjax.methods import gptq
from quantjax.numerics import llamacpp_types as lt
from quantjax.numerics import qarray
from quantjax.numerics.formats import QuantFormat

SPECS = ["iq4_nl", "mxfp4", "nvfp4", "q2_0", "q1_0", "tq2_0", "tq1_0"]
BPW = {"iq4_nl": 4.5, "mxfp4": 4.25, "nvfp4": 4.5, "q2_0": 2.25, "q1_0": 1.125, "tq2_0": 2.0625,
       "tq1_0": 1.6875}
# Relative RMS error bounds on Gaussian rows (measured: 0.076, 0.115, 0.095, 0.359, 0.601, 0.384,
# 0.436).
REL = {"iq4_nl": 0.085, "mxfp4": 0.125, "nvfp4": 0.105, "q2_0": 0.39, "q1_0": 0.62, "tq2_0": 0.41,
       "tq1_0": 0.46}
# Row lengths: 640 as in 640-wide models (576 fits all but Q1_0, TQ2_0 and TQ1_0); TQ2_0 and
# TQ1_0 need 256s.
WIDTH = {"tq2_0": 768, "tq1_0": 768}
# GPTQ rounds to codebook levels or signs; ternary formats (TQ1_0) are quantjax.methods.ternary's.
NO_GPTQ = ("tq1_0",)


# ----------------------------------------------------------------------------
# ggml itself (libggml-base of llama-cpp-python): reference quantizer and dequantizers.

def _libggml():
  import llama_cpp
  return ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))


def ggml_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
  """ggml's `dequantize_row_<type>` on GGUF rows `[rows, bytes]` -> float32 `[rows, n]`."""
  ct = cb.TYPES[name]
  raw = np.ascontiguousarray(raw, np.uint8)
  rows = raw.shape[0]
  n = raw.shape[1] // ct.type_size * ct.block
  out = np.zeros((rows, n), np.float32)
  fn = getattr(_libggml(), "dequantize_row_" + name.lower())
  fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
  fn(raw.ctypes.data, out.ctypes.data, rows * n)
  return out


def ggml_quantize(x: np.ndarray, name: str, importance=None) -> np.ndarray:
  """ggml's `ggml_quantize_chunk` (llama-quantize's quantizer) on float32 rows."""
  lib = _libggml()
  ct = cb.TYPES[name]
  x = np.ascontiguousarray(x, np.float32)
  rows, n = x.shape
  out = np.zeros((rows, n // ct.block * ct.type_size), np.uint8)
  imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
  lib.ggml_quantize_init.argtypes = [ctypes.c_int]
  lib.ggml_quantize_init(ct.ggml_id)
  fn = lib.ggml_quantize_chunk
  fn.restype = ctypes.c_size_t
  fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                 ctypes.c_int64, ctypes.c_void_p]
  assert fn(ct.ggml_id, x.ctypes.data, out.ctypes.data, 0, rows, n,
            None if imp is None else imp.ctypes.data) == out.nbytes
  return out


def _rows(kind="gauss", rows=32, n=1536, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, n)).astype(np.float32)
  if kind == "heavy":  # outlier columns, as in LLM weights
    x *= np.exp(0.5 * rng.standard_normal((1, n))).astype(np.float32)
  return x


def _rel(y, x, w=None):
  w = np.ones_like(x) if w is None else w
  return float(np.sqrt(np.sum(w * (y - x) ** 2) / np.sum(w * x ** 2)))


def _ours(x, spec, **kw):
  """Rows `[rows, n]` quantized along n: (GGUF bytes, float32 values)."""
  from quantjax.io import gguf as gio
  q = qj.quantize(jnp.asarray(x), QuantFormat.parse(spec, group_axis=1, channel_axis=0), **kw)
  return gio.qarray_to_blocks(q, spec.upper(), 1), np.asarray(q.dequantize())


# ----------------------------------------------------------------------------
# Formats.

@pytest.mark.parametrize("spec", SPECS)
def test_spec_names_sizes_and_llamacpp_type(spec):
  f = QuantFormat.parse(spec)
  assert f.name == spec and f.gguf_type == spec.upper() and QuantFormat.parse(f.name) == f
  n = WIDTH.get(spec, 640)
  x = jnp.asarray(_rows(rows=4, n=n).T)  # [in, out=4]
  q = qj.quantize(x, f)
  assert q.bits_per_value == BPW[spec]
  ct = cb.TYPES[spec.upper()]
  assert q.nbytes == 4 * n // ct.block * ct.type_size  # exactly the GGUF blocks' bytes
  assert ct.type_size == (gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[spec.upper()]][1]
                          if spec != "q2_0" else 18)


def test_variants_parse_back():
  for spec in ("iq4_nl_g64", "mxfp4_g32_fp32s", "nvfp4_g32", "q2_0_g32_fp32s", "iq4_nl_c"):
    f = QuantFormat.parse(spec)
    assert f.gguf_type is None and QuantFormat.parse(f.name) == f, spec
  assert QuantFormat.parse("mxfp4").scale_dtype == jnp.float8_e8m0fnu
  assert QuantFormat.parse("nvfp4").group_size == 16
  assert QuantFormat.parse("ternary_g256_fp16s").name == "tq1_0"  # the same format
  assert QuantFormat.parse("ternary_g256").gguf_type is None  # float32 scales: not TQ1_0
  with pytest.raises(ValueError, match="unknown token 'asym'"):
    QuantFormat.parse("iq4_nl_asym")
  with pytest.raises(ValueError, match="stochastic rounding"):
    QuantFormat.parse("mxfp4", rounding="stochastic")


# ----------------------------------------------------------------------------
# Properties: every code is the nearest level for its block's stored scale.

@settings(max_examples=15)
@given(seed=st.integers(0, 2 ** 16), log_scale=st.floats(-3.0, 2.0), spec=st.sampled_from(SPECS))
def test_codes_are_the_nearest_levels_and_error_is_bounded(seed, log_scale, spec):
  x = _rows("heavy", rows=8, n=256, seed=seed) * np.float32(10.0 ** log_scale)
  f = QuantFormat.parse(spec, group_axis=1, channel_axis=0)
  q = qj.quantize(jnp.asarray(x), f)
  y = np.asarray(q.dequantize())
  s = np.repeat(np.asarray(q.scale).astype(np.float32), f.group_size, axis=1)
  levels = {"q1_0": np.array([-1.0, 1.0], np.float32),
            "tq1_0": np.array([-1.0, 0.0, 1.0], np.float32)}.get(spec)
  levels = f.levels if levels is None else levels
  best = np.min(np.abs(levels[None, None, :] * s[..., None] - x[..., None]), axis=-1)
  err = np.abs(y - x)
  if spec == "q1_0":  # signs, not nearest levels: x >= 0 -> +d
    assert np.all(np.sign(y) == np.where(x >= 0, 1, -1))
  else:
    np.testing.assert_array_less(err, best * (1 + 1e-5) + 1e-30)
  if spec != "nvfp4" or log_scale >= -1.0:  # NVFP4 zeroes blocks below max|x| ~ 0.006
    assert _rel(y, x) < REL[spec] * 1.35, (spec, _rel(y, x))  # heavy tails, small samples


@pytest.mark.parametrize("spec", SPECS)
def test_all_zero_blocks_decode_to_zero(spec):
  # IQ4_NL has no zero level: its all-zero blocks need scale 0 (as ggml writes them)
  x = _rows(rows=4, n=WIDTH.get(spec, 640), seed=9)
  x[1, :256] = 0.0
  x[3] = 0.0
  for cal in ("auto", "minmax"):
    _, y = _ours(x, spec, calibration=cal)
    assert np.all(y[1, :256] == 0) and np.all(y[3] == 0), (spec, cal)
  h = np.eye(x.shape[1])
  if spec in NO_GPTQ:
    with pytest.raises(ValueError, match="ternary uses quantjax.methods.ternary"):
      gptq.gptq_quantize(jnp.asarray(x.T), h, spec)
    return
  y = np.asarray(gptq.gptq_quantize(jnp.asarray(x.T), h, spec).qarray.dequantize()).T
  assert np.all(y[1, :256] == 0) and np.all(y[3] == 0), spec


def test_mxfp4_scale_is_a_power_of_two_below_the_block_max():
  rng = np.random.default_rng(3)
  amax = np.float32(10.0) ** rng.uniform(-8, 8, 2000).astype(np.float32)
  s = np.asarray(lt.e8m0_scale(jnp.asarray(amax)))
  np.testing.assert_array_equal(s, np.exp2(np.floor(np.log2(amax.astype(np.float64))) - 2))
  # exact powers of two and values just below them
  p = np.float32(2.0) ** np.arange(-20, 20, dtype=np.float32)
  np.testing.assert_array_equal(np.asarray(lt.e8m0_scale(jnp.asarray(p))), p / 4)
  below = np.nextafter(p, np.float32(0))
  np.testing.assert_array_equal(np.asarray(lt.e8m0_scale(jnp.asarray(below))), p / 8)


def test_nvfp4_scale_rounds_as_ggml_fp32_to_ue4m3():
  rng = np.random.default_rng(4)
  t = np.concatenate([np.float32(10.0) ** rng.uniform(-5, 3.5, 5000).astype(np.float32),
                      np.float32([0, 2.0 ** -10, 2.0 ** -9, 0.5 ** 6 * 1.0625, 240, 250, 255.9,
                                  256, 300, 448, 449, 1e6, 1.0625, 1.9375, 0.00293])])
  ours = np.asarray(lt.ue4m3_scale(jnp.asarray(t)))
  ref_bytes = gguf.quants.NVFP4.fp32_to_ue4m3(t)
  ref = gguf.quants.NVFP4.ue4m3_to_fp32(ref_bytes) * 2  # gguf-py halves it for doubled levels
  np.testing.assert_array_equal(ours, ref.astype(np.float32))


# ----------------------------------------------------------------------------
# ggml's own quantizer and dequantizers (the pinned llama.cpp).

@pytest.mark.requires_extra("llamacpp")
@pytest.mark.parametrize("spec", SPECS)
def test_dequantization_is_ggmls_bit_for_bit(spec):
  x = _rows("heavy", rows=16, n=WIDTH.get(spec, 640), seed=5) * np.float32(0.02)
  x[0, :128] = 0.0  # an all-zero block
  raw, y = _ours(x, spec)
  np.testing.assert_array_equal(ggml_dequantize(raw, spec.upper()), y)
  np.testing.assert_array_equal(cb.dequantize(raw, spec.upper()), y)


@pytest.mark.requires_extra("llamacpp")
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
def test_against_ggmls_quantizer(kind):
  x = _rows(kind, rows=32, n=1536, seed=6)
  for spec in ("mxfp4", "nvfp4", "q1_0"):  # closed-form scales: the same bytes
    raw, _ = _ours(x, spec)
    np.testing.assert_array_equal(raw, ggml_quantize(x, spec.upper()), err_msg=spec)
  # IQ4_NL: ggml's scale search (measured: 99.5% of blocks byte-identical, same error)
  raw, y = _ours(x, "iq4_nl")
  theirs = ggml_dequantize(ggml_quantize(x, "IQ4_NL"), "IQ4_NL")
  assert _rel(y, x) <= 1.002 * _rel(theirs, x)
  same = np.all(raw.reshape(-1, 18) == ggml_quantize(x, "IQ4_NL").reshape(-1, 18), axis=1)
  assert same.mean() > 0.98
  # Q2_0 / TQ2_0: "minmax" is ggml's rule (codes -1, 0, 1); the default search uses all
  # four levels (measured on Gaussian rows: 0.36 vs 0.72 and 0.38 vs 0.80 relative RMS
  # error; 0.61x on the heavy-tailed ones)
  for spec in ("q2_0", "tq2_0"):
    theirs = ggml_dequantize(ggml_quantize(x, spec.upper()), spec.upper())
    _, y_rule = _ours(x, spec, calibration="minmax")
    assert abs(_rel(y_rule, x) / _rel(theirs, x) - 1) < 0.01, spec
    _, y = _ours(x, spec)
    assert _rel(y, x) < 0.7 * _rel(theirs, x), (spec, _rel(y, x), _rel(theirs, x))
  # TQ1_0: ggml's d = max|x| zeroes most of a block; the default is the exact least-squares
  # ternary scale (measured: 0.44 vs 0.81 relative RMS error on Gaussian rows, 0.54 vs 0.84 on
  # the heavy-tailed ones). ggml's bytes are read at its values and re-written byte for byte.
  theirs_raw = ggml_quantize(x, "TQ1_0")
  theirs = ggml_dequantize(theirs_raw, "TQ1_0")
  np.testing.assert_array_equal(cb.dequantize(theirs_raw, "TQ1_0"), theirs)
  from quantjax.io import gguf as gio
  back = gio.blocks_to_qarray(theirs_raw, "TQ1_0", 1)
  np.testing.assert_array_equal(gio.qarray_to_blocks(back, "TQ1_0", 1), theirs_raw)
  raw, y = _ours(x, "tq1_0")
  np.testing.assert_array_equal(ggml_dequantize(raw, "TQ1_0"), y)
  assert _rel(y, x) < 0.7 * _rel(theirs, x), (_rel(y, x), _rel(theirs, x))


@pytest.mark.requires_extra("llamacpp")
def test_iq4_nl_importance_matches_ggmls_imatrix_fit():
  from quantjax.io import gguf as gio
  x = _rows("gauss", rows=64, n=512, seed=7)
  imp = np.ones(512, np.float32)
  imp[::7] = 50.0
  w = np.broadcast_to(imp, x.shape)
  ours = cb.dequantize(gio._codebook_from_floats(x, "IQ4_NL", imp, "w"), "IQ4_NL")
  plain = cb.dequantize(gio._codebook_from_floats(x, "IQ4_NL", None, "w"), "IQ4_NL")
  theirs = ggml_dequantize(ggml_quantize(x, "IQ4_NL", imp), "IQ4_NL")
  assert _rel(ours, x, w) <= 1.01 * _rel(theirs, x, w)
  assert _rel(ours, x, w) < 0.97 * _rel(plain, x, w)


# ----------------------------------------------------------------------------
# Methods: quantize_params (RTN), qdot under jit, GPTQ.

@pytest.mark.parametrize("spec", SPECS)
def test_quantize_params_qdot_and_gptq(spec):
  rng = np.random.default_rng(8)
  k, out, n = 256, 32, 512
  x = (rng.standard_normal((n, k)) * np.exp(0.7 * rng.standard_normal(k))).astype(np.float32)
  w = (0.05 * rng.standard_normal((k, out))).astype(np.float32)
  qp = qj.quantize_params({"dense": {"kernel": jnp.asarray(w)}},
                          [qj.QuantRule(module_path=r".*", format=spec)])
  q = qp["dense"]["kernel"]
  assert isinstance(q, qj.QArray) and q.fmt.name == spec
  xs = jnp.asarray(x[:8])
  y = jax.jit(lambda a, b: ops.qdot(a, b))(xs, q)
  np.testing.assert_allclose(np.asarray(y), np.asarray(xs @ q.dequantize()), rtol=1e-5, atol=1e-5)
  h = 2.0 * x.T.astype(np.float64) @ x / n
  if spec in NO_GPTQ:
    with pytest.raises(ValueError, match="ternary uses quantjax.methods.ternary"):
      gptq.gptq_quantize(jnp.asarray(w), h, spec)
    return
  res = gptq.gptq_quantize(jnp.asarray(w), h, spec)
  assert res.qarray.fmt.name == spec and res.qarray.nbytes == q.nbytes
  out_err = lambda wq: float(np.mean((x @ (np.asarray(wq) - w)) ** 2))  # noqa: E731
  assert out_err(res.qarray.dequantize()) < 0.97 * out_err(q.dequantize())


@pytest.mark.parametrize("spec", SPECS)
def test_fake_quant_is_the_real_grid_with_a_clipped_straight_through_gradient(spec):
  """QAT on the real grid: fake_quant's values are quantize -> dequantize; its gradient is
  the upstream gradient inside the codes' range (signed scales included: IQ4_NL, Q2_0) and
  zero outside it."""
  n = WIDTH.get(spec, 640)
  w = jax.random.normal(jax.random.key(3), (n, 16)) * 0.05
  f = QuantFormat.parse(spec)
  np.testing.assert_array_equal(np.asarray(qj.fake_quant(w, f)),
                                np.asarray(qj.quantize(w, f).dequantize()))
  g = np.asarray(jax.grad(lambda x: jnp.sum(qj.fake_quant(x, f) * 3.0))(w))
  # The share inside the range: Q2_0's least-squares scale search clips its blocks' tails
  # (about 16% of Gaussian values); binary's straight-through range is |x| <= 1.5 mean|x|
  # (about 77%); the other scale rules keep almost everything.
  least = {"q2_0": 0.75, "tq2_0": 0.75, "q1_0": 0.7}.get(spec, 0.9)
  assert set(np.unique(g)) <= {0.0, 3.0} and np.mean(g == 3.0) > least
  # Blocks whose extreme is negative have negative scales (IQ4_NL, Q2_0): still a gradient.
  assert np.mean(g[:, ::2] == 3.0) > least and np.mean(g[:, 1::2] == 3.0) > least


def test_fake_quant_gives_clipped_values_no_gradient():
  """MXFP4's block maximum lands in [4, 8) times its power-of-two scale and saturates at 6:
  that value passes no gradient, the rest of its block does. (NVFP4 never clips: a block
  whose E4M3 scale would overflow is refused, naming the range.)"""
  f = QuantFormat.parse("mxfp4")
  w = jnp.full((32, 1), 0.3).at[0, 0].set(7.9)
  d = np.asarray(qj.quantize(w, f).dequantize())
  assert d[0, 0] == 6.0 and abs(d[1, 0] - 0.3) < 0.3
  g = np.asarray(jax.grad(lambda x: jnp.sum(qj.fake_quant(x, f)))(w))
  assert g[0, 0] == 0.0 and np.all(g[1:, 0] == 1.0)
  with pytest.raises(ValueError, match=r"scales overflow float8_e4m3fn .* \|x\| <= 2688"):
    qj.quantize(jnp.full((64, 1), 0.3).at[0, 0].set(1e4), "nvfp4")


def test_bad_row_length_and_nan_are_named():
  with pytest.raises(ValueError, match=r"layers/0/q_proj/kernel \(shape \(576, 8\)\) to Q1_0: its "
                     r"rows along axis 0 hold 576 values.*fit rows of 576: IQ4_NL, MXFP4, NVFP4, "
                     r"Q2_0"):
    qj.quantize(jnp.ones((576, 8)), "q1_0", name="layers/0/q_proj/kernel")
  with pytest.raises(ValueError,
                     match=r"w \(shape \(48, 8\)\) to NVFP4: .* 48 values.*blocks of 64"):
    qj.quantize(jnp.ones((48, 8)), "nvfp4", name="w")
  with pytest.raises(ValueError, match="to NVFP4"):
    gptq.gptq_quantize(jnp.ones((48, 8)), np.eye(48), "nvfp4")
  bad = np.ones((64, 4), np.float32)
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match=r"cannot quantize w: it holds 1 NaN/Inf"):
    qj.quantize(jnp.asarray(bad), "mxfp4", name="w")


# ----------------------------------------------------------------------------
# TQ1_0: the exact least-squares ternary scale, and trits stored 5 per byte.

def test_tq1_0_scale_is_the_least_squares_ternary_fit():
  x = _rows("heavy", rows=16, n=512, seed=12)
  x[0, :256] = 0.0
  _, y = _ours(x, "tq1_0")
  xb, yb = x.reshape(-1, 256).astype(np.float64), y.reshape(-1, 256)
  err = np.sum((yb - xb) ** 2, axis=1)
  # every non-zero set of the k largest magnitudes with its least-squares scale
  a = -np.sort(-np.abs(xb), axis=1)
  s = np.cumsum(a, axis=1)
  k = np.arange(1, 257)
  best = np.sum(xb ** 2, axis=1) - np.max(s * s / k, axis=1)
  assert err[0] == 0.0
  np.testing.assert_array_less(err[1:], best[1:] * (1 + 2e-3))  # the scale is rounded to fp16
  # TWN (the ternary kind's rule) and llama.cpp's max|x| do no better on any block
  twn = QuantFormat(kind="ternary", granularity="group", group_size=256, group_axis=1,
                    channel_axis=0)
  y2 = np.asarray(qj.quantize(jnp.asarray(x), twn).dequantize()).reshape(-1, 256)
  assert np.all(err <= np.sum((y2 - xb) ** 2, axis=1) * (1 + 2e-3))
  _, y3 = _ours(x, "tq1_0", calibration="minmax")  # other names: the ternary kind's TWN
  np.testing.assert_allclose(y3.reshape(-1, 256), y2, rtol=1e-3)  # its scales in float16


def test_tq1_0_stores_llamacpps_code_bytes_and_slices_stacks_and_gathers():
  x = jax.random.normal(jax.random.key(5), (3, 512, 8))
  q = qarray.quantize_stacked(x, "tq1_0", (0,))
  assert q.qvalue.shape == (3, 2 * 52, 8) and q.bits_per_value == 1.6875
  want = np.stack([np.asarray(qj.quantize(x[i], "tq1_0").dequantize()) for i in range(3)])
  np.testing.assert_array_equal(np.asarray(q.dequantize()), want)
  # scan hands each step one layer's slice
  _, ys = jax.lax.scan(lambda c, qi: (c, qi.dequantize()), 0, q)
  np.testing.assert_array_equal(np.asarray(ys), want)
  # an embedding table: blocks along axis 1, rows gathered without the rest
  emb = qj.quantize(x[0].T, QuantFormat.parse("tq1_0", group_axis=1, channel_axis=0))
  ids = jnp.array([[7, 0], [3, 3]])
  np.testing.assert_array_equal(np.asarray(emb[ids]), np.asarray(emb.dequantize())[np.asarray(ids)])
  # the codes round trip through from_codes, and the bytes are TQ1_0's qs / qh
  c = np.asarray(emb.codes())
  again = qj.QArray.from_codes(jnp.asarray(c), emb.fmt, emb.scale)
  np.testing.assert_array_equal(np.asarray(again.qvalue), np.asarray(emb.qvalue))
  np.testing.assert_array_equal(np.asarray(emb.qvalue), lt.pack_trits(c))
