"""GGUF tensors dequantized to float32 (`quantjax.io.gguf_dequant`), Q/K permutation undone."""

import types

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantjax.io import gguf_dequant
from quantjax.io.gguf_read import GGUFError


@pytest.mark.parametrize("qtype,ours", [
    (T.Q8_0, gguf_dequant.dequantize_q8_0),
    (T.Q4_0, gguf_dequant.dequantize_q4_0),
    (T.Q4_1, gguf_dequant.dequantize_q4_1),
])
def test_block_dequantizers_match_gguf_py(qtype, ours, rng):
  x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 3.0, (6, 1))).astype(np.float32)
  x[0, :32] += 5.0  # a block with an offset (Q4_1's minimum)
  raw = gguf.quants.quantize(x, qtype)
  ref = gguf.quants.dequantize(raw, qtype)
  got = ours(raw)
  assert got.shape == x.shape
  np.testing.assert_array_equal(got, ref)
  # and the round trip is close to the input (the dequantizer is not a no-op)
  tol = 0.02 if qtype == T.Q8_0 else 0.5
  assert np.abs(got - x).max() < tol * np.abs(x).max()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_k_quants_via_gguf_py(qtype, rng):
  # gguf-py cannot quantize k-quants; feed random blocks with sane fp16 scales.
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, size=(3, size * 2), dtype=np.uint8)
  blocks = raw.reshape(-1, size)
  # Q4_K starts with fp16 d, dmin; Q6_K ends with fp16 d: make them finite.
  half = np.array([0.01], np.float16).view(np.uint8)
  if qtype == T.Q4_K:
    blocks[:, 0:2] = half
    blocks[:, 2:4] = half
  else:
    blocks[:, -2:] = half
  t = types.SimpleNamespace(name="w", tensor_type=qtype, data=raw,
                            shape=np.array([block * 2, 3]))
  got = gguf_dequant.dequantize_gguf_tensor(t)
  assert got.shape == (3, block * 2) and got.dtype == np.float32
  np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype).reshape(3, -1))
  assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_unsupported_tensor_type_is_named():
  t = types.SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=T.IQ2_XXS,
                            data=np.zeros((1, 66), np.uint8), shape=np.array([256, 1]))
  with pytest.raises(GGUFError, match="IQ2_XXS.*blk.0.attn_q.weight"):
    gguf_dequant.dequantize_gguf_tensor(t)


def test_unpermute_inverts_llama_cpp_permutation(rng):
  from tests.models.conftest import _permute
  w = rng.standard_normal((12, 5)).astype(np.float32)
  for heads in (1, 2, 3):
    np.testing.assert_array_equal(gguf_dequant.unpermute_qk(_permute(w, heads), heads), w)
  assert not np.array_equal(_permute(w, 2), w)
