"""Will a run fit? Per-device memory on a mesh (`python -m quantjax.cli.plan` prints it).

For a Llama-shaped model, a storage format and a mesh, estimates the bytes per
device to store the weights, to run GPTQ (one layer's FP32 weights and input
Hessian `d_in^2` in flight, plus the calibration activations), to evaluate
(weights + KV cache + activations of one batch) and to train with Adam in
FP32 (weights, gradients, two moments, activations), and says whether each
fits the device memory.

Weights, gradients and optimizer state are sharded over `fsdp x tensor` and
replicated over `data`; activations are split over `data` (batch) and
`tensor` (heads / hidden). These are planning figures; `eval/memory.py`
gives the actual bytes of a real tree.

Training memory per regime (`train_regimes`, `python -m quantjax.cli.plan
--regimes`): FP32 Adam, mixed precision, pure BF16, QAT with fake quantization
and LSQ step sizes, and a frozen quantized base with LoRA adapters on every
linear layer (`eval/memory.train_regime_estimate` for the states).

Activation model (`activation_bytes`). Following the accounting of Korthikanti
et al. (2022, section 4.1: count the tensors each op saves for its backward
pass), adapted to the Llama block (RMSNorm, grouped-query attention with RoPE,
SwiGLU, no dropout), one layer saves per token:

- RMSNorm inputs and outputs before attention and MLP: 4 d values;
- queries and keys after RoPE, values, the attention output: 2 (q + kv) values
  (q = heads x head_dim, kv = kv_heads x head_dim);
- gate and up projections, SiLU(gate) and the product fed to `down`: 4 hidden;
- the softmax probabilities: heads x seq values, in FP32 (quantjax's Llama
  computes the softmax in FP32 whatever the compute dtype);

in the activation dtype (4 B in FP32, 2 B in BF16), plus, once, the output
head: `logit_copies` (3: logits, log-probabilities, their gradient) x vocab
FP32 values per token. Without rematerialisation every layer's set is kept
until the backward pass; with per-layer rematerialisation only each layer's
input (d values) plus one layer's set. quantjax's own training (`distill.fit`
on `models.llama`) does not rematerialise.

References:
  Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models", 2022, arXiv:2205.05198.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from quantjax.eval import memory as memory_lib
from quantjax.eval.memory import format_bits_per_weight

__all__ = ["ModelShape", "MODELS", "DEVICES", "Plan", "plan", "plan_table", "activation_bytes",
           "train_regimes"]


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

  @property
  def linear_shapes(self) -> tuple[tuple[int, int], ...]:
    """`(din, dout)` of one layer's linears: q, k, v, o, gate, up, down."""
    q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
    return ((self.d, q), (self.d, kv), (self.d, kv), (q, self.d),
            (self.d, self.hidden), (self.d, self.hidden), (self.hidden, self.d))

  def lora_params(self, rank: int) -> int:
    """Adapter values of rank-`rank` LoRA on every linear layer."""
    return self.layers * rank * sum(a + b for a, b in self.linear_shapes)

  def scale_count(self, fmt: str | None) -> int:
    """Scales of the linears in `fmt` (groups, or output channels per channel)."""
    if fmt is None:
      return 0
    f = memory_lib.resolve_format(fmt)
    if f.granularity == "group":
      return self.linear_params // f.group_size
    if f.granularity == "per_channel":
      return self.layers * sum(b for _, b in self.linear_shapes)
    return 7 * self.layers


def activation_bytes(model: "ModelShape", batch: int, seq: int, *, act_bytes: int = 4,
                     remat: bool = False, logit_copies: int = 3, tensor: int = 1) -> float:
  """Training activation bytes of a Llama-shaped model (the module docstring's model).

  Args:
    model: the shape.
    batch, seq: local batch (per data shard) and sequence length.
    act_bytes: bytes of the compute dtype (4 FP32, 2 BF16).
    remat: per-layer rematerialisation.
    logit_copies: FP32 vocab-sized tensors per token at the head.
    tensor: tensor-parallel shards (split heads / hidden / vocab).
  """
  m = model
  q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
  per_layer = act_bytes * (4 * m.d + 2 * (q + kv) + 4 * m.hidden) + 4 * m.heads * seq
  head = 4 * logit_copies * m.vocab
  if remat:
    body = m.layers * act_bytes * m.d + per_layer / tensor
  else:
    body = m.layers * per_layer / tensor
  return float(batch * seq * (body + head / tensor))


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

  # Training in FP32 with Adam (the other regimes: `train_regimes`).
  train = train_regimes(m, ("fp32_adam",), mesh, batch=batch, seq=seq, remat=remat)[0].total
  return Plan(m.name, "fp32" if fmt is None else fmt, dict(mesh), device, DEVICES[device],
              store, gptq, evaluate, train)


def train_regimes(model: str | ModelShape, regimes=memory_lib.TRAIN_REGIMES,
                  mesh: dict[str, int] | str = "fsdp=1", *, batch: int = 8, seq: int = 2048,
                  remat: bool = True, fmt: str = "int4_g64", lora_rank: int = 16,
                  lsq: bool = True) -> list[memory_lib.TrainEstimate]:
  """Per-device training bytes of each regime, by component.

  QAT fake-quantizes, and the adapters regime quantizes (format `fmt`) and
  adapts (rank `lora_rank`), every linear layer; embeddings and norms stay
  FP32 and trained (QAT) or frozen (adapters). BF16 regimes keep BF16
  activations; the others FP32. States are sharded over `fsdp x tensor`,
  activations over `data` and `tensor`.
  """
  if isinstance(model, str):
    if model not in MODELS:
      raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    model = MODELS[model]
  if isinstance(mesh, str):
    mesh = _parse_mesh(mesh)
  m = model
  shards = mesh["fsdp"] * mesh["tensor"]
  if batch % mesh["data"]:
    raise ValueError(f"batch {batch} does not split over data={mesh['data']}")
  local = batch // mesh["data"]
  kept = 1.0 / m.layers if remat else 1.0
  out = []
  for r in regimes:
    ab = 2 if r in ("mixed_bf16", "pure_bf16") else 4
    acts = activation_bytes(m, local, seq, act_bytes=ab, remat=remat, tensor=mesh["tensor"])
    e = memory_lib.train_regime_estimate(
        m.n_params, r, quantized_params=m.linear_params, fmt=fmt, row_length=m.d,
        lsq_steps=m.scale_count(fmt) if (r == "qat_fake_quant" and lsq) else 0,
        adapter_params=m.lora_params(lora_rank), activations=acts, kept_fraction=kept)
    out.append(dataclasses.replace(
        e, weights=e.weights / shards, frozen=e.frozen / shards, grads=e.grads / shards,
        optimizer=e.optimizer / shards, extra=e.extra / shards))
  return out


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
