"""Per-layer quantization error: weight SQNR, output SQNR, tables, bar chart, sensitivity.

* weight SQNR of a leaf: `10 log10(||W||^2 / ||W - Q||^2)` dB;
* output SQNR of a linear: `10 log10(||XW||^2 / ||XW - XQ||^2)` on its
  calibration inputs `X` taken from the float model (the layer's own error,
  not accumulated);
* block output SQNR: the hidden state after each decoder block of the
  quantized model against the float model's, on the same calibration
  windows (accumulated error);
* `sensitivity_scan`: quantize one leaf at a time and measure any metric.

Tables are markdown; the chart is a PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.numerics.qarray import ActQuantized, QArray

__all__ = ["sqnr_db", "weight_sqnr_table", "output_sqnr_table", "block_sqnr", "markdown_table",
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


def _unwrap(x):
  return x.weight if isinstance(x, ActQuantized) else x


def weight_sqnr_table(float_params: Any, quant_params: Any) -> list[dict[str, Any]]:
  """One row per quantized leaf: path, format, shape, bits/value, weight SQNR."""
  ref = dict(rules_lib.tree_leaves_with_paths(float_params))
  rows = []
  for path, leaf in rules_lib.tree_leaves_with_paths(quant_params):
    q = _unwrap(leaf)
    if not isinstance(q, QArray):
      continue
    if path not in ref:
      raise KeyError(f"{path} is quantized but has no float counterpart")
    rows.append({"path": path, "format": q.fmt.name, "shape": "x".join(map(str, q.shape)),
                 "bits": round(q.bits_per_value, 3),
                 "weight_sqnr_db": sqnr_db(_unwrap(ref[path]), q.dequantize(jnp.float32))})
  return rows


def output_sqnr_table(config: Any, float_params: Any, quant_params: Any, tokens: np.ndarray, *,
                      batch_size: int = 8, rows: list[dict[str, Any]] | None = None
                      ) -> list[dict[str, Any]]:
  """Adds `output_sqnr_db` (each linear on the float model's inputs) to the
  weight table rows of a `quantjax.models.llama` model, and returns them."""
  from quantjax.methods import sequential as seq
  fp = seq.to_pure(float_params)
  qp = seq.to_pure(quant_params)
  rows = weight_sqnr_table(fp, qp) if rows is None else rows
  by_path = {r["path"]: r for r in rows}
  x_all, cos, sin, mask = seq.embed_inputs(config, fp, tokens)
  acc: dict[str, list[float]] = {}
  for i in range(config.num_layers):
    lf, lq = fp["layers"][i], qp["layers"][i]
    nxt = []
    for b in range(0, x_all.shape[0], batch_size):
      x = x_all[b:b + batch_size]
      n = x.shape[0]
      out, ins = seq._block_jit(config, lf, x, cos[:n], sin[:n], mask[:n])
      nxt.append(out)
      for name in seq.LINEARS:
        path = f"layers/{i}/{name}"
        if path not in by_path:
          continue
        xin = ins[seq.INPUT_OF[name]].reshape(-1, ins[seq.INPUT_OF[name]].shape[-1])
        w = jnp.asarray(seq._get(lf, name), jnp.float32)
        q = _unwrap(seq._get(lq, name)).dequantize(jnp.float32)
        y = xin.astype(jnp.float32) @ w
        yq = xin.astype(jnp.float32) @ q
        s = acc.setdefault(path, [0.0, 0.0])
        s[0] += float(jnp.sum(y * y))
        s[1] += float(jnp.sum((y - yq) ** 2))
    x_all = jnp.concatenate(nxt)
  for path, (sig, noise) in acc.items():
    by_path[path]["output_sqnr_db"] = (math.inf if noise == 0 else
                                       10.0 * math.log10(sig / noise) if sig > 0 else -math.inf)
  return rows


def block_sqnr(config: Any, float_params: Any, quant_params: Any, tokens: np.ndarray, *,
               batch_size: int = 8) -> list[float]:
  """SQNR (dB) of the hidden state after each block, quantized vs float model."""
  from quantjax.methods import sequential as seq
  fp, qp = seq.to_pure(float_params), seq.to_pure(quant_params)
  xf, cos, sin, mask = seq.embed_inputs(config, fp, tokens)
  xq, _, _, _ = seq.embed_inputs(config, qp, tokens)
  out = []
  for i in range(config.num_layers):
    nf, nq = [], []
    for b in range(0, xf.shape[0], batch_size):
      n = xf[b:b + batch_size].shape[0]
      r = (cos[:n], sin[:n], mask[:n])
      nf.append(seq._block_out(config, fp["layers"][i], xf[b:b + batch_size], *r))
      nq.append(seq._block_out(config, qp["layers"][i], xq[b:b + batch_size], *r))
    xf, xq = jnp.concatenate(nf), jnp.concatenate(nq)
    out.append(sqnr_db(xf, xq))
  return out


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
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
