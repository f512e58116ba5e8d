"""compressed-tensors' tensor layouts: int32 bit packing, FP4 nibble packing, and
QArray <-> compressed-tensors arguments, codes and scales (`weight_args`,
`requant_format`, `ct_codes`, `ct_scale`, `cast_scale`, `act_args`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from quantjax.io.hf.scheme import HFFormatError, QArgs
from quantjax.numerics.formats import QuantFormat
from quantjax.numerics.qarray import ActQuantized, QArray, StaticActQuantized


# ----------------------------------------------------------------------------
# compressed-tensors' int32 packing (numpy).


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
  """Signed b-bit codes `[rows, cols]` -> int32 `[rows, ceil(cols*b/32)]`.

  compressed-tensors' dense packing: each code is offset by 2^(b-1) to
  unsigned, and code `i` of a row occupies bits `[i*b, (i+1)*b)` of the row's
  little-endian stream of int32 words (so for 4 bits, eight codes per word,
  the first in the lowest nibble; codes may straddle two words for b = 3, 5,
  6, 7).
  """
  if not 1 <= bits <= 8:
    raise HFFormatError(f"pack-quantized holds 1 to 8 bits per code, not {bits}")
  c = np.asarray(codes)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if c.size and (c.min() < lo or c.max() > hi):
    raise HFFormatError(f"{bits}-bit codes must lie in [{lo}, {hi}], got [{c.min()}, {c.max()}]")
  rows, cols = c.shape
  u = (c.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
  bitplanes = ((u[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, cols * bits)
  nwords = -(-cols * bits // 32)
  pad = nwords * 32 - cols * bits
  if pad:
    bitplanes = np.pad(bitplanes, ((0, 0), (0, pad)))
  packed = np.packbits(bitplanes, axis=1, bitorder="little")  # [rows, 4 * nwords] bytes
  return np.ascontiguousarray(packed).view("<i4").reshape(rows, nwords).astype(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
  """Inverse of `pack_int32`: int32 `[rows, words]` -> signed int8 codes `[rows, cols]`."""
  p = np.ascontiguousarray(np.asarray(packed).astype("<i4"))
  rows, nwords = p.shape
  if nwords * 32 < cols * bits:
    raise HFFormatError(f"{nwords} int32 words per row cannot hold {cols} codes of {bits} bits")
  bitplanes = np.unpackbits(p.view(np.uint8).reshape(rows, 4 * nwords), axis=1,
                            bitorder="little")[:, :cols * bits].reshape(rows, cols, bits)
  u = np.sum(bitplanes.astype(np.int16) << np.arange(bits, dtype=np.int16), axis=-1)
  return (u - (1 << (bits - 1))).astype(np.int8)


def weight_args(q: QArray, ax: int) -> QArgs | None:
  """The compressed-tensors weight args `q` is exactly, contraction axis `ax`; else None."""
  f = q.fmt
  if q.ndim != 2:
    return None
  if f.kind == "int":
    if f.has_zero_point and f.zero_point == "float":
      return None
    if f.symmetric and not f.signed:
      return None
    typ, bits = "int", f.bits
  elif f.kind in ("binary", "ternary"):
    typ, bits = "int", 2
  elif f.kind == "fp8_e4m3":
    typ, bits = "float", 8
  elif f.kind in _FP4:
    # compressed-tensors' FP4 schemes: groups of exactly 16 (NVFP4, E4M3 scales) or 32
    # (MXFP4, E8M0 scales) along the contraction axis.
    gs, sdt, strategy, name = _FP4[f.kind]
    if (f.granularity != "group" or f.group_axis % 2 != ax or int(f.group_size) != gs
        or jnp.dtype(f.scale_dtype) != jnp.dtype(sdt)):
      return None
    return QArgs(4, "float", True, strategy, gs, scale_dtype=name)
  else:
    return None
  if f.granularity == "group":
    if f.group_axis % 2 != ax or typ == "float":
      return None
    return QArgs(bits, typ, f.symmetric, "group", int(f.group_size))
  if f.granularity == "per_channel":
    if f.channel_axis % 2 != 1 - ax:
      return None
    return QArgs(bits, typ, f.symmetric, "channel")
  return QArgs(bits, typ, f.symmetric, "tensor")


# kind -> (group size, our scale dtype, compressed-tensors strategy, its scale_dtype name)
_FP4 = {"mxfp4": (32, jnp.float8_e8m0fnu, "group", "torch.uint8"),
        "nvfp4": (16, jnp.float8_e4m3fn, "tensor_group", "torch.float8_e4m3fn")}


def pack_fp4(codes: np.ndarray) -> np.ndarray:
  """FP4 E2M1 codes `[rows, cols]` (nibbles: sign bit 3, magnitude index 0-7, quantjax's
  and compressed-tensors' order alike) -> uint8 `[rows, cols / 2]`, element 2j in the low
  nibble of byte j (compressed-tensors' `pack_fp4_to_uint8`)."""
  c = np.asarray(codes).astype(np.uint8)
  if c.ndim != 2 or c.shape[1] % 2 or np.any(c > 15):
    raise HFFormatError(f"FP4 codes of shape {list(c.shape)}: need 2-D, an even row length and "
                        "codes 0-15")
  return np.ascontiguousarray(c[:, 0::2] | (c[:, 1::2] << 4))


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
  """Inverse of `pack_fp4`: uint8 `[rows, n]` -> codes uint8 `[rows, 2 n]`."""
  p = np.asarray(packed, np.uint8)
  return np.ascontiguousarray(np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[0], -1))


def requant_format(q: QArray, ax: int, n_in: int) -> QuantFormat:
  """The compressed-tensors-compatible format nearest to `q.fmt` (for re-quantization)."""
  f = q.fmt
  if f.granularity == "group" and f.kind != "fp8_e5m2" and n_in % int(f.group_size) == 0:
    gran = dict(granularity="group", group_size=int(f.group_size), group_axis=ax,
                channel_axis=1 - ax)
  elif f.granularity == "per_tensor":
    gran = dict(granularity="per_tensor")
  else:
    gran = dict(granularity="per_channel", channel_axis=1 - ax, group_axis=ax)
  if f.kind in ("fp8_e5m2", "fp8_e4m3"):
    if gran["granularity"] == "group":
      gran = dict(granularity="per_channel", channel_axis=1 - ax, group_axis=ax)
    return QuantFormat(kind="fp8_e4m3", **gran)
  bits = f.bits if f.kind == "int" else 4
  if f.kind == "int" and f.has_zero_point:
    return QuantFormat(kind="int", bits=bits, symmetric=False, zero_point="int", **gran)
  return QuantFormat(kind="int", bits=max(bits, 2), symmetric=True, **gran)


def ct_codes(q: QArray, args: QArgs, ax: int) -> tuple[np.ndarray, np.ndarray | None]:
  """Signed codes `[out, in]` and signed zero points (HF layout) of a compatible QArray."""
  f = q.fmt
  codes = np.asarray(q.codes())
  zp = None if q.zero_point is None else np.asarray(q.zero_point).astype(np.int16)
  if args.type == "int":
    codes = codes.astype(np.int16)
    if not f.symmetric and not f.signed:
      off = 1 << (f.bits - 1)
      codes = codes - off
      zp = zp - off
    codes = codes.astype(np.int8)
    zp = None if zp is None else zp.astype(np.int8)
  if ax == 0:
    codes = codes.T
    zp = None if zp is None else zp.T
  return np.ascontiguousarray(codes), None if zp is None else np.ascontiguousarray(zp)


def ct_scale(a: np.ndarray, args: QArgs, ax: int) -> np.ndarray:
  """A stored scale / zero point (params layout) in compressed-tensors' shape."""
  a = np.asarray(a)
  if args.strategy == "tensor":
    return a.reshape(1)
  return np.ascontiguousarray(a.T if ax == 0 else a)


def cast_scale(s: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, bool]:
  """Scale in the export dtype; True when that rounded any value."""
  out = np.asarray(s).astype(dtype)
  exact = np.array_equal(out.astype(np.float64), np.asarray(s).astype(np.float64))
  return out, not exact


def act_args(leaf: ActQuantized) -> QArgs:
  f = leaf.act_format
  if f.kind == "int":
    if f.bits != 8:
      raise HFFormatError(f"activation format {f.name}: compressed-tensors runtimes quantize "
                          "activations to 8 bits")
    if f.has_zero_point and f.zero_point == "float":
      raise HFFormatError(f"activation format {f.name}: a float minimum has no "
                          "compressed-tensors form (use an integer zero point)")
    typ = "int"
  elif f.kind == "fp8_e4m3":
    typ = "float"
  else:
    raise HFFormatError(f"activation format {f.name} has no compressed-tensors form "
                        "(int8 or fp8_e4m3)")
  if isinstance(leaf, StaticActQuantized):
    if leaf.act_scale is None or int(np.prod(np.shape(leaf.act_scale))) != 1:
      raise HFFormatError("static activation scales per input channel have no "
                          "compressed-tensors form (static input scales are per tensor)")
    return QArgs(8, typ, f.symmetric, "tensor", dynamic=False)
  if f.granularity == "group":
    raise HFFormatError(f"activation format {f.name}: group-wise activations are not exported")
  return QArgs(8, typ, f.symmetric, "token" if f.granularity == "per_channel" else "tensor",
               dynamic=True)
