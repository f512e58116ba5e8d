"""GPTQ ablation on SmolLM2-135M: bits x group size, each beside RTN.

Launch:

    python -m experiments.main --config=configs/ablation_gptq.py --workdir=runs/ablation_gptq
    python -m experiments.main --config=configs/ablation_gptq.py:gptq --workdir=runs/abl_gptq

`arg` is a comma list of methods (default `gptq,rtn`). Formats: 3 and 4
bits x group 32, group 64 and per channel (128 does not divide 576).
32 calibration windows; GPTQ without act-order (the plain algorithm).

Expected result: GPTQ below RTN at every setting, the gap widest at 3 bits.
"""

from configs.base import base_config, entry

FORMATS = ("int4_g64", "int4_g32", "int4", "int3_g64", "int3_g32", "int3")


def get_config(arg=None):
  methods = tuple(m.strip() for m in arg.split(",")) if arg else ("gptq", "rtn")
  c = base_config()
  c.name = "GPTQ ablation"
  c.calib.windows = 32
  c.sweep = [entry("fp32", "evaluate")] + [
      entry(f"{m}_{f}", "quantize,evaluate", quantize__method=m, quantize__format=f)
      for f in FORMATS for m in methods]
  return c
