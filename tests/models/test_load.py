"""GGUF and Hugging Face loading: dequantizers, permutation, errors."""

import os
import shutil
import types

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantjax.models import llama
from quantjax.models import load
from tests.models.conftest import write_tiny_gguf


@pytest.mark.parametrize("qtype,ours", [
    (T.Q8_0, load.dequantize_q8_0),
    (T.Q4_0, load.dequantize_q4_0),
    (T.Q4_1, load.dequantize_q4_1),
])
def test_block_dequantizers_match_gguf_py(qtype, ours, rng):
  x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 3.0, (6, 1))).astype(np.float32)
  x[0, :32] += 5.0  # a block with an offset (Q4_1's minimum)
  raw = gguf.quants.quantize(x, qtype)
  ref = gguf.quants.dequantize(raw, qtype)
  got = ours(raw)
  assert got.shape == x.shape
  np.testing.assert_array_equal(got, ref)
  # and the round trip is close to the input (the dequantizer is not a no-op)
  tol = 0.02 if qtype == T.Q8_0 else 0.5
  assert np.abs(got - x).max() < tol * np.abs(x).max()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_k_quants_via_gguf_py(qtype, rng):
  # gguf-py cannot quantize k-quants; feed random blocks with sane fp16 scales.
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, size=(3, size * 2), dtype=np.uint8)
  blocks = raw.reshape(-1, size)
  # Q4_K starts with fp16 d, dmin; Q6_K ends with fp16 d: make them finite.
  half = np.array([0.01], np.float16).view(np.uint8)
  if qtype == T.Q4_K:
    blocks[:, 0:2] = half
    blocks[:, 2:4] = half
  else:
    blocks[:, -2:] = half
  t = types.SimpleNamespace(name="w", tensor_type=qtype, data=raw,
                            shape=np.array([block * 2, 3]))
  got = load.dequantize_gguf_tensor(t)
  assert got.shape == (3, block * 2) and got.dtype == np.float32
  np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype).reshape(3, -1))
  assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_unsupported_tensor_type_is_named():
  t = types.SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=T.IQ2_XXS,
                            data=np.zeros((1, 66), np.uint8), shape=np.array([256, 1]))
  with pytest.raises(load.GGUFError, match="IQ2_XXS.*blk.0.attn_q.weight"):
    load.dequantize_gguf_tensor(t)


def test_unpermute_inverts_llama_cpp_permutation(rng):
  from tests.models.conftest import _permute
  w = rng.standard_normal((12, 5)).astype(np.float32)
  for heads in (1, 2, 3):
    np.testing.assert_array_equal(load.unpermute_qk(_permute(w, heads), heads), w)
  assert not np.array_equal(_permute(w, 2), w)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_gguf_matches_hf_directory(tiny_hf, tmp_path, tiny_tokens, qtype):
  directory, torch_model, tied = tiny_hf
  path = tmp_path / f"tiny-{qtype}.gguf"
  stored = write_tiny_gguf(path, torch_model, qtype=qtype)
  cfg_g, params_g, tok = load.load_gguf(path, tokenizer=False)
  cfg_h, params_h, _ = load.load_hf(directory, tokenizer=False)
  assert tok is None
  assert cfg_g.tie_embeddings == tied
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "rope_theta"):
    assert getattr(cfg_g, f) == getattr(cfg_h, f), f
  np.testing.assert_allclose(cfg_g.rms_norm_eps, cfg_h.rms_norm_eps, rtol=1e-6)
  # Exactly what gguf-py dequantizes, un-permuted and transposed to [in, out].
  from tests.models.conftest import _permute
  q = np.asarray(params_g["layers"][1]["attn"]["q_proj"]["kernel"][...])
  np.testing.assert_array_equal(
      _permute(q.T, cfg_g.num_heads), stored["blk.1.attn_q.weight"])
  k = np.asarray(params_g["layers"][0]["attn"]["k_proj"]["kernel"][...])
  np.testing.assert_array_equal(_permute(k.T, cfg_g.num_kv_heads), stored["blk.0.attn_k.weight"])
  logits_g = np.asarray(llama.forward(cfg_g, params_g, tiny_tokens))
  logits_h = np.asarray(llama.forward(cfg_h, params_h, tiny_tokens))
  tol = {"F32": 1e-5, "F16": 2e-3, "Q8_0": 2e-2, "Q4_1": 0.3}[qtype]
  np.testing.assert_allclose(logits_g, logits_h, atol=tol * np.abs(logits_h).max())


def test_missing_gguf_names_path(tmp_path):
  p = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    load.load_gguf(p)


def test_truncated_gguf_names_path(tiny_hf, tmp_path):
  _, torch_model, _ = tiny_hf
  path = tmp_path / "full.gguf"
  write_tiny_gguf(path, torch_model, qtype="F32")
  data = path.read_bytes()
  for cut in (len(data) - 100, len(data) // 2, 40, 3):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(load.GGUFError, match=f"cut{cut}.gguf"):
      load.load_gguf(bad, tokenizer=False)


def test_not_a_gguf(tmp_path):
  bad = tmp_path / "text.gguf"
  bad.write_text("hello world, this is not a gguf file at all" * 10)
  with pytest.raises(load.GGUFError, match="text.gguf"):
    load.load_gguf(bad, tokenizer=False)


def test_unsupported_architecture_is_named(tiny_hf, tmp_path):
  _, torch_model, _ = tiny_hf
  path = tmp_path / "gpt2.gguf"
  write_tiny_gguf(path, torch_model, qtype="F32", arch="gpt2")
  with pytest.raises(load.GGUFError, match="'gpt2'"):
    load.load_gguf(path, tokenizer=False)


def test_hf_directory_errors(tiny_hf, tmp_path):
  directory, _, _ = tiny_hf
  with pytest.raises(FileNotFoundError, match="config.json"):
    load.load_hf(tmp_path)
  d = tmp_path / "no_weights"
  d.mkdir()
  shutil.copy(os.path.join(directory, "config.json"), d / "config.json")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load.load_hf(d)


def test_smollm2_path_exists():
  p = load.smollm2_path()
  assert p.endswith(load.SMOLLM2_FILE) and os.path.getsize(p) > 90_000_000
