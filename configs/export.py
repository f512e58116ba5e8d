"""A quantized SmolLM2-135M written as GGUF and scored by llama.cpp.

Launch (the file lands in the work directory; `experiments.export` copies it out):

    python -m experiments.main --config=configs/export.py --workdir=runs/export
    python -m experiments.export --config=configs/export.py --out=runs/gptq_q4_0.gguf

`arg` picks method and format, `<method>_<format>`: `gptq_q4_0` (default),
`rtn_q4_0`, `awq_q4_0`, `gptq_q4_1`, `gptq_q5_0`, ... Every projection is
quantized in a GGUF block format (group 32, fp16 scales), so the export
writes the method's codes as they are; the embedding goes in as Q8_0 (as
llama-quantize does for Q4_0). 32 calibration windows; GPTQ with act-order
and llama.cpp's signed-max scale rule.

Expected result (llama.cpp perplexity on the protocol): GPTQ-Q4_0 about 12.04,
against llama.cpp's own Q4_0 at 13.84 (docs/formats-gguf.md).
"""

from configs.base import base_config, entry


def get_config(arg=None):
  method, _, fmt = (arg or "gptq_q4_0").partition("_")
  c = base_config()
  c.name = f"{method} {fmt or 'q4_0'} GGUF"
  c.calib.windows = 32
  c.quantize.method = method
  c.quantize.format = fmt or "q4_0"
  c.quantize.act_order = True
  c.sweep = [entry(f"{method}_{fmt or 'q4_0'}", "quantize,evaluate,export,llamacpp")]
  return c
