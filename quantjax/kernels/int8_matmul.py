"""int8 weight-only matmul: `x @ dequant(W)` for int8 codes `[K, N]`.

Scales per output channel or group-wise along K (any group dividing K), with
an optional integer zero point or float minimum. One chunk of codes (a group,
or for per-channel scales a slice of up to 256 rows of K) is dequantized in
registers and multiplied with the matching slice of x, accumulating in
float32; the float weight never exists in memory. Grid structure, split-K and
the TPU variant: `tiling.py`.

Status: matches `int8_matmul_reference` in interpret mode (CI) in both the
"gpu" and the "tpu" structure, and lowers for "cuda" (Triton) and "tpu"
(Mosaic) on CPU (`tiling.lower_for`, also in CI). Not yet run on a GPU or
TPU from this repository.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from quantjax.kernels import tiling
from quantjax.kernels.tiling import BlockSizes
from quantjax.numerics.qarray import QArray

__all__ = ["BlockSizes", "int8_matmul", "int8_matmul_reference", "can_use_int8_matmul"]


def can_use_int8_matmul(x: jax.Array, w, contract_axis: int = 0, target: str | None = None) -> bool:
  """True when the kernel computes this `x @ w` as the reference does (up to rounding)."""
  return tiling.accepts_weight_only(x, w, 8, contract_axis, target, "int8_matmul")


int8_matmul_reference = tiling.weight_only_reference


def _body(xs, ws, cols, *, zp_mode, dtype):
  q = ws[0].astype(jnp.float32)
  w = tiling.dequantize_tile(q, cols[0], cols[1] if zp_mode != "none" else None, zp_mode)
  return jnp.dot(xs[0], w.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("blocks", "target", "interpret"))
def int8_matmul(x: jax.Array, w: QArray, *, blocks: BlockSizes | None = None,
                target: str | None = None, interpret: bool = False) -> jax.Array:
  """`x @ w` for `x` `[..., K]` and an int8 `QArray` `w` `[K, N]`; returns x.dtype.

  target: "gpu" (Triton structure) or "tpu" (Mosaic structure); defaults to
  the backend's. Rows of x are zero-padded to the row block and cropped.
  """
  return tiling.weight_only_matmul(x, w, 8, _body, blocks=blocks, target=target,
                                   interpret=interpret, name="int8_matmul")
