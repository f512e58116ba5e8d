"""int4 weight-only matmul: `x @ dequant(W)` with W packed two codes per byte.

Codes are quantjax's `QArray` int4 layout: `[K/2, N]` uint8, code `2i` in the
low nibble of byte `i` and code `2i+1` in the high one, stored as
`code - qmin`. Scales are group-wise along K (group 32/64/128, any size that
divides K) or per output channel; asymmetric weights carry an integer zero
point (`(q - z) * s`) or a float minimum (`m + q * s`, GGUF Q4_1).

The kernel never interleaves nibbles: the driver (`tiling.weight_only_matmul`)
splits x's even and odd K columns (a cheap copy of the activations), so a
chunk's product is
`x_even @ dequant(low nibbles) + x_odd @ dequant(high nibbles)`, both
dequantized in registers from one read of the packed bytes and accumulated in
float32. Grid structure, split-K and the TPU variant: `tiling.py`.

Status: matches `int4_matmul_reference` in interpret mode (CI) in both the
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

__all__ = ["BlockSizes", "int4_matmul", "int4_matmul_reference", "can_use_int4_matmul"]

def can_use_int4_matmul(x: jax.Array, w, contract_axis: int = 0, target: str | None = None) -> bool:
  """True when the kernel computes this `x @ w` as the reference does (up to rounding)."""
  return tiling.accepts_weight_only(x, w, 4, contract_axis, target, "int4_matmul")


int4_matmul_reference = tiling.weight_only_reference


def _body(xs, ws, cols, *, qmin, zp_mode, dtype):
  xe, xo = xs
  p = ws[0].astype(jnp.int32)  # Triton does no arithmetic on 8-bit types
  s, z = cols[0], (cols[1] if zp_mode != "none" else None)
  lo = tiling.dequantize_tile((p & 0xF).astype(jnp.float32) + qmin, s, z, zp_mode)
  hi = tiling.dequantize_tile((p >> 4).astype(jnp.float32) + qmin, s, z, zp_mode)
  out = jnp.dot(xe, lo.astype(dtype), preferred_element_type=jnp.float32)
  return out + jnp.dot(xo, hi.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("blocks", "target", "interpret"))
def int4_matmul(x: jax.Array, w: QArray, *, blocks: BlockSizes | None = None,
                target: str | None = None, interpret: bool = False) -> jax.Array:
  """`x @ w` for `x` `[..., K]` and an int4 `QArray` `w` `[K, N]`; returns x.dtype.

  target: "gpu" (Triton structure) or "tpu" (Mosaic structure); defaults to
  the backend's. Rows of x are zero-padded to the row block and cropped.
  """
  body = functools.partial(_body, qmin=float(w.fmt.qmin))
  return tiling.weight_only_matmul(x, w, 4, body, blocks=blocks, target=target,
                                   interpret=interpret, name="int4_matmul")
