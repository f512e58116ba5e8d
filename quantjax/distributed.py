"""Scale-out on JAX's own engine: meshes, partition rules, sharded QArrays.

* `make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))` builds a
  `jax.sharding.Mesh` with axes `data`, `fsdp`, `tensor` (-1 means "the rest
  of the devices"); a shape that does not divide the device count is refused.
* `PartitionRule(module_path=regex, spec=(...))` gives a leaf's
  `PartitionSpec` over its *logical* axes; the first match wins, like
  `QuantRule`. `LLAMA_PARTITION_RULES` shard attention heads and the MLP
  hidden on `tensor` and the other axis on `fsdp`.
* `qarray_sharding(q, spec, mesh)` derives shardings for a QArray's children:
  codes follow the weight (a shard boundary inside a packed byte is refused),
  group scales and zero points follow the weight's axes (a boundary inside a
  group is refused), per-channel scales follow the output axis.
* `shard_params` places a tree; `quantize_params_sharded` runs
  `quantize_params` under `jit` with input and output shardings, so each
  device quantizes its own slice and no device holds a whole weight.
* `data_parallel_hessian` reduces calibration statistics over the `data`
  axis; `initialize_multihost` wraps `jax.distributed.initialize`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from quantjax import rules as rules_lib
from quantjax.numerics import qarray as qarray_lib
from quantjax.numerics.qarray import ActQuantized, InputScaled, QArray
from quantjax.transforms import quantize_params

__all__ = [
    "AXES", "MeshConfig", "make_mesh", "PartitionRule", "LLAMA_PARTITION_RULES", "spec_for",
    "param_specs", "param_shardings", "qarray_sharding", "shard_params", "quantize_params_sharded",
    "data_parallel_hessian", "shard_batch", "initialize_multihost", "device_bytes",
    "batch_sharded",
]

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Sizes of the `data`, `fsdp` and `tensor` mesh axes; one may be -1 (the rest)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, n_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sum(s == -1 for s in sizes) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self}")
    for name, s in zip(AXES, sizes):
      if s == 0 or s < -1:
        raise ValueError(f"mesh axis {name}={s} must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if n_devices % known:
        raise ValueError(f"mesh {self} does not divide the {n_devices} devices "
                         f"({known} does not divide {n_devices})")
      sizes = [n_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n_devices:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                       f"but {n_devices} are available")
    return tuple(sizes)


def make_mesh(config: MeshConfig | dict | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes (data, fsdp, tensor) over `devices` (default: all)."""
  if config is None:
    config = MeshConfig()
  elif isinstance(config, dict) or hasattr(config, "to_dict"):
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = set(d) - set(AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {AXES}")
    config = MeshConfig(**d)
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  return Mesh(np.array(devices).reshape(shape), AXES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartitionRule:
  """Shard leaves whose path fully matches `module_path` with `spec`.

  `spec` has one entry per logical axis of the leaf: a mesh axis name, a tuple
  of names, or None (replicated along that axis). An empty spec replicates.
  """

  module_path: str
  spec: tuple[Any, ...] = ()

  def __post_init__(self):
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f"PartitionRule.module_path {self.module_path!r} is not a valid regex: {e}")
    object.__setattr__(self, "spec", tuple(self.spec))

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.module_path, path) is not None


LLAMA_PARTITION_RULES = (
    # [in, out]: heads / MLP hidden (the out axis) on tensor, model width on fsdp
    PartitionRule(module_path=r".*attn/(q|k|v)_proj/kernel", spec=("fsdp", "tensor")),
    PartitionRule(module_path=r".*mlp/(gate|up)_proj/kernel", spec=("fsdp", "tensor")),
    # the contraction axis carries heads / hidden: tensor on in, fsdp on out
    PartitionRule(module_path=r".*attn/o_proj/kernel", spec=("tensor", "fsdp")),
    PartitionRule(module_path=r".*mlp/down_proj/kernel", spec=("tensor", "fsdp")),
    PartitionRule(module_path=r"embed/embedding", spec=("tensor", "fsdp")),
    PartitionRule(module_path=r"lm_head/kernel", spec=("fsdp", "tensor")),
    PartitionRule(module_path=r".*", spec=()),
)


def _axis_size(mesh: Mesh, entry: Any) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names if n is not None)


def _check_spec(mesh: Mesh, spec: tuple, shape: tuple[int, ...], path: str) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"{path}: partition spec {spec} has more entries than the leaf has axes "
                     f"(shape {shape})")
  for axis, entry in enumerate(spec):
    if entry is None:
      continue
    names = entry if isinstance(entry, tuple) else (entry,)
    for n in names:
      if n not in mesh.shape:
        raise ValueError(f"{path}: partition spec {spec} names mesh axis {n!r}, which the mesh "
                         f"(axes {tuple(mesh.shape)}) does not have")
    size = _axis_size(mesh, entry)
    if shape[axis] % size:
      raise ValueError(f"{path}: axis {axis} of length {shape[axis]} cannot be split into {size} "
                       f"shards along {entry!r} (shape {shape})")


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[PartitionRule]) -> tuple:
  """The first matching rule's spec, trimmed to replicate axes that do not divide.

  A rule axis that does not divide a leaf's dimension (e.g. a small vocab on
  a big mesh) is an error only if `strict`; here such entries are kept and
  checked, so callers see the problem.
  """
  for r in rules:
    if r.matches(path):
      spec = r.spec[:len(shape)]
      _check_spec(mesh, spec, tuple(shape), path)
      return spec
  return ()


def qarray_sharding(q: QArray, spec: tuple, mesh: Mesh, path: str = "weight") -> QArray:
  """A QArray whose children are the `NamedSharding`s of `q`'s children.

  The codes follow `spec` over the logical axes. Along the packing axis each
  shard must hold whole bytes; along a grouped axis, whole groups (scales are
  then split the same way). Per-channel scales follow the kept axis; a
  per-tensor scale is replicated.
  """
  fmt = q.fmt
  shape = tuple(q.shape)
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  _check_spec(mesh, spec, shape, path)
  nd = len(shape)
  if fmt.packed and nd:
    pa = fmt.group_axis % nd
    n = _axis_size(mesh, spec[pa]) if spec[pa] is not None else 1
    if n > 1:
      rows = shape[pa] // n
      unit = 8 // fmt.bits if fmt.bits in (1, 2, 4) else 8
      if rows % unit:
        raise ValueError(
            f"{path}: sharding axis {pa} ({shape[pa]} values) over {n} devices puts a shard "
            f"boundary inside a packed byte: {rows} values per shard is not a multiple of "
            f"{unit} {fmt.bits}-bit codes per {'byte' if unit * fmt.bits == 8 else 'run'}")
  code_sharding = NamedSharding(mesh, P(*spec))

  def scale_sharding(a):
    if a is None:
      return None
    if fmt.granularity == "group" and nd:
      ga = fmt.group_axis % nd
      n = _axis_size(mesh, spec[ga]) if spec[ga] is not None else 1
      groups = shape[ga] // fmt.group_size
      if groups % n:
        raise ValueError(f"{path}: {groups} groups of {fmt.group_size} along axis {ga} cannot be "
                         f"split into {n} shards (a shard boundary inside a group)")
      return NamedSharding(mesh, P(*spec))
    if fmt.granularity == "per_channel" and nd:
      ca = fmt.channel_axis % nd
      s = [None] * nd
      s[ca] = spec[ca]
      return NamedSharding(mesh, P(*s))
    return NamedSharding(mesh, P())

  return QArray(qvalue=code_sharding, scale=scale_sharding(q.scale),
                zero_point=scale_sharding(q.zero_point), fmt=fmt, shape=shape, dtype=q.dtype)


def _is_box(x):
  return isinstance(x, (QArray, ActQuantized, InputScaled))


def param_specs(params: Any, mesh: Mesh, rules: Sequence[PartitionRule]) -> Any:
  """Pytree of logical specs, one per leaf (QArrays whole)."""
  return rules_lib.map_with_paths(
      lambda path, x: spec_for(path, tuple(x.shape), mesh, rules) if hasattr(x, "shape") else (),
      params)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[PartitionRule]) -> Any:
  """Pytree of `NamedSharding`s matching `params` leaf for leaf (QArray children too)."""
  def fn(path, x):
    if x is None or not hasattr(x, "shape"):
      return None
    spec = spec_for(path, tuple(x.shape), mesh, rules)
    return _box_sharding(x, spec, mesh, path)
  return rules_lib.map_with_paths(fn, params)


def _box_sharding(x: Any, spec, mesh: Mesh, path: str) -> Any:
  """Shardings for a leaf that may be a QArray inside activation / input-scale wrappers."""
  if isinstance(x, InputScaled):
    # The per-input scale follows the weight on its input axes, replicated elsewhere.
    s_spec = [spec[a] if x.scale.shape[a] == x.shape[a] else None for a in range(len(spec))]
    return InputScaled(weight=_box_sharding(x.weight, spec, mesh, path),
                       scale=NamedSharding(mesh, P(*s_spec)))
  if isinstance(x, ActQuantized):
    inner = _box_sharding(x.weight, spec, mesh, path)
    extra = {f.name: (None if getattr(x, f.name) is None else NamedSharding(mesh, P()))
             for f in dataclasses.fields(x) if f.name not in ("weight", "act_format")}
    return dataclasses.replace(x, weight=inner, **extra)
  if isinstance(x, QArray):
    return qarray_sharding(x, spec, mesh, path)
  return NamedSharding(mesh, P(*spec))


def shard_params(params: Any, mesh: Mesh, rules: Sequence[PartitionRule]) -> Any:
  """`jax.device_put` of every leaf with its sharding."""
  shardings = param_shardings(params, mesh, rules)
  return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), params, shardings,
                      is_leaf=lambda x: x is None)


def quantize_params_sharded(params: Any, quant_rules: Sequence[Any], mesh: Mesh,
                            partition_rules: Sequence[PartitionRule] = LLAMA_PARTITION_RULES,
                            **kwargs) -> Any:
  """`quantize_params` under `jit` with sharded inputs and outputs.

  Each device computes the codes and scales of its own slice (XLA inserts
  the small reductions a per-channel scale over a sharded axis needs); the
  result's children carry the shardings from `qarray_sharding`.
  """
  quant_rules = tuple(quant_rules)
  fn = lambda p: quantize_params(p, quant_rules, **kwargs)  # noqa: E731
  in_sh = param_shardings(params, mesh, partition_rules)
  abstract = jax.eval_shape(fn, params)
  out_sh = param_shardings(abstract, mesh, partition_rules)
  placed = jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), params, in_sh,
                        is_leaf=lambda x: x is None)
  return jax.jit(fn, out_shardings=out_sh)(placed)


def shard_batch(batch: Any, mesh: Mesh, axis: str = "data") -> Any:
  """Puts the leading (batch) axis of every array on the `data` axis."""
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(axis))), batch)


def data_parallel_hessian(x: jax.Array, mesh: Mesh, axis: str = "data") -> jax.Array:
  """`sum_n x_n x_n^T` for activations `[n, k]` sharded over `axis`, reduced across it.

  Each device accumulates its shard's `X^T X`; XLA's all-reduce sums them,
  so the result equals the single-device statistic.
  """
  x = jax.device_put(x, NamedSharding(mesh, P(axis)))

  @jax.jit
  def stat(a):
    a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
    return jnp.einsum("ni,nj->ij", a, a, precision=jax.lax.Precision.HIGHEST)

  return jax.jit(stat, out_shardings=NamedSharding(mesh, P()))(x)


def batch_sharded(forward: Any, mesh: Mesh, axis: str = "data"):
  """`forward(params, tokens)` with each batch split over the mesh's `axis`.

  Pass params placed with `shard_params` and this as the `forward` of
  `quantjax.eval.perplexity.evaluate` to score the protocol with the model
  spread over the mesh: XLA partitions the computation from the shardings.
  """
  batch_sharding = NamedSharding(mesh, P(axis))

  def fn(params, tokens):
    return forward(params, jax.lax.with_sharding_constraint(tokens, batch_sharding))
  return fn


def device_bytes(tree: Any) -> dict[Any, int]:
  """Bytes of `tree` held on each device (addressable shards only)."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", []):
      out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
  return out


def initialize_multihost(coordinator_address: str, num_processes: int, process_id: int, *,
                         local_device_ids: Sequence[int] | None = None) -> None:
  """`jax.distributed.initialize` from config; on CPU, gloo collectives.

  Call before any other JAX work. Validates the arguments with clear errors.
  """
  if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
    raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} must be in [0, {num_processes})")
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
