"""Statistics of a weight's matmul inputs, accumulated inside the compiled segments."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.methods import activations as act_lib
from quantjax.methods.capture.trace import Source


STAT_KINDS = ("hessian", "absmean", "sqmean", "range", "sample")


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class InputStats:
  """Statistics of a weight's matmul input, in the weight's K order.

  `count`: rows (tokens, or conv output positions) seen; `xtx`: `sum x x^T`
  `[K, K]` float32; `sum_abs` / `sum_sq`: per-feature sums; `lo` / `hi`:
  per-feature min / max; `sample`: a bounded, evenly strided sample of rows
  `[S, K]`. Fields a method did not ask for are None.
  """

  count: float
  xtx: np.ndarray | jax.Array | None = None
  sum_abs: jax.Array | None = None
  sum_sq: jax.Array | None = None
  lo: jax.Array | None = None
  hi: jax.Array | None = None
  sample: jax.Array | None = None

  def hessian(self) -> jax.Array:
    """GPTQ's `H = 2 X^T X / n`."""
    if self.xtx is None:
      raise ValueError("the Hessian was not collected (the method did not ask for 'hessian')")
    return 2.0 * jnp.asarray(self.xtx) / max(self.count, 1.0)

  @property
  def absmean(self) -> jax.Array:
    return jnp.asarray(self.sum_abs) / max(self.count, 1.0)

  @property
  def sqmean(self) -> jax.Array:
    return jnp.asarray(self.sum_sq) / max(self.count, 1.0)

  @property
  def absmax(self) -> jax.Array:
    return jnp.maximum(jnp.abs(jnp.asarray(self.lo)), jnp.abs(jnp.asarray(self.hi)))

  def act_stat(self, scale: jax.Array | None = None):
    """As an `activations.ActStat` (optionally of the input divided by `scale`)."""
    if self.lo is None:
      raise ValueError("activation ranges were not collected (the method did not ask for 'range')")
    lo, hi = jnp.asarray(self.lo), jnp.asarray(self.hi)
    am = jnp.asarray(self.sum_abs) / max(self.count, 1.0) if self.sum_abs is not None else \
        jnp.zeros_like(lo)
    sample = jnp.zeros((0, lo.shape[0]), jnp.float32) if self.sample is None else \
        jnp.asarray(self.sample)
    if scale is not None:
      s = jnp.asarray(scale, jnp.float32)
      lo, hi, am, sample = lo / s, hi / s, am / s, sample / s[None, :]
    return act_lib.ActStat(lo=lo, hi=hi, absmean=am, count=jnp.asarray(self.count, jnp.float32),
                           sample=sample)

  def take(self, slot: int) -> "InputStats":
    """Slice `slot` of statistics collected per slice (experts; leading axis)."""
    pick = lambda a: None if a is None else a[slot]  # noqa: E731
    return InputStats(count=float(np.asarray(self.count)[slot]), xtx=pick(self.xtx),
                      sum_abs=pick(self.sum_abs), sum_sq=pick(self.sum_sq), lo=pick(self.lo),
                      hi=pick(self.hi))

  @staticmethod
  def merge(stats: Sequence["InputStats"]) -> "InputStats":
    """Statistics of several matmuls that read one weight (summed / min / max / joined)."""
    if len(stats) == 1:
      return stats[0]

    def red(name, fn):
      vals = [getattr(s, name) for s in stats]
      return None if any(v is None for v in vals) else fn(vals)
    add = lambda vs: sum(jnp.asarray(v) for v in vs[1:]) + jnp.asarray(vs[0])  # noqa: E731
    return InputStats(
        count=float(sum(s.count for s in stats)), xtx=red("xtx", add), sum_abs=red("sum_abs", add),
        sum_sq=red("sum_sq", add),
        lo=red("lo", lambda vs: jnp.min(jnp.stack(vs), 0)),
        hi=red("hi", lambda vs: jnp.max(jnp.stack(vs), 0)),
        sample=red("sample", lambda vs: jnp.concatenate(vs, 0)))


def stat_init(k: int, needs: frozenset, n_slices: int = 0) -> dict[str, jax.Array]:
  if n_slices:  # one set of statistics per slice (expert), stacked
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n_slices,) + a.shape),
                        stat_init(k, needs))
  acc = {"count": jnp.zeros((), jnp.float32)}
  if "hessian" in needs:
    acc["xtx"] = jnp.zeros((k, k), jnp.float32)
  if "absmean" in needs:
    acc["sum_abs"] = jnp.zeros((k,), jnp.float32)
  if "sqmean" in needs:
    acc["sum_sq"] = jnp.zeros((k,), jnp.float32)
  if "range" in needs:
    acc["lo"] = jnp.full((k,), jnp.inf, jnp.float32)
    acc["hi"] = jnp.full((k,), -jnp.inf, jnp.float32)
  return acc


def stat_update(acc: dict, f: jax.Array, needs: frozenset, n_sample: int):
  """Adds feature rows `f` `[T, K]`; returns (acc, sample rows, non-finite count)."""
  f = f.astype(jnp.float32)
  out = dict(acc)
  out["count"] = acc["count"] + jnp.asarray(f.shape[0], jnp.float32)
  bad = jnp.sum(~jnp.isfinite(f)).astype(jnp.int32)
  if "xtx" in acc:
    out["xtx"] = acc["xtx"] + jnp.einsum("ni,nj->ij", f, f, precision=jax.lax.Precision.HIGHEST)
  if "sum_abs" in acc:
    out["sum_abs"] = acc["sum_abs"] + jnp.sum(jnp.abs(f), 0)
  if "sum_sq" in acc:
    out["sum_sq"] = acc["sum_sq"] + jnp.sum(f * f, 0)
  if "lo" in acc:
    out["lo"] = jnp.minimum(acc["lo"], jnp.min(f, 0))
    out["hi"] = jnp.maximum(acc["hi"], jnp.max(f, 0))
  sample = None
  if n_sample > 0:
    stride = max(1, f.shape[0] // n_sample)
    sample = f[::stride][:n_sample]
  return out, sample, bad


def stat_update_sliced(acc: dict, f: jax.Array, w: jax.Array, needs: frozenset):
  """Adds the rows of each slice: `f` `[S, T, K]` (or `[T, K]` shared by every slice, a
  ragged_dot's rows), `w` `[S, T]` 0/1: the rows each slice reads (the tokens routed to
  an expert). Returns (acc, None, non-finite count)."""
  f = f.astype(jnp.float32)
  w = w.astype(jnp.float32)
  shared = f.ndim == 2
  out = dict(acc)
  out["count"] = acc["count"] + jnp.sum(w, -1)
  bad = jnp.sum(~jnp.isfinite(f)).astype(jnp.int32)
  hi_p = jax.lax.Precision.HIGHEST
  if "xtx" in acc:
    out["xtx"] = acc["xtx"] + (
        jnp.einsum("ti,st,tj->sij", f, w, f, precision=hi_p) if shared else
        jnp.einsum("sti,st,stj->sij", f, w, f, precision=hi_p))
  af = jnp.abs(f)
  if "sum_abs" in acc:
    out["sum_abs"] = acc["sum_abs"] + (jnp.einsum("ti,st->si", af, w) if shared else
                                       jnp.einsum("sti,st->si", af, w))
  if "sum_sq" in acc:
    out["sum_sq"] = acc["sum_sq"] + (jnp.einsum("ti,st->si", f * f, w) if shared else
                                     jnp.einsum("sti,st->si", f * f, w))
  if "lo" in acc:
    fb = jnp.broadcast_to(f, w.shape + f.shape[-1:])
    on = (w > 0)[..., None]
    out["lo"] = jnp.minimum(acc["lo"], jnp.min(jnp.where(on, fb, jnp.inf), 1))
    out["hi"] = jnp.maximum(acc["hi"], jnp.max(jnp.where(on, fb, -jnp.inf), 1))
  return out, None, bad


def slice_rows(f: jax.Array, gs: jax.Array | None) -> jax.Array:
  """`[S, T]` 0/1: which rows of a sliced source's features each slice reads. A
  ragged_dot's group g reads rows `[sum(gs[:g]), sum(gs[:g+1]))`; a batched matmul's
  slice reads its own rows, of which all-zero ones (empty capacity slots of a
  dispatch) are not counted."""
  if gs is not None:
    ends = jnp.cumsum(gs.astype(jnp.int32))
    starts = ends - gs.astype(jnp.int32)
    r = jnp.arange(f.shape[0])[None, :]
    return ((r >= starts[:, None]) & (r < ends[:, None])).astype(jnp.float32)
  return jnp.any(f != 0, axis=-1).astype(jnp.float32)


def features(x: jax.Array, src: Source) -> jax.Array:
  """The input operand `x` as `[T, K]` features in the weight's K order (`[S, T, K]`
  for a batched source: one row set per slice)."""
  if src.x_batch:
    keep = [d for d in range(x.ndim) if d not in src.x_contract and d not in src.x_batch]
    xt = jnp.transpose(x, list(src.x_batch) + keep + list(src.x_contract))
    f = xt.reshape(src.n_slices, -1, src.k)
    if src.k_src is not None:
      f = jnp.take(f, jnp.asarray(src.k_src), axis=2)
    return f
  if src.kind in ("dot_general", "ragged_dot_general"):
    keep = [d for d in range(x.ndim) if d not in src.x_contract]
    f = jnp.transpose(x, keep + list(src.x_contract)).reshape(-1, src.k)
  else:
    c = src.conv
    patches = jax.lax.conv_general_dilated_patches(
        x, filter_shape=c["filter_shape"], window_strides=c["window_strides"],
        padding=c["padding"], lhs_dilation=c["lhs_dilation"], rhs_dilation=c["rhs_dilation"],
        dimension_numbers=c["dimension_numbers"], precision=jax.lax.Precision.HIGHEST)
    f = jnp.moveaxis(patches, c["dimension_numbers"].out_spec[1], -1).reshape(-1, src.k)
  if src.k_src is not None:
    f = jnp.take(f, jnp.asarray(src.k_src), axis=1)
  return f


def finalize_stats(acc_names, acc, samples, max_samples) -> InputStats:
  a = dict(zip(acc_names, acc))
  count = np.asarray(a["count"])
  st = InputStats(count=float(count) if count.ndim == 0 else count, xtx=a.get("xtx"),
                  sum_abs=a.get("sum_abs"),
                  sum_sq=a.get("sum_sq"), lo=a.get("lo"), hi=a.get("hi"))
  if samples:
    st.sample = jnp.concatenate(samples, 0)[:max_samples]
  return st
