import math

import pytest

from quantjax.numerics.inspect import describe, format_table


def test_pi_layouts():
  rows = {r.format: r for r in describe(math.pi)}
  assert rows["fp32"].bits == "0 10000000 10010010000111111011011"
  assert rows["fp16"].stored == 3.140625 and rows["bf16"].stored == 3.140625
  assert rows["fp8_e4m3"].stored == 3.25 and rows["fp8_e5m2"].stored == 3.0
  assert rows["int8"].stored == pytest.approx(100 * 4 / 127)
  assert rows["fp32"].rel_error < 1e-7 < rows["fp16"].rel_error < rows["fp8_e4m3"].rel_error


def test_saturation_and_subnormal_and_errors():
  rows = {r.format: r for r in describe(1e6)}
  assert "saturated" in rows["fp8_e4m3"].note and rows["fp8_e4m3"].stored == 448.0
  assert "overflow" in rows["fp16"].note
  rows = {r.format: r for r in describe(1e-6)}
  assert rows["fp16"].note == "subnormal"
  with pytest.raises(ValueError, match="finite"):
    describe(float("nan"))
  assert "| fp32 |" in format_table(1.0, describe(1.0))
