import jax.numpy as jnp
import pytest

from quantjax.numerics.formats import QuantFormat


@pytest.mark.parametrize("spec,kind,bits,sym,gran,group", [
    ("int8", "int", 8, True, "per_channel", None),
    ("int4_g64", "int", 4, True, "group", 64),
    ("int4_g64_asym", "int", 4, False, "group", 64),
    ("int3_g64_asym", "int", 3, False, "group", 64),
    ("int8_t", "int", 8, True, "per_tensor", None),
    ("nf4_g64", "nf4", 4, True, "group", 64),
    ("fp8_e4m3", "fp8_e4m3", 8, True, "per_channel", None),
    ("fp8_e5m2_t", "fp8_e5m2", 8, True, "per_tensor", None),
    ("binary", "binary", 1, True, "per_channel", None),
    ("ternary_g32", "ternary", 2, True, "group", 32),
    ("bf16", "bf16", 16, True, "per_tensor", None),
    ("fp16", "fp16", 16, True, "per_tensor", None),
])
def test_parse(spec, kind, bits, sym, gran, group):
  f = QuantFormat.parse(spec)
  assert (f.kind, f.bits, f.symmetric, f.granularity, f.group_size) == (kind, bits, sym, gran, group)
  assert QuantFormat.parse(f.name) == f


def test_defaults_signedness():
  assert QuantFormat(kind="int", bits=4).signed
  assert not QuantFormat(kind="int", bits=4, symmetric=False).signed
  f = QuantFormat.parse("int4_g32_asymf")
  assert f.zero_point == "float" and not f.signed and f.qmin == 0 and f.qmax == 15
  assert QuantFormat(kind="int", bits=8).qmin == -128


@pytest.mark.parametrize("kwargs,msg", [
    (dict(kind="int", bits=0), "out of range"),
    (dict(kind="int", bits=9), "out of range"),
    (dict(kind="int", bits=1), "binary"),
    (dict(kind="int", bits=4, granularity="group"), "needs group_size"),
    (dict(kind="int", bits=4, group_size=64), "only valid with granularity='group'"),
    (dict(kind="int", bits=4, granularity="group", group_size=0), "positive"),
    (dict(kind="nf4", symmetric=False), "symmetric only"),
    (dict(kind="fp8_e4m3", bits=4), "has 8 bits"),
    (dict(kind="bf16", granularity="group", group_size=64), "no groups"),
    (dict(kind="int", bits=4, symmetric=False, zero_point="float", signed=True), "unsigned"),
    (dict(kind="int8"), "kind"),
    (dict(kind="int", granularity="rows"), "granularity"),
    (dict(kind="nf4", rounding="stochastic"), "stochastic"),
    (dict(kind="int", rounding="up"), "rounding"),
])
def test_invalid_combinations_are_refused(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    QuantFormat(**kwargs)


@pytest.mark.parametrize("spec", ["int9", "int4_q64", "float4", "", "int4_g"])
def test_parse_errors_name_the_spec(spec):
  with pytest.raises(ValueError):
    QuantFormat.parse(spec)


def test_hashable_and_frozen():
  f = QuantFormat.parse("int4_g64")
  assert hash(f) == hash(QuantFormat.parse("int4_g64"))
  with pytest.raises(Exception):
    f.bits = 3  # type: ignore[misc]
  assert f.code_dtype == jnp.int8 and f.packed
