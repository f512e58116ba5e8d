"""GGUF and Hugging Face loading: agreement between formats, errors."""

import os
import shutil

import numpy as np
import pytest

from quantjax.models import llama
from quantjax.models import load
from tests.models.conftest import write_tiny_gguf


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
