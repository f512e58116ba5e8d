"""Runs a comparison config: load → quantize (per method) → evaluate → report.

`run(config, workdir)` is importable (tests call it on a tiny config). The
work directory receives

* `config.json`   the config snapshot of the latest run;
* `results.json`  `{"records": [...]}`, one record per method with the
                  protocol fields (model, corpus hash, token counts, window,
                  dtype, seed, jax/jaxlib versions, device, wall times);
* `results.md`    the markdown table (also printed) and its caveats;
* `pareto.png`    perplexity against parameter bytes.

Every write is atomic (temp file + `os.replace`) and happens after each
method, so an interrupted run resumes: a method whose record exists with the
same protocol key (model, corpus hash, token counts, format, targets) is
skipped.
"""

from __future__ import annotations

import os
import time
from typing import Any

from quantjax.eval import data as data_lib
from quantjax.eval import perplexity as ppl_lib
from quantjax.eval import report as report_lib

__all__ = ["run", "method_spec", "Q4_1_CAVEAT"]


Q4_1_CAVEAT = (
    "Caveat: SmolLM2-135M ships as a Q4_1 GGUF, so the FP32 baseline weights already lie on "
    "a Q4_1 grid (groups of 32, value = min + step·q with a float min). 4-bit group-32 "
    "quantization with a float offset reproduces them exactly (rtn_int4_g32_asymf: +0.00%), "
    "while an integer zero point does not. Methods are therefore compared at group 64, "
    "per-channel, symmetric and 3 bits.")

_KEY_FIELDS = ("method", "format", "quantized", "model", "corpus_sha256", "corpus_tokens",
               "eval_tokens", "window", "dtype", "seed")


def method_spec(name: str) -> tuple[str, str | None]:
  """`"fp32"` -> ("fp32", None); `"rtn_int4_g64"` -> ("rtn", "int4_g64"); `"cast_bf16"`."""
  if name == "fp32":
    return "fp32", None
  kind, sep, fmt = name.partition("_")
  if not sep or kind not in ("rtn", "cast") or not fmt:
    raise ValueError(f"unknown method {name!r}: expected 'fp32', 'cast_<float format>' or "
                     "'rtn_<format spec>' (e.g. rtn_int4_g64_asym)")
  from quantjax.numerics.formats import QuantFormat
  parsed = QuantFormat.parse(fmt)  # raises a clear error on a bad spec
  if kind == "cast" and not parsed.is_cast:
    raise ValueError(f"method {name!r}: 'cast_' needs a float format (bf16, fp16), got {fmt!r}")
  return kind, fmt


def _load_model(config):
  from quantjax.models import load as load_lib
  m = config.model
  if m.source == "smollm2":
    path = load_lib.smollm2_path()
    cfg, params, tok = load_lib.load_gguf(path)
    name = "SmolLM2-135M-Instruct (Q4_1 GGUF → FP32)"
  elif m.source == "gguf":
    cfg, params, tok = load_lib.load_gguf(m.path)
    name = os.path.basename(m.path)
  elif m.source == "hf":
    cfg, params, tok = load_lib.load_hf(m.path)
    if tok is None:
      raise ValueError(f"model directory {m.path} has no tokenizer")
    name = os.path.basename(os.path.normpath(m.path))
  else:
    raise ValueError(f"config.model.source must be smollm2, gguf or hf; got {m.source!r}")
  cfg = cfg.replace(dtype=m.dtype, name=name)
  return cfg, params, tok


def _rules(config, fmt_spec: str):
  from quantjax.numerics.formats import QuantFormat
  from quantjax.rules import QuantRule
  fmt = QuantFormat.parse(fmt_spec)
  rules = [QuantRule(module_path=config.quantize.targets, format=fmt)]
  if config.quantize.embeddings:
    # The table [vocab, d] is contracted over d when used as the tied head:
    # one scale per row, groups along d.
    rules.append(QuantRule(module_path=r"embed/embedding",
                           format=fmt if fmt.is_cast else fmt.replace(channel_axis=0, group_axis=1)))
    rules.append(QuantRule(module_path=r"lm_head/kernel", format=fmt))
  return rules


def _quantized_label(config) -> str:
  return "*_proj + embeddings" if config.quantize.embeddings else "*_proj (emb FP32)"


def _key(rec) -> tuple:
  return tuple(rec.get(k) for k in _KEY_FIELDS)


def _write_reports(workdir: str, records: list[dict], config, model_name: str) -> str:
  report_lib.write_json_atomic(os.path.join(workdir, "results.json"), {"records": records})
  if not records:
    return ""
  r0 = records[0]
  lines = [
      f"# {model_name}: weight quantization",
      "",
      report_lib.markdown_table(records),
      "",
      f"Protocol: corpus `{r0['corpus']}` (sha256 {r0['corpus_sha256'][:12]}…, "
      f"{r0['corpus_tokens']:,} tokens), last {r0['eval_tokens']:,} tokens as "
      f"{r0['eval_windows']} independent windows of {r0['window']} "
      f"({r0['predicted_tokens']:,} predicted tokens), activations {r0['dtype']}, "
      f"perplexity = exp(mean NLL). jax {r0['jax_version']} on {r0['device']} "
      f"({r0.get('cpu', '?')}, {r0['cpu_count']} CPUs).",
      "",
      f"Quantized leaves: `{config.quantize.targets}`"
      + (" plus the embedding table / lm_head." if config.quantize.embeddings else
         "; the embedding table (tied output head) and the norms stay FP32 and are counted "
         "in 'params MB' and 'bits/weight (all)'. 'bits/weight (quantized)' counts the "
         "quantized leaves only, scales and zero points included."),
      "",
      Q4_1_CAVEAT,
      "",
  ]
  text = "\n".join(lines)
  report_lib.write_text_atomic(os.path.join(workdir, "results.md"), text)
  report_lib.pareto_plot(records, os.path.join(workdir, "pareto.png"),
                         title=f"{model_name}: perplexity vs size ({r0['eval_tokens']} tokens)")
  return text


def run(config, workdir: str) -> list[dict[str, Any]]:
  """Runs every method of `config` not already recorded in `workdir`.

  Returns the records (in `config.methods` order).
  """
  from quantjax.eval import memory as memory_lib
  from quantjax.eval import speed as speed_lib
  from quantjax.transforms import quantize_params

  t_start = time.perf_counter()
  methods = [m.strip() for m in str(config.methods).split(",") if m.strip()]
  specs = {m: method_spec(m) for m in methods}  # validate before any heavy work
  if "fp32" not in methods:
    methods.insert(0, "fp32")  # the baseline every delta refers to
    specs["fp32"] = ("fp32", None)
  protocol = data_lib.Protocol(eval_tokens=int(config.eval.tokens),
                               window=int(config.eval.window),
                               calib_windows=int(config.calib.windows),
                               seed=int(config.calib.seed))
  os.makedirs(workdir, exist_ok=True)
  report_lib.write_text_atomic(os.path.join(workdir, "config.json"),
                               config.to_json_best_effort(indent=2) + "\n")

  t0 = time.perf_counter()
  cfg, params, tok = _load_model(config)
  load_s = time.perf_counter() - t0
  split = data_lib.load_split(tok, config.data.corpus, protocol)
  print(f"[quantjax] loaded {cfg.name} in {load_s:.1f}s; corpus {split.corpus}: "
        f"{split.num_tokens:,} tokens, evaluating the last {protocol.eval_tokens:,} "
        f"({protocol.eval_windows} windows of {protocol.window})", flush=True)

  old = report_lib.read_json(os.path.join(workdir, "results.json"), {"records": []})
  old_records = {r["method"]: r for r in old.get("records", [])}
  records: dict[str, dict] = {}
  quantized_label = _quantized_label(config)
  base_bytes = memory_lib.tree_bytes(params)

  for name in methods:
    kind, fmt = specs[name]
    want = {"method": name, "format": fmt or "fp32", "quantized": "–" if kind == "fp32"
            else quantized_label, "model": cfg.name, "dtype": cfg.dtype}
    want.update({k: v for k, v in split.record().items() if k in _KEY_FIELDS})
    prev = old_records.get(name)
    if prev is not None and _key(prev) == _key(want):
      print(f"[quantjax] {name}: already in {workdir}, skipped "
            f"(perplexity {prev['perplexity']:.3f})", flush=True)
      records[name] = prev
      continue
    if kind == "fp32":
      qparams, quantize_s = params, 0.0
    else:
      qparams, quantize_s = speed_lib.quantize_time(
          lambda: quantize_params(params, _rules(config, fmt)))
    rec = dict(want)
    rec.update(ppl_lib.evaluate(cfg, qparams, split, batch_size=int(config.eval.batch_size),
                                progress=bool(config.eval.progress), model_name=cfg.name,
                                desc=name))
    rec["per_window_nll"] = [round(v, 6) for v in rec["per_window_nll"]]
    nbytes = memory_lib.tree_bytes(qparams)
    rec.update({
        "method": name,
        "format": fmt or "fp32",
        "quantized": want["quantized"],
        "params_bytes": int(nbytes),
        "params_mb": nbytes / 1e6,
        "compression_vs_fp32": base_bytes / nbytes,
        "bits_per_weight": (memory_lib.bits_per_weight(qparams, quantized_only=True)
                            if kind != "fp32" else 32.0),
        "bits_per_weight_all": memory_lib.bits_per_weight(qparams),
        "quantize_s": quantize_s,
        "load_s": load_s,
    })
    if config.speed.enabled:
      rec["speed"] = speed_lib.prefill_decode(
          cfg, qparams, batch_sizes=tuple(config.speed.batch_sizes),
          prompt_len=int(config.speed.prompt_len), decode_steps=int(config.speed.decode_steps))
    records[name] = rec
    print(f"[quantjax] {name}: perplexity {rec['perplexity']:.4f}, "
          f"{rec['bits_per_weight']:.2f} bits/weight, {rec['params_mb']:.1f} MB, "
          f"eval {rec['eval_s']:.1f}s ({rec['eval_tokens_per_s']:.0f} tok/s)", flush=True)
    _finalize(records, methods)
    _write_reports(workdir, [records[m] for m in methods if m in records], config, cfg.name)

  _finalize(records, methods)
  ordered = [records[m] for m in methods]
  text = _write_reports(workdir, ordered, config, cfg.name)
  print("\n" + text, flush=True)
  print(f"[quantjax] wrote {workdir}/results.json, results.md, pareto.png in "
        f"{time.perf_counter() - t_start:.0f}s", flush=True)
  return ordered


def _finalize(records: dict, methods: list[str]) -> None:
  base = records.get("fp32")
  for m in methods:
    r = records.get(m)
    if r is None:
      continue
    r["delta_pct"] = (100.0 * (r["perplexity"] / base["perplexity"] - 1.0)
                      if base is not None else None)
