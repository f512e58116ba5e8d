"""Mixed precision vs uniform formats at equal size, on SmolLM2-135M.

    python -m experiments.mixed_precision --out=runs/mixed --budgets=4.5,3.5 --methods=rtn,gptq

For every budget (bits per weight over the `*_proj` kernels, scales
included) and method (RTN, or GPTQ with act-order; 32 calibration windows),
this evaluates on the perplexity protocol:

* the **mixed** allocation (`quantjax.methods.mixed`: empirical-Fisher
  sensitivity over `--fisher_windows` calibration windows, Lagrangian
  knapsack over `--candidates`), and
* every **uniform** candidate whose size is within `--tolerance` bits of the
  budget (the "best uniform format at the same size").

`--gguf_budget` (bits per weight) adds a mixed allocation restricted to GGUF
block types, exported with per-tensor types (embedding Q8_0) and scored by
llama.cpp on the same windows. Results: `results.json`, `results.md`,
`mixed.png`; every record is saved as it finishes and a re-run skips it.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "runs/mixed", "Output directory.")
_BUDGETS = flags.DEFINE_list("budgets", ["4.5", "3.5"], "Bits per weight budgets.")
_METHODS = flags.DEFINE_list("methods", ["rtn", "gptq"], "rtn and/or gptq.")
_CANDIDATES = flags.DEFINE_list(
    "candidates", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "int4_g64_asymf_fp16s",
                   "int3_g32_asymf_fp16s", "int3_g64_asymf_fp16s", "int3_g32_fp16s",
                   "int2_g32_asymf_fp16s", "int2_g64_asymf_fp16s"],
    "Candidate formats.")
_TOL = flags.DEFINE_float("tolerance", 0.01, "Uniform formats within this many bits count.")
_FISHER = flags.DEFINE_integer("fisher_windows", 16, "Calibration windows for the Fisher.")
_OVERLAY = flags.DEFINE_list("overlay", [], "results.json files of experiments.gguf_compare "
                              "whose files are drawn on the plot (llama.cpp perplexity).")
_CAL = flags.DEFINE_string("calibration", "minmax", "Scale calibration: minmax, or "
                           "signed_max for the signed symmetric formats (llama.cpp's Q4_0 rule).")
_GGUF = flags.DEFINE_float("gguf_budget", 0.0, "Bits per weight of a GGUF-only mixed export.")

TARGETS = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"
GGUF_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def main(argv):
  import numpy as np

  from quantjax import rules as rules_lib
  from quantjax.eval import data as data_lib
  from quantjax.eval import memory as memory_lib
  from quantjax.eval import perplexity as ppl_lib
  from quantjax.eval import report as report_lib
  from quantjax import methods
  from quantjax.methods import mixed
  from quantjax.models import llama as llama_lib
  from quantjax.models import load as load_lib
  from quantjax.transforms import quantize_params

  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  src = load_lib.smollm2_path()
  cfg, params, tok = load_lib.load_gguf(src)
  params = rules_lib.to_pure(params)
  split = data_lib.load_split(tok, protocol=data_lib.Protocol(calib_windows=32))
  res_path = os.path.join(out, "results.json")
  records = report_lib.read_json(res_path, {"records": []})["records"]
  done = {r["key"]: r for r in records}

  fisher_path = os.path.join(out, "fisher.npz")
  if os.path.exists(fisher_path):
    with np.load(fisher_path) as z:
      fisher = {k.replace("|", "/"): z[k] for k in z.files}
  else:
    t = time.perf_counter()
    fisher = mixed.fisher_diagonal(llama_lib.loss_fn(cfg), params,
                                   [w[None] for w in split.calib_windows[:_FISHER.value]],
                                   TARGETS, progress=True)
    print(f"[quantjax] Fisher over {_FISHER.value} windows: {time.perf_counter() - t:.0f} s")
    tmp = fisher_path + ".tmp.npz"
    np.savez(tmp, **{k.replace("/", "|"): v for k, v in fisher.items()})
    os.replace(tmp, fisher_path)
  count = sum(int(np.prod(f.shape)) for f in fisher.values())
  costs = mixed.candidate_costs(params, fisher, _CANDIDATES.value, calibration=_CAL.value)
  sizes = {c.fmt: 0 for c in next(iter(costs.values()))}
  for choices in costs.values():
    for c in choices:
      sizes[c.fmt] += c.nbytes

  def quantize(rules, method):
    if method == "rtn":
      return quantize_params(params, rules)
    windows = np.asarray(split.calib_windows)
    batches = [windows[i:i + 8] for i in range(0, len(windows) - len(windows) % 8, 8)]
    return methods.calibrate(llama_lib.calib_fn(cfg), params, batches, rules,
                             methods.GPTQ(act_order=True)).params

  def run(key, label, rules, method, extra):
    if key in done:
      return done[key], None
    t = time.perf_counter()
    q = quantize(rules, method)
    qs = time.perf_counter() - t
    r = ppl_lib.evaluate(cfg, q, split, progress=True, desc=label)
    qbytes = sum(int(getattr(x, "nbytes", 0)) for p, x in rules_lib.tree_leaves_with_paths(q)
                 if p in fisher)
    rec = {"key": key, "method": label, "quant": method, "perplexity": r["perplexity"],
           "bits_per_weight": 8.0 * qbytes / count, "params_bytes": memory_lib.tree_bytes(q),
           "quantize_seconds": qs, "corpus_sha256": split.corpus_sha256,
           "eval_tokens": int(split.eval_windows.size), **extra}
    records.append(rec)
    done[key] = rec
    report_lib.write_json_atomic(res_path, {"records": records})
    print(f"[quantjax] {label}: perplexity {rec['perplexity']:.4f}, "
          f"{rec['bits_per_weight']:.3f} bpw", flush=True)
    return rec, q

  base = done.get("fp32")
  if base is None:
    r = ppl_lib.evaluate(cfg, params, split, progress=True, desc="fp32")
    base = {"key": "fp32", "method": "fp32", "quant": "none", "perplexity": r["perplexity"],
            "bits_per_weight": 32.0, "params_bytes": memory_lib.tree_bytes(params)}
    records.append(base)
    done["fp32"] = base
    report_lib.write_json_atomic(res_path, {"records": records})

  for b in map(float, _BUDGETS.value):
    budget = int(b * count / 8)
    alloc = mixed.allocate(costs, budget, count=count)
    print(f"[quantjax] budget {b} bpw: {alloc.histogram()} "
          f"({alloc.bits_per_weight:.3f} bpw)", flush=True)
    uniform = [f for f, s in sizes.items() if abs(8.0 * s / count - b) <= _TOL.value]
    for method in _METHODS.value:
      run(f"mixed:{b}:{method}", f"{method} mixed @{b}",
          mixed.assignment_rules(alloc, calibration=_CAL.value), method,
          {"budget_bpw": b, "histogram": alloc.histogram(), "family": "mixed"})
      for f in uniform:
        run(f"uniform:{f}:{method}", f"{method} {f}",
            [rules_lib.QuantRule(module_path=TARGETS, format=f,
                                 calibration=mixed.calibration_for(f, _CAL.value))], method,
            {"budget_bpw": b, "family": "uniform"})

  if _GGUF.value:
    from quantjax.eval import llamacpp
    from quantjax.io import gguf as gguf_io
    g_costs = {p: [c for c in v if c.fmt in GGUF_TYPES] for p, v in costs.items()}
    alloc = mixed.allocate(g_costs, int(_GGUF.value * count / 8), count=count)
    key = f"gguf_mixed:{_GGUF.value}"
    path = os.path.join(out, f"mixed-{_GGUF.value}.gguf")
    if key not in done or not os.path.exists(path):
      done.pop(key, None)
      rec, q = run(key, f"gptq mixed GGUF @{_GGUF.value}",
                   mixed.assignment_rules(alloc, calibration=_CAL.value), "gptq",
                   {"budget_bpw": _GGUF.value, "histogram": alloc.histogram(), "family": "mixed"})
      gguf_io.export_gguf(path, cfg, q, tokenizer=src, types=[("embed/embedding", "Q8_0")])
      lc = llamacpp.perplexity(path, split.eval_windows, progress=True)
      rec.update(llamacpp_perplexity=lc["perplexity"], file_bytes=os.path.getsize(path))
      report_lib.write_json_atomic(res_path, {"records": records})
      print(f"[quantjax] {path}: llama.cpp perplexity {lc['perplexity']:.4f}, "
            f"{rec['file_bytes']:,} bytes", flush=True)

  fp = base["perplexity"]
  lines = ["| method | family | bits/weight (kernels) | formats | perplexity | Δ vs FP32 |",
           "|---|---|---:|---|---:|---:|"]
  for r in sorted(records, key=lambda r: (-r["bits_per_weight"], r["perplexity"])):
    hist = ", ".join(f"{k}×{v}" for k, v in r.get("histogram", {}).items())
    lines.append(f"| {r['method']} | {r.get('family', '')} | {r['bits_per_weight']:.3f} | {hist} | "
                 f"{r['perplexity']:.3f} | {100 * (r['perplexity'] / fp - 1):+.1f}% |")
  table = "\n".join(lines)
  report_lib.write_text_atomic(os.path.join(out, "results.md"), table + "\n")
  _plot(records, os.path.join(out, "mixed.png"), fp)
  print(table)


def _plot(records, path: str, fp32: float) -> None:
  """Perplexity vs bits per weight: uniform, mixed, and llama.cpp's files (`--overlay`)."""
  import tempfile

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from quantjax.eval import report as report_lib
  groups: dict[str, list[tuple[float, float, str]]] = {}
  for r in records:
    if r["key"] == "fp32":
      continue
    fam = f"{r.get('family', 'other')} ({r.get('quant', '')}, JAX)"
    groups.setdefault(fam, []).append((r["bits_per_weight"], r["perplexity"], r["method"]))
    if "llamacpp_perplexity" in r:
      groups.setdefault("quantjax GGUF (llama.cpp)", []).append(
          (r["bits_per_weight"], r["llamacpp_perplexity"], r["method"]))
  for f in _OVERLAY.value:
    for r in report_lib.read_json(f, {"records": []})["records"]:
      if "llamacpp_perplexity" in r:  # a record of this script with a GGUF export
        y = r["llamacpp_perplexity"]
      elif "tensor_types" in r:  # a record of experiments.gguf_compare (scored by llama.cpp)
        y = r["perplexity"]
      else:
        continue
      fam = "llama.cpp quantizer" if r["method"].startswith("llama.cpp") else \
          "quantjax GGUF (llama.cpp)"
      groups.setdefault(fam, []).append((r["bits_per_weight"], y, r["method"]))
  markers = "osD^v<>PX*"
  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
  for i, (fam, pts) in enumerate(sorted(groups.items())):
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
               label=fam, zorder=3)
    for x, y, lab in pts:
      ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
  ax.axhline(fp32, color="gray", lw=0.8, ls="--", label=f"FP32 {fp32:.3f}")
  ax.set_xlabel("bits per weight of the linear layers (scales included; embedding excluded)")
  ax.set_ylabel("perplexity (log scale)")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title("SmolLM2-135M: mixed vs uniform formats vs llama.cpp", fontsize=9)
  fig.tight_layout()
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.unlink(tmp)


if __name__ == "__main__":
  app.run(main)
