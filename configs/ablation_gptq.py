"""GPTQ ablation on SmolLM2-135M: bits x group size, each vs RTN, as a sweep.

Launch:

    python -m experiments.main --config=configs/ablation_gptq.py --workdir=runs/ablation_gptq
    python -m experiments.compare runs/ablation_gptq/* --out=runs/ablation_gptq/compare

Each sweep entry (3 and 4 bits x group 32, group 64 and per-channel; 128 does
not divide 576) runs `evaluate -> quantize -> evaluate` into its own
sub-directory.

Expected result: GPTQ below RTN at every setting, the gap widest at 3 bits.
"""

from configs.chain_base import chain_config

FORMATS = ("int4_g64", "int4_g32", "int4", "int3_g64", "int3_g32", "int3")


def get_config(arg=None):
  c = chain_config("evaluate,quantize,evaluate")
  methods = ("gptq", "rtn") if not arg else tuple(arg.split(","))
  c.sweep = [{"name": f"{m}_{f}", "quantize.method": m, "quantize.format": f}
             for f in FORMATS for m in methods]
  return c
