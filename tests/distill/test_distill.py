import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quantjax as qj
from quantjax import distill
from quantjax import sparsity as sp


def _mlp_params(key, sizes=(32, 64, 64, 16)):
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _apply(p, x):
  n = len(p)
  for i in range(n):
    x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.gelu(x)
  return x


def _batch(step, n=64):
  return jax.random.normal(jax.random.fold_in(jax.random.key(123), step), (n, 32))


def test_kd_loss_values():
  t = jnp.array([[2.0, 0.0, -1.0]])
  assert float(distill.kd_logits_loss(t, t, temperature=3.0)) == pytest.approx(0.0, abs=1e-7)
  s = jnp.array([[0.0, 0.0, 0.0]])
  p = jax.nn.softmax(t / 2.0)
  kl = float(jnp.sum(p * (jnp.log(p) - jnp.log(1 / 3))))
  assert float(distill.kd_logits_loss(s, t, temperature=2.0)) == pytest.approx(4 * kl, rel=1e-5)
  ce = float(distill.cross_entropy(s, jnp.array([1])))
  assert ce == pytest.approx(np.log(3), rel=1e-6)
  mixed = distill.distill_loss(s, t, jnp.array([1]), alpha=0.5, temperature=2.0)
  assert float(mixed) == pytest.approx(0.5 * 4 * kl + 0.5 * np.log(3), rel=1e-5)
  with pytest.raises(ValueError, match="labels"):
    distill.distill_loss(s, t, alpha=0.5)
  with pytest.raises(ValueError, match="shape"):
    distill.kd_logits_loss(s, jnp.ones((1, 4)))
  assert float(distill.hidden_mse([jnp.ones(3)], [jnp.zeros(3)])) == pytest.approx(1.0)


def test_distilling_a_pruned_student_recovers_and_keeps_masks(tmp_path):
  teacher = _mlp_params(jax.random.key(0))
  rules = [qj.PruneRule(module_path=r"l\d/kernel", n=2, m=4)]
  student, masks = sp.prune_params(teacher, rules)

  def loss_fn(p, x, key):
    return distill.kd_logits_loss(_apply(p, x), _apply(teacher, x), temperature=2.0)

  before = float(loss_fn(student, _batch(999), None))
  cfg = distill.TrainConfig(steps=60, learning_rate=3e-3, warmup_steps=5)
  trained, hist = distill.fit(loss_fn, student, _batch, cfg, masks=masks, progress=False)
  after = float(loss_fn(trained, _batch(999), None))
  assert after < 0.5 * before
  assert hist[-1]["step"] == 60
  for path in ("l0", "l1", "l2"):
    k = np.asarray(trained[path]["kernel"]).reshape(-1, 4, trained[path]["kernel"].shape[1])
    assert np.all((k != 0).sum(1) <= 2)


def test_resume_gives_identical_params(tmp_path):
  teacher = _mlp_params(jax.random.key(0))
  student = _mlp_params(jax.random.key(1))

  def loss_fn(p, x, key):
    noise = 0.01 * jax.random.normal(key, x.shape)  # uses the per-step key
    return distill.kd_logits_loss(_apply(p, x + noise), _apply(teacher, x))

  cfg = distill.TrainConfig(steps=20, learning_rate=1e-2, warmup_steps=2, checkpoint_every=5)
  full, _ = distill.fit(loss_fn, student, _batch, cfg, progress=False)
  work = str(tmp_path / "run")
  part, _ = distill.fit(loss_fn, student, _batch, cfg, workdir=work, progress=False, stop_after=7)
  resumed, hist = distill.fit(loss_fn, student, _batch, cfg, workdir=work, progress=False)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(part), jax.tree.leaves(resumed)))
  assert [h["step"] for h in hist] == [10, 20]
  # wall time carries over the interruption: no restart from zero
  secs = [h["seconds"] for h in hist]
  assert 0 < secs[0] < secs[1]
  state, _ = distill.trainer._restore(work, distill.make_optimizer(cfg).init(student))
  assert state.step == 20 and state.seconds == pytest.approx(secs[1], rel=0.5)


def test_qat_ste_and_lsq_convert_to_identical_qarrays():
  teacher = _mlp_params(jax.random.key(0))
  rules = [qj.QuantRule(module_path=r"l\d/kernel", format="int4"),
           qj.QuantRule(module_path=r".*bias", skip=True)]
  x = _batch(999)

  # STE with min-max scales
  def ste_loss(p, xb, key):
    return distill.kd_logits_loss(_apply(qj.fake_quant_params(p, rules), xb), _apply(teacher, xb))
  cfg = distill.TrainConfig(steps=40, learning_rate=2e-3, warmup_steps=4)
  start = float(ste_loss(teacher, x, None))
  trained, _ = distill.fit(ste_loss, teacher, _batch, cfg, progress=False)
  assert float(ste_loss(trained, x, None)) < start
  real = qj.quantize_params(trained, rules)
  np.testing.assert_allclose(np.asarray(_apply(real, x)),
                             np.asarray(_apply(qj.fake_quant_params(trained, rules), x)),
                             rtol=1e-6, atol=1e-6)

  # LSQ: learn weights and step sizes together
  steps0 = distill.lsq_init(teacher, rules)
  assert steps0["l0"]["kernel"].shape == (1, 64) and steps0["l0"]["bias"] is None

  def lsq_loss(tp, xb, key):
    q = distill.lsq_apply(tp["params"], tp["steps"], rules)
    return distill.kd_logits_loss(_apply(q, xb), _apply(teacher, xb))
  tp0 = {"params": teacher, "steps": steps0}
  l0 = float(lsq_loss(tp0, x, None))
  tp, _ = distill.fit(lsq_loss, tp0, _batch, cfg, progress=False)
  assert float(lsq_loss(tp, x, None)) < l0
  assert not np.allclose(np.asarray(tp["steps"]["l0"]["kernel"]), np.asarray(steps0["l0"]["kernel"]))
  q = distill.lsq_convert(tp["params"], tp["steps"], rules)
  assert isinstance(q["l0"]["kernel"], qj.QArray) and q["l0"]["kernel"].qvalue.dtype == jnp.uint8
  np.testing.assert_array_equal(
      np.asarray(_apply(q, x)),
      np.asarray(_apply(distill.lsq_apply(tp["params"], tp["steps"], rules), x)))


def test_lsq_minmax_init_starts_at_the_rtn_model():
  params = _mlp_params(jax.random.key(1), sizes=(128, 64, 16))
  rules = [qj.QuantRule(module_path=r"l\d/kernel", format="int4_g64", calibration="minmax"),
           qj.QuantRule(module_path=r".*bias", skip=True)]
  rtn = qj.dequantize_params(qj.quantize_params(params, rules))  # RTN with min-max scales
  steps = distill.lsq_init(params, rules, init="minmax")
  fq = distill.lsq_apply(params, steps, rules)
  for a, b in zip(jax.tree.leaves(rtn), jax.tree.leaves(fq)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # LSQ's own init (2 mean|w| / sqrt(Qp)) is a coarser grid: a worse start than RTN
  lsq = distill.lsq_apply(params, distill.lsq_init(params, rules), rules)
  w = np.asarray(params["l0"]["kernel"])
  assert (np.mean((np.asarray(lsq["l0"]["kernel"]) - w) ** 2)
          > np.mean((np.asarray(fq["l0"]["kernel"]) - w) ** 2))
  with pytest.raises(ValueError, match="unknown LSQ init"):
    distill.lsq_init(params, rules, init="absmean")
  with pytest.raises(ValueError, match="symmetric integer"):
    distill.lsq_init(params, [qj.QuantRule(module_path=r"l\d/kernel", format="int4_g64_asym")],
                     init="minmax")


def test_history_records_the_schedule_learning_rate():
  cfg = distill.TrainConfig(steps=8, learning_rate=1e-2, warmup_steps=2, end_lr_ratio=0.1)
  params = _mlp_params(jax.random.key(2))
  loss = lambda p, xb, key: jnp.mean(_apply(p, xb) ** 2)  # noqa: E731
  _, hist = distill.fit(loss, params, _batch, cfg, progress=False, log_every=1)
  lrs = [h["lr"] for h in hist]
  assert [h["step"] for h in hist] == list(range(1, 9))
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-2)  # warm-up from 0, then the peak
  assert lrs[-1] < lrs[3] and lrs[-1] >= 1e-3 - 1e-9  # cosine decay towards 10% of the peak


def test_train_config_validation():
  with pytest.raises(ValueError, match="warmup_steps"):
    distill.TrainConfig(steps=5, warmup_steps=10)
  with pytest.raises(ValueError, match="learning_rate"):
    distill.TrainConfig(learning_rate=0.0)


def test_frozen_teacher_is_an_argument_and_params_are_not_consumed():
  """`frozen=` gives the same training as a closed-over teacher, without baking the
  teacher into the compiled step; the caller's arrays survive the donated updates."""
  teacher = _mlp_params(jax.random.key(0))
  student = _mlp_params(jax.random.key(1))
  cfg = distill.TrainConfig(steps=5, learning_rate=1e-3, warmup_steps=1)

  def closed(p, x, key):
    return distill.kd_logits_loss(_apply(p, x), _apply(teacher, x))

  def passed(p, x, key, t):
    return distill.kd_logits_loss(_apply(p, x), _apply(t, x))

  a, _ = distill.fit(closed, student, _batch, cfg, progress=False)
  b, _ = distill.fit(passed, student, _batch, cfg, progress=False, frozen=teacher)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves((student, teacher)))
  # the teacher is an input of the compiled step, not a constant inside it
  jaxpr = jax.make_jaxpr(lambda p, t: passed(p, _batch(0), None, t))(student, teacher)
  assert not any(getattr(c, "size", 0) >= 32 * 64 for c in jaxpr.consts)
  jaxpr_closed = jax.make_jaxpr(lambda p: closed(p, _batch(0), None))(student)
  assert any(getattr(c, "size", 0) >= 32 * 64 for c in jaxpr_closed.consts)
