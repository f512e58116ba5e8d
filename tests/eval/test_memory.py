import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax.eval import memory


def test_tree_bytes_counts_scales_and_codes():
  tree = {"w": jnp.ones((128, 64)), "b": jnp.ones(64)}
  q = qj.quantize_params(tree, [qj.QuantRule(module_path="w", format="int4_g64_asym")])
  w = q["w"]
  assert w.nbytes == 128 * 64 // 2 + 2 * 64 * 4 + 2 * 64 * 1
  assert memory.tree_bytes(q) == w.nbytes + 64 * 4
  assert memory.tree_param_count(q) == 128 * 64 + 64
  assert memory.bits_per_weight(q, quantized_only=True) == pytest.approx(8 * w.nbytes / (128 * 64))
  rows = memory.memory_table(q)
  assert {r.path for r in rows} == {"w", "b"}
  md = memory.markdown_memory_table(q, reference=tree)
  assert "int4_g64_asym" in md and "% of the reference" in md


def test_estimate_store_vs_train():
  e = memory.estimate(1e9)
  assert e.store_bytes == pytest.approx(4e9)
  assert e.train_bytes_per_param == pytest.approx(24.0)
  e4 = memory.estimate(1e9, "int4_g64")
  assert e4.store_bytes_per_param == pytest.approx(4.5 / 8)
  assert memory.format_bits_per_weight("int4_g32_asymf") == pytest.approx(6.0)
  assert memory.format_bits_per_weight("bf16") == 16
  # the estimate agrees with a QArray's real bytes for every llama.cpp type (TQ1_0 packs
  # 5 trits to a byte, not 2 bits a value)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(512, 8)), jnp.float32)
  for spec, want in (("tq1_0", 1.6875), ("tq2_0", 2.0625), ("iq4_nl", 4.5), ("q1_0", 1.125)):
    assert memory.format_bits_per_weight(spec) == pytest.approx(want)
    assert 8 * qj.quantize(x, spec).nbytes / x.size == pytest.approx(want), spec
  with pytest.raises(ValueError, match="positive"):
    memory.estimate(0)


def test_cli_memory_and_inspect():
  out = subprocess.run([sys.executable, "-m", "quantjax.cli.memory", "1e9"], capture_output=True,
                       text=True, check=True).stdout
  assert "| fp32 | 32.000 | 4.00 GB" in out
  rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in out.splitlines()
          if line.startswith("| ") and line.count("|") == 10}
  assert rows["fp32_adam"] == "16.0" and rows["mixed_bf16"] == "16.0"
  assert rows["pure_bf16"] == "8.0" and rows["qat_fake_quant"] == "20.0"
  out = subprocess.run([sys.executable, "-m", "quantjax.cli.inspect", "3.14159"],
                       capture_output=True, text=True, check=True).stdout
  assert "| bf16 | `0 10000000 1001001` | 3.140625" in out
  bad = subprocess.run([sys.executable, "-m", "quantjax.cli.memory", "-5"], capture_output=True,
                       text=True)
  assert bad.returncode != 0 and "positive" in bad.stderr


def test_cli_mlp_prints_real_bytes():
  out = subprocess.run([sys.executable, "-m", "quantjax.cli.memory", "--mlp", "1024", "--formats",
                        "int8,int4_g64"], capture_output=True, text=True, check=True).stdout
  ratios = [float(line.split(" bytes = ")[1].split("%")[0]) for line in out.splitlines()
            if "% of the reference" in line]
  assert len(ratios) == 2 and ratios[0] <= 26.0 and ratios[1] <= 16.0


def test_train_regime_rows_match_hand_counts():
  n, q = 1000.0, 800.0
  def est(r, **kw):
    return memory.train_regime_estimate(n, r, quantized_params=q, fmt="int4_g64", **kw)
  e = est("fp32_adam", activations=500.0)
  assert (e.weights, e.grads, e.optimizer, e.extra, e.frozen) == (4000, 4000, 8000, 0, 0)
  assert e.total == 16500 and e.bytes_per_param == pytest.approx(16.5)
  e = est("mixed_bf16")  # FP32 master + BF16 copy, BF16 grads, FP32 moments
  assert (e.weights, e.grads, e.optimizer) == (6000, 2000, 8000) and e.total == 16000
  e = est("pure_bf16")  # the "half the memory" figure
  assert (e.weights, e.grads, e.optimizer) == (2000, 2000, 4000) and e.total == 8000
  e = est("qat_fake_quant", lsq_steps=12.5)  # 800 weights, group 64 -> 12.5 steps
  assert e.extra == 4 * 800 + 16 * 12.5 and e.total == 16000 + 3200 + 200
  e = est("qat_fake_quant", kept_fraction=0.25)  # remat: one of 4 layers' copies alive
  assert e.extra == 800
  e = est("adapters", adapter_params=40.0)
  assert e.frozen == 800 * 4.5 / 8 + 4 * 200  # int4 g64 = 4.5 bits; the rest FP32
  assert (e.weights, e.grads, e.optimizer, e.extra) == (160, 160, 320, 3200)
  with pytest.raises(ValueError, match="unknown training regime .*fp32_adam"):
    memory.train_regime_estimate(n, "fp64")
  with pytest.raises(ValueError, match="quantized_params"):
    memory.train_regime_estimate(n, "adapters", quantized_params=2 * n)
  table = memory.train_regime_table([est(r) for r in memory.TRAIN_REGIMES],
                                    measured={"fp32_adam": 32000.0})
  assert "| fp32_adam |" in table and "| 2.00 |" in table and table.count("| - | - |") == 4
