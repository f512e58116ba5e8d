"""Binary, ternary, FP8 and NF4 weights through the same rules.

Thin wrappers over the foundation formats: each returns `QuantRule`s (or
quantizes a tree) so these formats are selected by path regexes like every
other method.

* binary: `w ~ alpha * sign(w)`, `alpha = mean|w|` per block (XNOR-Net);
* ternary: `w ~ alpha * t`, `t = sign(w) [|w| > Delta]`, `Delta = 0.7 mean|w|`,
  `alpha` = mean of the |w| above the threshold (TWN);
* fp8 e4m3: scaled FP8 codes (per channel by default);
* nf4: 4-bit NormalFloat codebook with absmax scales per group (QLoRA).

References:
  Rastegari, Ordonez, Redmon, Farhadi. XNOR-Net. ECCV 2016,
  arXiv:1603.05279. Li, Zhang, Liu. Ternary Weight Networks, 2016,
  arXiv:1605.04711. Micikevicius et al. FP8 Formats for Deep Learning, 2022,
  arXiv:2209.05433. Dettmers, Pagnoni, Holtzman, Zettlemoyer. QLoRA, NeurIPS
  2023, arXiv:2305.14314.
"""

from __future__ import annotations

from typing import Any

from quantjax import transforms
from quantjax.numerics.formats import QuantFormat
from quantjax.rules import QuantRule

__all__ = ["format_rules", "binary_rules", "ternary_rules", "fp8_rules",
           "nf4_rules", "quantize_lowbit"]

def format_rules(fmt: QuantFormat | str, module_path: str) -> tuple[QuantRule, ...]:
  """`(QuantRule(module_path, fmt), skip everything else)`."""
  return (QuantRule(module_path=module_path, format=fmt), QuantRule(module_path=".*", skip=True))


def _fmt(kind: str, group_size: int | None, **kw) -> QuantFormat:
  if group_size is None:
    return QuantFormat(kind=kind, granularity="per_channel", **kw)
  return QuantFormat(kind=kind, granularity="group", group_size=group_size, **kw)


def binary_rules(module_path: str, group_size: int | None = None):
  """XNOR-Net binary weights (alpha per output channel, or per group)."""
  return format_rules(_fmt("binary", group_size), module_path)


def ternary_rules(module_path: str, group_size: int | None = None):
  """TWN ternary weights (Delta = 0.7 mean|w|, alpha per channel or group)."""
  return format_rules(_fmt("ternary", group_size), module_path)


def fp8_rules(module_path: str, group_size: int | None = None,
              kind: str = "fp8_e4m3"):
  """Scaled FP8 weights (e4m3 by default)."""
  return format_rules(_fmt(kind, group_size), module_path)


def nf4_rules(module_path: str, group_size: int | None = 64):
  """NF4 weights with absmax scales per group of `group_size` (QLoRA uses 64)."""
  return format_rules(_fmt("nf4", group_size), module_path)


def quantize_lowbit(params: Any, kind: str, *, module_path: str,
                    group_size: int | None = None) -> Any:
  """Quantizes the matched kernels to `kind` in ("binary", "ternary",
  "fp8_e4m3", "fp8_e5m2", "nf4")."""
  makers = {"binary": binary_rules, "ternary": ternary_rules, "nf4": nf4_rules,
            "fp8_e4m3": lambda m, g: fp8_rules(m, g, "fp8_e4m3"),
            "fp8_e5m2": lambda m, g: fp8_rules(m, g, "fp8_e5m2")}
  if kind not in makers:
    raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
  return transforms.quantize_params(params, makers[kind](module_path, group_size))
