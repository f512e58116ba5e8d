"""quantjax.models.gemma3 against transformers' Gemma3ForCausalLM on tiny random configs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quantjax.models import decoder, gemma3
from quantjax.models import load
from tests.models.conftest import make_tiny_gemma_hf


def _torch_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def tokens():
  # 40 positions: five times the sliding window of 8.
  return np.random.default_rng(0).integers(0, 256, size=(2, 40)).astype(np.int32)


VARIANTS = {
    # tied, GQA 4/2, window 8 < 40, query scale 24 ** -0.5 (not head_dim's)
    "tied_gqa": {},
    # untied head, multi-head attention, a window of 5, every other layer global
    "untied_mha": dict(tie_word_embeddings=False, num_key_value_heads=4, sliding_window=5,
                       layer_types=["sliding_attention", "full_attention"] * 2),
    # attention and final soft-capping, linear RoPE scaling on global layers, 1 kv head
    "softcap_rope_scaling": dict(
        num_key_value_heads=1, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
        attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  model = make_tiny_gemma_hf(str(d), seed=1, **VARIANTS[request.param])
  return request.param, str(d), model


def test_logits_match_transformers(variant, tokens):
  name, directory, torch_model = variant
  cfg, params, _ = load.load_hf(directory)
  assert isinstance(cfg, gemma3.Gemma3Config)
  hf = torch_model.config
  assert cfg.tie_embeddings == hf.tie_word_embeddings
  assert cfg.layer_types == tuple(hf.layer_types)
  assert cfg.sliding_window < tokens.shape[1]
  if name == "softcap_rope_scaling":
    assert cfg.rope_scaling_factor == 4.0 and cfg.final_logit_softcapping == 2.0
  paths = {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}
  assert ("lm_head/kernel" in paths) == (not cfg.tie_embeddings)
  ours = np.asarray(gemma3.forward(cfg, params, tokens))
  ref = _torch_logits(torch_model, tokens)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The sliding window matters here: with every layer global the logits differ.
  all_global = cfg.replace(layer_types=(gemma3.GLOBAL,) * cfg.num_layers)
  assert np.abs(np.asarray(gemma3.forward(all_global, params, tokens)) - ref).max() > 1e-2
  # Stateful model, pure-dict params and the functional forward agree.
  model = gemma3.model_from_params(cfg, params)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), ours, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(gemma3.forward(cfg, nnx.to_pure_dict(params), tokens)), ours, atol=1e-6)
  if name == "softcap_rope_scaling":
    # transformers' Gemma 3 ignores attn_logit_softcapping; so does the loader. Applied
    # when set, it matches transformers' eager attention given the same cap.
    assert cfg.attn_logit_softcapping is None
    import torch
    with torch.no_grad():
      capped = torch_model(torch.as_tensor(tokens, dtype=torch.long), softcap=3.0).logits.numpy()
    ours_capped = np.asarray(gemma3.forward(cfg.replace(attn_logit_softcapping=3.0), params,
                                            tokens))
    assert np.abs(capped - ref).max() > 0.05
    np.testing.assert_allclose(ours_capped, capped, atol=1e-4, rtol=0)


def test_norms_embedding_scale_and_paths(tiny_gemma):
  directory, torch_model = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  pure = nnx.to_pure_dict(params)
  w = torch_model.model.layers[1].post_feedforward_layernorm.weight.detach().numpy()
  # quantjax stores Gemma's (1 + w) multiplier.
  np.testing.assert_array_equal(np.asarray(pure["layers"][1]["post_mlp_norm"]["scale"]),
                                np.float32(1) + w)
  for want in ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm"):
    assert want in pure["layers"][0]
  assert set(pure["layers"][0]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
                                            "k_norm"}
  # The sqrt(d) embedding factor is rounded to the table's dtype: 25.25 in bf16 for d = 640.
  emb = decoder.Embed(4, 640, scale=True, rngs=nnx.Rngs(0))
  emb.embedding.set_value(jnp.ones((4, 640), jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(emb(jnp.array([1]), jnp.float32))[0, :2], [25.25] * 2)
  emb.embedding.set_value(jnp.ones((4, 640), jnp.float32))
  assert float(emb(jnp.array([1]), jnp.float32)[0, 0]) == np.float32(np.sqrt(640.0))


def test_kv_cache_honours_the_sliding_window(tiny_gemma, tokens):
  directory, _ = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  assert cfg.sliding_window == 8
  prompt = tokens[:, :11]  # longer than the window
  cache = gemma3.init_cache(cfg, 2, 40)
  # Sliding layers keep a ring of `window` slots; global layers every position.
  assert cache.k_local.shape == (3, 2, 8, cfg.num_kv_heads, cfg.head_dim)
  assert cache.k_global.shape == (1, 2, 40, cfg.num_kv_heads, cfg.head_dim)
  full = np.asarray(gemma3.forward(cfg, params, tokens[:, :40]))
  logits, cache = gemma3.step(cfg, params, prompt, cache, 0)
  np.testing.assert_allclose(np.asarray(logits), full[:, 10], atol=1e-4)
  # Feed the true tokens one (then three) at a time: every step's logits equal the full forward.
  pos = 11
  for n in (1,) * 12 + (3,) * 5 + (2,):
    logits, cache = gemma3.step(cfg, params, tokens[:, pos:pos + n], cache, pos)
    pos += n
    np.testing.assert_allclose(np.asarray(logits), full[:, pos - 1], atol=1e-4, err_msg=str(pos))
  assert pos == 40
  np.testing.assert_array_equal(np.sort(np.asarray(cache.local_pos)), np.arange(32, 40))
  # Greedy decoding equals the argmax of the uncached forward on its own output.
  out = gemma3.generate(cfg, params, prompt, 20)
  assert out.shape == (2, 31)
  np.testing.assert_array_equal(out[:, :11], prompt)
  ref = np.asarray(gemma3.forward(cfg, params, out[:, :-1]))
  np.testing.assert_array_equal(ref[:, 10:].argmax(-1), out[:, 11:])


def test_generate_matches_transformers(tiny_gemma, tokens):
  import torch
  directory, torch_model = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  prompt = tokens[:1, :12]
  ours = gemma3.generate(cfg, params, prompt, 16)
  with torch.no_grad():
    ref = torch_model.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=16,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours[0], ref[0].numpy())
  a = gemma3.generate(cfg, params, prompt[0], 5, temperature=0.9, top_k=10, seed=3)
  np.testing.assert_array_equal(a, gemma3.generate(cfg, params, prompt[0], 5, temperature=0.9,
                                                   top_k=10, seed=3))
  stop = int(ours[0, 12])
  assert gemma3.generate(cfg, params, prompt, 6, eos_token_id=stop).shape == (1, 13)


def test_qarray_weights_under_jit(tiny_gemma, tokens):
  from quantjax.numerics.qarray import QArray
  from quantjax.rules import QuantRule
  from quantjax.transforms import dequantize_params, quantize_params
  directory, _ = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  from quantjax.numerics.formats import QuantFormat
  emb_fmt = QuantFormat.parse("int8_g32").replace(channel_axis=0, group_axis=1)
  rules = (QuantRule(module_path=gemma3.PROJ_KERNELS, format="int4_g32"),
           QuantRule(module_path="embed/embedding", format=emb_fmt))
  qparams = quantize_params(params, rules)
  leaves = jax.tree_util.tree_leaves(qparams, is_leaf=lambda x: isinstance(x, QArray))
  assert sum(isinstance(x, QArray) for x in leaves) == 7 * cfg.num_layers + 1
  q = np.asarray(gemma3.forward(cfg, qparams, tokens))
  d = np.asarray(gemma3.forward(cfg, dequantize_params(qparams), tokens))
  np.testing.assert_allclose(q, d, atol=1e-5)
  f = np.asarray(gemma3.forward(cfg, params, tokens))
  assert np.abs(q - f).max() > 1e-3  # quantization changed the model
  # The chunked NLL sees QArrays too and equals the NLL of the logits.
  nll = np.asarray(gemma3.token_nll(cfg, qparams, tokens, rows=7))
  lse = jax.nn.logsumexp(q[:, :-1], axis=-1)
  want = np.asarray(lse) - np.take_along_axis(q[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(nll, want, atol=1e-5)
  assert gemma3.generate(cfg, qparams, tokens[:, :4], 3).shape == (2, 7)


def test_bf16_activations_and_weights(tiny_gemma, tokens):
  directory, _ = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  f32 = np.asarray(gemma3.forward(cfg, params, tokens))
  bf = np.asarray(gemma3.forward(cfg.replace(dtype="bfloat16"), params, tokens))
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  w16 = np.asarray(gemma3.forward(cfg.replace(dtype="bfloat16"), p16, tokens))
  for x in (bf, w16):
    assert x.dtype == np.float32
    assert 0 < np.abs(x - f32).max() < 0.1 * np.abs(f32).max()


def test_sharded_like_the_llama(tiny_gemma, tokens):
  from quantjax import distributed as dist
  from quantjax.rules import QuantRule, to_pure
  from quantjax.transforms import quantize_params
  directory, _ = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  mesh = dist.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ref = np.asarray(gemma3.forward(cfg, params, tokens))
  for p in (params, quantize_params(params, (QuantRule(module_path=gemma3.PROJ_KERNELS,
                                                        format="int8_g16"),))):
    sharded = dist.shard_params(to_pure(p), mesh, dist.LLAMA_PARTITION_RULES)
    q = sharded["layers"][0]["attn"]["q_proj"]["kernel"]
    spec = (q.qvalue if hasattr(q, "qvalue") else q).sharding.spec
    assert tuple(spec) == ("fsdp", "tensor")
    out = gemma3.forward(cfg, sharded, dist.shard_batch(jnp.asarray(tokens), mesh))
    tol = 1e-5 if p is params else 0.1 * np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(out), ref, atol=tol)


def test_folds_in_the_table_are_exact(tmp_path, tokens):
  """Every fold group: scale the consumers' inputs, fold into the producer, same model."""
  from quantjax import methods
  from quantjax.numerics.qarray import InputScaled
  from quantjax.rules import map_with_paths, to_pure
  make_tiny_gemma_hf(str(tmp_path), seed=2, num_key_value_heads=4)
  cfg, params, _ = load.load_hf(str(tmp_path), tokenizer=False)
  groups = gemma3.fold_groups(cfg)
  assert any(g.prev.endswith("v_proj/kernel") for g in groups)  # MHA: v -> o folds too
  rng = np.random.default_rng(0)
  scales = {}  # one scale vector per group, shared by its consumers

  def scaled(path, x):
    for g in groups:
      if path in g.consumers:
        if g.prev not in scales:
          scales[g.prev] = jnp.asarray(np.exp(rng.normal(size=(x.shape[0], 1))), jnp.float32)
        s = scales[g.prev]
        return InputScaled(weight=x * s, scale=s)
    return x
  wrapped = map_with_paths(scaled, to_pure(params))
  ref = np.asarray(gemma3.forward(cfg, params, tokens))
  np.testing.assert_allclose(np.asarray(gemma3.forward(cfg, wrapped, tokens)), ref, rtol=1e-4,
                             atol=1e-4)
  folded, left = methods.fold_input_scales(wrapped, groups, strict=True)
  assert left == []
  np.testing.assert_allclose(np.asarray(gemma3.forward(cfg, folded, tokens)), ref, rtol=1e-4,
                             atol=1e-4)
  # GQA: v -> o is not in the table (one v head feeds several o inputs).
  gqa = cfg.replace(num_kv_heads=2)
  assert not any(g.prev.endswith("v_proj/kernel") for g in gemma3.fold_groups(gqa))
  assert "o_proj" not in gemma3.foldable(gqa) and "down_proj" in gemma3.foldable(gqa)


def test_gptq_and_awq_through_the_generic_calibration(tmp_path):
  """GPTQ and AWQ (with its fold) on a tiny Gemma through `methods.calibrate` alone."""
  from quantjax import methods
  from quantjax.numerics.qarray import QArray
  from quantjax.rules import QuantRule, tree_leaves_with_paths
  make_tiny_gemma_hf(str(tmp_path), seed=4, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
  cfg, params, _ = load.load_hf(str(tmp_path), tokenizer=False)
  rng = np.random.default_rng(5)
  # A few outlier channels in the pre-norms, as trained models have: uneven inputs.
  pure = nnx.to_pure_dict(params)
  for layer in pure["layers"].values():
    for norm in ("input_norm", "pre_mlp_norm"):
      s = np.array(layer[norm]["scale"])
      s[rng.choice(s.shape[0], 4, replace=False)] *= 8.0
      layer[norm]["scale"] = jnp.asarray(s)
  params = pure
  batches = [rng.integers(0, 256, size=(4, 32)).astype(np.int32) for _ in range(4)]
  held = rng.integers(0, 256, size=(4, 32)).astype(np.int32)
  fn = gemma3.forward_fn(cfg)
  ref = np.asarray(fn(params, held))

  def err(p):
    return float(np.mean((np.asarray(fn(p, held)) - ref) ** 2))

  rules = (QuantRule(module_path=gemma3.PROJ_KERNELS, format="int3_g32"),
           QuantRule(module_path=".*", skip=True))
  rtn = methods.calibrate(fn, params, batches, rules, methods.RTN(), progress=False)
  gptq = methods.calibrate(fn, params, batches, rules, methods.GPTQ(), progress=False)
  qs = [p for p, x in tree_leaves_with_paths(gptq.params) if isinstance(x, QArray)]
  assert len(qs) == 7 * cfg.num_layers
  e_rtn, e_gptq = err(rtn.params), err(gptq.params)
  print(f"tiny Gemma 3, int3_g32 output MSE: RTN {e_rtn:.4g}, GPTQ {e_gptq:.4g}")
  assert e_gptq < 0.8 * e_rtn
  awq = methods.calibrate(fn, params, batches, rules, methods.AWQ(grid=8), progress=False)
  folded, left = methods.fold_input_scales(awq.params, gemma3.fold_groups(cfg))
  assert set(left) <= {f"layers/{i}/attn/o_proj/kernel" for i in range(cfg.num_layers)}
  np.testing.assert_allclose(np.asarray(fn(folded, held)), np.asarray(fn(awq.params, held)),
                             rtol=1e-3, atol=1e-3 * np.abs(ref).max())
  assert err(awq.params) < e_rtn


def test_loss_fn_and_fisher(tiny_gemma, tokens):
  from quantjax.methods import mixed
  directory, _ = tiny_gemma
  cfg, params, _ = load.load_hf(directory, tokenizer=False)
  pure = nnx.to_pure_dict(params)
  logits = np.asarray(gemma3.forward(cfg, pure, tokens), np.float64)[:, :-1]
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  want = np.mean(lse - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0])
  np.testing.assert_allclose(float(gemma3.loss_fn(cfg, rows=13)(pure, tokens)), want, rtol=1e-5)
  fisher = mixed.fisher_diagonal(gemma3.loss_fn(cfg), pure, [tokens[:1], tokens[1:]],
                                 gemma3.PROJ_KERNELS)
  assert len(fisher) == 7 * cfg.num_layers and all(f.any() for f in fisher.values())


def test_no_gemma_code_in_methods_sparsity_eval():
  """No identifier (import, name, attribute) in methods/, sparsity/, eval/ mentions Gemma:
  the model is reached only through the functions it is given (docs may name it)."""
  import io
  import pathlib
  import tokenize
  root = pathlib.Path(__file__).resolve().parents[2] / "quantjax"
  files = [f for d in ("methods", "sparsity", "eval") for f in (root / d).glob("*.py")]
  bad = []
  for f in files:
    for tok in tokenize.generate_tokens(io.StringIO(f.read_text()).readline):
      if tok.type == tokenize.NAME and "gemma" in tok.string.lower():
        bad.append(f"{f.name}:{tok.start[0]}: {tok.string}")
  assert len(files) > 15 and not bad, bad


def test_config_errors(tiny_gemma, tmp_path):
  base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
              num_kv_heads=1, head_dim=4)
  with pytest.raises(ValueError, match="num_kv_heads"):
    gemma3.Gemma3Config(**dict(base, num_heads=3, num_kv_heads=2))
  with pytest.raises(ValueError, match="head_dim=5 is odd"):
    gemma3.Gemma3Config(**dict(base, head_dim=5))
  with pytest.raises(ValueError, match="layer_types has 1 entries"):
    gemma3.Gemma3Config(**dict(base, layer_types=("full_attention",)))
  with pytest.raises(ValueError, match="'gemma3_text'"):
    gemma3.Gemma3Config.from_hf({"model_type": "gemma2"})
  with pytest.raises(ValueError, match="'relu'"):
    gemma3.Gemma3Config.from_hf({"model_type": "gemma3_text", "hidden_activation": "relu"})
  # A config.json whose head_dim the weights contradict: the file and the field are named.
  directory, _ = tiny_gemma
  bad = tmp_path / "bad_head_dim"
  shutil.copytree(directory, bad)
  with open(bad / "config.json") as f:
    c = json.load(f)
  c["head_dim"] = 16
  with open(bad / "config.json", "w") as f:
    json.dump(c, f)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor .*q_proj.* config\.json "
                                       r"implies .*check .*head_dim in config\.json"):
    load.load_hf(str(bad), tokenizer=False)
  c["head_dim"] = 15
  with open(bad / "config.json", "w") as f:
    json.dump(c, f)
  with pytest.raises(ValueError, match=r"config\.json: head_dim=15"):
    load.load_hf(str(bad), tokenizer=False)
  # A missing tensor.
  from safetensors.numpy import load_file, save_file
  miss = tmp_path / "missing"
  shutil.copytree(directory, miss)
  st = [f for f in os.listdir(miss) if f.endswith(".safetensors")][0]
  tensors = load_file(str(miss / st))
  del tensors["model.layers.2.self_attn.k_norm.weight"]
  save_file(tensors, str(miss / st), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing.*k_norm"):
    load.load_hf(str(miss), tokenizer=False)
