"""W8A8 matmul: int8 activations x int8 weights, int32 accumulation.

Activations are quantized per token (one scale per row), weights per output
channel; the kernel accumulates `int8 x int8 -> int32` tiles and applies both
scales once at the end: `out = acc * s_x[:, None] * s_w[None, :]`.

Same file layout as `wq_matmul.py`: `BlockSizes`, kernel, jitted wrapper,
`can_use_w8a8_matmul`, `w8a8_matmul_reference`, `interpret=`. Verified in
interpret mode; native lowering not yet run on hardware from this repository.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from quantjax.kernels.wq_matmul import BlockSizes
from quantjax.numerics.qarray import QArray

__all__ = ["w8a8_matmul", "w8a8_matmul_reference", "can_use_w8a8_matmul"]


def can_use_w8a8_matmul(xq: QArray, w: QArray) -> bool:
  """Both symmetric int8; x per token `[M, K]`, w per output channel `[K, N]`."""
  def sym8(q):
    return isinstance(q, QArray) and q.fmt.kind == "int" and q.fmt.bits == 8 and q.fmt.symmetric
  if not (sym8(xq) and sym8(w)) or len(xq.shape) != 2 or len(w.shape) != 2:
    return False
  if xq.fmt.granularity != "per_channel" or xq.fmt.channel_axis % 2 != 0:
    return False
  if w.fmt.granularity != "per_channel" or w.fmt.channel_axis % 2 != 1:
    return False
  return xq.shape[1] == w.shape[0] and w.shape[1] % 8 == 0


def w8a8_matmul_reference(xq: QArray, w: QArray, out_dtype=jnp.float32) -> jax.Array:
  acc = jax.lax.dot_general(xq.codes(), w.codes(), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  out = acc.astype(jnp.float32) * xq.scale.reshape(-1, 1) * w.scale.reshape(1, -1)
  return out.astype(out_dtype)


def _kernel(x_ref, w_ref, o_ref):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    o_ref[...] = jnp.zeros_like(o_ref)
  o_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret", "out_dtype"))
def w8a8_matmul(xq: QArray, w: QArray, *, blocks: BlockSizes | None = None,
                interpret: bool = False, out_dtype=jnp.float32) -> jax.Array:
  """int8 x int8 -> int32 tiles, then per-token x per-channel scales."""
  if not can_use_w8a8_matmul(xq, w):
    raise ValueError(f"w8a8_matmul needs per-token int8 x [M, K] and per-channel int8 w [K, N]; "
                     f"got {xq.fmt} {xq.shape} and {w.fmt} {w.shape}")
  m, k = xq.shape
  n = w.shape[1]
  blocks = blocks or BlockSizes.for_shape(m, n, k, k)
  bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
  if n % bn or k % bk:
    raise ValueError(f"w8a8_matmul: weight [{k}, {n}] is not a multiple of blocks (bk={bk}, bn={bn})")
  xc = xq.codes()
  mp = -(-m // bm) * bm
  if mp != m:
    xc = jnp.pad(xc, ((0, mp - m), (0, 0)))
  acc = pl.pallas_call(
      _kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.int32),
      grid=(mp // bm, n // bn, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      interpret=interpret,
  )(xc, w.codes())[:m]
  out = acc.astype(jnp.float32) * xq.scale.reshape(-1, 1) * w.scale.reshape(1, -1)
  return out.astype(out_dtype)
