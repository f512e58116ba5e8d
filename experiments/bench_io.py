"""Import / save / restore times of this checkout against another one, side by side.

    python -m experiments.bench_io --baseline=<a checkout of an older commit>

Each repeat runs one fresh worker process per checkout (alternating which goes
first), timing, after a warm-up call, on SmolLM2-135M's shipped Q4_1 GGUF:
`load_gguf` (dequantizing), `import_gguf` (QArrays), and
`save_params` / `restore_params` of the imported QArray tree (about 100 MB)
and of the float32 tree (540 MB). Prints the median of each and the ratio
this / baseline (docs/reliability.md: the checks cost no measurable time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
OURS = os.path.dirname(os.path.dirname(HERE))


def _timed(fn, n: int) -> float:
  fn()  # warm-up (compiles, page cache)
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return min(ts)


def worker(n: int, tmp: str) -> None:
  import shutil

  import jax
  from quantjax.io import checkpoint
  from quantjax.io import gguf as gio
  from quantjax.models import load
  src = load.smollm2_path()
  out = {}
  out["load_gguf (dequantize)"] = _timed(lambda: load.load_gguf(src, tokenizer=False), n)
  out["import_gguf (QArrays)"] = _timed(lambda: gio.import_gguf(src, tokenizer=False), n)
  _, qparams, _, _ = gio.import_gguf(src, tokenizer=False)
  _, fparams, _ = load.load_gguf(src, tokenizer=False)
  for label, tree in (("QArray tree", qparams), ("float32 tree", fparams)):
    path = os.path.join(tmp, "ckpt")

    def save(tree=tree, path=path):
      checkpoint.save_params(path, tree)

    def restore(path=path):
      jax.block_until_ready(jax.tree.leaves(checkpoint.restore_params(path)))

    out[f"save_params ({label})"] = _timed(save, n)
    out[f"restore_params ({label})"] = _timed(restore, n)
    shutil.rmtree(path, ignore_errors=True)
  print("RESULT " + json.dumps(out), flush=True)


def run(root: str, n: int, tmp: str) -> dict[str, float]:
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, HERE, "--worker", "--n", str(n), "--tmp", tmp], cwd=root,
                     env=env, capture_output=True, text=True, check=False)
  for line in p.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[7:])
  raise RuntimeError(f"worker in {root} failed:\n{p.stderr[-3000:]}")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--baseline", help="the other checkout (e.g. ../main)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--n", type=int, default=3)
  ap.add_argument("--worker", action="store_true")
  ap.add_argument("--tmp", default=None)
  a = ap.parse_args()
  if a.worker:
    worker(a.n, a.tmp)
    return
  import tempfile
  base = os.path.abspath(a.baseline)
  res: dict[str, dict[str, list[float]]] = {"baseline": {}, "this": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(a.repeats):
      order = [("baseline", base), ("this", OURS)]
      if r % 2:
        order.reverse()
      for label, root in order:
        for k, v in run(root, a.n, tmp).items():
          res[label].setdefault(k, []).append(v)
  print(f"| operation (SmolLM2-135M Q4_1) | baseline s | this s | this / baseline |")
  print("|---|---:|---:|---:|")
  for k in res["this"]:
    b = statistics.median(res["baseline"][k])
    t = statistics.median(res["this"][k])
    print(f"| {k} | {b:.3f} | {t:.3f} | {t / b:.2f} |")
  print(f"\n(best of {a.n} after a warm-up, median over {a.repeats} alternating worker pairs; "
        f"baseline {base}, this {OURS})")


if __name__ == "__main__":
  main()
