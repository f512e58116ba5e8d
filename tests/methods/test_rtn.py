"""Round-to-nearest baseline helpers."""

import numpy as np

from quantjax import chain
from quantjax.methods import rtn
from quantjax.numerics.qarray import QArray
from quantjax.rules import QuantRule


def test_rtn_helpers_agree(tiny):
  _, pure = tiny
  rules = (QuantRule(module_path=r"layers/\d+/mlp/\w+_proj/kernel", format="int4_g32_asym"),)
  a = rtn.rtn_params(pure, rules)
  b = chain(rtn.rtn_transform(rules))(pure)
  w = pure["layers"][1]["mlp"]["gate_proj"]["kernel"]
  c = rtn.rtn_quantize(w, "int4_g32_asym")
  for q in (a["layers"][1]["mlp"]["gate_proj"]["kernel"],
            b["layers"][1]["mlp"]["gate_proj"]["kernel"]):
    assert isinstance(q, QArray)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(c.dequantize()))
  assert not isinstance(a["layers"][1]["attn"]["q_proj"]["kernel"], QArray)
  # RTN error bound: at most half a step (plus float slack) per value.
  step = np.repeat(np.asarray(c.scale), 32, axis=0)
  assert np.all(np.abs(np.asarray(c.dequantize()) - np.asarray(w)) <= step / 2 + 1e-6)
