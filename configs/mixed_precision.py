"""Mixed precision vs uniform formats at equal size, on SmolLM2-135M.

Launch:

    python -m experiments.main --config=configs/mixed_precision.py --workdir=runs/mixed
    python -m experiments.main --config=configs/mixed_precision.py:4.5/gptq --workdir=runs/mixed

`arg` is `BUDGETS[/METHODS]` (default `4.5,3.5/rtn`): for every budget (bits
per weight over the projections, scales included) and method (rtn, or gptq
with act-order), the mixed allocation (empirical-Fisher sensitivity over 16
calibration windows, Lagrangian knapsack over `CANDIDATES`) beside every
uniform candidate of that size (the "best uniform format at the same size").
A GGUF-only allocation at 4.5 bits (Q8_0/Q5_1/Q5_0/Q4_0, GPTQ) is also
exported and scored by llama.cpp.

Expected result (docs/formats-gguf.md, mixed precision): at 4.5 bpw RTN mixed 12.97
(without q4_1; best uniform 14.61); GGUF mixed GPTQ at 4.53 bpw 11.82 by
llama.cpp, below Q4_K_M's 11.93.
"""

from configs.base import GGUF_CANDIDATES, base_config, entry

CANDIDATES = ("q8_0", "q5_1", "q5_0", "q4_0", "int4_g64_asymf_fp16s", "int3_g32_asymf_fp16s",
              "int3_g64_asymf_fp16s", "int3_g32_fp16s", "int2_g32_asymf_fp16s",
              "int2_g64_asymf_fp16s")


def _bpw(fmt: str) -> float:
  from quantjax.methods.mixed import format_bytes
  return 8.0 * format_bytes((576, 1536), fmt) / (576 * 1536)


def get_config(arg=None):
  budgets, _, meths = (arg or "").partition("/")
  budgets = tuple(float(b) for b in budgets.split(",") if b.strip()) or (4.5, 3.5)
  methods = tuple(m.strip() for m in meths.split(",") if m.strip()) or ("rtn",)
  c = base_config()
  c.name = "mixed precision vs uniform"
  c.calib.windows = 32
  c.mixed.candidates = list(CANDIDATES)
  sweep = [entry("fp32", "evaluate")]
  for b in budgets:
    for m in methods:
      sweep.append(entry(f"mixed_{b:g}_{m}", "mixed,evaluate", mixed__budget_bpw=b,
                         mixed__method=m))
      for f in CANDIDATES:
        if abs(_bpw(f) - b) <= 0.01:
          sweep.append(entry(f"uniform_{f}_{m}", "quantize,evaluate", quantize__method=m,
                             quantize__format=f, quantize__act_order=m == "gptq"))
  sweep.append(entry("mixed_gguf_4.5_gptq", "mixed,evaluate,export,llamacpp",
                     mixed__budget_bpw=4.5, mixed__method="gptq",
                     mixed__candidates=list(GGUF_CANDIDATES)))
  c.sweep = sweep
  return c
