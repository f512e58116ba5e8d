import subprocess
import sys

import pytest

from quantjax import plan as plan_lib
from quantjax.eval import memory


def test_parameter_counts_of_known_models():
  assert plan_lib.MODELS["smollm2-135m"].n_params == 134_515_008
  assert plan_lib.MODELS["llama3-8b"].n_params == 8_030_261_248
  assert plan_lib.MODELS["llama3-70b"].n_params == 70_553_706_496


def test_store_and_train_match_memory_estimate():
  m = plan_lib.MODELS["llama3-8b"]
  p = plan_lib.plan("llama3-8b", None, "fsdp=1", "h100-80gb")
  est = memory.estimate(m.n_params)
  assert p.store == pytest.approx(est.store_bytes)  # 4 B / param in FP32
  states = est.weights_bytes + est.grad_bytes + est.optimizer_bytes  # 16 B / param
  assert p.train - states > 0 and p.train / m.n_params > 16
  # sharding divides weights and optimizer state
  p8 = plan_lib.plan("llama3-8b", None, "fsdp=8", "h100-80gb")
  assert p8.store == pytest.approx(p.store / 8)
  q = plan_lib.plan("llama3-8b", "int4_g64", "fsdp=1", "h100-80gb")
  assert q.store < 0.2 * p.store


def test_fits_and_errors():
  p = plan_lib.plan("llama3-70b", "bf16", "fsdp=8", "h100-80gb")
  assert p.fits("store") and not p.fits("train")
  with pytest.raises(ValueError, match="unknown model"):
    plan_lib.plan("gpt5", None, "fsdp=1", "h100-80gb")
  with pytest.raises(ValueError, match="unknown mesh axis"):
    plan_lib.plan("llama3-8b", None, "model=8", "h100-80gb")
  with pytest.raises(ValueError, match="does not split"):
    plan_lib.plan("llama3-8b", None, "data=3", "h100-80gb", batch=8)


def test_cli():
  out = subprocess.run([sys.executable, "-m", "quantjax.plan", "--model", "all", "--format",
                        "bf16,int4_g64_asym", "--mesh", "fsdp=8", "--device", "h100-80gb"],
                       capture_output=True, text=True, check=True).stdout
  assert out.count("| Llama-3-70B |") == 2 and "SmolLM2-135M" in out
  bad = subprocess.run([sys.executable, "-m", "quantjax.plan", "--mesh", "x=2"], capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "unknown mesh axis" in bad.stderr
