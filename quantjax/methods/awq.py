"""AWQ: activation-aware weight quantization by per-input-channel scaling.

Weights that see large activations matter most. AWQ multiplies input channel
`j` of the weights by `s_j = mean|X_j|^a` (and divides the input by it,
folded into the producing op: the RMSNorm before q/k/v and gate/up, up_proj
before down_proj, v_proj before o_proj when there is no grouped-query
attention), with `a` chosen on a grid in [0, 1) to minimise the error of the
group's outputs after quantization, `||X W - (X/s) Q(diag(s) W)||^2`, on
calibration rows. An optional clipping search then shrinks each group's
weight range (per output channel and weight group) to the ratio with the
least output error. The weights are finally quantized round-to-nearest to
plain `QArray`s; the model stays equivalent up to quantization.

Here the error is measured on each fold group's own linear outputs (the
concatenation of its consumers' outputs); the reference implementation
measures it after the whole attention / MLP module.

References:
  Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han. AWQ:
  Activation-aware Weight Quantization for LLM Compression and
  Acceleration. MLSys 2024, arXiv:2306.00978. Reference code:
  github.com/mit-han-lab/llm-awq.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from quantjax import rules as rules_lib
from quantjax.methods import smoothquant as sq
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat, resolve_format

__all__ = ["awq_search_scales", "awq_clip", "awq_layer", "fake_quant_weight"]


@functools.partial(jax.jit, static_argnames=("fmt",))
def fake_quant_weight(w: jax.Array, fmt: QuantFormat) -> jax.Array:
  """Round-to-nearest quantize-dequantize (min-max scales), jitted per format."""
  return qarray_lib.quantize(w, fmt).dequantize(jnp.float32)


@functools.partial(jax.jit, static_argnames=("fmts",))
def _scaled_error(x, ref, ws, s, fmts):
  outs = []
  for w, f in zip(ws, fmts):
    outs.append(jnp.dot(x / s[None, :], fake_quant_weight(w * s[:, None], f),
                        precision=jax.lax.Precision.HIGHEST))
  out = jnp.concatenate(outs, axis=1)
  return jnp.mean((out - ref) ** 2)


def awq_search_scales(x: jax.Array, x_absmean: jax.Array, weights: Sequence[jax.Array],
                      formats: Sequence[QuantFormat | str], *, grid: int = 20
                      ) -> tuple[jax.Array, float, list[float]]:
  """Grid search of AWQ's per-input-channel scales.

  Args:
    x: calibration input rows `[n, k]`.
    x_absmean: per-channel mean|x| `[k]` (over all calibration tokens).
    weights: the consumers' kernels, each `[k, out_c]`.
    formats: their formats.
    grid: exponents `a = i / grid`, `i = 0..grid-1` (a = 0 is plain RTN).

  Returns:
    `(s [k], best error, errors per a)`.
  """
  x = jnp.asarray(x, jnp.float32)
  ws = tuple(jnp.asarray(w, jnp.float32) for w in weights)
  fmts = tuple(resolve_format(f) for f in formats)
  ref = jnp.concatenate([jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) for w in ws], axis=1)
  m = jnp.maximum(jnp.asarray(x_absmean, jnp.float32), 1e-8)
  errs, best, best_s = [], None, None
  for i in range(grid):
    a = i / grid
    s = m ** a
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    e = float(_scaled_error(x, ref, ws, s, fmts))
    errs.append(e)
    if best is None or e < best:
      best, best_s = e, s
  return best_s, best, errs


@functools.partial(jax.jit, static_argnames=("fmt", "grid", "max_shrink"))
def _clip_search(w, x, fmt, grid, max_shrink):
  k, out = w.shape
  g = fmt.group_size if fmt.granularity == "group" else k
  ng = k // g
  wg = w.reshape(ng, g, out)
  xg = x.reshape(x.shape[0], ng, g)
  amax0 = jnp.max(jnp.abs(wg), axis=1, keepdims=True)  # [G, 1, out]
  ref = jnp.einsum("nGg,Ggo->nGo", xg, wg, precision=jax.lax.Precision.HIGHEST)

  def body(carry, r):
    best_e, best_m = carry
    mx = amax0 * r
    wc = jnp.clip(wg, -mx, mx).reshape(k, out)
    q = fake_quant_weight(wc, fmt).reshape(ng, g, out)
    e = jnp.mean((jnp.einsum("nGg,Ggo->nGo", xg, q, precision=jax.lax.Precision.HIGHEST)
                  - ref) ** 2, axis=0)[:, None, :]
    better = e < best_e
    return (jnp.where(better, e, best_e), jnp.where(better, mx, best_m)), None

  ratios = 1.0 - jnp.arange(int(grid * max_shrink), dtype=jnp.float32) / grid
  init = (jnp.full(amax0.shape, jnp.inf, jnp.float32), amax0)
  (_, best_m), _ = jax.lax.scan(body, init, ratios)
  return jnp.clip(wg, -best_m, best_m).reshape(k, out)


def awq_clip(w: jax.Array, x: jax.Array, fmt: QuantFormat | str, *, grid: int = 20,
             max_shrink: float = 0.5, max_rows: int = 512) -> jax.Array:
  """AWQ's clipping search: per (weight group, output channel), the clip
  ratio of max|w| in `1, 1 - 1/grid, ...` (down to `1 - max_shrink`) with the
  least error of `x @ w` restricted to that group. Returns the clipped `w`."""
  fmt = resolve_format(fmt)
  w = jnp.asarray(w, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  if x.shape[0] > max_rows:
    x = x[:: x.shape[0] // max_rows][:max_rows]
  if fmt.granularity == "group" and w.shape[0] % fmt.group_size:
    raise ValueError(f"group_size {fmt.group_size} does not divide {w.shape[0]}")
  return _clip_search(w, x, fmt, grid, max_shrink)


def _local_groups(cfg, v_to_o: bool, up_to_down: bool) -> list[sq.FoldGroup]:
  groups = [sq.FoldGroup("input_norm/scale", ("attn/q_proj/kernel", "attn/k_proj/kernel",
                                              "attn/v_proj/kernel"))]
  if v_to_o and cfg.num_heads == cfg.num_kv_heads:
    groups.append(sq.FoldGroup("attn/v_proj/kernel", ("attn/o_proj/kernel",), "linear"))
  groups.append(sq.FoldGroup("post_attn_norm/scale", ("mlp/gate_proj/kernel",
                                                      "mlp/up_proj/kernel")))
  if up_to_down:
    groups.append(sq.FoldGroup("mlp/up_proj/kernel", ("mlp/down_proj/kernel",), "linear"))
  return groups


def awq_layer(rules: Sequence[rules_lib.QuantRule], *, grid: int = 20, clip: bool = True,
              clip_grid: int = 20, v_to_o: bool = True, up_to_down: bool = True,
              record: dict | None = None):
  """A `sequential.LayerMethod` applying AWQ to one decoder layer.

  Scales are searched per fold group (q/k/v, o (without GQA), gate/up, down),
  folded into the producers, then weights are clipped (except q and k, as in
  the reference) and quantized round-to-nearest with the rules' formats.
  `record`, if given, receives `{group path: best exponent error list}`.
  """
  from quantjax.methods import sequential as seq
  rules = tuple(rules)

  def run(i, lp, stats, ctx):
    prefix = ctx["prefix"]
    rule_of = {n: seq._rule_for(rules, f"{prefix}/{n}") for n in seq.LINEARS}
    s_in: dict = {}  # consumer -> the scales its input is now divided by
    for g in _local_groups(ctx["config"], v_to_o, up_to_down):
      cons = [c for c in g.consumers if rule_of.get(c) is not None]
      if not cons:
        continue
      st = stats[g.consumers[0]]
      ws = [seq._get(lp, c) for c in cons]
      s, _, errs = awq_search_scales(st.sample, st.absmean, ws,
                                     [rule_of[c].format for c in cons], grid=grid)
      if record is not None:
        record[f"{prefix}/{g.prev}"] = errs
      lp = sq.apply_scales(lp, [g], {g.prev: s})
      for c in g.consumers:
        s_in[c] = s
    for name in seq.LINEARS:
      rule = rule_of[name]
      if rule is None:
        continue
      w = jnp.asarray(seq._get(lp, name), jnp.float32)
      if clip and name not in ("attn/q_proj/kernel", "attn/k_proj/kernel"):
        x = jnp.asarray(stats[name].sample, jnp.float32)
        if name in s_in:
          x = x / s_in[name][None, :]
        w = awq_clip(w, x, rule.format, grid=clip_grid)
      lp = seq._set(lp, name, qarray_lib.quantize(w, rule.format, calibration=rule.calibration))
    return lp

  return run
