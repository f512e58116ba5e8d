"""`python -m quantjax.memory N_PARAMS [--formats ...]`: store vs train memory per format."""

from __future__ import annotations

import argparse
import sys

from quantjax.eval.memory import DEFAULT_FORMATS, estimate_table


def _formats(spec: str | None):
  if not spec:
    return DEFAULT_FORMATS
  return tuple(None if s in ("fp32", "f32") else s for s in spec.split(","))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m quantjax.memory",
      description="Bytes to store and to train N parameters, per quantization format.")
  parser.add_argument("n_params", type=float, help="number of parameters, e.g. 1e9 or 134515008")
  parser.add_argument("--formats", default=None,
                      help="comma-separated format specs (fp32,bf16,int8,int4_g64_asym,...)")
  parser.add_argument("--row-length", type=int, default=4096,
                      help="values per per-channel scale (the input width)")
  args = parser.parse_args(argv)
  if not args.n_params > 0:
    parser.error(f"n_params must be positive, got {args.n_params}")
  try:
    print(estimate_table(args.n_params, _formats(args.formats), row_length=args.row_length))
  except ValueError as e:
    parser.error(str(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())
