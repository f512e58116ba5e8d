"""GGUF block codecs, export and import on a tiny random Llama (no llama.cpp needed)."""

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax import rules as rules_lib
from quantjax.io import gguf as gio
from quantjax.models import llama
from quantjax.models import load
from quantjax.numerics.formats import QuantFormat

TINY = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                         tie_embeddings=False, max_position_embeddings=64, name="tiny")


def tiny_params(config=TINY, seed=0):
  model = llama.Llama(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  # Norm scales away from 1 so a norm mix-up shows up.
  rng = np.random.default_rng(seed)

  def fix(path, x):
    if path[-1].key == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), jnp.float32)
    return x
  return jax.tree_util.tree_map_with_path(fix, pure)


@pytest.mark.parametrize("name", list(gio.BLOCK_TYPES))
def test_block_codec_roundtrip_and_matches_gguf_py(name):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 96)).astype(np.float32)
  q = qj.quantize(jnp.asarray(x.T), gio.block_format(name, 0))  # [in, out] kernel layout
  raw = gio.qarray_to_blocks(q, name, 0)
  assert raw.shape == (6, 3 * gio.BLOCK_TYPES[name].block_bytes)
  # gguf-py's reference dequantizer reads our blocks as the QArray's values, bit for bit.
  ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
  np.testing.assert_array_equal(ref, np.asarray(q.dequantize()).T)
  # and back: same codes, same scales
  back = gio.blocks_to_qarray(raw, name, 0)
  np.testing.assert_array_equal(np.asarray(back.codes()), np.asarray(q.codes()))
  np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(q.scale))
  np.testing.assert_array_equal(gio.qarray_to_blocks(back, name, 0), raw)
  # the QArray costs exactly the file's bytes
  assert back.nbytes == raw.nbytes


def test_block_codes_cover_the_full_range():
  # Extreme codes (e.g. -8 for Q4_0, 31 for Q5_1) survive packing.
  for name, bt in gio.BLOCK_TYPES.items():
    lo = -(2 ** (bt.bits - 1)) if bt.symmetric else 0
    codes = (lo + np.arange(64) % (2 ** bt.bits)).reshape(2, 32)
    d = np.full((2, 1), 0.5, np.float16)
    m = None if bt.symmetric else np.full((2, 1), -1.0, np.float16)
    got, d2, m2 = gio.unpack_blocks(gio.pack_blocks(codes, d, m, name), name)
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_array_equal(d2, d[:, :1].reshape(2, 1))


def test_format_specs_name_the_gguf_types():
  assert QuantFormat.parse("q4_0").gguf_type == "Q4_0"
  assert QuantFormat.parse("q4_1").name == "q4_1"
  assert QuantFormat.parse("int4_g32").gguf_type is None  # float32 scales are not Q4_0
  assert QuantFormat.parse("int4_g32", scale_dtype=jnp.float16).gguf_type == "Q4_0"
  assert gio.block_type_of(QuantFormat.parse("q8_0", group_axis=1), 0) is None


def test_export_is_lossless_for_block_formats_and_reports_the_rest(tmp_path):
  params = tiny_params()
  rules = [qj.QuantRule(module_path=p, format=f) for p, f in (
      (r".*(q|k|v|o)_proj/kernel", "q4_0"), (r".*gate_proj/kernel", "q4_1"),
      (r".*up_proj/kernel", "q5_1"), (r".*down_proj/kernel", "int4_g64"),
      (r"lm_head/kernel", "q8_0"))]
  qparams = qj.quantize_params(params, rules)
  path = str(tmp_path / "m.gguf")
  report = gio.export_gguf(path, TINY, qparams, float_type="F16")
  how = {r.path: (r.gguf_type, r.how) for r in report}
  assert how["layers/0/attn/q_proj/kernel"] == ("Q4_0", "lossless")
  assert how["layers/1/mlp/gate_proj/kernel"] == ("Q4_1", "lossless")
  assert how["layers/1/mlp/up_proj/kernel"] == ("Q5_1", "lossless")
  assert how["layers/0/mlp/down_proj/kernel"] == ("Q4_0", "re-quantized (lossy)")
  assert how["embed/embedding"] == ("F16", "float")
  assert how["layers/0/input_norm/scale"] == ("F32", "float")

  # gguf-py reads every tensor; undoing the layout gives the QArrays' values exactly.
  reader = gguf.GGUFReader(path)
  assert reader.fields["general.architecture"].contents() == "llama"
  cfg, imported, _, info = gio.import_gguf(path, tokenizer=False)
  assert cfg.num_kv_heads == 2 and cfg.hidden_size == 64 and not cfg.tie_embeddings
  assert info["blk.0.attn_q.weight"] == ("Q4_0", "qarray")
  assert info["token_embd.weight"] == ("F16", "qarray")
  flat_q = dict(rules_lib.tree_leaves_with_paths(qparams))
  flat_i = dict(rules_lib.tree_leaves_with_paths(nnx.to_pure_dict(imported)))
  for p in ("layers/0/attn/q_proj/kernel", "layers/1/attn/k_proj/kernel",
            "layers/0/mlp/gate_proj/kernel", "lm_head/kernel"):
    np.testing.assert_array_equal(np.asarray(flat_i[p].dequantize()),
                                  np.asarray(flat_q[p].dequantize()), err_msg=p)
    np.testing.assert_array_equal(np.asarray(flat_i[p].qvalue), np.asarray(flat_q[p].qvalue))
  np.testing.assert_array_equal(np.asarray(flat_i["layers/0/input_norm/scale"]),
                                np.asarray(flat_q["layers/0/input_norm/scale"]))
  # The same model computes the same logits from either tree.
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 96, (1, 12)), jnp.int32)
  a = llama.forward(TINY, qparams, toks)
  b = llama.forward(cfg, imported, toks)
  # embeddings went through F16 and down_proj was re-quantized: close, not equal
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)

  # Re-export of the import is byte-identical (tensor data and tensor types).
  path2 = str(tmp_path / "m2.gguf")
  gio.export_gguf(path2, cfg, imported, float_type="F16")
  r1 = {t.name: t for t in gguf.GGUFReader(path).tensors}
  for t in gguf.GGUFReader(path2).tensors:
    assert t.tensor_type == r1[t.name].tensor_type, t.name
    np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8),
                                  np.asarray(r1[t.name].data).view(np.uint8), err_msg=t.name)


def test_float_exports_and_dequantized_loader_agree(tmp_path):
  params = tiny_params(seed=3)
  for ft in ("F32", "F16", "BF16"):
    path = str(tmp_path / f"{ft}.gguf")
    gio.export_gguf(path, TINY, params, float_type=ft)
    _, loaded, _ = load.load_gguf(path, tokenizer=False)
    flat = dict(rules_lib.tree_leaves_with_paths(nnx.to_pure_dict(loaded)))
    want = np.asarray(dict(rules_lib.tree_leaves_with_paths(params))["layers/1/attn/k_proj/kernel"])
    cast = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}[ft]
    np.testing.assert_array_equal(np.asarray(flat["layers/1/attn/k_proj/kernel"]),
                                  np.asarray(want.astype(cast), np.float32), err_msg=ft)


def test_rules_force_types_and_embeddings_quantize_along_rows(tmp_path):
  params = tiny_params(seed=4)
  path = str(tmp_path / "q8.gguf")
  report = gio.export_gguf(path, TINY, params, types={r".*": "Q8_0"})
  kinds = {r.name: (r.gguf_type, r.how) for r in report}
  assert kinds["token_embd.weight"] == ("Q8_0", "quantized")
  assert kinds["blk.0.ffn_norm.weight"] == ("F32", "float")  # norms stay F32
  _, imported, _, info = gio.import_gguf(path, tokenizer=False)
  emb = nnx.to_pure_dict(imported)["embed"]["embedding"]
  assert isinstance(emb, qj.QArray) and emb.fmt.group_axis == 1 and emb.shape == (96, 64)
  want = np.asarray(dict(rules_lib.tree_leaves_with_paths(params))["embed/embedding"])
  np.testing.assert_allclose(np.asarray(emb.dequantize()), want, atol=np.abs(want).max() / 100)


def test_bad_inputs_are_clear_and_leave_no_file(tmp_path):
  params = tiny_params(seed=5)
  out = tmp_path / "bad.gguf"
  with pytest.raises(gio.GGUFError, match="unknown GGUF type 'Q3_X'"):
    gio.export_gguf(out, TINY, params, types={"down_proj": "Q3_X"})
  assert not out.exists()
  odd = llama.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=1,
                          num_heads=4, num_kv_heads=2, head_dim=12, name="odd")
  with pytest.raises(gio.GGUFError, match=r"blk\.0\.ffn_down\.weight .* as Q4_0: its rows hold "
                     r"80 values .* types that fit rows of 80: none"):
    gio.export_gguf(out, odd, tiny_params(odd), types={"down_proj": "Q4_0"})
  with pytest.raises(gio.GGUFError, match="LlamaConfig"):
    gio.export_gguf(out, {"hidden_size": 64}, params)
  with pytest.raises(gio.GGUFError, match="no leaf final_norm/scale"):
    gio.export_gguf(out, TINY, {"embed": params["embed"]})
  assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
  # A failed export does not touch an existing file.
  good = tmp_path / "good.gguf"
  gio.export_gguf(good, TINY, params)
  before = good.read_bytes()
  with pytest.raises(gio.GGUFError):
    gio.export_gguf(good, TINY, params, types={"down_proj": "Q9"})
  assert good.read_bytes() == before

  # Damaged files.
  trunc = tmp_path / "trunc.gguf"
  trunc.write_bytes(before[: len(before) // 2])
  with pytest.raises(load.GGUFError, match="truncated"):
    gio.import_gguf(trunc, tokenizer=False)
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(load.GGUFError, match="not a GGUF file"):
    gio.import_gguf(junk, tokenizer=False)
  with pytest.raises(gio.GGUFError, match="blocks"):
    gio.unpack_blocks(np.zeros((1, 33), np.uint8), "Q4_0")
  with pytest.raises(gio.GGUFError, match="unknown GGUF block type"):
    gio.block_format("Q2_Z")


def test_signed_max_calibration_reproduces_llamacpp_q4_0():
  # gguf-py's numpy port of llama.cpp's quantize_row_q4_0: the signed extreme maps to -8.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 256)).astype(np.float32)
  ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
  q = qj.quantize(jnp.asarray(x.T), "q4_0", calibration="signed_max")
  ours = gio.qarray_to_blocks(q, "Q4_0", 0)
  # Equal but for rare ties (we round half to even on fp16-rounded scales).
  assert (ref == ours).mean() > 0.99
  minmax = qj.quantize(jnp.asarray(x.T), "q4_0", calibration="minmax").dequantize()
  # "auto", the default, is the same rule for a signed symmetric format.
  np.testing.assert_array_equal(np.asarray(qj.quantize(jnp.asarray(x.T), "q4_0").dequantize()),
                                np.asarray(q.dequantize()))
  err = lambda d: float(np.abs(np.asarray(d).T - x).mean())  # noqa: E731
  assert err(q.dequantize()) < 0.9 * err(minmax)
  with pytest.raises(ValueError, match="signed symmetric integer"):
    qj.quantize(jnp.asarray(x), "q4_1", calibration="signed_max")


@pytest.mark.requires_extra("hf")
def test_tokenizer_metadata_built_from_hugging_face_matches_the_gguf(tmp_path):
  src = load.smollm2_path()
  tok = load.load_tokenizer(src)  # a transformers fast tokenizer
  path = tmp_path / "hf_tok.gguf"
  with pytest.raises(gio.GGUFError, match="49152 tokens but the model's vocabulary"):
    gio.export_gguf(path, TINY, tiny_params(), tokenizer=tok)  # llama.cpp would refuse it
  assert not os.path.exists(path) and os.listdir(tmp_path) == []
  cfg = dataclasses.replace(TINY, vocab_size=len(tok))
  gio.export_gguf(path, cfg, tiny_params(cfg), tokenizer=tok)
  ours = gguf.GGUFReader(str(path)).fields
  theirs = gguf.GGUFReader(src).fields
  assert ours["tokenizer.ggml.model"].contents() == "gpt2"
  assert ours["tokenizer.ggml.tokens"].contents() == theirs["tokenizer.ggml.tokens"].contents()
  assert ours["tokenizer.ggml.merges"].contents() == theirs["tokenizer.ggml.merges"].contents()
  assert ours["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
