"""GGUF export / import of llama.cpp's IQ4_NL, MXFP4, NVFP4, Q2_0, Q1_0, TQ2_0 on a tiny Llama:
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

TYPES = list(cb.TYPES)  # IQ4_NL, MXFP4, NVFP4, Q1_0, Q2_0, TQ2_0
# TINY's matrices have rows of 64 (attention, gate/up) and 128 (down); Q1_0 needs 128;
# TQ2_0 needs 256 (WIDE's down_proj only).
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
  if name in ("IQ4_NL", "MXFP4", "NVFP4", "TQ2_0"):  # gguf-py 0.19 decodes these
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
  levels = 2 if name == "Q1_0" else fmt.qmax + 1
  codes = np.arange(n) * 7 % levels
  codes = np.stack([codes, codes[::-1]]).astype(np.int8)
  if name == "Q1_0":  # signs
    codes = codes * 2 - 1
  scales = np.asarray(jnp.full((2, n // fmt.group_size), 0.5, fmt.scale_dtype))
  got, s2 = cb.unpack(cb.pack(codes, scales, name), name)
  np.testing.assert_array_equal(got, codes)
  np.testing.assert_array_equal(s2.view(np.uint8), scales.view(np.uint8))


def _flat(tree):
  return dict(rules_lib.tree_leaves_with_paths(tree))


@pytest.mark.parametrize("name", TYPES)
def test_export_code_for_code_import_at_size_reexport_identical(name, tmp_path):
  params = tiny_params(WIDE, seed=2)
  targets = r".*down_proj/kernel" if name == "TQ2_0" else PROJ
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
  for p, g in checked[2:] if name == "TQ2_0" else checked:
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
  for p, _ in checked[2:] if name == "TQ2_0" else checked:
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
