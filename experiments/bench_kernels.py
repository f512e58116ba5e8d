"""Quantized matmul benchmark: kernels vs XLA paths, against the memory roofline.

    python -m experiments.bench_kernels --out=runs/bench_kernels          # full set
    python -m experiments.bench_kernels --quick --out=/tmp/bk             # smoke run

For each weight shape (SmolLM2 and Llama-3-8B-like layers) and batch size,
measures in one run, after warm-up, the median time of

* `bf16`: the BF16 XLA dot (the baseline),
* `xla_<fmt>`: XLA dequantize-then-dot of the quantized weight,
* `kernel_<fmt>`: the Pallas kernel (only on GPU/TPU; on CPU the kernels run
  in interpret mode, which measures nothing useful, so they are left out),

and reports achieved GB/s (bytes that must move: weight codes + scales +
activations + output), the fraction of the memory roofline (achieved GB/s /
measured device copy bandwidth), TFLOP/s, and speedups over BF16 and over the
XLA dequantize path. Writes `bench.json`, `bench.md` and `bench.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import quantjax as qj
from quantjax.kernels import dispatch

SHAPES = {
    "smollm2_qkv": (576, 576),
    "smollm2_up": (576, 1536),
    "smollm2_down": (1536, 576),
    "llama8b_attn": (4096, 4096),
    "llama8b_up": (4096, 14336),
    "llama8b_down": (14336, 4096),
}
BATCHES = (1, 8, 32, 256)
FORMATS = ("int8", "int4_g64", "int4_g64_asym")  # 64 divides every K here (576 = 9 x 64)


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


def run(shapes, batches, formats, out_dir: str, repeats: int = 20) -> list[dict]:
  backend = jax.default_backend()
  bw = copy_bandwidth(64 * 2**20 if backend == "cpu" else 1024 * 2**20)
  rows = []
  for name, (k, n) in shapes.items():
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    w16 = w.astype(jnp.bfloat16)
    qs = {f: qj.quantize(w, f) for f in formats}
    for m in batches:
      x = jax.random.normal(jax.random.key(1), (m, k)).astype(jnp.bfloat16)
      base = _time(jax.jit(lambda a, b: a @ b), x, w16, repeats=repeats)
      flops = 2 * m * k * n
      act_bytes = x.nbytes + m * n * 2

      def row(label, t, wbytes, xla_t=None):
        moved = wbytes + act_bytes
        return {"shape": name, "K": k, "N": n, "M": m, "path": label, "ms": 1e3 * t,
                "GB_s": moved / t / 1e9, "roofline": moved / t / bw, "TFLOP_s": flops / t / 1e12,
                "speedup_vs_bf16": base / t,
                "speedup_vs_xla_dequant": (xla_t / t) if xla_t else None}

      rows.append(row("bf16", base, w16.nbytes))
      for f, q in qs.items():
        with dispatch.matmul_path("xla"):
          xla_t = _time(jax.jit(lambda a, b: qj.qdot(a, b)), x, q, repeats=repeats)
        rows.append(row(f"xla_{f}", xla_t, q.nbytes))
        if backend != "cpu":
          try:
            with dispatch.matmul_path("kernel"):
              kt = _time(jax.jit(lambda a, b: qj.qdot(a, b)), x, q, repeats=repeats)
            rows.append(row(f"kernel_{f}", kt, q.nbytes, xla_t))
          except Exception as e:  # report, keep benchmarking the rest
            rows.append({"shape": name, "K": k, "N": n, "M": m, "path": f"kernel_{f}",
                         "error": f"{type(e).__name__}: {e}"[:300]})
      print(f"[bench] {name} M={m}: bf16 {1e3 * base:.3f} ms", flush=True)
  os.makedirs(out_dir, exist_ok=True)
  meta = {"backend": backend, "device": str(jax.devices()[0]), "copy_bandwidth_GB_s": bw / 1e9,
          "jax": jax.__version__}
  with open(os.path.join(out_dir, "bench.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"Device {meta['device']} ({backend}); measured copy bandwidth {bw / 1e9:.1f} GB/s.", "",
           "| shape | M | path | ms | GB/s | roofline | TFLOP/s | vs bf16 | vs XLA dequant |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['shape']} | {r['M']} | {r['path']} | error: {r['error']} | | | | | |")
      continue
    sx = f"{r['speedup_vs_xla_dequant']:.2f}x" if r["speedup_vs_xla_dequant"] else ""
    lines.append(f"| {r['shape']} | {r['M']} | {r['path']} | {r['ms']:.3f} | {r['GB_s']:.1f} | "
                 f"{r['roofline']:.2f} | {r['TFLOP_s']:.2f} | {r['speedup_vs_bf16']:.2f}x | {sx} |")
  text = "\n".join(lines)
  with open(os.path.join(out_dir, "bench.md"), "w") as f:
    f.write(text + "\n")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for path in sorted({r["path"] for r in rows if "error" not in r}):
      pts = [(i, r["roofline"]) for i, r in enumerate(x for x in rows if "error" not in x)
             if r["path"] == path]
      ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=path, s=12)
    ax.set_ylabel("fraction of copy bandwidth")
    ax.set_xlabel("case (shape x batch)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench.png"), dpi=120)
    plt.close(fig)
  except Exception as e:  # plotting is optional
    print(f"[bench] no plot: {e}")
  print(text)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="runs/bench_kernels")
  ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes, batch 1 and 8, few repeats")
  args = ap.parse_args(argv)
  if args.quick:
    shapes = {k: v for k, v in SHAPES.items() if k.startswith("smollm2")}
    run(shapes, (1, 8), FORMATS, args.out, repeats=3)
  else:
    run(SHAPES, BATCHES, FORMATS, args.out)


if __name__ == "__main__":
  main()
