"""Latency and throughput of any model: prefill and decode tokens/s, timing helpers.

Every figure is measured after a warm-up call; compile time is reported
separately (`compile_s`, from `jit(...).lower(...).compile()`). Timings
block on the result (`block_until_ready`). Report them beside a baseline
measured in the same run (`experiments/bench_decode.py`; evaluation tokens/s
come with every perplexity record).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Timer", "time_fn", "prefill_decode", "quantize_time"]


class Timer:
  """`with Timer() as t: ...; t.seconds`."""

  def __enter__(self):
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._t0


def _block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                      x)


def time_fn(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
  """Median / min seconds of `fn()` after `warmup` calls (results are blocked on)."""
  for _ in range(warmup):
    _block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "repeats": repeats}


def quantize_time(fn: Callable[[], Any]) -> tuple[Any, float]:
  """Runs a quantization `fn()` and returns (result, wall seconds incl. device sync)."""
  t0 = time.perf_counter()
  out = _block(fn())
  return out, time.perf_counter() - t0


def prefill_decode(decoder: tuple[Callable[..., Any], Callable[..., Any]], params: Any, *,
                   vocab_size: int, batch_sizes=(1, 8), prompt_len: int = 128,
                   decode_steps: int = 32, repeats: int = 3) -> list[dict[str, Any]]:
  """Prefill and decode throughput with a KV cache, per batch size, for any model.

  Args:
    decoder: `(init_cache(batch, max_len), step(params, tokens, cache, index))`,
      where `step` returns `(logits of the last position [B, V], cache)`; e.g.
      `quantjax.models.llama.decoder(config)`.
    params: the model's params (arrays or QArrays).
    vocab_size: token ids of the random prompt are drawn below it.
    batch_sizes: one record per batch size.
    prompt_len: prefill: one `[B, prompt_len]` step into an empty cache.
    decode_steps: then this many greedy single-token steps.
    repeats: timed repetitions (median reported) after a warm-up.

  Returns:
    One record per batch size with `prefill_tokens_per_s`,
    `decode_tokens_per_s`, the per-step decode latency and the compile times of
    both shapes.
  """
  init_cache, step_fn = decoder
  step = jax.jit(step_fn, donate_argnums=2)
  out = []
  rng = np.random.default_rng(0)
  for b in batch_sizes:
    max_len = prompt_len + decode_steps + 1
    prompt = jnp.asarray(rng.integers(0, vocab_size, (b, prompt_len)), jnp.int32)
    one = jnp.zeros((b, 1), jnp.int32)
    cache = init_cache(b, max_len)
    t0 = time.perf_counter()
    pre_c = step.lower(params, prompt, cache, jnp.int32(0)).compile()
    compile_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec_c = step.lower(params, one, cache, jnp.int32(prompt_len)).compile()
    compile_decode = time.perf_counter() - t0

    def prefill():
      return pre_c(params, prompt, init_cache(b, max_len), jnp.int32(0))

    pre = time_fn(prefill, repeats=repeats)
    _, cache = _block(prefill())

    def decode():
      c = jax.tree.map(jnp.copy, cache)
      tok = one
      for i in range(decode_steps):
        logits, c = dec_c(params, tok, c, jnp.int32(prompt_len + i))
        tok = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
      return tok

    dec = time_fn(decode, repeats=repeats)
    out.append({
        "batch": b,
        "prompt_len": prompt_len,
        "decode_steps": decode_steps,
        "compile_prefill_s": compile_prefill,
        "compile_decode_s": compile_decode,
        "prefill_s": pre["median_s"],
        "prefill_tokens_per_s": b * prompt_len / pre["median_s"],
        "decode_step_ms": 1e3 * dec["median_s"] / decode_steps,
        "decode_tokens_per_s": b * decode_steps / dec["median_s"],
    })
  return out
