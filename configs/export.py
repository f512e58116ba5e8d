"""GPTQ (act-order) W4 in llama.cpp's Q4_0 format on SmolLM2-135M, exported as GGUF.

Launch:

    python -m quantjax.export --config=configs/export.py --out=runs/export/gptq_q4_0.gguf

`arg` picks method and format, `<method>_<format>`: `rtn_q4_0`, `awq_q4_0`,
`gptq_q4_1`, `gptq_q5_0`, ... Every `*_proj` kernel is quantized in a GGUF
block format (group 32, fp16 scales), so the export writes the method's codes
as they are; the embedding goes in as Q8_0 (as llama-quantize does for Q4_0).
With `export.llamacpp_eval`, llama.cpp scores the file on the perplexity
protocol (same windows and token ids as the JAX evaluation).

Expected result: GPTQ-Q4_0 below llama.cpp's own Q4_0 (13.831 on this
protocol); the README records the measured figures.
"""

from configs.chain_base import chain_config


def get_config(arg=None):
  method, _, fmt = (arg or "gptq_q4_0").partition("_")
  c = chain_config("quantize")
  c.calib.windows = 32
  c.quantize.method = method
  c.quantize.format = fmt or "q4_0"
  c.quantize.act_order = True
  c.quantize.calibration = "minmax"  # or "mse": clipping search for each group's scale
  c.export.llamacpp_eval = True
  return c
