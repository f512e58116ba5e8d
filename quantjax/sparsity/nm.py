"""N:M structured sparsity and its compressed storage.

`nm_mask(w, n, m)` keeps the `n` largest-scoring values in every run of `m`
consecutive values along the input axis (axis 0 of a `[in, out]` kernel),
the pattern sparse tensor cores accelerate for 2:4. `compress_nm` stores only
the kept values plus their positions inside each run (2 bits each for m = 4,
packed four per byte), so a 2:4 FP16 weight really takes 9/16 of its dense
bytes; `NMSparse` is a pytree that dequantizes back to the dense masked array.

References:
  Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021,
  arXiv:2104.08378 (2:4 sparsity on NVIDIA Ampere).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.sparsity import _select as select_lib

__all__ = ["nm_mask", "nm_mask_from_scores", "NMSparse", "compress_nm"]


def _check_nm(shape, n: int, m: int, axis: int) -> int:
  if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
    raise ValueError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
  if len(shape) == 0:
    raise ValueError("N:M sparsity needs an array with at least one axis")
  axis = axis % len(shape)
  if shape[axis] % m:
    raise ValueError(f"N:M with m={m} needs axis {axis} of shape {tuple(shape)} to be a multiple "
                     f"of {m}, got {shape[axis]}")
  return axis


def nm_mask_from_scores(scores: jax.Array, n: int, m: int, axis: int = 0) -> jax.Array:
  """Boolean mask keeping the top-`n` scores in each run of `m` along `axis`
  (ties broken by position: the earlier one is kept)."""
  axis = _check_nm(scores.shape, n, m, axis)
  return _nm_keep(jnp.asarray(scores), n=n, m=m, axis=axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def _nm_keep(scores: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
  s = jnp.moveaxis(scores, axis, -1)
  g = s.reshape(s.shape[:-1] + (s.shape[-1] // m, m))
  if m <= 32:
    # rank by pairwise comparison within each run: m compares per value,
    # far cheaper than XLA's sort on CPU, and the same ranks
    ranks = select_lib.run_rank(g)
  else:
    order = jnp.argsort(-g, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
  keep = (ranks < n).reshape(s.shape)
  return jnp.moveaxis(keep, -1, axis)


def nm_mask(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
  """Magnitude N:M mask: keep the `n` largest |w| in each run of `m` along `axis`."""
  return nm_mask_from_scores(jnp.abs(jnp.asarray(w, jnp.float32)), n, m, axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMSparse:
  """An N:M-sparse array stored compressed along axis 0.

  Children: `values` `[rows*n/m, ...]` (the kept values, in order) and
  `positions` (uint8, the index of each kept value inside its run of `m`,
  packed `8 // bits` per byte). Static: `n`, `m`, `shape`, `dtype`.
  """

  values: jax.Array
  positions: jax.Array
  n: int = dataclasses.field(metadata=dict(static=True))
  m: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def pos_bits(self) -> int:
    return max(1, math.ceil(math.log2(self.m)))

  @property
  def nbytes(self) -> int:
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in (self.values, self.positions))

  def dense(self, dtype: Any = None) -> jax.Array:
    """The dense array with zeros where values were pruned."""
    dtype = self.dtype if dtype is None else dtype
    rows = self.shape[0]
    groups = rows // self.m
    rest = self.shape[1:]
    pos = _unpack_positions(self.positions, self.pos_bits, groups * self.n, rest)
    pos = pos.reshape((groups, self.n) + rest).astype(jnp.int32)
    vals = self.values.reshape((groups, self.n) + rest)
    onehot = jax.nn.one_hot(pos, self.m, axis=2, dtype=jnp.float32)  # [g, n, m, ...]
    dense = jnp.sum(onehot * vals[:, :, None].astype(jnp.float32), axis=1)
    return dense.reshape(self.shape).astype(dtype)

  def __jax_array__(self) -> jax.Array:
    return self.dense()


def _pack_positions(pos: jax.Array, bits: int) -> jax.Array:
  per = 8 // bits if bits in (1, 2, 4) else 1
  if per == 1:
    return pos.astype(jnp.uint8)
  rows = pos.shape[0]
  pad = (-rows) % per
  p = jnp.pad(pos.astype(jnp.uint32), [(0, pad)] + [(0, 0)] * (pos.ndim - 1))
  p = p.reshape((-1, per) + pos.shape[1:])
  shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).reshape((1, per) + (1,) * (pos.ndim - 1))
  return jnp.sum(p << shifts, axis=1).astype(jnp.uint8)


def _unpack_positions(packed: jax.Array, bits: int, rows: int, rest) -> jax.Array:
  per = 8 // bits if bits in (1, 2, 4) else 1
  if per == 1:
    return packed.reshape((rows,) + tuple(rest))
  shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).reshape((1, per) + (1,) * len(rest))
  u = (packed.astype(jnp.uint32)[:, None] >> shifts) & ((1 << bits) - 1)
  return u.reshape((-1,) + tuple(rest))[:rows]


def compress_nm(w: jax.Array, mask: jax.Array, n: int, m: int) -> NMSparse:
  """Stores `w * mask` compactly; `mask` must be exactly N:M along axis 0.

  Raises:
    ValueError: if a run of `m` along axis 0 does not keep exactly `n` values.
  """
  w = jnp.asarray(w)
  _check_nm(w.shape, n, m, 0)
  if w.shape != mask.shape:
    raise ValueError(f"mask shape {mask.shape} does not match weight shape {w.shape}")
  groups = w.shape[0] // m
  rest = w.shape[1:]
  mg = mask.reshape((groups, m) + rest)
  counts = jnp.sum(mg, axis=1)
  if not isinstance(counts, jax.core.Tracer) and not bool(jnp.all(counts == n)):
    raise ValueError(f"mask is not {n}:{m} along axis 0: runs keep between "
                     f"{int(counts.min())} and {int(counts.max())} values")
  # positions of kept values, in increasing order: sort indices with kept first
  idx = jnp.arange(m).reshape((1, m) + (1,) * len(rest))
  key = jnp.where(mg, idx, idx + m)
  pos = jnp.sort(key, axis=1)[:, :n]  # [g, n, ...]
  vals = jnp.take_along_axis(w.reshape((groups, m) + rest), pos, axis=1)
  bits = max(1, math.ceil(math.log2(m)))
  return NMSparse(values=vals.reshape((groups * n,) + rest),
                  positions=_pack_positions(pos.reshape((groups * n,) + rest), bits),
                  n=n, m=m, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype))
