"""One call that writes a model in any supported file format (GGUF, Hugging Face)."""

from __future__ import annotations

import dataclasses
import os

from quantjax.io import gguf as gguf_io
from quantjax.io import hf as hf_io

__all__ = ["EXPORT_FORMATS", "export_model"]

EXPORT_FORMATS = ("gguf", "hf")


def export_model(path: str, model_config, params, *, fmt: str = "gguf", tokenizer=None,
                 **options) -> dict:
  """One call for a runner's `export` stage: writes `params` in `fmt`, returns a JSON record.

  Args:
    path: the output: a `.gguf` file for "gguf", a directory for "hf"
      (Hugging Face safetensors, compressed-tensors when quantized: what vLLM,
      SGLang and transformers load).
    model_config: the model's config (e.g. `LlamaConfig`).
    params: the params tree (arrays, QArrays, activation-quantized leaves).
    fmt: "gguf" (`quantjax.io.gguf.export_gguf`) or "hf"
      (`quantjax.io.hf.export_hf`).
    tokenizer: the tokenizer source: a GGUF file, a Hugging Face directory or a
      transformers tokenizer.
    **options: passed to the writer (gguf: `types`, `float_type`; hf: `dtype`,
      `max_shard_size`, `overwrite`).

  Returns:
    `{"format", "path", "bytes", "tensors": [...per-tensor records...], "summary",
    "notes"}`; every tensor says whether it went in code for code ("lossless"),
    as float, or was re-quantized.
  """
  path = os.fspath(path)
  if fmt == "gguf":
    report = gguf_io.export_gguf(path, model_config, params, tokenizer=tokenizer, **options)
    return {"format": "gguf", "path": path, "bytes": os.path.getsize(path),
            "tensors": [dataclasses.asdict(r) for r in report],
            "summary": gguf_io.export_summary(report), "notes": []}
  if fmt == "hf":
    report = hf_io.export_hf(path, model_config, params, tokenizer=tokenizer, **options)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"format": "hf", "path": path, "bytes": size,
            "tensors": [dataclasses.asdict(r) for r in report.tensors],
            "summary": report.summary(), "notes": list(report.notes),
            "quantization_config": report.quantization_config}
  raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
