"""llama.cpp's newer block types on SmolLM2-135M: ours beside llama.cpp's own quantizer,
and GGUF files below 4 bits per weight that mix them. Every row is scored by llama.cpp.

Launch:

    python -m experiments.main --config=configs/llamacpp_types.py --workdir=runs/llamacpp_types
    python -m experiments.main --config=configs/llamacpp_types.py:mixed_3.5bpw \
        --workdir=runs/llamacpp_types

`arg` is a comma list of entry names (default: all). Entries:

* `gptq_<type>` (iq4_nl, mxfp4, nvfp4, q2_0): GPTQ with act-order into the type
  on every projection (8 calibration windows, the default comparison's), the
  embedding in Q8_0, exported code for code; `ggml_imatrix_<type>`: llama.cpp's
  own row quantizer (`ggml_quantize_chunk`) into the same type on the same
  tensors, with an importance matrix (mean x² per input feature) over the same
  8 windows, as `llama-quantize --imatrix` hands it over: the same file layout
  and size as ours; `llamacpp_<type>`: `llama_model_quantize` of an F32 export
  into that file type, llama.cpp's own per-tensor mix, no importance matrix
  (the bindings cannot hand one to it); none for MXFP4, whose file type
  (`MXFP4_MOE`) quantizes only the experts of mixture-of-experts models, and
  none for NVFP4, which `llama_model_quantize` refuses for this model.
  Q1_0, TQ2_0 and TQ1_0 need rows of 128 / 256, which only SmolLM2's
  `down_proj` (rows of 1536) has (a rule asking for them elsewhere is an error
  naming the tensor and the types that fit).
* `rtn_<type>_down0_5` (tq2_0, tq1_0): round-to-nearest into the type on the
  `down_proj` of blocks 0-5 only, everything else F32 but the Q8_0 embedding,
  scored by llama.cpp and by the JAX model on the same file (first 8 windows):
  a check of llama.cpp's arithmetic on these types on a model that still
  works (all 30 `down_proj` in a ternary type is not a working model).
* `mixed_<b>bpw`: the mixed-precision allocation (Fisher sensitivity over the 8
  windows, GPTQ codes) over `LOWBIT_CANDIDATES` under a budget of `b` bits per
  weight of the projections, exported code for code.

Expected result: docs/formats-gguf.md, "Ours beside llama.cpp's own quantizer, type
by type" (the table measured with this config).
"""

from configs.base import base_config, entry, select

CALIB_WINDOWS = 8
TYPES = ("iq4_nl", "mxfp4", "nvfp4", "q2_0")
# Every llama.cpp type that fits SmolLM2's rows of 576 and 1536, from 8.5 down to 2.25 bpw.
LOWBIT_CANDIDATES = ("q8_0", "q4_0", "iq4_nl", "q2_0")
BUDGETS = (3.5, 2.5)


def _entries():
  out = [entry("fp32", "evaluate")]
  for t in TYPES:
    out.append(entry(f"gptq_{t}", "quantize,export,llamacpp", quantize__method="gptq",
                     quantize__format=t, quantize__act_order=True))
    out.append(entry(f"ggml_imatrix_{t}", "quantize,export,llamacpp", quantize__method="llamacpp",
                     quantize__format=t, quantize__importance_windows=CALIB_WINDOWS))
    # llama.cpp's MXFP4 file type (MXFP4_MOE) quantizes only MoE experts; its quantizer
    # refuses the NVFP4 file type for this model (return code 1).
    if t not in ("mxfp4", "nvfp4"):
      out.append(entry(f"llamacpp_{t}", "export,llamacpp", export__llamacpp_quantize=t.upper()))
  for t in ("tq2_0", "tq1_0"):
    out.append(entry(f"rtn_{t}_down0_5", "quantize,export,llamacpp",
                     targets=r"layers/[0-5]/mlp/down_proj/kernel", quantize__format=t,
                     llamacpp__jax=True, llamacpp__windows=8))
  for b in BUDGETS:
    out.append(entry(f"mixed_{b:g}bpw", "mixed,export,llamacpp", mixed__budget_bpw=b,
                     mixed__method="gptq", mixed__candidates=list(LOWBIT_CANDIDATES),
                     mixed__sensitivity_windows=CALIB_WINDOWS))
  return tuple(out)


ENTRIES = _entries()


def get_config(arg=None):
  c = base_config()
  c.name = "llama.cpp types"
  c.calib.windows = CALIB_WINDOWS
  c.sweep = select(ENTRIES, arg, "configs/llamacpp_types.py")
  return c
