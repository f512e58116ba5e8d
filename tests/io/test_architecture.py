"""The architecture records and their registry (`quantjax.io.architecture`)."""

import pytest

from quantjax.io import architecture
from quantjax.models import gemma3, llama


def test_model_modules_register_their_records():
  assert architecture.for_model_type("smollm") is llama.ARCHITECTURE
  assert architecture.for_model_type("gemma3_text") is gemma3.ARCHITECTURE
  assert architecture.for_gguf("llama") is llama.ARCHITECTURE
  assert architecture.for_gguf("gemma3") is gemma3.ARCHITECTURE
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)
  assert architecture.for_config(cfg) is llama.ARCHITECTURE
  with pytest.raises(architecture.UnknownArchitecture, match="'gemma3'.*registered"):
    architecture.for_model_type("gemma3")  # the multimodal model_type: not a text decoder
  with pytest.raises(architecture.UnknownArchitecture, match="'qwen2'.*'llama', 'gemma3'"):
    architecture.for_gguf("qwen2")
  with pytest.raises(architecture.UnknownArchitecture, match="int"):
    architecture.for_config(3)


def test_gguf_table_names_every_tensor_and_the_permuted_ones():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
  table = llama.ARCHITECTURE.gguf.table(cfg)
  names = [g for g, *_ in table]
  assert "output.weight" not in names and len(names) == 2 + 2 * 9
  heads = {g: h for g, _, h, _ in table if h is not None}
  assert heads == {"blk.0.attn_q.weight": 4, "blk.0.attn_k.weight": 2,
                   "blk.1.attn_q.weight": 4, "blk.1.attn_k.weight": 2}
  assert dict((g, a) for g, _, _, a in table)["token_embd.weight"] == 1
  gcfg = gemma3.Gemma3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  assert all(h is None for _, _, h, _ in gemma3.ARCHITECTURE.gguf.table(gcfg))
