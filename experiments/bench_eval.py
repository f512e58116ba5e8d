"""Evaluation throughput: the JAX model beside transformers (PyTorch) on the same windows.

    python -m experiments.bench_eval --windows=16 --batch_size=8 [--speed] [--out=bench.json]

Both sides score the same `windows` evaluation windows of the perplexity
protocol (the last ones of the corpus), in FP32 on the CPU, with the same batch
size, after one warm-up batch each (JAX's compile time is reported apart). It
prints tokens/s for each, their ratio and both perplexities (which must agree).
With `--speed`, JAX prefill/decode tokens/s at batch 1 and 8 are added.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

_WINDOWS = flags.DEFINE_integer("windows", 16, "Evaluation windows to score (of 32).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass (both sides).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: all CPUs).")
_SPEED = flags.DEFINE_bool("speed", False, "Also measure JAX prefill/decode tokens/s.")
_OUT = flags.DEFINE_string("out", "", "Write the results JSON here.")


def main(argv):
  del argv
  import dataclasses

  import numpy as np
  import torch
  import transformers

  from quantjax.eval import data
  from quantjax.eval import perplexity
  from quantjax.eval import report
  from quantjax.eval import speed
  from quantjax.models import load

  torch.set_num_threads(_THREADS.value or os.cpu_count())
  cfg, params, tok = load.load_smollm2()
  split = data.load_split(tok)
  n = _WINDOWS.value
  sub = dataclasses.replace(split, eval_windows=split.eval_windows[-n:],
                            protocol=data.Protocol(eval_tokens=n * split.protocol.window,
                                                   window=split.protocol.window))
  path = load.smollm2_path()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()

  def torch_nll(tokens):
    with torch.no_grad():
      t = torch.as_tensor(np.array(tokens), dtype=torch.long)
      lp = torch.log_softmax(hf(t).logits.float()[:, :-1], dim=-1)
      return (-lp.gather(-1, t[:, 1:, None])[..., 0]).numpy()

  bs = _BATCH.value
  torch_nll(sub.eval_windows[:bs])  # warm-up
  # JAX: compile is timed apart inside evaluate(); run it twice and keep the second
  # (warm) measurement, interleaved with torch so that machine noise hits both.
  jax_rec = perplexity.evaluate(cfg, params, sub, batch_size=bs, desc="jax")
  t_rec = perplexity.evaluate(None, None, sub, batch_size=bs, nll_fn=torch_nll, desc="torch")
  jax_rec2 = perplexity.evaluate(cfg, params, sub, batch_size=bs, desc="jax (again)")
  t_rec2 = perplexity.evaluate(None, None, sub, batch_size=bs, nll_fn=torch_nll,
                               desc="torch (again)")
  jax_tps = max(jax_rec["eval_tokens_per_s"], jax_rec2["eval_tokens_per_s"])
  torch_tps = max(t_rec["eval_tokens_per_s"], t_rec2["eval_tokens_per_s"])
  out = {
      "windows": n, "batch_size": bs, "tokens": n * sub.protocol.window,
      "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
      "ratio_jax_over_torch": jax_tps / torch_tps,
      "jax_compile_s": jax_rec["compile_s"],
      "jax_perplexity": jax_rec["perplexity"], "torch_perplexity": t_rec["perplexity"],
      "perplexity_rel_diff": abs(jax_rec["perplexity"] / t_rec["perplexity"] - 1),
      "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
      **perplexity.environment(),
  }
  if _SPEED.value:
    out["jax_prefill_decode"] = speed.prefill_decode(cfg, params, batch_sizes=(1, 8))
  print(json.dumps(out, indent=2))
  print(f"\nJAX {jax_tps:.0f} tok/s vs transformers {torch_tps:.0f} tok/s "
        f"-> {out['ratio_jax_over_torch']:.2f}x; perplexity {out['jax_perplexity']:.4f} vs "
        f"{out['torch_perplexity']:.4f}")
  if _OUT.value:
    report.write_json_atomic(_OUT.value, out)


if __name__ == "__main__":
  app.run(main)
