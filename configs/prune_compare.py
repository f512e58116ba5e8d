"""Pruning methods on SmolLM2-135M: magnitude vs Wanda vs SparseGPT, 50% and 2:4.

Launch (resumable):

    python -m experiments.main --config=configs/prune_compare.py --workdir=runs/prune_compare

`arg` is a comma list of patterns (default `0.5,2:4`): `0.5` is 50%
unstructured (ranked per output column for magnitude and Wanda, per block of
128 inputs for SparseGPT, as in the papers), `2:4` keeps 2 of every 4
consecutive inputs. Every projection of the 30 layers is pruned; embeddings
and norms stay dense. Calibration (Wanda's input norms, SparseGPT's
Hessians): 32 windows of 512 tokens drawn before the evaluation set.

Expected result: Wanda and SparseGPT each at most half of magnitude pruning's
perplexity increase over FP32, at both patterns (docs/results.md: 50% magnitude
225.2 / Wanda 21.97 / SparseGPT 16.14; 2:4 2122 / 58.7 / 24.2).
"""

from configs.base import base_config, entry
from experiments.pipeline import PRUNE_METHODS, parse_pattern


def _entry_name(method: str, pattern: str) -> str:
  p = parse_pattern(pattern)  # clear errors for a bad pattern
  if "m" in p:
    return f"{method}_{p['n']}of{p['m']}"
  return f"{method}_{round(p['sparsity'] * 100)}pct"


def get_config(arg=None):
  patterns = tuple(p.strip() for p in arg.split(",")) if arg else ("0.5", "2:4")
  c = base_config()
  c.name = "pruning methods"
  c.calib.windows = 32
  c.sweep = [entry("fp32", "evaluate")] + [
      entry(_entry_name(m, p), "prune,evaluate", prune__method=m, prune__pattern=p)
      for p in patterns for m in PRUNE_METHODS]
  return c
