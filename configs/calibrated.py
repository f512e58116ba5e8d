"""Every calibrated method on SmolLM2-135M through the model-agnostic capture driver.

Launch (resumable; each entry runs into its own sub-directory):

    python -m experiments.main --config=configs/calibrated.py --workdir=runs/calibrated
    python -m experiments.compare --out=runs/calibrated/compare runs/calibrated

    # one entry only, e.g. GPTQ act-order sequential vs one-pass:
    python -m experiments.main --config=configs/calibrated.py:gptq_ao,gptq_ao_1pass \\
        --workdir=runs/calibrated

`arg` is a comma list of entry names (default: all of `ENTRIES`). Every
`*_proj` kernel of the 30 layers is quantized or pruned by
`quantjax.methods.calibrate` / `quantjax.sparsity.prune_calibrated`, which
see the model only through `llama.forward`; AWQ and SmoothQuant scales are
restricted to what the Llama fold table absorbs and then folded
(`methods.fold_input_scales`), so the results are plain QArrays. 32
calibration windows of 512 tokens from before the evaluation set (the
protocol's default is 128; 32 keeps each entry within minutes on 2 cores).

Expected result (perplexity, full protocol; README "Calibrated methods on any
model"): GPTQ act-order W4 g64 about 12.8, AWQ W4 g64 about 13.5, SparseGPT
2:4 about 24.2, Wanda 2:4 about 58.7, SmoothQuant alpha 0.8 W8A8 about 12.0,
each within 1% of the earlier Llama-specific driver's figures or better.
"""

from configs.chain_base import chain_config

ENTRIES = {
    "fp32": {"stages": "evaluate"},
    "gptq_ao": {"stages": "quantize,evaluate", "quantize.method": "gptq",
                "quantize.format": "int4_g64", "quantize.act_order": True},
    "gptq_ao_1pass": {"stages": "quantize,evaluate", "quantize.method": "gptq",
                      "quantize.format": "int4_g64", "quantize.act_order": True,
                      "quantize.mode": "one_pass"},
    "gptq": {"stages": "quantize,evaluate", "quantize.method": "gptq",
             "quantize.format": "int4_g64"},
    "awq": {"stages": "quantize,evaluate", "quantize.method": "awq",
            "quantize.format": "int4_g64"},
    "smoothquant_a08": {"stages": "quantize,evaluate", "quantize.method": "smoothquant",
                        "quantize.format": "int8", "quantize.act_format": "int8_t",
                        "quantize.alpha": 0.8},
    "static_w8a8": {"stages": "quantize,evaluate", "quantize.method": "static",
                    "quantize.format": "int8", "quantize.act_format": "int8_t"},
    "sparsegpt_2of4": {"stages": "prune,evaluate", "prune.method": "sparsegpt",
                       "prune.pattern": "2:4"},
    "wanda_2of4": {"stages": "prune,evaluate", "prune.method": "wanda", "prune.pattern": "2:4"},
}


def get_config(arg=None):
  names = [n.strip() for n in arg.split(",")] if arg else list(ENTRIES)
  for n in names:
    if n not in ENTRIES:
      raise ValueError(f"configs/calibrated.py: unknown entry {n!r}; expected some of "
                       f"{', '.join(ENTRIES)}")
  c = chain_config("evaluate")
  c.calib.windows = 32
  c.sweep = [dict(ENTRIES[n], name=n) for n in names]
  return c
