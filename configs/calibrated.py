"""Every calibrated method on SmolLM2-135M through the model-agnostic capture driver.

Launch (resumable):

    python -m experiments.main --config=configs/calibrated.py --workdir=runs/calibrated
    # some entries only, e.g. GPTQ act-order sequential vs one-pass:
    python -m experiments.main --config=configs/calibrated.py:gptq_ao,gptq_ao_1pass \\
        --workdir=runs/calibrated

`arg` is a comma list of entry names (default: all of `ENTRIES`). Every
projection of the 30 layers is quantized or pruned by
`quantjax.methods.calibrate` / `quantjax.sparsity.prune_calibrated`, which
see the model only through its forward function; AWQ and SmoothQuant scales
are restricted to what the model's fold table absorbs and then folded, so
the results are plain QArrays. 32 calibration windows of 512 tokens from
before the evaluation set.

Expected result (perplexity, full protocol; docs/results.md, "Post-training methods through the capture driver"):
GPTQ act-order W4 g64 about 12.8, AWQ W4 g64 about 13.2-13.5, SparseGPT 2:4
about 23.8-24.2, Wanda 2:4 about 57-59, SmoothQuant alpha 0.8 W8A8 about 12.0.
"""

from configs.base import base_config, entry, select

ENTRIES = (
    entry("fp32", "evaluate"),
    entry("gptq_ao", "quantize,evaluate", quantize__method="gptq", quantize__format="int4_g64",
          quantize__act_order=True),
    entry("gptq_ao_1pass", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True, quantize__mode="one_pass"),
    entry("gptq", "quantize,evaluate", quantize__method="gptq", quantize__format="int4_g64"),
    entry("awq", "quantize,evaluate", quantize__method="awq", quantize__format="int4_g64"),
    entry("smoothquant_a08", "quantize,evaluate", quantize__method="smoothquant",
          quantize__format="int8", quantize__act_format="int8_t", quantize__alpha=0.8),
    entry("static_w8a8", "quantize,evaluate", quantize__method="static", quantize__format="int8",
          quantize__act_format="int8_t", quantize__act_observer="minmax"),
    entry("sparsegpt_2of4", "prune,evaluate", prune__method="sparsegpt", prune__pattern="2:4"),
    entry("wanda_2of4", "prune,evaluate", prune__method="wanda", prune__pattern="2:4"),
)


def get_config(arg=None):
  c = base_config()
  c.name = "calibrated methods"
  c.calib.windows = 32
  c.sweep = select(ENTRIES, arg, "configs/calibrated.py")
  return c
