"""SmolLM2-135M exported as compressed-tensors, loaded by transformers, scored on few windows.

The full-protocol figures (32 windows, GPTQ, llm-compressor) come from
`experiments/hf_interop.py`; here every exported scheme is checked on two
evaluation windows: transformers' perplexity of the directory equals the JAX
model's on the same weights within 0.5%, the re-imported directory scores
exactly what the in-memory params score, and greedy decoding of the int8
export gives the same 32 tokens in both runtimes. int4 codes come from RTN
here (GPTQ writes the same format; its calibration would take minutes).
"""

import dataclasses
import os

import numpy as np
import pytest

from quantjax.eval import data
from quantjax.eval import perplexity
from quantjax.io import hf
from quantjax.models import llama
from quantjax.models import load
from quantjax.rules import QuantRule
from quantjax.transforms import quantize_params
from experiments.hf_interop import ct_rule_quantize_activation
from tests.integration.conftest import torch_nll_fn

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

CASES = {
    # name: (rule kwargs, transformers CompressedTensorsConfig kwargs)
    "rtn_int8": (dict(format="int8"), {}),
    "int4_g64_sym": (dict(format="int4_g64"), {}),
    # transformers' default path refuses asymmetric pack-quantized files (the meta model's zero
    # point stays unpacked in compressed-tensors 0.19); dequantize=True reads them.
    "int4_g64_asym": (dict(format="int4_g64_asym"), {"dequantize": True}),
    "w8a8_dynamic": (dict(format="int8", act_format="int8"), {}),
}


@pytest.fixture(scope="module")
def two_windows(smollm2_split):
  ev = smollm2_split.eval_windows[-2:]
  return dataclasses.replace(smollm2_split, eval_windows=ev,
                             protocol=data.Protocol(eval_tokens=int(ev.size)))


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_scores_our_export(smollm2, two_windows, tmp_path, monkeypatch, name):
  cfg, params, _ = smollm2
  rule, ct_kwargs = CASES[name]
  q = quantize_params(params, [QuantRule(module_path=llama.PROJ_KERNELS, **rule)])
  d = tmp_path / name
  rep = hf.export_hf(d, cfg, q, tokenizer=load.smollm2_path())
  assert {r.how for r in rep} == {"lossless", "float"}, rep.summary()
  assert "tokenizer.json" in os.listdir(d)
  ours = perplexity.evaluate(llama.forward_fn(cfg), q, two_windows, progress=False)["perplexity"]
  cfg2, p2, tok2, _ = hf.import_hf(d)
  assert perplexity.evaluate(llama.forward_fn(cfg2), p2, two_windows, progress=False)["perplexity"] == ours
  kw = {}
  if ct_kwargs:
    kw["quantization_config"] = transformers.CompressedTensorsConfig(**ct_kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
  theirs = perplexity.evaluate(None, None, two_windows, progress=False, batch_size=2,
                               nll_fn=torch_nll_fn(model))["perplexity"]
  print(f"{name}: perplexity (2 windows) JAX {ours:.5f}, transformers {theirs:.5f}")
  if name == "w8a8_dynamic":
    # Same weights and the same activation rule: within 1%, and closer than with each
    # runtime's own rule (127 here and in vLLM, 127.5 in transformers).
    import jax
    from quantjax import ops
    jax.clear_caches()
    monkeypatch.setattr(ops, "quantize_activation", ct_rule_quantize_activation)
    same_rule = perplexity.evaluate(llama.forward_fn(cfg), q, two_windows, progress=False)["perplexity"]
    monkeypatch.undo()
    jax.clear_caches()
    print(f"{name}: JAX with transformers' activation rule {same_rule:.5f}")
    # The rest is float summation order moving activations across int8 rounding ties over
    # 30 layers, and it depends on the CPU. Measured (own rule / transformers' rule /
    # transformers): on an Intel Sapphire Rapids 13.735 / 13.798 / 13.861 (0.46% apart); at
    # the same code on an AMD EPYC 13.825 / 13.774 / 13.663 (0.81% apart).
    assert abs(theirs / same_rule - 1) < 1e-2
    assert abs(theirs / same_rule - 1) < abs(theirs / ours - 1)
    assert abs(theirs / ours - 1) < 2e-2
  else:
    assert abs(theirs / ours - 1) < 5e-3
  if name == "rtn_int8":
    prompt = np.asarray(two_windows.eval_windows[0, :64])
    jax_tokens = llama.generate(cfg, q, prompt, 32)[0, 64:].tolist()
    with torch.no_grad():
      out = model.generate(torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=32,
                           min_new_tokens=32, do_sample=False)
    assert out[0, 64:].tolist() == jax_tokens
    # the exported tokenizer is the model's
    text = "Return the value of x."
    assert tok2(text)["input_ids"] == load.load_tokenizer(load.smollm2_path())(text)["input_ids"]
