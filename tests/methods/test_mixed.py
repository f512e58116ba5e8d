"""Mixed-precision allocation: knapsack optimality, Fisher sensitivity, rules, GGUF types."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quantjax as qj
from quantjax import rules as rules_lib
from quantjax.methods import mixed
from quantjax.models import llama


def _brute(costs, budget):
  paths = sorted(costs)
  best = None
  for combo in itertools.product(*(costs[p] for p in paths)):
    b = sum(c.nbytes for c in combo)
    if b <= budget:
      v = sum(c.cost for c in combo)
      if best is None or v < best:
        best = v
  return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_respects_budget_and_is_near_optimal(seed):
  rng = np.random.default_rng(seed)
  costs = {}
  for i in range(6):
    sizes = sorted(rng.integers(10, 100, size=4))
    errs = sorted(rng.uniform(0, 10, size=4), reverse=True)  # more bytes, less error
    costs[f"t{i}"] = [mixed.Choice(f"f{j}", int(s), float(e))
                      for j, (s, e) in enumerate(zip(sizes, errs))]
  lo = sum(min(c.nbytes for c in v) for v in costs.values())
  hi = sum(max(c.nbytes for c in v) for v in costs.values())
  for budget in np.linspace(lo, hi, 5).astype(int):
    a = mixed.allocate(costs, int(budget))
    assert a.nbytes <= budget
    opt = _brute(costs, int(budget))
    # Lagrangian + greedy is not exact, but close on these instances.
    assert a.predicted_cost <= opt * 1.25 + 1e-9, (budget, a.predicted_cost, opt)
  with pytest.raises(ValueError, match="below the smallest possible size"):
    mixed.allocate(costs, lo - 1)


def test_fisher_costs_and_rules_on_a_tiny_llama():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, name="tiny")
  params = nnx.to_pure_dict(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  windows = np.random.default_rng(0).integers(0, 64, (3, 16)).astype(np.int32)
  targets = r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj/kernel"
  fisher = mixed.fisher_diagonal(llama.loss_fn(cfg), params, [w[None] for w in windows], targets)
  assert len(fisher) == 14 and all(np.all(f >= 0) and f.any() for f in fisher.values())
  cands = ["q8_0", "q4_0", "int3_g32_fp16s"]
  costs = mixed.candidate_costs(params, fisher, cands)
  for choices in costs.values():
    c = {x.fmt: x for x in choices}
    assert c["q8_0"].cost < c["q4_0"].cost < c["int3_g32_fp16s"].cost
    assert c["q8_0"].nbytes > c["q4_0"].nbytes > c["int3_g32_fp16s"].nbytes
  n = sum(int(np.prod(f.shape)) for f in fisher.values())
  budget = int(4.0 * n / 8)  # 4 bits per weight: between int3 (3.5) and q4_0 (4.5)
  a = mixed.allocate(costs, budget, count=n)
  assert a.bits_per_weight <= 4.0 and set(a.formats.values()) - set(cands) == set()
  assert len(set(a.formats.values())) >= 2
  q = qj.quantize_params(params, mixed.assignment_rules(a))
  flat = dict(rules_lib.tree_leaves_with_paths(q))
  for p, f in a.formats.items():
    assert flat[p].fmt.name == f
  # The allocation beats the uniform choice with the same byte budget on predicted cost.
  uniform3 = sum(c.cost for v in costs.values() for c in v if c.fmt == "int3_g32_fp16s")
  assert a.predicted_cost < uniform3
  # ... and the quantized model's loss is no worse than uniform 3-bit's on the same windows.
  from quantjax.eval import perplexity as ppl
  toks = jnp.asarray(windows)

  def nll(p):
    return float(jnp.mean(ppl.token_nll(llama.forward(cfg, p, toks), toks)))
  u3 = qj.quantize_params(params, [qj.QuantRule(module_path=targets, format="int3_g32_fp16s")])
  assert abs(nll(q) - nll(params)) <= abs(nll(u3) - nll(params)) + 1e-6


def test_candidates_that_do_not_fit_a_tensor_are_not_offered_and_none_fitting_is_named():
  # Rows of 64 (q/k/v/o, gate/up inputs) and 128 (down): Q1_0 needs 128, NVFP4 64, TQ2_0 256.
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                          num_heads=4, num_kv_heads=2, head_dim=16, name="tiny")
  params = nnx.to_pure_dict(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  flat = dict(rules_lib.tree_leaves_with_paths(params))
  paths = [p for p in flat if p.endswith("_proj/kernel")]
  fisher = {p: np.ones(flat[p].shape, np.float32) for p in paths}
  costs = mixed.candidate_costs(params, fisher, ["q2_0", "q1_0", "iq4_nl", "tq2_0"])
  for p, choices in costs.items():
    want = {"q2_0", "iq4_nl"} | ({"q1_0"} if "down_proj" in p else set())
    assert {c.fmt for c in choices} == want, p
  a = mixed.allocate(costs, int(2.0 * sum(flat[p].size for p in paths) / 8))
  q = qj.quantize_params(params, mixed.assignment_rules(a))  # every choice quantizes
  assert {leaf.fmt.name for p, leaf in rules_lib.tree_leaves_with_paths(q) if p in a.formats} \
      <= {"q2_0", "q1_0", "iq4_nl"}
  with pytest.raises(ValueError, match=r"no candidate format fits tensor layers/0/attn/"
                     r"\w_proj/kernel of shape \(64, \d+\) \(candidates: q1_0, tq2_0\)"):
    mixed.candidate_costs(params, fisher, ["q1_0", "tq2_0"])
