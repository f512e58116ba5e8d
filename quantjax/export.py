"""Command line: quantize a model with a chain config and write a GGUF that llama.cpp runs.

    python -m quantjax.export --config=configs/export.py --out=runs/export/model.gguf

The config is a staged-chain config (`experiments.chain`: e.g. `quantize`
with GPTQ in `q4_0`, or `prune,distill,quantize`) plus an `export` block:

* `export.types`: a list of `(regex, GGUF type)` pairs forcing tensor types
  (e.g. `("embed/embedding", "Q8_0")`); QArrays already in a GGUF block format
  are written code for code.
* `export.float_type`: F32 / F16 / BF16 for float matrices without a rule.
* `export.llamacpp_eval`: also score the written file with llama.cpp on the
  perplexity protocol and write `<out>.json` beside it.

The chain's stages run into `--workdir` (default: `<out dir>/chain`) and are
resumable; the export itself is atomic. The tokenizer metadata comes from the
model's GGUF file (or its Hugging Face tokenizer). Import goes through the
loaders: `quantjax.models.load.load_gguf(path, quantized=True)`.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_FLAGS: dict = {}


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (the module is also a library,
  imported beside other absl programs whose flags share names)."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Chain config with an export block.", lock_config=True)
  _FLAGS["out"] = flags.DEFINE_string("out", None, "Output .gguf path.")
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Work directory of the chain stages.")


def tokenizer_source(config) -> str:
  """The GGUF file (or HF directory) whose tokenizer goes into the export."""
  from quantjax.models import load as load_lib
  m = config.model
  if m.source in ("smollm2", "tiny"):
    return load_lib.smollm2_path()
  if m.source in ("gguf", "hf"):
    return str(m.path)
  raise ValueError(f"config.model.source must be smollm2, gguf, hf or tiny; got {m.source!r}")


def final_params(config, workdir: str):
  """Runs the chain (resumable) and returns `(LlamaConfig, params, split)` after its last stage."""
  from experiments import chain
  chain.run(config, workdir)
  cfg, params, tok, _ = chain._load(config)
  stages = chain.stage_list(config)
  for idx in reversed(range(len(stages))):
    if stages[idx] not in ("evaluate", "export"):
      params, _ = chain._load_stage(os.path.join(workdir, f"{idx:02d}_{stages[idx]}"))
      break
  from quantjax.eval import data as data_lib
  protocol = data_lib.Protocol(eval_tokens=int(config.eval.tokens), window=int(config.eval.window),
                               calib_windows=0)
  return cfg, params, data_lib.load_split(tok, config.data.corpus, protocol)


def export(config, out: str, workdir: str | None = None) -> dict:
  """Chain + export (+ llama.cpp evaluation). Returns the summary record."""
  from quantjax.eval import report as report_lib
  from quantjax.io import gguf as gguf_io
  out = os.fspath(out)
  if not out.endswith(".gguf"):
    raise ValueError(f"--out must name a .gguf file, got {out!r}")
  workdir = workdir or os.path.join(os.path.dirname(os.path.abspath(out)), "chain")
  cfg, params, split = final_params(config, workdir)
  ex = config.export
  report = gguf_io.export_gguf(out, cfg, params, tokenizer=tokenizer_source(config),
                               types=[tuple(t) for t in ex.types],
                               float_type=str(ex.float_type))
  print(gguf_io.export_summary(report), flush=True)
  size = os.path.getsize(out)
  n = sum(r.shape[0] * r.shape[1] for r in report if len(r.shape) == 2)
  rec = {"file": os.path.basename(out), "file_bytes": size,
         "tensor_bytes": sum(r.nbytes for r in report),
         "bits_per_weight": 8.0 * sum(r.nbytes for r in report if len(r.shape) == 2) / n,
         "tensors": [r.__dict__ for r in report]}
  if bool(ex.llamacpp_eval):
    from quantjax.eval import llamacpp
    res = llamacpp.perplexity(out, split.model_inputs(), skip=split.skip, progress=True)
    rec.update(llamacpp_perplexity=res["perplexity"], llamacpp_tokens=res["tokens"],
               llamacpp_seconds=res["seconds"], corpus_sha256=split.corpus_sha256)
    print(f"[quantjax] llama.cpp perplexity of {out}: {res['perplexity']:.4f} "
          f"({res['tokens']} tokens)", flush=True)
  report_lib.write_json_atomic(out[:-len(".gguf")] + ".json", rec)
  return rec


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _FLAGS["out"].value:
    raise app.UsageError("--out=model.gguf is required")
  export(_FLAGS["config"].value, _FLAGS["out"].value, _FLAGS["workdir"].value)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
