"""The calibrated-method protocol and registry: every shipped method follows it, and a
method a user writes runs through the driver once it does."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import quantjax  # noqa: F401 - registers the pruners too
from quantjax import methods
from quantjax.methods import base
from quantjax.rules import QuantRule


def test_every_registered_method_follows_the_protocol():
  assert {"rtn", "gptq", "awq", "smoothquant", "importance", "wanda", "sparsegpt"} <= set(
      base.names())
  for name in base.names():
    m = base.make(name)
    assert isinstance(m, base.CalibratedMethod), name
    assert set(m.needs) <= set(methods.capture.STAT_KINDS), (name, m.needs)
  assert base.make("gptq", act_order=True).act_order
  with pytest.raises(ValueError, match=r"unknown calibrated method 'gtpq'; registered: awq, gptq"):
    base.make("gtpq")
  with pytest.raises(ValueError, match="registered already"):
    base.register("gptq", methods.RTN)


def test_names_by_rule_type_are_the_runner_methods():
  from experiments import pipeline
  from quantjax.rules import PruneRule
  quant = base.names(QuantRule)
  assert {"rtn", "gptq", "awq", "smoothquant", "signround"} <= set(quant)
  assert "importance" not in quant  # statistics only: it changes no weight
  assert set(base.names(PruneRule)) >= {"wanda", "sparsegpt"} and "gptq" not in base.names(
      PruneRule)
  # the runner takes every registered method by name, and only those plus its own
  assert set(pipeline.QUANT_METHODS) == set(quant) | {"cast", "static", "llamacpp"}
  assert set(pipeline.PRUNE_METHODS) == set(base.names(PruneRule)) | {"magnitude"}


@dataclasses.dataclass(frozen=True)
class ScaledRTN:
  """A user's method: round-to-nearest of the weight times the mean |x| of its input
  features' first entry (only to show the statistics arrive)."""

  label: ClassVar[str] = "scaled"
  rule_type: ClassVar[type] = QuantRule
  needs: ClassVar[frozenset] = frozenset({"absmean"})

  def apply(self, parts, record):
    record.setdefault("seen", []).extend(p.name for p in parts)
    return {p.key: p.value * 0 + float(p.stats.absmean[0]) for p in parts}


def test_a_user_method_runs_through_the_driver():
  assert isinstance(ScaledRTN(), base.CalibratedMethod)
  params = {"a": jnp.ones((4, 3)), "b": jnp.ones((3, 2))}
  x = jnp.arange(8.0).reshape(2, 4)
  res = methods.calibrate(lambda p, x: (x @ p["a"]) @ p["b"], params, [x],
                          [QuantRule(module_path="a|b", format="int8")], ScaledRTN(),
                          progress=False)
  assert res.info["seen"] == ["a", "b"]
  np.testing.assert_allclose(np.asarray(res.params["a"]), np.full((4, 3), 2.0))  # mean |x[:, 0]|
