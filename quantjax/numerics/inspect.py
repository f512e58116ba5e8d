"""How one value is stored in FP32, FP16, BF16, FP8 (e4m3, e5m2) and INT8.

`describe(3.14159)` returns, per format, the sign / exponent / mantissa bits
(or the integer code and scale for INT8), the value actually stored and its
rounding error. `python -m quantjax.cli.inspect 3.14159` prints the table.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

__all__ = ["BitLayout", "describe", "format_table"]

# (name, numpy dtype, exponent bits, mantissa bits)
_FLOATS = (
    ("fp32", np.float32, 8, 23),
    ("fp16", np.float16, 5, 10),
    ("bf16", ml_dtypes.bfloat16, 8, 7),
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 4, 3),
    ("fp8_e5m2", ml_dtypes.float8_e5m2, 5, 2),
)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@dataclasses.dataclass(frozen=True)
class BitLayout:
  """One value in one format.

  Attributes:
    format: format name.
    bits: the stored bit pattern, fields separated by spaces
      (sign exponent mantissa for floats; the two's complement code for int8).
    stored: the value the pattern represents.
    abs_error: |stored - value|.
    rel_error: abs_error / |value| (0 when value is 0).
    note: scale used (int8), overflow/saturation remarks.
  """

  format: str
  bits: str
  stored: float
  abs_error: float
  rel_error: float
  note: str = ""


def _float_layout(value: float, name: str, dtype, ebits: int, mbits: int) -> BitLayout:
  note = ""
  with np.errstate(over="ignore", invalid="ignore"):
    if name == "fp8_e4m3":
      # e4m3fn has no infinity: values past the max saturate in our quantizer.
      fmax = float(ml_dtypes.finfo(dtype).max)
      v = float(np.clip(value, -fmax, fmax)) if math.isfinite(value) else value
      if v != value and math.isfinite(value):
        note = f"saturated to ±{fmax:g}"
      stored_arr = np.array(v, dtype=np.float32).astype(dtype)
    else:
      stored_arr = np.array(value, dtype=np.float32).astype(dtype)
  nbytes = stored_arr.dtype.itemsize
  raw = int(stored_arr.view(_UINT[nbytes]))
  total = nbytes * 8
  s = format(raw, f"0{total}b")
  bits = f"{s[0]} {s[1:1 + ebits]} {s[1 + ebits:]}"
  stored = float(stored_arr.astype(np.float64))
  if math.isinf(stored) and math.isfinite(value):
    note = "overflow to inf"
  err = abs(stored - value) if math.isfinite(stored) else math.inf
  rel = err / abs(value) if value != 0 else 0.0
  exp_field = int(s[1:1 + ebits], 2)
  bias = 2 ** (ebits - 1) - 1
  if not note and exp_field == 0 and raw & ((1 << (total - 1)) - 1):
    note = "subnormal"
  elif not note and math.isfinite(stored) and stored != 0:
    note = f"2^{exp_field - bias} x 1.{s[1 + ebits:]}b"
  return BitLayout(name, bits, stored, err, rel, note)


def _int8_layout(value: float, scale: float) -> BitLayout:
  q = int(np.clip(np.round(value / scale), -127, 127))
  stored = q * scale
  err = abs(stored - value)
  rel = err / abs(value) if value != 0 else 0.0
  bits = format(q & 0xFF, "08b")
  return BitLayout("int8", bits, stored, err, rel, f"code {q} x scale {scale:.6g}")


def describe(value: float, *, int8_range: float | None = None) -> list[BitLayout]:
  """Bit layouts of `value` in FP32, FP16, BF16, FP8 e4m3/e5m2 and INT8.

  Args:
    value: the number to inspect.
    int8_range: the symmetric range [-r, r] INT8 covers (scale = r / 127).
      Default: the next power of two at or above |value| (a per-tensor range
      that contains it), so the example shows INT8's step at that range.
  """
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"inspect needs a finite value, got {value}")
  out = [_float_layout(value, *f) for f in _FLOATS]
  if int8_range is None:
    int8_range = 2.0 ** math.ceil(math.log2(abs(value))) if value != 0 else 1.0
  if int8_range <= 0:
    raise ValueError(f"int8_range must be positive, got {int8_range}")
  out.append(_int8_layout(value, int8_range / 127.0))
  return out


def format_table(value: float, layouts: list[BitLayout]) -> str:
  lines = [f"value = {value!r}", "",
           "| format | bits (sign exponent mantissa) | stored value | abs error | rel error | note |",
           "|---|---|---|---|---|---|"]
  for b in layouts:
    lines.append(f"| {b.format} | `{b.bits}` | {b.stored:.10g} | {b.abs_error:.3g} | "
                 f"{b.rel_error:.3g} | {b.note} |")
  return "\n".join(lines)
