"""Result files: atomic JSON/text writes, markdown tables, Pareto plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from quantjax.eval import memory as memory_lib
from quantjax.io import atomic
from quantjax.optional import require

__all__ = [
    "Column",
    "COMPARISON_COLUMNS",
    "DEFAULT_COLUMNS",
    "build_record",
    "FAMILY_STYLES",
    "family_styles",
    "loss_curves_plot",
    "markdown_table",
    "method_family",
    "pareto_front",
    "pareto_plot",
    "read_json",
    "write_json_atomic",
    "write_report",
    "write_text_atomic",
]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a temp file in the same directory, then `os.replace`s it
  (`quantjax.io.atomic.atomic_write`: the umask applies; errors name `path`)."""
  with atomic.atomic_write(path, "w", encoding="utf-8") as f:
    f.write(text)


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
    # A "|" inside a cell (a path regex like `(attn|mlp)`) would split it: escape it.
    rows.append("| " + " | ".join(c[2](r.get(c[1])).replace("|", "\\|") for c in columns)
                + " |")
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


# ----------------------------------------------------------------------------
# Method families: one marker per family in every plot.
# ----------------------------------------------------------------------------

_PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")

# family -> (marker, colour); families not listed get the next of _EXTRA_STYLES.
FAMILY_STYLES: dict[str, tuple[str, str]] = {
    "fp32": ("*", "black"),
    "cast": ("P", "tab:gray"),
    "rtn": ("o", "tab:blue"),
    "gptq": ("s", "tab:orange"),
    "awq": ("D", "tab:green"),
    "smoothquant": ("v", "tab:purple"),
    "qat": ("^", "tab:red"),
    "prune": ("x", "tab:brown"),
    "prune+distill": ("X", "tab:pink"),
    "prune+distill+rtn": ("h", "tab:olive"),
    "prune+rtn": ("p", "tab:cyan"),
}
_EXTRA_STYLES = (("<", "tab:olive"), (">", "tab:cyan"), ("8", "tab:purple"), ("d", "tab:brown"),
                 ("H", "tab:pink"), ("1", "tab:gray"), ("2", "tab:green"), ("3", "tab:red"))


def _stage_head(stage: str) -> str:
  head = str(stage).strip().split()[0] if str(stage).strip() else ""
  head = head.split("-")[0]  # "qat-lsq" -> "qat"
  if head not in _PRUNE_METHODS and "_" in head:
    head = head.split("_")[0]  # pipeline names: "rtn_int4_g64" -> "rtn", "cast_bf16" -> "cast"
  return head


def method_family(record: Mapping[str, Any]) -> str:
  """The record's method family, e.g. "fp32", "rtn", "gptq", "qat", "prune+distill+rtn".

  An explicit `family` field wins. Otherwise the stages of a chain record
  (`stages`, or the `method` label split at " → ") map to parts: magnitude /
  Wanda / SparseGPT -> "prune", distillation -> "distill", anything else to
  its method name ("rtn_int4_g64" -> "rtn", "qat-lsq int4_g64" -> "qat"),
  joined with "+" in stage order; no stage at all is "fp32".
  """
  if record.get("family"):
    return str(record["family"])
  stages = record.get("stages")
  if stages is None:
    method = str(record.get("method", ""))
    run = record.get("run")
    if run and method.startswith(f"{run}/"):  # labels relabelled by experiments.compare
      method = method[len(run) + 1:]
    stages = [] if method in ("", "fp32") else method.split(" → ")
  parts: list[str] = []
  for stage in stages:
    head = _stage_head(stage)
    part = "prune" if head in _PRUNE_METHODS else head
    if part and part != "fp32" and part not in parts:
      parts.append(part)
  return "+".join(parts) if parts else "fp32"


def family_styles(families: Sequence[str]) -> dict[str, tuple[str, str]]:
  """`{family: (marker, colour)}`: FAMILY_STYLES, then distinct extra markers in sorted order."""
  out: dict[str, tuple[str, str]] = {}
  used = {FAMILY_STYLES[f][0] for f in families if f in FAMILY_STYLES}
  extra = [s for s in _EXTRA_STYLES if s[0] not in used]
  for f in sorted(set(families)):
    if f in FAMILY_STYLES:
      out[f] = FAMILY_STYLES[f]
    else:
      if not extra:
        raise ValueError(f"more than {len(FAMILY_STYLES) + len(_EXTRA_STYLES)} method families "
                         f"to plot: {sorted(set(families))}")
      out[f] = extra.pop(0)
  return out


def _save_figure(fig, path: str | os.PathLike) -> None:
  plt = require("matplotlib.pyplot", "plots", "plots")

  tmp = atomic.temp_path(path)
  try:
    fig.savefig(tmp, format="png")
    atomic.commit_file(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.unlink(tmp)


def pareto_plot(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                x: str = "params_bytes", y: str = "perplexity", title: str = "",
                label: str = "method") -> dict[str, tuple[str, str]]:
  """Scatter of `y` against `x` (MB), one marker per method family, with the Pareto front.

  Saved atomically as PNG. Returns `{family: (marker, colour)}` for the
  families drawn (see `method_family`), in legend order.
  """
  matplotlib = require("matplotlib", "plots", "plots")
  matplotlib.use("Agg")
  plt = require("matplotlib.pyplot", "plots", "plots")
  recs = [r for r in records if r.get(x) is not None and r.get(y) is not None]
  fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
  xs = [r[x] / 1e6 for r in recs]
  ys = [r[y] for r in recs]
  fams = [method_family(r) for r in recs]
  styles = family_styles(fams)
  for fam, (marker, colour) in styles.items():
    pts = [(xv, yv) for xv, yv, f in zip(xs, ys, fams) if f == fam]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, s=45,
               zorder=3, label=fam)
  for i, (r, xv, yv) in enumerate(sorted(zip(recs, xs, ys), key=lambda t: (t[1], t[2]))):
    # Alternate label offsets so that neighbours with equal perplexity stay readable.
    ax.annotate(str(r.get(label, "")), (xv, yv), textcoords="offset points",
                xytext=(4, 5 if i % 2 == 0 else -11), fontsize=7)
  front = pareto_front(recs, x, y)
  if len(front) > 1:
    ax.plot([r[x] / 1e6 for r in front], [r[y] for r in front], color="tab:orange",
            lw=1, zorder=2, label="Pareto front")
  if recs:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="method family",
              title_fontsize=7)
  ax.set_xlabel("parameter bytes (MB, scales included)")
  ax.set_ylabel(y)
  if ys and max(ys) / max(min(ys), 1e-9) > 4:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  _save_figure(fig, path)
  return styles


def loss_curves_plot(curves: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                     title: str = "training loss") -> int:
  """Training-loss curves (distillation, QAT), one line per run; saved atomically as PNG.

  Args:
    curves: `{"label": str, "history": [{"step": int, "loss": float}, ...]}` each.
    path: the PNG to write.

  Returns:
    The number of curves drawn (curves with an empty history are skipped).
  """
  matplotlib = require("matplotlib", "plots", "plots")
  matplotlib.use("Agg")
  plt = require("matplotlib.pyplot", "plots", "plots")
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
  drawn, lo, hi = 0, math.inf, 0.0
  for c in curves:
    hist = [h for h in c.get("history") or () if h.get("loss") is not None]
    if not hist:
      continue
    steps = [h["step"] for h in hist]
    loss = [h["loss"] for h in hist]
    ax.plot(steps, loss, marker="." if len(hist) < 30 else None, lw=1.2, label=str(c["label"]))
    lo, hi = min(lo, min(loss)), max(hi, max(loss))
    drawn += 1
  if drawn:
    ax.legend(loc="upper right", fontsize=7)
    if lo > 0 and hi / lo > 10:
      ax.set_yscale("log")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("training loss")
  ax.grid(True, alpha=0.3)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  _save_figure(fig, path)
  return drawn


# ----------------------------------------------------------------------------
# One record builder and one report writer for every experiment.


def _pct(v):
  return "–" if v is None else f"{100.0 * v:.1f}%"


COMPARISON_COLUMNS: tuple[Column, ...] = (
    ("run", "entry", str),
    ("method", "method", str),
    ("runtime", "runtime", str),
    ("bits/weight (compressed leaves)", "bits_per_weight", _f(".2f")),
    ("model MB", "params_mb", _f(".1f")),
    ("perplexity", "perplexity", _f(".3f")),
    ("Δ vs FP32", "delta_pct", _delta),
    ("KL vs FP32", "kl_mean", _f(".3g")),
    ("top-1 agree", "top1_agreement", _pct),
    ("quantize s", "quantize_s", _f(".1f")),
    ("eval tok/s", "eval_tokens_per_s", _f(".0f")),
)
# Added to the table when some record measured decoding (`eval.speed`).
SPEED_COLUMNS: tuple[Column, ...] = (
    ("prefill tok/s (b=1)", "prefill_tokens_per_s", _f(".0f")),
    ("decode tok/s (b=1)", "decode_tokens_per_s", _f(".1f")),
)


def build_record(evaluation: Mapping[str, Any], *, entry: str, stages: Sequence[str],
                 params: Any = None, base_bytes: int | None = None,
                 stage_infos: Sequence[Mapping[str, Any]] = (), runtime: str = "jax",
                 **extra: Any) -> dict[str, Any]:
  """The one result record: an evaluation plus what produced it.

  Args:
    evaluation: `eval.perplexity.evaluate`'s record (or llama.cpp's scores with
      the same protocol fields).
    entry: the experiment entry (a row name).
    stages: the labels of the stages that transformed the model, in order
      (empty for the uncompressed model).
    params: the evaluated params, for bytes and bits per weight (omit for a file
      scored by another runtime; pass `params_bytes` in `extra` instead).
    base_bytes: bytes of the uncompressed params (for the compression ratio).
    stage_infos: `{"stage", "label", "seconds", ...}` of each stage; the
      quantize / QAT / mixed stages' seconds sum to `quantize_s`.
    runtime: who computed the scores ("jax", "llama.cpp", "transformers").
    extra: more fields (format, file, ...).
  """
  rec = dict(evaluation)
  rec.pop("baseline", None)
  if "per_window_nll" in rec:
    rec["per_window_nll"] = [round(float(v), 6) for v in rec["per_window_nll"]]
  rec.update(entry=entry, method=" → ".join(stages) if stages else "fp32", stages=list(stages),
             runtime=runtime, chain_info=[dict(i) for i in stage_infos])
  rec["quantize_s"] = float(sum(float(i.get("seconds", 0.0)) for i in stage_infos
                                if i.get("stage") in ("quantize", "qat", "mixed")))
  if params is not None:
    nbytes = memory_lib.tree_bytes(params)
    quantized = memory_lib.bits_per_weight(params, quantized_only=True)
    rec.update(params_bytes=int(nbytes), bits_per_weight=quantized if quantized else 32.0,
               bits_per_weight_all=memory_lib.bits_per_weight(params))
  rec.update(extra)
  ref = rec.get("reference_perplexity")
  rec["delta_pct"] = (100.0 * (rec["perplexity"] / ref - 1.0)
                      if ref and rec.get("perplexity") is not None else None)
  if rec.get("params_bytes") is not None:
    rec["params_mb"] = rec["params_bytes"] / 1e6
    if base_bytes:
      rec["compression_vs_fp32"] = base_bytes / rec["params_bytes"]
  return rec


def write_report(workdir: str | os.PathLike, records: Sequence[Mapping[str, Any]], *,
                 title: str, notes: Sequence[str] = (),
                 columns: Sequence[Column] = COMPARISON_COLUMNS) -> str:
  """Writes `results.json`, `results.md` (table, protocol, notes) and `pareto.png`.

  Returns the markdown text.
  """
  workdir = os.fspath(workdir)
  write_json_atomic(os.path.join(workdir, "results.json"), {"records": records})
  if not records:
    return ""
  r0 = records[0]
  protocol = (
      f"Protocol: corpus `{r0.get('corpus')}` (sha256 {str(r0.get('corpus_sha256', ''))[:12]}…, "
      f"{r0.get('corpus_tokens', 0):,} tokens), last {r0.get('eval_tokens', 0):,} tokens as "
      f"{r0.get('eval_windows')} independent windows of {r0.get('window')} "
      f"({r0.get('predicted_tokens', 0):,} predicted tokens"
      + (", each window prefixed with BOS" if r0.get("bos") else "") + "), "
      f"activations {r0.get('dtype')}, perplexity = exp(mean NLL); KL and top-1 agreement "
      f"against the FP32 model on the same tokens (KL over its top-{r0.get('kl_top_k', '?')} "
      "tokens plus one bucket for the rest: a lower bound of the full KL). "
      f"Calibration: {r0.get('calib_windows')} windows of {r0.get('window')} tokens drawn "
      + (f"from `{r0.get('calib_corpus')}` (another text: cross-domain)"
         if r0.get("calib_corpus") not in (None, r0.get("corpus"))
         else "before the evaluation text")
      + f" (seed {r0.get('seed')}). "
      f"jax {r0.get('jax_version')} on {r0.get('device')} ({r0.get('cpu', '?')}, "
      f"{r0.get('cpu_count')} CPUs).")
  if any(r.get("decode_tokens_per_s") is not None for r in records):
    columns = tuple(columns) + SPEED_COLUMNS
  text = "\n".join([f"# {title}", "", markdown_table(records, columns), "", protocol, "",
                    *[n + "\n" for n in notes if n]])
  write_text_atomic(os.path.join(workdir, "results.md"), text)
  pareto_plot(records, os.path.join(workdir, "pareto.png"),
              title=f"{title}: perplexity vs model bytes", label="entry")
  return text
