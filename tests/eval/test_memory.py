import subprocess
import sys

import jax.numpy as jnp
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
  with pytest.raises(ValueError, match="positive"):
    memory.estimate(0)


def test_cli_memory_and_inspect():
  out = subprocess.run([sys.executable, "-m", "quantjax.memory", "1e9"], capture_output=True,
                       text=True, check=True).stdout
  assert "| fp32 | 32.000 | 4.00 GB" in out and "24.0" in out
  out = subprocess.run([sys.executable, "-m", "quantjax.inspect", "3.14159"], capture_output=True,
                       text=True, check=True).stdout
  assert "| bf16 | `0 10000000 1001001` | 3.140625" in out
  bad = subprocess.run([sys.executable, "-m", "quantjax.memory", "-5"], capture_output=True, text=True)
  assert bad.returncode != 0 and "positive" in bad.stderr


def test_cli_mlp_prints_real_bytes():
  out = subprocess.run([sys.executable, "-m", "quantjax.memory", "--mlp", "1024", "--formats",
                        "int8,int4_g64"], capture_output=True, text=True, check=True).stdout
  ratios = [float(line.split(" bytes = ")[1].split("%")[0]) for line in out.splitlines()
            if "% of the reference" in line]
  assert len(ratios) == 2 and ratios[0] <= 26.0 and ratios[1] <= 16.0
