"""GGUF interop on SmolLM2-135M, checked by llama.cpp itself (llama-cpp-python).

CI scores the first `WINDOWS` evaluation windows of the protocol (llama.cpp
runs at about 4 s per 512-token window on 2 cores); the README's figures use
all 32 (experiments/gguf_eval.py).
"""

import re

import numpy as np
import pytest

from quantjax import rules as rules_lib
from quantjax.eval import data as data_lib
from quantjax.eval import llamacpp
from quantjax.eval import memory
from quantjax.eval import perplexity as ppl_lib
from quantjax.io import gguf as gio
from quantjax.models import llama
from quantjax.models import load

WINDOWS = 4
TARGETS = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"
GPTQ_LAYERS = 6
GPTQ_TARGETS = r"layers/[0-5]/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"


@pytest.fixture(scope="module")
def windows(smollm2_split):
  return np.asarray(smollm2_split.eval_windows[:WINDOWS])


def _jax_ppl(cfg, params, windows):
  sub = data_lib.make_split(windows.reshape(-1),
                            data_lib.Protocol(eval_tokens=windows.size, calib_windows=0))
  return ppl_lib.evaluate(llama.forward_fn(cfg), params, sub, progress=False)["perplexity"]


def test_shipped_q4_1_imports_at_its_size_and_reexports_byte_identical(tmp_path, smollm2):
  import gguf
  src = load.smollm2_path()
  cfg, params, _, info = gio.import_gguf(src, tokenizer=False)
  assert {v for v in info.values()} == {("Q4_1", "qarray"), ("Q8_0", "qarray"), ("F32", "float")}
  file_bytes = gio.file_tensor_bytes(src)
  assert abs(memory.tree_bytes(params) - file_bytes) <= 0.03 * file_bytes
  # Same values as the dequantizing loader: the model is the same model.
  flat_q = dict(rules_lib.tree_leaves_with_paths(params))
  flat_f = dict(rules_lib.tree_leaves_with_paths(smollm2[1]))
  for p in ("layers/7/attn/q_proj/kernel", "layers/7/attn/k_proj/kernel", "embed/embedding"):
    np.testing.assert_array_equal(np.asarray(flat_q[p].dequantize()), np.asarray(flat_f[p]))
  out = tmp_path / "roundtrip.gguf"
  report = gio.export_gguf(out, cfg, params, tokenizer=src)
  assert {r.how for r in report if r.gguf_type != "F32"} == {"lossless"}
  a = {t.name: t for t in gguf.GGUFReader(src).tensors}
  for t in gguf.GGUFReader(str(out)).tensors:
    assert t.tensor_type == a[t.name].tensor_type
    assert np.array_equal(np.asarray(t.data).view(np.uint8),
                          np.asarray(a[t.name].data).view(np.uint8)), t.name


@pytest.fixture(scope="module")
def gptq_q4_0(smollm2, smollm2_split):
  """GPTQ W4 in Q4_0's own format (group 32, fp16 scales) on the first `GPTQ_LAYERS`
  blocks, 4 calibration windows; the other blocks stay float (the export rounds them
  to Q4_0). GPTQ on all 30 blocks gives the same check at 5x the CI time."""
  from quantjax import methods
  from quantjax.models import llama
  from quantjax.rules import QuantRule
  cfg, params, _ = smollm2
  rules = [QuantRule(module_path=GPTQ_TARGETS, format="q4_0")]
  return methods.calibrate(llama.forward_fn(cfg), params,
                           [np.asarray(smollm2_split.calib_windows[:4])], rules,
                           methods.GPTQ(), progress=False).params


@pytest.mark.parametrize("kind", ["F16", "Q8_0", "Q4_0", "gptq_Q4_0"])
def test_llamacpp_perplexity_matches_jax(kind, tmp_path, smollm2, windows, request):
  cfg, params, _ = smollm2
  src = load.smollm2_path()
  out = tmp_path / f"{kind}.gguf"
  if kind == "F16":
    report = gio.export_gguf(out, cfg, params, tokenizer=src, float_type="F16")
  elif kind == "gptq_Q4_0":
    report = gio.export_gguf(out, cfg, request.getfixturevalue("gptq_q4_0"), tokenizer=src,
                             types={"embed/embedding": "Q8_0", TARGETS: "Q4_0"})
    gptq_rows = [r for r in report if re.fullmatch(GPTQ_TARGETS, r.path)]
    assert len(gptq_rows) == 7 * GPTQ_LAYERS
    assert {r.how for r in gptq_rows} == {"lossless"}  # GPTQ's codes are the file's
  else:
    report = gio.export_gguf(out, cfg, params, tokenizer=src,
                             types={"embed/embedding": "Q8_0", TARGETS: kind})
  # The JAX model runs the file's own weights (imported without dequantizing).
  cfg2, imported, _, _ = gio.import_gguf(out, tokenizer=False)
  want = _jax_ppl(cfg2, imported, windows)
  got = llamacpp.perplexity(out, windows, n_threads=2)
  assert got["tokens"] == windows.size - len(windows)
  assert abs(got["perplexity"] / want - 1) < 0.01, (kind, got["perplexity"], want)
  assert len(report) == 2 + 9 * cfg.num_layers + (0 if cfg.tie_embeddings else 1)


def test_greedy_generation_identical_for_q8_0(tmp_path, smollm2):
  import jax.numpy as jnp

  from quantjax.models import llama
  cfg, params, tok = smollm2
  src = load.smollm2_path()
  out = tmp_path / "q8.gguf"
  gio.export_gguf(out, cfg, params, tokenizer=src, types={".*": "Q8_0"})
  cfg2, imported, _, _ = gio.import_gguf(out, tokenizer=False)
  prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
  ours = np.asarray(llama.generate(cfg2, imported, jnp.asarray([prompt]), 32))[0]
  ours = [int(t) for t in ours[-32:]]
  theirs = llamacpp.greedy(out, prompt, 32)
  assert ours == theirs, (tok.decode(ours), tok.decode(theirs))


def test_files_quantized_by_llamacpp_import_and_agree(tmp_path, smollm2, windows):
  cfg, params, _ = smollm2
  src = load.smollm2_path()
  f16 = tmp_path / "f16.gguf"
  gio.export_gguf(f16, cfg, params, tokenizer=src, float_type="F16")
  q40 = tmp_path / "llamacpp-q4_0.gguf"
  llamacpp.quantize(f16, q40, "Q4_0")
  cfg2, imported, _, info = gio.import_gguf(q40, tokenizer=False)
  kinds = {k for k, _ in info.values()}
  assert "Q4_0" in kinds and all(h != "dequantized" or k not in gio.BLOCK_TYPES
                                 for k, h in info.values())
  # Imported at the file's size: block types stay QArrays.
  assert abs(memory.tree_bytes(imported) / gio.file_tensor_bytes(q40) - 1) < 0.03
  got = llamacpp.perplexity(q40, windows[:2], n_threads=2)["perplexity"]
  want = _jax_ppl(cfg2, imported, windows[:2])
  assert abs(got / want - 1) < 0.01, (got, want)
  with pytest.raises(ValueError, match="unknown llama.cpp file type"):
    llamacpp.quantize(f16, tmp_path / "x.gguf", "Q9_9")


def test_k_quant_export_matches_llamacpps_own_q4_k_m(tmp_path, smollm2, windows):
  """quantjax's encoders given llama.cpp Q4_K_M's per-tensor types (Q4_K/Q6_K on the
  1536-wide ffn_down rows, Q5_0/Q8_0 fallbacks elsewhere) score like llama.cpp's file."""
  cfg, params, _ = smollm2
  src = load.smollm2_path()
  f32 = tmp_path / "f32.gguf"
  gio.export_gguf(f32, cfg, params, tokenizer=src, float_type="F32")
  theirs = tmp_path / "llamacpp-q4_k_m.gguf"
  llamacpp.quantize(f32, theirs, "Q4_K_M")
  f32.unlink()
  rules = gio.type_rules(theirs)
  assert {"Q4_K", "Q6_K"} <= {t for _, t in rules}
  ours = tmp_path / "quantjax-q4_k_m-mix.gguf"
  report = gio.export_gguf(ours, cfg, params, tokenizer=src, types=rules)
  assert {r.gguf_type for r in report if "ffn_down" in r.name} <= {"Q4_K", "Q6_K"}
  import gguf
  assert ({t.name: t.tensor_type for t in gguf.GGUFReader(str(ours)).tensors} ==
          {t.name: t.tensor_type for t in gguf.GGUFReader(str(theirs)).tensors})
  got = llamacpp.perplexity(ours, windows[:2], n_threads=2)["perplexity"]
  want = llamacpp.perplexity(theirs, windows[:2], n_threads=2)["perplexity"]
  assert got <= 1.01 * want, (got, want)


def test_streamed_gguf_runs_in_llamacpp(tmp_path, smollm2, smollm2_split, windows):
  """SmolLM2 as a BF16 Hugging Face checkpoint, compressed by `compress_streaming` layer by
  layer straight to GGUF (GPTQ in Q4_0's format on the first `GPTQ_LAYERS` blocks, the
  tokenizer copied from the shipped file): llama.cpp loads it and scores it as the JAX
  model scores the same file."""
  from quantjax import methods, streaming
  from quantjax.io import hf
  from quantjax.rules import QuantRule
  cfg, params, _ = smollm2
  hf.export_hf(tmp_path / "bf16", cfg, params, dtype="bfloat16")
  out = tmp_path / "streamed.gguf"
  res = streaming.compress_streaming(
      tmp_path / "bf16", out, [np.asarray(smollm2_split.calib_windows[:4])],
      [QuantRule(module_path=GPTQ_TARGETS, format="q4_0")], methods.GPTQ(),
      gguf_types={"embed/embedding": "Q8_0", TARGETS: "Q4_0"}, tokenizer=load.smollm2_path(),
      progress=False)
  gptq_rows = [r for r in res.report if re.fullmatch(GPTQ_TARGETS, r.path)]
  assert len(gptq_rows) == 7 * GPTQ_LAYERS and {r.how for r in gptq_rows} == {"lossless"}
  cfg2, imported, _, _ = gio.import_gguf(out, tokenizer=False)
  want = _jax_ppl(cfg2, imported, windows[:2])
  got = llamacpp.perplexity(out, windows[:2], n_threads=2)["perplexity"]
  assert abs(got / want - 1) < 0.01, (got, want)
  assert want < 1.5 * _jax_ppl(cfg, params, windows[:2])  # a working model, not noise
