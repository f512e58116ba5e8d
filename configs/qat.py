"""Quantization-aware training of W4 group-64 symmetric (LSQ steps + STE) on SmolLM2-135M.

Launch:

    python -m experiments.main --config=configs/qat.py --workdir=runs/qat

`--config=configs/qat.py:ste` trains with straight-through fake quantization at
min-max scales instead of learned step sizes.

Stages: evaluate (FP32) -> quantize (RTN W4 g64, the baseline QAT must beat)
-> evaluate, then in a second chain from FP32: qat (teacher = FP32 model,
logit KD, the student's *_proj kernels fake-quantized, converted to real
QArrays at the end) -> evaluate. The RTN and QAT records land in the same
results table; expected: QAT's perplexity below RTN's.
"""

from configs.chain_base import chain_config


def get_config(arg=None):
  c = chain_config("evaluate,qat,evaluate")
  c.qat.lsq = arg != "ste"
  c.qat.learning_rate = 2e-5
  c.sweep = []
  return c
