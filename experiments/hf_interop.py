"""SmolLM2 out to compressed-tensors and back, scored by JAX and by transformers.

    make peers   # once, for the llm-compressor row
    flock /tmp/quantjax-heavy.lock python -m experiments.hf_interop --out=runs/hf_interop

On the perplexity protocol (`quantjax.eval.data`: the last 32 windows of 512
tokens; calibration: `--calib_windows` windows of 512 drawn before them,
seed 0), SmolLM2-135M-Instruct (FP32 from the shipped Q4_1 GGUF):

* ours: RTN int8 per channel (W8A16), GPTQ W4 g64 symmetric and asymmetric
  (act-order, sequential capture driver), W8A8 RTN with dynamic per-token
  int8 activations, and SmoothQuant (alpha 0.8, folded) W8 + static
  per-tensor A8 (min-max ranges) -- each exported with `export_hf`, then
  scored by the JAX model on the in-memory params, by the JAX model on the
  re-imported directory, and by transformers (PyTorch FP32 CPU,
  compressed-tensors) on the directory; greedy 32 tokens from both runtimes;
* llm-compressor: GPTQ W4 g64 sym act-order on the same calibration tokens
  (`experiments.llmcompressor_gptq`, its own venv), its directory imported
  into JAX (`import_hf`, QArrays of its codes) and scored by both runtimes.

transformers cannot load an asymmetric pack-quantized directory through its
default path with compressed-tensors 0.19 (the zero point of the meta-device
model is left unpacked and the checkpoint's packed one is refused as a size
mismatch, llm-compressor issue 1618); the asymmetric row is loaded with
`CompressedTensorsConfig(dequantize=True)`, transformers' documented option
that decompresses each weight at load time, and the default path's error is
recorded.

Resumable: each row's record is kept in `<out>/results.json`; `results.md`
holds the tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback

from absl import app
from absl import flags

ROWS = ("rtn_int8", "gptq_w4g64_sym", "gptq_w4g64_asym", "w8a8_dynamic", "smoothquant_w8a8_static",
        "llmcompressor_gptq_w4g64_sym")


def torch_nll_fn(model):
  """`tokens [B, T] -> NLL [B, T-1]` with a transformers model (float32)."""
  import numpy as np
  import torch

  def fn(tokens):
    with torch.no_grad():
      t = torch.as_tensor(np.array(tokens), dtype=torch.long)
      lp = torch.log_softmax(model(t).logits.float()[:, :-1], dim=-1)
      return (-lp.gather(-1, t[:, 1:, None])[..., 0]).numpy()
  return fn


def ct_rule_quantize_activation(x, fmt):
  """compressed-tensors' dynamic activation rule, which transformers runs: per-token scale
  s = max|x| / 127.5 (half the int8 range 255), codes round(x / s) clamped to [-128, 127]; a
  token's largest |x| lands on +-127.5 up to rounding, so whether it gets 127 or 128 (-> 127)
  is decided by the last bit of a float division. Ours and vLLM's kernels use max|x| / 127.

  Both divisions are IEEE divisions as torch does them: XLA rewrites a division by a broadcast
  (or a constant) into a multiplication by its reciprocal, which moves those ties; an
  optimization barrier on the materialised divisor keeps the division.
  """
  import jax
  import jax.numpy as jnp
  from quantjax.numerics import qarray
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  amax = jnp.max(jnp.abs(x2), axis=-1, keepdims=True)
  half_range = jax.lax.optimization_barrier(jnp.full_like(amax, 127.5))
  scale = jnp.where(amax > 0, amax / half_range, 1.0)
  v = x2 / jax.lax.optimization_barrier(jnp.broadcast_to(scale, x2.shape))
  codes = jnp.clip(jnp.round(v), -128, 127).astype(jnp.int8)
  return qarray.QArray.from_codes(codes, fmt.replace(channel_axis=0), scale, dtype=jnp.float32)


def load_transformers(directory: str, dequantize: bool = False):
  import torch
  import transformers
  kw = {}
  if dequantize:
    kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
  return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                           **kw).eval()


def transformers_greedy(model, prompt, n: int):
  import numpy as np
  import torch
  with torch.no_grad():
    out = model.generate(torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long),
                         max_new_tokens=n, do_sample=False, min_new_tokens=n)
  return [int(t) for t in out[0, len(prompt):]]


def main(argv):
  del argv
  import jax
  import numpy as np
  f = flags.FLAGS

  from quantjax import methods
  from quantjax.eval import data as data_lib
  from quantjax.eval import perplexity as ppl_lib
  from quantjax.eval import report as report_lib
  from quantjax.io import hf
  from quantjax.models import llama
  from quantjax.models import load as load_lib
  from quantjax.rules import QuantRule
  from quantjax.transforms import quantize_params
  from experiments import llmcompressor_gptq

  out = os.path.abspath(f.out)
  os.makedirs(out, exist_ok=True)
  res_path = os.path.join(out, "results.json")
  results = report_lib.read_json(res_path, None) or {}
  rows = [r for r in ROWS if not f.only or r in f.only]
  cfg, params, tok = load_lib.load_smollm2()
  gguf_path = load_lib.smollm2_path()
  split = data_lib.load_split(tok, protocol=data_lib.Protocol(calib_windows=f.calib_windows))
  calib = np.asarray(split.calib_windows, np.int32)
  batches = [calib[i:i + 8] for i in range(0, len(calib) - len(calib) % 8, 8)]
  ev = np.asarray(split.eval_windows[-f.eval_windows:], np.int32)
  sub = dataclasses.replace(split, eval_windows=ev, protocol=data_lib.Protocol(
      eval_tokens=int(ev.size), window=ev.shape[1], calib_windows=0))
  prompt = [int(t) for t in ev[0, :64]]
  results["protocol"] = {**sub.record(), "calib_windows": int(len(calib)),
                         "environment": ppl_lib.environment()}

  def save():
    report_lib.write_json_atomic(res_path, results)

  def score_dir(d, rec, dequantize=False):
    cfg2, p2, _, info = hf.import_hf(d, tokenizer=False)
    rec["jax_import_ppl"] = ppl_lib.evaluate(llama.forward_fn(cfg2), p2, sub, progress=False)["perplexity"]
    rec["import_qarray_modules"] = sum(1 for v in info.values() if v[1] == "qarray")
    if not dequantize:
      try:
        model = load_transformers(d)
      except Exception as e:  # noqa: BLE001 - recorded, then the documented fallback
        rec["transformers_default_load_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        dequantize = True
    if dequantize:
      model = load_transformers(d, dequantize=True)
      rec["transformers_load"] = "CompressedTensorsConfig(dequantize=True)"
    else:
      rec["transformers_load"] = "default (compressed, decompressed on first forward)"
    t0 = time.perf_counter()
    rec["transformers_ppl"] = ppl_lib.evaluate(None, None, sub, progress=False, batch_size=8,
                                               nll_fn=torch_nll_fn(model))["perplexity"]
    rec["transformers_eval_s"] = time.perf_counter() - t0
    rec["transformers_greedy"] = transformers_greedy(model, prompt, 32)
    rec["jax_import_greedy"] = [int(t) for t in
                                llama.generate(cfg2, p2, np.asarray(prompt), 32)[0, len(prompt):]]
    rec["dir_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                           if f.endswith(".safetensors"))
    del model

  proj = llama.PROJ_KERNELS
  for row in rows:
    if row in results and "transformers_ppl" in results[row]:
      print(f"[hf_interop] {row}: done", flush=True)
      continue
    print(f"[hf_interop] {row}: running", flush=True)
    rec: dict = {}
    d = os.path.join(out, row)
    try:
      if row == "llmcompressor_gptq_w4g64_sym":
        if not f.peer_python:
          continue
        if not os.path.exists(d):
          rec["llmcompressor"] = llmcompressor_gptq.run_llmcompressor(
              d, calib, source=gguf_path, group_size=64, act_order=True, batch_size=8,
              peer_python=f.peer_python)
        else:
          with open(os.path.join(d, "llmcompressor_run.json")) as f:
            rec["llmcompressor"] = json.load(f)
        rec["quantize_s"] = rec["llmcompressor"]["seconds"]
        score_dir(d, rec)
      else:
        t0 = time.perf_counter()
        if row == "rtn_int8":
          q = quantize_params(params, [QuantRule(module_path=proj, format="int8")])
        elif row == "w8a8_dynamic":
          q = quantize_params(params, [QuantRule(module_path=proj, format="int8",
                                                 act_format="int8")])
        elif row.startswith("gptq"):
          fmt = "int4_g64" if row.endswith("sym") and not row.endswith("asym") else "int4_g64_asym"
          res = methods.calibrate(llama.forward_fn(cfg), params, batches,
                                  [QuantRule(module_path=proj, format=fmt)],
                                  methods.GPTQ(act_order=True), progress=True)
          q = res.params
        else:  # smoothquant, static per-tensor activations
          res = methods.calibrate(
              llama.forward_fn(cfg), params, batches,
              [QuantRule(module_path=proj, format="int8", act_format="int8_t")],
              methods.SmoothQuant(alpha=0.8, scales_for=llama.foldable(cfg),
                                  act_observer=methods.ActObserver(method="minmax")),
              progress=True)
          q, _ = methods.fold_input_scales(res.params, llama.fold_groups(cfg))
        jax.block_until_ready(jax.tree.leaves(q))
        rec["quantize_s"] = time.perf_counter() - t0
        rec["jax_ppl"] = ppl_lib.evaluate(llama.forward_fn(cfg), q, sub, progress=False)["perplexity"]
        if row == "w8a8_dynamic":
          # the same weights with transformers' dynamic activation rule (max|x| / 127.5)
          from quantjax import ops
          real = ops.quantize_activation
          jax.clear_caches()
          ops.quantize_activation = ct_rule_quantize_activation
          try:
            rec["jax_ppl_ct_act_rule"] = ppl_lib.evaluate(llama.forward_fn(cfg), q, sub,
                                                          progress=False)["perplexity"]
          finally:
            ops.quantize_activation = real
            jax.clear_caches()
        rec["jax_greedy"] = [int(t) for t in
                             llama.generate(cfg, q, np.asarray(prompt), 32)[0, len(prompt):]]
        if os.path.exists(d):
          import shutil
          shutil.rmtree(d)
        t0 = time.perf_counter()
        rep = hf.export_hf(d, cfg, q, tokenizer=gguf_path)
        rec["export_s"] = time.perf_counter() - t0
        rec["export_summary"] = rep.summary()
        rec["export_how"] = sorted({r.how for r in rep})
        score_dir(d, rec)
    except Exception:  # noqa: BLE001 - record and go on to the next row
      rec["error"] = traceback.format_exc()[-3000:]
      print(rec["error"], flush=True)
    results[row] = rec
    save()
    print(f"[hf_interop] {row}: " + json.dumps({k: v for k, v in rec.items()
                                                if "ppl" in k or k.endswith("_s")}), flush=True)
  report_lib.write_text_atomic(os.path.join(out, "results.md"), tables(results))
  print(tables(results))


def tables(results: dict) -> str:
  lines = ["| export | transformers load | JAX ppl (in memory) | JAX ppl (imported dir) | "
           "transformers ppl (dir) | Δ transformers vs JAX | greedy 32 identical | "
           "safetensors MB |", "|---|---|---:|---:|---:|---:|---|---:|"]
  for row in ROWS:
    r = results.get(row)
    if not r or "transformers_ppl" not in r:
      continue
    ref = r.get("jax_ppl", r.get("jax_import_ppl"))
    same = r.get("jax_greedy", r.get("jax_import_greedy")) == r["transformers_greedy"]
    jp = f"{r['jax_ppl']:.4f}" if "jax_ppl" in r else "–"
    load = "dequantize=True" if "dequantize" in r.get("transformers_load", "") else "default"
    if "jax_ppl_ct_act_rule" in r:
      jp += f" ({r['jax_ppl_ct_act_rule']:.4f} with transformers' activation rule)"
    lines.append(f"| {row} | {load} | {jp} | {r['jax_import_ppl']:.4f} | "
                 f"{r['transformers_ppl']:.4f} | {100 * (r['transformers_ppl'] / ref - 1):+.3f}% | "
                 f"{'yes' if same else 'no'} | {r['dir_bytes'] / 1e6:.1f} |")
  lines += ["", "| GPTQ W4 g64 sym, act-order | quantize s | JAX ppl | transformers ppl |",
            "|---|---:|---:|---:|"]
  for row, name in (("gptq_w4g64_sym", "quantjax (capture driver, sequential)"),
                    ("llmcompressor_gptq_w4g64_sym", "llm-compressor 0.14.0.1 (sequential)")):
    r = results.get(row)
    if r and "transformers_ppl" in r:
      jp = r.get("jax_import_ppl")
      lines.append(f"| {name} | {r['quantize_s']:.1f} | {jp:.4f} | {r['transformers_ppl']:.4f} |")
  return "\n".join(lines) + "\n"


def _define_flags() -> None:
  """Flags are defined only when run as a program (tests import this module)."""
  flags.DEFINE_string("out", "runs/hf_interop", "Results directory.")
  flags.DEFINE_integer("calib_windows", 128, "Calibration windows of 512 tokens.")
  flags.DEFINE_integer("eval_windows", 32, "Evaluation windows scored (of 32).")
  flags.DEFINE_string("peer_python", ".venv-peers/bin/python",
                      "Python with llmcompressor ('' skips the llm-compressor row).")
  flags.DEFINE_list("only", [], "Rows to run (default: all).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
