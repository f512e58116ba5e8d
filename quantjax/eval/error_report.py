"""Per-layer quantization error: weight SQNR, output SQNR, tables, bar chart, sensitivity.

* weight SQNR of a leaf: `10 log10(||W||^2 / ||W - Q||^2)` dB;
* output SQNR of a weight: `10 log10(||XW||^2 / ||XW - XQ||^2)` on its
  matmul inputs `X` taken from the float model (the layer's own error, not
  accumulated), on any model through `quantjax.methods.capture`;
* `sensitivity_scan`: quantize one leaf at a time and measure any metric.

Tables are markdown; the chart is a PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.methods import capture
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from quantjax.optional import require

_QUANT_TYPES = (QArray, ActQuantized, InputScaled)

__all__ = ["sqnr_db", "weight_sqnr_table", "output_sqnr_table", "markdown_table",
           "bar_chart", "sensitivity_scan"]


def sqnr_db(ref: Any, approx: Any) -> float:
  """`10 log10(||ref||^2 / ||ref - approx||^2)`; inf when they are equal."""
  r = np.asarray(ref, np.float64)
  a = np.asarray(approx, np.float64)
  noise = float(np.sum((r - a) ** 2))
  sig = float(np.sum(r ** 2))
  if noise == 0.0:
    return math.inf
  if sig == 0.0:
    return -math.inf
  return 10.0 * math.log10(sig / noise)


def _inner_qarray(x):
  while isinstance(x, (ActQuantized, InputScaled)):
    x = x.weight
  return x


def _effective(x):
  if isinstance(x, InputScaled):
    return x.effective(jnp.float32)
  q = _inner_qarray(x)
  return q.dequantize(jnp.float32) if isinstance(q, QArray) else jnp.asarray(q, jnp.float32)


def weight_sqnr_table(float_params: Any, quant_params: Any) -> list[dict[str, Any]]:
  """One row per quantized leaf: path, format, shape, bits/value, weight SQNR
  (of the effective weight: input scales of AWQ / SmoothQuant included)."""
  ref = dict(rules_lib.tree_leaves_with_paths(float_params))
  rows = []
  for path, leaf in rules_lib.tree_leaves_with_paths(quant_params):
    q = _inner_qarray(leaf)
    if not isinstance(q, QArray):
      continue
    if path not in ref:
      raise KeyError(f"{path} is quantized but has no float counterpart")
    rows.append({"path": path, "format": q.fmt.name, "shape": "x".join(map(str, q.shape)),
                 "bits": round(8.0 * leaf.nbytes / max(q.size, 1), 3),
                 "weight_sqnr_db": sqnr_db(_effective(ref[path]), _effective(leaf))})
  return rows


def output_sqnr_table(fn: Callable[[Any, Any], Any], float_params: Any, quant_params: Any,
                      batches: Iterable[Any], *, rows: list[dict[str, Any]] | None = None,
                      progress: bool = False) -> list[dict[str, Any]]:
  """Adds `output_sqnr_db` to the weight-table rows and returns them.

  For every quantized leaf, the SQNR of its matmul outputs `X W` vs `X Q` on
  the float model's inputs `X` (the layer's own error, not accumulated),
  over `batches`, on any model `fn(params, batch)`: computed from the input
  Hessian as `tr(W^T X^T X W) / tr(E^T X^T X E)`, `E = W - Q`, with `Q` the
  leaf's effective float weight (input scales included; activation
  quantization not). Stacked weights get one row per layer slice.
  """
  fp = dict(rules_lib.tree_leaves_with_paths(float_params))
  qp = dict(rules_lib.tree_leaves_with_paths(quant_params))
  paths = [p for p, leaf in qp.items() if isinstance(leaf, _QUANT_TYPES)]
  if not paths:
    raise ValueError("output_sqnr_table: quant_params holds no quantized leaf")
  rows = weight_sqnr_table(float_params, quant_params) if rows is None else rows
  by_path = {r["path"]: r for r in rows}
  rules = [rules_lib.QuantRule(module_path=re.escape(p), format="int8") for p in paths]
  acc: dict[str, tuple[float, float]] = {}

  class _OutputError:
    label = "output SQNR"
    needs = frozenset({"hessian"})
    rule_type = rules_lib.QuantRule

    def apply(self, parts, record):
      for part in parts:
        q = capture.effective_weight(qp[part.path], jnp.float32)
        q = q[part.layout.index] if part.region else q
        w = part.matrix()
        e = w - part.layout.to_matrix(q)
        xtx = jnp.asarray(part.stats.xtx)
        sig = float(jnp.sum(w * (xtx @ w)))
        noise = float(jnp.sum(e * (xtx @ e)))
        acc[part.name] = (sig, noise)
      return {}

  capture.calibrate(fn, float_params, batches, rules, _OutputError(), mode="one_pass",
                    progress=progress)
  out = []
  for name, (sig, noise) in acc.items():
    db = math.inf if noise <= 0 else (10.0 * math.log10(sig / noise) if sig > 0 else -math.inf)
    path = name.split("[", 1)[0]
    row = by_path.get(path)
    if name != path or row is None:
      row = dict(by_path.get(path, {"path": path}), path=name)
      out.append(row)
    row["output_sqnr_db"] = db
  return rows + out


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".2f") -> str:
  """Rows of dicts as a markdown table (floats with `floatfmt`)."""
  if not rows:
    return "(no rows)\n"
  columns = list(columns or rows[0].keys())

  def cell(v):
    if isinstance(v, float):
      return format(v, floatfmt) if math.isfinite(v) else str(v)
    return str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict[str, Any]], path: str, *, keys: Sequence[str] = (
    "weight_sqnr_db", "output_sqnr_db"), title: str = "per-layer SQNR") -> str:
  """Writes a grouped bar chart (one bar group per row) to `path` (PNG)."""
  matplotlib = require("matplotlib", "plots", "plots")
  matplotlib.use("Agg")
  plt = require("matplotlib.pyplot", "plots", "plots")
  keys = [k for k in keys if any(k in r for r in rows)]
  if not rows or not keys:
    raise ValueError(f"nothing to plot: rows={len(rows)}, keys={keys}")
  n = len(rows)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n + 2), 4.0))
  width = 0.8 / len(keys)
  xs = np.arange(n)
  for j, k in enumerate(keys):
    vals = [r.get(k, np.nan) for r in rows]
    vals = [v if v is not None and math.isfinite(v) else np.nan for v in vals]
    ax.bar(xs + j * width - 0.4 + width / 2, vals, width, label=k)
  ax.set_xticks(xs)
  ax.set_xticklabels([r["path"].replace("layers/", "L").replace("/kernel", "") for r in rows],
                     rotation=90, fontsize=6)
  ax.set_ylabel("dB")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def sensitivity_scan(params: Any, paths: Sequence[str],
                     quantize_one: Callable[[Any, str], Any],
                     metric: Callable[[Any], float], *, progress: bool = False
                     ) -> list[dict[str, Any]]:
  """Quantizes one leaf at a time and measures `metric` (e.g. perplexity on a
  few windows, or logits SQNR); rows sorted from most to least sensitive
  (largest change from the unquantized metric first)."""
  base = float(metric(params))
  rows = []
  it = paths
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(paths, desc="sensitivity")
  for p in it:
    m = float(metric(quantize_one(params, p)))
    rows.append({"path": p, "metric": m, "delta": m - base})
  rows.sort(key=lambda r: -abs(r["delta"]))
  return rows
