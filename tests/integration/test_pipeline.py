"""The experiment runner on a tiny random Llama: every stage, sweeps, resume, bad input."""

import copy
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import base
from configs.base import entry
from experiments import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(*entries, steps: int = 3):
  """A tiny-model config: SmolLM2's tokenizer and corpus, 8 windows of 128 tokens."""
  c = base.base_config()
  c.model.source = "tiny"
  c.eval.tokens = 1024
  c.eval.window = 128
  c.eval.batch_size = 4
  c.eval.progress = False
  c.calib.windows = 8
  c.calib.batch_size = 4
  c.prune.method = "wanda"
  c.mixed.sensitivity_windows = 2
  c.eval.speed_batch_sizes = (1,)
  c.eval.prompt_len = 8
  c.eval.decode_steps = 2
  for block in (c.distill, c.qat):
    block.steps = steps
    block.batch_size = 2
    block.seq_len = 64
    block.learning_rate = 1e-3
    block.warmup_steps = 1
    block.checkpoint_every = 1
  c.sweep = list(entries)
  return c


EVERY_STAGE = (
    entry("fp32", "evaluate"),
    entry("bf16", "quantize,evaluate", quantize__method="cast", quantize__format="bf16"),
    entry("rtn", "quantize,evaluate", eval__speed=True),
    entry("gptq", "quantize,evaluate", quantize__method="gptq", quantize__act_order=True,
          quantize__format="int4_g32"),
    entry("awq", "quantize,evaluate", quantize__method="awq", quantize__format="int4_g32"),
    entry("sq", "quantize,evaluate", quantize__method="smoothquant", quantize__format="int8",
          quantize__act_format="int8"),
    entry("static", "quantize,evaluate", quantize__method="static", quantize__format="int8",
          quantize__act_format="int8_t", quantize__act_observer="minmax"),
    entry("nf4", "quantize,evaluate", quantize__format="nf4_g32"),
    entry("pdq", "prune,evaluate,distill,evaluate,quantize,evaluate"),
    entry("qat", "qat,evaluate", qat__format="int4_g32"),
    entry("mixed", "mixed,evaluate,export,llamacpp"),
    entry("q4_0", "export,llamacpp", export__llamacpp_quantize="Q4_0"),
)


def _leaves(params):
  from quantjax import rules as rules_lib
  return dict(rules_lib.tree_leaves_with_paths(params))


def _stage_dirs(work, name):
  return sorted(d for d in os.listdir(os.path.join(work, "stages")) if d.startswith(name + "-"))


def test_every_stage_in_one_sweep_then_resume(tmp_path, capsys):
  from quantjax.numerics.qarray import InputScaled, QArray
  work = str(tmp_path / "run")
  recs = pipeline.run(tiny(*EVERY_STAGE), work)
  rows = [(r["entry"], r["method"], r["runtime"]) for r in recs]
  assert rows == [
      ("fp32", "fp32", "jax"), ("bf16", "cast bf16", "jax"), ("rtn", "rtn int4_g64", "jax"),
      ("gptq", "gptq int4_g32", "jax"), ("awq", "awq int4_g32", "jax"),
      ("sq", "smoothquant int8 aint8", "jax"), ("static", "static int8 aint8_t", "jax"),
      ("nf4", "rtn nf4_g32", "jax"), ("pdq", "wanda 2:4", "jax"),
      ("pdq", "wanda 2:4 → distill 3 steps", "jax"),
      ("pdq", "wanda 2:4 → distill 3 steps → rtn int4_g64", "jax"),
      ("qat", "qat-lsq int4_g32", "jax"), ("mixed", "mixed rtn 4.5bpw", "jax"),
      ("mixed", "mixed rtn 4.5bpw", "llama.cpp"), ("q4_0", "llama.cpp Q4_0", "llama.cpp")]
  by = {(r["entry"], r["method"], r["runtime"]): r for r in recs}
  fp32 = recs[0]
  assert fp32["kl_mean"] == 0.0 and fp32["top1_agreement"] == 1.0 and fp32["delta_pct"] == 0.0
  for r in recs:
    # a random model's perplexities carry no meaning; the bookkeeping does
    assert np.isfinite(r["perplexity"]) and r["reference_perplexity"] == fp32["perplexity"]
    assert r["kl_mean"] >= 0.0 and 0.0 <= r["top1_agreement"] <= 1.0
    for field in ("corpus_sha256", "eval_tokens", "window", "seed", "jax_version", "device",
                  "params_bytes", "bits_per_weight", "quantize_s"):
      assert field in r, (r["entry"], field)
  assert recs[2]["bits_per_weight"] == pytest.approx(4.5)
  assert recs[2]["decode_tokens_per_s"] > 0 and recs[2]["speed"][0]["batch"] == 1
  assert recs[2]["params_bytes"] < recs[1]["params_bytes"] < fp32["params_bytes"]
  assert recs[3]["quantize_s"] > 0 and recs[1]["chain_info"][0]["stage"] == "quantize"
  mixed_jax, mixed_cpp = recs[12], recs[13]
  assert mixed_cpp["tensor_types"] and mixed_cpp["params_bytes"] > 0
  # the file holds the JAX model's codes: the two runtimes agree closely
  assert abs(mixed_cpp["perplexity"] / mixed_jax["perplexity"] - 1) < 0.02
  # RTN is recomputed on resume, calibrated and trained stages keep checkpoints
  quant = _stage_dirs(work, "quantize")
  for d in quant:
    done = pipeline._read_done(os.path.join(work, "stages", d))
    saved = os.path.exists(os.path.join(work, "stages", d, "params"))
    assert saved == (done["info"]["method"] in ("gptq", "awq", "smoothquant", "static")), d
  # masks survive distillation
  distilled = os.path.join(work, "stages", _stage_dirs(work, "distill")[0])
  params, masks = pipeline._load_params(distilled)
  m = np.asarray(masks["layers/0/mlp/up_proj/kernel"])
  w = np.asarray(params["layers"][0]["mlp"]["up_proj"]["kernel"])
  assert np.all(w[~m] == 0.0) and np.all(m.reshape(-1, 4, m.shape[1]).sum(1) == 2)
  # calibrated methods: plain QArrays (AWQ / SmoothQuant scales folded where the table allows)
  for d in quant:
    done = pipeline._read_done(os.path.join(work, "stages", d))
    if done["info"]["method"] in ("gptq", "awq", "smoothquant", "static"):
      q, _ = pipeline._load_params(os.path.join(work, "stages", d))
      leaves = _leaves(q)
      assert not any(isinstance(x, InputScaled) for x in leaves.values())
      down = leaves["layers/0/mlp/down_proj/kernel"]
      assert isinstance(getattr(down, "weight", down), QArray)
  for f in ("results.json", "results.md", "pareto.png", "config.json", "experiment.json"):
    assert os.path.getsize(os.path.join(work, f)) > 0, f
  md = open(os.path.join(work, "results.md")).read()
  assert "KL" in md and "llama.cpp" in md and "top-64" in md

  # re-run: nothing recomputed, the same records, the model not even loaded
  capsys.readouterr()
  again = pipeline.run(tiny(*EVERY_STAGE), work)
  out = capsys.readouterr().out
  assert "running" not in out and "every stage was done" in out
  assert [r["perplexity"] for r in again] == [r["perplexity"] for r in recs]
  # a new entry: only its own stages run; shared ones (the reference) are reused
  more = pipeline.run(tiny(*EVERY_STAGE[:3], entry("int8", "quantize,evaluate",
                                                   quantize__format="int8")), work)
  out = capsys.readouterr().out
  assert out.count("running") == 2 and "reference: evaluating" not in out
  assert [r["entry"] for r in more] == ["fp32", "bf16", "rtn", "int8"]


_KILL_SCRIPT = """
import sys
from experiments import pipeline
from tests.integration.test_pipeline import tiny
from configs.base import entry
pipeline.run(tiny(entry("pd", "prune,distill,evaluate"), steps=int(sys.argv[2])), sys.argv[1])
"""


def test_killed_run_resumes_to_the_same_records(tmp_path):
  steps = 8
  env = dict(os.environ, PYTHONPATH=ROOT)
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, killed, str(steps)], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  step = 0
  while time.time() < deadline and proc.poll() is None:
    d = os.path.join(killed, "stages")
    hist = [os.path.join(d, x, "train", "history.json") for x in
            (os.listdir(d) if os.path.isdir(d) else []) if x.startswith("distill-")]
    if hist and os.path.exists(hist[0]):
      try:
        step = json.load(open(hist[0]))[-1]["step"]
      except (ValueError, IndexError, KeyError, OSError):
        step = 0
      if step >= 2:
        break
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be interrupted"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 2 <= step < steps
  config = tiny(entry("pd", "prune,distill,evaluate"), steps=steps)
  resumed = pipeline.run(config, killed)
  straight = pipeline.run(copy.deepcopy(config), str(tmp_path / "straight"))
  assert [r["perplexity"] for r in resumed] == [r["perplexity"] for r in straight]
  assert resumed[0]["per_window_nll"] == straight[0]["per_window_nll"]
  a, _ = pipeline._load_params(os.path.join(killed, "stages", _stage_dirs(killed, "distill")[0]))
  b, _ = pipeline._load_params(os.path.join(str(tmp_path / "straight"), "stages",
                                            _stage_dirs(str(tmp_path / "straight"),
                                                        "distill")[0]))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rotated_entries_keep_the_function_and_export(tmp_path):
  """`rotate` first: the FP32 rotated model scores the FP32 numbers; rotated RTN (head
  quantized), a learned rotation (2 steps) and a rotated GGUF that llama.cpp runs."""
  work = str(tmp_path / "rot")
  recs = pipeline.run(tiny(
      entry("fp32", "evaluate"), entry("rot", "rotate,evaluate"),
      entry("rot_rtn", "rotate,quantize,evaluate", quantize__head_format="q8_0"),
      entry("spin", "rotate,quantize,evaluate", rotate__learn_steps=2,
            rotate__learn_format="int4_g64", rotate__r2="", quantize__head_format="q8_0"),
      entry("rot_q4_0", "rotate,quantize,export,llamacpp", quantize__format="q4_0",
            quantize__head_format="q8_0", rotate__r1="auto")), work)
  by = {r["entry"]: r for r in recs}
  fp32, rot = by["fp32"], by["rot"]
  assert rot["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-4)
  assert rot["kl_mean"] < 1e-6 and rot["method"] == "rotate R1 hadamard+R2 hadamard"
  assert by["rot_rtn"]["method"].endswith("rtn int4_g64 head q8_0")
  assert "learned 2 steps (int4_g64)" in by["spin"]["method"]
  assert any(os.path.exists(os.path.join(work, "stages", d, "params"))
             for d in _stage_dirs(work, "rotate"))  # the learned rotation is kept
  cpp = by["rot_q4_0"]
  assert cpp["runtime"] == "llama.cpp" and np.isfinite(cpp["perplexity"])
  assert cpp["tensor_types"] == {"Q4_0": 14, "Q8_0": 2}  # the embedding and the untied head
  refused = tiny(entry("a", "quantize,rotate"))
  with pytest.raises(ValueError, match="stage 'rotate' must come first"):
    pipeline.run(refused, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="head_format='q8_0' but the model has no untied head"):
    pipeline.run(tiny(entry("h", "quantize,evaluate", quantize__head_format="q8_0")),
                 str(tmp_path / "bad2"))


def test_bad_input_is_refused_before_work_and_overwrites_nothing(tmp_path):
  def refused(config, match, work=None):
    with pytest.raises(ValueError, match=match):
      pipeline.run(config, str(work or tmp_path / "x"))

  refused(tiny(entry("a", "prune,distil")), r"unknown stage 'distil'.*known stages: .*distill")
  refused(tiny(entry("a", "quantize", quantize__method="gptqq")),
          r"unknown quantize method 'gptqq'; expected one of rtn, cast, gptq")
  refused(tiny(entry("a", "prune", prune__method="obs")), r"unknown pruning method 'obs'")
  refused(tiny(entry("a", "quantize", quantize__format="int4_gg64")), "int4_gg64")
  refused(tiny(entry("a", "quantize", quantize__bits=4)),
          r"no field 'quantize.bits'; valid keys here: .*act_format")
  refused(tiny(entry("a", "prune,quantize", quantize__method="gptq")),
          r"'gptq' after pruning: it moves pruned weights off zero")
  refused(tiny(entry("a", "quantize,quantize")), r"'quantize' after 'quantize'")
  refused(tiny(entry("a", "quantize,llamacpp")), "earlier .export. stage.*none comes before it")
  refused(tiny(entry("a", "evaluate"), entry("a", "evaluate")), "two entries named 'a'")
  refused(tiny(entry("a", "evaluate"), entry("b", "evaluate", eval__tokens=2048)),
          "changes the model, corpus or protocol")
  assert not os.path.exists(tmp_path / "x")  # nothing was created for refused configs

  # a directory of another experiment, and one not written by the runner
  work = tmp_path / "w"
  pipeline.run(tiny(entry("fp32", "evaluate")), str(work))
  ident = (work / "experiment.json").read_text()
  other = tiny(entry("fp32", "evaluate"))
  other.data.corpus = str(tmp_path / "corpus.txt")
  refused(other, r"holds another experiment \(data: .*corpus", work)
  assert (work / "experiment.json").read_text() == ident
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  refused(tiny(entry("fp32", "evaluate")), "not written by this runner", foreign)
  assert os.listdir(foreign) == ["notes.txt"]

  # a damaged stage checkpoint or record names the file and how to recover
  good = tiny(entry("p", "prune,evaluate"))
  pipeline.run(good, str(work))
  prune = os.path.join(work, "stages", _stage_dirs(str(work), "prune")[0])
  for e in _stage_dirs(str(work), "evaluate"):  # make the evaluation need the checkpoint
    done = pipeline._read_done(os.path.join(work, "stages", e))
    if done["record"]["entry"] == "p":
      os.unlink(os.path.join(work, "stages", e, "done.json"))
  manifest = os.path.join(prune, "params", "quantjax_manifest.json")
  with open(manifest, "w") as f:
    f.write("{corrupt")
  refused(good, "stage checkpoint .*params cannot be read.*delete", work)
  with open(os.path.join(prune, "done.json"), "w") as f:
    f.write("{broken")
  refused(good, "damaged stage record", work)


def test_command_line_overrides_and_unknown_keys(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  work = str(tmp_path / "unused")
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/default.py",
       f"--workdir={work}", "--config.eval.tokenz=4096"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: --config.eval.tokenz: eval has no field 'tokenz'; valid keys: batch_size, ")
  assert "tokens, transformers, window" in lines[0]
  assert not os.path.exists(work)
  # Known keys are overridden (main with the runner stubbed out).
  code = ("import sys; from absl import app; from experiments import main, pipeline;"
          "pipeline.run = lambda c, w: print(c.eval.tokens, c.data.corpus, c.model.source, w);"
          "sys.argv = ['main', '--config=configs/default.py', '--workdir=/tmp/w',"
          "'--config.eval.tokens=4096', '--config.data.corpus=some.txt',"
          "'--config.model.source=gguf'];"
          "app.run(main.main)")
  ok = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                      text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.split() == ["4096", "some.txt", "gguf", "/tmp/w"]


CONFIGS = ("default", "calibrated", "ptq", "ablation_gptq", "prune_compare", "qat",
           "prune_distill_quantize", "export", "gguf_compare", "mixed_precision", "bench_eval",
           "gemma3", "rotation", "rounding", "llamacpp_types")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
  """Each config's entries name existing fields, known stages and methods, in a valid order;
  and the model and corpus can be changed in every one of them."""
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  assert module.__doc__ and "python -m experiments." in module.__doc__  # the launch command
  assert "Expected result" in module.__doc__
  names = [n for n, _ in pipeline.entries(c)]
  assert len(names) == len(set(names)) >= 1
  for n, sub in pipeline.entries(c):
    pipeline.validate(sub, n)
    assert "source" in sub.model and "corpus" in sub.data


def test_export_command_copies_the_gguf_out(tmp_path):
  from configs import export as export_config
  from experiments import export as export_cli
  from quantjax.io import gguf as gio
  c = export_config.get_config("rtn_q4_0")
  c.model.source = "tiny"
  c.eval.tokens = 1024
  c.eval.window = 128
  c.eval.progress = False
  c.calib.windows = 2
  c.llamacpp.windows = 2
  out = tmp_path / "tiny.gguf"
  rec = export_cli.export(c, str(out), str(tmp_path / "work"))
  assert out.exists() and rec["file_bytes"] == os.path.getsize(out)
  _, _, _, info = gio.import_gguf(out, tokenizer=False)
  assert info["blk.0.ffn_down.weight"] == ("Q4_0", "qarray")
  assert info["token_embd.weight"] == ("Q8_0", "qarray")
  assert [r["runtime"] for r in rec["records"]] == ["jax", "llama.cpp"]
  before = out.read_bytes()
  export_cli.export(c, str(out), str(tmp_path / "work"))  # resumed: the same file
  assert out.read_bytes() == before
  with pytest.raises(ValueError, match=".gguf"):
    export_cli.export(c, str(tmp_path / "x.bin"))


def test_hf_export_scored_by_transformers(tmp_path):
  """export.format="hf" writes a compressed-tensors directory; transformers scores it on the
  same windows as the JAX model (the same codes: the two agree closely)."""
  c = tiny(entry("int8", "quantize,evaluate,export,transformers", quantize__format="int8",
                 export__format="hf"))
  jax_rec, hf_rec = pipeline.run(c, str(tmp_path / "w"))
  assert hf_rec["runtime"] == "transformers" and hf_rec["transformers_load"] == "default"
  assert abs(hf_rec["perplexity"] / jax_rec["perplexity"] - 1) < 1e-3
  assert hf_rec["top1_agreement"] > 0.95 and hf_rec["params_bytes"] > 0
  assert os.path.exists(os.path.join(str(tmp_path / "w"), hf_rec["file"], "config.json"))
