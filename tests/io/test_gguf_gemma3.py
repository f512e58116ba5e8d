"""GGUF export / import of Gemma 3 on a tiny random model (llama.cpp runs are in
tests/integration/test_gemma3.py)."""

import gguf
import jax
import numpy as np
import pytest
from flax import nnx

from quantjax.io import gguf as gio
from quantjax.models import gemma3
from quantjax.models import load
from quantjax.numerics.qarray import QArray
from quantjax.rules import QuantRule
from quantjax.transforms import quantize_params
from tests.models.conftest import make_tiny_gemma_hf

# The tiny model is made by transformers (torch); llama.cpp runs one export.
pytestmark = pytest.mark.requires_extra("hf")

TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny Gemma 3 llama.cpp can represent: every sixth layer global, local RoPE base
  10,000, queries scaled by head_dim ** -0.5."""
  d = tmp_path_factory.mktemp("tiny_gemma_export")
  make_tiny_gemma_hf(str(d), seed=3, num_hidden_layers=6, layer_types=None,
                     query_pre_attn_scalar=32, final_logit_softcapping=30.0)
  cfg, params, _ = load.load_hf(str(d), tokenizer=False)
  assert cfg.layer_types == gemma3.default_layer_types(6) and cfg.head_dim == 32
  return cfg, params


def _pure(params):
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def test_float_export_round_trips_exactly(tiny, tmp_path):
  cfg, params = tiny
  path = tmp_path / "tiny-f32.gguf"
  report = gio.export_gguf(path, cfg, params, float_type="F32")
  assert {r.gguf_type for r in report} == {"F32"}
  r = gguf.GGUFReader(str(path))
  assert r.fields["general.architecture"].contents() == "gemma3"
  assert r.fields["gemma3.attention.sliding_window"].contents() == cfg.sliding_window
  assert r.fields["gemma3.attention.key_length"].contents() == 32
  assert r.fields["gemma3.final_logit_softcapping"].contents() == 30.0
  names = {t.name for t in r.tensors}
  assert {"blk.5.attn_q_norm.weight", "blk.0.post_ffw_norm.weight",
          "blk.2.post_attention_norm.weight"} <= names and "output.weight" not in names
  cfg2, params2, _ = load.load_gguf(path, tokenizer=False)
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "layer_types", "sliding_window", "rope_theta",
            "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping",
            "tie_embeddings"):
    assert getattr(cfg2, f) == getattr(cfg, f), f
  a, b = _pure(params), _pure(params2)
  for (pa, x), (pb, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                              jax.tree_util.tree_flatten_with_path(b)[0]):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(pa))
  np.testing.assert_array_equal(np.asarray(gemma3.forward(cfg2, params2, TOKENS)),
                                np.asarray(gemma3.forward(cfg, params, TOKENS)))


def test_block_types_stay_qarrays_code_for_code(tiny, tmp_path):
  cfg, params = tiny
  q = quantize_params(params, (QuantRule(module_path=r".*/(q|k|v|gate|up)_proj/kernel",
                                         format=gio.block_format("Q5_0")),
                               QuantRule(module_path=r".*/(o|down)_proj/kernel",
                                         format=gio.block_format("Q8_0")),
                               QuantRule(module_path="embed/embedding",
                                         format=gio.block_format("Q8_0", axis=1))))
  path = tmp_path / "tiny-q.gguf"
  report = gio.export_gguf(path, cfg, q)
  assert {r.how for r in report if r.gguf_type in ("Q5_0", "Q8_0")} == {"lossless"}
  cfg2, q2, _, info = gio.import_gguf(path, tokenizer=False)
  assert info["token_embd.weight"] == ("Q8_0", "qarray")
  assert info["blk.3.attn_k.weight"] == ("Q5_0", "qarray")
  emb = _pure(q2)["embed"]["embedding"]
  assert isinstance(emb, QArray) and emb.shape == (256, 64)
  np.testing.assert_array_equal(np.asarray(gemma3.forward(cfg2, q2, TOKENS)),
                                np.asarray(gemma3.forward(cfg, q, TOKENS)))
  # The float loader reads the same values.
  _, f2, _ = load.load_gguf(path, tokenizer=False)
  np.testing.assert_allclose(np.asarray(gemma3.forward(cfg2, f2, TOKENS)),
                             np.asarray(gemma3.forward(cfg, q, TOKENS)), atol=1e-5)


def test_configs_llama_cpp_cannot_run_are_refused(tiny, tmp_path):
  cfg, params = tiny
  for kw, field in ((dict(query_pre_attn_scalar=24.0), "query_pre_attn_scalar"),
                    (dict(rope_local_theta=5e4), "rope_local_theta"),
                    (dict(layer_types=("full_attention",) * 6), "layer_types"),
                    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping")):
    with pytest.raises(gio.GGUFError, match=field):
      gio.export_gguf(tmp_path / "x.gguf", cfg.replace(**kw), params)
  assert not list(tmp_path.iterdir())


def _rewrite(src, dst, *, drop=(), set_kv=None):
  """Copies a GGUF, leaving out tensors `drop` and overriding integer metadata `set_kv`."""
  r = gguf.GGUFReader(str(src))
  w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
  set_kv = dict(set_kv or {})
  for key, field in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    types = list(field.types)
    value = set_kv.pop(key, field.contents())
    if types[0] == gguf.GGUFValueType.ARRAY:
      w.add_key_value(key, value, types[0], sub_type=types[-1])
    else:
      w.add_key_value(key, value, types[0])
  for key, value in set_kv.items():
    w.add_uint32(key, value)
  for t in r.tensors:
    if t.name in drop:
      continue
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    w.add_tensor(t.name, np.asarray(t.data).reshape(shape))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_bad_files_are_named(tiny, tmp_path):
  cfg, params = tiny
  good = tmp_path / "good.gguf"
  gio.export_gguf(good, cfg, params, float_type="F32")
  miss = tmp_path / "missing.gguf"
  _rewrite(good, miss, drop=("blk.4.attn_k_norm.weight",))
  for fn in (lambda: load.load_gguf(miss, tokenizer=False),
             lambda: gio.import_gguf(miss, tokenizer=False)):
    with pytest.raises(gio.GGUFError, match=r"missing\.gguf: missing tensor.*"
                                            r"blk\.4\.attn_k_norm\.weight"):
      fn()
  head = tmp_path / "head.gguf"
  _rewrite(good, head, set_kv={"gemma3.attention.key_length": 16,
                               "gemma3.attention.value_length": 16})
  with pytest.raises(gio.GGUFError, match=r"head\.gguf: inconsistent head dimension: tensor "
                                          r"'blk\.0\.attn_q\.weight'.*key_length \(16\)"):
    load.load_gguf(head, tokenizer=False)
  kv = tmp_path / "kv.gguf"
  _rewrite(good, kv, set_kv={"gemma3.attention.value_length": 64})
  with pytest.raises(gio.GGUFError, match=r"kv\.gguf: inconsistent head dimension: "
                                          r"gemma3\.attention\.key_length=32 but "
                                          r"gemma3\.attention\.value_length=64"):
    load.load_gguf(kv, tokenizer=False)


def test_llama_cpp_runs_a_tiny_export_like_jax(tmp_path):
  """A tiny random Gemma 3 with the real tokenizer's vocabulary (262,144), written as an
  F32 gemma3 GGUF: llama.cpp's logits equal the JAX model's, sliding window included."""
  from quantjax.eval import llamacpp
  assert llamacpp.available(), "llama-cpp-python is missing: `make install` installs it"
  d = tmp_path / "hf"
  make_tiny_gemma_hf(str(d), seed=5, vocab_size=262144, num_hidden_layers=6, layer_types=None,
                     query_pre_attn_scalar=32, sliding_window=8)
  cfg, params, _ = load.load_hf(str(d), tokenizer=False)
  path = tmp_path / "tiny-gemma3.gguf"
  gio.export_gguf(path, cfg, params, tokenizer=load.gemma3_path(), float_type="F32")
  tokens = np.random.default_rng(1).integers(3, 262144, size=(1, 40)).astype(np.int32)
  tokens[0, 0] = 2
  ours = np.asarray(gemma3.forward(cfg, params, tokens))[0]
  with llamacpp.open_model(path, n_ctx=64) as llm:
    llm.eval([int(t) for t in tokens[0]])
    theirs = np.asarray(llm.scores[:40], np.float32)
  rel = np.abs(ours - theirs).max() / np.abs(ours).max()
  # llama.cpp keeps the KV cache in F16 and tabulates GELU in F16: ~1e-3, not 1e-6.
  allg = np.asarray(gemma3.forward(cfg.replace(sliding_window=None), params, tokens))[0]
  rel_g = np.abs(allg - theirs).max() / np.abs(ours).max()
  print(f"tiny gemma3: max |llama.cpp - JAX| / max |logit| = {rel:.2e} "
        f"(JAX with every layer global: {rel_g:.2e})")
  assert rel < 5e-3
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95
  # With every layer global the JAX logits move away from llama.cpp's: the window is honoured.
  assert rel_g > 10 * rel
