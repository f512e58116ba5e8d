"""Wall time of a normal GGUF import and checkpoint save / restore of SmolLM2-135M.

    python -m experiments.bench_io --repeats=3
    PYTHONPATH=<checkout of an older commit> python -m experiments.bench_io  # the same on old code

Times `load.load_gguf` of the shipped Q4_1 GGUF (FP32, and `quantized=True`:
QArrays holding the file's blocks), then `io.checkpoint.save_params` and
`restore_params` of the FP32 params (538 MB) into a temporary directory.
Median of `--repeats` runs, each after a warm-up; prints one JSON line. The
reliability checks (GGUF header validation, checksummed commits) are meant to
cost nothing measurable: run it on both commits, one after the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def _median(fn, repeats: int) -> float:
  fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  import jax
  import quantjax
  from quantjax.io import checkpoint
  from quantjax.models import load

  path = load.smollm2_path()
  out = {"quantjax": quantjax.__file__}
  out["gguf_import_fp32_s"] = _median(lambda: load.load_gguf(path, tokenizer=False), args.repeats)
  out["gguf_import_quantized_s"] = _median(
      lambda: load.load_gguf(path, tokenizer=False, quantized=True), args.repeats)
  _, params, _ = load.load_gguf(path, tokenizer=False)
  with tempfile.TemporaryDirectory() as d:
    ck = f"{d}/ckpt"
    out["checkpoint_save_s"] = _median(lambda: checkpoint.save_params(ck, params), args.repeats)
    out["checkpoint_restore_s"] = _median(
        lambda: jax.block_until_ready(checkpoint.restore_params(ck)), args.repeats)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
