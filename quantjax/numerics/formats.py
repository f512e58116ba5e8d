"""Number formats: what a quantized value is and how its scales are shared.

A `QuantFormat` is pure description (no arrays): the kind of number (integer,
binary, ternary, FP8, NF4, one of llama.cpp's codebook types IQ4_NL, MXFP4,
NVFP4 and Q2_0, or a plain FP16/BF16 cast; llama.cpp's Q1_0 and TQ1_0 are the
binary and ternary kinds in blocks of 128 and 256 with float16 scales), its bit width and
signedness, whether it is symmetric or asymmetric (and then whether the offset
is an integer zero point, as in PyTorch/ONNX, or a float minimum, as GGUF's
Q4_1 stores it), the granularity of the scales (per tensor, per channel, or in
groups along the contraction axis), and the rounding mode.

Axis conventions follow Flax kernels `[in, out]`: per-channel scales are per
output column (`channel_axis=-1`), groups run along the input axis
(`group_axis=0`). Change both for `[out, in]` weights.

Invalid combinations are refused at construction, with a message naming them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["QuantFormat", "NF4_CODEBOOK", "KINDS", "GRANULARITIES", "CODEBOOK_KINDS",
           "IQ4_NL_LEVELS", "FP4_E2M1_LEVELS", "Q2_0_LEVELS", "LLAMACPP_SPECS", "LLAMACPP_BLOCKS"]

# llama.cpp's codebook types: a code is an index into a fixed table of levels, and a
# value is `levels[code] * scale` (`quantjax.numerics.llamacpp_types`).
CODEBOOK_KINDS = ("iq4_nl", "mxfp4", "nvfp4", "q2_0")
KINDS = ("int", "binary", "ternary", "fp8_e4m3", "fp8_e5m2", "nf4", "fp16", "bf16") + CODEBOOK_KINDS
GRANULARITIES = ("per_tensor", "per_channel", "group")
ZERO_POINTS = ("int", "float")
ROUNDINGS = ("nearest_even", "stochastic")

# NormalFloat-4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an
# exact zero (Dettmers et al., QLoRA, 2023, Appendix E).
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0
], dtype=np.float32)

# llama.cpp's codebook levels (ggml/src/ggml-common.h), indexed by the code a GGUF block
# stores. IQ4_NL: `kvalues_iq4nl`, 16 sorted int8 levels. MXFP4 / NVFP4: the FP4 E2M1
# values in the order of ggml's `kvalues_mxfp4` (which holds them doubled: 0, 1, 2, 3,
# 4, 6, 8, 12, then negated; ggml halves its scales to match): codes 0-7 are +0 ... +6,
# codes 8-15 their negatives (code 8 is zero too). Q2_0: code c stands for c - 1.
IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113], dtype=np.float32)
FP4_E2M1_LEVELS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
Q2_0_LEVELS = np.array([-1.0, 0.0, 1.0, 2.0], dtype=np.float32)

# llama.cpp's legacy GGUF block types as formats: groups of 32 along the
# contraction axis with float16 scales (and float16 minima for the _1 types).
GGUF_SPECS = {
    "q8_0": dict(bits=8, symmetric=True, signed=True),
    "q4_0": dict(bits=4, symmetric=True, signed=True),
    "q4_1": dict(bits=4, symmetric=False, zero_point="float", signed=False),
    "q5_0": dict(bits=5, symmetric=True, signed=True),
    "q5_1": dict(bits=5, symmetric=False, zero_point="float", signed=False),
}

# llama.cpp's newer block types (ggml-common.h of the pinned llama.cpp) as formats, each
# with its block's scale: IQ4_NL (32 values, fp16 scale, 4.5 bits per weight), MXFP4 (32,
# E8M0 power-of-two scale, 4.25), NVFP4 (16 per UE4M3 scale, 4 scales per 64-value GGUF
# block, 4.5), Q2_0 (64, fp16, 2.25), Q1_0 (128 signs, fp16 mean |x|, 1.125), TQ2_0
# (Q2_0's levels in blocks of 256, another byte layout, 2.0625), and TQ1_0 (the ternary
# kind, -1/0/+1 times an fp16 scale per 256, trits stored 5 per byte: 1.6875).
LLAMACPP_SPECS = {
    "iq4_nl": dict(kind="iq4_nl", group_size=32, scale_dtype=jnp.float16),
    "mxfp4": dict(kind="mxfp4", group_size=32, scale_dtype=jnp.float8_e8m0fnu),
    "nvfp4": dict(kind="nvfp4", group_size=16, scale_dtype=jnp.float8_e4m3fn),
    "q2_0": dict(kind="q2_0", group_size=64, scale_dtype=jnp.float16),
    "q1_0": dict(kind="binary", group_size=128, scale_dtype=jnp.float16),
    "tq2_0": dict(kind="q2_0", group_size=256, scale_dtype=jnp.float16),
    "tq1_0": dict(kind="ternary", group_size=256, scale_dtype=jnp.float16),
}
# Values per GGUF block of each llama.cpp type (a row's length must be a multiple).
LLAMACPP_BLOCKS = {"iq4_nl": 32, "mxfp4": 32, "nvfp4": 64, "q2_0": 64, "q1_0": 128, "tq2_0": 256,
                   "tq1_0": 256}
_SCALE_TOKENS = {"fp16s": jnp.float16, "fp32s": jnp.float32, "e8m0s": jnp.float8_e8m0fnu,
                 "e4m3s": jnp.float8_e4m3fn}

_FP8_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
_CAST_DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantFormat:
  """How values are quantized.

  Attributes:
    kind: one of `KINDS`.
    bits: bit width of an integer code (1..8). Fixed for the other kinds
      (binary 1, ternary 2, nf4 4, fp8 8, fp16/bf16 16, iq4_nl / mxfp4 / nvfp4 4,
      q2_0 2); leave it unset.
    signed: integer codes signed (two's complement range) or unsigned. Default
      (None): signed when symmetric, unsigned when asymmetric.
    symmetric: zero maps to code 0 and the scale comes from max|x|. Asymmetric
      formats cover [min, max] with an offset. Only integer formats may be
      asymmetric.
    zero_point: for asymmetric formats, "int" (x = (q - z) * s with integer z)
      or "float" (x = m + s * q with a float minimum m, GGUF Q4_1 style).
    granularity: "per_tensor", "per_channel" or "group".
    channel_axis: axis kept by per-channel scales (output channels).
    group_axis: axis along which groups of `group_size` consecutive values
      share a scale; sub-byte codes are packed along this axis too.
    group_size: values per group (granularity "group" only).
    rounding: "nearest_even" or "stochastic" (integer kinds; needs a key).
    scale_dtype: dtype scales (and float zero points) are stored in.
  """

  kind: str = "int"
  bits: int | None = None
  signed: bool | None = None
  symmetric: bool = True
  zero_point: str = "int"
  granularity: str = "per_channel"
  channel_axis: int = -1
  group_axis: int = 0
  group_size: int | None = None
  rounding: str = "nearest_even"
  scale_dtype: Any = jnp.float32

  def __post_init__(self):
    def refuse(msg):
      raise ValueError(f"invalid QuantFormat({self._short()}): {msg}")

    if self.kind not in KINDS:
      refuse(f"kind {self.kind!r} is not one of {KINDS}")
    if self.granularity not in GRANULARITIES:
      refuse(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
    if self.zero_point not in ZERO_POINTS:
      refuse(f"zero_point {self.zero_point!r} is not one of {ZERO_POINTS}")
    if self.rounding not in ROUNDINGS:
      refuse(f"rounding {self.rounding!r} is not one of {ROUNDINGS}")
    fixed_bits = {"binary": 1, "ternary": 2, "nf4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8,
                  "fp16": 16, "bf16": 16, "iq4_nl": 4, "mxfp4": 4, "nvfp4": 4, "q2_0": 2}
    if self.kind == "int":
      if self.bits is None:
        object.__setattr__(self, "bits", 8)
      if not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool):
        refuse(f"bits must be an int, got {self.bits!r}")
      if not 1 <= self.bits <= 8:
        refuse(f"bits={self.bits} is out of range: integer formats have 1 to 8 bits")
      if self.signed is None:
        object.__setattr__(self, "signed", bool(self.symmetric))
      if self.symmetric and self.signed and self.bits < 2:
        refuse("a signed symmetric 1-bit integer has no non-zero level; use kind='binary'")
      if not self.symmetric and self.zero_point == "float" and self.signed:
        refuse("a float-offset (min + step*q) format stores unsigned codes; set signed=False")
    else:
      if self.bits is not None and self.bits != fixed_bits[self.kind]:
        refuse(f"kind {self.kind!r} has {fixed_bits[self.kind]} bits, not bits={self.bits}")
      object.__setattr__(self, "bits", fixed_bits[self.kind])
      if self.signed is False:
        refuse(f"kind {self.kind!r} is signed; signed=False is not supported")
      object.__setattr__(self, "signed", True)
      if not self.symmetric:
        refuse(f"kind {self.kind!r} is symmetric only; asymmetric needs kind='int'")
      if self.rounding == "stochastic" and self.kind in ("nf4", "fp8_e4m3", "fp8_e5m2",
                                                        "fp16", "bf16") + CODEBOOK_KINDS:
        refuse(f"stochastic rounding is implemented for integer codes, not {self.kind!r}")
    if self.granularity == "group":
      if self.group_size is None:
        refuse("granularity='group' needs group_size")
      if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
        refuse(f"group_size must be a positive int, got {self.group_size!r}")
    elif self.group_size is not None:
      refuse(f"group_size={self.group_size} is only valid with granularity='group', "
             f"not {self.granularity!r}")
    if self.is_cast:
      if self.granularity == "group":
        refuse(f"{self.kind} is a plain cast with no scales; it has no groups")
    if self.kind == "binary" and self.rounding == "stochastic":
      refuse("binary codes are sign bits; stochastic rounding does not apply")

  # --- descriptive properties ------------------------------------------------
  def _short(self) -> str:
    return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                     if getattr(self, f.name) != f.default)

  @property
  def is_cast(self) -> bool:
    """True for FP16/BF16: a dtype cast, no scales."""
    return self.kind in _CAST_DTYPES

  @property
  def is_float_code(self) -> bool:
    """True when codes are floating point (FP8 and the casts)."""
    return self.kind in _FP8_DTYPES or self.kind in _CAST_DTYPES

  @property
  def has_zero_point(self) -> bool:
    return self.kind == "int" and not self.symmetric

  @property
  def packed(self) -> bool:
    """True when several codes share one byte (and bit-planes for 3/5/6/7 bits)."""
    return self.kind in ("int", "binary", "ternary", "nf4") + CODEBOOK_KINDS and self.bits < 8

  @property
  def code_dtype(self):
    """dtype of one unpacked code."""
    if self.kind in _FP8_DTYPES:
      return _FP8_DTYPES[self.kind]
    if self.kind in _CAST_DTYPES:
      return _CAST_DTYPES[self.kind]
    if self.kind == "int" and self.bits == 8:
      return jnp.int8 if self.signed else jnp.uint8
    return jnp.int8

  @property
  def qmin(self) -> int:
    """Smallest integer code (integer-like kinds)."""
    if self.kind == "int":
      if self.signed:
        return -(2 ** (self.bits - 1))
      return 0
    if self.kind in ("binary", "ternary"):
      return -1
    if self.kind == "nf4" or self.kind in CODEBOOK_KINDS:
      return 0
    raise ValueError(f"{self.kind} has no integer code range")

  @property
  def qmax(self) -> int:
    if self.kind == "int":
      if self.signed:
        return 2 ** (self.bits - 1) - 1
      return 2 ** self.bits - 1
    if self.kind in ("binary", "ternary"):
      return 1
    if self.kind == "nf4" or self.kind in CODEBOOK_KINDS:
      return 2 ** self.bits - 1  # codes index the kind's levels
    raise ValueError(f"{self.kind} has no integer code range")

  @property
  def max_representable(self) -> float:
    """Largest magnitude of a code before scaling (for scale = absmax / this)."""
    if self.kind == "int":
      if self.symmetric:
        return float(self.qmax)
      return float(self.qmax - self.qmin)
    if self.kind in ("binary", "ternary", "nf4"):
      return 1.0
    if self.kind in CODEBOOK_KINDS:
      return float(np.max(np.abs(self.levels)))
    if self.kind in _FP8_DTYPES:
      return float(ml_dtypes.finfo(_FP8_DTYPES[self.kind]).max)
    raise ValueError(f"{self.kind} has no scale")

  @property
  def levels(self) -> np.ndarray:
    """The values codes stand for before scaling (codebook kinds and NF4)."""
    table = {"iq4_nl": IQ4_NL_LEVELS, "mxfp4": FP4_E2M1_LEVELS, "nvfp4": FP4_E2M1_LEVELS,
             "q2_0": Q2_0_LEVELS, "nf4": NF4_CODEBOOK}
    if self.kind not in table:
      raise ValueError(f"{self.kind} codes are not indices into a table of levels")
    return table[self.kind]

  def replace(self, **changes) -> "QuantFormat":
    return dataclasses.replace(self, **changes)

  @property
  def llamacpp_type(self) -> str | None:
    """"IQ4_NL", "MXFP4", "NVFP4", "Q2_0", "Q1_0", "TQ2_0" or "TQ1_0" when this format is
    that llama.cpp block type (its kind, its block's scale grouping and scale dtype)."""
    if self.granularity != "group" or self.rounding != "nearest_even":
      return None
    for spec, kw in LLAMACPP_SPECS.items():
      if (self.kind == kw["kind"] and self.group_size == kw["group_size"]
          and jnp.dtype(self.scale_dtype) == jnp.dtype(kw["scale_dtype"])):
        return spec.upper()
    return None

  @property
  def gguf_type(self) -> str | None:
    """"Q4_0", "Q4_1", "Q5_0", "Q5_1" or "Q8_0" when this format is that GGUF block type;
    "IQ4_NL", "MXFP4", "NVFP4", "Q2_0", "Q1_0", "TQ2_0" or "TQ1_0" for llama.cpp's newer
    types."""
    if self.llamacpp_type is not None:
      return self.llamacpp_type
    if (self.kind != "int" or self.granularity != "group" or self.group_size != 32
        or jnp.dtype(self.scale_dtype) != jnp.float16):
      return None
    for spec, kw in GGUF_SPECS.items():
      if (self.bits == kw["bits"] and self.symmetric == kw["symmetric"]
          and self.signed == kw["signed"]
          and (self.symmetric or self.zero_point == kw.get("zero_point"))):
        return spec.upper()
    return None

  @property
  def name(self) -> str:
    """Short string that `QuantFormat.parse` reads back."""
    if self.gguf_type and self.rounding == "nearest_even":
      return self.gguf_type.lower()
    if self.kind in CODEBOOK_KINDS:
      return self._codebook_name()
    if self.is_cast or self.kind in _FP8_DTYPES or self.kind in ("binary", "ternary", "nf4"):
      parts = [self.kind]
    else:
      parts = [f"{'u' if (self.signed is False and self.symmetric) else ''}int{self.bits}"]
    if self.granularity == "group":
      parts.append(f"g{self.group_size}")
    elif self.granularity == "per_tensor" and not self.is_cast:
      parts.append("t")
    if self.has_zero_point:
      parts.append("asymf" if self.zero_point == "float" else "asym")
    if self.rounding == "stochastic":
      parts.append("sr")
    if not self.is_cast and jnp.dtype(self.scale_dtype) == jnp.float16:
      parts.append("fp16s")
    return "_".join(parts)

  def _codebook_name(self) -> str:
    """`iq4_nl_g64`, `mxfp4_g32_fp32s`, ...: the kind, its grouping and (when not the
    llama.cpp type's own) its scale dtype, which `parse` reads back."""
    parts = [self.kind]
    if self.granularity == "group":
      parts.append(f"g{self.group_size}")
    else:
      parts.append("t" if self.granularity == "per_tensor" else "c")
    sdt = jnp.dtype(self.scale_dtype)
    if sdt != jnp.dtype(LLAMACPP_SPECS[self.kind]["scale_dtype"]):
      parts.append(next(t for t, d in _SCALE_TOKENS.items() if jnp.dtype(d) == sdt))
    return "_".join(parts)

  def __str__(self) -> str:
    return self.name

  # --- constructors ------------------------------------------------------------
  @classmethod
  def parse(cls, spec: str, **overrides) -> "QuantFormat":
    """Reads a short spec: `int8`, `int4_g64`, `int4_g64_asym`, `int4_g64_asymf`,
    `int3_g64_asym`, `int8_t` (per tensor), `uint8_t`, `nf4_g64`, `fp8_e4m3`,
    `fp8_e5m2`, `binary`, `ternary_g64`, `fp16`, `bf16`; `_sr` adds stochastic
    rounding; `_fp16s` stores scales (and float minima) in float16; `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1` are GGUF's block types
    (group 32, float16 scales), which export to GGUF code for code; `iq4_nl`,
    `mxfp4`, `nvfp4`, `q2_0`, `q1_0`, `tq2_0` and `tq1_0` are llama.cpp's newer block
    types (`LLAMACPP_SPECS`), likewise (`ternary_g256_fp16s` is `tq1_0`). A codebook kind with tokens (`iq4_nl_g64`,
    `mxfp4_g32_fp32s`) starts from its llama.cpp type and changes the grouping
    (`g<n>`, `t`, `c`) or the scale dtype (`fp16s`, `fp32s`, `e8m0s`, `e4m3s`).
    Keyword overrides are applied last (e.g. `group_axis=1`)."""
    if not isinstance(spec, str) or not spec:
      raise ValueError(f"format spec must be a non-empty string, got {spec!r}")
    s = spec.strip().lower()
    if s in GGUF_SPECS:
      return cls(**{"kind": "int", "granularity": "group", "group_size": 32,
                    "scale_dtype": jnp.float16, **GGUF_SPECS[s], **overrides})
    if s in LLAMACPP_SPECS:
      return cls(**{"granularity": "group", **LLAMACPP_SPECS[s], **overrides})
    head = next((k for k in CODEBOOK_KINDS if s.startswith(k + "_")), None)
    if head is not None:
      return cls._parse_codebook(spec, head, s[len(head) + 1:], overrides)
    kw: dict[str, Any] = {}
    for fp in ("fp8_e4m3", "fp8_e5m2"):
      if s.startswith(fp):
        kw["kind"] = fp
        s = s[len(fp):]
        break
    else:
      head, _, s = s.partition("_")
      s = "_" + s if s else ""
      m = re.fullmatch(r"(u?)int(\d+)", head)
      if m:
        kw.update(kind="int", bits=int(m.group(2)))
        if m.group(1):
          kw["signed"] = False
      elif head in ("binary", "ternary", "nf4", "fp16", "bf16"):
        kw["kind"] = head
      else:
        raise ValueError(f"unknown format spec {spec!r}: cannot read {head!r}")
    if kw["kind"] in ("fp16", "bf16"):
      kw["granularity"] = "per_tensor"
    aspects = {"granularity": ("t", "c", "ch"), "symmetry": ("asym", "asymf", "sym"),
               "rounding": ("sr",), "scale dtype": ("fp16s",)}
    seen: dict[str, str] = {}
    for tok in filter(None, s.split("_")):
      aspect = "granularity" if re.fullmatch(r"g\d+", tok) else next(
          (a for a, toks in aspects.items() if tok in toks), None)
      if aspect is not None:
        if aspect in seen:
          raise ValueError(f"format spec {spec!r} sets the {aspect} twice ({seen[aspect]!r} and "
                           f"{tok!r}); give it once")
        seen[aspect] = tok
      if re.fullmatch(r"g\d+", tok):
        kw.update(granularity="group", group_size=int(tok[1:]))
      elif tok == "t":
        kw["granularity"] = "per_tensor"
      elif tok in ("c", "ch"):
        kw["granularity"] = "per_channel"
      elif tok == "asym":
        kw.update(symmetric=False, zero_point="int")
      elif tok == "asymf":
        kw.update(symmetric=False, zero_point="float", signed=False)
      elif tok == "sym":
        kw["symmetric"] = True
      elif tok == "sr":
        kw["rounding"] = "stochastic"
      elif tok == "fp16s":
        kw["scale_dtype"] = jnp.float16
      else:
        raise ValueError(f"unknown token {tok!r} in format spec {spec!r}")
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def _parse_codebook(cls, spec: str, kind: str, rest: str, overrides) -> "QuantFormat":
    kw: dict[str, Any] = {"granularity": "group", **LLAMACPP_SPECS[kind]}
    seen: dict[str, str] = {}
    for tok in filter(None, rest.split("_")):
      if re.fullmatch(r"g\d+", tok) or tok in ("t", "c", "ch"):
        aspect = "granularity"
      elif tok in _SCALE_TOKENS:
        aspect = "scale dtype"
      else:
        raise ValueError(f"unknown token {tok!r} in format spec {spec!r} (a {kind} format takes "
                         f"g<n>, t, c and a scale dtype: {', '.join(_SCALE_TOKENS)})")
      if aspect in seen:
        raise ValueError(f"format spec {spec!r} sets the {aspect} twice ({seen[aspect]!r} and "
                         f"{tok!r}); give it once")
      seen[aspect] = tok
      if tok.startswith("g"):
        kw.update(granularity="group", group_size=int(tok[1:]))
      elif tok == "t":
        kw.update(granularity="per_tensor", group_size=None)
      elif tok in ("c", "ch"):
        kw.update(granularity="per_channel", group_size=None)
      else:
        kw["scale_dtype"] = _SCALE_TOKENS[tok]
    kw.update(overrides)
    return cls(**kw)


def resolve_format(fmt: "QuantFormat | str") -> QuantFormat:
  """Accepts a `QuantFormat` or a spec string."""
  if isinstance(fmt, QuantFormat):
    return fmt
  if isinstance(fmt, str):
    return QuantFormat.parse(fmt)
  raise TypeError(f"expected a QuantFormat or a format spec string, got {type(fmt).__name__}")
