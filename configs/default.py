"""The default comparison (`make run`): every method family on SmolLM2-135M.

Launch (from the repository root; `make run` does the same):

    python -m experiments.main --config=configs/default.py --workdir=runs/default

Other models and texts: `--config.model.source=gemma3` (or `gguf` with
`--config.model.path=m.gguf`), `--config.data.corpus=gutenberg_kjv_new_testament`
(or a text file); `--config.data.calib_corpus=pydoc_topics` calibrates on
another text than the one evaluated. `arg` is a comma list of entry names
to run (default: all of `ENTRIES`). The table by text in docs/results.md:

    python -m experiments.main --config=configs/default.py \
        --config.data.corpus=gutenberg_kjv_new_testament --workdir=runs/default_kjv
    python -m experiments.main \
        --config=configs/default.py:fp32,rtn_w4_g64,gptq_w4_g64,awq_w4_g64,gptq_w3_g64,smoothquant_w8a8,static_w8a8,sparsegpt_2of4,mixed_4.5bpw,gptq_q4_0 \
        --config.data.corpus=gutenberg_kjv_new_testament --config.data.calib_corpus=pydoc_topics \
        --workdir=runs/default_kjv_xdomain
    python -m experiments.compare --by_text --out=runs/texts \
        runs/default runs/default_kjv runs/default_kjv_xdomain

One table, one Pareto plot: FP32; BF16; RTN W8 per channel; RTN, GPTQ and
AWQ at W4 group-64 symmetric; GPTQ W3 group 64; SmoothQuant W8A8 (dynamic
per-token activations); static per-tensor W8A8; NF4 g64; FP8 e4m3; SparseGPT
2:4; mixed precision at 4.5 bits per weight (GPTQ codes, one of
`MIXED_CANDIDATES` per tensor); GPTQ in Q4_0's own format, exported to GGUF
code for code and scored by llama.cpp (the best 4.5-bpw file we write, as a
4.5-bpw budget over GGUF block types alone is Q4_0 everywhere), with
llama.cpp's own Q4_0 beside it. Every row:
perplexity on the protocol (32 windows of 512), Δ, KL divergence and top-1
agreement against FP32, model bytes, bits per weight, quantize seconds,
evaluation tokens/s. Calibrated methods use `CALIB_WINDOWS` = 8 windows of
512 tokens (32 in `configs/calibrated.py`; 8 instead of
16 keeps the run within 15 minutes on 2 cores, and costs GPTQ W4 nothing but
GPTQ W3, AWQ and SparseGPT some quality: docs/results.md, "Fewer calibration
windows"), mixed precision's Fisher sensitivity all 8; the table says so. Signed symmetric integer formats
use the default scale rule "auto" (llama.cpp's signed-max).

Expected result: see README.md, "The default comparison" (its first table is
this config's output, with the machine and timings).
"""

from configs.base import MIXED_CANDIDATES, base_config, entry, select

CALIB_WINDOWS = 8

ENTRIES = (
    entry("fp32", "evaluate"),
    entry("bf16", "quantize,evaluate", quantize__method="cast", quantize__format="bf16"),
    entry("rtn_w8", "quantize,evaluate", quantize__format="int8"),
    entry("rtn_w4_g64", "quantize,evaluate", quantize__format="int4_g64"),
    entry("gptq_w4_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True),
    entry("awq_w4_g64", "quantize,evaluate", quantize__method="awq",
          quantize__format="int4_g64"),
    entry("gptq_w3_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int3_g64", quantize__act_order=True),
    entry("smoothquant_w8a8", "quantize,evaluate", quantize__method="smoothquant",
          quantize__format="int8", quantize__act_format="int8", quantize__alpha=0.8),
    entry("static_w8a8", "quantize,evaluate", quantize__method="static",
          quantize__format="int8", quantize__act_format="int8_t",
          quantize__act_observer="minmax"),
    entry("nf4_g64", "quantize,evaluate", quantize__format="nf4_g64"),
    entry("fp8_e4m3", "quantize,evaluate", quantize__format="fp8_e4m3"),
    entry("sparsegpt_2of4", "prune,evaluate", prune__method="sparsegpt", prune__pattern="2:4"),
    entry("mixed_4.5bpw", "mixed,evaluate", mixed__budget_bpw=4.5, mixed__method="gptq",
          mixed__candidates=list(MIXED_CANDIDATES), mixed__sensitivity_windows=8),
    entry("gptq_q4_0", "quantize,export,llamacpp", quantize__method="gptq",
          quantize__format="q4_0", quantize__act_order=True),
    entry("llamacpp_q4_0", "export,llamacpp", export__llamacpp_quantize="Q4_0"),
)


def get_config(arg=None):
  """The default comparison; `arg` (optional) is a comma list of entry names."""
  c = base_config()
  c.name = "default comparison"
  c.calib.windows = CALIB_WINDOWS
  c.sweep = select(ENTRIES, arg, "configs/default.py")
  return c
