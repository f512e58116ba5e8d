"""The CPU kernel behind `qdot` (kernels/cpu_matmul.py) against the XLA reference path."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax.kernels import cpu_matmul
from quantjax.kernels import dispatch
from quantjax.models import llama

pytestmark = pytest.mark.skipif(not cpu_matmul.available(),
                                reason=f"CPU kernel not built: {cpu_matmul.load_error()}")

# Every format the kernel takes, by code kind: packed 4-bit (sym, asym int zero point,
# GGUF float minimum, per channel, per tensor, fp16 scales), 8-bit (signed, unsigned,
# asym, q8_0), 4-bit codes indexing a table of 16 levels (NF4; llama.cpp's IQ4_NL with
# fp16 scales and MXFP4 with E8M0 scales, per block of 32), FP8 and the 16-bit casts.
FORMATS = ["q4_0", "q4_1", "q8_0", "int4_g64", "int4_g64_asym", "int4_g32_asymf", "int4",
           "int4_t", "int4_g64_fp16s", "int8", "int8_g32_asym", "uint8_t", "nf4_g64",
           "iq4_nl", "mxfp4", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"]
# llama.cpp's 4-bit table types (`numerics.llamacpp_types`) and the layouts the kernel
# takes them in: NVFP4's scales cover 16 values, fewer than the [out, in] kernel's 32.
TABLE_FORMATS = [("iq4_nl", 0), ("iq4_nl", 1), ("mxfp4", 0), ("mxfp4", 1), ("nvfp4", 0)]


def _weight(fmt: str, axis: int, k: int = 128, n: int = 48, seed: int = 0):
  shape = (k, n) if axis == 0 else (n, k)
  over = {} if axis == 0 else dict(group_axis=1, channel_axis=0)
  f = qj.QuantFormat.parse(fmt, **over)
  return qj.quantize(jax.random.normal(jax.random.key(seed), shape), f)


def _qdot(path, x, w, axis):
  with dispatch.matmul_path(path):
    return jax.jit(lambda a, b: qj.qdot(a, b, contract_axis=axis))(x, w)


def _assert_kernel_matches_reference(x, w, axis):
  """The kernel's `qdot` against XLA's dequantize-then-dot; returns both."""
  ref = _qdot("xla", x, w, axis)
  out = _qdot("cpu", x, w, axis)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  return out, ref


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_reference(fmt, axis):
  w = _weight(fmt, axis)
  for lead in [(1,), (5,), (2, 3)]:  # 2-D and batched activations
    x = jax.random.normal(jax.random.key(len(lead)), (*lead, 128))
    out, ref = _assert_kernel_matches_reference(x, w, axis)
    assert out.shape == ref.shape == (*lead, 48) and out.dtype == x.dtype


@pytest.mark.parametrize("fmt,axis", TABLE_FORMATS)
def test_llamacpp_table_formats_take_the_kernel(fmt, axis):
  """IQ4_NL / MXFP4 / NVFP4: the plan picks the kernel's table kind with the format's own
  levels (not the XLA fallback), and decode rows M = 1, 3, 8 match the reference."""
  w = _weight(fmt, axis)
  assert w.fmt.kind == fmt and w.fmt.llamacpp_type == fmt.upper()
  for m in (1, 3, 8):
    x = jax.random.normal(jax.random.key(m), (m, 128))
    p, reason = cpu_matmul.plan(x, w, axis)
    assert p is not None, reason
    assert p.kind == cpu_matmul._NF4 and p.table == fmt and p.group == w.fmt.group_size
    np.testing.assert_array_equal(cpu_matmul._levels(p.table), w.fmt.levels)
    out, ref = _assert_kernel_matches_reference(x, w, axis)
    # ... and `cpu_matmul_reference`, the dequantize-then-dot it is defined as
    wf = w.dequantize(jnp.float32)
    np.testing.assert_allclose(np.asarray(cpu_matmul.cpu_matmul_reference(x, w, axis)),
                               np.asarray(x @ (wf if axis == 0 else wf.T)), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_llamacpp_table_scales_as_the_format_decodes_them():
  # Scales over a wide range: MXFP4's E8M0 powers of two 2^-20 ... 2^20, IQ4_NL's signed
  # fp16 scales (negative ones too), NVFP4's E4M3 scales down to its subnormals. The
  # kernel uses the scales the format's dequantization uses, exactly.
  k, n = 256, 32
  rng = np.random.default_rng(0)
  x = jax.random.normal(jax.random.key(0), (1, k))
  for fmt in ("mxfp4", "iq4_nl", "nvfp4"):
    f = qj.QuantFormat.parse(fmt)
    w = qj.quantize(jax.random.normal(jax.random.key(1), (k, n)), f)
    g = k // f.group_size
    if fmt == "mxfp4":
      scale = 2.0 ** rng.integers(-20, 21, (g, n))
    elif fmt == "iq4_nl":
      scale = rng.normal(size=(g, n)) * 0.01
    else:
      scale = rng.integers(1, 64, (g, n)) * 2.0 ** rng.integers(-9, 3, (g, n))
    w = dataclasses.replace(w, scale=jnp.asarray(scale, jnp.float32).astype(f.scale_dtype))
    assert cpu_matmul.plan(x, w, 0)[0] is not None
    _assert_kernel_matches_reference(x, w, 0)


def test_nvfp4_of_an_out_in_weight_falls_back(caplog):
  w = _weight("nvfp4", 1)
  x = jax.random.normal(jax.random.key(0), (1, 128))
  assert "group 16 along the contraction axis" in cpu_matmul.plan(x, w, 1)[1]
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    out = _qdot("auto", x, w, 1)
  assert "CPU kernel declines weight nvfp4 (48, 128)" in caplog.text
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_qdot("xla", x, w, 1)))


@pytest.mark.parametrize("fmt", ["int4_g64_asym", "q4_1", "int8", "nf4_g64", "bf16", "iq4_nl",
                                 "mxfp4", "nvfp4"])
def test_large_weight_split_over_threads(fmt):
  # Big enough for the kernel to split the work (K * N above its serial limit): decode
  # rows (1-4) read the codes in storage order, split by rows of codes over the helper
  # threads (K = 576 splits a 64-group in two on 2 threads); 5+ rows take the tiled path.
  w = _weight(fmt, 0, k=576, n=256)
  for m in (1, 4, 5):
    _assert_kernel_matches_reference(jax.random.normal(jax.random.key(m), (m, 576)), w, 0)


def test_w8a8_small_batches():
  w = qj.quantize_params({"w": jax.random.normal(jax.random.key(0), (128, 48))},
                         [qj.QuantRule(module_path="w", format="int8", act_format="int8")])["w"]
  _assert_kernel_matches_reference(jax.random.normal(jax.random.key(1), (3, 128)), w, 0)


def test_bf16_activations_and_auto_routing(caplog):
  w = _weight("q4_0", 0)
  x = jax.random.normal(jax.random.key(3), (2, 128)).astype(jnp.bfloat16)
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    out = _qdot("auto", x, w, 0)  # CPU backend: auto takes the kernel for few rows
  assert "qdot: cpu_matmul for weight q4_0 (128, 48)" in caplog.text
  ref = _qdot("xla", x, w, 0)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def test_many_rows_take_xla(caplog):
  w = _weight("int4_g64", 0)
  x = jnp.ones((cpu_matmul.MAX_ROWS + 1, 128))
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    qj.qdot(x, w)
  assert f"{cpu_matmul.MAX_ROWS + 1} rows > MAX_ROWS" in caplog.text


def test_unsupported_format_falls_back_with_debug_log(caplog):
  w = _weight("int3_g64_asym", 0)  # bit-plane codes: no CPU kernel
  x = jax.random.normal(jax.random.key(0), (1, 128))
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    out = _qdot("auto", x, w, 0)
  assert "CPU kernel declines weight int3_g64_asym (128, 48)" in caplog.text
  assert "no CPU kernel for 3-bit int codes" in caplog.text
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_qdot("xla", x, w, 0)))
  with pytest.raises(ValueError, match=r"matmul path 'cpu' forced but the CPU kernel does not "
                                       r"accept weight int3_g64_asym \(128, 48\), x float32 \(1, 128\)"):
    _qdot("cpu", x, w, 0)
  # per-channel 4-bit codes of an [out, in] weight are packed along `out`: not taken
  odd = qj.quantize(jnp.ones((48, 128)), qj.QuantFormat.parse("int4", channel_axis=0))
  assert cpu_matmul.plan(x, odd, 1)[0] is None


def test_shape_and_dtype_errors_name_both_shapes():
  w = _weight("q4_0", 0)
  with pytest.raises(ValueError, match=r"\(2, 100\).*\(128, 48\)"):
    qj.qdot(jnp.ones((2, 100)), w)
  with pytest.raises(ValueError, match=r"int32.*\(2, 128\).*\(128, 48\)"):
    qj.qdot(jnp.ones((2, 128), jnp.int32), w)
  with pytest.raises(ValueError, match=r"x float32\(2, 100\) with weight q4_0 \(128, 48\)"):
    cpu_matmul.cpu_matmul(jnp.ones((2, 100)), w)


def test_gradient_is_the_reference_gradient():
  w = _weight("int4_g64_asym", 0)
  x = jax.random.normal(jax.random.key(1), (3, 128))
  g = jax.random.normal(jax.random.key(2), (3, 48))

  def loss(path):
    def f(a):
      with dispatch.matmul_path(path):
        return jnp.sum(qj.qdot(a, w) * g)
    return jax.grad(f)

  np.testing.assert_allclose(np.asarray(loss("cpu")(x)), np.asarray(loss("xla")(x)), rtol=1e-5,
                             atol=1e-5)


def _tiny_llama():
  cfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True)
  _, state = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(0)))
  # Weights of std ~ 1/sqrt(fan-in) so that the next-token distribution is peaked.
  state = jax.tree.map(lambda a: a * 6.0 if a.ndim == 2 else a, state)
  return cfg, state


@pytest.mark.parametrize("fmt", ["q4_0", "int4_g64_asym", "int8"])
def test_greedy_generation_identical(fmt):
  cfg, state = _tiny_llama()
  rules = [qj.QuantRule(module_path=llama.PROJ_KERNELS, format=fmt),
           # the tied embedding is the output head: contract_axis=1
           qj.QuantRule(module_path="embed/embedding",
                        format=qj.QuantFormat.parse("q8_0", group_axis=1, channel_axis=0))]
  qparams = qj.quantize_params(state, rules)
  prompt = np.random.default_rng(0).integers(0, 256, (2, 7)).astype(np.int32)
  with dispatch.matmul_path("xla"):
    ref = llama.generate(cfg, qparams, prompt, 32)
  with dispatch.matmul_path("cpu"):
    out = llama.generate(cfg, qparams, prompt, 32)  # batch 2: decode steps take the kernel
  np.testing.assert_array_equal(out, ref)
  assert len(np.unique(ref[:, 7:])) > 4  # the model does not just repeat one token
  # the kernel really ran: one decode step's logits through both paths
  tok = jnp.asarray(ref[:, -1:])
  state = llama.as_state(cfg, qparams)
  with dispatch.matmul_path("xla"):
    a, _ = llama.cached_step(cfg, state, tok, llama.init_cache(cfg, 2, 8), jnp.int32(0))
  with dispatch.matmul_path("cpu"):
    b, _ = llama.cached_step(cfg, state, tok, llama.init_cache(cfg, 2, 8), jnp.int32(0))
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,head", [("iq4_nl", "iq4_nl"), ("mxfp4", "mxfp4"),
                                      ("nvfp4", "mxfp4")])
def test_llamacpp_table_formats_decode_step(fmt, head, caplog):
  """A jitted decode step of a tiny SmolLM2-like Llama with IQ4_NL / MXFP4 / NVFP4
  projections and an IQ4_NL / MXFP4 tied head (`[out, in]`, contract_axis=1): the
  kernel's logits are the XLA path's, and every matmul took the kernel."""
  cfg, state = _tiny_llama()
  rules = [qj.QuantRule(module_path=llama.PROJ_KERNELS, format=fmt),
           qj.QuantRule(module_path="embed/embedding",
                        format=qj.QuantFormat.parse(head, group_axis=1, channel_axis=0))]
  qparams = qj.quantize_params(state, rules)
  st = llama.as_state(cfg, qparams)
  tok = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 1)), jnp.int32)
  with dispatch.matmul_path("xla"):
    a, _ = llama.cached_step(cfg, st, tok, llama.init_cache(cfg, 1, 8), jnp.int32(0))
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    b, _ = llama.cached_step(cfg, st, tok, llama.init_cache(cfg, 1, 8), jnp.int32(0))  # auto
  assert "CPU kernel declines" not in caplog.text
  assert f"qdot: cpu_matmul for weight {fmt} (64, 128)" in caplog.text  # gate / up
  assert f"qdot: cpu_matmul for weight {head} (256, 64)" in caplog.text  # the tied head
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_gguf_import_decodes_through_the_kernel(tmp_path, caplog):
  """A GGUF file's Q4_0 / Q4_1 / Q8_0 tensors, imported as they are, take the kernel."""
  from quantjax.io import gguf as gio
  cfg, state = _tiny_llama()
  path = str(tmp_path / "tiny.gguf")
  gio.export_gguf(path, cfg, state, types=[(r".*ffn_(gate|up).*", "Q4_1"),
                                           (r".*ffn_down.*", "Q8_0"), (r".*", "Q4_0")])
  cfg2, imported, _, info = gio.import_gguf(path, tokenizer=False)
  assert {info["blk.0.ffn_up.weight"][0], info["blk.0.ffn_down.weight"][0],
          info["token_embd.weight"][0]} == {"Q4_1", "Q8_0", "Q4_0"}
  prompt = np.random.default_rng(1).integers(0, 256, (1, 5)).astype(np.int32)
  with dispatch.matmul_path("xla"):
    ref = llama.generate(cfg2, imported, prompt, 16)
  with caplog.at_level(logging.DEBUG, logger=dispatch.__name__):
    out = llama.generate(cfg2, imported, prompt, 16)  # auto
  for name in ("q4_0 (64, 64)", "q4_1 (64, 128)", "q8_0 (128, 64)", "q4_0 (256, 64)"):
    assert f"qdot: cpu_matmul for weight {name}" in caplog.text
  np.testing.assert_array_equal(out, ref)


def test_prefill_decode_reports_decode_memory():
  # speed.prefill_decode with peak_rss: the device loop's own peak (reset after its compile)
  # beside the prefill + per-step peak, on a kernel-decoded model; same tokens both loops.
  import sys

  from quantjax.eval import speed
  cfg, state = _tiny_llama()
  q = qj.quantize_params(state, [qj.QuantRule(module_path=llama.PROJ_KERNELS, format="q4_0")])
  recs = speed.prefill_decode(llama.decoder(cfg), q, vocab_size=256, batch_sizes=(1,),
                              prompt_len=8, decode_steps=4, repeats=1, peak_rss=True)
  (rec,) = recs
  assert rec["decode_loop"] and rec["decode_tokens_per_s"] > 0
  if sys.platform == "linux":
    assert rec["peak_rss_bytes"] > 0 and rec["decode_peak_rss_bytes"] > 0
