"""Layer-by-layer Wanda / SparseGPT on a tiny random Llama."""

import numpy as np
import pytest

from quantjax.models import llama
from quantjax.rules import PruneRule
from quantjax.sparsity import layerwise
from tests.methods.conftest import make_tiny

RULES = {"50%": (PruneRule(module_path=r"layers/\d+/(attn|mlp)/.*_proj/kernel", sparsity=0.5),),
         "2:4": (PruneRule(module_path=r"layers/\d+/(attn|mlp)/.*_proj/kernel", n=2, m=4),)}


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_calibrated_pruning_beats_magnitude(pattern):
  cfg, pure = make_tiny(seed=3)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(16, 32)).astype(np.int32)
  held_out = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(4, 32)).astype(np.int32)
  ref = np.asarray(llama.forward(cfg, pure, held_out))
  err = {}
  for method in layerwise.METHODS:
    pruned, masks = layerwise.prune_sequential(cfg, pure, tokens, method, RULES[pattern],
                                               batch_size=8, progress=False)
    assert len(masks) == 7 * cfg.num_layers
    for path, m in masks.items():
      m = np.asarray(m)
      if pattern == "2:4":
        assert np.all(m.reshape(-1, 4, m.shape[1]).sum(1) == 2), path
      else:
        assert abs(m.mean() - 0.5) < 0.02, path
    w = np.asarray(pruned["layers"][1]["mlp"]["up_proj"]["kernel"])
    assert np.all(w[~np.asarray(masks["layers/1/mlp/up_proj/kernel"])] == 0)
    err[method] = float(np.linalg.norm(np.asarray(llama.forward(cfg, pruned, held_out)) - ref))
  print(pattern, err)
  assert err["wanda"] < err["magnitude"] and err["sparsegpt"] < err["magnitude"]


def test_unknown_method():
  cfg, pure = make_tiny()
  with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
    layerwise.prune_sequential(cfg, pure, np.zeros((2, 8), np.int32), "obs", RULES["2:4"])
