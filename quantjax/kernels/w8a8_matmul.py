"""W8A8 matmul: int8 activations x int8 weights, int32 accumulation.

Activations are quantized per token (or per tensor), weights per output
channel (or per tensor), both symmetric. The kernel multiplies int8 chunks of
K into an int32 accumulator (tensor-core / MXU integer dots); the two scales
are applied once to the accumulated `[M, N]` tile:
`out = acc * s_x[:, None] * s_w[None, :]`, the same arithmetic as
`ops.qdot(..., act_format="int8")`'s XLA path, so both paths agree exactly
up to float rounding of that product. Grid structure: `tiling.py`.

Status: matches `w8a8_matmul_reference` in interpret mode (CI) in both the
"gpu" and the "tpu" structure, and lowers for "cuda" (Triton) and "tpu"
(Mosaic) on CPU (`tiling.lower_for`, also in CI). Not yet run on a GPU or
TPU from this repository.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from quantjax.kernels import tiling
from quantjax.kernels.tiling import BlockSizes
from quantjax.numerics.qarray import QArray

__all__ = ["BlockSizes", "w8a8_matmul", "w8a8_matmul_reference", "can_use_w8a8_matmul"]


def _sym8(q) -> bool:
  return (isinstance(q, QArray) and q.fmt.kind == "int" and q.fmt.bits == 8 and q.fmt.symmetric
          and len(q.shape) == 2)


def _plan(xq: QArray, w: QArray, target: str):
  """(chunk, blocks), or a ValueError naming both operands."""
  what = (f"x {getattr(xq, 'fmt', type(xq).__name__)} {tuple(getattr(xq, 'shape', ()))} and "
          f"w {getattr(w, 'fmt', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
  if not (_sym8(xq) and _sym8(w)):
    raise ValueError(f"w8a8_matmul needs symmetric int8 QArrays x [M, K] and w [K, N]; got {what}")
  xf, wf = xq.fmt, w.fmt
  if not (xf.granularity == "per_tensor" or (xf.granularity == "per_channel" and xf.channel_axis % 2 == 0)):
    raise ValueError(f"w8a8_matmul needs per-token (or per-tensor) activation scales; got {what}")
  if not (wf.granularity == "per_tensor" or (wf.granularity == "per_channel" and wf.channel_axis % 2 == 1)):
    raise ValueError(f"w8a8_matmul needs per-output-channel (or per-tensor) weight scales; got {what}")
  m, k = xq.shape
  if w.shape[0] != k:
    raise ValueError(f"w8a8_matmul: shapes do not contract: {what}")
  chunk = tiling.pick_chunk(k, None)
  blocks = None if chunk is None else BlockSizes.for_shape(m, w.shape[1], k // chunk, chunk, target)
  if blocks is None:
    raise ValueError(f"w8a8_matmul: K or N does not tile for {target}: {what}")
  if target == "tpu" and blocks.bm < 32:  # int8 tiles on TPU are (32, 128)
    blocks = dataclasses.replace(blocks, bm=32)
  return chunk, blocks


def can_use_w8a8_matmul(xq, w, target: str | None = None) -> bool:
  try:
    _plan(xq, w, target or tiling.default_target())
  except ValueError:
    return False
  return True


def _scales(xq: QArray, w: QArray):
  sx = xq.scale.reshape(-1, 1) if xq.scale.size > 1 else xq.scale.reshape(())
  sw = w.scale.reshape(1, -1) if w.scale.size > 1 else w.scale.reshape(())
  return sx.astype(jnp.float32), sw.astype(jnp.float32)


def w8a8_matmul_reference(xq: QArray, w: QArray, out_dtype=jnp.float32) -> jax.Array:
  acc = jax.lax.dot_general(xq.codes(), w.codes(), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  sx, sw = _scales(xq, w)
  return (acc.astype(jnp.float32) * sx * sw).astype(out_dtype)


def _body(xs, ws, cols):
  del cols
  return jnp.dot(xs[0], ws[0], preferred_element_type=jnp.int32)


@functools.partial(jax.jit, static_argnames=("blocks", "target", "interpret", "out_dtype"))
def w8a8_matmul(xq: QArray, w: QArray, *, blocks: BlockSizes | None = None,
                target: str | None = None, interpret: bool = False,
                out_dtype=jnp.float32) -> jax.Array:
  """int8 x int8 -> int32 chunks, then per-token x per-channel scales; `[M, N]` out_dtype."""
  target = target or tiling.default_target()
  chunk, auto_blocks = _plan(xq, w, target)
  blocks = blocks or auto_blocks
  m, k = xq.shape
  n = w.shape[1]
  xs = [tiling.chunk_rows(xq.codes(), chunk, blocks.bm)]
  ws = [tiling.chunk_cols(w.codes(), chunk)]
  acc = tiling.chunked_matmul(_body, xs=xs, ws=ws, cols=[], n=n, acc_dtype=jnp.int32,
                              blocks=blocks, target=target, interpret=interpret,
                              name="w8a8_matmul")[:m]
  sx, sw = _scales(xq, w)
  return (acc.astype(jnp.float32) * sx * sw).astype(out_dtype)
