"""Every training regime runs through `fit` on a tiny model; LoRA math; step memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax import distill
from quantjax.eval import memory

SIZES = (32, 64, 64, 16)


def _params(key):
  keys = jax.random.split(key, len(SIZES) - 1)
  return {f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))}


def _apply(p, x):
  for i in range(len(p)):
    x = x @ p[f"l{i}"]["kernel"].astype(x.dtype) + p[f"l{i}"]["bias"].astype(x.dtype)
    if i < len(p) - 1:
      x = jax.nn.gelu(x)
  return x


TEACHER = _params(jax.random.key(0))
RULES = [qj.QuantRule(module_path=r"l\d/kernel", format="int4_g16")]


def _batch(step):
  return jax.random.normal(jax.random.fold_in(jax.random.key(7), step), (32, 32))


def _loss_of_params(p, x):
  y = _apply(p, x.astype(jax.tree.leaves(p)[0].dtype)).astype(jnp.float32)
  return jnp.mean((y - _apply(TEACHER, x)) ** 2)


@pytest.mark.parametrize("name", distill.REGIMES)
def test_every_regime_trains_and_finalizes(name):
  student = _params(jax.random.key(1))
  r = distill.training_regime(name, student, _loss_of_params, rules=RULES, lora_rank=4)
  cfg = distill.TrainConfig(steps=40, learning_rate=1e-2, warmup_steps=2, precision=r.precision)
  before = float(r.loss_fn(r.trainable, _batch(99), None, *([r.frozen] if r.frozen else [])))
  out, hist = distill.fit(r.loss_fn, r.trainable, _batch, cfg, frozen=r.frozen, progress=False)
  after = float(r.loss_fn(out, _batch(99), None, *([r.frozen] if r.frozen else [])))
  assert after < 0.7 * before, (name, before, after)
  dtypes = {x.dtype for x in jax.tree.leaves(out)}
  assert dtypes == ({jnp.dtype(jnp.bfloat16)} if name == "pure_bf16" else {jnp.dtype(jnp.float32)})
  final = r.finalize(out)
  if name == "qat_fake_quant":
    assert isinstance(final["l0"]["kernel"], qj.QArray)
  if name == "adapters":
    assert distill.adapter_param_count(out) == 4 * sum(a + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    assert set(out) == {"l0/kernel", "l1/kernel", "l2/kernel"}
    assert isinstance(r.frozen["l0"]["kernel"], qj.QArray)  # the base stays quantized
  assert float(_loss_of_params(final, _batch(99))) == pytest.approx(after, rel=0.05, abs=1e-6)


def test_mixed_precision_differs_from_fp32_and_keeps_fp32_masters():
  student = _params(jax.random.key(1))
  runs = {}
  for precision in ("fp32", "mixed_bf16"):
    cfg = distill.TrainConfig(steps=5, learning_rate=1e-2, warmup_steps=1, precision=precision)
    runs[precision], _ = distill.fit(lambda p, b, k: _loss_of_params(p, b), student, _batch, cfg,
                                     progress=False)
  a, b = runs["fp32"]["l0"]["kernel"], runs["mixed_bf16"]["l0"]["kernel"]
  assert b.dtype == jnp.float32
  # BF16 gradients: close to FP32's update, not identical, and not on the BF16 grid
  assert 0 < float(jnp.max(jnp.abs(a - b))) < 1e-2
  assert not bool(jnp.all(b == b.astype(jnp.bfloat16).astype(jnp.float32)))


def test_step_memory_reflects_the_regime():
  student = _params(jax.random.key(1))
  mem = {}
  for name in ("fp32_adam", "pure_bf16", "adapters"):
    r = distill.training_regime(name, student, _loss_of_params, rules=RULES, lora_rank=4)
    cfg = distill.TrainConfig(steps=1, warmup_steps=0, precision=r.precision)
    mem[name] = distill.step_memory(r.loss_fn, r.trainable, _batch(0), cfg, frozen=r.frozen)
  n = memory.tree_param_count(student)
  batch_bytes = 32 * 32 * 4
  # arguments = params + Adam's two moments (+ count) + batch: 12 B/param FP32, 6 B/param BF16
  assert mem["fp32_adam"]["arguments"] == pytest.approx(12 * n + batch_bytes, abs=64)
  assert mem["pure_bf16"]["arguments"] == pytest.approx(6 * n + batch_bytes, abs=64)
  assert mem["adapters"]["arguments"] < mem["pure_bf16"]["arguments"]
  for m in mem.values():
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]


def test_lora_merge_math_and_errors():
  base = qj.quantize_params(_params(jax.random.key(2)), RULES)
  ad = distill.lora_init(base, r"l0/kernel", 2, jax.random.key(3))
  assert ad["l0/kernel"]["a"].shape == (32, 2) and not ad["l0/kernel"]["b"].any()
  ad["l0/kernel"]["b"] = jnp.ones((2, 64))
  merged = distill.lora_merge(base, ad, alpha=4.0)
  want = qj.dequantize(base["l0"]["kernel"]) + 2.0 * ad["l0/kernel"]["a"] @ ad["l0/kernel"]["b"]
  np.testing.assert_allclose(merged["l0"]["kernel"], want, rtol=1e-6, atol=1e-6)
  assert isinstance(merged["l1"]["kernel"], qj.QArray)  # not adapted: untouched
  with pytest.raises(ValueError, match="matches no leaf"):
    distill.lora_init(base, r"nope", 2, jax.random.key(0))
  with pytest.raises(ValueError, match="2-D"):
    distill.lora_init(base, r"l0/bias", 2, jax.random.key(0))
  with pytest.raises(ValueError, match="exceeds"):
    distill.lora_init(base, r"l2/kernel", 17, jax.random.key(0))
  with pytest.raises(KeyError, match="not in the base"):
    distill.lora_merge(base, {"l9/kernel": ad["l0/kernel"]})
  with pytest.raises(ValueError, match="unknown training regime"):
    distill.training_regime("fp64", base, _loss_of_params)
  with pytest.raises(ValueError, match="needs quantization rules"):
    distill.training_regime("adapters", base, _loss_of_params)
  with pytest.raises(ValueError, match="unknown precision"):
    distill.TrainConfig(precision="fp16")
