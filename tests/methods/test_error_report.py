"""Per-layer SQNR tables, bar chart and sensitivity scan."""

import math
import os

import numpy as np

from quantjax import transforms
from quantjax.eval import error_report as er
from quantjax.models import llama
from quantjax.rules import QuantRule


def test_sqnr_db():
  x = np.ones(100)
  assert er.sqnr_db(x, x) == math.inf
  np.testing.assert_allclose(er.sqnr_db(x, x + 0.1), 10 * math.log10(1 / 0.01))


def test_tables_and_chart(tiny, tiny_tokens, tmp_path):
  cfg, pure = tiny
  rules = (QuantRule(module_path=r"layers/0/mlp/\w+_proj/kernel", format="int3_g32"),
           QuantRule(module_path=r"layers/\d+/(attn|mlp)/\w+_proj/kernel", format="int8"))
  q = transforms.quantize_params(pure, rules)
  rows = er.output_sqnr_table(llama.forward_fn(cfg), pure, q, [tiny_tokens[:4], tiny_tokens[4:]])
  assert len(rows) == 7 * cfg.num_layers
  by = {r["path"]: r for r in rows}
  w3 = by["layers/0/mlp/up_proj/kernel"]
  w8 = by["layers/1/mlp/up_proj/kernel"]
  assert w3["format"] == "int3_g32" and w8["format"] == "int8"
  # int8 is ~30 dB better than int3; the output SQNR is finite and of the same order.
  assert w8["weight_sqnr_db"] > w3["weight_sqnr_db"] + 20
  assert w8["output_sqnr_db"] > w3["output_sqnr_db"] + 20
  w = np.asarray(pure["layers"][0]["mlp"]["up_proj"]["kernel"])
  qd = np.asarray(q["layers"][0]["mlp"]["up_proj"]["kernel"].dequantize())
  np.testing.assert_allclose(w3["weight_sqnr_db"], 10 * np.log10((w ** 2).sum() /
                                                                 ((w - qd) ** 2).sum()), rtol=1e-5)
  md = er.markdown_table(rows, ["path", "format", "bits", "weight_sqnr_db", "output_sqnr_db"])
  assert md.count("\n") == len(rows) + 2 and "| layers/0/attn/q_proj/kernel | int8 |" in md
  png = er.bar_chart(rows, os.path.join(tmp_path, "sqnr.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Output SQNR of layer 0's up_proj equals a direct computation on the float inputs.
  from quantjax.methods import capture
  st = capture.collect_stats(llama.forward_fn(cfg), pure, [tiny_tokens[:4], tiny_tokens[4:]],
                             [QuantRule(module_path="layers/0/mlp/up_proj/kernel",
                                        format="int8")], needs=("hessian",))
  xtx = np.asarray(st["layers/0/mlp/up_proj/kernel"].xtx, np.float64)
  e = w - qd
  want = 10 * np.log10(np.sum(w * (xtx @ w)) / np.sum(e * (xtx @ e)))
  np.testing.assert_allclose(w3["output_sqnr_db"], want, rtol=1e-3)


def test_sensitivity_scan_ranks_the_coarsest_layer_first(tiny, tiny_tokens):
  cfg, pure = tiny
  ref = np.asarray(llama.forward(cfg, pure, tiny_tokens))
  paths = ["layers/0/mlp/down_proj/kernel", "layers/1/attn/q_proj/kernel"]

  def quantize_one(p, path):
    fmt = "int2_g32" if path.startswith("layers/0") else "int8"
    return transforms.quantize_params(p, [QuantRule(module_path=path, format=fmt)])

  metric = lambda p: er.sqnr_db(ref, llama.forward(cfg, p, tiny_tokens))  # noqa: E731
  rows = er.sensitivity_scan(pure, paths, quantize_one, metric)
  assert [r["path"] for r in rows] == paths
  assert rows[0]["metric"] < rows[1]["metric"]
