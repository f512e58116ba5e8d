"""Post-training quantization methods on SmolLM2-135M: RTN vs GPTQ vs AWQ.

Launch:

    python -m experiments.main --config=configs/ptq.py --workdir=runs/ptq
    python -m experiments.main --config=configs/ptq.py:int3_g64 --workdir=runs/ptq_w3

    # W4 g64 only, RTN / GPTQ / AWQ (about 20 minutes on a 2-core CPU):
    python -m experiments.main --config=configs/ptq.py:int4_g64/rtn,gptq,awq \
        --workdir=runs/ptq

`arg` is `FORMATS[/METHODS]`: a comma-separated list of formats (default
`int4_g64,int3_g64`), optionally followed by `/` and a comma list of methods
(default `rtn,gptq,awq`). The sweep's first entry, `fp32`, evaluates the
FP32 model once; every other entry runs `quantize -> evaluate` with one
method (`quantjax.methods`: rtn, or GPTQ / AWQ through the model-agnostic
`capture.calibrate`) into its own sub-directory, and `experiments.compare` merges
them with Δ against `fp32`. Calibration windows come from tokens before the
evaluation set (`calib.windows`, seeded).

Expected result (perplexity protocol, 32 calibration windows, see the methods
report): GPTQ and AWQ below RTN at both widths, the gap widest at 3 bits.
W8A8 with SmoothQuant: `configs/smoothquant.py`.
"""

from configs.chain_base import chain_config

METHODS = ("rtn", "gptq", "awq")


def get_config(arg=None):
  fmts, _, meths = (arg or "").partition("/")
  formats = tuple(f.strip() for f in fmts.split(",") if f.strip()) or ("int4_g64", "int3_g64")
  methods = tuple(m.strip() for m in meths.split(",") if m.strip()) or METHODS
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"configs/ptq.py: unknown method {m!r} in {arg!r}; expected {METHODS}")
  c = chain_config("quantize,evaluate")
  c.calib.windows = 32
  c.sweep = [{"name": "fp32", "stages": "evaluate"}] + [
      {"name": f"{m}_{f}", "quantize.method": m, "quantize.format": f}
      for f in formats for m in methods]
  return c
