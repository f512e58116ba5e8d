"""Quantized matmul benchmark: Pallas kernels vs XLA paths, against the memory roofline.

    python -m experiments.bench_kernels --out=runs/bench_kernels          # full set
    python -m experiments.bench_kernels --quick --out=/tmp/bk             # smoke run

Part 1, layers. For each weight shape (SmolLM2 and Llama-3-8B-like layers)
and batch size M, measured in one run, after warm-up, as medians:

* `bf16`: the BF16 XLA dot (the baseline),
* `xla_<fmt>`: XLA dequantize-then-dot of the quantized weight,
* `kernel_<fmt>`: the Pallas kernel behind `qdot` (GPU/TPU only: on CPU the
  kernels run only in interpret mode, which times nothing useful),
* `xla_w8a8` / `kernel_w8a8`: per-token int8 activations x per-channel int8
  weights, int32 accumulation (`qdot(..., act_format="int8")`).

Columns: time; achieved GB/s over the bytes that must move (weight codes and
scales, activations in, output out); the fraction of the memory roofline
(achieved GB/s / the device's copy bandwidth measured in the same run);
TFLOP/s (2MKN / time); speedups over BF16 and over XLA dequantize; and, for
kernels, the largest error relative to the XLA path's output (a correctness
check on the device).

Part 2, end to end: decode tokens/s of a Llama with random weights (`--e2e`:
"1b" is ~1.0 B parameters, Llama-3.2-1B-like with a 32k vocabulary; "tiny"
for smoke runs) with BF16 weights and with int8 / int4 `*_proj` weights, on
the XLA path and (GPU/TPU) the kernel path.

Writes `bench.json`, `bench.md` and `bench.png` (atomically) under `--out`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import quantjax as qj
from quantjax.eval import report
from quantjax.kernels import dispatch

SHAPES = {  # (K, N) of x [M, K] @ W [K, N]
    "smollm2_qkv": (576, 576),
    "smollm2_up": (576, 1536),
    "smollm2_down": (1536, 576),
    "llama8b_attn": (4096, 4096),
    "llama8b_up": (4096, 14336),
    "llama8b_down": (14336, 4096),
}
BATCHES = (1, 8, 32, 256)
FORMATS = ("int8", "int4_g64", "int4_g64_asym")  # 64 divides every K here (576 = 9 x 64)
E2E = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16,
               num_heads=32, num_kv_heads=8, head_dim=64),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=64),
}


def _time(fn, *args, repeats=20, warmup=3):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
  """Measured device copy bandwidth in bytes/s (read + write of a buffer)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  t = _time(f, x, repeats=10)
  return 2 * nbytes / t


def _qdot_fn(path: str, act_format=None):
  """A jitted qdot traced under `path` (the path is fixed at trace time)."""
  def f(a, b):
    with dispatch.matmul_path(path):
      return qj.qdot(a, b, act_format=act_format)
  return jax.jit(f)


def _rel_err(out, ref) -> float:
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def layer_rows(shapes, batches, formats, *, repeats: int, bw: float, kernels: str) -> list[dict]:
  """`kernels`: "" (XLA rows only), "kernel", or "interpret" (CPU smoke tests)."""
  rows = []
  for name, (k, n) in shapes.items():
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    w16 = w.astype(jnp.bfloat16)
    qs = {f: qj.quantize(w, f) for f in formats}
    w8 = qs.get("int8") or qj.quantize(w, "int8")
    del w
    for m in batches:
      x = jax.random.normal(jax.random.key(1), (m, k)).astype(jnp.bfloat16)
      base = _time(jax.jit(lambda a, b: a @ b), x, w16, repeats=repeats)
      flops = 2 * m * k * n
      io_bytes = x.nbytes + m * n * 2

      def row(label, t, wbytes, xla_t=None, err=None):
        moved = wbytes + io_bytes
        return {"shape": name, "K": k, "N": n, "M": m, "path": label, "ms": 1e3 * t,
                "GB_s": moved / t / 1e9, "roofline": moved / t / bw, "TFLOP_s": flops / t / 1e12,
                "speedup_vs_bf16": base / t,
                "speedup_vs_xla_dequant": (xla_t / t) if xla_t else None, "max_rel_err": err}

      def kernel_row(label, fn, wq, xla_t, ref):
        wbytes = wq.nbytes
        try:
          t = _time(fn, x, wq, repeats=repeats)
          return row(label, t, wbytes, xla_t, _rel_err(fn(x, wq), ref))
        except Exception as e:  # report, keep benchmarking the rest
          return {"shape": name, "K": k, "N": n, "M": m, "path": label,
                  "error": f"{type(e).__name__}: {e}"[:300]}

      rows.append(row("bf16", base, w16.nbytes))
      for f, wq in qs.items():
        xla = _qdot_fn("xla")
        xla_t = _time(xla, x, wq, repeats=repeats)
        rows.append(row(f"xla_{f}", xla_t, wq.nbytes))
        if kernels:
          rows.append(kernel_row(f"kernel_{f}", _qdot_fn(kernels), wq, xla_t, xla(x, wq)))
      wq = w8
      xla = _qdot_fn("xla", "int8")
      xla_t = _time(xla, x, wq, repeats=repeats)
      rows.append(row("xla_w8a8", xla_t, wq.nbytes))
      if kernels:
        rows.append(kernel_row("kernel_w8a8", _qdot_fn(kernels, "int8"), wq, xla_t, xla(x, wq)))
      print(f"[bench] {name} M={m}: bf16 {1e3 * base:.3f} ms", flush=True)
  return rows


def e2e_rows(size: str, *, kernels: str, decode_steps: int, repeats: int) -> list[dict]:
  """Decode tokens/s at batch 1 of a random-weight Llama, BF16 vs int8 vs int4 weights."""
  from flax import nnx

  from quantjax.eval import speed
  from quantjax.models import llama

  cfg = llama.LlamaConfig(dtype="bfloat16", name=f"llama-{size}-random", **E2E[size])
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  del model
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  n_params = sum(a.size for a in jax.tree.leaves(params))
  rows = []
  variants = [("bf16", None), ("int8", "int8"), ("int4_g64", "int4_g64")]
  for label, fmt in variants:
    p = params if fmt is None else qj.quantize_params(
        params, [qj.QuantRule(module_path=r".*_proj.*kernel", format=fmt)])
    paths = ["xla"] + ([kernels] if kernels and fmt else [])
    for path in paths:
      with dispatch.matmul_path(path):
        r = speed.prefill_decode(llama.decoder(cfg), p, vocab_size=cfg.vocab_size,
                                 batch_sizes=(1,), prompt_len=16,
                                 decode_steps=decode_steps, repeats=repeats)[0]
      nbytes = sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(
          p, is_leaf=lambda v: isinstance(v, qj.QArray)))
      rows.append({"model": cfg.name, "params": n_params, "weights": label, "path": path,
                   "weight_bytes": nbytes, "decode_tokens_per_s": r["decode_tokens_per_s"],
                   "decode_step_ms": r["decode_step_ms"]})
      print(f"[bench] e2e {label} {path}: {r['decode_tokens_per_s']:.1f} tok/s", flush=True)
    del p
  base = rows[0]["decode_tokens_per_s"]
  for r in rows:
    r["speedup_vs_bf16"] = r["decode_tokens_per_s"] / base
  return rows


def _markdown(meta, rows, e2e) -> str:
  lines = [f"Device {meta['device']} ({meta['backend']}, jax {meta['jax']}); measured copy "
           f"bandwidth {meta['copy_bandwidth_GB_s']:.1f} GB/s. Kernel rows: "
           f"{meta['kernels'] or 'none (CPU: the kernels run only in interpret mode)'}.", "",
           "| shape | M | path | ms | GB/s | roofline | TFLOP/s | vs bf16 | vs XLA dequant | err |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['shape']} | {r['M']} | {r['path']} | error: {r['error']} | | | | | | |")
      continue
    sx = f"{r['speedup_vs_xla_dequant']:.2f}x" if r["speedup_vs_xla_dequant"] else ""
    err = f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else ""
    lines.append(f"| {r['shape']} | {r['M']} | {r['path']} | {r['ms']:.3f} | {r['GB_s']:.1f} | "
                 f"{r['roofline']:.2f} | {r['TFLOP_s']:.3f} | {r['speedup_vs_bf16']:.2f}x | {sx} | "
                 f"{err} |")
  if e2e:
    lines += ["", f"End-to-end decode, batch 1, {e2e[0]['model']} "
              f"({e2e[0]['params'] / 1e9:.2f} B parameters):", "",
              "| weights | path | weight MB | decode tok/s | step ms | vs bf16 |",
              "|---|---|---:|---:|---:|---:|"]
    for r in e2e:
      lines.append(f"| {r['weights']} | {r['path']} | {r['weight_bytes'] / 1e6:.0f} | "
                   f"{r['decode_tokens_per_s']:.1f} | {r['decode_step_ms']:.2f} | "
                   f"{r['speedup_vs_bf16']:.2f}x |")
  return "\n".join(lines)


def _plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in rows if "error" not in r]
  cases = sorted({(r["shape"], r["M"]) for r in ok}, key=lambda c: (c[1], c[0]))
  index = {c: i for i, c in enumerate(cases)}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for label in sorted({r["path"] for r in ok}):
    pts = sorted((index[(r["shape"], r["M"])], r) for r in ok if r["path"] == label)
    marker = "o" if label.startswith("kernel") else ("s" if label == "bf16" else "x")
    axes[0].plot([p[0] for p in pts], [p[1]["roofline"] for p in pts], marker, label=label, ms=5)
    axes[1].plot([p[0] for p in pts], [p[1]["speedup_vs_bf16"] for p in pts], marker, label=label,
                 ms=5)
  for ax, ylabel in zip(axes, ("fraction of measured copy bandwidth", "speedup over BF16 dot")):
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{s} M={m}" for s, m in cases], rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
  axes[1].axhline(1.0, color="grey", lw=0.8)
  axes[1].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def run(shapes, batches, formats, out_dir: str, repeats: int = 20, e2e: str = "",
        decode_steps: int = 32, interpret: bool = False) -> list[dict]:
  """`interpret`: on CPU, add the kernels in interpret mode (checks the rows, times nothing)."""
  backend = jax.default_backend()
  kernels = "kernel" if backend in ("gpu", "tpu") else ("interpret" if interpret else "")
  bw = copy_bandwidth(64 * 2**20 if backend == "cpu" else 1024 * 2**20)
  rows = layer_rows(shapes, batches, formats, repeats=repeats, bw=bw, kernels=kernels)
  e2e_out = e2e_rows(e2e, kernels=kernels, decode_steps=decode_steps,
                     repeats=max(1, repeats // 5)) if e2e else []
  meta = {"backend": backend, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
          "copy_bandwidth_GB_s": bw / 1e9, "kernels": kernels, "repeats": repeats}
  os.makedirs(out_dir, exist_ok=True)
  report.write_json_atomic(os.path.join(out_dir, "bench.json"),
                           {"meta": meta, "rows": rows, "e2e": e2e_out})
  text = _markdown(meta, rows, e2e_out)
  report.write_text_atomic(os.path.join(out_dir, "bench.md"), text + "\n")
  _plot(rows, os.path.join(out_dir, "bench.png"))
  print(text)
  return rows + e2e_out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="runs/bench_kernels")
  ap.add_argument("--quick", action="store_true",
                  help="SmolLM2 shapes, batch 1 and 8, few repeats, tiny end-to-end model")
  ap.add_argument("--shapes", default="", help="comma-separated subset of " + ",".join(SHAPES))
  ap.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,8,32,256)")
  ap.add_argument("--formats", default=",".join(FORMATS))
  ap.add_argument("--e2e", default="1b", choices=["", "1b", "tiny"],
                  help="end-to-end decode model size ('' to skip)")
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args(argv)
  shapes = {k: v for k, v in SHAPES.items() if not args.shapes or k in args.shapes.split(",")}
  batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else BATCHES
  formats = tuple(f for f in args.formats.split(",") if f)
  if args.quick:
    shapes = {k: v for k, v in shapes.items() if k.startswith("smollm2")}
    run(shapes, (1, 8), formats, args.out, repeats=3, e2e="tiny" if args.e2e else "",
        decode_steps=8)
  else:
    run(shapes, batches, formats, args.out, repeats=args.repeats, e2e=args.e2e)


if __name__ == "__main__":
  main()
