"""Tiny random Llama checkpoints saved by transformers, shared by the model tests."""

import numpy as np
import pytest


def make_tiny_hf(directory, *, tied: bool, seed: int = 0, num_kv_heads: int = 2):
  """Saves a random transformers Llama (GQA) to `directory`; returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=128,
      rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
      bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(cfg).eval()
  # Non-trivial norm scales so that a wrong norm mapping shows up.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return model


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny_hf(request, tmp_path_factory):
  """(directory, torch model, tied) for a tied and an untied tiny Llama."""
  tied = request.param
  d = tmp_path_factory.mktemp("tiny_tied" if tied else "tiny_untied")
  model = make_tiny_hf(str(d), tied=tied)
  return str(d), model, tied


@pytest.fixture(scope="session")
def tiny_tokens():
  return np.random.default_rng(0).integers(0, 256, size=(2, 40)).astype(np.int32)


def _permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf permutation of Q/K rows ([out, in])."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_tiny_gguf(path, torch_model, *, qtype="Q8_0", arch="llama"):
  """Writes `torch_model` (a transformers Llama) as a GGUF like llama.cpp's converter.

  Matrices are stored as `qtype` (F32, F16, Q8_0, Q4_0, Q4_1); norms as F32.
  Returns {gguf tensor name: float32 array as stored, i.e. dequantized by gguf-py}.
  """
  import gguf
  from gguf import GGMLQuantizationType as T
  cfg = torch_model.config
  sd = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(float(cfg.rope_theta if hasattr(cfg, "rope_theta") and cfg.rope_theta
                             else cfg.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(cfg.vocab_size)
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  stored = {}
  for k, v in sd.items():
    if k == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if k in names:
      name = names[k]
    else:
      parts = k.split(".")
      name = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.weight"
    if name.endswith("attn_q.weight"):
      v = _permute(v, cfg.num_attention_heads)
    elif name.endswith("attn_k.weight"):
      v = _permute(v, cfg.num_key_value_heads)
    v = np.ascontiguousarray(v, np.float32)
    if v.ndim == 1 or qtype == "F32":
      w.add_tensor(name, v)
      stored[name] = v
    elif qtype == "F16":
      w.add_tensor(name, v.astype(np.float16))
      stored[name] = v.astype(np.float16).astype(np.float32)
    else:
      qt = getattr(T, qtype)
      raw = gguf.quants.quantize(v, qt)
      w.add_tensor(name, raw, raw_dtype=qt)
      stored[name] = gguf.quants.dequantize(raw, qt).astype(np.float32).reshape(v.shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


# ----------------------------------------------------------------------------
# Gemma 3.


GEMMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=24,
                  rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention",
                               "sliding_attention"],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 1e4}})


def make_tiny_gemma_hf(directory, *, seed: int = 0, **overrides):
  """Saves a random transformers `Gemma3ForCausalLM` to `directory`; returns it.

  Defaults: tied, grouped-query (4 query / 2 key-value heads of 32, wider than
  hidden / heads), a sliding window of 8 (shorter than the test sequences),
  a query scale 24 ** -0.5 that is not head_dim's, and random norm weights.
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = dict(GEMMA_TINY, tie_word_embeddings=True)
  kw.update(overrides)
  cfg = transformers.Gemma3TextConfig(**kw)
  model = transformers.Gemma3ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(0.3 * torch.randn_like(p))  # transformers multiplies by (1 + w)
      elif "embed" in name:
        p.copy_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return model


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory):
  """(directory, torch model) of the default tiny Gemma 3."""
  d = tmp_path_factory.mktemp("tiny_gemma")
  return str(d), make_tiny_gemma_hf(str(d))
