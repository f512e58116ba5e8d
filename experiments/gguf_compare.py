"""llama.cpp's own quantizers vs quantjax's GGUF exports, all scored by llama.cpp.

    python -m experiments.gguf_compare --out=runs/gguf_compare \\
        --llamacpp=Q8_0,Q6_K,Q5_0,Q4_K_M,Q4_0,Q3_K_M,Q2_K runs/export/*.gguf

1. The FP32 model (SmolLM2-135M from its GGUF, dequantized) is exported as an
   F32 GGUF with its tokenizer: the common source of every llama.cpp type.
2. Each `--llamacpp` type is made from it with llama.cpp's quantizer
   (`llama_model_quantize`, what `llama-quantize` runs).
3. Every file (those, the F32 source, and any GGUF given as an argument) is
   scored by llama.cpp on the perplexity protocol of DESIGN.md: the same
   windows and token ids as quantjax's own evaluation; with `--jax` (default)
   the JAX model scores the same file too, imported with
   `quantjax.io.gguf.import_gguf` (block types stay QArrays, k-quants are
   dequantized).
4. With `--mix_of=Q4_K_M`, the FP32 model is also exported by quantjax with
   that llama.cpp file's per-tensor types (`io.gguf.type_rules`), once as is
   and once with an importance matrix (mean squared inputs of every linear
   over `--importance_windows` calibration windows) weighting the k-quant
   fits and the Q4_0/Q5_0 scale search.

Bits per weight exclude the token embedding (as llama.cpp's tables do for
this tied model, where it is Q8_0 in most types). Results: `results.json`,
`results.md` and `pareto.png` (perplexity vs file size). Files already
scored (same size and mtime) are not scored again.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "runs/gguf_compare", "Output directory.")
_TYPES = flags.DEFINE_list("llamacpp", ["Q8_0", "Q6_K", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M",
                                        "Q2_K"], "llama.cpp file types to make and score.")
_WINDOWS = flags.DEFINE_integer("windows", 0, "Score only the first N windows (0: all).")
_SOURCE = flags.DEFINE_bool("score_source", True, "Score the F32 source file in llama.cpp "
                            "(else the base for Δ is the JAX FP32 perplexity).")
_JAX = flags.DEFINE_bool("jax", True, "Also score each file with the JAX model (imported "
                         "without dequantizing block types) on the same windows.")
_MIX = flags.DEFINE_string("mix_of", "", "A llama.cpp type from --llamacpp (e.g. Q4_K_M): also "
                           "export the FP32 model with quantjax's encoders and that file's "
                           "per-tensor types, plain and with an importance matrix.")
_IMP_WINDOWS = flags.DEFINE_integer("importance_windows", 128, "Calibration windows (drawn "
                                    "before the evaluation text) for the importance matrix.")


def file_stats(path: str) -> dict:
  """Size, tensor types and bits per weight (embedding excluded) of a GGUF file."""
  import collections

  import gguf
  import numpy as np
  r = gguf.GGUFReader(path)
  n = b = 0
  types = collections.Counter()
  for t in r.tensors:
    if len(t.shape) == 2:
      types[t.tensor_type.name] += 1
      if t.name != "token_embd.weight":
        n += int(np.prod([int(s) for s in t.shape]))
        b += int(t.n_bytes)
  return {"file_bytes": os.path.getsize(path), "bits_per_weight": 8.0 * b / max(n, 1),
          "tensor_types": dict(types)}


def _exported_score(path: str, windows, corpus_sha256: str) -> dict | None:
  """The llama.cpp score `python -m quantjax.export` saved beside `path`, if it applies."""
  from quantjax.eval import report as report_lib
  side = path[:-len(".gguf")] + ".json"
  rec = report_lib.read_json(side, None) if os.path.exists(side) else None
  if (not rec or "llamacpp_perplexity" not in rec or rec.get("corpus_sha256") != corpus_sha256
      or rec.get("llamacpp_tokens") != windows.size - windows.shape[0]
      or os.path.getmtime(side) < os.path.getmtime(path)):
    return None
  return {"perplexity": rec["llamacpp_perplexity"], "tokens": rec["llamacpp_tokens"],
          "seconds": rec.get("llamacpp_seconds")}


def _mixed_exports(out, ftype, cfg, params, src, split):
  """quantjax's encoders with llama.cpp's per-tensor type mix of `ftype`: plain and
  with an importance matrix (mean squared inputs over calibration windows)."""
  import numpy as np

  from quantjax.io import gguf as gguf_io
  from quantjax.methods import importance as importance_lib
  from quantjax.models import llama as llama_lib
  theirs = os.path.join(out, f"smollm2-{ftype.lower()}.gguf")
  if not os.path.exists(theirs):
    raise app.UsageError(f"--mix_of={ftype} needs {ftype} in --llamacpp")
  rules = gguf_io.type_rules(theirs)
  plain = os.path.join(out, f"quantjax-{ftype.lower()}-mix.gguf")
  if not os.path.exists(plain):
    gguf_io.export_gguf(plain, cfg, params, tokenizer=src, types=rules)
  files = [(f"quantjax {ftype} mix", plain)]
  n = _IMP_WINDOWS.value
  if n:
    weighted = os.path.join(out, f"quantjax-{ftype.lower()}-mix-imatrix{n}.gguf")
    if not os.path.exists(weighted):
      cache = os.path.join(out, f"importance-{n}.npz")  # 6-7 min to collect on 2 cores
      if os.path.exists(cache):
        with np.load(cache) as z:
          imp = {k: z[k] for k in z.files}
      else:
        w = np.asarray(split.calib_windows[:n])
        imp = importance_lib.input_importance(
            llama_lib.calib_fn(cfg), params, [w[i:i + 8] for i in range(0, n - n % 8, 8)],
            llama_lib.PROJ_KERNELS)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, **imp)
        os.replace(tmp, cache)
      gguf_io.export_gguf(weighted, cfg, params, tokenizer=src, types=rules, importance=imp)
    files.append((f"quantjax {ftype} mix + importance ({n} windows)", weighted))
  return files


def main(argv):
  from quantjax.eval import data as data_lib
  from quantjax.eval import llamacpp
  from quantjax.eval import report as report_lib
  from quantjax.io import gguf as gguf_io
  from quantjax.models import load as load_lib

  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  src = load_lib.smollm2_path()
  cfg, params, tok = load_lib.load_gguf(src)
  split = data_lib.load_split(tok)
  windows = split.eval_windows[:_WINDOWS.value] if _WINDOWS.value else split.eval_windows
  # The scored windows as a split of their own, for the JAX evaluations.
  sub = data_lib.make_split(windows.reshape(-1), data_lib.Protocol(
      eval_tokens=int(windows.size), window=int(windows.shape[1]), calib_windows=0))
  f32 = os.path.join(out, "smollm2-f32.gguf")
  if not os.path.exists(f32):
    gguf_io.export_gguf(f32, cfg, params, tokenizer=src, float_type="F32")
  files = [("llama.cpp F32", f32)] if _SOURCE.value else []
  for t in _TYPES.value:
    dst = os.path.join(out, f"smollm2-{t.lower()}.gguf")
    if not os.path.exists(dst):
      print(f"[quantjax] llama.cpp quantize -> {t}", flush=True)
      llamacpp.quantize(f32, dst, t)
    files.append((f"llama.cpp {t}", dst))
  if _MIX.value:
    files += _mixed_exports(out, _MIX.value, cfg, params, src, split)
  for p in argv[1:]:
    files.append((f"quantjax {os.path.basename(p)[:-len('.gguf')]}", p))

  path = os.path.join(out, "results.json")
  old = {r["file"]: r for r in report_lib.read_json(path, {"records": []})["records"]}
  records = []
  for label, p in files:
    st = os.stat(p)
    key = [st.st_size, int(st.st_mtime), int(windows.shape[0]), split.corpus_sha256]
    rec = old.get(os.path.abspath(p))
    if rec is None or rec.get("key") != key:
      res = _exported_score(p, windows, split.corpus_sha256) or llamacpp.perplexity(
          p, windows, progress=True)
      rec = {"method": label, "file": os.path.abspath(p), "key": key,
             "perplexity": res["perplexity"], "tokens": res["tokens"],
             "seconds": res["seconds"], **file_stats(p)}
    rec["method"] = label
    if _JAX.value and "jax_perplexity" not in rec:
      from quantjax.eval import perplexity as ppl_lib
      jcfg, jparams, _, info = gguf_io.import_gguf(p, tokenizer=False)
      rec["jax_perplexity"] = ppl_lib.evaluate(jcfg, jparams, sub, progress=True,
                                               desc="jax")["perplexity"]
      rec["dequantized_on_import"] = sorted({k for k, h in info.values() if h == "dequantized"})
    records.append(rec)
    report_lib.write_json_atomic(path, {"records": records + [r for f, r in old.items()
                                                                if f not in {x["file"] for x in records}]})
    print(f"[quantjax] {label}: perplexity {rec['perplexity']:.4f}, "
          f"{rec['bits_per_weight']:.2f} bpw, {rec['file_bytes'] / 1e6:.1f} MB", flush=True)
  if _SOURCE.value:
    base = records[0]["perplexity"]
  else:
    from quantjax.eval import perplexity as ppl_lib
    base = ppl_lib.evaluate(cfg, params, sub, progress=True, desc="fp32")["perplexity"]
    print(f"[quantjax] JAX FP32 perplexity (base for Δ): {base:.4f}", flush=True)
  lines = [f"# llama.cpp perplexity, SmolLM2-135M ({records[0]['tokens']} predicted tokens; "
           f"Δ against {'llama.cpp F32' if _SOURCE.value else 'JAX FP32'} = {base:.3f})", "",
           "| file | tensor types | bits/weight (excl. embedding) | file MB | perplexity (llama.cpp) "
           "| Δ vs F32 | perplexity (JAX, same file) |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in sorted(records, key=lambda r: -r["file_bytes"]):
    types = ", ".join(f"{k}×{v}" for k, v in sorted(r["tensor_types"].items()))
    jx = f"{r['jax_perplexity']:.3f}" if "jax_perplexity" in r else "—"
    lines.append(f"| {r['method']} | {types} | {r['bits_per_weight']:.2f} | "
                 f"{r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
                 f"{100 * (r['perplexity'] / base - 1):+.1f}% | {jx} |")
  table = "\n".join(lines)
  report_lib.write_text_atomic(os.path.join(out, "results.md"), table + "\n")
  plot = [dict(r, params_bytes=r["file_bytes"]) for r in records]
  report_lib.pareto_plot(plot, os.path.join(out, "pareto.png"),
                         title="llama.cpp perplexity vs GGUF file size (SmolLM2-135M)")
  print(table)


if __name__ == "__main__":
  app.run(main)
