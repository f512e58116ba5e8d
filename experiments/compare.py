"""Merges results directories into one table and one Pareto plot.

    python -m experiments.compare --out=runs/compare runs/default runs/other

Records are labelled `<dir name>/<method>` when more than one directory is
given. Records measured under different protocols (corpus hash, evaluation
tokens, window) are refused unless `--allow_mixed`, since their perplexities
are not comparable.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from quantjax.eval import report

_OUT = flags.DEFINE_string("out", None, "Directory for compare.md / compare.json / pareto.png.")
_MIXED = flags.DEFINE_bool("allow_mixed", False, "Allow records from different protocols.")

_PROTOCOL = ("corpus_sha256", "eval_tokens", "window")


def merge(dirs: list[str], *, allow_mixed: bool = False) -> list[dict]:
  """The records of every `results.json` under `dirs`, relabelled by directory."""
  out = []
  for d in dirs:
    data = report.read_json(os.path.join(d, "results.json"))
    if data is None:
      raise FileNotFoundError(f"no results.json in {d}")
    for r in data["records"]:
      r = dict(r)
      r["run"] = os.path.basename(os.path.normpath(d))
      if len(dirs) > 1:
        r["method"] = f"{r['run']}/{r['method']}"
      out.append(r)
  keys = {tuple(r.get(k) for k in _PROTOCOL) for r in out}
  if len(keys) > 1 and not allow_mixed:
    raise ValueError(f"records come from {len(keys)} different protocols "
                     f"({', '.join(_PROTOCOL)}): {sorted(map(str, keys))}; "
                     "pass --allow_mixed to merge anyway")
  return out


def main(argv):
  dirs = argv[1:]
  if not dirs:
    raise app.UsageError("give one or more results directories")
  out = _OUT.value or "runs/compare"
  records = merge(dirs, allow_mixed=_MIXED.value)
  table = report.markdown_table(records)
  report.write_json_atomic(os.path.join(out, "compare.json"), {"records": records})
  report.write_text_atomic(os.path.join(out, "compare.md"), table + "\n")
  report.pareto_plot(records, os.path.join(out, "pareto.png"), title="perplexity vs size")
  print(table)


if __name__ == "__main__":
  app.run(main)
