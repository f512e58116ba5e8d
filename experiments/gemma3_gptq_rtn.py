"""Gemma 3 270M: GPTQ against round-to-nearest, W4 group 64 symmetric, on the protocol.

    flock /tmp/quantjax-heavy.lock python -m experiments.gemma3_gptq_rtn --out=runs/gemma3_gptq_rtn

Every `*_proj` kernel of the 18 layers is quantized to int4, groups of 64
along the input, symmetric, float32 scales; the tied embedding / head and the
norms stay FP32 (so the bytes of the projections change, not the 63% of the
parameters the embedding holds). RTN is `methods.rtn_params`; GPTQ runs
through the generic `methods.calibrate(gemma3.forward_fn(cfg), ...)` on
`--calib` calibration windows of the protocol (drawn before the evaluation
set, BOS in front as the model reads text). Perplexity on `--windows` of the
32 evaluation windows, BOS in front (the protocol for Gemma's tokenizer).
The FP32 baseline lies on Q4_K_M's grids (the GGUF it is dequantized from).

Writes `results.json` and `results.md` to `--out`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "runs/gemma3_gptq_rtn", "results directory")
_WINDOWS = flags.DEFINE_integer("windows", 32, "evaluation windows (of 32)")
_CALIB = flags.DEFINE_integer("calib", 32, "calibration windows (of the protocol's 128)")
_FORMAT = flags.DEFINE_string("format", "int4_g64", "weight format of every *_proj kernel")


def main(argv):
  del argv
  from quantjax import methods
  from quantjax.eval import data
  from quantjax.eval import memory
  from quantjax.eval import perplexity
  from quantjax.models import gemma3
  from quantjax.models import load
  from quantjax.rules import QuantRule

  os.makedirs(_OUT.value, exist_ok=True)
  cfg, params, tok = load.load_gemma3()
  split = data.load_split(tok)
  n = _WINDOWS.value
  sub = dataclasses.replace(split, eval_windows=split.eval_windows[-n:],
                            protocol=data.Protocol(eval_tokens=512 * n))
  rules = (QuantRule(module_path=gemma3.PROJ_KERNELS, format=_FORMAT.value),)
  calib = split.model_inputs(split.calib_windows[:_CALIB.value])
  batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]

  def score(name, p, seconds):
    r = perplexity.evaluate(cfg, p, sub, batch_size=2, progress=False, model_name=name,
                            nll_fn=gemma3.window_nll_fn(cfg, p))
    row = {"method": name, "perplexity": r["perplexity"], "nll": r["nll"],
           "bytes": memory.tree_bytes(p), "quantize_s": seconds,
           "per_window_nll": r["per_window_nll"]}
    print({k: v for k, v in row.items() if k != "per_window_nll"})
    return row, r

  rows = []
  row, base = score("fp32", params, 0.0)
  rows.append(row)
  t0 = time.perf_counter()
  rtn = methods.rtn_params(params, rules)
  rows.append(score(f"rtn {_FORMAT.value}", rtn, time.perf_counter() - t0)[0])
  t0 = time.perf_counter()
  gptq = methods.calibrate(gemma3.forward_fn(cfg), params, batches, rules, methods.GPTQ(),
                           progress=False).params
  rows.append(score(f"gptq {_FORMAT.value}", gptq, time.perf_counter() - t0)[0])
  f = rows[0]["perplexity"]
  for r in rows:
    r["increase"] = r["perplexity"] - f
  rec = {"model": cfg.name, "format": _FORMAT.value, "calib_windows": _CALIB.value,
         "rows": rows, "protocol": base, "gptq_over_rtn_increase":
         rows[2]["increase"] / rows[1]["increase"] if rows[1]["increase"] else float("nan")}
  with open(os.path.join(_OUT.value, "results.json"), "w") as fh:
    json.dump(rec, fh, indent=2, default=float)
  lines = ["| method | perplexity | increase over FP32 | model bytes | quantize s |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['perplexity']:.4f} | {r['increase']:+.4f} | "
                 f"{r['bytes']:,} | {r['quantize_s']:.1f} |")
  lines.append("")
  lines.append(f"GPTQ's increase is {rec['gptq_over_rtn_increase']:.2f} of RTN's "
               f"({n} windows x 511 tokens, BOS; {_CALIB.value} calibration windows).")
  with open(os.path.join(_OUT.value, "results.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
