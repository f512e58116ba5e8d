"""Hugging Face / compressed-tensors export and import on tiny random Llamas.

The real clients check the files: compressed-tensors' own packers and
compressors (byte-level equality from the same integer codes), transformers
with compressed-tensors (logits of our exports, and of checkpoints written by
compressed-tensors' `ModelCompressor` and by llm-compressor, against the JAX
model on the imported QArrays).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax import rules as rules_lib
from quantjax.io import hf
from quantjax.io import safetensors as st
from quantjax.methods.activations import StaticActQuantized
from quantjax.models import llama
from quantjax.models import load
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from tests.models.conftest import make_tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

LLMC_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "llmc_tiny_w4g32")
PROJ = r".*_proj/kernel"
TOKENS = np.random.default_rng(3).integers(0, 256, size=(2, 24)).astype(np.int32)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
  """(config, float params) of a tiny random Llama saved and loaded through a directory."""
  d = tmp_path_factory.mktemp("hf_tiny")
  make_tiny_hf(str(d), tied=request.param)
  cfg, params, _ = load.load_hf(str(d), tokenizer=False)
  return cfg, params


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf_tiny_tied")
  make_tiny_hf(str(d), tied=True)
  cfg, params, _ = load.load_hf(str(d), tokenizer=False)
  return cfg, params


def _quantize(params, rules):
  return qj.quantize_params(params, list(rules) + [qj.QuantRule(module_path=".*", skip=True)])


def _hf_logits(directory, **ct_kwargs):
  kw = {}
  if ct_kwargs:
    kw["quantization_config"] = transformers.CompressedTensorsConfig(**ct_kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                            **kw).eval()
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _leaves(params):
  return dict(rules_lib.tree_leaves_with_paths(rules_lib.to_pure(params)))


def _static(params, *, asym=False):
  """Static per-tensor int8 activation scales on every quantized projection."""
  def fn(path, leaf):
    if isinstance(leaf, QArray) and "_proj" in path:
      if asym:
        return StaticActQuantized(weight=leaf, act_format=QuantFormat.parse("int8_t_asym"),
                                  act_scale=jnp.full((1, 1), 0.021, jnp.float32),
                                  act_zero_point=jnp.full((1, 1), 131, jnp.uint8))
      return StaticActQuantized(weight=leaf, act_format=QuantFormat.parse("int8_t"),
                                act_scale=jnp.full((1, 1), 0.02, jnp.float32), act_zero_point=None)
    return leaf
  return rules_lib.map_with_paths(fn, rules_lib.to_pure(params))


# ----------------------------------------------------------------------------
# Byte level: our packing and our tensors against compressed-tensors' own code.


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_equals_compressed_tensors(bits):
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
  rng = np.random.default_rng(bits)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  codes = rng.integers(lo, hi + 1, size=(7, 77)).astype(np.int8)
  ours = hf.pack_int32(codes, bits)
  theirs = pack_to_int32(torch.from_numpy(codes), bits).numpy()
  assert ours.dtype == np.int32 and ours.shape == theirs.shape
  np.testing.assert_array_equal(ours, theirs)
  # along dim 0, as zero points are packed
  theirs0 = pack_to_int32(torch.from_numpy(codes), bits, packed_dim=0).numpy()
  np.testing.assert_array_equal(hf.pack_int32(codes.T.copy(), bits).T, theirs0)
  np.testing.assert_array_equal(hf.unpack_int32(ours, bits, 77), codes)
  np.testing.assert_array_equal(
      unpack_from_int32(torch.from_numpy(ours), bits, torch.Size((7, 77))).numpy(), codes)
  with pytest.raises(hf.HFFormatError, match="must lie in"):
    hf.pack_int32(codes.astype(np.int16) + (1 << bits), bits)


def _ct_scheme(fmt: str, act: str | None):
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
  f = QuantFormat.parse(fmt)
  typ = "float" if f.kind.startswith("fp8") else "int"
  strategy = {"group": "group", "per_channel": "channel", "per_tensor": "tensor"}[f.granularity]
  w = QuantizationArgs(num_bits=f.bits, type=typ, symmetric=f.symmetric, strategy=strategy,
                       group_size=f.group_size)
  a = None
  if act is not None:
    af = QuantFormat.parse(act)
    a = QuantizationArgs(num_bits=8, type="float" if af.kind.startswith("fp8") else "int",
                         symmetric=True, dynamic=True,
                         strategy="token" if af.granularity == "per_channel" else "tensor")
  return QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)


@pytest.mark.parametrize("fmt,act,ct_format", [
    ("int4_g32", None, "pack-quantized"),
    ("int4_g32_asym", None, "pack-quantized"),
    ("int4_asym", None, "pack-quantized"),
    ("int3_g16", None, "pack-quantized"),
    ("int8", None, "pack-quantized"),
    ("int8_t", None, "pack-quantized"),
    ("int8", "int8", "int-quantized"),
    ("int8_asym", "int8", "int-quantized"),
    ("fp8_e4m3", None, "naive-quantized"),
    ("fp8_e4m3", "fp8_e4m3", "float-quantized"),
])
def test_tensors_equal_compressed_tensors_compressor(fmt, act, ct_format):
  """Our tensors for a module == what compressed-tensors' compressor writes from the same codes."""
  from compressed_tensors.compressors import BaseCompressor
  w = jax.random.normal(jax.random.key(0), (64, 48)) * 0.05  # params layout [in, out]
  q = qj.quantize(w, fmt)
  leaf = q if act is None else ActQuantized(weight=q, act_format=QuantFormat.parse(act))
  spec = hf.TensorSpec("m.weight", ("m", "kernel"), (64, 48), "linear")
  ours, scheme, rec = hf.encode_leaf(spec, leaf, np.dtype(np.float32))
  assert scheme.format == ct_format and rec.how == "lossless"
  # compressed-tensors' inputs: the represented float weight [out, in], our scale / zero point
  state = {"weight": torch.from_numpy(np.asarray(q.dequantize(jnp.float32)).T.copy()),
           "weight_scale": torch.from_numpy(np.asarray(ours["m.weight_scale"]).copy())}
  if q.zero_point is not None:
    zp = np.asarray(q.zero_point).astype(np.int16).T
    if not q.fmt.signed:
      zp = zp - (1 << (q.fmt.bits - 1))
    state["weight_zero_point"] = torch.from_numpy(zp.reshape(
        state["weight_scale"].shape).astype(np.int8))
  comp = BaseCompressor.get_value_from_registry(ct_format)
  theirs = comp.compress(state, _ct_scheme(fmt, act))
  theirs = {f"m.{k}": v for k, v in theirs.items()}
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    a = ours[k]
    if v.dtype == torch.float8_e4m3fn:
      assert a.dtype.name == "float8_e4m3fn", k
      a, b = a.view(np.uint8), v.view(torch.uint8).numpy()
    else:
      b = v.numpy()
    assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(a, b, err_msg=k)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_tensors_equal_compressed_tensors_both_ways(fmt):
  """MXFP4 / NVFP4: compressed-tensors' compressor, given our dequantized weight and scales,
  writes our bytes; its decompression of our bytes gives our dequantized weight exactly."""
  from compressed_tensors.compressors import BaseCompressor
  from compressed_tensors.quantization import QuantizationScheme
  from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
  w = jax.random.normal(jax.random.key(1), (128, 48)) * jnp.exp(
      jax.random.normal(jax.random.key(2), (128, 1)))  # [in, out], rows of mixed magnitude
  q = qj.quantize(w * 0.02, fmt)
  spec = hf.TensorSpec("m.weight", ("m", "kernel"), (128, 48), "linear")
  ours, scheme, rec = hf.encode_leaf(spec, q, np.dtype(np.float32))
  ct_format = f"{fmt}-pack-quantized"
  assert scheme.format == ct_format and rec.how == "lossless"
  assert rec.nbytes == q.nbytes + (4 if fmt == "nvfp4" else 0)  # + the global scale
  comp = BaseCompressor.get_value_from_registry(ct_format)
  sch = QuantizationScheme(targets=["Linear"], weights=PRESET_SCHEMES[fmt.upper()]["weights"])

  def torch_of(a):
    a = np.asarray(a)
    if a.dtype.name == "float8_e4m3fn":
      return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())
  want = np.asarray(q.dequantize(jnp.float32)).T  # [out, in]
  scale = np.asarray(q.scale, np.float32).T
  state = {"weight": torch.from_numpy(want.copy()), "weight_scale": torch.from_numpy(scale.copy())}
  if fmt == "nvfp4":
    state["weight_global_scale"] = torch.ones(1)
  theirs = comp.compress(state, sch)
  for k, v in theirs.items():
    a = ours[f"m.{k}"]
    b = v.view(torch.uint8).numpy() if v.dtype == torch.float8_e4m3fn else v.numpy()
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8) if a.dtype.name ==
                                  "float8_e4m3fn" else a, b, err_msg=k)
  assert sorted(f"m.{k}" for k in theirs) == sorted(ours)
  dec = comp.decompress({k[2:]: torch_of(v) for k, v in ours.items()}, sch)["weight"]
  np.testing.assert_array_equal(dec.float().numpy(), want)


# ----------------------------------------------------------------------------
# Export -> import: the same bytes; export -> transformers: the same logits.

ROUNDTRIP = {
    "int4_g32_sym+int8": [qj.QuantRule(module_path=r".*attn/.*kernel", format="int4_g32"),
                          qj.QuantRule(module_path=r".*mlp/.*kernel", format="int8")],
    "int4_g32_asym": [qj.QuantRule(module_path=PROJ, format="int4_g32_asym")],
    "int8_asym_t": [qj.QuantRule(module_path=PROJ, format="uint8_t_asym")],
    "ternary": [qj.QuantRule(module_path=PROJ, format="ternary")],
    "w8a8_token": [qj.QuantRule(module_path=PROJ, format="int8", act_format="int8")],
    "w8a8_tensor_dyn": [qj.QuantRule(module_path=PROJ, format="int8", act_format="int8_t")],
    "fp8_w8a8": [qj.QuantRule(module_path=PROJ, format="fp8_e4m3", act_format="fp8_e4m3")],
    "fp8_weight_only": [qj.QuantRule(module_path=PROJ, format="fp8_e4m3_t")],
    "mxfp4": [qj.QuantRule(module_path=PROJ, format="mxfp4")],
    # NVFP4 is llama.cpp's type too: its GGUF blocks of 64 do not fit down_proj's 96 inputs
    "nvfp4": [qj.QuantRule(module_path=r".*(attn|gate|up).*_proj/kernel", format="nvfp4")],
}


@pytest.mark.parametrize("name", list(ROUNDTRIP))
def test_export_import_same_bytes(tiny_tied, tmp_path, name):
  cfg, params = tiny_tied
  q = _quantize(params, ROUNDTRIP[name])
  rep = hf.export_hf(tmp_path / "m", cfg, q)
  assert all(r.how in ("lossless", "float") for r in rep), rep.summary()
  cfg2, p2, _, info = hf.import_hf(tmp_path / "m", tokenizer=False)
  assert cfg2 == cfg.replace(name=cfg2.name)
  a, b = _leaves(q), _leaves(p2)
  assert sorted(a) == sorted(b)
  for path, x in a.items():
    y = b[path]
    assert type(x) is type(y), path
    if isinstance(x, ActQuantized):
      assert x.act_format == y.act_format
      x, y = x.weight, y.weight
    if isinstance(x, QArray):
      if x.fmt.kind in ("binary", "ternary"):  # written as exact 2-bit codes
        assert y.fmt.bits == 2
        np.testing.assert_array_equal(np.asarray(x.codes()), np.asarray(y.codes()))
        np.testing.assert_array_equal(np.asarray(x.scale), np.asarray(y.scale))
        continue
      assert x.fmt == y.fmt, path
      for part in ("qvalue", "scale", "zero_point"):
        u, v = getattr(x, part), getattr(y, part)
        assert (u is None) == (v is None)
        if u is not None:
          assert u.dtype == v.dtype and u.shape == v.shape, (path, part)
          np.testing.assert_array_equal(np.asarray(u).view(np.uint8),
                                        np.asarray(v).view(np.uint8), err_msg=f"{path} {part}")
      assert x.nbytes == y.nbytes
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
  np.testing.assert_array_equal(np.asarray(llama.forward(cfg, q, TOKENS)),
                                np.asarray(llama.forward(cfg2, p2, TOKENS)))


def test_static_activations_roundtrip(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  for asym in (False, True):
    q = _static(_quantize(params, [qj.QuantRule(module_path=PROJ, format="int8")]), asym=asym)
    d = tmp_path / f"static{asym}"
    rep = hf.export_hf(d, cfg, q)
    assert {r.stored for r in rep if "proj" in r.path} == {
        f"int-quantized (int8 per-channel sym, act int8 per-tensor {'asym' if asym else 'sym'})"}
    _, p2, _, _ = hf.import_hf(d)
    leaf = _leaves(p2)["layers/0/attn/q_proj/kernel"]
    assert isinstance(leaf, StaticActQuantized)
    assert np.asarray(leaf.act_scale)[0, 0] == np.float32(0.021 if asym else 0.02)
    if asym:
      assert int(leaf.act_zero_point[0, 0]) == 131
    np.testing.assert_array_equal(np.asarray(llama.forward(cfg, q, TOKENS)),
                                  np.asarray(llama.forward(cfg, p2, TOKENS)))
    ours = np.asarray(llama.forward(cfg, q, TOKENS))
    np.testing.assert_allclose(_hf_logits(d), ours, atol=2e-4)


@pytest.mark.parametrize("name,ct_kwargs,atol", [
    ("int4_g32_sym+int8", {}, 2e-4),
    # transformers' default path cannot load asymmetric pack-quantized files (compressed-tensors
    # leaves the meta model's zero point unpacked); its dequantize=True path reads them.
    ("int4_g32_asym", {"dequantize": True}, 2e-4),
    ("fp8_w8a8", {}, 2e-4),
    ("fp8_weight_only", {}, 2e-4),
    ("ternary", {}, 2e-4),
    # Compressed FP4 modules decompress to bfloat16 at each call, which a float32 model's
    # matmul refuses; run_compressed=False decompresses them once, into the model's float32.
    ("mxfp4", {"run_compressed": False}, 2e-4),
    ("nvfp4", {"run_compressed": False}, 2e-4),
])
def test_transformers_loads_export(tiny, tmp_path, name, ct_kwargs, atol):
  cfg, params = tiny
  q = _quantize(params, ROUNDTRIP[name])
  hf.export_hf(tmp_path / "m", cfg, q)
  ours = np.asarray(llama.forward(cfg, q, TOKENS))
  np.testing.assert_allclose(_hf_logits(tmp_path / "m", **ct_kwargs), ours, atol=atol)


@pytest.mark.parametrize("act", ["int8", "int8_t"])
def test_transformers_w8a8_dynamic(tiny_tied, tmp_path, monkeypatch, act):
  """Dynamic int8 activations. transformers' compressed-tensors scales by max|x| / 127.5, ours
  (and vLLM's kernels) by max|x| / 127: with its rule emulated, the JAX model on our export
  gives transformers' logits; with ours, the argmax mostly agrees."""
  from experiments.hf_interop import ct_rule_quantize_activation
  from quantjax import ops
  cfg, params = tiny_tied
  q = _quantize(params, [qj.QuantRule(module_path=PROJ, format="int8", act_format=act)])
  hf.export_hf(tmp_path / "m", cfg, q)
  theirs = _hf_logits(tmp_path / "m")
  ours = np.asarray(llama.forward(cfg, q, TOKENS))
  assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9
  if act == "int8":  # per token (the emulation is of the per-token rule)
    jax.clear_caches()
    monkeypatch.setattr(ops, "quantize_activation", ct_rule_quantize_activation)
    same_rule = np.asarray(llama.forward(cfg, q, TOKENS))
    monkeypatch.undo()
    jax.clear_caches()
    np.testing.assert_allclose(theirs, same_rule, atol=2e-4)
    assert np.abs(theirs - ours).max() > 10 * np.abs(theirs - same_rule).max()


# ----------------------------------------------------------------------------
# Checkpoints written by the PyTorch side.


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_checkpoint_from_compressed_tensors_compressor(tmp_path, symmetric):
  """A checkpoint that compressed-tensors' `ModelCompressor` writes from known integer codes
  imports as QArrays holding exactly those codes, scales and zero points."""
  from compressed_tensors.compressors import ModelCompressor
  from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                               QuantizationScheme, QuantizationStatus,
                                               apply_quantization_config)
  model = make_tiny_hf(str(tmp_path / "src"), tied=True, seed=1)
  scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
      num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32))
  apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                      ignore=["lm_head"]))
  rng = np.random.default_rng(0)
  truth = {}
  for name, m in model.named_modules():
    if isinstance(m, torch.nn.Linear) and hasattr(m, "quantization_scheme"):
      out, k = m.weight.shape
      codes = rng.integers(-8, 8, (out, k)).astype(np.int8)
      s = rng.uniform(0.01, 0.05, (out, k // 32)).astype(np.float32)
      z = (rng.integers(-8, 8, (out, k // 32)) if not symmetric else
           np.zeros((out, k // 32))).astype(np.int8)
      w = (codes.astype(np.float32) - np.repeat(z, 32, 1)) * np.repeat(s, 32, 1)
      with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        m.weight_scale.copy_(torch.from_numpy(s))
        m.weight_zero_point.copy_(torch.from_numpy(z))
      m.quantization_status = QuantizationStatus.FROZEN
      truth[name] = (codes, s, z)
  comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
  comp.compress_model(model)
  d = tmp_path / "ct"
  model.save_pretrained(d)
  comp.update_config(str(d))
  cfg, params, _, info = hf.import_hf(d, tokenizer=False)
  leaves = _leaves(params)
  for name, (codes, s, z) in truth.items():
    i = int(name.split(".")[2])
    path = f"layers/{i}/{'attn' if 'self_attn' in name else 'mlp'}/{name.split('.')[-1]}/kernel"
    q = leaves[path]
    assert isinstance(q, QArray) and q.fmt.group_size == 32 and q.fmt.bits == 4
    got = np.asarray(q.codes()).astype(np.int16).T
    if not symmetric:
      got = got - 8
      np.testing.assert_array_equal(np.asarray(q.zero_point).astype(np.int16).T - 8, z)
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_array_equal(np.asarray(q.scale).T, s)
  ours = np.asarray(llama.forward(cfg, params, TOKENS))
  np.testing.assert_allclose(_hf_logits(d, **({} if symmetric else {"dequantize": True})), ours,
                             atol=2e-4)


def test_llmcompressor_checkpoint(tmp_path):
  """The committed llm-compressor GPTQ checkpoint (experiments/llmcompressor_gptq.py --tiny):
  JAX runs its codes and matches transformers; export of the import rewrites its tensors
  byte for byte."""
  with open(os.path.join(LLMC_FIXTURE, "llmcompressor_run.json")) as f:
    run = json.load(f)
  assert run["llmcompressor"] and run["scheme"] == "W4 g32 sym"
  cfg, params, _, info = hf.import_hf(LLMC_FIXTURE, tokenizer=False)
  modules = [k for k, v in info.items() if v[1] == "qarray"]
  assert len(modules) == 7 * cfg.num_layers
  assert {info[m][0] for m in modules} == {"pack-quantized (int4 g32 sym)"}
  ours = np.asarray(llama.forward(cfg, params, TOKENS))
  np.testing.assert_allclose(_hf_logits(LLMC_FIXTURE), ours, atol=2e-4)
  rep = hf.export_hf(tmp_path / "again", cfg, params)
  assert {r.how for r in rep} == {"lossless", "float"}
  a = st.SafetensorsFile(os.path.join(LLMC_FIXTURE, "model.safetensors"))
  b = st.SafetensorsFile(tmp_path / "again" / "model.safetensors")
  assert sorted(a.keys()) == sorted(b.keys())
  for k in a.keys():
    assert a.dtype(k) == b.dtype(k), k
    np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)


# ----------------------------------------------------------------------------
# Layout: shards, tokenizer, report.


def test_sharded_export(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  q = _quantize(params, [qj.QuantRule(module_path=PROJ, format="int4_g32")])
  rep = hf.export_hf(tmp_path / "m", cfg, q, max_shard_size=20_000)
  files = sorted(os.listdir(tmp_path / "m"))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and all(f.startswith("model-0000") for f in shards)
  with open(tmp_path / "m" / hf.INDEX_FILE) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  assert index["metadata"]["total_size"] == sum(r.nbytes for r in rep)
  _, p2, _, _ = hf.import_hf(tmp_path / "m")
  ours = np.asarray(llama.forward(cfg, q, TOKENS))
  np.testing.assert_array_equal(np.asarray(llama.forward(cfg, p2, TOKENS)), ours)
  np.testing.assert_allclose(_hf_logits(tmp_path / "m"), ours, atol=2e-4)


def test_report_requantized_dequantized_and_sparse(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  q = _quantize(params, [
      qj.QuantRule(module_path=r".*q_proj/kernel", format="int4_g32_asymf"),  # float minimum
      qj.QuantRule(module_path=r".*k_proj/kernel", format="nf4_g32"),
      qj.QuantRule(module_path=r"embed/embedding", format="int8"),
  ])
  pure = rules_lib.to_pure(q)
  up = pure["layers"][0]["mlp"]["up_proj"]["kernel"]
  pure["layers"][0]["mlp"]["up_proj"]["kernel"] = qj.compress_nm(up, qj.nm_mask(up, 2, 4), 2, 4)
  rep = hf.export_hf(tmp_path / "m", cfg, pure)
  by = {r.path: r for r in rep}
  r = by["layers/0/attn/q_proj/kernel"]
  assert r.how == "re-quantized (lossy)" and "int4_g32_asym" in r.note and "asym" in r.stored
  assert by["layers/1/attn/k_proj/kernel"].how == "re-quantized (lossy)"
  assert by["embed/embedding"].how == "dequantized"
  assert "2:4 sparse" in by["layers/0/mlp/up_proj/kernel"].note
  with open(tmp_path / "m" / hf.REPORT_FILE) as f:
    assert len(json.load(f)["tensors"]) == len(rep.tensors)
  _, p2, _, _ = hf.import_hf(tmp_path / "m")
  ref = np.asarray(llama.forward(cfg, pure, TOKENS))
  got = np.asarray(llama.forward(cfg, p2, TOKENS))
  assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
  emb = _leaves(p2)["embed/embedding"]
  np.testing.assert_array_equal(np.asarray(emb), np.asarray(pure["embed"]["embedding"]))


def test_tokenizer_and_config_written(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  tok = load.load_tokenizer(load.smollm2_path())
  hf.export_hf(tmp_path / "m", cfg, params, tokenizer=tok, dtype="bfloat16")
  files = os.listdir(tmp_path / "m")
  assert "tokenizer.json" in files and "config.json" in files
  with open(tmp_path / "m" / "config.json") as f:
    c = json.load(f)
  assert c["model_type"] == "llama" and c["dtype"] == "bfloat16"
  assert "quantization_config" not in c
  tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
  text = "def f(x):\n    return x ** 2  # square"
  assert tok2(text)["input_ids"] == tok(text)["input_ids"]
  a = st.SafetensorsFile(tmp_path / "m" / "model.safetensors")
  assert a.dtype("model.layers.0.mlp.up_proj.weight").name == "bfloat16"


# ----------------------------------------------------------------------------
# Bad input.


def _export_plain(cfg, params, d, **kw):
  q = _quantize(params, [qj.QuantRule(module_path=PROJ, format="int4_g32")])
  hf.export_hf(d, cfg, q, **kw)
  return q


def _edit_config(d, fn):
  with open(os.path.join(d, "config.json")) as f:
    c = json.load(f)
  fn(c)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(c, f)


def test_unsupported_schemes_are_named(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  d = tmp_path / "m"
  _export_plain(cfg, params, d)
  cases = [
      (lambda c: c["quantization_config"].update(quant_method="gptq"), "'gptq'"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(
          format="nvfp4-pack-quantized"), "nvfp4-pack-quantized"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
          type="float", num_bits=4), "pack-quantized holds integer weights, not float"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
          type="float", num_bits=4, group_size=64), "float4 with strategy 'group' and group_size "
       "64 is not supported"),
      (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
          strategy="block", block_structure=[64, 64], group_size=None), "'block'"),
      (lambda c: c["quantization_config"].update(kv_cache_scheme={"num_bits": 8}), "kv_cache"),
      (lambda c: c.update(model_type="gpt2"), "'gpt2'"),
  ]
  for edit, match in cases:
    e = tmp_path / f"e{len(os.listdir(tmp_path))}"
    shutil.copytree(d, e)
    _edit_config(e, edit)
    with pytest.raises(hf.HFFormatError, match=match) as info:
      hf.import_hf(e)
    assert "config.json" in str(info.value)


def test_missing_shard_and_tensor_are_named(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  d = tmp_path / "m"
  _export_plain(cfg, params, d, max_shard_size=40_000)
  shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
  os.remove(d / shard)
  with pytest.raises(hf.HFFormatError, match=f"shard {shard} .* is missing"):
    hf.import_hf(d)
  d2 = tmp_path / "m2"
  _export_plain(cfg, params, d2)
  t = {k: v for k, v in _read_all(d2 / "model.safetensors").items()
       if k != "model.layers.1.mlp.down_proj.weight_scale"}
  st.write_safetensors(d2 / "model.safetensors", t, {"format": "pt"})
  with pytest.raises(hf.HFFormatError, match=r"model.layers.1.mlp.down_proj.weight_scale.*missing"):
    hf.import_hf(d2)


def _read_all(path):
  f = st.SafetensorsFile(path)
  return {k: np.array(f.get(k)) for k in f.keys()}


def test_shape_mismatch_names_file_and_tensor(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  d = tmp_path / "m"
  _export_plain(cfg, params, d)
  _edit_config(d, lambda c: c.update(intermediate_size=128))
  with pytest.raises(hf.HFFormatError,
                     match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight_"
                           r"shape is \[96, 64\], config\.json implies \[128, 64\]"):
    hf.import_hf(d)
  d2 = tmp_path / "plain"
  hf.export_hf(d2, cfg, params)
  _edit_config(d2, lambda c: c.update(hidden_size=96))
  with pytest.raises(hf.HFFormatError, match=r"model\.safetensors: tensor "
                                             r"'model\.embed_tokens\.weight' has shape \[256, 64\]"):
    hf.import_hf(d2)


def test_nvfp4_global_scale_other_than_one_and_bad_fp4_tensors(tiny_tied, tmp_path):
  """An NVFP4 checkpoint whose global scale is not 1 (llm-compressor's) imports with float32
  scales s / g, the values compressed-tensors decodes; bad FP4 tensors are named."""
  cfg, params = tiny_tied
  q = _quantize(params, ROUNDTRIP["nvfp4"])
  d = tmp_path / "m"
  hf.export_hf(d, cfg, q)
  t = _read_all(d / "model.safetensors")
  g = "model.layers.0.self_attn.q_proj.weight_global_scale"
  assert np.asarray(t[g]).tolist() == [1.0]
  t[g] = np.asarray([4.0], np.float32)
  st.write_safetensors(d / "model.safetensors", t, {"format": "pt"})
  _, p2, _, _ = hf.import_hf(d, tokenizer=False)
  a, b = _leaves(q)["layers/0/attn/q_proj/kernel"], _leaves(p2)["layers/0/attn/q_proj/kernel"]
  assert b.fmt.kind == "nvfp4" and np.dtype(b.scale.dtype) == np.float32
  np.testing.assert_array_equal(np.asarray(b.dequantize()), np.asarray(a.dequantize()) / 4)
  k = _leaves(p2)["layers/0/attn/k_proj/kernel"]  # global scale 1: E4M3 scales, the file's size
  assert np.dtype(k.scale.dtype).name == "float8_e4m3fn"
  t[g] = np.asarray([-1.0], np.float32)
  st.write_safetensors(d / "model.safetensors", t, {"format": "pt"})
  with pytest.raises(hf.HFFormatError, match=r"q_proj\.weight_global_scale must be one positive"):
    hf.import_hf(d, tokenizer=False)
  _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"]
               .update(group_size=32))
  with pytest.raises(hf.HFFormatError, match=r"float4 with strategy 'tensor_group' and "
                     r"group_size 32 is not supported"):
    hf.import_hf(d, tokenizer=False)


def test_truncated_safetensors_is_named(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  d = tmp_path / "m"
  _export_plain(cfg, params, d)
  path = d / "model.safetensors"
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(hf.HFFormatError, match=r"model\.safetensors: tensor '.*' needs data bytes "
                                             r"up to \d+ .* truncated"):
    hf.import_hf(d)
  with open(path, "r+b") as f:  # a header length past the end of the file
    f.write((size * 10).to_bytes(8, "little"))
  with pytest.raises(hf.HFFormatError, match=r"model\.safetensors: header length \d+ runs past "
                                             r"the end of the file"):
    hf.import_hf(d)


def _no_temp_left(parent):
  return [f for f in os.listdir(parent) if ".tmp-" in f or ".old-" in f] == []


def test_failed_export_leaves_nothing(tiny_tied, tmp_path, monkeypatch):
  cfg, params = tiny_tied
  pure = rules_lib.to_pure(_quantize(params, [qj.QuantRule(module_path=PROJ, format="int8")]))
  bad = jax.tree.map(lambda x: x, pure, is_leaf=lambda x: isinstance(x, QArray))
  w = bad["layers"][1]["mlp"]["down_proj"]["kernel"]
  bad["layers"][1]["mlp"]["down_proj"]["kernel"] = InputScaled(
      weight=w, scale=jnp.ones((w.shape[0], 1)))
  with pytest.raises(hf.HFFormatError, match=r"layers/1/mlp/down_proj/kernel.*fold"):
    hf.export_hf(tmp_path / "a", cfg, bad)
  assert not os.path.exists(tmp_path / "a") and _no_temp_left(tmp_path)
  # a failure while writing files (disk full, ...): nothing left either
  calls = []
  real = st.write_safetensors

  def failing(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("no space left on device")
    return real(*a, **k)
  monkeypatch.setattr(st, "write_safetensors", failing)
  with pytest.raises(OSError, match="no space"):
    hf.export_hf(tmp_path / "b", cfg, pure, max_shard_size=40_000)
  assert not os.path.exists(tmp_path / "b") and _no_temp_left(tmp_path)
  monkeypatch.setattr(st, "write_safetensors", real)
  # an existing directory is never touched
  keep = tmp_path / "keep"
  keep.mkdir()
  (keep / "mine.txt").write_text("not yours")
  with pytest.raises(FileExistsError, match="exists"):
    hf.export_hf(keep, cfg, pure)
  with pytest.raises(FileExistsError, match="not an export_hf output"):
    hf.export_hf(keep, cfg, pure, overwrite=True)
  assert os.listdir(keep) == ["mine.txt"] and (keep / "mine.txt").read_text() == "not yours"
  # an earlier export is replaced atomically with overwrite=True, and only then
  hf.export_hf(tmp_path / "c", cfg, params)
  with pytest.raises(FileExistsError):
    hf.export_hf(tmp_path / "c", cfg, pure)
  with pytest.raises(hf.HFFormatError):
    hf.export_hf(tmp_path / "c", cfg, bad, overwrite=True)
  assert "quantization_config" not in json.load(open(tmp_path / "c" / "config.json"))
  hf.export_hf(tmp_path / "c", cfg, pure, overwrite=True)
  assert "quantization_config" in json.load(open(tmp_path / "c" / "config.json"))
  assert _no_temp_left(tmp_path)


def test_refuses_what_compressed_tensors_cannot_hold(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  pure = rules_lib.to_pure(params)
  k = pure["layers"][0]["attn"]["q_proj"]["kernel"]
  for leaf, match in [
      (ActQuantized(weight=k, act_format=QuantFormat.parse("int8")), "float weight"),
      (StaticActQuantized(weight=qj.quantize(k, "int8"), act_format=QuantFormat.parse("int8"),
                          act_scale=jnp.ones((1, k.shape[0])), act_zero_point=None),
       "per input channel"),
      (ActQuantized(weight=qj.quantize(k, "int8"), act_format=QuantFormat.parse("int4")),
       "8 bits"),
  ]:
    bad = dict(pure, layers={**pure["layers"], 0: {**pure["layers"][0], "attn": {
        **pure["layers"][0]["attn"], "q_proj": {"kernel": leaf}}}})
    with pytest.raises(hf.HFFormatError, match=match):
      hf.export_hf(tmp_path / "x", cfg, bad)
    assert not os.path.exists(tmp_path / "x")


def test_top_level_api(tiny_tied, tmp_path):
  cfg, params = tiny_tied
  assert qj.export_hf is hf.export_hf and qj.import_hf is hf.import_hf
  q = _quantize(params, [qj.QuantRule(module_path=PROJ, format="int4_g32")])
  qj.export_hf(tmp_path / "m", cfg, q)
  _, p_float, _ = load.load_hf(tmp_path / "m", tokenizer=False)  # dequantized, as before
  assert not any(isinstance(x, QArray) for x in jax.tree.leaves(
      p_float, is_leaf=lambda x: isinstance(x, QArray)))
  np.testing.assert_allclose(np.asarray(llama.forward(cfg, p_float, TOKENS)),
                             np.asarray(llama.forward(cfg, q, TOKENS)), atol=1e-4)
  _, p_q, _ = load.load_hf(tmp_path / "m", tokenizer=False, quantized=True)
  assert qj.tree_bytes(p_q) == qj.tree_bytes(q)


def test_registered_architecture_plugs_in(tiny_tied, tmp_path, monkeypatch):
  """Another architecture brings its own name map and config translation as data (here: the
  Llama stored with norms as `w - 1`, as Gemma checkpoints store theirs)."""
  import dataclasses

  class ShiftedConfig(llama.LlamaConfig):
    pass

  from quantjax.io import architecture
  cfg, params = tiny_tied
  base = architecture.for_config(cfg)

  def tensors(c):
    return [dataclasses.replace(t, to_hf=lambda a: a - 1.0, from_hf=lambda a: a + 1.0)
            if t.kind == "vector" else t for t in base.hf.tensors(c)]

  def from_hf(d, name, source):
    c = llama.LlamaConfig.from_hf({**d, "model_type": "llama"}, name=name)
    return ShiftedConfig(**dataclasses.asdict(c))

  monkeypatch.setattr(architecture, "_REGISTRY", list(architecture.registered()))
  architecture.register(dataclasses.replace(
      base, name="llama_shifted", config_type=ShiftedConfig, gguf=None,
      hf=dataclasses.replace(base.hf, model_types=("llama_shifted",), tensors=tensors,
                             from_hf_config=from_hf)))
  scfg = ShiftedConfig(**dataclasses.asdict(cfg))
  q = _quantize(params, [qj.QuantRule(module_path=PROJ, format="int4_g32")])
  hf.export_hf(tmp_path / "m", scfg, q)
  with open(tmp_path / "m" / "config.json") as f:
    assert json.load(f)["model_type"] == "llama_shifted"
  stored = st.SafetensorsFile(tmp_path / "m" / "model.safetensors").get("model.norm.weight")
  np.testing.assert_allclose(stored, np.asarray(rules_lib.to_pure(params)["final_norm"]["scale"]) - 1)
  cfg2, p2, _, _ = hf.import_hf(tmp_path / "m")
  assert isinstance(cfg2, ShiftedConfig)
  np.testing.assert_array_equal(np.asarray(llama.forward(cfg2, p2, TOKENS)),
                                np.asarray(llama.forward(cfg, q, TOKENS)))


def test_export_model_for_a_runner_stage(tiny_tied, tmp_path):
  from quantjax.io import export as export_lib
  cfg, params = tiny_tied
  q = _quantize(params, [qj.QuantRule(module_path=PROJ, format="int8")])
  rec = export_lib.export_model(str(tmp_path / "m"), cfg, q, fmt="hf")
  json.dumps(rec)  # a JSON record
  assert rec["format"] == "hf" and rec["quantization_config"]["format"] == "pack-quantized"
  assert {t["how"] for t in rec["tensors"]} == {"lossless", "float"}
  assert rec["bytes"] > sum(t["nbytes"] for t in rec["tensors"])
  with pytest.raises(ValueError, match="export format"):
    export_lib.export_model(str(tmp_path / "x"), cfg, q, fmt="onnx")


def test_gemma3_export_round_trip_and_transformers(tmp_path):
  """A quantized tiny Gemma 3 written as compressed-tensors: the same bytes come back, and
  transformers' logits equal the JAX model's on the same codes."""
  import torch
  import transformers
  from quantjax.models import gemma3
  from quantjax.models import load
  from tests.models.conftest import make_tiny_gemma_hf
  src = tmp_path / "src"
  make_tiny_gemma_hf(str(src))
  cfg, params, _ = load.load_hf(str(src), tokenizer=False)
  q = _quantize(rules_lib.to_pure(params),
                [qj.QuantRule(module_path=gemma3.PROJ_KERNELS, format="int8")])
  hf.export_hf(tmp_path / "out", cfg, q)
  cfg2, q2, _, info = hf.import_hf(tmp_path / "out", tokenizer=False)
  assert isinstance(cfg2, gemma3.Gemma3Config) and cfg2.layer_types == cfg.layer_types
  for a, b in zip(jax.tree.leaves(rules_lib.to_pure(q)), jax.tree.leaves(rules_lib.to_pure(q2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
  ours = np.asarray(gemma3.forward(cfg, q, tokens))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
