"""Pallas kernels vs their pure-jnp references (interpret mode on CPU), their
native lowerings (Triton for "cuda", Mosaic for "tpu", lowered on this CPU),
and `ops.qdot`'s dispatch."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax.kernels import dispatch, tiling
from quantjax.kernels import int4_matmul as i4
from quantjax.kernels import int8_matmul as i8
from quantjax.kernels import w8a8_matmul as w8a8
from quantjax.models import llama

# (M, K, N): M never a multiple of the row block; K = 576 and N = 576 / 192 as in SmolLM2
SHAPES = [(1, 256, 128), (7, 576, 192), (33, 384, 64), (130, 512, 576)]
INT4 = ["int4", "int4_g32", "int4_g64_asym", "int4_g128_asymf", "int4_g128", "q4_0", "q4_1"]
INT8 = ["int8", "int8_g64", "int8_g32_asym", "q8_0"]


def _close(out, ref, tol=2e-5):
  # float32 accumulation in another order: relative to the output's scale
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol,
                             atol=tol * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def _case(m, k, n, fmt):
  kw, kx = jax.random.split(jax.random.key(m * 7 + n))
  return jax.random.normal(kx, (m, k)), qj.quantize(jax.random.normal(kw, (k, n)), fmt)


def _fits(fmt, k):  # group 128 needs K % 128 == 0 (576 is not: those weights cannot exist)
  return "g128" not in fmt or k % 128 == 0


@pytest.mark.parametrize("target", tiling.TARGETS)
@pytest.mark.parametrize("fmt,m,k,n", [(f, *s) for f in INT4 for s in SHAPES if _fits(f, s[1])])
def test_int4_matches_reference(m, k, n, fmt, target):
  x, w = _case(m, k, n, fmt)
  assert i4.can_use_int4_matmul(x, w, target=target)
  _close(i4.int4_matmul(x, w, target=target, interpret=True), i4.int4_matmul_reference(x, w))


@pytest.mark.parametrize("target", tiling.TARGETS)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("fmt", INT8)
def test_int8_matches_reference(m, k, n, fmt, target):
  x, w = _case(m, k, n, fmt)
  assert i8.can_use_int8_matmul(x, w, target=target)
  _close(i8.int8_matmul(x, w, target=target, interpret=True), i8.int8_matmul_reference(x, w))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fn,fmt", [(i4.int4_matmul, "int4_g64_asym"), (i8.int8_matmul, "int8")])
def test_half_precision_activations(fn, fmt, dtype):
  w = qj.quantize(jax.random.normal(jax.random.key(0), (256, 64)), fmt)
  x = jax.random.normal(jax.random.key(1), (3, 4, 256)).astype(dtype)
  out = fn(x, w, interpret=True)
  assert out.dtype == dtype and out.shape == (3, 4, 64)
  # the dequantized tile is rounded to x's dtype before the dot, as a BF16 matmul would
  _close(out, i4.int4_matmul_reference(x, w), tol=2e-2)


@pytest.mark.parametrize("target", tiling.TARGETS)
def test_split_k_and_chunks_per_step(target):
  x, w = _case(5, 1024, 128, "int4_g64_asym")  # 16 chunks
  ref = i4.int4_matmul_reference(x, w)
  for blocks in [tiling.BlockSizes(bm=8, bn=32, chunks_per_step=4, k_splits=2),
                 tiling.BlockSizes(bm=16, bn=64, chunks_per_step=2, k_splits=8),
                 tiling.BlockSizes(bm=16, bn=128, chunks_per_step=16, k_splits=1)]:
    _close(i4.int4_matmul(x, w, blocks=blocks, target=target, interpret=True), ref)


def test_default_blocks_split_k_for_decode():
  b = tiling.BlockSizes.for_shape(1, 4096, 14336 // 64, 64, "gpu")
  assert b.bm == 16 and b.k_splits > 1 and (4096 // b.bn) * b.k_splits >= 256
  assert tiling.BlockSizes.for_shape(256, 4096, 64, 64, "gpu").k_splits == 1
  t = tiling.BlockSizes.for_shape(1, 576, 9, 64, "tpu")
  assert t.bn == 576 and t.k_splits == 1  # no 128-multiple divides 576: one full-width block
  assert tiling.BlockSizes.for_shape(1, 100, 4, 64, "gpu") is None  # N % 16 != 0


def test_bad_input_errors_name_the_problem():
  x, w = _case(5, 256, 64, "int4_g32")
  ref = i4.int4_matmul_reference(x, w)
  _close(i4.int4_matmul(x, w, blocks=tiling.BlockSizes(bm=8, bn=32), interpret=True), ref)
  with pytest.raises(ValueError, match="not multiples of bm=8 / bn=48"):
    i4.int4_matmul(x, w, blocks=tiling.BlockSizes(bm=8, bn=48), interpret=True)
  with pytest.raises(ValueError, match="8 K chunks do not divide into k_splits=3"):
    i4.int4_matmul(x, w, blocks=tiling.BlockSizes(bm=8, bn=32, k_splits=3), interpret=True)
  with pytest.raises(ValueError, match=r"x shape \(5, 128\) does not contract with weight shape "
                                       r"\(256, 64\)"):
    i4.int4_matmul(x[:, :128], w, interpret=True)
  with pytest.raises(ValueError, match=r"x must be float32/bfloat16/float16, got int32 \(x shape "
                                       r"\(5, 256\), weight shape \(256, 64\)\)"):
    i4.int4_matmul(x.astype(jnp.int32), w, interpret=True)
  with pytest.raises(ValueError, match="handles int4 weights, not"):
    i4.int4_matmul(x, qj.quantize(jnp.ones((256, 64)), "nf4_g32"), interpret=True)
  with pytest.raises(ValueError, match="handles int8 weights, not"):
    i8.int8_matmul(x, w, interpret=True)
  with pytest.raises(ValueError, match="unknown kernel target 'cuda'"):
    i4.int4_matmul(x, w, target="cuda", interpret=True)
  assert not i4.can_use_int4_matmul(x, qj.quantize(jnp.ones((256, 64)), "int3_g32"))
  assert not i8.can_use_int8_matmul(x, qj.quantize(jnp.ones((256, 60)), "int8"))  # N % 16
  assert not i8.can_use_int8_matmul(x[:, :250], qj.quantize(jnp.ones((250, 64)), "int8"))  # K
  assert not i8.can_use_int8_matmul(x, qj.quantize(jnp.ones((256, 64)), "int8"), contract_axis=1)


@pytest.mark.parametrize("m,k,n", [(1, 128, 64), (9, 256, 128), (40, 576, 192)])
@pytest.mark.parametrize("target", tiling.TARGETS)
def test_w8a8_matches_reference(m, k, n, target):
  x = jax.random.normal(jax.random.key(0), (m, k))
  w = qj.quantize(jax.random.normal(jax.random.key(1), (k, n)), "int8")
  xq = qj.quantize(x, qj.QuantFormat.parse("int8", channel_axis=0))
  assert w8a8.can_use_w8a8_matmul(xq, w, target=target)
  out = w8a8.w8a8_matmul(xq, w, target=target, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(w8a8.w8a8_matmul_reference(xq, w)))
  with pytest.raises(ValueError, match=r"needs symmetric int8 QArrays .* w int4_g32"):
    w8a8.w8a8_matmul(xq, qj.quantize(jnp.ones((k, n)), "int4_g32"), interpret=True)
  with pytest.raises(ValueError, match=r"shapes do not contract: x .*\(%d, %d\) and w .*\(64, %d\)"
                     % (m, k, n)):
    w8a8.w8a8_matmul(xq, qj.quantize(jnp.ones((64, n)), "int8"), interpret=True)


def test_w8a8_through_qdot_equals_the_xla_integer_path():
  x = jax.random.normal(jax.random.key(0), (2, 3, 256))
  w = qj.quantize(jax.random.normal(jax.random.key(1), (256, 128)), "int8")
  with dispatch.matmul_path("xla"):
    ref = qj.qdot(x, w, act_format="int8")
  with dispatch.matmul_path("interpret"):
    out = qj.qdot(x, w, act_format="int8")
  assert out.shape == (2, 3, 128)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


LOWER_CASES = [("int4", i4.int4_matmul, "int4_g64_asym"), ("int4", i4.int4_matmul, "q4_0"),
               ("int4", i4.int4_matmul, "int4"), ("int8", i8.int8_matmul, "int8"),
               ("int8", i8.int8_matmul, "q8_0")]


@pytest.mark.parametrize("platform,target,marker", [("cuda", "gpu", "__gpu$xla.gpu.triton"),
                                                    ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("kind,fn,fmt", LOWER_CASES)
@pytest.mark.parametrize("m", [1, 64])
def test_native_lowering(kind, fn, fmt, platform, target, marker, m):
  """The kernels lower to Triton / Mosaic: block shapes and ops are accepted."""
  w = qj.quantize(jax.random.normal(jax.random.key(0), (576, 1536)), fmt)
  x = jnp.ones((m, 576), jnp.bfloat16)
  text = tiling.lower_for(platform, functools.partial(fn, target=target), x, w)
  assert marker in text


@pytest.mark.parametrize("platform,target", [("cuda", "gpu"), ("tpu", "tpu")])
def test_native_lowering_w8a8(platform, target):
  xq = qj.quantize(jnp.ones((256, 1024)), qj.QuantFormat.parse("int8", channel_axis=0))
  w = qj.quantize(jax.random.normal(jax.random.key(0), (1024, 512)), "int8")
  assert "custom_call" in tiling.lower_for(platform, functools.partial(w8a8.w8a8_matmul, target=target),
                                           xq, w)


def test_dispatch_routes_each_format_to_its_kernel(caplog):
  x = jax.random.normal(jax.random.key(0), (4, 256))
  cases = {"int4_g64_asym": "int4_matmul", "int8": "int8_matmul"}
  for fmt, name in cases.items():
    w = qj.quantize(jax.random.normal(jax.random.key(1), (256, 128)), fmt)
    with dispatch.matmul_path("xla"):
      ref = qj.qdot(x, w)
    with caplog.at_level(logging.DEBUG, logger=dispatch.__name__), dispatch.matmul_path("interpret"):
      caplog.clear()
      out = qj.qdot(x, w)
    assert f"qdot: {name} for weight {fmt}" in caplog.text
    _close(out, ref, tol=1e-5)
  # unsupported: forced paths raise naming format and shape; under auto -> XLA with a debug log
  nf4 = qj.quantize(jnp.ones((256, 128)), "nf4_g32")
  with dispatch.matmul_path("kernel"), pytest.raises(ValueError, match=r"no kernel accepts weight "
                                                                        r"nf4.*\(256, 128\)"):
    qj.qdot(x, nf4)
  dispatch.set_auto_kernels(True)  # as on a GPU with kernels enabled; CPU never uses them
  try:
    assert not dispatch.auto_uses_kernels()
  finally:
    dispatch.set_auto_kernels(None)
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__), dispatch.matmul_path("interpret"):
    caplog.clear()
    odd = qj.quantize(jnp.ones((256, 100)), "int8")  # N = 100 does not tile
    with pytest.raises(ValueError, match=r"no kernel accepts weight int8.*\(256, 100\)"):
      qj.qdot(x, odd)


def test_auto_logs_the_fallback(monkeypatch, caplog):
  monkeypatch.setattr(dispatch, "auto_uses_kernels", lambda: True)  # as on a GPU with kernels on
  x = jnp.ones((2, 256))
  nf4 = qj.quantize(jnp.ones((256, 128)), "nf4_g32")
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    out = qj.qdot(x, nf4)
  assert "no kernel for weight nf4" in caplog.text and "XLA path" in caplog.text
  np.testing.assert_allclose(np.asarray(out), np.asarray(x @ nf4.dequantize()), rtol=1e-6)


def test_model_outputs_with_either_path():
  """A Llama through qdot: XLA and the kernels (interpret) give the same logits and tokens,
  and jitted model functions re-trace when the path changes."""
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  q = qj.quantize_params(params, [qj.QuantRule(module_path=r".*mlp.*kernel", format="int8"),
                                  qj.QuantRule(module_path=r".*_proj.*kernel", format="int4_g32_asym")])
  kinds = {type(v).__name__ for v in jax.tree.leaves(q, is_leaf=lambda v: isinstance(v, qj.QArray))}
  assert "QArray" in kinds
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
  with dispatch.matmul_path("xla"):
    ref = llama.forward(cfg, q, tokens)
    ref_gen = llama.generate(cfg, q, tokens[:, :4], 6)
  with dispatch.matmul_path("interpret"):
    out = llama.forward(cfg, q, tokens)
    gen = llama.generate(cfg, q, tokens[:, :4], 6)
  _close(out, ref, tol=1e-4)
  np.testing.assert_array_equal(gen, ref_gen)
  assert not np.array_equal(np.asarray(out), np.asarray(ref))  # really another path
  # auto on CPU is the XLA path: bit-identical
  np.testing.assert_array_equal(np.asarray(llama.forward(cfg, q, tokens)), np.asarray(ref))


def test_benchmark_script_writes_its_tables(tmp_path):
  from experiments import bench_kernels
  rows = bench_kernels.run({"tiny": (128, 64)}, (1,), ("int8", "int4_g64"), str(tmp_path),
                           repeats=1, e2e="tiny", decode_steps=2, interpret=True)
  layer = [r for r in rows if "shape" in r]
  assert {r["path"] for r in layer} == {"bf16", "xla_int8", "xla_int4_g64", "xla_w8a8",
                                        "kernel_int8", "kernel_int4_g64", "kernel_w8a8"}
  assert all("error" not in r for r in layer), [r.get("error") for r in layer]
  assert all(r["GB_s"] > 0 and r["roofline"] > 0 for r in layer)
  # the kernels' outputs are checked against the XLA path in the same run
  assert all(r["max_rel_err"] < 1e-2 for r in layer if r["path"].startswith("kernel"))
  e2e = [r for r in rows if "model" in r]
  assert [(r["weights"], r["path"]) for r in e2e] == [
      ("bf16", "xla"), ("int8", "xla"), ("int8", "interpret"), ("int4_g64", "xla"),
      ("int4_g64", "interpret")]
  assert e2e[0]["speedup_vs_bf16"] == 1.0 and all(r["decode_tokens_per_s"] > 0 for r in e2e)
  assert e2e[2]["weight_bytes"] < e2e[0]["weight_bytes"] and e2e[3]["weight_bytes"] < e2e[1]["weight_bytes"]
  md = (tmp_path / "bench.md").read_text()
  assert md.count("| tiny |") == 7 and "End-to-end decode" in md
  assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").exists()
