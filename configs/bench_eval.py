"""Evaluation throughput: FP32 JAX beside transformers, and every weight format beside FP32.

Launch:

    python -m experiments.main --config=configs/bench_eval.py --workdir=runs/bench_eval

Every entry scores the same 32 protocol windows in one run (batch 8, FP32
activations, CPU); the table's "eval tok/s" column is the comparison, and
the fp32 record also holds transformers' (PyTorch) perplexity and tokens/s
on the same windows (`transformers` field). Fewer windows:
`--config.eval.tokens=4096`.

Expected result: JAX and transformers perplexities equal within 0.1%; every
format's evaluation tokens/s close to FP32's (docs/results.md, the default comparison's eval tok/s).
"""

from configs.base import base_config, entry

FORMATS = ("bf16", "int8", "int4", "int4_g64", "int4_g64_asym", "int3_g64_asym", "nf4_g64",
           "fp8_e4m3", "q4_0", "q4_1", "q8_0")


def get_config(arg=None):
  formats = tuple(f.strip() for f in arg.split(",")) if arg else FORMATS
  c = base_config()
  c.name = "evaluation throughput"
  c.sweep = [entry("fp32", "evaluate", eval__transformers=True)] + [
      entry(f"rtn_{f}", "quantize,evaluate", quantize__method="cast" if f in ("bf16", "fp16")
            else "rtn", quantize__format=f) for f in formats] + [
      entry("w8a8_int8", "quantize,evaluate", quantize__format="int8",
            quantize__act_format="int8")]
  return c
