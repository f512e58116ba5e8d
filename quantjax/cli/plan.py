"""`python -m quantjax.cli.plan`: per-device memory to store, run GPTQ on, evaluate and
train a model on a mesh (`quantjax.eval.plan`)."""

from __future__ import annotations

import argparse
import sys

from quantjax.eval import memory as memory_lib
from quantjax.eval.plan import DEVICES, MODELS, plan, plan_table, train_regimes


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m quantjax.cli.plan",
                               description="Per-device memory to store, GPTQ, evaluate and train.")
  ap.add_argument("--model", default="llama3-8b", help=f"one of {sorted(MODELS)}, or 'all'")
  ap.add_argument("--format", default="int4_g64_asym",
                  help="storage format of the linears; comma-separated for several; fp32 for none")
  ap.add_argument("--mesh", default="fsdp=8", help="e.g. data=2,fsdp=4,tensor=8")
  ap.add_argument("--device", default="h100-80gb", help=f"one of {sorted(DEVICES)}")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--no-remat", action="store_true",
                  help="training keeps all activations (default: per-layer rematerialisation)")
  ap.add_argument("--regimes", action="store_true",
                  help="also print training memory per regime (FP32 Adam, mixed, BF16, QAT, "
                       "adapters) for each model")
  ap.add_argument("--lora-rank", type=int, default=16)
  args = ap.parse_args(argv)
  models = sorted(MODELS) if args.model == "all" else [args.model]
  plans = []
  try:
    for m in models:
      for f in args.format.split(","):
        plans.append(plan(m, None if f == "fp32" else f, args.mesh, args.device,
                          batch=args.batch, seq=args.seq, remat=not args.no_remat))
  except ValueError as e:
    ap.error(str(e))
  print(plan_table(plans))
  if args.regimes:
    for m in models:
      f = args.format.split(",")[-1]
      f = "int4_g64" if f == "fp32" else f
      try:
        rows = train_regimes(m, mesh=args.mesh, batch=args.batch, seq=args.seq,
                             remat=not args.no_remat, fmt=f, lora_rank=args.lora_rank)
      except ValueError as e:
        ap.error(str(e))
      print(f"\n### Training {MODELS[m].name} per regime, per device (GB), mesh {args.mesh}, "
            f"batch {args.batch} x seq {args.seq}, remat {'off' if args.no_remat else 'on'}; "
            f"QAT / adapters on {f}, LoRA rank {args.lora_rank}\n")
      print(memory_lib.train_regime_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
