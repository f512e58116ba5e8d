"""Staged compression chains: prune -> distill -> qat/quantize -> evaluate.

`run(config, workdir)` runs `config.stages` (a comma list of `STAGES`) in
order on the model of `config.model`. Each stage writes its output into
`workdir/NN_<stage>/`: the params (orbax checkpoint with QArrays and pruning
masks) and `done.json` (the stage's settings key and its metrics). A re-run
skips every stage whose `done.json` matches; distillation and QAT checkpoint
their train state and resume after an interruption with the same final
params as an uninterrupted run. `evaluate` stages append a record to
`results.json` / `results.md` / `pareto.png` (the format of
`experiments.pipeline`, so `experiments.compare` merges both).

Stages and their config blocks:
  prune     `config.prune`: method magnitude | wanda | sparsegpt; `pattern`
            "2:4" (N:M along the input axis) or a sparsity like "0.5".
  distill   `config.distill`: steps, learning_rate, warmup_steps, batch_size,
            seq_len, temperature, alpha (KD weight; 1 - alpha on the task
            cross-entropy), checkpoint_every. Teacher: the loaded FP32 model.
  qat       `config.qat`: format, lsq (learned step sizes) or STE with min-max
            scales, init (LSQ's initial steps: "lsq" or "minmax" = the RTN
            scales), plus the distill-style optimisation settings; ends with
            real QArrays.
  quantize  `config.quantize`: method rtn | gptq | awq, format (any spec,
            including GGUF's `q4_0`...), optional `act_order` for GPTQ and
            `calibration` (minmax | percentile | mse) for the scales.
  evaluate  the perplexity protocol on the current params.
  export    `config.export` (types, float_type; see `quantjax.export`): the
            current params as `NN_export/model.gguf` for llama.cpp, with the
            model's tokenizer; QArrays in GGUF block formats go in losslessly.

`run_sweep(config, workdir, runner)` runs each entry of `config.sweep` (a
list of `{dotted.key: value}` overrides with an optional `name`) into its own
sub-directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.eval import data as data_lib
from quantjax.eval import report as report_lib

__all__ = ["STAGES", "run", "run_sweep", "parse_pattern", "stage_list"]

STAGES = ("prune", "distill", "qat", "quantize", "evaluate", "export")
TARGETS_DEFAULT = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"


def stage_list(config) -> list[str]:
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  if not stages:
    raise ValueError("config.stages is empty; expected a comma list of " + ", ".join(STAGES))
  for s in stages:
    if s not in STAGES:
      raise ValueError(f"unknown pipeline stage {s!r} in config.stages={config.stages!r}; "
                       f"known stages: {', '.join(STAGES)}")
  return stages


def parse_pattern(pattern: str) -> dict[str, Any]:
  """"2:4" -> {"n": 2, "m": 4}; "0.5" -> {"sparsity": 0.5}."""
  p = str(pattern).strip()
  if ":" in p:
    n, _, m = p.partition(":")
    try:
      n, m = int(n), int(m)
    except ValueError:
      raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not 0 < n <= m:
      raise ValueError(f"N:M pattern needs 0 < N <= M, got {pattern!r}")
    return {"n": n, "m": m}
  try:
    s = float(p)
  except ValueError:
    raise ValueError(f"pruning pattern must be 'N:M' or a sparsity in [0, 1), got {pattern!r}"
                     ) from None
  if not 0.0 <= s < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {s}")
  return {"sparsity": s}


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------

def _load(config):
  """(LlamaConfig, float params (pure dict), tokenizer, model name)."""
  from quantjax.models import llama as llama_lib
  from quantjax.models import load as load_lib
  m = config.model
  if m.source == "tiny":
    # A small random Llama with SmolLM2's tokenizer: the chain's machinery at test speed.
    from flax import nnx
    tok = load_lib.load_tokenizer(load_lib.smollm2_path())
    t = m.tiny
    cfg = llama_lib.LlamaConfig(vocab_size=len(tok), hidden_size=t.hidden_size,
                                intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                                num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                                head_dim=t.hidden_size // t.num_heads, rope_theta=10000.0,
                                rms_norm_eps=1e-5, tie_embeddings=True)
    model = llama_lib.Llama(cfg, rngs=nnx.Rngs(int(t.seed)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return cfg, params, tok, f"tiny-random-llama(d={t.hidden_size}, L={t.num_layers})"
  from experiments import pipeline
  from quantjax.rules import to_pure
  cfg, params, tok = pipeline._load_model(config)
  return cfg, to_pure(params), tok, cfg.name


def _leaf_dims(params) -> dict[str, tuple[int, ...]]:
  from quantjax import rules as rules_lib
  return {p: tuple(x.shape) for p, x in rules_lib.tree_leaves_with_paths(params)
          if hasattr(x, "shape")}


def _check_prune_fits(params, targets: str, pattern: dict) -> None:
  import re
  if "m" not in pattern:
    return
  for path, shape in _leaf_dims(params).items():
    if re.fullmatch(targets, path) and shape[0] % pattern["m"]:
      raise ValueError(f"N:M pruning with M={pattern['m']} does not divide the input dimension "
                       f"{shape[0]} of {path} (shape {shape})")


# ----------------------------------------------------------------------------
# Stage bookkeeping.
# ----------------------------------------------------------------------------

def _key(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _block(config, name: str) -> dict:
  return config[name].to_dict() if name in config else {}


def _read_done(sdir: str) -> dict | None:
  path = os.path.join(sdir, "done.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"corrupt stage record {path}: {e}; delete {sdir} to re-run that stage"
                     ) from None


def _save_stage(sdir: str, params, masks, done: dict) -> None:
  from quantjax.io import checkpoint
  os.makedirs(sdir, exist_ok=True)
  if params is not None:
    checkpoint.save_params(os.path.join(sdir, "params"),
                           {"params": params, "masks": masks or {}})
  report_lib.write_json_atomic(os.path.join(sdir, "done.json"), done)


def _load_stage(sdir: str):
  from quantjax.io import checkpoint
  path = os.path.join(sdir, "params")
  try:
    tree = checkpoint.restore_params(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"stage checkpoint {path} cannot be read ({e}); delete {sdir} to re-run "
                     "that stage") from None
  return tree["params"], (tree.get("masks") or None)


# ----------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------

def _targets(config) -> str:
  return str(config.get("targets", TARGETS_DEFAULT)) if hasattr(config, "get") else TARGETS_DEFAULT


def _calib_batches(split, config) -> list[np.ndarray]:
  """The calibration windows as equal batches (a short last batch is dropped:
  the capture traces one batch shape)."""
  windows = np.asarray(split.calib_windows)
  bs = min(int(config.calib.batch_size), windows.shape[0])
  if bs == 0:
    raise ValueError("calibrated methods need calibration windows (config.calib.windows > 0)")
  n = (windows.shape[0] // bs) * bs
  return [windows[i:i + bs] for i in range(0, n, bs)]


def _mask_dict(masks_tree) -> dict:
  from quantjax import rules as rules_lib
  return {p: m for p, m in rules_lib.tree_leaves_with_paths(masks_tree) if m is not None}


def _mask_tree(params, masks: dict):
  from quantjax import rules as rules_lib
  return rules_lib.map_with_paths(lambda p, x: masks.get(p), params)


def _prune(cfg, params, split, config, progress):
  from quantjax.models import llama as llama_lib
  from quantjax.rules import PruneRule
  from quantjax import sparsity
  pc = config.prune
  pattern = parse_pattern(pc.pattern)
  rules = [PruneRule(module_path=_targets(config), **pattern)]
  methods = {"magnitude": "magnitude", "wanda": sparsity.Wanda(), "sparsegpt": sparsity.SparseGPT()}
  t = time.perf_counter()
  params, masks = sparsity.prune_calibrated(llama_lib.calib_fn(cfg), params,
                                            _calib_batches(split, config), rules,
                                            methods[str(pc.method)], progress=progress)
  label = f"{pc.method} {pc.pattern}"
  return params, _mask_dict(masks), {"label": label, "seconds": time.perf_counter() - t}


def _train_batches(split, tc, seed: int):
  windows = np.asarray(split.calib_windows)
  if windows.shape[0] == 0:
    raise ValueError("distillation / QAT needs calibration windows (config.calib.windows > 0)")
  seq_len = min(int(tc.seq_len), windows.shape[1])
  bs = int(tc.batch_size)
  perm = np.random.default_rng(seed).permutation(windows.shape[0])

  def batch_fn(step: int):
    idx = perm[(step * bs + np.arange(bs)) % windows.shape[0]]
    return jnp.asarray(windows[idx, :seq_len])
  return batch_fn, seq_len * bs


def _train_config(tc):
  from quantjax.distill.trainer import TrainConfig
  return TrainConfig(steps=int(tc.steps), learning_rate=float(tc.learning_rate),
                     warmup_steps=int(tc.warmup_steps), weight_decay=float(tc.weight_decay),
                     clip_norm=float(tc.clip_norm), seed=int(tc.seed),
                     checkpoint_every=int(tc.checkpoint_every))


def _distill(cfg, teacher, params, masks, split, config, sdir, progress, *, qat_rules=None,
             lsq=False):
  from quantjax import transforms
  from quantjax.distill import losses, qat, trainer
  from quantjax.models import llama as llama_lib
  tc = config.qat if qat_rules is not None else config.distill
  batch_fn, tokens_per_step = _train_batches(split, tc, int(tc.seed))
  mask_tree = _mask_tree(params, masks) if masks else None
  temperature, alpha = float(tc.temperature), float(tc.alpha)

  def student_logits(p, x):
    if qat_rules is not None:
      p = (qat.lsq_apply(p["params"], p["steps"], qat_rules) if lsq
           else transforms.fake_quant_params(p, qat_rules))
    return llama_lib.forward(cfg, p, x)

  def loss_fn(p, tokens, key, teacher_params):
    x = tokens[:, :-1]
    t_logits = jax.lax.stop_gradient(llama_lib.forward(cfg, teacher_params, x))
    return losses.distill_loss(student_logits(p, x), t_logits, tokens[:, 1:], alpha=alpha,
                               temperature=temperature)

  start = params
  if qat_rules is not None and lsq:
    start = {"params": params,
             "steps": qat.lsq_init(params, qat_rules, init=str(tc.get("init", "lsq")))}
    mask_tree = None if mask_tree is None else {"params": mask_tree, "steps": jax.tree.map(
        lambda _: None, start["steps"])}
  t = time.perf_counter()
  out, history = trainer.fit(loss_fn, start, batch_fn, _train_config(tc), masks=mask_tree,
                             workdir=os.path.join(sdir, "train"), progress=progress,
                             log_every=max(1, int(tc.steps) // 50), frozen=teacher)
  seconds = time.perf_counter() - t
  if history and "seconds" in history[-1]:
    seconds = history[-1]["seconds"]  # summed over interrupted and resumed runs
  info = {"steps": int(tc.steps), "tokens": int(tc.steps) * tokens_per_step, "seconds": seconds,
          "history": history, "first_loss": history[0]["loss"] if history else None,
          "last_loss": history[-1]["loss"] if history else None}
  if qat_rules is not None:
    from quantjax.transforms import quantize_params
    out = qat.lsq_convert(out["params"], out["steps"], qat_rules) if lsq \
        else quantize_params(out, qat_rules)
  return out, info


def _quant_rules(config, fmt: str, calibration: str = "minmax"):
  from quantjax.rules import QuantRule
  return [QuantRule(module_path=_targets(config), format=fmt, calibration=calibration)]


QUANT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "static")


def _observer(qc):
  from quantjax.methods.activations import ActObserver
  obs = str(qc.get("act_observer", "") or "")
  return ActObserver(method=obs) if obs else None


def _quantize(cfg, params, masks, split, config, progress):
  from quantjax import methods
  from quantjax.models import llama as llama_lib
  from quantjax.numerics.formats import QuantFormat
  from quantjax.rules import QuantRule
  qc = config.quantize
  method, fmt = str(qc.method), str(qc.format)
  if method not in QUANT_METHODS:
    raise ValueError(f"unknown quantize method {method!r}; expected one of {QUANT_METHODS}")
  parsed = QuantFormat.parse(fmt)
  act = str(qc.get("act_format", "") or "") or None
  rules = [QuantRule(module_path=_targets(config), format=fmt,
                     calibration=str(qc.get("calibration", "minmax")), act_format=act)]
  if masks and method != "rtn":
    raise ValueError(f"quantize method {method!r} moves pruned weights off zero; after a prune "
                     "stage use method 'rtn' with a symmetric format (zeros stay exact)")
  if masks and not (parsed.symmetric or parsed.zero_point == "int"):
    raise ValueError(f"format {fmt} cannot represent 0 exactly; pruned weights need a symmetric "
                     "format or an integer zero point")
  t = time.perf_counter()
  if method == "rtn":
    from quantjax.transforms import quantize_params
    out = quantize_params(params, rules)
  else:
    observer = _observer(qc)
    foldable = llama_lib.foldable(cfg) if str(qc.get("input_scales", "foldable")) == \
        "foldable" else None
    meth = {"gptq": lambda: methods.GPTQ(act_order=bool(qc.get("act_order", False)),
                                          act_observer=observer),
            "awq": lambda: methods.AWQ(scales_for=foldable, no_clip=llama_lib.AWQ_NO_CLIP,
                                       act_observer=observer),
            "smoothquant": lambda: methods.SmoothQuant(alpha=float(qc.get("alpha", 0.5)),
                                                       scales_for=foldable,
                                                       act_observer=observer),
            "static": lambda: methods.RTN(act_observer=observer or
                                          methods.ActObserver(method="minmax"))}[method]()
    res = methods.calibrate(llama_lib.calib_fn(cfg), params, _calib_batches(split, config),
                            rules, meth, mode=str(qc.get("mode", "sequential")),
                            progress=progress)
    out, _ = methods.fold_input_scales(res.params, llama_lib.fold_groups(cfg))
  return out, {"label": f"{method} {fmt}" + (f" a{act}" if act else ""),
               "seconds": time.perf_counter() - t}


def _evaluate(cfg, params, split, config, base_bytes, name, label, progress):
  from quantjax.eval import memory as memory_lib
  from quantjax.eval import perplexity as ppl_lib
  rec = ppl_lib.evaluate(cfg, params, split, batch_size=int(config.eval.batch_size),
                         progress=progress, model_name=name, desc=label)
  rec["per_window_nll"] = [round(v, 6) for v in rec["per_window_nll"]]
  nbytes = memory_lib.tree_bytes(params)
  quantized = memory_lib.bits_per_weight(params, quantized_only=True)
  rec.update({"method": label, "format": label.split(" → ")[-1], "params_bytes": int(nbytes),
              "params_mb": nbytes / 1e6, "compression_vs_fp32": base_bytes / nbytes,
              "bits_per_weight": quantized if quantized else 32.0,
              "bits_per_weight_all": memory_lib.bits_per_weight(params),
              "quantize_s": 0.0, "model": name, "dtype": cfg.dtype,
              "quantized": _targets(config)})
  return rec


# ----------------------------------------------------------------------------
# The runner.
# ----------------------------------------------------------------------------

def run(config, workdir: str) -> list[dict[str, Any]]:
  """Runs the stages of `config` into `workdir`; returns the evaluation records."""
  stages = stage_list(config)  # validate before any heavy work
  if "prune" in stages:
    parse_pattern(config.prune.pattern)
    if str(config.prune.method) not in ("magnitude", "wanda", "sparsegpt"):
      raise ValueError(f"unknown pruning method {config.prune.method!r}; expected magnitude, "
                       "wanda or sparsegpt")
  progress = bool(config.eval.progress)
  os.makedirs(workdir, exist_ok=True)
  cfg, teacher, tok, name = _load(config)
  manifest_path = os.path.join(workdir, "chain.json")
  old = report_lib.read_json(manifest_path, None)
  if old is not None and old.get("model") != name:
    raise ValueError(f"{workdir} holds a chain run of model {old.get('model')!r}, not {name!r}; "
                     "use another workdir (nothing was overwritten)")
  report_lib.write_json_atomic(manifest_path, {"model": name, "stages": stages})
  report_lib.write_text_atomic(os.path.join(workdir, "config.json"),
                               config.to_json_best_effort(indent=2) + "\n")
  if "prune" in stages:
    _check_prune_fits(teacher, _targets(config), parse_pattern(config.prune.pattern))
  protocol = data_lib.Protocol(eval_tokens=int(config.eval.tokens), window=int(config.eval.window),
                               calib_windows=int(config.calib.windows), seed=int(config.calib.seed))
  split = data_lib.load_split(tok, config.data.corpus, protocol)
  from quantjax.eval import memory as memory_lib
  base_bytes = memory_lib.tree_bytes(teacher)

  params, masks = teacher, None
  labels: list[str] = []
  records: list[dict] = []
  chain_key = _key({"model": name, "protocol": split.record(), "targets": _targets(config)})
  for idx, stage in enumerate(stages):
    sdir = os.path.join(workdir, f"{idx:02d}_{stage}")
    chain_key = _key([chain_key, stage, _block(config, stage)])
    done = _read_done(sdir)
    if done is not None and done.get("key") == chain_key:
      print(f"[quantjax] stage {idx} {stage}: done, loaded from {sdir}", flush=True)
      if stage == "export":
        continue
      if stage == "evaluate":
        records.append(done["record"])
      else:
        params, masks = _load_stage(sdir)
        labels.append(done["label"])
      continue
    print(f"[quantjax] stage {idx} {stage}: running", flush=True)
    if stage == "prune":
      params, masks, info = _prune(cfg, params, split, config, progress)
      label = info["label"]
    elif stage == "distill":
      params, info = _distill(cfg, teacher, params, masks, split, config, sdir, progress)
      label = f"distill {info['steps']} steps"
    elif stage == "qat":
      qrules = _quant_rules(config, str(config.qat.format))
      params, info = _distill(cfg, teacher, params, masks, split, config, sdir, progress,
                              qat_rules=qrules, lsq=bool(config.qat.lsq))
      label = f"qat{'-lsq' if config.qat.lsq else ''} {config.qat.format}"
    elif stage == "quantize":
      params, info = _quantize(cfg, params, masks, split, config, progress)
      label = info["label"]
    elif stage == "export":
      from quantjax import export as export_lib
      from quantjax.io import gguf as gguf_io
      ex = config.export if "export" in config else None
      path = os.path.join(sdir, "model.gguf")
      report = gguf_io.export_gguf(
          path, cfg, params, tokenizer=export_lib.tokenizer_source(config),
          types=[tuple(t) for t in (ex.types if ex is not None else [])],
          float_type=str(ex.float_type) if ex is not None else "F32")
      print(gguf_io.export_summary(report), flush=True)
      _save_stage(sdir, None, None, {"key": chain_key, "stage": stage, "file": path,
                                     "file_bytes": os.path.getsize(path)})
      continue
    else:  # evaluate
      label = " → ".join(labels) if labels else "fp32"
      rec = _evaluate(cfg, params, split, config, base_bytes, name, label, progress)
      rec["stages"] = list(labels)
      rec["chain_info"] = _read_infos(workdir, idx)
      # the stages that produced the quantized weights (prune/distill times stay in chain_info)
      rec["quantize_s"] = sum(float(i.get("seconds", 0.0)) for i in rec["chain_info"]
                              if i["stage"] in ("quantize", "qat"))
      _save_stage(sdir, None, None, {"key": chain_key, "stage": stage, "record": rec})
      records.append(rec)
      print(f"[quantjax] {label}: perplexity {rec['perplexity']:.4f}, "
            f"{rec['params_mb']:.1f} MB", flush=True)
      continue
    labels.append(label)
    info = {k: v for k, v in info.items() if k != "history"} | (
        {"history": info["history"]} if "history" in info else {})
    _save_stage(sdir, params, masks, {"key": chain_key, "stage": stage, "label": label,
                                      "info": info})
  _write(workdir, records, name)
  return records


def _read_infos(workdir: str, upto: int) -> list[dict]:
  out = []
  for d in sorted(os.listdir(workdir)):
    if d[:2].isdigit() and int(d[:2]) < upto:
      done = _read_done(os.path.join(workdir, d))
      if done and "info" in done:
        out.append({"stage": done["stage"], "label": done["label"],
                    **{k: v for k, v in done["info"].items() if k != "history"}})
  return out


def _write(workdir: str, records: list[dict], name: str) -> None:
  if not records:
    return
  base = records[0]["perplexity"] if records[0].get("method") == "fp32" else None
  for r in records:
    r["delta_pct"] = None if base is None else 100.0 * (r["perplexity"] / base - 1.0)
  report_lib.write_json_atomic(os.path.join(workdir, "results.json"), {"records": records})
  text = f"# {name}: compression chain\n\n" + report_lib.markdown_table(records) + "\n"
  report_lib.write_text_atomic(os.path.join(workdir, "results.md"), text)
  report_lib.pareto_plot(records, os.path.join(workdir, "pareto.png"),
                         title=f"{name}: perplexity vs size")
  print("\n" + text, flush=True)


def _apply_override(config, key: str, value: Any) -> None:
  node = config
  parts = key.split(".")
  for p in parts[:-1]:
    if p not in node:
      raise ValueError(f"sweep override {key!r}: config has no field {p!r}")
    node = node[p]
  if parts[-1] not in node:
    raise ValueError(f"sweep override {key!r}: config has no field {parts[-1]!r}")
  node[parts[-1]] = value


def run_sweep(config, workdir: str, runner: Callable[[Any, str], Any]) -> list[Any]:
  """Runs `runner(config_with_overrides, workdir/<name>)` for each `config.sweep` entry."""
  out = []
  sweep = list(config.sweep) if "sweep" in config and config.sweep else []
  if not sweep:
    return [runner(config, workdir)]
  for i, entry in enumerate(sweep):
    entry = dict(entry)
    sub = str(entry.pop("name", f"sweep_{i:02d}"))
    c = copy.deepcopy(config)
    with c.unlocked():
      c.sweep = []
    for k, v in entry.items():
      _apply_override(c, k, v)
    print(f"[quantjax] sweep {i + 1}/{len(sweep)}: {sub} {entry}", flush=True)
    out.append(runner(c, os.path.join(workdir, sub)))
  return out
