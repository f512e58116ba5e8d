"""Segments: the pieces of the traced program between two groups, compiled once per
structure and run over all calibration batches."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from quantjax import ops
from quantjax.methods import activations as act_lib
from quantjax.methods.capture.trace import (CHEAP, Capture, DebugInfo, Flat, Layout, Site,
                                            const_eval, is_drop, is_lit)
from quantjax.methods.capture.stats import (features, slice_rows, stat_init, stat_update,
                                            stat_update_sliced)
from quantjax.methods.capture.spill import DiskStack, Spill
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import resolve_format
from quantjax.numerics.qarray import ActQuantized, InputScaled


# ----------------------------------------------------------------------------
# Segments.
# ----------------------------------------------------------------------------

def _splice(out_eqns: list, fn: Callable, ins: Sequence[Any], const_in: list,
            const_vals: list) -> list[Any]:
  """Traces `fn(*ins)` and appends its equations (renamed) to `out_eqns`.

  Constants of the trace become new segment inputs (`const_in`, `const_vals`).
  """
  avals = [jax.ShapeDtypeStruct(a.aval.shape, a.aval.dtype) for a in ins]
  closed = jax.make_jaxpr(fn)(*avals)
  env = {}
  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    nv = jcore.Var(jax.typeof(c))
    const_in.append(nv)
    const_vals.append(c)
    env[v] = nv
  for v, a in zip(closed.jaxpr.invars, ins):
    env[v] = a

  def read(a):
    return a if is_lit(a) else env[a]
  for e in closed.jaxpr.eqns:
    outs = [Flat.fresh(v) for v in e.outvars]
    out_eqns.append(e.replace(invars=[read(a) for a in e.invars], outvars=outs))
    for v, o in zip(e.outvars, outs):
      if not is_drop(v):
        env[v] = o
  return [read(a) for a in closed.jaxpr.outvars]


class SiteTransform:
  """How a site's input is changed to reproduce a quantized leaf's activation quantization.

  The site keeps multiplying by the leaf's effective float weight (`deq / s`),
  so the input becomes `s * fq(x / s)`.
  """

  def __init__(self, kind: str, fmt: Any, s_k: jax.Array | None, scale: jax.Array | None,
               zp: jax.Array | None):
    self.kind, self.fmt, self.s_k, self.scale, self.zp = kind, fmt, s_k, scale, zp

  def key(self):
    return (self.kind, self.fmt, self.s_k is not None,
            None if self.scale is None else tuple(self.scale.shape),
            None if self.zp is None else (tuple(self.zp.shape), str(self.zp.dtype)))

  def data(self) -> list[jax.Array]:
    return [a for a in (self.s_k, self.scale, self.zp) if a is not None]

  def apply(self, x2: jax.Array, data: list[jax.Array]) -> jax.Array:
    """`x2` `[T, K]` (operand order)."""
    it = iter(data)
    s = next(it) if self.s_k is not None else None
    xf = x2.astype(jnp.float32)
    if s is not None:
      xf = xf / s[None, :]
    if self.kind == "dynamic":
      q = ops.quantize_activation(xf, self.fmt)
      xf = q.dequantize(jnp.float32).reshape(xf.shape)
    else:
      scale = next(it)
      zp = next(it) if self.zp is not None else None
      xf = qarray_lib.quantize_with_scale(xf, self.fmt, scale, zp).dequantize(jnp.float32)
    if s is not None:
      xf = xf * s[None, :]
    return xf.astype(x2.dtype)


def site_transform(leaf_value: Any, layout: Layout, site: Site) -> SiteTransform | None:
  """The input transform a quantized leaf part implies at one of its sites (or None)."""
  s_k = None
  w = leaf_value
  if isinstance(w, InputScaled):
    s_k = layout.leaf_vector_to_k(w.scale)
    w = w.weight
  if not isinstance(w, ActQuantized):
    return None
  if site.kind != "dot_general":
    raise ValueError(f"{site.path}: activation quantization of a convolution's input is not "
                     "supported")
  if s_k is not None and site.k_src is not None:
    s_k = jnp.take(s_k, jnp.argsort(jnp.asarray(site.k_src)))  # to operand order
  elif s_k is not None:
    s_k = jnp.asarray(s_k)
  if isinstance(w, act_lib.StaticActQuantized):
    fmt = w.input_format
    scale = jnp.asarray(w.act_scale)
    zp = None if w.act_zero_point is None else jnp.asarray(w.act_zero_point)
    if scale.size > 1:
      if site.k_src is not None:
        inv = jnp.argsort(jnp.asarray(site.k_src))
        scale = jnp.take(scale.reshape(-1), inv).reshape(scale.shape)
        zp = None if zp is None else jnp.take(zp.reshape(-1), inv).reshape(zp.shape)
    return SiteTransform("static", fmt, None if s_k is None else s_k.astype(jnp.float32), scale, zp)
  return SiteTransform("dynamic", resolve_format(w.act_format),
                    None if s_k is None else s_k.astype(jnp.float32), None, None)


def _apply_transform_to_operand(t: SiteTransform, x, x_contract, data):
  keep = [d for d in range(x.ndim) if d not in x_contract]
  perm = keep + list(x_contract)
  xt = jnp.transpose(x, perm)
  lead = xt.shape[:len(keep)]
  x2 = xt.reshape(int(math.prod(lead)) if lead else 1, -1)
  y = t.apply(x2, data).reshape(xt.shape)
  return jnp.transpose(y, np.argsort(perm))


def _params_key(eqns) -> tuple:
  """Identities of constants hidden inside equation params (bodies of opaque
  `cond` / `scan` / `while`): equal printed jaxprs with other constants must not
  share a compiled segment."""
  out = []
  for e in eqns:
    for v in e.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jcore.ClosedJaxpr) and sub.consts:
          out.append(tuple(id(c) for c in sub.consts))
  return tuple(out)


@dataclasses.dataclass
class Segment:
  fn: Any
  env_in: list[Any]
  env_out: list[Any]
  weights_in: list[tuple[int, tuple[int, ...] | None]]  # (leaf, region or None for whole)
  const_vals: list[Any]
  transform_data: list[Any]
  sources: list[int]
  acc_names: list[list[str]]
  n_sample: int
  # The segment's one-batch program `raw(*env_b, *weights, *consts, *data, *accs)` (shared
  # by segments of one structure) and its jaxpr: what `span` hands to block objectives.
  raw: Any = None
  jaxpr: Any = None


class Runner:
  """Builds the compiled segments of a capture (cached by structure)."""

  def __init__(self, cap: Capture, virtual_uses: dict[Any, int],
               compiled: dict[Any, Any] | None = None):
    self.cap = cap
    self.last_use: dict[Any, int] = {}
    for i, e in enumerate(cap.flat.eqns):
      for a in e.invars:
        if not is_lit(a):
          self.last_use[a] = i
    for v, pos in virtual_uses.items():
      self.last_use[v] = max(self.last_use.get(v, -1), pos)
    self.cache: dict[Any, Any] = {}
    # Compiled segments by structure; shared between calls when the caller passes one
    # (identical layers calibrated one call at a time compile once).
    self.compiled: dict[Any, Any] = {} if compiled is None else compiled
    self.compiles = 0

  def _order(self, v):
    cap = self.cap
    if v in cap.batch_set:
      return (-1, cap.batch_index[v])
    e = cap.flat.eqns[cap.prod[v]]
    return (cap.prod[v], e.outvars.index(v))

  def _static(self, var, needed: set, weights: dict, consts: dict) -> None:
    """Collects the static sub-DAG producing `var`; leaves, layer slices of
    leaves and constants become segment inputs."""
    cap, flat = self.cap, self.cap.flat
    stack = [var]
    while stack:
      v = stack.pop()
      if is_lit(v) or v in needed or v in weights or v in consts:
        continue
      if v in cap.leaf_of:
        weights[v] = (cap.leaf_of[v], None)
      elif v in flat._const_index:
        consts[v] = flat._const_index[v]
      elif v in flat.regions and (not is_lit(flat.regions[v][0])) and \
          flat.regions[v][0] in cap.leaf_of:
        src, i = flat.regions[v]
        weights[v] = (cap.leaf_of[src], (i,))
      elif v not in flat.pdep and flat.eqns[cap.prod[v]].primitive.name not in CHEAP:
        # A value of no batch and no params (RoPE tables, masks): computed once and
        # passed in, instead of recomputed by every segment of every layer.
        consts[v] = self._folded(v)
      else:
        needed.add(v)
        stack.extend(flat.eqns[cap.prod[v]].invars)

  def _folded(self, v):
    key = ("folded", v)
    if key not in self.cache:
      self.cache[key] = jnp.asarray(const_eval(self.cap.flat, self.cap.prod, v,
                                                self.cap._const_cache))
    return self.cache[key]

  def build(self, lo: int, hi: int, sources: list[int], needs: frozenset, n_sample: int,
            transforms: Mapping[int, SiteTransform]) -> Segment:
    cap, flat = self.cap, self.cap.flat
    eqns, bdep = flat.eqns, cap.bdep
    live_out = sorted({v for v, u in self.last_use.items()
                       if v in bdep and u >= hi and (v in cap.batch_set or cap.prod[v] < hi)},
                      key=self._order)
    needed = set(live_out) | {cap.sources[si].root for si in sources}
    needed |= {cap.sources[si].gs_var for si in sources
               if cap.sources[si].gs_var is not None and cap.sources[si].gs_var in bdep}
    include = []
    for i in range(hi - 1, lo - 1, -1):
      outs = [o for o in eqns[i].outvars if not is_drop(o)]
      if any(o in needed for o in outs) and any(o in bdep for o in outs):
        include.append(i)
        needed.update(a for a in eqns[i].invars if not is_lit(a))
    include.reverse()
    chains = [ci for si in sources for ci in cap.sources[si].chain]
    env_in = sorted({v for v in needed if v in bdep and (v in cap.batch_set or cap.prod[v] < lo)},
                    key=self._order)
    st_needed: set = set()
    weights: dict[Any, tuple[int, Any]] = {}
    consts: dict[Any, int] = {}
    for i in include + chains:
      for a in (eqns[i].invars if i in include else eqns[i].invars[1:]):
        if not is_lit(a) and a not in bdep:
          self._static(a, st_needed, weights, consts)
    for si in sources:
      gs = cap.sources[si].gs_var
      if gs is not None and not is_lit(gs) and gs not in bdep:
        self._static(gs, st_needed, weights, consts)
    w_vars = sorted(weights, key=lambda v: (weights[v][0], weights[v][1] or ()))
    c_vars = sorted(consts, key=lambda v: (0, consts[v]) if isinstance(consts[v], int) else
                    (1, cap.prod[v]))
    seg_eqns = [eqns[i] for i in sorted({cap.prod[v] for v in st_needed})]
    const_in = list(c_vars)
    const_vals = [flat.consts[consts[v]] if isinstance(consts[v], int) else consts[v]
                  for v in c_vars]
    data_in: list[Any] = []
    data_vals: list[Any] = []
    tkeys = []
    site_at = {cap.sites[si].eqn_index: si for si in transforms}
    for i in include:
      e = eqns[i]
      si = site_at.get(i)
      if si is None:
        seg_eqns.append(e)
        continue
      t, site = transforms[si], cap.sites[si]
      dvars = [jcore.Var(jax.typeof(d)) for d in t.data()]
      data_in.extend(dvars)
      data_vals.extend(t.data())
      tkeys.append((i - lo, t.key()))
      x = e.invars[1 - site.w_pos]

      def tf(xx, *dd, _t=t, _c=site.x_contract):
        return _apply_transform_to_operand(_t, xx, _c, list(dd))
      (x2,) = _splice(seg_eqns, tf, [x] + dvars, const_in, const_vals)
      ins = list(e.invars)
      ins[1 - site.w_pos] = x2
      seg_eqns.append(e.replace(invars=ins))
    acc_in, acc_out, bad_out, sample_out, acc_names = [], [], [], [], []
    for si in sources:
      src = cap.sources[si]
      acc0 = stat_init(src.k, needs, src.n_slices)
      names = sorted(acc0)
      acc_names.append(names)
      a_in = [jcore.Var(jax.typeof(acc0[n])) for n in names]
      acc_in.extend(a_in)
      x = src.root
      for ci in src.chain:
        ce = eqns[ci]
        nv = Flat.fresh(ce.outvars[0])
        seg_eqns.append(ce.replace(invars=[x] + list(ce.invars[1:]), outvars=[nv]))
        x = nv

      extra = [src.gs_var] if src.gs_var is not None else []

      def upd(xv, *rest, _src=src, _names=names, _ng=len(extra)):
        acc = dict(zip(_names, rest[_ng:]))
        f = features(xv, _src)
        if _src.sliced:
          gs = rest[0] if _ng else None
          new, sample, bad = stat_update_sliced(acc, f, slice_rows(f, gs), needs)
        else:
          new, sample, bad = stat_update(acc, f, needs, n_sample)
        return tuple([new[n] for n in _names] + [bad] + ([sample] if sample is not None else []))
      outs = _splice(seg_eqns, upd, [x] + extra + a_in, const_in, const_vals)
      acc_out.extend(outs[:len(names)])
      bad_out.append(outs[len(names)])
      if n_sample:
        sample_out.append(outs[len(names) + 1])
    invars = env_in + w_vars + const_in + data_in + acc_in
    outvars = live_out + acc_out + bad_out + sample_out
    effects = frozenset().union(*[e.effects for e in seg_eqns]) if seg_eqns else frozenset()
    dbg = DebugInfo("quantjax calibration segment", f"equations {lo}:{hi}",
                    tuple(f"in{i}" for i in range(len(invars))),
                    tuple(f"out{i}" for i in range(len(outvars))))
    jaxpr = jcore.Jaxpr([], invars, outvars, seg_eqns, effects, dbg)
    key = (str(jaxpr), _params_key(seg_eqns), tuple(tkeys))
    fn = self.compiled.get(key)
    raw = self.compiled.get(("raw",) + key)
    if fn is None:
      raw = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, []))
      fn = _scan_over_batches(raw, len(env_in), len(invars) - len(env_in) - len(acc_in),
                              len(acc_in), len(live_out))
      self.compiled[key] = fn
      self.compiled[("raw",) + key] = raw
      self.compiles += 1
    return Segment(fn=fn, env_in=env_in, env_out=live_out,
                    weights_in=[weights[v] for v in w_vars], const_vals=const_vals,
                    transform_data=data_vals, sources=list(sources), acc_names=acc_names,
                    n_sample=n_sample, raw=raw, jaxpr=jaxpr)


def _scan_over_batches(raw: Callable, n_env: int, n_static: int, n_acc: int, n_env_out: int):
  """One compiled call per segment for all batches: a `lax.scan` over the stacked
  environments `[n_batches, ...]`, the statistics carried across batches.

  Against one call per batch this allocates the segment's temporaries once
  (XLA reuses the loop body's buffers), which on CPU saves the page faults of
  fresh buffers in every call (measured: 160 MB of faults per attention call).
  """
  def run(env, static, accs):
    n = env[0].shape[0] if env else 1

    def body(acc, env_b):
      outs = raw(*env_b, *static, *acc)
      return list(outs[n_env_out:n_env_out + n_acc]), (list(outs[:n_env_out]),
                                                        list(outs[n_env_out + n_acc:]))
    accs, (env_out, rest) = jax.lax.scan(body, list(accs), list(env), length=n)
    return env_out, accs, rest
  del n_env, n_static
  return jax.jit(run, donate_argnums=(2,))


def run_segment(seg: Segment, state: "State", env: list[Any], env_vars: list[Any],
                 accs: list[list[Any]], batch0: int, cap: Capture,
                 weights: list[Any] | None = None):
  """Runs `seg` on the stacked environments `[n_batches, ...]`.

  Returns (new stacked environment, accumulators, samples per source).
  """
  if weights is None:
    weights = [state.weight_input(li, reg) for li, reg in seg.weights_in]
  pos = {v: i for i, v in enumerate(env_vars)}
  flat_acc = [x for a in accs for x in a]
  env_out, flat_acc, rest = seg.fn([env[pos[v]] for v in seg.env_in],
                                   [*weights, *seg.const_vals, *seg.transform_data], flat_acc)
  ns = len(seg.sources)
  o = 0
  accs = []
  for names in seg.acc_names:
    accs.append(list(flat_acc[o:o + len(names)]))
    o += len(names)
  bads = rest[:ns]
  samples = [[r.reshape(-1, r.shape[-1])] for r in rest[ns:]] if seg.n_sample else \
      [[] for _ in seg.sources]
  for j, si in enumerate(seg.sources):
    counts = np.asarray(bads[j]).reshape(-1)
    if counts.any():
      b = int(np.argmax(counts > 0))
      names = sorted({s.path for s in cap.sites if s.source == si})
      raise ValueError(
          f"calibration batch {batch0 + b}: the input of {', '.join(names[:3])} holds "
          f"{int(counts[b])} NaN/Inf value(s) ({int((counts > 0).sum())} of {len(counts)} "
          "batches affected); check the batch and the layers before it (token ids beyond the "
          "vocabulary, overflowing activations)")
  return list(env_out), accs, samples


def env_bytes(n: int, avals: Sequence[Any]) -> int:
  return n * sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                 for a in avals)


def env_batch(x: Any, b: int) -> Any:
  return x.get(b) if isinstance(x, DiskStack) else x[b:b + 1]


def run_batched(seg: Segment, state: "State", envs: list[Any], env_vars: list[Any],
                 accs: list[list[Any]], n: int, cap: Capture, spill: Spill):
  """`run_segment` one batch at a time: inputs read per batch (from memory or disk),
  outputs kept on disk when their stack exceeds the spill limit. Same equations, same
  accumulation order as the stacked call."""
  weights = [state.weight_input(li, reg) for li, reg in seg.weights_in]
  avals = [v.aval for v in seg.env_out]
  to_disk = env_bytes(n, avals) > spill.limit
  outs: list[Any] = ([DiskStack(spill, a.shape, a.dtype) for a in avals] if to_disk
                     else [[] for _ in avals])
  samples: list[list[Any]] = [[] for _ in seg.sources]
  for b in range(n):
    env_b, accs, smp = run_segment(seg, state, [env_batch(x, b) for x in envs], env_vars,
                                    accs, b, cap, weights)
    for j, o in enumerate(env_b):
      if to_disk:
        outs[j].put(b, o[0])
      else:
        outs[j].append(o)
    for j in range(len(seg.sources)):
      samples[j].extend(smp[j])
    del env_b
  if to_disk:
    spill.spilled_bytes += env_bytes(n, avals)
  else:
    outs = [jnp.concatenate(o) for o in outs]
  for x in envs:  # the inputs are done with (a value carried on was copied into outs)
    if isinstance(x, DiskStack):
      x.close()
  return outs, accs, samples


def region_get(value, layout: Layout):
  return value[layout.index] if layout.region else value


class State:
  """Current float leaf values (what the forward computes with) and finished results."""

  def __init__(self, p_leaves: list[Any]):
    self.leaves = list(p_leaves)
    self.results: dict[tuple[int, tuple], Any] = {}
    self.stack_axes: dict[int, tuple[int, ...]] = {}  # leaf -> its slices' fixed axes

  def weight_input(self, leaf: int, region):
    v = self.leaves[leaf]
    return v if region is None else v[region]

  def set_part(self, leaf: int, layout: Layout, result: Any, effective: jax.Array):
    """Records `result` and puts `effective` (in the dtype the forward is to see) in place."""
    self.results[(leaf, layout.region)] = result
    self.stack_axes[leaf] = layout.fixed
    eff = jnp.asarray(effective)
    if not layout.region:
      self.leaves[leaf] = eff
      return
    cur = jnp.asarray(self.leaves[leaf])
    self.leaves[leaf] = cur.astype(eff.dtype).at[layout.index].set(eff)
