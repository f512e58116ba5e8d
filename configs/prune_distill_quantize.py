"""2:4 SparseGPT pruning -> logit distillation -> W4 group-64 -> evaluate, on SmolLM2-135M.

Launch (resumable; kill it and run it again to continue):

    python -m experiments.main --config=configs/prune_distill_quantize.py \\
        --workdir=runs/prune_distill_quantize

`arg` picks the pruning method: `--config=configs/prune_distill_quantize.py:wanda`.
Shorter runs: `--config.distill.steps=20`.

Stages: evaluate (FP32) -> prune (sparsegpt 2:4 over every *_proj kernel,
64 calibration windows of 512 tokens) -> evaluate -> distill (FP32 teacher,
logit KL, AdamW 5e-5 with warm-up/cosine, batch 4 x 256 tokens) -> evaluate ->
quantize (RTN int4 group-64 symmetric: zeros stay exactly zero) -> evaluate ->
export (`07_export/model.gguf`: llama.cpp has no group-64 type, so the kernels
are re-quantized to Q4_0 and the export report says so; use
`--config.quantize.format=q4_0` for a lossless export).

Expected result: the table in results.md lists perplexity after each stage;
distillation should recover part of the gap pruning opened (README records
the measured figures, steps, tokens and wall time).
"""

from configs.chain_base import chain_config


def get_config(arg=None):
  c = chain_config("evaluate,prune,evaluate,distill,evaluate,quantize,evaluate,export")
  if arg:
    c.prune.method = arg
  return c
