"""The model-agnostic capture and calibration driver on models written as users write them."""

import errno
import os
import re
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import methods, sparsity
from quantjax import rules as rules_lib
from quantjax.methods import capture
from quantjax.numerics.qarray import InputScaled, QArray
from quantjax.rules import PruneRule, QuantRule
from tests.methods import user_models

# The weights each model's methods are compared on (embeddings, norms, heads stay float).
TARGETS = {
    "gpt2": r"params/h_\d+/(qkv|proj|fc|out)/kernel",
    "einsum": r"blocks/\d+/(q|k|v|o|up|down)/kernel",
    "scan": r"params/blocks/(q|k|v|o|up|down)/kernel",
    "conv": r"params/conv_\d+/kernel",
}
SKIP = QuantRule(module_path=".*", skip=True)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def model(request):
  fn, params, loss = user_models.trained(request.param)
  assert loss < 3.2, (request.param, loss)  # trained: well below ln(256) = 5.5
  return request.param, fn, params


def _err(fn, ref_params, params, x):
  ref = np.asarray(fn(ref_params, x))
  return float(np.mean((np.asarray(fn(params, x)) - ref) ** 2))


def test_gptq_beats_rtn_on_every_user_model(model):
  name, fn, params = model
  # Group 16: the attention projections' innermost input axis is a 16-wide head.
  rules = (QuantRule(module_path=TARGETS[name], format="int3_g16"), SKIP)
  batches = user_models.calibration()
  x = user_models.held_out()
  rtn = methods.calibrate(fn, params, batches, rules, methods.RTN(), progress=False)
  gptq = methods.calibrate(fn, params, batches, rules, methods.GPTQ(), progress=False)
  quantized = [p for p, leaf in rules_lib.tree_leaves_with_paths(gptq.params)
               if isinstance(leaf, QArray)]
  assert quantized and all(re.fullmatch(TARGETS[name], p) for p in quantized)
  e_rtn, e_gptq = _err(fn, params, rtn.params, x), _err(fn, params, gptq.params, x)
  assert e_gptq < 0.8 * e_rtn, (name, e_gptq, e_rtn)
  # The quantized tree runs in the unmodified model under jit, at its real size.
  jax.jit(fn)(gptq.params, x)
  qs = [q for _, q in rules_lib.tree_leaves_with_paths(gptq.params) if isinstance(q, QArray)]
  assert all(q.bits_per_value <= 5.0 for q in qs)  # 3-bit codes + one f32 scale per 16


def test_rtn_through_the_driver_equals_quantize_params_on_2d_kernels():
  fn, params, _ = user_models.trained("gpt2")
  rules = (QuantRule(module_path=r"params/h_\d+/(fc|out)/kernel", format="int4_g32"), SKIP)
  a = methods.calibrate(fn, params, user_models.calibration(), rules, methods.RTN(),
                        progress=False).params
  b = methods.rtn_params(params, rules)
  for (p, x), (_, y) in zip(rules_lib.tree_leaves_with_paths(a),
                            rules_lib.tree_leaves_with_paths(b)):
    if isinstance(x, QArray):
      np.testing.assert_array_equal(np.asarray(x.qvalue), np.asarray(y.qvalue), err_msg=p)


def test_layouts_and_groups_of_the_fused_qkv_model():
  fn, params, _ = user_models.trained("gpt2")
  cap = capture.trace(fn, params, user_models.calibration()[0])
  by = {s.path: s for s in cap.sites}
  qkv = by["params/h_0/qkv/kernel"]
  lay = cap.layout_of(qkv)
  assert (lay.contract, lay.free, lay.region) == ((0,), (1, 2, 3), ())
  proj = cap.layout_of(by["params/h_0/proj/kernel"])  # [heads, hd, d], contracts two axes
  assert (proj.contract, proj.free, proj.k) == ((0, 1), (2,), 64)
  assert by["params/h_0/fc/kernel"].group != by["params/h_0/qkv/kernel"].group
  assert "params/lm_head/kernel" in by and "params/wte/embedding" not in by  # a gather, not a matmul
  assert len(cap.sites) == 9 and cap.summary().startswith("9 matmul sites")


def test_stacked_scan_weights_become_stacked_qarrays_that_run_under_scan():
  fn, params, _ = user_models.trained("scan")
  rules = (QuantRule(module_path=TARGETS["scan"], format="int4_g16"), SKIP)
  res = methods.calibrate(fn, params, user_models.calibration(), rules, methods.GPTQ(),
                          progress=False)
  leaves = dict(rules_lib.tree_leaves_with_paths(res.params))
  up = leaves["params/blocks/up/kernel"]
  assert isinstance(up, QArray) and up.shape == (3, 64, 256) and up.scale.shape == (3, 4, 256)
  o = leaves["params/blocks/o/kernel"]  # [L, heads, hd, d]
  assert isinstance(o, QArray) and o.shape == (3, 4, 16, 64)
  # Each layer slice has its own statistics: three parts per stacked leaf.
  names = {p.name for p in res.parts}
  assert {f"params/blocks/up/kernel[{i}]" for i in range(3)} <= names
  x = user_models.held_out()
  rtn = methods.calibrate(fn, params, user_models.calibration(), rules, methods.RTN(),
                          progress=False)
  assert _err(fn, params, res.params, x) < 0.9 * _err(fn, params, rtn.params, x)
  # Slice i of the stacked QArray is the quantization of layer i.
  w = np.asarray(params["params"]["blocks"]["up"]["kernel"])
  for i in range(3):
    assert np.abs(np.asarray(up.dequantize())[i] - w[i]).max() < 0.5 * np.abs(w[i]).max()


def _two_block_fn(p, x):
  """Two blocks of a user MLP; in each, `a` and `b` read the same input."""
  for blk in ("b0", "b1"):
    h = jax.nn.gelu(x @ p[blk]["a"]) * (x @ p[blk]["b"])
    x = x + h @ p[blk]["c"]
  return x


def _two_block_params(seed=0, d=32, f=64):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)  # noqa: E731
  return {b: {"a": mk(d, f), "b": mk(d, f), "c": mk(f, d)} for b in ("b0", "b1")}


def test_sequential_equals_a_step_by_step_reference():
  params = _two_block_params()
  rng = np.random.default_rng(1)
  batches = [jnp.asarray(rng.normal(size=(64, 32)) * (1 + 3 * (np.arange(32) < 3)), jnp.float32)
             for _ in range(3)]
  rules = (QuantRule(module_path=r"b\d/[abc]", format="int3_g16"),)
  res = methods.calibrate(_two_block_fn, params, batches, rules, methods.GPTQ(), progress=False)
  # Reference: quantize group by group, each group's inputs from the model with
  # every earlier group already quantized.
  fmt = rules[0].format
  q = {b: dict(v) for b, v in params.items()}

  def hess(rows):
    x = np.concatenate([np.asarray(r, np.float64) for r in rows])
    return jnp.asarray(2.0 * x.T @ x / x.shape[0], jnp.float32)

  def gq(w, rows):
    return methods.gptq_quantize(w, hess(rows), fmt).qarray

  xs = list(batches)
  for blk in ("b0", "b1"):
    for n in ("a", "b"):
      q[blk][n] = gq(params[blk][n], xs)
    hs = [jax.nn.gelu(x @ q[blk]["a"].dequantize()) * (x @ q[blk]["b"].dequantize()) for x in xs]
    q[blk]["c"] = gq(params[blk]["c"], hs)
    xs = [x + h @ q[blk]["c"].dequantize() for x, h in zip(xs, hs)]
  for blk in ("b0", "b1"):
    for n in ("a", "b", "c"):
      got, want = res.params[blk][n], q[blk][n]
      diff = np.mean(np.asarray(got.codes()) != np.asarray(want.codes()))
      assert diff < 1e-3, (blk, n, diff)
      np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-5)
  # One-pass mode takes every input from the float model instead.
  one = methods.calibrate(_two_block_fn, params, batches, rules, methods.GPTQ(),
                          mode="one_pass", progress=False)
  np.testing.assert_array_equal(np.asarray(one.params["b0"]["a"].codes()),
                                np.asarray(res.params["b0"]["a"].codes()))
  assert np.mean(np.asarray(one.params["b1"]["a"].codes()) !=
                 np.asarray(res.params["b1"]["a"].codes())) > 0.01
  assert res.info["groups"] == 4 and res.info["compiles"] <= 4


def test_strict_rules_catch_a_typo(model):
  name, fn, params = model
  typo = TARGETS[name].replace("kernel", "kernal")
  with pytest.raises(ValueError, match="matched no leaf"):
    methods.calibrate(fn, params, user_models.calibration(), (
        QuantRule(module_path=typo, format="int4_g32"), SKIP), methods.GPTQ(), strict=True,
        progress=False)
  with pytest.warns(UserWarning, match="matched no leaf"):
    methods.calibrate(fn, params, user_models.calibration()[:1], (
        QuantRule(module_path=TARGETS[name], format="int8"),
        QuantRule(module_path="no/such/leaf", format="int8"), SKIP), methods.RTN(),
        progress=False)


def test_awq_scales_travel_with_the_weight_on_an_nnx_einsum_model():
  fn, params, _ = user_models.trained("einsum")
  rules = (QuantRule(module_path=TARGETS["einsum"], format="int3_g16"), SKIP)
  batches = user_models.calibration()
  res = methods.calibrate(fn, params, batches, rules, methods.AWQ(grid=10), progress=False)
  leaves = dict(rules_lib.tree_leaves_with_paths(res.params))
  q = leaves["blocks/0/q/kernel"]
  assert isinstance(q, InputScaled) and q.scale.shape == (64, 1, 1)
  # q, k and v read one input: one scale vector.
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(leaves["blocks/0/v/kernel"].scale))
  rtn = methods.calibrate(fn, params, batches, rules, methods.RTN(), progress=False)
  x = user_models.held_out()
  assert _err(fn, params, res.params, x) < _err(fn, params, rtn.params, x)


def test_pruning_on_a_user_model():
  fn, params, _ = user_models.trained("gpt2")
  rules = (PruneRule(module_path=TARGETS["gpt2"], n=2, m=4),
           PruneRule(module_path=".*", skip=True))
  batches = user_models.calibration()
  x = user_models.held_out()
  errs = {}
  for m in ("magnitude", sparsity.Wanda(), sparsity.SparseGPT()):
    pruned, masks = sparsity.prune_calibrated(fn, params, batches, rules, m, progress=False)
    mk = masks["params"]["h_0"]["fc"]["kernel"]
    assert np.all(np.asarray(mk).reshape(16, 4, -1).sum(1) == 2)  # 2:4 along the input axis
    errs[str(m)] = _err(fn, params, pruned, x)
  # On this LayerNorm'd model input norms are nearly uniform, so Wanda is close to
  # magnitude; SparseGPT's reconstruction is clearly better.
  assert errs[str(sparsity.SparseGPT())] < 0.8 * errs["magnitude"], errs
  assert errs["Wanda()"] < 1.1 * errs["magnitude"], errs
  # Wanda's first mask is |W| * ||X|| on the float model's input, ranked per output.
  pruned, masks = sparsity.prune_calibrated(fn, params, batches, rules, sparsity.Wanda(),
                                            progress=False)
  st = capture.collect_stats(fn, params, batches, [QuantRule(
      module_path="params/h_0/qkv/kernel", format="int8"), SKIP], needs=("sqmean",))
  w = np.asarray(params["params"]["h_0"]["qkv"]["kernel"]).reshape(64, -1)
  want = sparsity.wanda_mask(jnp.asarray(w), jnp.sqrt(st["params/h_0/qkv/kernel"].sum_sq), n=2,
                             m=4)
  np.testing.assert_array_equal(np.asarray(masks["params"]["h_0"]["qkv"]["kernel"]).reshape(
      64, -1), np.asarray(want))


def test_conv_patches_match_the_convolution():
  fn, params, _ = user_models.trained("conv")
  cap = capture.trace(fn, params, user_models.calibration()[0])
  s = next(s for s in cap.sites if s.path == "params/conv_0/kernel")
  lay = cap.layout_of(s)
  assert (lay.contract, lay.free) == ((0, 1), (2,))  # [width, in, out]
  stats = capture.collect_stats(fn, params, user_models.calibration()[:1],
                                [QuantRule(module_path=r"params/conv_0/kernel", format="int8"),
                                 SKIP], needs=("hessian",))
  st = stats["params/conv_0/kernel"]
  assert st.count == 4 * 64 and st.xtx.shape == (256, 256)


# ----------------------------------------------------------------------------
# Bad input.


def test_no_matmul_on_params():
  with pytest.raises(ValueError, match="performs no matmul"):
    methods.calibrate(lambda p, x: x * p["w"], {"w": jnp.ones(4)}, [jnp.ones((2, 4))],
                      [QuantRule(module_path="w", format="int8")], methods.GPTQ(),
                      progress=False)


def test_unmappable_contraction_names_the_weight():
  # A reshape that splits axis 0 of the weight between the matmul's input and output.
  p = {"w": jnp.ones((8, 8))}
  fn = lambda p, x: x @ p["w"].reshape(4, 16)  # noqa: E731
  with pytest.raises(ValueError, match="cannot calibrate w: .*axis 0 .* feeds both"):
    methods.calibrate(fn, p, [jnp.ones((2, 4))], [QuantRule(module_path="w", format="int8")],
                      methods.GPTQ(), progress=False)


def test_two_layouts_of_one_weight_are_refused():
  p = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)}
  fn = lambda p, x: (x @ p["w"]) @ p["w"].T  # noqa: E731
  with pytest.raises(ValueError, match="w is read by two matmuls with different layouts"):
    methods.calibrate(fn, p, [jnp.ones((4, 8))], [QuantRule(module_path="w", format="int8")],
                      methods.GPTQ(), progress=False)


def test_shared_weight_gets_merged_statistics():
  rng = np.random.default_rng(0)
  p = {"w": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)}
  fn = lambda p, x: jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"])  # noqa: E731
  x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  st = capture.collect_stats(fn, p, [x], [QuantRule(module_path="w", format="int8")],
                             needs=("hessian",))["w"]
  h = np.tanh(np.asarray(x) @ np.asarray(p["w"]))
  want = np.asarray(x).T @ np.asarray(x) + h.T @ h
  assert st.count == 64
  np.testing.assert_allclose(np.asarray(st.xtx), want, rtol=1e-4, atol=1e-3)


def test_inconsistent_batches_and_nan_inputs_are_named():
  params = _two_block_params()
  rules = [QuantRule(module_path=r"b\d/[abc]", format="int4_g16")]
  ok = jnp.ones((8, 32))
  with pytest.raises(ValueError, match="calibration batch 1 .*shape \\(4, 32\\)"):
    methods.calibrate(_two_block_fn, params, [ok, jnp.ones((4, 32))], rules, methods.GPTQ(),
                      progress=False)
  bad = ok.at[2, 5].set(jnp.nan)
  with pytest.raises(ValueError, match="calibration batch 1: the input of b0/a, b0/b holds 1 "
                     "NaN/Inf"):
    methods.calibrate(_two_block_fn, params, [ok, bad], rules, methods.GPTQ(), progress=False)
  with pytest.raises(ValueError, match="no calibration batches"):
    methods.calibrate(_two_block_fn, params, [], rules, methods.GPTQ(), progress=False)
  with pytest.raises(TypeError, match="takes QuantRules, got a PruneRule"):
    methods.calibrate(_two_block_fn, params, [ok], [PruneRule(module_path="b0/a", sparsity=0.5)],
                      methods.GPTQ(), progress=False)


def test_singular_hessian_is_dampened():
  params = _two_block_params()
  rules = [QuantRule(module_path=r"b\d/[abc]", format="int4_g16")]
  row = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32)), jnp.float32)
  x = jnp.tile(row, (16, 1))  # rank 1: X^T X is singular
  res = methods.calibrate(_two_block_fn, params, [x], rules, methods.GPTQ(), progress=False)
  for blk in res.params.values():
    for q in blk.values():
      assert np.all(np.isfinite(np.asarray(q.dequantize())))
  rtn = methods.rtn_params(params, rules)
  err = lambda p: float(np.mean((np.asarray(_two_block_fn(p, x)) -  # noqa: E731
                                 np.asarray(_two_block_fn(params, x))) ** 2))
  assert err(res.params) <= err(rtn)


def test_unseen_weight_is_reported():
  p = {"w": jnp.ones((8, 8)), "e": jnp.ones((8, 8))}
  fn = lambda p, x: (x @ p["w"]) + p["e"][0]  # noqa: E731
  rules = [QuantRule(module_path="w|e", format="int8")]
  with pytest.raises(ValueError, match="read by no matmul .*: e"):
    methods.calibrate(fn, p, [jnp.ones((2, 8))], rules, methods.GPTQ(), strict=True,
                      progress=False)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    res = methods.calibrate(fn, p, [jnp.ones((2, 8))], rules, methods.GPTQ(), progress=False)
  assert any("read by no matmul" in str(x.message) for x in w)
  assert isinstance(res.params["w"], QArray) and not isinstance(res.params["e"], QArray)


def test_methods_know_no_models():
  """Nothing under methods/, sparsity/ or the error report imports a model (docs/design.md)."""
  import ast
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[2] / "quantjax"
  files = list((root / "methods").glob("*.py")) + list((root / "sparsity").glob("*.py")) + [
      root / "eval" / "error_report.py"]
  bad = []
  for f in files:
    for node in ast.walk(ast.parse(f.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if isinstance(node, ast.ImportFrom) and node.module == "quantjax":
        names = [f"quantjax.{a.name}" for a in node.names]
      bad += [f"{f.name}: {n}" for n in names if n.startswith("quantjax.models")]
  assert len(files) > 10 and not bad, bad


def test_weights_reached_through_layout_ops_and_nnx_apply():
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
  rng = np.random.default_rng(0)
  p = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),  # [out, in], PyTorch layout
       "v": jnp.asarray(rng.normal(size=(4, 16, 32)), jnp.float32)}  # reshaped to [64, 32]

  def fn(p, x):
    w = jax.lax.with_sharding_constraint(p["w"], NamedSharding(mesh, PartitionSpec()))
    h = jnp.tanh(x @ w.astype(jnp.bfloat16).astype(jnp.float32).T)
    return h @ p["v"].reshape(64, 32)

  x = [jnp.asarray(rng.normal(size=(256, 32)) * (1 + 4 * (np.arange(32) < 2)), jnp.float32)
       for _ in range(4)]
  cap = capture.trace(fn, p, x[0])
  lw = cap.layout_of(next(s for s in cap.sites if s.path == "w"))
  lv = cap.layout_of(next(s for s in cap.sites if s.path == "v"))
  assert (lw.contract, lw.free) == ((1,), (0,)) and (lv.contract, lv.free) == ((0, 1), (2,))
  rules = [QuantRule(module_path="w|v", format="int4_g16")]
  g = methods.calibrate(fn, p, x, rules, methods.GPTQ(), progress=False)
  r = methods.calibrate(fn, p, x, rules, methods.RTN(), progress=False)
  assert g.params["w"].fmt.group_axis == -1  # groups along the [out, in] weight's input axis
  held = jnp.asarray(rng.normal(size=(512, 32)) * (1 + 4 * (np.arange(32) < 2)), jnp.float32)
  assert _err(fn, p, g.params, held) < _err(fn, p, r.params, held)
  # An NNX module through nnx_apply: the state comes back with QArrays inside.
  model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), jax.nn.relu,
                         nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
  f2, state = methods.nnx_apply(model)
  res = methods.calibrate(f2, state, x, [QuantRule(module_path=r"layers/\d/kernel",
                                                    format="int8"),
                                          QuantRule(module_path=".*", skip=True)],
                          methods.GPTQ(), strict=True, progress=False)
  leaves = dict(rules_lib.tree_leaves_with_paths(res.params))
  assert isinstance(leaves["layers/0/kernel"], QArray) and isinstance(leaves["layers/2/kernel"],
                                                                      QArray)
  nnx.update(model, res.params)
  np.testing.assert_allclose(np.asarray(model(x[0])), np.asarray(f2(state, x[0])), rtol=0.05,
                             atol=0.05)


def _assert_same_params(a_params, b_params):
  """Same paths, and every leaf (QArray codes, scales, ...) equal bit for bit."""
  for (pa, a), (pb, b) in zip(rules_lib.tree_leaves_with_paths(a_params),
                              rules_lib.tree_leaves_with_paths(b_params)):
    assert pa == pb
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert np.array_equal(np.asarray(x), np.asarray(y)), pa


@pytest.mark.parametrize("name", ["gpt2", "scan"])
def test_donated_weights_are_freed_and_the_result_is_the_same(name):
  """`donate=True` deletes each selected weight's buffer once its result replaces it (the
  others are untouched) and changes nothing in the result; stacked (scan) weights too."""
  fn, params, _ = user_models.trained(name)
  rules = (QuantRule(module_path=TARGETS[name], format="int4_g16"), SKIP)
  ref = methods.calibrate(fn, params, user_models.calibration(), rules, methods.RTN(),
                          progress=False)
  mine = jax.tree.map(jnp.array, params)  # a copy whose selected buffers may go
  res = methods.calibrate(fn, mine, user_models.calibration(), rules, methods.RTN(),
                          progress=False, memory=capture.MemoryOptions(donate=True))
  flat = dict(rules_lib.tree_leaves_with_paths(mine))
  selected = [p for p in flat if re.fullmatch(TARGETS[name], p)]
  assert selected and all(flat[p].is_deleted() for p in selected)
  assert not any(x.is_deleted() for p, x in flat.items() if p not in selected)
  _assert_same_params(ref.params, res.params)


class _LazyBatches(Sequence):
  """Calibration batches read when indexed (as a caller streaming from disk passes them)."""

  def __init__(self, batches):
    self._batches, self.reads = batches, 0

  def __len__(self):
    return len(self._batches)

  def __getitem__(self, i):
    self.reads += 1
    return np.array(self._batches[i])


@pytest.mark.parametrize("name,mode", [("gpt2", "sequential"), ("scan", "sequential"),
                                       ("gpt2", "one_pass")])
def test_spilled_activations_give_the_same_result(tmp_path, name, mode):
  """`activation_limit=0`: every stack of activations goes to files, segments run batch by
  batch, and the result is the in-memory call's bit for bit; the files are deleted and a file
  that was in the directory before is kept."""
  fn, params, _ = user_models.trained(name)
  rules = (QuantRule(module_path=TARGETS[name], format="int4_g16"), SKIP)
  ref = methods.calibrate(fn, params, user_models.calibration(), rules, methods.GPTQ(),
                          progress=False, mode=mode)
  (tmp_path / "theirs.txt").write_text("not ours")
  lazy = _LazyBatches(user_models.calibration())
  res = methods.calibrate(fn, params, lazy, rules, methods.GPTQ(), progress=False, mode=mode,
                          memory=capture.MemoryOptions(activation_limit=0, activation_dir=tmp_path))
  assert res.info["spilled_bytes"] > 0 and ref.info["spilled_bytes"] == 0
  assert lazy.reads >= len(lazy)
  assert sorted(os.listdir(tmp_path)) == ["theirs.txt"]
  assert res.info["gptq_loss"] == ref.info["gptq_loss"]
  _assert_same_params(ref.params, res.params)


def test_spill_limit_keeps_small_stacks_in_memory(tmp_path):
  """Only stacks above the limit go to disk: a limit above every stack spills nothing."""
  fn, params, _ = user_models.trained("gpt2")
  rules = (QuantRule(module_path=TARGETS["gpt2"], format="int4_g16"), SKIP)
  res = methods.calibrate(fn, params, user_models.calibration(), rules, methods.RTN(),
                          progress=False,
                          memory=capture.MemoryOptions(activation_limit=2**40,
                                                       activation_dir=tmp_path))
  assert res.info["spilled_bytes"] == 0 and os.listdir(tmp_path) == []


def test_spill_disk_full_is_named_and_cleaned(tmp_path, monkeypatch):
  """A full disk while spilling: an OSError naming the file, and no file of ours is left."""
  fn, params, _ = user_models.trained("gpt2")
  rules = (QuantRule(module_path=TARGETS["gpt2"], format="int4_g16"), SKIP)
  real, calls = os.pwrite, []

  def pwrite(fd, data, off):
    calls.append(off)
    if len(calls) > 6:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd, data, off)
  monkeypatch.setattr(os, "pwrite", pwrite)
  with pytest.raises(OSError, match=r"writing calibration activations .*activations-.*No space"):
    methods.calibrate(fn, params, user_models.calibration(), rules, methods.GPTQ(),
                      progress=False,
                      memory=capture.MemoryOptions(activation_limit=0,
                                                   activation_dir=tmp_path / "act"))
  assert not os.path.exists(tmp_path / "act")  # made by the call, removed with its files
  with pytest.raises(ValueError, match="activation_limit must be"):
    methods.calibrate(fn, params, user_models.calibration(), rules, methods.RTN(),
                      progress=False, memory=capture.MemoryOptions(activation_limit=-1))


@pytest.mark.parametrize("name", ["gpt2", "scan"])
def test_bf16_weights_with_float32_stand_ins_equal_the_float32_model(name):
  """BF16 leaves cast up inside the forward, `stand_in_dtype=float32`: the result is the
  float32 copy's bit for bit (the stand-ins hold the dequantized values exactly); with the
  default BF16 stand-ins it is not."""
  fn, params, _ = user_models.trained(name)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), bf16)

  def fn_up(p, x):
    return fn(jax.tree.map(lambda a: a.astype(jnp.float32), p), x)
  rules = (QuantRule(module_path=TARGETS[name], format="int4_g16"), SKIP)
  ref = methods.calibrate(fn, f32, user_models.calibration(), rules, methods.GPTQ(),
                          progress=False)
  res = methods.calibrate(fn_up, bf16, user_models.calibration(), rules, methods.GPTQ(),
                          progress=False, memory=capture.MemoryOptions(stand_in_dtype=jnp.float32))
  assert res.info["gptq_loss"] == ref.info["gptq_loss"]
  flat_ref = dict(rules_lib.tree_leaves_with_paths(ref.params))
  for p, x in rules_lib.tree_leaves_with_paths(res.params):
    if re.fullmatch(TARGETS[name], p):
      for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(flat_ref[p])):
        assert np.array_equal(np.asarray(a), np.asarray(b)), p
  plain = methods.calibrate(fn_up, bf16, user_models.calibration(), rules, methods.GPTQ(),
                            progress=False)
  assert plain.info["gptq_loss"] != ref.info["gptq_loss"]


class _LiveWeights:
  """Wraps a method; at every `apply` records how many float32 arrays of `shape` are alive."""

  def __init__(self, inner, shape, ignore):
    self.inner, self.shape, self.counts = inner, tuple(shape), []
    self.ignore = {id(x) for x in jax.tree.leaves(ignore)}
    self.needs, self.rule_type, self.label = inner.needs, inner.rule_type, "live"

  def apply(self, parts, record):
    self.counts.append((tuple(p.path for p in parts), sum(
        1 for x in jax.live_arrays()
        if not x.is_deleted() and x.dtype == jnp.float32 and tuple(x.shape) == self.shape
        and id(x) not in self.ignore)))
    return self.inner.apply(parts, record)


def test_finished_weights_are_let_go_once_no_segment_reads_them():
  """Sequential mode, donated weights: when the last block's `out` projection is solved, no
  float stand-in of an earlier projection of that shape is alive any more (each is dropped
  once the segments that read it have run); the result is unchanged."""
  fn, params, _ = user_models.trained("gpt2")
  rules = (QuantRule(module_path=TARGETS["gpt2"], format="int4_g16"), SKIP)
  flat = dict(rules_lib.tree_leaves_with_paths(params))
  qkv = [p for p in flat if re.fullmatch(r"params/h_\d+/qkv/kernel", p)]
  assert len(qkv) >= 2
  spy = _LiveWeights(methods.RTN(), np.shape(flat[qkv[0]]), params)  # the test's own copy
  mine = jax.tree.map(jnp.array, params)
  res = methods.calibrate(fn, mine, user_models.calibration(), rules, spy, progress=False,
                          memory=capture.MemoryOptions(donate=True))
  first, last = spy.counts[0], spy.counts[-1]
  assert "qkv" in first[0][0] and first[1] >= 1  # the weights being solved are alive
  assert "out" in last[0][0] and last[1] == 0, spy.counts
  ref = methods.calibrate(fn, params, user_models.calibration(), rules, methods.RTN(),
                          progress=False)
  _assert_same_params(ref.params, res.params)
