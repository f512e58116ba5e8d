"""Post-training quantization methods on SmolLM2-135M: RTN vs GPTQ vs AWQ.

Launch:

    python -m experiments.main --config=configs/ptq.py --workdir=runs/ptq
    python -m experiments.main --config=configs/ptq.py:int3_g64 --workdir=runs/ptq_w3

`arg` is a comma-separated list of formats (default `int4_g64,int3_g64`);
each sweep entry runs `evaluate -> quantize -> evaluate` with one method
(`quantjax.methods`: rtn, gptq via `sequential.gptq_layer`, awq via
`awq.awq_layer`) into its own sub-directory; calibration windows come from
tokens before the evaluation set (`calib.windows`, seeded).

Expected result (perplexity protocol, 32 calibration windows, see the methods
report): GPTQ and AWQ below RTN at both widths, the gap widest at 3 bits.
W8A8 with SmoothQuant needs a `quantize.method = "smoothquant"` hook in
experiments/chain.py (not there yet).
"""

from configs.chain_base import chain_config

METHODS = ("rtn", "gptq", "awq")


def get_config(arg=None):
  formats = tuple(arg.split(",")) if arg else ("int4_g64", "int3_g64")
  c = chain_config("evaluate,quantize,evaluate")
  c.calib.windows = 32
  c.sweep = [{"name": f"{m}_{f}", "quantize.method": m, "quantize.format": f}
             for f in formats for m in METHODS]
  return c
