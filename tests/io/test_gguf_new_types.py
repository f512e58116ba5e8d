"""GGUF export / import of llama.cpp's IQ4_NL, MXFP4, NVFP4, Q2_0, Q1_0, TQ2_0, TQ1_0 on a tiny
Llama:
block layouts (gguf-py's reference dequantizer, where it has one), code-for-code export,
import at the file's size, byte-identical re-export, and the errors that name tensors."""

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax import rules as rules_lib
from quantjax.io import gguf as gio
from quantjax.io import gguf_codebook as cb
from quantjax.io import gguf_read
from quantjax.models import load as load_lib
from tests.io.test_gguf import TINY, tiny_params

TYPES = list(cb.TYPES)  # IQ4_NL, MXFP4, NVFP4, Q1_0, Q2_0, TQ2_0, TQ1_0
# TINY's matrices have rows of 64 (attention, gate/up) and 128 (down); Q1_0 needs 128;
# TQ2_0 and TQ1_0 need 256 (WIDE's down_proj only).
ROWS_OF_256 = ("TQ2_0", "TQ1_0")
WIDE = dataclasses.replace(TINY, hidden_size=128, intermediate_size=256, num_heads=4,
                           head_dim=32, name="tiny128")
PROJ = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"


@pytest.mark.parametrize("name", TYPES)
def test_block_codec_matches_the_reference_dequantizers(name):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((6, 512)) * np.exp(rng.standard_normal((1, 512)))).astype(np.float32)
  x *= np.float32(0.03)
  q = qj.quantize(jnp.asarray(x.T), gio.block_format(name, 0))  # [in, out] kernel layout
  raw = gio.qarray_to_blocks(q, name, 0)
  ct = cb.TYPES[name]
  assert raw.shape == (6, 512 // ct.block * ct.type_size) and q.nbytes == raw.nbytes
  want = np.asarray(q.dequantize()).T
  np.testing.assert_array_equal(cb.dequantize(raw, name), want)
  if name in ("IQ4_NL", "MXFP4", "NVFP4", "TQ2_0", "TQ1_0"):  # gguf-py 0.19 decodes these
    np.testing.assert_array_equal(
        gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]), want)
  back = gio.blocks_to_qarray(raw, name, 0)
  np.testing.assert_array_equal(np.asarray(back.codes()), np.asarray(q.codes()))
  np.testing.assert_array_equal(np.asarray(back.scale).view(np.uint8),
                                np.asarray(q.scale).view(np.uint8))
  np.testing.assert_array_equal(gio.qarray_to_blocks(back, name, 0), raw)


@pytest.mark.parametrize("name", TYPES)
def test_every_code_survives_packing(name):
  ct = cb.TYPES[name]
  fmt = ct.format()
  n = 2 * ct.block
  levels = {"Q1_0": 2, "TQ1_0": 3}.get(name, fmt.qmax + 1)
  codes = np.arange(n) * 7 % levels
  codes = np.stack([codes, codes[::-1]]).astype(np.int8)
  if name == "Q1_0":  # signs
    codes = codes * 2 - 1
  if name == "TQ1_0":  # trits
    codes = codes - 1
  scales = np.asarray(jnp.full((2, n // fmt.group_size), 0.5, fmt.scale_dtype))
  got, s2 = cb.unpack(cb.pack(codes, scales, name), name)
  np.testing.assert_array_equal(got, codes)
  np.testing.assert_array_equal(s2.view(np.uint8), scales.view(np.uint8))


def _flat(tree):
  return dict(rules_lib.tree_leaves_with_paths(tree))


@pytest.mark.parametrize("name", TYPES)
def test_export_code_for_code_import_at_size_reexport_identical(name, tmp_path):
  params = tiny_params(WIDE, seed=2)
  targets = r".*down_proj/kernel" if name in ROWS_OF_256 else PROJ
  qparams = qj.quantize_params(params, [qj.QuantRule(module_path=targets, format=name.lower())])
  path = tmp_path / "a.gguf"
  report = gio.export_gguf(path, WIDE, qparams, float_type="F16")
  how = {r.path: (r.gguf_type, r.how) for r in report}
  assert how["layers/1/mlp/down_proj/kernel"] == (name, "lossless")
  cfg, imported, _, info = gio.import_gguf(path, tokenizer=False)
  assert info["blk.1.ffn_down.weight"] == (name, "qarray")
  fq, fi = _flat(qparams), _flat(nnx.to_pure_dict(imported))
  with gguf_read.read_gguf(str(path)) as f:
    sizes = {t.name: t.n_bytes for t in f.tensors}
  checked = (("layers/0/attn/q_proj/kernel", "blk.0.attn_q.weight"),  # Q/K rows permuted
             ("layers/1/attn/k_proj/kernel", "blk.1.attn_k.weight"),
             ("layers/1/mlp/down_proj/kernel", "blk.1.ffn_down.weight"))
  for p, g in checked[2:] if name in ROWS_OF_256 else checked:
    assert isinstance(fi[p], qj.QArray) and fi[p].fmt.name == fq[p].fmt.name == name.lower()
    assert fi[p].nbytes == sizes[g]  # imported at the file's own size
    np.testing.assert_array_equal(np.asarray(fi[p].qvalue), np.asarray(fq[p].qvalue))
    np.testing.assert_array_equal(np.asarray(fi[p].dequantize()), np.asarray(fq[p].dequantize()))
  path2 = tmp_path / "b.gguf"
  gio.export_gguf(path2, cfg, imported, float_type="F16")
  with gguf_read.read_gguf(str(path)) as a, gguf_read.read_gguf(str(path2)) as b:
    ta = {t.name: t for t in a.tensors}
    assert [t.name for t in b.tensors] == list(ta)
    for t in b.tensors:
      assert t.type_name == ta[t.name].type_name, t.name
      np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8),
                                    np.asarray(ta[t.name].data).view(np.uint8), err_msg=t.name)
  if name != "Q2_0":  # gguf-py 0.19 reads the file too (it has no Q2_0)
    r = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert r["blk.1.ffn_down.weight"].tensor_type.name == name
  # The dequantizing loader (and the streaming reader) decode the same values.
  _, floats, _ = load_lib.load_gguf(path, tokenizer=False)
  ff = _flat(nnx.to_pure_dict(floats))
  for p, _ in checked[2:] if name in ROWS_OF_256 else checked:
    np.testing.assert_array_equal(np.asarray(ff[p]), np.asarray(fq[p].dequantize()), err_msg=p)


def test_rules_write_floats_and_other_layouts_in_the_new_types(tmp_path):
  params = tiny_params(seed=3)
  report = gio.export_gguf(tmp_path / "f.gguf", TINY, params,
                           types={r".*attn_(q|output).*": "IQ4_NL", "token_embd.weight": "MXFP4",
                                  "output.weight": "NVFP4"})
  kinds = {r.name: (r.gguf_type, r.how) for r in report}
  assert kinds["blk.0.attn_q.weight"] == ("IQ4_NL", "quantized")
  assert kinds["token_embd.weight"] == ("MXFP4", "quantized")  # blocks along its rows
  assert kinds["output.weight"] == ("NVFP4", "quantized")
  _, imported, _, info = gio.import_gguf(tmp_path / "f.gguf", tokenizer=False)
  emb = nnx.to_pure_dict(imported)["embed"]["embedding"]
  assert isinstance(emb, qj.QArray) and emb.fmt.name == "mxfp4" and emb.fmt.group_axis == 1
  # a codebook QArray of another layout is re-quantized to its own llama.cpp type
  qp = qj.quantize_params(params, [qj.QuantRule(module_path=r".*v_proj/kernel",
                                                format="iq4_nl_g64")])
  report = gio.export_gguf(tmp_path / "g.gguf", TINY, qp)
  assert {(r.gguf_type, r.how) for r in report if "attn_v" in r.name} == {
      ("IQ4_NL", "re-quantized (lossy)")}


def test_bad_row_lengths_nan_and_bad_scale_bytes_are_named(tmp_path):
  params = tiny_params(seed=4)
  with pytest.raises(gio.GGUFError, match=r"blk.0.attn_q.weight \(layers/0/attn/q_proj/kernel, "
                     r"shape \(64, 64\)\) as Q1_0: its rows hold 64 values .* blocks of 128; "
                     r"types that fit rows of 64: Q8_0, .*IQ4_NL, MXFP4, NVFP4, Q2_0"):
    gio.export_gguf(tmp_path / "x.gguf", TINY, params, types={"q_proj": "Q1_0"})
  assert not (tmp_path / "x.gguf").exists()
  bad = _flat(params)
  k = np.array(bad["layers/1/mlp/up_proj/kernel"])
  k[5, 2] = np.inf
  params["layers"][1]["mlp"]["up_proj"]["kernel"] = jnp.asarray(k)
  with pytest.raises(gio.GGUFError, match=r"layers/1/mlp/up_proj/kernel \(tensor "
                     r"blk.1.ffn_up.weight\) holds 1 NaN/Inf"):
    gio.export_gguf(tmp_path / "y.gguf", TINY, params, types={".*": "NVFP4"})
  # scale bytes that llama.cpp and the formats' dtypes would read differently
  q = qj.quantize(jnp.ones((64, 3)), gio.block_format("NVFP4", 0))
  raw = gio.qarray_to_blocks(q, "NVFP4", 0)
  raw[1, 2] = 0x7F
  with pytest.raises(gio.GGUFError, match=r"NVFP4 scale byte 0x7f \(scale 2 of block 0, row 1\)"):
    gio.blocks_to_qarray(raw, "NVFP4", 0)
  raw = gio.qarray_to_blocks(qj.quantize(jnp.ones((32, 2)), gio.block_format("MXFP4", 0)),
                             "MXFP4", 0)
  raw[0, 0] = 0xFF
  with pytest.raises(gio.GGUFError, match="MXFP4 scale byte is 255"):
    gio.blocks_to_qarray(raw, "MXFP4", 0)


# ----------------------------------------------------------------------------
# TQ1_0: trits 5 per byte, as llama.cpp stores them.

def _tq1_0_rows(rows=8, n=1024, seed=11):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, n)) * np.exp(0.5 * rng.standard_normal((1, n)))
  return (0.02 * x).astype(np.float32)


def test_tq1_0_every_byte_decodes_as_ggml_and_canonical_bytes_round_trip():
  # Every byte value in every position of a block: our decoding is gguf-py's (ggml's
  # multiply-shift), and the bytes llama.cpp's encoder writes (ceil(q * 256 / 243)) come
  # back byte for byte.
  raw = np.zeros((256, 54), np.uint8)
  raw[:, :52] = (np.arange(256)[:, None] + 37 * np.arange(52)[None]) % 256
  raw[:, 52:] = np.array([0.25], np.float16).view(np.uint8)
  codes, scales = cb.unpack(raw, "TQ1_0")
  assert set(np.unique(codes)) == {-1, 0, 1} and codes.shape == (256, 256)
  ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.TQ1_0)
  np.testing.assert_array_equal(cb.dequantize(raw, "TQ1_0"), ref)
  np.testing.assert_array_equal(codes * np.float32(0.25), ref)
  again = cb.pack(codes, scales, "TQ1_0")  # canonical bytes: the same values
  np.testing.assert_array_equal(cb.dequantize(again, "TQ1_0"), ref)
  np.testing.assert_array_equal(cb.pack(cb.unpack(again, "TQ1_0")[0], scales, "TQ1_0"), again)
  # all 243 five-trit numbers in the 48 qs bytes, all 81 four-trit ones in the 4 qh bytes
  q = np.arange(243)
  canon = (q * 256 + 242) // 243
  digits = np.stack([q // 3 ** (4 - j) % 3 for j in range(5)], axis=-1) - 1  # most significant first
  block = np.zeros((243, 256), np.int8)
  for j in range(5):
    block[:, 32 * j] = digits[:, j]  # byte 0 of qs holds values 0, 32, 64, 96, 128
  got = cb.pack(block, np.zeros((243, 1), np.float16), "TQ1_0")
  np.testing.assert_array_equal(got[:, 0], canon)
  np.testing.assert_array_equal(cb.unpack(got, "TQ1_0")[0], block)
  qh = np.zeros((81, 256), np.int8)
  for j in range(4):
    qh[:, 240 + 4 * j] = digits[:81, j + 1]  # qh byte 0 holds values 240, 244, 248, 252
  got = cb.pack(qh, np.zeros((81, 1), np.float16), "TQ1_0")
  np.testing.assert_array_equal(got[:, 48], (3 * np.arange(81) * 256 + 242) // 243)  # 5th trit 0
  np.testing.assert_array_equal(cb.unpack(got, "TQ1_0")[0], qh)


def test_tq1_0_reads_and_rewrites_llamacpps_own_bytes():
  """gguf-py's TQ1_0 quantizer (llama.cpp's quantize_row_tq1_0_ref: d = max|x|): read code for
  code at its values and size, re-written byte for byte; quantjax's default scales are the
  exact least-squares ternary fit instead, which gguf-py decodes to our values exactly."""
  x = _tq1_0_rows()
  theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType.TQ1_0)
  assert theirs.shape == (8, 1024 // 256 * 54)
  q = gio.blocks_to_qarray(theirs, "TQ1_0", 1)
  assert q.fmt.name == "tq1_0" and q.nbytes == theirs.nbytes and q.bits_per_value == 1.6875
  np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.TQ1_0))
  np.testing.assert_array_equal(gio.qarray_to_blocks(q, "TQ1_0", 1), theirs)
  # the QArray keeps llama.cpp's code bytes themselves
  np.testing.assert_array_equal(np.asarray(q.qvalue), theirs.reshape(8, 4, 54)[..., :52].reshape(8, -1))
  # llama.cpp's rule through quantize_with_scale: its bytes, except where x / d lies within
  # float16 rounding of 1/2 (ggml divides by the float32 max, we by its float16)
  fmt = gio.block_format("TQ1_0", 1)
  amax = np.abs(x.reshape(8, 4, 256)).max(-1).astype(np.float16)
  mine = gio.qarray_to_blocks(qj.quantize_with_scale(jnp.asarray(x), fmt, jnp.asarray(amax)),
                              "TQ1_0", 1)
  assert np.mean(np.all(mine.reshape(-1, 54) == theirs.reshape(-1, 54), axis=1)) > 0.9
  ours = qj.quantize(jnp.asarray(x), fmt)
  raw = gio.qarray_to_blocks(ours, "TQ1_0", 1)
  y = np.asarray(ours.dequantize())
  np.testing.assert_array_equal(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.TQ1_0), y)
  y_theirs = gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.TQ1_0)
  assert np.sum((y - x) ** 2) < 0.5 * np.sum((y_theirs - x) ** 2)


def test_tq1_0_sizes_and_rows_that_do_not_fill_its_blocks(tmp_path):
  ct = cb.TYPES["TQ1_0"]
  assert (ct.ggml_id, ct.block, ct.type_size) == (34, 256, 54) and ct.bits_per_weight == 1.6875
  assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.TQ1_0] == (256, 54)
  q = qj.quantize(jnp.asarray(_tq1_0_rows(rows=3, n=768).T), "tq1_0")
  assert q.nbytes == 3 * 3 * 54 and np.asarray(q.qvalue).shape == (3 * 52, 3)
  with pytest.raises(gio.GGUFError, match=r"blk.0.ffn_down.weight \(layers/0/mlp/down_proj/kernel, "
                     r"shape \(128, 64\)\) as TQ1_0: its rows hold 128 values .* blocks of 256; "
                     r"types that fit rows of 128: .*Q1_0"):
    gio.export_gguf(tmp_path / "x.gguf", TINY, tiny_params(seed=4), types={"down_proj": "TQ1_0"})
  assert not (tmp_path / "x.gguf").exists()
  with pytest.raises(ValueError, match=r"w \(shape \(128, 4\)\) to TQ1_0: .* 128 values.*blocks "
                     r"of 256"):
    qj.quantize(jnp.ones((128, 4)), "tq1_0", name="w")
  raw = gio.qarray_to_blocks(q, "TQ1_0", 0)
  with pytest.raises(gio.GGUFError, match=r"a TQ1_0 row of 100 bytes is not a whole number of "
                     r"TQ1_0's 54-byte blocks"):
    gio.blocks_to_qarray(raw[:, :100], "TQ1_0", 0)


def test_rows_that_are_not_whole_blocks_are_named_by_every_codec():
  from quantjax.io import gguf_blocks, gguf_dequant
  raw = np.zeros((2, 35), np.uint8)
  for fn, want in ((lambda: gguf_blocks.unpack_blocks(raw, "Q8_0"), "a Q8_0 row of 35 bytes .* "
                    r"Q8_0's 34-byte blocks \(1 bytes over\)"),
                   (lambda: gguf_dequant.dequantize_q4_1(raw), "a Q4_1 row of 35 bytes .* "
                    r"Q4_1's 20-byte blocks \(15 bytes over\)"),
                   (lambda: cb.unpack(raw, "IQ4_NL", what="blk.0.attn_q.weight"),
                    r"blk.0.attn_q.weight: a IQ4_NL row of 35 bytes .* IQ4_NL's 18-byte blocks")):
    with pytest.raises(gio.GGUFError, match=want):
      fn()
  # whole blocks: 1-D rows and leading axes keep working
  assert gguf_dequant.dequantize_q8_0(np.zeros(34 * 3, np.uint8)).shape == (96,)
  assert gguf_dequant.dequantize_q8_0(np.zeros((2, 4, 34), np.uint8)).shape == (2, 4, 32)


@pytest.mark.parametrize("name,ratio", [("IQ4_NL", 0.97), ("TQ1_0", 0.999)])
def test_importance_weighs_the_scale_search_of_float_leaves(name, ratio, tmp_path):
  """`export_gguf(importance=...)` on float leaves written as a searched type: the error
  weighted by the importance drops against the unweighted export of the same leaf (a
  ternary block has one scale and its threshold for 256 values, so less: measured -0.2%;
  ignored, the two files would be the same)."""
  params = tiny_params(WIDE, seed=3)
  path = "layers/0/mlp/down_proj/kernel"
  x = np.asarray(_flat(params)[path], np.float32)
  imp = np.ones(x.shape[0], np.float32)
  imp[::7] = 50.0
  errs = []
  for i, importance in enumerate((None, {path: imp})):
    out = tmp_path / f"{i}.gguf"
    gio.export_gguf(out, WIDE, params, float_type="F16",
                    types={r".*down_proj/kernel": name}, importance=importance)
    _, back, _, _ = gio.import_gguf(out, tokenizer=False)
    y = np.asarray(_flat(back)[path].dequantize())
    errs.append(float(np.sum(imp[:, None] * (y - x) ** 2)))
  assert errs[1] < ratio * errs[0], errs
