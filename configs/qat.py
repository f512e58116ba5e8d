"""Quantization-aware training of W4 group-64 symmetric on SmolLM2-135M, against RTN.

Launch (resumable; each entry runs into its own sub-directory):

    python -m experiments.main --config=configs/qat.py --workdir=runs/qat
    python -m experiments.compare --out=runs/qat/compare runs/qat

`--config=configs/qat.py:ste` trains with straight-through fake quantization at
min-max scales instead of learned step sizes (LSQ).

Sweep entries: `fp32` (evaluate the FP32 model), `rtn` (RTN W4 g64, the
baseline QAT must beat: quantize -> evaluate) and `qat` (qat -> evaluate:
the student's `*_proj` kernels fake-quantized to int4 g64 symmetric, step
sizes initialised to the RTN scales and learned with LSQ, weights updated
through the straight-through estimator; teacher = the FP32 model, pure
logit KD; AdamW 1e-4 with 6 warm-up steps and cosine decay to 1e-5, batch
4 x 256 tokens (the first 256 tokens of 128 calibration windows drawn before
the evaluation set), 60 steps = 61,440 tokens;
converted to real QArrays at the end). `experiments.compare` puts the three
records in one table with Δ against `fp32`.

Expected result: QAT closes at least 30% of RTN's perplexity gap to FP32
(RTN W4 g64: 16.08 vs FP32 11.09) in under 30 minutes of training on a
2-core CPU; README records the measured perplexity, steps, tokens and wall
time.
"""

from configs.chain_base import chain_config


def get_config(arg=None):
  if arg not in (None, "", "lsq", "ste"):
    raise ValueError(f"configs/qat.py takes 'lsq' (default) or 'ste', got {arg!r}")
  c = chain_config("qat,evaluate")
  c.calib.windows = 128  # the protocol's default: training batches draw from these windows
  c.qat.lsq = arg != "ste"
  c.qat.init = "minmax"
  c.qat.steps = 60
  c.qat.learning_rate = 1e-4
  c.qat.warmup_steps = 6
  c.qat.checkpoint_every = 10
  c.quantize.method = "rtn"
  c.quantize.format = c.qat.format
  c.sweep = [{"name": "fp32", "stages": "evaluate"},
             {"name": "rtn", "stages": "quantize,evaluate"},
             {"name": "qat_lsq" if c.qat.lsq else "qat_ste", "stages": "qat,evaluate"}]
  return c
