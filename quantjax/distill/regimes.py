"""Training regimes as data: what `fit` trains, what it keeps frozen, in which precision.

`training_regime(name, params, loss_of_params, ...)` returns a `Regime`: the
trainable tree, the frozen tree, the `loss_fn` for `distill.fit`, the
`TrainConfig.precision` to use and a `finalize(trained)` that gives the
params to evaluate or store. One entry per row of
`eval/memory.TRAIN_REGIMES`:

- "fp32_adam": all params, FP32 Adam.
- "mixed_bf16": all params, FP32 masters and moments, BF16 weights and
  gradients in the step (`precision="mixed_bf16"`).
- "pure_bf16": all params and Adam state in BF16 (`precision="bf16"`).
- "qat_fake_quant": all params plus LSQ step sizes of the quantized leaves,
  fake-quantized in the forward pass (`qat.lsq_apply`); finalized to real
  QArrays (`qat.lsq_convert`).
- "adapters": the base quantized by `rules` and frozen, LoRA adapters of rank
  `lora_rank` on the same leaves (`adapters.lora_init`); finalized by merging
  (`adapters.lora_convert`, dense).

The model's compute dtype is the caller's (a BF16 regime wants a BF16 forward).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax

from quantjax import rules as rules_lib
from quantjax.distill import adapters as adapters_lib
from quantjax.distill import qat
from quantjax.numerics.qarray import QArray
from quantjax.transforms import quantize_params

__all__ = ["REGIMES", "Regime", "training_regime"]

REGIMES = ("fp32_adam", "mixed_bf16", "pure_bf16", "qat_fake_quant", "adapters")
_PRECISION = {"fp32_adam": "fp32", "mixed_bf16": "mixed_bf16", "pure_bf16": "bf16",
              "qat_fake_quant": "fp32", "adapters": "fp32"}


@dataclasses.dataclass(frozen=True)
class Regime:
  """What `distill.fit` needs for one regime (see the module docstring).

  Attributes:
    name: the regime.
    trainable: initial trainable tree (`fit`'s `params`).
    frozen: tree passed as `fit(..., frozen=)` (None: the loss takes 3 arguments).
    loss_fn: `loss(trainable, batch, key[, frozen])`.
    precision: for `TrainConfig(precision=...)`.
    finalize: `trained -> params` to evaluate or store.
  """

  name: str
  trainable: Any
  frozen: Any
  loss_fn: Callable[..., jax.Array]
  precision: str
  finalize: Callable[[Any], Any]


def training_regime(name: str, params: Any, loss_of_params: Callable[[Any, Any], jax.Array], *,
                    rules: Sequence[rules_lib.QuantRule] = (), lora_rank: int = 16,
                    lsq_init: str = "minmax", key: jax.Array | None = None) -> Regime:
  """The `Regime` `name` for `params` and a loss `loss_of_params(params, batch)`.

  Args:
    name: one of `REGIMES`.
    params: float params.
    loss_of_params: the training loss of a params tree on a batch.
    rules: QAT: the leaves to fake-quantize and their (symmetric integer)
      format; adapters: the leaves to quantize, freeze and adapt (every
      quantized leaf gets an adapter).
    lora_rank: adapter rank.
    lsq_init: QAT step-size initialisation (see `qat.lsq_init`).
    key: PRNG key of the adapters' A matrices.

  Raises:
    ValueError: unknown regime, or QAT / adapters without rules.
  """
  if name not in REGIMES:
    raise ValueError(f"unknown training regime {name!r}; expected one of {REGIMES}")
  rules = tuple(rules)
  if name in ("qat_fake_quant", "adapters") and not rules:
    raise ValueError(f"regime {name!r} needs quantization rules (which leaves, which format)")
  precision = _PRECISION[name]
  if name in ("fp32_adam", "mixed_bf16", "pure_bf16"):
    return Regime(name, params, None, lambda p, b, k: loss_of_params(p, b), precision,
                  lambda p: p)
  if name == "qat_fake_quant":
    start = {"params": params, "steps": qat.lsq_init(params, rules, init=lsq_init)}

    def qat_loss(p, b, k):
      return loss_of_params(qat.lsq_apply(p["params"], p["steps"], rules), b)
    return Regime(name, start, None, qat_loss, precision,
                  lambda p: qat.lsq_convert(p["params"], p["steps"], rules))
  base = quantize_params(params, rules)
  quantized = [p for p, x in rules_lib.tree_leaves_with_paths(base) if isinstance(x, QArray)]
  if not quantized:
    raise ValueError("the adapters regime's rules quantize no leaf")
  ad = adapters_lib.lora_init(base, "|".join(re.escape(p) for p in quantized), lora_rank,
                              jax.random.key(0) if key is None else key)

  def lora_loss(a, b, k, base_):
    return loss_of_params(adapters_lib.lora_merge(base_, a), b)
  return Regime(name, ad, base, lora_loss, precision,
                lambda a: adapters_lib.lora_convert(base, a))
