"""Layer-by-layer post-training quantization of a `quantjax.models.llama` model.

The calibration windows are embedded once; then for each decoder layer `i`:

1. one pass over the calibration batches through layer `i` (whose inputs
   come from layers `0..i-1` *already quantized*) collects, for every linear
   input, the statistics the method needs: the GPTQ Hessian `2 X^T X / n`,
   per-channel min / max / mean|x| and a bounded sample of input rows (AWQ's
   search, static activation ranges, SmoothQuant);
2. a per-layer method (`rtn_layer`, `gptq_layer`, `awq_layer`, or any
   `LayerMethod` callable) returns the layer's new parameters;
3. the quantized layer's outputs become the next layer's inputs.

`block_forward` is a functional copy of `llama.Block.__call__` that also
returns each linear's input; a test checks it against the model itself.

References:
  Frantar et al. GPTQ, ICLR 2023, arXiv:2210.17323 (sequential,
  layer-by-layer quantization with inputs from the quantized prefix).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quantjax import ops
from quantjax import rules as rules_lib
from quantjax.methods import activations as act_lib
from quantjax.methods import gptq as gptq_lib
from quantjax.models import llama as llama_lib

__all__ = ["LINEARS", "INPUT_OF", "LinearStats", "LayerMethod", "block_forward", "embed_inputs",
           "to_pure", "collect_layer_stats", "quantize_sequential", "rtn_layer", "gptq_layer",
           "collect_model_stats", "get_param", "set_param", "importance_layer",
           "input_importance"]

# Linear layers of a block, by path inside the block, and which input each reads.
LINEARS = ("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel",
           "attn/o_proj/kernel", "mlp/gate_proj/kernel", "mlp/up_proj/kernel",
           "mlp/down_proj/kernel")
INPUT_OF = {"attn/q_proj/kernel": "attn_in", "attn/k_proj/kernel": "attn_in",
            "attn/v_proj/kernel": "attn_in", "attn/o_proj/kernel": "o_in",
            "mlp/gate_proj/kernel": "mlp_in", "mlp/up_proj/kernel": "mlp_in",
            "mlp/down_proj/kernel": "down_in"}


# ----------------------------------------------------------------------------
# Functional block.
# ----------------------------------------------------------------------------

def to_pure(params: Any) -> Any:
  """An `nnx.State` as its pure nested dict (QArrays kept); dicts pass through."""
  from flax import nnx
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params) if hasattr(nnx, "to_pure_dict") else params.to_pure_dict()
  return params


def _rms(x, scale, eps):
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  xf = xf * jax.lax.rsqrt(var + eps)
  return (jnp.asarray(scale).astype(jnp.float32) * xf.astype(dtype).astype(jnp.float32)
          ).astype(dtype)


def _get(lp: Mapping, path: str):
  node = lp
  for k in path.split("/"):
    node = node[k]
  return node


def block_forward(config: llama_lib.LlamaConfig, lp: Mapping, x: jax.Array, cos: jax.Array,
                  sin: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One decoder block on `x` `[B, T, d]`; returns `(out, inputs)` where
  `inputs` maps "attn_in", "o_in", "mlp_in", "down_in" to each linear's input."""
  b, t, _ = x.shape
  h, hk, hd = config.num_heads, config.num_kv_heads, config.head_dim
  eps = config.rms_norm_eps
  a_in = _rms(x, _get(lp, "input_norm/scale"), eps)
  q = ops.qdot(a_in, _get(lp, "attn/q_proj/kernel")).reshape(b, t, h, hd)
  k = ops.qdot(a_in, _get(lp, "attn/k_proj/kernel")).reshape(b, t, hk, hd)
  v = ops.qdot(a_in, _get(lp, "attn/v_proj/kernel")).reshape(b, t, hk, hd)
  q = llama_lib.apply_rope(q, cos, sin)
  k = llama_lib.apply_rope(k, cos, sin)
  g = h // hk
  qg = q.reshape(b, t, hk, g, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  o_in = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(b, t, h * hd)
  x = x + ops.qdot(o_in, _get(lp, "attn/o_proj/kernel"))
  m_in = _rms(x, _get(lp, "post_attn_norm/scale"), eps)
  d_in = (jax.nn.silu(ops.qdot(m_in, _get(lp, "mlp/gate_proj/kernel")))
          * ops.qdot(m_in, _get(lp, "mlp/up_proj/kernel")))
  x = x + ops.qdot(d_in, _get(lp, "mlp/down_proj/kernel"))
  return x, {"attn_in": a_in, "o_in": o_in, "mlp_in": m_in, "down_in": d_in}


@functools.partial(jax.jit, static_argnums=0)
def _block_jit(config, lp, x, cos, sin, mask):
  return block_forward(config, lp, x, cos, sin, mask)


@functools.partial(jax.jit, static_argnums=0)
def _block_out(config, lp, x, cos, sin, mask):
  return block_forward(config, lp, x, cos, sin, mask)[0]


def embed_inputs(config: llama_lib.LlamaConfig, params: Mapping, tokens: np.ndarray):
  """`(x [B, T, d], cos, sin, mask)` as the model builds them."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  table = params["embed"]["embedding"]
  table = table.dequantize() if hasattr(table, "dequantize") else jnp.asarray(table)
  x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(config.dtype))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
  cos, sin = llama_lib.rope_tables(pos, config.head_dim, config.rope_theta)
  kpos = jnp.arange(t)
  mask = kpos[None, None, :] <= pos[:, :, None]
  return x, cos, sin, mask


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class LinearStats:
  """Statistics of one linear input: `hessian` (`gptq.HessianStat` or None)
  and `act` (`activations.ActStat`: min, max, mean|x|, sampled rows)."""

  hessian: Any
  act: Any

  @property
  def absmax(self) -> jax.Array:
    return jnp.maximum(jnp.abs(self.act.lo), jnp.abs(self.act.hi))

  @property
  def absmean(self) -> jax.Array:
    return self.act.absmean

  @property
  def sample(self) -> jax.Array:
    return self.act.sample


def collect_layer_stats(config, lp, xs, rope, *, hessian: bool = True, max_samples: int = 2048
                        ) -> dict[str, LinearStats]:
  """One pass of layer params `lp` over input batches `xs`; stats by input name."""
  cos, sin, mask = rope
  observer = act_lib.ActObserver(method="mse", max_samples=max_samples)
  stats: dict[str, LinearStats] = {}
  for x in xs:
    _, ins = _block_jit(config, lp, x, cos[:x.shape[0]], sin[:x.shape[0]], mask[:x.shape[0]])
    for name, v in ins.items():
      if name not in stats:
        k = v.shape[-1]
        stats[name] = LinearStats(gptq_lib.hessian_init(k) if hessian else None,
                                  observer.init(k))
      st = stats[name]
      # Sample evenly from every batch, not only the first ones.
      per_batch = max(1, max_samples // max(len(xs), 1))
      obs_b = dataclasses.replace(observer, max_samples=min(max_samples,
                                                           st.act.sample.shape[0] + per_batch))
      st.act = obs_b.update(st.act, v)
      if hessian:
        st.hessian = gptq_lib.hessian_update(st.hessian, v)
  return stats


# ----------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------

class LayerMethod(Protocol):
  """`(layer index, layer params (pure dict), stats by linear name, context) ->
  new layer params`. The context holds `config`, `inputs` (the layer's input
  batches), `rope` and `block_fn` (jitted `(lp, x, cos, sin, mask) -> out`)."""

  def __call__(self, i: int, lp: dict, stats: Mapping[str, LinearStats],
               ctx: Mapping[str, Any]) -> dict: ...


def _set(lp: dict, path: str, value) -> dict:
  """Copy of nested dict `lp` with `path` set."""
  keys = path.split("/")
  out = dict(lp)
  node = out
  for k in keys[:-1]:
    node[k] = dict(node[k])
    node = node[k]
  node[keys[-1]] = value
  return out


# Public names for the layer-dict helpers (other drivers, e.g. sparsity.layerwise).
get_param = _get
set_param = _set


def _batches(x: jax.Array, bs: int) -> list[jax.Array]:
  return [x[i:i + bs] for i in range(0, x.shape[0], bs)]


def quantize_sequential(config: llama_lib.LlamaConfig, params: Any, calib_tokens: np.ndarray,
                        method: LayerMethod, *, batch_size: int = 8, hessian: bool = True,
                        max_samples: int = 2048, progress: bool = True, prefix: str = "layers",
                        mesh: Any = None, data_axis: str = "data"
                        ) -> tuple[dict, dict[str, Any]]:
  """Quantizes the decoder layers one at a time.

  Args:
    config: the model config.
    params: `nnx.State` or pure dict (float).
    calib_tokens: int `[N, T]` calibration windows (see `calib_data`).
    method: a `LayerMethod` (`rtn_layer(rules)`, `gptq_layer(rules)`,
      `awq.awq_layer(rules)`, ...).
    batch_size: windows per forward pass.
    hessian: collect GPTQ Hessians (not needed by RTN / AWQ).
    max_samples: input rows kept per linear input (AWQ search, observers).
    progress: tqdm bar over layers.
    mesh: optional `jax.sharding.Mesh`: every calibration batch is split over
      `data_axis`, so each device runs the layer on its shard and the
      statistics (Hessians, ranges) are reduced across the axis by XLA; the
      per-weight algorithms then run on the reduced statistics.

  Returns:
    `(params, info)`: the pure-dict params with the layers replaced, and
    `info` with `act_stats` (full weight path -> `ActStat` of its input, for
    `activations.attach_act_quant`), `stats_seconds`, `quant_seconds`.
  """
  import time
  pure = to_pure(params)
  x_all, cos, sin, mask = embed_inputs(config, pure, calib_tokens)
  xs = _batches(x_all, batch_size)
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    for x in xs:
      if x.shape[0] % mesh.shape[data_axis]:
        raise ValueError(f"calibration batch of {x.shape[0]} windows does not split over "
                         f"{data_axis}={mesh.shape[data_axis]}; pick batch_size accordingly")
    xs = [jax.device_put(x, sharding) for x in xs]
  rope = (cos[:batch_size], sin[:batch_size], mask[:batch_size])
  layers = dict(pure[prefix])
  act_stats: dict[str, Any] = {}
  t_stats = t_quant = 0.0
  it = range(config.num_layers)
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, desc="quantize layers", unit="layer")
  for i in it:
    lp = layers[i]
    t0 = time.perf_counter()
    stats = collect_layer_stats(config, lp, xs, rope, hessian=hessian, max_samples=max_samples)
    t1 = time.perf_counter()
    by_linear = {name: stats[INPUT_OF[name]] for name in LINEARS}
    ctx = {"config": config, "inputs": xs, "rope": rope, "prefix": f"{prefix}/{i}",
           "block_fn": lambda lp_, x_: _block_out(config, lp_, x_, *(r[:x_.shape[0]]
                                                                     for r in rope))}
    lp = method(i, lp, by_linear, ctx)
    layers[i] = lp
    t2 = time.perf_counter()
    for name in LINEARS:
      act_stats[f"{prefix}/{i}/{name}"] = by_linear[name].act
    xs = [_block_out(config, lp, x, *(r[:x.shape[0]] for r in rope)) for x in xs]
    t_stats += t1 - t0
    t_quant += t2 - t1
  out = dict(pure)
  out[prefix] = layers
  return out, {"act_stats": act_stats, "stats_seconds": t_stats, "quant_seconds": t_quant}


def collect_model_stats(config, params, calib_tokens, *, batch_size: int = 8,
                        max_samples: int = 2048, prefix: str = "layers") -> dict[str, LinearStats]:
  """Statistics of every linear input of the float model (no quantization):
  full weight path -> `LinearStats` (without Hessians). For SmoothQuant."""
  _, info = quantize_sequential(config, params, calib_tokens, lambda i, lp, s, c: lp,
                                batch_size=batch_size, hessian=False, max_samples=max_samples,
                                progress=False, prefix=prefix)
  return {p: LinearStats(None, a) for p, a in info["act_stats"].items()}


def _rule_for(rules, path):
  for r in rules:
    if r.matches(path):
      return None if r.skip else r
  return None


def rtn_layer(rules: Sequence[rules_lib.QuantRule]) -> LayerMethod:
  """Round-to-nearest for the layer's linears matched by `rules`."""
  from quantjax.numerics import qarray as qarray_lib
  rules = tuple(rules)

  def run(i, lp, stats, ctx):
    for name in LINEARS:
      rule = _rule_for(rules, f"{ctx['prefix']}/{name}")
      if rule is not None:
        lp = _set(lp, name, qarray_lib.quantize(_get(lp, name), rule.format,
                                                calibration=rule.calibration))
    return lp
  return run


def importance_layer(out: dict[str, np.ndarray]) -> LayerMethod:
  """Records each linear's input importance (mean squared activation per input
  column, the diagonal of `X^T X / n`) into `out[path]`; leaves weights as they are."""

  def run(i, lp, stats, ctx):
    for name in LINEARS:
      h = gptq_lib.hessian(stats[name].hessian)
      out[f"{ctx['prefix']}/{name}"] = np.asarray(jnp.diagonal(h), np.float32) / 2.0
    return lp
  return run


def input_importance(config: llama_lib.LlamaConfig, params: Any, calib_tokens: np.ndarray, *,
                     batch_size: int = 8, progress: bool = True) -> dict[str, np.ndarray]:
  """`{"layers/i/mlp/down_proj/kernel": mean x^2 per input column, ...}` over the
  calibration windows: llama.cpp's "importance matrix", for the GGUF encoders
  (`io.gguf.export_gguf(..., importance=...)`). Collected through the GPTQ
  Hessian pass (full `X^T X`, of which only the diagonal is kept)."""
  out: dict[str, np.ndarray] = {}
  quantize_sequential(config, params, calib_tokens, importance_layer(out), batch_size=batch_size,
                      hessian=True, progress=progress)
  return out


def gptq_layer(rules: Sequence[rules_lib.QuantRule], *, percdamp: float = 0.01,
               act_order: bool = False, block_size: int = 128) -> LayerMethod:
  """GPTQ for the layer's linears matched by `rules` (Hessians from the pass)."""
  rules = tuple(rules)

  def run(i, lp, stats, ctx):
    for name in LINEARS:
      rule = _rule_for(rules, f"{ctx['prefix']}/{name}")
      if rule is None:
        continue
      h = gptq_lib.hessian(stats[name].hessian)
      res = gptq_lib.gptq_quantize(_get(lp, name), h, rule.format, calibration=rule.calibration,
                                   percdamp=percdamp, act_order=act_order,
                                   block_size=block_size)
      lp = _set(lp, name, res.qarray)
    return lp
  return run
