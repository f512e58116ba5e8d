"""The one experiment runner: a config's stages, for each entry of its sweep.

`run(config, workdir)` is importable (tests call it on a tiny model);
`python -m experiments.main --config=configs/X.py --workdir=runs/X` launches
it. A config names a model, a corpus, the protocol sizes and, per entry, a
chain of stages:

    load → [prune] → [distill] → [qat | quantize | mixed] → [export] → evaluate / llamacpp

Each stage is a function `(ctx, params, block) -> (params, record)` in the
registry `STAGES`, reading its own config block (`config.quantize`,
`config.prune`, ...). `config.stages` is the comma list for one entry;
`config.sweep` is a list of `{dotted.key: value}` overrides, each with a
`name`, run one after another (a comparison is a sweep whose entries differ
in their stages or blocks). Stage names, methods and config keys are checked
before any heavy work, with the valid choices in the message.

Resuming (one scheme). Every stage of an entry has a key: a hash of the key
before it, its name and its block (the first stage's key hashes the model,
corpus, protocol and calibration settings). A finished stage leaves
`workdir/stages/<stage>-<key>/done.json` (its label, seconds, record) and,
when it is expensive (calibrated quantization, pruning, training, mixed
precision), its params as a checkpoint; cheap stages (round-to-nearest,
casts) are recomputed. Entries that share a prefix of stages share its
outputs. A re-run skips every finished stage, so an interrupted run resumes
where it stopped (training stages resume from their own step checkpoints)
and a finished one rebuilds its tables in seconds. A work directory belongs
to one experiment identity (model, corpus, protocol): another config's
directory, or one not written by quantjax, is refused and nothing in it is
touched.

The FP32 model's evaluation is the reference of every row: it is computed
once per work directory (`workdir/reference/`), with its top-k next-token
distribution, so every evaluation reports perplexity, Δ, KL divergence and
top-1 agreement against it. Outputs: `results.json` (one record per
evaluation: protocol fields, versions, wall times), `results.md` and
`pareto.png` (see `quantjax.eval.report`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Callable

import numpy as np

import quantjax.methods  # noqa: F401  (registers the calibrated quantizers)
import quantjax.sparsity  # noqa: F401  (registers the calibrated pruners)
from quantjax.eval import data as data_lib
from quantjax.eval import report as report_lib
from quantjax.io import gguf_read
from quantjax.io.export import EXPORT_FORMATS
from quantjax.methods import base as methods_base
from quantjax.rules import PruneRule, QuantRule

__all__ = ["STAGES", "Stage", "Context", "run", "entries", "exported_file", "parse_pattern",
           "validate"]


# ----------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Stage:
  """A registered stage.

  Attributes:
    name: its name in `config.stages`.
    fn: `fn(ctx, params, block) -> (params, record)`.
    block: the config block it reads (part of its resume key), or None.
    kind: "params" (transforms the params), "file" (writes a file) or
      "record" (an evaluation: its record is a row of the results).
    compresses: the stage quantizes the weights (nothing but evaluation,
      export and llama.cpp may follow it).
  """

  name: str
  fn: Callable[..., tuple[Any, dict]]
  block: str | None
  kind: str
  compresses: bool = False


STAGES: dict[str, Stage] = {}


def _stage(name: str, block: str | None, kind: str, compresses: bool = False):
  def register(fn):
    STAGES[name] = Stage(name, fn, block, kind, compresses)
    return fn
  return register


ROTATION_KINDS = ("hadamard", "auto", "random")
# The method names come from the registry of calibrated methods (`quantjax.methods.base`:
# a registered quantizer or pruner is a runner method), plus the runner's own:
# "cast" (a float format), "static" (RTN weights with static activation ranges from a
# min-max observer), "llamacpp" (llama.cpp's own row quantizer (ggml) into the GGUF type
# `format`, with an importance matrix over `importance_windows` calibration windows, 0:
# none: the peer) and "magnitude" pruning (no calibration).
_CALIBRATED = tuple(n for n in methods_base.names(QuantRule) if n != "rtn") + ("static",)
QUANT_METHODS = ("rtn", "cast") + _CALIBRATED + ("llamacpp",)
PRUNE_METHODS = ("magnitude",) + methods_base.names(PruneRule)
# Methods whose result moves pruned weights off zero (error feedback, rescaling).
_MOVES_ZEROS = tuple(n for n in _CALIBRATED if n != "static")


@dataclasses.dataclass
class Context:
  """What stages see besides their params and block.

  Attributes:
    config: the entry's whole config.
    model: `quantjax.models.load.LoadedModel` (the FP32 model: teacher, reference).
    split: the protocol's evaluation and calibration windows.
    workdir: the experiment's directory; `stage_dir` is this stage's own.
    entry: the entry's name.
    masks: pruning masks `{path: bool array}` (None when nothing was pruned).
    labels: labels of the stages that transformed the params so far.
    infos: `{"stage", "label", "seconds", ...}` of those stages.
    file: the last exported file (`{"path", "format", "bytes", ...}`) or None.
    reference: the FP32 reference (`record`, `baseline`), computed on demand.
  """

  config: Any
  model: Any
  split: data_lib.Split
  workdir: str
  entry: str
  stage_dir: str = ""
  masks: dict | None = None
  labels: list = dataclasses.field(default_factory=list)
  infos: list = dataclasses.field(default_factory=list)
  file: dict | None = None
  reference: Any = None

  @property
  def progress(self) -> bool:
    return bool(self.config.eval.progress)

  @property
  def targets(self) -> str:
    return targets_of(self.config, self.model)

  def forward(self):
    return self.model.forward_fn()

  def calib_batches(self, n: int | None = None) -> list[np.ndarray]:
    """Calibration windows as equal batches of `config.calib.batch_size` (a short last
    batch is dropped: the capture traces one batch shape)."""
    windows = self.split.model_inputs(np.asarray(self.split.calib_windows))  # BOS if any
    if n is not None:
      windows = windows[:n]
    bs = min(int(self.config.calib.batch_size), windows.shape[0])
    if bs == 0:
      raise ValueError(f"entry {self.entry!r}: calibrated stages need calibration windows "
                       "(config.calib.windows > 0)")
    k = (windows.shape[0] // bs) * bs
    return [windows[i:i + bs] for i in range(0, k, bs)]


def targets_of(config, model) -> str:
  """The regex of the leaves stages compress: `config.targets`, else the model's own."""
  t = str(config.get("targets", "") or "")
  return t or model.family.PROJ_KERNELS


# ----------------------------------------------------------------------------
# Patterns and validation.


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


def stage_list(config) -> list[str]:
  """`config.stages` as a list; a leading "load" (always implicit) is dropped."""
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  if stages and stages[0] == "load":
    stages = stages[1:]
  if not stages:
    raise ValueError("config.stages is empty; expected a comma list of " + ", ".join(STAGES))
  for s in stages:
    if s not in STAGES or s == "load":
      raise ValueError(f"unknown stage {s!r} in config.stages={config.stages!r}; known "
                       f"stages: {', '.join(k for k in STAGES if k != 'load')}")
  return stages


def _choice(value: Any, valid: tuple[str, ...], what: str) -> str:
  v = str(value)
  if v not in valid:
    raise ValueError(f"unknown {what} {v!r}; expected one of {', '.join(valid)}")
  return v


def validate(config, entry: str = "") -> list[str]:
  """Checks an entry's stages, their blocks and their order; returns the stage list."""
  from quantjax.numerics.formats import QuantFormat
  where = f"entry {entry!r}: " if entry else ""
  try:
    stages = stage_list(config)
    pruned = compressed = exported = None
    for s in stages:
      st = STAGES[s]
      if s == "rotate":
        if stages.index(s) != 0:
          raise ValueError("stage 'rotate' must come first: it rotates the float model "
                           "(function-preserving), before any other transform")
        for k in ("r1", "r2"):
          v = config.rotate.get(k, "")
          if v:
            _choice(v, ROTATION_KINDS, f"rotate.{k}")
      if s in ("prune", "distill", "qat", "quantize", "mixed") and compressed:
        raise ValueError(
            f"stage {s!r} after {compressed!r}: the weights are already quantized "
            f"({compressed} must come last among the weight transforms; prune and distill "
            "float weights, then quantize once)")
      if s == "prune":
        parse_pattern(config.prune.pattern)
        _choice(config.prune.method, PRUNE_METHODS, "pruning method")
        pruned = s
      if s == "quantize":
        q = config.quantize
        method = _choice(q.method, QUANT_METHODS, "quantize method")
        fmt = QuantFormat.parse(str(q.format))
        if method == "cast" and not fmt.is_cast:
          raise ValueError(f"quantize method 'cast' needs a float format (bf16, fp16), "
                           f"got {q.format!r}")
        if q.get("act_format"):
          QuantFormat.parse(str(q.act_format))
        for k in ("embedding_format", "head_format"):
          if q.get(k):
            QuantFormat.parse(str(q[k]))
        if pruned and method in _MOVES_ZEROS:
          raise ValueError(
              f"quantize method {method!r} after pruning: it moves pruned weights off zero "
              f"(GPTQ's error feedback updates every remaining column, AWQ/SmoothQuant "
              "rescale them); after a prune stage use rtn or static with a format that "
              "represents 0 exactly")
        if pruned and not (fmt.is_cast or fmt.symmetric or fmt.zero_point == "int"):
          raise ValueError(f"format {q.format} cannot represent 0 exactly; pruned weights "
                           "need a symmetric format or an integer zero point")
      if s == "qat":
        QuantFormat.parse(str(config.qat.format))
      if s == "mixed":
        for c in config.mixed.candidates:
          QuantFormat.parse(str(c))
        _choice(config.mixed.method, ("rtn", "gptq"), "mixed-precision method")
        if pruned:
          raise ValueError("stage 'mixed' after pruning is not supported: its formats are "
                           "chosen for dense weights")
      if s == "export":
        _choice(config.export.format, EXPORT_FORMATS, "export format")
        exported = s
      if s == "llamacpp" and not (exported and str(config.export.format) == "gguf"):
        raise ValueError("stage 'llamacpp' scores the GGUF file of an earlier 'export' stage "
                         "(with export.format='gguf'); none comes before it")
      if s == "transformers" and not (exported and str(config.export.format) == "hf"):
        raise ValueError("stage 'transformers' scores the Hugging Face directory of an earlier "
                         "'export' stage (with export.format='hf'); none comes before it")
      if st.compresses:
        compressed = s
  except (ValueError, KeyError, AttributeError) as e:
    raise ValueError(f"{where}{e}") from None
  return stages


def entries(config) -> list[tuple[str, Any]]:
  """`[(name, config)]`: one per `config.sweep` entry (its overrides applied), or the
  config itself as one entry named `config.name` (default "run")."""
  sweep = list(config.sweep) if "sweep" in config and config.sweep else []
  if not sweep:
    return [(str(config.get("name", "") or "run"), config)]
  out, seen = [], set()
  for i, e in enumerate(sweep):
    e = dict(e)
    name = str(e.pop("name", f"entry_{i:02d}"))
    if name in seen:
      raise ValueError(f"config.sweep has two entries named {name!r}")
    seen.add(name)
    c = copy.deepcopy(config)
    with c.unlocked():
      c.sweep = []
    for k, v in e.items():
      _apply_override(c, k, v, name)
    out.append((name, c))
  return out


def _apply_override(config, key: str, value: Any, entry: str) -> None:
  node = config
  parts = key.split(".")
  for i, p in enumerate(parts):
    if not hasattr(node, "keys") or p not in node:
      valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a block)"
      raise ValueError(f"sweep entry {entry!r}: override {key!r}: config has no field "
                       f"{'.'.join(parts[:i + 1])!r}; valid keys here: {valid}")
    if i < len(parts) - 1:
      node = node[p]
  with config.unlocked():
    node[parts[-1]] = value


# ----------------------------------------------------------------------------
# Bookkeeping: keys, stage directories, the work directory's identity.


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _block(config, name: str | None) -> dict:
  if name is None or name not in config:
    return {}
  b = config[name]
  d = b.to_dict() if hasattr(b, "to_dict") else b
  if name == "eval":  # what does not change a number
    d = {k: v for k, v in d.items() if k not in ("progress",)}
  return d


def identity(config) -> dict:
  """What makes two runs comparable: model, corpus, protocol, calibration draw."""
  return {"model": _block(config, "model"), "data": _block(config, "data"),
          "eval": {k: config.eval[k] for k in ("tokens", "window")},
          "calib": {k: config.calib[k] for k in ("windows", "seed")}}


_IDENTITY = "experiment.json"


def _claim_workdir(workdir: str, ident: dict) -> None:
  path = os.path.join(workdir, _IDENTITY)
  if os.path.exists(path):
    try:
      old = report_lib.read_json(path)["identity"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path} is damaged ({e}); use another work directory") from None
    if old != ident:
      diffs = []
      for k in sorted(set(old) | set(ident)):
        a, b = old.get(k), ident.get(k)
        if a != b:
          diffs.append(f"{k}: {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}")
      raise ValueError(
          f"work directory {workdir} holds another experiment (" + "; ".join(diffs) +
          "); use another --workdir (nothing was overwritten)")
    return
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ValueError(f"{workdir} is not empty and was not written by this runner (no "
                     f"{_IDENTITY}); use a new or empty --workdir (nothing was touched)")
  os.makedirs(workdir, exist_ok=True)
  report_lib.write_json_atomic(path, {"identity": ident})


def _read_done(sdir: str) -> dict | None:
  path = os.path.join(sdir, "done.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"damaged stage record {path}: {e}; delete {sdir} to re-run that stage"
                     ) from None


def _write_done(sdir: str, done: dict) -> None:
  report_lib.write_json_atomic(os.path.join(sdir, "done.json"), done)


def _save_params(sdir: str, params, masks) -> None:
  from quantjax.io import checkpoint
  checkpoint.save_params(os.path.join(sdir, "params"), {"params": params, "masks": masks or {}})


def _load_params(sdir: str):
  from quantjax.io import checkpoint
  path = os.path.join(sdir, "params")
  try:
    tree = checkpoint.restore_params(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"stage checkpoint {path} cannot be read ({e}); delete {sdir} to re-run "
                     "that stage") from None
  return tree["params"], (tree.get("masks") or None)


# ----------------------------------------------------------------------------
# The FP32 reference (perplexity and top-k distribution for KL).


@dataclasses.dataclass
class Reference:
  record: dict
  baseline: Any


def _reference(ctx: Context) -> Reference:
  if ctx.reference is not None:
    return ctx.reference
  from quantjax.eval import perplexity as ppl_lib
  d = os.path.join(ctx.workdir, "reference")
  key = _hash({"identity": identity(ctx.config), "k": int(ctx.config.eval.kl_top_k),
               "dtype": str(ctx.config.model.dtype)})
  rec_path, base_path = os.path.join(d, "record.json"), os.path.join(d, "top_k.npz")
  old = report_lib.read_json(rec_path, None) if os.path.exists(rec_path) else None
  if old is not None and old.get("key") == key and os.path.exists(base_path):
    ctx.reference = Reference(old["record"], ppl_lib.Baseline.load(base_path))
    return ctx.reference
  print("[quantjax] reference: evaluating the FP32 model", flush=True)
  rec = ppl_lib.evaluate(ctx.forward(), ctx.model.params, ctx.split,
                         batch_size=int(ctx.config.eval.batch_size), progress=ctx.progress,
                         model_name=ctx.model.name, dtype=str(ctx.config.model.dtype),
                         collect_top_k=int(ctx.config.eval.kl_top_k), desc="fp32")
  baseline = rec.pop("baseline")
  os.makedirs(d, exist_ok=True)
  baseline.save(base_path)
  report_lib.write_json_atomic(rec_path, {"key": key, "record": rec})
  ctx.reference = Reference(rec, baseline)
  return ctx.reference


# ----------------------------------------------------------------------------
# Stages.


def _mask_dict(masks_tree) -> dict:
  from quantjax import rules as rules_lib
  return {p: m for p, m in rules_lib.tree_leaves_with_paths(masks_tree) if m is not None}


def _mask_tree(params, masks: dict):
  from quantjax import rules as rules_lib
  return rules_lib.map_with_paths(lambda p, x: masks.get(p), params)


@_stage("load", "model", "params")
def load_stage(ctx: Context, params, block):
  """The model's float weights (the runner loads them once; this stage only labels them)."""
  return ctx.model.params, {"label": ctx.model.name}


@_stage("rotate", "rotate", "params")
def rotate_stage(ctx: Context, params, block):
  """Function-preserving rotations of the float model (R1 residual, R2 per value head)
  from the model's own rotation table; the model was untied for it (`rotation_model`)."""
  from quantjax.methods import rotation
  table = ctx.model.family.rotation_table(ctx.model.config)
  r1 = str(block.get("r1", "") or "") or None
  r2 = str(block.get("r2", "") or "") or None
  if table.residual is None and r1 is not None:
    print(f"[quantjax]   rotate: no R1 for {ctx.model.name}: {table.why_not}", flush=True)
    r1 = None
  seed = int(block.get("seed", 0))
  steps = int(block.get("learn_steps", 0) or 0)
  extra = {}
  if steps:
    # SpinQuant: R1 / R2 trained on the calibration windows against the loss of the model
    # fake-quantized in `learn_format` (the format the quantize stage then uses).
    fmt = str(block.get("learn_format", "") or "")
    if not fmt:
      raise ValueError("rotate.learn_steps > 0 needs rotate.learn_format (e.g. int4_g64)")
    windows = np.concatenate(ctx.calib_batches())
    per = max(1, int(block.get("learn_batch", 2)))
    batches = [windows[i:i + per] for i in range(0, windows.shape[0] - per + 1, per)]
    learned = rotation.learn_rotation(
        ctx.model.family.loss_fn(ctx.model.config), params, table,
        batches, [QuantRule(module_path=ctx.targets, format=fmt)], r1=r1, r2=r2,
        steps=steps, learning_rate=float(block.get("learning_rate", 2e-3)), seed=seed,
        progress=ctx.progress)
    r1 = learned.r1 if r1 is not None else None
    r2 = learned.r2 if r2 is not None else None
    extra = {"learn_loss_first": learned.history[0], "learn_loss_last": learned.history[-1]}
  res = rotation.rotate(params, table, r1=r1, r2=r2, seed=seed)
  if res.untied:
    raise ValueError("rotate: the model is still tied; the runner unties it first")
  kinds = "+".join(f"{k.upper()} {v['kind']}" for k, v in res.info.items())
  if steps:
    kinds += f" learned {steps} steps ({block.learn_format})"
  return res.params, {"label": f"rotate {kinds}", "rotation": res.info, **extra}


def rotation_model(model):
  """`model` with an untied head (the tied embedding copied into `lm_head/kernel`): the
  same function, and the structure a residual rotation needs (the head stops being the
  embedding's transpose once the final norm folds into it)."""
  from quantjax.methods import rotation
  cfg = model.config
  if not getattr(cfg, "tie_embeddings", False):
    return model
  table = model.family.rotation_table(cfg)
  if table.residual is None or table.residual.untie is None:
    return model
  emb, head = table.residual.untie
  params = rotation.untie(model.params, emb, head)
  return dataclasses.replace(model, config=cfg.replace(tie_embeddings=False), params=params)


@_stage("prune", "prune", "params")
def prune_stage(ctx: Context, params, block):
  """Magnitude, Wanda or SparseGPT (unstructured or N:M) on the target leaves."""
  from quantjax import sparsity
  pattern = parse_pattern(block.pattern)
  if "m" in pattern:
    for path, x in _leaves(params).items():
      if re.fullmatch(ctx.targets, path) and x.shape[0] % pattern["m"]:
        raise ValueError(f"N:M pruning with M={pattern['m']} does not divide the input "
                         f"dimension {x.shape[0]} of {path} (shape {tuple(x.shape)})")
  rules = [PruneRule(module_path=ctx.targets, **pattern)]
  method = "magnitude" if str(block.method) == "magnitude" else methods_base.make(str(block.method))
  out, masks = sparsity.prune_calibrated(ctx.forward(), params, ctx.calib_batches(), rules,
                                         method, progress=ctx.progress)
  ctx.masks = _mask_dict(masks)
  return out, {"label": f"{block.method} {block.pattern}"}


def _leaves(params) -> dict:
  from quantjax import rules as rules_lib
  return {p: x for p, x in rules_lib.tree_leaves_with_paths(params) if hasattr(x, "shape")}


def _train_batches(ctx: Context, tc):
  import jax.numpy as jnp
  windows = ctx.split.model_inputs(np.asarray(ctx.split.calib_windows))  # BOS if any
  if windows.shape[0] == 0:
    raise ValueError("distillation / QAT needs calibration windows (config.calib.windows > 0)")
  seq_len = min(int(tc.seq_len), windows.shape[1])
  bs = int(tc.batch_size)
  perm = np.random.default_rng(int(tc.seed)).permutation(windows.shape[0])

  def batch_fn(step: int):
    idx = perm[(step * bs + np.arange(bs)) % windows.shape[0]]
    return jnp.asarray(windows[idx, :seq_len])
  return batch_fn, seq_len * bs


def _train(ctx: Context, params, tc, *, qat_rules=None, lsq: bool = False):
  import jax
  from quantjax import transforms
  from quantjax.distill import losses, qat, trainer
  forward = ctx.forward()
  batch_fn, tokens_per_step = _train_batches(ctx, tc)
  mask_tree = _mask_tree(params, ctx.masks) if ctx.masks else None
  temperature, alpha = float(tc.temperature), float(tc.alpha)

  def student_logits(p, x):
    if qat_rules is not None:
      p = (qat.lsq_apply(p["params"], p["steps"], qat_rules) if lsq
           else transforms.fake_quant_params(p, qat_rules))
    return forward(p, x)

  def loss_fn(p, tokens, key, teacher_params):
    x = tokens[:, :-1]
    t_logits = jax.lax.stop_gradient(forward(teacher_params, x))
    return losses.distill_loss(student_logits(p, x), t_logits, tokens[:, 1:], alpha=alpha,
                               temperature=temperature)

  start = params
  if qat_rules is not None and lsq:
    start = {"params": params,
             "steps": qat.lsq_init(params, qat_rules, init=str(tc.get("init", "lsq")))}
    mask_tree = None if mask_tree is None else {"params": mask_tree, "steps": jax.tree.map(
        lambda _: None, start["steps"])}
  cfg = trainer.TrainConfig(steps=int(tc.steps), learning_rate=float(tc.learning_rate),
                            warmup_steps=int(tc.warmup_steps),
                            weight_decay=float(tc.weight_decay), clip_norm=float(tc.clip_norm),
                            seed=int(tc.seed), checkpoint_every=int(tc.checkpoint_every))
  out, history = trainer.fit(loss_fn, start, batch_fn, cfg, masks=mask_tree,
                             workdir=os.path.join(ctx.stage_dir, "train"), progress=ctx.progress,
                             log_every=max(1, int(tc.steps) // 50), frozen=ctx.model.params)
  info = {"steps": int(tc.steps), "tokens": int(tc.steps) * tokens_per_step, "history": history,
          "first_loss": history[0]["loss"] if history else None,
          "last_loss": history[-1]["loss"] if history else None}
  if history and "seconds" in history[-1]:
    info["seconds"] = history[-1]["seconds"]  # summed over interrupted and resumed runs
  if qat_rules is not None:
    out = (qat.lsq_convert(out["params"], out["steps"], qat_rules) if lsq
           else transforms.quantize_params(out, qat_rules))
  return out, info


@_stage("distill", "distill", "params")
def distill_stage(ctx: Context, params, block):
  """Logit knowledge distillation from the FP32 model (masks stay enforced)."""
  out, info = _train(ctx, params, block)
  return out, dict(info, label=f"distill {info['steps']} steps")


@_stage("qat", "qat", "params", compresses=True)
def qat_stage(ctx: Context, params, block):
  """Quantization-aware training (LSQ or straight-through min-max), ending in QArrays."""
  rules = [QuantRule(module_path=ctx.targets, format=str(block.format))]
  out, info = _train(ctx, params, block, qat_rules=rules, lsq=bool(block.lsq))
  return out, dict(info, label=f"qat{'-lsq' if block.lsq else ''} {block.format}")


def _quant_rules(ctx: Context, block) -> list:
  from quantjax.numerics.formats import QuantFormat
  act = str(block.get("act_format", "") or "") or None
  rules = [QuantRule(module_path=ctx.targets, format=str(block.format),
                     calibration=str(block.get("calibration", "auto")), act_format=act)]
  emb = str(block.get("embedding_format", "") or "")
  if emb:
    # The table [vocab, d] is read by the embedding lookup and, tied, contracted over d as
    # the output head: one scale per row, groups along d.
    fmt = QuantFormat.parse(emb)
    for path, x in _leaves(ctx.model.params).items():
      if path in ("embed/embedding", "lm_head/kernel") or path.endswith("embed_tokens"):
        f = fmt if fmt.is_cast or path == "lm_head/kernel" else fmt.replace(channel_axis=0,
                                                                              group_axis=1)
        rules.append(QuantRule(module_path=re.escape(path), format=f))
  head = str(block.get("head_format", "") or "")
  if head and not emb:
    if "lm_head/kernel" not in _leaves(ctx.model.params):
      raise ValueError(f"entry {ctx.entry!r}: quantize.head_format={head!r} but the model has "
                       "no untied head (lm_head/kernel); a rotated model has one")
    rules.append(QuantRule(module_path="lm_head/kernel", format=head))
  return rules


@_stage("quantize", "quantize", "params", compresses=True)
def quantize_stage(ctx: Context, params, block):
  """RTN / casts (NF4, FP8, binary, ternary, int formats by spec), GPTQ, AWQ, SmoothQuant,
  static activation ranges; dynamic activation quantization with `act_format`."""
  from quantjax import methods
  from quantjax.transforms import quantize_params
  method = str(block.method)
  rules = _quant_rules(ctx, block)
  if method in ("rtn", "cast"):
    out = quantize_params(params, rules)
  elif method == "llamacpp":
    from quantjax.eval import llamacpp
    from quantjax.methods import importance as importance_lib
    n = int(block.get("importance_windows", 0) or 0)
    batches = ctx.calib_batches(n) if n else []
    imp = None if not n else importance_lib.input_importance(
        ctx.forward(), params, batches, ctx.targets, progress=ctx.progress)
    out = llamacpp.ggml_quantize_params(params, ctx.targets, str(block.format).upper(),
                                        importance=imp, progress=ctx.progress)
    out = quantize_params(out, rules[1:]) if len(rules) > 1 else out
    extra = {} if imp is None else {"imatrix": _write_imatrix(ctx, imp, batches)}
    return out, {"label": f"llama.cpp {str(block.format).upper()}"
                          + (f" + imatrix ({n} windows)" if n else ""),
                 "format": str(block.format), "method": method, **extra}
  else:
    fam = ctx.model.family
    obs = str(block.get("act_observer", "") or "")
    observer = methods.ActObserver(method=obs) if obs else None
    foldable = (fam.foldable(ctx.model.config)
                if str(block.get("input_scales", "foldable")) == "foldable" else None)
    # Each calibrated method by its registered name (quantjax.methods.base), with the
    # options this stage's block gives it; "static" is RTN with activation ranges.
    options = {"gptq": dict(act_order=bool(block.get("act_order", False))),
               "awq": dict(scales_for=foldable, no_clip=fam.AWQ_NO_CLIP),
               "smoothquant": dict(alpha=float(block.get("alpha", 0.5)), scales_for=foldable),
               "signround": dict(iters=int(block.get("iters", 200)),
                                 lr=float(block.get("lr", 0.0)) or None,
                                 min_clip=float(block.get("min_clip", 0.5)),
                                 seed=None if int(block.get("seed", -1)) < 0
                                 else int(block.seed)),
               "static": dict()}[method]
    observer = observer or (methods.ActObserver(method="minmax") if method == "static" else None)
    meth = methods.base.make("rtn" if method == "static" else method, act_observer=observer,
                             **options)
    res = methods.calibrate(ctx.forward(), params, ctx.calib_batches(), rules, meth,
                            mode=str(block.get("mode", "sequential")), progress=ctx.progress)
    out, _ = methods.fold_input_scales(res.params, fam.fold_groups(ctx.model.config))
  act = str(block.get("act_format", "") or "")
  label = f"{method} {block.format}" + (f" a{act}" if act else "")
  if block.get("embedding_format"):
    label += f" emb {block.embedding_format}"
  elif block.get("head_format"):
    label += f" head {block.head_format}"
  return out, {"label": label, "format": str(block.format), "method": method}


@_stage("mixed", "mixed", "params", compresses=True)
def mixed_stage(ctx: Context, params, block):
  """One format per tensor under a bits-per-weight budget, by Fisher sensitivity."""
  from quantjax import methods
  from quantjax.methods import mixed
  from quantjax.transforms import quantize_params
  windows = ctx.split.model_inputs(
      np.asarray(ctx.split.calib_windows[:int(block.sensitivity_windows)]))
  if windows.shape[0] == 0:
    raise ValueError("mixed precision needs calibration windows for its sensitivity")
  t = time.perf_counter()
  fisher = mixed.fisher_diagonal(ctx.model.family.loss_fn(ctx.model.config), params,
                                 [w[None] for w in windows], ctx.targets, progress=ctx.progress)
  fisher_s = time.perf_counter() - t
  cal = str(block.get("calibration", "auto"))
  costs = mixed.candidate_costs(params, fisher, list(block.candidates), calibration=cal)
  count = sum(int(np.prod(f.shape)) for f in fisher.values())
  alloc = mixed.allocate(costs, int(float(block.budget_bpw) * count / 8), count=count)
  rules = mixed.assignment_rules(alloc, calibration=cal)
  if str(block.method) == "gptq":
    out = methods.calibrate(ctx.forward(), params, ctx.calib_batches(), rules,
                            methods.GPTQ(act_order=True), progress=ctx.progress).params
  else:
    out = quantize_params(params, rules)
  return out, {"label": f"mixed {block.method} {float(block.budget_bpw):g}bpw",
               "histogram": alloc.histogram(), "allocated_bpw": alloc.bits_per_weight,
               "fisher_s": fisher_s, "method": "mixed"}


@_stage("export", "export", "file")
def export_stage(ctx: Context, params, block):
  """Writes the params as a GGUF file that llama.cpp runs, or (`format="hf"`) a Hugging
  Face directory (compressed-tensors where quantized) that transformers and vLLM load;
  atomic either way. With `llamacpp_quantize`, llama.cpp's own quantizer makes that
  type from an F32 export."""
  from quantjax.io import gguf as gguf_io
  cfg, src = ctx.model.config, ctx.model.source
  if str(block.format) == "hf":
    from quantjax.io import export as export_lib
    out = os.path.join(ctx.stage_dir, "hf")
    rec = export_lib.export_model(out, cfg, params, fmt="hf", tokenizer=src or ctx.model.tokenizer,
                                  dtype=str(block.get("hf_dtype", "float32")), overwrite=True)
    print(rec["summary"], flush=True)
    ctx.file = {"path": out, "format": "hf", "label": "hf", "file_bytes": rec["bytes"],
                "quantization_config": rec.get("quantization_config"),
                "notes": rec.get("notes", [])}
    return params, {"label": "hf", "file": ctx.file}
  path = os.path.join(ctx.stage_dir, "model.gguf")
  types = [tuple(t) for t in block.types]
  importance = None
  if int(block.get("importance_windows", 0) or 0):
    from quantjax.methods import importance as importance_lib
    batches = ctx.calib_batches(int(block.importance_windows))
    importance = importance_lib.input_importance(ctx.forward(), params, batches, ctx.targets)
  theirs = str(block.get("llamacpp_quantize", "") or "")
  types_from = str(block.get("types_from", "") or "")
  if theirs or types_from:
    from quantjax.eval import llamacpp
    f32 = os.path.join(ctx.stage_dir, "source-f32.gguf")
    gguf_io.export_gguf(f32, cfg, params, tokenizer=src, float_type="F32")
    if types_from:
      ref = os.path.join(ctx.stage_dir, f"llamacpp-{types_from.lower()}.gguf")
      llamacpp.quantize(f32, ref, types_from)
      types = gguf_io.type_rules(ref) + types
    if theirs:
      llamacpp.quantize(f32, path, theirs)
      label = f"llama.cpp {theirs}"
    os.unlink(f32)
  if not theirs:
    report = gguf_io.export_gguf(path, cfg, params, tokenizer=src, types=types,
                                 float_type=str(block.float_type), importance=importance)
    print(gguf_io.export_summary(report), flush=True)
    label = "gguf" + (f" ({types_from} types)" if types_from else "") + (
        f" + importance ({block.importance_windows} windows)" if importance else "")
  stats = gguf_file_stats(path)
  ctx.file = {"path": path, "format": "gguf", "label": label, **stats}
  if importance:  # beside the model: `llama-quantize --imatrix imatrix.gguf`
    ctx.file["imatrix"] = _write_imatrix(ctx, importance, batches)
  return params, {"label": label, "file": ctx.file}


def _write_imatrix(ctx: Context, importance: dict, batches: list) -> str:
  """Writes `importance` (params path -> mean x² per input feature over `batches`) as
  llama.cpp's importance-matrix file `imatrix.gguf` in the stage's directory (what
  `llama-quantize --imatrix` reads), prints it, and returns its path relative to the work
  directory (`quantjax.io.imatrix`)."""
  from quantjax.io import imatrix as imatrix_lib
  path = os.path.join(ctx.stage_dir, "imatrix.gguf")
  data = ctx.config.data
  tensors = imatrix_lib.tensor_importance(importance, imatrix_lib.gguf_names(ctx.model.config))
  imatrix_lib.write_imatrix(path, tensors, chunk_count=sum(int(b.shape[0]) for b in batches),
                            chunk_size=int(batches[0].shape[1]),
                            datasets=[str(data.get("calib_corpus", "") or data.corpus)])
  print(f"[quantjax]   importance matrix ({len(tensors)} tensors): {path}", flush=True)
  return os.path.relpath(path, ctx.workdir)


def gguf_file_stats(path: str) -> dict:
  """Size, tensor types and bits per weight (matrices other than the token embedding)."""
  import collections

  r = gguf_read.read_gguf(path)  # our reader: it knows types newer than gguf-py (Q2_0)
  n = b = 0
  types: collections.Counter = collections.Counter()
  for t in r.tensors:
    if len(t.shape) == 2:
      types[t.tensor_type.name] += 1
      if t.name != "token_embd.weight":
        n += int(np.prod([int(s) for s in t.shape]))
        b += int(t.n_bytes)
  return {"file_bytes": os.path.getsize(path), "file_bits_per_weight": 8.0 * b / max(n, 1),
          "tensor_types": dict(sorted(types.items()))}


@_stage("evaluate", "eval", "record")
def evaluate_stage(ctx: Context, params, block):
  """The perplexity protocol, KL divergence and top-1 agreement vs FP32, bytes, tokens/s."""
  from quantjax.eval import perplexity as ppl_lib
  ref = _reference(ctx)
  if not ctx.labels:  # the uncompressed model: the reference itself
    ev = dict(ref.record, kl_mean=0.0, kl_p99=0.0, top1_agreement=1.0, kl_rest_mass=None,
              kl_top_k=ref.baseline.k, reference_perplexity=ref.record["perplexity"])
  else:
    ev = ppl_lib.evaluate(ctx.forward(), params, ctx.split, batch_size=int(block.batch_size),
                          progress=ctx.progress, model_name=ctx.model.name,
                          dtype=str(ctx.config.model.dtype), baseline=ref.baseline,
                          desc=ctx.entry)
  extra = {}
  if block.get("transformers"):
    extra["transformers"] = _transformers_scores(ctx, block)
  if block.get("speed"):
    from quantjax.eval import speed as speed_lib
    fam, cfg = ctx.model.family, ctx.model.config
    runs = speed_lib.prefill_decode(fam.decoder(cfg), params, vocab_size=cfg.vocab_size,
                                    batch_sizes=tuple(block.speed_batch_sizes),
                                    prompt_len=int(block.prompt_len),
                                    decode_steps=int(block.decode_steps))
    extra["speed"] = runs
    extra["decode_tokens_per_s"] = runs[0]["decode_tokens_per_s"]
    extra["prefill_tokens_per_s"] = runs[0]["prefill_tokens_per_s"]
  rec = report_lib.build_record(ev, entry=ctx.entry, stages=ctx.labels, params=params,
                                base_bytes=_bytes(ctx.model.params), stage_infos=ctx.infos,
                                family=_family(ctx.labels), **extra)
  return params, rec


def _bytes(tree) -> int:
  from quantjax.eval import memory as memory_lib
  return int(memory_lib.tree_bytes(tree))


def _family(labels) -> str:
  parts: list[str] = []
  for lab in labels:
    head = str(lab).split()[0]
    head = "prune" if head in PRUNE_METHODS else head.split("-")[0]
    if head not in parts:
      parts.append(head)
  return "+".join(parts) if parts else "fp32"


def _transformers_scores(ctx: Context, block) -> dict:
  """transformers (PyTorch, FP32, CPU) on the same windows: perplexity and tokens/s."""
  import torch
  import transformers

  from quantjax.eval import perplexity as ppl_lib
  src = ctx.model.source
  if not src:
    raise ValueError("eval.transformers needs a model loaded from a file or directory")
  if os.path.isdir(src):
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  else:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(src), gguf_file=os.path.basename(src), dtype=torch.float32)
  hf.eval()

  def nll(tokens):
    with torch.no_grad():
      t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
      lp = torch.log_softmax(hf(t).logits.float()[:, :-1], dim=-1)
      return (-lp.gather(-1, t[:, 1:, None])[..., 0]).numpy()
  r = ppl_lib.evaluate(None, None, ctx.split, batch_size=int(block.batch_size),
                       progress=ctx.progress, nll_fn=nll, desc="transformers")
  return {"perplexity": r["perplexity"], "eval_tokens_per_s": r["eval_tokens_per_s"],
          "eval_s": r["eval_s"], "torch_version": torch.__version__}


@_stage("llamacpp", "llamacpp", "record")
def llamacpp_stage(ctx: Context, params, block):
  """llama.cpp scores the exported GGUF on the same windows (perplexity, KL, top-1)."""
  from quantjax.eval import llamacpp
  ref = _reference(ctx)
  f = ctx.file
  n = int(block.get("windows", 0) or 0)
  windows = ctx.split.eval_windows[:n] if n else ctx.split.eval_windows
  res = llamacpp.perplexity(f["path"], ctx.split.model_inputs(windows), progress=ctx.progress,
                            baseline=ref.baseline, skip=ctx.split.skip)
  ev = {k: v for k, v in ref.record.items()
        if k in ("model", "dtype", "corpus", "corpus_sha256", "corpus_tokens", "eval_tokens",
                 "eval_windows", "window", "predicted_tokens", "calib_windows",
                 "calib_tokens_available", "seed", "jax_version", "jaxlib_version", "backend",
                 "device", "device_count", "cpu", "cpu_count", "python", "bos")}
  ev.update({k: v for k, v in res.items() if k != "tokens"}, scored_tokens=res["tokens"],
            eval_windows_scored=int(windows.shape[0]),
            reference_perplexity=(ref.record["perplexity"] if not n else None))
  if n:  # a subset of windows: the reference's perplexity on the same subset
    ev["reference_perplexity"] = float(np.exp(np.mean(ref.record["per_window_nll"][:n])))
  extra = {"file": os.path.relpath(f["path"], ctx.workdir), "params_bytes": f["file_bytes"],
           "bits_per_weight": f["file_bits_per_weight"], "tensor_types": f["tensor_types"]}
  if block.get("jax"):
    from quantjax.eval import perplexity as ppl_lib
    from quantjax.io import gguf as gguf_io
    jcfg, jparams, _, _ = gguf_io.import_gguf(f["path"], tokenizer=False)
    fam = ctx.model.family
    sub = dataclasses.replace(ctx.split, eval_windows=windows)
    extra["jax_perplexity"] = ppl_lib.evaluate(
        fam.forward_fn(jcfg.replace(dtype=str(ctx.config.model.dtype))), jparams, sub,
        batch_size=int(ctx.config.eval.batch_size), progress=ctx.progress,
        desc="jax (same file)")["perplexity"]
  stages = ctx.labels + ([f["label"]] if f["label"].startswith("llama.cpp") else [])
  rec = report_lib.build_record(ev, entry=ctx.entry, stages=stages, stage_infos=ctx.infos,
                                runtime="llama.cpp",
                                family="llama.cpp" if f["label"].startswith("llama.cpp")
                                else _family(ctx.labels) + " (GGUF)", **extra)
  return params, rec


@_stage("transformers", "transformers", "record")
def transformers_stage(ctx: Context, params, block):
  """transformers (PyTorch, FP32, CPU) scores the exported Hugging Face directory on the
  same windows: perplexity, KL and top-1 agreement against the FP32 reference."""
  import torch
  import transformers

  from quantjax.eval import perplexity as ppl_lib
  ref = _reference(ctx)
  d = ctx.file["path"]
  how = "default"
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  except Exception as e:  # noqa: BLE001 - transformers' documented fallback, recorded
    if not block.get("dequantize_fallback", True):
      raise
    how = f"CompressedTensorsConfig(dequantize=True) after: {type(e).__name__}"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
  model.eval()

  def logits_fn(tokens):
    with torch.no_grad():
      return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
  n = int(block.get("windows", 0) or 0)
  split = ctx.split if not n else dataclasses.replace(ctx.split,
                                                      eval_windows=ctx.split.eval_windows[:n])
  ev = ppl_lib.evaluate_logits(logits_fn, split, baseline=ref.baseline,
                               batch_size=int(ctx.config.eval.batch_size),
                               progress=ctx.progress, model_name=ctx.model.name,
                               desc="transformers")
  if n:
    ev["reference_perplexity"] = float(np.exp(np.mean(ref.record["per_window_nll"][:n])))
  return params, report_lib.build_record(
      ev, entry=ctx.entry, stages=ctx.labels, stage_infos=ctx.infos, runtime="transformers",
      family=_family(ctx.labels) + " (HF)", file=os.path.relpath(d, ctx.workdir),
      params_bytes=ctx.file["file_bytes"], transformers_load=how,
      torch_version=torch.__version__)


# ----------------------------------------------------------------------------
# The runner.


def _saves(stage: str, config) -> bool:
  """Whether a finished stage keeps its params on disk (expensive to recompute)."""
  if stage in ("prune", "distill", "qat", "mixed"):
    return True
  if stage == "rotate":
    return int(config.rotate.get("learn_steps", 0) or 0) > 0
  if stage == "quantize":
    return str(config.quantize.method) in _CALIBRATED + ("llamacpp",)
  return False


def _split(config, model) -> data_lib.Split:
  """The protocol's windows; with `data.calib_corpus`, calibration windows come from that
  text (drawn before its own evaluation part) and evaluation from `data.corpus`."""
  split = data_lib.load_split(model.tokenizer, str(config.data.corpus), _protocol(config))
  other = str(config.data.get("calib_corpus", "") or "")
  if other and other != split.corpus:
    cal = data_lib.load_split(model.tokenizer, other, _protocol(config))
    split = dataclasses.replace(split, calib_windows=cal.calib_windows,
                                calib_starts=cal.calib_starts, calib_corpus=cal.corpus,
                                calib_corpus_sha256=cal.corpus_sha256)
  return split


def _protocol(config) -> data_lib.Protocol:
  return data_lib.Protocol(eval_tokens=int(config.eval.tokens), window=int(config.eval.window),
                           calib_windows=int(config.calib.windows), seed=int(config.calib.seed))


def run(config, workdir: str) -> list[dict[str, Any]]:
  """Runs every entry of `config` into `workdir`; returns the evaluation records."""
  from quantjax.models import load as load_lib
  t_start = time.perf_counter()
  todo = entries(config)
  plans = [(name, c, validate(c, name)) for name, c in todo]  # before any heavy work
  ident = identity(config)
  for name, c in todo:
    if identity(c) != ident:
      raise ValueError(f"sweep entry {name!r} changes the model, corpus or protocol; put it "
                       "in an experiment (work directory) of its own")
  _claim_workdir(workdir, ident)
  report_lib.write_text_atomic(os.path.join(workdir, "config.json"),
                               config.to_json_best_effort(indent=2) + "\n")
  finished = _finished_records(workdir, plans)
  info_path = os.path.join(workdir, "model.json")
  if finished is not None and os.path.exists(info_path):  # nothing to run: no model needed
    info = report_lib.read_json(info_path)
    model = load_lib.LoadedModel(name=info["name"], config=None, params=None, tokenizer=None,
                                 family=None, caveat=info.get("caveat", ""))
    text = _write(workdir, finished, config, model)
    print("\n" + text, flush=True)
    print(f"[quantjax] every stage was done; rewrote the tables in "
          f"{time.perf_counter() - t_start:.1f}s", flush=True)
    return finished
  m = config.model
  t0 = time.perf_counter()
  model = load_lib.load_model(str(m.source), str(m.path), dtype=str(m.dtype),
                              tiny=m.tiny.to_dict() if "tiny" in m else None)
  load_s = time.perf_counter() - t0
  report_lib.write_json_atomic(info_path, {"name": model.name, "caveat": model.caveat,
                                           "source": model.source})
  split = _split(config, model)
  print(f"[quantjax] loaded {model.name} in {load_s:.1f}s; corpus {split.corpus}: "
        f"{split.num_tokens:,} tokens, evaluating the last {split.protocol.eval_tokens:,} "
        f"({split.protocol.eval_windows} windows of {split.protocol.window})", flush=True)

  records: list[dict] = []
  reference = None
  memo: dict[str, tuple] = {}  # key -> (params, masks): the last computed params, shared
  untied = None
  for i, (name, c, stages) in enumerate(plans):
    print(f"[quantjax] entry {i + 1}/{len(plans)}: {name} ({' → '.join(stages)})", flush=True)
    entry_model = model
    if "rotate" in stages:
      untied = untied or rotation_model(model)
      entry_model = untied
    ctx = Context(config=c, model=entry_model, split=split, workdir=workdir, entry=name,
                  reference=reference)
    records += _run_entry(ctx, stages, memo)
    reference = ctx.reference
    _write(workdir, records, config, model)
  text = _write(workdir, records, config, model)
  print("\n" + text, flush=True)
  print(f"[quantjax] wrote {workdir}/results.json, results.md, pareto.png in "
        f"{time.perf_counter() - t_start:.0f}s", flush=True)
  return records


def _keys(c, stages: list[str]) -> list[str]:
  """Each stage's resume key: its name and block, hashed onto the key before it."""
  key = _hash({"identity": identity(c), "targets": str(c.get("targets", "") or ""),
               "calib": _block(c, "calib"), "dtype": str(c.model.dtype)})
  out = []
  for s in stages:
    key = _hash([key, s, _block(c, STAGES[s].block)])
    out.append(key)
  return out


def _finished_records(workdir: str, plans) -> list[dict] | None:
  """Every entry's records when all their stages are done, else None."""
  records = []
  for _, c, stages in plans:
    keys = _keys(c, stages)
    for s, k, d in zip(stages, keys, _stage_dirs(workdir, stages, keys)):
      done = _read_done(d)
      if done is None or done.get("key") != k:
        return None
      if STAGES[s].kind == "record":
        records.append(done["record"])
  return records


def _stage_dirs(workdir: str, stages: list[str], keys: list[str]) -> list[str]:
  return [os.path.join(workdir, "stages", f"{s}-{k}") for s, k in zip(stages, keys)]


def exported_file(config, workdir: str) -> str:
  """The file written by the last `export` stage of `config`'s (single or last) entry."""
  name, c = entries(config)[-1]
  stages = validate(c, name)
  if "export" not in stages:
    raise ValueError(f"entry {name!r} has no export stage (stages: {', '.join(stages)})")
  keys = _keys(c, stages)
  i = len(stages) - 1 - stages[::-1].index("export")
  done = _read_done(_stage_dirs(workdir, stages, keys)[i])
  if done is None or done.get("key") != keys[i]:
    raise ValueError(f"entry {name!r} of {workdir} has not finished its export stage")
  return os.path.join(workdir, done["info"]["file"]["relpath"])


def _run_entry(ctx: Context, stages: list[str], memo: dict) -> list[dict]:
  keys = _keys(ctx.config, stages)
  dirs = _stage_dirs(ctx.workdir, stages, keys)
  dones = [_read_done(d) for d in dirs]
  first = next((i for i, d in enumerate(dones) if d is None or d.get("key") != keys[i]),
               len(stages))
  # The params before stage `first`: the last saved (or memoised) ones, then the cheap
  # stages after them recomputed.
  start = -1
  for j in range(first - 1, -1, -1):
    if keys[j] in memo or (STAGES[stages[j]].kind == "params" and _saves(stages[j], ctx.config)):
      start = j
      break
  if first == len(stages):
    start = len(stages)  # everything is done: no params are needed
  params = ctx.model.params
  records = []
  for i, (s, key, sdir) in enumerate(zip(stages, keys, dirs)):
    st = STAGES[s]
    block = ctx.config[st.block] if st.block and st.block in ctx.config else None
    done = dones[i] if i < first else None
    if done is not None:
      if st.kind == "record":
        records.append(done["record"])
      elif st.kind == "file":
        ctx.file = done["info"]["file"]
        ctx.file["path"] = os.path.join(ctx.workdir, ctx.file["relpath"])
      else:
        ctx.labels.append(done["info"]["label"])
        ctx.infos.append(done["info"])
        if i == start:
          if key in memo:
            params, ctx.masks = memo[key]
          else:
            params, ctx.masks = _load_params(sdir)
        elif i > start:  # a cheap stage: recompute (deterministic)
          ctx.stage_dir = sdir
          params, _ = st.fn(ctx, params, block)
      print(f"[quantjax]   {s}: done ({done['info']['label'] if 'info' in done else 'record'})",
            flush=True)
      continue
    ctx.stage_dir = sdir
    os.makedirs(sdir, exist_ok=True)
    print(f"[quantjax]   {s}: running", flush=True)
    t = time.perf_counter()
    params, out = st.fn(ctx, params, block)
    seconds = time.perf_counter() - t
    if st.kind == "record":
      records.append(out)
      _write_done(sdir, {"key": key, "stage": s, "record": out})
      ppl = out.get("perplexity")
      print(f"[quantjax]   {ctx.entry}: perplexity {ppl:.4f}"
            + (f", KL {out['kl_mean']:.4f}" if out.get("kl_mean") is not None else ""),
            flush=True)
      continue
    info = dict(out)
    info.setdefault("seconds", seconds)
    info["stage"] = s
    if st.kind == "file":
      ctx.file["relpath"] = os.path.relpath(ctx.file["path"], ctx.workdir)
      info["file"] = dict(ctx.file)
      _write_done(sdir, {"key": key, "stage": s, "info": info})
      continue
    history = info.pop("history", None)
    ctx.labels.append(info["label"])
    ctx.infos.append(info)
    if _saves(s, ctx.config):
      _save_params(sdir, params, ctx.masks)
    memo.clear()
    memo[key] = (params, ctx.masks)
    _write_done(sdir, {"key": key, "stage": s, "info": info,
                       **({"history": history} if history else {})})
  return records


def _write(workdir: str, records: list[dict], config, model) -> str:
  title = str(config.get("name", "") or "") or "experiment"
  notes = [model.caveat] if model.caveat else []
  return report_lib.write_report(workdir, records, title=f"{model.name}: {title}", notes=notes)


def clean_stage(workdir: str, stage_dir: str) -> None:
  """Removes one stage directory of this runner (never anything outside `workdir/stages`)."""
  root = os.path.realpath(os.path.join(workdir, "stages"))
  d = os.path.realpath(stage_dir)
  if os.path.dirname(d) != root:
    raise ValueError(f"{stage_dir} is not a stage directory of {workdir}")
  shutil.rmtree(d)
