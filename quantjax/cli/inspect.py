"""`python -m quantjax.cli.inspect VALUE [--int8-range R]`: how VALUE is stored per format."""

from __future__ import annotations

import argparse
import sys

from quantjax.numerics.inspect import describe, format_table


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m quantjax.cli.inspect",
      description="Show the bits of a value in FP32, FP16, BF16, FP8 (e4m3, e5m2) and INT8.")
  parser.add_argument("value", type=float, help="the number to inspect, e.g. 3.14159")
  parser.add_argument("--int8-range", type=float, default=None,
                      help="INT8 covers [-R, R] (scale R/127); default: next power of two >= |value|")
  args = parser.parse_args(argv)
  try:
    layouts = describe(args.value, int8_range=args.int8_range)
  except ValueError as e:
    parser.error(str(e))
  print(format_table(args.value, layouts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
