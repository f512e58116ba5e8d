"""k-quant encoders (Q4_K / Q5_K / Q6_K): layout via gguf-py's decoder, quality
against ggml's own quantizer, importance weights, and export into GGUF files."""

import gguf
import numpy as np
import pytest
from flax import nnx
from gguf import quants

from quantjax.io import gguf as gio
from quantjax.io import kquants as kq
from quantjax.models import llama

TYPES = ["Q4_K", "Q5_K", "Q6_K"]


def _decode(raw, t):
  return quants.dequantize(raw, gguf.GGMLQuantizationType[t])


def _rel(y, x, w=None):
  w = np.ones_like(x) if w is None else w
  return float(np.sqrt(np.sum(w * (y - x) ** 2) / np.sum(w * x ** 2)))


def _data(kind, rows=32, n=1536, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, n)).astype(np.float32)
  if kind == "heavy":  # outlier columns, as in LLM weights
    x *= np.exp(0.5 * rng.standard_normal((1, n))).astype(np.float32)
  return x


@pytest.mark.parametrize("t", TYPES)
def test_layout_round_trips_through_ggufs_decoder(t):
  x = _data("heavy")
  x[0, :256] = 0.0  # an all-zero super-block stays exactly zero
  x[1, :256] = 0.75  # a constant one is (nearly) exact
  raw = kq.quantize_k(x, t)
  assert raw.dtype == np.uint8 and raw.shape == (32, 1536 // 256 * kq.K_BLOCK_BYTES[t])
  assert kq.K_BLOCK_BYTES[t] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1]
  y = _decode(raw, t)
  assert np.all(y[0, :256] == 0.0)
  np.testing.assert_allclose(y[1, :256], 0.75, atol=2e-3)
  bound = {"Q4_K": 0.10, "Q5_K": 0.05, "Q6_K": 0.025}[t]
  assert _rel(y, x) < bound


@pytest.mark.requires_extra("llamacpp")
@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("t", TYPES)
def test_quality_matches_ggmls_quantizer(t, kind):
  """Same rows through ggml's reference quantizer (llama.cpp's libggml): our error is
  within 1% of its error (measured: 0.999x-1.006x)."""
  from quantjax.eval import llamacpp
  x = _data(kind, rows=64)
  ours = _rel(_decode(kq.quantize_k(x, t), t), x)
  theirs = _rel(_decode(llamacpp.ggml_quantize_rows(x, t), t), x)
  assert ours <= 1.01 * theirs, (ours, theirs)


@pytest.mark.parametrize("t", TYPES)
def test_importance_lowers_the_weighted_error(t):
  x = _data("gaussian", rows=64)
  imp = np.ones(1536, np.float32)
  imp[::7] = 50.0  # a few input columns matter much more
  w = np.broadcast_to(imp, x.shape)
  plain = _rel(_decode(kq.quantize_k(x, t), t), x, w)
  weighted = _rel(_decode(kq.quantize_k(x, t, importance=imp), t), x, w)
  assert weighted < 0.95 * plain, (weighted, plain)


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"multiple of 256, got shape \(2, 300\)"):
    kq.quantize_q4_k(np.ones((2, 300), np.float32))
  with pytest.raises(ValueError, match="importance has 10 values for rows of 256"):
    kq.quantize_q6_k(np.ones((2, 256), np.float32), importance=np.ones(10))
  with pytest.raises(ValueError, match="unknown k-quant type 'Q3_K'"):
    kq.quantize_k(np.ones((2, 256), np.float32), "Q3_K")


def test_export_k_types_and_no_silent_fallback(tmp_path):
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=288, num_layers=1,
                          num_heads=4, num_kv_heads=2, head_dim=64)
  params = nnx.to_pure_dict(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  path = tmp_path / "k.gguf"
  # down_proj reads 288 values per row: not a multiple of 256. Asking Q6_K of it is an error
  # naming the tensor, the row length and the types that fit (llama-quantize would silently
  # write Q8_0 instead), and nothing is written.
  with pytest.raises(gio.GGUFError, match=r"tensor blk\.0\.ffn_down\.weight \(layers/0/mlp/"
                     r"down_proj/kernel, shape \(288, 256\)\) as Q6_K: its rows hold 288 "
                     r"values .* types that fit rows of 288: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                     r"IQ4_NL, MXFP4"):
    gio.export_gguf(path, cfg, params,
                    types={r".*mlp/down.*": "Q6_K", r".*_proj.*": "Q4_K", "embed": "Q5_K"})
  assert not path.exists() and not list(tmp_path.iterdir())
  report = gio.export_gguf(path, cfg, params,
                           types={r".*mlp/down.*": "Q8_0", r".*_proj.*": "Q4_K", "embed": "Q5_K"})
  by = {r.path: r for r in report}
  assert by["layers/0/attn/q_proj/kernel"].gguf_type == "Q4_K"
  assert by["embed/embedding"].gguf_type == "Q5_K"
  assert by["layers/0/mlp/down_proj/kernel"].gguf_type == "Q8_0"
  cfg2, imported, _, info = gio.import_gguf(path, tokenizer=False)
  assert info["blk.0.attn_v.weight"] == ("Q4_K", "dequantized")
  # what the file holds is exactly what the encoder produced for the [out, in] rows
  w = np.asarray(params["layers"][0]["attn"]["v_proj"]["kernel"]).T
  np.testing.assert_array_equal(np.asarray(imported["layers"][0]["attn"]["v_proj"]["kernel"]).T,
                                _decode(kq.quantize_q4_k(w), "Q4_K"))
  imp = {"layers/0/attn/v_proj/kernel": np.linspace(1, 10, 256)}
  report2 = gio.export_gguf(tmp_path / "imp.gguf", cfg, params,
                            types={r".*mlp/down.*": "Q8_0", r".*_proj.*": "Q4_K"},
                            importance=imp)
  assert len(report2) == len(report)


def test_importance_weighted_legacy_blocks():
  from quantjax.numerics import qarray
  x = _data("heavy", rows=64, n=512)
  imp = np.ones(512, np.float32)
  imp[::5] = 40.0
  w = np.broadcast_to(imp, x.shape)
  for t, bits in (("Q4_0", 4), ("Q5_0", 5)):
    codes, d = kq.fit_symmetric_blocks(x, bits, imp)
    assert codes.min() >= -2 ** (bits - 1) and codes.max() <= 2 ** (bits - 1) - 1
    y = (codes.reshape(64, -1, 32) * d[..., None]).reshape(x.shape)
    raw = gio.pack_blocks(codes, d, None, t)
    np.testing.assert_array_equal(_decode(raw, t), y)  # what the file holds
    fmt = gio.block_format(t, axis=1)
    base = np.asarray(qarray.quantize(x, fmt, calibration="signed_max").dequantize())
    assert _rel(y, x, w) < 0.95 * _rel(base, x, w), t
