"""GPTQ: second-order, error-compensating weight quantization.

For one linear layer `y = x @ W` (W `[in, out]`, our layout) and calibration
inputs `X` `[n, in]`, GPTQ quantizes the input rows of `W` one at a time and
spreads each row's rounding error over the rows not yet quantized, weighted
by the inverse Hessian of the layer's reconstruction loss `||XW - XQ||^2`,
`H = 2 X^T X / n`. The result is a plain `QArray` (group-wise, per-channel or
per-tensor; symmetric or asymmetric), indistinguishable in layout from
round-to-nearest.

Implementation notes (following the reference implementation):
  * dead inputs (`H_jj == 0`) get `H_jj = 1` and a zero weight row;
  * dampening adds `percdamp * mean(diag H)` to the diagonal;
  * the upper Cholesky factor of `H^-1` (float64; float32 as in the reference by name) drives the
    updates; the quantization loop is jitted: a `lax.fori_loop` over blocks
    of `block_size` rows with lazy batched updates of the rest, over groups
    inside a block, and over rows inside a group;
  * group scales are computed from the partially updated weights when a
    group starts (the reference's behaviour), or with `act_order` from the
    original weights in the original order ("static groups") so the result
    stays a plain group-wise QArray whose groups are consecutive input rows.

References:
  Frantar, Ashkboos, Hoefler, Alistarh. GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers. ICLR 2023,
  arXiv:2210.17323. Reference code: github.com/IST-DASLab/gptq.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import rules as rules_lib
from quantjax.numerics import calibrate as calibrate_lib
from quantjax.numerics import llamacpp_types
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.formats import QuantFormat, resolve_format
from quantjax.numerics.qarray import QArray

__all__ = ["HessianStat", "hessian_init", "hessian_update", "hessian", "gptq_quantize",
           "PreparedHessian", "prepare_hessian",
           "GPTQResult", "SUPPORTED_KINDS", "GPTQ"]

# Codebook kinds (llama.cpp's IQ4_NL, MXFP4, NVFP4, Q2_0) round each column to the nearest
# level for its group's scale; binary (Q1_0) takes the sign, with mean-|w| group scales.
SUPPORTED_KINDS = ("int", "nf4", "fp8_e4m3", "fp8_e5m2", "binary") + llamacpp_types.CODEBOOK_KINDS


# ----------------------------------------------------------------------------
# Hessian accumulation.
# ----------------------------------------------------------------------------

class HessianStat(NamedTuple):
  """Running `sum x x^T` (float32 `[k, k]`) and the number of rows seen."""

  xtx: jax.Array
  count: jax.Array


def hessian_init(k: int) -> HessianStat:
  return HessianStat(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.float32))


@jax.jit
def hessian_update(stat: HessianStat, x: jax.Array) -> HessianStat:
  """Adds the rows of `x` `[..., k]` (all leading axes are samples)."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  xtx = stat.xtx + jnp.einsum("ni,nj->ij", x2, x2, precision=jax.lax.Precision.HIGHEST)
  return HessianStat(xtx, stat.count + jnp.asarray(x2.shape[0], jnp.float32))


def hessian(stat: HessianStat) -> jax.Array:
  """`H = 2 X^T X / n`."""
  return 2.0 * stat.xtx / jnp.maximum(stat.count, 1.0)


# ----------------------------------------------------------------------------
# The algorithm.
# ----------------------------------------------------------------------------

class GPTQResult(NamedTuple):
  """`qarray`: the quantized weight; `loss`: GPTQ's sum of (w - q)^2 / [H^-1]_jj / 2
  (its own proxy for the added output error); `perm`: the act-order row order
  (None without act-order)."""

  qarray: QArray
  loss: float
  perm: np.ndarray | None


def _group_scales(xb: jax.Array, axes: tuple[int, ...], fmt: QuantFormat, cal: Any):
  """Block-shaped `(scale, zero_point)`: `calibrate_blocks`, except binary's mean |w|
  (Q1_0's scale) and the llama.cpp scale search for IQ4_NL / Q2_0 under "auto"."""
  if fmt.kind == "binary":
    return calibrate_lib.sign_scales(xb, axes, fmt)[0], None
  if llamacpp_types.searches(fmt, cal):
    return llamacpp_types.search_scales(xb, axes, fmt), None
  return calibrate_lib.calibrate_blocks(xb, axes, fmt, cal)


def _choose_scales(x: jax.Array, fmt: QuantFormat, cal: Any, importance: Any = None):
  """`calibrate.choose_scales` with `_group_scales`' rules: stored-shape scales. With
  `importance` (per input row of `x` `[in, out]`: the Hessian's diagonal) the IQ4_NL / Q2_0
  search weighs each weight's error by it, as llama.cpp's quantizer weighs an importance
  matrix (`llamacpp_types.importance_weights`)."""
  xb, axes = qarray_lib.block_view(x, fmt)
  if importance is not None and llamacpp_types.searches(fmt, cal):
    ib, _ = qarray_lib.block_view(
        jnp.broadcast_to(jnp.asarray(importance, jnp.float32)[:, None], x.shape), fmt)
    s = llamacpp_types.search_scales(xb, axes, fmt,
                                     llamacpp_types.importance_weights(xb, axes, ib))
    return qarray_lib.stored_scale(s, tuple(x.shape), fmt), None
  s, z = _group_scales(xb, axes, fmt, cal)
  shape = tuple(x.shape)
  return (qarray_lib.stored_scale(s, shape, fmt),
          None if z is None else qarray_lib.stored_scale(z, shape, fmt))


def _check_format(fmt: QuantFormat, w_shape) -> None:
  if fmt.kind not in SUPPORTED_KINDS:
    raise ValueError(f"GPTQ supports formats of kind {SUPPORTED_KINDS}, not {fmt.kind!r} "
                     f"({fmt}); ternary uses quantjax.methods.ternary")
  if len(w_shape) != 2:
    raise ValueError(f"GPTQ quantizes 2-D weights [in, out], got shape {tuple(w_shape)}")
  if fmt.granularity == "group":
    if fmt.group_axis % 2 != 0:
      raise ValueError(f"GPTQ needs groups along the input axis (group_axis=0) of a [in, out] "
                       f"weight; got group_axis={fmt.group_axis}")
    if w_shape[0] % fmt.group_size:
      raise ValueError(
          f"group_size {fmt.group_size} does not divide the input dimension {w_shape[0]} of "
          f"the weight (shape {tuple(w_shape)}); pick a divisor or per_channel")
  llamacpp_types.check_blocks(tuple(w_shape), fmt, "the GPTQ weight")
  if fmt.granularity == "per_channel" and fmt.channel_axis % 2 != 1:
    raise ValueError(f"GPTQ needs per-output-channel scales (channel_axis=-1) on a [in, out] "
                     f"weight; got channel_axis={fmt.channel_axis}")


def _reverse_in_place(a: np.ndarray, rows: int = 256) -> None:
  """`a[:] = a[::-1, ::-1]` for a square C-contiguous array, without a second copy
  (row blocks are swapped with their mirror blocks)."""
  n = a.shape[0]
  half = n // 2
  for i0 in range(0, half, rows):
    i1 = min(i0 + rows, half)
    top = a[i0:i1].copy()
    a[i0:i1] = a[n - i1:n - i0][::-1, ::-1]
    a[n - i1:n - i0] = top[::-1, ::-1]
  if n % 2:
    a[half] = a[half, ::-1].copy()


def inverse_cholesky_upper(h: np.ndarray, percdamp: float, what: str = "GPTQ", *,
                           overwrite: bool = False, dtype: Any = np.float64) -> np.ndarray:
  """Upper Cholesky factor U of (H + damp I)^-1 (so H^-1 = U^T U), in `dtype`.

  With J the reversal permutation, `J H J = R^T R` (R upper) gives
  `H^-1 = U^T U` for the upper-triangular `U = J R^-T J`: one Cholesky and
  one triangular inverse, instead of the reference's Cholesky, inverse and
  second Cholesky (three times faster at K = 1536, the same factor to
  1e-15). The inverse is LAPACK's triangular inverse (`trtri`), not a solve
  against the identity. Both steps use scipy's LAPACK: numpy and scipy each
  bundle their own OpenBLAS, and alternating between their two thread pools
  made this function many times slower on a busy machine (measured on a
  shared 2-core machine at K = 576: 0.06-1.0 s with numpy's Cholesky,
  0.03-0.05 s with scipy's).

  `dtype` is the precision of the solve: float64 (the default) or float32
  (the reference implementation's precision, half the memory).

  Memory: one `K x K` array of `dtype`, and none at all with
  `overwrite=True` when `h` is already a writable C-contiguous array of
  `dtype`: the dampening, the reversal, the factor, its inverse and the
  final reversal all happen in `h`'s buffer (H is symmetric, so its
  row-major buffer is also its column-major one, which LAPACK works on in
  place), and the result is `h` itself. At K = 14336 (Llama-3-8B's
  `down_proj`) that is 0.8 GB in float32 instead of the 5 GB that four
  float64 copies took.
  """
  import scipy.linalg.lapack as lapack
  dtype = np.dtype(dtype)
  if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
    raise ValueError(f"{what}: the solve's dtype must be float32 or float64, got {dtype}")
  if not (overwrite and isinstance(h, np.ndarray) and h.dtype == dtype
          and h.flags.c_contiguous and h.flags.writeable):
    h = np.array(h, dtype, order="C")
  n = h.shape[0]
  damp = percdamp * float(np.mean(np.diag(h), dtype=np.float64))
  if not np.isfinite(damp):
    raise ValueError(f"{what}: the Hessian holds NaN/Inf values")
  h[np.diag_indices(n)] += dtype.type(damp)
  _reverse_in_place(h)  # J H J: still symmetric
  potrf, trtri = lapack.get_lapack_funcs(("potrf", "trtri"), (h,))
  # h.T is the column-major view of the same (symmetric) matrix: LAPACK works in place.
  r, info = potrf(h.T, lower=0, overwrite_a=1, clean=0)
  if info != 0:
    raise ValueError(
        f"{what}: the dampened Hessian is not positive definite (percdamp={percdamp}, LAPACK "
        f"potrf info={info}); raise percdamp or use more calibration data")
  rinv, info = trtri(r, lower=0, overwrite_c=1)
  if info != 0:  # a zero on the factor's diagonal: not reachable after a successful Cholesky
    raise ValueError(f"{what}: the Cholesky factor of the dampened Hessian is singular "
                     f"(LAPACK trtri info={info}); raise percdamp")
  if not (np.shares_memory(r, h) and np.shares_memory(rinv, h)):
    h = np.ascontiguousarray(rinv.T)  # LAPACK copied (not expected for these inputs)
  # h (row-major) now holds R^-T in its lower triangle; U = J R^-T J.
  del r, rinv
  _reverse_in_place(h)
  for i0 in range(0, n, 256):  # zero what is left of H below the diagonal
    blk = h[i0:i0 + 256]
    blk[np.arange(blk.shape[1])[None, :] < np.arange(i0, i0 + blk.shape[0])[:, None]] = 0
  return h


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialised array whose data starts on a 64-byte boundary: XLA's CPU client
  then uses it in place (`_device_f32`) instead of copying it."""
  dtype = np.dtype(dtype)
  n = int(np.prod(shape)) * dtype.itemsize
  buf = np.empty(n + 64, np.uint8)
  off = (-buf.ctypes.data) % 64
  return buf[off:off + n].view(dtype).reshape(shape)


def _device_f32(a: np.ndarray) -> jax.Array:
  """`a` as a float32 jax array on a CPU device with no copy beyond the conversion: a
  float32, contiguous, 64-byte aligned `a` is used in place (the caller must not write
  to it afterwards), anything else is converted once into such a buffer. For GPTQ's
  largest array, the K x K factor (0.8 GB in float32 at K = 14336), `jnp.asarray`
  held up to two more copies while it converted and copied."""
  if jax.default_backend() != "cpu":
    return jnp.asarray(a, jnp.float32)
  if not (a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % 64 == 0):
    b = _aligned_empty(a.shape, np.float32)
    np.copyto(b, a, casting="same_kind")  # float64 -> float32 rounds as astype does
    a = b
  return jax.device_put(a, may_alias=True)


# Column steps unrolled per loop iteration (fewer loop trips on the host; see `_gptq_loop`).
_UNROLL = 8


@functools.partial(jax.jit, static_argnames=("fmt", "cal", "block", "group", "dynamic"))
def _gptq_loop(wt, hinv, scale_tab, zp_tab, col_group, *, fmt, cal, block, group, dynamic):
  """The jitted column loop.

  Args:
    wt: `[out, n]` weights, rows of the paper's layout (n a multiple of block).
    hinv: `[n, n]` upper Cholesky factor of the inverse Hessian.
    scale_tab, zp_tab: `[G, out]` scale / zero-point rows (static mode) or unused.
    col_group: `[n]` int32, the row of `scale_tab` each column of `wt` uses.
    dynamic: compute group scales when a group starts (no act-order).

  Returns:
    (codes `[out, n]` float32, group scales `[n/group, out]`, group zps, loss).
  """
  out, n = wt.shape
  nblocks = n // block
  gpb = block // group
  has_zp = fmt.has_zero_point
  search_fmt = fmt.replace(rounding="nearest_even")

  def quant_col(w, s, z):
    q = qarray_lib.encode(w, search_fmt, s, z if has_zp else None)
    dq = qarray_lib.decode(q, search_fmt, s, z if has_zp else None)
    return q.astype(jnp.float32), dq

  def block_body(b, carry):
    w_all, codes, g_scale, g_zp, loss = carry
    i1 = b * block
    w1 = jax.lax.dynamic_slice(w_all, (0, i1), (out, block))
    h1 = jax.lax.dynamic_slice(hinv, (i1, i1), (block, block))

    def group_body(gi, c, ncols=group):
      w1, c1, e1, g_scale, g_zp, loss = c
      j0 = gi * group
      if dynamic:
        wg = jax.lax.dynamic_slice(w1, (0, j0), (out, group))
        s, z = _group_scales(wg, (1,), fmt, cal)
        s = s[:, 0].astype(jnp.float32)
        z = jnp.zeros((out,), jnp.float32) if z is None else z[:, 0].astype(jnp.float32)
        gidx = (i1 + j0) // group
        g_scale = jax.lax.dynamic_update_slice(g_scale, s[None, :], (gidx, 0))
        g_zp = jax.lax.dynamic_update_slice(g_zp, z[None, :], (gidx, 0))

      def col_body(k, c2):
        w1, c1, e1, loss = c2
        i = j0 + k
        if dynamic:
          s_col, z_col = s, z
        else:
          g = col_group[i1 + i]
          s_col = jax.lax.dynamic_index_in_dim(scale_tab, g, 0, keepdims=False)
          z_col = jax.lax.dynamic_index_in_dim(zp_tab, g, 0, keepdims=False)
        w = jax.lax.dynamic_index_in_dim(w1, i, 1, keepdims=False)
        hrow = jax.lax.dynamic_index_in_dim(h1, i, 0, keepdims=False)
        d = hrow[i]
        q, dq = quant_col(w, s_col, z_col)
        err = (w - dq) / d
        loss = loss + jnp.sum((w - dq) ** 2) / (d * d) / 2.0
        # H^-1's factor is upper triangular: columns < i are untouched, column i
        # becomes dq (never read again).
        w1 = w1 - err[:, None] * hrow[None, :]
        c1 = jax.lax.dynamic_update_index_in_dim(c1, q, i, 1)
        e1 = jax.lax.dynamic_update_index_in_dim(e1, err, i, 1)
        return w1, c1, e1, loss

      w1, c1, e1, loss = jax.lax.fori_loop(0, ncols, col_body, (w1, c1, e1, loss),
                                           unroll=min(ncols, _UNROLL))
      return w1, c1, e1, g_scale, g_zp, loss

    c1 = jnp.zeros((out, block), jnp.float32)
    e1 = jnp.zeros((out, block), jnp.float32)
    if dynamic:
      w1, c1, e1, g_scale, g_zp, loss = jax.lax.fori_loop(
          0, gpb, group_body, (w1, c1, e1, g_scale, g_zp, loss))
    else:  # static scales (group == 1): one flat column loop, no per-group level
      w1, c1, e1, g_scale, g_zp, loss = group_body(
          0, (w1, c1, e1, g_scale, g_zp, loss), ncols=block)
    # Lazy batch update of everything after the block (rows of H^-1 factor are
    # zero left of the block; the block's own columns are done and not reused).
    hrows = jax.lax.dynamic_slice(hinv, (i1, 0), (block, n))
    w_all = w_all - jnp.dot(e1, hrows, precision=jax.lax.Precision.HIGHEST)
    codes = jax.lax.dynamic_update_slice(codes, c1, (0, i1))
    return w_all, codes, g_scale, g_zp, loss

  ngroups = n // group
  init = (wt, jnp.zeros((out, n), jnp.float32), jnp.ones((ngroups, out), jnp.float32),
          jnp.zeros((ngroups, out), jnp.float32), jnp.zeros((), jnp.float32))
  _, codes, g_scale, g_zp, loss = jax.lax.fori_loop(0, nblocks, block_body, init)
  return codes, g_scale, g_zp, loss


class PreparedHessian:
  """GPTQ's own `K x K` copy of a Hessian (`prepare_hessian`): permuted for
  act-order, dead inputs' diagonal set to 1, in the solve's dtype.
  `gptq_quantize` takes the array over and solves in it in place, so a
  caller that passes this object keeps no `K x K` array alive (and can drop
  the statistic it was copied from first).
  """

  def __init__(self, h: np.ndarray, dead: np.ndarray, perm: np.ndarray | None):
    self._h, self.dead, self.perm = h, dead, perm
    self.shape = h.shape

  def take(self) -> np.ndarray:
    h, self._h = self._h, None
    if h is None:
      raise ValueError("this PreparedHessian was already used by gptq_quantize")
    return h


def prepare_hessian(h: Any, *, count: float | None = None, act_order: bool = False,
                    solve_dtype: Any = "float64", name: str = "weight") -> PreparedHessian:
  """GPTQ's working copy of the Hessian `h` (see `gptq_quantize` for the arguments).

  `h` is read, never copied whole: the one `K x K` copy is made in row
  blocks, permuted (act-order) and scaled (`count`) on the way.

  Raises:
    ValueError: NaN/Inf in `h`, a zero Hessian, an unknown `solve_dtype`.
  """
  solve = np.dtype(solve_dtype)
  if solve not in (np.dtype(np.float32), np.dtype(np.float64)):
    raise ValueError(f"GPTQ {name}: solve_dtype must be 'float32' or 'float64', got "
                     f"{solve_dtype!r}")
  h_in = np.asarray(h)  # a jax array on the host: a read-only view, no copy
  if h_in.ndim != 2 or h_in.shape[0] != h_in.shape[1]:
    raise ValueError(f"GPTQ {name}: the Hessian must be square, got shape {h_in.shape}")
  k = h_in.shape[0]
  if not (np.isfinite(np.max(h_in)) and np.isfinite(np.min(h_in))):  # NaN propagates
    raise ValueError(f"GPTQ {name}: the Hessian holds NaN/Inf values (NaN/Inf in the "
                     "calibration inputs, e.g. token ids beyond the vocabulary or overflowing "
                     "activations)")
  hdiag = np.diag(h_in)
  if count is not None:  # the Hessian's diagonal exactly as formed below
    hdiag = np.asarray(hdiag, np.float32) * np.float32(2.0) / np.float32(max(count, 1.0))
  dead = hdiag == 0
  if dead.all():
    raise ValueError(
        f"GPTQ {name}: the Hessian is zero: no calibration rows reached this weight, its "
        "inputs are all zero, or they are so small (|x| < ~1e-19) that x^2 underflows "
        "float32. GPTQ would zero every weight; give it calibration data that exercises the "
        "layer, or quantize it round-to-nearest")
  perm = None
  if act_order:
    perm = np.argsort(-np.where(dead, 1.0, np.asarray(hdiag, np.float64)), kind="stable")
  rows_per = max(1, (8 << 20) // max(1, k * 4))
  hw = _aligned_empty((k, k), solve)
  for r0 in range(0, k, rows_per):
    r1 = min(k, r0 + rows_per)
    blk = h_in[r0:r1] if perm is None else h_in[perm[r0:r1]][:, perm]
    if count is not None:  # 2 X^T X / n in float32, as InputStats.hessian() forms it
      blk = np.asarray(blk, np.float32) * np.float32(2.0) / np.float32(max(count, 1.0))
    hw[r0:r1] = blk
  dp = dead if perm is None else dead[perm]
  hw[dp, dp] = 1.0
  return PreparedHessian(hw, dead, perm)


def gptq_quantize(w: jax.Array, h: Any, fmt: QuantFormat | str, *,
                  calibration: Any = "auto", percdamp: float = 0.01, block_size: int = 32,
                  act_order: bool = False, name: str = "weight", solve_dtype: Any = "float64",
                  count: float | None = None) -> GPTQResult:
  """GPTQ-quantizes one weight matrix.

  Args:
    w: `[in, out]` float weight (y = x @ w).
    h: `[in, in]` Hessian `2 X^T X / n` of the layer's inputs (see
      `hessian_init` / `hessian_update` / `hessian`), or a `PreparedHessian`
      (`prepare_hessian`, made with the same `act_order`).
    fmt: the target format: integer (any bits, sym/asym, int or float zero
      point), NF4 or FP8; per-tensor, per-output-channel or groups along the
      input axis.
    calibration: how each scale's range is chosen from the (updated) weights
      ("auto", "minmax", "signed_max", "percentile", "mse" or a
      `Calibration`; see `numerics.calibrate.Calibration`).
    percdamp: dampening, as a fraction of the mean Hessian diagonal.
    block_size: rows per lazy-update block (rounded to a multiple of the
      group size). The result does not depend on it (up to float rounding); the
      paper's 128 rewrites a 128-wide slice per column, and 32 was 1.2-2x faster
      on CPU (K = 576 / 1536, 8 column steps unrolled per loop trip).
    act_order: quantize rows in order of decreasing Hessian diagonal; group
      scales are then fixed from the original weights ("static groups").
    name: the weight's path, for messages.
    solve_dtype: precision of the inverse-Hessian factor: "float64" (the
      default) or "float32" (the reference implementation's: half the
      memory, which decides the peak at large K, 0.8 GB instead of 1.6 GB at
      K = 14336, and faster). Measured on Gemma 3 270M (GPTQ in Q4_0 on 6
      blocks, 4 windows, `tests/integration/test_gemma3.py`): perplexity
      18.11 with float64, 18.73 with float32; on SmolLM2 the two are within
      0.2%.
    count: when given, `h` is `X^T X` summed over `count` rows (an
      `InputStats.xtx`) and the Hessian `2 X^T X / count` is formed in the
      copy GPTQ makes anyway (no second K x K array).

  Memory: besides the caller's `h` (read, not copied whole), one `K x K`
  array of `solve_dtype` (the Hessian, then in place its factor), which the
  jitted loop reads in place when it is float32 (CPU; a float64 factor is
  converted once into a float32 copy). `GPTQ.apply` prepares the
  copy first and drops the statistic before the solve.

  Returns:
    `GPTQResult(qarray, loss, perm)`; `qarray` is a plain QArray of `fmt`.

  Raises:
    ValueError: unsupported format or layout, shape mismatch, NaN/Inf in the
      weight or the Hessian, a Hessian that is zero (no calibration rows, or
      inputs so small that their squares underflow float32: GPTQ would return
      all-zero weights) or stays indefinite after dampening, scales that
      overflow the format's scale dtype. Each names `name`.
  """
  fmt = resolve_format(fmt)
  w = jnp.asarray(w)
  _check_format(fmt, w.shape)
  cal = calibrate_lib.resolve_calibration(calibration)
  k, out = w.shape
  if not isinstance(h, PreparedHessian):
    h = prepare_hessian(h, count=count, act_order=act_order, solve_dtype=solve_dtype, name=name)
  elif (h.perm is not None) != act_order:
    raise ValueError(f"GPTQ {name}: the prepared Hessian was made with act_order="
                     f"{h.perm is not None}, gptq_quantize was called with act_order={act_order}")
  if h.shape != (k, k):
    raise ValueError(f"GPTQ: Hessian shape {h.shape} does not match the weight's input "
                     f"dimension {k} (weight shape {tuple(w.shape)})")
  qarray_lib.check_finite(w, f"{name} (GPTQ weight)")
  qarray_lib.check_range_fits(w, fmt, f"{name} (GPTQ)")
  dead, perm = h.dead, h.perm
  hw = h.take()  # ours now: solved in place below
  hdiag = np.empty(k, np.float64)  # the Hessian's diagonal in the weight's own row order
  hdiag[np.arange(k) if perm is None else perm] = np.diagonal(hw)
  wt = np.asarray(w, np.float32).T.copy()  # [out, in], the paper's layout
  wt[:, dead] = 0.0

  group = fmt.group_size if fmt.granularity == "group" else None
  has_zp = fmt.has_zero_point
  # Static scales: per-channel / per-tensor always, groups under act-order.
  static = group is None or act_order
  ngroups = k // group if group else 1
  if static:
    s_st, z_st = _choose_scales(jnp.asarray(wt.T), fmt, cal, importance=hdiag)  # stored
    s_st = np.asarray(s_st, np.float32)
    z_st = np.zeros_like(s_st) if z_st is None else np.asarray(z_st, np.float32)
    # Each input row's scale row (the loop gathers; no [K, out] copy of the scales).
    row_group = (np.arange(k) // group if group else np.zeros(k, np.int64)).astype(np.int32)

  if perm is not None:
    wt = wt[:, perm]
    if static:
      row_group = row_group[perm]

  hinv = inverse_cholesky_upper(hw, percdamp, what=f"GPTQ {name}", overwrite=True,
                                dtype=hw.dtype)
  del hw

  # Blocks hold whole groups; pad to whole blocks with identity Hessian rows
  # (padded rows are zero, quantize to zero and never touch real rows).
  g_loop = group if (group and not act_order) else 1
  block = max(g_loop, (block_size // g_loop) * g_loop)
  block = min(block, -(-k // g_loop) * g_loop)
  npad = -(-k // block) * block
  if npad > k:
    wt = np.concatenate([wt, np.zeros((out, npad - k), np.float32)], axis=1)
    hp = _aligned_empty((npad, npad), hinv.dtype)
    hp[:] = 0
    hp[:k, :k] = hinv
    hp[np.arange(k, npad), np.arange(k, npad)] = 1.0
    hinv = hp
  if static:
    # Padded rows use a scale row of ones and a zero point of zero (they are zero).
    shape = (ngroups, out) if group else (1, out)
    s_tab = np.concatenate([np.broadcast_to(s_st, shape), np.ones((1, out), np.float32)])
    z_tab = np.concatenate([np.broadcast_to(z_st, shape), np.zeros((1, out), np.float32)])
    col_group = np.full((npad,), s_tab.shape[0] - 1, np.int32)
    col_group[:k] = row_group
  else:
    s_tab = z_tab = np.zeros((1, out), np.float32)
    col_group = np.zeros((1,), np.int32)

  hinv32 = _device_f32(hinv)
  del hinv
  codes, g_scale, g_zp, loss = _gptq_loop(
      jnp.asarray(wt), hinv32, jnp.asarray(s_tab), jnp.asarray(z_tab), jnp.asarray(col_group),
      fmt=fmt, cal=cal, block=block, group=g_loop, dynamic=not static)
  del wt, hinv32
  codes = codes[:, :k]
  if perm is not None:
    codes = codes[:, np.argsort(perm)]
  if static:
    scale = jnp.asarray(s_st)
    zp = jnp.asarray(z_st) if has_zp else None
  else:
    scale = g_scale[:ngroups]
    zp = g_zp[:ngroups] if has_zp else None
  scale = scale.astype(fmt.scale_dtype)
  code_dtype = _code_dtype(fmt)
  if zp is not None:
    zdtype = fmt.scale_dtype if fmt.zero_point == "float" else (
        jnp.int8 if fmt.signed else jnp.uint8)
    zp = zp.astype(zdtype)
  qa = QArray.from_codes(codes.T.astype(code_dtype), fmt, scale, zp, dtype=w.dtype)
  qarray_lib.check_quantized(qa, f"{name} (GPTQ)", np.asarray(w), warn_underflow=False)
  return GPTQResult(qa, float(loss), perm)


def _code_dtype(fmt: QuantFormat):
  z = jnp.zeros((1,), jnp.float32) if fmt.has_zero_point else None
  zz = None if z is None else (z if fmt.zero_point == "float" else z.astype(jnp.int8))
  return jax.eval_shape(lambda: qarray_lib.encode(jnp.zeros((1,), jnp.float32), fmt,
                                                  jnp.ones((1,), jnp.float32), zz)).dtype


@dataclasses.dataclass(frozen=True)
class GPTQ:
  """GPTQ for the calibration driver (`capture.calibrate`).

  Each selected weight is seen as its `[K, N]` matrix (contraction axes
  first) with the Hessian of its input; the result is a QArray in the
  rule's format placed on the weight's own axes (`Part.leaf_format`).

  Attributes:
    percdamp, act_order, block_size, solve_dtype: as in `gptq_quantize`.
    act_observer: static activation ranges for rules with an `act_format`
      (see `activations.wrap_weight`); None keeps them dynamic.
  """

  percdamp: float = 0.01
  act_order: bool = False
  block_size: int = 32
  act_observer: Any = None
  solve_dtype: str = "float64"
  label: ClassVar[str] = "GPTQ"
  rule_type: ClassVar[type] = rules_lib.QuantRule

  @property
  def needs(self) -> frozenset:
    from quantjax.methods import activations as act_lib
    return frozenset({"hessian"}) | act_lib.observer_needs(self.act_observer)

  def apply(self, parts, record) -> dict:
    from quantjax.methods import activations as act_lib
    out = {}
    losses = record.setdefault("gptq_loss", {})
    for i, p in enumerate(parts):
      fmt = resolve_format(p.rule.format)
      if fmt.is_cast:
        q = qarray_lib.quantize(p.value, fmt, name=p.name)
      else:
        st = p.stats
        if st.xtx is None:
          raise ValueError(f"{p.name}: the Hessian was not collected")
        prep = prepare_hessian(st.xtx, count=st.count, act_order=self.act_order,
                               solve_dtype=self.solve_dtype, name=p.name)
        if not any(q.stats is st for q in parts[i + 1:]):
          st.xtx = None  # the driver keeps no other reference to a finished source's stats
        del st
        res = gptq_quantize(p.matrix(), prep, p.matrix_format(fmt),
                            calibration=p.rule.calibration, percdamp=self.percdamp,
                            act_order=self.act_order, block_size=self.block_size, name=p.name)
        q = p.qarray_from_matrix(res.qarray)
        losses[p.name] = res.loss
      out[p.key] = act_lib.wrap_weight(p, q, observer=self.act_observer)
    return out
