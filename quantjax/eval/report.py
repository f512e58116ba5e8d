"""Result files: atomic JSON/text writes, markdown tables, Pareto plots."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Column",
    "DEFAULT_COLUMNS",
    "markdown_table",
    "pareto_front",
    "pareto_plot",
    "read_json",
    "write_json_atomic",
    "write_text_atomic",
]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a temp file in the same directory, then `os.replace`s it."""
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
  if hasattr(x, "item"):
    return x.item()
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
  if not os.path.exists(path):
    return default
  with open(path, encoding="utf-8") as f:
    return json.load(f)


Column = tuple[str, str, Callable[[Any], str]]  # (header, key, formatter)


def _f(fmt: str) -> Callable[[Any], str]:
  def g(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return "–"
    return format(v, fmt)
  return g


def _delta(v):
  if v is None:
    return "–"
  return f"{v:+.2f}%"


DEFAULT_COLUMNS: tuple[Column, ...] = (
    ("method", "method", str),
    ("format", "format", str),
    ("quantized leaves", "quantized", str),
    ("bits/weight (quantized)", "bits_per_weight", _f(".3f")),
    ("bits/weight (all)", "bits_per_weight_all", _f(".3f")),
    ("params MB", "params_mb", _f(".1f")),
    ("perplexity", "perplexity", _f(".3f")),
    ("Δ vs FP32", "delta_pct", _delta),
    ("quantize s", "quantize_s", _f(".2f")),
    ("eval tok/s", "eval_tokens_per_s", _f(".0f")),
)


def markdown_table(records: Sequence[Mapping[str, Any]],
                   columns: Sequence[Column] = DEFAULT_COLUMNS) -> str:
  """A GitHub-flavoured markdown table, one row per record."""
  head = "| " + " | ".join(c[0] for c in columns) + " |"
  sep = "|" + "|".join("---" if i < 3 else "---:" for i, _ in enumerate(columns)) + "|"
  rows = []
  for r in records:
    rows.append("| " + " | ".join(c[2](r.get(c[1])) for c in columns) + " |")
  return "\n".join([head, sep, *rows])


def pareto_front(records: Sequence[Mapping[str, Any]], x: str = "params_bytes",
                 y: str = "perplexity") -> list[Mapping[str, Any]]:
  """Records not dominated in (smaller x, smaller y), sorted by x."""
  pts = sorted((r for r in records if r.get(x) is not None and r.get(y) is not None),
               key=lambda r: (r[x], r[y]))
  front, best = [], math.inf
  for r in pts:
    if r[y] < best:
      front.append(r)
      best = r[y]
  return front


def pareto_plot(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                x: str = "params_bytes", y: str = "perplexity", title: str = "",
                label: str = "method") -> None:
  """Scatter of `y` against `x` (MB) with the Pareto front; saved atomically as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  recs = [r for r in records if r.get(x) is not None and r.get(y) is not None]
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  xs = [r[x] / 1e6 for r in recs]
  ys = [r[y] for r in recs]
  ax.scatter(xs, ys, color="tab:blue", zorder=3)
  for i, (r, xv, yv) in enumerate(sorted(zip(recs, xs, ys), key=lambda t: (t[1], t[2]))):
    # Alternate label offsets so that neighbours with equal perplexity stay readable.
    ax.annotate(str(r.get(label, "")), (xv, yv), textcoords="offset points",
                xytext=(4, 5 if i % 2 == 0 else -11), fontsize=8)
  front = pareto_front(recs, x, y)
  if len(front) > 1:
    ax.plot([r[x] / 1e6 for r in front], [r[y] for r in front], color="tab:orange",
            lw=1, zorder=2, label="Pareto front")
    ax.legend(loc="upper right", fontsize=8)
  ax.set_xlabel("parameter bytes (MB, scales included)")
  ax.set_ylabel(y)
  if ys and max(ys) / max(min(ys), 1e-9) > 4:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.unlink(tmp)
