"""The capture and calibration driver on Equinox and Keras 3 models, written as their users
write them (`framework_models`)."""

import re

import equinox as eqx
import jax
import numpy as np
import pytest

from quantjax import methods
from quantjax import rules as rules_lib
from quantjax.methods import capture
from quantjax.numerics.qarray import QArray
from quantjax.rules import QuantRule
from tests.methods import framework_models, user_models

SKIP = QuantRule(module_path=".*", skip=True)
# Every projection of the blocks; embeddings, norms, positions and the head stay float.
EQX_TARGETS = r"blocks/\d+/(attn/(query|key|value|output)_proj|up|down)/weight"
KERAS_TARGETS = r"(attn_\d+/(query|key|value|attention_output)|up_\d+|down_\d+)/kernel"


@pytest.fixture(scope="module")
def eqx_model():
  fn, params, loss, static = framework_models.trained("eqx")
  assert loss < 3.2, loss  # trained: well below ln(256) = 5.5
  return fn, params, static


@pytest.fixture(scope="module")
def keras_model():
  fn, params, loss, model = framework_models.trained("keras")
  assert loss < 3.2, loss
  return fn, params, model


def _err(fn, ref_params, params, x):
  ref = np.asarray(fn(ref_params, x))
  return float(np.mean((np.asarray(fn(params, x)) - ref) ** 2))


def _rtn_and_gptq(fn, params, target, fmt="int3_g16"):
  # Group 16 divides every input: 64 (q, k, v, o, up), 256 (down); Keras' attention_output
  # contracts [heads, hd] = 4 x 16.
  rules = (QuantRule(module_path=target, format=fmt), SKIP)
  batches = user_models.calibration()
  rtn = methods.calibrate(fn, params, batches, rules, methods.RTN(), strict=True,
                          progress=False)
  gptq = methods.calibrate(fn, params, batches, rules, methods.GPTQ(), strict=True,
                           progress=False)
  return rtn, gptq


def _gptq_below_rtn_and_jits(run, params, rtn, gptq, x, name):
  """GPTQ's held-out error below 0.8 x RTN's; the quantized params run under jit as they
  do eagerly. Returns the jitted output."""
  e_rtn, e_gptq = _err(run, params, rtn.params, x), _err(run, params, gptq.params, x)
  print(f"{name}: rtn {e_rtn:.4g} gptq {e_gptq:.4g}")
  assert e_gptq < 0.8 * e_rtn, (name, e_gptq, e_rtn)
  out = jax.jit(run)(gptq.params, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(run(gptq.params, x)), rtol=1e-4,
                             atol=1e-4)
  return out


def _layouts(fn, params):
  cap = capture.trace(fn, params, user_models.calibration()[0])
  return cap, {s.path: cap.layout_of(s) for s in cap.sites}


def _quantized_paths(params):
  return [p for p, leaf in rules_lib.tree_leaves_with_paths(params) if isinstance(leaf, QArray)]


def _eqx_fn(static):
  """The user's forward with the halves given the other way round: `combine(static, p)`.

  `eqx.combine(params, static)` (the order Equinox's docs use, and `trained`'s `fn`) maps
  over `params`' structure, which descends into a QArray (a pytree node, so that jit takes
  its codes and scales), where `static` holds a None: a structure error. With `static` first the QArray is taken whole at its None; for float params the
  two orders are the same function."""
  return lambda p, x: jax.vmap(eqx.combine(static, p))(x)


def test_gptq_beats_rtn_on_an_equinox_transformer(eqx_model):
  fn, params, static = eqx_model
  # eqx.nn.Linear: weight [out, in], `weight @ x` per example under vmap; q, k, v read
  # one normed input.
  cap, lay = _layouts(fn, params)
  assert len(cap.sites) == 13  # 2 x 6 projections + the head; the embedding is a gather
  q = lay["blocks/0/attn/query_proj/weight"]
  assert (q.contract, q.free) == ((1,), (0,))
  by = {s.path: s.group for s in cap.sites}
  assert by["blocks/0/attn/query_proj/weight"] == by["blocks/0/attn/value_proj/weight"]
  rtn, gptq = _rtn_and_gptq(fn, params, EQX_TARGETS)  # calibrated through the user's fn
  quantized = _quantized_paths(gptq.params)
  # 2 blocks x (q, k, v, o, up, down).
  assert len(quantized) == 12 and all(re.fullmatch(EQX_TARGETS, p) for p in quantized)
  q = gptq.params.blocks[0].up.weight
  assert q.shape == (256, 64) and q.fmt.group_axis in (1, -1)  # [out, in]: groups along in
  x = user_models.held_out()
  run = _eqx_fn(static)
  # The quantized params run in the unmodified model under jit, and through
  # eqx.filter_jit on the recombined module.
  out = _gptq_below_rtn_and_jits(run, params, rtn, gptq, x, "eqx")
  model = eqx.combine(static, gptq.params)
  out2 = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-4, atol=1e-4)


def test_gptq_beats_rtn_on_a_keras_model(keras_model):
  fn, params, model = keras_model
  target = framework_models.keras_paths(model, KERAS_TARGETS)
  # EinsumDense kernels: query [d, heads, hd] contracts d; attention_output [heads, hd, d]
  # contracts two axes.
  index = {v.path: str(i) for i, v in enumerate(model.trainable_variables)}
  cap, lay = _layouts(fn, params)
  assert len(cap.sites) == 13
  q, o = lay[index["attn_0/query/kernel"]], lay[index["attn_0/attention_output/kernel"]]
  assert (q.contract, q.free) == ((0,), (1, 2))
  assert (o.contract, o.free, o.k) == ((0, 1), (2,), 64)
  rtn, gptq = _rtn_and_gptq(fn, params, target)
  assert isinstance(gptq.params, list) and len(gptq.params) == len(params)
  by_keras_path = {v.path: q for v, q in zip(model.trainable_variables, gptq.params)}
  quantized = [p for p, q in by_keras_path.items() if isinstance(q, QArray)]
  # 2 blocks x (query, key, value, attention_output, up, down).
  assert len(quantized) == 12 and all(re.fullmatch(KERAS_TARGETS, p) for p in quantized)
  assert by_keras_path["attn_0/query/kernel"].shape == (64, 4, 16)  # EinsumDense [d, heads, hd]
  assert by_keras_path["attn_0/attention_output/kernel"].shape == (4, 16, 64)
  x = user_models.held_out()
  # The QArray leaves stand in for the variables in stateless_call under jit (keras'
  # StatelessScope converts each value with convert_to_tensor, which dequantizes it inside
  # the traced computation; no dequantize_params needed).
  _gptq_below_rtn_and_jits(fn, params, rtn, gptq, x, "keras")

