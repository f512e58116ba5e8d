"""Quantization-aware training of W4 group-64 symmetric on SmolLM2-135M, against RTN.

Launch (resumable; training resumes from its step checkpoints):

    python -m experiments.main --config=configs/qat.py --workdir=runs/qat

`--config=configs/qat.py:ste` trains with straight-through fake quantization at
min-max scales instead of learned step sizes (LSQ).

Entries: `fp32`, `rtn` (RTN W4 g64: the baseline QAT must beat) and `qat`
(the student's projections fake-quantized to int4 g64 symmetric, step sizes
initialised to the RTN scales and learned with LSQ, weights updated through
the straight-through estimator; teacher = the FP32 model, pure logit KD;
AdamW 1e-4 with 6 warm-up steps and cosine decay, batch 4 x 256 tokens from
128 calibration windows drawn before the evaluation set, 60 steps = 61,440
tokens; converted to real QArrays at the end).

Expected result: QAT closes at least 30% of RTN's perplexity gap to FP32
(docs/results.md: RTN 16.08 -> QAT 11.55, FP32 11.09).
"""

from configs.base import base_config, entry


def get_config(arg=None):
  if arg not in (None, "", "lsq", "ste"):
    raise ValueError(f"configs/qat.py takes 'lsq' (default) or 'ste', got {arg!r}")
  c = base_config()
  c.name = "quantization-aware training"
  c.calib.windows = 128  # training batches draw from these windows
  c.qat.lsq = arg != "ste"
  c.qat.init = "minmax"
  c.qat.steps = 60
  c.qat.learning_rate = 1e-4
  c.qat.warmup_steps = 6
  c.qat.checkpoint_every = 10
  c.sweep = [entry("fp32", "evaluate"),
             entry("rtn", "quantize,evaluate", quantize__format=c.qat.format),
             entry("qat_lsq" if c.qat.lsq else "qat_ste", "qat,evaluate")]
  return c
