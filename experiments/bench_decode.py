"""Generation and evaluation speed of SmolLM2-135M on CPU: FP32, quantized, llama.cpp.

    python -m experiments.bench_decode --out=runs/bench_decode          # full (~40 min, 2 cores)
    python -m experiments.bench_decode --quick --out=/tmp/bench_decode  # smoke run
    python -m experiments.bench_decode --layers_only --out=runs/bench_layers  # layer table (~2 min)

One run, the same prompts (random tokens, `speed.bench_prompts`) and the
same number of greedy steps for every row:

* **layers**: one SmolLM2 MLP weight `x [M, 576] @ W [576, 1536]` at M = 1
  and 8, computed by every option `ops.qdot` could use on CPU: the FP32 dot,
  XLA's dequantize-then-dot (the reference path), a multiply-and-reduce
  written in `jnp` so that XLA fuses the unpacking of the codes into the
  reduction, and the C++ FFI kernel (`kernels/cpu_matmul.py`); with the
  fraction of the machine's copy bandwidth each reaches. Formats: `--layer_formats`
  (default int4 g64, q4_0, llama.cpp's 4-bit table types IQ4_NL and MXFP4, and int8),
  each row also as a ratio to q4_0's time for the same option.
* **generation**: prefill and decode tokens/s at batch 1 and 8 for FP32
  weights; for each format (every `*_proj` kernel quantized by
  round-to-nearest; embedding / tied head FP32, as in the default
  comparison, or quantized too with a `fmt+head_fmt` spec such as
  `q4_0+q8_0`) through the default path (the CPU kernel for decode, XLA for
  prefill) and through XLA's dequantize-then-dot everywhere; and llama.cpp
  (llama-cpp-python) on an F32 GGUF of the same weights and on llama.cpp's
  own Q4_0 of that file. Peak resident memory is measured in a fresh
  subprocess per row (Linux `VmHWM`, reset after compiling; freed heap pages
  of the FP32 tree a format was quantized from are returned to the OS
  first), with the weights' bytes beside it: while generating (prefill, which
  runs XLA's dequantize-then-dot, and step-by-step decode), and while the
  device loop decodes alone. Decode at batch 1 reads every weight once
  per token: the table gives that traffic (weight bytes x tokens/s) as a
  fraction of the measured copy bandwidth.
* **evaluation**: tokens/s of the perplexity protocol's batch (8 windows x
  512 tokens of the evaluation text, the jitted NLL of `eval.perplexity`) for
  FP32 and for every weight format of the default comparison, each over
  FP32.

Each measurement runs in its own subprocess (`--worker`), one after another.
Writes `bench_decode.json` and `bench_decode.md` under `--out` (atomically).
Run it alone on the machine (`flock /tmp/quantjax-heavy.lock ...` here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

# Formats generated with (issue: q4_0 / q4_1 / q8_0 as GGUF imports run, int4 group-wise
# sym and asym, int8 per channel).
DECODE_FORMATS = ("q4_0", "q4_1", "q8_0", "int4_g64", "int4_g64_asym", "int8")
# Every weight format of the default comparison, for the evaluation-speed table.
EVAL_FORMATS = ("bf16", "int8", "int4", "int4_g64", "int4_g64_asym", "int3_g64_asym", "nf4_g64",
                "fp8_e4m3", "w8a8", "q4_0", "q4_1", "q8_0")
LAYER_SHAPE = (576, 1536)
# Formats of the layer table: q4_0 beside the other 4-bit formats the kernel takes
# through a table of levels (IQ4_NL, MXFP4), int4 g64 and int8.
LAYER_FORMATS = ("int4_g64", "q4_0", "iq4_nl", "mxfp4", "int8")
_RESULT = "BENCH_DECODE_RESULT "


# ----------------------------------------------------------------------------
# Worker side (one subprocess per measurement).


def _rules(fmt: str):
  """Rules of a format spec: `q4_0` (every `*_proj` kernel) or `q4_0+q8_0` (also the
  tied embedding / output head, in groups along its contraction axis, as llama.cpp
  quantizes `token_embd`)."""
  import quantjax as qj
  from quantjax.models import llama
  fmt, _, head = fmt.partition("+")
  if fmt == "w8a8":
    rules = [qj.QuantRule(module_path=llama.PROJ_KERNELS, format="int8", act_format="int8")]
  else:
    rules = [qj.QuantRule(module_path=llama.PROJ_KERNELS, format=fmt)]
  if head:
    rules.append(qj.QuantRule(module_path="embed/embedding",
                              format=qj.QuantFormat.parse(head, group_axis=1, channel_axis=0)))
  return rules


def _copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
  """Bytes/s of an XLA elementwise pass over a buffer far larger than the caches."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append(time.perf_counter() - t0)
  a = np.ones(nbytes // 4, np.float32)
  b = np.empty_like(a)
  tn = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.copyto(b, a)
    tn.append(time.perf_counter() - t0)
  return {"xla_read_write_bytes_per_s": 2 * nbytes / min(ts),
          "numpy_copy_bytes_per_s": 2 * nbytes / min(tn), "buffer_bytes": nbytes}


def _fused_reduce(x, w):
  """The multiply-and-reduce option: XLA fuses the unpacking into a reduction."""
  import jax.numpy as jnp
  k, n = w.shape
  f = w.fmt
  if f.bits == 4:
    g = f.group_size or k
    b = w.qvalue.reshape(k // g, g // 2, n)
    if f.kind == "int":
      lo = (b & 15).astype(jnp.float32) + f.qmin
      hi = (b >> 4).astype(jnp.float32) + f.qmin
    else:  # codes index a table of levels (NF4, IQ4_NL, MXFP4, NVFP4)
      lv = jnp.asarray(f.levels, jnp.float32)
      lo, hi = lv[(b & 15).astype(jnp.int32)], lv[(b >> 4).astype(jnp.int32)]
    xe = x[:, 0::2].reshape(-1, k // g, g // 2, 1)
    xo = x[:, 1::2].reshape(-1, k // g, g // 2, 1)
    inner = jnp.sum(xe * lo[None] + xo * hi[None], axis=2)  # [M, groups, N]
  else:
    g = f.group_size or k
    c = w.qvalue.reshape(k // g, g, n).astype(jnp.float32)
    inner = jnp.sum(x.reshape(-1, k // g, g, 1) * c[None], axis=2)
  s = w.scale.astype(jnp.float32).reshape(-1, n)
  return jnp.sum(inner * s[None], axis=1)


def _layers(spec: dict) -> dict:
  import statistics

  import jax
  import jax.numpy as jnp

  import quantjax as qj
  from quantjax.kernels import cpu_matmul, dispatch

  bw = _copy_bandwidth()
  k, n = LAYER_SHAPE
  w = jax.random.normal(jax.random.key(0), (k, n)) * 0.02
  rows = []

  def timeit(entries, repeats=spec["layer_repeats"], block=10):
    """Min and median seconds of each `(fn, args)`. The calls run in interleaved rounds:
    per round, each entry in turn makes one untimed call (its weight back in cache, as
    in a run of calls of one entry) and `block` timed ones, so that load from elsewhere
    on the machine falls on every entry alike, not on whichever ran during it."""
    for fn, args in entries:
      for _ in range(5):
        jax.block_until_ready(fn(*args))
    ts = [[] for _ in entries]
    for _ in range(max(1, repeats // block)):
      for i, (fn, args) in enumerate(entries):
        jax.block_until_ready(fn(*args))
        for _ in range(block):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*args))
          ts[i].append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in ts]

  for m in (1, 8):
    x = jax.random.normal(jax.random.key(1), (m, k))
    entries = [(jax.jit(lambda a, b: a @ b), (x, w))]
    meta = [{"m": m, "format": "fp32", "option": "FP32 dot", "weight_bytes": k * n * 4}]
    for fmt in spec["layer_formats"]:
      q = qj.quantize(w, fmt)
      ref = jax.jit(lambda a, b: cpu_matmul.cpu_matmul_reference(a, b))(x, q)
      opts = {}
      with dispatch.matmul_path("xla"):
        opts["XLA dequantize-then-dot"] = jax.jit(lambda a, b: qj.qdot(a, b))
        jax.block_until_ready(opts["XLA dequantize-then-dot"](x, q))
      opts["XLA fused multiply-reduce"] = jax.jit(_fused_reduce)
      if cpu_matmul.available():
        opts["C++ FFI kernel"] = jax.jit(lambda a, b: cpu_matmul.cpu_matmul(a, b))
      for name, fn in opts.items():
        err = float(jnp.max(jnp.abs(fn(x, q) - ref)) / jnp.max(jnp.abs(ref)))
        entries.append((fn, (x, q)))
        meta.append({"m": m, "format": fmt, "option": name, "weight_bytes": int(q.nbytes),
                     "max_rel_err": err})
    for r, (tmin, tmed) in zip(meta, timeit(entries)):
      rows.append(dict(r, min_s=tmin, median_s=tmed))
  return {"bandwidth": bw, "layers": rows}


def _load(fmt: str):
  import gc

  from quantjax.eval import speed
  from quantjax.models import load
  import quantjax as qj
  cfg, params, tok = load.load_smollm2()
  if fmt != "fp32":
    q = qj.quantize_params(params, _rules(fmt))
    del params
    params = q
  gc.collect()
  speed.trim_heap()
  return cfg, params, tok


def _jax(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from quantjax.eval import data, perplexity, speed
  from quantjax.kernels import dispatch
  from quantjax.eval.memory import tree_bytes
  from quantjax.models import llama

  jax.block_until_ready(jax.jit(lambda a: a + 1)(jnp.ones(4)))
  rss_runtime = speed.rss_bytes()
  cfg, params, tok = _load(spec["format"])
  rss_loaded = speed.rss_bytes()
  out = {"weights_bytes": tree_bytes(params), "rss_runtime_bytes": rss_runtime,
         "rss_loaded_bytes": rss_loaded}
  prompts = [np.asarray(p) for p in spec["prompts"]]
  with dispatch.matmul_path(spec["path"]):
    if spec["generate"]:
      out["generation"] = speed.prefill_decode(llama.decoder(cfg), params,
                                               vocab_size=cfg.vocab_size, prompts=prompts,
                                               decode_steps=spec["decode_steps"],
                                               repeats=spec["repeats"], peak_rss=True)
    if spec["eval"]:
      split = data.load_split(tok)
      windows = np.asarray(split.eval_windows[:8], np.int32)
      fn = jax.jit(lambda p, t: perplexity.token_nll(llama.forward_fn(cfg)(p, t), t))
      batch = jnp.asarray(windows)
      t0 = time.perf_counter()
      compiled = fn.lower(params, batch).compile()
      compile_s = time.perf_counter() - t0
      jax.block_until_ready(compiled(params, batch))
      ts = []
      for _ in range(spec["eval_repeats"]):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        ts.append(time.perf_counter() - t0)
      out["eval"] = {"tokens": int(windows.size), "compile_s": compile_s, "seconds": ts,
                     "tokens_per_s": windows.size / min(ts),
                     "tokens_per_s_median": windows.size / float(np.median(ts))}
  return out


def _llamacpp(spec: dict) -> dict:
  import numpy as np

  from quantjax.eval import llamacpp, speed
  rss_runtime = speed.rss_bytes()
  speed.reset_peak_rss()
  gen = llamacpp.prefill_decode(spec["gguf"], [np.asarray(p) for p in spec["prompts"]],
                                decode_steps=spec["decode_steps"], repeats=spec["repeats"])
  return {"generation": gen, "rss_runtime_bytes": rss_runtime,
          "peak_rss_bytes": speed.peak_rss_bytes(),
          "weights_bytes": _gguf_tensor_bytes(spec["gguf"])}


def _gguf_tensor_bytes(path: str) -> int:
  from quantjax.io import gguf as gguf_io
  return int(gguf_io.file_tensor_bytes(path))


def _prepare(spec: dict) -> dict:
  """Writes the F32 GGUF of the FP32 weights and llama.cpp's Q4_0 of it."""
  import gguf

  from quantjax.eval import llamacpp
  from quantjax.io import gguf as gguf_io
  from quantjax.models import load
  cfg, params, _ = load.load_smollm2()
  f32, q40 = spec["f32"], spec["q4_0"]
  if not os.path.exists(f32):
    gguf_io.export_gguf(f32, cfg, params, tokenizer=load.smollm2_path(), float_type="F32")
  if not os.path.exists(q40):
    llamacpp.quantize(f32, q40, "Q4_0")
  types = {}
  for t in gguf.GGUFReader(q40).tensors:
    if t.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
      types[t.name] = t.tensor_type.name
  return {"q4_0_types": types, "f32_bytes": _gguf_tensor_bytes(f32),
          "q4_0_bytes": _gguf_tensor_bytes(q40)}


def worker(spec: dict) -> None:
  kind = spec["kind"]
  fn = {"layers": _layers, "jax": _jax, "llamacpp": _llamacpp, "prepare": _prepare}[kind]
  res = fn(spec)
  print(_RESULT + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------
# Orchestrator.


def _run(spec: dict, log) -> dict:
  cmd = [sys.executable, "-m", "experiments.bench_decode", "--worker", json.dumps(spec)]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"worker {spec.get('kind')} {spec.get('format', '')} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  res = json.loads(lines[-1][len(_RESULT):])
  res["wall_s"] = wall
  log(f"  done in {wall:.0f} s")
  return res


def _mb(b) -> str:
  return "–" if b is None else f"{b / 2**20:.0f}"


def _gen(rows, b, key):
  for r in rows:
    if r["batch"] == b:
      return r.get(key)
  return None


def _layer_table(res: dict) -> list[str]:
  """The layer table: each option's time, as a speed ratio to the FP32 dot and to q4_0's
  same option (>1: faster than q4_0), weight GB/s, fraction of the copy bandwidth."""
  bw = res["bandwidth"]["xla_read_write_bytes_per_s"]
  out = ["| M | format | option | µs (min) | µs (median) | vs FP32 dot | vs q4_0 | weight GB/s | "
         "of copy bandwidth | max rel. err |",
         "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  base = {r["m"]: r["min_s"] for r in res["layers"] if r["format"] == "fp32"}
  q4 = {(r["m"], r["option"]): r["min_s"] for r in res["layers"] if r["format"] == "q4_0"}
  for r in res["layers"]:
    gbs = r["weight_bytes"] / r["min_s"]
    err = r.get("max_rel_err")
    vs_q4 = q4.get((r["m"], r["option"]))
    vs_q4 = "–" if vs_q4 is None else f"{vs_q4 / r['min_s']:.2f}x"
    out.append(f"| {r['m']} | {r['format']} | {r['option']} | {1e6 * r['min_s']:.0f} | "
               f"{1e6 * r['median_s']:.0f} | {base[r['m']] / r['min_s']:.2f}x | "
               f"{vs_q4} | {gbs / 1e9:.1f} | "
               f"{gbs / bw:.0%} | {'' if err is None else f'{err:.1e}'} |")
  out.append("")
  return out


def markdown(res: dict) -> str:
  bw = res["bandwidth"]["xla_read_write_bytes_per_s"]
  out = ["# Decode / prefill / evaluation speed, SmolLM2-135M on CPU\n",
         f"Command: `{res['command']}`  ",
         f"Machine: {res['env']['cpu']} ({res['env']['cpu_count']} cores), jax "
         f"{res['env']['jax_version']}; measured copy bandwidth {bw / 1e9:.1f} GB/s "
         f"(XLA read+write over 1 GiB; numpy copy "
         f"{res['bandwidth']['numpy_copy_bytes_per_s'] / 1e9:.1f} GB/s). "
         + (f"Layer table only: {res.get('layer_repeats')} timed calls per option after 5 "
            f"warm-up calls, in interleaved rounds of 10. "
            f"Total {res['wall_s'] / 60:.1f} min.\n" if "generation" not in res else
            f"Prompt {res['prompt_len']} random tokens, {res['decode_steps']} greedy steps, "
            f"median of {res['repeats']} runs after a warm-up. "
            f"Total {res['wall_s'] / 60:.0f} min.\n")]
  out.append(f"## Layer options: x [M, {LAYER_SHAPE[0]}] @ W [{LAYER_SHAPE[0]}, {LAYER_SHAPE[1]}]\n")
  out.extend(_layer_table(res))
  if "generation" not in res:  # --layers_only
    return "\n".join(out)
  out.append("## Generation (KV cache), batch 1 and 8\n")
  out.append("| runtime | weights | path | weight MB | decode tok/s b1 | decode tok/s b8 | "
             "decode tok/s b1, per-step Python loop | "
             "prefill tok/s b1 | prefill tok/s b8 | decode b1 vs FP32 | decode b1 vs llama.cpp Q4_0 "
             "| b1 weight traffic of copy bw | peak RSS generating MB (b1 / b8) "
             "| peak RSS decoding MB (b1 / b8) | RSS loaded MB |")
  out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  fp32 = _gen(res["generation"][0]["generation"], 1, "decode_tokens_per_s")
  lq = [r for r in res["generation"] if r["runtime"] == "llama.cpp" and r["weights"] == "Q4_0"]
  lq4 = _gen(lq[0]["generation"], 1, "decode_tokens_per_s") if lq else None
  for r in res["generation"]:
    g = r["generation"]
    d1, d8 = _gen(g, 1, "decode_tokens_per_s"), _gen(g, 8, "decode_tokens_per_s")
    p1, p8 = _gen(g, 1, "prefill_tokens_per_s"), _gen(g, 8, "prefill_tokens_per_s")
    traffic = r["weights_bytes"] * d1 / bw if d1 else None
    if r["runtime"] == "llama.cpp":
      peak = _mb(r.get("peak_rss_bytes"))
      dpeak = "–"
    else:
      peak = f"{_mb(_gen(g, 1, 'peak_rss_bytes'))} / {_mb(_gen(g, 8, 'peak_rss_bytes'))}"
      dpeak = (f"{_mb(_gen(g, 1, 'decode_peak_rss_bytes'))} / "
               f"{_mb(_gen(g, 8, 'decode_peak_rss_bytes'))}")
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    out.append(f"| {r['runtime']} | {r['weights']} | {r['path']} | {_mb(r['weights_bytes'])} | "
               f"{fmt(d1)} | {fmt(d8)} | {fmt(_gen(g, 1, 'decode_host_loop_tokens_per_s'))} | "
               f"{fmt(p1)} | {fmt(p8)} | "
               f"{d1 / fp32:.2f}x | {'–' if not lq4 else f'{d1 / lq4:.2f}x'} | "
               f"{'–' if traffic is None else f'{traffic:.0%}'} | {peak} | {dpeak} | "
               f"{_mb(r.get('rss_loaded_bytes'))} |")
  out.append("")
  out.append("Decode: the jitted device loop (`decoder(config).decode`, one call for every "
             "step); the per-step column calls the jitted step once per token from Python "
             "(both give the same greedy tokens; llama.cpp: one call per token). Weights "
             "`a+b`: `*_proj` kernels in `a`, the tied embedding / output head in `b`.")
  out.append("")
  out.append("Weight MB: bytes of the params tree (JAX; FP32 embedding included) or of the GGUF's "
             "tensors (llama.cpp). llama.cpp Q4_0 tensor types: "
             + ", ".join(f"{k} {v}" for k, v in res.get("q4_0_types", {}).items()) + ".")
  out.append("")
  out.append("## Evaluation throughput: 8 windows x 512 tokens (the perplexity protocol's batch)\n")
  out.append("| weights | tokens/s (best) | tokens/s (median) | vs FP32 (best) | compile s |")
  out.append("|---|---:|---:|---:|---:|")
  e0 = res["eval"][0]["eval"]["tokens_per_s"]
  for r in res["eval"]:
    e = r["eval"]
    out.append(f"| {r['weights']} | {e['tokens_per_s']:.0f} | {e['tokens_per_s_median']:.0f} | "
               f"{e['tokens_per_s'] / e0:.2f}x | {e['compile_s']:.0f} |")
  out.append("")
  return "\n".join(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/bench_decode")
  parser.add_argument("--quick", action="store_true", help="smoke run: few formats and steps")
  parser.add_argument("--formats", default=",".join(DECODE_FORMATS))
  parser.add_argument("--eval_formats", default=",".join(EVAL_FORMATS))
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--decode_steps", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--eval_repeats", type=int, default=3)
  parser.add_argument("--no_llamacpp", action="store_true")
  parser.add_argument("--layers_only", action="store_true",
                      help="only the layer table (formats vs FP32 on one [576, 1536] weight)")
  parser.add_argument("--layer_formats", default=",".join(LAYER_FORMATS))
  parser.add_argument("--layer_repeats", type=int, default=None,
                      help="timed calls per option (default 200; 20 with --quick)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(json.loads(args.worker))
    return

  from quantjax.eval import perplexity, report, speed

  t_start = time.perf_counter()
  formats = [f for f in args.formats.split(",") if f]
  eval_formats = [f for f in args.eval_formats.split(",") if f]
  steps, repeats, eval_repeats = args.decode_steps, args.repeats, args.eval_repeats
  if args.quick:
    formats, eval_formats = formats[:1], eval_formats[:1]
    steps, repeats, eval_repeats = min(steps, 8), 1, 1
  os.makedirs(args.out, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # noqa: E731
  cfg_vocab = 49152
  prompts = [p.tolist() for p in speed.bench_prompts(cfg_vocab, (1, 8), args.prompt_len)]
  common = {"prompts": prompts, "decode_steps": steps, "repeats": repeats,
            "eval_repeats": eval_repeats}
  res: dict[str, Any] = {
      "command": "python -m experiments.bench_decode " + " ".join(argv or sys.argv[1:]),
      "env": perplexity.environment(), "prompt_len": args.prompt_len, "decode_steps": steps,
      "repeats": repeats, "generation": [], "eval": []}
  log("layers and copy bandwidth")
  layer_repeats = args.layer_repeats or (20 if args.quick else 200)
  lay = _run({"kind": "layers", "layer_formats": [f for f in args.layer_formats.split(",") if f],
              "layer_repeats": layer_repeats}, log)
  res["bandwidth"], res["layers"] = lay["bandwidth"], lay["layers"]
  if args.layers_only:
    for key in ("generation", "eval", "prompt_len", "decode_steps", "repeats"):
      res.pop(key)
    res["layer_repeats"] = layer_repeats
    res["wall_s"] = time.perf_counter() - t_start
    report.write_json_atomic(os.path.join(args.out, "bench_decode_layers.json"), res)
    md = markdown(res)
    report.write_text_atomic(os.path.join(args.out, "bench_decode_layers.md"), md)
    print(md)
    return

  def jax_row(fmt, path, generate, evaluate):
    log(f"jax {fmt} path={path} generate={generate} eval={evaluate}")
    r = _run({"kind": "jax", "format": fmt, "path": path, "generate": generate,
              "eval": evaluate, **common}, log)
    r.update(runtime="quantjax", weights=fmt, path="–" if fmt == "fp32" else path)
    return r

  fp32 = jax_row("fp32", "auto", True, True)
  res["generation"].append(fp32)
  res["eval"].append(dict(fp32, weights="fp32"))
  for fmt in formats:
    r = jax_row(fmt, "auto", True, fmt in eval_formats)
    res["generation"].append(dict(r, path="auto (CPU kernel)"))
    if "eval" in r:
      res["eval"].append(r)
    res["generation"].append(dict(jax_row(fmt, "xla", True, False), path="xla (reference)"))
  for fmt in eval_formats:
    if fmt not in formats:
      res["eval"].append(jax_row(fmt, "auto", False, True))
  if not args.no_llamacpp:
    gg = os.path.join(args.out, "gguf")
    os.makedirs(gg, exist_ok=True)
    files = {"f32": os.path.join(gg, "smollm2-f32.gguf"),
             "q4_0": os.path.join(gg, "smollm2-q4_0.gguf")}
    log("GGUF files (F32 export, llama.cpp Q4_0)")
    prep = _run({"kind": "prepare", **files}, log)
    res["q4_0_types"] = prep["q4_0_types"]
    for name, path in (("F32", files["f32"]), ("Q4_0", files["q4_0"])):
      log(f"llama.cpp {name}")
      r = _run({"kind": "llamacpp", "gguf": path, **common}, log)
      r.update(runtime="llama.cpp", weights=name, path="–")
      res["generation"].append(r)
  res["wall_s"] = time.perf_counter() - t_start
  report.write_json_atomic(os.path.join(args.out, "bench_decode.json"), res)
  md = markdown(res)
  report.write_text_atomic(os.path.join(args.out, "bench_decode.md"), md)
  print(md)


if __name__ == "__main__":
  main()
