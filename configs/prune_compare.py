"""Pruning methods on SmolLM2-135M: magnitude vs Wanda vs SparseGPT, 50% and 2:4.

Launch (resumable; each entry runs into its own sub-directory):

    python -m experiments.main --config=configs/prune_compare.py --workdir=runs/prune_compare
    python -m experiments.compare --out=runs/prune_compare/compare runs/prune_compare

`arg` is a comma list of patterns (default `0.5,2:4`): `0.5` is 50%
unstructured (ranked per output column for magnitude and Wanda, per block of
128 inputs for SparseGPT, as in the papers), `2:4` keeps 2 of every 4
consecutive inputs. Every `*_proj` kernel of the 30 layers is pruned;
embeddings and norms stay dense. The sweep's first entry, `fp32`, evaluates
the unpruned model once; every other entry runs `prune -> evaluate`, so each
sub-directory's table has no Δ column and `experiments.compare` computes Δ
against the `fp32` record. Calibration (Wanda's input norms, SparseGPT's
Hessians): 32 windows of 512 tokens drawn before the evaluation set (the
protocol's default is 128; 32 keeps the run near 45 minutes on a 2-core CPU).

Expected result (the issue's target, after the Wanda paper's Llama-2 figures):
Wanda and SparseGPT each at most half of magnitude pruning's perplexity
increase over FP32, at both patterns; README records what was measured.
"""

from configs.chain_base import chain_config
from experiments.chain import parse_pattern

METHODS = ("magnitude", "wanda", "sparsegpt")


def _entry_name(method: str, pattern: str) -> str:
  p = parse_pattern(pattern)  # clear errors for a bad pattern
  if "m" in p:
    return f"{method}_{p['n']}of{p['m']}"
  return f"{method}_{round(p['sparsity'] * 100)}pct"


def get_config(arg=None):
  patterns = tuple(p.strip() for p in arg.split(",")) if arg else ("0.5", "2:4")
  c = chain_config("prune,evaluate")
  c.calib.windows = 32
  c.sweep = [{"name": "fp32", "stages": "evaluate"}] + [
      {"name": _entry_name(m, p), "prune.method": m, "prune.pattern": p}
      for p in patterns for m in METHODS]
  return c
