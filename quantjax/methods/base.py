"""The calibrated-method protocol, and the name registry the runner and reports use.

`capture.calibrate(fn, params, batches, rules, method)` runs any object that
follows `CalibratedMethod`: it reads the statistics the method `needs`,
hands it the `Part`s that are ready (each with its float value, layout, rule
and input statistics) and puts the results it returns in place. GPTQ, AWQ,
SmoothQuant, RTN, the importance matrix, Wanda and SparseGPT are such
objects; a new method is one more (write its `apply`, then `register` it to
make it a name configs can use).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

__all__ = ["CalibratedMethod", "register", "make", "names"]


@runtime_checkable
class CalibratedMethod(Protocol):
  """What the calibration driver asks of a method.

  Attributes:
    label: a short name for progress bars and records.
    rule_type: the rule class it takes (`QuantRule` for quantizers,
      `PruneRule` for pruners); None accepts any (statistics only).
    needs: the statistics it reads, from `capture.STAT_KINDS` ("hessian",
      "absmean", "sqmean", "range", "sample"); the driver collects no others.
  """

  label: str
  rule_type: type | None

  @property
  def needs(self) -> frozenset: ...

  def apply(self, parts: Sequence[Any], record: dict[str, Any]) -> dict[tuple, Any]:
    """Results for `parts` (`capture.Part`s whose statistics are complete):
    `{part.key: new value}` (a QArray, a wrapped QArray, a pruned array...); a part
    left out keeps its value. `record` collects what the method wants reported
    (it ends up in `CalibrationResult.info`). A method may drop a large statistic
    (`part.stats.xtx = None`) once it has used it."""
    ...


_REGISTRY: dict[str, Callable[..., CalibratedMethod]] = {}


def register(name: str, factory: Callable[..., CalibratedMethod]) -> None:
  """Makes `factory(**options)` available as `make(name, **options)`."""
  if name in _REGISTRY and _REGISTRY[name] is not factory:
    raise ValueError(f"a calibrated method named {name!r} is registered already "
                     f"({_REGISTRY[name]!r})")
  _REGISTRY[name] = factory


def make(name: str, **options: Any) -> CalibratedMethod:
  """The method registered as `name`, built with `options` (e.g. `make("gptq",
  act_order=True)`)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown calibrated method {name!r}; registered: {', '.join(names())}")
  return _REGISTRY[name](**options)


def names(rule_type: type | None = None) -> tuple[str, ...]:
  """The registered method names, sorted; with `rule_type` (`QuantRule`, `PruneRule`),
  only the methods that take that rule and change the weights (a statistics-only method,
  `changes_weights = False`, such as the importance matrix, is left out), in the order
  they were registered."""
  if rule_type is None:
    return tuple(sorted(_REGISTRY))
  return tuple(n for n, f in _REGISTRY.items()
               if getattr(f, "rule_type", None) is rule_type
               and getattr(f, "changes_weights", True))
