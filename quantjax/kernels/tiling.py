"""The grid and block plumbing shared by quantjax's Pallas matmul kernels.

Every kernel here computes `x [M, K] @ W [K, N]` where `W` is stored in
*chunks* along K: a chunk is one quantization group (or, for per-channel
scales, a fixed slice of K), and a kernel's body turns one chunk of codes
(plus that chunk's scales) into a partial `[bm, bn]` product. This module
lays the operands out chunk-major and builds the `pallas_call` around such a
body, in one of two structures:

* `"gpu"` (Triton): the grid `(M/bm, N/bn, k_splits)` is fully parallel, as
  GPU programs are, so each program loops over its share of the K chunks
  (`fori_loop`) and writes one partial sum; `k_splits > 1` (split-K) gives
  decode shapes, which have a single row block, enough programs to fill the
  GPU, and the partial sums are added by XLA afterwards.
* `"tpu"` (Mosaic TPU): the grid `(M/bm, N/bn, K chunks / chunks_per_step)`
  runs its last axis sequentially ("arbitrary"), accumulating into the
  resident output block, the pipelined TPU idiom; the leading axes are
  "parallel" (megacore).

Operand layout (built by the kernels with `chunk_rows`/`chunk_cols`): `x`-like
operands `[C, Mp, kc]` (row block i), weight-like `[C, kc_w, N]` (column
block j), per-column operands (scales, zero points) `[C, 1, N]` or, when one
row serves every chunk (per-channel scales), `[1, 1, N]`. The leading chunk
axis is what keeps every block's last two dimensions whole or aligned, which
Mosaic TPU requires and Triton is happy with.

`interpret=True` runs either structure on CPU; `lower_for(platform, ...)`
lowers a kernel for "cuda" or "tpu" on any machine, so CI can check that
the native lowerings are accepted without the hardware.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from quantjax.numerics.qarray import QArray

__all__ = ["BlockSizes", "TARGETS", "default_target", "chunked_matmul", "chunk_rows",
           "chunk_cols", "pick_chunk", "weight_layout", "plan_weight_only", "accepts_weight_only",
           "weight_only_reference", "weight_only_matmul", "scale_cols",
           "dequantize_tile", "lower_for"]

TARGETS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tuning knobs of a chunked matmul kernel.

  bm: rows of x per program (padded: decode M=1 still computes bm rows).
  bn: output columns per program.
  chunks_per_step: K chunks handled per loop iteration (gpu) or grid step (tpu).
  k_splits: gpu only; programs that share one output tile along K (split-K).
  num_warps, num_stages: Triton launch parameters (gpu only).
  """

  bm: int = 16
  bn: int = 128
  chunks_per_step: int = 1
  k_splits: int = 1
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def for_shape(cls, m: int, n: int, chunks: int, chunk: int, target: str) -> "BlockSizes | None":
    """A reasonable default for `[m, chunks * chunk] @ [.., n]`, or None if N does not tile."""
    bm = next(b for b in (16, 32, 64, 128) if m <= b or b == 128)
    if target == "tpu":
      bn = next((b for b in (512, 256, 128) if n % b == 0), n if n <= 2048 else None)
    else:
      bn = next((b for b in ((128, 64, 32, 16) if m > 16 else (64, 32, 16)) if n % b == 0), None)
    if bn is None:
      return None
    want_rows = 512 if target == "tpu" else 128  # K rows handled per step
    cps = max(d for d in _divisors(chunks) if d * chunk <= max(want_rows, chunk))
    splits = 1
    if target == "gpu" and m <= 16:
      # decode: one row block; split K until there are a few hundred programs
      programs = n // bn
      for s in _divisors(chunks // cps):
        if s > 16:
          break
        splits = s
        if programs * s >= 256:
          break
    return cls(bm=bm, bn=bn, chunks_per_step=cps, k_splits=splits)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def default_target() -> str:
  """"tpu" on TPU, else "gpu" (also the structure interpret mode runs on CPU)."""
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def pick_chunk(k: int, group: int | None, *, even: bool = False) -> int | None:
  """K rows per chunk: the group size, or for per-channel scales a divisor of K."""
  if group is not None:
    return group if k % group == 0 and (not even or group % 2 == 0) else None
  return next((c for c in (256, 128, 64, 32) if k % c == 0), None)


def weight_layout(w, bits: int, name: str) -> tuple[int | None, str]:
  """(group size or None for per-channel, zero-point mode) of a `bits`-bit int weight `[K, N]`.

  Raises ValueError naming the format or shape a weight-only kernel cannot take.
  """
  if not isinstance(w, QArray):
    raise ValueError(f"{name} needs a QArray weight, got {type(w).__name__}")
  f = w.fmt
  if f.kind != "int" or f.bits != bits:
    raise ValueError(f"{name} handles int{bits} weights, not {f}")
  if len(w.shape) != 2:
    raise ValueError(f"{name} needs a 2-D [K, N] weight, got shape {w.shape}")
  if f.granularity == "group" and f.group_axis % 2 == 0:
    group = f.group_size
  elif f.granularity == "per_channel" and f.channel_axis % 2 == 1:
    group = None
  else:
    raise ValueError(f"{name} needs group scales along K (axis 0) or per-channel scales along N "
                     f"(axis 1), got {f} for weight shape {w.shape}")
  zp_mode = "none" if f.symmetric else f.zero_point
  return group, zp_mode


_FLOATS = ("float32", "bfloat16", "float16")


def plan_weight_only(x_shape, x_dtype, w, bits: int, target: str, name: str):
  """(group, zp_mode, chunk, default blocks) for `x @ w`, or a ValueError naming the problem."""
  group, zp_mode = weight_layout(w, bits, name)
  k, n = w.shape
  if x_shape[-1] != k:
    raise ValueError(f"{name}: x shape {tuple(x_shape)} does not contract with weight shape "
                     f"{tuple(w.shape)} (K={k})")
  if jnp.dtype(x_dtype).name not in _FLOATS:
    raise ValueError(f"{name}: x must be float32/bfloat16/float16, got {jnp.dtype(x_dtype).name} "
                     f"(x shape {tuple(x_shape)}, weight shape {tuple(w.shape)})")
  chunk = pick_chunk(k, group, even=bits == 4)
  if chunk is None:
    raise ValueError(f"{name}: K={k} of weight {tuple(w.shape)} does not split into chunks "
                     f"(group {group})")
  m = 1
  for d in x_shape[:-1]:
    m *= d
  blocks = BlockSizes.for_shape(m, n, k // chunk, chunk, target)
  if blocks is None:
    raise ValueError(f"{name}: N={n} of weight {tuple(w.shape)} does not tile for {target}")
  return group, zp_mode, chunk, blocks


def accepts_weight_only(x, w, bits: int, contract_axis: int, target: str | None, name: str) -> bool:
  """True when `plan_weight_only` accepts the pair (the kernels' `can_use_*`)."""
  if not isinstance(w, QArray) or contract_axis != 0:
    return False
  try:
    plan_weight_only(x.shape, x.dtype, w, bits, target or default_target(), name)
  except ValueError:
    return False
  return True


def weight_only_reference(x: jax.Array, w) -> jax.Array:
  """Pure-jnp reference of a weight-only kernel: dequantize to float32, dot, cast to x.dtype."""
  return jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32)).astype(x.dtype)


def weight_only_matmul(x: jax.Array, w, bits: int, body: Callable[..., jax.Array], *,
                       blocks: "BlockSizes | None", target: str | None, interpret: bool,
                       name: str) -> jax.Array:
  """`x [..., K] @ w [K, N]` for an int8 or packed-int4 `QArray`, through `body`.

  `body(xs, ws, cols, *, zp_mode, dtype)` computes one chunk: for int8, `xs`
  is `[x_chunk]`; for int4, `[x_even, x_odd]` (x's even / odd K columns, the
  low / high nibbles of each packed byte), so no nibble interleaving is
  needed in registers. Returns x.dtype; rows are zero-padded to `bm`, cropped.
  """
  target = target or default_target()
  _, zp_mode, chunk, auto_blocks = plan_weight_only(x.shape, x.dtype, w, bits, target, name)
  blocks = blocks or auto_blocks
  k, n = w.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  if bits == 4:
    rows = chunk // 2  # packed rows per chunk
    xs = [chunk_rows(x2[:, 0::2], rows, blocks.bm), chunk_rows(x2[:, 1::2], rows, blocks.bm)]
  else:
    rows = chunk
    xs = [chunk_rows(x2, chunk, blocks.bm)]
  out = chunked_matmul(functools.partial(body, zp_mode=zp_mode, dtype=x.dtype), xs=xs,
                       ws=[chunk_cols(w.qvalue, rows)], cols=scale_cols(w, zp_mode), n=n,
                       acc_dtype=jnp.float32, blocks=blocks, target=target, interpret=interpret,
                       name=name)
  return out[:x2.shape[0]].astype(x.dtype).reshape(*lead, n)


def scale_cols(w, zp_mode: str) -> list[jax.Array]:
  """A weight's scales (and zero points) as per-column operands `[groups or 1, 1, N]`."""
  n = w.shape[1]
  cols = [w.scale.reshape(-1, 1, n)]
  if zp_mode != "none":
    cols.append(w.zero_point.reshape(-1, 1, n))
  return cols


def dequantize_tile(q: jax.Array, s: jax.Array, z: jax.Array | None, zp_mode: str) -> jax.Array:
  """float32 codes `[r, bn]` and one chunk's `[1, bn]` scale (and zero point) -> weights."""
  s = s.astype(jnp.float32)
  if zp_mode == "int":
    return (q - z.astype(jnp.float32)) * s
  if zp_mode == "float":
    return z.astype(jnp.float32) + q * s
  return q * s


def chunk_rows(x2: jax.Array, chunk: int, bm: int) -> jax.Array:
  """`[M, K]` -> `[K/chunk, Mp, chunk]`, rows zero-padded to a multiple of `bm`."""
  m, k = x2.shape
  mp = -(-m // bm) * bm
  if mp != m:
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  return x2.reshape(mp, k // chunk, chunk).transpose(1, 0, 2)


def chunk_cols(a: jax.Array, rows_per_chunk: int) -> jax.Array:
  """`[R, N]` -> `[R/rows_per_chunk, rows_per_chunk, N]` (a free reshape)."""
  r, n = a.shape
  return a.reshape(r // rows_per_chunk, rows_per_chunk, n)


def _compiler_params(target: str, blocks: BlockSizes):
  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    params = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return params(dimension_semantics=("parallel", "parallel", "arbitrary"))
  from jax.experimental.pallas import triton as pltriton
  params = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return params(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def chunked_matmul(body: Callable[..., jax.Array], *, xs: Sequence[jax.Array],
                   ws: Sequence[jax.Array], cols: Sequence[jax.Array], n: int,
                   acc_dtype, blocks: BlockSizes, target: str, interpret: bool,
                   name: str) -> jax.Array:
  """Runs `body` over every K chunk and sums; returns `[Mp, N]` in `acc_dtype`.

  `body(xs, ws, cols)` gets one chunk of each operand as arrays, `[bm, kc]`,
  `[kc_w, bn]` and `[1, bn]`, and returns the chunk's `[bm, bn]` product.
  """
  if target not in TARGETS:
    raise ValueError(f"unknown kernel target {target!r}; expected one of {TARGETS}")
  nchunks, mp = xs[0].shape[0], xs[0].shape[1]
  bm, bn, cps, splits = blocks.bm, blocks.bn, blocks.chunks_per_step, blocks.k_splits
  if mp % bm or n % bn:
    raise ValueError(f"{name}: padded rows {mp} / columns {n} are not multiples of bm={bm} / bn={bn}")
  if target == "tpu":
    splits = 1
  if nchunks % (cps * splits):
    raise ValueError(f"{name}: {nchunks} K chunks do not divide into k_splits={splits} x "
                     f"chunks_per_step={cps}")
  per_chunk = [c.shape[0] == nchunks for c in cols]
  n_x, n_w = len(xs), len(ws)

  def chunk_at(refs, c):
    xr, wr, cr = refs[:n_x], refs[n_x:n_x + n_w], refs[n_x + n_w:]
    return body([r[c] for r in xr], [r[c] for r in wr],
                [r[c] if pc else r[0] for r, pc in zip(cr, per_chunk)])

  if target == "gpu":
    span = nchunks // splits  # chunks per program

    def kernel(*refs):
      o_ref, refs = refs[-1], refs[:-1]

      def step(it, acc):
        for t in range(cps):
          acc = acc + chunk_at(refs, it * cps + t).astype(acc_dtype)
        return acc

      o_ref[...] = jax.lax.fori_loop(0, span // cps, step, jnp.zeros((bm, bn), acc_dtype))

    in_specs = ([pl.BlockSpec((span, bm, x.shape[2]), lambda i, j, s: (s, i, 0)) for x in xs] +
                [pl.BlockSpec((span, w.shape[1], bn), lambda i, j, s: (s, 0, j)) for w in ws] +
                [pl.BlockSpec((span, 1, bn), lambda i, j, s: (s, 0, j)) if pc else
                 pl.BlockSpec((1, 1, bn), lambda i, j, s: (0, 0, j)) for pc in per_chunk])
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), acc_dtype),
        grid=(mp // bm, n // bn, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((pl.squeezed, bm, bn), lambda i, j, s: (s, i, j)),
        compiler_params=None if interpret else _compiler_params(target, blocks),
        interpret=interpret,
        name=name,
    )(*xs, *ws, *cols)
    return out[0] if splits == 1 else out.sum(axis=0, dtype=acc_dtype)

  def kernel(*refs):  # tpu
    o_ref, refs = refs[-1], refs[:-1]

    @pl.when(pl.program_id(2) == 0)
    def _init():
      o_ref[...] = jnp.zeros_like(o_ref)

    acc = chunk_at(refs, 0).astype(acc_dtype)
    for t in range(1, cps):
      acc = acc + chunk_at(refs, t).astype(acc_dtype)
    o_ref[...] += acc

  in_specs = ([pl.BlockSpec((cps, bm, x.shape[2]), lambda i, j, k: (k, i, 0)) for x in xs] +
              [pl.BlockSpec((cps, w.shape[1], bn), lambda i, j, k: (k, 0, j)) for w in ws] +
              [pl.BlockSpec((cps, 1, bn), lambda i, j, k: (k, 0, j)) if pc else
               pl.BlockSpec((1, 1, bn), lambda i, j, k: (0, 0, j)) for pc in per_chunk])
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), acc_dtype),
      grid=(mp // bm, n // bn, nchunks // cps),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      compiler_params=None if interpret else _compiler_params(target, blocks),
      interpret=interpret,
      name=name,
  )(*xs, *ws, *cols)


def lower_for(platform: str, fn: Callable[..., jax.Array], *args) -> str:
  """Lowers `fn(*args)` for "cuda" or "tpu" on this machine; returns the module text.

  Pallas lowers kernels to Triton / Mosaic IR at this stage, so unsupported
  operations or block shapes fail here even without the hardware. (Compiling
  that IR to device code still needs the device.)
  """
  from jax import export
  checks = [export.DisabledSafetyCheck.custom_call(t)
            for t in ("__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2")]
  exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  return exported.mlir_module()

