"""The default experiment end to end on a tiny config; resume; command-line overrides."""

import json
import os
import subprocess
import sys

import pytest

from configs import default as default_config
from experiments import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config():
  c = default_config.get_config()
  c.eval.tokens = 512
  c.eval.progress = False
  c.calib.windows = 2
  c.methods = "fp32,rtn_int8,rtn_int4_g64"
  return c


def test_pipeline_writes_results_and_resumes(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "run")
  records = pipeline.run(_tiny_config(), workdir)
  for f in ("results.json", "results.md", "pareto.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, f)) > 0, f
  with open(os.path.join(workdir, "results.json")) as fh:
    saved = json.load(fh)["records"]
  assert [r["method"] for r in saved] == ["fp32", "rtn_int8", "rtn_int4_g64"]
  base, w8, w4 = saved
  assert base["delta_pct"] == 0.0
  assert w8["bits_per_weight"] < 8.2 and 4.4 < w4["bits_per_weight"] < 4.6
  assert base["params_bytes"] > w8["params_bytes"] > w4["params_bytes"]
  for field in ("perplexity", "format", "params_bytes", "quantize_s", "eval_tokens_per_s",
                "corpus_sha256", "eval_tokens", "window", "dtype", "seed", "jax_version",
                "device", "eval_s", "compile_s"):
    assert field in w4, field
  assert w4["eval_tokens"] == 512 and w4["scored_tokens"] == 511
  md = open(os.path.join(workdir, "results.md")).read()
  assert "Q4_1" in md and "rtn_int4_g64" in md and "stay FP32" in md
  with open(os.path.join(workdir, "pareto.png"), "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  assert [r["perplexity"] for r in records] == [r["perplexity"] for r in saved]

  # Re-run: nothing is evaluated again; a new method is added.
  from quantjax.eval import perplexity
  calls = []
  real = perplexity.evaluate
  monkeypatch.setattr(perplexity, "evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
  c = _tiny_config()
  c.methods = "fp32,rtn_int8,rtn_int4_g64,cast_bf16"
  again = pipeline.run(c, workdir)
  assert len(calls) == 1 and calls[0]["desc"] == "cast_bf16"
  assert [r["perplexity"] for r in again[:3]] == [r["perplexity"] for r in saved]
  assert "skipped" in capsys.readouterr().out
  # A changed protocol invalidates the old records.
  c.eval.tokens = 1024
  calls.clear()
  pipeline.run(c, workdir)
  assert len(calls) == 4

  # experiments.compare merges directories and refuses mixed protocols.
  from experiments import compare
  from quantjax.eval import report
  merged = compare.merge([workdir])
  assert [r["method"] for r in merged] == ["fp32", "rtn_int8", "rtn_int4_g64", "cast_bf16"]
  other = tmp_path / "other"
  report.write_json_atomic(other / "results.json",
                           {"records": [dict(saved[0], eval_tokens=4096)]})
  with pytest.raises(ValueError, match="different protocols"):
    compare.merge([workdir, str(other)])
  assert len(compare.merge([workdir, str(other)], allow_mixed=True)) == 5


def test_unknown_method_is_a_clear_error(tmp_path):
  c = _tiny_config()
  c.methods = "fp32,rtn_int4_g64,gptq_int4"
  with pytest.raises(ValueError, match="gptq_int4"):
    pipeline.run(c, str(tmp_path))


def test_command_line_overrides_and_unknown_key():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/default.py",
       "--workdir=/tmp/unused", "--config.eval.tokenz=4096"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  assert "tokenz" in bad.stderr
  assert not os.path.exists("/tmp/unused/results.json")
  # Known keys are overridden (main.py with the pipeline stubbed out).
  code = ("import sys; from absl import app; from experiments import main, pipeline;"
          "pipeline.run = lambda c, w: print(c.eval.tokens, c.data.corpus, w);"
          "sys.argv = ['main', '--config=configs/default.py', '--workdir=/tmp/w',"
          "'--config.eval.tokens=4096', '--config.data.corpus=some.txt'];"
          "app.run(main.main)")
  ok = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                      text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.split() == ["4096", "some.txt", "/tmp/w"]
