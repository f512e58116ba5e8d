"""The CPU path of `ops.qdot`: quantized weights multiplied without a float copy.

On CPU, `qdot(x, w)` with a `QArray` weight and few rows of activations
(decode: batch 1 to 8; `MAX_ROWS` rows at most) runs a C++ kernel that XLA
calls through its FFI (`kernels/cpu/qmatmul.cc`, built from source by
`kernels/cpu_build.py`). The kernel reads the stored codes, decodes 16 at a
time in vector registers (4-bit nibbles, int8, uint8, 4-bit codes through a
16-level table: NF4, IQ4_NL, MXFP4 / NVFP4's E2M1; FP8 e4m3 / e5m2, BF16 /
FP16), accumulates `x * code` in
float32 per quantization group and applies the group's scale and offset once
per group, so a decode step moves the weight's stored bytes and nothing else:
no dequantized weight is ever written to memory. With more rows than `MAX_ROWS`
(prefill, evaluation) `qdot` keeps XLA's dequantize-then-dot: the float copy
of one layer's weight is then amortized over many rows, and XLA's GEMM is
faster than anything here at that size.

Why a compiled kernel. Measured side by side on the 2-core CPU this project
is developed on (`experiments/bench_decode.py`, layer table), at batch 1 on a
SmolLM2 MLP weight `[576, 1536]` in int4 group 64:

* XLA dequantize-then-dot (the reference path): slower than the FP32 dot,
  since it writes and reads back a float32 weight (4 B per value) to save
  reading 0.5 B.
* Multiply-and-reduce written in `jnp` so that XLA fuses the unpacking into a
  reduction (`sum(x[..., None] * dequant(codes), axis=k)`, also with the
  scales applied per group after an inner reduction): XLA CPU does fuse the
  unpacking, but emits the reduction over the major axis as scalar loops,
  several times slower than the FP32 dot. A batched-over-groups `dot_general`
  on the unpacked codes materializes them and is slower still.
* int8 x int8 dots with per-token activation scales would change the result
  of weight-only formats (W4A8 is another model), so they are used only
  where the model asks for them (W8A8 `act_format`).
* The FFI kernel: several times faster than the reference and faster than
  the FP32 dot at the same shape, for every format it takes (the benchmark
  prints the ratios and the fraction of the machine's measured copy
  bandwidth).

How it reads the weight, measured on the same machine. In a decode step
every weight comes from DRAM once (the quantized SmolLM2's 80 MB do not stay
in this machine's cache between steps: one core reads about 8 GB/s), so the
order of the reads decides the speed, not the arithmetic:

* For up to 4 rows of activations, the `[K, N]` codes are read in storage
  order, each row of codes whole, into partial sums kept in L1/L2, with a
  software prefetch 2 KiB ahead (the hardware prefetcher stops at 4 KiB
  pages). The earlier kernel tiled 64 output columns in registers and walked
  down every row of codes: one 64-byte line per row, strided, each line its
  own cache miss. On 64 q4_0 weights of 576 x 1536 (32 MB, more than stays
  cached), multiplied at M = 1 in one jitted call, the storage-order read ran
  at 7.8 GB/s against 3.3 GB/s for the tiled walk; the 210 projection
  weights of a q4_0 SmolLM2 (60 MB with scales) take 6.7 ms (8.9 GB/s). The
  tiled walk stays for 5-16 rows, where register blocking over rows pays.
* Work is split by rows of codes (or, `[N, K]`, by output rows) over the
  kernel's own helper threads, which spin briefly between calls. A decode
  step makes 211 calls of 10-100 us one after another; XLA's intra-op pool
  had put its worker to sleep between them, and waking it cost about what
  the call took: with the pool, two threads were no faster than one.

Formats and layouts the kernel takes (anything else falls back to the XLA
reference path, with a debug log naming the reason):

* codes: packed int4 / uint4 (int4 per-channel or group-wise, sym or asym,
  GGUF q4_0 / q4_1), int8 / uint8 (int8 per-channel, q8_0, int8 asym),
  FP8 e4m3 / e5m2, the BF16 / FP16 casts, and 4-bit codes that index a
  16-level table (`QuantFormat.levels`, passed to the kernel as float32):
  NF4, and llama.cpp's IQ4_NL (`kvalues_iq4nl`, fp16 block scales),
  MXFP4 (E2M1, E8M0 power-of-two block scales) and NVFP4 (E2M1, E4M3 scales
  per 16 values), which are stored packed like NF4 (two codes a byte along
  the group axis, low nibble first), so they take NF4's path with their own
  levels; 3-, 5-, 6- and 7-bit bit-plane codes, binary, ternary, Q2_0 and
  TQ1_0's trits are not taken;
* scales per group along the contraction axis, per output channel, or per
  tensor, stored as f32, f16, bf16, E8M0 or E4M3 (the last two decoded in
  the kernel exactly as `scale.astype(float32)`: E8M0 byte e is
  `2**(e - 127)`); integer zero points or float minima (q4_1);
* `contract_axis=0` (`[in, out]` weights, packed along `in`, output width a
  multiple of 16) and `contract_axis=1` (`[out, in]`, e.g. a tied embedding
  as the output head, packed along `in`, group a multiple of 32 codes for
  4-bit and 16 for the others: NVFP4's blocks of 16 fall back there).

IQ4_NL and MXFP4 decode as fast as q4_0: on a `[576, 1536]` weight
(`python -m experiments.bench_decode --layers_only`), 36 us against q4_0's
35 us at batch 1 (0.97x; 1.96x the FP32 dot), 81 against 80 us at batch 8;
they run at NF4's speed (the table lookup, `vpermps`, is the only
difference from q4_0's integer decode). NVFP4 was 0.83-0.91x of q4_0 (twice
as many scales, group 16). Through XLA's reference path they were about 2.5x
slower than q4_0's reference.

Activations of any float dtype are multiplied in float32; the result is cast
back to `x.dtype`. The gradient (should anything differentiate through a
decode step) is the reference path's.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.kernels import cpu_build
from quantjax.numerics import formats as formats_lib
from quantjax.numerics.qarray import QArray

__all__ = ["MAX_ROWS", "Plan", "available", "load_error", "plan", "cpu_matmul",
           "cpu_matmul_reference", "dequantized_operand", "enabled"]

_log = logging.getLogger(__name__)

# Rows of activations up to which the kernel is used (decode, small batches).
# Above, XLA's dequantize-then-dot wins (see the module docstring).
MAX_ROWS = 16
_TARGET = "quantjax_qmatmul"
_ABI = 2  # 2: E8M0 / E4M3 scales, IQ4_NL / MXFP4 / NVFP4 as table kinds

# Code kinds, zero-point modes and layouts of qmatmul.cc.
_U4, _S8, _U8, _NF4, _E4M3, _E5M2, _BF16, _F16, _F32 = range(9)
_FLOAT_KINDS = {jnp.dtype(jnp.float32): _F32, jnp.dtype(jnp.bfloat16): _BF16,
                jnp.dtype(jnp.float16): _F16}
_ZP = {"none": 0, "int": 1, "float": 2}
# 4-bit codes that index a 16-level table (`QuantFormat.levels`): NF4 and llama.cpp's
# IQ4_NL, MXFP4 and NVFP4, all packed like NF4 (two codes a byte along the group axis,
# the first in the low nibble); they run as the kernel's table kind with their levels.
_TABLE_KINDS = ("nf4", "iq4_nl", "mxfp4", "nvfp4")
# Scale dtypes the kernel reads as they are stored. E8M0 (MXFP4: byte e is 2^(e - 127))
# and E4M3 (NVFP4) are decoded in the kernel to the float32 values of the format's own
# dequantization (`scale.astype(float32)`); converting them in XLA before the call
# instead cost an extra op that doubled the call's time at batch 1 (76 against 35 us
# for q4_0 on a [576, 1536] weight).
_SCALE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16,
                                               jnp.float8_e8m0fnu, jnp.float8_e4m3fn))


class Plan(NamedTuple):
  """How the kernel reads one weight (static: part of the trace)."""

  layout: int       # 0: [K, N] (contract_axis 0); 1: [N, K] (contract_axis 1)
  kind: int         # code kind
  group: int        # contraction values per scale
  zp_mode: int      # 0 none, 1 integer zero point, 2 float minimum
  has_scale: bool
  code_offset: float  # added to the stored code (packed int codes are stored minus qmin)
  k: int
  n: int
  table: str = ""   # 4-bit table kinds: the format kind whose 16 levels the codes index


_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None


def enabled() -> bool:
  """False when `QUANTJAX_CPU_KERNEL` is 0/false/off (then qdot keeps the XLA path)."""
  return os.environ.get("QUANTJAX_CPU_KERNEL", "1").lower() not in ("0", "false", "off", "no")


def available() -> bool:
  """True once the kernel is built, loaded and registered with XLA (tried once)."""
  global _loaded, _error
  if _loaded is not None:
    return _loaded
  with _lock:
    if _loaded is not None:
      return _loaded
    try:
      path = cpu_build.library_path()
      if not path.exists():
        _log.info("building the quantjax CPU kernel (once): %s", path)
      path = cpu_build.build()
      lib = ctypes.cdll.LoadLibrary(str(path))
      abi = lib.quantjax_qmatmul_abi()
      if abi != _ABI:
        raise RuntimeError(f"{path} has ABI {abi}, expected {_ABI}; rebuild with "
                           "python -m quantjax.kernels.cpu_build --force")
      jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.QuantjaxQMatmul),
                                  platform="cpu")
      _loaded = True
    except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
      _error = f"{type(e).__name__}: {e}"
      _log.warning("quantjax CPU kernel unavailable, qdot uses XLA's dequantize-then-dot: %s",
                   _error)
      _loaded = False
  return _loaded


def load_error() -> str | None:
  """Why `available()` is False (None when it is True or was not tried)."""
  return _error


def _rows(x_shape) -> int:
  return int(math.prod(x_shape[:-1]))


def plan(x: Any, w: Any, contract_axis: int = 0, *, max_rows: int | None = MAX_ROWS
         ) -> tuple[Plan | None, str]:
  """`(Plan, "")` when the kernel computes `qdot(x, w, contract_axis)`, else `(None, reason)`.

  `w` is a `QArray` or a float32 / bfloat16 / float16 array.
  """
  if not isinstance(w, QArray) and not (hasattr(w, "dtype") and hasattr(w, "shape")):
    return None, f"weight is a {type(w).__name__}, not a QArray or an array"
  if len(w.shape) != 2 or contract_axis not in (0, 1):
    return None, f"needs a 2-D weight and contract_axis 0 or 1 (weight shape {tuple(w.shape)})"
  xs = tuple(getattr(x, "shape", ()))
  if not xs:
    return None, "x has no shape"
  m = _rows(xs)
  if max_rows is not None and m > max_rows:
    return None, f"{m} rows > MAX_ROWS={max_rows} (XLA's dequantize-then-dot is faster)"
  if m == 0:
    return None, "x has no rows"
  if not jnp.issubdtype(getattr(x, "dtype", jnp.float32), jnp.floating):
    return None, f"x dtype {x.dtype} is not floating point"
  k = w.shape[contract_axis]
  n = w.shape[1 - contract_axis]
  if xs[-1] != k:
    return None, (f"x {xs} does not contract with weight {tuple(w.shape)} "
                  f"(contract_axis={contract_axis})")
  if not isinstance(w, QArray):
    kind = _FLOAT_KINDS.get(jnp.dtype(w.dtype))
    if kind is None:
      return None, f"weight dtype {w.dtype} is not float32/bfloat16/float16"
    if (n if contract_axis == 0 else k) % 16:
      return None, f"{'N' if contract_axis == 0 else 'K'} is not a multiple of 16"
    return Plan(contract_axis, kind, k, 0, False, 0.0, k, n), ""
  f = w.fmt
  # code kind
  if f.kind == "int" and f.bits == 4:
    kind, offset = _U4, float(f.qmin)
  elif f.kind in _TABLE_KINDS:
    kind, offset = _NF4, 0.0
  elif f.kind == "int" and f.bits == 8:
    kind, offset = (_S8 if f.signed else _U8), 0.0
  elif f.kind in ("fp8_e4m3", "fp8_e5m2"):
    kind, offset = (_E4M3 if f.kind == "fp8_e4m3" else _E5M2), 0.0
  elif f.kind in ("bf16", "fp16"):
    kind, offset = (_BF16 if f.kind == "bf16" else _F16), 0.0
  else:
    return None, f"no CPU kernel for {f.bits}-bit {f.kind} codes ({f.name})"
  per = 2 if kind in (_U4, _NF4) else 1
  if per == 2 and (f.group_axis % 2) != contract_axis:
    return None, f"4-bit codes packed along axis {f.group_axis % 2}, not the contraction axis"
  if k % per:
    return None, f"K={k} is odd for 4-bit codes"
  # scale layout
  if f.is_cast:
    group, has_scale = k, False
  elif f.granularity == "group":
    if f.group_axis % 2 != contract_axis:
      return None, f"groups run along axis {f.group_axis % 2}, not the contraction axis"
    group, has_scale = f.group_size, True
  elif f.granularity == "per_channel":
    if f.channel_axis % 2 != 1 - contract_axis:
      return None, "per-channel scales are along the contraction axis"
    group, has_scale = k, True
  else:  # per_tensor
    group, has_scale = k, True
  if k % group:
    return None, f"group {group} does not divide K={k}"
  sdt = None if w.scale is None else jnp.dtype(w.scale.dtype)
  if has_scale and sdt not in _SCALE_DTYPES:
    return None, f"scale dtype {sdt} is not f32/f16/bf16/e8m0/e4m3"
  zp_mode = _ZP["none"] if not f.has_zero_point else _ZP[f.zero_point]
  if zp_mode == _ZP["int"] and jnp.dtype(w.zero_point.dtype) not in (jnp.dtype(jnp.int8),
                                                                     jnp.dtype(jnp.uint8)):
    return None, f"integer zero point of dtype {w.zero_point.dtype}"
  if contract_axis == 0 and n % 16:
    return None, f"output width N={n} is not a multiple of 16"
  if contract_axis == 1 and group % (16 * per):
    return None, f"group {group} along the contraction axis is not a multiple of {16 * per}"
  return Plan(contract_axis, kind, group, zp_mode, has_scale, offset, k, n,
              f.kind if kind == _NF4 else ""), ""


def _scales(w: QArray, p: Plan) -> tuple[jax.Array, jax.Array]:
  """The scale and zero-point operands: kn `[groups, N]`, nk `[N, groups]`."""
  groups = p.k // p.group
  shape = (groups, p.n) if p.layout == 0 else (p.n, groups)
  if not p.has_scale:
    dummy = jnp.zeros((1,), jnp.float32)
    return dummy, dummy
  scale = jnp.broadcast_to(w.scale, shape) if w.scale.size == 1 else w.scale.reshape(shape)
  if p.zp_mode == 0:
    return scale, jnp.zeros((1,), jnp.float32)
  z = w.zero_point
  zero = jnp.broadcast_to(z, shape) if z.size == 1 else z.reshape(shape)
  return scale, zero


def _levels(kind: str) -> np.ndarray:
  """The 16 float32 levels a table kind's codes index (NF4, IQ4_NL, MXFP4, NVFP4)."""
  return formats_lib.QuantFormat(kind=kind).levels.astype(np.float32)


def _call(x2: jax.Array, w: Any, p: Plan) -> jax.Array:
  if isinstance(w, QArray):
    codes = w.qvalue
    scale, zero = _scales(w, p)
  else:
    codes = w
    scale = zero = jnp.zeros((1,), jnp.float32)
  lut = jnp.asarray(_levels(p.table) if p.kind == _NF4 else np.zeros((1,), np.float32))
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], p.n), jnp.float32),
                          vmap_method="sequential")
  return call(x2, codes, scale, zero, lut, layout=np.int64(p.layout), kind=np.int64(p.kind),
              group=np.int64(p.group), zp_mode=np.int64(p.zp_mode),
              has_scale=np.int64(int(p.has_scale)), code_offset=np.float32(p.code_offset))


def dequantized_operand(w: jax.Array) -> jax.Array:
  """A dequantized weight as the dot's own operand on CPU (the XLA path's one CPU change).

  XLA CPU hands large dots to YNNPACK fusions, which also absorb the
  elementwise ops that produce an operand. A dequantized weight's scale,
  zero point, table lookup (NF4) or bit-plane gathering (3-bit) then runs
  inside the GEMM's tiling, repeated for every block of rows: measured on
  SmolLM2 evaluation (8 x 512 tokens), int3 g64 asym ran at 0.78x and NF4 g64
  at 0.86x of FP32's tokens/s, while the dequantization alone costs well
  under 1% of the forward pass. An optimization barrier keeps the
  dequantized weight a buffer of its own (written once per call, amortized
  over the rows), which the GEMM reads like a float weight. Other backends
  keep XLA's fusion (GPUs fuse dequantization into their dot kernels well).
  """
  if jax.default_backend() != "cpu":
    return w
  return jax.lax.optimization_barrier(w)


def cpu_matmul_reference(x: jax.Array, w: Any, contract_axis: int = 0) -> jax.Array:
  """What the kernel computes: `x @ dequantize(w)` in float32 (`[..., N]`, float32)."""
  wf = w.dequantize(jnp.float32) if isinstance(w, QArray) else jnp.asarray(w, jnp.float32)
  return jax.lax.dot_general(x.astype(jnp.float32), wf,
                             (((x.ndim - 1,), (contract_axis,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x2: jax.Array, w: QArray, p: Plan) -> jax.Array:
  return _call(x2, w, p)


def _matmul_fwd(x2, w, p):
  return _call(x2, w, p), (x2, w)


def _matmul_bwd(p, res, g):
  x2, w = res
  _, vjp = jax.vjp(lambda a, b: cpu_matmul_reference(a, b, p.layout), x2, w)
  return vjp(g)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def cpu_matmul(x: jax.Array, w: Any, contract_axis: int = 0, *,
               max_rows: int | None = None) -> jax.Array:
  """`qdot(x, w, contract_axis=...)` through the CPU kernel; `[..., N]` in `x.dtype`.

  Raises ValueError naming both shapes when the kernel does not take the pair
  (see `plan`), and RuntimeError when the kernel could not be built.
  """
  p, reason = plan(x, w, contract_axis, max_rows=max_rows)
  if p is None:
    raise ValueError(f"the quantjax CPU kernel does not take x {getattr(x, 'dtype', '?')}"
                     f"{tuple(getattr(x, 'shape', ()))} with weight "
                     f"{getattr(w, 'fmt', type(w).__name__)} {tuple(getattr(w, 'shape', ()))} "
                     f"(contract_axis={contract_axis}): {reason}")
  if not available():
    raise RuntimeError(f"the quantjax CPU kernel is not available: {load_error()}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return _matmul(x2, w, p).astype(x.dtype).reshape(*lead, p.n)
