"""Merges results directories into one table, one Pareto plot and training-loss curves.

    python -m experiments.compare --out=runs/compare runs/default runs/pdq runs/qat

Each argument is a results directory (`results.json` inside) or a sweep's
work directory, whose sub-directories hold the results (`runs/qat/rtn`,
`runs/qat/qat_lsq`, ...). Records are labelled `<directory>/<method>` when
more than one results file is merged (`<directory>/<entry>/<method>` where
that label would repeat), and get a `family` (see
`quantjax.eval.report.method_family`): the Pareto plot draws one marker per
family. A record without a Δ vs FP32 (a sweep entry that did not evaluate
FP32 itself) gets one from the merged FP32 record of the same model and
protocol; repeated FP32 records of the same model and protocol are kept once.
Records measured under different protocols (corpus hash, evaluation tokens,
window) are refused unless `--allow_mixed`, since their perplexities are not
comparable.

Distillation and QAT stages of the runner (`stages/distill-<key>/done.json`,
`stages/qat-<key>/done.json`, found anywhere under the given directories)
record their loss history; `loss_curves.png` draws them, one line per run.

Writes `compare.md`, `compare.json`, `pareto.png` and `loss_curves.png` to `--out`.

    python -m experiments.compare --by_text --out=runs/texts runs/default runs/default_kjv ...

With `--by_text` the directories are runs of one config on different texts
(or with calibration from another text, `data.calib_corpus`): one row per
sweep entry, the perplexity and its increase over that text's FP32 per
directory, side by side (`texts.md`, `texts.json`); protocols may differ.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags

from quantjax.eval import report


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module (tests, other
  tools with an `--out` of their own) defines no flags."""
  flags.DEFINE_string("out", None, "Directory for compare.md / compare.json / pareto.png.")
  flags.DEFINE_bool("allow_mixed", False, "Allow records from different protocols.")
  flags.DEFINE_bool("by_text", False, "One row per entry, one column group per directory "
                    "(runs of one config on different texts).")


_PROTOCOL = ("corpus_sha256", "eval_tokens", "window")
_TRAIN_STAGES = ("distill", "qat")

COLUMNS = (("family", "family", str),) + tuple(report.COMPARISON_COLUMNS)


def results_files(d: str) -> list[tuple[str, str]]:
  """`[(run name, results.json path)]` of `d` itself, else of its sub-directories (a sweep)."""
  own = os.path.join(d, "results.json")
  base = os.path.basename(os.path.normpath(d))
  if os.path.isfile(own):
    return [(base, own)]
  if not os.path.isdir(d):
    raise FileNotFoundError(f"no results directory {d}")
  subs = sorted(s for s in os.listdir(d)
                if os.path.isfile(os.path.join(d, s, "results.json")))
  if not subs:
    raise FileNotFoundError(f"no results.json in {d} or in its sub-directories")
  return [(f"{base}/{s}", os.path.join(d, s, "results.json")) for s in subs]


def _protocol(r: dict) -> tuple:
  return (r.get("model"),) + tuple(r.get(k) for k in _PROTOCOL)


def merge(dirs: list[str], *, allow_mixed: bool = False) -> list[dict]:
  """The records of every results file under `dirs`, relabelled by run, with families."""
  files = [f for d in dirs for f in results_files(d)]
  out = []
  for run, path in files:
    data = report.read_json(path)
    for r in data["records"]:
      r = dict(r)
      r["run"] = run
      r["family"] = report.method_family(r)
      out.append(r)
  if len(files) > 1:
    # `<directory>/<method>`; a sweep's entry directory only where labels would collide.
    short = [f"{r['run'].split('/')[0]}/{r['method']}" for r in out]
    for r, label in zip(out, short):
      r["method"] = label if short.count(label) == 1 else f"{r['run']}/{r['method']}"
  keys = {tuple(r.get(k) for k in _PROTOCOL) for r in out}
  if len(keys) > 1 and not allow_mixed:
    raise ValueError(f"records come from {len(keys)} different protocols "
                     f"({', '.join(_PROTOCOL)}): {sorted(map(str, keys))}; "
                     "pass --allow_mixed to merge anyway")
  # One FP32 record per model and protocol; it is the base of missing deltas.
  base: dict[tuple, dict] = {}
  merged = []
  for r in out:
    if r["family"] == "fp32" and r.get("perplexity") is not None:
      first = base.setdefault(_protocol(r), r)
      if first is not r and abs(first["perplexity"] / r["perplexity"] - 1.0) < 1e-6:
        continue  # the same baseline measured again by another run
    merged.append(r)
  for r in merged:
    b = base.get(_protocol(r))
    if r.get("delta_pct") is None and b is not None and r.get("perplexity") is not None:
      r["delta_pct"] = 100.0 * (r["perplexity"] / b["perplexity"] - 1.0)
  return merged


def loss_curves(dirs: list[str]) -> list[dict[str, Any]]:
  """`[{"label", "stage", "steps", "tokens", "seconds", "history"}]` of every distill/QAT stage."""
  curves = []
  for d in dirs:
    top = os.path.dirname(os.path.normpath(d))
    for root, subdirs, files in os.walk(d):
      subdirs.sort()
      if "done.json" not in files:
        continue
      with open(os.path.join(root, "done.json"), encoding="utf-8") as f:
        try:
          done = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"corrupt stage record {root}/done.json: {e}") from None
      info = done.get("info") or {}
      history = done.get("history") or info.get("history")
      if done.get("stage") not in _TRAIN_STAGES or not history:
        continue
      parent = os.path.dirname(root)  # `<workdir>/stages/<stage>-<key>`
      if os.path.basename(parent) == "stages":
        parent = os.path.dirname(parent)
      run = os.path.relpath(parent, top)
      label = info.get("label") or done.get("label") or done["stage"]
      curves.append({"label": f"{run}: {label}", "stage": done["stage"],
                     "steps": info.get("steps"), "tokens": info.get("tokens"),
                     "seconds": info.get("seconds"), "history": history})
  return curves


def compare(dirs: list[str], out: str, *, allow_mixed: bool = False) -> dict[str, Any]:
  """Writes the merged table, JSON, Pareto plot and loss curves of `dirs` into `out`."""
  records = merge(dirs, allow_mixed=allow_mixed)
  curves = loss_curves(dirs)
  table = report.markdown_table(records, COLUMNS)
  report.write_json_atomic(os.path.join(out, "compare.json"),
                           {"records": records, "loss_curves": curves})
  text = table + "\n"
  if curves:
    text += "\n| training run | steps | tokens | wall s | first loss | last loss |\n"
    text += "|---|---:|---:|---:|---:|---:|\n"
    for c in curves:
      h = c["history"]
      text += (f"| {c['label']} | {c['steps']} | {c['tokens']} | "
               f"{c['seconds'] or 0:.0f} | {h[0]['loss']:.4f} | {h[-1]['loss']:.4f} |\n")
  report.write_text_atomic(os.path.join(out, "compare.md"), text)
  styles = report.pareto_plot(records, os.path.join(out, "pareto.png"),
                              title="perplexity vs size (one marker per method family)")
  drawn = report.loss_curves_plot(curves, os.path.join(out, "loss_curves.png"),
                                  title="distillation / QAT training loss")
  print(text)
  return {"records": records, "curves": curves, "families": styles, "curves_drawn": drawn}


def _text_label(recs: list[dict]) -> str:
  r = next((r for r in recs if r.get("corpus")), {})
  corpus, calib = r.get("corpus", "?"), r.get("calib_corpus")
  return corpus if not calib or calib == corpus else f"{corpus}, calibrated on {calib}"


def by_text(dirs: list[str], out: str) -> dict[str, Any]:
  """Perplexity and Δ vs the same text's FP32 per entry, one column pair per directory."""
  cols, rows, order = [], {}, []
  for d in dirs:
    files = results_files(d)
    recs = [r for _, path in files for r in report.read_json(path)["records"]]
    label = f"{os.path.basename(os.path.normpath(d))}: {_text_label(recs)}"
    base = next((r["perplexity"] for r in recs
                 if report.method_family(r) == "fp32" and r.get("perplexity")), None)
    cols.append(label)
    for r in recs:
      if r.get("perplexity") is None:
        continue
      key = (r.get("entry") or r["method"], r.get("runtime", "jax"))
      if key not in rows:
        rows[key] = {"entry": key[0], "runtime": key[1], "method": r["method"]}
        order.append(key)
      delta = r.get("delta_pct")
      if delta is None and base:
        delta = 100.0 * (r["perplexity"] / base - 1.0)
      rows[key][label] = {"perplexity": r["perplexity"], "delta_pct": delta,
                          "kl_mean": r.get("kl_mean")}
  head = "| entry | runtime | " + " | ".join(f"{c} ppl | Δ | KL" for c in cols) + " |"
  lines = [head, "|---|---|" + "---:|---:|---:|" * len(cols)]
  for key in order:
    row = rows[key]
    cells = []
    for c in cols:
      v = row.get(c)
      if v is None:
        cells += ["–", "–", "–"]
        continue
      cells += [f"{v['perplexity']:.3f}",
                "–" if v["delta_pct"] is None else f"{v['delta_pct']:+.2f}%",
                "–" if v["kl_mean"] is None else f"{v['kl_mean']:.3g}"]
    lines.append(f"| {row['entry']} | {row['runtime']} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  table = [rows[k] for k in order]
  report.write_json_atomic(os.path.join(out, "texts.json"), {"columns": cols, "rows": table})
  report.write_text_atomic(os.path.join(out, "texts.md"), text)
  print(text)
  return {"columns": cols, "rows": table}


def main(argv):
  dirs = argv[1:]
  if not dirs:
    raise app.UsageError("give one or more results directories")
  f = flags.FLAGS
  if f.by_text:
    by_text(dirs, f.out or "runs/texts")
  else:
    compare(dirs, f.out or "runs/compare", allow_mixed=f.allow_mixed)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
