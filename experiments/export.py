"""Command line: run a config whose entry ends in `export` and copy its GGUF file out.

    python -m experiments.export --config=configs/export.py --out=runs/gptq_q4_0.gguf

The config's stages run through `experiments.pipeline` in `--workdir`
(default: `<out>.work/`, resumable); the file of the last entry's `export`
stage is copied to `--out` atomically (temporary file, then rename), and its
llama.cpp score (when the entry has a `llamacpp` stage) is written beside it
as `<out>.json`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config whose entries export.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output .gguf path.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: <out>.work).")
flags.mark_flags_as_required(["config", "out"])


def export(config, out: str, workdir: str | None = None) -> dict:
  """Runs `config` and copies its last exported file to `out`; returns `{"file", ...}`."""
  from quantjax.eval import report as report_lib
  out = os.fspath(out)
  if not out.endswith(".gguf"):
    raise ValueError(f"--out must name a .gguf file, got {out!r}")
  workdir = workdir or out + ".work"
  name, entry_config = pipeline.entries(config)[-1]
  if "export" not in pipeline.validate(entry_config, name):  # before any heavy work
    raise ValueError(f"entry {name!r} of the config has no export stage")
  records = pipeline.run(config, workdir)
  path = pipeline.exported_file(config, workdir)
  d = os.path.dirname(os.path.abspath(out))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".gguf")
  os.close(fd)
  try:
    shutil.copyfile(path, tmp)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  rec = {"file": out, "file_bytes": os.path.getsize(out),
         "records": [r for r in records if r.get("entry") == name]}
  report_lib.write_json_atomic(out[:-len(".gguf")] + ".json", rec)
  print(f"[quantjax] wrote {out} ({rec['file_bytes']:,} bytes)", flush=True)
  return rec


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    export(_CONFIG.value, _OUT.value, _WORKDIR.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli.check_overrides(sys.argv)
  app.run(main)
