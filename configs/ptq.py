"""Post-training quantization methods on SmolLM2-135M: RTN vs GPTQ vs AWQ, per format.

Launch:

    python -m experiments.main --config=configs/ptq.py --workdir=runs/ptq
    # W4 g64 only, RTN / GPTQ / AWQ:
    python -m experiments.main --config=configs/ptq.py:int4_g64/rtn,gptq,awq --workdir=runs/ptq

`arg` is `FORMATS[/METHODS]`: a comma list of formats (default
`int4_g64,int3_g64`), optionally `/` and a comma list of methods (default
`rtn,gptq,awq`). Entry `fp32` evaluates the FP32 model; every other entry
runs `quantize -> evaluate` with one method. 32 calibration windows drawn
before the evaluation set. SmoothQuant W8A8 and static activation ranges are
in `configs/calibrated.py` and `configs/default.py`.

Expected result (perplexity protocol): GPTQ and AWQ below RTN at both
widths, the gap widest at 3 bits.
"""

from configs.base import base_config, entry

METHODS = ("rtn", "gptq", "awq")


def get_config(arg=None):
  fmts, _, meths = (arg or "").partition("/")
  formats = tuple(f.strip() for f in fmts.split(",") if f.strip()) or ("int4_g64", "int3_g64")
  methods = tuple(m.strip() for m in meths.split(",") if m.strip()) or METHODS
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"configs/ptq.py: unknown method {m!r} in {arg!r}; expected {METHODS}")
  c = base_config()
  c.name = "post-training quantization"
  c.calib.windows = 32
  c.sweep = [entry("fp32", "evaluate")] + [
      entry(f"{m}_{f}", "quantize,evaluate", quantize__method=m, quantize__format=f,
            quantize__act_order=m == "gptq")
      for f in formats for m in methods]
  return c
