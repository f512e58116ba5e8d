"""The staged chain (prune -> distill -> quantize -> evaluate) on a tiny random Llama."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import chain_base
from experiments import chain
from quantjax.io import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(stages, steps=6):
  c = chain_base.chain_config(stages)
  c.model.source = "tiny"
  c.eval.tokens = 1024
  c.eval.window = 128
  c.eval.progress = False
  c.calib.windows = 8
  c.calib.batch_size = 4
  c.prune.method = "wanda"
  for block in (c.distill, c.qat):
    block.steps = steps
    block.batch_size = 2
    block.seq_len = 64
    block.learning_rate = 1e-3
    block.warmup_steps = 1
    block.checkpoint_every = 1
  return c


def test_chain_runs_records_and_resumes(tmp_path, capsys):
  c = _tiny("evaluate,prune,evaluate,distill,evaluate,quantize,evaluate")
  work = str(tmp_path / "run")
  recs = chain.run(c, work)
  assert [r["method"] for r in recs] == [
      "fp32", "wanda 2:4", "wanda 2:4 → distill 6 steps",
      "wanda 2:4 → distill 6 steps → rtn int4_g64"]
  fp32, pruned, distilled, quant = recs
  # a random model's perplexities carry no meaning; the bookkeeping does
  assert all(np.isfinite(r["perplexity"]) for r in recs)
  assert quant["bits_per_weight"] == pytest.approx(4.5) and fp32["bits_per_weight"] == 32.0
  assert quant["params_bytes"] < fp32["params_bytes"] == pruned["params_bytes"]
  info = {i["stage"]: i for i in quant["chain_info"]}
  assert info["distill"]["steps"] == 6 and info["distill"]["tokens"] == 6 * 2 * 64
  assert quant["quantize_s"] == info["quantize"]["seconds"] > 0 and fp32["quantize_s"] == 0.0
  # masks survive distillation and symmetric quantization
  params, masks = chain._load_stage(os.path.join(work, "05_quantize"))
  k = params["layers"][0]["mlp"]["up_proj"]["kernel"]
  w = np.asarray(k.dequantize())
  m = np.asarray(masks["layers/0/mlp/up_proj/kernel"])
  assert np.all(w[~m] == 0.0) and np.all(m.reshape(-1, 4, m.shape[1]).sum(1) == 2)
  for f in ("results.json", "results.md", "pareto.png", "chain.json"):
    assert os.path.exists(os.path.join(work, f))
  # re-run: every stage is loaded, none recomputed
  capsys.readouterr()
  again = chain.run(c, work)
  out = capsys.readouterr().out
  assert out.count("done, loaded") == 7 and "running" not in out
  assert [r["perplexity"] for r in again] == [r["perplexity"] for r in recs]


def test_bad_inputs_are_clear_and_overwrite_nothing(tmp_path):
  c = _tiny("prune,distil")
  with pytest.raises(ValueError, match="unknown pipeline stage 'distil'"):
    chain.run(c, str(tmp_path / "a"))
  c = _tiny("prune,evaluate")
  c.prune.pattern = "3:5"
  with pytest.raises(ValueError, match="M=5 does not divide the input dimension 64"):
    chain.run(c, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="N:M pattern"):
    chain.parse_pattern("2:x")
  # a workdir from another model
  work = tmp_path / "c"
  work.mkdir()
  (work / "chain.json").write_text(json.dumps({"model": "some-other-model", "stages": []}))
  with pytest.raises(ValueError, match="holds a chain run of model 'some-other-model'"):
    chain.run(_tiny("evaluate"), str(work))
  assert json.loads((work / "chain.json").read_text())["model"] == "some-other-model"
  # a corrupted stage checkpoint
  good = str(tmp_path / "d")
  chain.run(_tiny("prune"), good)
  manifest = os.path.join(good, "00_prune", "params", "quantjax_manifest.json")
  open(manifest, "w").write("{corrupt")
  with pytest.raises(ValueError, match="cannot be read"):
    chain.run(_tiny("prune,evaluate"), good)


def test_qat_and_sweep(tmp_path):
  c = _tiny("evaluate,qat,evaluate", steps=4)
  c.qat.format = "int4_g32"
  c.sweep = [{"name": "lsq", "qat.lsq": True}, {"name": "ste", "qat.lsq": False}]
  out = chain.run_sweep(c, str(tmp_path), chain.run)
  assert [r[-1]["method"] for r in out] == ["qat-lsq int4_g32", "qat int4_g32"]
  for sub in ("lsq", "ste"):
    params, _ = chain._load_stage(str(tmp_path / sub / "01_qat"))
    assert type(params["layers"][0]["attn"]["q_proj"]["kernel"]).__name__ == "QArray"
  c.sweep = [{"qat.nonexistent": 1}]
  with pytest.raises(ValueError, match="no field 'nonexistent'"):
    chain.run_sweep(c, str(tmp_path / "x"), chain.run)


@pytest.mark.parametrize("module, arg, names", [
    ("prune_compare", None, ["fp32", "magnitude_50pct", "wanda_50pct", "sparsegpt_50pct",
                             "magnitude_2of4", "wanda_2of4", "sparsegpt_2of4"]),
    ("qat", None, ["fp32", "rtn", "qat_lsq"]),
    ("qat", "ste", ["fp32", "rtn", "qat_ste"]),
    ("ptq", "int4_g64/gptq,awq", ["fp32", "gptq_int4_g64", "awq_int4_g64"]),
])
def test_experiment_configs_and_their_sweeps(module, arg, names):
  import copy
  import importlib
  c = importlib.import_module(f"configs.{module}").get_config(arg)
  assert [e["name"] for e in c.sweep] == names
  for entry in c.sweep:  # every override names an existing field and a valid stage list
    sub = copy.deepcopy(c)
    for k, v in entry.items():
      if k != "name":
        chain._apply_override(sub, k, v)
    stages = chain.stage_list(sub)
    if "prune" in stages:
      chain.parse_pattern(sub.prune.pattern)
  if module == "qat":
    assert c.qat.init == "minmax" and c.quantize.format == c.qat.format
  with pytest.raises(ValueError):
    importlib.import_module(f"configs.{module}").get_config("nonsense/x" if module == "ptq"
                                                            else "nonsense")


_KILL_SCRIPT = """
import sys
from experiments import chain
from tests.integration.test_chain import _tiny
c = _tiny("prune,distill", steps=int(sys.argv[2]))
chain.run(c, sys.argv[1])
"""


def test_killed_mid_distillation_resumes_to_identical_params(tmp_path):
  steps = 8
  env = dict(os.environ, PYTHONPATH=ROOT)
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, killed, str(steps)], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  history = os.path.join(killed, "01_distill", "train", "history.json")
  deadline = time.time() + 300
  step = 0
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(history):
      try:
        step = json.load(open(history))[-1]["step"]
      except (ValueError, IndexError, KeyError):
        step = 0
      if step >= 2:
        break
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be interrupted"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "01_distill", "done.json"))
  assert 2 <= step < steps
  resumed = chain.run(_tiny("prune,distill", steps=steps), killed)
  straight = str(tmp_path / "straight")
  chain.run(_tiny("prune,distill", steps=steps), straight)
  a, _ = chain._load_stage(os.path.join(killed, "01_distill"))
  b, _ = chain._load_stage(os.path.join(straight, "01_distill"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert resumed == []


@pytest.mark.parametrize("method,fmt,act", [("gptq", "int4_g32", ""), ("awq", "int4_g32", ""),
                                            ("smoothquant", "int8", "int8_t"),
                                            ("static", "int8", "int8_t")])
def test_calibrated_quantize_stage_gives_plain_foldable_leaves(tmp_path, method, fmt, act):
  from quantjax import rules as rules_lib
  from quantjax.numerics.qarray import InputScaled, QArray
  c = _tiny("quantize,evaluate")
  c.quantize.method, c.quantize.format, c.quantize.act_format = method, fmt, act
  c.calib.windows = 4
  recs = chain.run(c, str(tmp_path / method))
  assert np.isfinite(recs[0]["perplexity"]) and recs[0]["method"].startswith(method)
  params, _ = chain._load_stage(os.path.join(str(tmp_path / method), "00_quantize"))
  leaves = dict(rules_lib.tree_leaves_with_paths(params))
  # AWQ / SmoothQuant scales were only placed where the fold table absorbs them, then folded.
  assert not any(isinstance(x, InputScaled) for x in leaves.values())
  q = leaves["layers/0/mlp/down_proj/kernel"]
  assert isinstance(q.weight if act else q, QArray)
