"""The perplexity protocol (every quality number in quantjax uses it).

Each evaluation window `[window]` is scored independently: the model sees the
window alone (after a BOS token when the split has one, see
`quantjax.eval.data.Split.model_inputs`) and predicts tokens 1..window-1 from
their prefixes. Perplexity
is `exp(mean NLL)` over all `eval_windows * (window - 1)` predicted tokens;
logits and the log-softmax are float32, the mean is accumulated in float64.
See `quantjax.eval.data` for the corpus and the split.

The forward pass is jitted once per (config, parameter structure, batch
shape); windows are batched (`batch_size`, default 8) and a short last batch
is padded with copies whose scores are dropped.
"""

from __future__ import annotations

import functools
import math
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from quantjax.eval import data as data_lib
from quantjax.kernels import dispatch
from quantjax.models import llama as llama_lib

__all__ = ["environment", "evaluate", "token_nll", "window_nll_fn"]


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """jax/jaxlib versions and the device, for result records."""
  import os

  import jaxlib
  dev = jax.devices()[0]
  return {
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(jaxlib, "__version__", "unknown"),
      "backend": jax.default_backend(),
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
      "device_count": jax.device_count(),
      "cpu": _cpu_name(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
  }


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token NLL `[B, T-1]` (float32) from logits `[B, T, V]` and tokens `[B, T]`."""
  return _nll_from_shifted(logits[:, :-1], tokens[:, 1:])


def _nll_from_shifted(logits: jax.Array, targets: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - tgt


@dispatch.routed_jit(static_argnums=0)
def _llama_nll(config, params, tokens):
  from flax import nnx
  model = nnx.merge(llama_lib.graphdef(config), params)
  x, _ = model.hidden_states(tokens)
  # The last position predicts nothing inside the window: drop it before the head.
  logits = model.logits(x[:, :-1])
  return _nll_from_shifted(logits, tokens[:, 1:])


def window_nll_fn(config: llama_lib.LlamaConfig, params: Any) -> Callable[[np.ndarray], Any]:
  """A jitted `tokens [B, T] -> NLL [B, T-1]` for a quantjax Llama and its params."""
  if not isinstance(config, llama_lib.LlamaConfig):
    raise TypeError(f"window_nll_fn scores quantjax Llama models, got a {type(config).__name__}; "
                    "pass evaluate(..., nll_fn=...) (e.g. quantjax.models.gemma3.window_nll_fn)")
  state = llama_lib.as_state(config, params)
  fn = functools.partial(_llama_nll, config, state)
  fn.lower = lambda tokens: _llama_nll.lower(config, state, tokens)  # type: ignore[attr-defined]
  return fn


def evaluate(config: llama_lib.LlamaConfig | None, params: Any, split: data_lib.Split, *,
             batch_size: int = 8, progress: bool = True, model_name: str | None = None,
             nll_fn: Callable[[np.ndarray], Any] | None = None,
             desc: str = "perplexity") -> dict[str, Any]:
  """Scores `split.eval_windows` and returns a result record.

  Args:
    config: the Llama config (ignored when `nll_fn` is given).
    params: params tree (arrays or QArrays), `nnx.State` or pure dict.
    split: from `quantjax.eval.data.load_split`.
    batch_size: windows per forward pass.
    progress: show a tqdm bar over windows.
    model_name: recorded as `model`.
    nll_fn: optional `tokens [B, T] -> NLL [B, T-1]` to score another model
      (e.g. a transformers reference) by the same protocol.
    desc: progress-bar label.

  Returns:
    A dict with `perplexity`, `nll`, the protocol fields of `split.record()`,
    `dtype`, environment fields and wall times (`compile_s`, `eval_s`,
    `eval_tokens_per_s`).
  """
  windows = np.asarray(split.model_inputs(), np.int32)  # BOS in front when the split has one
  skip = split.skip
  n, t = windows.shape
  bs = max(1, min(batch_size, n))
  fn = nll_fn if nll_fn is not None else window_nll_fn(config, params)

  compile_s = 0.0
  t0 = time.perf_counter()
  first = windows[:bs]
  if first.shape[0] < bs:
    first = np.concatenate([first, np.repeat(first[-1:], bs - first.shape[0], 0)])
  if hasattr(fn, "lower"):
    compiled = fn.lower(jnp.asarray(first)).compile()
    state = llama_lib.as_state(config, params)
    run = lambda b: compiled(state, b)  # noqa: E731
  else:
    run = fn
  compile_s = time.perf_counter() - t0

  nll_sum = 0.0
  count = 0
  per_window = []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc=desc, unit="win", leave=False)
  t1 = time.perf_counter()
  for i in range(0, n, bs):
    batch = windows[i:i + bs]
    real = batch.shape[0]
    if real < bs:
      batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, 0)])
    nll = np.asarray(run(jnp.asarray(batch)), np.float64)[:real, skip:]
    per_window.extend(nll.mean(axis=1).tolist())
    nll_sum += float(nll.sum())
    count += nll.size
    if bar is not None:
      bar.update(real)
  eval_s = time.perf_counter() - t1
  if bar is not None:
    bar.close()
  mean = nll_sum / count
  dtype = config.dtype if config is not None else "float32"
  rec = {
      "model": model_name or (config.name if config is not None else "unknown"),
      "perplexity": math.exp(mean),
      "nll": mean,
      "scored_tokens": int(count),
      "per_window_nll": per_window,
      "dtype": dtype,
      "batch_size": int(bs),
      "compile_s": compile_s,
      "eval_s": eval_s,
      "eval_tokens_per_s": n * t / eval_s if eval_s > 0 else float("nan"),
  }
  rec.update(split.record())
  rec.update(environment())
  return rec
