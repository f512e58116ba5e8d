"""`python -m quantjax.plan`: will a run fit? Per-device memory on a mesh.

For a Llama-shaped model, a storage format and a mesh, estimates the bytes per
device to store the weights, to run GPTQ (one layer's FP32 weights and input
Hessian `d_in^2` in flight, plus the calibration activations), to evaluate
(weights + KV cache + activations of one batch) and to train with Adam in
FP32 (weights, gradients, two moments, activations), and says whether each
fits the device memory.

Weights, gradients and optimizer state are sharded over `fsdp x tensor` and
replicated over `data`; activations are split over `data` (batch) and
`tensor` (heads / hidden). Training activations, with no rematerialisation,
take `seq * batch * (34 d + 5 heads seq)` bytes per layer in 16-bit
(Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
Transformer Models", eq. 1), doubled here for FP32. These are planning
figures; `eval/memory.py` gives the actual bytes of a real tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

from quantjax.eval.memory import format_bits_per_weight

__all__ = ["ModelShape", "MODELS", "DEVICES", "Plan", "plan", "plan_table", "main"]


@dataclasses.dataclass(frozen=True)
class ModelShape:
  name: str
  vocab: int
  d: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  tied: bool

  @property
  def linear_params(self) -> int:
    """Parameters of the quantized linears (q, k, v, o, gate, up, down)."""
    attn = self.d * self.heads * self.head_dim * 2 + self.d * self.kv_heads * self.head_dim * 2
    mlp = 3 * self.d * self.hidden
    return self.layers * (attn + mlp)

  @property
  def other_params(self) -> int:
    """Embeddings, head and norms (kept in 16 bits by default)."""
    emb = self.vocab * self.d * (1 if self.tied else 2)
    return emb + self.layers * 2 * self.d + self.d

  @property
  def n_params(self) -> int:
    return self.linear_params + self.other_params


MODELS = {
    "smollm2-135m": ModelShape("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, 64, True),
    "llama3-8b": ModelShape("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 128, False),
    "llama3-70b": ModelShape("Llama-3-70B", 128256, 8192, 28672, 80, 64, 8, 128, False),
}

# Usable memory per device, bytes.
DEVICES = {
    "tpu-v5e": 16 * 2**30,
    "h100-80gb": 80 * 10**9,
    "h200": 141 * 10**9,
    "cpu-24gb": 24 * 2**30,
}


@dataclasses.dataclass(frozen=True)
class Plan:
  model: str
  format: str
  mesh: dict[str, int]
  device: str
  device_bytes: int
  store: float
  gptq: float
  evaluate: float
  train: float

  def fits(self, what: str) -> bool:
    return getattr(self, what) <= self.device_bytes


def _parse_mesh(spec: str) -> dict[str, int]:
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, spec.split(",")):
    if "=" not in part:
      raise ValueError(f"mesh entry {part!r} must be axis=size (axes data, fsdp, tensor)")
    k, v = part.split("=", 1)
    if k not in mesh:
      raise ValueError(f"unknown mesh axis {k!r}; expected data, fsdp, tensor")
    if not v.isdigit() or int(v) < 1:
      raise ValueError(f"mesh axis {k} must be a positive integer, got {v!r}")
    mesh[k] = int(v)
  return mesh


def plan(model: str | ModelShape, fmt: str | None, mesh: dict[str, int] | str, device: str, *,
         batch: int = 8, seq: int = 2048, calib_samples: int = 128, calib_seq: int = 512,
         other_bits: float = 16.0, remat: bool = True) -> Plan:
  """Per-device bytes for storing, GPTQ, evaluation and training.

  Args:
    model: a key of `MODELS` or a `ModelShape`.
    fmt: storage format of the linear layers (None: FP32 everywhere).
    mesh: `{"data", "fsdp", "tensor"}` sizes, or "data=2,fsdp=4,tensor=8".
    device: a key of `DEVICES`.
    batch, seq: global batch and sequence length for evaluation and training.
    calib_samples, calib_seq: GPTQ calibration set.
    other_bits: bits per value of embeddings/head/norms when `fmt` is set.
    remat: training rematerialises each layer (keeps only layer inputs, plus
      one layer's activations at a time); False keeps every activation.
  """
  if isinstance(model, str):
    if model not in MODELS:
      raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    model = MODELS[model]
  if device not in DEVICES:
    raise ValueError(f"unknown device {device!r}; known: {sorted(DEVICES)}")
  if isinstance(mesh, str):
    mesh = _parse_mesh(mesh)
  shards = mesh["fsdp"] * mesh["tensor"]
  dp, tp = mesh["data"], mesh["tensor"]
  if batch % dp:
    raise ValueError(f"batch {batch} does not split over data={dp}")
  m = model
  bpw = format_bits_per_weight(fmt, row_length=m.d)
  obits = 32.0 if fmt is None else other_bits
  store_total = m.linear_params * bpw / 8 + m.other_params * obits / 8
  store = store_total / shards

  # GPTQ: the quantized model so far + one layer in FP32 + the largest Hessian
  # (d_in^2, FP32; the MLP down projection has d_in = hidden) + calibration
  # activations of one layer input (FP32), split over data.
  layer_fp32 = 4 * m.linear_params / m.layers / shards
  hessian = 4 * max(m.d, m.hidden) ** 2
  calib_acts = 4 * calib_samples * calib_seq * max(m.d, m.hidden) / dp
  gptq = store + layer_fp32 + hessian + calib_acts

  # Evaluation: weights + KV cache (K and V, FP32) + activations of the widest op.
  local_batch = batch // dp
  kv = 2 * 4 * m.layers * local_batch * seq * m.kv_heads * m.head_dim / tp
  acts = 4 * local_batch * seq * (m.hidden + m.vocab / max(tp, 1) + m.heads * seq / tp)
  evaluate = store + kv + acts

  # Training in FP32 with Adam: 4 weights + 4 grads + 8 moments, sharded; activations
  # per layer ~ seq*batch*(34 d + 5 heads seq) half-precision bytes (Korthikanti et al.),
  # doubled for FP32, split over data and tensor.
  states = 16 * m.n_params / shards
  per_layer = 2 * local_batch * seq * (34 * m.d + 5 * m.heads * seq) / tp
  if remat:
    act_train = m.layers * 4 * local_batch * seq * m.d + per_layer
  else:
    act_train = m.layers * per_layer
  train = states + act_train
  return Plan(m.name, "fp32" if fmt is None else fmt, dict(mesh), device, DEVICES[device],
              store, gptq, evaluate, train)


def _gb(b: float) -> str:
  return f"{b / 2**30:,.2f}"


def plan_table(plans: list[Plan]) -> str:
  lines = ["| model | format | mesh (data, fsdp, tensor) | device | store GiB | GPTQ GiB | "
           "eval GiB | train GiB | fits (store / GPTQ / eval / train) |",
           "|---|---|---|---|---:|---:|---:|---:|---|"]
  for p in plans:
    fits = " / ".join("yes" if p.fits(w) else "no" for w in ("store", "gptq", "evaluate", "train"))
    mesh = f"{p.mesh['data']}, {p.mesh['fsdp']}, {p.mesh['tensor']}"
    lines.append(f"| {p.model} | {p.format} | {mesh} | {p.device} | {_gb(p.store)} | "
                 f"{_gb(p.gptq)} | {_gb(p.evaluate)} | {_gb(p.train)} | {fits} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m quantjax.plan",
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
  return 0


if __name__ == "__main__":
  sys.exit(main())
