"""Weight-only quantized matmul: `x @ dequant(w)` for int8 and packed int4 weights.

One Pallas kernel covers int8 codes and int4 codes packed two per byte along
the contraction axis (quantjax's `QArray` layout), with per-channel or
group-wise scales along K, symmetric, integer zero point or float minimum
(GGUF Q4_1 style). Codes are unpacked and dequantized in registers, one
`[bk, bn]` tile at a time, and accumulated in float32: the full-precision
weight is never written to memory.

Files follow ../shared/STYLE.md: a tuning dataclass (`BlockSizes`), the
kernel body, a jitted wrapper with shape/dtype validation, `can_use_wq_matmul`,
and `wq_matmul_reference` in pure `jnp`. `interpret=True` runs the same kernel
on CPU (CI); on GPU/TPU Pallas lowers it (Triton / Mosaic).

Status: verified against the reference in interpret mode. Native GPU/TPU
lowering has not been run on hardware from this repository yet, so
`kernels.dispatch` only uses it when a path is forced (`matmul_path("kernel")`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from quantjax.numerics.qarray import QArray

__all__ = ["BlockSizes", "wq_matmul", "wq_matmul_reference", "can_use_wq_matmul"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: `bm` rows of x, `bn` output columns, `bk` contraction per step.

  `bk` must be a multiple of the group size (or K for per-channel) and even
  for int4. Decode (small M) wants a small `bm`; prefill a larger one.
  """

  bm: int = 16
  bn: int = 128
  bk: int = 128

  @classmethod
  def for_shape(cls, m: int, n: int, k: int, group: int) -> "BlockSizes":
    bm = 16 if m <= 16 else (64 if m <= 64 else 128)
    bn = next((b for b in (256, 128, 64, 32, 16, 8) if n % b == 0), n)
    bk = max(group, 128) if k % max(group, 128) == 0 else group
    if k % bk:
      bk = k
    return cls(bm=bm, bn=bn, bk=bk)


def _layout(w: QArray):
  """(bits, group, zp_mode) of a supported weight, else raises ValueError."""
  f = w.fmt
  if f.kind != "int" or f.bits not in (4, 8):
    raise ValueError(f"wq_matmul handles int8 and int4 weights, not {f}")
  if len(w.shape) != 2:
    raise ValueError(f"wq_matmul needs a 2-D [K, N] weight, got {w.shape}")
  if f.group_axis % 2 != 0 or (f.granularity == "per_channel" and f.channel_axis % 2 != 1):
    raise ValueError(f"wq_matmul needs groups along K (axis 0) and channels along N; got {f}")
  if f.granularity == "per_tensor":
    raise ValueError("wq_matmul handles per-channel and group scales, not per-tensor")
  k = w.shape[0]
  group = f.group_size if f.granularity == "group" else k
  zp_mode = "none" if f.symmetric else f.zero_point
  return f.bits, group, zp_mode


def can_use_wq_matmul(x: jax.Array, w, contract_axis: int = 0) -> bool:
  """True when the kernel supports this activation/weight pair exactly."""
  if not isinstance(w, QArray) or contract_axis != 0:
    return False
  try:
    bits, group, _ = _layout(w)
  except ValueError:
    return False
  k, n = w.shape
  if x.shape[-1] != k or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return False
  if bits == 4 and (k % 2 or group % 2):
    return False
  return n % 8 == 0 and k % group == 0


def wq_matmul_reference(x: jax.Array, w: QArray) -> jax.Array:
  """Pure-jnp reference: dequantize to float32, dot, cast to x.dtype."""
  return jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32)).astype(x.dtype)


def _kernel(x_ref, w_ref, s_ref, *rest, bits, group, qmin, zp_mode, bk, per_channel):
  if zp_mode == "none":
    (o_ref,) = rest
    z_ref = None
  else:
    z_ref, o_ref = rest

  @pl.when(pl.program_id(2) == 0)
  def _init():
    o_ref[...] = jnp.zeros_like(o_ref)

  w = w_ref[...]
  if bits == 4:  # code 2i in the low nibble of byte i, code 2i+1 in the high one
    lo = (w & 0xF).astype(jnp.float32)
    hi = (w >> 4).astype(jnp.float32)
    q = jnp.stack([lo, hi], axis=1).reshape(bk, w.shape[1]) + qmin
  else:
    q = w.astype(jnp.float32)

  def expand(ref):  # per-group rows -> per-K rows (per-channel [1, bn] broadcasts)
    a = ref[...].astype(jnp.float32)
    return a if per_channel else jnp.repeat(a, group, axis=0)

  s = expand(s_ref)
  if zp_mode == "int":
    wd = (q - expand(z_ref)) * s
  elif zp_mode == "float":
    wd = expand(z_ref) + q * s
  else:
    wd = q * s
  o_ref[...] += jnp.dot(x_ref[...].astype(jnp.float32), wd, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def wq_matmul(x: jax.Array, w: QArray, *, blocks: BlockSizes | None = None,
              interpret: bool = False) -> jax.Array:
  """`x @ w` for `x` `[..., K]` and an int8/int4 `QArray` `w` `[K, N]`.

  Rows of `x` are padded to the row block (zeros, cropped after); K and N
  must fit the blocks exactly (see `can_use_wq_matmul`), else a ValueError
  names the mismatch.
  """
  bits, group, zp_mode = _layout(w)
  k, n = w.shape
  if x.shape[-1] != k:
    raise ValueError(f"wq_matmul: x's last dim {x.shape[-1]} != weight K {k}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  blocks = blocks or BlockSizes.for_shape(m, n, k, group)
  bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
  if n % bn or k % bk:
    raise ValueError(f"wq_matmul: weight [{k}, {n}] is not a multiple of blocks (bk={bk}, bn={bn})")
  if group < k and bk % group:
    raise ValueError(f"wq_matmul: bk={bk} must be a multiple of the group size {group}")
  if bits == 4 and bk % 2:
    raise ValueError(f"wq_matmul: int4 needs an even bk, got {bk}")
  mp = -(-m // bm) * bm
  if mp != m:
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  pack = 2 if bits == 4 else 1
  per_channel = group >= k
  s_block = (1, bn) if per_channel else (bk // group, bn)
  s_index = (lambda i, j, kk: (0, j)) if per_channel else (lambda i, j, kk: (kk, j))
  in_specs = [
      pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
      pl.BlockSpec((bk // pack, bn), lambda i, j, kk: (kk, j)),
      pl.BlockSpec(s_block, s_index),
  ]
  args = [x2, w.qvalue, w.scale]
  if zp_mode != "none":
    in_specs.append(pl.BlockSpec(s_block, s_index))
    args.append(w.zero_point)
  kernel = functools.partial(_kernel, bits=bits, group=group, qmin=w.fmt.qmin,
                             zp_mode=zp_mode, bk=bk, per_channel=per_channel)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
      grid=(mp // bm, n // bn, k // bk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      interpret=interpret,
  )(*args)
  return out[:m].astype(x.dtype).reshape(*lead, n)
