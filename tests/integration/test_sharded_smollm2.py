"""SmolLM2-135M on 8 forced CPU devices: sharded RTN and perplexity equal one device."""

import jax
import numpy as np
import pytest

import quantjax as qj
from quantjax import distributed as dist
from quantjax.eval import data as data_lib
from quantjax.eval import perplexity as ppl
from quantjax.models import llama
from quantjax.rules import to_pure

# group 32: SmolLM2's widths (576 = 18 x 32, 1536 = 48 x 32) split into 2 shards at group
# boundaries; group 64 gives 9 groups along 576, which no even mesh axis can split.
RULES = [qj.QuantRule(module_path=r"layers/\d+/(attn|mlp)/\w+_proj/kernel", format="int4_g32_asym")]


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return dist.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})


def test_sharded_rtn_and_perplexity_match_single_device(smollm2, mesh):
  cfg, params, tok = smollm2
  pure = to_pure(params)
  single = qj.quantize_params(pure, RULES)
  sharded = dist.quantize_params_sharded(pure, RULES, mesh)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  up = sharded["layers"][0]["mlp"]["up_proj"]["kernel"]
  per_dev = dist.device_bytes(up.qvalue)
  print(f"layers/0/mlp/up_proj codes: {up.qvalue.nbytes:,} B; per device "
        f"{sorted(set(per_dev.values()))} B on {len(per_dev)} devices")
  assert max(per_dev.values()) == up.qvalue.nbytes // 2  # tensor=2 splits, data replicates

  split = data_lib.load_split(tok, protocol=data_lib.Protocol(eval_tokens=2048, window=512,
                                                              calib_windows=0))
  forward = llama.forward_fn(cfg)
  one = ppl.evaluate(forward, single, split, batch_size=4, progress=False)
  placed = dist.shard_params(sharded, mesh, dist.LLAMA_PARTITION_RULES)
  many = ppl.evaluate(dist.batch_sharded(forward, mesh), placed, split, batch_size=4,
                      progress=False)
  print(f"perplexity single {one['perplexity']:.6f} sharded {many['perplexity']:.6f}")
  np.testing.assert_allclose(many["perplexity"], one["perplexity"], rtol=1e-5)


def test_data_parallel_gptq_matches_single_device(smollm2, mesh):
  """GPTQ with calibration batches split over `data` (Hessians all-reduced) vs one device."""
  from quantjax import methods
  from quantjax import rules as rules_lib
  from quantjax.models import llama
  cfg, params, tok = smollm2
  pure = to_pure(params)
  # two layers keep the test short: GPTQ the first two decoder blocks only
  small = dict(pure)
  small["layers"] = {i: pure["layers"][i] for i in range(2)}
  cfg2 = cfg.replace(num_layers=2)
  split = data_lib.load_split(tok, protocol=data_lib.Protocol(eval_tokens=16384, window=128,
                                                              calib_windows=8))
  rules = [qj.QuantRule(module_path=llama.PROJ_KERNELS, format="int4_g64")]
  fn = llama.forward_fn(cfg2)
  batches = [np.asarray(split.calib_windows)]
  one = methods.calibrate(fn, small, batches, rules, methods.GPTQ(), progress=False).params
  many = methods.calibrate(fn, small, batches, rules, methods.GPTQ(), mesh=mesh,
                           progress=False).params
  flat_b = dict(rules_lib.tree_leaves_with_paths(many))
  n = 0
  for name, a in rules_lib.tree_leaves_with_paths(one):
    if not isinstance(a, qj.QArray):
      continue
    n += 1
    b = flat_b[name]
    codes_a, codes_b = np.asarray(a.codes()), np.asarray(b.codes())
    # reductions in another order: a few codes at rounding ties may differ by one step
    assert np.mean(codes_a != codes_b) < 1e-3, name
    assert np.max(np.abs(codes_a.astype(int) - codes_b.astype(int))) <= 1, name
    np.testing.assert_allclose(np.asarray(a.scale), np.asarray(b.scale), rtol=1e-4)
  assert n == 14
