"""Mixture-of-experts models, written as users write them, through the calibration driver.

A byte-level LM with two top-2-of-8 MoE layers, trained for a few hundred
steps (with Switch Transformer's load-balancing loss) on CPython's documentation (the text of `user_models`), and run with the
same weights through the three ways JAX users dispatch tokens to experts:

* `dense`: every expert computes every token (`einsum("td,edf->tef")`),
  outputs weighted by the router's gates;
* `gather`: tokens scattered into per-expert capacity slots `[E, C, d]`,
  `einsum("ecd,edf->ecf")`, gathered back;
* `ragged`: tokens sorted by expert and `jax.lax.ragged_dot` with the group
  sizes.

With `gather` and `ragged` each expert's statistics come only from the tokens
routed to it; with `dense` the first projection's statistics are every token's
(the documented choice: what the program computes), the second's every token's
hidden state of that expert.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantjax import methods
from quantjax.numerics.qarray import QArray
from quantjax.rules import QuantRule
from tests.methods import user_models

V, D, F, E, TOPK, LAYERS, T = user_models.VOCAB, 64, 64, 8, 2, 2, 64
DISPATCH = ("dense", "gather", "ragged")
EXPERTS = r"layers/\d+/(w1|w2)"
SKIP = QuantRule(module_path=".*", skip=True)


def init(seed=0):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2] if len(s) > 1 else 1),  # noqa
                              jnp.float32)
  layers = [{"qkv": mk(D, 3 * D), "o": mk(D, D), "router": mk(D, E),
             "w1": jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(D), jnp.float32),
             "w2": jnp.asarray(rng.normal(size=(E, F, D)) / np.sqrt(F), jnp.float32)}
            for _ in range(LAYERS)]
  return {"embed": jnp.asarray(rng.normal(size=(V, D)) * 0.1, jnp.float32),
          "pos": jnp.asarray(rng.normal(size=(T, D)) * 0.02, jnp.float32),
          "layers": layers, "head": mk(D, V)}


def _norm(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def _attention(p, x):
  b, t, _ = x.shape
  q, k, v = jnp.split(_norm(x) @ p["qkv"], 3, -1)
  heads = lambda a: a.reshape(b, t, 4, D // 4)  # noqa: E731
  s = jnp.einsum("bthd,bshd->bhts", heads(q), heads(k)) / np.sqrt(D // 4)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
  a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), heads(v)).reshape(b, t, D)
  return x + a @ p["o"]


def _route(p, h, router_bias):
  """Top-2 of 8: expert ids `[N, 2]` and renormalized gates `[N, 2]`."""
  logits = h @ p["router"] + router_bias
  g, idx = jax.lax.top_k(jax.nn.softmax(logits, -1), TOPK)
  return idx, g / jnp.sum(g, -1, keepdims=True)


def _moe_dense(p, h, idx, g):
  combine = jnp.sum(jax.nn.one_hot(idx, E) * g[..., None], 1)  # [N, E]
  u = jax.nn.gelu(jnp.einsum("nd,edf->nef", h, p["w1"]))
  y = jnp.einsum("nef,efd->ned", u, p["w2"])
  return jnp.einsum("ned,ne->nd", y, combine)


def _moe_gather(p, h, idx, g):
  n = h.shape[0]
  e, tok, gate = idx.reshape(-1), jnp.repeat(jnp.arange(n), TOPK), g.reshape(-1)
  onehot = jax.nn.one_hot(e, E, dtype=jnp.int32)
  pos = jnp.take_along_axis(jnp.cumsum(onehot, 0) - 1, e[:, None], 1)[:, 0]
  slots = jnp.zeros((E, n, D), h.dtype).at[e, pos].set(h[tok])  # capacity n: nothing dropped
  u = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", slots, p["w1"]))
  y = jnp.einsum("ecf,efd->ecd", u, p["w2"])
  return jnp.zeros_like(h).at[tok].add(y[e, pos] * gate[:, None])


def _moe_ragged(p, h, idx, g):
  n = h.shape[0]
  e, tok, gate = idx.reshape(-1), jnp.repeat(jnp.arange(n), TOPK), g.reshape(-1)
  order = jnp.argsort(e, stable=True)
  sizes = jnp.bincount(e, length=E).astype(jnp.int32)
  # lax primitives take arrays only: jnp.asarray lets a QArray stand in (it dequantizes).
  u = jax.nn.gelu(jax.lax.ragged_dot(h[tok[order]], jnp.asarray(p["w1"]), sizes))
  y = jax.lax.ragged_dot(u, jnp.asarray(p["w2"]), sizes)
  return jnp.zeros_like(h).at[tok[order]].add(y * gate[order][:, None])


MOE = {"dense": _moe_dense, "gather": _moe_gather, "ragged": _moe_ragged}


def forward(params, tokens, dispatch="dense", router_bias=None, with_aux=False):
  bias = jnp.zeros((E,)) if router_bias is None else router_bias
  b, t = tokens.shape
  x = params["embed"][tokens] + params["pos"][:t]
  aux = 0.0
  for p in params["layers"]:
    x = _attention(p, x)
    h = _norm(x).reshape(b * t, D)
    idx, g = _route(p, h, bias)
    x = x + MOE[dispatch](p, h, idx, g).reshape(b, t, D)
    # Switch Transformer's load-balancing loss: E * sum_e (share routed to e) * (mean gate of e).
    share = jnp.mean(jax.nn.one_hot(idx, E).sum(1), 0) / TOPK
    aux = aux + E * jnp.sum(share * jnp.mean(jax.nn.softmax(h @ p["router"] + bias, -1), 0))
  logits = _norm(x) @ params["head"]
  return (logits, aux) if with_aux else logits


@functools.lru_cache(maxsize=None)
def trained(steps=300):
  data = user_models.text_bytes()
  data = data[: int(0.8 * len(data))]
  params = init()

  def loss_of(p, batch):
    logits, aux = forward(p, batch[:, :-1], with_aux=True)
    return user_models.xent(logits, batch) + 0.01 * aux

  return user_models.train(loss_of, params, data, steps, seed=0)  # windows of T + 1 = 65


def _fn(dispatch, router_bias=None):
  return lambda p, x: forward(p, x, dispatch, router_bias)


def _err(fn, ref, params, x):
  want = np.asarray(fn(ref, x))
  return float(np.mean((np.asarray(fn(params, x)) - want) ** 2))


@pytest.fixture(scope="module")
def model():
  params, loss = trained()
  assert loss < 3.1, loss  # trained: well below ln(256) = 5.5 (aux loss about 0.02 of it)
  return params


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_gptq_quantizes_every_expert_below_rtn(model, dispatch):
  rules = (QuantRule(module_path=EXPERTS, format="int3_g16"), SKIP)
  fn = _fn(dispatch)
  batches = user_models.calibration()
  x = user_models.held_out()
  rtn = methods.calibrate(fn, model, batches, rules, methods.RTN(), progress=False)
  gptq = methods.calibrate(fn, model, batches, rules, methods.GPTQ(), progress=False)
  for layer in gptq.params["layers"]:
    for n in ("w1", "w2"):
      q = layer[n]
      assert isinstance(q, QArray) and q.shape == model["layers"][0][n].shape
      assert np.isfinite(np.asarray(q.dequantize())).all()
  e_rtn, e_gptq = _err(fn, model, rtn.params, x), _err(fn, model, gptq.params, x)
  assert np.isfinite(e_gptq) and e_gptq < 0.8 * e_rtn, (dispatch, e_gptq, e_rtn)
  assert "starved" not in gptq.info
  # The quantized tree runs in the unmodified model under jit.
  assert np.isfinite(np.asarray(jax.jit(fn)(gptq.params, x))).all()
  names = {p.name for p in gptq.parts}
  if dispatch == "dense":
    # w1 reads every token: one matrix [d, E * f]; w2 is read per expert.
    assert "layers/0/w1" in names and "layers/0/w2[3]" in names
  else:
    assert {f"layers/{i}/{n}[{e}]" for i in range(LAYERS) for n in ("w1", "w2")
            for e in range(E)} <= names


@pytest.mark.parametrize("dispatch", ("gather", "ragged"))
def test_each_expert_sees_only_the_tokens_routed_to_it(model, dispatch):
  batches = user_models.calibration()
  stats = methods.collect_stats(_fn(dispatch), model, batches,
                                [QuantRule(module_path=r"layers/0/w1", format="int4_g16"),
                                 SKIP], needs=("hessian", "absmean"))
  # The float model's routing in layer 0, counted by hand.
  p = model["layers"][0]
  counts = np.zeros(E)
  for b in batches:
    t = b.shape[1]
    x = _attention(p, model["embed"][b] + model["pos"][:t])
    idx, _ = _route(p, _norm(x).reshape(-1, D), jnp.zeros((E,)))
    counts += np.bincount(np.asarray(idx).reshape(-1), minlength=E)
  got = np.array([stats[f"layers/0/w1[{e}]"].count for e in range(E)])
  np.testing.assert_array_equal(got, counts)
  assert got.sum() == TOPK * sum(b.size for b in batches)


def test_a_starved_expert_is_named_and_falls_back_to_rtn(model):
  # A router bias that no token's top 2 survives sends nothing to expert 7.
  bias = jnp.zeros((E,)).at[7].set(-1e4)
  fn = _fn("ragged", bias)
  rules = (QuantRule(module_path=EXPERTS, format="int4_g16"), SKIP)
  with pytest.warns(UserWarning, match=r"layers/0/w1\[7\] \(0 rows\)"):
    res = methods.calibrate(fn, model, user_models.calibration(), rules, methods.GPTQ(),
                            progress=False)
  assert res.info["starved"]["layers/0/w1[7]"] == 0.0
  assert set(res.info["starved"]) == {f"layers/{i}/{n}[7]" for i in range(LAYERS)
                                      for n in ("w1", "w2")}
  rtn = methods.calibrate(fn, model, user_models.calibration(), rules, methods.RTN(),
                          progress=False)
  np.testing.assert_array_equal(np.asarray(res.params["layers"][0]["w1"].dequantize())[7],
                                np.asarray(rtn.params["layers"][0]["w1"].dequantize())[7])
  with pytest.raises(ValueError, match=r"layers/0/w1\[7\] \(0 rows\).*starved='error'"):
    methods.calibrate(fn, model, user_models.calibration(), rules, methods.GPTQ(),
                      starved="error", progress=False)


def test_dense_dispatch_statistics_against_routed_only(model, capsys):
  """Dense dispatch gives every expert's first projection every token's statistics;
  gather dispatch gives it only its routed tokens. Both quantize the same weights:
  scored with one forward on held-out text, both stay well below RTN, and the figures
  are printed (docs/methods.md reports them)."""
  rules = (QuantRule(module_path=EXPERTS, format="int3_g16"), SKIP)
  batches, x = user_models.calibration(), user_models.held_out()
  dense = _fn("dense")
  errs = {"rtn": _err(dense, model, methods.calibrate(dense, model, batches, rules,
                                                      methods.RTN(), progress=False).params, x)}
  for dispatch in ("dense", "gather"):
    res = methods.calibrate(_fn(dispatch), model, batches, rules, methods.GPTQ(),
                            progress=False)
    errs[dispatch] = _err(dense, model, res.params, x)
  with capsys.disabled():
    print(f"\nMoE int3_g16 held-out MSE: RTN {errs['rtn']:.4g}, GPTQ with all-token "
          f"statistics (dense) {errs['dense']:.4g}, routed-only (gather) {errs['gather']:.4g}")
  assert errs["dense"] < 0.8 * errs["rtn"] and errs["gather"] < 0.8 * errs["rtn"], errs
