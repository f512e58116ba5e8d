"""Gemma 3 270M: every method family through the generic path, and llama.cpp side by side.

Launch (from the repository root; resumable, about an hour on 2 CPU cores):

    python -m experiments.main --config=configs/gemma3.py --workdir=runs/gemma3

The model is the packaged Q4_K_M GGUF dequantized to FP32 (`model.source =
"gemma3"`), so the baseline weights already lie on Q4_K_M's grids; the
protocol is the default one (pydoc text, last 16,384 tokens as 32 windows of
512) tokenized by Gemma's tokenizer, each window fed as BOS + 512 tokens with
the same 16,352 predicted tokens. `arg` is a comma list of entry names.

Rows:

* JAX, projections compressed, the tied embedding (63% of the parameters)
  kept in FP32, "model MB" the whole model: RTN W8 per channel, W4 and W3
  group 64; GPTQ (act-order) and AWQ at W4 g64; SmoothQuant W8A8 (dynamic
  per-token activations); static per-tensor W8A8; Wanda and SparseGPT 2:4;
  a short QAT run (LSQ from the RTN W4 g64 scales, `QAT_STEPS` steps of
  4 x 256 tokens); mixed precision at 4.5 bits per projection weight
  (GPTQ codes, one of `MIXED_CANDIDATES` per tensor by Fisher sensitivity).
* The embedding: GPTQ in Q4_0's own format (code for code in GGUF), the
  file written with the embedding in F16, Q8_0 and Q4_0; llama.cpp scores
  each file, JAX the Q8_0 one too (its own weights, imported as QArrays).
* llama.cpp on our exports: F16 and Q8_0 (JAX on the same files beside
  them); llama.cpp's own Q4_0 and Q4_K_M made by its quantizer from our F32
  export; and Q4_K_M's per-tensor types written by quantjax's encoders.

Calibrated methods use `CALIB_WINDOWS` windows of 512 (with BOS), mixed
precision's Fisher sensitivity 8 of them.

Expected result: docs/models.md, "Every method on Gemma 3".
"""

from configs.base import MIXED_CANDIDATES, base_config, entry, select

CALIB_WINDOWS = 16
QAT_STEPS = 20

_GPTQ_Q4_0 = dict(quantize__method="gptq", quantize__format="q4_0", quantize__act_order=True)

ENTRIES = (
    entry("fp32", "evaluate"),
    entry("rtn_w8", "quantize,evaluate", quantize__format="int8"),
    entry("rtn_w4_g64", "quantize,evaluate", quantize__format="int4_g64"),
    entry("rtn_w3_g64", "quantize,evaluate", quantize__format="int3_g64"),
    entry("gptq_w4_g64", "quantize,evaluate", quantize__method="gptq",
          quantize__format="int4_g64", quantize__act_order=True),
    entry("awq_w4_g64", "quantize,evaluate", quantize__method="awq",
          quantize__format="int4_g64"),
    entry("smoothquant_w8a8", "quantize,evaluate", quantize__method="smoothquant",
          quantize__format="int8", quantize__act_format="int8", quantize__alpha=0.8),
    entry("static_w8a8", "quantize,evaluate", quantize__method="static",
          quantize__format="int8", quantize__act_format="int8_t",
          quantize__act_observer="minmax"),
    entry("wanda_2of4", "prune,evaluate", prune__method="wanda", prune__pattern="2:4"),
    entry("sparsegpt_2of4", "prune,evaluate", prune__method="sparsegpt", prune__pattern="2:4"),
    entry("mixed_4.5bpw", "mixed,evaluate", mixed__budget_bpw=4.5, mixed__method="gptq",
          mixed__candidates=list(MIXED_CANDIDATES), mixed__sensitivity_windows=8),
    entry("gptq_q4_0", "quantize,evaluate", **_GPTQ_Q4_0),
    entry("gptq_q4_0_emb_f16", "quantize,export,llamacpp", **_GPTQ_Q4_0,
          export__types=[("embed/embedding", "F16")]),
    entry("gptq_q4_0_emb_q8_0", "quantize,export,llamacpp", **_GPTQ_Q4_0,
          export__types=[("embed/embedding", "Q8_0")], llamacpp__jax=True),
    entry("gptq_q4_0_emb_q4_0", "quantize,export,llamacpp", **_GPTQ_Q4_0,
          export__types=[("embed/embedding", "Q4_0")]),
    entry("gguf_f16", "export,llamacpp", export__types=[], export__float_type="F16",
          llamacpp__jax=True),
    entry("gguf_q8_0", "export,llamacpp", export__types=[(".*", "Q8_0")], llamacpp__jax=True),
    entry("llamacpp_q4_0", "export,llamacpp", export__llamacpp_quantize="Q4_0"),
    entry("llamacpp_q4_k_m", "export,llamacpp", export__llamacpp_quantize="Q4_K_M"),
    entry("quantjax_q4_k_m_types", "export,llamacpp", export__types_from="Q4_K_M",
          export__types=[]),
    entry("qat_w4_g64", "qat,evaluate", qat__steps=QAT_STEPS, qat__checkpoint_every=10),
)


def get_config(arg=None):
  """Gemma 3 270M's comparison; `arg` (optional) is a comma list of entry names."""
  c = base_config()
  c.name = "every method on Gemma 3 270M"
  c.model.source = "gemma3"
  c.calib.windows = CALIB_WINDOWS
  c.sweep = select(ENTRIES, arg, "configs/gemma3.py")
  return c
