"""2:4 SparseGPT pruning -> logit distillation -> W4 group-64 -> GGUF, on SmolLM2-135M.

Launch (resumable; kill it and run it again to continue):

    python -m experiments.main --config=configs/prune_distill_quantize.py \\
        --workdir=runs/prune_distill_quantize

`arg` picks the pruning method: `--config=configs/prune_distill_quantize.py:wanda`.
Shorter runs: `--config.distill.steps=20`.

One chain, evaluated after every stage: FP32 -> prune (SparseGPT 2:4 over every
projection, 64 calibration windows) -> distill (FP32 teacher, logit KL, AdamW
5e-5 with warm-up/cosine, batch 4 x 256 tokens) -> quantize (RTN int4
group-64 symmetric: zeros stay exactly zero) -> export (GGUF: llama.cpp has
no group-64 type, so the kernels are re-quantized to Q4_0 and the export
report says so) -> scored by llama.cpp.

Expected result: distillation recovers part of the gap pruning opened
(docs/results.md: 2:4 24.23 -> 17.88 after 60 steps).
"""

from configs.base import base_config, entry


def get_config(arg=None):
  c = base_config()
  c.name = "prune, distill, quantize"
  c.calib.windows = 64
  if arg:
    c.prune.method = arg
  c.sweep = [entry("fp32", "evaluate"),
             entry("pruned", "prune,evaluate"),
             entry("distilled", "prune,distill,evaluate"),
             entry("quantized", "prune,distill,quantize,evaluate,export,llamacpp")]
  return c
