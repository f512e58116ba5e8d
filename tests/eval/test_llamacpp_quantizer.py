"""llama.cpp's own row quantizer as a params transform (`eval.llamacpp.ggml_quantize_params`):
the peer the llama.cpp-types config puts beside our methods. Its QArrays hold ggml's bytes."""

import numpy as np
import pytest

import quantjax as qj
from quantjax import rules as rules_lib
from quantjax.eval import llamacpp
from quantjax.io import gguf as gguf_io
from quantjax.io import gguf_codebook

pytest.importorskip("llama_cpp")

TARGET = r"layers/\d+/mlp/(gate|up|down)_proj/kernel"


def _params():
  rng = np.random.default_rng(0)
  return {"layers": {"0": {"mlp": {
      "gate_proj": {"kernel": (rng.standard_normal((128, 64)) * 0.05).astype(np.float32)},
      "up_proj": {"kernel": (rng.standard_normal((128, 64)) * 0.05).astype(np.float32)},
      "down_proj": {"kernel": (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)}}}},
      "norm": {"scale": np.ones(64, np.float32)}}


@pytest.mark.parametrize("name", ["IQ4_NL", "Q2_0", "Q4_0"])
def test_leaves_hold_ggml_codes_and_importance_changes_them(name):
  params = _params()
  flat = dict(rules_lib.tree_leaves_with_paths(params))
  paths = [p for p in flat if p.endswith("_proj/kernel")]
  rng = np.random.default_rng(1)
  imp = {p: rng.uniform(0.01, 10.0, flat[p].shape[0]).astype(np.float32) for p in paths}
  plain = dict(rules_lib.tree_leaves_with_paths(
      llamacpp.ggml_quantize_params(params, TARGET, name)))
  weighted = dict(rules_lib.tree_leaves_with_paths(
      llamacpp.ggml_quantize_params(params, TARGET, name, importance=imp)))
  assert isinstance(plain["norm/scale"], np.ndarray)  # untouched
  for p in paths:
    q = plain[p]
    assert isinstance(q, qj.QArray) and q.fmt.name == name.lower()
    raw = llamacpp.ggml_quantize_rows(np.ascontiguousarray(flat[p].T), name)
    want = (gguf_codebook.dequantize(raw, name) if name in gguf_codebook.TYPES
            else np.asarray(gguf_io.blocks_to_qarray(raw, name, 0).dequantize()).T)
    np.testing.assert_array_equal(np.asarray(q.dequantize()).T, want, err_msg=p)
  # ggml weighs the error by the importance vector for IQ4_NL and Q4_0 (its `_impl` search);
  # its Q2_0 quantizer takes the block maximum and ignores it.
  differs = any(not np.array_equal(np.asarray(plain[p].qvalue), np.asarray(weighted[p].qvalue))
                for p in paths)
  assert differs == (name != "Q2_0")


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="no 2-D leaf matches 'nothing'"):
    llamacpp.ggml_quantize_params(_params(), "nothing", "IQ4_NL")
  with pytest.raises(ValueError, match="no importance vector for layers/0/mlp/down_proj/kernel"):
    llamacpp.ggml_quantize_params(_params(), TARGET, "IQ4_NL", importance={})
  with pytest.raises(ValueError, match="unknown ggml type 'IQ9'"):
    llamacpp.ggml_quantize_params(_params(), TARGET, "IQ9")
