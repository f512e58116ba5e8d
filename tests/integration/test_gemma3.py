"""Gemma 3 270M (the packaged Q4_K_M GGUF): parity with transformers, the protocol with
BOS, quantized import, and exports that llama.cpp runs.

CI scores `WINDOWS` of the protocol's 32 windows (each window is BOS + 512
tokens); the full-protocol figures come from `experiments/gemma3_parity.py`
(docs/models.md, "Gemma 3 270M").
"""

import dataclasses
import os
import re

import numpy as np
import pytest

from quantjax.eval import data as data_lib
from quantjax.eval import llamacpp
from quantjax.eval import memory
from quantjax.eval import perplexity as ppl_lib
from quantjax.io import gguf as gio
from quantjax.models import gemma3
from quantjax.models import load

WINDOWS = 2
GPTQ_LAYERS = 4
GPTQ_TARGETS = r"layers/[0-3]/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"
# Measured on all 32 windows (experiments/gemma3_parity.py): transformers FP32.
TRANSFORMERS_FULL_PPL_BOS = 10.787
TRANSFORMERS_FULL_PPL_NO_BOS = 28.958


@pytest.fixture(scope="module")
def gemma():
  """(config, FP32 params, tokenizer) from the packaged GGUF, dequantized."""
  return load.load_gemma3()


@pytest.fixture(scope="module")
def split(gemma):
  return data_lib.load_split(gemma[2])


@pytest.fixture(scope="module")
def sub(split):
  """The last `WINDOWS` evaluation windows, as a split (BOS kept)."""
  return dataclasses.replace(split, eval_windows=split.eval_windows[-WINDOWS:],
                             protocol=data_lib.Protocol(eval_tokens=512 * WINDOWS))


@pytest.fixture(scope="module")
def hf_gemma():
  import torch
  import transformers
  path = load.gemma3_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()


def _jax_ppl(cfg, params, sub):
  return ppl_lib.evaluate(cfg, params, sub, progress=False, batch_size=1,
                          nll_fn=gemma3.window_nll_fn(cfg, params))


def test_packaged_file_config_and_protocol(gemma, split):
  cfg, _, tok = gemma
  path = load.gemma3_path()
  assert os.path.basename(path) == "gemma-3-270m-q4_k_m.gguf"
  assert "site-packages" not in path and os.path.getsize(path) == 253_113_024
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.vocab_size, cfg.intermediate_size, cfg.sliding_window) == (
              18, 640, 4, 1, 256, 262144, 2048, 512)
  assert cfg.layer_types.count(gemma3.GLOBAL) == 3 and cfg.layer_types[5] == gemma3.GLOBAL
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)
  assert cfg.tie_embeddings and cfg.bos_token_id == 2
  # Gemma's tokenizer adds BOS: the protocol puts it in front of every window.
  assert data_lib.tokenizer_bos(tok) == 2 and split.bos_token_id == 2
  assert split.model_inputs().shape == (32, 513) and split.record()["predicted_tokens"] == 32 * 511


def test_logits_parity_one_window(gemma, split, hf_gemma):
  import torch
  cfg, params, _ = gemma
  window = split.model_inputs()[:1]
  ours = np.asarray(gemma3.forward(cfg, params, window))
  with torch.no_grad():
    ref = hf_gemma(torch.as_tensor(window, dtype=torch.long)).logits.float().numpy()
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  print(f"max |logits diff| / max |logit| = {rel:.3g} (max |logit| {np.abs(ref).max():.1f})")
  assert rel <= 1e-3
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.999


def test_perplexity_matches_transformers(gemma, sub, hf_gemma):
  from tests.integration.conftest import torch_nll_fn
  cfg, params, _ = gemma
  ours = _jax_ppl(cfg, params, sub)
  ref = ppl_lib.evaluate(None, None, sub, progress=False, batch_size=1,
                         nll_fn=torch_nll_fn(hf_gemma))
  print(f"perplexity (last {WINDOWS} windows, BOS): JAX {ours['perplexity']:.5f}, "
        f"transformers {ref['perplexity']:.5f}")
  assert ours["scored_tokens"] == WINDOWS * 511 and ours["bos"] is True
  assert abs(ours["perplexity"] / ref["perplexity"] - 1) < 1e-3
  np.testing.assert_allclose(ours["per_window_nll"], ref["per_window_nll"], rtol=1e-3)
  assert 0.5 * TRANSFORMERS_FULL_PPL_BOS < ours["perplexity"] < 2 * TRANSFORMERS_FULL_PPL_BOS
  # Without BOS the same tokens score far worse (28.958 vs 10.787 on all 32 windows).
  no_bos = _jax_ppl(cfg, params, dataclasses.replace(sub, bos_token_id=None))
  assert no_bos["scored_tokens"] == ours["scored_tokens"] and no_bos["bos"] is False
  assert no_bos["perplexity"] > 1.5 * ours["perplexity"]


def test_quantized_import_keeps_q5_0_and_q8_0(gemma, sub):
  cfg, params, _ = gemma
  cfg_q, q, _, info = gio.import_gguf(load.gemma3_path(), tokenizer=False)
  kinds = {}
  for kind, how in info.values():
    kinds.setdefault(kind, set()).add(how)
  assert kinds == {"Q5_0": {"qarray"}, "Q8_0": {"qarray"}, "Q4_K": {"dequantized"},
                   "Q6_K": {"dequantized"}, "F32": {"float"}}
  assert info["token_embd.weight"] == ("Q8_0", "qarray")
  # The embedding (63% of the parameters) stays at its 8.5 bits per value.
  assert memory.tree_bytes(q) < 0.45 * memory.tree_bytes(params)
  w = sub.model_inputs()[:1, :128]
  a = np.asarray(gemma3.forward(cfg_q, q, w))
  b = np.asarray(gemma3.forward(cfg, params, w))
  np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())


def test_greedy_generation_matches_transformers(gemma, hf_gemma):
  import torch
  cfg, params, tok = gemma
  prompt = tok("The Python language reference says that a for statement")["input_ids"]
  assert prompt[0] == 2
  ours = gemma3.generate(cfg, params, np.asarray([prompt]), 12)
  with torch.no_grad():
    ref = hf_gemma.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)
  ref = ref[0].numpy()  # transformers may stop early at EOS
  assert len(ref) > len(prompt)
  np.testing.assert_array_equal(ours[0, :len(ref)], ref)
  print("generated:", tok.decode(ours[0, len(prompt):]))


# ----------------------------------------------------------------------------
# llama.cpp runs our exports.


@pytest.fixture(scope="module")
def gptq_q4_0(gemma, split):
  """GPTQ W4 in Q4_0's format (group 32, fp16 scales) through the generic calibration,
  on 4 calibration windows (BOS in front, as the model sees text), on the first
  `GPTQ_LAYERS` blocks (the export rounds the others to Q4_0: the same check as
  GPTQ on all 18 at a fraction of the CI time)."""
  from quantjax import methods
  from quantjax.rules import QuantRule
  cfg, params, _ = gemma
  rules = [QuantRule(module_path=GPTQ_TARGETS, format="q4_0")]
  batches = [split.model_inputs(split.calib_windows[:4])]
  return methods.calibrate(gemma3.forward_fn(cfg), params, batches, rules, methods.GPTQ(),
                           progress=False).params


@pytest.mark.parametrize("kind", ["F16", "Q8_0", "rtn_Q4_0", "gptq_Q4_0"])
def test_llamacpp_perplexity_matches_jax(kind, tmp_path, gemma, sub, request):
  cfg, params, _ = gemma
  src = load.gemma3_path()
  out = tmp_path / f"{kind}.gguf"
  if kind == "F16":
    report = gio.export_gguf(out, cfg, params, tokenizer=src, float_type="F16")
  elif kind == "Q8_0":
    report = gio.export_gguf(out, cfg, params, tokenizer=src, types={".*": "Q8_0"})
  elif kind == "rtn_Q4_0":
    report = gio.export_gguf(out, cfg, params, tokenizer=src,
                             types={"embed/embedding": "Q8_0", gemma3.PROJ_KERNELS: "Q4_0"})
  else:
    report = gio.export_gguf(out, cfg, request.getfixturevalue("gptq_q4_0"), tokenizer=src,
                             types={"embed/embedding": "Q8_0", gemma3.PROJ_KERNELS: "Q4_0"})
    gptq_rows = [r for r in report if re.fullmatch(GPTQ_TARGETS, r.path)]
    assert len(gptq_rows) == 7 * GPTQ_LAYERS
    assert {r.how for r in gptq_rows} == {"lossless"}  # GPTQ's codes are the file's
  assert len(report) == 2 + 13 * cfg.num_layers
  # The JAX model runs the file's own weights (imported without dequantizing).
  cfg2, imported, _, _ = gio.import_gguf(out, tokenizer=False)
  want = _jax_ppl(cfg2, imported, sub)["perplexity"]
  got = llamacpp.perplexity(out, sub.model_inputs(), n_threads=2, skip=sub.skip)
  print(f"{kind}: llama.cpp {got['perplexity']:.4f}, JAX {want:.4f}")
  assert got["tokens"] == WINDOWS * 511
  assert abs(got["perplexity"] / want - 1) < 0.01, (kind, got["perplexity"], want)


def test_greedy_generation_identical_for_q8_0(tmp_path, gemma):
  cfg, params, tok = gemma
  out = tmp_path / "q8.gguf"
  gio.export_gguf(out, cfg, params, tokenizer=load.gemma3_path(), types={".*": "Q8_0"})
  cfg2, imported, _, _ = gio.import_gguf(out, tokenizer=False)
  prompt = tok("The capital of France is")["input_ids"]
  ours = [int(t) for t in gemma3.generate(cfg2, imported, np.asarray([prompt]), 32)[0, -32:]]
  theirs = llamacpp.greedy(out, prompt, 32)
  assert ours == theirs, (tok.decode(ours), tok.decode(theirs))


def test_runner_takes_gemma3(tmp_path, gemma, monkeypatch):
  """`--config.model.source=gemma3` through the experiment runner (configs/gemma3.py's
  entries, one window): the protocol puts BOS in front, a quantized row and a GGUF row
  that llama.cpp and JAX score on the same file."""
  from configs import gemma3 as gemma3_config
  from experiments import pipeline
  cached = {load.gemma3_path(): gemma}
  real = load.load_gguf
  monkeypatch.setattr(load, "load_gguf", lambda p, **kw: cached.get(p) or real(p, **kw))
  c = gemma3_config.get_config("fp32,rtn_w4_g64,gguf_q8_0")
  c.eval.tokens = 512
  c.eval.progress = False
  c.calib.windows = 0
  fp32, rtn, q8 = pipeline.run(c, str(tmp_path / "w"))
  assert [r["entry"] for r in (fp32, rtn, q8)] == ["fp32", "rtn_w4_g64", "gguf_q8_0"]
  assert all(r["bos"] and r["scored_tokens"] == 511 for r in (fp32, rtn, q8))
  assert fp32["model"].startswith("Gemma-3-270M")
  assert rtn["perplexity"] > fp32["perplexity"] and rtn["params_bytes"] < fp32["params_bytes"]
  assert q8["runtime"] == "llama.cpp" and q8["tensor_types"] == {"Q8_0": 1 + 7 * 18}
  assert abs(q8["perplexity"] / q8["jax_perplexity"] - 1) < 0.01
  assert abs(q8["perplexity"] / fp32["perplexity"] - 1) < 0.02
