import subprocess
import sys

import pytest

from quantjax.eval import plan as plan_lib
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
  out = subprocess.run([sys.executable, "-m", "quantjax.cli.plan", "--model", "all", "--format",
                        "bf16,int4_g64_asym", "--mesh", "fsdp=8", "--device", "h100-80gb"],
                       capture_output=True, text=True, check=True).stdout
  assert out.count("| Llama-3-70B |") == 2 and "SmolLM2-135M" in out
  bad = subprocess.run([sys.executable, "-m", "quantjax.cli.plan", "--mesh", "x=2"],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown mesh axis" in bad.stderr


def test_activation_model_matches_hand_count():
  m = plan_lib.ModelShape("t", vocab=100, d=8, hidden=16, layers=3, heads=2, kv_heads=1,
                          head_dim=4, tied=True)
  # per token per layer: 4d + 2(q + kv) + 4 hidden values in the compute dtype + heads*seq FP32
  per_layer = 4 * (4 * 8 + 2 * (8 + 4) + 4 * 16) + 4 * 2 * 10
  head = 4 * 3 * 100
  assert plan_lib.activation_bytes(m, 2, 10) == 2 * 10 * (3 * per_layer + head)
  per_layer16 = 2 * (4 * 8 + 2 * (8 + 4) + 4 * 16) + 4 * 2 * 10
  assert plan_lib.activation_bytes(m, 2, 10, act_bytes=2, remat=True) == \
      2 * 10 * (3 * 2 * 8 + per_layer16 + head)
  assert m.lora_params(2) == 3 * 2 * ((8 + 8) + (8 + 4) * 2 + (8 + 8) + (8 + 16) * 2 + (16 + 8))
  assert m.scale_count("int4_g4") == m.linear_params // 4


def test_train_regimes_order_and_sharding():
  rows = {e.regime: e for e in plan_lib.train_regimes("llama3-8b", batch=1, seq=2048)}
  assert list(rows) == list(memory.TRAIN_REGIMES)
  n = plan_lib.MODELS["llama3-8b"].n_params
  states = {r: e.states / n for r, e in rows.items()}
  assert states["pure_bf16"] == pytest.approx(8.0) and states["fp32_adam"] == pytest.approx(16.0)
  assert states["adapters"] < 2.0 < states["pure_bf16"] < states["fp32_adam"] <= states["qat_fake_quant"]
  assert rows["pure_bf16"].activations < rows["fp32_adam"].activations
  sharded = plan_lib.train_regimes("llama3-8b", ("fp32_adam",), "fsdp=8", batch=1, seq=2048)[0]
  assert sharded.states == pytest.approx(rows["fp32_adam"].states / 8)
  assert plan_lib.plan("llama3-8b", None, "fsdp=8", "h100-80gb", batch=1).train == \
      pytest.approx(sharded.total)


def test_cli_regimes():
  out = subprocess.run([sys.executable, "-m", "quantjax.cli.plan", "--model", "smollm2-135m",
                        "--mesh", "fsdp=1", "--device", "cpu-24gb", "--regimes"],
                       capture_output=True, text=True, check=True).stdout
  for r in memory.TRAIN_REGIMES:
    assert f"| {r} |" in out
