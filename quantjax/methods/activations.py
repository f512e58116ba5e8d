"""Activation quantization: static ranges from observers, or dynamic at run time.

The activation spec travels in the params tree beside the weight it feeds:

* dynamic: `ActQuantized(weight, act_format)` (foundation); `ops.qdot`
  quantizes the input of the matmul at run time, per token when the format is
  per-channel, per tensor when it is per-tensor. W8A8 (int8 weight per output
  channel, int8 activations) runs as an int8 x int8 -> int32 `dot_general`.
* static: `StaticActQuantized(weight, act_scale, act_zero_point, act_format)`
  (`numerics.qarray`), a subclass whose scales were fixed from calibration
  batches by an `ActObserver` here (per tensor or per input channel; its
  range rule is a `numerics.calibrate.Calibration`, min-max, percentile or
  MSE, computed by the weights' estimator `calibrate.range_scales`).
  `ops.static_qdot` computes its matmul (`ops.qdot` calls it): int8 x int8
  -> int32 for a per-tensor symmetric int8 activation scale and an int8
  weight, else the input is quantized-dequantized with the fixed scales
  (per-channel input scales sit on the contraction axis and cannot be
  factored out of an integer dot). Both names are re-exported here.

The observers are pure: `init(k) -> stat`, `update(stat, x) -> stat`,
`finalize(stat, fmt) -> (scale, zero_point)`; the sequential driver
(`quantjax.methods.capture`) feeds them every matmul's input.

References:
  Jacob et al. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference. CVPR 2018, arXiv:1712.05877 (static
  ranges). Nagel et al. A White Paper on Neural Network Quantization, 2021,
  arXiv:2106.08295 (min-max / percentile / MSE range setting). Dettmers et al.
  LLM.int8(), 2022, arXiv:2208.07339 and Xiao et al. SmoothQuant, 2023
  (per-token dynamic activation scales).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics.formats import QuantFormat, resolve_format
from quantjax.numerics.qarray import ActQuantized, InputScaled, StaticActQuantized
from quantjax.ops import static_qdot

__all__ = ["ActObserver", "ActStat", "ACT_RANGE", "StaticActQuantized", "static_qdot",
           "attach_act_quant", "observe", "OBSERVER_METHODS", "observer_needs", "wrap_weight"]

OBSERVER_METHODS = calibrate_lib.RANGE_METHODS


class ActStat(NamedTuple):
  """Running statistics of one matmul input `[..., k]`.

  `lo`, `hi`: per-channel min and max `[k]`; `absmean`: per-channel running
  mean of |x| `[k]`; `count`: rows seen; `sample`: a bounded, evenly strided
  sample of rows `[s, k]` (for percentile and MSE).
  """

  lo: jax.Array
  hi: jax.Array
  absmean: jax.Array
  count: jax.Array
  sample: jax.Array


# The observer's default range rule: min-max; for percentile, the 99.99th (a
# finer tail than weights' 99.9: activation outliers are few and large); for
# MSE, 50 clip ratios down to 0.3 of the min-max range.
ACT_RANGE = calibrate_lib.Calibration(method="minmax", percentile=99.99, grid=50, min_ratio=0.3)


@dataclasses.dataclass(frozen=True, init=False)
class ActObserver:
  """How a static activation range is chosen: running statistics plus a range rule.

  Attributes:
    range: the range rule, a `numerics.calibrate.Calibration` (the same range
      estimator as weights', `calibrate.range_scales`) with method "minmax",
      "percentile" (clip |x|, or x at both ends for a zero-point format, at
      `percentile` of the sampled rows) or "mse" (the clip ratio of the
      observed min-max range with the least `norm`-error on the sampled rows,
      `grid` ratios from 1 down to `min_ratio`). Default `ACT_RANGE`: min-max,
      percentile 99.99, grid 50, min_ratio 0.3.
    granularity: "per_tensor" (one scale, usable by the int8 dot) or
      "per_channel" (one scale per input channel).
    max_samples: rows kept for percentile / MSE.

  `ActObserver(method=..., percentile=..., grid=..., min_ratio=...)` is short
  for `ActObserver(range=dataclasses.replace(ACT_RANGE, method=..., ...))`
  (fields given override those of `range` when both are passed); the rule is
  read as `observer.range`.
  """

  range: calibrate_lib.Calibration
  granularity: str
  max_samples: int

  def __init__(self, *, range: calibrate_lib.Calibration | None = None,  # noqa: A002
               granularity: str = "per_tensor", max_samples: int = 4096,
               method: str | None = None, percentile: float | None = None,
               grid: int | None = None, min_ratio: float | None = None):
    cal = ACT_RANGE if range is None else range
    if not isinstance(cal, calibrate_lib.Calibration):
      raise TypeError(f"observer range must be a Calibration, got {cal!r}")
    given = dict(method=method, percentile=percentile, grid=grid, min_ratio=min_ratio)
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("method", cal.method) not in OBSERVER_METHODS:
      raise ValueError(f"observer method {given.get('method', cal.method)!r} is not one of "
                       f"{OBSERVER_METHODS}")
    if given:
      cal = dataclasses.replace(cal, **given)  # Calibration validates the rest
    if granularity not in ("per_tensor", "per_channel"):
      raise ValueError(f"observer granularity must be 'per_tensor' or 'per_channel', got "
                       f"{granularity!r}")
    if max_samples < 1:
      raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    object.__setattr__(self, "range", cal)
    object.__setattr__(self, "granularity", granularity)
    object.__setattr__(self, "max_samples", max_samples)

  def init(self, k: int) -> ActStat:
    return ActStat(lo=jnp.full((k,), jnp.inf, jnp.float32),
                   hi=jnp.full((k,), -jnp.inf, jnp.float32),
                   absmean=jnp.zeros((k,), jnp.float32), count=jnp.zeros((), jnp.float32),
                   sample=jnp.zeros((0, k), jnp.float32))

  def update(self, stat: ActStat, x: jax.Array) -> ActStat:
    """Adds the rows of `x` `[..., k]`."""
    x2 = jnp.asarray(x).reshape(-1, x.shape[-1]).astype(jnp.float32)
    n = x2.shape[0]
    cnt = stat.count + jnp.asarray(n, jnp.float32)
    absmean = stat.absmean + (jnp.sum(jnp.abs(x2), 0) - stat.absmean * n) / cnt
    sample = stat.sample
    if self.range.method != "minmax":
      room = self.max_samples - sample.shape[0]
      if room > 0:
        stride = max(1, n // room)
        sample = jnp.concatenate([sample, x2[::stride][:room]], axis=0)
    return ActStat(lo=jnp.minimum(stat.lo, jnp.min(x2, 0)), hi=jnp.maximum(stat.hi, jnp.max(x2, 0)),
                   absmean=absmean, count=cnt, sample=sample)

  def _fmt(self, fmt: QuantFormat) -> QuantFormat:
    if fmt.granularity == "group" or fmt.is_cast:
      raise ValueError(f"static activation formats are per tensor or per channel, got {fmt}")
    if self.granularity == "per_tensor":
      return fmt.replace(granularity="per_tensor")
    return fmt.replace(granularity="per_channel", channel_axis=-1)

  def finalize(self, stat: ActStat, fmt: QuantFormat | str) -> tuple[jax.Array, jax.Array | None]:
    """Stored-shape `(scale, zero_point)` for an input `[t, k]`: `[1, 1]` or `[1, k]`."""
    fmt = self._fmt(resolve_format(fmt))
    if float(stat.count) == 0:
      raise ValueError("the observer saw no activations; run calibration batches first")
    per_tensor = self.granularity == "per_tensor"
    lo = jnp.min(stat.lo, keepdims=True) if per_tensor else stat.lo
    hi = jnp.max(stat.hi, keepdims=True) if per_tensor else stat.hi
    # Sample rows [s, k] are the blocks' values: one block (per tensor) or k blocks of a column.
    return calibrate_lib.range_scales(stat.sample, (0, 1) if per_tensor else (0,), fmt,
                                      self.range, lo.reshape(1, -1), hi.reshape(1, -1))


def observe(observer: ActObserver, batches: Sequence[jax.Array]) -> ActStat:
  """Runs `observer` over an iterable of activation batches `[..., k]`."""
  stat = None
  for x in batches:
    if stat is None:
      stat = observer.init(x.shape[-1])
    stat = observer.update(stat, x)
  if stat is None:
    raise ValueError("observe() got no batches")
  return stat


def attach_act_quant(params: Any, rules: Sequence[rules_lib.QuantRule], *,
                     act_stats: Mapping[str, ActStat] | None = None,
                     observer: ActObserver | None = None, strict: bool = False) -> Any:
  """Attaches activation quantization to the weights matched by rules with an `act_format`.

  The weight leaf itself is kept (a float array or an already quantized
  QArray, e.g. from GPTQ or SmoothQuant + RTN).

  Args:
    params: params tree.
    rules: `QuantRule`s; those with `act_format` select the weights whose
      matmul inputs are quantized (first match wins, as everywhere).
    act_stats: path -> `ActStat` of that weight's matmul input (from
      `capture.collect_stats(...)[path].act_stat()` / `observe`). With
      `observer`, gives static scales.
    observer: the range rule for static scales; None for dynamic.
    strict: raise when a rule matches nothing.

  Returns:
    The tree with `StaticActQuantized` (static) or `ActQuantized` (dynamic)
    leaves in place of the matched weights.

  Raises:
    ValueError: static requested but a matched weight has no statistics.
  """
  rules = tuple(rules)
  report = rules_lib.match_rules(params, rules)
  if strict and report.unused_rules:
    raise ValueError("attach_act_quant: rules that matched no leaf: " +
                     ", ".join(repr(r.module_path) for r in report.unused_rules))

  def fn(path: str, leaf: Any) -> Any:
    idx = report.assignments.get(path)
    if idx is None or leaf is None:
      return leaf
    rule = rules[idx]
    if rule.skip or rule.act_format is None:
      return leaf
    if isinstance(leaf, ActQuantized):
      leaf = leaf.weight
    if observer is None:
      return ActQuantized(weight=leaf, act_format=rule.act_format)
    if act_stats is None or path not in act_stats:
      raise ValueError(f"static activation quantization of {path}: no activation statistics "
                       "for it (collect them with quantjax.methods.capture.collect_stats or observe())")
    scale, zp = observer.finalize(act_stats[path], rule.act_format)
    return StaticActQuantized(weight=leaf, act_format=rule.act_format, act_scale=scale,
                              act_zero_point=zp)

  return rules_lib.map_with_paths(fn, params)


def observer_needs(observer: ActObserver | None) -> frozenset:
  """The input statistics (`capture.STAT_KINDS`) an observer's ranges need."""
  if observer is None:
    return frozenset()
  sample = {"sample"} if observer.range.method != "minmax" else set()
  return frozenset({"range", "absmean"} | sample)


def wrap_weight(part: Any, weight: Any, *, observer: ActObserver | None = None,
                input_scale: jax.Array | None = None) -> Any:
  """A calibrated method's final leaf for one weight (`capture.Part`).

  With the rule's `act_format`, the weight carries activation quantization:
  dynamic (`ActQuantized`) without an observer, static
  (`StaticActQuantized`, ranges from the part's input statistics) with one.
  With `input_scale` (`[K]`, AWQ / SmoothQuant), the input is divided by it
  (`InputScaled`); static ranges are then those of the scaled input.
  """
  act_fmt = getattr(part.rule, "act_format", None)
  w = weight
  if act_fmt is not None:
    if observer is None:
      w = ActQuantized(weight=w, act_format=act_fmt)
    else:
      if part.stats is None or part.stats.lo is None:
        raise ValueError(f"static activation ranges for {part.name}: no input statistics "
                         "(the method did not collect 'range')")
      stat = part.stats.act_stat(scale=input_scale)
      scale, zp = observer.finalize(stat, act_fmt)
      w = StaticActQuantized(weight=w, act_format=act_fmt, act_scale=scale, act_zero_point=zp)
  if input_scale is not None:
    w = InputScaled(weight=w, scale=part.k_to_leaf(jnp.asarray(input_scale, jnp.float32)))
  return w
