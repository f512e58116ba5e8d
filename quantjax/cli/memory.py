"""`python -m quantjax.cli.memory N_PARAMS [--formats ...]`: store memory per format, train
per regime.

Training rows (one per regime of `eval/memory.TRAIN_REGIMES`) give the states
(weights, gradients, Adam moments, working copies) of N parameters; with
`--model NAME --batch B --seq S` they use the model's shape (`quantjax.eval.plan`)
and add its activations (the model in `quantjax/eval/plan.py`'s docstring).
"""

from __future__ import annotations

import argparse
import sys

from quantjax.eval import plan as plan_lib
from quantjax.eval.memory import (DEFAULT_FORMATS, TRAIN_REGIMES, estimate_table,
                                  markdown_memory_table, train_regime_estimate,
                                  train_regime_table, tree_bytes)
from quantjax.rules import QuantRule
from quantjax.transforms import quantize_params


def _formats(spec: str | None):
  if not spec:
    return DEFAULT_FORMATS
  return tuple(None if s in ("fp32", "f32") else s for s in spec.split(","))


def _mlp_demo(width: int, formats) -> str:
  """Quantizes a linen MLP of `width`x`width` layers and tabulates its real bytes."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(3):
        x = nn.gelu(nn.Dense(width)(x))
      return nn.Dense(width)(x)

  params = MLP().init(jax.random.key(0), jnp.ones((1, width)))
  base = tree_bytes(params)
  out = [f"Flax linen MLP, 4 Dense layers of {width}x{width}: FP32 params {base:,} bytes", ""]
  for f in formats:
    if f is None:
      continue
    q = quantize_params(params, [QuantRule(module_path=r".*kernel", format=f)])
    out.append(f"### kernels in {f} (biases FP32)")
    out.append(markdown_memory_table(q, reference=params))
    out.append("")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m quantjax.cli.memory",
      description="Bytes to store and to train N parameters, per quantization format.")
  parser.add_argument("n_params", type=float, nargs="?", default=None,
                      help="number of parameters, e.g. 1e9 or 134515008")
  parser.add_argument("--mlp", type=int, default=None, metavar="WIDTH",
                      help="instead: quantize a real Flax MLP of WIDTHxWIDTH layers and print its bytes")
  parser.add_argument("--formats", default=None,
                      help="comma-separated format specs (fp32,bf16,int8,int4_g64_asym,...)")
  parser.add_argument("--row-length", type=int, default=4096,
                      help="values per per-channel scale (the input width)")
  parser.add_argument("--model", default=None,
                      help="training rows for a known model shape (see quantjax.eval.plan), with "
                           "activations")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--remat", action="store_true",
                      help="per-layer rematerialisation in the training rows (default off)")
  parser.add_argument("--qat-format", default="int4_g64",
                      help="format of the fake-quantized / frozen base weights (QAT, adapters)")
  parser.add_argument("--adapter-fraction", type=float, default=0.01,
                      help="without --model: adapter values as a fraction of the parameters")
  args = parser.parse_args(argv)
  if args.mlp is not None:
    print(_mlp_demo(args.mlp, _formats(args.formats or "int8,int4_g64,int4_g64_asym")))
    return 0
  if args.model is not None:
    if args.model not in plan_lib.MODELS:
      parser.error(f"unknown model {args.model!r}; known: {sorted(plan_lib.MODELS)}")
    if args.n_params is None:
      args.n_params = float(plan_lib.MODELS[args.model].n_params)
  if args.n_params is None:
    parser.error("give n_params (e.g. 1e9), --model NAME or --mlp WIDTH")
  if not args.n_params > 0:
    parser.error(f"n_params must be positive, got {args.n_params}")
  try:
    print(estimate_table(args.n_params, _formats(args.formats), row_length=args.row_length))
    print()
    print(_train_rows(args))
  except ValueError as e:
    parser.error(str(e))
  return 0


def _train_rows(args) -> str:
  if args.model is not None:
    rows = plan_lib.train_regimes(args.model, batch=args.batch, seq=args.seq, remat=args.remat,
                                  fmt=args.qat_format)
    m = plan_lib.MODELS[args.model]
    title = (f"Training {m.name} per regime: batch {args.batch} x seq {args.seq}, "
             f"remat {'on' if args.remat else 'off'}, activations included; QAT fake-quantizes "
             f"and the adapters regime freezes the linears in {args.qat_format} (LoRA rank 16 "
             "on every linear)")
  else:
    n = args.n_params
    rows = [train_regime_estimate(n, r, fmt=args.qat_format, row_length=args.row_length,
                                  adapter_params=args.adapter_fraction * n)
            for r in TRAIN_REGIMES]
    title = (f"Training states per regime (no activations: give --model for them); QAT / adapters "
             f"on all {n:,.0f} parameters in {args.qat_format}, adapters = "
             f"{args.adapter_fraction:g} of the parameters, working copies of every layer kept")
  return title + "\n\n" + train_regime_table(rows)


if __name__ == "__main__":
  sys.exit(main())
